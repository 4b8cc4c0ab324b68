"""Long commands say where they are: a line per stage on stderr as it starts, none on stdout (the
docs' output blocks compare stdout, which stays exactly what it was: tests/test_readme.py). Each
command runs here at the smallest sizes its flags allow, or with its sizes made small, so that
only the lines are tested, not the time."""

from __future__ import annotations

import re

import pytest

import verify
from tools import evaluate, flash, int8, measure, memory, speculative, window

LINE = re.compile(r"^(\S+(?: --[\w-]+)?) \[ *\d+ s\] (.*)$")  # "tools/x.py [   3 s] what"


def progress_lines(err: str) -> list[str]:
    """What each progress line on stderr says, in order."""
    return [m.group(2) for line in err.splitlines() if (m := LINE.match(line))]


def test_a_stage_a_line_on_stderr_and_notes_only_inside(capsys):
    measure.note("outside any progress: nothing")
    with measure.Progress("cmd", stages=2) as progress:
        progress.stage("first")
        measure.note("a part of it")
        progress.stage("second")
    measure.note("after it: nothing")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert progress_lines(captured.err) == ["1/2 first", "  a part of it", "2/2 second"]
    assert all(line.startswith("cmd [") for line in captured.err.splitlines())


def tiny_speed(monkeypatch) -> None:
    monkeypatch.setattr(window, "GPT2_SMALL", {"vocab_size": 16, "d_model": 16, "n_heads": 2,
                                               "n_layers": 1, "rope": True})
    monkeypatch.setattr(window, "SPEED_CONTEXTS", (8, 16))
    monkeypatch.setattr(window, "SPEED_WINDOW", 4)


def tiny_memory(monkeypatch) -> None:
    monkeypatch.setattr(memory, "CONTEXTS", (16, 32))


RUNS = {  # name: (main, argv, make it small, lines that must be there, in this order)
    "verify.py --failure-modes": (verify.main, ["--failure-modes", "--only", "1"], None,
                                  [f"1/{1 + len(verify.FAILURE_MODES)} the clean implementation",
                                   f"2/{1 + len(verify.FAILURE_MODES)} injected: no causal mask",
                                   f"{1 + len(verify.FAILURE_MODES)}/"
                                   f"{1 + len(verify.FAILURE_MODES)} injected: "]),
    "tools/window.py --speed": (window.main, ["--speed", "--repeats", "1"], tiny_speed,
                                ["1/1 --speed: 1 decode steps of each model at 2 contexts",
                                 "  context 8", "  context 16"]),
    "tools/int8.py --compare": (int8.main, ["--compare", "--n", "3"], None,
                                ["1/1 --compare: 3 prompts", "  prompts 1-"]),
    "tools/evaluate.py": (evaluate.main, ["--n", "3", "--batch", "2"], None,
                          ["prompts 1-"]),
    "tools/flash.py --bench": (flash.main, ["--bench", "--sizes", "16", "--blocks", "8",
                                            "--repeats", "1"], None,
                               ["1/1 16 tokens: the fast path and 1 block sizes"]),
    "tools/memory.py": (memory.main, ["--quick", "--out", "TMP/m.png"], tiny_memory,
                        ["1/7 MHA, float32 cache: contexts 16, 32",
                         "7/7 a prefill of 32 tokens, one shot and in chunks of 256"]),
    "tools/speculative.py --bench": (speculative.main, ["--bench", "--n", "1", "--rounds", "1",
                                                        "--extra-layers", "0", "--d-ff", "512"],
                                     None, ["1/2 1. the shipped pair",
                                            "  each gamma's tokens against generate_cached",
                                            "2/2 2. a heavier target"]),
}


@pytest.mark.parametrize("name", RUNS)
def test_a_long_command_says_where_it_is_on_stderr_only(monkeypatch, tmp_path, capsys, name):
    main, argv, small, expected = RUNS[name]
    if small is not None:
        small(monkeypatch)
    argv = [str(tmp_path / a[4:]) if a.startswith("TMP/") else a for a in argv]
    main(argv)
    captured = capsys.readouterr()
    lines = progress_lines(captured.err)
    found = 0
    for line in lines:  # every expected line, in order
        if found < len(expected) and line.startswith(expected[found]):
            found += 1
    assert found == len(expected), (expected[found], lines)
    assert captured.out and not progress_lines(captured.out) and " s] " not in captured.out

