"""Decoding, two ways: recompute the whole prefix every step (naive), or keep K and V (cached).

    naive:   step n runs the model on all P + n tokens, keeps the last row of logits.
    cached:  prefill runs the P prompt tokens once and fills the cache;
             decode then runs ONE token per step against the cached keys and values.

Both call the same model code; only the amount of work differs. `python generate.py` runs both
from the same prompt and shows they agree.
"""

from __future__ import annotations

import argparse
import time
from typing import NamedTuple

import numpy as np

from block import GPT, GPTConfig
from cache import KVCache


class Generation(NamedTuple):
    tokens: np.ndarray  # (B, N) the new tokens
    logits: np.ndarray  # (B, N, V) the logits each new token was chosen from


class CachedGeneration(NamedTuple):
    tokens: np.ndarray  # (B, N)
    logits: np.ndarray  # (B, N, V)
    cache_lengths: list[int]  # cache length when token n was chosen: P, P + 1, ..., P + N - 1


def check_request(model: GPT, prompt_ids: np.ndarray, max_new_tokens: int) -> np.ndarray:
    """Refuse a request before any decoding: prompt (B, P) of valid ids, and P + N positions
    that fit the model's max_seq_len."""
    prompt_ids = np.asarray(prompt_ids)
    if prompt_ids.ndim != 2 or prompt_ids.shape[1] < 1:
        raise ValueError(f"prompt_ids must be (B, P) with P >= 1, got shape {prompt_ids.shape}")
    if not np.issubdtype(prompt_ids.dtype, np.integer):
        raise TypeError(f"prompt_ids must be integers, got dtype {prompt_ids.dtype}")
    V = model.config.vocab_size
    if prompt_ids.min() < 0 or prompt_ids.max() >= V:
        raise ValueError(f"prompt_ids must be in [0, {V}), got min {prompt_ids.min()} "
                         f"max {prompt_ids.max()}")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    P, limit = prompt_ids.shape[1], model.config.max_seq_len
    if P + max_new_tokens > limit:
        raise ValueError(f"prompt of {P} + max_new_tokens={max_new_tokens} = "
                         f"{P + max_new_tokens} tokens exceed max_seq_len={limit}")
    return prompt_ids


def greedy(logits: np.ndarray) -> np.ndarray:
    """(B, V) -> (B,): the most likely next token of each row."""
    return logits.argmax(axis=-1)


def generate_naive(model: GPT, prompt_ids: np.ndarray, max_new_tokens: int) -> Generation:
    """Greedy decoding with no cache: every step reruns the model on the full prefix, so step n
    costs O((P + n)^2) attention and O(P + n) projections. The reference the cache must match."""
    prompt_ids = check_request(model, prompt_ids, max_new_tokens)
    B, P = prompt_ids.shape
    seq = np.empty((B, P + max_new_tokens), dtype=np.int64)  # filled in place, never concatenated
    seq[:, :P] = prompt_ids
    logits = np.empty((B, max_new_tokens, model.config.vocab_size), dtype=model.dtype)
    for n in range(max_new_tokens):
        logits[:, n] = model(seq[:, :P + n], last_only=True)[:, -1]  # (B, P + n) -> (B, V)
        seq[:, P + n] = greedy(logits[:, n])
    return Generation(seq[:, P:], logits)


def prefill(model: GPT, prompt_ids: np.ndarray, cache: list[KVCache],
            chunk_size: int | None = None) -> np.ndarray:
    """Run the prompt (B, P) through the model once, filling the cache; return the last
    position's logits (B, V). With chunk_size, the prompt goes in pieces of that many tokens, so
    the score matrix is at most (chunk, P) instead of (P, P); the result is the same."""
    P = prompt_ids.shape[1]
    step = P if chunk_size is None else chunk_size
    if not isinstance(step, (int, np.integer)) or step < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    for start in range(0, P, step):
        logits = model(prompt_ids[:, start:start + step], cache, last_only=True)  # (B, 1, V)
    return logits[:, -1]


def decode(model: GPT, token_ids: np.ndarray, cache: list[KVCache]) -> np.ndarray:
    """One decode step: the newest token (B,) against everything cached -> next logits (B, V).
    The cache grows by exactly one position."""
    return model(token_ids[:, None], cache)[:, -1]  # (B,) -> (B, 1) -> (B, 1, V) -> (B, V)


def generate_cached(model: GPT, prompt_ids: np.ndarray, max_new_tokens: int,
                    prefill_chunk: int | None = None) -> CachedGeneration:
    """Greedy decoding with a KV cache: prefill once, then one token per step. Returns the same
    tokens and logits as generate_naive, plus the cache length at every step."""
    prompt_ids = check_request(model, prompt_ids, max_new_tokens)
    B = prompt_ids.shape[0]
    cache = model.new_cache(B)
    tokens = np.empty((B, max_new_tokens), dtype=np.int64)
    logits = np.empty((B, max_new_tokens, model.config.vocab_size), dtype=model.dtype)
    lengths = []
    logits[:, 0] = prefill(model, prompt_ids, cache, prefill_chunk)
    for n in range(max_new_tokens):
        if n > 0:
            logits[:, n] = decode(model, tokens[:, n - 1], cache)
        tokens[:, n] = greedy(logits[:, n])
        lengths.append(len(cache[0]))
    return CachedGeneration(tokens, logits, lengths)


# --- the command ---------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Naive vs cached decoding on a random tiny GPT.")
    ap.add_argument("--new-tokens", type=int, default=16, help="tokens to generate (default 16)")
    ap.add_argument("--prompt-len", type=int, default=8, help="prompt length (default 8)")
    ap.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    ap.add_argument("--layers", type=int, default=2, help="transformer blocks (default 2)")
    ap.add_argument("--seed", type=int, default=0, help="weights and prompt seed (default 0)")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    args = ap.parse_args(argv)

    config = GPTConfig(n_layers=args.layers, init_std=0.2)  # d_model 128, 4 heads, max_seq_len 128
    model = GPT(config, seed=args.seed, dtype=args.dtype)
    prompt = np.random.default_rng(args.seed).integers(0, config.vocab_size,
                                                       (args.batch, args.prompt_len))
    print(f"model: d_model={config.d_model} heads={config.n_heads} d_head={config.d_head} "
          f"layers={config.n_layers} vocab={config.vocab_size} max_seq_len={config.max_seq_len} "
          f"dtype={args.dtype}")
    print(f"prompt (B={args.batch}, P={args.prompt_len}): {prompt.tolist()}")

    t0 = time.perf_counter()
    naive = generate_naive(model, prompt, args.new_tokens)
    t1 = time.perf_counter()
    cached = generate_cached(model, prompt, args.new_tokens)
    t2 = time.perf_counter()

    print("\nstep  cache length  tokens chosen (one per row)")
    for n, length in enumerate(cached.cache_lengths):
        print(f"{n:>4}  {length:>12}  {cached.tokens[:, n].tolist()}")
    same = np.array_equal(naive.tokens, cached.tokens)
    diff = float(np.max(np.abs(naive.logits - cached.logits)))
    grew = bool(np.all(np.diff(cached.cache_lengths) == 1))
    print(f"\ntokens identical (naive vs cached): {same}")
    print(f"largest |logit difference|:         {diff:.3e}")
    print(f"cache grew by exactly 1 per step:   {grew}")
    print(f"time naive:  {1e3 * (t1 - t0):8.2f} ms")
    print(f"time cached: {1e3 * (t2 - t1):8.2f} ms   ({(t1 - t0) / (t2 - t1):.1f}x faster)")
    return 0 if same and grew else 1


if __name__ == "__main__":
    raise SystemExit(main())
