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
from cache import ModelCache
from parts import task
from parts.checks import (
    SEED,
    cli_int,
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
    in the model's max_seq_len.
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
    if P + max_new_tokens > model.config.max_seq_len:
        raise ValueError(f"prompt of {P} + max_new_tokens={max_new_tokens} = {P + max_new_tokens} "
                         f"tokens exceed max_seq_len={model.config.max_seq_len} (generation is "
                         "refused, not cropped)")
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

def _need_cache(cache: object) -> ModelCache:
    if not isinstance(cache, ModelCache):
        raise TypeError(f"cache must be a ModelCache from model.new_cache(batch_size), got "
                        f"{type(cache).__name__}")
    return cache


def prefill(model: GPT, prompt_ids: np.ndarray, cache: ModelCache,
            chunk_size: int | None = None,
            attention_mask: np.ndarray | None = None) -> np.ndarray:
    """Run the prompt (B, P) through the model once, filling the cache; return the last
    position's logits (B, V). With chunk_size, the prompt goes in pieces of that many tokens, so
    the score matrix is at most (chunk, P) instead of (P, P); the result is the same.

    attention_mask (B, len(cache) + P), 1 real / 0 pad, marks left padding; the cache keeps it,
    so decode needs no mask. The whole request is checked before the first chunk is written, the
    last prompt token of every row must be real, and a prefill that fails half-way anyway leaves
    the cache as it was.
    """
    cache = _need_cache(cache)
    step = optional_positive_int("chunk_size", chunk_size)
    ids, new_real = model.check_call(prompt_ids, cache, attention_mask)  # all P tokens as one call
    if not new_real[:, -1].all():
        raise ValueError("prefill: the last prompt token of every row must be real (pad on the "
                         "left, not the right)")
    past, P = len(cache), ids.shape[1]
    step = step or P
    try:
        for start in range(0, P, step):
            end = min(start + step, P)
            seen = None if attention_mask is None else attention_mask[:, :past + end]
            logits = model(ids[:, start:end], cache, attention_mask=seen, last_only=True)
    except BaseException:
        cache.truncate(past)
        raise
    return logits[:, -1]  # (B, 1, V) -> (B, V)


def decode(model: GPT, token_ids: np.ndarray, cache: ModelCache) -> np.ndarray:
    """One decode step: the newest token of each row (B,) against everything cached -> the next
    logits (B, V). The cache grows by exactly one position; its position and padding come from
    the cache, so nothing else is passed."""
    cache = _need_cache(cache)
    token_ids = int_array("token_ids", token_ids, 1)
    return model(token_ids[:, None], cache, last_only=True)[:, -1]  # (B,) -> (B, 1) -> (B, V)


# --- one decode loop, with or without the cache --------------------------------------------------

def decode_loop(
    model: GPT, ids: np.ndarray, prompt_mask: np.ndarray, max_new_tokens: int, sampler: Sampler,
    eos_id: int | None = None, cache: ModelCache | None = None, prefill_chunk: int | None = None,
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
    rng: np.random.Generator | None = None,
) -> Generation:
    """Decoding with a KV cache: prefill once (in chunks of prefill_chunk tokens if given), then
    one token per step. Same arguments as generate_naive and the same tokens and logits, plus
    the cache length at every step."""
    sampler = Sampler(temperature, top_k, top_p, rng)
    ids, mask = prepare_request(model, prompt_ids, max_new_tokens, attention_mask, pad_id, eos_id)
    optional_positive_int("prefill_chunk", prefill_chunk)
    cache = model.new_cache(ids.shape[0])  # every check has passed: only now is state created
    return decode_loop(model, ids, mask, max_new_tokens, sampler, eos_id, cache, prefill_chunk)


# --- the command ---------------------------------------------------------------------------------
# python generate.py            the trained string-reversal model on a batch of text prompts
# python generate.py --prompt "some text"        your own string (the flag may repeat)
# python generate.py --random   the assignment's config with random weights, on token ids
# python generate.py --hf DIR --prompt "text"    a Hugging Face GPT-2 you have, run in NumPy

CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "reverse.npz"
DEMO_PROMPTS = ("attention", "kv cache", "causal mask", "the exam rule")
SHOW_ROWS = 6  # longer batches are abbreviated when printed


class SideBySide(NamedTuple):
    """The same request decoded both ways, and how long each took."""

    naive: Generation
    cached: Generation
    naive_s: float
    cached_s: float

    @property
    def same_tokens(self) -> bool:
        return bool(np.array_equal(self.naive.tokens, self.cached.tokens))

    @property
    def logit_diff(self) -> float:
        return float(np.max(np.abs(self.naive.logits - self.cached.logits)))

    @property
    def grew_by_one(self) -> bool:
        return bool(np.all(np.diff(self.cached.cache_lengths) == 1))


def side_by_side(model: GPT, prompts: np.ndarray | list[np.ndarray], max_new_tokens: int,
                 seed: int, prefill_chunk: int | None = None, **options: object) -> SideBySide:
    """generate_naive, then generate_cached, on the same request; sampling (if asked) draws from
    a fresh generator of the same seed for each, so both see the same random numbers."""
    def rng() -> np.random.Generator | None:
        return np.random.default_rng(seed) if options.get("temperature") else None

    t0 = time.perf_counter()
    naive = generate_naive(model, prompts, max_new_tokens, rng=rng(), **options)
    t1 = time.perf_counter()
    cached = generate_cached(model, prompts, max_new_tokens, prefill_chunk, rng=rng(), **options)
    t2 = time.perf_counter()
    return SideBySide(naive, cached, t1 - t0, t2 - t1)


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


def print_agreement(run: SideBySide) -> bool:
    """naive == cached, the cache's growth, and the speed of each; True if both checks hold."""
    B, N = run.cached.tokens.shape
    print(f"\ntokens identical (naive vs cached): {run.same_tokens}")
    print(f"largest |logit difference|:         {run.logit_diff:.3e}")
    print(f"cache grew by exactly 1 per step:   {run.grew_by_one}")
    for name, seconds in (("naive ", run.naive_s), ("cached", run.cached_s)):
        print(f"time {name}: {1e3 * seconds:8.2f} ms = {B * N / seconds:8.0f} tokens/s "
              f"({B} rows x {N} steps)")
    print(f"cached is {run.naive_s / run.cached_s:.1f}x faster")
    return run.same_tokens and run.grew_by_one


def trained(args: argparse.Namespace, ap: argparse.ArgumentParser) -> int:
    """The trained string-reversal model: prompts as text, answers checked."""
    texts = args.prompt or list(DEMO_PROMPTS)
    try:
        texts = [task.check_chars(text) for text in texts]
    except ValueError as err:
        ap.error(str(err))
    try:
        model = GPT.load(args.checkpoint)
    except (OSError, ValueError) as err:
        ap.error(f"{err} (make train writes {CHECKPOINT.relative_to(CHECKPOINT.parents[1])})")
    prompts = [task.encode(task.make_prompt(text)) for text in texts]
    c = model.config
    print(f"model: {args.checkpoint} (trained to reverse strings): d_model={c.d_model} "
          f"heads={c.n_heads} layers={c.n_layers} max_seq_len={c.max_seq_len}")
    print("prompts, left-padded into one batch (pads shown as _), each with its attention_mask:")
    show_padded(*left_pad(prompts), token=chr, pad="_")
    run = side_by_side(model, prompts, max(map(len, texts)) + 1, args.seed, args.prefill_chunk,
                       eos_id=ord(task.END))
    print_steps(run, lambda tokens: " ".join(repr(chr(t)) for t in tokens))
    print(f"\n{'prompt':<{task.MAX_CHARS + 2}}{'answer':<{task.MAX_CHARS + 2}}right")
    for text, tokens in zip(texts, run.cached.tokens, strict=True):
        answer = task.decode(tokens).split(task.END)[0] + task.END
        print(f"{task.make_prompt(text):<{task.MAX_CHARS + 2}}{answer:<{task.MAX_CHARS + 2}}"
              f"{'yes' if answer == task.expected_answer(task.make_prompt(text)) else 'NO'}")
    return 0 if print_agreement(run) else 1


def random_weights(args: argparse.Namespace, ap: argparse.ArgumentParser) -> int:
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
        model = GPT(config, seed=args.seed, dtype=args.dtype)
        ids, mask = prepare_request(model, prompts, args.new_tokens, eos_id=args.eos_id)
        Sampler(args.temperature, args.top_k, args.top_p,
                np.random.default_rng(args.seed) if args.temperature else None)
        model.new_cache(len(ids))  # would the cache fit?
    except (TypeError, ValueError) as err:
        ap.error(str(err))

    print(f"model: random weights, d_model={config.d_model} heads={config.n_heads} "
          f"d_head={config.d_head} layers={config.n_layers} vocab={config.vocab_size} "
          f"max_seq_len={config.max_seq_len} dtype={args.dtype}")
    print(f"prompt {shape}, left-padded (pads shown as .), each row with its attention_mask:")
    show_padded(ids, mask, token=lambda t: f"{t:>3}", pad="  .", sep=" ")
    print(f"sampling: temperature={args.temperature} top_k={args.top_k} top_p={args.top_p} "
          f"seed={args.seed}" if args.temperature else "decoding: greedy")
    run = side_by_side(model, prompts, args.new_tokens, args.seed, args.prefill_chunk, **options)
    print_steps(run, lambda tokens: str(tokens[:SHOW_ROWS].tolist())[:-1]
                + (", ...]" if len(tokens) > SHOW_ROWS else "]"))
    if args.eos_id is not None:
        print(f"\nsteps taken: {run.cached.tokens.shape[1]} of max {args.new_tokens} "
              f"(eos_id={args.eos_id}; finished rows repeat it)")
    return 0 if print_agreement(run) else 1


def hugging_face(args: argparse.Namespace, ap: argparse.ArgumentParser) -> int:
    """A Hugging Face GPT-2 checkpoint (a hub name this machine has, or a save_pretrained
    directory) converted with GPT.from_gpt2 and decoded by our cached decoder; its logits are
    compared with Hugging Face's on the same tokens."""
    if not args.prompt:
        ap.error("--hf needs --prompt TEXT")
    try:
        from transformers import AutoTokenizer, GPT2LMHeadModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one line of output per fact, no loading bars
        tokenizer = AutoTokenizer.from_pretrained(args.hf)
        hf = GPT2LMHeadModel.from_pretrained(args.hf).eval()
    except (OSError, ValueError) as err:
        ap.error(f"no Hugging Face GPT-2 at {args.hf!r} on this machine "
                 f"({str(err).splitlines()[0][:120]}); give a directory written by "
                 "save_pretrained, or a hub name already downloaded")
    try:
        model = GPT.from_gpt2(hf.state_dict(), dtype=np.float32, hf_config=hf.config)
        prompts = [np.array(tokenizer(text)["input_ids"], dtype=np.int64) for text in args.prompt]
        eos = tokenizer.eos_token_id
        eos = eos if eos is not None and 0 <= eos < model.config.vocab_size else None
        prepare_request(model, prompts, args.new_tokens, eos_id=eos)
    except (TypeError, ValueError) as err:
        ap.error(str(err))
    start = time.perf_counter()
    out = generate_cached(model, prompts, args.new_tokens, args.prefill_chunk, eos_id=eos)
    seconds = time.perf_counter() - start
    B, N = out.tokens.shape
    print(f"model: {args.hf} ({model.config.n_layers} layers, d_model {model.config.d_model}, "
          f"vocab {model.config.vocab_size}), converted to NumPy float32")
    for text, tokens in zip(args.prompt, out.tokens, strict=True):
        print(f"\n{text!r} -> {tokenizer.decode(tokens.tolist())!r}")
    print(f"\n{B * N} tokens in {seconds:.2f} s = {B * N / seconds:.0f} tokens/s (cached, "
          "NumPy)")
    print(f"largest |logit difference| vs Hugging Face on the same tokens: "
          f"{hf_logit_difference(hf, prompts, out):.2e} (float32)")
    return 0


def hf_logit_difference(hf: object, prompts: list[np.ndarray], out: Generation) -> float:
    """Run Hugging Face once over each finished sequence and compare the logits that chose every
    new token with ours."""
    import torch

    diff = 0.0
    for prompt, tokens, logits in zip(prompts, out.tokens, out.logits, strict=True):
        seq = torch.from_numpy(np.concatenate([prompt, tokens])[None])  # (1, P + N)
        with torch.no_grad():
            theirs = hf(seq).logits[0, len(prompt) - 1:-1].numpy()  # (N, V): step n's logits
        diff = max(diff, float(np.max(np.abs(theirs - logits))))
    return diff


def _prompt_lens(text: str) -> list[int]:
    try:
        lens = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must look like 3,7,1, got {text!r}") from None
    if not lens or min(lens) < 1:
        raise argparse.ArgumentTypeError(f"must be positive ints, got {text!r}")
    return lens


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Naive vs cached decoding: the trained string-reversal model by default, "
                    "random weights with --random, a Hugging Face GPT-2 with --hf.")
    ap.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                    help="a prompt (repeat for a batch); the trained model reverses it")
    ap.add_argument("--checkpoint", default=str(CHECKPOINT), help="the trained model's .npz")
    ap.add_argument("--random", action="store_true",
                    help="the assignment's config with random weights, on random token ids")
    ap.add_argument("--hf", metavar="NAME_OR_DIR", default=None,
                    help="a Hugging Face GPT-2 (hub name on this machine, or a directory)")
    ap.add_argument("--new-tokens", type=cli_int(1, 4096), default=16,
                    help="tokens to generate with --random or --hf (default 16)")
    ap.add_argument("--prompt-len", type=cli_int(1, 4096), default=8,
                    help="--random: prompt length (default 8)")
    ap.add_argument("--batch", type=cli_int(1, 1_000_000), default=2,
                    help="--random: batch size (default 2)")
    ap.add_argument("--prompt-lens", type=_prompt_lens, default=None, metavar="3,7,1",
                    help="--random: a ragged batch, one prompt per length, left-padded "
                         "(overrides --batch and --prompt-len)")
    ap.add_argument("--layers", type=cli_int(1, 1_000_000), default=2,
                    help="--random: transformer blocks (default 2)")
    ap.add_argument("--seed", type=SEED, default=0, help="weights, prompt and sampling seed")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--temperature", type=float, default=None, help="0 or unset = greedy")
    ap.add_argument("--top-k", type=int, default=None, help="keep the k highest logits")
    ap.add_argument("--top-p", type=float, default=None, help="nucleus: keep mass p")
    ap.add_argument("--eos-id", type=int, default=None, help="--random: a row stops at this token")
    ap.add_argument("--prefill-chunk", type=cli_int(1), default=None,
                    help="prefill in chunks of this many tokens")
    args = ap.parse_args(argv)
    if args.random and args.hf:
        ap.error("--random and --hf are two different models: pick one")
    if args.hf:
        return hugging_face(args, ap)
    if args.random:
        return random_weights(args, ap)
    return trained(args, ap)


if __name__ == "__main__":
    raise SystemExit(main())
