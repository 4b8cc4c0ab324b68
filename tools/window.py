"""The sliding window and attention sinks (beyond/window.py), pictured and measured.

    python tools/window.py --picture     the band mask and the slots, printed
    python tools/window.py --accuracy    the trained reversal model with windows of 4 .. 64
    python tools/window.py --speed       decode step time vs context: full attention vs W=256

--picture draws the band mask from the model's one rule (attention.mask_from_positions) and the
slots from a real WindowCache fed one token at a time. --accuracy decodes tools/evaluate.py's held-
out prompts with the trained model's weights under each window (and a figure,
out/window_accuracy.png unless --out). --speed times one decode step at GPT-2-small shapes with
tools/measure.py's harness.
docs/window.md shows all three.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/x.py` from anywhere: find the repo
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import functools
import weakref
from dataclasses import replace

import numpy as np
from threadpoolctl import threadpool_limits

from attention import mask_from_positions
from beyond.window import WindowCache, slot_of, window_cache
from block import GPT, GPTConfig
from cache import EMPTY, ModelCache, first_step, kv_cache_bytes
from fast.model import FastGPT
from parts import task
from parts.checks import cli_int, cli_load, cli_output_file, fits_in_memory, one_line, refuse_unused
from parts.files import save_figure
from tools.cli_types import default_output
from tools.evaluate import CHECKPOINT, decode_prompts, length_batches, score_by_length
from tools.measure import Progress, interleave, machine_line, note, summary


def band_picture(T: int = 10, window: int = 4, sinks: int = 2) -> str:
    """The band mask of T tokens, from the model's one rule (attention.mask_from_positions): row
    = query position, column = key position, '#' = may attend."""
    step = first_step(np.ones((1, T), dtype=bool))  # positions 0 .. T - 1, no cache
    mask = mask_from_positions(step.positions, step.key_positions, window, sinks)
    lines = [f"the band mask, W={window}, S={sinks}: query p sees keys p-{window} < j <= p, "
             f"and j < {sinks}", "  key j: " + " ".join(f"{j:>2}" for j in range(T))]
    for p in range(T):
        cells = " ".join(" #" if mask[0, 0, p, j] else " ." for j in range(T))
        lines.append(f"query {p:>2} {cells}   {int(mask[0, 0, p].sum())} visible")
    return "\n".join(lines)


def slots_picture(T: int = 12, window: int = 4, sinks: int = 2) -> str:
    """What a RollingKVCache of sinks + window slots holds after each token, fed one at a time
    to a real WindowCache by a tiny windowed model: the position in each slot ('.' = empty)."""
    model = GPT(GPTConfig(vocab_size=2, max_seq_len=T, d_model=2, n_heads=1, n_layers=1,
                          sliding_window=window, attention_sinks=sinks), seed=0)
    cache = window_cache(model, 1)
    lines = [f"the rolling buffer, S={sinks} sink slots | W={window} window slots: the position "
             "each slot holds",
             "after token  " + " ".join(f"s{i}" for i in range(sinks)) + " | "
             + " ".join(f"s{i}" for i in range(sinks, sinks + window)) + "   written to"]
    for p in range(T):
        model(np.zeros((1, 1), dtype=np.int64), cache)  # one token at position p
        held = [" ." if j == EMPTY else f"{j:>2}" for j in cache.held[0]]
        lines.append(f"{p:>11}  " + " ".join(held[:sinks]) + " | " + " ".join(held[sinks:])
                     + f"   slot {int(slot_of(np.array(p), window, sinks))}")
    return "\n".join(lines)


def windowed_copy(model: GPT, window: int | None, sinks: int = 0) -> GPT:
    """The same weights with another window: a loaded model's config, replaced."""
    config = replace(model.config, sliding_window=window, attention_sinks=sinks)
    return type(model)(config, dtype=model.dtype, weights=model.named_weights())


ACCURACY_WINDOWS = ((4, 0), (8, 0), (16, 0), (32, 0), (64, 0), (16, 4), (None, 0))


def accuracy(base: GPT, n: int, seed: int, batch: int) -> dict[str, dict[int, tuple[int, int]]]:
    """Exact match by prompt length of the trained reversal model `base`, for every window in
    ACCURACY_WINDOWS: tools/evaluate.py's prompts, decoder and scoring, with a window."""
    prompts = task.random_prompts(task.prompt_rng(seed, "test"), n)
    scores = {}
    for window, sinks in ACCURACY_WINDOWS:
        note(window_name(window, sinks))
        model = windowed_copy(base, window, sinks)
        answers = [""] * n
        for rows in length_batches(prompts, batch):
            got, _ = decode_prompts(model, [prompts[i] for i in rows])
            for i, answer in zip(rows, got, strict=True):
                answers[i] = answer
        scores[window_name(window, sinks)] = score_by_length(prompts, answers)
    return scores


def window_name(window: int | None, sinks: int) -> str:
    """A column's name: "W=16+S=4", or "full" without a window."""
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


def filled(model: GPT, context: int) -> ModelCache:
    """A cache of batch 1 holding `context` positions of random keys and values, written
    straight into the buffers (a decode step's cost does not depend on what they hold, and a
    4096-token NumPy prefill of GPT-2-small would take minutes): every position for a full
    cache, the last W in a rolling buffer (window_cache) for a windowed model."""
    rng = np.random.default_rng(0)
    windowed = model.config.sliding_window is not None
    cache = window_cache(model, 1) if windowed else model.new_cache(1)
    for kv in cache.layers:
        kv.keys[...] = rng.standard_normal(kv.keys.shape).astype(kv.dtype)
        kv.values[...] = rng.standard_normal(kv.values.shape).astype(kv.dtype)
        kv.length = context
    if isinstance(cache, WindowCache):
        kept = np.arange(context - cache.window, context)  # the last W positions
        cache.held[0, slot_of(kept, cache.window, cache.sinks)] = kept
        cache.written_at[0] = cache.held[0]
        cache.count[0] = cache.floor = context
    else:
        cache.positions[:, :context] = np.arange(context)
        cache.count[:] = context
    cache.length = context
    cache.filled_by = weakref.ref(model)
    return cache


def speed_models(contexts: tuple[int, ...], repeats: int) -> tuple[GPT, GPT]:
    """GPT-2-small shapes on the fast path with room for the longest context and the timed
    steps, full attention and W=SPEED_WINDOW (the same weights). ValueError if the weights or a
    full cache would not fit in memory: found before anything is printed."""
    full = FastGPT(GPTConfig(**GPT2_SMALL, max_seq_len=max(contexts) + repeats + 2), seed=0)
    c = full.config
    fits_in_memory("--speed: a full cache of GPT-2-small shapes", kv_cache_bytes(
        c.n_layers, 1, c.n_kv_heads, c.d_head, c.max_seq_len, full.dtype))
    return full, windowed_copy(full, SPEED_WINDOW)


def step_times(full: GPT, window: GPT, contexts: tuple[int, ...], repeats: int
               ) -> tuple[dict, dict]:
    """Median seconds of one decode step at each context, `full` against `window` (speed_models),
    timed alternately (one step of each, `repeats` times, after one round that warms up) so both
    see the same machine."""
    token = np.zeros((1, 1), dtype=np.int64)
    medians = {"full": {}, "window": {}}
    for context in contexts:
        note(f"context {context}")
        steps = {name: functools.partial(model, token, filled(model, context), last_only=True)
                 for name, model in (("full", full), ("window", window))}
        times = interleave(steps, repeats, warmup=1)
        for name, t in times.items():
            medians[name][context] = summary(t)["median_ms"] / 1e3
        del steps
    return medians["full"], medians["window"]


def plot_accuracy(scores: dict, path: Path) -> Path:
    """Exact match against prompt length, one line per window; written to path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    try:
        draw_accuracy(ax, scores)
        fig.tight_layout()
        return save_figure(fig, path, dpi=90)
    finally:
        plt.close(fig)


def draw_accuracy(ax: object, scores: dict) -> None:
    """plot_accuracy's axes: one line per window."""
    for name, table in scores.items():
        lengths = [L for L, (count, _) in table.items() if count]
        match = [100 * table[L][1] / table[L][0] for L in lengths]
        ax.plot(lengths, match, marker="o", ms=3, label=name,
                ls="--" if "S=" in name else ("-" if name != "full" else ":"))
    ax.set_xlabel("characters to reverse, n (the last answer character needs the key 2n-1 back)")
    ax.set_ylabel("exact match (%)")
    ax.set_title("Trained with full attention, decoded with a sliding window of W keys")
    ax.legend(fontsize=8)


def main(argv: list[str] | None = None) -> int:
    """The command: --picture, --accuracy and/or --speed, in that order."""
    ap = argparse.ArgumentParser(description="The sliding window and attention sinks: pictures "
                                             "and measurements.")
    ap.add_argument("--picture", action="store_true", help="print the band mask and the slots")
    ap.add_argument("--accuracy", action="store_true",
                    help="exact match of the reversal model with windows 4 .. 64")
    ap.add_argument("--speed", action="store_true",
                    help="decode step time vs context, full attention vs a window of 256")
    ap.add_argument("--n", type=cli_int(1, 1_000_000), default=None,
                    help="--accuracy: held-out prompts (default 1000)")
    ap.add_argument("--repeats", type=cli_int(1, 1000), default=None,
                    help="--speed: timed steps per context and model (default 9)")
    ap.add_argument("--out", type=cli_output_file(".png"), default=None,
                    help="--accuracy: the figure (default out/window_accuracy.png)")
    args = ap.parse_args(argv)
    if not (args.picture or args.accuracy or args.speed):
        ap.error("say what to run: --picture, --accuracy and/or --speed")
    if not args.accuracy:  # a flag the run would ignore is refused, not dropped
        refuse_unused(ap, args, ["--n", "--out"], "applies only to --accuracy")
    if not args.speed:
        refuse_unused(ap, args, ["--repeats"], "applies only to --speed")
    args.n, args.repeats = args.n or 1000, args.repeats or 9
    # Every input of every action is checked before the first line is printed.
    if args.accuracy:
        args.out = args.out or default_output(ap, "window_accuracy.png")
        base = cli_load(ap, CHECKPOINT, GPT.load, " (make train writes it)", flag="--accuracy")
    if args.speed:
        try:
            full, window = speed_models(SPEED_CONTEXTS, args.repeats)
        except ValueError as err:
            ap.error(f"--speed cannot run on this machine: {one_line(err)}")
    if args.picture:
        print(band_picture())
        print()
        print(slots_picture())
    progress = Progress("tools/window.py", args.accuracy + args.speed)
    if args.accuracy:
        progress.stage(f"--accuracy: {args.n} held-out prompts under {len(ACCURACY_WINDOWS)} "
                       "windows")
        with threadpool_limits(limits=1, user_api="blas"), progress:
            scores = accuracy(base, args.n, seed=0, batch=100)
        print(f"checkpoints/reverse.npz (trained with full attention), {args.n} held-out prompts "
              "(test stream, seed 0), greedy; exact match by prompt length:\n")
        print(accuracy_table(scores))
        print(f"wrote {plot_accuracy(scores, args.out)}")
    if args.speed:
        progress.stage(f"--speed: {args.repeats} decode steps of each model at "
                       f"{len(SPEED_CONTEXTS)} contexts")
        with progress:
            full, window = step_times(full, window, SPEED_CONTEXTS, args.repeats)
        print(f"decode step, GPT-2-small shapes (12 layers, d_model 768, 12 heads, vocab 512), "
              f"rope, batch 1, float32, fast path (FastGPT); median of {args.repeats} steps, "
              "full and window alternating")
        print(machine_line())
        print(f"{'context':>7}  {'full':>9}  {f'W={SPEED_WINDOW}':>9}  full / window")
        for context in SPEED_CONTEXTS:
            print(f"{context:>7}  {1e3 * full[context]:>6.1f} ms  {1e3 * window[context]:>6.1f} ms"
                  f"  {full[context] / window[context]:>6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
