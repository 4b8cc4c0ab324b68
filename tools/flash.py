"""Online-softmax ("Flash") attention (beyond/flash.py), shown and measured.

    python tools/flash.py --show     one query row's running max m and sum l, block by block
    python tools/flash.py --bench    peak memory and time beside the fast path's attention

--show runs the recurrence of beyond/flash.py over one row of 16 scores in blocks of 4, prints m and
l before and after every block, and checks the result against the full softmax and against both
attention functions (--draw or --out also draws it). --bench times flash_attention at GPT-2-small
shapes beside fast/model.py's attention, with tools/measure.py's harness and peak memory.
docs/flash.md shows both.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/x.py` from anywhere: find the repo
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import functools
import math

import numpy as np

from attention import softmax
from beyond.flash import flash_attention, online_softmax_step, rescale_factor
from parts.checks import cli_int, cli_output_file, fits_in_memory, refuse_unused
from parts.files import save_figure
from tools.cli_types import OUT_DIR
from tools.measure import Progress, interleave, machine_line, peak_bytes, summary

DEFAULT_PNG = OUT_DIR / "flash.png"  # --draw writes here unless --out (out/ is ignored)


# --- the picture: one query row, block by block --------------------------------------------------

# One query's scores over 16 keys, chosen so the max rises in blocks 0, 1 and 3 and not in 2.
SHOW_SCORES = np.array([0.3, 1.2, -0.5, 0.8, 2.1, 0.4, 1.7, -1.0,
                        0.9, 1.5, 0.2, -0.3, 3.0, 2.2, 0.1, 1.1])
SHOW_BLOCK = 4


def trace_row(scores: np.ndarray, v: np.ndarray, block_size: int) -> list[dict[str, float]]:
    """Run online_softmax_step over one row's scores (t_k,) and values (t_k, d_v), recording
    per block: its first key, its size, its max, m and l before and after, the rescale factor,
    and (last entry) the output acc / l."""
    m, denom = np.full((1, 1), -np.inf), np.zeros((1, 1))  # (1, n) for n = 1 query
    acc = np.zeros((1, v.shape[-1]))
    steps = []
    for start in range(0, scores.shape[0], block_size):
        block = scores[start:start + block_size]
        m_new, l_new, acc = online_softmax_step(m, denom, acc, block[:, None].copy(),
                                                v[start:start + block_size])
        steps.append({"first": start, "size": block.shape[0], "block_max": block.max(),
                      "m": m.item(), "m_new": m_new.item(),
                      "rescale": rescale_factor(m, m_new).item(),
                      "l": denom.item(), "l_new": l_new.item()})
        m, denom = m_new, l_new
    steps[-1]["out"] = acc[0] / denom.item()
    return steps


def show(draw_to: Path | None = None) -> None:
    """Print the trace of SHOW_SCORES in blocks of SHOW_BLOCK, then check it against the full
    softmax and against flash_attention and the readable attention on the same row."""
    import attention

    scores = SHOW_SCORES
    t_k = scores.shape[0]
    v = np.random.default_rng(0).standard_normal((t_k, 3))
    steps = trace_row(scores, v, SHOW_BLOCK)
    print(f"One query row, {t_k} keys in blocks of {SHOW_BLOCK}. Scores:")
    for s in steps:
        block = scores[s["first"]:s["first"] + s["size"]]
        print(f"  keys {s['first']:2d}-{s['first'] + s['size'] - 1:2d}: "
              + " ".join(f"{x:5.2f}" for x in block))
    print()
    print("block  keys   block max   m before -> after   exp(m_old - m_new)   l before -> after")
    for i, s in enumerate(steps):
        print(f"{i:5d}  {s['first']:2d}-{s['first'] + s['size'] - 1:<2d}  {s['block_max']:9.4f}"
              f"   {s['m']:8.4f} -> {s['m_new']:6.4f}   {s['rescale']:18.6f}"
              f"   {s['l']:8.6f} -> {s['l_new']:8.6f}")
    m, denom = steps[-1]["m_new"], steps[-1]["l_new"]
    denominator = np.exp(scores - scores.max()).sum()
    print()
    print(f"final m = {m:.4f} = max of all {t_k} scores {scores.max():.4f}")
    print(f"final l = {denom:.10f}; the full softmax's denominator sum_j exp(s_j - max) = "
          f"{denominator:.10f}")
    print(f"l * exp(m) = {denom * math.exp(m):.8f} = sum_j exp(s_j) = {np.exp(scores).sum():.8f}")
    # The same row through the real functions: q k^T / sqrt(d) = scores when k = I, q = s sqrt(d).
    q, k = (scores * math.sqrt(t_k))[None], np.eye(t_k)
    readable = attention.scaled_dot_product_attention(q, k, v)[0][0]
    flash = flash_attention(q, k, v, block_size=SHOW_BLOCK)[0]
    by_hand = np.abs(steps[-1]["out"] - softmax(scores) @ v).max()
    print(f"max |acc / l - softmax(s) @ v|            = {by_hand:.1e}")
    print(f"max |flash_attention - readable attention| = {np.abs(flash - readable).max():.1e}")
    if draw_to is not None:
        draw(steps, scores, draw_to)
        print(f"wrote {draw_to}")


def draw(steps: list[dict[str, float]], scores: np.ndarray, path: Path) -> None:
    """The scores as dots, the running max m as a step line over the blocks, and l beneath."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, nothing global to close

    fig = Figure(figsize=(8, 5), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.plot(np.arange(scores.shape[0]), scores, "o", color="grey", label="score s_j")
    for s in steps:
        span = [s["first"] - 0.5, s["first"] + s["size"] - 0.5]
        top.plot(span, [s["m_new"]] * 2, color="C0", lw=2)
        bottom.plot(span, [s["l_new"]] * 2, color="C1", lw=2)
        top.axvline(span[0], color="lightgrey", lw=0.8)
        bottom.axvline(span[0], color="lightgrey", lw=0.8)
    top.plot([], [], color="C0", lw=2, label="running max m after the block")
    top.legend(loc="upper left")
    top.set_ylabel("score")
    bottom.set_ylabel("running sum l")
    bottom.set_xlabel(f"key j (blocks of {steps[0]['size']})")
    fig.suptitle("Online softmax: m and l after each block of keys")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path, dpi=100, format="png")


# --- the measurement -----------------------------------------------------------------------------

def bench(sizes: list[int], repeats: int, blocks: list[int]) -> None:
    """GPT-2-small attention (B=1, H=12, d=64, causal, float32): flash_attention at each block
    size vs fast/model.py's attention, peak memory alone, then times interleaved, medians."""
    import attention
    from fast import model as fast

    print(machine_line())
    print(f"GPT-2-small attention: B=1, H=12, d=64, causal (1, 1, t, t) bool mask, float32; "
          f"medians of {repeats} interleaved repeats")
    print()
    print(f"{'tokens':>6}  {'method':<18} {'peak extra':>12} {'median':>11}  {'vs fast':>9}  "
          f"max |diff|")
    progress = Progress("tools/flash.py --bench", len(sizes))
    for t in sizes:
        progress.stage(f"{t} tokens: the fast path and {len(blocks)} block sizes")
        rng = np.random.default_rng(t)
        q, k, v = (rng.standard_normal((1, 12, t, 64)).astype(np.float32) for _ in range(3))
        mask = attention.causal_mask(t)[None, None]  # (1, 1, t, t)
        runs = {"fast-path attention": functools.partial(fast.attention, q, k, v, mask)}
        for b in blocks:
            runs[f"flash block {b}"] = functools.partial(flash_attention, q, k, v, mask, b)
        reference = runs["fast-path attention"]()[0]
        diff = {name: float(np.abs(outputs(fn()) - reference).max()) for name, fn in runs.items()}
        peak = {name: peak_bytes(fn) for name, fn in runs.items()}
        ms = {name: summary(times)["median_ms"] for name, times in interleave(runs,
                                                                               repeats).items()}
        for name in runs:
            print(f"{t:6d}  {name:<18} {peak[name] / 2**20:9.2f} MiB {ms[name]:8.2f} ms  "
                  f"{ms[name] / ms['fast-path attention']:8.2f}x  {diff[name]:.1e}")
        print()


def bench_bytes(t: int, block: int) -> int:
    """About the most memory one size of the bench holds at once (GPT-2-small attention, 12
    heads of 64, float32): q, k, v and the (t, t) bool mask, plus the larger of the fast path's
    (12, t, t) weights (it returns them) and flash's (12, b, b) tile of scores with its exp, at
    twice each for the temporaries beside them."""
    b = min(block, t)
    return 3 * 12 * t * 64 * 4 + t * t + 2 * max(12 * t * t * 4, 2 * 12 * b * b * 4)


def outputs(result: np.ndarray | tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """The output of either method: the fast path returns (out, weights), flash out alone."""
    return result[0] if isinstance(result, tuple) else result


def main(argv: list[str] | None = None) -> int:
    """The command: --show (the default, --draw/--out draw it) and/or --bench."""
    ap = argparse.ArgumentParser(description="Online-softmax (Flash) attention: the picture of "
                                             "one row (--show, the default) or the measurement "
                                             "(--bench).")
    ap.add_argument("--show", action="store_true", help="print m and l block by block")
    ap.add_argument("--draw", action="store_true", help="--show also draws to out/flash.png")
    ap.add_argument("--out", type=cli_output_file(".png"), default=None,
                    help="--show draws to this PNG (implies --draw)")
    ap.add_argument("--bench", action="store_true", help="peak memory and time vs the fast path")
    ap.add_argument("--sizes", type=cli_int(1, 8192), nargs="+", default=None,
                    help="--bench: token counts (default 512 2048 4096)")
    ap.add_argument("--blocks", type=cli_int(1, 8192), nargs="+", default=None,
                    help="--bench: flash block sizes (default 64 128 256)")
    ap.add_argument("--repeats", type=cli_int(1, 100), default=None,
                    help="--bench: timed repeats per method (default 5)")
    ap.add_argument("--threads", type=cli_int(1, 64), default=None,
                    help="--bench: BLAS threads (default: BLAS's own)")
    args = ap.parse_args(argv)
    show_too = args.show or not args.bench
    if not args.bench:  # a flag the run would ignore is refused, not dropped
        refuse_unused(ap, args, ["--sizes", "--blocks", "--repeats", "--threads"],
                      "applies only to --bench")
    if not show_too:
        refuse_unused(ap, args, ["--draw", "--out"], "draws --show's row: give --show too")
    args.sizes, args.blocks = args.sizes or [512, 2048, 4096], args.blocks or [64, 128, 256]
    args.repeats = args.repeats or 5
    if args.bench:  # the largest size must fit, before the first line is printed
        try:
            fits_in_memory(f"--bench at {max(args.sizes)} tokens with blocks of "
                           f"{max(args.blocks)}", bench_bytes(max(args.sizes), max(args.blocks)))
        except ValueError as err:
            ap.error(f"argument --sizes/--blocks: {err}")
        from threadpoolctl import threadpool_limits

        with threadpool_limits(args.threads):
            bench(args.sizes, args.repeats, args.blocks)
    if show_too:
        out = args.out or (DEFAULT_PNG if args.draw else None)
        show(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
