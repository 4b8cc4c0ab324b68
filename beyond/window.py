"""A sliding window with a rolling buffer, and attention sinks (docs/window.md).

With GPTConfig(sliding_window=W) a query at position p sees the keys p - W < j <= p, W of them
counting itself; with attention_sinks=S it also sees the first S real tokens of its row. So a
layer needs to keep only S + W keys per row, whatever the length of the text:

    RollingKVCache  one layer's keys and values in S + W slots. Position j < S lives in slot j
                    (a sink, never overwritten); any later j in slot S + (j - S) mod W, so a new
                    token takes the slot of the one W positions back, which no later query sees.
                    Only real tokens are stored: padding never takes a slot.
    WindowCache     the model's cache made of them: it numbers the new tokens of every row (the
                    count of real tokens so far, as everywhere in this repo) and tells its layers
                    where they go. Memory is fixed by S + W, not by max_seq_len or tokens made.

A step's T new tokens attend over the S + W slots held plus themselves, BEFORE they are written
(a chunk longer than W needs the previous W keys and all of its own), so append returns the
slots, in slot order, followed by the new keys. The mask comes from positions, not columns: the
cache says which position every key it returns holds (-1: an empty slot or padding).

The pictures and measurements (the band mask, the slots, accuracy by window, decode speed) are
`python tools/window.py --picture`, `--accuracy`, `--speed`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import numpy as np

from cache import CACHE_DTYPES, KVCache, ModelCache
from parts.checks import fits_in_memory, float_dtype, is_int, positive_int, zero_one_mask

EMPTY = -1  # the position held by a slot nothing was written to (and of a padding token)


def slot_of(positions: np.ndarray, window: int, sinks: int) -> np.ndarray:
    """Where each position lives in a buffer of sinks + window slots (any shape in and out):
    a sink keeps its own slot, every later position cycles through the window's W slots."""
    return np.where(positions < sinks, positions, sinks + (positions - sinks) % window)


class RollingKVCache:
    """One layer's keys and values in sinks + window slots, (B, H_kv, S + W, d_head) each, and
    the position every slot holds (B, S + W), EMPTY where none. Implements cache.LayerCache.

    Before each append the model cache says which positions the new tokens have (`expect`):
    unlike a KVCache, where a token goes depends on its row's count of real tokens."""

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
        self.held = np.full((B, shape[2]), EMPTY)  # (B, S + W): the position in each slot
        self.written_at = np.full((B, shape[2]), EMPTY)  # (B, S + W): the call length it came at
        self.count = np.zeros(B, dtype=np.int64)  # (B,): real tokens written so far, per row
        self.length = 0  # positions written, padding included (as KVCache counts them)
        self.floor = 0  # truncate cannot go below: a write after it overwrote a held key
        self.incoming: np.ndarray | None = None  # (B, T): positions of the next append's tokens

    # The same sizes, checks and cast as a KVCache: its code, borrowed (these read only
    # self.keys, self.values, self.dtype and check_room).
    batch_size, n_kv_heads, d_head, dtype, nbytes = (
        KVCache.batch_size, KVCache.n_kv_heads, KVCache.d_head, KVCache.dtype, KVCache.nbytes)
    check_append, narrowed = KVCache.check_append, KVCache.narrowed

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

    def expect(self, positions: np.ndarray) -> None:
        """Note the positions (B, T) of the tokens the next append brings, EMPTY for padding."""
        self.incoming = positions

    def check_room(self, t: int) -> None:
        """Raise ValueError unless the positions of t new tokens were announced (expect)."""
        if self.incoming is None or self.incoming.shape != (self.batch_size, t):
            raise ValueError(f"RollingKVCache.append: {t} new positions, but the model cache "
                             f"announced {None if self.incoming is None else self.incoming.shape}"
                             " (use it inside a WindowCache)")

    def append(self, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """k, v (B, H_kv, T, d_head) -> keys, values (B, H_kv, S + W + T, d_head): the slots as
        they were, then the new tokens; then the real new ones are written into their slots.
        Checked before anything is written."""
        k, v = self.check_append(k, v)
        return self._write(k, v)

    def _write(self, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """append without the checks, for callers that checked the whole step already."""
        positions, self.incoming = self.incoming, None  # (B, T)
        keys = np.concatenate([self.keys, k], axis=2)  # (B, H_kv, S + W + T, d): attend over
        values = np.concatenate([self.values, v], axis=2)
        last = positions.max(axis=1, keepdims=True)  # (B, 1): each row's newest position
        # Stored: real tokens that are sinks or among their row's last W (earlier ones of a long
        # chunk would be overwritten by later ones of the same chunk).
        b, t = np.nonzero((positions >= 0) & ((positions > last - self.window)
                                              | (positions < self.sinks)))
        slots = slot_of(positions[b, t], self.window, self.sinks)  # (n,)
        if (self.held[b, slots] >= 0).any():
            self.floor = self.length + k.shape[2]  # an overwritten key cannot come back
        self.keys[b, :, slots] = k[b, :, t]  # (n, H_kv, d): row b's token t into its slot
        self.values[b, :, slots] = v[b, :, t]
        self.held[b, slots] = positions[b, t]
        self.written_at[b, slots] = self.length + t
        self.count += (positions >= 0).sum(axis=1)
        self.length += k.shape[2]
        return keys, values

    def truncate(self, length: int) -> None:
        """Keep the first `length` positions written, if the buffer still holds them: refused
        below `floor`, since a later token overwrote a slot and overwritten keys are gone."""
        if not is_int(length) or not self.floor <= length <= self.length:
            raise ValueError(f"RollingKVCache.truncate: length must be an int in [{self.floor}, "
                             f"{self.length}] (below {self.floor} the window has overwritten "
                             f"keys), got {length!r}")
        dropped = self.written_at >= length  # (B, S + W): slots written after `length`
        self.count -= (dropped & (self.held >= 0)).sum(axis=1)
        rows, slots = np.nonzero(dropped)
        self.keys[rows, :, slots] = 0  # zeroed, as in a new cache
        self.values[rows, :, slots] = 0
        self.held[dropped] = EMPTY
        self.written_at[dropped] = EMPTY
        self.length, self.incoming = int(length), None

    def reset(self) -> None:
        """Forget every position, the overwritten ones too. The buffers stay allocated."""
        self.keys[...], self.values[...] = 0, 0
        self.held[...], self.written_at[...] = EMPTY, EMPTY
        self.count[...] = 0
        self.length, self.floor, self.incoming = 0, 0, None


class WindowCache(ModelCache):
    """A model's memory with a sliding window: one RollingKVCache per layer, and per row the
    count of real tokens so far (no flag per position: a row may run past max_seq_len).

    The model asks it, per step, for the positions of the new tokens and of every key the layers
    will return (record_positions), and builds the mask from those."""

    def __init__(self, layers: list[RollingKVCache]) -> None:
        """layers: one empty RollingKVCache per layer, all of one batch size, window and sinks."""
        self.check_layers(layers)
        for i, layer in enumerate(layers):
            if not isinstance(layer, RollingKVCache):
                raise TypeError(f"WindowCache: layer {i} must be a RollingKVCache, got "
                                f"{type(layer).__name__}")
            if (layer.window, layer.sinks) != (layers[0].window, layers[0].sinks):
                raise ValueError(f"WindowCache: layer {i} has (window, sinks) = "
                                 f"{(layer.window, layer.sinks)}, layer 0 "
                                 f"{(layers[0].window, layers[0].sinks)}")
        self.layers = layers
        self.real = None  # no flag per position: the counts are in the layers
        self.filled_by: weakref.ref | None = None
        self.spoiled = False  # a step failed after overwriting keys: only reset() helps

    window = property(lambda self: self.layers[0].window)
    sinks = property(lambda self: self.layers[0].sinks)
    batch_size = property(lambda self: self.layers[0].batch_size)
    max_len = property(lambda self: self.layers[0].max_len)  # slots per layer: S + W

    def __repr__(self) -> str:
        return (f"WindowCache(length={len(self)}, window={self.window}, sinks={self.sinks}, "
                f"batch={self.batch_size}, layers={len(self.layers)}, real tokens per row="
                f"{self.real_counts().tolist()})")

    def real_counts(self) -> np.ndarray:
        """(B,) how many real tokens each row has had (many may have left the window)."""
        return self.layers[0].count.copy()

    def check_step(self, B: int, T: int, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """As ModelCache.check_step, with no max_len (time has no limit here; the model checks
        its positions). The first len(self) columns of attention_mask are checked only against
        each row's count of real tokens: the flags of positions long gone are not kept."""
        if self.spoiled:
            raise ValueError("WindowCache: a call failed after the window had overwritten keys, "
                             "so it could not be undone; reset() the cache")
        past = self.check_batch(B)
        if attention_mask is None:
            return np.ones((B, T), dtype=bool)
        real = zero_one_mask("attention_mask", attention_mask, (B, past + T))
        counted = real[:, :past].sum(axis=1)
        if not np.array_equal(counted, self.real_counts()):
            row = int(np.argmax(counted != self.real_counts()))
            raise ValueError(f"attention_mask contradicts the cache: row {row} holds "
                             f"{self.real_counts()[row]} real tokens, the mask says {counted[row]}")
        return real[:, past:]

    def record_positions(self, new_real: np.ndarray, model: object = None
                         ) -> tuple[np.ndarray, np.ndarray]:
        """Number the T new tokens and tell every layer where they go. Returns query positions
        (B, T) (a pad gets its row's last position, -1 before any real token) and the position
        of every key the layers will return, (B, S + W + T): the slots, then the new tokens
        (EMPTY for an empty slot or padding). Call only after check_step."""
        query_pos = self.real_counts()[:, None] + np.cumsum(new_real, axis=1) - 1  # (B, T)
        new_pos = np.where(new_real, query_pos, EMPTY)  # (B, T)
        for layer in self.layers:
            layer.expect(new_pos)
        self.filled_by = None if model is None else weakref.ref(model)
        return query_pos, np.concatenate([self.layers[0].held, new_pos], axis=1)

    def record(self, new_real: np.ndarray, model: object = None) -> np.ndarray:
        raise TypeError("WindowCache keeps no flag per position: use record_positions")

    def truncate(self, length: int) -> None:
        """Keep the first `length` positions of every layer, if no layer has overwritten keys
        written before it (RollingKVCache.truncate). Checked on every layer before any is cut."""
        floor = max(layer.floor for layer in self.layers)
        shortest = min(len(layer) for layer in self.layers)
        if not is_int(length) or not floor <= length <= shortest:
            raise ValueError(f"WindowCache.truncate: length must be an int in [{floor}, "
                             f"{shortest}] (below {floor} the window has overwritten keys), got "
                             f"{length!r}")
        for layer in self.layers:
            layer.truncate(length)
        if length == 0:
            self.filled_by = None

    def reset(self) -> None:
        """Forget everything: the next call starts at position 0."""
        for layer in self.layers:
            layer.reset()
        self.filled_by, self.spoiled = None, False

    def roll_back(self, length: int) -> None:
        """Undo a failed call if the buffer still can; else mark the cache spoiled (refused
        until reset), never left silently half-written."""
        try:
            self.truncate(length)
        except ValueError:
            self.spoiled = True

