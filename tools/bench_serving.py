"""Serving, measured: continuous batching against static batching and against transformers,
chunked prefill, the price of a block table, and a picture of the pool from a real run.

    python tools/bench_serving.py [--throughput] [--chunked] [--versus-hf] [--table] [--picture]
                                  [--quick] [--threads N] [--seed S] [--json PATH] [--figures DIR]

No section flag runs sections 1-4 and the picture (33 minutes on the 2-core Xeon of
docs/benchmarks-serving.md at 1 thread, under other engineers' test suites; --quick: small
sizes, about 30 seconds, a smoke test of every field). Each section says on stderr when it
starts, and each timed round as it begins (tools/measure.Progress); stdout is the report alone.
Every comparison is timed with tools/measure.py: variants interleaved, A B A B, the order
rotated each round, the collector off; a figure is the median of the rounds with its spread
(min-max). B, the most requests running at once, is the same for every side of a comparison.

    1. throughput       continuous (beyond/serving.Engine) against static batching (batches of B
                        in arrival order, left-padded, each running until its longest request
                        ends: generate_cached per batch): the trained reverser (FastGPT, 64
                        requests of the reversal task, lengths uniform on 1-24 characters, each
                        answer L + 1 tokens ending at eos), and long prompts at GPT-2-small
                        shapes. Useful tokens/s (each request's own answer tokens), the ratio,
                        and the token rows each side computed per token it needed (padding).
    2. chunked          long prompts arrive while short requests decode: the engine with a
                        token_budget (decodes first, then prefill chunks) against prefill-first
                        (no budget): tokens/s and the worst wait between two tokens of one
                        request.
    3. versus-hf        transformers' continuous batching (tools/hf_serving.py) on the same
                        weights and requests, greedy: tokens/s ours / theirs, their setup apart.
    4. table            one decode step through a block table (the readable gather, the fast
                        block walk) against one contiguous cached step (model.new_cache), same
                        batch and lengths; a cProfile of both fast steps is printed if the walk
                        costs more than GOAL_TABLE.
    5. picture          the block pool over time from a real Engine run with a small pool: which
                        request holds each physical block at each step, admits, finishes, a
                        cancel and a preemption, beside the block tables at one step.

Correctness guards, printed and in the JSON: every request's tokens equal between the sides of a
comparison (greedy) and, on the trained model, the right answers; any request that differs is
named with the gap between its top two logits where it parted (a float32 near-tie, or a bug).
The exit code is 1 if a guard that must hold fails (ours against ours, the answers). Writes the
JSON under out/serving/ (a lone section or --quick under a folder of its own) and the picture as
serving_pool.png there (--figures DIR: `make figures` writes the committed figures/).

Inputs are checked before any work: the trained checkpoint (if a chosen section uses it),
transformers' continuous batching (--versus-hf), the output folders; a flag the chosen sections
do not read is refused (--figures without the picture; --quick, --seed, --threads with the
picture alone, which times nothing and draws the same run at any size).
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
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from beyond.paged import BlockPool, PagedBatch
from beyond.serving import FINISHED, RUNNING, WAITING, Engine
from block import GPT
from fast.model import FastGPT
from generate import decode, generate_cached, greedy, prefill
from parts import task
from parts.checks import (
    SEED,
    cli_int,
    cli_load,
    cli_output_dir,
    cli_output_file,
    one_line,
    refuse_unused,
)
from parts.files import save_figure, write_json
from tools.bench_setup import GPT2_SMALL_SHAPE, build_pair
from tools.cli_types import OUT_DIR, writable_folder
from tools.measure import (
    Progress,
    finish_header,
    interleave,
    machine_label,
    print_header,
    start_header,
)

CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "reverse.npz"
EOS_ID = ord(task.END)
SECTIONS = ("throughput", "chunked", "versus_hf", "table", "picture")
GOAL_CONTINUOUS = 1.5  # continuous / static useful tokens/s, at least
GOAL_HF = 1.0  # ours / transformers' tokens/s, above
GOAL_TABLE = 1.15  # a paged decode step / a contiguous one, at most
VOID_SPREAD = 0.5  # a median whose (max - min) / median passes this is marked void
FIGURE = "serving_pool.png"
TINY_SHAPE = dict(vocab_size=512, n_positions=1024, n_embd=64, n_head=4, n_layer=2)


@dataclass(frozen=True)
class Settings:
    """How much to measure. FULL is the benchmark; QUICK keeps every field at small sizes."""

    shape: dict  # the GPT-2-shaped model (random weights) of sections 1 (long prompts), 2, 3, 4
    shape_name: str
    running: int  # B: the most requests at once, static batches and the engines alike
    block_size: int  # tokens per block (page), ours and transformers'
    trained_requests: int  # section 1 on the trained reverser
    trained_rounds: int
    long_requests: int  # section 1's long-prompt variant and section 3
    long_prompt: tuple[int, int]  # prompt tokens, uniform on [low, high]
    long_answer: tuple[int, int]  # new tokens, uniform on [low, high]
    long_rounds: int
    hf_rounds: int
    chunk_decoders: int  # section 2: short requests decoding from step 0
    chunk_decoder_prompt: int
    chunk_decoder_tokens: int
    chunk_long_prompts: tuple[int, ...]  # long prompts arriving later ...
    chunk_arrivals: tuple[int, ...]  # ... at these steps of the engine
    chunk_long_tokens: int
    token_budget: int
    chunk_rounds: int
    table_batch: int  # section 4: B sequences of table_length tokens, one decode step
    table_length: int
    trained_table_length: int  # the trained model holds at most 128 positions
    table_steps: int  # timed steps per variant
    warmup: int  # untimed rounds before the timed ones (sections 1 on the trained model, 4)


FULL = Settings(shape=GPT2_SMALL_SHAPE, shape_name="GPT-2-small shapes (12 layers, d_model 768, "
                "12 heads), vocab 512, random weights, float32", running=8, block_size=16,
                trained_requests=64, trained_rounds=7, long_requests=16, long_prompt=(32, 192),
                long_answer=(8, 64), long_rounds=3, hf_rounds=3, chunk_decoders=4,
                chunk_decoder_prompt=16, chunk_decoder_tokens=40, chunk_long_prompts=(512, 512),
                chunk_arrivals=(4, 20), chunk_long_tokens=8, token_budget=64, chunk_rounds=3,
                table_batch=8, table_length=512, trained_table_length=100, table_steps=15,
                warmup=2)
QUICK = Settings(shape=TINY_SHAPE, shape_name="a tiny GPT-2 (2 layers, d_model 64, 4 heads), "
                 "vocab 512, random weights, float32", running=4, block_size=16,
                 trained_requests=12, trained_rounds=1, long_requests=6, long_prompt=(4, 40),
                 long_answer=(2, 10), long_rounds=1, hf_rounds=1, chunk_decoders=2,
                 chunk_decoder_prompt=4, chunk_decoder_tokens=10, chunk_long_prompts=(60,),
                 chunk_arrivals=(2,), chunk_long_tokens=3, token_budget=16, chunk_rounds=1,
                 table_batch=4, table_length=40, trained_table_length=30, table_steps=1,
                 warmup=0)  # one round of everything: no spread, so no VOID that a rerun drops


# --- spreads and guards --------------------------------------------------------------------------

def spread(values: list[float]) -> dict:
    """The median of a list (seconds, or tokens/s), its min and max, and whether the spread is too
    wide to trust: (max - min) / median above VOID_SPREAD."""
    v = np.asarray(values, dtype=np.float64)
    med = float(np.median(v))
    return {"median": med, "min": float(v.min()), "max": float(v.max()), "n": int(v.size),
            "void": bool(med > 0 and (v.max() - v.min()) / med > VOID_SPREAD)}


def show(st: dict, unit: str, digits: int = 3) -> str:
    """'12.3 ms [11.9 ms-13.0 ms]' (and VOID when the spread is too wide): every timed number
    carries its unit, so a rerun of a docs output block knows it for a time (tests/test_readme)."""
    g = f".{digits}g"
    return (f"{st['median']:{g}}{unit} [{st['min']:{g}}{unit}-{st['max']:{g}}{unit}]"
            + (" VOID" if st["void"] else ""))


def per_second(tokens: int, seconds: list[float]) -> dict:
    """Tokens/s of each timed run, summarised by spread."""
    return spread([tokens / s for s in seconds])


def ratio_of(a: dict, b: dict) -> float:
    return a["median"] / b["median"]


def differences(ours: list[np.ndarray], theirs: list[list[int]] | list[np.ndarray],
                logits: list[np.ndarray] | None = None) -> list[dict]:
    """Every request whose tokens differ: its index, the first step they part, and (given our
    logits per request, (N, V)) the gap between our top two logits there, relative to the
    largest: a float32 near-tie is ~1e-6, a bug far more."""
    out = []
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape == b.shape and np.array_equal(a, b):
            continue
        n = min(a.size, b.size)
        at = int(np.argmax(a[:n] != b[:n])) if (a[:n] != b[:n]).any() else n
        row = {"request": i, "first_differing_token": at, "ours": a[at:at + 3].tolist(),
               "theirs": b[at:at + 3].tolist()}
        if logits is not None and at < len(logits[i]):
            top = np.sort(logits[i][at].astype(np.float64))[::-1]
            row["top_two_gap_relative"] = float((top[0] - top[1]) / max(abs(top[0]), 1e-30))
        out.append(row)
    return out


# --- the models ----------------------------------------------------------------------------------

class Models:
    """The models a run needs, built once when first asked for: the trained reverser (fast and
    readable), and the GPT-2-shaped model with random weights as Hugging Face's GPT2LMHeadModel,
    our FastGPT with the same weights, and the readable GPT with them."""

    def __init__(self, s: Settings, seed: int, trained: FastGPT | None = None) -> None:
        self.s, self.seed = s, seed
        self.built: dict[str, object] = {}
        if trained is not None:  # loaded (and so checked) by the command before any work
            self.built |= {"trained": trained, "trained_readable": GPT(
                trained.config, dtype=trained.dtype, weights=trained.named_weights())}

    def get(self, name: str) -> object:
        if name not in self.built:
            if name in ("trained", "trained_readable"):
                self.built["trained"] = FastGPT.load(CHECKPOINT)
                self.built["trained_readable"] = GPT.load(CHECKPOINT)
            else:
                hf, fast = build_pair(self.s.shape, self.seed)
                self.built |= {"hf": hf, "shaped": fast, "shaped_readable": GPT(
                    fast.config, dtype=fast.dtype, weights=fast.named_weights())}
        return self.built[name]


class Recorder(FastGPT):
    """FastGPT that notes the (B, T) of every forward it runs (a call, or a prefill, which
    plans and runs without the call): the token rows a step computed, padding included (for an
    untimed run that counts them). dry: compute nothing and return zero logits, for a workload
    whose schedule does not depend on the tokens (no eos); a paged cache only (a ModelCache
    checks that its layers were written)."""

    calls: list[tuple[int, int]]
    dry: bool

    def run(self, ids: np.ndarray, *args: object, **kwargs: object) -> np.ndarray:
        self.calls.append(ids.shape)
        return super().run(ids, *args, **kwargs)

    def forward(self, ids: np.ndarray, *args: object, **kwargs: object) -> np.ndarray:
        if not self.dry:
            return super().forward(ids, *args, **kwargs)
        return np.zeros((ids.shape[0], ids.shape[1], self.config.vocab_size), self.dtype)


def recorder(model: FastGPT, dry: bool) -> Recorder:
    """A Recorder with model's weights."""
    r = Recorder(model.config, dtype=model.dtype, weights=model.named_weights())
    r.calls, r.dry = [], dry
    return r


# --- 1. continuous against static batching -------------------------------------------------------

@dataclass(frozen=True)
class Workload:
    """Requests: prompts (1-D ids each), each one's new tokens, an eos id (or None)."""

    name: str
    description: str
    prompts: tuple[np.ndarray, ...]
    new_tokens: tuple[int, ...]
    eos_id: int | None
    answers: tuple[str, ...] | None = None  # the right answers, where the task has them

    @property
    def needed(self) -> int:
        """Token rows the model must run at least: every prompt and every new token but the
        last (which is emitted, never fed back)."""
        return sum(p.size + n - 1 for p, n in zip(self.prompts, self.new_tokens, strict=True))


def reversal_workload(n: int, seed: int) -> Workload:
    """The trained model's task: n prompts of the test stream, L characters uniform on 1..24;
    the answer, L reversed characters and '.', is L + 1 tokens, which is each one's limit."""
    prompts = task.random_prompts(task.prompt_rng(seed, "test"), n)
    return Workload("reversal", f"{n} reversal prompts (test stream, seed {seed}), L uniform on "
                    f"1..{task.MAX_CHARS} characters, answer L + 1 tokens ending at eos '.'",
                    tuple(task.encode(p) for p in prompts), tuple(len(p) for p in prompts),
                    EOS_ID, tuple(task.expected_answer(p) for p in prompts))


def long_workload(s: Settings, seed: int) -> Workload:
    """Random prompts at the shaped model: lengths and answer lengths uniform on the settings'
    ranges, no eos (random weights have no task): each request makes exactly its count."""
    rng = np.random.default_rng([seed, 7])
    P = rng.integers(s.long_prompt[0], s.long_prompt[1] + 1, s.long_requests)
    N = rng.integers(s.long_answer[0], s.long_answer[1] + 1, s.long_requests)
    prompts = tuple(rng.integers(0, s.shape["vocab_size"], int(p)) for p in P)
    return Workload("long prompts", f"{s.long_requests} requests, prompts uniform on "
                    f"{s.long_prompt[0]}..{s.long_prompt[1]} tokens, answers on "
                    f"{s.long_answer[0]}..{s.long_answer[1]}, no eos", prompts,
                    tuple(int(n) for n in N), None)


def cut(tokens: np.ndarray, n: int, eos_id: int | None) -> np.ndarray:
    """A static row's useful tokens: its first n, and up to its first eos."""
    row = np.asarray(tokens)[:n]
    if eos_id is not None and (row == eos_id).any():
        row = row[:int(np.argmax(row == eos_id)) + 1]
    return row


def run_static(model: GPT, w: Workload, B: int) -> list[np.ndarray]:
    """Static batching: batches of B in arrival order, left-padded, each decoded until its
    longest request ends (generate_cached); each request's useful tokens."""
    out = []
    for i in range(0, len(w.prompts), B):
        counts = w.new_tokens[i:i + B]
        g = generate_cached(model, list(w.prompts[i:i + B]), max(counts), eos_id=w.eos_id)
        out += [cut(row, n, w.eos_id) for row, n in zip(g.tokens, counts, strict=True)]
    return out


def engine_blocks(w: Workload, B: int, block_size: int) -> int:
    """A pool that holds the B longest requests at full length at once: no preemption."""
    need = sorted(-(-(p.size + n - 1) // block_size)
                  for p, n in zip(w.prompts, w.new_tokens, strict=True))
    return sum(need[-B:])


def run_engine(model: GPT, w: Workload, B: int, block_size: int, keep_logits: bool = False,
               token_budget: int | None = None) -> tuple[Engine, list[int]]:
    """Continuous batching: every request submitted, then run to the end; the engine and the
    request ids."""
    engine = Engine(model, engine_blocks(w, B, block_size), block_size, max_running=B,
                    token_budget=token_budget, keep_logits=keep_logits)
    ids = [engine.submit(p, n, w.eos_id) for p, n in zip(w.prompts, w.new_tokens, strict=True)]
    engine.run()
    return engine, ids


def static_rows(w: Workload, B: int) -> int:
    """Token rows static batching computes without eos: each batch of b prefills b x its
    longest prompt, then decodes b rows for its longest count - 1 steps."""
    rows = 0
    for i in range(0, len(w.prompts), B):
        b = len(w.prompts[i:i + B])
        rows += b * max(p.size for p in w.prompts[i:i + B]) + b * (max(w.new_tokens[i:i + B]) - 1)
    return rows


def token_rows(model: FastGPT, run: Callable[[GPT], object], dry: bool) -> int:
    """Token rows (B x T, padding included) the model computed in run(model): an untimed run
    through a Recorder with the same weights (dry: computing nothing)."""
    r = recorder(model, dry)
    run(r)
    return sum(b * t for b, t in r.calls)


def throughput(model: FastGPT, w: Workload, B: int, block_size: int, rounds: int,
               warmup: int) -> dict:
    """Static and continuous on one workload: tokens checked once (untimed, which warms both
    up), then `rounds` interleaved timed runs of each."""
    static = run_static(model, w, B)
    engine, ids = run_engine(model, w, B, block_size, keep_logits=True)
    cont = [engine.result(i).tokens for i in ids]
    logits = [engine.result(i).logits for i in ids]
    useful = sum(t.size for t in cont)
    times = interleave({"static": lambda: run_static(model, w, B),
                        "continuous": lambda: run_engine(model, w, B, block_size)},
                       rounds, warmup=warmup, label=f"{w.name}, static and continuous")
    rate = {who: per_second(useful, t) for who, t in times.items()}
    dry = w.eos_id is None  # then the schedule is the same whatever the tokens
    rows = {"static": static_rows(w, B) if dry else token_rows(
                model, lambda m: run_static(m, w, B), dry),
            "continuous": token_rows(model, lambda m: run_engine(m, w, B, block_size), dry)}
    right = None if w.answers is None else sum(
        task.decode(t) == a for t, a in zip(cont, w.answers, strict=True))
    return {"workload": w.description, "requests": len(w.prompts), "running": B,
            "block_size": block_size, "pool_blocks": engine_blocks(w, B, block_size),
            "useful_tokens": useful, "needed_token_rows": w.needed, "rounds": rounds,
            "seconds": {who: spread(t) for who, t in times.items()}, "tokens_per_s": rate,
            "continuous_over_static": ratio_of(rate["continuous"], rate["static"]),
            "token_rows_computed": rows,
            "engine_steps": engine.steps, "static_differs": differences(cont, static, logits),
            "answers_right": right}


# --- 2. chunked prefill --------------------------------------------------------------------------

@dataclass(frozen=True)
class Arrivals:
    """Requests that arrive at given steps: (step, prompt, new tokens) each, in step order."""

    requests: tuple[tuple[int, np.ndarray, int], ...]
    description: str


def arrivals_workload(s: Settings, seed: int) -> Arrivals:
    """chunk_decoders short requests from step 0, then the long prompts at their steps."""
    rng = np.random.default_rng([seed, 11])
    V = s.shape["vocab_size"]
    short = [(0, rng.integers(0, V, s.chunk_decoder_prompt), s.chunk_decoder_tokens)
             for _ in range(s.chunk_decoders)]
    long = [(at, rng.integers(0, V, p), s.chunk_long_tokens)
            for at, p in zip(s.chunk_arrivals, s.chunk_long_prompts, strict=True)]
    return Arrivals(tuple(short + long), (
        f"{s.chunk_decoders} requests of {s.chunk_decoder_prompt} prompt tokens decode "
        f"{s.chunk_decoder_tokens} tokens each from step 0; prompts of "
        f"{', '.join(map(str, s.chunk_long_prompts))} tokens arrive at steps "
        f"{', '.join(map(str, s.chunk_arrivals))} and make {s.chunk_long_tokens} each"))


def serve_arrivals(model: GPT, a: Arrivals, B: int, block_size: int, budget: int | None
                   ) -> dict:
    """Drive Engine.step() ourselves, submitting each request at its step; the time of every
    token each request emits. Returns the tokens, the wall time, every request's waits between
    two of its tokens, and each one's wait from submission to its first token."""
    need = sum(-(-(p.size + n - 1) // block_size) for _, p, n in a.requests)
    engine = Engine(model, need, block_size, max_running=B, token_budget=budget,
                    keep_logits=False)
    queue, submitted, emitted = list(a.requests), {}, {}
    start = now = time.perf_counter()
    steps = 0
    while queue or engine.waiting or engine.running:
        while queue and queue[0][0] <= steps:
            _, prompt, n = queue.pop(0)
            submitted[engine.submit(prompt, n)] = now
        for rid in engine.step():
            emitted.setdefault(rid, []).append(time.perf_counter())
        now = time.perf_counter()
        steps += 1
    gaps = [float(g) for t in emitted.values() for g in np.diff(t)]
    first = [emitted[rid][0] - t for rid, t in submitted.items()]
    return {"tokens": [engine.result(rid).tokens for rid in submitted], "seconds": now - start,
            "gaps": gaps, "first_token": first, "steps": steps}


def chunked_prefill(model: FastGPT, a: Arrivals, s: Settings) -> dict:
    """Prefill-first against a token budget, interleaved; tokens checked to agree."""
    B, bs = s.running, s.block_size
    budgets = {"prefill-first": None, f"token_budget={s.token_budget}": s.token_budget}
    runs: dict[str, list[dict]] = {name: [] for name in budgets}
    check = {name: serve_arrivals(model, a, B, bs, b) for name, b in budgets.items()}
    interleave({name: (lambda name=name, b=b: runs[name].append(
        serve_arrivals(model, a, B, bs, b))) for name, b in budgets.items()}, s.chunk_rounds,
        label="prefill-first and token budget")
    tokens = sum(n for _, _, n in a.requests)
    out = {}
    for name, rs in runs.items():
        out[name] = {"tokens_per_s": per_second(tokens, [r["seconds"] for r in rs]),
                     "worst_gap_s": spread([max(r["gaps"]) for r in rs]),
                     "median_gap_s": spread([float(np.median(r["gaps"])) for r in rs]),
                     "worst_first_token_s": spread([max(r["first_token"]) for r in rs]),
                     "steps": rs[0]["steps"]}
    first, second = list(budgets)
    a_tok, b_tok = (check[n]["tokens"] for n in budgets)
    return {"workload": a.description, "running": B, "token_budget": s.token_budget,
            "tokens": tokens, "rounds": s.chunk_rounds, "variants": out,
            "chunked_over_prefill_first_tokens_per_s": ratio_of(
                out[second]["tokens_per_s"], out[first]["tokens_per_s"]),
            "chunked_over_prefill_first_worst_gap": ratio_of(
                out[second]["worst_gap_s"], out[first]["worst_gap_s"]),
            "differs": differences(b_tok, a_tok)}


# --- 3. against transformers' continuous batching ------------------------------------------------

def versus_hf(model: FastGPT, hf: object, w: Workload, s: Settings) -> dict:
    """Our engine and transformers' continuous batching on the same weights and requests, the
    same running limit, page size and pages; generation timed apart from setup on both sides."""
    from tools.hf_serving import continuous_batching

    B, bs = s.running, s.block_size
    blocks = engine_blocks(w, B, bs)
    prompts = [p.tolist() for p in w.prompts]
    times: dict[str, list[float]] = {"ours": [], "hf": [], "ours_setup": [], "hf_setup": []}

    def ours(keep_logits: bool = False) -> Engine:
        t0 = time.perf_counter()
        engine = Engine(model, blocks, bs, max_running=B, keep_logits=keep_logits)
        for p, n in zip(w.prompts, w.new_tokens, strict=True):
            engine.submit(p, n, w.eos_id)
        t1 = time.perf_counter()
        engine.run()
        times["ours_setup"].append(t1 - t0)
        times["ours"].append(time.perf_counter() - t1)
        return engine

    def theirs() -> object:
        run = continuous_batching(hf, prompts, list(w.new_tokens), page_size=bs,
                                  num_blocks=blocks, eos_id=w.eos_id, max_requests_per_batch=B)
        times["hf_setup"].append(run.setup_seconds)
        times["hf"].append(run.generate_seconds)
        return run

    # No torch.inference_mode here: the engine's thread updates its cache outside it.
    engine, run = ours(keep_logits=True), theirs()  # checked once, untimed: a warm-up
    for kept in times.values():
        kept.clear()
    interleave({"ours": ours, "hf": theirs}, s.hf_rounds, label="ours and transformers'")
    mine = [engine.result(i).tokens for i in range(len(w.prompts))]
    useful = sum(w.new_tokens)
    rate = {who: per_second(useful, times[who]) for who in ("ours", "hf")}
    return {"workload": w.description, "requests": len(w.prompts), "running": B,
            "block_size": bs, "pool_blocks": blocks, "useful_tokens": useful,
            "rounds": s.hf_rounds, "hf_settings": run.settings, "tokens_per_s": rate,
            "ours_over_hf": ratio_of(rate["ours"], rate["hf"]),
            "setup_s": {"ours": spread(times["ours_setup"]), "hf": spread(times["hf_setup"])},
            "differs": differences(mine, run.tokens, [engine.result(i).logits
                                                      for i in range(len(w.prompts))])}


# --- 4. the price of the table -------------------------------------------------------------------

def step_price(fast: FastGPT, readable: GPT, B: int, L: int, block_size: int, steps: int,
               warmup: int, seed: int) -> dict:
    """One decode step of B sequences holding L tokens each: contiguous (model.new_cache) and
    paged (a pool with shuffled tables), for the readable path (the gather) and the fast one
    (the block walk). Each step is undone untimed before the next (truncate, roll_back)."""
    rng = np.random.default_rng([seed, L])
    prompt = rng.integers(0, fast.config.vocab_size, (B, L))  # (B, L)
    variants, prepare, first = {}, {}, {}
    for path, model in (("readable", readable), ("fast", fast)):
        cache = model.new_cache(B)
        token = greedy(prefill(model, prompt, cache))  # (B,)
        variants[f"{path} contiguous"] = lambda m=model, c=cache, t=token: decode(m, t, c)
        prepare[f"{path} contiguous"] = lambda c=cache: c.truncate(L)
        pool = BlockPool(model.config.n_layers, *model.kv_shape, B * (-(-(L + 1) // block_size)),
                         block_size, model.dtype, shuffle=seed)
        seqs = list(range(B))
        model(prompt, PagedBatch(pool, seqs, [L] * B), last_only=True)
        last: list[PagedBatch] = []

        def paged(m=model, pool=pool, seqs=seqs, t=token, last=last) -> np.ndarray:
            batch = PagedBatch(pool, seqs, [1] * B)
            last.append(batch)
            return m(t[:, None], batch, last_only=True)[:, -1]  # (B,) -> (B, 1) -> (B, V)

        def rewind(last=last) -> None:
            while last:
                batch = last.pop()
                batch.roll_back(None)

        name = f"{path} paged ({'gather' if path == 'readable' else 'block walk'})"
        variants[name], prepare[name] = paged, rewind
        for v in (f"{path} contiguous", name):
            prepare[v]()
            first[v] = variants[v]()  # (B, V): the step's logits, for the guard
    times = interleave(variants, steps, prepare=prepare, warmup=warmup)
    st = {name: spread(t) for name, t in times.items()}
    names = list(variants)
    argmax = {name: greedy(x).tolist() for name, x in first.items()}
    return {"batch": B, "length": L, "block_size": block_size, "steps": steps,
            "step_s": st,
            "readable_paged_over_contiguous": ratio_of(st[names[1]], st[names[0]]),
            "fast_paged_over_contiguous": ratio_of(st[names[3]], st[names[2]]),
            "same_argmax": len({tuple(a) for a in argmax.values()}) == 1,
            "max_abs_logit_diff_fast_paged_vs_contiguous": float(
                np.abs(first[names[3]] - first[names[2]]).max()),
            "profile": profile_steps({n: (variants[n], prepare[n]) for n in names[2:]},
                                     max(steps, 5))}


def profile_steps(runs: dict[str, tuple[Callable, Callable]], n: int, lines: int = 8
                  ) -> dict[str, list[str]]:
    """cProfile of n steps of each variant (its rewinds left out): the `lines` functions that
    took the most time of their own, as pstats prints them."""
    out = {}
    for name, (step, rewind) in runs.items():
        prof = cProfile.Profile()
        for _ in range(n):
            rewind()
            prof.enable()
            step()
            prof.disable()
        rewind()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(lines)
        body = text.getvalue().splitlines()
        start = next(i for i, line in enumerate(body) if line.lstrip().startswith("ncalls"))
        total = next((line.strip() for line in body if "function calls" in line), "")
        out[name] = [total, *[line.rstrip() for line in body[start:] if line.strip()]]
    return out


# --- 5. the picture ------------------------------------------------------------------------------

PICTURE_PROMPTS = ((0, "paged attention"), (0, "kv cache"), (0, "block table"),
                   (3, "free list"), (5, "copy on write"), (9, "a small pool"),
                   (12, "preempt me"))
PICTURE_CANCEL = (6, 1)  # before step 6, request 1 ("kv cache") is cancelled
PICTURE_POOL = (12, 4)  # blocks, tokens per block


def pool_story(model: GPT) -> dict:
    """A real Engine run over a small pool (PICTURE_POOL) on the trained reverser: requests
    arriving at their steps, one cancelled, at least one preempted. After every step: which
    request holds each physical block, each table and length, the free list, and the events
    (admit, finish, cancel, preempt) read from the requests' states. Each request's tokens are
    checked against generate_cached alone (ValueError if not, or if nothing was preempted)."""
    blocks, bs = PICTURE_POOL
    engine = Engine(model, blocks, bs)
    queue = list(PICTURE_PROMPTS)
    owner, tables, events, free = [], [], [], []
    step = 0
    while queue or engine.waiting or engine.running:
        while queue and queue[0][0] <= step:
            engine.submit(task.encode(task.make_prompt(queue.pop(0)[1])), 30, EOS_ID)
        if step == PICTURE_CANCEL[0]:
            engine.cancel(PICTURE_CANCEL[1])
            events.append((step, PICTURE_CANCEL[1], "cancel"))
        before = {rid: r.state for rid, r in engine.requests.items()}
        engine.step()
        for rid, r in engine.requests.items():
            was = before.get(rid)
            kind = {(WAITING, RUNNING): "admit", (RUNNING, FINISHED): "finish",
                    (RUNNING, WAITING): "preempt", (WAITING, FINISHED): "admit+finish"
                    }.get((was, r.state))
            if kind:
                events.append((step, rid, kind))
        held = np.full(blocks, -1)
        for rid, table in engine.pool.tables.items():
            held[table] = rid
        owner.append(held)
        tables.append({rid: (list(t), engine.pool.lengths[rid])
                       for rid, t in engine.pool.tables.items()})
        free.append(list(engine.pool.free))
        step += 1
    if engine.preemptions == 0 or not any(k == "preempt" for _, _, k in events):
        raise ValueError("pool_story: nothing was preempted; the picture must show one")
    texts = {}
    for rid, r in engine.requests.items():
        alone = generate_cached(model, r.prompt[None], len(r.tokens), eos_id=EOS_ID).tokens[0]
        if not np.array_equal(alone, r.tokens):
            raise ValueError(f"pool_story: request {rid} differs from its run alone")
        texts[rid] = (task.decode(r.prompt), task.decode(np.asarray(r.tokens)), r.state)
    return {"blocks": blocks, "block_size": bs, "owner": np.array(owner).T.tolist(),
            "tables": tables, "free": free, "events": events, "requests": texts,
            "preemptions": engine.preemptions, "steps": step, "alone_equal": True}


def chosen_step(story: dict) -> int:
    """The step the tables are drawn at: the first with the most sequences holding blocks,
    and of those, the most tables out of order (the point of a table)."""
    def scattered(s: int) -> int:  # tables whose blocks are not consecutive and rising
        return sum(np.any(np.diff(t) != 1) for t, _ in story["tables"][s].values())

    return max(range(len(story["tables"])), key=lambda s: (
        len(story["tables"][s]), scattered(s), -s))


def draw_pool(story: dict, path: Path, machine: str = "") -> Path:
    """Left: each request's life (running spans, admits, finishes, the cancel, preemptions) over
    the pool's physical blocks by step, coloured by owner, free blocks blank. Right: the block
    tables and the free list at the chosen step."""
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    owner = np.array(story["owner"])  # (blocks, steps): request id, -1 free
    n_req, steps = len(story["requests"]), owner.shape[1]
    colours = [f"C{i % 10}" for i in range(n_req)]
    at = chosen_step(story)
    fig = Figure(figsize=(13, 6.2), layout="constrained")
    grid = fig.add_gridspec(2, 2, width_ratios=(2.1, 1), height_ratios=(1, 1.35))
    life, pool, tabs = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[1, 0]), \
        fig.add_subplot(grid[:, 1])

    # requests: running spans from the pool (a request holds blocks while running)
    for rid in range(n_req):
        held = (owner == rid).any(axis=0)
        for s in np.flatnonzero(held):
            life.add_patch(Rectangle((s - 0.5, rid - 0.3), 1, 0.6, color=colours[rid], lw=0))
    marks = {"admit": ("o", "tab:green", "admitted (prefill)"),
             "finish": ("s", "black", "finished (eos)"), "cancel": ("X", "red", "cancelled"),
             "preempt": ("v", "darkorange", "preempted (blocks back, recompute later)")}
    for kind, (marker, colour, label) in marks.items():
        pts = [(s, rid) for s, rid, k in story["events"] if k.startswith(kind)]
        if pts:
            life.scatter(*zip(*pts, strict=True), marker=marker, s=55, color=colour,
                         edgecolor="white", zorder=3, label=label)
    life.set(xlim=(-0.5, steps - 0.5), ylim=(n_req - 0.5, -0.5), ylabel="request",
             yticks=range(n_req),
             yticklabels=[f"{rid}: {story['requests'][rid][0][:15]}" for rid in range(n_req)],
             title="requests: running spans and events (step = one model call)")
    life.legend(fontsize=7, loc="upper right", ncol=2)
    life.tick_params(labelbottom=False)

    cmap = ListedColormap(["white", *colours])
    pool.imshow(owner + 1, aspect="auto", cmap=cmap, vmin=0, vmax=n_req, interpolation="nearest")
    pool.set(xlabel="step", ylabel="physical block", yticks=range(story["blocks"]),
             title=f"the pool: {story['blocks']} blocks of {story['block_size']} tokens, "
                   "coloured by the request holding each (blank: free)")
    pool.set_xticks(range(0, steps, 2))
    for ax in (life, pool):
        ax.axvline(at, color="grey", ls="--", lw=1)

    # the tables at the chosen step, one row per sequence, then the free list
    tabs.set_axis_off()
    tabs.set(xlim=(-0.2, 9), ylim=(len(story["tables"][at]) + 2.5, -1.2))
    tabs.text(0, -0.8, f"block tables after step {at} (dashed line):\nlogical block j -> "
              "physical block", fontsize=9, weight="bold", va="center")
    bs = story["block_size"]
    row = 0
    for rid, (table, length) in sorted(story["tables"][at].items()):
        tabs.text(0, row + 0.5, f"req {rid}\n{length} tok", fontsize=8, va="center")
        for j, phys in enumerate(table):
            filled = min(bs, length - j * bs)
            tabs.add_patch(Rectangle((1.6 + j, row + 0.1), 0.9, 0.8, color=colours[rid],
                                     alpha=0.45 + 0.55 * filled / bs))
            tabs.text(2.05 + j, row + 0.5, str(phys), ha="center", va="center", fontsize=9)
        row += 1
    tabs.text(0, row + 0.9, "free list\n(next: last)", fontsize=8, va="center")
    if not story["free"][at]:
        tabs.text(1.6, row + 0.9, "empty: a step that needs a block\npreempts the newest "
                  "request", fontsize=8, va="center", color="grey")
    for j, phys in enumerate(story["free"][at][:7]):
        tabs.add_patch(Rectangle((1.6 + j, row + 0.5), 0.9, 0.8, fill=False, ec="grey"))
        tabs.text(2.05 + j, row + 0.9, str(phys), ha="center", va="center", fontsize=9,
                  color="grey")
    tabs.text(0, row + 2.1, "paler cell: a last block partly filled", fontsize=7, color="grey")
    fig.suptitle("Continuous batching over a paged KV cache: a real Engine run (trained "
                 f"reverser, {story['preemptions']} preemption(s), 1 cancel)"
                 + (f"; {machine}" if machine else ""), fontsize=10)
    save_figure(fig, path, dpi=90)
    return path


# --- printing ------------------------------------------------------------------------------------

# Every line below is either a count (the same on any machine) or times, each with its unit; a
# ratio of times stands on a line of its own. A docs output block can then quote every line but
# those ratios and the machine's header (tests/test_readme.py skips numbers followed by a unit).

def print_throughput(r: dict) -> None:
    print("\n1. throughput: continuous (Engine) against static (batches of B, generate_cached), "
          "useful tokens/s")
    for name, v in r.items():
        print(f"  {name}: {v['workload']}; B = {v['running']} running at once, blocks of "
              f"{v['block_size']}, pool {v['pool_blocks']} blocks; {v['rounds']} rounds")
        rows, needed = v["token_rows_computed"], v["needed_token_rows"]
        for who in ("static", "continuous"):
            print(f"    {who:<11} {show(v['tokens_per_s'][who], ' tokens/s', 4)}   time "
                  f"{show(v['seconds'][who], ' s')}")
        print("    token rows computed: " + ", ".join(
            f"{who} {rows[who]:,} ({rows[who] / needed:.2f}x the {needed:,} needed)"
            for who in ("static", "continuous")))
        print(f"    {v['useful_tokens']} useful tokens, engine {v['engine_steps']} steps"
              + ("" if v["answers_right"] is None else
                 f"; answers right {v['answers_right']}/{v['requests']}")
              + f"; requests differing from static: {len(v['static_differs'])}")
        print(f"    continuous / static tokens/s: {v['continuous_over_static']:.2f}x (above 1, "
              "continuous is faster)")


def print_chunked(r: dict) -> None:
    print("\n2. chunked prefill: " + r["workload"] + f"; B = {r['running']}; {r['rounds']} "
          "rounds")
    for name, v in r["variants"].items():
        print(f"  {name} ({v['steps']} steps): {show(v['tokens_per_s'], ' tokens/s', 4)}")
        print(f"    gap between two tokens of one request: worst {show(v['worst_gap_s'], ' s')}, "
              f"median {show(v['median_gap_s'], ' s')}")
        print(f"    worst wait for a first token: {show(v['worst_first_token_s'], ' s')}")
    print(f"  requests differing between the two: {len(r['differs'])}")
    print(f"  budget / prefill-first: tokens/s {r['chunked_over_prefill_first_tokens_per_s']:.2f}x,"
          f" worst gap {r['chunked_over_prefill_first_worst_gap']:.2f}x")


def print_versus_hf(r: dict) -> None:
    print(f"\n3. versus transformers' continuous batching: {r['workload']}; B = {r['running']}, "
          f"pages of {r['block_size']}, {r['pool_blocks']} pages both; {r['rounds']} rounds")
    print(f"    HF settings: {r['hf_settings']}")
    for who, label in (("ours", "ours"), ("hf", "HF  ")):
        print(f"    {label} {show(r['tokens_per_s'][who], ' tokens/s', 4)}   setup "
              f"{show(r['setup_s'][who], ' s')}")
    print(f"    requests differing: {len(r['differs'])}")
    for d in r["differs"]:
        print(f"      request {d['request']}: from token {d['first_differing_token']}, ours "
              f"{d['ours']} theirs {d['theirs']}, our top-two gap "
              f"{d.get('top_two_gap_relative', float('nan')):.1e} of the largest logit")
    print(f"    ours / HF tokens/s: {r['ours_over_hf']:.2f}x (above 1, ours is faster)")


def print_table(r: dict) -> None:
    print("\n4. the price of the table: one decode step, paged against contiguous")
    for name, v in r.items():
        print(f"  {name}: B = {v['batch']} sequences of {v['length']} tokens, blocks of "
              f"{v['block_size']}; {v['steps']} steps each")
        for variant, st in v["step_s"].items():
            print(f"    {variant:<28} {show(scaled(st, 1e3), ' ms')}")
        print(f"    same greedy tokens: {v['same_argmax']}; fast paged against contiguous logits "
              f"within {v['max_abs_logit_diff_fast_paged_vs_contiguous']:.1e}")
        ok = v["fast_paged_over_contiguous"] <= GOAL_TABLE
        print(f"    readable gather / contiguous {v['readable_paged_over_contiguous']:.2f}x; fast "
              f"block walk / contiguous {v['fast_paged_over_contiguous']:.2f}x "
              f"(goal <= {GOAL_TABLE}: {'met' if ok else 'MISSED'})")
        if not ok:
            for variant, lines in v["profile"].items():
                print(f"    cProfile, {variant}: {lines[0]}")
                for line in lines[1:]:
                    print("      " + line)


def scaled(st: dict, k: float) -> dict:
    return st | {key: st[key] * k for key in ("median", "min", "max")}


def targets(r: dict) -> list[dict]:
    rows = []
    for name, v in r.get("throughput", {}).items():
        rows.append((f"continuous / static tokens/s, {name}", ">=", GOAL_CONTINUOUS,
                     v["continuous_over_static"]))
    if "versus_hf" in r:
        rows.append(("ours / transformers' continuous batching tokens/s", ">", GOAL_HF,
                     r["versus_hf"]["ours_over_hf"]))
    for name, v in r.get("table", {}).items():
        rows.append((f"paged (block walk) / contiguous decode step, {name}", "<=", GOAL_TABLE,
                     v["fast_paged_over_contiguous"]))
    return [{"target": n, "goal": f"{op} {g}", "value": float(x),
             "met": bool(x >= g if op == ">=" else x > g if op == ">" else x <= g)}
            for n, op, g, x in rows]


def guards(r: dict) -> dict:
    """The checks that must hold: ours against ours, and the right answers."""
    g = {}
    for name, v in r.get("throughput", {}).items():
        g[f"throughput {name}: continuous == static tokens"] = not v["static_differs"]
        if v["answers_right"] is not None:
            g[f"throughput {name}: every answer right"] = v["answers_right"] == v["requests"]
    if "chunked" in r:
        g["chunked: budget == prefill-first tokens"] = not r["chunked"]["differs"]
    for name, v in r.get("table", {}).items():
        g[f"table {name}: same greedy tokens"] = v["same_argmax"]
    if "picture" in r:  # pool_story raises otherwise
        g["picture: every request equals generate_cached alone"] = r["picture"]["alone_equal"]
    return g


# --- the command ---------------------------------------------------------------------------------

TITLES = {"throughput": "continuous against static batching",
          "chunked": "chunked prefill against prefill-first",
          "versus_hf": "against transformers' continuous batching",
          "table": "the price of the table", "picture": "the picture of the pool"}
USES_CHECKPOINT = ("throughput", "table", "picture")


def measure(s: Settings, chosen: list[str], seed: int, figures: Path,
            trained: FastGPT | None = None) -> dict:
    """The chosen sections in order, with the machine header around them; a stage line on
    stderr as each starts."""
    header = start_header()
    models = Models(s, seed, trained)
    r: dict = {"header": header, "settings": asdict(s), "sections": chosen,
               "section_seconds": {}}
    with Progress("tools/bench_serving.py", len(chosen)) as progress:
        for name in chosen:
            progress.stage(TITLES[name])
            t0 = time.perf_counter()
            if name == "throughput":
                progress.note("the trained reverser")
                r[name] = {"trained reverser": throughput(
                    models.get("trained"), reversal_workload(s.trained_requests, seed),
                    s.running, s.block_size, s.trained_rounds, s.warmup)}
                progress.note(f"long prompts, {s.shape_name}")
                r[name][f"long prompts ({s.shape_name})"] = throughput(
                    models.get("shaped"), long_workload(s, seed), s.running, s.block_size,
                    s.long_rounds, 0)
            elif name == "chunked":
                r[name] = chunked_prefill(models.get("shaped"), arrivals_workload(s, seed), s)
            elif name == "versus_hf":
                r[name] = versus_hf(models.get("shaped"), models.get("hf"),
                                    long_workload(s, seed), s)
            elif name == "table":
                progress.note(s.shape_name)
                r[name] = {s.shape_name: step_price(
                    models.get("shaped"), models.get("shaped_readable"), s.table_batch,
                    s.table_length, s.block_size, s.table_steps, s.warmup, seed)}
                progress.note("the trained reverser")
                r[name]["trained reverser (2 layers, d_model 128, 4 heads)"] = step_price(
                    models.get("trained"), models.get("trained_readable"), s.table_batch,
                    s.trained_table_length, s.block_size, s.table_steps, s.warmup, seed)
            elif name == "picture":
                story = pool_story(models.get("trained"))
                r[name] = story | {"figure": str(draw_pool(story, figures / FIGURE))}
            r["section_seconds"][name] = time.perf_counter() - t0
    finish_header(header)
    r["targets"] = targets(r)
    r["guards"] = guards(r)
    return r


def report(r: dict) -> None:
    print_header(r["header"])
    print("Here: each timed figure is the median of its rounds [min-max]; VOID where max - min "
          f"passes {VOID_SPREAD:.0%} of the median.")
    for name, printer in (("throughput", print_throughput), ("chunked", print_chunked),
                          ("versus_hf", print_versus_hf), ("table", print_table)):
        if name in r:
            printer(r[name])
    if "picture" in r:
        p = r["picture"]
        print(f"\n5. picture: {p['steps']} steps, {p['preemptions']} preemption(s), events "
              f"{len(p['events'])}; every request equal to generate_cached alone; "
              f"wrote {p['figure']}")
    if r["targets"]:
        print("\nGoals")
        for t in r["targets"]:
            print(f"  [{'met' if t['met'] else 'MISSED':>6}] {t['target']}: {t['value']:.2f} "
                  f"(goal {t['goal']})")
    bad = [k for k, ok in r["guards"].items() if not ok]
    print(f"\nCorrectness guards: {'PASS' if not bad else 'FAIL ' + '; '.join(bad)} "
          f"({len(r['guards'])} checks); section seconds: "
          + ", ".join(f"{k} {v:.0f} s" for k, v in r["section_seconds"].items()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Continuous batching measured: against static "
                                 "batching and transformers, chunked prefill, the table's price, "
                                 "and a picture of the pool.")
    for flag, name, text in (("--throughput", "throughput", "section 1: continuous vs static"),
                             ("--chunked", "chunked", "section 2: token budget vs prefill-first"),
                             ("--versus-hf", "versus_hf", "section 3: vs transformers"),
                             ("--table", "table", "section 4: a paged vs a contiguous step"),
                             ("--picture", "picture", "section 5: the pool over time (a PNG)")):
        ap.add_argument(flag, dest=name, action="store_true", help=text)
    ap.add_argument("--quick", action="store_true",
                    help="small sizes, about 30 s (a smoke test); writes under "
                         "out/serving/quick/ unless --json/--figures say otherwise")
    ap.add_argument("--threads", type=cli_int(1, 512), default=None,
                    help="BLAS and torch threads (default: the BLAS library's own); 1 on a "
                         "shared machine")
    ap.add_argument("--seed", type=SEED, default=None, help="weights and requests (default 0)")
    ap.add_argument("--json", type=cli_output_file(".json"), default=None,
                    help="results (default out/serving/[quick/][sections/]bench_serving.json)")
    ap.add_argument("--figures", type=cli_output_dir, default=None,
                    help=f"folder of the picture, {FIGURE} (default: the JSON's folder)")
    args = ap.parse_args(argv)
    chosen = [name for name in SECTIONS if getattr(args, name)] or list(SECTIONS)
    if "picture" not in chosen:
        refuse_unused(ap, args, ["--figures"], "is where the picture goes; add --picture")
    if chosen == ["picture"]:
        refuse_unused(ap, args, ["--quick", "--seed", "--threads"],
                      "is not read by --picture alone: it times nothing and draws the same "
                      "run of the trained model at any size")
    seed = 0 if args.seed is None else args.seed
    folder = OUT_DIR / "serving"
    if args.quick:
        folder /= "quick"
    if chosen != list(SECTIONS):
        folder /= "-".join(chosen)
    if args.json is None or ("picture" in chosen and args.figures is None):
        writable_folder(ap, folder, f"the default output folder {str(folder)!r}",
                        "--json (and --figures) paths")
    args.json = args.json or folder / "bench_serving.json"
    args.figures = args.figures or args.json.parent
    if "picture" in chosen:
        args.figures.mkdir(exist_ok=True)  # its parent was checked writable by cli_output_dir
    trained = None
    if any(name in chosen for name in USES_CHECKPOINT):
        flag = "--" + next(n for n in chosen if n in USES_CHECKPOINT)
        trained = cli_load(ap, CHECKPOINT, FastGPT.load, " (make train writes it)", flag=flag)
    if "versus_hf" in chosen:
        try:
            from transformers.generation.configuration_utils import (  # noqa: F401 (the check)
                ContinuousBatchingConfig,
            )
        except ImportError as err:
            ap.error(f"--versus-hf needs transformers' continuous batching (transformers 5.23 of "
                     f"requirements.txt): {one_line(err)}")

    import threadpoolctl

    t0 = time.perf_counter()
    with threadpoolctl.threadpool_limits(limits=args.threads, user_api="blas"):
        r = measure(QUICK if args.quick else FULL, chosen, seed, args.figures, trained)
    r["settings"]["quick"] = args.quick
    r["wall_time_s"] = time.perf_counter() - t0
    report(r)
    write_json(args.json, r, indent=1, default=jsonable)
    print(f"\nwrote {args.json} in {r['wall_time_s']:.0f} s; {machine_label(r['header'])}")
    return 0 if all(r["guards"].values()) else 1



def jsonable(x: object) -> object:
    """json.dumps' fallback: NumPy scalars and arrays as Python numbers and lists."""
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x)}")


if __name__ == "__main__":
    raise SystemExit(main())
