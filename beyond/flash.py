"""Online-softmax ("Flash") attention: the readable attention's output, without its weights.

    python beyond/flash.py --show     one query row's running max m and sum l, block by block
    python beyond/flash.py --bench    peak memory and time beside the engine's attention

attention.scaled_dot_product_attention forms every score of a call, (..., t_q, t_k), then
normalises each row. Here the keys are read in blocks of `block_size`, and each query row keeps
three running numbers instead of a row of weights. For one row with scores s_j (a hidden key's
score is NEG_INF, as in the readable path):

    m   = the largest score seen so far                      (starts at -inf)
    l   = sum over the keys seen of exp(s_j - m)             (starts at 0)
    acc = sum over the keys seen of exp(s_j - m) * v_j       (starts at 0, one d_v vector)

A block of keys B whose scores raise the max to m' = max(m, max_B s_j) turns every earlier
term exp(s_j - m) into exp(s_j - m') = exp(s_j - m) * exp(m - m'): one factor for the whole sum,
so

    l'   = l   * exp(m - m') + sum_B exp(s_j - m')
    acc' = acc * exp(m - m') + sum_B exp(s_j - m') * v_j

This is an identity, not an approximation. After the last block m is the row's max, l is the
softmax's denominator and acc / l is the readable path's output row, up to the order in which
the terms were added (float64: 1e-15). exp(m - m') <= 1 because m' >= m, so nothing overflows, and
the first block's factor is exp(-inf) = 0. The online softmax is Milakov and Gimelshein (2018);
computing attention this way in tiles that fit a GPU's on-chip SRAM is FlashAttention (Dao et al.,
2022). docs/flash.md has the picture and the measurements.

Extra memory is O(t_q): the output, plus per query tile of block_size rows the (tile, block)
scores and m, l, acc; never a (t_q, t_k) array.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python beyond/flash.py` from anywhere: find the repo
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import functools
import math
import statistics
import time
import tracemalloc
from collections.abc import Callable

import numpy as np

from attention import NEG_INF, check_attention_inputs, softmax
from parts import ROOT
from parts.checks import cli_int, cli_output_file, positive_int

BLOCK_SIZE = 128  # query rows per tile and keys per block (measured: docs/flash.md)
DEFAULT_PNG = ROOT / "out" / "flash.png"  # --draw writes here unless --out (out/ is ignored)


# --- the recurrence ------------------------------------------------------------------------------

def rescale_factor(m_old: np.ndarray, m_new: np.ndarray) -> np.ndarray:
    """exp(m_old - m_new): what every earlier term is multiplied by when the max rises from m_old
    to m_new. At most 1, since m_new >= m_old; exactly 1 when the block did not raise it."""
    return np.exp(m_old - m_new)


def online_softmax_step(m: np.ndarray, denom: np.ndarray, acc: np.ndarray,
                        scores: np.ndarray, v: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fold one block of b keys into the running (m, l, acc) of n query rows; l is called denom
    here (the running denominator).

    scores (..., b, n) hold one COLUMN per query (scaled and masked; overwritten): NumPy reduces
    across rows (an elementwise max or sum of whole rows) several times faster than along each
    short row. m, denom (..., 1, n), acc (..., n, d_v), v (..., b, d_v) -> the new m, denom, acc;
    acc is updated in place.
    """
    m_new = np.maximum(m, scores.max(axis=-2, keepdims=True))  # (..., 1, n)
    rescale = rescale_factor(m, m_new)  # (..., 1, n): brings the old terms to the new max
    scores -= m_new
    p = np.exp(scores, out=scores)  # (..., b, n): exp(s_j - m_new) <= 1, in the scores' place
    denom = denom * rescale + p.sum(axis=-2, keepdims=True)
    acc *= rescale.swapaxes(-1, -2)  # (..., 1, n) -> (..., n, 1): one factor per query row
    acc += p.swapaxes(-1, -2) @ v  # (..., n, b) @ (..., b, d_v) -> (..., n, d_v)
    return m_new, denom, acc


# --- attention in tiles --------------------------------------------------------------------------

def flash_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None = None,
                    block_size: int = BLOCK_SIZE) -> np.ndarray:
    """attention.scaled_dot_product_attention(q, k, v, mask)[0], one block of keys at a time.

    q (..., t_q, d), k (..., t_k, d), v (..., t_k, d_v), one float dtype; mask bool, broadcastable
    to (..., t_q, t_k), True = may attend. Returns out (..., t_q, d_v) in v's dtype, and never the
    weights: queries go in tiles of block_size rows, keys in blocks of block_size, and only a
    (tile, block) array of scores exists at a time. float16 is computed in float32, as the
    readable path does. Checks its own arguments (as the readable path does, and block_size).
    """
    check_attention_inputs(q, k, v, mask)
    block_size = positive_int("flash_attention block_size", block_size)
    return attention_in_tiles(q, k, v, mask, block_size)


def attention_in_tiles(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None,
                       block_size: int) -> np.ndarray:
    """flash_attention without the checks, for a caller that has checked the call already (the
    engine's model entry does): the tiles over the queries, each walking its key blocks."""
    dtype = v.dtype
    q, k, v = (a.astype(np.result_type(a, np.float32), copy=False) for a in (q, k, v))
    t_q, t_k = q.shape[-2], k.shape[-2]
    q = q * (1.0 / math.sqrt(q.shape[-1]))  # scale the t_q x d queries, not every score
    if mask is not None:  # a view with the full (t_q, t_k) axes (stride 0 where it had size 1)
        mask = np.broadcast_to(mask, (*mask.shape[:-2], t_q, t_k))
    lead = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    out = np.empty((*lead, t_q, v.shape[-1]), dtype)
    for start in range(0, t_q, block_size):
        rows = slice(start, start + block_size)
        tile_mask = None if mask is None else mask[..., rows, :]
        out[..., rows, :] = attend_tile(q[..., rows, :], k, v, tile_mask, block_size, lead)
    return out


def attend_tile(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None,
                block_size: int, lead: tuple[int, ...]) -> np.ndarray:
    """One tile of (scaled) queries q (..., n, d) against the key blocks it needs: returns
    acc / l, its output rows (..., n, d_v). mask (..., n, t_k) or None."""
    n, d_v = q.shape[-2], v.shape[-1]
    m = np.full((*lead, 1, n), -np.inf, q.dtype)  # running max: nothing seen yet
    denom = np.zeros((*lead, 1, n), q.dtype)  # l: running sum of exp(s_j - m)
    acc = np.zeros((*lead, n, d_v), q.dtype)  # running sum of exp(s_j - m) * v_j
    q_t = q.swapaxes(-1, -2)  # (..., n, d) -> (..., d, n): a view, BLAS reads it transposed
    for keys, partly_hidden in key_blocks(mask, k.shape[-2], block_size):
        scores = k[..., keys, :] @ q_t  # (..., b, d) @ (..., d, n) -> (..., b, n)
        if partly_hidden:  # the mask, BEFORE the softmax, with the readable path's NEG_INF
            scores = np.where(mask[..., keys].swapaxes(-1, -2), scores, NEG_INF)  # (..., b, n)
        m, denom, acc = online_softmax_step(m, denom, acc, scores, v[..., keys, :])
    return acc / denom.swapaxes(-1, -2)  # (..., 1, n) -> (..., n, 1): each row by its own l


def key_blocks(mask: np.ndarray | None, t_k: int, block_size: int) -> list[tuple[slice, bool]]:
    """The key blocks one query tile must visit, each with whether the mask hides any of its keys
    from any of the tile's queries; mask (..., n, t_k) is read, never assumed causal.

    A block hidden from every query of the tile (in every batch row and head) is skipped: a hidden
    key's weight is exp(NEG_INF - m) = 0.0 exactly once the row has seen a real score. A query
    that sees no key at all is, in the readable path, uniform over ALL t_k keys (softmax of equal
    NEG_INF scores), so a tile holding one visits every block, and the recurrence gives the same.
    """
    blocks = [slice(j, min(j + block_size, t_k)) for j in range(0, t_k, block_size)]
    if mask is None:
        return [(keys, False) for keys in blocks]
    over_rows = tuple(range(mask.ndim - 1))  # every axis but the keys: batch, heads, queries
    seen = mask.any(axis=over_rows)  # (t_k,): some query of the tile may see the key
    seen_by_all = mask.all(axis=over_rows)  # (t_k,): every query of the tile may see it
    blind = not mask.any(axis=-1).all()  # some query sees no key (in some batch row or head)
    return [(keys, not seen_by_all[keys].all()) for keys in blocks
            if blind or seen[keys].any()]


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
    fig.savefig(path, dpi=100, format="png")


# --- the measurement -----------------------------------------------------------------------------

def peak_bytes(fn: Callable[[], object]) -> int:
    """tracemalloc's peak of memory allocated while fn runs (its output included), in bytes."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def blas_line() -> str:
    from threadpoolctl import threadpool_info

    blas = [p for p in threadpool_info() if p.get("user_api") == "blas"]
    return "; ".join(f"{p.get('internal_api')} {p.get('version')} ({p.get('architecture')}), "
                     f"{p.get('num_threads')} threads" for p in blas) or "no BLAS found"


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def bench(sizes: list[int], repeats: int, blocks: list[int]) -> None:
    """GPT-2-small attention (B=1, H=12, d=64, causal, float32): flash_attention at each block
    size vs engine.fast.attention, peak memory alone, then times interleaved, medians."""
    import attention
    from engine import fast

    print(f"machine: {cpu_name()}, {len_cpus()} cores; numpy {np.__version__}; BLAS: "
          f"{blas_line()}")
    print(f"GPT-2-small attention: B=1, H=12, d=64, causal (1, 1, t, t) bool mask, float32; "
          f"medians of {repeats} interleaved repeats")
    print()
    print(f"{'tokens':>6}  {'method':<18} {'peak extra':>12} {'median':>11}  {'vs engine':>9}  "
          f"max |diff|")
    for t in sizes:
        rng = np.random.default_rng(t)
        q, k, v = (rng.standard_normal((1, 12, t, 64)).astype(np.float32) for _ in range(3))
        mask = attention.causal_mask(t)[None, None]  # (1, 1, t, t)
        runs = {"engine attention": functools.partial(fast.attention, q, k, v, mask)}
        for b in blocks:
            runs[f"flash block {b}"] = functools.partial(flash_attention, q, k, v, mask, b)
        reference = runs["engine attention"]()[0]
        diff = {name: float(np.abs(outputs(fn()) - reference).max()) for name, fn in runs.items()}
        peak = {name: peak_bytes(fn) for name, fn in runs.items()}
        times: dict[str, list[float]] = {name: [] for name in runs}
        names = list(runs)
        for r in range(repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order
                start = time.perf_counter()
                runs[name]()
                times[name].append(time.perf_counter() - start)
        base = statistics.median(times["engine attention"])
        for name in names:
            med = statistics.median(times[name])
            print(f"{t:6d}  {name:<18} {peak[name] / 2**20:9.2f} MiB {med * 1e3:8.2f} ms  "
                  f"{med / base:8.2f}x  {diff[name]:.1e}")
        print()


def outputs(result: np.ndarray | tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """The output of either method: the engine returns (out, weights), flash out alone."""
    return result[0] if isinstance(result, tuple) else result


def len_cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Online-softmax (Flash) attention: the picture of "
                                             "one row (--show, the default) or the measurement "
                                             "(--bench).")
    ap.add_argument("--show", action="store_true", help="print m and l block by block")
    ap.add_argument("--draw", action="store_true", help="--show also draws to out/flash.png")
    ap.add_argument("--out", type=cli_output_file(".png"), default=None,
                    help="--show draws to this PNG (implies --draw)")
    ap.add_argument("--bench", action="store_true", help="peak memory and time vs the engine")
    ap.add_argument("--sizes", type=cli_int(1, 8192), nargs="+", default=[512, 2048, 4096],
                    help="--bench: token counts (default 512 2048 4096)")
    ap.add_argument("--blocks", type=cli_int(1, 8192), nargs="+", default=[64, 128, 256],
                    help="--bench: flash block sizes (default 64 128 256)")
    ap.add_argument("--repeats", type=cli_int(1, 100), default=5,
                    help="--bench: timed repeats per method (default 5)")
    ap.add_argument("--threads", type=cli_int(1, 64), default=None,
                    help="--bench: BLAS threads (default: BLAS's own)")
    args = ap.parse_args(argv)
    if args.bench:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(args.threads):
            bench(args.sizes, args.repeats, args.blocks)
    if args.show or not args.bench:
        out = args.out or (DEFAULT_PNG if args.draw else None)
        show(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
