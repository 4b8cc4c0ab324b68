"""The KV cache: the memory shortcut of decoding.

At step t the new token needs the keys and values of every earlier token. They do not change once
computed (causal attention: an old token never sees a new one), so we keep them instead of
recomputing the whole prefix. Queries are never cached: only the newest token asks a question.

Two objects, smallest first:
    KVCache      one layer's keys and values. Its buffers are allocated once at full length,
                 (B, H_kv, max_len, d_head) each, and `update` writes the new positions along the
                 sequence axis (axis 2) at [length : length + t], as llama and gpt-fast do. Nothing
                 is concatenated per step, so appending costs the same at position 2000 as at 20.
    ModelCache   what a whole model remembers between calls: one KVCache per layer, and the
                 position every column holds (EMPTY for padding). A token's position is the number
                 of real tokens before it in its row, so the cache is the one place positions come
                 from: a caller hands a padding mask over once, at prefill, and every later call
                 reads it from here.

The protocol: the model knows no cache kind. It asks any cache the same three things, and each
layer's cache one more (the rolling buffer of beyond/window.py, the int8 cache of beyond/int8.py
and the paged batch of beyond/paged.py keep it too; docs/cache-protocol.md draws it):

    step = cache.plan(model, B, T, attention_mask)   check T new tokens for B rows against what
                                                     the cache holds, and number them: a Step.
                                                     Changes nothing; a refusal is a ValueError.
    cache.commit(step, model)                        take the step: from here the layers write
    keys, values = cache.layers[i].update(k, v)      layer i's new K and V in; every key and value
                                                     this step attends over out
    cache.roll_back(step)                            the step failed half-way: every buffer and
                                                     count as it was before commit

A Step says which new tokens are real, each one's position, and the position of every key the
layers return (EMPTY where a slot holds nothing). The model builds the mask from those by one
rule (attention.mask_from_positions): causality, padding and a sliding window all come from
positions, so a cache may hold its keys in any order. A layer's cache may also offer
`attend(q, k, v, mask)`, which writes k, v and returns the attention output itself (a paged
cache walks its blocks); the fast path uses it where it exists.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

import numpy as np

from parts.checks import fits_in_memory, float_dtype, is_int, positive_int, zero_one_mask

CACHE_DTYPES = ("float16", "float32", "float64")  # int or bool buffers would round or wrap K/V
EMPTY = -1  # the position of a slot that holds nothing: padding, or not written yet


# --- what a cache tells the model ----------------------------------------------------------------

class Step(NamedTuple):
    """One call's new tokens, as the cache numbers them (B rows, T new tokens, t_k keys)."""

    real: np.ndarray  # (B, T) bool: which new tokens are real (False: padding)
    positions: np.ndarray  # (B, T): each new token's position (a pad: its row's last, or -1)
    key_positions: np.ndarray  # (B, t_k): the position of every key the layers return, or EMPTY


def number_tokens(count: np.ndarray, real: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions of T new tokens after `count` (B,) real ones: (B, T) for the queries (a pad gets
    its row's latest position, -1 before any real token) and (B, T) for the keys (EMPTY for a
    pad, which no query may see). A row's first real token is position 0 however much padding
    comes first (Hugging Face's generate does the same)."""
    if real.all():  # no padding (every decode step): T consecutive positions per row
        positions = count[:, None] + np.arange(real.shape[1])  # (B, 1) + (T,) -> (B, T)
        return positions, positions
    positions = count[:, None] + np.cumsum(real, axis=1) - 1  # (B,) + (B, T) -> (B, T)
    return positions, np.where(real, positions, EMPTY)


def first_step(real: np.ndarray) -> Step:
    """The step of a call with no cache (naive decoding): nothing before it, its keys its own."""
    positions, keys = number_tokens(np.zeros(len(real), dtype=np.int64), real)
    return Step(real, positions, keys)


class LayerCache(Protocol):
    """What the model asks of one layer's cache. k, v (B, H_kv, T, d_head) new; keys, values
    (B, H_kv, t_k, d_head), in the order of the step's key_positions."""

    n_kv_heads: int  # H_kv, key/value heads per row
    d_head: int  # features per head

    def update(self, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Write this step's new k, v; return the keys and values it attends over."""


class Cache(Protocol):
    """What the model asks of its cache (see the module docstring)."""

    layers: Sequence[LayerCache]

    def plan(self, model: object, B: int, T: int, attention_mask: np.ndarray | None) -> Step:
        """Check the step and number its tokens; change nothing."""

    def commit(self, step: Step, model: object) -> None:
        """Take the step: the layers' update calls follow."""

    def roll_back(self, step: Step) -> None:
        """Undo a committed step exactly."""


# --- one layer -----------------------------------------------------------------------------------

class KVCache:
    """Preallocated keys and values of one attention layer, and how many positions are filled."""

    def __init__(
        self, batch_size: int, n_kv_heads: int, max_len: int, d_head: int,
        dtype: np.dtype | type | str = np.float32, zeros: Callable[..., np.ndarray] = np.zeros,
    ) -> None:
        """Both buffers are allocated here, zeroed, at full length. zeros(shape, dtype) makes
        them (the fast path passes one that avoids huge pages). Checks its arguments."""
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
        return (f"{type(self).__name__}(length={self.length}, max_len={self.max_len}, "
                f"batch={self.batch_size}, n_kv_heads={self.n_kv_heads}, d_head={self.d_head}, "
                f"dtype={self.dtype})")

    def update(self, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Write t new positions at [length : length + t] and return views of every position held
        so far: k, v (B, H_kv, t, d_head) -> keys, values (B, H_kv, length + t, d_head).

        The model's call has checked shapes and room; only the values are checked here (they are
        known only now): one that would overflow the cache's dtype is refused before any write."""
        k, v = self.narrowed("k", k), self.narrowed("v", v)
        if np.may_share_memory(v, self.keys):  # v a view of the slots k is about to overwrite
            v = v.copy()
        start, end = self.length, self.length + k.shape[2]
        self.keys[:, :, start:end] = k  # along the sequence axis, never the batch or head axis
        self.values[:, :, start:end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]  # views: no copy

    def append(self, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """update, for a KVCache used on its own: its shapes and room are checked first, so a
        refused append leaves the cache exactly as it was."""
        self.check_append(k, v)
        return self.update(k, v)

    def check_append(self, k: np.ndarray, v: np.ndarray) -> None:
        """ValueError/TypeError if append(k, v) would be wrong; changes nothing."""
        B, H_kv, _, d_head = self.keys.shape
        for name, x in (("k", k), ("v", v)):
            if not isinstance(x, np.ndarray) or type(x) is not np.ndarray:
                raise TypeError(f"{type(self).__name__}.append: {name} must be a numpy array "
                                f"(not a subclass), got {type(x).__name__}")
            if x.dtype.kind not in "fiu":
                raise TypeError(f"{type(self).__name__}.append: {name} must hold real numbers, "
                                f"got dtype {x.dtype}")
            if x.ndim != 4 or x.shape[0] != B or x.shape[1] != H_kv or x.shape[3] != d_head:
                raise ValueError(
                    f"{type(self).__name__}.append: {name} must be (B={B}, H_kv={H_kv}, t, "
                    f"d_head={d_head}), got {x.shape}")
        if k.shape != v.shape:
            raise ValueError(f"{type(self).__name__}.append: k {k.shape} and v {v.shape} differ")
        if k.shape[2] < 1:
            raise ValueError(f"{type(self).__name__}.append: nothing to append (t = 0)")
        if self.length + k.shape[2] > self.max_len:
            raise ValueError(f"{type(self).__name__}.append: {k.shape[2]} new positions after "
                             f"{self.length} exceed max_len={self.max_len}")
        self.narrowed("k", k), self.narrowed("v", v)

    def narrowed(self, name: str, x: np.ndarray) -> np.ndarray:
        """x cast to the cache's dtype, refusing a finite value the cast would turn into inf
        (over 65504 into a float16 cache, over 3.4e38 from float64 into float32)."""
        if np.can_cast(x.dtype, self.dtype, "safe"):
            return x
        with np.errstate(over="ignore"):
            cast = x.astype(self.dtype)
        if np.any(np.isinf(cast) & np.isfinite(x)):
            raise ValueError(f"{type(self).__name__}.append: {name} holds values up to "
                             f"{float(np.abs(x).max()):.3g}, beyond {self.dtype.name}'s largest "
                             f"{float(np.finfo(self.dtype).max):.3g}: the cache would store inf")
        return cast

    def truncate(self, length: int) -> None:
        """Keep only the first `length` positions (0 <= length <= len(self)). The dropped ones
        are zeroed, as in a new cache, so a call rolled back leaves every byte as it was."""
        if not is_int(length) or not 0 <= length <= self.length:
            raise ValueError(f"{type(self).__name__}.truncate: length must be an int in "
                             f"[0, {self.length}], got {length!r}")
        self.keys[:, :, length:self.length] = 0
        self.values[:, :, length:self.length] = 0
        self.length = int(length)

    def reset(self) -> None:
        """Forget every position. The buffers stay allocated."""
        self.truncate(0)


# --- the whole model's memory --------------------------------------------------------------------

class ModelCache:
    """A model's memory between calls: one layer cache per layer, and the position each column
    holds, `positions` (B, max_len), EMPTY for padding and for columns not written yet. The model
    reads every new token's position from it and hides padding keys with it, so after a
    left-padded prefill a decode step needs nothing but the new token. Keeps the protocol above
    for any layers whose keys come back in column order (KVCache and its kin).
    """

    def __init__(self, layers: list) -> None:
        """layers: one empty layer cache per layer (KVCache, or any with its batch_size, max_len,
        n_kv_heads, d_head, __len__, update and truncate), all of one batch size and max_len, each
        in no other ModelCache. model.new_cache(B) builds the usual one."""
        B, max_len = self.check_layers(layers)
        self.layers = layers
        self.positions = np.full((B, max_len), EMPTY)  # (B, max_len): each column's position
        self.count = np.zeros(B, dtype=np.int64)  # (B,): real tokens held per row
        self.length = 0  # columns written, padding included
        self.filled_by: weakref.ref | None = None  # the model whose keys and values it holds

    def check_layers(self, layers: list) -> tuple[int, int]:
        """(batch size, max_len) of `layers`, or TypeError/ValueError unless they are distinct,
        empty layer caches that agree on both and belong to no other model cache; then they are
        this one's."""
        if not isinstance(layers, list) or not layers:
            raise TypeError(f"{type(self).__name__}: layers must be a non-empty list of layer "
                            f"caches (KVCache), got {layers!r:.60}")
        for i, layer in enumerate(layers):
            if not callable(getattr(layer, "update", None)):
                raise TypeError(f"{type(self).__name__}: layer {i} must be a layer cache (such as "
                                f"KVCache), got {type(layer).__name__}")
            if any(layer is other for other in layers[:i]):
                raise ValueError(f"{type(self).__name__}: layer {i} is the same object as an "
                                 "earlier layer; every layer needs buffers of its own")
            owner = getattr(layer, "model_cache", None)
            if owner is not None and owner() is not None:
                raise ValueError(f"{type(self).__name__}: layer {i} already belongs to another "
                                 "model cache; truncating one would empty the other")
        B, max_len = layers[0].batch_size, layers[0].max_len
        for i, layer in enumerate(layers):
            if (layer.batch_size, layer.max_len) != (B, max_len) or len(layer) != 0:
                raise ValueError(f"{type(self).__name__}: layer {i} must be empty with batch {B} "
                                 f"and max_len {max_len}, got {layer!r}")
        for layer in layers:
            layer.model_cache = weakref.ref(self)
        return B, max_len

    @property
    def batch_size(self) -> int:
        return self.positions.shape[0]

    @property
    def max_len(self) -> int:
        return self.positions.shape[1]

    @property
    def capacity(self) -> int | None:
        """The most columns it can hold (None: no limit), for a caller sizing a request."""
        return self.max_len

    @property
    def nbytes(self) -> int:
        """Bytes of every layer's K and V buffers (the positions are B * max_len ints more)."""
        return sum(layer.nbytes for layer in self.layers)

    def __len__(self) -> int:
        """Columns written so far, padding included."""
        return self.length

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(length={len(self)}, max_len={self.max_len}, "
                f"batch={self.batch_size}, layers={len(self.layers)}, real tokens per row="
                f"{self.real_counts().tolist()})")

    def real_counts(self) -> np.ndarray:
        """(B,) how many real (non-padding) tokens each row holds."""
        return self.count.copy()

    # --- the protocol ----------------------------------------------------------------------------

    def plan(self, model: object, B: int, T: int, attention_mask: np.ndarray | None = None
             ) -> Step:
        """Check T new tokens for a batch of B rows and number them; change nothing. Refused
        (ValueError/TypeError): a cache shaped for another model or holding another model's keys,
        another batch size, no room, an attention_mask (B, len(self) + T) that contradicts the
        padding the cache holds."""
        past = self.check_step(model, B, T)
        real = self.new_tokens(B, T, attention_mask)
        positions, new_keys = number_tokens(self.count, real)
        return Step(real, positions, np.concatenate([self.positions[:, :past], new_keys], axis=1))

    def commit(self, step: Step, model: object) -> None:
        """Record the step's tokens; the layers write their keys and values next."""
        start, end = self.length, self.length + step.real.shape[1]
        self.positions[:, start:end] = step.key_positions[:, start:]
        self.count += step.real.sum(axis=1)
        self.length = end
        self.filled_by = weakref.ref(model)

    def roll_back(self, step: Step) -> None:
        """Undo a committed step (it failed half-way, some layers written): back to before it."""
        self.truncate(self.length - step.real.shape[1])

    # --- the checks behind plan ------------------------------------------------------------------

    def check_step(self, model: object, B: int, T: int) -> int:
        """The columns held, or ValueError if this step cannot be added (see plan)."""
        self.check_model(model)
        past = self.check_batch(B)
        if past + T > self.max_len:
            raise ValueError(f"{type(self).__name__}: {T} new tokens after {past} cached exceed "
                             f"the cache's max_len={self.max_len}")
        return past

    def check_model(self, model: object) -> None:
        """Refuse a cache shaped for another model (layers, K/V heads, width) or holding the keys
        and values of another model (reset() it first)."""
        name = type(self).__name__
        owner = None if self.filled_by is None else self.filled_by()
        if owner is model:  # this model's earlier steps were checked against these layers
            return
        n_layers, want = model.config.n_layers, model.kv_shape
        if len(self.layers) != n_layers:
            raise ValueError(f"GPT: cache has {len(self.layers)} layers, the model {n_layers}")
        for i, layer in enumerate(self.layers):
            if (layer.n_kv_heads, layer.d_head) != want:
                raise ValueError(f"GPT: cache layer {i} is (H_kv, d_head) = "
                                 f"{(layer.n_kv_heads, layer.d_head)} ({type(layer).__name__}), "
                                 f"this model needs {want}")
        if len(self) and owner is not model:
            raise ValueError(f"GPT: this {name} holds keys and values this model did not "
                             "compute; reset() it (or build a new cache) first")

    def check_batch(self, B: int) -> int:
        """The columns every layer holds, or ValueError if the layers disagree on it or the
        cache was made for another batch size than B."""
        name = type(self).__name__
        lengths = {len(layer) for layer in self.layers}
        if lengths != {self.length}:
            raise ValueError(f"{name}: layer caches disagree on length: {sorted(lengths)}")
        if B != self.batch_size:
            raise ValueError(f"{name}: a batch of {B} rows cannot use a cache of batch "
                             f"{self.batch_size}")
        return self.length

    def new_tokens(self, B: int, T: int, attention_mask: np.ndarray | None) -> np.ndarray:
        """Which of the T new tokens are real, (B, T) bool. attention_mask, when given, covers
        every position: (B, len(self) + T), 1 real, 0 pad; its first len(self) columns must agree
        with what the cache already holds. Without it every new token is real."""
        if attention_mask is None:
            return np.ones((B, T), dtype=bool)
        past = self.length
        real = zero_one_mask("attention_mask", attention_mask, (B, past + T))
        held = self.positions[:, :past] >= 0
        if not np.array_equal(real[:, :past], held):
            row = int(np.argmax((real[:, :past] != held).any(axis=1)))
            raise ValueError(f"attention_mask contradicts the cache: row {row} was cached as "
                             f"{held[row].astype(int).tolist()}, the mask says "
                             f"{real[row, :past].astype(int).tolist()}")
        return real[:, past:]

    # --- going back ------------------------------------------------------------------------------

    def truncate(self, length: int) -> None:
        """Keep the first `length` columns of every layer (a rollback, a rejected draft, or a
        rewind for timing the same step again). Checked against every layer before any is cut."""
        shortest = min([len(layer) for layer in self.layers] + [self.length])
        if not is_int(length) or not 0 <= length <= shortest:
            raise ValueError(f"{type(self).__name__}.truncate: length must be an int in "
                             f"[0, {shortest}], got {length!r}")
        for layer in self.layers:
            layer.truncate(min(len(layer), length))
        self.positions[:, length:] = EMPTY
        self.count = (self.positions[:, :length] >= 0).sum(axis=1)
        self.length = int(length)
        if length == 0:
            self.filled_by = None

    def reset(self) -> None:
        """Forget everything, padding included: the next call starts at position 0."""
        self.truncate(0)


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
