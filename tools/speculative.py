"""Speculative decoding (beyond/speculative.py) with the reversal model and its draft: one
round's table, the benchmark, the profile, and the comparison `python generate.py --draft` prints.

    python tools/speculative.py --round     every round of one sampled answer, accept/reject
    python tools/speculative.py --bench     acceptance, tokens/s vs generate_cached, gamma 1..6
    python tools/speculative.py --profile   where a decode step's time goes (target and draft)

Every timing uses tools/measure.py's harness; --profile splits a step as
tools/bench_profile.py's step_breakdown does. docs/speculative.md shows all three.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/x.py` from anywhere: find the repo
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import cProfile
import io
import pstats
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
from threadpoolctl import threadpool_limits

from beyond.speculative import (
    SpeculativeGeneration,
    check_pair,
    check_request,
    expected_speedup,
    generate_speculative,
)
from block import GPT, count_weights, random_weights, weight_shapes
from fast.model import FastGPT
from generate import decode, generate_cached, prefill
from parts import task
from parts.checks import (
    SEED,
    cli_float,
    cli_int,
    cli_load,
    fits_in_memory,
    one_line,
    refuse_unused,
)
from tools.bench_profile import OVERHEAD, PARTS, step_breakdown
from tools.measure import (
    Progress,
    interleave,
    machine_header,
    no_gc,
    note,
    print_header,
    summary,
)

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "checkpoints" / "reverse.npz"
DRAFT = ROOT / "checkpoints" / "reverse_draft.npz"


# --- beside generate_cached, for `python generate.py --draft PATH` --------------------------------

def check_versus_cached(target: GPT, draft: GPT, prompts: list[np.ndarray], eos_id: int | None,
                        gamma: int = 4) -> None:
    """Refuse, before anything runs or is printed, a pair or a prompt versus_cached could not
    decode: the draft's vocabulary, and room in both models' caches for every prompt and its
    len(prompt) new tokens (ValueError/TypeError, as generate_speculative would raise later)."""
    for p in prompts:
        check_request(target, draft, p[None], len(p), gamma, eos_id=eos_id)


def versus_cached(target: GPT, draft: GPT, prompts: list[np.ndarray], eos_id: int | None,
                  gamma: int = 4, repeats: int = 5) -> bool:
    """Decode each prompt (batch 1, greedy, len(prompt) new tokens at most) with generate_cached
    and generate_speculative, interleaved `repeats` times; print the acceptance rate and both
    speeds (medians). True if every speculative answer is the cached one, token for token."""
    runs: dict[str, list] = {}

    def run_cached() -> None:
        runs["cached"] = [generate_cached(target, p[None], len(p), eos_id=eos_id)
                          for p in prompts]

    def run_speculative() -> None:
        runs["speculative"] = [generate_speculative(target, draft, p[None], len(p), gamma=gamma,
                                                    eos_id=eos_id) for p in prompts]

    times = interleave({"cached": run_cached, "speculative": run_speculative}, repeats)
    cached, spec = runs["cached"], runs["speculative"]
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
    seconds = {name: summary(t)["median_ms"] / 1e3 for name, t in times.items()}
    for name, sec in seconds.items():
        print(f"time {name:<11}: {1e3 * sec:8.2f} ms = {tokens / sec:8.0f} tokens/s "
              f"(median of {repeats})")
    print(f"speculative / cached tokens/s: {seconds['cached'] / seconds['speculative']:.2f}x "
          "(tiny models: a draft step costs nearly a target step; see docs/speculative.md)")
    return same


# --- the commands: one round's table, the benchmark, the profile ---------------------------------

EOS_ID = ord(".")  # parts.task.END: the reversal answer's last token


def show(token: int) -> str:
    """A token as its character in quotes when printable, else its id."""
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


def round_table(args: argparse.Namespace, target: GPT, draft: GPT) -> int:
    """--round: every round of one sampled reversal, then the same prompt greedy, checked
    against generate_cached (target and draft in float64; main checked the request)."""

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

    c = replace(target.config, n_layers=target.config.n_layers + extra_layers, d_ff=d_ff)
    # The weights are drawn in float64 and then copied into the model: all must fit, checked
    # before the draw (GPT's own check comes only after it).
    fits_in_memory(f"a heavier target of {c.n_layers} layers and d_ff {d_ff}",
                   count_weights(c) * (8 + 2 * target.dtype.itemsize))
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

    def cached() -> list:
        return [generate_cached(target, p[None], len(p), eos_id=EOS_ID) for p in prompts]

    def speculative(g: int) -> object:
        return lambda: [generate_speculative(target, draft, p[None], len(p), gamma=g,
                                             eos_id=EOS_ID) for p in prompts]

    note(f"each gamma's tokens against generate_cached ({len(prompts)} prompts)")
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
    note(f"timing cached and {len(gammas)} gammas, {rounds} interleaved rounds")
    with no_gc():
        times = interleave(variants, rounds)
    note("the cost of a decode step and of a verify call")
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


BENCH_GAMMAS = range(1, 7)


def bench_prompts(n: int) -> list[np.ndarray]:
    """--bench's n held-out reversal prompts (test stream, seed 0), as token ids."""
    return [task.encode(p) for p in task.random_prompts(task.prompt_rng(0, "test"), n)]


def bench(args: argparse.Namespace, target: GPT, draft: GPT, big: GPT) -> int:
    """--bench: the shipped pair, then the same target made heavier (`big`, same tokens); the
    models on the fast path, float32, checked by main."""

    print_header(machine_header())
    prompts = bench_prompts(args.n)
    gammas = BENCH_GAMMAS
    print(f"greedy, batch 1, {args.n} held-out reversal prompts (test stream, seed 0), one BLAS "
          f"thread; medians of {args.rounds or 5} interleaved repeats")
    print("formula: (1 - a^(gamma+1)) / ((1 - a)(gamma c + 1)); 'formula, v' puts the measured "
          "verify cost v in place of its 1\n")
    with threadpool_limits(limits=1, user_api="blas"), Progress(
            "tools/speculative.py --bench", 2) as progress:
        progress.stage("1. the shipped pair")
        print(f"1. the shipped pair: {TARGET.name} (d_model {target.config.d_model}) and "
              f"{Path(args.draft).name} (d_model {draft.config.d_model})")
        same = speed_table(target, draft, prompts, gammas, args.rounds or 5)
        progress.stage("2. a heavier target computing the same function")
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


PROFILE_TEXT = "abcdefghijklmnopqrstuvwx="  # cProfile's speculative decodes


def profile(args: argparse.Namespace, target: GPT, draft: GPT, big: GPT) -> int:
    """--profile: one decode step of each model split into matrix products, attention,
    elementwise work, cache writes and the Python around them (tools/bench.py's breakdown), and
    cProfile's busiest functions over one speculative decode."""


    models = {"target": target, "draft": draft, "heavier target": big}
    prompt = task.encode("abcdefghijkl=")[None]  # (1, 13)
    progress = Progress("tools/speculative.py --profile", len(models) + 2)
    with threadpool_limits(limits=1, user_api="blas"), no_gc():
        parts = {}
        for name, m in models.items():
            progress.stage(f"one decode step of the {name}, part by part")
            parts[name] = step_breakdown(m, prompt, True, args.rounds or 30)
    print("one decode step after 13 tokens, batch 1, one BLAS thread: each part timed alone with "
          "the step's own calls; the rest = measured total - parts")
    print(f"{'part':<18}" + "".join(f"{name:>24}" for name in models))
    for part in (*PARTS, OVERHEAD):
        print(f"{part:<18}" + "".join(
            f"{p['parts_ms'][part]:>13.3f} ms {100 * p['share'][part]:5.1f}%"
            for p in parts.values()))
    print(f"{'total':<18}" + "".join(f"{p['total_ms']:>13.3f} ms {100.0:5.1f}%"
                                     for p in parts.values()))
    progress.stage("the heavier target's MLP products, 1, 2 and 5 rows")
    print_product_times(args.d_ff, args.rounds or 30)
    progress.stage("cProfile over 20 speculative decodes")
    text = PROFILE_TEXT
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
    """The command: one of --round, --bench, --profile."""

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
    ap.add_argument("--prompt", default=None,
                    help="--round: the characters to reverse (default 'speculative decoding')")
    ap.add_argument("--gamma", type=cli_int(1, 64), default=None,
                    help="--round: drafts per round (default 4)")
    ap.add_argument("--temperature", type=cli_float(0), default=None,
                    help="--round: default 1.0")
    ap.add_argument("--seed", type=SEED, default=None, help="--round: the sampling seed (0)")
    ap.add_argument("--n", type=cli_int(1, 10_000), default=None,
                    help="--bench: prompts (default 40)")
    ap.add_argument("--rounds", type=cli_int(1, 10_000), default=None,
                    help="--bench, --profile: interleaved repeats (default: 5 with --bench, 30 "
                         "with --profile)")
    ap.add_argument("--extra-layers", type=cli_int(0, 64), default=None,
                    help="--bench, --profile: blocks added to the heavier target (default 10)")
    ap.add_argument("--d-ff", type=cli_int(1, 1 << 16), default=None,
                    help="--bench, --profile: the heavier target's MLP width (default 2048)")
    args = ap.parse_args(argv)
    action = "--round" if args.round else "--bench" if args.bench else "--profile"
    for flags, users in ((["--prompt", "--gamma", "--temperature", "--seed"], ["--round"]),
                         (["--n"], ["--bench"]),
                         (["--rounds", "--extra-layers", "--d-ff"], ["--bench", "--profile"])):
        if action not in users:  # a flag the run would ignore is refused, not dropped
            refuse_unused(ap, args, flags, f"applies only to {' and '.join(users)}")
    for name, value in (("prompt", "speculative decoding"), ("gamma", 4), ("temperature", 1.0),
                        ("seed", 0), ("n", 40), ("extra_layers", 10), ("d_ff", 2048)):
        if getattr(args, name) is None:
            setattr(args, name, value)
    # Every input is checked before the first line of output: the models, and every request the
    # action will make of them.
    if args.round:
        target, draft = load_pair(ap, args, action, GPT, "float64")
        try:
            check_request(target, draft, task.encode(task.make_prompt(args.prompt))[None],
                          len(task.make_prompt(args.prompt)), args.gamma, eos_id=EOS_ID)
        except ValueError as err:
            ap.error(f"--round cannot decode --prompt {args.prompt!r} with the target and "
                     f"--draft {args.draft}: {one_line(err)}")
        return round_table(args, target, draft)
    target, draft = load_pair(ap, args, action, FastGPT, "float32")  # the fast path
    prompts = (bench_prompts(args.n) if args.bench
               else [task.encode(PROFILE_TEXT), task.encode("abcdefghijkl=")])
    try:
        check_versus_cached(target, draft, prompts, EOS_ID, gamma=max(BENCH_GAMMAS))
    except ValueError as err:
        ap.error(f"argument --draft: {args.draft} cannot draft for these prompts: "
                 f"{one_line(err)}")
    try:
        big = heavier(target, args.extra_layers, args.d_ff)
    except ValueError as err:
        ap.error(f"argument --extra-layers/--d-ff: the heavier target: {one_line(err)}")
    return bench(args, target, draft, big) if args.bench else profile(args, target, draft, big)


def load_pair(ap: argparse.ArgumentParser, args: argparse.Namespace, action: str,
              cls: type[GPT], dtype: str) -> tuple[GPT, GPT]:
    """The shipped target (which `action` needs) and the --draft checkpoint as cls in dtype, a
    pair of one vocabulary, or a usage error naming the path."""
    target = cli_load(ap, TARGET, lambda path: cls.load(path, dtype=dtype),
                      " (make train writes it)", flag=action)
    draft = cli_load(ap, args.draft, lambda path: cls.load(path, dtype=dtype),
                     " (make train-draft writes checkpoints/reverse_draft.npz)", flag="--draft")
    try:
        check_pair(target, draft, 1)
    except ValueError as err:
        ap.error(f"argument --draft: {args.draft}: {one_line(err)}")
    return target, draft

if __name__ == "__main__":
    raise SystemExit(main())
