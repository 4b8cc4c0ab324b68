"""Decoding, two ways: recompute the whole prefix every step (naive), or keep K and V (cached).

    naive:   step n runs the model on all P + n tokens, keeps the last row of logits.
    cached:  prefill runs the P prompt tokens once (in chunks if asked) and fills the cache;
             decode then runs ONE token per step against the cached keys and values.

Both are the same loop (`decode_loop`) calling the same model code; only the amount of work per
step differs. `python generate.py` runs both from the same prompts and shows they agree.

A batch of prompts of different lengths is LEFT-padded into one (B, P) array with an attention
mask (1 real, 0 pad), so every row's newest token sits in the last column and one decode step
serves all rows. prefill hands the mask to the cache, which keeps it: a token's position is the
number of real tokens before it in its row (a row's first real token is position 0 however much
padding precedes it) and pad keys are hidden, so every row decodes exactly as if it were alone.

Stopping: with eos_id, a row that emits eos_id is finished; from then on it repeats eos_id (the
batch still runs it, so its later logits are computed, but they mean nothing), while the other
rows go on. Decoding stops when every row is finished or after max_new_tokens steps, so the
returned arrays have N = the number of steps actually taken. Generation never runs past the
model's max_seq_len: a request for more is refused before any work (it is not cropped).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from block import GPT, GPTConfig
from cache import CACHE_DTYPES, Cache
from parts import task
from parts.checks import (
    SEED,
    cli_float,
    cli_int,
    cli_load,
    fits_in_memory,
    float_dtype,
    int_array,
    is_int,
    optional_positive_int,
    positive_int,
    refuse_unused,
    token_ids,
    zero_one_mask,
)
from parts.sampling import Sampler, greedy

__all__ = ["Generation", "decode", "decode_loop", "generate_cached", "generate_naive", "greedy",
           "left_pad", "main", "prefill", "prepare_request"]


class Generation(NamedTuple):
    tokens: np.ndarray  # (B, N) the new tokens; N = steps taken (<= max_new_tokens with eos_id)
    logits: np.ndarray  # (B, N, V) the logits each new token was chosen from
    cache_lengths: list[int] | None  # cached: cache length when token n was chosen: P, P + 1, ...


# --- checking and batching a request -------------------------------------------------------------

INT64_MAX = int(np.iinfo(np.int64).max)  # the ids array is int64


def left_pad(prompts: Sequence[np.ndarray], pad_id: int = 0, *, vocab_size: int | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """B 1-D prompts of lengths L_b -> ids (B, P) and attention_mask (B, P), P = max L_b.

    Row b is P - L_b copies of pad_id, then its prompt; the mask is 0 on pads and 1 on real
    tokens. Left rather than right, so that every row's newest token is in the last column.
    pad_id is a token id: an int >= 0, below vocab_size when it is given (a float would be cut
    to an int by the int64 array, 2.7 padding with 2).
    """
    if not is_int(pad_id):
        raise TypeError(f"pad_id must be an int token id, got {pad_id!r:.40} "
                        f"({type(pad_id).__name__})")
    high = INT64_MAX + 1 if vocab_size is None else positive_int("vocab_size", vocab_size)
    if not 0 <= pad_id < high:
        raise ValueError(f"pad_id must be a token id in [0, {high}), got {pad_id!r:.40}")
    if isinstance(prompts, np.ndarray) or not isinstance(prompts, Sequence) or not prompts:
        raise TypeError(f"prompts must be a non-empty list of 1-D int arrays, got {prompts!r:.60}")
    rows = [int_array(f"prompt_ids[{b}]", p, 1) for b, p in enumerate(prompts)]
    for b, row in enumerate(rows):
        if row.size < 1:
            raise ValueError(f"prompt_ids[{b}] must be a 1-D prompt of length >= 1, "
                             f"got shape {row.shape}")
    B, P = len(rows), max(row.size for row in rows)
    ids = np.full((B, P), pad_id, dtype=np.int64)
    attention_mask = np.zeros((B, P), dtype=np.int64)
    for b, row in enumerate(rows):  # packing once per request, not a per-step loop
        ids[b, P - row.size:] = row
        attention_mask[b, P - row.size:] = 1
    return ids, attention_mask


def prepare_request(
    model: GPT, prompt_ids: np.ndarray | Sequence[np.ndarray], max_new_tokens: int,
    attention_mask: np.ndarray | None = None, pad_id: int = 0, eos_id: int | None = None,
    sampler: Sampler | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Check a whole request before any decoding and return ids (B, P) and its mask (B, P) bool.

    prompt_ids is a (B, P) int array (optionally with its left-padding attention_mask) or a list
    of 1-D prompts of any lengths, which is left-padded with pad_id. P + max_new_tokens must fit
    in the model's max_seq_len (no limit with RoPE and a sliding window: see GPTConfig).
    """
    if not isinstance(model, GPT):
        raise TypeError(f"model must be a GPT, got {type(model).__name__}")
    V = model.config.vocab_size
    for name, value in (("pad_id", pad_id), ("eos_id", eos_id)):
        if not (value is None and name == "eos_id") and (not is_int(value) or not 0 <= value < V):
            raise ValueError(f"{name} must be a token id in [0, {V}), got {value!r}")
    max_new_tokens = positive_int("max_new_tokens", max_new_tokens)
    if sampler is not None and not isinstance(sampler, Sampler):
        raise TypeError(f"sampler must be a Sampler, got {type(sampler).__name__}")
    if isinstance(prompt_ids, (list, tuple)):
        if attention_mask is not None:
            raise ValueError("attention_mask is built from a list of prompts; pass it only with "
                             "a (B, P) prompt_ids array")
        prompt_ids, attention_mask = left_pad(prompt_ids, pad_id, vocab_size=V)
    ids = token_ids("prompt_ids", prompt_ids, 2, V)
    B, P = ids.shape
    limit = model.config.max_positions  # max_seq_len, or None with RoPE and a window
    if limit is not None and P + max_new_tokens > limit:
        raise ValueError(f"prompt of {P} + max_new_tokens={max_new_tokens} = {P + max_new_tokens} "
                         f"tokens exceed max_seq_len={model.config.max_seq_len} (generation is "
                         "refused, not cropped)")
    # The loop keeps the logits of every step, (B, max_new_tokens, V): sized up front.
    fits_in_memory(f"logits of {B} rows x {max_new_tokens} steps x {V} tokens",
                   B * max_new_tokens * V * model.dtype.itemsize)
    if attention_mask is None:
        return ids, np.ones((B, P), dtype=bool)
    mask = zero_one_mask("attention_mask", attention_mask, (B, P))
    # Left padding: 0s then 1s in every row, and the last column real (no empty prompt).
    if np.any(np.diff(mask.astype(np.int8), axis=1) < 0) or not mask[:, -1].all():
        raise ValueError("attention_mask must be left padding: each row 0...0 1...1 with at least "
                         "one 1")
    return ids, mask


def choose_next(
    logits: np.ndarray, sampler: Sampler, finished: np.ndarray, eos_id: int | None
) -> np.ndarray:
    """(B, V) -> (B,) next tokens; a finished row repeats eos_id instead. The sampler sees every
    row, so it consumes the same random numbers whichever rows are finished."""
    tokens = sampler(logits)
    return tokens if eos_id is None else np.where(finished, eos_id, tokens)


# --- the two phases of cached decoding -----------------------------------------------------------

def _need_cache(cache: object) -> Cache:
    if not callable(getattr(cache, "plan", None)):
        raise TypeError(f"cache must keep the cache protocol (a ModelCache from "
                        f"model.new_cache(batch_size), or another kind), got "
                        f"{type(cache).__name__}")
    return cache


def prefill(model: GPT, prompt_ids: np.ndarray, cache: Cache,
            chunk_size: int | None = None,
            attention_mask: np.ndarray | None = None) -> np.ndarray:
    """Run the prompt (B, P) through the model once, filling the cache; return the last
    position's logits (B, V). With chunk_size, the prompt goes in pieces of that many tokens, so
    the score matrix is at most (chunk, P) instead of (P, P); the result is the same.

    attention_mask (B, len(cache) + P), 1 real / 0 pad, marks left padding; the cache keeps it,
    so decode needs no mask. The whole request is checked before the first chunk is written, the
    last prompt token of every row must be real, and a prefill that fails half-way anyway leaves
    the cache as it was (or, for a cache that cannot rewind that far, refuses to rewind).
    """
    cache = _need_cache(cache)
    step = optional_positive_int("chunk_size", chunk_size)
    ids, whole = model.check_call(prompt_ids, cache, attention_mask)  # all P tokens, one plan
    if not whole.real[:, -1].all():
        raise ValueError("prefill: the last prompt token of every row must be real (pad on the "
                         "left, not the right)")
    B, P = ids.shape
    past, step = len(cache), step or P
    if step >= P:  # one chunk: the step planned above is the one that runs
        return model.run(ids, whole, cache, last_only=True)[:, -1]  # (B, 1, V) -> (B, V)
    try:
        for start in range(0, P, step):  # checked above as one call: each chunk just runs
            end = min(start + step, P)
            mask = None if attention_mask is None else attention_mask[:, :past + end]
            logits = model.run(ids[:, start:end], cache.plan(model, B, end - start, mask), cache,
                               last_only=True)
    except BaseException:
        cache.truncate(past)  # run rolled back the chunk that failed; this, the ones before it
        raise
    return logits[:, -1]  # (B, 1, V) -> (B, V)


def decode(model: GPT, token_ids: np.ndarray, cache: Cache) -> np.ndarray:
    """One decode step: the newest token of each row (B,) against everything cached -> the next
    logits (B, V). The cache grows by exactly one position; its position and padding come from
    the cache, so nothing else is passed."""
    cache = _need_cache(cache)
    token_ids = int_array("token_ids", token_ids, 1)
    return model(token_ids[:, None], cache, last_only=True)[:, -1]  # (B,) -> (B, 1) -> (B, V)


# --- one decode loop, with or without the cache --------------------------------------------------

def decode_loop(
    model: GPT, ids: np.ndarray, prompt_mask: np.ndarray, max_new_tokens: int, sampler: Sampler,
    eos_id: int | None = None, cache: Cache | None = None, prefill_chunk: int | None = None,
) -> Generation:
    """Step n picks new token n from the logits of the sequence so far. Without a cache every
    step reruns the model on the whole sequence (naive: O((P + n)^2) attention at step n); with
    one, step 0 prefills the prompt and every later step runs only the newest token (cached).
    ids (B, P) and prompt_mask (B, P) as prepare_request returns them."""
    B, P = ids.shape
    seq = np.empty((B, P + max_new_tokens), dtype=np.int64)  # filled in place, never concatenated
    seq[:, :P] = ids
    mask = np.ones((B, P + max_new_tokens), dtype=bool)  # new tokens are real; naive re-reads it
    mask[:, :P] = prompt_mask
    logits = np.empty((B, max_new_tokens, model.config.vocab_size), dtype=model.dtype)
    finished = np.zeros(B, dtype=bool)
    lengths = []
    for n in range(max_new_tokens):
        if cache is None:  # naive: the whole sequence again
            step = model(seq[:, :P + n], attention_mask=mask[:, :P + n], last_only=True)[:, -1]
        elif n == 0:  # cached, first step: the prompt, once
            step = prefill(model, ids, cache, prefill_chunk, mask[:, :P])
        else:  # cached: only the token chosen last step
            step = decode(model, seq[:, P + n - 1], cache)
        logits[:, n] = step
        if cache is not None:
            lengths.append(len(cache))
        seq[:, P + n] = choose_next(step, sampler, finished, eos_id)
        if eos_id is not None:
            finished |= seq[:, P + n] == eos_id
        if finished.all():
            break
    return Generation(seq[:, P:P + n + 1], logits[:, :n + 1], None if cache is None else lengths)


def generate_naive(
    model: GPT, prompt_ids: np.ndarray | Sequence[np.ndarray], max_new_tokens: int, *,
    attention_mask: np.ndarray | None = None, pad_id: int = 0, eos_id: int | None = None,
    temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
    rng: np.random.Generator | None = None,
) -> Generation:
    """Decoding with no cache: every step reruns the model on the full prefix. The reference the
    cache must match.

    prompt_ids: (B, P) int array, or a list of 1-D prompts of different lengths (left-padded).
    Greedy unless temperature > 0 (then top_k, top_p and a seeded rng shape the draw).
    Returns tokens (B, N) and logits (B, N, V), N = steps taken, and cache_lengths None.
    """
    sampler = Sampler(temperature, top_k, top_p, rng)
    ids, mask = prepare_request(model, prompt_ids, max_new_tokens, attention_mask, pad_id, eos_id)
    return decode_loop(model, ids, mask, max_new_tokens, sampler, eos_id)


def generate_cached(
    model: GPT, prompt_ids: np.ndarray | Sequence[np.ndarray], max_new_tokens: int,
    prefill_chunk: int | None = None, *,
    attention_mask: np.ndarray | None = None, pad_id: int = 0, eos_id: int | None = None,
    temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
    rng: np.random.Generator | None = None, cache: Cache | None = None,
    cache_dtype: np.dtype | type | str | None = None,
) -> Generation:
    """Decoding with a KV cache: prefill once (in chunks of prefill_chunk tokens if given), then
    one token per step. Same arguments as generate_naive and the same tokens and logits, plus
    the cache length at every step. cache: an empty cache of any kind for the B rows (a rolling
    buffer, int8, ...: beyond/), or None for model.new_cache(B, cache_dtype), whose float dtype
    defaults to the model's."""
    sampler = Sampler(temperature, top_k, top_p, rng)
    ids, mask = prepare_request(model, prompt_ids, max_new_tokens, attention_mask, pad_id, eos_id)
    optional_positive_int("prefill_chunk", prefill_chunk)
    if cache_dtype is not None:
        float_dtype("cache_dtype", cache_dtype, CACHE_DTYPES)
    if cache is not None:
        if cache_dtype is not None:
            raise ValueError("cache_dtype is for the cache generate_cached builds; a cache you "
                             "pass keeps its own dtype")
        if len(_need_cache(cache)):
            raise ValueError(f"cache must be empty (it holds {len(cache)} positions): a request "
                             "starts at position 0; reset() it first")
    else:  # all checked: only now is state made
        cache = model.new_cache(ids.shape[0], cache_dtype)
    room, need = getattr(cache, "capacity", None), ids.shape[1] + max_new_tokens
    if room is not None and need > room:
        raise ValueError(f"prompt of {ids.shape[1]} + max_new_tokens={max_new_tokens} = {need} "
                         f"positions exceed the cache's {room} (a windowed model with RoPE runs "
                         "past max_seq_len in a rolling buffer: beyond.window.window_cache)")
    return decode_loop(model, ids, mask, max_new_tokens, sampler, eos_id, cache, prefill_chunk)


# --- the command: python generate.py --------------------------------------------------------------
# Naive and cached decoding side by side, printed for a reader, on the readable model (the code
# above and in block.py and attention.py): the trained string reverser, or --random weights.
# tools/generate_cli.py is the same command with more: the fast path, an int8 cache, speculative
# decoding, a Hugging Face GPT-2.

CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "reverse.npz"
DEMO_PROMPTS = ("attention", "kv cache", "causal mask", "the exam rule")
SHOW_ROWS = 6  # longer batches are abbreviated when printed
# Two float32 computations of the same logits differ by a few ulps of the LARGEST logit (they sum
# the same terms in another order), so agreement is measured relative to it; a wrong weight,
# position or cache slot is off by far more (1e-2 and up).
TOLERANCE = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10}
CacheFor = Callable[[GPT, int], Cache]  # builds the cache of B rows a cached run uses
# (model, prompts, tokens (B, N)) -> the model's logits (B, N, V) along those tokens, no cache
Reference = Callable[[GPT, list[np.ndarray], np.ndarray], np.ndarray]


class Rounded(NamedTuple):
    """A cache that rounds what it stores (beyond/int8.py), and how its run is judged. Not by the
    float run's tokens: where two logits nearly tie, the rounding may tip the choice, and from
    there on the run decodes another sequence, whose logits belong to it alone. So the rounded
    run's logits are held to `tolerance` x the largest |logit| of the float model on the rounded
    run's own tokens (teacher-forced: `reference`), and the tokens are reported apart."""

    cache_for: CacheFor  # the rounding cache of B rows
    tolerance: float  # a fraction of the largest |logit|
    name: str  # what the output calls it: "int8 cache"
    reference: Reference  # e.g. beyond.int8.teacher_forced_logits


class SideBySide(NamedTuple):
    """The same request decoded both ways, how long each took, and (for a rounding cache) the
    float model's logits along the cached run's own tokens."""

    naive: Generation
    cached: Generation
    naive_s: float
    cached_s: float
    reference: np.ndarray | None = None  # (B, N_cached, V), teacher-forced

    @property
    def same_tokens(self) -> bool:
        return bool(np.array_equal(self.naive.tokens, self.cached.tokens))

    @property
    def steps_in_common(self) -> int:
        """Steps both runs took: with eos_id, runs that part may stop at different steps."""
        return min(self.naive.tokens.shape[1], self.cached.tokens.shape[1])

    @property
    def logit_diff(self) -> float:
        n = self.steps_in_common
        return float(np.max(np.abs(self.naive.logits[:, :n] - self.cached.logits[:, :n])))

    @property
    def relative_diff(self) -> float:
        """logit_diff / max |naive logit|: what the tolerance is stated in."""
        return self.logit_diff / max(float(np.max(np.abs(self.naive.logits))), 1e-30)

    @property
    def logits_close(self) -> bool:
        return self.relative_diff <= TOLERANCE[self.naive.logits.dtype]

    @property
    def grew_by_one(self) -> bool:
        return bool(np.all(np.diff(self.cached.cache_lengths) == 1))


def side_by_side(model: GPT, prompts: np.ndarray | list[np.ndarray], max_new_tokens: int,
                 seed: int, prefill_chunk: int | None = None, rounded: Rounded | None = None,
                 **options: object) -> SideBySide:
    """generate_naive, then generate_cached (in rounded.cache_for(model, B) if given, else
    model.new_cache), on the same request; sampling (if asked) draws from a fresh generator of
    the same seed for each, so both see the same random numbers. With `rounded`, also the float
    model's logits along the cached run's tokens (after the timing)."""
    def rng() -> np.random.Generator | None:
        return np.random.default_rng(seed) if options.get("temperature") else None

    cache = None if rounded is None else rounded.cache_for(model, len(prompts))
    t0 = time.perf_counter()
    naive = generate_naive(model, prompts, max_new_tokens, rng=rng(), **options)
    t1 = time.perf_counter()
    cached = generate_cached(model, prompts, max_new_tokens, prefill_chunk, rng=rng(),
                             cache=cache, **options)
    t2 = time.perf_counter()
    reference = None if rounded is None else rounded.reference(model, list(prompts),
                                                               cached.tokens)
    return SideBySide(naive, cached, t1 - t0, t2 - t1, reference)


def rows(lines: list[str]) -> list[str]:
    """At most SHOW_ROWS lines; the rest summarised in one."""
    if len(lines) <= SHOW_ROWS:
        return lines
    return [*lines[:SHOW_ROWS - 1], f"... ({len(lines) - SHOW_ROWS + 1} more rows)"]


def show_padded(ids: np.ndarray, mask: np.ndarray, token: Callable[[int], str], pad: str,
                sep: str = "", last: int = 24) -> None:
    """Print a left-padded batch, pads as `pad`, each row's attention mask on its right; only the
    `last` columns and SHOW_ROWS rows, so a huge request prints a few lines."""
    cut = "... " if ids.shape[1] > last else ""
    lines = []
    for row, real in zip(ids[:, -last:], mask[:, -last:], strict=True):
        shown = sep.join(token(t) if r else pad for t, r in zip(row, real, strict=True))
        lines.append(f"  {cut}{shown}   {''.join(str(int(r)) for r in real)}")
    print("\n".join(rows(lines)))


def print_steps(run: SideBySide, show: Callable[[np.ndarray], str]) -> None:
    """One line per decode step: the cache length when the token was chosen, and the tokens."""
    print("\nstep  cache length  tokens chosen (one per row)")
    for n, length in enumerate(run.cached.cache_lengths):
        print(f"{n:>4}  {length:>12}  {show(run.cached.tokens[:, n])}")


def print_agreement(run: SideBySide, rounded: Rounded | None = None) -> bool:
    """naive == cached (tokens, and logits within TOLERANCE of the largest), the cache's growth,
    and the speed of each; True if all three checks hold. A cache that rounds (`rounded`, with
    run.reference) is held to its own bound on the logits along its own tokens instead, and
    where its tokens part from the float run's is reported, not failed."""
    B, N = run.cached.tokens.shape
    tolerance = TOLERANCE[run.naive.logits.dtype]
    print(f"\ntokens identical (naive vs cached): {run.same_tokens}")
    if rounded is not None:
        for line in rows(parting_lines(run, rounded.name)):
            print(line)
        diff = float(np.max(np.abs(run.cached.logits - run.reference)))
        limit = rounded.tolerance * float(np.abs(run.reference).max())
        agree = diff <= limit
        print(f"largest |logit difference|:         {diff:.3e} along the {rounded.name.split()[0]} "
              f"run's own tokens, bound {limit:.3e} ({rounded.tolerance:.0%} of the largest "
              f"|logit|): {'pass' if agree else 'FAIL'}")
    else:
        agree = run.same_tokens and run.logits_close
        print(f"largest |logit difference|:         {run.logit_diff:.3e} = "
              f"{run.relative_diff:.1e} x max|logit| (tolerance {tolerance:.0e}: "
              f"{'pass' if run.logits_close else 'FAIL'})")
    print(f"cache grew by exactly 1 per step:   {run.grew_by_one}")
    for name, seconds in (("naive ", run.naive_s), ("cached", run.cached_s)):
        print(f"time {name}: {1e3 * seconds:8.2f} ms = {B * N / seconds:8.0f} tokens/s "
              f"({B} rows x {N} steps)")
    print(f"cached is {run.naive_s / run.cached_s:.1f}x faster")
    return agree and run.grew_by_one


def parting_lines(run: SideBySide, name: str) -> list[str]:
    """One line per row whose rounded run takes another token than the float run: the first step
    where it does, and the float model's logits there for both tokens (a near-tie the rounding
    tipped). From that step on the row decodes another sequence."""
    lines = []
    n = run.steps_in_common
    for b, (mine, theirs) in enumerate(zip(run.cached.tokens, run.naive.tokens, strict=True)):
        differ = np.flatnonzero(mine[:n] != theirs[:n])
        if differ.size:
            step, logits = int(differ[0]), run.reference[b, differ[0]]
            lines.append(f"  row {b} parts from the float run at step {step}: float logits "
                         f"{logits[theirs[step]]:.4f} for the float run's token "
                         f"{theirs[step]}, {logits[mine[step]]:.4f} for the {name.split()[0]} "
                         f"run's {mine[step]}")
        elif run.naive.tokens.shape != run.cached.tokens.shape:
            lines.append(f"  row {b}: the two runs took {run.naive.tokens.shape[1]} and "
                         f"{run.cached.tokens.shape[1]} steps")
    return lines


def path_line(model: GPT) -> str:
    """Which code ran: the readable path (this file, block.py, attention.py) or another one."""
    kind = type(model)
    where = "readable: attention.py, block.py" if kind is GPT else kind.__module__
    return f"path: {kind.__name__} ({where})"


def trained(args: argparse.Namespace, ap: argparse.ArgumentParser,
            model_class: type[GPT] = GPT, rounded: Rounded | None = None
            ) -> tuple[int, GPT, list[np.ndarray]]:
    """The trained string-reversal model: prompts as text, answers checked. Returns the exit
    status, the model and the prompts."""
    model, texts, prompts = load_trained(args, ap, model_class)
    return show_trained(args, model, texts, prompts, rounded), model, prompts


def load_trained(args: argparse.Namespace, ap: argparse.ArgumentParser,
                 model_class: type[GPT] = GPT) -> tuple[GPT, list[str], list[np.ndarray]]:
    """Everything `trained` checks, before it prints: the prompts' characters, the checkpoint,
    and that the prompts and their answers fit it (a usage error otherwise). Returns the model,
    the texts and their token ids. tools/generate_cli.py checks its own flags between this and
    show_trained, so that nothing is printed before every input is known good."""
    texts = args.prompt or list(DEMO_PROMPTS)
    try:
        texts = [task.check_chars(text) for text in texts]
    except ValueError as err:
        ap.error(str(err))
    model = cli_load(ap, args.checkpoint, model_class.load,
                     f" (make train writes {CHECKPOINT.relative_to(CHECKPOINT.parents[1])})")
    prompts = [task.encode(task.make_prompt(text)) for text in texts]
    try:  # the prompts and their answers must fit this checkpoint, before anything is printed
        prepare_request(model, prompts, max(map(len, texts)) + 1, eos_id=ord(task.END))
    except ValueError as err:
        ap.error(f"argument --checkpoint: {args.checkpoint} cannot answer these prompts: {err}")
    return model, texts, prompts


def show_trained(args: argparse.Namespace, model: GPT, texts: list[str],
                 prompts: list[np.ndarray], rounded: Rounded | None = None) -> int:
    """load_trained's model on its prompts, naive vs cached, printed; the exit status."""
    c = model.config
    print(f"model: {args.checkpoint} (trained to reverse strings): d_model={c.d_model} "
          f"heads={c.n_heads} layers={c.n_layers} max_seq_len={c.max_seq_len}; {path_line(model)}")
    print("prompts, left-padded into one batch (pads shown as _), each with its attention_mask:")
    show_padded(*left_pad(prompts), token=chr, pad="_")
    run = side_by_side(model, prompts, max(map(len, texts)) + 1, args.seed, args.prefill_chunk,
                       rounded, eos_id=ord(task.END))
    print_steps(run, lambda tokens: " ".join(repr(chr(t)) for t in tokens))
    print(f"\n{'prompt':<{task.MAX_CHARS + 2}}{'answer':<{task.MAX_CHARS + 2}}right")
    for text, tokens in zip(texts, run.cached.tokens, strict=True):
        answer = task.decode(tokens).split(task.END)[0] + task.END
        print(f"{task.make_prompt(text):<{task.MAX_CHARS + 2}}{answer:<{task.MAX_CHARS + 2}}"
              f"{'yes' if answer == task.expected_answer(task.make_prompt(text)) else 'NO'}")
    return 0 if print_agreement(run, rounded) else 1


def random_weights(args: argparse.Namespace, ap: argparse.ArgumentParser,
                   model_class: type[GPT] = GPT, rounded: Rounded | None = None) -> int:
    """The assignment's config with random weights, on random token ids (what the assignment
    asks the decode loops to show: naive and cached agree, the cache grows by one per step)."""
    config = GPTConfig(n_layers=args.layers, init_std=0.2)  # d_model 128, 4 heads, max_seq_len 128
    data = np.random.default_rng(args.seed)
    if args.prompt_lens is None:
        prompts = data.integers(0, config.vocab_size, (args.batch, args.prompt_len))
        shape = f"(B={args.batch}, P={args.prompt_len})"
    else:
        prompts = [data.integers(0, config.vocab_size, n) for n in args.prompt_lens]
        shape = f"(B={len(prompts)}, lengths {args.prompt_lens})"
    options = dict(eos_id=args.eos_id, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p)
    try:  # refuse a bad request before printing or decoding anything
        model = model_class(config, seed=args.seed, dtype=args.dtype)
        ids, mask = prepare_request(model, prompts, args.new_tokens, eos_id=args.eos_id)
        Sampler(args.temperature, args.top_k, args.top_p,
                np.random.default_rng(args.seed) if args.temperature else None)
        model.new_cache(len(ids))  # would the cache fit?
    except (TypeError, ValueError) as err:
        ap.error(str(err))
    print(f"model: random weights, d_model={config.d_model} heads={config.n_heads} "
          f"d_head={config.d_head} layers={config.n_layers} vocab={config.vocab_size} "
          f"max_seq_len={config.max_seq_len} dtype={args.dtype}; {path_line(model)}")
    print(f"prompt {shape}, left-padded (pads shown as .), each row with its attention_mask:")
    show_padded(ids, mask, token=lambda t: f"{t:>3}", pad="  .", sep=" ")
    print(f"sampling: temperature={args.temperature} top_k={args.top_k} top_p={args.top_p} "
          f"seed={args.seed}" if args.temperature else "decoding: greedy")
    run = side_by_side(model, prompts, args.new_tokens, args.seed, args.prefill_chunk, rounded,
                       **options)
    print_steps(run, lambda tokens: str(tokens[:SHOW_ROWS].tolist())[:-1]
                + (", ...]" if len(tokens) > SHOW_ROWS else "]"))
    if args.eos_id is not None:
        print(f"\nsteps taken: {run.cached.tokens.shape[1]} of max {args.new_tokens} "
              f"(eos_id={args.eos_id}; finished rows repeat it)")
    return 0 if print_agreement(run, rounded) else 1


def _prompt_lens(text: str) -> list[int]:
    try:
        lens = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must look like 3,7,1, got {text!r}") from None
    if not lens or min(lens) < 1:
        raise argparse.ArgumentTypeError(f"must be positive ints, got {text!r}")
    return lens


# Which flags each model uses; a flag given to a model that does not use it is refused (it would
# be silently ignored). --prefill-chunk applies to every one. Defaults are filled in after the
# check. tools/generate_cli.py adds its flags to these.
MODE_FLAGS = {
    "the trained model": ("--prompt", "--checkpoint"),
    "--random": ("--new-tokens", "--prompt-len", "--batch", "--prompt-lens", "--layers", "--seed",
                 "--dtype", "--temperature", "--top-k", "--top-p", "--eos-id"),
}
RANDOM_DEFAULTS = {"new_tokens": 16, "prompt_len": 8, "batch": 2, "layers": 2, "seed": 0,
                   "dtype": "float32"}


def check_flags(ap: argparse.ArgumentParser, args: argparse.Namespace, mode: str,
                mode_flags: dict[str, tuple[str, ...]] = MODE_FLAGS) -> None:
    """Refuse every flag `mode` does not use, and combinations that would silently drop one."""
    for flag in sorted({f for flags in mode_flags.values() for f in flags}):
        users = [m for m, flags in mode_flags.items() if flag in flags]
        if mode not in users:
            refuse_unused(ap, args, [flag], f"does not apply to {mode} (only to "
                                            f"{' or '.join(users)})")
    if mode == "--random":
        if args.prompt_lens is not None:
            refuse_unused(ap, args, ["--batch", "--prompt-len"],
                          "and --prompt-lens both set the prompts: give one")
        if not args.temperature:
            refuse_unused(ap, args, ["--top-k", "--top-p"],
                          "shapes a random draw: it needs --temperature > 0 (else greedy)")
        for name, value in RANDOM_DEFAULTS.items():
            if getattr(args, name) is None:
                setattr(args, name, value)


def parser(description: str) -> argparse.ArgumentParser:
    """The flags of `python generate.py` (tools/generate_cli.py adds its own to them)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                    help="a prompt (repeat for a batch); the trained model reverses it")
    ap.add_argument("--checkpoint", default=None,
                    help=f"the trained model's .npz (default {CHECKPOINT})")
    ap.add_argument("--random", action="store_true",
                    help="the assignment's config with random weights, on random token ids")
    ap.add_argument("--new-tokens", type=cli_int(1, 4096), default=None,
                    help="tokens to generate with --random (default 16)")
    ap.add_argument("--prompt-len", type=cli_int(1, 4096), default=None,
                    help="--random: prompt length (default 8)")
    ap.add_argument("--batch", type=cli_int(1, 1_000_000), default=None,
                    help="--random: batch size (default 2)")
    ap.add_argument("--prompt-lens", type=_prompt_lens, default=None, metavar="3,7,1",
                    help="--random: a ragged batch, one prompt per length, left-padded "
                         "(instead of --batch and --prompt-len)")
    ap.add_argument("--layers", type=cli_int(1, 1_000_000), default=None,
                    help="--random: transformer blocks (default 2)")
    ap.add_argument("--seed", type=SEED, default=None,
                    help="--random: weights, prompt and sampling seed (default 0)")
    ap.add_argument("--dtype", choices=["float32", "float64"], default=None,
                    help="--random: the model's dtype (default float32)")
    ap.add_argument("--temperature", type=cli_float(0), default=None,
                    help="--random: 0 or unset = greedy")
    ap.add_argument("--top-k", type=cli_int(1), default=None,
                    help="--random, with --temperature: keep the k highest logits")
    ap.add_argument("--top-p", type=cli_float(0, 1, low_open=True), default=None,
                    help="--random, with --temperature: nucleus, keep mass p")
    ap.add_argument("--eos-id", type=cli_int(0), default=None,
                    help="--random: a row stops at this token")
    ap.add_argument("--prefill-chunk", type=cli_int(1), default=None,
                    help="prefill in chunks of this many tokens")
    return ap


def main(argv: list[str] | None = None) -> int:
    """python generate.py: the trained model (default) or --random weights, naive vs cached, on
    the readable path."""
    ap = parser("Naive vs cached decoding on the readable model (this file, block.py, "
                "attention.py): the trained string-reversal model by default, random weights "
                "with --random. A flag the chosen model does not use is refused. More (the fast "
                "path, an int8 cache, speculative decoding, Hugging Face GPT-2): "
                "python tools/generate_cli.py --help.")
    args = ap.parse_args(argv)
    mode = "--random" if args.random else "the trained model"
    check_flags(ap, args, mode)
    if args.random:
        return random_weights(args, ap)
    args.checkpoint = args.checkpoint or str(CHECKPOINT)
    return trained(args, ap)[0]


if __name__ == "__main__":
    raise SystemExit(main())
