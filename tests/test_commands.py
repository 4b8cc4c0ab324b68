"""Every command, given arguments a hostile user would try: a one-line usage error (exit 2) before
any work, never a traceback, never a file written somewhere other than where it was told."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import verify
from block import GPT, GPTConfig
from tools import bench, evaluate, generate_cli, heatmap, memory, pictures, train


def usage_error(main, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error:" in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize(("argv", "match"), [
    (["--out", "."], "must end in .png"),
    (["--out", ""], "must end in .png"),
    (["--out", "noext"], "must end in .png"),
    (["--out", "x.txt"], "must end in .png"),
    (["--out", "missing_dir/x.png"], "does not exist"),
    (["--out", "/proc/x.png"], "not writable"),
])
def test_memory_refuses_an_output_it_would_not_write_exactly(tmp_path, monkeypatch, capsys,
                                                             argv, match):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adir.png").mkdir()
    assert match in usage_error(memory.main, argv, capsys)
    assert "is a directory" in usage_error(memory.main, ["--out", "adir.png"], capsys)
    assert [p.name for p in tmp_path.iterdir()] == ["adir.png"]  # nothing written


@pytest.mark.parametrize(("argv", "match"), [
    (["--json", "missing_dir/b.json"], "does not exist"),
    (["--json", "b.txt"], "must end in .json"),
    (["--figures", "afile.png"], "is not a directory"),
    (["--seed", "-1"], "must be in [0, 4294967295]"),
    (["--seed", "x"], "expected an int"),
    (["--threads", "0"], "must be in [1, 512]"),
])
def test_bench_refuses_bad_arguments_before_measuring(tmp_path, monkeypatch, capsys, argv, match):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile.png").write_bytes(b"")
    monkeypatch.setattr(bench, "run", lambda *a: pytest.fail("measured before refusing"))
    assert match in usage_error(bench.main, argv, capsys)


@pytest.mark.parametrize(("argv", "match"), [(["--only", str(max(verify.CHECKS) + 1)],
                                              "invalid choice"),
                                             (["--only", "x"], "invalid int")])
def test_verify_refuses_unknown_checks(capsys, argv, match):
    assert match in usage_error(verify.main, argv, capsys)


# --- from any directory --------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
# The modules of tools/ that the commands import and that are no command themselves: the flags
# and outputs they share, the measurement harness, the references, the benchmark's sections,
# and the call into Hugging Face's continuous batching (no command yet).
HELPERS = {"cli_types.py", "measure.py", "references.py", "bench_setup.py", "bench_decode.py",
           "bench_hf.py", "bench_profile.py", "hf_serving.py"}
SCRIPTS = ["generate.py", "verify.py", *sorted(str(p.relative_to(ROOT))
                                               for p in (ROOT / "tools").glob("[!_]*.py")
                                               if p.name not in HELPERS)]


def test_every_helper_is_no_command_and_every_other_tool_is_one():
    for path in (ROOT / "tools").glob("[!_]*.py"):
        is_command = 'if __name__ == "__main__":' in path.read_text()
        assert is_command == (path.name not in HELPERS), path.name


def run_script(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / args[0]), *args[1:]], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_command_shows_its_help_from_another_directory(tmp_path, script):
    run = run_script([script, "--help"], tmp_path)
    assert run.returncode == 0 and run.stdout.startswith("usage:"), run.stderr[-500:]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv", [
    ["generate.py", "--prompt", "ab"],
    ["generate.py", "--random", "--new-tokens", "2", "--layers", "1"],
    ["verify.py", "--only", "1"],
    ["tools/evaluate.py", "--n", "3"],
    ["tools/pictures.py", "mask"],
    ["tools/heatmap.py", "--random", "--prompt-len", "4", "--layers", "1", "--out", "h.png"],
], ids=lambda argv: " ".join(argv))
def test_commands_work_from_another_directory(tmp_path, argv):
    """Run from a directory that is not the repository: each finds the repository's code and
    checkpoint, and writes only the file it was told to (relative to where it runs)."""
    run = run_script(argv, tmp_path)
    assert run.returncode == 0, run.stderr[-1000:]
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == (["h.png"] if "--out" in argv else [])


# --- checkpoints: every refusal of GPT.load is one line ------------------------------------------

def bad_checkpoints(tmp_path: Path) -> dict[str, Path]:
    np.save(tmp_path / "weights.npy", np.zeros(3))
    (tmp_path / "weights.npy").rename(tmp_path / "renamed.npz")
    (tmp_path / "garbage.npz").write_bytes(b"not a checkpoint at all\n" * 4)
    np.savez(tmp_path / "no_config.npz", wte=np.zeros((2, 2)))
    np.savez(tmp_path / "bad_config.npz", config=np.array('{"d_model": -1}'))
    np.savez(tmp_path / "not_json.npz", config=np.array("{d_model"))
    (tmp_path / "a_dir.npz").mkdir()
    return {p.stem: p for p in tmp_path.iterdir()} | {"missing": tmp_path / "missing.npz"}


@pytest.mark.parametrize("kind", ["renamed", "garbage", "no_config", "bad_config", "not_json",
                                  "a_dir", "missing"])
@pytest.mark.parametrize("command", ["generate", "evaluate", "heatmap"])
def test_a_bad_checkpoint_is_a_one_line_usage_error(tmp_path, capsys, command, kind):
    """A .npy renamed .npz used to escape GPT.load as a TypeError traceback in generate.py and
    heatmap.py; every refusal now names the checkpoint in one line, exit 2."""
    path = bad_checkpoints(tmp_path)[kind]
    main = {"generate": generate_cli.main, "evaluate": evaluate.main,
            "heatmap": heatmap.main}[command]
    last = usage_error(main, ["--checkpoint", str(path)], capsys)
    assert last.split("error: ")[1].startswith("argument --checkpoint: ")
    assert str(path) in last


# --- numbers and switches: nan, inf, 1e400, negatives, a value given to a switch ------------------

NOT_NUMBERS = ["nan", "inf", "-inf", "1e400", "-1e400", "x", ""]


@pytest.mark.parametrize("value", NOT_NUMBERS + ["-1", "0"])
@pytest.mark.parametrize("flag", ["--lr", "--weight-decay", "--length-power"])
def test_train_float_flags_refuse_before_training(monkeypatch, capsys, flag, value):
    monkeypatch.setattr(train, "train", lambda *a, **k: pytest.fail("trained before refusing"))
    if value in ("-1", "0") and flag != "--lr":
        value = "-11" if flag == "--length-power" else "-1"  # 0 and -1 mean something there
    last = usage_error(train.main, ["--quick", f"{flag}={value}"], capsys)
    assert f"argument {flag}: " in last


@pytest.mark.parametrize("value", NOT_NUMBERS + ["-0.1", "11"])
def test_heatmap_init_std_refuses_before_any_work(monkeypatch, capsys, value):
    monkeypatch.setattr(heatmap, "attention_maps", lambda *a: pytest.fail("worked first"))
    last = usage_error(heatmap.main, ["--random", f"--init-std={value}"], capsys)
    assert "argument --init-std: " in last


@pytest.mark.parametrize(("main", "flag"), [
    (train.main, "--quick"), (train.main, "--plot"), (train.main, "--no-causal-mask"),
    (memory.main, "--quick"), (heatmap.main, "--random"), (heatmap.main, "--rope"),
    (generate_cli.main, "--random"), (verify.main, "--verbose"), (verify.main, "--failure-modes"),
    (bench.main, "--quick"), (bench.main, "--profile"),
], ids=lambda x: x if isinstance(x, str) else x.__module__)
@pytest.mark.parametrize("value", ["yes", "0", "false", "nan"])
def test_a_switch_given_a_value_is_refused(monkeypatch, capsys, main, flag, value):
    monkeypatch.setattr(bench, "run", lambda *a: pytest.fail("measured before refusing"))
    assert "ignored explicit argument" in usage_error(main, [f"{flag}={value}"], capsys)


@pytest.mark.parametrize(("main", "argv"), [
    (evaluate.main, ["--n", "0"]), (evaluate.main, ["--n", "1e400"]),
    (evaluate.main, ["--n", "10000000"]), (evaluate.main, ["--batch", "-3"]),
    (evaluate.main, ["--seed", "nan"]), (train.main, ["--steps", "0"]),
    (train.main, ["--batch", "1000000"]), (train.main, ["--final-n", "-1"]),
    (train.main, ["--threads", "inf"]), (heatmap.main, ["--ascii-head", "-1"]),
    (pictures.main, ["nope"]),
], ids=lambda x: " ".join(x) if isinstance(x, list) else x.__module__)
def test_int_and_choice_flags_refuse_bad_values(monkeypatch, capsys, main, argv):
    monkeypatch.setattr(train, "train", lambda *a, **k: pytest.fail("trained before refusing"))
    monkeypatch.setattr(evaluate, "decode_prompts", lambda *a, **k: pytest.fail("decoded"))
    assert "error: argument " in usage_error(main, argv, capsys)


@pytest.mark.parametrize("command", ["generate", "evaluate", "heatmap"])
@pytest.mark.parametrize("config", [{"max_seq_len": 16}, {"vocab_size": 64}],
                         ids=["too-short", "too-few-tokens"])
def test_a_checkpoint_that_cannot_answer_the_task_is_refused_before_decoding(
        tmp_path, monkeypatch, capsys, command, config):
    """A valid checkpoint of 16 positions (or 64 token ids: no letters) cannot decode a long
    prompt and its answer: refused as a usage error, not a traceback half-way through."""
    path = GPT(GPTConfig(**config)).save(tmp_path / "small.npz")
    monkeypatch.setattr(GPT, "__call__", lambda *a, **k: pytest.fail("decoded before refusing"))
    main, extra = {"generate": (generate_cli.main, ["--prompt", "abcdefghijklmnopqrstuvwx"]),
                   "evaluate": (evaluate.main, []),
                   "heatmap": (heatmap.main, ["--prompt", "abcdefghijklmnopqrstuvwx", "--out",
                                              str(tmp_path / "h.png")])}[command]
    last = usage_error(main, ["--checkpoint", str(path), *extra], capsys)
    assert ("max_seq_len=16" if "max_seq_len" in config else "[0, 64)") in last
