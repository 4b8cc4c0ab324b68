"""Every command, given arguments a hostile user would try: a one-line usage error (exit 2) before
any work, never a traceback, never a file written somewhere other than where it was told."""

from __future__ import annotations

import pytest

import verify
from tools import bench, memory


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


@pytest.mark.parametrize(("argv", "match"), [(["--only", "13"], "invalid choice"),
                                             (["--only", "x"], "invalid int")])
def test_verify_refuses_unknown_checks(capsys, argv, match):
    assert match in usage_error(verify.main, argv, capsys)
