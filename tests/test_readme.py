"""The README and docs/ cannot silently rot.

- Every block marked `<!-- output: CMD -->` is rerun here, and each of its lines must come out of
  CMD, in order (a block may leave lines out; timings are the only numbers allowed to differ).
- Every command the README shows exists with its flags; every file, link, anchor and image
  resolves; the README stays at most 3,500 words.
- The 4x4 mask example is worked again here by hand, independently of the code.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import figures_agree

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README = (ROOT / "README.md").read_text()
MAX_WORDS = 3500

FENCE = r"```(?:text|bash|python)?\n(.*?)```"
OUTPUT_BLOCK = re.compile(r"<!-- output(?: \(numbers within (\d+)%\))?: (.*?) -->\n" + FENCE,
                          flags=re.S)
NUMBER = re.compile(r"(-?\d+(?:\.\d+)?(?:e[-+]?\d+)?)")
TIME_UNIT = re.compile(r"\s?(ms|s|tokens/s|x faster)\b")


# --- running the commands ------------------------------------------------------------------------

@functools.cache
def output_of(command: str) -> str:
    """stdout of a README command run from the repo root; OUT stands for a scratch directory, so
    no committed figure is overwritten, and is put back in the output as OUT."""
    with tempfile.TemporaryDirectory() as tmp:
        args = command.replace("OUT", tmp).split()
        assert args[0] == "python", command
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
        run = subprocess.run([sys.executable, *args[1:]], cwd=ROOT, capture_output=True,
                             text=True, timeout=300, env=env)
        assert run.returncode == 0, f"{command} failed:\n{run.stderr[-2000:]}"
        return run.stdout.replace(tmp, "OUT")


def same_line(shown: str, printed: str, rtol: float) -> bool:
    """The text between numbers must be equal; numbers agree by conftest.figures_agree (counts
    exact, rounded figures to their last digit, rounding-level errors as such) or within rtol,
    except a time (a number followed by ms, s, tokens/s or 'x faster'), which a rerun never
    repeats."""
    a, b = NUMBER.split(shown.rstrip()), NUMBER.split(printed.rstrip())
    if len(a) != len(b):
        return False
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if i % 2 == 0:  # text
            if x != y:
                return False
        elif TIME_UNIT.match(a[i + 1]):
            continue
        elif not figures_agree(x, y) and not (
                rtol and abs(float(x) - float(y)) <= rtol * abs(float(y))):
            return False
    return True


def missing_lines(shown: str, printed: str, rtol: float = 0.0) -> list[str]:
    """Lines of `shown` not found in `printed` in order (blank lines are layout)."""
    lines = printed.splitlines()
    at, missing = 0, []
    for line in filter(str.strip, shown.splitlines()):
        hit = next((j for j in range(at, len(lines)) if same_line(line, lines[j], rtol)), None)
        if hit is None:
            missing.append(line)
        else:
            at = hit + 1
    return missing


def output_blocks() -> list[tuple[str, str, float, str]]:
    return [(page.name, command, int(pct or 0) / 100, block)
            for page in PAGES for pct, command, block in OUTPUT_BLOCK.findall(page.read_text())]


@pytest.mark.parametrize(("page", "command", "rtol", "block"), output_blocks(),
                         ids=[f"{p}:{c}" for p, c, _, _ in output_blocks()])
def test_every_output_block_is_what_its_command_prints(page, command, rtol, block):
    missing = missing_lines(block, output_of(command), rtol)
    assert not missing, f"{page}: `{command}` no longer prints these lines:\n" + "\n".join(missing)


def test_the_readme_shows_the_outputs_it_must():
    commands = {command for _, command, _, _ in output_blocks()}
    pictures = {f"python tools/pictures.py {name}" for name in
                ("mask", "heads", "cache", "padding", "gqa", "timeline")}
    assert pictures | {"python generate.py", "python verify.py", "python tools/evaluate.py",
                       "python verify.py --failure-modes"} <= commands


def test_a_drifted_number_is_caught():
    # The comparison itself must be able to fail: a changed digit, a dropped line, a reordering.
    printed = "a 1.240e-02 b\nc 3 d\ntime 20.96 ms\nerr 2.0e-14\nf32 3.0e-06\nmax 0.55"
    assert missing_lines("a 1.240e-02 b\ntime 1.00 ms", printed) == []
    assert missing_lines("a 1.241e-02 b", printed) == []  # one unit of the last digit
    assert missing_lines("a 1.242e-02 b", printed) == ["a 1.242e-02 b"]  # two units
    assert missing_lines("c 4 d", printed) == ["c 4 d"]  # a count is exact
    assert missing_lines("err 1.4e-16", printed) == []  # float64 rounding, any size below 1e-10
    assert missing_lines("err 0.0e+00", printed) == []
    assert missing_lines("err 1.0e-06", printed) == ["err 1.0e-06"]  # not float64 rounding
    assert missing_lines("f32 9.0e-06", printed) == []  # float32 rounding within a decade
    assert missing_lines("f32 4.0e-05", printed) == ["f32 4.0e-05"]
    assert missing_lines("max 0.54", printed) == []  # a rounding boundary: 0.544996 / 0.545020
    assert missing_lines("max 0.53", printed) == ["max 0.53"]
    assert missing_lines("c 3 d\na 1.240e-02 b", printed) == ["a 1.240e-02 b"]
    assert missing_lines("c 3.1 d", "c 3.0 d", rtol=0.05) == []


# --- the mask example, by hand -------------------------------------------------------------------

def test_mask_example_is_the_hand_worked_softmax():
    """The README's 4x4 example: softmax of the masked scores, and the wrong order (softmax, then
    zero the future), worked here with exp and sums only."""
    scores = np.array([[2, 1, 0, 3], [1, 3, 2, 0], [0, 1, 2, 1], [3, 0, 1, 2]], dtype=float)
    lower = np.tri(4, dtype=bool)
    right = np.where(lower, np.exp(scores), 0.0)
    right /= right.sum(axis=1, keepdims=True)
    wrong = np.exp(scores) / np.exp(scores).sum(axis=1, keepdims=True) * lower
    section = README.split("## Mask logic", 1)[1].split("\n## ", 1)[0]
    for matrix in (right, wrong):
        for row in matrix:
            assert "  ".join(f"{x:5.3f}" for x in row) in section, row
    sums = ", ".join(f"{s:.3f}" for s in wrong.sum(axis=1))
    assert f"rows sum to {sums}" in section


# --- commands, files, links ----------------------------------------------------------------------

CODE_BLOCKS = re.findall(FENCE, README, flags=re.S)
COMMAND_LINES = [line.strip() for block in CODE_BLOCKS for line in block.splitlines()
                 if re.match(r"\s*(\.venv/bin/)?(python|make) ", line)]
COMMAND_LINES += re.findall(r"`((?:python|make) [^`]+)`", README)


def test_readme_is_at_most_3500_words():
    words = len(README.split())
    assert words <= MAX_WORDS, f"README.md has {words} words, more than {MAX_WORDS}"


def test_quickstart_gives_the_two_commands_and_the_cpu_wheel():
    quickstart = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    assert "make verify" in quickstart and "make test" in quickstart
    pin = re.search(r"^torch==(\S+)", (ROOT / "requirements.txt").read_text(), flags=re.M)
    assert pin, "requirements.txt must pin torch"
    cpu_wheel = "--index-url https://download.pytorch.org/whl/cpu"
    assert f"pip install torch=={pin.group(1)} {cpu_wheel}" in quickstart


@pytest.mark.parametrize("line", sorted({ln for ln in COMMAND_LINES if ln.startswith("make ")}))
def test_make_targets_exist(line):
    target = line.split()[1]
    assert re.search(rf"^{re.escape(target)}:", (ROOT / "Makefile").read_text(), flags=re.M)


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
    help_text = output_of(f"python {script} --help")
    for flag in flags:
        assert flag in help_text, f"{script} --help does not list {flag}"


def named_paths(text: str) -> set[str]:
    """Files named in backticks: `attention.py`, `checkpoints/reverse.npz`, `tests/x.py`."""
    return set(re.findall(r"`((?:[\w.-]+/)*[\w.-]+\.(?:py|png|txt|json|md|toml|npz))(?:::\w+)?`",
                          text)) - {"bench.json"}  # bench.json is written by bench.py


@pytest.mark.parametrize("name", sorted(named_paths(README)))
def test_named_files_exist(name):
    assert (ROOT / name).is_file(), f"README names {name}, which does not exist"


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def links() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        text = re.sub(FENCE, "", page.read_text(), flags=re.S)
        found += [(str(page.relative_to(ROOT)), target)
                  for target in re.findall(r"\]\(([^)\s]+)\)", text)
                  if not target.startswith(("http://", "https://"))]
    return found


@pytest.mark.parametrize(("page", "target"), links())
def test_every_link_and_image_resolves(page, target):
    path, _, anchor = target.partition("#")
    file = (ROOT / page).parent / path if path else ROOT / page
    assert file.is_file(), f"{page} links to {target}: no such file"
    if anchor:
        assert anchor in anchors(file), f"{page} links to {target}: no such heading"


def test_links_are_found():
    # the link test above must not pass by finding nothing
    targets = {t for _, t in links()}
    assert {"docs/interview.md#interview-phrasing", "figures/mask_ablation.png",
            "#mask-logic"} <= targets


# --- the code the README quotes is the code ------------------------------------------------------

def shape_table() -> list[tuple[str, list[str], str]]:
    """(step, the code snippets quoted, the file they are quoted from) for each table row."""
    section = README.split("## The shape flow", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[2].endswith(".py"):
            rows.append((cells[0], re.findall(r"`([^`]+)`", cells[1]), cells[2]))
    return rows


def test_the_shape_table_has_its_rows():
    assert len(shape_table()) >= 10  # the test below must not pass by finding no row


@pytest.mark.parametrize(("step", "snippets", "file"), shape_table(),
                         ids=[step for step, _, _ in shape_table()])
def test_every_line_the_shape_table_quotes_is_in_its_file(step, snippets, file):
    code = " ".join((ROOT / file).read_text().split())
    for snippet in snippets:
        assert " ".join(snippet.split()) in code, f"{step}: `{snippet}` is not in {file}"


def test_the_quickstart_python_block_runs_and_prints_what_follows_it():
    quickstart = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    code, shown = re.search(r"```python\n(.*?)```\s*```text\n(.*?)```", quickstart,
                            flags=re.S).groups()
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout == shown
