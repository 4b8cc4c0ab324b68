"""tools/bench_serving.py: the serving measurements, at --quick sizes (about 20 seconds).

No time is asserted. What is: every field of the report is there and consistent, the guards
(the same tokens on every side of a comparison, the right answers) pass and would catch a
difference, the token rows counted are the rows the model ran, the picture's run holds a cancel
and a preemption with every block held by one request at a time, and the command writes only
where it is told (or under out/), refusing bad flags before any work.
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest

from tools import bench_serving as bench
from tools.bench_serving import QUICK


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One --quick run of every section, written into a folder of its own."""
    folder = tmp_path_factory.mktemp("serving")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = bench.main(["--quick", "--threads", "1", "--json", str(folder / "r.json"),
                           "--figures", str(folder)])
    return code, folder, json.loads((folder / "r.json").read_text()), (out.getvalue(),
                                                                      err.getvalue())


def test_the_quick_run_passes_its_guards_and_writes_only_where_told(quick):
    code, folder, r, _ = quick
    assert code == 0 and all(r["guards"].values()) and len(r["guards"]) >= 6
    assert sorted(p.name for p in folder.iterdir()) == ["r.json", bench.FIGURE]
    assert r["sections"] == list(bench.SECTIONS) and r["settings"]["quick"] is True
    assert r["header"]["blas_threads"] == 1 and r["header"]["torch_threads"] == 1


def test_each_section_says_on_stderr_when_it_starts_and_stdout_is_the_report(quick):
    out, err = quick[3]
    stages = [line.split("] ", 1)[1] for line in err.splitlines()
              if line.startswith("tools/bench_serving.py [")]
    assert [line for line in stages if not line.startswith(" ")] == [
        f"{i}/5 {bench.TITLES[name]}" for i, name in enumerate(bench.SECTIONS, 1)]
    assert any("round 1 of" in line for line in stages)
    assert " s] " not in out and "Correctness guards: PASS" in out


def test_throughput_fields(quick):
    r = quick[2]["throughput"]
    trained = r["trained reverser"]
    assert trained["requests"] == QUICK.trained_requests and trained["running"] == QUICK.running
    assert trained["answers_right"] == trained["requests"] and trained["static_differs"] == []
    for v in r.values():
        for who in ("static", "continuous"):
            assert v["tokens_per_s"][who]["n"] == v["rounds"]
            st = v["tokens_per_s"][who]
            assert st["min"] <= st["median"] <= st["max"]
            assert v["token_rows_computed"][who] >= v["needed_token_rows"] > 0
        assert v["continuous_over_static"] == pytest.approx(
            v["tokens_per_s"]["continuous"]["median"] / v["tokens_per_s"]["static"]["median"])
    long = next(v for name, v in r.items() if name.startswith("long"))
    assert long["answers_right"] is None
    assert long["useful_tokens"] == sum(bench.long_workload(QUICK, 0).new_tokens)


def test_chunked_prefill_fields(quick):
    r = quick[2]["chunked"]
    assert r["differs"] == [] and r["token_budget"] == QUICK.token_budget
    names = list(r["variants"])
    assert names == ["prefill-first", f"token_budget={QUICK.token_budget}"]
    for v in r["variants"].values():
        assert v["worst_gap_s"]["median"] >= v["median_gap_s"]["median"] > 0
    for v in r["variants"].values():  # the decoders make one token a step, from step 0
        assert v["steps"] >= QUICK.chunk_decoder_tokens


def test_versus_hf_fields(quick):
    r = quick[2]["versus_hf"]
    assert r["hf_settings"]["max_requests_per_batch"] == QUICK.running
    assert r["hf_settings"]["page_size"] == QUICK.block_size
    assert r["hf_settings"]["num_blocks"] == r["pool_blocks"]
    assert r["setup_s"]["hf"]["n"] == r["rounds"] and r["ours_over_hf"] > 0
    assert isinstance(r["differs"], list)  # reported, not asserted: float32 near-ties may part


def test_table_fields(quick):
    r = quick[2]["table"]
    assert len(r) == 2
    for v in r.values():
        assert v["same_argmax"] and v["max_abs_logit_diff_fast_paged_vs_contiguous"] < 1e-3
        assert len(v["step_s"]) == 4 and all(st["n"] == v["steps"] for st in v["step_s"].values())
        assert set(v["profile"]) == {"fast contiguous", "fast paged (block walk)"}
        assert all("function calls" in lines[0] for lines in v["profile"].values())


def test_the_goals_are_judged_on_the_right_side(quick):
    for t in quick[2]["targets"]:
        op, goal = t["goal"].split()
        expected = {">=": t["value"] >= float(goal), ">": t["value"] > float(goal),
                    "<=": t["value"] <= float(goal)}[op]
        assert t["met"] == expected


# --- the parts, on their own ---------------------------------------------------------------------

def test_a_spread_wider_than_the_median_allows_is_void():
    assert bench.spread([1.0, 1.1, 1.2])["void"] is False
    st = bench.spread([1.0, 1.0, 2.0])
    assert st["void"] is True and (st["median"], st["min"], st["max"]) == (1.0, 1.0, 2.0)
    assert "VOID" in bench.show(st, " s")


def test_differences_name_the_request_the_step_and_the_near_tie():
    logits = [np.zeros((3, 4)), np.array([[0, 0, 0, 9.0], [1, 5, 5 - 5e-6, 0], [0, 0, 0, 0]])]
    found = bench.differences([np.array([3, 1, 2]), np.array([3, 1, 2])],
                              [[3, 1, 2], [3, 2, 2]], logits)
    assert len(found) == 1 and found[0]["request"] == 1
    assert found[0]["first_differing_token"] == 1
    assert found[0]["top_two_gap_relative"] == pytest.approx(1e-6)
    assert bench.differences([np.array([1, 2])], [[1]])[0]["first_differing_token"] == 1


def test_a_static_row_is_cut_at_its_count_and_its_first_eos():
    assert bench.cut(np.array([5, 6, 7, 8]), 3, None).tolist() == [5, 6, 7]
    assert bench.cut(np.array([5, 46, 46, 46]), 4, 46).tolist() == [5, 46]


def test_static_rows_by_hand_equal_the_rows_the_model_ran():
    """Static batching without eos computes, per batch of b, b x its longest prompt, then b
    rows for each decode step but the first. Prompts of 3, 5, 2 tokens making 2, 4, 1 tokens,
    batches of 2: 2 x 5 + 2 x 3 = 16, then 1 x 2 + 0 = 2: 18 rows (the Recorder runs it)."""
    model = bench.Models(QUICK, 0).get("shaped")
    rng = np.random.default_rng(0)
    w = bench.Workload("by hand", "", tuple(rng.integers(0, 512, n) for n in (3, 5, 2)),
                       (2, 4, 1), None)
    assert bench.static_rows(w, 2) == 18
    assert bench.token_rows(model, lambda m: bench.run_static(m, w, 2), False) == 18
    assert w.needed == (3 + 1) + (5 + 3) + (2 + 0)


def test_a_dry_recorder_schedules_the_engine_as_the_real_model_does():
    """Without eos the engine's steps do not depend on the tokens: zero logits give the same
    (B, T) of every step as the real forward."""
    model = bench.Models(QUICK, 0).get("shaped")
    w = bench.long_workload(QUICK, 0)
    shapes = []
    for dry in (False, True):
        r = bench.recorder(model, dry)
        bench.run_engine(r, w, QUICK.running, QUICK.block_size)
        shapes.append(r.calls)
    assert shapes[0] == shapes[1] and len(shapes[0]) > 1


def test_the_engine_pool_holds_the_b_longest_requests_so_nothing_is_preempted():
    model = bench.Models(QUICK, 0).get("trained")
    w = bench.reversal_workload(QUICK.trained_requests, 0)
    engine, ids = bench.run_engine(model, w, QUICK.running, QUICK.block_size)
    assert engine.preemptions == 0 and engine.stats()["requests_finished"] == len(ids)


def test_the_picture_run_shows_a_cancel_a_preemption_and_one_owner_per_block():
    story = bench.pool_story(bench.Models(QUICK, 0).get("trained"))
    kinds = {kind for _, _, kind in story["events"]}
    assert {"admit", "finish", "cancel", "preempt"} <= kinds
    owner = np.array(story["owner"])  # (blocks, steps)
    assert owner.shape == (story["blocks"], story["steps"])
    for s, tables in enumerate(story["tables"]):
        held = [b for table, _ in tables.values() for b in table]
        assert len(held) == len(set(held))  # no block in two tables
        assert sorted(held + story["free"][s]) == list(range(story["blocks"]))
        for rid, (table, length) in tables.items():
            assert all(owner[b, s] == int(rid) for b in table)
            assert len(table) == -(-length // story["block_size"])  # a block only when full
    assert 0 <= bench.chosen_step(story) < story["steps"]


# --- the command ---------------------------------------------------------------------------------

def test_a_lone_section_writes_under_out_in_a_folder_of_its_own(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "OUT_DIR", tmp_path / "out")
    assert bench.main(["--picture"]) == 0
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["out/serving/picture/bench_serving.json",
                       f"out/serving/picture/{bench.FIGURE}"]


@pytest.mark.parametrize(("argv", "match"), [
    (["--json", "missing_dir/b.json"], "does not exist"),
    (["--json", "b.txt"], "must end in .json"),
    (["--figures", "afile.png"], "is not a directory"),
    (["--threads", "0"], "must be in [1, 512]"),
    (["--seed", "-1"], "must be in [0, 4294967295]"),
    (["--quick=yes"], "ignored explicit argument"),
    (["--table", "--figures", "figs"], "--figures is where the picture goes"),
    (["--picture", "--seed", "1"], "--seed is not read by --picture alone"),
    (["--picture", "--quick"], "--quick is not read by --picture alone"),
])
def test_the_command_refuses_bad_arguments_before_measuring(tmp_path, monkeypatch, capsys, argv,
                                                            match):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile.png").write_bytes(b"")
    monkeypatch.setattr(bench, "measure", lambda *a: pytest.fail("measured before refusing"))
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2 and match in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["afile.png"]
