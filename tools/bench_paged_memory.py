"""Where a KV cache's memory goes, by counting slots: vLLM's figure 2 for three allocators.

    python tools/bench_paged_memory.py [--seed 0] [--running 8] [--out PNG] [--json PATH]
                                       (default figure: out/paged_memory.png in the repository)

A slot holds one token's keys and values in every layer. No engine runs: a workload is a list of
requests (prompt tokens P, answer tokens n), a schedule says which requests run at each step, and
an allocator says how many slots each running request has reserved. Every slot is counted.

The schedule. `--running` requests (8) run at once, admitted first come first served: a request
is admitted at the step after a running one finishes, and reserves its slots then. At its first
step it runs its prompt and caches P keys; each later step caches one more, so after k steps it
holds P + k, and at its last step P + n - 1 (its last token is emitted, never fed back). Then it
frees all its slots. The schedule does not depend on the allocator: every allocator serves the
very same steps, and only what it reserves differs.

The allocators, for a request holding c keys (max_seq_len L):
    contiguous    L slots from admission: today's cache (model.new_cache reserves L per row)
    power of two  the next power of two >= c, doubling when full (the request's final length is
                  unknown when it is admitted, as in a server), at most L
    paged, b      b * ceil(c / b): blocks of b slots taken one at a time (vLLM's PagedAttention;
                  b = 16 is its default; 1, 8 and 32 beside it)

Each reserved slot is one of three things, as vLLM's paper sorts them (Kwon et al., 2023,
section 3), counted with hindsight from the request's final length F = P + n - 1:
    token state             c: keys and values the request holds now
    reserved                min(R, F) - c: empty now, filled later by this request's own tokens
    internal fragmentation  R - min(R, F): never filled, the request ends first
R being what it has reserved. For a paged request both empty kinds lie in its last block, so its
waste is below one block; external fragmentation (holes between allocations) is left out: this
counts slots, not addresses. Each split is printed at the step of the largest reservation (the
peak, what a server must provision) and averaged over time (each kind's slot-steps over the
reserved slot-steps), as percentages of reserved slots.

The workloads, 64 requests each:
    reversal     the trained model's task (parts/task.py): L characters, uniform on 1..24, make
                 P = L + 1 prompt tokens and n = L + 1 answer tokens; max_seq_len 128
    long prompts GPT-2-small shapes, max_seq_len 1024: P uniform on 16..768, n uniform on 16..256

vLLM's paper measured the same split on real systems: earlier servers kept token state in
20.4-38.2% of the KV memory they reserved, PagedAttention in 96.3% (Kwon et al., 2023, figure 2).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/x.py` from anywhere: find the repo
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from matplotlib.figure import Figure

from cache import kv_cache_bytes
from parts import task
from parts.checks import SEED, cli_int, cli_output_file
from parts.files import save_figure, write_text
from tools.cli_types import default_output
from tools.measure import human
from tools.memory import table

KINDS = ("token state", "reserved", "internal fragmentation")
BLOCK_SIZES = (1, 8, 16, 32)
REQUESTS = 64
OUT = "paged_memory.png"
PAPER = ("vLLM's paper (Kwon et al., 2023, figure 2): earlier systems kept token state in "
         "20.4-38.2% of reserved KV memory; PagedAttention in 96.3%")


# --- the workload and the schedule ---------------------------------------------------------------

@dataclass(frozen=True)
class Request:
    """One request: P prompt tokens, n answer tokens."""

    prompt: int
    answer: int

    @property
    def final(self) -> int:
        """F, the keys it holds at its last step: its last token is emitted, never fed back."""
        return self.prompt + self.answer - 1


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    requests: tuple[Request, ...]
    max_seq_len: int
    slot_bytes: int  # one token's K and V in every layer


def reversal(seed: int, n: int = REQUESTS) -> Workload:
    """The trained model's task: prompts from parts/task's generator (lengths uniform on 1..24),
    the answer as long as task.expected_answer says; the assignment's model, float32."""
    chars = task.random_chars(task.prompt_rng(seed, "test"), n)
    requests = tuple(Request(len(c) + 1, len(task.expected_answer(task.make_prompt(c))))
                     for c in chars)
    description = (f"reversal: {n} requests of the trained model's task, P = n = L + 1 tokens, "
                   f"L uniform on 1..{task.MAX_CHARS}; 2 layers, 4 heads of 32, float32")
    return Workload("reversal", description, requests, 128,
                    kv_cache_bytes(2, 1, 4, 32, 1, np.float32))


def long_prompts(seed: int, n: int = REQUESTS) -> Workload:
    """GPT-2-small shapes (12 layers, 12 heads of 64, fp16), long prompts and answers."""
    rng = np.random.default_rng([seed, 1024])
    prompts, answers = rng.integers(16, 769, n), rng.integers(16, 257, n)
    requests = tuple(Request(int(p), int(a)) for p, a in zip(prompts, answers, strict=True))
    description = (f"long prompts: {n} requests, P uniform on 16..768 tokens, n on 16..256; "
                   "GPT-2-small shapes (12 layers, 12 heads of 64), fp16")
    return Workload("long prompts", description, requests, 1024,
                    kv_cache_bytes(12, 1, 12, 64, 1, np.float16))


def schedule(requests: tuple[Request, ...], running: int) -> list[list[tuple[int, int]]]:
    """For each step, the requests running and the keys each holds: [(request index, c), ...].
    First come first served, `running` at once; a request admitted at step s holds P + (t - s)
    keys at step t and leaves after step s + n - 1, freeing its place for the next one."""
    waiting, active, steps = list(range(len(requests))), {}, []  # active: index -> first step
    t = 0
    while waiting or active:
        while waiting and len(active) < running:
            active[waiting.pop(0)] = t
        steps.append([(i, requests[i].prompt + t - start) for i, start in active.items()])
        active = {i: s for i, s in active.items() if t - s < requests[i].answer - 1}
        t += 1
    return steps


# --- the allocators ------------------------------------------------------------------------------

def contiguous(c: int, max_seq_len: int) -> int:
    """Today's cache: every request reserves max_seq_len slots when admitted."""
    return max_seq_len


def power_of_two(c: int, max_seq_len: int) -> int:
    """The next power of two >= c, doubling as the request grows; at most max_seq_len."""
    return min(1 << (c - 1).bit_length(), max_seq_len)


def paged(block: int) -> Callable[[int, int], int]:
    """Blocks of `block` slots, one more whenever the last is full: block * ceil(c / block)."""
    def reserve(c: int, max_seq_len: int) -> int:
        return block * math.ceil(c / block)
    return reserve


ALLOCATORS: dict[str, Callable[[int, int], int]] = {
    "contiguous (max_seq_len)": contiguous, "power of two": power_of_two,
    **{f"paged, block {b}": paged(b) for b in BLOCK_SIZES}}


# --- counting ------------------------------------------------------------------------------------

@dataclass
class Split:
    """One allocator on one workload: slots per step by kind, and what they add up to."""

    allocator: str
    per_step: list[tuple[int, int, int]]  # (token state, reserved, internal fragmentation)
    running: list[int]  # requests running at each step

    @property
    def reserved_slots(self) -> list[int]:
        return [sum(kinds) for kinds in self.per_step]

    @property
    def peak_step(self) -> int:
        """The first step of the largest reservation."""
        return int(np.argmax(self.reserved_slots))

    def at_peak(self) -> list[float]:
        """Each kind's share (%) of the reserved slots at the peak step."""
        kinds = self.per_step[self.peak_step]
        return [100 * k / sum(kinds) for k in kinds]

    def over_time(self) -> list[float]:
        """Each kind's share (%) of the reserved slot-steps of the whole run."""
        totals = np.sum(self.per_step, axis=0)
        return [float(100 * k / totals.sum()) for k in totals]

    def waste_per_sequence(self) -> tuple[float, float]:
        """Reserved but not token state, per running request: averaged over the steps, and at
        its worst step."""
        waste = [(r + f) / n for (_, r, f), n in zip(self.per_step, self.running, strict=True)]
        return float(np.mean(waste)), float(max(waste))


def count(workload: Workload, steps: list[list[tuple[int, int]]], allocator: str,
          reserve: Callable[[int, int], int]) -> Split:
    """Every slot `reserve` (an allocator, named `allocator`) holds at every step of the
    schedule, sorted into the three kinds with each request's final length."""
    L = workload.max_seq_len
    per_step = []
    for running in steps:
        token = ahead = never = 0
        for i, c in running:
            R, F = reserve(c, L), workload.requests[i].final
            token, ahead, never = token + c, ahead + min(R, F) - c, never + R - min(R, F)
        per_step.append((token, ahead, never))
    return Split(allocator, per_step, [len(running) for running in steps])


def check_workload(workload: Workload) -> None:
    """ValueError unless every request fits the model: P >= 1, n >= 1, F <= max_seq_len."""
    for i, r in enumerate(workload.requests):
        if r.prompt < 1 or r.answer < 1 or r.final > workload.max_seq_len:
            raise ValueError(f"{workload.name}: request {i} (P={r.prompt}, n={r.answer}) does "
                             f"not fit max_seq_len={workload.max_seq_len}")


def measure(workload: Workload, running: int) -> list[Split]:
    check_workload(workload)
    steps = schedule(workload.requests, running)
    return [count(workload, steps, name, reserve) for name, reserve in ALLOCATORS.items()]


# --- printing and drawing ------------------------------------------------------------------------

def report(workload: Workload, splits: list[Split], running: int) -> str:
    steps = len(splits[0].per_step)
    head = (f"{workload.description}\nmax_seq_len {workload.max_seq_len}, one slot = "
            f"{human(workload.slot_bytes)}; {running} running at once, first come first served: "
            f"{steps} steps.")
    headers = ["allocator", "peak slots", "peak memory", "at peak: token resv frag %",
               "over time: token resv frag %", "waste/seq: mean max"]
    rows = []
    for s in splits:
        peak = s.reserved_slots[s.peak_step]
        rows.append([s.allocator, f"{peak:,}", human(peak * workload.slot_bytes),
                     " ".join(f"{x:5.1f}" for x in s.at_peak()),
                     " ".join(f"{x:5.1f}" for x in s.over_time()),
                     " ".join(f"{x:6.1f}" for x in s.waste_per_sequence())])
    return head + "\n\n" + table(headers, rows)


def plot(results: dict[str, tuple[Workload, list[Split]]], running: int, path: Path) -> None:
    """Top: each allocator's reserved slots split into the three kinds, averaged over time (vLLM's
    figure 2, for our allocators). Bottom: the memory each reserves, step by step."""
    fig = Figure(figsize=(12, 8), layout="constrained")
    axes = fig.subplots(2, len(results), squeeze=False)
    colours = ("C2", "C1", "C3")
    for col, (workload, splits) in enumerate(results.values()):
        bars, lines = axes[0, col], axes[1, col]
        names = [s.allocator for s in splits]
        left = np.zeros(len(splits))
        for k, (kind, colour) in enumerate(zip(KINDS, colours, strict=True)):
            share = np.array([s.over_time()[k] for s in splits])
            bars.barh(names, share, left=left, color=colour, label=kind)
            left += share
        for y, s in enumerate(splits):
            bars.text(1, y, f"{s.over_time()[0]:.1f}%", va="center", fontsize=8, color="white")
        bars.invert_yaxis()
        bars.set(xlim=(0, 100), xlabel="% of reserved slots, averaged over time",
                 title=f"{workload.name}: max_seq_len {workload.max_seq_len}, {running} at once")
        bars.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.14))
        scale = workload.slot_bytes / 2**20  # slots -> MiB
        for s in splits:
            lines.plot(np.array(s.reserved_slots) * scale, label=s.allocator, lw=1.2)
        token = np.array([kinds[0] for kinds in splits[0].per_step])
        lines.plot(token * scale, "k--", lw=1, label="token state")
        lines.set(xlabel="step", ylabel="reserved KV memory (MiB)", ylim=(0, None))
        lines.legend(fontsize=7, ncol=2)
    fig.suptitle("Where KV-cache memory goes: token state, reserved for later, never used\n"
                 + PAPER, fontsize=9)
    save_figure(fig, path, dpi=90)


def as_json(results: dict[str, tuple[Workload, list[Split]]], running: int, seed: int) -> dict:
    out = {"seed": seed, "running": running, "kinds": list(KINDS), "paper": PAPER,
           "workloads": {}}
    for name, (workload, splits) in results.items():
        out["workloads"][name] = {
            "description": workload.description, "max_seq_len": workload.max_seq_len,
            "slot_bytes": workload.slot_bytes,
            "requests": [asdict(r) for r in workload.requests],
            "allocators": {s.allocator: {
                "peak_slots": s.reserved_slots[s.peak_step], "peak_step": s.peak_step,
                "at_peak_percent": s.at_peak(), "over_time_percent": s.over_time(),
                "waste_per_sequence_mean_max": list(s.waste_per_sequence()),
                "per_step": [list(kinds) for kinds in s.per_step]} for s in splits}}
    return out


# --- the command ---------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="KV-cache memory by allocator, counted slot by "
                                             "slot: vLLM's figure 2 for our workloads.")
    ap.add_argument("--seed", type=SEED, default=0, help="draws both workloads (default 0)")
    ap.add_argument("--running", type=cli_int(1, REQUESTS), default=8,
                    help="requests running at once (default 8)")
    ap.add_argument("--out", type=cli_output_file(".png"), default=None,
                    help=f"the figure (default out/{OUT} in the repository)")
    ap.add_argument("--json", type=cli_output_file(".json"), default=None,
                    help="also write every count, step by step, as JSON")
    args = ap.parse_args(argv)
    args.out = args.out or default_output(ap, OUT)

    results = {}
    for workload in (reversal(args.seed), long_prompts(args.seed)):
        results[workload.name] = workload, measure(workload, args.running)
        print(report(workload, results[workload.name][1], args.running), end="\n\n")
    print("token: keys and values held now; reserved: empty, filled later by the same request;\n"
          "frag: internal fragmentation, never filled. waste = reserved + frag, per request.")
    print(PAPER + ".")
    for name, (_, splits) in results.items():
        for s in splits:
            block = next((b for b in BLOCK_SIZES if s.allocator == f"paged, block {b}"), None)
            if block is not None and not s.waste_per_sequence()[1] < block:
                print(f"bench_paged_memory: {name}, {s.allocator}: waste reaches a block per "
                      "sequence", file=sys.stderr)
                return 1
    plot(results, args.running, args.out)
    print(f"\nwrote {args.out}")
    if args.json:
        text = json.dumps(as_json(results, args.running, args.seed), indent=1)
        write_text(args.json, text)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
