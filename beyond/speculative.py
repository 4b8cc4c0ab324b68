"""Speculative decoding: a small draft model guesses, the big target checks the guesses at once.

    one round (the target's cache holds every token but the newest one, x):
      1. draft    the draft runs gamma cheap decode steps: d_1 .. d_gamma, d_i drawn from q_i
      2. verify   ONE target forward over [x, d_1, .., d_gamma] through its cache gives
                  p_1 .. p_{gamma+1}; p_i is the target's distribution for the slot d_i fills
      3. accept   d_i, in order, with probability min(1, p_i(d_i) / q_i(d_i))
                  (greedy: while d_i == argmax p_i)
      4. fix      at the first rejected slot i, draw from norm(max(0, p_i - q_i)) instead
                  (greedy: argmax p_i); if all gamma are accepted, draw a bonus from p_{gamma+1}
      5. rollback both caches are truncated to the accepted tokens

A round emits 1 to gamma + 1 tokens for one target call, and the tokens are the target's: in
greedy mode exactly generate_cached's, in sampling mode drawn from exactly the target's
distribution (temperature, top-k and top-p as parts/sampling.py applies them), whatever the
draft. A bad draft only costs time. The argument is in docs/speculative.md.

    python beyond/speculative.py --round     every round of one sampled answer, accept/reject
    python beyond/speculative.py --bench     acceptance, tokens/s vs generate_cached, gamma 1..6
    python beyond/speculative.py --profile   where a decode step's time goes (target and draft)
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python beyond/speculative.py` from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from block import GPT
from cache import ModelCache
from generate import Generation, generate_cached, prefill, prepare_request
from parts.checks import is_int
from parts.sampling import Sampler, draw, sampling_probs

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "checkpoints" / "reverse.npz"
DRAFT = ROOT / "checkpoints" / "reverse_draft.npz"


class Round(NamedTuple):
    """What one round did. The probabilities are NaN in greedy mode (no draw is made)."""

    start: int  # tokens emitted before the round
    drafts: np.ndarray  # (g,) the draft's proposals d_1 .. d_g
    q: np.ndarray  # (g,) q_i(d_i): the draft's probability of its own proposal
    p: np.ndarray  # (g,) p_i(d_i): the target's probability of the same token
    u: np.ndarray  # (g,) the uniform number each test used (NaN where no test was made)
    accepted: int  # k: how many proposals were kept (0 .. g)
    token: int  # the target's own token after them: the fix at slot k + 1, or the bonus
    target_logits: np.ndarray  # (g + 1, V) the verify call's logits, slot by slot


class SpeculativeGeneration(NamedTuple):
    """generate.Generation's fields (batch 1), plus the record of every round."""

    tokens: np.ndarray  # (1, N) the new tokens
    logits: np.ndarray  # (1, N, V) the target's logits each new token was chosen from
    cache_lengths: list[int]  # positions the target had seen when scoring token n: P + n
    rounds: list[Round]  # after the first token (from the prefill), one entry per target call

    @property
    def accepted(self) -> int:
        """Draft tokens kept."""
        return sum(r.accepted for r in self.rounds)

    @property
    def proposed(self) -> int:
        """Draft tokens made (those after a rejection are thrown away untested)."""
        return sum(len(r.drafts) for r in self.rounds)

    @property
    def rejected(self) -> int:
        """Rounds that ended in a rejection (at most one per round)."""
        return sum(r.accepted < len(r.drafts) for r in self.rounds)

    @property
    def acceptance_rate(self) -> float:
        """a: the share of TESTED draft tokens accepted, accepted / (accepted + rejected), the
        per-token chance the speed-up formula takes. NaN if nothing was tested."""
        tested = self.accepted + self.rejected
        return self.accepted / tested if tested else math.nan

    def generation(self) -> Generation:
        return Generation(self.tokens, self.logits, self.cache_lengths)


# --- the door ------------------------------------------------------------------------------------

def check_pair(target: object, draft: object, gamma: object) -> None:
    """Refuse a target or draft that is not a GPT, drafts in another vocabulary, or a gamma that
    is not an int >= 1 (TypeError/ValueError naming the argument)."""
    for name, model in (("target", target), ("draft", draft)):
        if not isinstance(model, GPT):
            raise TypeError(f"{name} must be a GPT, got {type(model).__name__}")
    if not is_int(gamma):
        raise TypeError(f"gamma (draft tokens per round) must be an int >= 1, got "
                        f"{type(gamma).__name__} {gamma!r}")
    if gamma < 1:
        raise ValueError(f"gamma (draft tokens per round) must be >= 1, got {gamma}")
    V, V_draft = target.config.vocab_size, draft.config.vocab_size
    if V_draft != V:
        raise ValueError(f"draft has vocab_size={V_draft}, the target {V}: the draft must propose "
                         "tokens of the target's vocabulary")


def check_room(name: str, model: GPT, need: int, P: int, max_new_tokens: int) -> None:
    """Refuse a request whose `need` positions do not fit the model's cache. Both caches are the
    models' own (model.new_cache: max_seq_len positions), with a sliding window too: a rolling
    buffer could not take back the keys of rejected drafts once it has overwritten the ones
    they replaced."""
    room = model.config.max_seq_len
    if need > room:
        raise ValueError(f"{name} has max_seq_len={room}: its cache holds {room} positions (a "
                         f"sliding_window model decodes speculatively only within them), but a "
                         f"prompt of {P} + max_new_tokens={max_new_tokens} needs {need}")


# --- one round -----------------------------------------------------------------------------------

def propose(draft: GPT, cache: ModelCache, unseen: np.ndarray, g: int, sampler: Sampler
            ) -> tuple[np.ndarray, np.ndarray | None]:
    """g draft tokens (g,), and q (g, V), the draft's sampling distribution at each (None when
    greedy). `unseen` (1 or 2,) are the tokens the draft's cache lacks; they go in as one chunk,
    then each proposal is fed back one at a time: g calls of the draft."""
    drafts = np.empty(g, dtype=np.int64)
    q = None if sampler.is_greedy else np.empty((g, draft.config.vocab_size))
    step = unseen
    for i in range(g):
        logits = draft(step[None], cache, last_only=True)[:, -1]  # (1, t) -> (1, V)
        if q is None:
            drafts[i] = logits[0].argmax()
        else:
            q[i] = sampling_probs(logits, sampler.temperature, sampler.top_k, sampler.top_p)[0]
            drafts[i] = draw(q[i:i + 1], sampler.rng)[0]
        step = drafts[i:i + 1]
    return drafts, q


def accept_greedy(target_logits: np.ndarray, drafts: np.ndarray) -> tuple[int, int]:
    """target_logits (g + 1, V), drafts (g,) -> (k, token): the drafts agree with the target's
    argmax up to slot k, and token is the target's argmax at slot k + 1."""
    best = target_logits.argmax(axis=-1)  # (g + 1,): the target's own choice at every slot
    wrong = drafts != best[:len(drafts)]
    k = int(np.argmax(wrong)) if wrong.any() else len(drafts)
    return k, int(best[k])


def accept_sampled(p: np.ndarray, q: np.ndarray, drafts: np.ndarray, rng: np.random.Generator
                   ) -> tuple[int, int, np.ndarray]:
    """p (g + 1, V) target and q (g, V) draft distributions, drafts (g,) -> (k, token, u).

    Slot i keeps d_i if u_i < p_i(d_i) / q_i(d_i) (written u q < p: q(d_i) > 0, since d_i was
    drawn from q). The first rejection draws the token from the leftover norm(max(0, p_i - q_i));
    when all are kept, the bonus is drawn from p_{g+1}."""
    g = len(drafts)
    u = np.full(g, np.nan)
    for i, x in enumerate(drafts):
        u[i] = rng.random()
        if u[i] * q[i, x] < p[i, x]:
            continue
        leftover = np.maximum(p[i] - q[i], 0.0)  # (V,) > 0 somewhere, since q(x) > p(x) here
        if not leftover.sum() > 0:  # only if p and q differ by rounding alone: then p is exact
            leftover = p[i]
        return i, int(draw(leftover[None], rng)[0]), u
    return g, int(draw(p[g:g + 1], rng)[0]), u


def speculative_round(target: GPT, draft: GPT, target_cache: ModelCache, draft_cache: ModelCache,
                      seq: np.ndarray, end: int, g: int, sampler: Sampler) -> Round:
    """One round on seq[:end] (the prompt, padding included, and the tokens so far), unchecked:
    generate_speculative checked the request. On entry the target's cache holds seq[:end - 1] and
    the draft's a prefix of it; on return the target's holds seq[:end + k] (everything but the
    new last token) and the draft's seq[:end + k] or one less (it never saw d_g when all g were
    accepted: that token goes in at the start of its next round)."""
    drafts, q = propose(draft, draft_cache, seq[len(draft_cache):end], g, sampler)
    chunk = np.concatenate([seq[end - 1:end], drafts])  # (g + 1,): x, then the proposals
    logits = target(chunk[None], target_cache)[0]  # (1, g + 1) -> (1, g + 1, V) -> (g + 1, V)
    nan = np.full(g, np.nan)
    if sampler.is_greedy:
        (k, token), u, p_d, q_d = accept_greedy(logits, drafts), nan, nan, nan
    else:
        p = sampling_probs(logits, sampler.temperature, sampler.top_k, sampler.top_p)  # (g+1, V)
        k, token, u = accept_sampled(p, q, drafts, sampler.rng)
        p_d, q_d = p[np.arange(g), drafts], q[np.arange(g), drafts]  # (g,) each
    target_cache.truncate(end + k)  # x and the k kept proposals stay; the rest are rolled back
    draft_cache.truncate(min(len(draft_cache), end + k))
    return Round(end, drafts, q_d, p_d, u, k, token, logits)


# --- the decoder ---------------------------------------------------------------------------------

def generate_speculative(
    target: GPT, draft: GPT, prompt_ids: np.ndarray | Sequence[np.ndarray], max_new_tokens: int,
    *, gamma: int = 4, attention_mask: np.ndarray | None = None, pad_id: int = 0,
    eos_id: int | None = None, temperature: float | None = None, top_k: int | None = None,
    top_p: float | None = None, rng: np.random.Generator | None = None,
) -> SpeculativeGeneration:
    """The target's generation, with the draft proposing gamma tokens per target call.

    Arguments as generate_cached's (prompt_ids (1, P) or a list of one prompt; greedy unless
    temperature > 0); one prompt only. Returns tokens (1, N), the target's logits (1, N, V), the
    prefix length P + n of every token, and each round's record (acceptance_rate, ...).
    Checks its own door, all before any model runs: target and draft GPTs of one vocabulary, gamma
    an int >= 1, the request as generate_cached checks it, batch 1, the draft long enough.
    """
    check_pair(target, draft, gamma)
    sampler = Sampler(temperature, top_k, top_p, rng)
    ids, mask = prepare_request(target, prompt_ids, max_new_tokens, attention_mask, pad_id, eos_id)
    B, P = ids.shape
    if B != 1:
        raise ValueError(f"prompt_ids: generate_speculative decodes one prompt at a time (the "
                         f"rounds of different rows accept different numbers of tokens), got a "
                         f"batch of {B}")
    check_room("target", target, P + max_new_tokens, P, max_new_tokens)
    check_room("draft", draft, P + max_new_tokens - 1, P, max_new_tokens)  # not the last one
    target_cache, draft_cache = target.new_cache(1), draft.new_cache(1)

    seq = np.empty(P + max_new_tokens, dtype=np.int64)  # the prompt, then every token emitted
    seq[:P] = ids[0]
    logits = np.empty((1, max_new_tokens, target.config.vocab_size), dtype=target.dtype)
    logits[:, 0] = prefill(target, ids, target_cache, attention_mask=mask)  # (1, V)
    prefill(draft, ids, draft_cache, attention_mask=mask)  # both caches keep the padding flags
    seq[P] = sampler(logits[:, 0])[0]  # the first token is the target's own, as in cached
    n, rounds = 1, []
    while n < max_new_tokens and seq[P + n - 1] != eos_id:
        g = min(gamma, max_new_tokens - n - 1)  # k + 1 <= g + 1 tokens never overshoot
        r = speculative_round(target, draft, target_cache, draft_cache, seq, P + n, g, sampler)
        new = [*r.drafts[:r.accepted], r.token]
        if eos_id is not None and eos_id in new:
            new = new[:new.index(eos_id) + 1]  # the answer ends at eos: later tokens dropped
        seq[P + n:P + n + len(new)] = new
        logits[0, n:n + len(new)] = r.target_logits[:len(new)]
        n += len(new)
        rounds.append(r)
    return SpeculativeGeneration(seq[None, P:P + n], logits[:, :n], list(range(P, P + n)),
                                 rounds)


def expected_speedup(a: float, gamma: int, c: float) -> float:
    """Tokens per unit of time relative to plain decoding, for acceptance rate a, gamma drafts
    per round and a draft step costing c target steps: a round emits (1 - a^(gamma+1)) / (1 - a)
    tokens on average and costs gamma c + 1 target steps."""
    tokens = gamma + 1 if a >= 1 else (1 - a ** (gamma + 1)) / (1 - a)
    return tokens / (gamma * c + 1)



# --- beside generate_cached, for `python generate.py --draft PATH` --------------------------------

def versus_cached(target: GPT, draft: GPT, prompts: list[np.ndarray], eos_id: int | None,
                  gamma: int = 4, repeats: int = 5) -> bool:
    """Decode each prompt (batch 1, greedy, len(prompt) new tokens at most) with generate_cached
    and generate_speculative, interleaved `repeats` times; print the acceptance rate and both
    speeds (medians). True if every speculative answer is the cached one, token for token."""
    import time

    times: dict[str, list[float]] = {"cached": [], "speculative": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        cached = [generate_cached(target, p[None], len(p), eos_id=eos_id) for p in prompts]
        t1 = time.perf_counter()
        spec = [generate_speculative(target, draft, p[None], len(p), gamma=gamma, eos_id=eos_id)
                for p in prompts]
        times["cached"].append(t1 - t0)
        times["speculative"].append(time.perf_counter() - t1)
    same = all(np.array_equal(c.tokens, s.tokens) for c, s in zip(cached, spec, strict=True))
    accepted = sum(s.accepted for s in spec)
    tested = accepted + sum(s.rejected for s in spec)
    tokens = sum(s.tokens.shape[1] for s in spec)
    calls = sum(len(s.rounds) + 1 for s in spec)
    c = draft.config
    print(f"\nspeculative decoding, gamma {gamma}, draft d_model={c.d_model} heads={c.n_heads} "
          f"layers={c.n_layers}, one prompt at a time (batch 1):")
    print(f"tokens identical to cached greedy: {same}")
    print(f"acceptance rate a = {accepted / max(tested, 1):.3f} ({accepted} of {tested} draft "
          f"tokens tested); {tokens / calls:.2f} tokens per target call")
    seconds = {name: float(np.median(t)) for name, t in times.items()}
    for name, sec in seconds.items():
        print(f"time {name:<11}: {1e3 * sec:8.2f} ms = {tokens / sec:8.0f} tokens/s "
              f"(median of {repeats})")
    print(f"speculative / cached tokens/s: {seconds['cached'] / seconds['speculative']:.2f}x "
          "(tiny models: a draft step costs nearly a target step; see docs/speculative.md)")
    return same


# --- the commands: one round's table, the benchmark, the profile ---------------------------------

EOS_ID = ord(".")  # parts.task.END: the reversal answer's last token


def show(token: int) -> str:
    return repr(chr(token)) if 32 <= token < 127 else str(token)


def print_rounds(out: SpeculativeGeneration, gamma: int) -> None:
    """One line per draft token tested, and one for the target's own token of each round."""
    print(f"{'round':>5}  {'slot':>5}  {'draft':>5}  {'q(draft)':>8}  {'p(draft)':>8}  {'u':>5}  "
          "verdict")
    print(f"{0:>5}  {'-':>5}  {'-':>5}  {'':>8}  {'':>8}  {'':>5}  "
          f"{show(int(out.tokens[0, 0]))} from the target's prefill (p)")
    for n, r in enumerate(out.rounds, start=1):
        for i, x in enumerate(r.drafts[:r.accepted + 1]):
            kept = i < r.accepted
            verdict = "accept" if kept else (f"reject: {show(r.token)} drawn from "
                                             "norm(max(0, p - q))")
            print(f"{n:>5}  {i + 1:>5}  {show(int(x)):>5}  {r.q[i]:8.3f}  {r.p[i]:8.3f}  "
                  f"{r.u[i]:5.3f}  {verdict}")
        if r.accepted == len(r.drafts):
            print(f"{n:>5}  {'bonus':>5}  {'-':>5}  {'':>8}  {'':>8}  {'':>5}  "
                  f"{show(r.token)} drawn from p (all {len(r.drafts)} accepted)")


def round_table(args: argparse.Namespace) -> int:
    """--round: every round of one sampled reversal, then the same prompt greedy, checked
    against generate_cached."""
    from parts import task

    target, draft = GPT.load(TARGET, dtype="float64"), GPT.load(args.draft, dtype="float64")
    prompt = task.make_prompt(args.prompt)
    ids = task.encode(prompt)[None]  # (1, P)
    print(f"target {TARGET.name} (d_model {target.config.d_model}), draft {Path(args.draft).name} "
          f"(d_model {draft.config.d_model}), float64; prompt {prompt!r}, gamma {args.gamma}, "
          f"temperature {args.temperature}, seed {args.seed}\n")
    out = generate_speculative(target, draft, ids, len(prompt), gamma=args.gamma, eos_id=EOS_ID,
                               temperature=args.temperature,
                               rng=np.random.default_rng(args.seed))
    print_rounds(out, args.gamma)
    N = out.tokens.shape[1]
    print(f"\nsampled answer: {task.decode(out.tokens[0])!r}: {N} tokens from "
          f"{1 + len(out.rounds)} target calls (cached decoding: {N}); accepted {out.accepted} of "
          f"{out.accepted + out.rejected} draft tokens tested, a = {out.acceptance_rate:.3f}")
    greedy_spec = generate_speculative(target, draft, ids, len(prompt), gamma=args.gamma,
                                       eos_id=EOS_ID)
    cached = generate_cached(target, ids, len(prompt), eos_id=EOS_ID)
    same = bool(np.array_equal(greedy_spec.tokens, cached.tokens))
    print(f"greedy answer:  {task.decode(greedy_spec.tokens[0])!r}: identical to "
          f"generate_cached: {same}")
    return 0 if same else 1


def heavier(target: GPT, extra_layers: int, d_ff: int) -> GPT:
    """The same function at more cost per step: every MLP widened to d_ff with zero weights
    (the new hidden units are gelu(0) = 0 and add nothing) and extra_layers blocks appended whose
    output projections and biases are zero (the residual stream passes through unchanged)."""
    from dataclasses import replace

    from block import random_weights, weight_shapes

    c = replace(target.config, n_layers=target.config.n_layers + extra_layers, d_ff=d_ff)
    shapes = weight_shapes(c)
    named = random_weights(c, seed=1)  # the extra blocks do real work...
    for name, shape in shapes.items():
        if name.split(".")[-1] in ("w_o", "b_o", "w_proj", "b_proj"):
            named[name] = np.zeros(shape)  # ...but write nothing into the stream
    for name, w in target.named_weights().items():
        named[name] = np.zeros(shapes[name])
        named[name][tuple(slice(0, n) for n in w.shape)] = w  # the trained weights, zero-padded
    return type(target)(c, dtype=target.dtype, weights=named)


def step_costs(target: GPT, draft: GPT, gammas: Sequence[int], rounds: int) -> dict[str, float]:
    """Median ms of one decode step of each model and of the target's verify call over g + 1
    tokens, after the same 13-token prompt (the middle of the reversal lengths); interleaved."""
    from generate import decode
    from tools.bench import interleave, no_gc, summary

    prompt = np.full((1, 13), ord("a"))  # (1, 13)
    caches = {}
    for name, model in (("target", target), ("draft", draft)):
        caches[name] = model.new_cache(1)
        prefill(model, prompt, caches[name])

    def step(name: str, model: GPT) -> object:
        def run() -> None:
            decode(model, np.array([ord("a")]), caches[name])
            caches[name].truncate(13)
        return run

    def verify(g: int) -> object:
        def run() -> None:
            target(np.full((1, g + 1), ord("a")), caches["target"])
            caches["target"].truncate(13)
        return run

    variants = {"target": step("target", target), "draft": step("draft", draft)}
    variants |= {f"verify {g}": verify(g) for g in gammas}
    with no_gc():
        times = interleave(variants, rounds, {name: 20 for name in variants})
    return {name: summary(t)["median_ms"] for name, t in times.items()}


def speed_table(target: GPT, draft: GPT, prompts: list[np.ndarray], gammas: Sequence[int],
                rounds: int) -> bool:
    """Acceptance, tokens/s of speculative vs generate_cached (interleaved, medians) and the
    formula beside the measurement, for every gamma. True if every decode matched cached."""
    from tools.bench import interleave, no_gc, summary

    def cached() -> list:
        return [generate_cached(target, p[None], len(p), eos_id=EOS_ID) for p in prompts]

    def speculative(g: int) -> object:
        return lambda: [generate_speculative(target, draft, p[None], len(p), gamma=g,
                                             eos_id=EOS_ID) for p in prompts]

    reference = cached()
    tokens = sum(r.tokens.shape[1] for r in reference)
    stats, same = {}, True
    for g in gammas:
        runs = speculative(g)()
        same &= all(np.array_equal(r.tokens, s.tokens) for r, s in zip(reference, runs,
                                                                         strict=True))
        accepted = sum(s.accepted for s in runs)
        tested = accepted + sum(s.rejected for s in runs)
        stats[g] = (accepted / tested, tokens / sum(len(s.rounds) + 1 for s in runs))
    variants = {"cached": cached} | {f"gamma {g}": speculative(g) for g in gammas}
    with no_gc():
        times = interleave(variants, rounds)
    ms = {name: summary(t)["median_ms"] for name, t in times.items()}
    cost = step_costs(target, draft, gammas, rounds)
    c = cost["draft"] / cost["target"]
    print(f"decode step: target {cost['target']:.3f} ms, draft {cost['draft']:.3f} ms: c = {c:.2f}"
          f"; the verify call over g + 1 tokens costs v = verify / step target steps")
    print(f"{tokens} tokens, every decode identical to generate_cached: {same}")
    print("tokens per target call: the formula's (1 - a^(gamma+1)) / (1 - a) per round, and the "
          "measured one (the prefill call included)")
    print(f"{'gamma':>5}  {'a':>5}  {'formula':>7}  {'measured':>8}  {'v':>4}  {'cached':>14}  "
          f"{'speculative':>14}  {'speed-up':>8}  {'formula':>7}  {'formula, v':>10}")
    cached_rate = tokens / ms["cached"] * 1e3
    for g in gammas:
        a, per_call = stats[g]
        v = cost[f"verify {g}"] / cost["target"]
        rate = tokens / ms[f"gamma {g}"] * 1e3
        per_round = expected_speedup(a, g, 0.0)  # c = 0: the tokens a round emits on average
        with_v = per_round / (g * c + v)
        print(f"{g:>5}  {a:5.3f}  {per_round:7.2f}  {per_call:8.2f}  {v:4.2f}  "
              f"{cached_rate:7.0f} tokens/s  {rate:7.0f} tokens/s  {rate / cached_rate:7.2f}x  "
              f"{expected_speedup(a, g, c):6.2f}x  {with_v:9.2f}x")
    return same


def bench(args: argparse.Namespace) -> int:
    """--bench: the shipped pair, then the same target made heavier (same tokens)."""
    from threadpoolctl import threadpool_limits

    from parts import task
    from tools.bench import machine_header, print_header

    print_header(machine_header())
    target, draft = GPT.load(TARGET), GPT.load(args.draft)  # float32, the engine: as shipped
    texts = task.random_prompts(task.prompt_rng(0, "test"), args.n)
    prompts = [task.encode(p) for p in texts]
    gammas = range(1, 7)
    print(f"greedy, batch 1, {args.n} held-out reversal prompts (test stream, seed 0), one BLAS "
          f"thread; medians of {args.rounds or 5} interleaved repeats")
    print("formula: (1 - a^(gamma+1)) / ((1 - a)(gamma c + 1)); 'formula, v' puts the measured "
          "verify cost v in place of its 1\n")
    with threadpool_limits(limits=1, user_api="blas"):
        print(f"1. the shipped pair: {TARGET.name} (d_model {target.config.d_model}) and "
              f"{Path(args.draft).name} (d_model {draft.config.d_model})")
        same = speed_table(target, draft, prompts, gammas, args.rounds or 5)
        big = heavier(target, args.extra_layers, args.d_ff)
        same_fn = all(np.array_equal(
            generate_cached(big, p[None], len(p), eos_id=EOS_ID).tokens,
            generate_cached(target, p[None], len(p), eos_id=EOS_ID).tokens) for p in prompts)
        print(f"\n2. a heavier target computing the same function: {TARGET.name} with "
              f"{args.extra_layers} blocks added that write nothing and d_ff {args.d_ff} (zero "
              f"weights): {big.config.n_layers} layers; its tokens equal the trained target's: "
              f"{same_fn}")
        same &= speed_table(big, draft, prompts, gammas, args.rounds or 5) and same_fn
    return 0 if same else 1


def print_product_times(d_ff: int, rounds: int) -> None:
    """Why the verify call costs more than a step: x (t, D) @ W for t = 1 (a decode step) and
    t = 2, 5 (a verify call), float32, W of the heavier target's MLP."""
    from threadpoolctl import threadpool_limits

    from tools.bench import interleave, no_gc, summary

    rng = np.random.default_rng(0)
    w_fc = rng.standard_normal((128, d_ff)).astype(np.float32)  # (D, d_ff)
    w_proj = rng.standard_normal((d_ff, 128)).astype(np.float32)  # (d_ff, D)
    variants = {}
    for t in (1, 2, 5):
        x, h = (rng.standard_normal((t, n)).astype(np.float32) for n in (128, d_ff))
        variants[f"{t}"] = lambda x=x, h=h: (x @ w_fc, h @ w_proj)
    with threadpool_limits(limits=1, user_api="blas"), no_gc():
        times = interleave(variants, rounds, {name: 50 for name in variants})
    us = {t: 1e3 * summary(times[t])["median_ms"] for t in variants}
    print(f"\nthe MLP's two products of the heavier target, (t, 128) @ (128, {d_ff}) and (t, "
          f"{d_ff}) @ ({d_ff}, 128), float32, one BLAS thread: "
          + ", ".join(f"t = {t}: {v:.1f} us" for t, v in us.items())
          + f" ({us['2'] / us['1']:.1f}x for a second row: a matrix-vector product streams W once; "
          "a matrix-matrix product also packs it into blocks)")


def profile(args: argparse.Namespace) -> int:
    """--profile: one decode step of each model split into matrix products, attention,
    elementwise work, cache writes and the Python around them (tools/bench.py's breakdown), and
    cProfile's busiest functions over one speculative decode."""
    import cProfile
    import io
    import pstats

    from threadpoolctl import threadpool_limits

    from parts import task
    from tools.bench import OVERHEAD, PARTS, no_gc, step_breakdown

    target, draft = GPT.load(TARGET), GPT.load(args.draft)
    models = {"target": target, "draft": draft,
              "heavier target": heavier(target, args.extra_layers, args.d_ff)}
    prompt = task.encode("abcdefghijkl=")[None]  # (1, 13)
    with threadpool_limits(limits=1, user_api="blas"), no_gc():
        parts = {name: step_breakdown(m, prompt, True, args.rounds or 30)
                 for name, m in models.items()}
    print("one decode step after 13 tokens, batch 1, one BLAS thread: each part timed alone with "
          "the step's own calls; the rest = measured total - parts")
    print(f"{'part':<18}" + "".join(f"{name:>24}" for name in models))
    for part in (*PARTS, OVERHEAD):
        print(f"{part:<18}" + "".join(
            f"{p['parts_ms'][part]:>13.3f} ms {100 * p['share'][part]:5.1f}%"
            for p in parts.values()))
    print(f"{'total':<18}" + "".join(f"{p['total_ms']:>13.3f} ms {100.0:5.1f}%"
                                     for p in parts.values()))
    print_product_times(args.d_ff, args.rounds or 30)
    text = "abcdefghijklmnopqrstuvwx="
    profiler = cProfile.Profile()
    with threadpool_limits(limits=1, user_api="blas"):
        profiler.runcall(lambda: [generate_speculative(target, draft, task.encode(text)[None],
                                                       len(text), eos_id=EOS_ID)
                                  for _ in range(20)])
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(8)
    print(f"\ncProfile, 20 speculative decodes of {text!r} (shipped pair, gamma 4), the 8 "
          "functions with the most time of their own:")
    lines = stream.getvalue().splitlines()
    start = next(i for i, line in enumerate(lines) if "ncalls" in line)
    print("\n".join(line.replace(str(ROOT) + "/", "") for line in lines[start:start + 9]))
    return 0


def main(argv: list[str] | None = None) -> int:
    from parts.checks import SEED, cli_int

    ap = argparse.ArgumentParser(description="Speculative decoding with the reversal model and "
                                             "its draft: one round's table, the benchmark, the "
                                             "profile.")
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--round", action="store_true",
                      help="print every round of one sampled answer: accept or reject")
    what.add_argument("--bench", action="store_true",
                      help="acceptance rate, tokens/s vs generate_cached, formula, gamma 1..6")
    what.add_argument("--profile", action="store_true",
                      help="where a decode step's time goes, target and draft")
    ap.add_argument("--draft", default=str(DRAFT), help=f"the draft checkpoint (default {DRAFT})")
    ap.add_argument("--prompt", default="speculative decoding",
                    help="--round: the characters to reverse")
    ap.add_argument("--gamma", type=cli_int(1, 64), default=4, help="--round: drafts per round")
    ap.add_argument("--temperature", type=float, default=1.0, help="--round: default 1.0")
    ap.add_argument("--seed", type=SEED, default=0, help="--round: the sampling seed")
    ap.add_argument("--n", type=cli_int(1), default=40, help="--bench: prompts (default 40)")
    ap.add_argument("--rounds", type=cli_int(1), default=None,
                    help="interleaved repeats (default: 5 with --bench, 30 with --profile)")
    ap.add_argument("--extra-layers", type=cli_int(0, 64), default=10,
                    help="--bench, --profile: blocks added to the heavier target (default 10)")
    ap.add_argument("--d-ff", type=cli_int(1, 1 << 16), default=2048,
                    help="--bench, --profile: the heavier target's MLP width (default 2048)")
    args = ap.parse_args(argv)
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        ap.error(f"--temperature must be a finite number >= 0, got {args.temperature}")
    try:
        if args.round:
            return round_table(args)
        return bench(args) if args.bench else profile(args)
    except (OSError, ValueError) as err:
        ap.error(str(err))
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
