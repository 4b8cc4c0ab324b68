"""The KV cache: the memory shortcut of decoding.

At step t the new token needs the keys and values of every earlier token. They do not change once
computed (causal attention: an old token never sees a new one), so we keep them instead of
recomputing the whole prefix. Queries are never cached: only the newest token asks a question.

One KVCache holds one layer. Its buffers are allocated once at full length, (B, H_kv, max_len,
d_head) for keys and the same for values, and `append` writes the new positions along the sequence
axis (axis 2) at [length : length + t], the way llama and gpt-fast do. Nothing is concatenated
per step, so appending costs the same at position 2000 as at position 20.
"""

from __future__ import annotations

import numpy as np


class KVCache:
    """Preallocated keys and values of one attention layer, and how many positions are filled.

    `len(cache)` is the single source of truth for positions: the next token's absolute position
    is len(cache) (before any padding is taken into account).
    """

    def __init__(
        self, batch_size: int, n_kv_heads: int, max_len: int, d_head: int,
        dtype: np.dtype | type = np.float32,
    ) -> None:
        for name, value in (("batch_size", batch_size), ("n_kv_heads", n_kv_heads),
                            ("max_len", max_len), ("d_head", d_head)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"KVCache: {name} must be a positive int, got {value!r}")
        shape = (batch_size, n_kv_heads, max_len, d_head)
        self.keys = np.zeros(shape, dtype=dtype)  # (B, H_kv, max_len, d_head)
        self.values = np.zeros(shape, dtype=dtype)  # (B, H_kv, max_len, d_head)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes held by the two preallocated buffers (they are full size from the start)."""
        return self.keys.nbytes + self.values.nbytes

    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:
        B, H_kv, max_len, d_head = self.keys.shape
        return (f"KVCache(length={self.length}, max_len={max_len}, batch={B}, "
                f"n_kv_heads={H_kv}, d_head={d_head}, dtype={self.keys.dtype})")

    def append(self, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Write t new positions and return views of every position held so far.

        k, v (B, H_kv, t, d_head) -> keys, values (B, H_kv, length + t, d_head).
        Everything is checked before anything is written, so a refused append leaves the cache
        exactly as it was.
        """
        self.check_append(k, v)
        start, end = self.length, self.length + k.shape[2]
        self.keys[:, :, start:end] = k  # along the sequence axis, never the batch or head axis
        self.values[:, :, start:end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]  # views: no copy

    def check_append(self, k: np.ndarray, v: np.ndarray) -> None:
        """Raise ValueError/TypeError if append(k, v) would be wrong; change nothing."""
        B, H_kv, max_len, d_head = self.keys.shape
        for name, x in (("k", k), ("v", v)):
            if not isinstance(x, np.ndarray):
                raise TypeError(f"KVCache.append: {name} must be a numpy array, got {type(x)}")
            if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
                raise TypeError(f"KVCache.append: {name} must hold real numbers, got dtype "
                                f"{x.dtype}")
            if x.ndim != 4 or x.shape[0] != B or x.shape[1] != H_kv or x.shape[3] != d_head:
                raise ValueError(
                    f"KVCache.append: {name} must be (B={B}, H_kv={H_kv}, t, d_head={d_head}), "
                    f"got {x.shape}")
        if k.shape != v.shape:
            raise ValueError(f"KVCache.append: k {k.shape} and v {v.shape} differ")
        t = k.shape[2]
        if t < 1:
            raise ValueError("KVCache.append: nothing to append (t = 0)")
        if self.length + t > max_len:
            raise ValueError(
                f"KVCache.append: {t} new positions after {self.length} exceed max_len={max_len}")

    def reset(self) -> None:
        """Forget every position. The buffers stay allocated; old values are never read again
        because reads stop at `length`."""
        self.length = 0


def kv_cache_bytes(
    n_layers: int, batch: int, n_kv_heads: int, d_head: int, seq_len: int,
    dtype: np.dtype | type | str = np.float32,
) -> int:
    """Memory of a full KV cache: 2 (K and V) * layers * batch * kv heads * positions * d_head *
    bytes per element. It grows linearly with context length and with batch."""
    return (2 * n_layers * batch * n_kv_heads * seq_len * d_head
            * np.dtype(dtype).itemsize)
