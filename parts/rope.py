"""Rotary position embeddings (RoPE): positions enter attention by rotating q and k.

Each head vector of size d_head is cut into d_head / 2 pairs; pair i is rotated by the angle
position * base ** (-2i / d_head). A dot product of two rotated vectors then depends only on the
difference of their positions, which is what attention should care about.

Pairing convention: half-split, pair i = (x[i], x[i + d_head / 2]), as in Hugging Face's Llama
(`rotate_half`) and GPT-NeoX. The interleaved convention of the original paper and Meta's llama
code, pair i = (x[2i], x[2i + 1]), is the same rotation after a fixed permutation of the
dimensions of W_q and W_k; we use half-split so our numbers can be checked against Hugging Face's
implementation directly, and because two contiguous halves need no strided gather.
"""

from __future__ import annotations

import numpy as np

from parts.checks import finite_number, float_array, int_array, positive_int


def rope_angles(
    positions: np.ndarray, d_head: int, base: float = 10000.0, dtype: np.dtype = np.float64
) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin for integer positions (1 or B, T): each (1 or B, 1, T, d_head // 2), ready to
    broadcast over the head axis of q and k (B, H, T, d_head). Checks its own arguments."""
    positions = int_array("rope_angles positions", positions, 2)
    if positions.size and positions.min() < 0:
        raise ValueError(f"rope_angles: positions must be >= 0, got min {positions.min()}")
    if positive_int("rope_angles d_head", d_head) % 2:
        raise ValueError(f"rope_angles: d_head must be even to form pairs, got {d_head}")
    base = finite_number("rope_angles base", base, above=0)
    inv_freq = base ** (-np.arange(0, d_head, 2, dtype=np.float64) / d_head)  # (d_head / 2,)
    angles = positions.astype(np.float64)[..., None] * inv_freq  # (B, T, d_head / 2)
    angles = angles[:, None]  # (B, T, d_head / 2) -> (B, 1, T, d_head / 2): one angle for all heads
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate each (x[i], x[i + d/2]) pair of x (B, H, T, d) by its angle. Same shape out.
    Checks its own arguments: cos and sin must broadcast to (B, H, T, d / 2)."""
    x = float_array("apply_rope x", x, ndim=4)
    half = (*x.shape[:-1], x.shape[-1] // 2)
    for name, a in (("cos", cos), ("sin", sin)):
        try:
            fits = x.shape[-1] % 2 == 0 and np.broadcast_shapes(np.shape(a), half) == half
        except ValueError:
            fits = False
        if not fits:
            raise ValueError(f"apply_rope: x {x.shape} needs an even last axis and {name} "
                             f"broadcastable to {half}, got {name} {np.shape(a)}")
    return rotate_pairs(x, cos, sin)


def rotate_pairs(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """apply_rope without the checks (the engine's inner loop, on checked input)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]  # (B, H, T, d) -> two (B, H, T, d / 2) halves
    return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
