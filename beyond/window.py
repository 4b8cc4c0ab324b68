"""A sliding window with a rolling buffer, and attention sinks (docs/window.md).

With GPTConfig(sliding_window=W) a query at position p sees the keys p - W < j <= p, W of them
counting itself; with attention_sinks=S it also sees the first S real tokens of its row. That rule
is part of the model's one mask (attention.mask_from_positions), so any cache serves a windowed
model: a full KVCache keeps every key and the mask hides the old ones. A layer needs to keep only
S + W keys per row, whatever the length of the text, and this module's cache does just that:

    RollingKVCache  one layer's keys and values in S + W slots. Position j < S lives in slot j
                    (a sink, never overwritten); any later j in slot S + (j - S) mod W, so a new
                    token takes the slot of the one W positions back, which no later query sees.
                    Only real tokens are stored: padding never takes a slot.
    WindowCache     the model's cache made of them, keeping cache.py's protocol: it numbers the
                    new tokens of every row (the count of real tokens so far, as everywhere in
                    this repo), tells its layers which slot each goes to, and tells the model the
                    position every returned key holds. Memory is fixed by S + W, not by
                    max_seq_len or by the tokens made.
    window_cache    window_cache(model, B): the WindowCache a windowed model needs, for B rows.

A step's T new tokens attend over the S + W slots held plus themselves, BEFORE they are written
(a chunk longer than W needs the previous W keys and all of its own), so update returns the slots,
in slot order, followed by the new keys; the mask comes from positions, not columns.

Going back. A failed step is undone exactly: each layer keeps what it overwrote until the next
step. Rewinding further (truncate) is possible only while nothing that the shorter cache would
hold has been lost: a later token overwrote its slot, or a chunk longer than the window brought
it and never stored it. `floor` is the shortest length that can still be rebuilt.

The pictures and measurements (the band mask, the slots, accuracy by window, decode speed) are
`python tools/window.py --picture`, `--accuracy`, `--speed`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import numpy as np

from cache import CACHE_DTYPES, EMPTY, KVCache, ModelCache, Step, number_tokens
from parts.checks import fits_in_memory, float_dtype, is_int, positive_int, zero_one_mask


def slot_of(positions: np.ndarray, window: int, sinks: int) -> np.ndarray:
    """Where each position lives in a buffer of sinks + window slots (any shape in and out):
    a sink keeps its own slot, every later position cycles through the window's W slots."""
    return np.where(positions < sinks, positions, sinks + (positions - sinks) % window)


class RollingKVCache:
    """One layer's keys and values in sinks + window slots, (B, H_kv, S + W, d_head) each. Keeps
    cache.LayerCache: update(k, v) writes the step's real tokens where its WindowCache says, and
    returns the slots as they were followed by the new tokens."""

    def __init__(
        self, batch_size: int, n_kv_heads: int, window: int, d_head: int,
        dtype: np.dtype | type | str = np.float32, zeros: Callable[..., np.ndarray] = np.zeros,
        sinks: int = 0,
    ) -> None:
        """All buffers allocated here, at their final size. Checks its arguments."""
        B, H_kv, W, d = (positive_int(f"RollingKVCache {name}", value) for name, value in (
            ("batch_size", batch_size), ("n_kv_heads", n_kv_heads), ("window", window),
            ("d_head", d_head)))
        if not is_int(sinks) or sinks < 0:
            raise ValueError(f"RollingKVCache sinks must be an int >= 0, got {sinks!r}")
        dtype = float_dtype("RollingKVCache dtype", dtype, CACHE_DTYPES)
        shape = (B, H_kv, int(sinks) + W, d)
        fits_in_memory(f"RollingKVCache {shape} x 2 ({dtype.name})",
                       2 * np.prod(shape, dtype=object) * dtype.itemsize)
        self.window, self.sinks = W, int(sinks)
        self.keys = zeros(shape, dtype=dtype)  # (B, H_kv, S + W, d_head), in slot order
        self.values = zeros(shape, dtype=dtype)
        self.length = 0  # columns written, padding included (as a KVCache counts them)
        self.undo: tuple | None = None  # (rows, slots, keys, values) this step overwrote

    # The same sizes and cast as a KVCache: its code, borrowed (they read only self.keys,
    # self.values and self.dtype).
    batch_size, n_kv_heads, d_head, dtype, nbytes = (
        KVCache.batch_size, KVCache.n_kv_heads, KVCache.d_head, KVCache.dtype, KVCache.nbytes)
    narrowed = KVCache.narrowed

    @property
    def max_len(self) -> int:
        """Key places held: S + W slots (time itself has no limit here)."""
        return self.keys.shape[2]

    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:
        return (f"RollingKVCache(length={self.length}, window={self.window}, sinks={self.sinks}, "
                f"batch={self.batch_size}, n_kv_heads={self.n_kv_heads}, d_head={self.d_head}, "
                f"dtype={self.dtype})")

    def update(self, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """k, v (B, H_kv, T, d_head) -> keys, values (B, H_kv, S + W + T, d_head): the slots as
        they were, then the new tokens; then the real new ones that stay go into their slots
        (what they overwrite is kept until the next step, for a roll-back)."""
        if self.model_cache is None or self.model_cache() is None:
            raise ValueError("RollingKVCache.update: use it inside a WindowCache, which says "
                             "where each new token goes")
        k, v = self.narrowed("k", k), self.narrowed("v", v)
        b, t, slots = self.model_cache().writes  # (n,) each: row b's new token t -> its slot
        keys = np.concatenate([self.keys, k], axis=2)  # (B, H_kv, S + W + T, d): attend over
        values = np.concatenate([self.values, v], axis=2)
        self.undo = (b, slots, self.keys[b, :, slots], self.values[b, :, slots])  # copies
        self.keys[b, :, slots] = k[b, :, t]  # (n, H_kv, d): row b's token t into its slot
        self.values[b, :, slots] = v[b, :, t]
        self.length += k.shape[2]
        return keys, values

    def step_back(self, T: int) -> None:
        """Undo this step's update: the overwritten slots as they were, T columns fewer."""
        if self.undo is not None:
            b, slots, old_k, old_v = self.undo
            self.keys[b, :, slots], self.values[b, :, slots] = old_k, old_v
            self.undo = None
            self.length -= T

    def drop(self, rows: np.ndarray, slots: np.ndarray, length: int) -> None:
        """Empty the given slots (zeroed, as in a new cache) and keep `length` columns."""
        self.keys[rows, :, slots] = 0
        self.values[rows, :, slots] = 0
        self.length, self.undo = length, None

    def reset(self) -> None:
        """Forget every position. The buffers stay allocated."""
        self.keys[...], self.values[...] = 0, 0
        self.length, self.undo = 0, None

    model_cache = None  # a weak reference to the WindowCache it belongs to, set by that cache


class WindowCache(ModelCache):
    """A model's memory with a sliding window: one RollingKVCache per layer; per row the count of
    real tokens so far; per slot the position it holds and the column it was written at. No flag
    per column: a row may run past max_seq_len (with RoPE) for ever in the same bytes."""

    def __init__(self, layers: list[RollingKVCache]) -> None:
        """layers: one empty RollingKVCache per layer, all of one batch size, window and sinks."""
        for i, layer in enumerate(layers if isinstance(layers, list) else []):
            if not isinstance(layer, RollingKVCache):
                raise TypeError(f"WindowCache: layer {i} must be a RollingKVCache, got "
                                f"{type(layer).__name__}")
            if (layer.window, layer.sinks) != (layers[0].window, layers[0].sinks):
                raise ValueError(f"WindowCache: layer {i} has (window, sinks) = "
                                 f"{(layer.window, layer.sinks)}, layer 0 "
                                 f"{(layers[0].window, layers[0].sinks)}")
        B, slots = self.check_layers(layers)
        self.layers = layers
        self.held = np.full((B, slots), EMPTY)  # (B, S + W): the position in each slot
        self.written_at = np.full((B, slots), EMPTY)  # (B, S + W): the column it came at
        self.count = np.zeros(B, dtype=np.int64)  # (B,): real tokens so far, per row
        self.length = 0  # columns written, padding included
        self.floor = 0  # the shortest length truncate can still rebuild
        self.filled_by = None
        self.writes: tuple | None = None  # this step's (rows, new token index, slot) writes
        self.before: tuple | None = None  # this step's bookkeeping as it was, for roll_back

    window = property(lambda self: self.layers[0].window)
    sinks = property(lambda self: self.layers[0].sinks)
    batch_size = property(lambda self: self.layers[0].batch_size)
    max_len = property(lambda self: self.layers[0].max_len)  # slots per layer: S + W
    capacity = None  # columns it can take: no limit

    def __repr__(self) -> str:
        return (f"WindowCache(length={len(self)}, window={self.window}, sinks={self.sinks}, "
                f"batch={self.batch_size}, layers={len(self.layers)}, real tokens per row="
                f"{self.real_counts().tolist()})")

    # --- the protocol ----------------------------------------------------------------------------

    def plan(self, model: object, B: int, T: int, attention_mask: np.ndarray | None = None
             ) -> Step:
        """As ModelCache.plan, with no limit on length (the model checks its positions), and
        only for a model with this cache's window and sinks: a rolling buffer forgets what falls
        out of its window, so it cannot serve a wider one."""
        self.check_model(model)
        c = model.config
        if (c.sliding_window, c.attention_sinks) != (self.window, self.sinks):
            raise ValueError(f"GPT: cache is a rolling buffer for (sliding_window, "
                             f"attention_sinks) = {(self.window, self.sinks)}, this model has "
                             f"{(c.sliding_window, c.attention_sinks)}")
        self.check_batch(B)
        real = self.new_tokens(B, T, attention_mask)
        positions, new_keys = number_tokens(self.count, real)
        return Step(real, positions, np.concatenate([self.held, new_keys], axis=1))

    def new_tokens(self, B: int, T: int, attention_mask: np.ndarray | None) -> np.ndarray:
        """As ModelCache.new_tokens; the first len(self) columns of attention_mask are checked
        only against each row's count of real tokens: the flags of columns long gone are not
        kept."""
        if attention_mask is None:
            return np.ones((B, T), dtype=bool)
        real = zero_one_mask("attention_mask", attention_mask, (B, self.length + T))
        counted = real[:, :self.length].sum(axis=1)
        if not np.array_equal(counted, self.count):
            row = int(np.argmax(counted != self.count))
            raise ValueError(f"attention_mask contradicts the cache: row {row} holds "
                             f"{self.count[row]} real tokens, the mask says {counted[row]}")
        return real[:, self.length:]

    def commit(self, step: Step, model: object) -> None:
        """Decide where the step's real tokens go, for every layer: a sink or one of its row's
        last W real tokens takes its slot (earlier tokens of a chunk longer than the window would
        be overwritten by later ones of the same chunk: they are not stored). The floor rises if
        a kept key is overwritten or a real token is never stored."""
        T = step.real.shape[1]
        new = step.key_positions[:, -T:]  # (B, T): positions of the new tokens, EMPTY for pads
        last = new.max(axis=1, keepdims=True)  # (B, 1): each row's newest position
        stays = (new >= 0) & ((new > last - self.window) | (new < self.sinks))  # (B, T)
        b, t = np.nonzero(stays)
        slots = slot_of(new[b, t], self.window, self.sinks)  # (n,)
        self.before = (self.held.copy(), self.written_at.copy(), self.count.copy(), self.length,
                       self.floor, self.filled_by)
        if (self.held[b, slots] >= 0).any() or (stays != (new >= 0)).any():
            self.floor = self.length + T  # a key is lost: shorter lengths cannot be rebuilt
        self.held[b, slots] = new[b, t]
        self.written_at[b, slots] = self.length + t
        self.count += step.real.sum(axis=1)
        self.length += T
        self.writes, self.filled_by = (b, t, slots), weakref.ref(model)
        for layer in self.layers:
            layer.undo = None

    def roll_back(self, step: Step) -> None:
        """Undo the step just committed exactly: every layer's overwritten slots, and the
        counts, positions and floor as they were."""
        T = step.real.shape[1]
        for layer in self.layers:
            if len(layer) == self.length:  # this layer wrote before the step failed
                layer.step_back(T)
        (self.held, self.written_at, self.count, self.length, self.floor,
         self.filled_by) = self.before
        self.writes = self.before = None

    # --- going back ------------------------------------------------------------------------------

    def check_batch(self, B: int) -> int:
        lengths = {len(layer) for layer in self.layers}
        if lengths != {self.length}:
            raise ValueError(f"WindowCache: layer caches disagree on length: {sorted(lengths)}")
        if B != self.batch_size:
            raise ValueError(f"WindowCache: a batch of {B} rows cannot use a cache of batch "
                             f"{self.batch_size}")
        return self.length

    def truncate(self, length: int) -> None:
        """Keep the first `length` columns, if the buffer still holds everything a cache that
        only saw them would hold: refused below `floor`, where a later token overwrote a slot or
        a long chunk never stored a token. Then every count is exactly what it was at `length`."""
        if not is_int(length) or not self.floor <= length <= self.length:
            raise ValueError(f"WindowCache.truncate: length must be an int in [{self.floor}, "
                             f"{self.length}] (below {self.floor} the window has lost keys it "
                             f"would need: reset() instead), got {length!r}")
        dropped = self.written_at >= length  # (B, S + W): slots written after `length`
        self.count -= (dropped & (self.held >= 0)).sum(axis=1)
        rows, slots = np.nonzero(dropped)
        for layer in self.layers:
            layer.drop(rows, slots, int(length))
        self.held[dropped] = EMPTY
        self.written_at[dropped] = EMPTY
        self.length, self.writes, self.before = int(length), None, None
        if length == 0:
            self.filled_by = None

    def reset(self) -> None:
        """Forget everything: the next call starts at position 0."""
        for layer in self.layers:
            layer.reset()
        self.held[...], self.written_at[...] = EMPTY, EMPTY
        self.count[...] = 0
        self.length = self.floor = 0
        self.filled_by = self.writes = self.before = None


def window_cache(model: object, batch_size: int, dtype: np.dtype | type | str | None = None
                 ) -> WindowCache:
    """An empty WindowCache for a windowed model (GPTConfig.sliding_window set): one
    RollingKVCache of attention_sinks + sliding_window slots per layer, stored as dtype (default
    the model's). All layers must fit in memory together, checked before the first."""
    c = model.config
    if c.sliding_window is None:
        raise ValueError("window_cache: the model has no sliding_window; a rolling buffer would "
                         "forget keys its queries still see (use model.new_cache)")
    dtype = model.dtype if dtype is None else dtype
    H_kv, d_head = model.kv_shape
    slots = c.attention_sinks + c.sliding_window
    fits_in_memory(f"a window cache for {batch_size!r} rows",
                   2 * c.n_layers * positive_int("batch_size", batch_size) * H_kv * slots * d_head
                   * float_dtype("dtype", dtype, CACHE_DTYPES).itemsize)
    return WindowCache([RollingKVCache(batch_size, H_kv, c.sliding_window, d_head, dtype,
                                       model.zeros, c.attention_sinks)
                        for _ in range(c.n_layers)])

