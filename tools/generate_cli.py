"""`python generate.py`: naive and cached decoding side by side, printed for a reader.

    python generate.py            the trained string-reversal model on a batch of text prompts
    python generate.py --prompt "some text"        your own string (the flag may repeat)
    python generate.py --random   the assignment's config with random weights, on token ids
    python generate.py --hf DIR --prompt "text"    a Hugging Face GPT-2 you have, run in NumPy
    python generate.py --draft checkpoints/reverse_draft.npz   also speculative decoding

The decoding itself is generate.py's; this module only prepares requests, prints and times them.
It calls the decoders through the generate module, so that a test can swap one of them.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/x.py` from anywhere: find the repo
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

import generate
from beyond.int8 import LOGIT_TOLERANCE, int8_cache
from block import GPT, GPTConfig
from generate import Generation, left_pad, prepare_request
from parts import task
from parts.checks import SEED, cli_int
from parts.sampling import Sampler
from tools.cli_types import cli_float, load_checkpoint, refuse_unused

CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "reverse.npz"
DEMO_PROMPTS = ("attention", "kv cache", "causal mask", "the exam rule")
SHOW_ROWS = 6  # longer batches are abbreviated when printed
# Two float32 computations of the same logits differ by a few ulps of the LARGEST logit (they sum
# the same terms in another order), so agreement is measured relative to it; a wrong weight,
# position or cache slot is off by far more (1e-2 and up).
TOLERANCE = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10}


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
                 seed: int, prefill_chunk: int | None = None, cache_dtype: str | None = None,
                 **options: object) -> SideBySide:
    """generate_naive, then generate_cached (its cache stored as cache_dtype, default the
    model's), on the same request; sampling (if asked) draws from a fresh generator of the same
    seed for each, so both see the same random numbers."""
    def rng() -> np.random.Generator | None:
        return np.random.default_rng(seed) if options.get("temperature") else None

    t0 = time.perf_counter()
    naive = generate.generate_naive(model, prompts, max_new_tokens, rng=rng(), **options)
    t1 = time.perf_counter()
    cache = None if cache_dtype is None else int8_cache(model, len(prompts))  # "int8"
    cached = generate.generate_cached(model, prompts, max_new_tokens, prefill_chunk, rng=rng(),
                                      cache=cache, **options)
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


def print_agreement(run: SideBySide, cache_dtype: str | None = None) -> bool:
    """naive == cached (tokens, and logits within TOLERANCE of the largest), the cache's growth,
    and the speed of each; True if all three checks hold. An int8 cache is held to beyond.int8's
    stated logit bound instead."""
    B, N = run.cached.tokens.shape
    tolerance = TOLERANCE[run.naive.logits.dtype]
    print(f"\ntokens identical (naive vs cached): {run.same_tokens}")
    if cache_dtype == "int8":  # rounded K and V: held to the int8 cache's stated bound
        bound = LOGIT_TOLERANCE * float(np.abs(run.naive.logits).max())
        agree = run.logit_diff <= bound
        print(f"largest |logit difference|:         {run.logit_diff:.3e}, int8 cache bound "
              f"{bound:.3e} ({LOGIT_TOLERANCE:.0%} of the largest |logit|): "
              f"{'pass' if agree else 'FAIL'}")
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


def trained(args: argparse.Namespace, ap: argparse.ArgumentParser) -> int:
    """The trained string-reversal model: prompts as text, answers checked."""
    texts = args.prompt or list(DEMO_PROMPTS)
    try:
        texts = [task.check_chars(text) for text in texts]
    except ValueError as err:
        ap.error(str(err))
    model = load_checkpoint(ap, args.checkpoint, " (make train writes "
                            f"{CHECKPOINT.relative_to(CHECKPOINT.parents[1])})")
    draft = None if args.draft is None else load_checkpoint(
        ap, args.draft, " (make train-draft writes checkpoints/reverse_draft.npz)")
    prompts = [task.encode(task.make_prompt(text)) for text in texts]
    try:  # the prompts and their answers must fit this checkpoint, before anything is printed
        prepare_request(model, prompts, max(map(len, texts)) + 1, eos_id=ord(task.END))
    except ValueError as err:
        ap.error(f"argument --checkpoint: {args.checkpoint} cannot answer these prompts: {err}")
    c = model.config
    print(f"model: {args.checkpoint} (trained to reverse strings): d_model={c.d_model} "
          f"heads={c.n_heads} layers={c.n_layers} max_seq_len={c.max_seq_len}")
    print("prompts, left-padded into one batch (pads shown as _), each with its attention_mask:")
    show_padded(*left_pad(prompts), token=chr, pad="_")
    run = side_by_side(model, prompts, max(map(len, texts)) + 1, args.seed, args.prefill_chunk,
                       args.cache_dtype, eos_id=ord(task.END))
    print_steps(run, lambda tokens: " ".join(repr(chr(t)) for t in tokens))
    print(f"\n{'prompt':<{task.MAX_CHARS + 2}}{'answer':<{task.MAX_CHARS + 2}}right")
    for text, tokens in zip(texts, run.cached.tokens, strict=True):
        answer = task.decode(tokens).split(task.END)[0] + task.END
        print(f"{task.make_prompt(text):<{task.MAX_CHARS + 2}}{answer:<{task.MAX_CHARS + 2}}"
              f"{'yes' if answer == task.expected_answer(task.make_prompt(text)) else 'NO'}")
    same = print_agreement(run, args.cache_dtype)
    if draft is not None:
        from tools.speculative import versus_cached

        same = versus_cached(model, draft, prompts, eos_id=ord(task.END)) and same
    return 0 if same else 1


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
    run = side_by_side(model, prompts, args.new_tokens, args.seed, args.prefill_chunk,
                       args.cache_dtype, **options)
    print_steps(run, lambda tokens: str(tokens[:SHOW_ROWS].tolist())[:-1]
                + (", ...]" if len(tokens) > SHOW_ROWS else "]"))
    if args.eos_id is not None:
        print(f"\nsteps taken: {run.cached.tokens.shape[1]} of max {args.new_tokens} "
              f"(eos_id={args.eos_id}; finished rows repeat it)")
    return 0 if print_agreement(run, args.cache_dtype) else 1


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
    out = generate.generate_cached(model, prompts, args.new_tokens, args.prefill_chunk, eos_id=eos)
    seconds = time.perf_counter() - start
    B, N = out.tokens.shape
    print(f"model: {args.hf} ({model.config.n_layers} layers, d_model {model.config.d_model}, "
          f"vocab {model.config.vocab_size}), converted to NumPy float32")
    for text, tokens in zip(args.prompt, out.tokens, strict=True):
        print(f"\n{text!r} -> {tokenizer.decode(tokens.tolist())!r}")
    print(f"\n{B * N} tokens in {seconds:.2f} s = {B * N / seconds:.0f} tokens/s (cached, "
          "NumPy)")
    diff, largest = hf_logit_difference(hf, prompts, out)
    tolerance = TOLERANCE[np.dtype(np.float32)]
    agree = diff <= tolerance * largest
    print(f"largest |logit difference| vs Hugging Face on the same tokens: {diff:.2e} = "
          f"{diff / max(largest, 1e-30):.1e} x max|HF logit| {largest:.3g} (float32, tolerance "
          f"{tolerance:.0e}: {'pass' if agree else 'FAIL'})")
    if not agree:
        print(f"generate.py --hf: the NumPy model's logits differ from Hugging Face's by more "
              f"than {tolerance:.0e} of the largest: the conversion or the model is wrong",
              file=sys.stderr)
    return 0 if agree else 1


def hf_logit_difference(hf: object, prompts: list[np.ndarray], out: Generation
                        ) -> tuple[float, float]:
    """Run Hugging Face once over each finished sequence and compare the logits that chose every
    new token with ours: (max |ours - theirs|, max |theirs|), over every row and step."""
    import torch

    diff = largest = 0.0
    for prompt, tokens, logits in zip(prompts, out.tokens, out.logits, strict=True):
        seq = torch.from_numpy(np.concatenate([prompt, tokens])[None])  # (1, P + N)
        with torch.no_grad():
            theirs = hf(seq).logits[0, len(prompt) - 1:-1].numpy()  # (N, V): step n's logits
        diff = max(diff, float(np.max(np.abs(theirs - logits))))
        largest = max(largest, float(np.max(np.abs(theirs))))
    return diff, largest


def _prompt_lens(text: str) -> list[int]:
    try:
        lens = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must look like 3,7,1, got {text!r}") from None
    if not lens or min(lens) < 1:
        raise argparse.ArgumentTypeError(f"must be positive ints, got {text!r}")
    return lens


# Which flags each mode uses; a flag given to a mode that does not use it is refused (it would be
# silently ignored). --prefill-chunk applies to every mode. Defaults are filled in after the check.
MODE_FLAGS = {
    "the trained model": ("--prompt", "--checkpoint", "--draft"),
    "--random": ("--new-tokens", "--prompt-len", "--batch", "--prompt-lens", "--layers", "--seed",
                 "--dtype", "--temperature", "--top-k", "--top-p", "--eos-id"),
    "--hf": ("--prompt", "--new-tokens"),
}
RANDOM_DEFAULTS = {"new_tokens": 16, "prompt_len": 8, "batch": 2, "layers": 2, "seed": 0,
                   "dtype": "float32"}


def check_flags(ap: argparse.ArgumentParser, args: argparse.Namespace, mode: str) -> None:
    """Refuse every flag `mode` does not use, and combinations that would silently drop one."""
    for flag in sorted({f for flags in MODE_FLAGS.values() for f in flags}):
        users = [m for m, flags in MODE_FLAGS.items() if flag in flags]
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
    elif mode == "--hf":
        args.new_tokens = args.new_tokens or RANDOM_DEFAULTS["new_tokens"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Naive vs cached decoding: the trained string-reversal model by default, "
                    "random weights with --random, a Hugging Face GPT-2 with --hf. A flag the "
                    "chosen model does not use is refused.")
    ap.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                    help="a prompt (repeat for a batch); the trained model reverses it")
    ap.add_argument("--checkpoint", default=None,
                    help=f"the trained model's .npz (default {CHECKPOINT})")
    ap.add_argument("--random", action="store_true",
                    help="the assignment's config with random weights, on random token ids")
    ap.add_argument("--hf", metavar="NAME_OR_DIR", default=None,
                    help="a Hugging Face GPT-2 (hub name on this machine, or a directory)")
    ap.add_argument("--new-tokens", type=cli_int(1, 4096), default=None,
                    help="tokens to generate with --random or --hf (default 16)")
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
    ap.add_argument("--cache-dtype", choices=["int8"], default=None,
                    help="store the cache as int8 with float scales (beyond/int8.py; default: "
                         "the model's dtype); compared within a stated logit bound, not exactly")
    ap.add_argument("--draft", default=None, metavar="PATH",
                    help="trained model only: also decode each prompt with speculative decoding, "
                         "this draft proposing (e.g. checkpoints/reverse_draft.npz)")
    args = ap.parse_args(argv)
    if args.draft is not None and (args.random or args.hf):
        ap.error("--draft speculates for the trained model only, not with --random or --hf")
    if args.random and args.hf:
        ap.error("--random and --hf are two different models: pick one")
    mode = "--hf" if args.hf else "--random" if args.random else "the trained model"
    check_flags(ap, args, mode)
    if args.hf:
        return hugging_face(args, ap)
    if args.random:
        return random_weights(args, ap)
    args.checkpoint = args.checkpoint or str(CHECKPOINT)
    return trained(args, ap)


if __name__ == "__main__":
    raise SystemExit(main())
