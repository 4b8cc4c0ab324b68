"""tools/bench_sharing.py: what sharing the cache buys, measured at --quick sizes made smaller.

The counts are worked out here by hand from the sizes (blocks of 16): a forked group holds the
prompt's full blocks once and each sample's own blocks; the walk reads every row's blocks, the
cascade the shared prefix once. Timings are only checked to be there, never compared.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json

import pytest

from tools import bench_sharing as bench

TINY = dataclasses.replace(bench.QUICK, requests=6, per_step=2, system=32, question=(2, 5),
                           new=3, samples=(2, 4), cascade=((1, 32, 3), (3, 32, 3)), rounds=1)


@pytest.fixture(scope="module")
def model():
    return bench.the_model()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One run of the command at TINY sizes, its stdout, stderr and JSON."""
    tmp = tmp_path_factory.mktemp("bench_sharing")
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        mp.setattr(bench, "QUICK", TINY)
        code = bench.main(["--quick", "--out", str(tmp / "s.png"), "--json", str(tmp / "s.json")])
    return code, out.getvalue(), err.getvalue(), json.loads((tmp / "s.json").read_text()), tmp


def test_the_command_writes_only_where_told_and_every_field(run):
    code, out, err, saved, tmp = run
    assert code == 0
    assert sorted(p.name for p in tmp.iterdir()) == ["s.json", "s.png"]
    assert out.startswith("machine: ") and out.splitlines()[0].endswith(", 1 threads")
    assert set(saved) == {"machine", "shapes", "block_size", "rounds", "threads", "quick", "seed",
                          "shared_system_prompt", "parallel_samples", "cascade"}
    system = saved["shared_system_prompt"]
    for name in ("no prefix caching", "prefix caching"):
        assert set(system[name]) == {"peak_blocks", "prefix_hit_blocks", "preemptions",
                                     "ttft_ms", "run_ms"}
        assert system[name]["ttft_ms"]["n"] == TINY.requests
        assert system[name]["ttft_ms"]["min"] <= system[name]["ttft_ms"]["median"]
    for case in saved["cascade"]:
        assert set(case) == {"rows", "prefix", "own", "max_abs_logit_diff", "walk", "cascade",
                             "pays"}
        for name in ("walk", "cascade"):
            assert set(case[name]) == {"step_ms", "blocks_read", "bytes_read"}
    for line in ("1. ", "2. ", "3. ", "wrote "):
        assert line in out
    assert "tools/bench_sharing.py [" in err and "4/4 the picture of block tables" in err
    assert "tools/bench_sharing.py [" not in out  # progress goes to stderr only


def test_prefix_caching_by_hand(run):
    """6 requests, 2 per step, a system prompt of 2 full blocks: the first two compute it (and
    keep one copy), the other four find both blocks cached. Without caching each holds its own
    copy. The tokens are the same either way, and nothing is preempted."""
    system = run[3]["shared_system_prompt"]
    off, on = system["no prefix caching"], system["prefix caching"]
    assert off["prefix_hit_blocks"] == 0 and on["prefix_hit_blocks"] == 4 * 2
    assert on["peak_blocks"] < off["peak_blocks"]
    assert off["preemptions"] == on["preemptions"] == 0
    assert system["requests_whose_tokens_differ"] == 0


@pytest.mark.parametrize("n", [2, 4])
def test_parallel_samples_by_hand(run, n):
    """A prompt of 40 tokens (2 full blocks + 8) and 24 new tokens: alone, a request holds
    ceil(63 / 16) = 4 blocks; forked, the 2 full prompt blocks are held once and each sample
    holds 2 of its own (its copy of the shared last block, or that block itself for the last
    writer, and one more): 2 + 2n. n - 1 copies: at most one per sample."""
    r = run[3]["parallel_samples"][str(n)]
    assert r["independent"] == {"peak_blocks": 4 * n, "copies": 0}
    assert r["forked"] == {"peak_blocks": 2 + 2 * n, "copies": n - 1}
    assert r["saved_percent"] == pytest.approx(100 * (1 - (2 + 2 * n) / (4 * n)))


def test_cascade_reads_by_hand(run):
    """Prefix 32 tokens (2 blocks), 3 own tokens (one partly full block each), 2 layers: the walk
    reads rows x 3 blocks per layer; the cascade the 2 prefix blocks once and 1 own block per
    row (a group of one walks alone). 32 KiB per block (K and V, 4 heads x 16 x 64 float32)."""
    one, three = run[3]["cascade"]
    assert (one["walk"]["blocks_read"], one["cascade"]["blocks_read"]) == (2 * 3, 2 * 3)
    assert (three["walk"]["blocks_read"], three["cascade"]["blocks_read"]) == (2 * 9,
                                                                              2 * (2 + 3))
    assert three["walk"]["bytes_read"] == 2 * 9 * 2 * 4 * 16 * 64 * 4
    for case in (one, three):
        assert case["max_abs_logit_diff"] < 1e-4  # float32: the same logits, summed otherwise
    assert one["pays"] is False  # nothing shared, whatever the clock said


def test_the_picture_is_drawn_from_a_real_run(model):
    """The snapshots the picture draws: the shared system prompt's 2 full blocks in all three
    tables; the forked group sharing both blocks (the last one partly full) after its prefill,
    then two samples with a copy of the last block and the last writer keeping it."""
    system, forked, later = bench.table_snapshots(model)
    tables, refs = system[1], system[3]
    firsts = {tuple(t[:2]) for t in tables.values()}
    assert len(tables) == 3 and len(firsts) == 1 and all(refs[b] == 3 for b in firsts.pop())
    assert len({tuple(t) for t in forked[1].values()}) == 1 and set(forked[2].values()) == {6}
    last = [t[-1] for t in later[1].values()]
    assert len(set(last)) == 3 and list(forked[1].values())[0][-1] in last
    assert all(later[3][b] == 1 for b in last)


@pytest.mark.parametrize(("argv", "match"), [
    (["--rounds", "0"], "must be in [1, 1000]"), (["--seed", "-1"], "must be in"),
    (["--threads", "0"], "must be in [1, 512]"),
    (["--out", "x.txt"], "must end in .png"), (["--json", "missing/x.json"], "does not exist"),
    (["--quick=yes"], "ignored explicit argument"), (["--nope"], "unrecognized arguments")])
def test_bad_flags_are_refused_before_any_work(tmp_path, monkeypatch, capsys, argv, match):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench, "the_model", lambda: pytest.fail("worked before refusing"))
    with pytest.raises(SystemExit) as exit_:
        bench.main(argv)
    captured = capsys.readouterr()
    assert exit_.value.code == 2 and captured.out == ""
    assert match in captured.err.strip().splitlines()[-1]
    assert list(tmp_path.iterdir()) == []
