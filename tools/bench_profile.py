"""The benchmark's sections on where the time goes (tools/bench.py runs them), at GPT-2-small
shapes with random weights:

    8. one decode step and one prefill split into matrix products, attention, elementwise ops,
       cache writes and the Python around them: every call of a part recorded during the real
       step, then replayed alone (step_breakdown; tools/speculative.py --profile uses it too)
    9. what each trick buys: the readable path, the fast path, and the fast path with each switch
       of fast/model.py's TRICKS off in turn, on a prefill and one decode step after it

Each section measures (returning a dict for bench.json), prints its table; section 8 draws its
figure.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from block import GPT, GPTConfig, blocks_from_named
from cache import KVCache
from fast import model as fastpath
from fast.model import FastGPT
from generate import decode, greedy, prefill
from tools.bench_setup import (
    DECODE_BLOCK,
    GPT2_SMALL_SHAPE,
    NAMES,
    Settings,
    build_pair,
    random_ids,
    save,
)
from tools.measure import fmt, interleave, no_gc, note, ratio, summary

# --- 8. where the time of one step goes ----------------------------------------------------------

PARTS = ("matrix products", "attention", "elementwise", "cache writes")
OVERHEAD = "Python overhead"  # the measured total minus the parts
REST_LABEL = f"{OVERHEAD}, thread wake-ups (rest)"  # what it holds: see step_breakdown
# The functions the model's forward pass calls for each part, by the names it calls them through.
TRACED = [(fastpath, "linear", "matrix products"), (fastpath, "grouped_attention", "attention"),
          (fastpath, "norm", "elementwise"), (fastpath, "gelu_in_place", "elementwise"),
          (KVCache, "update", "cache writes")]


@contextmanager
def traced_calls(calls: list[tuple[str, Callable, tuple]]) -> Iterator[None]:
    """Within the block, every call to a TRACED function is appended to `calls` as (part, the real
    function, its arguments), then made. gelu_in_place's argument is recorded as a copy, since
    the call overwrites it; the others' arguments are not changed after the call."""
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in TRACED]

    def tracer(part, fn, copy):
        def traced(*args):
            calls.append((part, fn, tuple(a.copy() for a in args) if copy else args))
            return fn(*args)
        return traced

    try:
        for (owner, name, part), (_, _, fn) in zip(TRACED, saved, strict=True):
            setattr(owner, name, tracer(part, fn, copy=name == "gelu_in_place"))
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def part_runners(model: GPT, calls: list[tuple[str, Callable, tuple]], ids: np.ndarray,
                 positions: np.ndarray) -> dict[str, tuple[Callable, Callable]]:
    """For each part, (prepare, run): run replays every recorded call of that part in order, with
    the same functions, arrays and weights (all layers, so a decode step's weights stream from
    memory as they do in the real step); prepare, untimed, restores what a call overwrites.

    Two elementwise steps are written inline in the model rather than called by name, so they are
    replayed on arrays of their real shapes: the embedding lookup wte[ids] + wpe[positions] and
    the two residual additions per layer."""
    by_part: dict[str, list[tuple[Callable, tuple]]] = {part: [] for part in PARTS}
    for part, fn, args in calls:
        by_part[part].append((fn, args))

    def replay(part):
        def run():
            for fn, args in by_part[part]:
                fn(*args)
        return run

    runners = {part: (lambda: None, replay(part)) for part in ("matrix products", "attention")}

    # elementwise: gelu_in_place gets a fresh copy of its recorded input each time.
    elementwise = by_part["elementwise"]
    fresh: list[tuple] = [args for _, args in elementwise]
    B, T = ids.shape
    stream = np.ones((B, T, model.config.d_model), model.dtype)  # (B, T, D): a residual add

    def prepare_elementwise():
        fresh[:] = [tuple(a.copy() for a in args) if fn is fastpath.gelu_in_place else args
                    for fn, args in elementwise]

    def run_elementwise():
        for (fn, _), args in zip(elementwise, fresh, strict=True):
            fn(*args)
        model.wte[ids] + model.wpe[positions]  # (B, T) -> (B, T, D), as _forward does
        for _ in range(2 * model.config.n_layers):
            stream + stream  # x + sublayer(x), twice per block

    runners["elementwise"] = (prepare_elementwise, run_elementwise)

    # cache writes: each append replayed into a cache like the real one, holding as many
    # positions as it held (rewound with truncate, as the total's cache is); for a prefill, a
    # fresh cache each time, whose pages are touched for the first time as in the real prefill.
    appends = []
    for _, (kv, k, v) in by_part["cache writes"]:
        held = len(kv) - k.shape[2]  # the recorded call has run: it held this many before
        copy = KVCache(kv.batch_size, kv.n_kv_heads, kv.max_len, kv.d_head, kv.dtype)
        if held:
            copy.append(kv.keys[:, :, :held], kv.values[:, :, :held])
        appends.append([copy, held, k, v])

    def prepare_cache():
        for entry in appends:
            copy, held = entry[:2]
            if held:
                copy.truncate(held)
            else:
                entry[0] = KVCache(copy.batch_size, copy.n_kv_heads, copy.max_len, copy.d_head,
                                   copy.dtype)

    def run_cache():
        for copy, _, k, v in appends:
            copy.append(k, v)

    runners["cache writes"] = (prepare_cache, run_cache)
    return runners


def step_breakdown(model: GPT, prompt: np.ndarray, decode_step: bool, rounds: int) -> dict:
    """Time one whole step (a prefill of `prompt` into an empty cache, or one decode step after
    it), then each part on its own with that step's recorded calls; Python overhead = total -
    sum of parts. All of them interleaved, medians of `rounds`.

    What the remainder holds: the Python between the recorded calls (the model's glue, checks,
    reshapes, head splits and merges, the mask), and whatever running the parts in turn costs
    beyond running each alone: each part replays its calls back to back, so a BLAS thread that
    goes idle during the Python between two products in the real step and must be woken for the
    next one costs its wake-up only there. It can come out slightly negative when a part runs
    slower alone (its data colder) than inside the step."""
    B, P = prompt.shape
    cache = model.new_cache(B)
    token = greedy(prefill(model, prompt, cache))  # (B,)
    calls: list[tuple[str, Callable, tuple]] = []
    if decode_step:
        ids, positions = token[:, None], np.full((B, 1), P)  # (B, 1): position P
        with traced_calls(calls):
            decode(model, token, cache)

        def prepare_total():
            cache.truncate(P)

        def run_total():
            decode(model, token, cache)
    else:
        ids, positions = prompt, np.broadcast_to(np.arange(P), (B, P))
        with traced_calls(calls):
            prefill(model, prompt, model.new_cache(B))
        fresh = []

        def prepare_total():
            fresh[:] = [model.new_cache(B)]

        def run_total():
            prefill(model, prompt, fresh[0])

    runners = {"total": (prepare_total, run_total)} | part_runners(model, calls, ids, positions)
    times = interleave({name: run_it for name, (_, run_it) in runners.items()}, rounds,
                       prepare={name: prepare for name, (prepare, _) in runners.items()},
                       label=f"{'decode step' if decode_step else 'prefill'}, {len(runners)} "
                             "parts")
    ms = {name: summary(t)["median_ms"] for name, t in times.items()}
    parts = {part: ms[part] for part in PARTS}
    parts[OVERHEAD] = ms["total"] - sum(parts.values())
    products = [args for part, _, args in calls if part == "matrix products"]
    flop = sum(2 * x.size // x.shape[-1] * w.shape[0] * w.shape[1] for x, w, *_ in products)
    whole = [w if w.base is None else w.base for _, w, *_ in products]  # W_K of W_QKV: W_QKV
    weight_bytes = sum({id(w): w.nbytes for w in whole}.values())
    return {"what": f"decode step, B={B}, {P} cached" if decode_step else f"prefill {P}",
            "total_ms": ms["total"], "total": summary(times["total"]), "parts_ms": parts,
            "share": {part: v / ms["total"] for part, v in parts.items()},
            "calls": {part: sum(p == part for p, _, _ in calls) for part in PARTS},
            "matmul_gflop": flop / 1e9, "weight_bytes": weight_bytes,
            "matmul_gflop_per_s": flop / 1e6 / ms["matrix products"],
            "matmul_weight_gb_per_s": weight_bytes / 1e6 / ms["matrix products"]}


def profile(s: Settings, seed: int) -> dict:
    """Section 8 at GPT-2-small shapes: one decode step (B=1, batch_prompt_len cached) and one
    prefill of prefill_len tokens, each broken into PARTS plus the Python overhead."""
    _, model = build_pair(GPT2_SMALL_SHAPE, seed)
    rng = np.random.default_rng(seed)
    vocab = GPT2_SMALL_SHAPE["vocab_size"]
    with no_gc():
        note("one decode step")
        dec = step_breakdown(model, random_ids(rng, vocab, s.batch_prompt_len), True,
                             s.profile_rounds)
        note(f"one prefill of {s.prefill_len}")
        pre = step_breakdown(model, random_ids(rng, vocab, s.prefill_len), False,
                             max(3, s.profile_rounds // 3))
    return {"name": "gpt2_small", "description": NAMES["gpt2_small"], "parts": [*PARTS, OVERHEAD],
            "decode": dec, "prefill": pre}


# --- 9. what each trick buys ---------------------------------------------------------------------

TRICKS_RTOL = 1e-4  # every variant's float32 logits within this of the readable path's (relative)


@contextmanager
def switched_off(tricks: tuple[str, ...]) -> Iterator[None]:
    """fastpath.TRICKS with `tricks` off inside the block, every switch as it was after it."""
    saved = dict(fastpath.TRICKS)
    fastpath.TRICKS.update(dict.fromkeys(tricks, False))
    try:
        yield
    finally:
        fastpath.TRICKS.update(saved)


def trick_variants(config: GPTConfig, seed: int, tricks: list[str]
                   ) -> dict[str, tuple[GPT, tuple[str, ...]]]:
    """name -> (model, the switches it runs with off): the readable GPT, the fast path (FastGPT),
    and the fast path without each of `tricks`. All share one set of random weights. fused_qkv
    is decided when a model is built (FastGPT stores W_Q | W_K | W_V side by side), so the fast
    path without it runs on weights stored apart, as the readable model stores them."""
    readable = GPT(config, seed)
    fast = FastGPT(config, weights=readable.named_weights())
    apart = FastGPT(config, weights=readable.named_weights())
    apart.blocks = blocks_from_named(readable.named_weights(), config)  # W_Q, W_K, W_V apart
    variants = {"readable": (readable, ()), "fast": (fast, ())}
    for t in tricks:
        variants[f"without {t}"] = (apart if t == "fused_qkv" else fast, (t,))
    return variants


def trick_timings(variants: dict[str, tuple[GPT, tuple[str, ...]]], prompt: np.ndarray,
                  rounds: int) -> dict:
    """For each variant: a prefill of prompt (1, P) into a fresh cache, and one decode step at
    position P (the cache rewound to P each time), all in ONE interleaved loop, each variant's
    switches off only while it runs; caches are made with them off too (small_pages acts
    there). First every variant's prefill and decode logits are checked against the readable
    path's: a broken switch stops the benchmark before anything is timed."""
    P, token = prompt.shape[1], prompt[:, 0]  # any token will do for the timed step
    timed, diffs, reference = {}, {}, None
    for name, (model, off) in variants.items():
        note(f"{name}: its logits against the readable path's")
        with switched_off(off):
            cache = model.new_cache(1)
            logits = np.concatenate([prefill(model, prompt, cache), decode(model, token, cache)])
        reference = logits if reference is None else reference  # (2, V): the readable's
        diffs[name] = float(np.abs(logits - reference).max() / np.abs(reference).max())
        if not diffs[name] <= TRICKS_RTOL:
            raise RuntimeError(f"tricks: {name!r} gives logits {diffs[name]:.2e} (relative) from "
                               f"the readable path's, more than {TRICKS_RTOL}: a broken switch")

        def prefill_once(model=model, off=off):
            with switched_off(off):
                prefill(model, prompt, model.new_cache(1))

        def decode_step(model=model, off=off, cache=cache):
            with switched_off(off):
                cache.truncate(P)
                decode(model, token, cache)

        timed[f"prefill {name}"], timed[f"decode {name}"] = prefill_once, decode_step
    inner = {name: DECODE_BLOCK for name in timed if name.startswith("decode")}
    times = interleave(timed, rounds, inner, label=f"timing {len(variants)} variants")
    out: dict = {"variants": list(variants), "max_rel_logit_diff": diffs}
    for step in ("prefill", "decode"):
        out[step] = {name: summary(times[f"{step} {name}"]) for name in variants}
        out[f"{step}_over_fast"] = {name: ratio(out[step], name, "fast") for name in variants}
    return out


def what_tricks_buy(s: Settings, seed: int) -> dict:
    """Section 9 at GPT-2-small shapes: every switch of fastpath.TRICKS off in turn (multi-head
    attention, as GPT-2 has), then shared_kv_heads again with grouped-query attention (4 K/V
    heads for 12 query heads), where it has groups to share."""
    sh = GPT2_SMALL_SHAPE
    config = dict(vocab_size=sh["vocab_size"], max_seq_len=sh["n_positions"],
                  d_model=sh["n_embd"], n_heads=sh["n_head"], n_layers=sh["n_layer"])
    prompt = random_ids(np.random.default_rng(seed), sh["vocab_size"], s.tricks_len)
    note(f"multi-head attention: the readable path, the fast path, and {len(fastpath.TRICKS)} "
         "tricks off in turn")
    mha = trick_variants(GPTConfig(**config), seed, list(fastpath.TRICKS))
    with no_gc():
        out = {"description": NAMES["gpt2_small"], "prompt_len": s.tricks_len,
               "rounds": s.tricks_rounds, "decode_block": DECODE_BLOCK,
               "n_heads": sh["n_head"], "tricks": list(fastpath.TRICKS),
               "mha": trick_timings(mha, prompt, s.tricks_rounds)}
    del mha  # three models of 341 MB: gone before the next three are built
    H_kv = sh["n_head"] // 3  # 4 K/V heads at GPT-2-small's 12 heads
    note(f"grouped-query attention ({H_kv} K/V heads): shared_kv_heads off")
    gqa = trick_variants(GPTConfig(**config, n_kv_heads=H_kv), seed, ["shared_kv_heads"])
    with no_gc():
        out["gqa"] = trick_timings(gqa, prompt, s.tricks_rounds) | {"n_kv_heads": H_kv}
    return out


# --- printing and the figure ---------------------------------------------------------------------

def print_profile(prof: dict, number: str = "") -> None:
    """Section 8's table (number: the section's number in the full report, or none)."""
    dec, pre = prof["decode"], prof["prefill"]
    print(f"\n{number}where the time goes, {prof['description']} (each part timed alone with "
          "the step's own calls; the rest = measured total - parts)")
    print(f"{'part':<34} {dec['what']:>24} {pre['what']:>24}")
    for part in prof["parts"]:
        cells = [f"{x['parts_ms'][part]:9.2f} ms {100 * x['share'][part]:5.1f}%"
                 for x in (dec, pre)]
        label = part if part != OVERHEAD else REST_LABEL
        print(f"{label:<34} {cells[0]:>24} {cells[1]:>24}")
    print(f"{'total (measured)':<34} {dec['total_ms']:9.2f} ms {100.0:5.1f}% "
          f"{pre['total_ms']:12.2f} ms {100.0:5.1f}%")
    for x in (dec, pre):
        mm = x["parts_ms"]["matrix products"]
        print(f"  {x['what']}: matrix products do {x['matmul_gflop']:.3g} GFLOP on "
              f"{x['weight_bytes'] / 1e6:.0f} MB of weights in {mm:.1f} ms = "
              f"{x['matmul_gflop_per_s']:.1f} GFLOP/s, weights read at "
              f"{x['matmul_weight_gb_per_s']:.1f} GB/s; "
              f"{x['matmul_gflop'] * 1e9 / x['weight_bytes']:.2f} FLOP per weight byte")


def print_tricks(t: dict, number: str = "") -> None:
    """Section 9's tables, multi-head and grouped-query attention."""
    P = t["prompt_len"]
    print(f"\n{number}what each trick buys, {t['description']}: prefill of {P} tokens into a "
          f"cache, then one decode step (B=1) at position {P}")
    print("  off/fast = time with that one trick off / time of the fast path with all of them "
          "(above 1: the trick saves time); readable/fast on the readable row")
    H, H_kv = t["n_heads"], t["gqa"]["n_kv_heads"]
    for key, title in (("mha", f"{H} heads, each with its own K and V (GPT-2)"),
                       ("gqa", f"grouped-query attention, {H_kv} K/V heads shared by the {H} "
                               "query heads")):
        x = t[key]
        print(f"  {title}")
        print(f"  {'variant':<28} {'prefill ' + str(P):>27} {'off/fast':>10} "
              f"{'decode step':>27} {'off/fast':>10}")
        for name in x["variants"]:
            label = {"readable": "readable (GPT)", "fast": "fast (FastGPT, all tricks)"}.get(
                name, name)
            print(f"  {label:<28} {fmt(x['prefill'][name]):>27} "
                  f"{x['prefill_over_fast'][name]:>10.2f} {fmt(x['decode'][name]):>27} "
                  f"{x['decode_over_fast'][name]:>10.2f}")
    worst = max(max(t[k]["max_rel_logit_diff"].values()) for k in ("mha", "gqa"))
    print(f"  every variant's logits within {worst:.1e} (relative) of the readable path's "
          f"(checked before timing, limit {TRICKS_RTOL:g})")


def plot_profile(prof: dict, machine: str, path: Path) -> str:
    """Section 8 as two stacked bars (shares of each step's measured total, ms written in)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [prof["decode"], prof["prefill"]]
    fig, ax = plt.subplots(figsize=(7.6, 3.4))
    left = np.zeros(len(steps))
    for part in prof["parts"]:
        shares = np.array([100 * max(x["share"][part], 0.0) for x in steps])
        bars = ax.barh([f"{x['what']}\n{x['total_ms']:.1f} ms" for x in steps], shares,
                       left=left, label=REST_LABEL if part == OVERHEAD else part)
        ax.bar_label(bars, [f"{x['parts_ms'][part]:.{0 if x['parts_ms'][part] >= 100 else 2}f} ms"
                            if share >= 6 else "" for x, share in zip(steps, shares, strict=True)],
                     label_type="center", fontsize=7)
        left += shares
    ax.set(xlabel="share of the measured step time (%)", xlim=(0, max(100, left.max())),
           title=f"Where the time goes, {prof['description']}\n{machine}")
    ax.invert_yaxis()
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.28))
    return save(fig, path)
