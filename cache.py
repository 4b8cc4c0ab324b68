"""The KV cache: the memory shortcut of decoding.

At step t the new token needs the keys and values of every earlier token. They do not change once
computed (causal attention: an old token never sees a new one), so we keep them instead of
recomputing the whole prefix. Queries are never cached: only the newest token asks a question.

Two objects, smallest first:
    KVCache      one layer's keys and values. Its buffers are allocated once at full length,
                 (B, H_kv, max_len, d_head) each, and `append` writes the new positions along the
                 sequence axis (axis 2) at [length : length + t], as llama and gpt-fast do. Nothing
                 is concatenated per step, so appending costs the same at position 2000 as at 20.
    ModelCache   what a whole model remembers between calls: one KVCache per layer, and for every
                 row which positions hold real tokens and which hold padding. A token's position is
                 the number of real tokens before it in its row, so the cache is the one place
                 positions come from: a caller hands a padding mask over once, at prefill, and
                 every later call reads it from here.

What the model asks of one layer's cache is the LayerCache protocol below; KVCache is one
implementation, beyond/window.py's rolling buffer another.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np

from parts.checks import fits_in_memory, float_dtype, is_int, positive_int, zero_one_mask

CACHE_DTYPES = ("float16", "float32", "float64")  # int or bool buffers would round or wrap K/V


@runtime_checkable
class LayerCache(Protocol):
    """What the model and the engine ask of one layer's cache, whatever it stores or how.

    Shapes: k, v (B, H_kv, t, d_head) new; keys, values (B, H_kv, t_k, d_head) to attend over.
    The mask that goes with those keys is the model's business: it is built from the positions
    the model cache records (ModelCache.real for a cache whose keys come back in time order).
    """

    batch_size: int  # B, the rows it holds
    n_kv_heads: int  # H_kv, key/value heads per row
    d_head: int  # features per head
    max_len: int  # key places it holds: positions for a KVCache, slots for a rolling buffer
    dtype: np.dtype  # what K and V are stored as
    nbytes: int  # bytes its buffers hold

    def __len__(self) -> int:
        """Positions written so far, padding included."""

    def append(self, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Check, write the new k, v, and return the keys and values this step attends over."""

    def _write(self, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """append without the checks (k, v already narrowed): the engine's."""

    def narrowed(self, name: str, x: np.ndarray) -> np.ndarray:
        """x cast to the cache's dtype, refusing a value the cast would turn into inf."""

    def truncate(self, length: int) -> None:
        """Keep the first `length` positions written, or refuse (ValueError)."""

    def reset(self) -> None:
        """Forget every position; the buffers stay allocated."""


class KVCache:
    """Preallocated keys and values of one attention layer, and how many positions are filled."""

    def __init__(
        self, batch_size: int, n_kv_heads: int, max_len: int, d_head: int,
        dtype: np.dtype | type | str = np.float32, zeros: Callable[..., np.ndarray] = np.zeros,
    ) -> None:
        """Both buffers are allocated here, zeroed, at full length. zeros(shape, dtype) makes
        them (the engine passes one that backs memory in small pages). Checks its arguments."""
        shape = tuple(positive_int(f"KVCache {name}", value) for name, value in (
            ("batch_size", batch_size), ("n_kv_heads", n_kv_heads), ("max_len", max_len),
            ("d_head", d_head)))
        dtype = float_dtype("KVCache dtype", dtype, CACHE_DTYPES)
        fits_in_memory(f"KVCache {shape} x 2 ({dtype.name})", 2 * math.prod(shape) * dtype.itemsize)
        self.keys = zeros(shape, dtype=dtype)  # (B, H_kv, max_len, d_head)
        self.values = zeros(shape, dtype=dtype)  # (B, H_kv, max_len, d_head)
        self.length = 0  # positions [0, length) are filled; past them: zeros, never read

    @property
    def batch_size(self) -> int:
        return self.keys.shape[0]

    @property
    def n_kv_heads(self) -> int:
        return self.keys.shape[1]

    @property
    def max_len(self) -> int:
        return self.keys.shape[2]

    @property
    def d_head(self) -> int:
        return self.keys.shape[3]

    @property
    def dtype(self) -> np.dtype:
        return self.keys.dtype

    @property
    def nbytes(self) -> int:
        """Bytes held by the two preallocated buffers (they are full size from the start)."""
        return self.keys.nbytes + self.values.nbytes

    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:
        return (f"KVCache(length={self.length}, max_len={self.max_len}, batch={self.batch_size}, "
                f"n_kv_heads={self.n_kv_heads}, d_head={self.d_head}, dtype={self.dtype})")

    def append(self, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Write t new positions and return views of every position held so far.

        k, v (B, H_kv, t, d_head) -> keys, values (B, H_kv, length + t, d_head).
        Everything is checked before anything is written (shapes, room, and that no value
        overflows the cache's dtype), so a refused append leaves the cache exactly as it was.
        """
        k, v = self.check_append(k, v)
        return self._write(k, v)

    def _write(self, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """append without the checks, for callers that checked the whole step already."""
        start, end = self.length, self.length + k.shape[2]
        self.keys[:, :, start:end] = k  # along the sequence axis, never the batch or head axis
        self.values[:, :, start:end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]  # views: no copy

    def check_append(self, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """k and v as the cache will store them (cast to its dtype), or ValueError/TypeError if
        append(k, v) would be wrong; changes nothing."""
        B, H_kv, _, d_head = self.keys.shape
        for name, x in (("k", k), ("v", v)):
            if not isinstance(x, np.ndarray) or type(x) is not np.ndarray:
                raise TypeError(f"KVCache.append: {name} must be a numpy array (not a "
                                f"subclass), got {type(x).__name__}")
            if x.dtype.kind not in "fiu":
                raise TypeError(f"KVCache.append: {name} must hold real numbers, got dtype "
                                f"{x.dtype}")
            if x.ndim != 4 or x.shape[0] != B or x.shape[1] != H_kv or x.shape[3] != d_head:
                raise ValueError(
                    f"KVCache.append: {name} must be (B={B}, H_kv={H_kv}, t, d_head={d_head}), "
                    f"got {x.shape}")
        if k.shape != v.shape:
            raise ValueError(f"KVCache.append: k {k.shape} and v {v.shape} differ")
        self.check_room(k.shape[2])
        return self.narrowed("k", k), self.narrowed("v", v)

    def narrowed(self, name: str, x: np.ndarray) -> np.ndarray:
        """x cast to the cache's dtype, refusing a finite value the cast would turn into inf
        (over 65504 into a float16 cache, over 3.4e38 from float64 into float32)."""
        if np.can_cast(x.dtype, self.dtype, "safe"):
            return x
        with np.errstate(over="ignore"):
            cast = x.astype(self.dtype)
        if np.any(np.isinf(cast) & np.isfinite(x)):
            raise ValueError(f"KVCache.append: {name} holds values up to "
                             f"{float(np.abs(x).max()):.3g}, beyond {self.dtype.name}'s largest "
                             f"{float(np.finfo(self.dtype).max):.3g}: the cache would store inf")
        return cast

    def check_room(self, t: int) -> None:
        """Raise ValueError unless 1 <= t and t more positions fit after the ones held."""
        if t < 1:
            raise ValueError("KVCache.append: nothing to append (t = 0)")
        if self.length + t > self.max_len:
            raise ValueError(f"KVCache.append: {t} new positions after {self.length} exceed "
                             f"max_len={self.max_len}")

    def truncate(self, length: int) -> None:
        """Keep only the first `length` positions (0 <= length <= len(self)). The dropped ones
        are zeroed, as in a new cache, so a call rolled back leaves every byte as it was."""
        if not is_int(length) or not 0 <= length <= self.length:
            raise ValueError(f"KVCache.truncate: length must be an int in [0, {self.length}], "
                             f"got {length!r}")
        self.keys[:, :, length:self.length] = 0
        self.values[:, :, length:self.length] = 0
        self.length = int(length)

    def reset(self) -> None:
        """Forget every position. The buffers stay allocated."""
        self.truncate(0)


class ModelCache:
    """A model's memory between calls: one KVCache per layer, and which positions are real.

    `real` (B, max_len) is True where a real token was written and False where padding was, for
    the first len(self) positions. The model reads every token's position from it (the number of
    real tokens before it in its row) and hides padding keys with it, so after a left-padded
    prefill a decode step needs nothing but the new token. Without padding, a token's position is
    simply len(self).
    """

    def __init__(self, layers: list[LayerCache]) -> None:
        """layers: one empty cache per layer (a KVCache, or any LayerCache whose keys come back
        in time order), all of the same batch size and max_len. model.new_cache(B) builds the
        usual one."""
        B, max_len = self.check_layers(layers)
        self.layers = layers
        self.real = np.zeros((B, max_len), dtype=bool)  # (B, max_len): True = a real token
        self.filled_by: weakref.ref | None = None  # the model whose keys and values it holds

    @staticmethod
    def check_layers(layers: list[LayerCache]) -> tuple[int, int]:
        """(batch size, max_len) of `layers`, or TypeError/ValueError unless they are distinct,
        empty LayerCaches that agree on both."""
        if not isinstance(layers, list) or not layers:
            raise TypeError(f"ModelCache: layers must be a non-empty list of KVCache, got "
                            f"{layers!r:.60}")
        for i, layer in enumerate(layers):
            if not isinstance(layer, LayerCache):
                raise TypeError(f"ModelCache: layer {i} must be a LayerCache (such as KVCache), "
                                f"got {type(layer).__name__}")
            if any(layer is other for other in layers[:i]):
                raise ValueError(f"ModelCache: layer {i} is the same KVCache object as an earlier "
                                 "layer; every layer needs buffers of its own")
        B, max_len = layers[0].batch_size, layers[0].max_len
        for i, layer in enumerate(layers):
            if (layer.batch_size, layer.max_len) != (B, max_len) or len(layer) != 0:
                raise ValueError(f"ModelCache: layer {i} must be empty with batch {B} and max_len "
                                 f"{max_len}, got {layer!r}")
        return B, max_len

    @property
    def batch_size(self) -> int:
        return self.real.shape[0]

    @property
    def max_len(self) -> int:
        return self.real.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of every layer's K and V buffers (the real-token flags are B * max_len more)."""
        return sum(layer.nbytes for layer in self.layers)

    def __len__(self) -> int:
        """Positions written so far, padding included (every layer holds the same number)."""
        return len(self.layers[0])

    def __repr__(self) -> str:
        return (f"ModelCache(length={len(self)}, max_len={self.max_len}, batch={self.batch_size}, "
                f"layers={len(self.layers)}, real tokens per row={self.real_counts().tolist()})")

    def real_counts(self) -> np.ndarray:
        """(B,) how many real (non-padding) tokens each row holds."""
        return self.real[:, :len(self)].sum(axis=1)

    def check_step(self, B: int, T: int, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """Raise ValueError/TypeError if T new tokens for a batch of B cannot be added; otherwise
        return which of them are real, (B, T) bool. Changes nothing.

        attention_mask, when given, covers every position: (B, len(self) + T), 1 real, 0 pad. Its
        first len(self) columns must agree with what the cache already holds."""
        past = self.check_batch(B)
        if past + T > self.max_len:
            raise ValueError(f"ModelCache: {T} new tokens after {past} cached exceed the cache's "
                             f"max_len={self.max_len}")
        if attention_mask is None:
            return np.ones((B, T), dtype=bool)  # tokens added without a mask are all real
        real = zero_one_mask("attention_mask", attention_mask, (B, past + T))
        held = self.real[:, :past]
        if not np.array_equal(real[:, :past], held):
            row = int(np.argmax((real[:, :past] != held).any(axis=1)))
            raise ValueError(f"attention_mask contradicts the cache: row {row} was cached as "
                             f"{held[row].astype(int).tolist()}, the mask says "
                             f"{real[row, :past].astype(int).tolist()}")
        return real[:, past:]

    def check_batch(self, B: int) -> int:
        """The positions every layer holds, or ValueError if the layers disagree on it or the
        cache was made for another batch size than B."""
        name = type(self).__name__
        lengths = {len(layer) for layer in self.layers}
        if len(lengths) != 1:
            raise ValueError(f"{name}: layer caches disagree on length: {sorted(lengths)}")
        if B != self.batch_size:
            raise ValueError(f"{name}: a batch of {B} rows cannot use a cache of batch "
                             f"{self.batch_size}")
        return lengths.pop()

    def record(self, new_real: np.ndarray, model: object = None) -> np.ndarray:
        """Note which of the T positions about to be appended are real, (B, T) bool, and which
        model writes them, and return the flags of every position this step attends over,
        (B, len(self) + T). Call only after check_step; the layers then append their keys and
        values at the same positions."""
        start, end = len(self), len(self) + new_real.shape[1]
        self.real[:, start:end] = new_real
        self.filled_by = None if model is None else weakref.ref(model)
        return self.real[:, :end]

    def truncate(self, length: int) -> None:
        """Keep the first `length` positions of every layer (a rollback, or a rewind for
        timing the same step again). Checked against every layer before any is cut."""
        shortest = min(len(layer) for layer in self.layers)
        if not is_int(length) or not 0 <= length <= shortest:
            raise ValueError(f"ModelCache.truncate: length must be an int in [0, {shortest}] "
                             f"(the shortest layer holds {shortest}), got {length!r}")
        for layer in self.layers:
            layer.truncate(length)
        self.real[:, length:] = False
        if length == 0:
            self.filled_by = None

    def reset(self) -> None:
        """Forget everything, padding flags included: the next call starts at position 0."""
        self.truncate(0)

    def roll_back(self, length: int) -> None:
        """Undo a call that failed half-way: back to `length` positions (see truncate)."""
        self.truncate(length)


def kv_cache_bytes(
    n_layers: int, batch: int, n_kv_heads: int, d_head: int, seq_len: int,
    dtype: np.dtype | type | str = np.float32,
) -> int:
    """Memory of a full KV cache: 2 (K and V) * layers * batch * kv heads * positions * d_head *
    bytes per element. It grows linearly with context length and with batch. Computed in Python
    ints, which never overflow (NumPy int32 sizes would wrap at 2 GiB)."""
    sizes = [positive_int(name, value) for name, value in (
        ("n_layers", n_layers), ("batch", batch), ("n_kv_heads", n_kv_heads), ("d_head", d_head),
        ("seq_len", seq_len))]
    itemsize = float_dtype("dtype", dtype, CACHE_DTYPES).itemsize
    total = 2 * itemsize
    for size in sizes:
        total *= size
    return total
