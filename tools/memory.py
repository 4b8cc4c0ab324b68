"""How much memory the KV cache takes: the formula, the allocated bytes, and a measured peak.

    python tools/memory.py [--quick] [--out PNG]   (default out/cache_memory.png, in the repo)

The cache keeps K and V for every layer, batch row, key/value head, position and dimension:

    bytes = 2 * n_layers * batch * n_kv_heads * seq_len * d_head * bytes_per_element

so it grows linearly with context and batch. The two levers that shrink it without shortening
the context are fewer K/V heads (GQA shares each K/V head among n_heads / n_kv_heads query heads,
MQA keeps one) and fewer bytes per element (float16 instead of float32).

Three numbers per row, from the least to the most "real":
  formula  kv_cache_bytes(...)
  nbytes   the sum of KVCache.nbytes of the caches actually allocated (must equal the formula)
  peak     tracemalloc's peak of traced memory while a real run fills the cache to that length
           (chunked prefill, then one-token decode steps). tracemalloc, not getrusage: NumPy
           reports every array buffer it allocates to tracemalloc, and the peak can be reset
           between runs, so each row measures only its own run; ru_maxrss is a process-lifetime
           high-water mark (interpreter, libraries, earlier rows included) that cannot be reset.
           It does not see BLAS's internal scratch buffers, which do not depend on the cache.

Finally a 2048-token prefill in one shot vs in chunks of 256: the one-shot forward materialises
(B, H, T, T) score matrices, which at T = 2048 dwarf this small model's cache.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/x.py` from anywhere: find the repo
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import resource
from itertools import product
from typing import NamedTuple

import numpy as np
from matplotlib.figure import Figure
from threadpoolctl import threadpool_limits

from block import GPT, GPTConfig
from cache import KVCache, ModelCache, kv_cache_bytes
from fast.model import FastGPT
from generate import decode, greedy, prefill
from parts.checks import cli_output_file
from parts.files import save_figure
from tools.cli_types import default_output
from tools.measure import Progress, human, peak_during, tracing

CONTEXTS = (128, 512, 2048)
VARIANTS = (("MHA", 4), ("GQA", 2), ("MQA", 1))  # name, n_kv_heads, for 4 query heads
CACHE_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
BATCH = 1
# One-shot and chunked prefill sum the same float32 terms in another order: they agree to a few
# ulps of the largest logit, so the check is relative to it.
TOLERANCE = 1e-4
# Default outputs, under the repository's out/ (ignored by git): `make figures` redraws the
# committed figures/cache_memory.png by naming it with --out.
OUT, QUICK_OUT = "cache_memory.png", "quick/cache_memory.png"

# name, layers, query heads, key/value heads, d_head (published configs)
REAL_MODELS = (("GPT-2 small", 12, 12, 12, 64),
               ("Llama-2-7B", 32, 32, 32, 128),
               ("Llama-3-8B", 32, 32, 8, 128))
REAL_CONTEXTS = (2048, 8192, 32768)


class Row(NamedTuple):
    variant: str
    n_kv_heads: int
    dtype: np.dtype
    context: int
    formula: int  # bytes, kv_cache_bytes
    nbytes: int  # bytes, sum of KVCache.nbytes
    peak_fill: int  # bytes, tracemalloc peak over prefill + decode
    peak_decode: int  # bytes, tracemalloc peak over the decode steps alone (cache included)


def assignment_model(n_kv_heads: int) -> GPT:
    """The assignment's config (d_model 128, 4 heads, d_head 32, 2 layers), room for 2048
    positions, on the fast path (fast/model.py): its memory is what the figures measure."""
    return FastGPT(GPTConfig(max_seq_len=max(CONTEXTS), n_kv_heads=n_kv_heads), seed=0)


def allocate_cache(model: GPT, context: int, dtype: np.dtype) -> ModelCache:
    """One KVCache per layer with exactly `context` positions, stored as `dtype`. The model
    computes in float32; a float16 cache stores K and V rounded to float16 and they are read back
    (upcast) at attention time."""
    c = model.config
    return ModelCache([KVCache(BATCH, c.n_kv_heads, context, c.d_head, dtype)
                       for _ in range(c.n_layers)])


def measure(model: GPT, variant: str, context: int, dtype: np.dtype, decode_steps: int,
            chunk: int = 256) -> Row:
    """Allocate a cache, fill it to `context` with a real prefill + decode, and measure."""
    c = model.config
    prompt = np.random.default_rng(0).integers(0, c.vocab_size, (BATCH, context - decode_steps))
    with tracing():  # one session: the cache, once allocated, counts in every later peak
        cache, _ = peak_during(lambda: allocate_cache(model, context, dtype))
        logits, peak_prefill = peak_during(lambda: prefill(model, prompt, cache,
                                                           chunk_size=chunk))

        def decode_to_the_end() -> None:
            token = greedy(logits)
            for _ in range(decode_steps):
                token = greedy(decode(model, token, cache))

        _, peak_decode = peak_during(decode_to_the_end)
    assert len(cache) == context  # the cache really holds `context` positions now
    formula = kv_cache_bytes(c.n_layers, BATCH, c.n_kv_heads, c.d_head, context, dtype)
    return Row(variant, c.n_kv_heads, dtype, context, formula, cache.nbytes,
               max(peak_prefill, peak_decode), peak_decode)


def prefill_peak(model: GPT, T: int, chunk: int | None) -> tuple[int, np.ndarray]:
    """tracemalloc peak of prefilling T tokens (cache allocation included), one shot or chunked;
    also the last logits, to show both ways compute the same thing."""
    prompt = np.random.default_rng(1).integers(0, model.config.vocab_size, (BATCH, T))
    with tracing():
        cache = model.new_cache(BATCH)
        logits, peak = peak_during(lambda: prefill(model, prompt, cache, chunk_size=chunk))
    return peak, logits


# --- printing ------------------------------------------------------------------------------------

def table(headers: list[str], rows: list[list[str]]) -> str:
    """Right-aligned plain-text table."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=True)]
    lines = ["  ".join(f"{h:>{w}}" for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(f"{x:>{w}}" for x, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def measured_table(rows: list[Row]) -> str:
    headers = ["variant", "n_kv", "cache dtype", "context", "formula (B)", "nbytes (B)", "equal",
               "peak fill", "peak decode", "decode - cache"]
    body = [[r.variant, str(r.n_kv_heads), r.dtype.name, str(r.context), f"{r.formula:,}",
             f"{r.nbytes:,}", "yes" if r.formula == r.nbytes else "NO", human(r.peak_fill),
             human(r.peak_decode), human(r.peak_decode - r.nbytes)]
            for r in rows]
    return table(headers, body)


def real_model_rows() -> list[tuple[str, int, int, int]]:
    """(model, kv heads, context, fp16 cache bytes) for batch 1."""
    return [(name, n_kv, ctx, kv_cache_bytes(layers, 1, n_kv, d_head, ctx, np.float16))
            for name, layers, _, n_kv, d_head in REAL_MODELS for ctx in REAL_CONTEXTS]


def real_model_table() -> str:
    per_token = {name: kv_cache_bytes(layers, 1, n_kv, d_head, 1, np.float16)
                 for name, layers, _, n_kv, d_head in REAL_MODELS}
    body = [[name, f"{q}/{kv}", str(layers), str(d_head), human(per_token[name])]
            + [human(kv_cache_bytes(layers, 1, kv, d_head, ctx, np.float16))
               for ctx in REAL_CONTEXTS]
            for name, layers, q, kv, d_head in REAL_MODELS]
    headers = ["model (fp16, batch 1)", "q/kv heads", "layers", "d_head", "per token"]
    return table(headers + [f"{ctx // 1024}k ctx" for ctx in REAL_CONTEXTS], body)


# --- the figure ----------------------------------------------------------------------------------

def log_axes(ax, x: tuple[int, ...], x_labels: list[str], y_ticks: list[float]) -> None:
    """Log-log axes with ticks only at the given values (memory is linear in context, so every
    variant is a straight line of slope 1 and the gaps between lines are constant ratios)."""
    ax.set(xscale="log", yscale="log", xlabel="context length (tokens)")
    ax.set_xticks(x, labels=x_labels)
    ax.set_yticks(y_ticks, labels=[human(y).replace(".00 ", " ") for y in y_ticks])
    ax.minorticks_off()
    ax.grid(alpha=0.3)


def plot_memory(rows: list[Row], path: str | Path) -> Path:
    """Left: the assignment's config, formula lines, measured nbytes (dots) and decode peaks
    (triangles) per variant; float16 lines are drawn wide and pale because MHA float16 has
    exactly the bytes of GQA float32 (and GQA float16 those of MQA float32). Right: real models,
    fp16, formula."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(11, 5.4), layout="constrained")
    left, right = fig.subplots(1, 2)
    colours = dict(zip([v for v, _ in VARIANTS], ["C0", "C1", "C2"], strict=True))
    for (variant, n_kv), dtype in product(VARIANTS, CACHE_DTYPES):
        mine = [r for r in rows if r.variant == variant and r.dtype == dtype]
        x, colour = [r.context for r in mine], colours[variant]
        line = {"lw": 1.5} if dtype == np.float32 else {"lw": 6, "alpha": 0.3}
        left.plot(x, [r.formula for r in mine], color=colour,
                  label=f"{variant} (n_kv {n_kv}), {dtype.name} cache", **line)
        left.plot(x, [r.nbytes for r in mine], "o", color=colour, ms=4)
        left.plot(x, [r.peak_decode for r in mine], "^", color=colour, ms=6, mfc="none")
    left.plot([], [], "ko", ms=4, label="measured: sum of KVCache.nbytes")
    left.plot([], [], "k^", ms=6, mfc="none", label="measured: tracemalloc peak while decoding")
    log_axes(left, CONTEXTS, [str(c) for c in CONTEXTS], [2.0**k for k in range(15, 23)])
    left.set(ylabel="memory", title="Assignment config: 2 layers, 4 query heads, d_head 32, "
             "batch 1")
    left.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
    for name, layers, q, n_kv, d_head in REAL_MODELS:
        y = [kv_cache_bytes(layers, 1, n_kv, d_head, c, np.float16) for c in REAL_CONTEXTS]
        right.plot(REAL_CONTEXTS, y, "o-", label=f"{name}: {layers} layers, {q} q / {n_kv} kv "
                   f"heads, d_head {d_head}")
        for c, b in zip(REAL_CONTEXTS, y, strict=True):
            right.annotate(human(b), (c, b), textcoords="offset points", xytext=(5, -11),
                           fontsize=7)
    log_axes(right, REAL_CONTEXTS, [f"{c // 1024}k" for c in REAL_CONTEXTS],
             [2.0**k for k in range(26, 35, 2)])
    right.set(ylabel="memory", title="Real models, fp16 cache, batch 1 (formula)")
    right.set_xlim(1500, 50_000)
    right.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15))
    fig.suptitle("KV-cache memory grows linearly with context; fewer K/V heads and fewer bytes "
                 "per element shrink it")
    return save_figure(fig, path, dpi=90)


# --- the command ---------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="KV-cache memory: formula, nbytes, measured peak.")
    ap.add_argument("--quick", action="store_true",
                    help=f"fewer decode steps (a smoke run); writes out/{QUICK_OUT} unless --out "
                         "says otherwise")
    ap.add_argument("--out", type=cli_output_file(".png"), default=None,
                    help=f"PNG path (default out/{OUT} in the repository)")
    args = ap.parse_args(argv)
    args.out = args.out or default_output(ap, QUICK_OUT if args.quick else OUT)
    decode_steps = 4 if args.quick else 64

    models = {n_kv: assignment_model(n_kv) for _, n_kv in VARIANTS}
    # One BLAS thread: the bytes do not depend on it, and on a shared machine a multi-threaded
    # BLAS competing for busy cores makes these small matmuls many times slower.
    progress = Progress("tools/memory.py", len(VARIANTS) * len(CACHE_DTYPES) + 1)
    with threadpool_limits(limits=1, user_api="blas"):
        rows = []
        for (variant, n_kv), dtype in product(VARIANTS, CACHE_DTYPES):
            progress.stage(f"{variant}, {dtype.name} cache: contexts "
                           f"{', '.join(map(str, CONTEXTS))}")
            rows += [measure(models[n_kv], variant, ctx, dtype, decode_steps) for ctx in CONTEXTS]
        progress.stage(f"a prefill of {max(CONTEXTS)} tokens, one shot and in chunks of 256")
        one_shot, a = prefill_peak(models[4], max(CONTEXTS), None)
        chunked, b = prefill_peak(models[4], max(CONTEXTS), 256)
    print(f"KV cache of the assignment's config (d_model 128, 4 query heads, d_head 32, 2 layers, "
          f"max_seq_len 2048), batch {BATCH}.")
    print(f"Each row: allocate the cache, prefill {{context - {decode_steps}}} tokens in chunks "
          f"of 256, decode {decode_steps} tokens.")
    print("peak = tracemalloc peak of traced (NumPy) memory, cache allocation included.\n")
    print(measured_table(rows))

    print("\nReal models, formula only (fp16 K and V, batch 1):\n")
    print(real_model_table())
    print("(GPT-2 was trained with a 1024-token context; its longer rows are the formula only.)")

    mha, T = models[4], max(CONTEXTS)
    cache = kv_cache_bytes(mha.config.n_layers, BATCH, 4, mha.config.d_head, T, np.float32)
    scores = BATCH * mha.config.n_heads * T * T * 4
    print(f"\nPrefill of {T} tokens, MHA float32 (cache {human(cache)} included):")
    print(table(["prefill", "largest score matrix", "tracemalloc peak", "peak / matrix"],
                [["one shot", f"(1, 4, {T}, {T}) = {human(scores)}", human(one_shot),
                  f"{one_shot / scores:.1f}"],
                 ["chunks of 256", f"(1, 4, 256, {T}) = {human(scores * 256 // T)}",
                  human(chunked), f"{chunked / (scores * 256 // T):.1f}"]]))
    print("(the score matrix a prefill of that many queries would form; from 1,024 queries on the"
          "\nfast path runs online-softmax attention (beyond/flash.py), which never forms it, so"
          " the one-shot\npeak is below it; chunks of 256 form one (256, T) array, masked and"
          " normalised in place)")
    relative = np.abs(a - b).max() / np.abs(a).max()
    same = relative <= TOLERANCE
    print(f"same last logits: max |difference| = {np.abs(a - b).max():.2e} = {relative:.1e} x "
          f"max|logit| (tolerance {TOLERANCE:.0e}: {'pass' if same else 'FAIL'})")

    path = plot_memory(rows, args.out)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(f"\nprocess ru_maxrss (whole run, for scale): {human(rss)}")
    print(f"wrote {path}")
    equal = all(r.formula == r.nbytes for r in rows)
    if not (same and equal):
        print("memory.py: " + ("" if equal else "allocated bytes differ from the formula; ")
              + ("" if same else "chunked prefill differs from one-shot"), file=sys.stderr)
    return 0 if same and equal else 1


if __name__ == "__main__":
    raise SystemExit(main())
