"""What the KV cache buys, measured: `python tools/bench.py` (about 4 minutes on 2 cores).

Every comparison runs its variants side by side in one loop (A, B, A, B, ... with the order
rotated each round) so a noisy neighbour slows both, and every number is a median of repeats with
its quartiles beside it. Two model shapes, both GPT-2 models with random weights:
    "assignment": the assignment's widths (2 layers, d_model 128, 4 heads) with 2048 positions
                  and vocab 256, so decode can be timed out to position 2047;
    "gpt2_small": GPT-2-small shapes (12 layers, d_model 768, 12 heads, 1024 positions), vocab 512.
Eight measurements:

    1. per-step decode latency vs position, naive (recompute the prefix) vs cached
    2. total time for N new tokens, naive vs cached
    3. this repo vs Hugging Face GPT-2 (same weights): cached decode per token, prefill, generate
    4. the weight-streaming floor: one bare (1, D) @ W pass over every weight matrix
    5. preallocated KVCache vs a cache that grows by np.concatenate
    6. peak memory of a 2048-token decode beside the kv_cache_bytes formula
    7. batched cached decode, B rows at once: tokens per second, ours vs Hugging Face, beside the
       floor's bound (B tokens per pass over the weights)
    8. where the time goes: one decode step and one prefill split into matrix products,
       attention, elementwise ops, cache writes and Python overhead
    9. what each trick buys: the readable path, the engine, and the engine with each switch of
       engine.fast.TRICKS off in turn, on a 512-token prefill and one decode step after it

Writes out/bench/bench.json (--json) and PNG plots (--figures, default out/bench/; make
bench-figures writes the committed figures/):
    bench_decode_latency.png   per-step latency vs position, naive vs cached (log y)
    bench_cache_append.png     cost of one append vs cache length, preallocated vs concatenating
    bench_vs_hf.png            decode per token and prefill: ours, Hugging Face, the floor
    bench_batch.png            decode tokens/s vs batch size: ours, Hugging Face, the floor's bound
    bench_profile.png          section 8 as stacked bars
`--quick` runs the same measurements at small sizes (a smoke test, under a minute) and writes
under out/quick/; `--profile` runs section 8 alone (figure under out/profile/), `--tricks`
section 9 alone (bench.json under out/tricks/);
`--threads 1` limits BLAS and torch to one thread (on a busy machine two OpenBLAS threads on two
cores wait for each other and medians grow 10-100x). The header names the other processes that
held a core at start and end, this process's nice value and its session's autogroup, and how
the machine's CPU time was spent during the run (steal = taken by the hypervisor). With
autogroups on (Linux's default for desktops and this VM), CPU is shared between sessions first,
so nice alone does not put a benchmark ahead of another session's job; on a shared 2-core
machine, as root:
    setsid sh -c 'echo -20 > /proc/$$/autogroup; exec nice -n -10 python tools/bench.py'
keeps other jobs from stalling every multi-threaded call, ours and Hugging Face's alike,
without stopping them.
Every correctness guard (naive == cached tokens, ours == Hugging Face tokens) is printed; the
exit code is 1 if any guard fails.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/x.py` from anywhere: find the repo
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import gc
import json
import math
import resource
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np

from block import GPT, GPTConfig
from cache import KVCache, ModelCache, kv_cache_bytes
from engine import fast as engine
from generate import decode, generate_cached, generate_naive, greedy, prefill
from parts.checks import SEED, cli_int, cli_output_dir, cli_output_file
from tools.cli_types import OUT_DIR
from tools.measure import (
    finish_header,
    fmt,
    interleave,
    machine_label,
    no_gc,
    peak_during,
    print_header,
    ratio,
    start_header,
    summary,
)

# The two model shapes measured. Both are GPT-2 models with random weights built from a local
# config (nothing is downloaded); ours is loaded from the very same state_dict.
ASSIGNMENT_SHAPE = dict(vocab_size=256, n_positions=2048, n_embd=128, n_head=4, n_layer=2)
GPT2_SMALL_SHAPE = dict(vocab_size=512, n_positions=1024, n_embd=768, n_head=12, n_layer=12)
SHAPES = {"assignment": ASSIGNMENT_SHAPE, "gpt2_small": GPT2_SMALL_SHAPE}
NAMES = {"assignment": "assignment widths, 2048 positions, vocab 256",
         "gpt2_small": "GPT-2-small shapes, vocab 512"}
PROMPT_LEN = 16  # the prompt before every decode measurement of sections 1-6
# Default outputs, all under the repository's out/ (ignored by git), from whatever directory the
# command runs: the full run in out/bench/, --quick in out/quick/, a lone section in its own
# folder. Only `make bench-figures` writes the committed figures/, by naming them.
OUT_ROOT = OUT_DIR
QUICK_DIR, PROFILE_DIR, TRICKS_DIR, FULL_DIR = "out/quick", "out/profile", "out/tricks", "out/bench"


@dataclass
class Settings:
    """How much to measure. FULL is the benchmark; QUICK keeps every field at small sizes."""

    positions: tuple[int, ...]  # cache lengths at which one decode step is timed (section 1)
    sweep_rounds: int  # naive steps per position (cached steps get cached_inner times as many)
    cached_inner: int
    total_tokens: tuple[int, ...]  # N of section 2
    total_rounds: tuple[int, ...]  # repeats for each N (naive at N = 1024 takes ~1 min)
    decode_steps: tuple[int, int]  # tokens decoded per round vs HF: (assignment, gpt2_small)
    decode_rounds: tuple[int, int]
    prefill_len: int
    prefill_rounds: int
    append_lengths: tuple[int, ...]
    append_repeats: int
    concat_decode_tokens: int  # new tokens of the whole-decode comparison of the two caches
    concat_rounds: int
    memory_seq_len: int
    batch_sizes: tuple[int, ...]  # section 7, GPT-2-small shapes
    batch_prompt_len: int
    batch_new_tokens: int
    batch_rounds: int
    profile_rounds: int  # section 8: repeats of the whole step and of each part
    tricks_len: int  # section 9: prompt length of the prefill, then one decode step after it
    tricks_rounds: int  # prefills per variant (decode steps: DECODE_BLOCK times as many)


FULL = Settings(positions=(16, 32, 64, 128, 256, 512, 768, 1024, 1536, 2047), sweep_rounds=5,
                cached_inner=20, total_tokens=(128, 512, 1024), total_rounds=(5, 3, 2),
                decode_steps=(128, 64), decode_rounds=(5, 3), prefill_len=512, prefill_rounds=7,
                append_lengths=(128, 256, 512, 1024, 2048), append_repeats=300,
                concat_decode_tokens=2048 - PROMPT_LEN, concat_rounds=3, memory_seq_len=2048,
                batch_sizes=(1, 8, 32), batch_prompt_len=64, batch_new_tokens=64,
                batch_rounds=2, profile_rounds=21, tricks_len=512, tricks_rounds=5)
QUICK = Settings(positions=(16, 256, 2047), sweep_rounds=2, cached_inner=5,
                 total_tokens=(64, 128), total_rounds=(1, 1), decode_steps=(16, 8),
                 decode_rounds=(2, 2), prefill_len=128, prefill_rounds=2,
                 append_lengths=(128, 2048), append_repeats=50, concat_decode_tokens=256,
                 concat_rounds=1, memory_seq_len=2048, batch_sizes=(1, 4), batch_prompt_len=16,
                 batch_new_tokens=8, batch_rounds=1, profile_rounds=3, tricks_len=160,
                 tricks_rounds=1)


# --- the models ----------------------------------------------------------------------------------

def build_pair(shape: dict, seed: int):
    """A Hugging Face GPT2LMHeadModel with random weights and our GPT with the same weights."""
    import torch

    from parts.references import hf_gpt2

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
    """Our cached greedy decode of B prompts at once, one token per row per step() (the (B, P)
    prompt is prefilled on creation)."""

    def __init__(self, model: GPT, prompt: np.ndarray) -> None:
        self.model, self.cache = model, model.new_cache(prompt.shape[0])
        self.token = greedy(prefill(model, prompt, self.cache))  # (B,)
        self.tokens: list[list[int]] = []  # one list of B tokens per step

    def step(self) -> None:
        self.token = greedy(decode(self.model, self.token, self.cache))  # (B,) -> (B, V) -> (B,)
        self.tokens.append(self.token.tolist())


class HFGreedy:
    """The same work with Hugging Face: one token per row per call, past_key_values carried
    along. Call inside torch.inference_mode()."""

    def __init__(self, hf, prompt: np.ndarray) -> None:
        import torch

        self.hf = hf
        out = hf(input_ids=torch.from_numpy(prompt), use_cache=True)
        self.past, self.token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        self.tokens: list[list[int]] = []

    def step(self) -> None:
        out = self.hf(input_ids=self.token, past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        self.token = out.logits[:, -1].argmax(-1, keepdim=True)  # (B, V) -> (B, 1)
        self.tokens.append(self.token[:, 0].tolist())


def weight_matrices(model: GPT) -> list[np.ndarray]:
    """Every matrix one decode step multiplies by, in the order the forward pass reads them:
    W_Q, W_K, W_V as the one side-by-side matrix the engine multiplies by (engine.fuse_qkv)."""
    mats = []
    for p in model.blocks:
        a = p.attn
        fused = model.fast and engine.TRICKS["fused_qkv"]
        mats += [a.w_q.base] if fused else [a.w_q, a.w_k, a.w_v]
        mats += [a.w_o, p.w_fc, p.w_proj]
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
    """Prefill of a (B, P) prompt into an empty cache. Ours computes the LM head for the last
    position only; Hugging Face is asked for the same with logits_to_keep=1. Each side's time
    includes making and dropping its cache, as a user's first call does: ours allocates all
    max_len positions up front (the OS backs a page when it is first written: see
    engine.zeros_in_small_pages for why that page is 4 KB), Hugging Face's grows to the P it
    holds."""
    import torch

    prompt_t = torch.from_numpy(prompt)
    hf_last = hf(input_ids=prompt_t, use_cache=True, logits_to_keep=1).logits[:, -1].numpy()
    B = prompt.shape[0]
    ours_last = prefill(model, prompt, model.new_cache(B))  # (B, V)
    times = interleave({"ours": lambda: prefill(model, prompt, model.new_cache(B)),
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
        "name": name, "description": NAMES[name], "shape": shape,
        "hf_attention": hf.config._attn_implementation,
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

    def _write(self, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """k, v (B, H_kv, t, d_head) -> keys, values (B, H_kv, length + t, d_head): new arrays."""
        self.keys = np.concatenate([self.keys, k], axis=2)  # a full copy of everything held
        self.values = np.concatenate([self.values, v], axis=2)
        self.length = self.keys.shape[2]
        return self.keys, self.values

    def truncate(self, length: int) -> None:
        self.keys, self.values = self.keys[:, :, :length], self.values[:, :, :length]
        self.length = length


def concat_cache(model: GPT) -> ModelCache:
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


# --- 7. batched decode ---------------------------------------------------------------------------

def batched_decode(s: Settings, seed: int) -> dict:
    """B prompts of batch_prompt_len tokens decoded together for batch_new_tokens greedy steps,
    GPT-2-small shapes: our decode vs Hugging Face's, DECODE_BLOCK steps of each in turn with
    DECODE_BLOCK floor passes between (as in section 3). Tokens per second count decode steps
    only; the prefill of the (B, P) prompts is timed apart, also side by side."""
    import torch

    hf, model = build_pair(GPT2_SMALL_SHAPE, seed)
    rng = np.random.default_rng(seed)
    rows = []
    with torch.inference_mode():
        for B in s.batch_sizes:
            prompt = rng.integers(0, GPT2_SMALL_SHAPE["vocab_size"], (B, s.batch_prompt_len))
            dec = decode_side_by_side(model, hf, prompt, s.batch_new_tokens, s.batch_rounds)
            pre = prefill_side_by_side(model, hf, prompt, max(2, s.batch_rounds))
            step = {who: summary(t) for who, t in dec["times"].items()}
            per_s = {who: B / (step[who]["median_ms"] / 1e3) for who in ("ours", "hf")}
            # A decode step must read every weight once, whatever B: at best B tokens per pass.
            per_s["floor_bound"] = B / (step["floor"]["median_ms"] / 1e3)
            rows.append({"batch": B, "step": step, "tokens_per_s": per_s,
                         "ours_over_hf": per_s["ours"] / per_s["hf"],
                         "ours_over_floor_bound": per_s["ours"] / per_s["floor_bound"],
                         "prefill": {who: summary(t) for who, t in pre["times"].items()},
                         "tokens_equal": dec["tokens_equal"],
                         "prefill_argmax_equal": pre["argmax_equal"]})
    return {"name": "gpt2_small", "description": NAMES["gpt2_small"], "shape": GPT2_SMALL_SHAPE,
            "prompt_len": s.batch_prompt_len, "new_tokens": s.batch_new_tokens,
            "rounds": s.batch_rounds, "floor_bytes": sum(w.nbytes for w in weight_matrices(model)),
            "rows": rows}


# --- 8. where the time of one step goes ----------------------------------------------------------

PARTS = ("matrix products", "attention", "elementwise", "cache writes")
OVERHEAD = "Python overhead"  # the measured total minus the parts
REST_LABEL = f"{OVERHEAD}, thread wake-ups (rest)"  # what it holds: see step_breakdown
# The functions the model's forward pass calls for each part, by the names it calls them through.
TRACED = [(engine, "linear", "matrix products"), (engine, "grouped_attention", "attention"),
          (engine, "norm", "elementwise"), (engine, "gelu_in_place", "elementwise"),
          (KVCache, "_write", "cache writes")]


@contextmanager
def traced_calls(calls: list[tuple[str, Callable, tuple]]):
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
        fresh[:] = [tuple(a.copy() for a in args) if fn is engine.gelu_in_place else args
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
                       prepare={name: prepare for name, (prepare, _) in runners.items()})
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
        dec = step_breakdown(model, random_ids(rng, vocab, s.batch_prompt_len), True,
                             s.profile_rounds)
        pre = step_breakdown(model, random_ids(rng, vocab, s.prefill_len), False,
                             max(3, s.profile_rounds // 3))
    return {"name": "gpt2_small", "description": NAMES["gpt2_small"], "parts": [*PARTS, OVERHEAD],
            "decode": dec, "prefill": pre}


# --- 9. what each trick buys ---------------------------------------------------------------------

TRICKS_RTOL = 1e-4  # every variant's float32 logits within this of the readable path's (relative)


@contextmanager
def switched_off(tricks: tuple[str, ...]):
    """engine.TRICKS with `tricks` off inside the block, every switch as it was after it."""
    saved = dict(engine.TRICKS)
    engine.TRICKS.update(dict.fromkeys(tricks, False))
    try:
        yield
    finally:
        engine.TRICKS.update(saved)


def trick_variants(config: GPTConfig, seed: int, tricks: list[str]
                   ) -> dict[str, tuple[GPT, tuple[str, ...]]]:
    """name -> (model, the switches it runs with off): the readable path, the engine, and the
    engine without each of `tricks`. All share one set of random weights. fused_qkv is decided
    when a model is built (GPT(fast=True) stores W_Q | W_K | W_V side by side), so the engine
    without it runs on weights stored apart, as the readable model stores them."""
    readable = GPT(config, seed, fast=False)
    fast = GPT(config, weights=readable.named_weights())
    apart = GPT(config, weights=readable.named_weights(), fast=False)
    apart.fast = True  # W_Q, W_K, W_V stored apart, run by the engine
    variants = {"readable": (readable, ()), "engine": (fast, ())}
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
    times = interleave(timed, rounds, inner)
    out: dict = {"variants": list(variants), "max_rel_logit_diff": diffs}
    for step in ("prefill", "decode"):
        out[step] = {name: summary(times[f"{step} {name}"]) for name in variants}
        out[f"{step}_over_engine"] = {name: ratio(out[step], name, "engine") for name in variants}
    return out


def what_tricks_buy(s: Settings, seed: int) -> dict:
    """Section 9 at GPT-2-small shapes: every switch of engine.TRICKS off in turn (multi-head
    attention, as GPT-2 has), then shared_kv_heads again with grouped-query attention (4 K/V
    heads for 12 query heads), where it has groups to share."""
    sh = GPT2_SMALL_SHAPE
    config = dict(vocab_size=sh["vocab_size"], max_seq_len=sh["n_positions"],
                  d_model=sh["n_embd"], n_heads=sh["n_head"], n_layers=sh["n_layer"])
    prompt = random_ids(np.random.default_rng(seed), sh["vocab_size"], s.tricks_len)
    mha = trick_variants(GPTConfig(**config), seed, list(engine.TRICKS))
    with no_gc():
        out = {"description": NAMES["gpt2_small"], "prompt_len": s.tricks_len,
               "rounds": s.tricks_rounds, "decode_block": DECODE_BLOCK,
               "n_heads": sh["n_head"], "tricks": list(engine.TRICKS),
               "mha": trick_timings(mha, prompt, s.tricks_rounds)}
    del mha  # three models of 341 MB: gone before the next three are built
    H_kv = sh["n_head"] // 3  # 4 K/V heads at GPT-2-small's 12 heads
    gqa = trick_variants(GPTConfig(**config, n_kv_heads=H_kv), seed, ["shared_kv_heads"])
    with no_gc():
        out["gqa"] = trick_timings(gqa, prompt, s.tricks_rounds) | {"n_kv_heads": H_kv}
    return out


# --- targets -------------------------------------------------------------------------------------

def targets(r: dict) -> list[dict]:
    """The performance targets with the value reached (a ratio; `met` says which side of it)."""
    totals = {row["new_tokens"]: row for row in r["total_time"]}
    n = 512 if 512 in totals else max(totals)
    small, gpt2 = r["vs_hf"]["assignment"], r["vs_hf"]["gpt2_small"]
    app = r["cache_append"]
    rows = [
        (f"cached speed-up over naive, {n} new tokens, {NAMES['assignment']}", ">=", 30,
         totals[n]["speedup"]),
        (f"decode per token ours / HF, {NAMES['assignment']}", "<=", 1 / 3,
         small["decode_ours_over_hf"]),
        (f"decode per token ours / HF, {NAMES['gpt2_small']}", "<=", 0.5,
         gpt2["decode_ours_over_hf"]),
        (f"decode per token (B=1) / weight-streaming floor, {NAMES['gpt2_small']}", "<=", 1.10,
         gpt2["decode_ours_over_floor"]),
        (f"prefill {small['prefill_len']} ours / HF, {NAMES['assignment']}", "<=", 1.0,
         small["prefill_ours_over_hf"]),
        (f"prefill {gpt2['prefill_len']} ours / HF, {NAMES['gpt2_small']}", "<=", 0.9,
         gpt2["prefill_ours_over_hf"]),
        (f"append cost at {max(app['lengths'])} / at {min(app['lengths'])}, preallocated",
         "<=", 1.2, app["preallocated_ratio_longest_over_shortest"]),
    ]
    for row in r["batched_decode"]["rows"]:
        rows.append((f"batched decode tokens/s ours / HF, B={row['batch']}, "
                     f"{NAMES['gpt2_small']}", ">=", 1.5, row["ours_over_hf"]))
    return [{"target": name, "goal": f"{op} {goal:.3g}", "value": float(value),
             "met": bool(value >= goal if op == ">=" else value <= goal)}
            for name, op, goal, value in rows]


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
    for row in r["batched_decode"]["rows"]:
        g[f"batch_{row['batch']}_decode_tokens_ours_vs_hf"] = row["tokens_equal"]
        g[f"batch_{row['batch']}_prefill_argmax_ours_vs_hf"] = row["prefill_argmax_equal"]
    g["all_passed"] = all(g.values())
    return g


# --- printing and plots --------------------------------------------------------------------------

def print_report(r: dict) -> None:
    print_header(r["header"])
    sweep = r["latency_vs_position"]
    print(f"1. per-step decode latency vs position ({NAMES['assignment']})")
    print(f"{'position':>9} {'naive':>30} {'cached':>30} {'naive/cached':>13}")
    for p, a, b in zip(sweep["positions"], sweep["naive"], sweep["cached"], strict=True):
        print(f"{p:>9} {fmt(a):>30} {fmt(b):>30} {a['median_ms'] / b['median_ms']:>12.1f}x")

    print(f"\n2. total time, prompt {PROMPT_LEN} ({NAMES['assignment']})")
    print(f"{'new tokens':>10} {'naive':>30} {'cached':>30} {'speed-up':>9}")
    for row in r["total_time"]:
        print(f"{row['new_tokens']:>10} {fmt(row['naive']):>30} {fmt(row['cached']):>30} "
              f"{row['speedup']:>8.1f}x")

    print("\n3-4. this repo vs Hugging Face (same weights, float32); the weight-streaming floor")
    for v in r["vs_hf"].values():
        d, sh = v["decode_per_token"], v["shape"]
        print(f"  {v['description']}: {sh['n_layer']} layers, d_model {sh['n_embd']}, "
              f"{sh['n_head']} heads, {sh['n_positions']} positions (HF attention: "
              f"{v['hf_attention']}); prompt {PROMPT_LEN}")
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
    print(f"\n5. one append of K and V {tuple(app['kv_shape'])} (one layer, "
          f"{NAMES['assignment']})")
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

    print_batched(r["batched_decode"])
    print_profile(r["profile"], "8. ")
    print_tricks(r["tricks"], "9. ")

    print("\nTargets")
    for t in r["targets"]:
        print(f"  [{'met' if t['met'] else 'MISSED':>6}] {t['target']}: {t['value']:.3g} "
              f"(goal {t['goal']})")
    g = r["correctness"]
    bad = [k for k, ok in g.items() if not ok and k != "all_passed"]
    print(f"\nCorrectness guard: {'PASS' if g['all_passed'] else 'FAIL ' + ', '.join(bad)} "
          f"({len(g) - 1} checks: naive == cached, ours == Hugging Face)")


def print_batched(b: dict) -> None:
    print(f"\n7. batched cached decode, {b['description']}: prompt {b['prompt_len']}, "
          f"{b['new_tokens']} new tokens per row; decode steps only (prefill below)")
    print(f"{'B':>4} {'ours step':>27} {'HF step':>27} {'ours tok/s':>11} {'HF tok/s':>9} "
          f"{'ours/HF':>8} {'floor bound':>12} {'ours/bound':>11}")
    for row in b["rows"]:
        t, st = row["tokens_per_s"], row["step"]
        print(f"{row['batch']:>4} {fmt(st['ours']):>27} {fmt(st['hf']):>27} {t['ours']:>11.0f} "
              f"{t['hf']:>9.0f} {row['ours_over_hf']:>8.2f} {t['floor_bound']:>12.0f} "
              f"{row['ours_over_floor_bound']:>11.2f}")
    print(f"  floor bound = B tokens per bare pass over the {b['floor_bytes'] / 1e6:.0f} MB of "
          "weights, measured in the same loop")
    for row in b["rows"]:
        p = row["prefill"]
        print(f"  prefill (B={row['batch']}, {b['prompt_len']})  ours {fmt(p['ours'])}  "
              f"HF {fmt(p['hf'])}  ours/HF {ratio(p, 'ours', 'hf'):.2f}")


def print_profile(prof: dict, number: str = "") -> None:
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
    P = t["prompt_len"]
    print(f"\n{number}what each trick buys, {t['description']}: prefill of {P} tokens into a "
          f"cache, then one decode step (B=1) at position {P}")
    print("  off/engine = time with that one trick off / time of the engine with all of them "
          "(above 1: the trick saves time); readable/engine on the readable row")
    H, H_kv = t["n_heads"], t["gqa"]["n_kv_heads"]
    for key, title in (("mha", f"{H} heads, each with its own K and V (GPT-2)"),
                       ("gqa", f"grouped-query attention, {H_kv} K/V heads shared by the {H} "
                               "query heads")):
        x = t[key]
        print(f"  {title}")
        print(f"  {'variant':<28} {'prefill ' + str(P):>27} {'off/engine':>10} "
              f"{'decode step':>27} {'off/engine':>10}")
        for name in x["variants"]:
            label = {"readable": "readable (fast=False)", "engine": "engine (all tricks)"}.get(
                name, name)
            print(f"  {label:<28} {fmt(x['prefill'][name]):>27} "
                  f"{x['prefill_over_engine'][name]:>10.2f} {fmt(x['decode'][name]):>27} "
                  f"{x['decode_over_engine'][name]:>10.2f}")
    worst = max(max(t[k]["max_rel_logit_diff"].values()) for k in ("mha", "gqa"))
    print(f"  every variant's logits within {worst:.1e} (relative) of the readable path's "
          f"(checked before timing, limit {TRICKS_RTOL:g})")


def plot_all(r: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    out_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_label(r["header"])
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
           title=f"Decode step latency, {NAMES['assignment']}\n{machine}")
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
        ax.set(xticks=x, xticklabels=[SHORT[c] for c in labels], yscale="log", title=title)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Same weights, float32 ({machine})", fontsize=9)
    paths.append(save(fig, out_dir / "bench_vs_hf.png"))
    paths.append(plot_batch(r["batched_decode"], machine, out_dir / "bench_batch.png"))
    paths.append(plot_profile(r["profile"], machine, out_dir / "bench_profile.png"))
    return paths


SHORT = {"assignment": "assignment widths", "gpt2_small": "GPT-2-small shapes"}


def plot_batch(b: dict, machine: str, path: Path) -> str:
    """Decode tokens/s vs B: ours and Hugging Face, and the floor's bound B / (one bare pass)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    B = [row["batch"] for row in b["rows"]]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for who, label, style in (("ours", "this repo", "o-"), ("hf", "Hugging Face", "s-"),
                              ("floor_bound", "floor's bound: B tokens per pass over the "
                                              "weights", "k--")):
        ax.plot(B, [row["tokens_per_s"][who] for row in b["rows"]], style, label=label)
    for row in b["rows"]:
        ax.annotate(f"{row['ours_over_hf']:.2f}x HF", (row["batch"], row["tokens_per_s"]["ours"]),
                    textcoords="offset points", xytext=(5, -13), ha="left", fontsize=8)
    ax.set(xscale="log", yscale="log", xlabel="batch size B (rows decoded together)",
           ylabel="decode tokens per second (all rows)",
           title=f"Batched cached decode, {b['description']}\nprompt {b['prompt_len']}, "
                 f"{b['new_tokens']} new tokens per row; {machine}")
    ax.set_xticks(B, [str(x) for x in B])
    ax.set_xlim(min(B) / 1.5, max(B) * 2.5)  # room for the last label
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, path)


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


def save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return str(path)


# --- the command ---------------------------------------------------------------------------------

def run(s: Settings, seed: int, threads: int | None = None) -> dict:
    """Every measurement, with BLAS limited to `threads` (None: the library's default)."""
    import threadpoolctl

    with threadpoolctl.threadpool_limits(limits=threads, user_api="blas"):
        return measure_all(s, seed)


def measure_all(s: Settings, seed: int) -> dict:
    header = start_header()
    rng = np.random.default_rng(seed)
    _, small_model = build_pair(ASSIGNMENT_SHAPE, seed)  # the assignment's widths
    r = {"header": header, "settings": asdict(s), "section_seconds": {}}
    sections = {
        "latency_vs_position": lambda: latency_vs_position(small_model, s, rng),
        "total_time": lambda: total_times(small_model, s, rng),
        "vs_hf": lambda: {name: versus_hf(name, SHAPES[name], steps, rounds, s, seed)
                          for name, steps, rounds in zip(SHAPES, s.decode_steps, s.decode_rounds,
                                                         strict=True)},
        "cache_append": lambda: append_costs(small_model, s, rng),
        "cache_decode": lambda: cache_decode_totals(small_model, s, rng),
        "memory": lambda: decode_memory(small_model, s, rng),
        "batched_decode": lambda: batched_decode(s, seed),
        "profile": lambda: profile(s, seed),
        "tricks": lambda: what_tricks_buy(s, seed),
    }
    for name, measure in sections.items():
        t0 = time.perf_counter()
        if name == "memory":  # tracemalloc wants the collector on, as in a real run
            r[name] = measure()
        else:
            with no_gc():
                r[name] = measure()
        r["section_seconds"][name] = time.perf_counter() - t0
    finish_header(header)
    r["targets"] = targets(r)
    r["correctness"] = guards(r)
    return r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Naive vs cached decode, this repo vs Hugging Face.")
    ap.add_argument("--quick", action="store_true",
                    help=f"small sizes, under a minute (a smoke test); writes under {QUICK_DIR}/ "
                         "unless --json/--figures say otherwise")
    ap.add_argument("--json", type=cli_output_file(".json"), default=None,
                    help=f"where to write results (default {FULL_DIR}/bench.json)")
    ap.add_argument("--figures", type=cli_output_dir, default=None,
                    help=f"directory for the PNG plots (default {FULL_DIR}/; make bench-figures "
                         "writes figures/)")
    ap.add_argument("--seed", type=SEED, default=0, help="weights and prompts seed (0)")
    ap.add_argument("--threads", type=cli_int(1, 512), default=None,
                    help="BLAS and torch threads (default: the BLAS library's own count); on a "
                         "busy machine 1 avoids threads waiting for each other")
    ap.add_argument("--profile", action="store_true",
                    help="section 8 alone: one decode step and one prefill split into parts "
                         f"(figure under {PROFILE_DIR}/ unless --figures says otherwise)")
    ap.add_argument("--tricks", action="store_true",
                    help="section 9 alone: the engine with each trick off in turn, beside the "
                         f"readable path (bench.json under {TRICKS_DIR}/ unless --json says "
                         "otherwise)")
    args = ap.parse_args(argv)
    # A smoke run or a lone section never overwrites the committed full-run figures.
    folder = (QUICK_DIR if args.quick else PROFILE_DIR if args.profile else TRICKS_DIR
              if args.tricks else FULL_DIR)
    default_dir = OUT_ROOT.parent / folder  # the repository's out/...
    args.json = args.json or default_dir / "bench.json"
    args.figures = args.figures or default_dir
    args.json.parent.mkdir(parents=True, exist_ok=True)
    if args.profile or args.tricks:
        return sections_only(QUICK if args.quick else FULL, args)

    t0 = time.perf_counter()
    r = run(QUICK if args.quick else FULL, args.seed, args.threads)
    r["settings"]["quick"] = args.quick
    r["figures"] = plot_all(r, args.figures)
    r["wall_time_s"] = time.perf_counter() - t0
    print_report(r)
    args.json.write_text(json.dumps(r, indent=1, default=_jsonable))
    print(f"\nwrote {args.json} and {', '.join(r['figures'])} in {r['wall_time_s']:.0f} s")
    return 0 if r["correctness"]["all_passed"] else 1


def sections_only(s: Settings, args: argparse.Namespace) -> int:
    """--profile and/or --tricks: the machine header and those sections, printed and written as
    JSON; the profile also plotted."""
    import threadpoolctl

    with threadpoolctl.threadpool_limits(limits=args.threads, user_api="blas"):
        header = start_header()
        r = {"header": header, "settings": asdict(s)}
        if args.profile:
            r["profile"] = profile(s, args.seed)
        if args.tricks:
            r["tricks"] = what_tricks_buy(s, args.seed)
        finish_header(header)
    print_header(header)
    if args.profile:
        print_profile(r["profile"])
    if args.tricks:
        print_tricks(r["tricks"])
    r["figures"] = [plot_profile(r["profile"], machine_label(header),
                                 args.figures / "bench_profile.png")] if args.profile else []
    args.json.write_text(json.dumps(r, indent=1, default=_jsonable))
    print(f"\nwrote {', '.join([str(args.json), *r['figures']])}")
    return 0


def _jsonable(x):
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x)}")


if __name__ == "__main__":
    raise SystemExit(main())
