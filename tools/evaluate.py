"""Score a trained reversal checkpoint with the NumPy decoders, cached and naive.

    python tools/evaluate.py [--checkpoint checkpoints/reverse.npz] [--n 1000] [--seed 0]

Draws n fresh prompts from the "test" stream (never the stream training draws from), decodes them
greedily in left-padded batches with generate_cached and again with generate_naive, and prints
exact match by prompt length and overall. The exit code is 1 if the two decoders disagree on any
token: the cache must change the cost, never the answer.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/x.py` from anywhere: find the repo
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import time

import numpy as np
from threadpoolctl import threadpool_limits

from block import GPT
from generate import generate_cached, generate_naive, prepare_request
from parts import task
from parts.checks import SEED, cli_int
from tools.cli_types import add_path_flag, load_checkpoint, model_class, path_line
from tools.measure import Progress

EOS_ID = ord(task.END)
CHECKPOINT = str(Path(__file__).resolve().parents[1] / "checkpoints" / "reverse.npz")


def answer_of(tokens: np.ndarray) -> str:
    """One row of generated ids (N,) -> the answer: up to and including the first ".", or all N
    tokens if there is none (rows that finish early repeat "." after it; it is cut here)."""
    text = task.decode(tokens)
    return text[:text.index(task.END) + 1] if task.END in text else text


def decode_prompts(model: GPT, prompts: list[str], naive: bool = False
                   ) -> tuple[list[str], np.ndarray]:
    """Greedy answers to B prompts in one left-padded batch, and the generated tokens (B, N).

    max_new_tokens is the longest prompt's length: an L-character prompt has L + 1 tokens with
    its "=", and so has its answer (L reversed characters and "."). Every row stops at "."."""
    ids = [task.encode(p) for p in prompts]
    decoder = generate_naive if naive else generate_cached
    # One BLAS thread: on a shared 2-core machine a 2-thread BLAS waiting for a busy core made
    # the naive decoder ~25x slower (130 s instead of 5 s for 200 prompts).
    with threadpool_limits(limits=1, user_api="blas"):
        out = decoder(model, ids, max(len(p) for p in prompts), eos_id=EOS_ID)
    return [answer_of(row) for row in out.tokens], out.tokens


def length_batches(prompts: list[str], size: int) -> list[list[int]]:
    """Indices of the prompts sorted by length, in groups of `size`. Similar lengths waste little
    work on padding, and the naive decoder's (B, T, d_ff) arrays stay small (one batch of 1000
    took 4x longer); rows of a group still differ in length, so left padding is exercised."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    return [order[i:i + size] for i in range(0, len(order), size)]


def score_by_length(prompts: list[str], answers: list[str]) -> dict[int, tuple[int, int]]:
    """Characters per prompt L -> (count, exact matches), for every L in 1 .. MAX_CHARS."""
    table = {L: (0, 0) for L in range(1, task.MAX_CHARS + 1)}
    for p, a in zip(prompts, answers, strict=True):
        count, right = table.get(len(p) - 1, (0, 0))
        table[len(p) - 1] = (count + 1, right + (a == task.expected_answer(p)))
    return dict(sorted(table.items()))


def format_table(scores: dict[int, tuple[int, int]]) -> str:
    """One row per prompt length (count, exact match), then the overall row."""
    lines = ["length  count  exact match"]
    for L, (count, right) in scores.items():
        accuracy = f"{100 * right / count:>10.1f}%" if count else f"{'-':>11}"
        lines.append(f"{L:>6}  {count:>5}  {accuracy}")
    count = sum(c for c, _ in scores.values())
    right = sum(r for _, r in scores.values())
    lines.append(f"{'all':>6}  {count:>5}  {100 * right / count:>10.1f}%  ({right}/{count})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Exact match of a reversal checkpoint, decoded by "
                                             "the NumPy cached and naive decoders.")
    ap.add_argument("--checkpoint", type=Path, default=Path(CHECKPOINT),
                    help=f"a .npz written by train.py (default {CHECKPOINT})")
    ap.add_argument("--n", type=cli_int(1, 1_000_000), default=1000,
                    help="held-out prompts (default 1000)")
    ap.add_argument("--seed", type=SEED, default=0, help="seed of the test stream (default 0)")
    ap.add_argument("--batch", type=cli_int(1, 10_000), default=100,
                    help="prompts decoded together (default 100)")
    add_path_flag(ap, fast=True)  # 1,000 prompts decoded naive too: the fast path by default
    args = ap.parse_args(argv)
    model = load_checkpoint(ap, args.checkpoint, model_class=model_class(args))
    try:  # the longest prompt and its answer must fit the checkpoint, before any decoding
        longest = task.encode(task.make_prompt("z" * task.MAX_CHARS))
        prepare_request(model, [longest], len(longest), eos_id=EOS_ID)
    except ValueError as err:
        ap.error(f"argument --checkpoint: {args.checkpoint} cannot answer the task: {err}")

    prompts = task.random_prompts(task.prompt_rng(args.seed, "test"), args.n)
    answers, same, seconds = [""] * args.n, True, {"cached": 0.0, "naive": 0.0}
    progress, done = Progress("tools/evaluate.py"), 0
    for rows in length_batches(prompts, args.batch):
        progress.stage(f"prompts {done + 1}-{done + len(rows)} of {args.n}, cached then naive")
        done += len(rows)
        batch = [prompts[i] for i in rows]
        t0 = time.perf_counter()
        got, cached = decode_prompts(model, batch)
        t1 = time.perf_counter()
        _, naive = decode_prompts(model, batch, naive=True)
        seconds["cached"] += t1 - t0
        seconds["naive"] += time.perf_counter() - t1
        same = same and cached.shape == naive.shape and bool(np.array_equal(cached, naive))
        for i, answer in zip(rows, got, strict=True):
            answers[i] = answer
    c = model.config
    print(f"{args.checkpoint}: d_model {c.d_model}, {c.n_heads} heads, {c.n_layers} layers, "
          f"{args.checkpoint.stat().st_size:,} bytes; {path_line(model)}")
    print(f"{args.n} held-out prompts (test stream, seed {args.seed}), greedy, stop at "
          f"{task.END!r}, batches of {args.batch}\n")
    print(format_table(score_by_length(prompts, answers)))
    print(f"\nnaive and cached tokens identical for every prompt: {same}")
    print(f"time: cached {seconds['cached']:.1f} s, naive {seconds['naive']:.1f} s")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
