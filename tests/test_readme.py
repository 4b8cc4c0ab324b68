"""The README cannot silently rot: every command it shows exists with the flags it uses, every file
and test it names exists, and its worked mask example is what the code computes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from attention import NEG_INF, causal_mask, softmax

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
CODE_BLOCKS = re.findall(r"```(?:bash|text)?\n(.*?)```", README, flags=re.S)
COMMAND_LINES = [line.strip() for block in CODE_BLOCKS for line in block.splitlines()
                 if re.match(r"\s*(\.venv/bin/)?(python|make) ", line)]


def test_readme_has_the_two_setup_commands_first():
    quickstart = README.split("## Quickstart", 1)[1].split("##", 1)[0]
    assert "make verify" in quickstart and "make test" in quickstart


def test_readme_shows_commands():
    assert len(COMMAND_LINES) >= 5, COMMAND_LINES


@pytest.mark.parametrize("line", sorted({ln for ln in COMMAND_LINES if "make " in ln}))
def test_make_targets_exist(line):
    makefile = (ROOT / "Makefile").read_text()
    target = line.split("make ", 1)[1].split()[0]
    assert re.search(rf"^{re.escape(target)}:", makefile, flags=re.M), f"no target {target!r}"


def python_commands() -> dict[str, set[str]]:
    """script -> every --flag the README passes to it."""
    scripts: dict[str, set[str]] = {}
    for line in COMMAND_LINES:
        match = re.match(r"(?:\.venv/bin/)?python (\S+\.py)(.*)", line)
        if match:
            code = match.group(2).split("#", 1)[0]
            scripts.setdefault(match.group(1), set()).update(re.findall(r"--[\w-]+", code))
    return scripts


@pytest.mark.parametrize(("script", "flags"), sorted(python_commands().items()))
def test_python_commands_exist_with_their_flags(script, flags):
    assert (ROOT / script).is_file(), f"README runs {script}, which does not exist"
    out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for flag in flags:
        assert flag in out.stdout, f"{script} --help does not list {flag}"


def named_paths() -> set[str]:
    """Files the README names in backticks or links: `attention.py`, figures/x.png, tests/..."""
    names = set(re.findall(r"`((?:[\w.-]+/)*[\w.-]+\.(?:py|png|txt|json|md|toml))(?:::\w+)?`",
                           README))
    names |= set(re.findall(r"\]\(((?:[\w.-]+/)*[\w.-]+\.(?:png|md|py))\)", README))
    return {n for n in names if n != "bench.json"}  # bench.json is written by bench.py


@pytest.mark.parametrize("name", sorted(named_paths()))
def test_named_files_exist(name):
    assert (ROOT / name).is_file(), f"README names {name}, which does not exist"


@pytest.mark.parametrize("ref", sorted(set(re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", README))))
def test_named_tests_exist(ref):
    path, test = ref
    assert re.search(rf"^def {test}\(", (ROOT / path).read_text(), flags=re.M)


def test_mask_example_numbers_are_what_the_code_computes():
    # The 4x4 example in "Mask logic": scores, the mask, softmax of the masked scores, and the
    # wrong order (softmax, then zero the future). Each printed row must appear in the README.
    scores = np.array([[2, 1, 0, 3], [1, 3, 2, 0], [0, 1, 2, 1], [3, 0, 1, 2]], dtype=float)
    mask = causal_mask(4)
    right = softmax(np.where(mask, scores, NEG_INF))
    wrong = softmax(scores) * mask
    section = README.split("## Mask logic", 1)[1].split("\n## ", 1)[0]
    for matrix in (right, wrong):
        text = np.array2string(matrix, precision=3, suppress_small=True)
        for row in text.replace("[[", "[").replace("]]", "]").splitlines():
            assert row.strip() in section, f"README's mask example lacks row {row.strip()!r}"
    sums = ", ".join(f"{s:.3g}" for s in wrong.sum(axis=1))
    assert f"rows sum to {sums}" in section
    assert np.allclose(right.sum(axis=1), 1.0) and np.all(right[~mask] == 0.0)
    assert "[[1 1 1 1 0]\n [1 1 1 1 1]]" in section and np.array_equal(
        causal_mask(2, 5).astype(int), [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
