"""What sharing the cache buys: prefix caching, parallel samples, cascade attention, measured.

    python tools/bench_sharing.py [--quick] [--rounds N] [--threads N] [--seed S] [--out PNG]
                                  [--json PATH]  (default figure: out/sharing.png in the repository)

Three measurements and a picture, each from real runs of beyond/serving.py's Engine on one model
(a random FastGPT, float32: SHAPES below; only its shapes matter for what is measured):

1. A shared system prompt. 64 requests, each a system prompt of SYSTEM tokens followed by a
   question of its own (8..24 tokens), 8 new tokens each, greedy; they arrive 4 per step. The same
   trace with and without prefix caching, interleaved (tools/measure.py): peak blocks in use,
   blocks taken from the cache, and time to first token (from a request's submit to the end of
   the step that made its first token; medians and min-max over every request of every round).
   Without caching every request prefills the system prompt and holds its own copy of it.
2. Parallel samples. n = 1, 2, 4, 8 samples of one prompt of 40 tokens (2 full blocks of 16 and 8
   tokens), 24 new tokens each, sampled: Engine.fork (every prompt block shared, the partly full
   last one too) against n independent requests. Peak blocks and copy-on-write copies (at most
   one per sample: once all but one sharer have copied, the last writes in place). Counted, not
   timed.
3. Cascade attention against the per-sequence walk (beyond/cascade.py, beyond/paged.py): one
   decode step of B requests sharing a prefix of P tokens, each with O tokens of its own, timed
   interleaved (the step rolled back between calls); blocks and bytes of K and V read per step;
   the logits of the two compared. A verdict per case: cascade pays when it reads fewer blocks
   (a group of one shares nothing) and its median step is the shorter.

BLAS runs on one thread unless --threads says otherwise: on a busy 2-core machine two OpenBLAS
threads spend a small step's time waiting for each other (measured here: one decode step of 64
rows took 0.77 s with two threads, 0.23 s with one), which would hide what is being measured.

The picture (--out): the block tables of a shared-prefix group and of a forked group (before and
after copy-on-write), drawn from a small real run at block size 4, shared blocks marked. The same
picture with or without --quick.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/x.py` from anywhere: find the repo
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import time
from dataclasses import dataclass

import numpy as np
import threadpoolctl
from matplotlib.figure import Figure

from beyond.paged import PagedBatch
from beyond.serving import Engine
from block import GPTConfig
from parts.checks import SEED, cli_int, cli_output_file
from parts.files import save_figure, write_json
from tools.cli_types import default_output
from tools.measure import Progress, human, interleave, machine_line
from tools.references import random_model

OUT = "sharing.png"
BLOCK = 16  # tokens per block (vLLM's default)
SHAPES = {"vocab_size": 256, "max_seq_len": 1024, "d_model": 256, "n_heads": 4, "n_layers": 2}
VLLM = ("vLLM's paper (Kwon et al., 2023): sharing saved 6-30% of KV memory for parallel "
        "sampling, 37-66% for beam search")


@dataclass(frozen=True)
class Sizes:
    """Everything a run's size depends on; --quick picks the small one."""

    requests: int  # section 1: requests sharing the system prompt
    per_step: int  # ... arriving this many per step
    system: int  # ... tokens of the system prompt
    question: tuple[int, int]  # ... each question's length, uniform on [low, high]
    new: int  # ... new tokens per request
    samples: tuple[int, ...]  # section 2: n
    cascade: tuple[tuple[int, int, int], ...]  # section 3: (B rows, P prefix, O own tokens)
    rounds: int  # interleaved rounds (--rounds overrides)


FULL = Sizes(64, 4, 256, (8, 24), 8, (1, 2, 4, 8),
             ((1, 512, 8), (8, 512, 8), (64, 512, 8), (64, 16, 8), (8, 16, 256)), 5)
QUICK = Sizes(8, 2, 32, (2, 6), 4, (1, 2, 4), ((1, 64, 4), (4, 64, 4), (4, 16, 48)), 1)


def the_model(dtype: type = np.float32) -> object:
    return random_model(GPTConfig(**SHAPES), seed=0, dtype=dtype, fast=True)


# --- 1. a shared system prompt: prefix caching on and off ----------------------------------------

def system_trace(sizes: Sizes, seed: int) -> list[np.ndarray]:
    """The prompts of section 1, in arrival order: one system prompt, a question each."""
    rng = np.random.default_rng([seed, 1])
    system = rng.integers(0, SHAPES["vocab_size"], sizes.system)
    low, high = sizes.question
    return [np.concatenate([system, rng.integers(0, SHAPES["vocab_size"], rng.integers(low,
                                                                                      high + 1))])
            for _ in range(sizes.requests)]


@dataclass
class TraceRun:
    """One run of the trace: what every request made, when its first token came, the counts."""

    tokens: dict[int, np.ndarray]
    first_token_s: list[float]  # per request, seconds from submit to its first token
    stats: dict[str, int]


def run_trace(model: object, prompts: list[np.ndarray], sizes: Sizes, caching: bool
              ) -> TraceRun:
    """The trace through one engine: sizes.per_step requests submitted before each step, until
    all are in and done. The pool holds every request at its longest (no preemption)."""
    longest = max(len(p) for p in prompts) + sizes.new
    engine = Engine(model, num_blocks=len(prompts) * -(-longest // BLOCK), block_size=BLOCK,
                    prefix_caching=caching, keep_logits=False)
    submitted, first = {}, {}
    pending = list(prompts)
    while pending or engine.waiting or engine.running:
        for prompt in pending[:sizes.per_step]:
            submitted[engine.submit(prompt, sizes.new)] = time.perf_counter()
        pending = pending[sizes.per_step:]
        made = engine.step()
        now = time.perf_counter()
        for rid in made:
            first.setdefault(rid, now - submitted[rid])
    tokens = {rid: engine.result(rid).tokens for rid in submitted}
    return TraceRun(tokens, [first[rid] for rid in sorted(first)], engine.stats())


def shared_system_prompt(model: object, sizes: Sizes, rounds: int, seed: int) -> dict:
    """Section 1, the two variants interleaved for `rounds` rounds."""
    prompts = system_trace(sizes, seed)
    runs: dict[str, list[TraceRun]] = {"no prefix caching": [], "prefix caching": []}
    variants = {name: (lambda name=name: runs[name].append(
        run_trace(model, prompts, sizes, name == "prefix caching"))) for name in runs}
    times = interleave(variants, rounds, label="shared system prompt")
    out = {}
    for name, done in runs.items():
        first = np.concatenate([r.first_token_s for r in done]) * 1e3
        out[name] = {"peak_blocks": done[0].stats["peak_blocks_in_use"],
                     "prefix_hit_blocks": done[0].stats["prefix_hit_blocks"],
                     "preemptions": done[0].stats["preemptions"],
                     "ttft_ms": spread(first), "run_ms": spread(np.array(times[name]) * 1e3)}
    a, b = (runs[name][0].tokens for name in runs)
    out["requests_whose_tokens_differ"] = sum(not np.array_equal(a[r], b[r]) for r in a)
    return out


def spread(ms: np.ndarray) -> dict:
    """Median, min and max of some times in milliseconds, and how many."""
    return {"median": float(np.median(ms)), "min": float(ms.min()), "max": float(ms.max()),
            "n": int(ms.size)}


def fmt(s: dict) -> str:
    """'12.3 ms [10.1-15.2]': median [min-max]."""
    return f"{s['median']:.1f} ms [{s['min']:.1f}-{s['max']:.1f}]"


# --- 2. parallel samples: fork against independent requests --------------------------------------

SAMPLE_PROMPT, SAMPLE_NEW = 40, 24  # 2 full blocks of 16 and 8 tokens; 24 new tokens


def parallel_samples(model: object, n: int, seed: int) -> dict:
    """n samples of one prompt, forked (sharing) or submitted n times (not): peak blocks, copies."""
    prompt = np.random.default_rng([seed, 2]).integers(0, SHAPES["vocab_size"], SAMPLE_PROMPT)
    out = {}
    for name in ("independent", "forked"):
        engine = Engine(model, num_blocks=n * -(-(SAMPLE_PROMPT + SAMPLE_NEW) // BLOCK),
                        block_size=BLOCK, keep_logits=False)
        options = {"temperature": 0.8, "top_k": 50}
        if name == "forked":
            engine.fork(engine.submit(prompt, SAMPLE_NEW, seed=seed, **options), n - 1) if (
                n > 1) else engine.submit(prompt, SAMPLE_NEW, seed=seed, **options)
        else:
            for j in range(n):
                engine.submit(prompt, SAMPLE_NEW, seed=seed + j, **options)
        engine.run()
        s = engine.stats()
        out[name] = {"peak_blocks": s["peak_blocks_in_use"], "copies": s["copies_on_write"]}
    out["saved_percent"] = 100 * (1 - out["forked"]["peak_blocks"]
                                  / out["independent"]["peak_blocks"])
    return out


# --- 3. cascade attention against the per-sequence walk ------------------------------------------

def decoding_group(model: object, rows: int, prefix: int, own: int, seed: int) -> Engine:
    """An engine whose `rows` requests share a prefix of `prefix` tokens (cached full blocks) and
    hold `own` tokens of their own each, all decoding: the next step feeds each one token."""
    rng = np.random.default_rng([seed, 3, rows, prefix, own])
    shared = rng.integers(0, SHAPES["vocab_size"], prefix)
    engine = Engine(model, num_blocks=rows * -(-(prefix + own + 1) // BLOCK) + 1,
                    block_size=BLOCK, prefix_caching=True, keep_logits=False)
    for b in range(rows):  # own - 1 tokens of its own, then one made: `own` after the step
        own_ids = rng.integers(0, SHAPES["vocab_size"], own - 1)
        engine.submit(np.concatenate([shared, own_ids]), 8)  # none finishes before the step
        if b == 0:
            engine.step()  # the first computes the prefix; the others find it cached
    while engine.waiting:
        engine.step()
    return engine


def cascade_case(model: object, rows: int, prefix: int, own: int, rounds: int, seed: int
                 ) -> dict:
    """One decode step of the group, walked and cascaded, interleaved; each call is rolled back
    before the next. Blocks and bytes of K/V read per step, and the two logits compared."""
    engine = decoding_group(model, rows, prefix, own, seed)
    pool, running = engine.pool, list(engine.running)
    ids = np.array([[r.sequence()[r.cached]] for r in running])  # (B, 1): each one's next token
    seqs = [r.id for r in running]
    done: dict[str, PagedBatch | None] = {"walk": None, "cascade": None}
    logits, read = {}, {}

    def call(name: str) -> None:
        done[name] = PagedBatch(pool, seqs, [1] * len(seqs), name == "cascade")
        before = pool.blocks_read
        logits[name] = model(ids, done[name], last_only=True)[:, -1]
        read[name] = pool.blocks_read - before

    def rewind(name: str) -> None:
        for batch in done.values():
            if batch is not None and batch.undo is not None:
                batch.roll_back(None)

    times = interleave({name: (lambda name=name: call(name)) for name in done}, rounds,
                       prepare={name: (lambda name=name: rewind(name)) for name in done},
                       warmup=1, label=f"cascade: {rows} rows, prefix {prefix}, own {own}")
    rewind("walk")
    block_bytes = 2 * pool.n_kv_heads * BLOCK * pool.d_head * pool.keys.itemsize  # K and V
    out = {"rows": rows, "prefix": prefix, "own": own,
           "max_abs_logit_diff": float(np.abs(logits["walk"] - logits["cascade"]).max())}
    for name in done:
        out[name] = {"step_ms": spread(np.array(times[name]) * 1e3), "blocks_read": read[name],
                     "bytes_read": read[name] * block_bytes}
    out["pays"] = bool(read["cascade"] < read["walk"] and out["cascade"]["step_ms"]["median"]
                       < out["walk"]["step_ms"]["median"])  # a group of one shares nothing
    return out


# --- the picture: block tables from a real run ---------------------------------------------------

def table_snapshots(model: object) -> list[tuple[str, dict[str, list[int]], dict[str, int],
                                                 list[int]]]:
    """A small real run at block size 4 (prefix caching on): three requests with one system
    prompt of 10 tokens (the last two admitted a step after the first: hits), and a prompt of 6
    tokens forked into 3 samples. Snapshots (title, tables by label, lengths, counts) of the
    forked group just after its prefill (every block shared, the partly full one too), and one
    step later with the shared-prefix group (the samples copied the last block on write)."""
    rng = np.random.default_rng(4)
    system = rng.integers(0, SHAPES["vocab_size"], 10)
    engine = Engine(model, num_blocks=40, block_size=4, prefix_caching=True, keep_logits=False)
    labels = {}
    labels[engine.submit(np.concatenate([system, rng.integers(0, 256, 3)]), 6)] = "system + q1"
    forked = engine.submit(rng.integers(0, 256, 6), 6, temperature=0.8, seed=1)
    labels[forked] = "sample 0"
    for j, rid in enumerate(engine.fork(forked, 2), start=1):
        labels[rid] = f"sample {j}"
    engine.step()  # prefills; the forks join at their parent's first token
    for n in (5, 2):
        labels[engine.submit(np.concatenate([system, rng.integers(0, 256, n)]), 6)] = (
            f"system + q{len(labels) - 2}")
    pool = engine.pool

    def snap(title: str, which: list[int]) -> tuple:
        tables = {labels[r]: list(pool.tables[r]) for r in which}
        lengths = {labels[r]: pool.lengths[r] for r in which}
        return title, tables, lengths, list(pool.refs)

    samples = [r for r in labels if labels[r].startswith("sample")]
    after_prefill = snap("forked group after its prefill: every block shared", samples)
    engine.step()  # two join with hits; the samples append: copy-on-write
    system_group = [r for r in labels if labels[r].startswith("system")]
    return [snap("shared system prompt (10 tokens): its 2 full blocks in every table",
                 system_group), after_prefill,
            snap("one step later: each sample but one copied the shared last block", samples)]


def plot(snapshots: list[tuple], path: Path) -> None:
    """One panel per snapshot: a row per request, a cell per logical block, holding the physical
    block's number and how many tokens it holds; blue if another table holds it too, grey if
    not."""
    fig = Figure(figsize=(10, 6.5), layout="constrained")
    axes = fig.subplots(len(snapshots), 1)
    width = max(len(t) for _, tables, _, _ in snapshots for t in tables.values())
    for ax, (title, tables, lengths, refs) in zip(axes, snapshots, strict=True):
        for y, (label, table) in enumerate(tables.items()):
            for j, block in enumerate(table):
                held = min(4, lengths[label] - 4 * j)
                shared = refs[block] > 1
                colour = ("C0" if held == 4 else "C1") if shared else "0.85"
                ax.add_patch(_box(j, y, colour))
                ax.text(j + 0.5, y + 0.5, f"#{block}\n{held}/4", ha="center", va="center",
                        fontsize=8, color="white" if shared else "black")
        ax.set(xlim=(0, width + 0.2), ylim=(len(tables), 0), title=title,
               yticks=np.arange(len(tables)) + 0.5, yticklabels=list(tables),
               xticks=np.arange(width) + 0.5,
               xticklabels=[f"logical {j}" for j in range(width)])
        ax.tick_params(length=0, labelsize=8)
        ax.set_frame_on(False)
    fig.suptitle("Block tables from a real run (block size 4): #physical block, tokens held; "
                 "blue = a full block several tables hold,\norange = a partly full block shared "
                 "since the fork (copied on the first write), grey = held by one table",
                 fontsize=9)
    save_figure(fig, path, dpi=90)


def _box(x: int, y: int, colour: str) -> object:
    from matplotlib.patches import Rectangle

    return Rectangle((x + 0.05, y + 0.08), 0.9, 0.84, color=colour)


# --- the command ---------------------------------------------------------------------------------

def report_system(result: dict, sizes: Sizes) -> str:
    lines = [f"1. {sizes.requests} requests, one system prompt of {sizes.system} tokens + a "
             f"question of {sizes.question[0]}..{sizes.question[1]}, {sizes.new} new tokens, "
             f"{sizes.per_step} arriving per step"]
    for name in ("no prefix caching", "prefix caching"):
        r = result[name]
        lines.append(f"   {name:<18} peak blocks {r['peak_blocks']:>5}, blocks hit "
                     f"{r['prefix_hit_blocks']:>5}, preemptions {r['preemptions']}")
    for name in ("no prefix caching", "prefix caching"):
        r = result[name]
        lines.append(f"   {name:<18} time to first token {fmt(r['ttft_ms'])}; whole trace "
                     f"{fmt(r['run_ms'])}")
    a, b = result["no prefix caching"], result["prefix caching"]
    blocks = b["peak_blocks"] / a["peak_blocks"]
    faster = a["ttft_ms"]["median"] / b["ttft_ms"]["median"]
    lines.append(f"   peak blocks with caching / without: {blocks:.3f}; median time to first "
                 f"token with caching {faster:.1f}x faster")
    lines.append(f"   requests whose tokens differ between the two: "
                 f"{result['requests_whose_tokens_differ']}")
    return "\n".join(lines)


def report_samples(results: dict[int, dict]) -> str:
    lines = [f"2. n samples of one prompt of {SAMPLE_PROMPT} tokens ({SAMPLE_PROMPT // BLOCK} "
             f"full blocks + {SAMPLE_PROMPT % BLOCK}), {SAMPLE_NEW} new tokens each",
             "    n  independent: peak blocks   forked: peak blocks  copies on write  saved"]
    for n, r in results.items():
        lines.append(f"   {n:>2}  {r['independent']['peak_blocks']:>24}  "
                     f"{r['forked']['peak_blocks']:>19}  {r['forked']['copies']:>15}  "
                     f"{r['saved_percent']:4.1f}%")
    lines.append(f"   {VLLM}")
    return "\n".join(lines)


def report_cascade(results: list[dict]) -> str:
    lines = ["3. one decode step, B rows sharing a prefix of P tokens, O tokens of their own: "
             "walk vs cascade",
             "     B     P    O  blocks read: walk cascade   K/V read: walk    cascade"]
    for r in results:
        w, c = r["walk"], r["cascade"]
        lines.append(f"   {r['rows']:>3} {r['prefix']:>5} {r['own']:>4}  {w['blocks_read']:>17} "
                     f"{c['blocks_read']:>7}   {human(w['bytes_read']):>14} "
                     f"{human(c['bytes_read']):>10}")
    for r in results:
        w, c = r["walk"]["step_ms"], r["cascade"]["step_ms"]
        verdict = "pays" if r["pays"] else "does not pay" + (
            " (nothing shared)" if r["cascade"]["blocks_read"] == r["walk"]["blocks_read"] else "")
        lines.append(f"   B {r['rows']}, P {r['prefix']}, O {r['own']}: walk {fmt(w)}, cascade "
                     f"{fmt(c)}: {w['median'] / c['median']:.2f}x faster, {verdict}")
    worst = max(r["max_abs_logit_diff"] for r in results)
    lines.append(f"   max |walk - cascade| logits (float32): {worst:.1e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Prefix caching, parallel samples with copy-on-"
                                             "write, and cascade attention, measured.")
    ap.add_argument("--quick", action="store_true", help="small sizes, one round (seconds)")
    ap.add_argument("--rounds", type=cli_int(1, 1000), default=None,
                    help=f"interleaved rounds of each timing (default {FULL.rounds}; "
                         f"{QUICK.rounds} with --quick)")
    ap.add_argument("--threads", type=cli_int(1, 512), default=1,
                    help="BLAS threads (default 1: on a busy machine more threads wait for each "
                         "other instead of computing)")
    ap.add_argument("--seed", type=SEED, default=0, help="draws every prompt (default 0)")
    ap.add_argument("--out", type=cli_output_file(".png"), default=None,
                    help=f"the picture of block tables (default out/{OUT} in the repository)")
    ap.add_argument("--json", type=cli_output_file(".json"), default=None,
                    help="also write every figure as JSON")
    args = ap.parse_args(argv)
    args.out = args.out or default_output(ap, OUT)
    sizes = QUICK if args.quick else FULL
    rounds = args.rounds or sizes.rounds

    with threadpoolctl.threadpool_limits(limits=args.threads, user_api="blas"):
        return measure(args, sizes, rounds)


def measure(args: argparse.Namespace, sizes: Sizes, rounds: int) -> int:
    """Every section, printed as it ends; the picture; the JSON."""
    machine = machine_line()  # with the thread count this run uses
    print(machine)
    shapes = ", ".join(f"{k} {v}" for k, v in SHAPES.items())
    print(f"model: a random FastGPT, float32 ({shapes}); blocks of {BLOCK} tokens; timings are "
          f"medians [min-max] of {rounds} interleaved round(s)\n")
    model = the_model()
    with Progress("tools/bench_sharing.py", 4) as progress:
        progress.stage("a shared system prompt, prefix caching off and on")
        system = shared_system_prompt(model, sizes, rounds, args.seed)
        print(report_system(system, sizes) + "\n")
        progress.stage("parallel samples: forked and independent")
        samples = {n: parallel_samples(model, n, args.seed) for n in sizes.samples}
        print(report_samples(samples) + "\n")
        progress.stage("cascade attention against the per-sequence walk")
        cascade = [cascade_case(model, *case, rounds, args.seed) for case in sizes.cascade]
        print(report_cascade(cascade) + "\n")
        progress.stage("the picture of block tables")
        plot(table_snapshots(model), args.out)
    print(f"wrote {args.out}")
    if args.json:
        write_json(args.json, {"machine": machine, "shapes": SHAPES, "block_size": BLOCK,
                               "rounds": rounds, "threads": args.threads, "quick": args.quick,
                               "seed": args.seed,
                               "shared_system_prompt": system,
                               "parallel_samples": {str(n): r for n, r in samples.items()},
                               "cascade": cascade}, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
