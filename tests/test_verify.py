"""The harness is tested too: the clean code passes every check, every injected bug is caught by
some check, the real functions are back afterwards, and a broken run makes main() exit non-zero.

The gallery is run once per session (a module fixture) and shared by the tests that read it.
"""

from __future__ import annotations

import numpy as np
import pytest

import attention
import block
import cache
import verify
from parts import rope


@pytest.fixture(scope="module")
def gallery() -> tuple[list[verify.Result], list[verify.GalleryRow]]:
    return verify.run_failure_modes()


def failed_numbers(results: list[verify.Result]) -> list[int]:
    return [r.number for r in results if not r.passed]


def test_clean_implementation_passes_every_check(gallery):
    clean, _ = gallery
    assert [r.number for r in clean] == list(range(1, 19))
    assert failed_numbers(clean) == [], [(r.number, r.detail) for r in clean if not r.passed]
    for r in clean:  # a pass is a measured error within its tolerance, not a shrug
        assert r.error <= r.tol, (r.number, r.error, r.tol)


def test_every_failure_mode_is_caught(gallery):
    _, rows = gallery
    assert [row.mode for row in rows] == [mode.name for mode in verify.FAILURE_MODES]
    assert len(rows) >= 14
    missed = [row.mode for row in rows if not row.caught_by]
    assert missed == []


# Which check must catch which bug: the check built for it. (Others may catch it too.)
EXPECTED_CATCHERS = {
    "no causal mask": {1, 8},
    "mask applied after softmax": {1},
    "mask upper triangle (flipped)": {1, 8},
    "K not transposed in scores": {4, 5},
    "split heads: reshape, no transpose": {4, 6, 7},
    "merge heads: reshape, no transpose": {4, 6, 7},
    "forgot the merge step": {2},
    "cache concatenated on heads axis": {3, 9},
    "caching queries instead of keys": {3, 4},
    "decode positions restart at 0": {2, 3},
    "stale cache: reset() keeps length": {3},
    "scores scaled by d_model, not sqrt": {1, 4, 5, 7},  # not 6: the exercise scores inline
    "RoPE decode position restarts at 0": {3, 9},
    "rolling buffer wraps one slot off": {14},
    "paged gather reads past a row's end": {18},
}


def test_each_bug_is_caught_by_the_check_built_for_it(gallery):
    _, rows = gallery
    by_mode = {row.mode: set(row.caught_by) for row in rows}
    assert set(EXPECTED_CATCHERS) == set(by_mode)
    for mode, expected in EXPECTED_CATCHERS.items():
        assert expected <= by_mode[mode], (mode, sorted(by_mode[mode]))


def test_symptoms_name_what_went_wrong(gallery):
    _, rows = gallery
    symptom = {row.mode: row.symptom for row in rows}
    assert "future key" in symptom["no causal mask"]
    assert "row sum" in symptom["mask applied after softmax"]
    assert "(2, 4, 8, 32), expected (2, 8, 128)" in symptom["forgot the merge step"]
    assert "reset()" in symptom["stale cache: reset() keeps length"]


def test_real_functions_are_back_after_the_gallery(gallery):
    assert block.mask_from_positions is attention.mask_from_positions
    assert attention.causal_mask.__module__ == "attention"
    for module, name in ((attention, "scaled_dot_product_attention"),
                         (attention, "split_heads"), (attention, "merge_heads"),
                         (attention, "multi_head_attention"), (attention, "mask_from_positions"),
                         (block, "mask_from_positions"), (block, "rope_angles"),
                         (rope, "rope_angles"), (cache, "number_tokens")):
        assert getattr(module, name).__module__ in ("attention", "block", "cache",
                                                    "parts.rope"), name
    assert cache.KVCache.update.__module__ == "cache"
    assert cache.ModelCache.reset.__module__ == "cache"
    assert not np.array_equal(attention.causal_mask(3), np.ones((3, 3), bool))


def test_injection_is_undone_even_when_the_run_raises():
    real = attention.mask_from_positions
    broken = verify.positions_mask_missing
    with pytest.raises(RuntimeError), verify.injected(verify.everywhere(real, broken)):
        assert block.mask_from_positions is broken  # both names were swapped
        raise RuntimeError("a check blew up")
    assert attention.mask_from_positions is real and block.mask_from_positions is real


def test_a_broken_run_exits_non_zero(capsys):
    with verify.injected(verify.everywhere(attention.causal_mask, verify.mask_upper)):
        code = verify.main(["--only", "1", "8"])
    out = capsys.readouterr().out
    assert code == 1
    assert out.count("FAIL") == 2


def test_a_crashing_check_is_a_failure_not_an_exception(capsys):
    with verify.injected(verify.everywhere(attention.merge_heads, verify.merge_forgotten)):
        code = verify.main(["--only", "4"])
    out = capsys.readouterr().out
    assert code == 1
    assert "crashed: ValueError" in out


def test_clean_main_output_fits_80_columns(capsys):
    assert verify.main(["--only", "1", "2", "5", "--verbose"]) == 0
    out = capsys.readouterr().out
    assert all(len(line) <= verify.WIDTH for line in out.splitlines())
    assert "3/3 checks passed" in out
    assert "trap: is_causal=True" in out  # the trap is shown, and is not a failure


def test_gallery_exits_non_zero_when_a_bug_goes_undetected(capsys):
    # Check 1 alone cannot see a stale cache, so the gallery must report it and fail.
    code = verify.main(["--failure-modes", "--only", "1"])
    out = capsys.readouterr().out
    assert code == 1
    assert "NOT CAUGHT" in out


def test_only_runs_each_check_once(capsys):
    assert verify.main(["--only", "1", "1", "5"]) == 0
    out = capsys.readouterr().out
    assert "2/2 checks passed" in out and out.count(" mask ") == 1
