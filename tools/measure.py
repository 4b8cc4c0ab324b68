"""How every benchmark here measures: one timing harness, one description of the machine, one way
to take peak memory. The commands (tools/bench.py and its sections, tools/flash.py,
tools/window.py, tools/speculative.py, tools/memory.py) import these; none times on its own.

    interleave     variants run side by side, A B A B ..., the order rotated each round, the
                   garbage collector off, every single time kept
    summary, fmt   the median of those times (the number reported) and its quartiles (how noisy
                   the machine was), in milliseconds; ratio divides two medians
    machine_line   one line: CPU, cores, NumPy, the BLAS library, its kernel and threads
    machine_header the same and more as a dict for bench.json (torch, transformers, the load, who
                   else held a core, how the CPU time was spent); print_header prints it
    peak_during    tracemalloc's peak while a call runs; tracing() keeps one session open
    Progress       where a long command is: a line per stage on stderr, never on stdout

Why side by side: a noisy neighbour on a shared machine slows every variant of a round alike, so
the ratios survive noise that would ruin two separate loops.
"""

from __future__ import annotations

import contextvars
import gc
import os
import platform
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

# --- timing --------------------------------------------------------------------------------------


@contextmanager
def no_gc() -> Iterator[None]:
    """Collect once, then keep the garbage collector out of the timed code (as timeit does).
    Nested inside another no_gc it does nothing: the outer one collected and turns it back on."""
    was_on = gc.isenabled()
    if was_on:
        gc.collect()
        gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def rotated(names: list[str], r: int) -> list[str]:
    """Round r starts with a different variant, so none is always first (warm or cold)."""
    k = r % len(names)
    return names[k:] + names[:k]


def interleave(variants: dict[str, Callable[[], object]], rounds: int,
               inner: dict[str, int] | None = None,
               prepare: dict[str, Callable[[], object]] | None = None,
               warmup: int = 0, label: str | None = None) -> dict[str, list[float]]:
    """Time each variant `inner[name]` times (default 1) per round, rounds interleaved: A B A B
    ..., the order rotated each round, the garbage collector off. prepare[name], if given, runs
    untimed before each timed call of that variant (to rewind a cache, copy an input). The first
    `warmup` rounds run the same way and are not kept. With a `label`, each round is a note() of
    the Progress the caller runs in (for rounds of seconds each). Returns every single time
    (seconds) per variant."""
    inner, prepare = inner or {}, prepare or {}
    times: dict[str, list[float]] = {name: [] for name in variants}
    with no_gc():
        for r in range(warmup + rounds):
            if label is not None:
                note(f"{label}: round {r + 1} of {warmup + rounds}")
            for name in rotated(list(variants), r):
                for _ in range(inner.get(name, 1)):
                    if name in prepare:
                        prepare[name]()
                    t0 = time.perf_counter()
                    variants[name]()
                    if r >= warmup:
                        times[name].append(time.perf_counter() - t0)
    return times


def summary(seconds: list[float]) -> dict:
    """Median and quartiles in milliseconds: the median is the number we report, the quartiles
    show how noisy the machine was."""
    ms = 1e3 * np.asarray(seconds, dtype=np.float64)
    q1, med, q3 = np.percentile(ms, [25, 50, 75])
    return {"median_ms": float(med), "q1_ms": float(q1), "q3_ms": float(q3), "n": int(ms.size)}


def fmt(st: dict) -> str:
    """'1.234 ms [1.1-1.3]': median and quartiles."""
    return f"{st['median_ms']:9.3f} ms [{st['q1_ms']:.3g}-{st['q3_ms']:.3g}]"


def ratio(stats: dict, a: str, b: str) -> float:
    """stats[a]'s median over stats[b]'s (summaries)."""
    return stats[a]["median_ms"] / stats[b]["median_ms"]


# --- the machine ---------------------------------------------------------------------------------

def read_text(path: str) -> str | None:
    """A small text file's content, stripped, or None where it cannot be read (not Linux)."""
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what platform knows."""
    for line in (read_text("/proc/cpuinfo") or "").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def blas_pool() -> dict:
    """threadpoolctl's description of the BLAS library NumPy calls (the first one loaded): its
    internal_api, version, architecture (the kernel), threading_layer and num_threads; {} if
    none is found."""
    import threadpoolctl

    blas = [p for p in threadpoolctl.threadpool_info() if p.get("user_api") == "blas"]
    return blas[0] if blas else {}


def machine_line() -> str:
    """One line naming what a measurement ran on (the benchmarks that print no full header)."""
    b = blas_pool()
    blas = (f"{b.get('internal_api')} {b.get('version')} ({b.get('architecture')}), "
            f"{b.get('num_threads')} threads" if b else "no BLAS found")
    return (f"machine: {cpu_name()}, {os.cpu_count()} logical cores; numpy {np.__version__}; "
            f"BLAS: {blas}")


def machine_header() -> dict:
    """CPU, threads, BLAS library and kernel (threadpoolctl), library versions."""
    import torch
    import transformers

    blas = blas_pool()
    return {
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "os_kernel": f"{platform.system()} {platform.release()}",
        "blas_library": blas.get("internal_api", "unknown"),
        "blas_version": blas.get("version"),
        "blas_kernel": blas.get("architecture"),
        "blas_threading_layer": blas.get("threading_layer"),
        "blas_threads": blas.get("num_threads"),
        "torch_threads": torch.get_num_threads(),
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_average_at_start": list(os.getloadavg()),
        "nice": os.nice(0),  # this process's priority: below 0 it runs ahead of nice-0 jobs
        "autogroup": read_text("/proc/self/autogroup"),  # its session's share (see bench.py)
        "cpu_ticks_at_start": cpu_ticks(),
    }


def cpu_ticks() -> dict[str, int] | None:
    """The machine's CPU time so far, by kind (Linux /proc/stat, in clock ticks), or None."""
    line = (read_text("/proc/stat") or "").split("\n")[0].split()
    if line[:1] != ["cpu"]:
        return None
    kinds = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    return dict(zip(kinds, map(int, line[1:1 + len(kinds)]), strict=False))


def cpu_shares(start: dict[str, int] | None, end: dict[str, int] | None) -> dict[str, float]:
    """Share of all CPU time between two cpu_ticks() by kind: 'steal' is time the hypervisor gave
    this VM's cores to other machines, 'idle' time nobody here used."""
    if not start or not end:
        return {}
    spent = {k: end[k] - start[k] for k in start}
    total = sum(spent.values()) or 1
    return {k: v / total for k, v in spent.items()}


def busy_processes(interval: float = 1.0, at_least: float = 0.2) -> list[dict]:
    """Other processes that used at least `at_least` of a core during `interval` seconds: their
    command name, nice value and share of a core (Linux /proc; [] elsewhere).

    Why: OpenBLAS and torch split products and parallel loops between their threads, and a
    call returns only when every thread is done. If another process holds one of the two cores,
    the second thread waits for it at every call, so multi-threaded timings (ours and Hugging
    Face's, each in its own way) are inflated for reasons that are not in the code. The load
    average says the machine was busy; this says with what."""
    def cpu_ticks() -> dict[int, tuple[str, int, int]]:
        ticks = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                text = stat.read_text()
            except OSError:
                continue
            name = text[text.index("(") + 1:text.rindex(")")]
            fields = text[text.rindex(")") + 2:].split()
            ticks[int(stat.parent.name)] = (name, int(fields[11]) + int(fields[12]),
                                            int(fields[16]))  # utime + stime, nice
        return ticks

    if not Path("/proc/self/stat").exists():
        return []
    before = cpu_ticks()
    time.sleep(interval)
    after = cpu_ticks()
    hz = os.sysconf("SC_CLK_TCK")
    busy = []
    for pid, (name, ticks, nice) in after.items():
        share = (ticks - before.get(pid, (name, ticks, nice))[1]) / hz / interval
        if pid != os.getpid() and share >= at_least:
            try:  # the script a Python process runs says more than "python"
                args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                script = next((Path(a.decode()).name for a in args[1:3] if a.endswith(b".py")),
                              None)
            except (OSError, UnicodeDecodeError):
                script = None
            busy.append({"pid": pid, "name": f"{name} {script}" if script else name,
                         "nice": nice, "core_share": round(share, 2)})
    return sorted(busy, key=lambda b: -b["core_share"])


def start_header() -> dict:
    """machine_header, torch given as many threads as BLAS, and who else is busy."""
    import torch

    header = machine_header()
    torch.set_num_threads(header["blas_threads"] or 1)  # both libraries get the same cores
    header["torch_threads"] = torch.get_num_threads()
    header["busy_processes_at_start"] = busy_processes()
    return header


def finish_header(header: dict) -> None:
    """The load, who was busy and how the CPU time was spent, at the end of a run."""
    header["load_average_at_end"] = list(os.getloadavg())
    header["busy_processes_at_end"] = busy_processes()
    header["cpu_shares_during_run"] = cpu_shares(header["cpu_ticks_at_start"], cpu_ticks())


def print_header(h: dict) -> None:
    """A machine_header (finished or not) as the lines every full benchmark starts with."""
    print(f"CPU: {h['cpu']} ({h['cpu_count']} logical cores, {h['machine']}, {h['os_kernel']})")
    print(f"BLAS: {h['blas_library']} {h['blas_version']} kernel={h['blas_kernel']} "
          f"threads={h['blas_threads']} ({h['blas_threading_layer']}); torch threads="
          f"{h['torch_threads']}; OPENBLAS_CORETYPE={h['openblas_coretype']}")
    load = " ".join(f"{x:.2f}" for x in h["load_average_at_start"])
    end = h.get("load_average_at_end")
    print(f"Python {h['python']}, NumPy {h['numpy']}, torch {h['torch']}, transformers "
          f"{h['transformers']}; load average (1, 5, 15 min) at start {load}"
          + ("" if end is None else ", at end " + " ".join(f"{x:.2f}" for x in end))
          + f"; this process at nice {h.get('nice', 0)}"
          + ("" if not h.get("autogroup") else f", its session at {h['autogroup']}"))
    shares = h.get("cpu_shares_during_run")
    if shares:
        print("CPU time of the whole machine during the run: " + ", ".join(
            f"{k} {v:.0%}" for k, v in shares.items() if v >= 0.005))
    for when in ("start", "end"):
        busy = h.get(f"busy_processes_at_{when}")
        if busy is not None:
            names = ", ".join(f"{b['name']} (nice {b['nice']}, {b['core_share']:.0%} of a core)"
                              for b in busy) or "none"
            print(f"Other processes using >= 20% of a core at {when}: {names}")
    print("Times: median [quartiles] of repeats; variants interleaved in one loop.\n")


def machine_label(h: dict) -> str:
    """A machine_header in a few words, for a figure's title."""
    return f"{h['cpu']}, BLAS threads: {h['blas_threads']}"


# --- memory --------------------------------------------------------------------------------------

@contextmanager
def tracing() -> Iterator[None]:
    """tracemalloc on for the block: several peak_during calls inside it share one session, so
    memory allocated by an earlier call (a cache) and still held counts in a later one's peak."""
    tracemalloc.start()
    try:
        yield
    finally:
        tracemalloc.stop()


def peak_during(fn: Callable[[], object]) -> tuple[object, int]:
    """Run fn with tracemalloc's peak reset; return its result and the peak of traced bytes while
    it ran (its output included). Inside tracing() memory traced before fn and still held counts
    too; outside, tracing starts with fn and stops after it, so only fn's allocations count.

    tracemalloc, not getrusage: NumPy reports every array buffer it allocates to tracemalloc and
    the peak can be reset, so each call measures only itself; ru_maxrss is a process-lifetime
    high-water mark. It does not see BLAS's internal scratch buffers."""
    if not tracemalloc.is_tracing():
        with tracing():
            return peak_during(fn)
    # Inside a session nothing but these three calls: the few-KiB figures of tools/memory.py move
    # with the collector's timing, which any object allocated around fn shifts.
    tracemalloc.reset_peak()
    result = fn()
    return result, tracemalloc.get_traced_memory()[1]


def peak_bytes(fn: Callable[[], object]) -> int:
    """tracemalloc's peak of memory allocated while fn runs (its output included), in bytes."""
    return peak_during(fn)[1]


def human(n: float) -> str:
    """Bytes in the largest unit that keeps the number >= 1: '4.00 MiB'."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


# --- progress ------------------------------------------------------------------------------------
# A command that runs for more than a few seconds says where it is. On stderr: stdout is what the
# docs' output blocks show (and a test compares), and stays exactly what it was. Plain lines, not a
# bar redrawn with carriage returns: they read the same in a terminal, a log file and CI, and cost
# no dependency (tqdm draws bars; a line per stage is all these commands need).

_ACTIVE: contextvars.ContextVar[Progress | None] = contextvars.ContextVar("progress", default=None)


class Progress:
    """`with Progress("tools/bench.py", stages=9) as progress:` then progress.stage("...") as
    each stage starts: `tools/bench.py [  12 s] 3/9 this repo vs Hugging Face` on stderr. Inside
    the block, note("...") from any function it calls adds an indented line for a part of a long
    stage; outside one, note() prints nothing (a library call stays quiet)."""

    def __init__(self, command: str, stages: int | None = None) -> None:
        self.command, self.stages, self.done = command, stages, 0
        self.start = time.perf_counter()
        self._token: contextvars.Token | None = None

    def __enter__(self) -> Progress:
        self._token = _ACTIVE.set(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _ACTIVE.reset(self._token)

    def stage(self, what: str) -> None:
        """A new stage begins."""
        self.done += 1
        self._line(f"{self.done}/{self.stages} {what}" if self.stages else what)

    def note(self, what: str) -> None:
        """A part of the current stage begins."""
        self._line(f"  {what}")

    def _line(self, text: str) -> None:
        print(f"{self.command} [{time.perf_counter() - self.start:5.0f} s] {text}",
              file=sys.stderr, flush=True)


def note(what: str) -> None:
    """A line of the Progress the caller runs in, if any."""
    progress = _ACTIVE.get()
    if progress is not None:
        progress.note(what)
