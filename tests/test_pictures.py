"""pictures.py draws from the real code; each picture is read back here and held against an
independent reference (the rule written by hand), so a picture cannot show a wrong mask."""

from __future__ import annotations

import re

import numpy as np
import pytest

from tools import pictures
from tools.references import rule_mask


def grids(text: str) -> list[np.ndarray]:
    """Every 1/. grid in a picture, as bool arrays (side-by-side grids come back in order)."""
    found, current = [], None
    for line in text.splitlines():
        runs = re.findall(r"(?:[1.] ){2,}[1.]", line)  # "1 1 . ." runs, not labels like "pos 1"
        if runs:
            current = current or [[] for _ in runs]
            for store, run in zip(current, runs, strict=True):
                store.append([c == "1" for c in run.split()])
        elif current is not None:
            found += [np.array(g) for g in current]
            current = None
    return found + ([np.array(g) for g in current] if current else [])


def test_mask_picture_is_the_rule_beside_the_top_left_trap():
    right, wrong = grids(pictures.mask_picture(3, 7))
    np.testing.assert_array_equal(right, rule_mask(3, 7))
    np.testing.assert_array_equal(wrong, np.tril(np.ones((3, 7), dtype=bool)))
    assert not np.array_equal(right, wrong)


def test_heads_picture_gives_each_head_its_columns_of_every_token():
    text = pictures.heads_picture(T=3, H=2, d_head=2)
    right = text.split("reshape straight")[0]
    assert "head 0: 0.0 0.1  1.0 1.1  2.0 2.1" in right  # dims 0, 1 of tokens 0, 1, 2
    assert "head 1: 0.2 0.3  1.2 1.3  2.2 2.3" in right
    wrong = text.split("reshape straight")[1]
    assert "head 0: 0.0 0.1  0.2 0.3  1.0 1.1" in wrong  # token 0 whole, then token 1


def test_cache_picture_grows_by_the_prompt_then_one_per_step():
    lines = [line for line in pictures.cache_picture(8, 4, 2).splitlines()
             if line.split()[-2:-1] == ["length"]]
    assert [int(line.split()[-1]) for line in lines] == [0, 4, 5, 6]
    held = [c for c in lines[-1].split() if c.startswith("k")]
    assert held == ["k0", "k1", "k2", "k3", "k4", "k5"]


def test_padding_picture_counts_real_tokens_and_hides_pads():
    text = pictures.padding_picture((3, 5))
    masks = grids(text)
    assert len(masks) == 2
    real = np.array([0, 0, 1, 1, 1], dtype=bool)
    np.testing.assert_array_equal(masks[0], rule_mask(5, 5) & real[None, :] & real[:, None])
    np.testing.assert_array_equal(masks[1], rule_mask(5, 5))
    row0 = text.split("row 1")[0]
    assert [line.split()[1] for line in row0.splitlines() if line.startswith("pos")] == \
        ["0", "1", "2"]


def test_gqa_picture_is_h_over_g():
    text = pictures.gqa_picture(H=6, H_kv=2)
    read = [int(line.split()[-1]) for line in text.splitlines()
            if line.startswith("query head") and "->" in line]
    assert read == [h // 3 for h in range(6)]


def test_timeline_is_one_prefill_then_one_token_per_step():
    lines = pictures.timeline_picture(prompt=5, steps=3).splitlines()[1:5]
    assert [line.split("(")[1].split(")")[0] for line in lines] == ["5, 5", "1, 6", "1, 7",
                                                                     "1, 8"]
    assert [int(line.split()[-1]) for line in lines] == [5, 6, 7, 8]


@pytest.mark.parametrize("name", sorted(pictures.PICTURES))
def test_the_command_prints_each_picture(capsys, name):
    assert pictures.main([name]) == 0
    assert capsys.readouterr().out == f"== {name} ==\n{pictures.PICTURES[name]()}\n\n"
