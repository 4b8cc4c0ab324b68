"""tools/bench_paged_memory.py: KV-cache slots counted by allocator on one schedule.

A tiny trace is worked out here by hand, step by step, for all three allocators; the real
workloads must keep the paged allocator's waste under one block per running request (the goal
of paging), and every count must add up.
"""

from __future__ import annotations

import json

import pytest

from parts import task
from tools import bench_paged_memory as bench

# --- a tiny trace, by hand -----------------------------------------------------------------------
# Three requests (P prompt tokens, n answer tokens; final keys F = P + n - 1), two at once,
# max_seq_len 16, blocks of 4:
#   A: P 3, n 2, F 4     B: P 5, n 5, F 9     C: P 2, n 1, F 2
# A and B start at step 0. A runs steps 0-1 (3, 4 keys) and leaves; C takes its place at step 2
# and runs that step only (2 keys); B runs steps 0-4 (5, 6, 7, 8, 9 keys).
#
#   step  running (keys)
#   0     A 3, B 5
#   1     A 4, B 6
#   2     B 7, C 2
#   3     B 8
#   4     B 9
#
# Each request's reservation R, split as (token c, reserved min(R, F) - c, never R - min(R, F)),
# and the step's totals:
#   step  paged, blocks of 4: 4 * ceil(c / 4)    power of two              contiguous: 16 each
#   0     A 4 (3,1,0)  B 8 (5,3,0)   8,4,0       A 4 (3,1,0)  B 8 (5,3,0)  A (3,1,12) B (5,4,7)
#   1     A 4 (4,0,0)  B 8 (6,2,0)  10,2,0       A 4 (4,0,0)  B 8 (6,2,0)  A (4,0,12) B (6,3,7)
#   2     B 8 (7,1,0)  C 4 (2,0,2)   9,1,2       B 8 (7,1,0)  C 2 (2,0,0)  B (7,2,7)  C (2,0,14)
#   3     B 8 (8,0,0)                8,0,0       B 8 (8,0,0)               B (8,1,7)
#   4     B 12 (9,0,3)               9,0,3       B 16 (9,0,7)              B (9,0,7)

TINY = bench.Workload("tiny", "three requests", (bench.Request(3, 2), bench.Request(5, 5),
                                                 bench.Request(2, 1)), 16, 1)
STEPS = [[(0, 3), (1, 5)], [(0, 4), (1, 6)], [(1, 7), (2, 2)], [(1, 8)], [(1, 9)]]
BY_HAND = {
    "paged 4": [(8, 4, 0), (10, 2, 0), (9, 1, 2), (8, 0, 0), (9, 0, 3)],
    "power of two": [(8, 4, 0), (10, 2, 0), (9, 1, 0), (8, 0, 0), (9, 0, 7)],
    "contiguous": [(8, 5, 19), (10, 3, 19), (9, 2, 21), (8, 1, 7), (9, 0, 7)],
}


def test_the_schedule_of_the_tiny_trace_is_the_one_worked_by_hand():
    assert bench.schedule(TINY.requests, running=2) == STEPS


@pytest.mark.parametrize(("name", "reserve"), [("paged 4", bench.paged(4)),
                                               ("power of two", bench.power_of_two),
                                               ("contiguous", bench.contiguous)])
def test_every_slot_of_the_tiny_trace_is_counted_as_worked_by_hand(name, reserve):
    split = bench.count(TINY, STEPS, name, reserve)
    assert split.per_step == BY_HAND[name]
    assert split.running == [2, 2, 2, 1, 1]


def test_the_tiny_trace_summaries_by_hand():
    """paged 4: 56 reserved slot-steps (12 + 12 + 12 + 8 + 12) of which 44 hold tokens, 7 wait
    for later tokens, 5 are never used; its peak, 12 slots, comes first at step 0 (8 tokens, 4
    reserved). Contiguous: 128 slot-steps, the peak 32 at step 0 (8, 5, 19). Waste per running
    request, paged 4: 4/2, 2/2, 3/2, 0/1, 3/1 -> mean 1.5, worst 3, under one block of 4."""
    paged = bench.count(TINY, STEPS, "paged 4", bench.paged(4))
    assert paged.reserved_slots == [12, 12, 12, 8, 12] and paged.peak_step == 0
    assert paged.at_peak() == pytest.approx([100 * 8 / 12, 100 * 4 / 12, 0.0])
    assert paged.over_time() == pytest.approx([100 * 44 / 56, 100 * 7 / 56, 100 * 5 / 56])
    assert paged.waste_per_sequence() == pytest.approx((1.5, 3.0))
    flat = bench.count(TINY, STEPS, "contiguous", bench.contiguous)
    assert flat.peak_step == 0 and flat.reserved_slots[0] == 32
    assert flat.over_time() == pytest.approx([100 * 44 / 128, 100 * 11 / 128, 100 * 73 / 128])
    doubling = bench.count(TINY, STEPS, "power of two", bench.power_of_two)
    assert doubling.peak_step == 4 and doubling.at_peak() == pytest.approx([56.25, 0, 43.75])


# --- the real workloads --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def workloads():
    return {w.name: (w, bench.measure(w, 8)) for w in (bench.reversal(0), bench.long_prompts(0))}


def test_the_reversal_workload_is_the_tasks(workloads):
    """P = n = L + 1 for L uniform on 1..24 characters: each prompt is its characters and '=',
    each answer the characters reversed and '.'."""
    workload, _ = workloads["reversal"]
    assert len(workload.requests) == 64 and workload.max_seq_len == 128
    assert all(r.prompt == r.answer for r in workload.requests)
    lengths = {r.prompt - 1 for r in workload.requests}
    assert lengths <= set(range(1, task.MAX_CHARS + 1)) and len(lengths) > 12


@pytest.mark.parametrize("name", ["reversal", "long prompts"])
def test_paged_waste_is_under_one_block_per_running_request(workloads, name):
    workload, splits = workloads[name]
    by_name = {s.allocator: s for s in splits}
    for block in bench.BLOCK_SIZES:
        split = by_name[f"paged, block {block}"]
        for (_, ahead, never), running in zip(split.per_step, split.running, strict=True):
            assert ahead + never < block * running
    assert by_name["paged, block 1"].over_time() == [100.0, 0.0, 0.0]
    # The comparison the figure makes: paged at block 16 keeps more of its memory as token
    # state than the power-of-two allocator, which keeps more than the contiguous one.
    token = {s.allocator: s.over_time()[0] for s in splits}
    assert token["paged, block 16"] > token["power of two"] > token["contiguous (max_seq_len)"]


@pytest.mark.parametrize("name", ["reversal", "long prompts"])
def test_the_counts_add_up(workloads, name):
    """Every request runs exactly n steps, never more than 8 at once; the contiguous allocator
    holds max_seq_len per running request; token state is the same whatever the allocator."""
    workload, splits = workloads[name]
    steps = bench.schedule(workload.requests, 8)
    seen = {}
    for running in steps:
        assert len(running) <= 8
        for i, c in running:
            seen.setdefault(i, []).append(c)
    assert sorted(seen) == list(range(64))
    for i, keys in seen.items():
        r = workload.requests[i]
        assert keys == list(range(r.prompt, r.final + 1))
    flat = splits[0]
    assert flat.reserved_slots == [workload.max_seq_len * n for n in flat.running]
    tokens = {tuple(k[0] for k in s.per_step) for s in splits}
    assert len(tokens) == 1


# --- the command ---------------------------------------------------------------------------------

def test_the_command_prints_the_table_and_writes_where_told(tmp_path, capsys):
    assert bench.main(["--out", str(tmp_path / "m.png"), "--json", str(tmp_path / "m.json")]) == 0
    printed = capsys.readouterr().out
    assert "paged, block 16" in printed and "96.3%" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.png"]
    saved = json.loads((tmp_path / "m.json").read_text())
    paged = saved["workloads"]["reversal"]["allocators"]["paged, block 16"]
    assert sum(paged["over_time_percent"]) == pytest.approx(100)


@pytest.mark.parametrize(("argv", "match"), [(["--running", "0"], "must be in [1, 64]"),
                                             (["--out", "x.txt"], "must end in .png"),
                                             (["--json", "missing/x.json"], "does not exist")])
def test_the_command_refuses_bad_arguments(tmp_path, monkeypatch, capsys, argv, match):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench, "measure", lambda *a: pytest.fail("counted before refusing"))
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2 and match in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
