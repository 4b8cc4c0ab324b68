"""`python tools/generate_cli.py`: generate.py's command (naive and cached decoding side by side,
printed for a reader) with what lies past the assignment:

    python tools/generate_cli.py --fast            the fast path (fast/model.py) instead of the
                                                   readable model, which `python generate.py` runs
    python tools/generate_cli.py --cache-dtype int8           the cache stores K and V as int8
    python tools/generate_cli.py --draft checkpoints/reverse_draft.npz   and speculative decoding
    python tools/generate_cli.py --hf DIR --prompt "text"     a Hugging Face GPT-2 you have

Every flag of `python generate.py` works here too. The decoding is generate.py's, called through
the generate module so that a test can swap one of its functions.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/x.py` from anywhere: find the repo
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import os
import time

import numpy as np

import generate
from beyond.int8 import LOGIT_TOLERANCE, int8_cache, teacher_forced_logits
from block import GPT
from generate import CHECKPOINT, TOLERANCE, Generation, Rounded, prepare_request
from tools.cli_types import add_path_flag, load_checkpoint, model_class
from tools.speculative import check_versus_cached, versus_cached

# generate.py's flags per model, and this command's: --draft for the trained model, --hf's own;
# --cache-dtype for the models decoded naive against cached (--hf is compared with Hugging Face,
# on our own cache: an int8 one there would be ignored). --fast applies to all three.
MODE_FLAGS = {"the trained model": (*generate.MODE_FLAGS["the trained model"], "--draft",
                                    "--cache-dtype"),
              "--random": (*generate.MODE_FLAGS["--random"], "--cache-dtype"),
              "--hf": ("--prompt", "--new-tokens")}


def hugging_face(args: argparse.Namespace, ap: argparse.ArgumentParser,
                 model_class: type[GPT] = GPT) -> int:
    """A Hugging Face GPT-2 checkpoint (a hub name this machine has, or a save_pretrained
    directory) converted with GPT.from_gpt2 and decoded by our cached decoder; its logits are
    compared with Hugging Face's on the same tokens."""
    if not args.prompt:
        ap.error("--hf needs --prompt TEXT")
    refuse_what_offline_cannot_load(ap, args.hf)
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
        model = model_class.from_gpt2(hf.state_dict(), dtype=np.float32, hf_config=hf.config)
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
          f"vocab {model.config.vocab_size}), converted to NumPy float32; "
          f"{generate.path_line(model)}")
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


def refuse_what_offline_cannot_load(ap: argparse.ArgumentParser, name: str) -> None:
    """With HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set, as `make` sets it, a hub name is loaded
    from the local cache or not at all; without this check transformers spends seconds trying
    every file it might need before it says so. A name the cache does not hold is refused from
    the cache alone (neither torch nor transformers imported), saying how to get the weights. A
    directory is left to from_pretrained; online, a name may be downloaded."""
    from huggingface_hub import constants, try_to_load_from_cache

    offline = [var for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
               if os.environ.get(var, "").upper() in constants.ENV_VARS_TRUE_VALUES]
    if not offline or Path(name).is_dir():
        return
    try:
        cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    except ValueError:  # not a hub name at all (e.g. "a/b/c")
        cached = False
    if not cached:
        ap.error(f"argument --hf: no Hugging Face GPT-2 at {name!r} on this machine: not a "
                 f"directory, and not in the Hugging Face cache ({constants.HF_HUB_CACHE}), "
                 f"and {offline[0]} is set, so nothing is downloaded. Get it once with "
                 f"`{offline[0]}=0 hf download {name}` (or run without {offline[0]}), or give "
                 "a directory written by save_pretrained")


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


def main(argv: list[str] | None = None) -> int:
    ap = generate.parser(
        "Naive vs cached decoding: the trained string-reversal model by default, random weights "
        "with --random, a Hugging Face GPT-2 with --hf; the readable model unless --fast. A flag "
        "the chosen model does not use is refused.")
    ap.add_argument("--hf", metavar="NAME_OR_DIR", default=None,
                    help="a Hugging Face GPT-2: a directory written by save_pretrained, or a "
                         "hub name (downloaded if need be; with HF_HUB_OFFLINE set, as make sets "
                         "it, only one the local cache holds)")
    add_path_flag(ap)  # --fast / --readable (the default)
    ap.add_argument("--cache-dtype", choices=["int8"], default=None,
                    help="store the cache as int8 with float scales (beyond/int8.py; default: "
                         "the model's dtype); its logits are held to a stated bound along its "
                         "own tokens (teacher-forced), and where its tokens part from the float "
                         "run's is reported")
    ap.add_argument("--draft", default=None, metavar="PATH",
                    help="trained model only: also decode each prompt with speculative decoding, "
                         "this draft proposing (e.g. checkpoints/reverse_draft.npz)")
    args = ap.parse_args(argv)
    if args.draft is not None and (args.random or args.hf):
        ap.error("--draft speculates for the trained model only, not with --random or --hf")
    if args.random and args.hf:
        ap.error("--random and --hf are two different models: pick one")
    mode = "--hf" if args.hf else "--random" if args.random else "the trained model"
    generate.check_flags(ap, args, mode, MODE_FLAGS)
    cls = model_class(args)
    rounded = Rounded(int8_cache, LOGIT_TOLERANCE, "int8 cache", teacher_forced_logits) if (
        args.cache_dtype) else None
    if args.hf:
        args.new_tokens = args.new_tokens or generate.RANDOM_DEFAULTS["new_tokens"]
        return hugging_face(args, ap, cls)
    if args.random:
        return generate.random_weights(args, ap, cls, rounded)
    args.checkpoint = args.checkpoint or str(CHECKPOINT)
    model, texts, prompts = generate.load_trained(args, ap, cls)
    draft = None if args.draft is None else load_draft(ap, args.draft, cls, model, prompts)
    code = generate.show_trained(args, model, texts, prompts, rounded)
    if draft is not None:
        code = 0 if versus_cached(model, draft, prompts, eos_id=ord(generate.task.END)) and (
            code == 0) else 1
    return code


def load_draft(ap: argparse.ArgumentParser, path: str, cls: type[GPT], target: GPT,
               prompts: list[np.ndarray]) -> GPT:
    """The --draft checkpoint, checked against the target and every prompt before anything is
    printed: a file it can load, the target's vocabulary, room for each prompt and its answer.
    Any refusal is a usage error naming --draft."""
    draft = load_checkpoint(ap, path, " (make train-draft writes checkpoints/reverse_draft.npz)",
                            cls, "--draft")
    try:
        check_versus_cached(target, draft, prompts, eos_id=ord(generate.task.END))
    except (TypeError, ValueError) as err:
        ap.error(f"argument --draft: {path} cannot draft for these prompts: {err}")
    return draft


if __name__ == "__main__":
    raise SystemExit(main())
