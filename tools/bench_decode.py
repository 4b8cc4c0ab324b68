"""The benchmark's sections on what the KV cache buys (tools/bench.py runs them), at the
assignment's widths with 2048 positions:

    1. per-step decode latency vs position, naive (recompute the prefix) vs cached
    2. total time for N new tokens, naive vs cached
    5. preallocated KVCache vs a cache that grows by np.concatenate: one append, a whole decode
    6. peak memory of a 2048-token decode beside the kv_cache_bytes formula

Each section measures (returning a dict for bench.json), prints its table and draws its figure.
"""

from __future__ import annotations

import gc
import math
import resource
from pathlib import Path

import numpy as np

from block import GPT
from cache import KVCache, ModelCache, kv_cache_bytes
from generate import decode, generate_cached, generate_naive, greedy, prefill
from tools.bench_setup import NAMES, PROMPT_LEN, Settings, random_ids, save
from tools.measure import fmt, interleave, note, peak_during, summary

# --- 1. per-step latency vs position -------------------------------------------------------------

def latency_vs_position(model: GPT, s: Settings, rng: np.random.Generator) -> dict:
    """At each position p: the naive step runs the model on all p + 1 tokens, the cached step runs
    one token against p cached positions. Both produce the same next-token logits."""
    out = {"positions": [], "naive": [], "cached": [], "max_abs_logit_diff": 0.0,
           "argmax_equal": True}
    for p in s.positions:
        note(f"position {p}")
        ids = random_ids(rng, model.config.vocab_size, p + 1)  # (1, p + 1)
        cache = model.new_cache(1)
        prefill(model, ids[:, :p], cache)
        naive_logits = model(ids, last_only=True)[:, -1]  # (1, V)
        cached_logits = decode(model, ids[:, p], cache)  # (1, V)
        out["max_abs_logit_diff"] = max(out["max_abs_logit_diff"],
                                        float(np.abs(naive_logits - cached_logits).max()))
        out["argmax_equal"] &= bool(np.array_equal(greedy(naive_logits), greedy(cached_logits)))

        def cached_step(cache=cache, ids=ids, p=p):
            cache.truncate(p)  # forget the step just timed, so the same step can run again
            decode(model, ids[:, p], cache)

        times = interleave({"naive": lambda ids=ids: model(ids, last_only=True),
                            "cached": cached_step}, s.sweep_rounds, {"cached": s.cached_inner})
        out["positions"].append(p)
        out["naive"].append(summary(times["naive"]))
        out["cached"].append(summary(times["cached"]))
    return out


# --- 2. total time for N tokens ------------------------------------------------------------------

def total_times(model: GPT, s: Settings, rng: np.random.Generator) -> list[dict]:
    """generate_naive vs generate_cached from the same prompt; they must pick the same tokens."""
    rows = []
    for n_new, rounds in zip(s.total_tokens, s.total_rounds, strict=True):
        note(f"{n_new} new tokens, {rounds} round{'s' * (rounds > 1)}")
        prompt = random_ids(rng, model.config.vocab_size, PROMPT_LEN)
        results = {}

        def run(name, fn, n_new=n_new, prompt=prompt, results=results):
            results[name] = fn(model, prompt, n_new).tokens

        times = interleave({"naive": lambda run=run: run("naive", generate_naive),
                            "cached": lambda run=run: run("cached", generate_cached)}, rounds)
        naive, cached = summary(times["naive"]), summary(times["cached"])
        rows.append({"new_tokens": n_new, "prompt_len": PROMPT_LEN, "naive": naive,
                     "cached": cached, "speedup": naive["median_ms"] / cached["median_ms"],
                     "tokens_equal": bool(np.array_equal(results["naive"], results["cached"]))})
    return rows


# --- 5. preallocated vs concatenating cache ------------------------------------------------------

class ConcatKVCache(KVCache):
    """The cache a first attempt writes: K and V grow by np.concatenate on every append.

    A KVCache in every other way (the same checks, so a ModelCache can hold it), used only to
    show the cost: each append copies every position held so far, so appending at length 2048
    costs 16 times what it costs at 128, and a decode of n tokens copies O(n^2) numbers in total.
    """

    def __init__(self, batch_size: int, n_kv_heads: int, max_len: int, d_head: int,
                 dtype: np.dtype | type = np.float32) -> None:
        self.capacity = max_len
        self.keys = np.zeros((batch_size, n_kv_heads, 0, d_head), dtype)  # (B, H_kv, 0, d_head)
        self.values = np.zeros((batch_size, n_kv_heads, 0, d_head), dtype)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.capacity

    def update(self, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """k, v (B, H_kv, t, d_head) -> keys, values (B, H_kv, length + t, d_head): new arrays."""
        k, v = self.narrowed("k", k), self.narrowed("v", v)
        self.keys = np.concatenate([self.keys, k], axis=2)  # a full copy of everything held
        self.values = np.concatenate([self.values, v], axis=2)
        self.length = self.keys.shape[2]
        return self.keys, self.values

    def truncate(self, length: int) -> None:
        self.keys, self.values = self.keys[:, :, :length], self.values[:, :, :length]
        self.length = length


def concat_cache(model: GPT) -> ModelCache:
    """A ModelCache of ConcatKVCache layers, one per layer of model, batch 1."""
    c = model.config
    return ModelCache([ConcatKVCache(1, c.n_kv_heads, c.max_seq_len, c.d_head, model.dtype)
                       for _ in range(c.n_layers)])


APPEND_BLOCK = 20  # appends timed in a row before the next (cache, length) pair takes over


def append_costs(model: GPT, s: Settings, rng: np.random.Generator) -> dict:
    """Median cost of appending ONE position to a cache already holding L positions (one layer of
    the assignment-widths model). Every (cache, L) pair is timed in blocks of APPEND_BLOCK appends
    in a row, all pairs interleaved, so the lengths are compared at the same moments and one
    cache's big copy does not leave the other's first append cold more at one length than
    another."""
    c, L_max = model.config, max(s.append_lengths)
    shape = (1, c.n_kv_heads, 1, c.d_head)  # one new position: (B, H_kv, 1, d_head)
    k_new = rng.standard_normal(shape).astype(np.float32)
    v_new = rng.standard_normal(shape).astype(np.float32)
    full = rng.standard_normal((1, c.n_kv_heads, L_max, c.d_head)).astype(np.float32)
    kinds = {"preallocated": KVCache, "concatenating": ConcatKVCache}
    variants = {}
    for L in s.append_lengths:
        for name, kind in kinds.items():
            kv = kind(1, c.n_kv_heads, L_max + 1, c.d_head)
            kv.append(full[:, :, :L], full[:, :, :L])

            def append_at(kv=kv, L=L):
                kv.truncate(L)  # for the concatenating cache the next append copies L positions
                kv.append(k_new, v_new)

            variants[f"{name} {L}"] = append_at
    block = min(APPEND_BLOCK, s.append_repeats)
    times = interleave(variants, math.ceil(s.append_repeats / block),
                       dict.fromkeys(variants, block))
    out = {"kv_shape": list(shape), "lengths": list(s.append_lengths)}
    for name in kinds:
        out[name] = [summary(times[f"{name} {L}"]) for L in s.append_lengths]
    first, last = int(np.argmin(out["lengths"])), int(np.argmax(out["lengths"]))
    for name in ("preallocated", "concatenating"):
        out[f"{name}_ratio_longest_over_shortest"] = (out[name][last]["median_ms"]
                                                      / out[name][first]["median_ms"])
    return out


def cache_decode_totals(model: GPT, s: Settings, rng: np.random.Generator) -> dict:
    """The whole greedy decode (prompt 16, then concat_decode_tokens steps) with each cache."""
    prompt = random_ids(rng, model.config.vocab_size, PROMPT_LEN)
    n_new = s.concat_decode_tokens
    tokens = {}

    def run(name, make_cache):
        cache = make_cache()
        token = greedy(prefill(model, prompt, cache))
        out = []
        for _ in range(n_new):
            token = greedy(decode(model, token, cache))
            out.append(int(token[0]))
        tokens[name] = out

    times = interleave({"preallocated": lambda: run("preallocated", lambda: model.new_cache(1)),
                        "concatenating": lambda: run("concatenating", lambda: concat_cache(model))},
                       s.concat_rounds)
    stats = {name: summary(t) for name, t in times.items()}
    return {"new_tokens": n_new, "prompt_len": PROMPT_LEN, **stats,
            "concat_over_prealloc": (stats["concatenating"]["median_ms"]
                                     / stats["preallocated"]["median_ms"]),
            "tokens_equal": tokens["preallocated"] == tokens["concatenating"]}


# --- 6. memory -----------------------------------------------------------------------------------

def decode_memory(model: GPT, s: Settings, rng: np.random.Generator) -> dict:
    """Peak memory of a greedy decode to memory_seq_len positions, measured with tracemalloc
    (NumPy reports its array buffers to it), from just before the cache is allocated."""
    c, n = model.config, s.memory_seq_len
    prompt = random_ids(rng, c.vocab_size, PROMPT_LEN)
    def run() -> ModelCache:
        cache = model.new_cache(1)
        token = greedy(prefill(model, prompt, cache))
        for _ in range(n - PROMPT_LEN):
            token = greedy(decode(model, token, cache))
        return cache

    gc.collect()
    cache, peak = peak_during(run)
    formula = kv_cache_bytes(c.n_layers, 1, c.n_kv_heads, c.d_head, n, model.dtype)
    return {"method": "tracemalloc peak minus baseline (NumPy buffers + Python objects)",
            "seq_len": n, "layers": c.n_layers, "n_kv_heads": c.n_kv_heads, "d_head": c.d_head,
            "dtype": str(model.dtype), "peak_bytes": int(peak), "kv_cache_formula_bytes": formula,
            "cache_nbytes": cache.nbytes, "peak_over_formula": peak / formula,
            "process_ru_maxrss_bytes": 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            "ru_maxrss_note": "whole-process lifetime peak (torch, both models), for scale only"}


# --- printing and plots --------------------------------------------------------------------------

def print_latency(sweep: dict) -> None:
    """Section 1's table."""
    print(f"1. per-step decode latency vs position ({NAMES['assignment']})")
    print(f"{'position':>9} {'naive':>30} {'cached':>30} {'naive/cached':>13}")
    for p, a, b in zip(sweep["positions"], sweep["naive"], sweep["cached"], strict=True):
        print(f"{p:>9} {fmt(a):>30} {fmt(b):>30} {a['median_ms'] / b['median_ms']:>12.1f}x")


def print_totals(rows: list[dict]) -> None:
    """Section 2's table."""
    print(f"\n2. total time, prompt {PROMPT_LEN} ({NAMES['assignment']})")
    print(f"{'new tokens':>10} {'naive':>30} {'cached':>30} {'speed-up':>9}")
    for row in rows:
        print(f"{row['new_tokens']:>10} {fmt(row['naive']):>30} {fmt(row['cached']):>30} "
              f"{row['speedup']:>8.1f}x")


def print_appends(app: dict, cd: dict) -> None:
    """Section 5: one append at each length, then the whole decode with each cache."""
    print(f"\n5. one append of K and V {tuple(app['kv_shape'])} (one layer, "
          f"{NAMES['assignment']})")
    print(f"{'length':>9} {'preallocated':>30} {'concatenating':>30}")
    for L, a, b in zip(app["lengths"], app["preallocated"], app["concatenating"], strict=True):
        print(f"{L:>9} {fmt(a):>30} {fmt(b):>30}")
    print(f"  longest/shortest: preallocated {app['preallocated_ratio_longest_over_shortest']:.2f}"
          f", concatenating {app['concatenating_ratio_longest_over_shortest']:.2f}")
    print(f"  whole decode of {cd['new_tokens']} tokens: preallocated {fmt(cd['preallocated'])}, "
          f"concatenating {fmt(cd['concatenating'])} ({cd['concat_over_prealloc']:.2f}x)")


def print_memory(m: dict) -> None:
    """Section 6's line."""
    print(f"\n6. memory of a {m['seq_len']}-token decode ({m['method']})")
    print(f"  peak {m['peak_bytes'] / 2**20:.2f} MiB; kv_cache_bytes formula "
          f"{m['kv_cache_formula_bytes'] / 2**20:.2f} MiB; peak/formula "
          f"{m['peak_over_formula']:.2f}; whole-process ru_maxrss "
          f"{m['process_ru_maxrss_bytes'] / 2**20:.0f} MiB")


def band(ax: object, x: list, stats: list[dict], label: str, style: str,
         scale: float = 1.0) -> None:
    """Median line with the quartiles shaded (scale 1e3 turns ms into microseconds)."""
    ax.plot(x, [scale * st["median_ms"] for st in stats], style, label=label)
    ax.fill_between(x, [scale * st["q1_ms"] for st in stats],
                    [scale * st["q3_ms"] for st in stats], alpha=0.25)


def plot_latency(sweep: dict, machine: str, path: Path) -> str:
    """Section 1: per-step latency vs position, naive vs cached (log y)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    band(ax, sweep["positions"], sweep["naive"], "naive (recompute the prefix)", "o-")
    band(ax, sweep["positions"], sweep["cached"], "cached (one token + KV cache)", "s-")
    ax.set(yscale="log", xlabel="position (tokens already seen)", ylabel="one decode step (ms)",
           title=f"Decode step latency, {NAMES['assignment']}\n{machine}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return save(fig, path)


def plot_appends(app: dict, machine: str, path: Path) -> str:
    """Section 5: the cost of one append vs the cache's length, preallocated vs concatenating."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, style in (("preallocated", "s-"), ("concatenating", "o-")):
        band(ax, app["lengths"], app[name], name, style, scale=1e3)
    ax.set(xscale="log", yscale="log", xlabel="positions already in the cache",
           ylabel="one append (microseconds)",
           title=f"Cost of appending one position, K and V {tuple(app['kv_shape'])}\n{machine}")
    # Plain numbers on both log axes (set after the scale, which resets the formatters).
    ax.set_xticks(app["lengths"], [str(L) for L in app["lengths"]])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))  # 1 2 5 10 20 ..
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return save(fig, path)

