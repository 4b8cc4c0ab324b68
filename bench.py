"""What the KV cache buys, measured: `python bench.py` (about 5 minutes on 2 idle cores).

Every comparison runs its variants side by side in one loop (A, B, A, B, ... with the order
rotated each round) so a noisy neighbour slows both, and every number is a median of repeats with
its quartiles beside it. Six measurements:

    1. per-step decode latency vs position, naive (recompute the prefix) vs cached
    2. total time for N new tokens, naive vs cached
    3. this repo vs Hugging Face GPT-2 (same weights): cached decode per token, prefill, generate
    4. the weight-streaming floor: one bare (1, D) @ W pass over every weight matrix
    5. preallocated KVCache vs a cache that grows by np.concatenate
    6. peak memory of a 2048-token decode beside the kv_cache_bytes formula

Writes bench.json (--json) and PNG plots (--figures, default figures/):
    bench_decode_latency.png   per-step latency vs position, naive vs cached (log y)
    bench_cache_append.png     cost of one append vs cache length, preallocated vs concatenating
    bench_vs_hf.png            decode per token and prefill: ours, Hugging Face, the floor
`--quick` runs the same measurements at small sizes (a smoke test, ~20-30 s);
`--profile` prints cProfile tables of our cached decode and prefill instead;
`--threads 1` limits BLAS and torch to one thread (on a busy machine two OpenBLAS threads on two
cores wait for each other and medians grow 10-100x).
Every correctness guard (naive == cached tokens, ours == Hugging Face tokens) is printed; the
exit code is 1 if any guard fails.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import math
import os
import platform
import pstats
import resource
import time
import tracemalloc
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from block import GPT
from cache import KVCache, ModelCache, kv_cache_bytes
from checks import SEED, cli_int, cli_output_dir, cli_output_file
from generate import decode, generate_cached, generate_naive, greedy, prefill

# The two model shapes measured. Both are GPT-2 models with random weights built from a local
# config (nothing is downloaded); ours is loaded from the very same state_dict.
SEED_SHAPE = dict(vocab_size=256, n_positions=2048, n_embd=128, n_head=4, n_layer=2)
GPT2_SMALL_SHAPE = dict(vocab_size=512, n_positions=1024, n_embd=768, n_head=12, n_layer=12)
PROMPT_LEN = 16  # the prompt before every decode measurement
QUICK_DIR = "out/quick"  # where --quick writes by default (ignored by git)


@dataclass
class Settings:
    """How much to measure. FULL is the benchmark; QUICK keeps every field at small sizes."""

    positions: tuple[int, ...]  # cache lengths at which one decode step is timed (section 1)
    sweep_rounds: int  # naive steps per position (cached steps get cached_inner times as many)
    cached_inner: int
    total_tokens: tuple[int, ...]  # N of section 2
    total_rounds: tuple[int, ...]  # repeats for each N (naive at N = 1024 takes ~1 min)
    decode_steps: tuple[int, int]  # tokens decoded per round vs Hugging Face: (seed, gpt2-small)
    decode_rounds: tuple[int, int]
    prefill_len: int
    prefill_rounds: int
    append_lengths: tuple[int, ...]
    append_repeats: int
    concat_decode_tokens: int  # new tokens of the whole-decode comparison of the two caches
    concat_rounds: int
    memory_seq_len: int


FULL = Settings(positions=(16, 32, 64, 128, 256, 512, 768, 1024, 1536, 2047), sweep_rounds=5,
                cached_inner=20, total_tokens=(128, 512, 1024), total_rounds=(5, 3, 3),
                decode_steps=(128, 64), decode_rounds=(5, 3), prefill_len=512, prefill_rounds=5,
                append_lengths=(128, 256, 512, 1024, 2048), append_repeats=300,
                concat_decode_tokens=2048 - PROMPT_LEN, concat_rounds=3, memory_seq_len=2048)
QUICK = Settings(positions=(16, 256, 2047), sweep_rounds=2, cached_inner=5,
                 total_tokens=(64, 128), total_rounds=(1, 1), decode_steps=(16, 8),
                 decode_rounds=(2, 2), prefill_len=128, prefill_rounds=2,
                 append_lengths=(128, 2048), append_repeats=50, concat_decode_tokens=256,
                 concat_rounds=1, memory_seq_len=2048)


# --- timing helpers ------------------------------------------------------------------------------

def summary(seconds: list[float]) -> dict:
    """Median and quartiles in milliseconds: the median is the number we report, the quartiles
    show how noisy the machine was."""
    ms = 1e3 * np.asarray(seconds, dtype=np.float64)
    q1, med, q3 = np.percentile(ms, [25, 50, 75])
    return {"median_ms": float(med), "q1_ms": float(q1), "q3_ms": float(q3), "n": int(ms.size)}


def rotated(names: list[str], r: int) -> list[str]:
    """Round r starts with a different variant, so none is always first (warm or cold)."""
    k = r % len(names)
    return names[k:] + names[:k]


def interleave(variants: dict[str, Callable[[], object]], rounds: int,
               inner: dict[str, int] | None = None) -> dict[str, list[float]]:
    """Time each variant `inner[name]` times per round, rounds interleaved: A B A B ...
    Returns every single time (seconds) per variant."""
    inner = inner or {}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds):
        for name in rotated(list(variants), r):
            for _ in range(inner.get(name, 1)):
                t0 = time.perf_counter()
                variants[name]()
                times[name].append(time.perf_counter() - t0)
    return times


@contextmanager
def no_gc():
    """Collect once, then keep the garbage collector out of the timed code (as timeit does)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


# --- the machine ---------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_header() -> dict:
    """CPU, threads, BLAS library and kernel (threadpoolctl), library versions."""
    import threadpoolctl
    import torch
    import transformers

    blas = [p for p in threadpoolctl.threadpool_info() if p.get("user_api") == "blas"]
    blas = blas[0] if blas else {}
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "os_kernel": f"{platform.system()} {platform.release()}",
        "blas_library": blas.get("internal_api", "unknown"),
        "blas_version": blas.get("version"),
        "blas_kernel": blas.get("architecture"),
        "blas_threading_layer": blas.get("threading_layer"),
        "blas_threads": blas.get("num_threads"),
        "torch_threads": torch.get_num_threads(),
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_average_at_start": list(os.getloadavg()),
    }


# --- the models ----------------------------------------------------------------------------------

def build_pair(shape: dict, seed: int):
    """A Hugging Face GPT2LMHeadModel with random weights and our GPT with the same weights."""
    import torch

    from references import hf_gpt2

    hf = hf_gpt2(shape["vocab_size"], shape["n_positions"], shape["n_embd"], shape["n_layer"],
                 shape["n_head"], seed=seed, jitter=0.0, dtype=torch.float32,
                 initializer_range=0.02)  # GPT-2's own scale, as a real checkpoint has
    hf.generation_config.pad_token_id = 0  # a random-weight model has no tokenizer or pad token
    hf.generation_config.eos_token_id = None  # never stop early: both sides make N tokens
    ours = GPT.from_gpt2(hf.state_dict(), dtype=np.float32, hf_config=hf.config)
    return hf, ours


def random_ids(rng: np.random.Generator, vocab: int, length: int) -> np.ndarray:
    return rng.integers(0, vocab, (1, length))  # (B=1, length)


# --- 1. per-step latency vs position -------------------------------------------------------------

def latency_vs_position(model: GPT, s: Settings, rng: np.random.Generator) -> dict:
    """At each position p: the naive step runs the model on all p + 1 tokens, the cached step runs
    one token against p cached positions. Both produce the same next-token logits."""
    out = {"positions": [], "naive": [], "cached": [], "max_abs_logit_diff": 0.0,
           "argmax_equal": True}
    for p in s.positions:
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


# --- 3 and 4. this repo vs Hugging Face, and the weight-streaming floor --------------------------

class OursGreedy:
    """Our cached greedy decode, one token per step() (the prompt is prefilled on creation)."""

    def __init__(self, model: GPT, prompt: np.ndarray) -> None:
        self.model, self.cache = model, model.new_cache(1)
        self.token = greedy(prefill(model, prompt, self.cache))  # (1,)
        self.tokens: list[int] = []

    def step(self) -> None:
        self.token = greedy(decode(self.model, self.token, self.cache))  # (1,) -> (1, V) -> (1,)
        self.tokens.append(int(self.token[0]))


class HFGreedy:
    """The same work with Hugging Face: one token per call, past_key_values carried along.
    Call inside torch.inference_mode()."""

    def __init__(self, hf, prompt: np.ndarray) -> None:
        import torch

        self.hf = hf
        out = hf(input_ids=torch.from_numpy(prompt), use_cache=True)
        self.past, self.token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        self.tokens: list[int] = []

    def step(self) -> None:
        out = self.hf(input_ids=self.token, past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        self.token = out.logits[:, -1].argmax(-1, keepdim=True)  # (1, V) -> (1, 1)
        self.tokens.append(int(self.token[0, 0]))


def weight_matrices(model: GPT) -> list[np.ndarray]:
    """Every matrix one decode step multiplies by, in the order the forward pass reads them."""
    mats = []
    for p in model.blocks:
        a = p.attn
        mats += [a.w_q, a.w_k, a.w_v, a.w_o, p.w_fc, p.w_proj]
    return mats + [model.wte.T]  # the tied LM head, read as the same transposed view


def floor_pass(mats: list[np.ndarray], vectors: dict[int, np.ndarray]) -> None:
    """The least work any decode step can do: one (1, d_in) @ (d_in, d_out) per matrix, so every
    weight is read once. At GPT-2-small shapes the weights do not fit in cache, so this is the
    time to stream them from memory."""
    for w in mats:
        vectors[w.shape[0]] @ w  # (1, d_in) @ (d_in, d_out) -> (1, d_out)


DECODE_BLOCK = 8  # decode steps a side runs in a row before the other side takes over


def decode_side_by_side(model: GPT, hf, prompt: np.ndarray, steps: int, rounds: int) -> dict:
    """Both greedy loops advance side by side: DECODE_BLOCK steps of ours, DECODE_BLOCK of Hugging
    Face, DECODE_BLOCK floor passes, and again, so a busy neighbour slows all three alike while
    each side still runs consecutive steps as a real decode loop does (alternating single steps
    would leave each side's code and data cold). Returns step times and each side's tokens."""
    mats = weight_matrices(model)
    vectors = {w.shape[0]: np.ones((1, w.shape[0]), np.float32) for w in mats}
    times: dict[str, list[float]] = {"ours": [], "hf": [], "floor": []}
    for _ in range(rounds):
        ours, theirs = OursGreedy(model, prompt), HFGreedy(hf, prompt)
        variants = {"ours": ours.step, "hf": theirs.step,
                    "floor": lambda: floor_pass(mats, vectors)}
        block = min(DECODE_BLOCK, steps)
        for who, t in interleave(variants, math.ceil(steps / block),
                                 dict.fromkeys(variants, block)).items():
            times[who] += t
    return {"times": times, "floor_bytes": sum(w.nbytes for w in mats),
            "tokens_equal": ours.tokens == theirs.tokens}


def prefill_side_by_side(model: GPT, hf, prompt: np.ndarray, rounds: int) -> dict:
    """Prefill of a long prompt into an empty cache. Ours computes the LM head for the last
    position only; Hugging Face is asked for the same with logits_to_keep=1."""
    import torch

    prompt_t = torch.from_numpy(prompt)
    hf_last = hf(input_ids=prompt_t, use_cache=True, logits_to_keep=1).logits[:, -1].numpy()
    ours_last = prefill(model, prompt, model.new_cache(1))  # (1, V)
    times = interleave({"ours": lambda: prefill(model, prompt, model.new_cache(1)),
                        "hf": lambda: hf(input_ids=prompt_t, use_cache=True, logits_to_keep=1)},
                       rounds)
    return {"times": times,
            "argmax_equal": bool(np.array_equal(greedy(ours_last), greedy(hf_last))),
            "max_abs_logit_diff": float(np.abs(ours_last - hf_last).max())}


def generate_side_by_side(model: GPT, hf, prompt: np.ndarray, steps: int, rounds: int) -> dict:
    """The whole call a user makes: our generate_cached vs hf.generate (greedy, same prompt)."""
    import torch

    prompt_t = torch.from_numpy(prompt)
    tokens = {}

    def ours():
        tokens["ours"] = generate_cached(model, prompt, steps).tokens  # (1, steps)

    def theirs():
        out = hf.generate(input_ids=prompt_t, attention_mask=torch.ones_like(prompt_t),
                          max_new_tokens=steps, do_sample=False)  # (1, P + steps)
        tokens["hf"] = out[:, prompt.shape[1]:].numpy()

    times = interleave({"ours": ours, "hf": theirs}, rounds)
    return {"times": times, "tokens_equal": bool(np.array_equal(tokens["ours"], tokens["hf"]))}


def ratio(stats: dict, a: str, b: str) -> float:
    return stats[a]["median_ms"] / stats[b]["median_ms"]


def versus_hf(name: str, shape: dict, steps: int, rounds: int, s: Settings, seed: int) -> dict:
    """Cached greedy decode per token (with the weight-streaming floor), prefill, and generate:
    ours vs Hugging Face with the same weights."""
    import torch

    hf, model = build_pair(shape, seed)
    rng = np.random.default_rng(seed)
    prompt = random_ids(rng, shape["vocab_size"], PROMPT_LEN)
    long_prompt = random_ids(rng, shape["vocab_size"], s.prefill_len)
    with torch.inference_mode():
        dec = decode_side_by_side(model, hf, prompt, steps, rounds)
        pre = prefill_side_by_side(model, hf, long_prompt, s.prefill_rounds)
        gen = generate_side_by_side(model, hf, prompt, steps, rounds)
    d, p, g = ({who: summary(t) for who, t in x["times"].items()} for x in (dec, pre, gen))
    return {
        "name": name, "shape": shape, "hf_attention": hf.config._attn_implementation,
        "decode_steps": steps, "rounds": rounds, "decode_per_token": d,
        "decode_ours_over_hf": ratio(d, "ours", "hf"),
        "floor_bytes": dec["floor_bytes"],
        "floor_gb_per_s": dec["floor_bytes"] / d["floor"]["median_ms"] / 1e6,
        "decode_ours_over_floor": ratio(d, "ours", "floor"),
        "prefill_len": s.prefill_len, "prefill": p, "prefill_ours_over_hf": ratio(p, "ours", "hf"),
        "generate": g, "generate_ours_over_hf": ratio(g, "ours", "hf"),
        "decode_tokens_equal": dec["tokens_equal"], "generate_tokens_equal": gen["tokens_equal"],
        "prefill_argmax_equal": pre["argmax_equal"],
        "prefill_max_abs_logit_diff": pre["max_abs_logit_diff"],
    }


# --- 5. preallocated vs concatenating cache ------------------------------------------------------

class ConcatKVCache:
    """The cache a first attempt writes: K and V grow by np.concatenate on every append.

    It has KVCache's methods (so a ModelCache can hold it), and is used only to show the cost:
    each append copies every position held so far, so appending at length 2048 costs 16 times
    what it costs at 128, and a decode of n tokens copies O(n^2) numbers in total.
    """

    def __init__(self, batch_size: int, n_kv_heads: int, max_len: int, d_head: int,
                 dtype: np.dtype | type = np.float32) -> None:
        self.max_len = max_len
        self.keys = np.zeros((batch_size, n_kv_heads, 0, d_head), dtype)  # (B, H_kv, 0, d_head)
        self.values = np.zeros((batch_size, n_kv_heads, 0, d_head), dtype)
        self.batch_size, self.n_kv_heads, self.d_head, self.dtype = (batch_size, n_kv_heads,
                                                                     d_head, np.dtype(dtype))

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def __len__(self) -> int:
        return self.keys.shape[2]

    def append(self, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """k, v (B, H_kv, t, d_head) -> keys, values (B, H_kv, length + t, d_head): new arrays."""
        B, H_kv, _, d_head = self.keys.shape
        for name, x in (("k", k), ("v", v)):
            if not isinstance(x, np.ndarray) or x.ndim != 4 or x.shape[2] < 1 or (
                    x.shape[0], x.shape[1], x.shape[3]) != (B, H_kv, d_head):
                raise ValueError(f"ConcatKVCache.append: {name} must be a (B={B}, H_kv={H_kv}, "
                                 f"t >= 1, d_head={d_head}) array, got {np.shape(x)}")
        if k.shape != v.shape or len(self) + k.shape[2] > self.max_len:
            raise ValueError(f"ConcatKVCache.append: k {k.shape} and v {v.shape} must match and "
                             f"fit after {len(self)} of max_len={self.max_len} positions")
        self.keys = np.concatenate([self.keys, k], axis=2)  # a full copy of everything held
        self.values = np.concatenate([self.values, v], axis=2)
        return self.keys, self.values

    def truncate(self, length: int) -> None:
        self.keys, self.values = self.keys[:, :, :length], self.values[:, :, :length]


def concat_cache(model: GPT) -> ModelCache:
    c = model.config
    return ModelCache([ConcatKVCache(1, c.n_kv_heads, c.max_seq_len, c.d_head, model.dtype)
                       for _ in range(c.n_layers)])


APPEND_BLOCK = 20  # appends timed in a row before the next (cache, length) pair takes over


def append_costs(model: GPT, s: Settings, rng: np.random.Generator) -> dict:
    """Median cost of appending ONE position to a cache already holding L positions (one layer of
    the seed model). Every (cache, L) pair is timed in blocks of APPEND_BLOCK appends in a row,
    all pairs interleaved, so the lengths are compared at the same moments and one cache's big
    copy does not leave the other's first append cold more at one length than another."""
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
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    cache = model.new_cache(1)
    token = greedy(prefill(model, prompt, cache))
    for _ in range(n - PROMPT_LEN):
        token = greedy(decode(model, token, cache))
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    formula = kv_cache_bytes(c.n_layers, 1, c.n_kv_heads, c.d_head, n, model.dtype)
    return {"method": "tracemalloc peak minus baseline (NumPy buffers + Python objects)",
            "seq_len": n, "layers": c.n_layers, "n_kv_heads": c.n_kv_heads, "d_head": c.d_head,
            "dtype": str(model.dtype), "peak_bytes": int(peak), "kv_cache_formula_bytes": formula,
            "cache_nbytes": cache.nbytes, "peak_over_formula": peak / formula,
            "process_ru_maxrss_bytes": 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            "ru_maxrss_note": "whole-process lifetime peak (torch, both models), for scale only"}


# --- targets -------------------------------------------------------------------------------------

def targets(r: dict) -> list[dict]:
    """The performance targets with the value reached (a ratio; `met` says which side of it)."""
    totals = {row["new_tokens"]: row for row in r["total_time"]}
    n = 512 if 512 in totals else max(totals)
    seed, small = r["vs_hf"]["seed"], r["vs_hf"]["gpt2_small"]
    app = r["cache_append"]
    rows = [
        (f"cached speed-up over naive, {n} new tokens, seed config", ">= 30",
         totals[n]["speedup"], totals[n]["speedup"] >= 30),
        ("decode per token ours / HF, seed config", "<= 0.333", seed["decode_ours_over_hf"],
         seed["decode_ours_over_hf"] <= 1 / 3),
        ("decode per token ours / HF, GPT-2-small shapes", "<= 0.5",
         small["decode_ours_over_hf"], small["decode_ours_over_hf"] <= 0.5),
        ("decode per token / weight-streaming floor, GPT-2-small shapes", "<= 1.25",
         small["decode_ours_over_floor"], small["decode_ours_over_floor"] <= 1.25),
        (f"prefill {seed['prefill_len']} ours / HF, seed config", "<= 1.0",
         seed["prefill_ours_over_hf"], seed["prefill_ours_over_hf"] <= 1.0),
        (f"prefill {small['prefill_len']} ours / HF, GPT-2-small shapes", "<= 1.0",
         small["prefill_ours_over_hf"], small["prefill_ours_over_hf"] <= 1.0),
        (f"append cost at {max(app['lengths'])} / at {min(app['lengths'])}, preallocated",
         "<= 1.2", app["preallocated_ratio_longest_over_shortest"],
         app["preallocated_ratio_longest_over_shortest"] <= 1.2),
    ]
    return [{"target": name, "goal": goal, "value": float(value), "met": bool(met)}
            for name, goal, value, met in rows]


def guards(r: dict) -> dict:
    """Every correctness check made during the run; the benchmark is void if one fails."""
    sweep = r["latency_vs_position"]
    g = {"sweep_naive_vs_cached_argmax": sweep["argmax_equal"],
         "sweep_naive_vs_cached_logits_close": sweep["max_abs_logit_diff"] < 1e-3,
         "totals_naive_vs_cached_tokens": all(row["tokens_equal"] for row in r["total_time"]),
         "prealloc_vs_concat_tokens": r["cache_decode"]["tokens_equal"]}
    for name, v in r["vs_hf"].items():
        g[f"{name}_decode_tokens_ours_vs_hf"] = v["decode_tokens_equal"]
        g[f"{name}_generate_tokens_ours_vs_hf"] = v["generate_tokens_equal"]
        g[f"{name}_prefill_argmax_ours_vs_hf"] = v["prefill_argmax_equal"]
        g[f"{name}_prefill_logits_close"] = v["prefill_max_abs_logit_diff"] < 1e-3
    g["all_passed"] = all(g.values())
    return g


# --- printing and plots --------------------------------------------------------------------------

def fmt(st: dict) -> str:
    """'1.234 ms [1.1-1.3]': median and quartiles."""
    return f"{st['median_ms']:9.3f} ms [{st['q1_ms']:.3g}-{st['q3_ms']:.3g}]"


def print_report(r: dict) -> None:
    h = r["header"]
    print(f"CPU: {h['cpu']} ({h['cpu_count']} logical cores, {h['machine']}, {h['os_kernel']})")
    print(f"BLAS: {h['blas_library']} {h['blas_version']} kernel={h['blas_kernel']} "
          f"threads={h['blas_threads']} ({h['blas_threading_layer']}); torch threads="
          f"{h['torch_threads']}; OPENBLAS_CORETYPE={h['openblas_coretype']}")
    print(f"Python {h['python']}, NumPy {h['numpy']}, torch {h['torch']}, transformers "
          f"{h['transformers']}; load average at start {h['load_average_at_start']}")
    print("Times: median [quartiles] of repeats; variants interleaved in one loop.\n")

    sweep = r["latency_vs_position"]
    print("1. per-step decode latency vs position (seed config)")
    print(f"{'position':>9} {'naive':>30} {'cached':>30} {'naive/cached':>13}")
    for p, a, b in zip(sweep["positions"], sweep["naive"], sweep["cached"], strict=True):
        print(f"{p:>9} {fmt(a):>30} {fmt(b):>30} {a['median_ms'] / b['median_ms']:>12.1f}x")

    print(f"\n2. total time, prompt {PROMPT_LEN} (seed config)")
    print(f"{'new tokens':>10} {'naive':>30} {'cached':>30} {'speed-up':>9}")
    for row in r["total_time"]:
        print(f"{row['new_tokens']:>10} {fmt(row['naive']):>30} {fmt(row['cached']):>30} "
              f"{row['speedup']:>8.1f}x")

    print("\n3-4. this repo vs Hugging Face (same weights, float32); the weight-streaming floor")
    for v in r["vs_hf"].values():
        d, sh = v["decode_per_token"], v["shape"]
        print(f"  {v['name']}: {sh['n_layer']} layers, d_model {sh['n_embd']}, "
              f"{sh['n_head']} heads, vocab {sh['vocab_size']} (HF attention: {v['hf_attention']})")
        print(f"    decode/token  ours {fmt(d['ours'])}  HF {fmt(d['hf'])}  "
              f"ours/HF {v['decode_ours_over_hf']:.2f}")
        print(f"    floor (bare matvec over {v['floor_bytes'] / 1e6:.1f} MB) {fmt(d['floor'])} "
              f"= {v['floor_gb_per_s']:.1f} GB/s; decode/floor {v['decode_ours_over_floor']:.2f}")
        print(f"    prefill {v['prefill_len']}  ours {fmt(v['prefill']['ours'])}  "
              f"HF {fmt(v['prefill']['hf'])}  ours/HF {v['prefill_ours_over_hf']:.2f}")
        print(f"    generate {v['decode_steps']} tokens  ours {fmt(v['generate']['ours'])}  "
              f"HF generate() {fmt(v['generate']['hf'])}  ours/HF "
              f"{v['generate_ours_over_hf']:.2f}")

    app, cd = r["cache_append"], r["cache_decode"]
    print(f"\n5. one append of K and V {tuple(app['kv_shape'])} (one layer, seed config)")
    print(f"{'length':>9} {'preallocated':>30} {'concatenating':>30}")
    for L, a, b in zip(app["lengths"], app["preallocated"], app["concatenating"], strict=True):
        print(f"{L:>9} {fmt(a):>30} {fmt(b):>30}")
    print(f"  longest/shortest: preallocated {app['preallocated_ratio_longest_over_shortest']:.2f}"
          f", concatenating {app['concatenating_ratio_longest_over_shortest']:.2f}")
    print(f"  whole decode of {cd['new_tokens']} tokens: preallocated {fmt(cd['preallocated'])}, "
          f"concatenating {fmt(cd['concatenating'])} ({cd['concat_over_prealloc']:.2f}x)")

    m = r["memory"]
    print(f"\n6. memory of a {m['seq_len']}-token decode ({m['method']})")
    print(f"  peak {m['peak_bytes'] / 2**20:.2f} MiB; kv_cache_bytes formula "
          f"{m['kv_cache_formula_bytes'] / 2**20:.2f} MiB; peak/formula "
          f"{m['peak_over_formula']:.2f}; whole-process ru_maxrss "
          f"{m['process_ru_maxrss_bytes'] / 2**20:.0f} MiB")

    print("\nTargets")
    for t in r["targets"]:
        print(f"  [{'met' if t['met'] else 'MISSED':>6}] {t['target']}: {t['value']:.3g} "
              f"(goal {t['goal']})")
    g = r["correctness"]
    bad = [k for k, ok in g.items() if not ok and k != "all_passed"]
    print(f"\nCorrectness guard: {'PASS' if g['all_passed'] else 'FAIL ' + ', '.join(bad)} "
          f"({len(g) - 1} checks: naive == cached, ours == Hugging Face)")


def plot_all(r: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    out_dir.mkdir(parents=True, exist_ok=True)
    machine = f"{r['header']['cpu']}, BLAS threads: {r['header']['blas_threads']}"
    paths = []

    def band(ax, x, stats, label, style, scale=1.0):
        """Median line with the quartiles shaded (scale 1e3 turns ms into microseconds)."""
        ax.plot(x, [scale * st["median_ms"] for st in stats], style, label=label)
        ax.fill_between(x, [scale * st["q1_ms"] for st in stats],
                        [scale * st["q3_ms"] for st in stats], alpha=0.25)

    sweep = r["latency_vs_position"]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    band(ax, sweep["positions"], sweep["naive"], "naive (recompute the prefix)", "o-")
    band(ax, sweep["positions"], sweep["cached"], "cached (one token + KV cache)", "s-")
    ax.set(yscale="log", xlabel="position (tokens already seen)", ylabel="one decode step (ms)",
           title=f"Decode step latency, seed config\n{machine}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    paths.append(save(fig, out_dir / "bench_decode_latency.png"))

    app = r["cache_append"]
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
    paths.append(save(fig, out_dir / "bench_cache_append.png"))

    fig, axes = plt.subplots(1, 2, figsize=(8.0, 3.8))
    labels = list(r["vs_hf"])
    x = np.arange(len(labels))
    for ax, key, title in ((axes[0], "decode_per_token", "decode, ms per token"),
                           (axes[1], "prefill", f"prefill of {r['settings']['prefill_len']} "
                                                "tokens, ms")):
        whos = ["ours", "hf", "floor"] if key == "decode_per_token" else ["ours", "hf"]
        for i, who in enumerate(whos):
            vals = [r["vs_hf"][c][key][who]["median_ms"] for c in labels]
            bars = ax.bar(x + (i - (len(whos) - 1) / 2) * 0.25, vals, 0.25,
                          label={"ours": "this repo", "hf": "Hugging Face",
                                 "floor": "matvec floor"}[who])
            ax.bar_label(bars, [f"{v:.3g}" for v in vals], fontsize=7)
        ax.set(xticks=x, xticklabels=labels, yscale="log", title=title)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Same weights, float32 ({machine})", fontsize=9)
    paths.append(save(fig, out_dir / "bench_vs_hf.png"))
    return paths


def save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return str(path)


# --- profiling -----------------------------------------------------------------------------------

def profile(seed: int, rows: int = 12) -> None:
    """cProfile tables of our cached decode at both shapes and of a 512-token prefill."""
    for name, shape, steps in (("seed", SEED_SHAPE, 400), ("gpt2_small", GPT2_SMALL_SHAPE, 20)):
        _, model = build_pair(shape, seed)
        prompt = random_ids(np.random.default_rng(seed), shape["vocab_size"], PROMPT_LEN)
        long_prompt = random_ids(np.random.default_rng(seed), shape["vocab_size"], 512)
        ours = OursGreedy(model, prompt)
        ours.step()  # warm up

        def decode_steps(ours=ours, steps=steps):
            for _ in range(steps):
                ours.step()

        for what, fn, args in ((f"{steps} decode steps", decode_steps, ()),
                               ("prefill 512", prefill, (model, long_prompt, model.new_cache(1)))):
            print(f"\n=== {name}: {what} ===")
            prof = cProfile.Profile()
            prof.runcall(fn, *args)
            pstats.Stats(prof).sort_stats("tottime").print_stats(rows)


# --- the command ---------------------------------------------------------------------------------

def run(s: Settings, seed: int, threads: int | None = None) -> dict:
    """Every measurement, with BLAS limited to `threads` (None: the library's default)."""
    import threadpoolctl

    with threadpoolctl.threadpool_limits(limits=threads, user_api="blas"):
        return measure_all(s, seed)


def measure_all(s: Settings, seed: int) -> dict:
    import torch

    header = machine_header()
    torch.set_num_threads(header["blas_threads"] or 1)  # both libraries get the same cores
    header["torch_threads"] = torch.get_num_threads()
    rng = np.random.default_rng(seed)
    _, seed_model = build_pair(SEED_SHAPE, seed)
    r = {"header": header, "settings": asdict(s), "section_seconds": {}}
    sections = {
        "latency_vs_position": lambda: latency_vs_position(seed_model, s, rng),
        "total_time": lambda: total_times(seed_model, s, rng),
        "vs_hf": lambda: {
            "seed": versus_hf("seed", SEED_SHAPE, s.decode_steps[0], s.decode_rounds[0], s, seed),
            "gpt2_small": versus_hf("gpt2_small", GPT2_SMALL_SHAPE, s.decode_steps[1],
                                    s.decode_rounds[1], s, seed)},
        "cache_append": lambda: append_costs(seed_model, s, rng),
        "cache_decode": lambda: cache_decode_totals(seed_model, s, rng),
        "memory": lambda: decode_memory(seed_model, s, rng),
    }
    for name, measure in sections.items():
        t0 = time.perf_counter()
        if name == "memory":  # tracemalloc wants the collector on, as in a real run
            r[name] = measure()
        else:
            with no_gc():
                r[name] = measure()
        r["section_seconds"][name] = time.perf_counter() - t0
    r["targets"] = targets(r)
    r["correctness"] = guards(r)
    return r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Naive vs cached decode, this repo vs Hugging Face.")
    ap.add_argument("--quick", action="store_true",
                    help=f"small sizes, under a minute (a smoke test); writes under {QUICK_DIR}/ "
                         "unless --json/--figures say otherwise")
    ap.add_argument("--json", type=cli_output_file(".json"), default=None,
                    help="where to write results (default bench.json)")
    ap.add_argument("--figures", type=cli_output_dir, default=None,
                    help="directory for the PNG plots (default figures)")
    ap.add_argument("--seed", type=SEED, default=0, help="weights and prompts seed (0)")
    ap.add_argument("--threads", type=cli_int(1, 512), default=None,
                    help="BLAS and torch threads (default: the BLAS library's own count); on a "
                         "busy machine 1 avoids threads waiting for each other")
    ap.add_argument("--profile", action="store_true",
                    help="print cProfile tables of our decode and prefill, measure nothing else")
    args = ap.parse_args(argv)
    # A smoke run never overwrites the committed full-run figures.
    default_dir = Path(QUICK_DIR) if args.quick else Path(".")
    args.json = args.json or default_dir / "bench.json"
    args.figures = args.figures or (default_dir if args.quick else Path("figures"))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    if args.profile:
        import threadpoolctl

        with threadpoolctl.threadpool_limits(limits=args.threads, user_api="blas"):
            profile(args.seed)
        return 0

    t0 = time.perf_counter()
    r = run(QUICK if args.quick else FULL, args.seed, args.threads)
    r["settings"]["quick"] = args.quick
    r["figures"] = plot_all(r, args.figures)
    r["wall_time_s"] = time.perf_counter() - t0
    print_report(r)
    args.json.write_text(json.dumps(r, indent=1, default=_jsonable))
    print(f"\nwrote {args.json} and {', '.join(r['figures'])} in {r['wall_time_s']:.0f} s")
    return 0 if r["correctness"]["all_passed"] else 1


def _jsonable(x):
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x)}")


if __name__ == "__main__":
    raise SystemExit(main())
