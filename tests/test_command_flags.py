"""Every command against its own flags and its inputs:

1. A flag the chosen action does not read is a one-line usage error (exit 2) naming it, never
   silently dropped; a flag it reads gets the command past every check to its work. The table
   below says, per command, which actions read which flag, independently of the commands' code.
2. Every input is checked before the first line of output: an input that today would only be
   found late (a path, a size, a pair of models) is a one-line usage error with nothing on stdout
   before it and no traceback.

The work itself is replaced by a stub that raises Reached: a refusal must come before it, and a
flag that is read must get there. Nothing is measured or trained, so the table runs in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

import fast.model
import verify
from block import GPT, GPTConfig
from tools import (
    bench,
    bench_serving,
    cli_types,
    evaluate,
    flash,
    generate_cli,
    heatmap,
    int8,
    memory,
    speculative,
    train,
    window,
)

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = str(ROOT / "checkpoints" / "reverse.npz")
DRAFT = str(ROOT / "checkpoints" / "reverse_draft.npz")
LOG = str(ROOT / "checkpoints" / "reverse.log.json")


class Reached(Exception):  # noqa: N818 (not an error: the point the test wants to see reached)
    """The command got past every check to its work (a stub)."""


def reach(*args, **kwargs):  # noqa: ANN202 (stands in for any function)
    raise Reached


@dataclass
class Command:
    main: object
    stubs: list[tuple[object, str]]  # the work, replaced by `reach`
    actions: dict[str, list[str]]  # name: argv choosing it
    flags: list[tuple[str, list[str], set[str]]] = field(default_factory=list)  # flag, values,
    # the actions that read it


COMMANDS = {
    "tools/bench.py": Command(
        bench.main, [(bench, "run"), (bench, "sections_only")],
        {"all": [], "quick": ["--quick"], "profile": ["--profile"], "tricks": ["--tricks"],
         "profile+tricks": ["--profile", "--tricks"]},
        [("--figures", ["TMP/figs"], {"all", "quick", "profile", "profile+tricks"}),
         ("--json", ["TMP/b.json"], {"all", "quick", "profile", "tricks", "profile+tricks"}),
         ("--seed", ["1"], {"all", "quick", "profile", "tricks", "profile+tricks"}),
         ("--threads", ["1"], {"all", "quick", "profile", "tricks", "profile+tricks"})]),
    "tools/bench_serving.py": Command(
        bench_serving.main, [(bench_serving, "measure")],
        {"all": [], "quick": ["--quick"], "throughput": ["--throughput"],
         "picture": ["--picture"], "table+picture": ["--table", "--picture"]},
        [("--figures", ["TMP/figs"], {"all", "quick", "picture", "table+picture"}),
         ("--json", ["TMP/s.json"], {"all", "quick", "throughput", "picture", "table+picture"}),
         ("--seed", ["1"], {"all", "quick", "throughput", "table+picture"}),
         ("--threads", ["1"], {"all", "quick", "throughput", "table+picture"})]),
    "tools/window.py": Command(
        window.main, [(window, "band_picture"), (window, "accuracy"), (window, "speed_models")],
        {"picture": ["--picture"], "accuracy": ["--accuracy"], "speed": ["--speed"]},
        [("--n", ["5"], {"accuracy"}), ("--repeats", ["3"], {"speed"}),
         ("--out", ["TMP/w.png"], {"accuracy"})]),
    "tools/int8.py": Command(
        int8.main, [(int8, "compare"), (int8, "key_scale_study")],
        {"compare": ["--compare"], "scales": ["--scales"], "both": ["--compare", "--scales"]},
        [("--n", ["5"], {"compare", "scales", "both"}), ("--seed", ["1"], {"compare", "scales",
                                                                          "both"}),
         ("--checkpoint", [CHECKPOINT], {"compare", "scales", "both"}),
         ("--fast", [], {"compare", "both"})]),  # --scales writes its own forward out
    "tools/speculative.py": Command(
        speculative.main,
        [(speculative, "round_table"), (speculative, "bench"), (speculative, "profile")],
        {"round": ["--round"], "bench": ["--bench"], "profile": ["--profile"]},
        [("--prompt", ["abc"], {"round"}), ("--gamma", ["2"], {"round"}),
         ("--temperature", ["0.5"], {"round"}), ("--seed", ["1"], {"round"}),
         ("--n", ["3"], {"bench"}), ("--rounds", ["2"], {"bench", "profile"}),
         ("--extra-layers", ["1"], {"bench", "profile"}), ("--d-ff", ["600"], {"bench", "profile"}),
         ("--draft", [DRAFT], {"round", "bench", "profile"})]),
    "tools/flash.py": Command(
        flash.main, [(flash, "show"), (flash, "bench")],
        {"default": [], "show": ["--show"], "bench": ["--bench"], "both": ["--show", "--bench"]},
        [("--draw", [], {"default", "show", "both"}), ("--out", ["TMP/f.png"], {"default", "show",
                                                                                "both"}),
         ("--sizes", ["64"], {"bench", "both"}), ("--blocks", ["8"], {"bench", "both"}),
         ("--repeats", ["2"], {"bench", "both"}), ("--threads", ["1"], {"bench", "both"})]),
    "tools/heatmap.py": Command(
        heatmap.main, [(heatmap, "trained_maps"), (heatmap, "attention_maps")],
        {"trained": [], "random": ["--random"]},
        [("--prompt", ["abc"], {"trained"}), ("--checkpoint", [CHECKPOINT], {"trained"}),
         ("--prompt-len", ["4"], {"random"}), ("--layers", ["1"], {"random"}),
         ("--seed", ["1"], {"random"}), ("--init-std", ["0.5"], {"random"}),
         ("--rope", [], {"random"}), ("--out", ["TMP/h.png"], {"trained", "random"}),
         ("--ascii-layer", ["1"], {"trained", "random"}),
         ("--ascii-head", ["1"], {"trained", "random"}), ("--fast", [], {"trained", "random"})]),
    "tools/train.py": Command(
        train.main, [(train, "train"), (train, "plot")],
        {"train": [], "quick": ["--quick"], "plot": ["--plot"]},
        [("--steps", ["5"], {"train"}), ("--final-n", ["5"], {"train"}),
         ("--lr", ["0.001"], {"train", "quick"}), ("--seed", ["1"], {"train", "quick"}),
         ("--kv-latent", ["16"], {"train", "quick"}), ("--out", ["TMP/m.npz"], {"train", "quick"}),
         ("--figure", ["TMP/a.png"], {"plot"}), ("--logs", [LOG, LOG], {"plot"})]),
    "verify.py": Command(
        verify.main, [(verify, "one_thread"), (verify, "run_failure_modes")],
        {"checks": [], "failure-modes": ["--failure-modes"]},
        [("--verbose", [], {"checks"}), ("--only", ["1"], {"checks", "failure-modes"})]),
    "tools/generate_cli.py": Command(
        generate_cli.main,
        [(generate_cli.generate, "show_trained"), (generate_cli.generate, "random_weights"),
         (generate_cli, "hugging_face")],
        {"trained": [], "random": ["--random"], "hf": ["--hf", "gpt2", "--prompt", "x"]},
        [("--cache-dtype", ["int8"], {"trained", "random"}),  # --hf compares with HF, not int8
         ("--fast", [], {"trained", "random", "hf"})]),
}
# Commands with one action, every flag read by it: tools/memory.py (--quick, --out),
# tools/evaluate.py, tools/latent.py (--memory alone), tools/pictures.py (names); generate.py's
# own table is tests/test_generate_command.py's.

CASES = [(name, action, flag) for name, c in COMMANDS.items() for action in c.actions
         for flag, _, _ in c.flags]


def argv_of(values: list[str], tmp_path: Path) -> list[str]:
    return [str(tmp_path / v[4:]) if v.startswith("TMP/") else v for v in values]


@pytest.fixture
def stubbed(monkeypatch, tmp_path):
    """Default outputs under tmp_path; every command's work replaced by `reach`."""
    monkeypatch.setattr(cli_types, "OUT_DIR", tmp_path / "out")
    monkeypatch.setattr(bench, "OUT_ROOT", tmp_path / "out")
    monkeypatch.setattr(bench_serving, "OUT_DIR", tmp_path / "out")
    for command in COMMANDS.values():
        for owner, name in command.stubs:
            monkeypatch.setattr(owner, name, reach, raising=False)  # as the code was, too


@pytest.mark.parametrize(("name", "action", "flag"), CASES,
                         ids=[f"{n}:{a}:{f}" for n, a, f in CASES])
def test_a_flag_is_read_by_its_actions_and_refused_by_the_others(stubbed, tmp_path, capsys, name,
                                                                 action, flag):
    command = COMMANDS[name]
    values, users = next((v, u) for f, v, u in command.flags if f == flag)
    argv = [*command.actions[action], flag, *argv_of(values, tmp_path)]
    if action in users:
        with pytest.raises(Reached):
            command.main(argv)
        return
    with pytest.raises(SystemExit) as exit_info:
        command.main(argv)
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and "Traceback" not in captured.err
    assert captured.out == ""
    last = captured.err.strip().splitlines()[-1]
    assert "error: " in last and flag in last.split("error: ", 1)[1], last


# --- every input before the first line of output --------------------------------------------------

def short_checkpoint(tmp_path: Path, **config: object) -> str:
    return str(GPT(GPTConfig(**config)).save(tmp_path / "short.npz"))


def small_memory(monkeypatch) -> None:
    """A machine with 1 GiB free."""
    import parts.checks

    monkeypatch.setattr(parts.checks, "available_memory", lambda: 1 << 30)


LATE = {  # command: (main, argv with TMP/ and SHORT (a 16-position checkpoint), setup, match)
    "generate.py": (generate_cli.generate.main, ["--checkpoint", "SHORT"], None, "max_seq_len=16"),
    "tools/generate_cli.py --draft": (generate_cli.main, ["--draft", "SHORT"], None,
                                      "argument --draft"),
    "tools/speculative.py --bench": (speculative.main, ["--bench", "--draft", "TMP/none.npz"],
                                     None, "argument --draft"),
    "tools/speculative.py --round": (speculative.main, ["--round", "--draft", "SHORT"], None,
                                     "max_seq_len=16"),
    "tools/speculative.py --profile": (speculative.main, ["--profile", "--d-ff", "65536",
                                                          "--extra-layers", "64"],
                                       small_memory, "the heavier target"),
    "tools/window.py --accuracy": (window.main, ["--picture", "--accuracy"],
                                   lambda mp: mp.setattr(window, "CHECKPOINT", Path("/no/x.npz")),
                                   "argument --accuracy: no checkpoint at"),
    "tools/window.py --speed": (window.main, ["--picture", "--speed", "--repeats", "100000000"],
                                None, "argument --repeats"),
    "tools/window.py --speed, small machine": (window.main, ["--picture", "--speed"],
                                               lambda mp: mp.setattr(
                                                   __import__("parts.checks").checks,
                                                   "available_memory", lambda: 1 << 28),
                                               "--speed cannot run on this machine"),
    "tools/int8.py": (int8.main, ["--compare", "--checkpoint", "SHORT"], None, "max_seq_len=16"),
    "tools/int8.py --scales": (int8.main, ["--scales", "--checkpoint", "ROPE"], None,
                               "rope=True"),
    "tools/flash.py": (flash.main, ["--show", "--bench", "--sizes", "8192"], small_memory,
                       "argument --sizes/--blocks"),
    "tools/bench.py": (bench.main, ["--quick"],
                       lambda mp: mp.setattr(bench, "OUT_ROOT", Path("/proc/no/out")),
                       "cannot write the default output directory"),
    "tools/bench_serving.py": (bench_serving.main, ["--table"],
                               lambda mp: mp.setattr(bench_serving, "CHECKPOINT",
                                                     Path("/no/x.npz")),
                               "argument --table: no checkpoint at"),
    "tools/bench_serving.py, default folder": (bench_serving.main, ["--chunked"],
                                               lambda mp: mp.setattr(bench_serving, "OUT_DIR",
                                                                     Path("/proc/no/out")),
                                               "cannot write the default output folder"),
    "tools/heatmap.py": (heatmap.main, ["--checkpoint", "SHORT"], None, "max_seq_len=16"),
    "tools/evaluate.py": (evaluate.main, ["--checkpoint", "SHORT"], None, "max_seq_len=16"),
    "tools/memory.py": (memory.main, [],
                        lambda mp: mp.setattr(cli_types, "OUT_DIR", Path("/proc/no/out")),
                        "cannot write the default output"),
    "tools/train.py": (train.main, ["--kv-latent", "1000000"], None, "--kv-latent"),
    "verify.py": (verify.main, ["--failure-modes", "--verbose"], None, "--verbose"),
}
# tools/latent.py and tools/pictures.py take no input that could be found late: an action, names.


@pytest.mark.parametrize("name", LATE)
def test_every_input_is_checked_before_the_first_line_of_output(monkeypatch, tmp_path, capsys,
                                                                name):
    main, argv, setup, match = LATE[name]
    stops = {"SHORT": lambda: short_checkpoint(tmp_path, max_seq_len=16),
             "ROPE": lambda: short_checkpoint(tmp_path, rope=True)}
    argv = [stops[a]() if a in stops else a for a in argv_of(argv, tmp_path)]
    if setup is not None:
        setup(monkeypatch)
    work = [(verify, "run_failure_modes"), (window, "step_times"), (window, "accuracy"),
            (int8, "compare"), (int8, "key_scale_study"), (bench, "run"),
            (bench_serving, "measure"),
            (fast.model, "attention"), (flash, "flash_attention"), (train, "train"),
            (memory, "measure"), (evaluate, "decode_prompts"), (heatmap, "trained_maps"),
            (speculative, "step_breakdown"), (speculative, "speed_table")]
    for owner, attr in work:  # the work, should a refusal come too late
        monkeypatch.setattr(owner, attr, reach, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    assert captured.out == "", f"printed before refusing:\n{captured.out[:500]}"
    assert exit_info.value.code == 2 and "Traceback" not in captured.err
    last = captured.err.strip().splitlines()[-1]
    assert match in last, last
