"""Verification harness: every check the assignment asks for, each against an outside reference.

    python verify.py                  one line per check: what it proves, error, tolerance, verdict
    python verify.py --verbose        also the matrices, shape tables and tensors behind each check
    python verify.py --only 2 5       just those checks
    python verify.py --failure-modes  inject each classic bug, show which checks catch it and how

Every check compares against something the code under test did not produce: PyTorch
(nn.MultiheadAttention, F.scaled_dot_product_attention), Hugging Face GPT-2, a hand-worked softmax,
or a property a bug would break (causality under perturbation, cached == recomputed). float64 runs
with tight tolerances prove the algebra is exact; float32 notes show what a user actually sees.

    1 mask             toy scores: future weight exactly 0, rows sum to 1, hand-worked softmax
    2 shape trace      every tensor from ids to logits, prefill and one cached decode step
    3 cache == naive   cached greedy decode == recomputing the prefix; cache grows +1 per step
    4 nn.MHA parity    multi-head layer == torch.nn.MultiheadAttention, full and decode step
    5 F.sdpa parity    bottom-right mask == torch with t_q < t_k; is_causal=True shown wrong
    6 block exercise   causal_self_attention_block == the exercise written in torch
    7 GPT-2 parity     from_gpt2 logits and greedy tokens == Hugging Face GPT2LMHeadModel
    8 causality        changing future tokens leaves past logits untouched
    9 chunked prefill  chunks of 5, 1, 3 through the cache == one full forward
   10 batch invariance a left-padded row decodes exactly as its prompt alone
   11 HF padded batch  left-padded batch == hf.generate with attention_mask
   12 fast == readable the fast path (fast/model.py) == the code above, over MHA, GQA, MQA,
                      RoPE, padding, chunked prefill, float64 and float32
   13 flash == readable online-softmax attention (beyond/flash.py) == the five steps, exactly
   14 window == naive  a rolling buffer (beyond/window.py) == the band-masked full forward
   15 speculative      draft + verify (beyond/speculative.py) == cached greedy decoding
   16 int8 cache       int8 K/V (beyond/int8.py) within a proved attention bound, stated logits
   17 latent (MLA)     absorbed latent decode (beyond/latent.py) == the explicit naive path
   18 serving == alone continuous batching over a paged cache (beyond/serving.py) == every
                      request decoded alone, through preemption and a cancel

Every model here is the readable GPT, the code a learner reads; check 12 proves the fast path
(fast/model.py's FastGPT), which the benchmarks use, computes the same numbers.

The checks look up every function through its module (attention.causal_mask, not a local copy),
so the failure-mode gallery can swap in a broken version for one run and the checks see it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import math
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

import attention
import block
import cache
import generate
from beyond import int8, latent, paged, serving, window
from beyond.flash import flash_attention
from beyond.speculative import generate_speculative
from parts import rope
from parts.checks import refuse_unused
from tools import references as ref
from tools.measure import Progress

HERE = Path(__file__).resolve().parent
WIDTH = 80

# The assignment's suggested config: d_model 128, 4 heads of 32, max_seq_len 128, batch 2.
# init_std 0.2 (not GPT-2's 0.02) so greedy decoding does not collapse onto one repeated token.
ASSIGNMENT_CONFIG = block.GPTConfig(d_model=128, n_heads=4, max_seq_len=128, n_layers=2,
                                    init_std=0.2)
ROPE_GQA_CONFIG = block.GPTConfig(d_model=128, n_heads=4, n_kv_heads=2, rope=True, n_layers=2,
                                  init_std=0.2)
BATCH = 2


# --- results -------------------------------------------------------------------------------------

@dataclass
class Measure:
    """One comparison inside a check: an error and the tolerance it must not exceed."""

    what: str
    error: float
    tol: float

    @property
    def ok(self) -> bool:
        return bool(self.error <= self.tol)  # NaN compares False, so NaN fails


class Evidence(NamedTuple):
    """What a check function returns: its measures, an always-shown note, the --verbose text."""

    measures: list[Measure]
    note: str = ""
    shown: str = ""


@dataclass
class Result:
    """One line of the report. error/tol are the headline measure: the first failing one, else
    the check's primary (first) measure."""

    number: int
    name: str
    proves: str
    error: float
    tol: float
    passed: bool
    detail: str
    note: str = ""
    shown: str = ""

    @property
    def status(self) -> str:
        return "PASS" if self.passed else "FAIL"


class ShapeError(AssertionError):
    """A traced tensor did not have the shape the shape story says it must."""


CHECKS: dict[int, Callable[[], Result]] = {}


def check(number: int, name: str, proves: str) -> Callable:
    """Register a check. The wrapped function returns a Result; a crash is a failed check whose
    detail is the exception, which is exactly what a learner's bug usually looks like."""

    def register(fn: Callable[[], Evidence]) -> Callable[[], Result]:
        @functools.wraps(fn)
        def run() -> Result:
            try:
                ev = fn()
            except AssertionError as e:
                return Result(number, name, proves, math.nan, math.nan, False, str(e))
            except Exception as e:  # noqa: BLE001 (any crash under a bug is the symptom we show)
                return Result(number, name, proves, math.nan, math.nan, False,
                              f"crashed: {type(e).__name__}: {_one_line(str(e))}")
            failing = [m for m in ev.measures if not m.ok]
            head = failing[0] if failing else ev.measures[0]
            detail = f"{head.what}: {head.error:.2g} (tol {fmt_tol(head.tol)})"
            return Result(number, name, proves, head.error, head.tol, not failing, detail,
                          ev.note, ev.shown)

        CHECKS[number] = run
        return run

    return register


def fmt_tol(tol: float) -> str:
    return "0" if tol == 0 else f"{tol:.0e}"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def max_abs(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    a, b = ref.n(a), ref.n(b)
    if a.shape != b.shape:
        raise ShapeError(f"compared shapes differ: {a.shape} vs {b.shape}")
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def max_rel(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """max |a - b| / max |b|: the float32 yardstick (rounding scales with the values)."""
    return max_abs(a, b) / float(np.max(np.abs(ref.n(b))))


def fmt_matrix(m: np.ndarray, fmt: str = "{:6.2f}", indent: int = 6) -> str:
    """A small 2-D array as aligned text rows."""
    rows = [" ".join(fmt.format(v) for v in row) for row in np.atleast_2d(m)]
    return "\n".join(" " * indent + r for r in rows)


def random_ids(shape: tuple[int, ...], seed: int, vocab: int = ASSIGNMENT_CONFIG.vocab_size
               ) -> np.ndarray:
    return ref.random_ids(shape, seed, vocab)


# --- check 1: the mask ---------------------------------------------------------------------------

# The README's 4x4 example (prefill), and 2 new tokens after 3 cached (a chunk or decode step).
TOY_SCORES = np.array([[2, 1, 0, 3], [1, 3, 2, 0], [0, 1, 2, 1], [3, 0, 1, 2]], dtype=float)
TOY_CHUNK_SCORES = np.array([[1, 0, 2, 1, 3], [0, 2, 1, 3, 1]], dtype=float)


@check(1, "mask", "future gets p = 0; rows sum to 1")
def check_mask() -> Evidence:
    """Toy score matrices, a square one (prefill) and a 2 x 5 one (2 new tokens after 3 cached),
    pushed through attention.causal_mask and attention.scaled_dot_product_attention.
    q = scores * sqrt(d) and k = I make q k^T / sqrt(d) equal the toy scores; v = I makes the
    output equal the weights."""
    future_w, row_err, ref_err, mask_wrong = 0.0, 0.0, 0.0, 0
    shown = []
    for scores in (TOY_SCORES, TOY_CHUNK_SCORES):
        t_q, t_k = scores.shape
        mask = attention.causal_mask(t_q, t_k)
        q, k, v = scores * math.sqrt(t_k), np.eye(t_k), np.eye(t_k)
        out, weights = attention.scaled_dot_product_attention(q, k, v, mask)
        allowed = ref.rule_mask(t_q, t_k)
        mask_wrong += int(np.sum(mask != allowed)) if mask.shape == allowed.shape else mask.size
        future_w = max(future_w, float(np.max(np.where(allowed, 0.0, weights))))
        row_err = max(row_err, float(np.max(np.abs(weights.sum(-1) - 1.0))))
        ref_err = max(ref_err, max_abs(weights, ref.masked_softmax_by_hand(scores, allowed)),
                      max_abs(out, weights))
        wrong = attention.softmax(scores) * mask  # for the printout: what masking late gives
        shown.append(f"    t_q={t_q}, t_k={t_k} (queries are the last {t_q} positions)\n"
                     f"    scores:\n{fmt_matrix(scores)}\n"
                     f"    mask (1 = may attend):\n{fmt_matrix(mask, '{:6d}')}\n"
                     f"    masked scores (future -> -inf):\n"
                     f"{fmt_matrix(np.where(mask, scores, -np.inf))}\n"
                     f"    weights after softmax (rows sum to 1, future exactly 0):\n"
                     f"{fmt_matrix(weights, '{:6.3f}')}\n"
                     f"    the wrong order, softmax then zero the future:\n"
                     f"{fmt_matrix(wrong, '{:6.3f}')}\n"
                     f"    (rows sum to {', '.join(f'{r:.3f}' for r in wrong.sum(-1))})")
    measures = [Measure("largest weight on a future key", future_w, 0.0),
                Measure("largest |row sum - 1|", row_err, 1e-12),
                Measure("weights vs hand-worked masked softmax", ref_err, 1e-12),
                Measure("mask cells off the rule j <= t_k - t_q + i", mask_wrong, 0)]
    return Evidence(measures, shown="\n".join(shown))


# --- check 2: the shape trace --------------------------------------------------------------------

class ShapeTrace:
    """Records (tensor, shape) rows of one walk and asserts each shape as it goes."""

    def __init__(self) -> None:
        self.rows: dict[str, tuple[int, ...]] = {}
        self.asserted = 0

    def __call__(self, name: str, x: np.ndarray, expected: tuple[int, ...]) -> np.ndarray:
        if x.shape != expected:
            raise ShapeError(f"{name} is {x.shape}, expected {expected}")
        self.asserted += 1
        self.rows.setdefault(name, x.shape)  # the first block's rows stand for every block
        return x


def walk(model: block.GPT, ids: np.ndarray, kvs: list[cache.KVCache], expect: ShapeTrace
         ) -> np.ndarray:
    """Token ids (B, T) -> logits (B, T, V) by hand, one public function at a time, appending
    each layer's K/V to its KVCache. The T tokens follow the positions cached, so the same walk
    is prefill (empty caches) and a decode step (T = 1). No padding: positions are the cache
    length onwards."""
    c = model.config
    B, T = ids.shape
    past = len(kvs[0])
    t_k, D, H, dh = past + T, c.d_model, c.n_heads, c.d_head
    pos = np.arange(past, t_k)  # positions come from the cache length
    x = expect("x = wte[ids] + wpe[pos]", model.wte[ids] + model.wpe[pos], (B, T, D))
    mask = expect("causal mask", attention.causal_mask(T, t_k), (T, t_k))
    for layer, p in enumerate(model.blocks):
        a = p.attn
        h = expect("ln_1(x)", attention.layer_norm(x, *p.ln_1, c.ln_eps), (B, T, D))
        q = expect("Q = h @ W_q + b_q", h @ a.w_q + a.b_q, (B, T, D))
        k = expect("K = h @ W_k + b_k", h @ a.w_k + a.b_k, (B, T, D))
        v = expect("V = h @ W_v + b_v", h @ a.w_v + a.b_v, (B, T, D))
        q = expect("Q split_heads", attention.split_heads(q, H), (B, H, T, dh))
        k = expect("K split_heads", attention.split_heads(k, H), (B, H, T, dh))
        v = expect("V split_heads", attention.split_heads(v, H), (B, H, T, dh))
        k_all, v_all = kvs[layer].append(k, v)
        expect("cache K (after append)", k_all, (B, H, t_k, dh))
        expect("cache V (after append)", v_all, (B, H, t_k, dh))
        expect("scores Q K^T / sqrt(d_head)", q @ k_all.swapaxes(-1, -2) / math.sqrt(dh),
               (B, H, T, t_k))
        out, weights = attention.scaled_dot_product_attention(q, k_all, v_all, mask)
        expect("softmax weights", weights, (B, H, T, t_k))
        expect("per-head out = weights @ V", out, (B, H, T, dh))
        merged = expect("merge_heads", attention.merge_heads(out), (B, T, D))
        proj = expect("out proj merged @ W_o + b_o", merged @ a.w_o + a.b_o, (B, T, D))
        x = expect("residual x + attn", x + proj, (B, T, D))
        h = expect("ln_2(x)", attention.layer_norm(x, *p.ln_2, c.ln_eps), (B, T, D))
        expect("FFN hidden gelu(h @ W_fc)", block.gelu(h @ p.w_fc + p.b_fc), (B, T, c.d_ff))
        x = expect("residual x + mlp(h)", x + block.mlp(h, p), (B, T, D))
    x = expect("ln_f(x)", attention.layer_norm(x, *model.ln_f, c.ln_eps), (B, T, D))
    return expect("logits = ln_f(x) @ wte.T", x @ model.wte.T, (B, T, c.vocab_size))


@check(2, "shape trace", "every shape, prefill + decode step")
def check_shape_trace() -> Evidence:
    """Walk the assignment's config by hand for a prefill of T tokens and one cached decode
    step, assert every shape, and require the walked logits to equal the model's own, so the
    trace provably follows the real code path."""
    model = ref.random_model(ASSIGNMENT_CONFIG)
    T = 8
    ids = random_ids((BATCH, T + 1), seed=2)
    prompt, new = ids[:, :T], ids[:, T:]
    c = ASSIGNMENT_CONFIG
    kvs = [cache.KVCache(BATCH, c.n_kv_heads, c.max_seq_len, c.d_head, model.dtype)
           for _ in range(c.n_layers)]
    prefill_trace, decode_trace = ShapeTrace(), ShapeTrace()
    walked_prefill = walk(model, prompt, kvs, prefill_trace)
    walked_decode = walk(model, new, kvs, decode_trace)
    ref_kvs = model.new_cache(BATCH)
    model_prefill = model(prompt, ref_kvs)
    model_decode = model(new, ref_kvs)
    full = model(ids)
    measures = [
        Measure("prefill walk vs model(ids, cache)", max_abs(walked_prefill, model_prefill),
                1e-10),
        Measure("decode walk vs model(new, cache)", max_abs(walked_decode, model_decode), 1e-10),
        Measure("decode walk vs model(all ids)[:, -1]", max_abs(walked_decode, full[:, -1:]),
                1e-10),
        Measure("cache length after the decode step", abs(len(kvs[0]) - (T + 1)), 0),
    ]
    n = prefill_trace.asserted + decode_trace.asserted
    lines = [f"    B={BATCH} T={T} D={c.d_model} H={c.n_heads} d_head={c.d_head} "
             f"d_ff={c.d_ff} V={c.vocab_size}; every shape below is asserted",
             f"    {'tensor':<30}{f'prefill (T={T})':<20}decode (1 vs cache {T})"]
    for name, shape in prefill_trace.rows.items():
        lines.append(f"    {name:<30}{str(shape):<20}{decode_trace.rows[name]}")
    note = (f"{n} shapes asserted ({c.n_layers} blocks, prefill + decode); "
            "walk == model logits")
    return Evidence(measures, note, "\n".join(lines))


# --- check 3: cached decode == recomputing the prefix --------------------------------------------

def cache_growth_errors(model: block.GPT, prompt: np.ndarray, steps: int) -> int:
    """Prefill then decode by hand; count every time a layer's cache length is not P, P+1, ..."""
    kvs = model.new_cache(prompt.shape[0])
    logits = generate.prefill(model, prompt, kvs)
    wrong = sum(len(kv) != prompt.shape[1] for kv in kvs.layers)
    for n in range(1, steps + 1):
        logits = generate.decode(model, generate.greedy(logits), kvs)
        wrong += sum(len(kv) != prompt.shape[1] + n for kv in kvs.layers)
    return wrong


def reset_reuse_error(model: block.GPT) -> float:
    """A server reuses caches: fill one with prompt A, reset() it, prefill prompt B. B's logits
    must equal B's on a fresh cache (a reset that forgets nothing leaves B after stale A)."""
    a, b = random_ids((BATCH, 6), seed=31), random_ids((BATCH, 4), seed=32)
    kvs = model.new_cache(BATCH)
    generate.decode(model, generate.prefill(model, a, kvs).argmax(-1), kvs)
    kvs.reset()
    return max_abs(generate.prefill(model, b, kvs), model(b)[:, -1])


@check(3, "cache == naive", "cached decode == recomputing prefix")
def check_cache() -> Evidence:
    """Greedy decoding twice, once recomputing the whole prefix each step and once through the
    KV cache: same tokens, same logits; the cache grows by exactly one per step. The assignment's
    config and a RoPE + grouped-query config (prompts of 7 and of 1 token), batch 2; float32 too."""
    measures: list[Measure] = []
    steps = 8
    token_mismatch, len_wrong, err64, shown = 0, 0, 0.0, []
    for label, config, P in (("assignment config", ASSIGNMENT_CONFIG, 7),
                             ("RoPE + GQA", ROPE_GQA_CONFIG, 1)):
        model = ref.random_model(config)
        prompt = random_ids((BATCH, P), seed=3 + P)
        naive = generate.generate_naive(model, prompt, steps)
        cached = generate.generate_cached(model, prompt, steps)
        token_mismatch += int(np.sum(naive.tokens != cached.tokens))
        err64 = max(err64, max_abs(naive.logits, cached.logits))
        len_wrong += sum(int(got != P + n) for n, got in enumerate(cached.cache_lengths))
        len_wrong += cache_growth_errors(model, prompt, 2)
        per_step = np.abs(naive.logits - cached.logits).max(axis=(0, 2))  # (N,)
        shown += [f"    {label}, prompt of {P}, float64",
                  "      step  cache length  tokens naive | cached  max |logit diff|"]
        shown += [f"      {n:>4}  {length:>12}  {str(naive.tokens[:, n].tolist()):>12} | "
                  f"{str(cached.tokens[:, n].tolist()):<10}  {per_step[n]:.1e}"
                  for n, length in enumerate(cached.cache_lengths)]
    measures.append(Measure("float64 |naive - cached| logits", err64, 1e-10))
    measures.append(Measure("tokens differing naive vs cached", token_mismatch, 0))
    measures.append(Measure("cache lengths off P, P+1, ... (+1 per step)", len_wrong, 0))
    measures.append(Measure("cache reused after reset() vs fresh cache",
                            reset_reuse_error(ref.random_model(ASSIGNMENT_CONFIG)), 1e-10))
    model32 = ref.random_model(ASSIGNMENT_CONFIG, dtype=np.float32)
    prompt = random_ids((BATCH, 7), seed=10)
    naive32 = generate.generate_naive(model32, prompt, steps)
    cached32 = generate.generate_cached(model32, prompt, steps)
    rel32 = max_rel(cached32.logits, naive32.logits)
    same32 = int(np.sum(naive32.tokens != cached32.tokens))
    measures.append(Measure("float32 relative |naive - cached|", rel32, 1e-5))
    measures.append(Measure("float32 tokens differing", same32, 0))
    note = (f"float32: max |diff| / max |logit| = {rel32:.1e} (tol 1e-05), "
            f"{'tokens identical' if same32 == 0 else f'{same32} tokens differ'}")
    return Evidence(measures, note, "\n".join(shown))


# --- check 4: torch.nn.MultiheadAttention --------------------------------------------------------

MHA_D, MHA_H, MHA_T = 128, 4, 8


@functools.cache
def torch_mha_case() -> tuple[attention.AttentionParams, np.ndarray, dict[str, tuple]]:
    """Weights, input x (B, T + 1, D) and torch's answers for the causal prefix and for one
    decode step (computed by torch alone, once per process)."""
    D, H, T = MHA_D, MHA_H, MHA_T
    rng = np.random.default_rng(4)
    w = [rng.standard_normal((D, D)) / math.sqrt(D) for _ in range(4)]
    b = [0.1 * rng.standard_normal(D) for _ in range(4)]
    p = attention.AttentionParams(w[0], b[0], w[1], b[1], w[2], b[2], w[3], b[3], H, H)
    x = np.random.default_rng(40).standard_normal((BATCH, T + 1, D))
    prefix, new = x[:, :T], x[:, T:]
    refs = {"prefix": ref.torch_mha(p, prefix, prefix, blocked=~ref.rule_mask(T, T)),
            # decode: the new token may see every key, said explicitly with an all-False mask
            "decode": ref.torch_mha(p, new, x, blocked=np.zeros((1, T + 1), dtype=bool))}
    return p, x, refs


@check(4, "nn.MHA parity", "heads, mask, W_O, decode == torch")
def check_torch_mha() -> Evidence:
    """attention.multi_head_attention against torch.nn.MultiheadAttention with the same weights:
    the full causal sequence (outputs and per-head weights) and one cached decode step (query =
    the new token, key/value = the prefix including it)."""
    D, H, T = MHA_D, MHA_H, MHA_T
    p, x, refs = torch_mha_case()
    prefix, new = x[:, :T], x[:, T:]
    ours, ours_w = attention.multi_head_attention(prefix, p, attention.causal_mask(T)[None, None])
    full_err = max(max_abs(ours, refs["prefix"][0]), max_abs(ours_w, refs["prefix"][1]))
    kv = cache.KVCache(BATCH, H, T + 1, D // H, np.float64)
    attention.multi_head_attention(prefix, p, attention.causal_mask(T)[None, None], kv)
    out_new, w_new = attention.multi_head_attention(new, p, attention.causal_mask(1, T + 1)
                                                    [None, None], kv)
    decode_err = max(max_abs(out_new, refs["decode"][0]), max_abs(w_new, refs["decode"][1]))
    measures = [Measure("full sequence: outputs and per-head weights", full_err, 1e-12),
                Measure("decode step (1 query vs cached 8 + 1 keys)", decode_err, 1e-12),
                Measure("cache length after prefill + 1 step", abs(len(kv) - (T + 1)), 0)]
    shown = (f"    head 0, batch 0 weights (ours; torch agrees to {full_err:.0e}):\n"
             f"{fmt_matrix(ref.n(ours_w)[0, 0], '{:5.2f}')}\n"
             f"    decode step, head 0, batch 0: the new token's row over {T + 1} keys:\n"
             f"{fmt_matrix(ref.n(w_new)[0, 0], '{:5.2f}')}")
    return Evidence(measures, f"float64 vs torch {torch.__version__}", shown)


# --- check 5: F.scaled_dot_product_attention and the is_causal trap -----------------------------

@functools.cache
def torch_sdpa_cases() -> dict[tuple[int, int], tuple[np.ndarray, ...]]:
    """(t_q, t_k) -> q, k, v and torch's outputs with the explicit bottom-right mask and with
    is_causal=True (torch alone, once per process)."""
    rng = np.random.default_rng(5)
    cases = {}
    for t_q, t_k in ((6, 6), (1, 6), (3, 7)):
        q = rng.standard_normal((BATCH, 4, t_q, 32))
        k, v = rng.standard_normal((2, BATCH, 4, t_k, 32))
        out, _ = ref.torch_attention(q, k, v, ref.rule_mask(t_q, t_k))
        cases[(t_q, t_k)] = (q, k, v, out, ref.torch_is_causal(q, k, v))
    return cases


@check(5, "F.sdpa parity", "bottom-right mask, also t_q < t_k")
def check_torch_sdpa() -> Evidence:
    """attention.scaled_dot_product_attention against F.scaled_dot_product_attention with an
    explicit bottom-right mask: square (prefill), 1 x 6 (decode) and 3 x 7 (a chunk after 4
    cached). is_causal=True is measured too: it aligns the triangle top-left, which is wrong
    whenever t_q < t_k. That is the trap, shown, not a failure of ours."""
    err, trap = 0.0, {}
    for (t_q, t_k), (q, k, v, expected, top_left) in torch_sdpa_cases().items():
        ours, _ = attention.scaled_dot_product_attention(q, k, v, attention.causal_mask(t_q, t_k))
        err = max(err, max_abs(ours, expected))
        trap[(t_q, t_k)] = max_abs(expected, top_left)
    measures = [Measure("|ours - F.sdpa| over 6x6, 1x6, 3x7", err, 1e-12)]
    note = (f"trap: is_causal=True (top-left) is off by {trap[(3, 7)]:.1f} at 3x7, "
            f"{trap[(1, 6)]:.1f} at 1x6, {trap[(6, 6)]:.0g} at 6x6")
    shown = ("    3 new queries after 4 cached keys: the mask we need (bottom-right) vs\n"
             "    what is_causal=True builds (top-left; query 0 would miss 4 cached keys):\n"
             f"{fmt_matrix(ref.rule_mask(3, 7).astype(int), '{:2d}')}\n"
             f"      vs\n{fmt_matrix(np.tril(np.ones((3, 7), dtype=int)), '{:2d}')}")
    return Evidence(measures, note, shown)


# --- check 6: the block exercise -----------------------------------------------------------------

BLOCK_HEADS = 4


@functools.cache
def torch_block_cases() -> dict[type, tuple[list[np.ndarray], np.ndarray]]:
    """dtype -> ([x, w_q, w_k, w_v, w_o], torch's output), N=2, T=7, D=128 (torch alone, once)."""
    rng = np.random.default_rng(6)
    N, T, D = BATCH, 7, 128
    x = rng.standard_normal((N, T, D))
    ws = [rng.standard_normal((D, D)) / math.sqrt(D) for _ in range(4)]
    cases = {}
    for dtype in (np.float64, np.float32):
        args = [a.astype(dtype) for a in (x, *ws)]
        cases[dtype] = (args, ref.torch_block_exercise(*args, BLOCK_HEADS))
    return cases


@check(6, "block exercise", "exercise pipeline == torch version")
def check_block_exercise() -> Evidence:
    """attention.causal_self_attention_block vs the block exercise written in torch, float64
    (exactness) and float32 (what a user sees)."""
    errs = {}
    for dtype, (args, expected) in torch_block_cases().items():
        errs[dtype] = max_abs(attention.causal_self_attention_block(*args, BLOCK_HEADS), expected)
    measures = [Measure("float64 |ours - torch|", errs[np.float64], 1e-12),
                Measure("float32 |ours - torch|", errs[np.float32], 1e-5)]
    note = f"float32 (what a user sees): {errs[np.float32]:.1e} (tol 1e-05)"
    return Evidence(measures, note)


# --- check 7: Hugging Face GPT-2 -----------------------------------------------------------------

GPT2_PROMPT = random_ids((BATCH, 7), seed=7)
GPT2_NEW_TOKENS = 12


@functools.cache
def hf_gpt2() -> object:
    """A Hugging Face GPT2LMHeadModel of the assignment's config, random weights from a local
    config (nothing downloaded), float64. Built once per process."""
    c = ASSIGNMENT_CONFIG
    return ref.hf_gpt2(c.vocab_size, c.max_seq_len, c.d_model, c.n_layers, c.n_heads, jitter=0.05)


@functools.cache
def hf_gpt2_reference() -> dict[str, np.ndarray]:
    """Everything check 7 compares against, computed by Hugging Face alone (cached, so the
    failure-mode gallery does not pay for it again)."""
    hf = hf_gpt2()
    P = GPT2_PROMPT.shape[1]
    tokens, _ = ref.hf_generate(hf, GPT2_PROMPT, GPT2_NEW_TOKENS)
    seq = np.concatenate([GPT2_PROMPT, tokens], axis=1)
    return {"logits64": ref.hf_logits(hf, GPT2_PROMPT),
            "logits32": ref.hf_logits(copy.deepcopy(hf).float(), GPT2_PROMPT),
            "tokens": tokens,
            # the logits that chose each new token, from one full forward over the sequence
            "step_logits": ref.hf_logits(hf, seq[:, :-1])[:, P - 1:]}


@check(7, "GPT-2 parity", "logits + greedy tokens == HF GPT-2")
def check_gpt2() -> Evidence:
    """GPT.from_gpt2(state_dict) against GPT2LMHeadModel: prompt logits (float64 and float32),
    and our cached greedy generation vs hf.generate(do_sample=False) token for token, with the
    logits at each step vs Hugging Face's."""
    expected = hf_gpt2_reference()
    hf = hf_gpt2()
    model = block.GPT.from_gpt2(hf.state_dict(), dtype=np.float64, hf_config=hf.config)
    model32 = block.GPT.from_gpt2(hf.state_dict(), dtype=np.float32, hf_config=hf.config)
    ours = generate.generate_cached(model, GPT2_PROMPT, GPT2_NEW_TOKENS)
    rel32 = max_rel(model32(GPT2_PROMPT), expected["logits32"])
    mismatch = int(np.sum(ours.tokens != expected["tokens"]))
    measures = [Measure("float64 prompt logits vs HF", max_abs(model(GPT2_PROMPT),
                                                               expected["logits64"]), 1e-10),
                Measure("greedy tokens differing from hf.generate", mismatch, 0),
                Measure("float64 cached step logits vs HF",
                        max_abs(ours.logits, expected["step_logits"]), 1e-10),
                Measure("float32 relative logits vs HF float32", rel32, 1e-5)]
    note = (f"{GPT2_NEW_TOKENS} tokens x {BATCH} rows {'identical' if mismatch == 0 else 'DIFFER'}"
            f"; float32: max |diff| / max |logit| = {rel32:.1e}")
    shown = "\n".join(f"    row {b}: prompt {GPT2_PROMPT[b].tolist()}\n"
                      f"      ours (cached) {ours.tokens[b].tolist()}\n"
                      f"      hf.generate   {expected['tokens'][b].tolist()}"
                      for b in range(BATCH))
    return Evidence(measures, note, shown)


# --- check 8: causality under perturbation -------------------------------------------------------

@check(8, "causality", "future tokens never change the past")
def check_causality() -> Evidence:
    """Change the tokens at positions >= t: logits at positions < t must not move, for the whole
    model; and the same for one attention layer with hidden states perturbed. The later positions
    must move, or the test would prove nothing."""
    model = ref.random_model(ASSIGNMENT_CONFIG)
    T, t = 12, 5
    ids = random_ids((BATCH, T), seed=8)
    changed = ids.copy()
    changed[:, t:] = (ids[:, t:] + 1 + random_ids((BATCH, T - t), seed=80, vocab=200)) % 256
    a, b = model(ids), model(changed)
    past_model = max_abs(a[:, :t], b[:, :t])
    future_model = max_abs(a[:, t:], b[:, t:])
    p = model.blocks[0].attn
    D = ASSIGNMENT_CONFIG.d_model
    x = np.random.default_rng(81).standard_normal((BATCH, T, D))
    y = x.copy()
    y[:, t:] += np.random.default_rng(82).standard_normal((BATCH, T - t, D))
    mask = attention.causal_mask(T)[None, None]
    ox, _ = attention.multi_head_attention(x, p, mask)
    oy, _ = attention.multi_head_attention(y, p, mask)
    past_layer = max_abs(ox[:, :t], oy[:, :t])
    measures = [Measure(f"model logits at positions < {t} moved", past_model, 1e-12),
                Measure(f"attention outputs at positions < {t} moved", past_layer, 1e-12),
                Measure("later positions did not move (vacuous test)",
                        int(future_model < 1e-6 or max_abs(ox[:, t:], oy[:, t:]) < 1e-6), 0)]
    note = f"later logits moved by up to {future_model:.1f}, earlier ones by {past_model:.0g}"
    shown = (f"    per-position max |logit change| (batch 0), perturbing positions >= {t}:\n"
             f"{fmt_matrix(np.abs(a - b)[0].max(-1)[None], '{:5.2f}')}")
    return Evidence(measures, note, shown)


# --- check 9: chunked prefill --------------------------------------------------------------------

@check(9, "chunked prefill", "chunks 5+1+3 == one full forward")
def check_chunked_prefill() -> Evidence:
    """Feed a 9-token prompt through the cache as chunks of 5, 1 and 3 (each chunk's queries are
    the last rows of a rectangular, bottom-right mask): every position's logits equal one full
    forward. The assignment's config and RoPE + GQA."""
    err, len_wrong, shown = 0.0, 0, []
    for label, config in (("assignment config", ASSIGNMENT_CONFIG),
                          ("RoPE + GQA", ROPE_GQA_CONFIG)):
        model = ref.random_model(config)
        ids = random_ids((BATCH, 9), seed=9)
        full = model(ids)
        kvs = model.new_cache(BATCH)
        start = 0
        shown.append(f"    {label}: chunk, mask shape (t_q, t_k), cache length, |chunk - full|")
        for size in (5, 1, 3):
            piece = model(ids[:, start:start + size], kvs)
            piece_err = max_abs(piece, full[:, start:start + size])
            err = max(err, piece_err)
            start += size
            len_wrong += sum(len(kv) != start for kv in kvs.layers)
            shown.append(f"      {size} new   ({size}, {start})   {len(kvs):>2}   "
                         f"{piece_err:.1e}")
    measures = [Measure("float64 |chunked - full| logits", err, 1e-10),
                Measure("cache lengths off 5, 6, 9", len_wrong, 0)]
    return Evidence(measures, "assignment config and RoPE + GQA (2 kv heads), float64",
                    "\n".join(shown))


# --- checks 10-11: prompts of different lengths (left padding) -----------------------------------

RAGGED_PROMPTS = [random_ids((n,), seed=100 + n) for n in (5, 2, 7)]


@check(10, "batch invariance", "padded row == its prompt alone")
def check_batch_invariance() -> Evidence:
    """Prompts of lengths 5, 2, 7 decoded together (left-padded) give, row for row, the tokens
    and logits of each prompt decoded alone. Padding must be invisible: positions count real
    tokens only, the cache keeps the padding mask after prefill, and pads are never attended."""
    steps, err, mismatch, shown = 5, 0.0, 0, []
    for config in (ASSIGNMENT_CONFIG, ROPE_GQA_CONFIG):
        model = ref.random_model(config)
        runs = [generate.generate_cached]
        if config is ASSIGNMENT_CONFIG:
            runs.append(generate.generate_naive)
        for run in runs:
            together = run(model, RAGGED_PROMPTS, steps)
            for row, prompt in enumerate(RAGGED_PROMPTS):
                alone = run(model, prompt[None], steps)
                err = max(err, max_abs(together.logits[row], alone.logits[0]))
                mismatch += int(np.sum(together.tokens[row] != alone.tokens[0]))
                if config is ASSIGNMENT_CONFIG and run is generate.generate_cached:
                    shown.append(f"    P={len(prompt)}: batched {together.tokens[row].tolist()}"
                                 f"  alone {alone.tokens[0].tolist()}")
    measures = [Measure("float64 |batched row - alone| logits", err, 1e-10),
                Measure("tokens differing batched vs alone", mismatch, 0)]
    note = "prompts of 5, 2, 7; cached (assignment, RoPE + GQA), naive (assignment)"
    return Evidence(measures, note, shown="\n".join(shown))


@functools.cache
def hf_padded_reference() -> tuple[np.ndarray, np.ndarray]:
    """hf.generate on the left-padded batch with its attention_mask (Hugging Face alone): the
    new tokens (B, N) and the logits that chose them (B, N, V; generate returns them float32)."""
    L = max(len(p) for p in RAGGED_PROMPTS)
    ids = np.zeros((len(RAGGED_PROMPTS), L), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, p in enumerate(RAGGED_PROMPTS):  # left padding, written out by hand
        ids[row, L - len(p):], mask[row, L - len(p):] = p, 1
    return ref.hf_generate(hf_gpt2(), ids, GPT2_NEW_TOKENS, attention_mask=mask)


@check(11, "HF padded batch", "left-padded greedy == hf.generate")
def check_hf_padded() -> Evidence:
    """Our cached generation on prompts of lengths 5, 2, 7 against hf.generate with left-padded
    input_ids, attention_mask and pad_token_id: token for token."""
    expected, expected_logits = hf_padded_reference()
    hf = hf_gpt2()
    model = block.GPT.from_gpt2(hf.state_dict(), dtype=np.float64, hf_config=hf.config)
    ours = generate.generate_cached(model, RAGGED_PROMPTS, GPT2_NEW_TOKENS)
    mismatch = int(np.sum(np.asarray(ours.tokens) != expected))
    err = max_abs(ours.logits, expected_logits)
    shown = "\n".join(f"    P={len(p)}: ours {np.asarray(ours.tokens)[b].tolist()}\n"
                      f"          hf   {expected[b].tolist()}"
                      for b, p in enumerate(RAGGED_PROMPTS))
    measures = [Measure("tokens differing from hf.generate (padded)", mismatch, 0),
                Measure("step logits vs hf.generate's (float32 there)", err, 1e-5)]
    note = (f"{len(RAGGED_PROMPTS)} rows x {GPT2_NEW_TOKENS} tokens; logits within {err:.0e} "
            "(HF hands them back as float32)")
    return Evidence(measures, note, shown)


# --- check 12: the engine == the readable path ---------------------------------------------------

ENGINE_CONFIGS = {"MHA": {}, "GQA": {"n_kv_heads": 2}, "MQA": {"n_kv_heads": 1},
                  "RoPE + GQA": {"rope": True, "n_kv_heads": 2}}
ENGINE_PROMPTS = [150, 40, 97]  # left-padded to 150: more than one 128-query block


@check(12, "fast == readable", "fast path == readable, all modes")
def check_engine() -> Evidence:
    """The same weights run twice, readable (GPT.forward) and fast (engine.fast.forward): a
    left-padded batch's logits and every layer's attention weights, and cached greedy decoding
    with prefill in chunks of 64 (tokens and the logits of every step); float64 and float32."""
    err64, rel32, tokens_differ, shown = 0.0, 0.0, 0, []
    for label, extra in ENGINE_CONFIGS.items():
        config = block.GPTConfig(**{**vars(ASSIGNMENT_CONFIG), "n_kv_heads": None,
                                    "max_seq_len": 160, **extra})
        for dtype in (np.float64, np.float32):
            readable = ref.random_model(config, dtype=dtype)
            fast = ref.random_model(config, dtype=dtype, fast=True)
            prompts = [random_ids((n,), seed=12 + n) for n in ENGINE_PROMPTS]
            ids, mask = generate.left_pad(prompts)
            (a, a_w), (b, b_w) = (m(ids, attention_mask=mask, return_attention=True)
                                  for m in (readable, fast))
            slow, quick = (generate.generate_cached(m, prompts, 6, prefill_chunk=64)
                           for m in (readable, fast))
            tokens_differ += int(np.sum(slow.tokens != quick.tokens))
            if dtype == np.float64:
                err = max(max_abs(a, b), max_abs(slow.logits, quick.logits),
                          *(max_abs(x, y) for x, y in zip(a_w, b_w, strict=True)))
                err64 = max(err64, err)
                shown.append(f"    {label:<11} float64 max |readable - fast| {err:.1e}")
            else:
                rel32 = max(rel32, max_rel(b, a), max_rel(quick.logits, slow.logits))
    measures = [Measure("float64 logits, weights, decode: readable vs fast", err64, 1e-12),
                Measure("greedy tokens differing (float64 and float32)", tokens_differ, 0),
                Measure("float32 relative logits", rel32, 1e-5)]
    note = f"float32: max |diff| / max |logit| = {rel32:.1e}, tokens identical" if not (
        tokens_differ) else f"{tokens_differ} tokens differ"
    return Evidence(measures, note, "\n".join(shown))


# --- check 13: online-softmax (flash) attention == the readable attention -----------------------

FLASH_BLOCKS = (1, 3, 7, 64)  # 64: one block holds all the keys of every case


@check(13, "flash == readable", "online softmax == the five steps")
def check_flash() -> Evidence:
    """beyond/flash.py's flash_attention (keys in blocks, a running max, sum and output per row,
    never the weights) against attention.scaled_dot_product_attention, float64: square, 3 after 7
    and 1 after 40 (bottom-right), left padding with the causal rule, a row with every key hidden,
    GQA through a broadcast K/V axis, no mask; each in blocks of 1, 3, 7 and 64 keys."""
    rng = np.random.default_rng(13)
    rand = rng.standard_normal
    padding = np.arange(9) >= np.array([[0], [4]])  # (2, 9): row 1's first 4 keys are padding
    blind = ref.rule_mask(6, 6)
    blind[2] = False  # query 2 may see nothing: zeros, in both paths (and in torch)
    cases = {  # name -> q, k, v, mask
        "6x6": (rand((2, 3, 6, 8)), rand((2, 3, 6, 8)), rand((2, 3, 6, 8)), ref.rule_mask(6, 6)),
        "3x7": (rand((2, 3, 3, 8)), rand((2, 3, 7, 8)), rand((2, 3, 7, 8)), ref.rule_mask(3, 7)),
        "1x40": (rand((2, 3, 1, 8)), rand((2, 3, 40, 8)), rand((2, 3, 40, 5)),
                 ref.rule_mask(1, 40)),
        "padded": (rand((2, 3, 9, 8)), rand((2, 3, 9, 8)), rand((2, 3, 9, 8)),
                   padding[:, None, None, :] & ref.rule_mask(9, 9)),  # (2, 1, 9, 9)
        "blind row": (rand((2, 3, 6, 8)), rand((2, 3, 6, 8)), rand((2, 3, 6, 8)), blind),
        "GQA": (rand((2, 2, 3, 8, 8)), rand((2, 2, 1, 8, 8)), rand((2, 2, 1, 8, 8)),
                ref.rule_mask(8, 8)),  # (B, H_kv, G, t, d): K/V broadcast over G
        "no mask": (rand((2, 3, 5, 8)), rand((2, 3, 11, 8)), rand((2, 3, 11, 8)), None),
    }
    errors = {}
    for name, (q, k, v, mask) in cases.items():
        expected, _ = attention.scaled_dot_product_attention(q, k, v, mask)
        errors[name] = max(max_abs(flash_attention(q, k, v, mask, block_size=b), expected)
                           for b in FLASH_BLOCKS)
    # Only the largest error is the measure; which case it comes from is rounding noise (it moves
    # with the BLAS kernel), so it is not named.
    measures = [Measure("float64 |flash - readable|, 7 cases x 4 block sizes",
                        max(errors.values()), 1e-12)]
    shown = "\n".join(f"    {name:<10} max |flash - readable| {e:.1e}"
                      for name, e in errors.items())
    return Evidence(measures, f"7 cases x block sizes {FLASH_BLOCKS}", shown)


# --- check 14: a sliding window with a rolling buffer == the band-masked naive path -------------

@check(14, "window == naive", "rolling buffer == band mask, past W")
def check_window() -> Evidence:
    """GPTConfig(sliding_window=4, attention_sinks=2, rope=True): the cached path keeps a rolling
    buffer of 2 + 4 slots per layer; decoding 40 tokens (past max_seq_len 32) in chunks of 7,
    which cross the wrap and are longer than the window, gives the logits of one naive forward
    with the band mask (each query sees its last 4 keys and the first 2), float64; the cache's
    bytes never change."""
    config = block.GPTConfig(vocab_size=64, max_seq_len=32, d_model=32, n_heads=4, n_kv_heads=2,
                             n_layers=2, rope=True, sliding_window=4, attention_sinks=2,
                             init_std=0.2)
    model = ref.random_model(config, seed=14)
    ids = random_ids((BATCH, 40), seed=14, vocab=64)
    kvs = window.window_cache(model, BATCH)
    nbytes = {kvs.nbytes}
    chunks = []
    for start in range(0, 40, 7):
        chunks.append(model(ids[:, start:start + 7], kvs))
        nbytes.add(kvs.nbytes)
    err = max_abs(np.concatenate(chunks, axis=1), model(ids))
    measures = [Measure("float64 |cached in chunks of 7 - naive band|", err, 1e-12),
                Measure("distinct cache sizes while decoding 40 tokens", len(nbytes) - 1, 0)]
    note = (f"40 tokens past max_seq_len 32, W=4 + 2 sinks, cache {nbytes.pop()} bytes "
            "throughout")
    return Evidence(measures, note)


# --- check 15: speculative decoding == cached decoding --------------------------------------------

@check(15, "speculative", "draft + one verify call == target")
def check_speculative() -> Evidence:
    """Greedy speculative decoding (beyond/speculative.py): a draft proposes gamma tokens, the
    target verifies them in one chunked call, both caches roll back to the accepted ones.
    Whatever the draft, the tokens must be generate_cached's and the logits equal in float64:
    a random draft (proposals rejected), the target with its weights perturbed (some accepted,
    then a rejection: the rollback path) and the target as its own draft (all accepted: the
    draft's cache lags one token), gamma 1 to 5, the assignment's config."""
    target = ref.random_model(ASSIGNMENT_CONFIG)
    noise = np.random.default_rng(8)
    perturbed = {name: w + 0.01 * noise.standard_normal(w.shape)
                 for name, w in target.named_weights().items()}
    drafts = {"random draft": block.GPT(block.GPTConfig(d_model=32, n_heads=2, n_layers=1,
                                                        init_std=0.2), seed=7, dtype=np.float64),
              "target + noise": block.GPT(ASSIGNMENT_CONFIG, dtype=np.float64, weights=perturbed),
              "draft = target": target}
    prompt = random_ids((1, 7), seed=13)  # (1, P): speculative decoding runs one prompt
    want = generate.generate_cached(target, prompt, 24)
    mismatch, err, rates = 0, 0.0, {}
    shown = ["      draft            gamma  target calls  acceptance  max |logit diff|"]
    for name, draft in drafts.items():
        for gamma in range(1, 6):
            got = generate_speculative(target, draft, prompt, 24, gamma=gamma)
            mismatch += int(got.tokens.shape != want.tokens.shape
                            or np.any(got.tokens != want.tokens))
            diff = max_abs(got.logits, want.logits)
            err = max(err, diff)
            rates[name] = got.acceptance_rate
            shown.append(f"      {name:<15}  {gamma:>5}  {1 + len(got.rounds):>12}  "
                         f"{got.acceptance_rate:>10.2f}  {diff:.1e}")
    measures = [Measure("float64 |speculative - cached| logits", err, 1e-10),
                Measure("gammas whose tokens differ from cached", mismatch, 0)]
    note = "acceptance at gamma 5: " + ", ".join(f"{name.split()[0]} {rate:.2f}"
                                                 for name, rate in rates.items())
    return Evidence(measures, note, "\n".join(shown))


# --- check 16: the int8 cache, within its proved and stated bounds --------------------------------

@check(16, "int8 cache", "int8 K/V within the proved bound")
def check_int8() -> Evidence:
    """beyond/int8.py stores K and V as int8 with a float scale per token and head. One attention
    call over the dequantized K, V must stay within int8.attention_error_bound of the float one
    (a proof, so the excess must be 0); the model's logits with an int8 cache must stay within
    the stated tolerance (5% of the largest logit) of the float model's on the same tokens."""
    rng = np.random.default_rng(16)
    q, k, v = (rng.standard_normal((2, 4, t, 32)) for t in (3, 20, 20))
    k_hat, v_hat = int8.Int8KVCache(2, 4, 32, 32, "float64").append(k, v)
    mask = attention.causal_mask(3, 20)
    gap = np.abs(attention.scaled_dot_product_attention(q, k_hat, v_hat, mask)[0]
                 - attention.scaled_dot_product_attention(q, k, v, mask)[0])
    excess = max(float(np.max(gap - int8.attention_error_bound(q, k, v))), 0.0)
    model = ref.random_model(ASSIGNMENT_CONFIG)
    run = generate.generate_cached(model, RAGGED_PROMPTS, 8,
                                   cache=int8.int8_cache(model, len(RAGGED_PROMPTS)))
    rel = max_rel(run.logits, int8.teacher_forced_logits(model, RAGGED_PROMPTS, run.tokens))
    measures = [Measure("attention: excess over the proved bound", excess, 0),
                Measure("logits: max |int8 - float| / max |logit|", rel, int8.LOGIT_TOLERANCE)]
    kv = int8.int8_cache(model, 1)
    ratio = kv.nbytes / model.new_cache(1, dtype="float32").nbytes
    return Evidence(measures, f"logits within {rel:.1%} of the largest; bytes {ratio:.3f}x "
                              "float32's, scales counted")


# --- check 17: the latent (MLA) cache: absorbed decode == explicit --------------------------------

@check(17, "latent (MLA)", "absorbed cached decode == explicit")
def check_latent() -> Evidence:
    """LatentConfig(kv_latent=32): each layer caches one 32-wide latent per token. Without a cache
    the model computes K and V from the latents explicitly; with one it absorbs W_uk into the
    query and W_uv into W_O and attends over the latents. Cached greedy decoding of a padded
    batch must give the naive logits and tokens, float64."""
    config = latent.LatentConfig(**{**vars(ASSIGNMENT_CONFIG), "n_kv_heads": None,
                                    "kv_latent": 32})
    model = ref.random_model(config)
    naive = generate.generate_naive(model, RAGGED_PROMPTS, 6)
    cached = generate.generate_cached(model, RAGGED_PROMPTS, 6, prefill_chunk=3)
    full = ref.random_model(ASSIGNMENT_CONFIG).new_cache(1).nbytes
    measures = [Measure("float64 |cached (absorbed) - naive (explicit)|",
                        max_abs(cached.logits, naive.logits), 1e-12),
                Measure("tokens differing", int(np.sum(cached.tokens != naive.tokens)), 0)]
    return Evidence(measures, f"d_c = 32: the cache is {model.new_cache(1).nbytes / full:.3f}x "
                              "the MHA cache's bytes")


# --- check 18: continuous batching over a paged cache == each request alone ----------------------

@check(18, "serving == alone", "batched, paged == each one alone")
def check_serving() -> Evidence:
    """beyond/serving.py's Engine over a pool of 4 blocks of 16 tokens (NaN in free blocks, the
    free list shuffled): prompts of 17, 16, 1, 30 and 9 tokens, greedy and seeded, two arriving
    after 3 steps, one cancelled after 5; the pool is too small for all of them, so requests are
    preempted and recomputed. Each request's tokens and logits against generate_cached on its
    prompt alone (with its own seeded generator), float64."""
    model = ref.random_model(ASSIGNMENT_CONFIG)
    engine = serving.Engine(model, num_blocks=4, block_size=16, shuffle=18)
    requests = {}  # id -> (prompt, max_new_tokens, options)

    def submit(length: int, max_new: int, seed: int | None) -> int:
        prompt = random_ids((length,), seed=180 + length)
        options = {} if seed is None else {"temperature": 0.8, "top_k": 50}
        rid = engine.submit(prompt, max_new, seed=seed, **options)
        requests[rid] = (prompt, max_new, options | {"seed": seed})
        return rid

    submit(17, 12, None)  # one block plus one
    submit(16, 12, 1)  # exactly one block
    cancelled = submit(1, 12, None)
    for step in range(1, 6):
        engine.step()
        if step == 3:  # two arrive while the others decode
            submit(30, 8, 2)
            submit(9, 10, None)
    engine.cancel(cancelled)
    engine.run()
    err, differ = 0.0, 0
    for rid, (prompt, max_new, options) in requests.items():
        if rid == cancelled:
            continue
        seed = options.pop("seed")
        rng = None if seed is None else np.random.default_rng(seed)
        want = generate.generate_cached(model, [prompt], max_new, rng=rng, **options)
        got = engine.result(rid)
        differ += int(got.tokens.shape != want.tokens[0].shape
                      or np.any(got.tokens != want.tokens[0]))
        err = max(err, max_abs(got.logits, want.logits[0]))
    stats = engine.stats()
    measures = [Measure("float64 |served - alone| logits", err, 1e-10),
                Measure("requests whose tokens differ from alone", differ, 0),
                Measure("scenario not met: no preemption, or blocks left in use",
                        int(stats["preemptions"] == 0) + stats["blocks_in_use"], 0)]
    note = (f"{len(requests) - 1} requests + 1 cancelled in {stats['steps']} steps, "
            f"{stats['preemptions']} preemption(s), peak {stats['peak_blocks_in_use']}/"
            f"{stats['blocks_total']} blocks")
    return Evidence(measures, note)


# --- running and printing ------------------------------------------------------------------------

@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the checks on one thread (NumPy's BLAS and torch). Their matrices are tiny (at most
    17 x 512), so a thread pool costs more in hand-offs than it saves, and on a busy machine each
    hand-off waits for a busy core (measured here: 2.4 s instead of 0.16 s for the HF reference).
    The previous limits are restored afterwards."""
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(before)


def run_checks(numbers: list[int] | None = None) -> list[Result]:
    with one_thread():
        return [CHECKS[n]() for n in (numbers or sorted(CHECKS))]


HEADER = f" #  {'check':<17}{'proves':<36}{'error':>8} {'tol':>6}  result"


def format_result(r: Result, verbose: bool = False) -> str:
    """One 80-column line; under it the note, the failure detail, and with --verbose the data."""
    err = "-" if math.isnan(r.error) else f"{r.error:.1e}"
    tol = "-" if math.isnan(r.tol) else fmt_tol(r.tol)
    lines = [f"{r.number:>2}  {r.name:<16} {r.proves:<35} {err:>8} {tol:>6}  {r.status}"]
    if not r.passed:
        lines.append(_clip(f"    -> {r.detail}"))
    if r.note:
        lines.append(_clip(f"    {r.note}"))
    if verbose and r.shown:
        lines.append(r.shown)
    return "\n".join(lines)


def _clip(text: str) -> str:
    return text if len(text) <= WIDTH else text[:WIDTH - 3] + "..."


# --- the failure-mode gallery --------------------------------------------------------------------
# Each broken function below is one classic bug: the assignment's table of common failure modes and
# the usual list of traps. They live only here; the gallery swaps one in for a single run of the
# checks and puts the real one back in a finally block.

_REAL_NUMBER_TOKENS = cache.number_tokens
_REAL_ROPE_ANGLES = rope.rope_angles


def mask_missing(t_q: int, t_k: int | None = None) -> np.ndarray:
    """BUG: no causal mask: every query sees every key, the future included."""
    return np.ones((t_q, t_q if t_k is None else t_k), dtype=bool)


def positions_mask_missing(query_pos: np.ndarray, key_pos: np.ndarray,
                           window: int | None = None, sinks: int = 0) -> np.ndarray:
    """The same bug in the model's rule: every real key visible, the future included."""
    visible = key_pos[:, None, None, :] >= 0  # (B, 1, 1, t_k)
    return np.broadcast_to(visible, (len(key_pos), 1, query_pos.shape[1], key_pos.shape[1]))


def mask_upper(t_q: int, t_k: int | None = None) -> np.ndarray:
    """BUG: the triangle flipped: query i sees keys j >= i (its future) instead of j <= i."""
    t_k = t_q if t_k is None else t_k
    return np.triu(np.ones((t_q, t_k), dtype=bool), k=t_k - t_q)


def positions_mask_upper(query_pos: np.ndarray, key_pos: np.ndarray,
                         window: int | None = None, sinks: int = 0) -> np.ndarray:
    """The same bug in the model's rule: a query sees the keys at or after its position."""
    q, k = query_pos[:, None, :, None], key_pos[:, None, None, :]
    return (k >= 0) & (k >= q)


def sdpa_mask_after_softmax(q: np.ndarray, k: np.ndarray, v: np.ndarray,
                            mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """BUG: softmax over every key, then zero the future: rows no longer sum to one."""
    weights = attention.softmax(q @ k.swapaxes(-1, -2) / math.sqrt(q.shape[-1]))
    if mask is not None:
        weights = np.where(mask, weights, 0.0)
    return weights @ v, weights


def sdpa_k_not_transposed(q: np.ndarray, k: np.ndarray, v: np.ndarray,
                          mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """BUG: q @ k instead of q @ k^T: (t_q, d) @ (t_k, d) only 'works' when t_k == d."""
    scores = q @ k / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = np.where(mask, scores, attention.NEG_INF)
    weights = attention.softmax(scores)
    return weights @ v, weights


def sdpa_scaled_by_d_model(q: np.ndarray, k: np.ndarray, v: np.ndarray,
                           mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """BUG: divide the scores by d_model instead of sqrt(d_head): softmax goes nearly flat."""
    d_model = q.shape[-1] * math.prod(q.shape[1:-2])  # head axes sit between batch and time
    scores = q @ k.swapaxes(-1, -2) / d_model
    if mask is not None:
        scores = np.where(mask, scores, attention.NEG_INF)
    weights = attention.softmax(scores)
    return weights @ v, weights


def split_by_reshape(x: np.ndarray, n_heads: int) -> np.ndarray:
    """BUG: reshape straight to (B, H, T, d_head) without the transpose: 'heads' mix tokens."""
    B, T, D = x.shape
    return x.reshape(B, n_heads, T, D // n_heads)


def merge_by_reshape(x: np.ndarray) -> np.ndarray:
    """BUG: reshape (B, H, T, d_head) -> (B, T, D) without transposing back first."""
    B, H, T, dh = x.shape
    return x.reshape(B, T, H * dh)


def merge_forgotten(x: np.ndarray) -> np.ndarray:
    """BUG: the heads are never merged: the output stays (B, H, T, d_head)."""
    return x


def append_concat_wrong_axis(self: cache.KVCache, k: np.ndarray, v: np.ndarray
                             ) -> tuple[np.ndarray, np.ndarray]:
    """BUG: grow the cache with np.concatenate along axis 1 (heads) instead of 2 (time)."""
    if self.length == 0:
        self.grown = (k, v)
    else:
        self.grown = (np.concatenate([self.grown[0], k], axis=1),
                      np.concatenate([self.grown[1], v], axis=1))
    self.length += k.shape[2]
    return self.grown


def mha_caching_queries(x: np.ndarray, p: attention.AttentionParams, mask: np.ndarray | None,
                        cache: cache.KVCache | None = None,
                        rotate: tuple[np.ndarray, np.ndarray] | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
    """BUG: the cache stores the queries where the keys belong (the rest is the real layer)."""
    q = attention.split_heads(x @ p.w_q + p.b_q, p.n_heads)  # (B, T, D) -> (B, H, T, d_head)
    k = attention.split_heads(x @ p.w_k + p.b_k, p.n_kv_heads)
    v = attention.split_heads(x @ p.w_v + p.b_v, p.n_kv_heads)
    if rotate is not None:
        q, k = rope.apply_rope(q, *rotate), rope.apply_rope(k, *rotate)
    if cache is not None:
        k, v = cache.update(q, v)  # the bug: q, not k
    out, weights = attention.grouped_attention(q, k, v, mask)
    return attention.merge_heads(out) @ p.w_o + p.b_o, weights


def positions_restart(count: np.ndarray, real: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """BUG: the new tokens' positions start at 0 every call, ignoring what the cache holds."""
    return _REAL_NUMBER_TOKENS(np.zeros_like(count), real)


def reset_keeps_length(self: cache.ModelCache) -> None:
    """BUG: reset() forgets nothing: the next prompt lands after the stale entries."""


def rope_restart(positions: np.ndarray, d_head: int, base: float = 10000.0,
                 dtype: np.dtype = np.float64) -> tuple[np.ndarray, np.ndarray]:
    """BUG: RoPE angles counted from 0 in every call: a decode step rotates by position 0."""
    positions = np.asarray(positions)
    return _REAL_ROPE_ANGLES(positions - positions[:, :1], d_head, base, dtype)


def window_slot_off_by_one(positions: np.ndarray, window: int, sinks: int) -> np.ndarray:
    """BUG: the rolling buffer's slot counted from position 0, not from the first non-sink: the
    wrap writes over a sink and keeps one key too few of the window."""
    return np.where(positions < sinks, positions, positions % (sinks + window))


def paged_gather_whole_blocks(self: paged.PagedLayer, k: np.ndarray, v: np.ndarray
                              ) -> tuple[np.ndarray, np.ndarray]:
    """BUG: the paged gather returns whole blocks, the unwritten tail of a row's last block
    included. The mask hides those slots, but they hold NaN (poison) and 0 * NaN is NaN."""
    self.write(k, v)
    pool, batch = self.batch.pool, self.batch
    table, _ = self.tables(batch.t_k)
    shape = (len(batch.seq_ids), pool.n_kv_heads, batch.t_k, pool.d_head)
    return tuple(store[np.maximum(table, 0)].transpose(0, 2, 1, 3, 4).reshape(shape)
                 for store in (pool.keys[self.i], pool.values[self.i]))


Swap = tuple[object, str, object]


def everywhere(original: Callable, broken: Callable) -> list[Swap]:
    """Every name in the project's modules bound to `original`. `from attention import
    causal_mask` in block.py makes block.causal_mask a second name for the same function; both
    must be swapped or half the code keeps the real one."""
    def ours(m: object) -> bool:  # the repo's modules (parts/, engine/, ...), not this harness
        path = Path(getattr(m, "__file__", None) or HERE / ".venv")
        return (HERE in path.resolve().parents and ".venv" not in path.parts
                and path.resolve() != Path(__file__).resolve())

    modules = [m for m in list(sys.modules.values()) if ours(m)]
    return [(m, name, broken) for m in modules for name, value in vars(m).items()
            if value is original]


@contextlib.contextmanager
def injected(swaps: list[Swap]) -> Iterator[None]:
    """Swap in broken attributes for the duration of the block; always put the real ones back."""
    saved: list[Swap] = []
    try:
        for owner, name, broken in swaps:
            saved.append((owner, name, getattr(owner, name)))
            setattr(owner, name, broken)
        yield
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


@dataclass
class FailureMode:
    name: str
    swaps: Callable[[], list[Swap]]  # built when used, so it sees the modules loaded by then
    show: int  # the check whose symptom tells the story best


FAILURE_MODES = [
    FailureMode("no causal mask",
                lambda: everywhere(attention.causal_mask, mask_missing)
                + everywhere(attention.mask_from_positions, positions_mask_missing), 1),
    FailureMode("mask applied after softmax",
                lambda: everywhere(attention.scaled_dot_product_attention,
                                   sdpa_mask_after_softmax), 1),
    FailureMode("mask upper triangle (flipped)",
                lambda: everywhere(attention.causal_mask, mask_upper)
                + everywhere(attention.mask_from_positions, positions_mask_upper), 1),
    FailureMode("K not transposed in scores",
                lambda: everywhere(attention.scaled_dot_product_attention,
                                   sdpa_k_not_transposed), 2),
    FailureMode("split heads: reshape, no transpose",
                lambda: everywhere(attention.split_heads, split_by_reshape), 4),
    FailureMode("merge heads: reshape, no transpose",
                lambda: everywhere(attention.merge_heads, merge_by_reshape), 4),
    FailureMode("forgot the merge step",
                lambda: everywhere(attention.merge_heads, merge_forgotten), 2),
    FailureMode("cache concatenated on heads axis",
                lambda: [(cache.KVCache, "update", append_concat_wrong_axis)], 3),
    FailureMode("caching queries instead of keys",
                lambda: everywhere(attention.multi_head_attention, mha_caching_queries), 4),
    FailureMode("decode positions restart at 0",
                lambda: everywhere(cache.number_tokens, positions_restart), 3),
    FailureMode("stale cache: reset() keeps length",
                lambda: [(cache.ModelCache, "reset", reset_keeps_length)], 3),
    FailureMode("scores scaled by d_model, not sqrt",
                lambda: everywhere(attention.scaled_dot_product_attention,
                                   sdpa_scaled_by_d_model), 5),
    FailureMode("RoPE decode position restarts at 0",
                lambda: everywhere(rope.rope_angles, rope_restart), 9),
    FailureMode("rolling buffer wraps one slot off",
                lambda: everywhere(window.slot_of, window_slot_off_by_one), 14),
    FailureMode("paged gather reads past a row's end",
                lambda: [(paged.PagedLayer, "update", paged_gather_whole_blocks)], 18),
]


class GalleryRow(NamedTuple):
    mode: str
    caught_by: list[int]
    symptom: str


def run_failure_modes(numbers: list[int] | None = None) -> tuple[list[Result], list[GalleryRow]]:
    """The clean run first (it must pass), then one run per injected bug; a line on stderr as
    each begins (the gallery prints only once all have run)."""
    with one_thread(), Progress("verify.py --failure-modes", 1 + len(FAILURE_MODES)) as progress:
        progress.stage("the clean implementation")
        clean = run_checks(numbers)
        runs = []
        for mode in FAILURE_MODES:
            progress.stage(f"injected: {mode.name}")
            with injected(mode.swaps()):
                runs.append(run_checks(numbers))
    rows = []
    for mode, results in zip(FAILURE_MODES, runs, strict=True):
        failed = [r for r in results if not r.passed]
        pick = next((r for r in failed if r.number == mode.show), failed[0] if failed else None)
        symptom = f"{pick.number}: {pick.detail}" if pick else "NOT CAUGHT by any check"
        rows.append(GalleryRow(mode.name, [r.number for r in failed], symptom))
    return clean, rows


def format_gallery(rows: list[GalleryRow]) -> str:
    lines = [f"{'failure mode (injected for one run)':<38}caught by checks",
             "    symptom (check: what it measured)", "-" * WIDTH]
    for row in rows:
        caught = " ".join(map(str, row.caught_by)) or "NONE"
        lines.append(f"{row.mode:<38}{caught}")
        lines += textwrap.wrap(row.symptom, WIDTH, initial_indent="    ",
                               subsequent_indent="      ", max_lines=2, placeholder=" ...")
    return "\n".join(lines)


# --- the command ---------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Verify causal attention and the KV cache against "
                                             "PyTorch and Hugging Face GPT-2.")
    ap.add_argument("--verbose", "-v", action="store_true",
                    help="print the matrices, shapes and tensors behind each check")
    ap.add_argument("--only", type=int, nargs="+", metavar="N", choices=sorted(CHECKS),
                    help="run only these checks")
    ap.add_argument("--failure-modes", action="store_true",
                    help="inject each classic bug and show which checks catch it")
    args = ap.parse_args(argv)
    if args.failure_modes:  # a flag the run would ignore is refused, not dropped
        refuse_unused(ap, args, ["--verbose"], "prints the data behind each check; "
                      "--failure-modes prints one line per injected bug")
    if args.only:
        args.only = sorted(set(args.only))  # "--only 1 1" is check 1, once

    start = time.perf_counter()
    print("Causal self-attention + KV cache (NumPy) vs PyTorch / Hugging Face GPT-2")
    if args.failure_modes:
        clean, rows = run_failure_modes(args.only)
        clean_ok = all(r.passed for r in clean)
        print(f"clean implementation: {sum(r.passed for r in clean)}/{len(clean)} checks pass"
              + ("" if clean_ok else "  <- the clean run must pass first"))
        for r in clean:
            if not r.passed:
                print(format_result(r))
        print(format_gallery(rows))
        missed = [row.mode for row in rows if not row.caught_by]
        print(f"{len(rows) - len(missed)}/{len(rows)} failure modes caught "
              f"in {time.perf_counter() - start:.1f} s")
        return 0 if clean_ok and not missed else 1

    print(HEADER)
    print("-" * WIDTH)
    results = []
    with one_thread():
        for n in args.only or sorted(CHECKS):
            results.append(CHECKS[n]())
            print(format_result(results[-1], args.verbose), flush=True)
    passed = sum(r.passed for r in results)
    print("-" * WIDTH)
    print(f"{passed}/{len(results)} checks passed in {time.perf_counter() - start:.1f} s "
          "(float64 errors prove exactness; float32 notes\nshow what a user sees; --verbose "
          "prints the data behind each line)")
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
