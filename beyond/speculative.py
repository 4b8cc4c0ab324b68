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

With the reversal model and its draft, one round's table, the benchmark and the profile are
`python tools/speculative.py --round`, `--bench`, `--profile`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from block import GPT
from cache import ModelCache
from generate import Generation, prefill, prepare_request
from parts.checks import is_int
from parts.sampling import Sampler, draw, sampling_probs


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


def check_request(
    target: GPT, draft: GPT, prompt_ids: np.ndarray | Sequence[np.ndarray], max_new_tokens: int,
    gamma: int = 4, attention_mask: np.ndarray | None = None, pad_id: int = 0,
    eos_id: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """generate_speculative's door without the decoding: the pair (check_pair), the request as
    generate_cached checks it, batch 1, and room in both models' caches. Returns ids (1, P) and
    the mask (1, P); raises TypeError/ValueError naming the argument. A command checks every
    request with it before printing anything."""
    check_pair(target, draft, gamma)
    ids, mask = prepare_request(target, prompt_ids, max_new_tokens, attention_mask, pad_id, eos_id)
    B, P = ids.shape
    if B != 1:
        raise ValueError(f"prompt_ids: generate_speculative decodes one prompt at a time (the "
                         f"rounds of different rows accept different numbers of tokens), got a "
                         f"batch of {B}")
    check_room("target", target, P + max_new_tokens, P, max_new_tokens)
    check_room("draft", draft, P + max_new_tokens - 1, P, max_new_tokens)  # not the last one
    return ids, mask


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
    sampler = Sampler(temperature, top_k, top_p, rng)
    ids, mask = check_request(target, draft, prompt_ids, max_new_tokens, gamma, attention_mask,
                              pad_id, eos_id)
    P = ids.shape[1]
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

