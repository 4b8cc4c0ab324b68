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

    python beyond/window.py --picture     the band mask and the slots, printed
    python beyond/window.py --accuracy    the trained reversal model with windows of 4 .. 64
    python beyond/window.py --speed       decode step time vs context: full attention vs W=256
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as `python beyond/window.py` from anywhere: find the repo
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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
