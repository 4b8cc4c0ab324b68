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

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from block import GPT
from cache import CACHE_DTYPES, Cache
from parts.checks import (
    float_dtype,
    fits_in_memory,
    int_array,
    is_int,
    optional_positive_int,
    positive_int,
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

def left_pad(prompts: Sequence[np.ndarray], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """B 1-D prompts of lengths L_b -> ids (B, P) and attention_mask (B, P), P = max L_b.

    Row b is P - L_b copies of pad_id, then its prompt; the mask is 0 on pads and 1 on real
    tokens. Left rather than right, so that every row's newest token is in the last column.
    """
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
        prompt_ids, attention_mask = left_pad(prompt_ids, pad_id)
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


if __name__ == "__main__":  # the command (naive vs cached, printed side by side) is in tools/
    from tools.generate_cli import main

    raise SystemExit(main())
