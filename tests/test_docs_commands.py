"""Every command a docs page shows runs as shown.

A command is a line of a code block that starts with `python` or `make`, a `python ...` or
`make ...` in backticks, or the command of a `<!-- recorded: CMD -->` block. A command that some
page's `<!-- output: CMD -->` block shows is rerun and compared by tests/test_readme.py, so it is
not run again here. Every other command must exit 0, run one of these ways (each list below
gives its reasons):
- as shown;
- QUICK: its quick form (fewer sizes, prompts or repeats), where the full run takes minutes;
- FLAGS_ONLY: where even a quick run takes a minute or more, the script's --help must list every
  flag the page passes (the script exists and takes them);
- SKIPPED: commands that train for minutes, overwrite a committed file, or read what such a
  command writes.
A page's placeholder (OUT, my.npz, DIR, N) is given a value in QUICK.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from test_readme import FENCE, output_of

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
STARTS = re.compile(r"(?:python|make) ")

QUICK = {
    "python tools/export_hf.py": "python tools/export_hf.py --out OUT/reverse",
    "python tools/memory.py": "python tools/memory.py --quick --out OUT/memory.png",
    "python tools/bench_paged_memory.py":
        "python tools/bench_paged_memory.py --out OUT/paged_memory.png",
    "python tools/flash.py --show --out figures/flash.png":
        "python tools/flash.py --show --out OUT/flash.png",  # never over the committed figure
    "python tools/flash.py --bench --sizes 512 1024 2048 4096 --repeats 7 --threads 1":
        "python tools/flash.py --bench --sizes 64 --blocks 32 --repeats 1 --threads 1",
    "python tools/speculative.py --profile": "python tools/speculative.py --profile --rounds 1",
    "python tools/bench_serving.py --picture --figures figures":
        "python tools/bench_serving.py --picture --figures OUT",  # never over the figure
    "python tools/bench_serving.py --quick --threads 1":
        "python tools/bench_serving.py --quick --threads 1 --json OUT/s.json --figures OUT",
    "python tools/bench_sharing.py --quick --out figures/sharing.png":
        "python tools/bench_sharing.py --quick --out OUT/sharing.png",  # never over the figure
}

FLAGS_ONLY = {
    "python tools/export_hf.py --checkpoint my.npz --out DIR": "the export above from a checkpoint "
                                                             "of your own: only the flags differ",
    "python tools/bench.py": "every section at full size: minutes",
    "python tools/bench.py --quick": "82 s or more on a 2-core machine",
    "python tools/bench.py --profile": "about a minute at GPT-2-small shapes",
    "python tools/bench.py --tricks": "every trick switched off in turn: minutes",
    "python tools/bench.py --tricks --threads 1": "every trick switched off in turn: minutes",
    "python tools/bench.py --threads N": "every section at full size: minutes",
    "python tools/speculative.py --bench": "about 30 s even with 2 prompts and 1 round",
    "python tools/bench_sharing.py": "5 rounds of a 64-request trace: minutes (the quick form is "
                                     "an output block of sharing.md)",
    "python tools/bench_serving.py": "every section at full size: over half an hour at 1 thread",
    "python tools/bench_serving.py --threads 1": "the same full run, at 1 thread",
    "python tools/bench_serving.py --throughput --threads 1": "two workloads, 7 and 3 rounds: "
                                                              "about 4 minutes",
    "python tools/window.py --speed --repeats 21": "fills GPT-2-small caches to 4,096 "
                                                   "positions: over a minute even at 1 repeat",
}

SKIPPED = {
    "make test": "runs this suite",
    "make verify": "python verify.py behind a venv; tests/test_readme.py runs python verify.py",
    "make bench-figures": "the whole benchmark, minutes, and it rewrites the committed figures",
    "make bench-serving": "python tools/bench_serving.py --threads 1: over half an hour",
    "make figures": "redraws every committed figure, training-free but minutes long",
    "make bench-sharing": "python tools/bench_sharing.py (minutes) writing out/bench_sharing.json",
    "make train-draft": "trains for minutes and rewrites checkpoints/reverse_draft.npz",
    "python tools/train.py": "trains for minutes",
    "python tools/train.py --draft --out checkpoints/reverse_draft.npz":
        "trains for minutes and rewrites a committed checkpoint",
    "python tools/train.py --kv-latent 32 --steps 2000": "trains for minutes",
    "python tools/evaluate.py --checkpoint out/reverse_mla32.npz":
        "reads the file the training command above writes",
}


def shown_commands() -> dict[str, str]:
    """command -> the first page that shows it, outside output blocks."""
    found: dict[str, str] = {}
    for page in DOCS:
        text = page.read_text()
        for command in re.findall(r"<!-- recorded: (.*?) -->", text):
            found.setdefault(" ".join(command.split()), page.name)
        text = re.sub(r"<!-- output[^>]*-->\n" + FENCE, "", text, flags=re.S)
        for block in re.findall(FENCE, text, flags=re.S):
            for line in block.splitlines():
                if STARTS.match(line.strip()):
                    command = line.split("#", 1)[0]
                    found.setdefault(" ".join(command.split()), page.name)
        for command in re.findall(r"`((?:python|make) [^`]+)`", re.sub(FENCE, "", text,
                                                                      flags=re.S)):
            found.setdefault(" ".join(command.split()), page.name)
    return found


COMMANDS = shown_commands()
COMPARED = {" ".join(c.split()) for page in [ROOT / "README.md", *DOCS]
            for c in re.findall(r"<!-- output[^:]*: (.*?) -->", page.read_text())}
RUN = sorted(c for c in COMMANDS if c not in FLAGS_ONLY and c not in SKIPPED and c not in COMPARED)


def test_commands_are_found():
    # the tests below must not pass by finding nothing
    assert {"python tools/bench.py", "python tools/speculative.py --profile"} <= set(COMMANDS)
    assert len(RUN) >= 8


def test_every_listed_command_is_still_shown():
    stale = (set(QUICK) | set(FLAGS_ONLY) | set(SKIPPED)) - set(COMMANDS)
    assert not stale, f"listed here, shown on no docs page: {sorted(stale)}"


@pytest.mark.parametrize("command", RUN, ids=[f"{COMMANDS[c]}:{c}" for c in RUN])
def test_a_shown_command_runs(command):
    output_of(QUICK.get(command, command))  # asserts exit 0, stderr in the message


@pytest.mark.parametrize("command", sorted(FLAGS_ONLY), ids=sorted(FLAGS_ONLY))
def test_a_long_command_takes_its_flags(command):
    script, *args = command.split()[1:]
    help_text = output_of(f"python {script} --help")
    for flag in (a for a in args if a.startswith("--")):
        assert flag in help_text, f"{script} --help does not list {flag}"


@pytest.mark.parametrize("command", sorted(SKIPPED), ids=sorted(SKIPPED))
def test_a_skipped_command_exists(command):
    words = command.split()
    if words[0] == "make":
        makefile = (ROOT / "Makefile").read_text()
        assert re.search(rf"^{re.escape(words[1])}:", makefile, flags=re.M), command
    else:
        help_text = output_of(f"python {words[1]} --help")
        for flag in (w for w in words[2:] if w.startswith("--")):
            assert flag in help_text, f"{words[1]} --help does not list {flag}"


def test_a_default_output_lands_in_the_repository_whatever_the_folder():
    """Run from another folder, a command's default output goes under the repo's out/, never
    into the current folder (tools/cli_types.default_output)."""
    with tempfile.TemporaryDirectory() as elsewhere:
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
        run = subprocess.run([sys.executable, str(ROOT / "tools/window.py"), "--accuracy",
                              "--n", "10"], cwd=elsewhere, capture_output=True, text=True,
                             timeout=300, env=env)
        assert run.returncode == 0, run.stderr[-2000:]
        assert not any(Path(elsewhere).iterdir()), list(Path(elsewhere).iterdir())
        assert str(ROOT / "out" / "window_accuracy.png") in run.stdout
