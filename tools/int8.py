"""The int8 KV cache (beyond/int8.py), measured on the trained model.

    python tools/int8.py --compare    int8 against the float cache on held-out prompts
    python tools/int8.py --scales     per-token against per-channel key scales, measured

--compare decodes tools/evaluate.py's held-out prompts with the float cache and with the int8
cache: exact match of each, the tokens where they part, the largest logit difference against the
stated bound. --scales rounds the keys per token (this cache) and per channel in groups (KIVI's
keys), teacher-forced: the key error per layer and what it does to the logits. docs/int8.md
shows both.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/x.py` from anywhere: find the repo
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
from collections.abc import Callable

import numpy as np
from threadpoolctl import threadpool_limits

from attention import (
    causal_mask,
    layer_norm,
    merge_heads,
    scaled_dot_product_attention,
    split_heads,
)
from beyond.int8 import LOGIT_TOLERANCE, dequantize, int8_cache, quantize, teacher_forced_logits
from block import GPT, mlp
from generate import generate_cached, prepare_request
from parts import task
from parts.checks import SEED, cli_int, refuse_unused
from tools import evaluate
from tools.cli_types import add_path_flag, load_checkpoint, model_class, path_line
from tools.measure import Progress, note

CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "reverse.npz"


def compare(model: GPT, n: int = 1000, seed: int = 0, batch: int = 100) -> dict[str, float]:
    """Greedy answers to n held-out prompts (tools/evaluate.py's test stream and scoring) with the
    float cache and with the int8 cache. Returns exact match of each, the fraction of generated
    tokens where the two differ, and the largest |logit difference| (the int8 run's logits
    against the float model's on the very same tokens, so a divergence is not counted twice)."""
    prompts = task.random_prompts(task.prompt_rng(seed, "test"), n)
    answers = {"float": [""] * n, "int8": [""] * n}
    differ = total = 0
    worst = largest = 0.0
    eos = evaluate.EOS_ID
    done = 0
    for rows in evaluate.length_batches(prompts, batch):
        note(f"prompts {done + 1}-{done + len(rows)} of {n}")
        done += len(rows)
        ids = [task.encode(prompts[i]) for i in rows]
        steps = max(len(p) for p in ids)
        runs = {name: generate_cached(model, ids, steps, eos_id=eos, cache=cache)
                for name, cache in (("float", None), ("int8", int8_cache(model, len(ids))))}
        for name, run in runs.items():
            for i, tokens in zip(rows, run.tokens, strict=True):
                answers[name][i] = evaluate.answer_of(tokens)
        a, b = runs["float"].tokens, runs["int8"].tokens
        N = min(a.shape[1], b.shape[1])
        for row_a, row_b in zip(a, b, strict=True):
            stop = int(np.argmax(row_a == eos)) + 1 if (row_a == eos).any() else N
            stop = min(stop, N)
            differ += int((row_a[:stop] != row_b[:stop]).sum())
            total += stop
        reference = teacher_forced_logits(model, ids, runs["int8"].tokens)
        worst = max(worst, float(np.abs(reference - runs["int8"].logits).max()))
        largest = max(largest, float(np.abs(reference).max()))
    score = {name: sum(a == task.expected_answer(p) for a, p in zip(got, prompts, strict=True)) / n
             for name, got in answers.items()}
    return {"n": n, "float_exact": score["float"], "int8_exact": score["int8"],
            "tokens_differ": differ / total, "tokens": total, "max_logit_diff": worst,
            "max_abs_logit": largest}


def per_channel(k: np.ndarray, group: int) -> np.ndarray:
    """k (B, H, T, d) rounded through int8 with one scale per channel for each group of `group`
    tokens (KIVI's key scales; every token quantized, as if no full-precision group were kept)."""
    out = np.empty_like(k)
    for start in range(0, k.shape[2], group):
        chunk = k[:, :, start:start + group].swapaxes(-1, -2)  # (B, H, g, d) -> (B, H, d, g)
        out[:, :, start:start + group] = dequantize(*quantize(chunk), k.dtype).swapaxes(-1, -2)
    return out


def per_token(x: np.ndarray) -> np.ndarray:
    """x (..., d) rounded through int8 with one scale per token (this cache)."""
    return dequantize(*quantize(x), x.dtype)


def key_scale_study(model: GPT, n: int = 300, seed: int = 0) -> dict[str, dict[str, float]]:
    """Per-token against per-channel key scales on the trained model, teacher-forced on n
    held-out prompts and their true answers: each layer's relative squared key error, and the
    largest |logit difference| from the float model with keys rounded each way (values per token
    in both) and how many next-token choices change. Also each layer's outlier measure: the
    largest channel's mean |k| over the median channel's."""
    schemes: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "not rounded (values only)": lambda k: k, "per token": per_token,
        "per channel, groups of 16": lambda k: per_channel(k, 16),
        "per channel, groups of 32": lambda k: per_channel(k, 32)}
    c = model.config
    stats = {name: {"logit": 0.0, "mean": 0.0, "changed": 0,
                    **{f"mse{i}": 0.0 for i in range(c.n_layers)}}
             for name in [*schemes, "outliers"]}
    energy = [0.0] * c.n_layers
    channel_means = [[] for _ in range(c.n_layers)]
    for k, prompt in enumerate(task.random_prompts(task.prompt_rng(seed, "test"), n)):
        if k % 50 == 0:
            note(f"prompts {k + 1}-{min(k + 50, n)} of {n}")
        seq = task.encode(prompt + task.expected_answer(prompt))[None]  # (1, T)
        T = seq.shape[1]
        reference = None
        for name, round_keys in [("float", None), *schemes.items()]:
            x = model.wte[seq] + model.wpe[np.arange(T)]  # (1, T, D)
            for i, p in enumerate(model.blocks):
                h, a = layer_norm(x, *p.ln_1, c.ln_eps), p.attn
                q, k, v = (split_heads(h @ w + b, c.n_heads)  # (1, T, D) -> (1, H, T, d)
                           for w, b in ((a.w_q, a.b_q), (a.w_k, a.b_k), (a.w_v, a.b_v)))
                if round_keys is None:
                    energy[i] += float((k ** 2).sum())
                    channel_means[i].append(np.abs(k).mean(axis=(0, 2)))  # (H, d)
                else:
                    k_hat = round_keys(k)
                    stats[name][f"mse{i}"] += float(((k - k_hat) ** 2).sum())
                    k, v = k_hat, per_token(v)
                out, _ = scaled_dot_product_attention(q, k, v, causal_mask(T))
                x = x + merge_heads(out) @ a.w_o + a.b_o
                x = x + mlp(layer_norm(x, *p.ln_2, c.ln_eps), p)
            logits = layer_norm(x, *model.ln_f, c.ln_eps) @ model.wte.T  # (1, T, V)
            logits = logits[0, len(prompt) - 1:-1]  # the positions that choose answer tokens
            if reference is None:
                reference = logits
                continue
            stats[name]["logit"] = max(stats[name]["logit"],
                                       float(np.abs(logits - reference).max()))
            stats[name]["mean"] += float(np.abs(logits - reference).mean()) / n
            stats[name]["changed"] += int((logits.argmax(-1) != reference.argmax(-1)).sum())
    for name in schemes:
        for i in range(c.n_layers):
            stats[name][f"mse{i}"] /= energy[i]
    for i in range(c.n_layers):
        means = np.mean(channel_means[i], axis=0).ravel()  # (H * d,) mean |k| per channel
        stats["outliers"][f"mse{i}"] = float(means.max() / np.median(means))
    return stats


# --- the command ---------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """The command: --compare and/or --scales, on one BLAS thread."""
    ap = argparse.ArgumentParser(description="The int8 KV cache, measured on the trained model.")
    ap.add_argument("--compare", action="store_true",
                    help="int8 against the float cache on held-out prompts")
    ap.add_argument("--scales", action="store_true",
                    help="per-token against per-channel key scales")
    ap.add_argument("--n", type=cli_int(1, 1_000_000), default=None,
                    help="held-out prompts (default 1000 for --compare, 300 for --scales)")
    ap.add_argument("--seed", type=SEED, default=0, help="seed of the test stream (default 0)")
    ap.add_argument("--checkpoint", type=Path, default=CHECKPOINT, help="a trained .npz")
    add_path_flag(ap)
    args = ap.parse_args(argv)
    if not (args.compare or args.scales):
        ap.error("give --compare or --scales")
    if not args.compare:  # --scales computes its forward by hand: no path to choose
        refuse_unused(ap, args, ["--fast"], "applies only to --compare (--scales runs its own "
                                            "forward, written out in key_scale_study)")
    model = load_checkpoint(ap, args.checkpoint, model_class=model_class(args))
    check_model(ap, model, args)
    print(path_line(model))
    # small products on a shared machine: one BLAS thread
    with threadpool_limits(limits=1, user_api="blas"), Progress(
            "tools/int8.py", args.compare + args.scales) as progress:
        if args.compare:
            progress.stage(f"--compare: {args.n or 1000} prompts, float cache and int8 cache")
            print_compare(compare(model, args.n or 1000, args.seed), model)
        if args.scales:
            progress.stage(f"--scales: {args.n or 300} prompts, four ways of rounding the keys")
            print_scales(key_scale_study(model, args.n or 300, args.seed), args.n or 300)
    return 0


def check_model(ap: argparse.ArgumentParser, model: GPT, args: argparse.Namespace) -> None:
    """Before anything is printed: the checkpoint answers the longest held-out prompt within its
    vocabulary and max_seq_len (as tools/evaluate.py checks), and for --scales it is the kind
    key_scale_study writes out: learned positions and one K/V head per query head."""
    longest = task.encode(task.make_prompt("z" * task.MAX_CHARS))
    try:
        prepare_request(model, [longest], len(longest), eos_id=evaluate.EOS_ID)
    except ValueError as err:
        ap.error(f"argument --checkpoint: {args.checkpoint} cannot answer the task: {err}")
    c = model.config
    if args.scales and (c.rope or c.n_kv_heads != c.n_heads or c.sliding_window is not None):
        ap.error(f"argument --checkpoint: --scales measures a model with learned positions, "
                 f"full attention and one K/V head per query head (the trained model's kind); "
                 f"{args.checkpoint} has rope={c.rope}, n_kv_heads={c.n_kv_heads} of "
                 f"n_heads={c.n_heads}, sliding_window={c.sliding_window}")


def print_compare(r: dict[str, float], model: GPT) -> None:
    """--compare's lines: bytes and exact match of each cache, the tokens and logits that part."""
    c = model.config
    float_bytes = model.new_cache(1).nbytes
    int8_bytes = int8_cache(model, 1).nbytes
    print(f"{r['n']} held-out prompts (test stream), greedy, float32 model; cache for 1 row of "
          f"{c.max_seq_len} positions:")
    print(f"  float32 cache  {float_bytes:>7,} bytes   exact match {100 * r['float_exact']:5.1f}%")
    print(f"  int8 cache     {int8_bytes:>7,} bytes   exact match {100 * r['int8_exact']:5.1f}%"
          f"   ({int8_bytes / float_bytes:.3f}x the bytes, scales counted)")
    print(f"generated tokens that differ: {int(round(r['tokens_differ'] * r['tokens']))} of "
          f"{r['tokens']} ({100 * r['tokens_differ']:.2f}%)")
    print(f"largest |logit difference|: {r['max_logit_diff']:.3f} (largest |logit| "
          f"{r['max_abs_logit']:.1f}: {100 * r['max_logit_diff'] / r['max_abs_logit']:.2f}%; "
          f"stated bound {100 * LOGIT_TOLERANCE:.0f}%)")


def print_scales(stats: dict[str, dict[str, float]], n: int) -> None:
    """--scales' table: one row per way of rounding the keys."""
    layers = sorted(int(key[3:]) for key in stats["outliers"] if key.startswith("mse"))
    out = stats["outliers"]
    print(f"key scales on the trained model, {n} held-out prompts teacher-forced")
    print("outlier channels (largest channel's mean |k| / the median channel's): "
          + ", ".join(f"layer {i} {out[f'mse{i}']:.2f}" for i in layers))
    head = "".join(f"  key error L{i}" for i in layers)
    print(f"{'keys rounded':<26}{head}  mean |logit diff|  max  next tokens changed")
    for name, s in stats.items():
        if name == "outliers":
            continue
        cells = "".join(f"{s[f'mse{i}']:>13.2e}" for i in layers)
        print(f"{name:<26}{cells}  {s['mean']:>17.4f}  {s['logit']:.2f}  {s['changed']:>19}")
    print("(key error: sum of squared errors / sum of squares; values rounded per token in "
          "every row)")


if __name__ == "__main__":
    raise SystemExit(main())
