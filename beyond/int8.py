"""An int8 KV cache: keys and values stored as 8-bit integers, one float scale per token and head.

    store:  s = max |x| / 127 over one token's d_head numbers     (float32, one per token and head)
            q = round(x / s), an int8 in [-127, 127]
    read:   x_hat = q * s,  and |x - x_hat| <= s / 2 for every element (rounding to nearest)

A float32 cache keeps 2 * d_head * 4 bytes per token and K/V head; this one keeps 2 * d_head
bytes of int8 plus 2 * 4 bytes of scales: (64 + 8) / 256 = 0.281 of float32 at d_head 32. Attention
reads the keys and values dequantized (append returns floats of the model's dtype), so the model
code does not change; only what is remembered between steps is rounded.

Per token, not per channel. Keys of large models have a few outlier channels, so KIVI (Liu et al.,
2024) scales keys per channel and values per token. A per-channel scale must stay fixed for a
group of tokens, so KIVI keeps the newest tokens (an unfinished group) in full precision. On the
trained model here the largest channel is only about twice the median one, and
`python tools/int8.py --scales` measures (1000 held-out prompts): per-channel scales in groups of
16 cut the key error by 26-32% but the mean |logit difference| by only 4% (0.0142 against 0.0148;
rounding the values alone gives 0.0118) and the largest one not at all (0.54 against 0.49), while
the full-precision group would cost another 0.06-0.13 of a float32 cache at 128 positions, past
0.3x. Per token is kept.

Measured on the trained model (int8 against the float cache, and per-token against per-channel
key scales): `python tools/int8.py --compare`, `--scales`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from attention import check_attention_inputs
from cache import KVCache, ModelCache
from parts.checks import fits_in_memory, float_array, float_dtype, positive_int

if TYPE_CHECKING:  # type hints only
    from block import GPT

INT8 = np.dtype(np.int8)
QMAX = 127  # symmetric: -127 .. 127 (-128 unused, so q and -q are both representable)
SCALE_DTYPE = np.dtype(np.float32)  # 4 bytes per scale whatever the model's dtype
READ_DTYPES = ("float32", "float64")  # what append hands back: the model's dtype
# The stated end-to-end tolerance (measured, not proved; the proof is attention_error_bound, per
# attention call): with an int8 cache every logit stays within this fraction of the largest
# |logit| of the float run. Measured: 3.0% on the trained model (1000 held-out prompts), 1.0%
# at most on the small test models, 2.5% on `generate.py --random`.
LOGIT_TOLERANCE = 0.05


# --- quantize and dequantize ---------------------------------------------------------------------

def quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x (..., d) float -> q (..., d) int8 and scale (..., 1) float32, one scale per row of d.

    scale = max |row| / 127, so the largest element maps to +-127; an all-zero row gets scale 0
    and q = 0. Rounding to nearest makes |x - q * scale| <= scale / 2. Checks its own door
    (finite floats, rows of at least one number, scales that fit float32)."""
    x = float_array("quantize: x", x, min_ndim=1)
    if x.shape[-1] == 0:
        raise ValueError(f"quantize: x of shape {x.shape} has empty rows (last axis 0): there is "
                         "no largest element to scale by")
    check_storable("quantize: x", x)
    work = np.result_type(x, np.float32)
    scale = (np.abs(x).max(axis=-1, keepdims=True) / QMAX).astype(SCALE_DTYPE)  # (..., 1)
    safe = np.where(scale > 0, scale, 1).astype(work)  # an all-zero row divides by 1, gives 0
    q = np.clip(np.rint(x.astype(work, copy=False) / safe), -QMAX, QMAX).astype(INT8)
    return q, scale


def check_storable(name: str, x: np.ndarray) -> None:
    """ValueError naming `name` unless x is finite and its largest |value| / 127 fits the float32
    scale (about 4.3e40 and below): a NaN, an inf or an overflowing scale has no int8 form."""
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or inf; int8 with a finite scale cannot store it")
    largest = float(np.abs(x).max()) if x.size else 0.0
    if largest / QMAX > float(np.finfo(SCALE_DTYPE).max):
        raise ValueError(f"{name} holds values up to {largest:.3g}, whose scale ({largest:.3g} / "
                         f"{QMAX}) overflows the float32 scale")


def dequantize(q: np.ndarray, scale: np.ndarray, dtype: np.dtype | type | str = np.float32
               ) -> np.ndarray:
    """q (..., d) int8 and scale (..., 1) -> q * scale (..., d) in dtype."""
    return q.astype(dtype) * scale.astype(dtype)


# --- the cache -----------------------------------------------------------------------------------

class Int8KVCache(KVCache):
    """One layer's keys and values as int8, (B, H_kv, max_len, d_head) each, and their scales,
    (B, H_kv, max_len, 1) float32 each. update(k, v) takes floats and returns every position held
    so far dequantized, in `dtype` (the model's). The checks, room and rollback are KVCache's."""

    def __init__(
        self, batch_size: int, n_kv_heads: int, max_len: int, d_head: int,
        dtype: np.dtype | type | str = np.float32, zeros: Callable[..., np.ndarray] = np.zeros,
    ) -> None:
        """Allocates the int8 buffers and the scales, zeroed, at full length. dtype is what
        update returns (float32 or float64). Checks its arguments."""
        shape = tuple(positive_int(f"Int8KVCache {name}", value) for name, value in (
            ("batch_size", batch_size), ("n_kv_heads", n_kv_heads), ("max_len", max_len),
            ("d_head", d_head)))
        self.read_dtype = float_dtype("Int8KVCache dtype", dtype, READ_DTYPES)
        fits_in_memory(f"Int8KVCache {shape}", int8_cache_bytes(1, *shape[:3], shape[3]))
        self.keys = zeros(shape, dtype=INT8)  # (B, H_kv, max_len, d_head)
        self.values = zeros(shape, dtype=INT8)  # (B, H_kv, max_len, d_head)
        self.key_scales = zeros((*shape[:3], 1), dtype=SCALE_DTYPE)  # (B, H_kv, max_len, 1)
        self.value_scales = zeros((*shape[:3], 1), dtype=SCALE_DTYPE)  # (B, H_kv, max_len, 1)
        self.length = 0

    @property
    def nbytes(self) -> int:
        """Bytes of the int8 buffers AND their scales: 2 * (d_head + 4) per token and head."""
        return (self.keys.nbytes + self.values.nbytes + self.key_scales.nbytes
                + self.value_scales.nbytes)

    def __repr__(self) -> str:
        return (f"Int8KVCache(length={self.length}, max_len={self.max_len}, "
                f"batch={self.batch_size}, n_kv_heads={self.n_kv_heads}, d_head={self.d_head}, "
                f"reads as {self.read_dtype})")

    def narrowed(self, name: str, x: np.ndarray) -> np.ndarray:
        """x as floats to quantize, refusing NaN or inf (no finite scale stores them) and values
        whose scale, max |x| / 127, would overflow the float32 scale (about 4.3e40)."""
        check_storable(f"Int8KVCache.append: {name}", x)
        return x if x.dtype.kind == "f" else x.astype(self.read_dtype)

    def update(self, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Quantize the t new positions into [length : length + t] and return every position
        held, dequantized: keys, values (B, H_kv, length + t, d_head) in the read dtype."""
        k, v = self.narrowed("k", k), self.narrowed("v", v)
        start, end = self.length, self.length + k.shape[2]
        (k_q, k_s), (v_q, v_s) = quantize(k), quantize(v)  # both first: v may view the buffers
        self.keys[:, :, start:end], self.key_scales[:, :, start:end] = k_q, k_s
        self.values[:, :, start:end], self.value_scales[:, :, start:end] = v_q, v_s
        self.length = end
        return (dequantize(self.keys[:, :, :end], self.key_scales[:, :, :end], self.read_dtype),
                dequantize(self.values[:, :, :end], self.value_scales[:, :, :end],
                           self.read_dtype))

    def truncate(self, length: int) -> None:
        """KVCache.truncate, and the dropped positions' scales zeroed too."""
        held = self.length
        super().truncate(length)  # checks length, zeroes the int8 buffers past it
        self.key_scales[:, :, self.length:held] = 0
        self.value_scales[:, :, self.length:held] = 0


def int8_cache_bytes(n_layers: int, batch: int, n_kv_heads: int, seq_len: int,
                     d_head: int) -> int:
    """2 (K and V) * layers * batch * kv heads * positions * (d_head int8 + one 4-byte scale)."""
    return 2 * n_layers * batch * n_kv_heads * seq_len * (d_head * INT8.itemsize
                                                          + SCALE_DTYPE.itemsize)


def int8_cache(model: GPT, batch_size: int) -> ModelCache:
    """An empty int8 cache for batch_size rows: one Int8KVCache per layer, max_seq_len positions,
    reading back in the model's dtype. All layers must fit in memory together, checked before
    the first. Use it as any cache: model(ids, cache), generate_cached(..., cache=cache)."""
    c = model.config
    H_kv, d_head = model.kv_shape
    fits_in_memory(f"an int8 cache for {batch_size!r} rows",
                   int8_cache_bytes(c.n_layers, positive_int("batch_size", batch_size),
                                    H_kv, c.max_seq_len, d_head))
    return ModelCache([Int8KVCache(batch_size, H_kv, c.max_seq_len, d_head, model.dtype,
                                   model.zeros) for _ in range(c.n_layers)])


# --- the proved bound for one attention call -----------------------------------------------------

def attention_error_bound(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """How far attention over the int8 cache's K and V can be from attention over the float ones:
    a bound on |out_int8 - out_float| per element, (..., t_q, d_v) for q (..., t_q, d) and k, v
    (..., t_k, d) and (..., t_k, d_v), whatever the mask, in exact arithmetic. It is reached:
    tests/test_int8.py builds keys rounded against the query, and values that round by half a
    step, whose errors come within 1% of it.

    Each key element moves by at most s_k / 2, so a score q . k / sqrt(d) moves by at most
    eps = ||q||_1 max s_k / (2 sqrt(d)). Then every weight's ratio p_hat_j / p_j lies within a
    factor e^2eps, and two distributions so related are at most tanh(eps / 2) apart in total
    variation (the extreme: two groups of keys, their ratios at the two ends; half the weights
    moved, sum_j |p_hat_j - p_j| / 2). As sum_j (p_hat_j - p_j) = 0, sum_j (p_hat_j - p_j) v_j
    moves by at most tanh(eps / 2) (max_j v_j - min_j v_j) per element; the values' own rounding,
    sum_j p_hat_j (v_hat_j - v_j), adds at most max s_v / 2.
    """
    check_attention_inputs(q, k, v, None, "attention_error_bound")
    d = q.shape[-1]
    s_k = quantize(k)[1].max(axis=-2, keepdims=True)  # (..., 1, 1): the largest key scale
    s_v = quantize(v)[1].max(axis=-2, keepdims=True)  # (..., 1, 1)
    eps = np.abs(q).sum(axis=-1, keepdims=True) * s_k / (2 * math.sqrt(d))  # (..., t_q, 1)
    spread = v.max(axis=-2, keepdims=True) - v.min(axis=-2, keepdims=True)  # (..., 1, d_v)
    return np.tanh(eps / 2) * spread + s_v / 2  # (..., t_q, d_v)


# --- the float reference the int8 logits are measured against ------------------------------------

def teacher_forced_logits(model: GPT, prompts: list[np.ndarray], tokens: np.ndarray
                          ) -> np.ndarray:
    """The model's logits (no cache, float) for the generated tokens (B, N) after left-padded
    prompts: step n's logits (B, N, V), the ones generated token n was chosen from."""
    from generate import left_pad

    ids, mask = left_pad(prompts)  # (B, P) each
    B, P = ids.shape
    N = tokens.shape[1]
    seq = np.concatenate([ids, tokens[:, :N - 1]], axis=1)  # (B, P + N - 1)
    full = np.concatenate([mask, np.ones((B, N - 1), dtype=mask.dtype)], axis=1)
    return model(seq, attention_mask=full)[:, P - 1:]  # (B, P + N - 1, V) -> (B, N, V)

