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


# --- the commands: pictures and measurements -----------------------------------------------------
# Imported here, not at the top: block.py imports this module for the cache classes.

def band_picture(T: int = 10, window: int = 4, sinks: int = 2) -> str:
    """The band mask of T tokens, from block.positions_and_mask: row = query position, column =
    key position, '#' = may attend."""
    from block import positions_and_mask

    _, mask = positions_and_mask(np.ones((1, T), dtype=bool), T, window=window, sinks=sinks)
    lines = [f"the band mask, W={window}, S={sinks}: query p sees keys p-{window} < j <= p, "
             f"and j < {sinks}", "  key j: " + " ".join(f"{j:>2}" for j in range(T))]
    for p in range(T):
        cells = " ".join(" #" if mask[0, 0, p, j] else " ." for j in range(T))
        lines.append(f"query {p:>2} {cells}   {int(mask[0, 0, p].sum())} visible")
    return "\n".join(lines)


def slots_picture(T: int = 12, window: int = 4, sinks: int = 2) -> str:
    """What a RollingKVCache of sinks + window slots holds after each token, fed one at a time
    to a real WindowCache: the position in each slot ('.' = empty)."""
    layer = RollingKVCache(1, 1, window, 2, np.float64, sinks=sinks)
    cache = WindowCache([layer])
    lines = [f"the rolling buffer, S={sinks} sink slots | W={window} window slots: the position "
             "each slot holds",
             "after token  " + " ".join(f"s{i}" for i in range(sinks)) + " | "
             + " ".join(f"s{i}" for i in range(sinks, sinks + window)) + "   written to"]
    for p in range(T):
        cache.record_positions(np.ones((1, 1), dtype=bool))
        layer.append(np.zeros((1, 1, 1, 2)), np.zeros((1, 1, 1, 2)))
        held = [" ." if j == EMPTY else f"{j:>2}" for j in layer.held[0]]
        lines.append(f"{p:>11}  " + " ".join(held[:sinks]) + " | " + " ".join(held[sinks:])
                     + f"   slot {int(slot_of(np.array(p), window, sinks))}")
    return "\n".join(lines)


def windowed_copy(model: object, window: int | None, sinks: int = 0) -> object:
    """The same weights with another window: a loaded model's config, replaced."""
    from dataclasses import replace

    from block import GPT

    config = replace(model.config, sliding_window=window, attention_sinks=sinks)
    return GPT(config, dtype=model.dtype, weights=model.named_weights(), fast=model.fast)


ACCURACY_WINDOWS = ((4, 0), (8, 0), (16, 0), (32, 0), (64, 0), (16, 4), (None, 0))


def accuracy(n: int, seed: int, batch: int) -> dict[str, dict[int, tuple[int, int]]]:
    """Exact match by prompt length of the trained reversal model, for every window in
    ACCURACY_WINDOWS: tools/evaluate.py's prompts, decoder and scoring, with a window."""
    from block import GPT
    from parts import task
    from tools.evaluate import CHECKPOINT, decode_prompts, length_batches, score_by_length

    base = GPT.load(CHECKPOINT)
    prompts = task.random_prompts(task.prompt_rng(seed, "test"), n)
    scores = {}
    for window, sinks in ACCURACY_WINDOWS:
        model = windowed_copy(base, window, sinks)
        answers = [""] * n
        for rows in length_batches(prompts, batch):
            got, _ = decode_prompts(model, [prompts[i] for i in rows])
            for i, answer in zip(rows, got, strict=True):
                answers[i] = answer
        scores[window_name(window, sinks)] = score_by_length(prompts, answers)
    return scores


def window_name(window: int | None, sinks: int) -> str:
    return "full" if window is None else f"W={window}" + (f"+S={sinks}" if sinks else "")


def accuracy_table(scores: dict[str, dict[int, tuple[int, int]]]) -> str:
    """One row per prompt length, one column per window: exact match in %."""
    names = list(scores)
    lines = ["chars  count  " + "  ".join(f"{name:>8}" for name in names)]
    for L, (count, _) in next(iter(scores.values())).items():
        cells = "  ".join(f"{100 * scores[name][L][1] / count:>7.0f}%" if count else f"{'-':>8}"
                          for name in names)
        lines.append(f"{L:>5}  {count:>5}  {cells}")
    total = {name: (sum(c for c, _ in s.values()), sum(r for _, r in s.values()))
             for name, s in scores.items()}
    lines.append(f"{'all':>5}  {total[names[0]][0]:>5}  " + "  ".join(
        f"{100 * total[name][1] / total[name][0]:>7.1f}%" for name in names))
    return "\n".join(lines)


SPEED_CONTEXTS = (256, 512, 1024, 2048, 4096)
SPEED_WINDOW = 256
GPT2_SMALL = {"vocab_size": 512, "d_model": 768, "n_heads": 12, "n_layers": 12, "rope": True}


def filled(model: object, context: int) -> ModelCache:
    """A cache of batch 1 holding `context` positions of random keys and values, written
    straight into the buffers (a decode step's cost does not depend on what they hold, and a
    4096-token NumPy prefill of GPT-2-small would take minutes): every position for a full
    cache, the last W for a rolling one."""
    rng = np.random.default_rng(0)
    cache = model.new_cache(1)
    for kv in cache.layers:
        kv.keys[...] = rng.standard_normal(kv.keys.shape).astype(kv.dtype)
        kv.values[...] = rng.standard_normal(kv.values.shape).astype(kv.dtype)
        kv.length = context
        if isinstance(kv, RollingKVCache):
            kept = np.arange(context - kv.window, context)  # the last W positions
            kv.held[0, slot_of(kept, kv.window, kv.sinks)] = kept
            kv.written_at[0] = kv.held[0]
            kv.count[0] = kv.floor = context
    if not isinstance(cache, WindowCache):
        cache.real[:, :context] = True
    cache.filled_by = weakref.ref(model)
    return cache


def step_times(contexts: tuple[int, ...], repeats: int) -> tuple[dict, dict]:
    """Median seconds of one decode step at each context, full attention and W=SPEED_WINDOW,
    timed alternately (one step of each, `repeats` times) so both see the same machine."""
    import time

    from block import GPT, GPTConfig

    full = GPT(GPTConfig(**GPT2_SMALL, max_seq_len=max(contexts) + repeats + 2), seed=0)
    window = windowed_copy(full, SPEED_WINDOW)
    token = np.zeros((1, 1), dtype=np.int64)
    medians = {"full": {}, "window": {}}
    for context in contexts:
        caches = {"full": filled(full, context), "window": filled(window, context)}
        models = {"full": full, "window": window}
        times = {name: [] for name in models}
        for r in range(repeats + 1):  # the first round warms up, and is not kept
            for name in (("full", "window") if r % 2 else ("window", "full")):
                t0 = time.perf_counter()
                models[name](token, caches[name], last_only=True)
                if r:
                    times[name].append(time.perf_counter() - t0)
        for name in models:
            medians[name][context] = float(np.median(times[name]))
        del caches
    return medians["full"], medians["window"]


def blas_line() -> str:
    import threadpoolctl

    blas = [p for p in threadpoolctl.threadpool_info() if p.get("user_api") == "blas"]
    info = blas[0] if blas else {}
    return (f"BLAS: {info.get('internal_api', 'unknown')} {info.get('version', '')} "
            f"({info.get('architecture', '?')}), {info.get('num_threads', '?')} thread(s)")


def plot_accuracy(scores: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, table in scores.items():
        lengths = [L for L, (count, _) in table.items() if count]
        match = [100 * table[L][1] / table[L][0] for L in lengths]
        ax.plot(lengths, match, marker="o", ms=3, label=name,
                ls="--" if "S=" in name else ("-" if name != "full" else ":"))
    ax.set_xlabel("characters to reverse, n (the last answer character needs the key 2n-1 back)")
    ax.set_ylabel("exact match (%)")
    ax.set_title("Trained with full attention, decoded with a sliding window of W keys")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    import argparse

    from threadpoolctl import threadpool_limits

    from parts.checks import cli_int, cli_output_file

    ap = argparse.ArgumentParser(description="The sliding window and attention sinks: pictures "
                                             "and measurements.")
    ap.add_argument("--picture", action="store_true", help="print the band mask and the slots")
    ap.add_argument("--accuracy", action="store_true",
                    help="exact match of the reversal model with windows 4 .. 64")
    ap.add_argument("--speed", action="store_true",
                    help="decode step time vs context, full attention vs a window of 256")
    ap.add_argument("--n", type=cli_int(1), default=1000, help="held-out prompts (default 1000)")
    ap.add_argument("--repeats", type=cli_int(1), default=9,
                    help="timed steps per context and model (default 9)")
    ap.add_argument("--out", type=cli_output_file(".png"), default=None,
                    help="the accuracy figure (default out/window_accuracy.png)")
    args = ap.parse_args(argv)
    if not (args.picture or args.accuracy or args.speed):
        ap.error("say what to run: --picture, --accuracy and/or --speed")
    if args.picture:
        print(band_picture())
        print()
        print(slots_picture())
    if args.accuracy:
        with threadpool_limits(limits=1, user_api="blas"):
            scores = accuracy(args.n, seed=0, batch=100)
        print(f"checkpoints/reverse.npz (trained with full attention), {args.n} held-out prompts "
              "(test stream, seed 0), greedy; exact match by prompt length:\n")
        print(accuracy_table(scores))
        out = args.out or Path("out/window_accuracy.png")
        out.parent.mkdir(parents=True, exist_ok=True)
        print(f"wrote {plot_accuracy(scores, out)}")
    if args.speed:
        full, window = step_times(SPEED_CONTEXTS, args.repeats)
        print(f"decode step, GPT-2-small shapes (12 layers, d_model 768, 12 heads, vocab 512), "
              f"rope, batch 1, float32, engine; median of {args.repeats} steps, full and "
              "window alternating")
        print(blas_line())
        print(f"{'context':>7}  {'full':>9}  {f'W={SPEED_WINDOW}':>9}  full / window")
        for context in SPEED_CONTEXTS:
            print(f"{context:>7}  {1e3 * full[context]:>6.1f} ms  {1e3 * window[context]:>6.1f} ms"
                  f"  {full[context] / window[context]:>6.2f}")
    return 0


if __name__ == "__main__":  # run the module block.py imports, so there is one WindowCache class
    from beyond import window

    raise SystemExit(window.main())
