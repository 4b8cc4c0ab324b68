"""A hidden key gets exactly zero weight, whatever the scores: in the readable path, the fast path
and flash attention.

A finite mask constant is not enough. With -1e9 on the hidden scores, a row whose every visible
score is below -1e9 (activations near 1e5) puts its weight on the hidden keys: the future, or
padding. References: a case worked by hand, torch's F.scaled_dot_product_attention with an
explicit bool mask (a hidden key gets exactly 0 there, and a row that sees nothing comes out as
zeros), and the model's own causality (a later token never moves an earlier position).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import random_ids

import fast.model as fast
from attention import causal_mask, grouped_attention, scaled_dot_product_attention
from beyond.flash import flash_attention
from block import GPT, GPTConfig
from tools.references import random_model, torch_attention

FLASH_BLOCKS = (1, 2, 3, 64)


def hand_case() -> tuple[np.ndarray, ...]:
    """q = 1e5 for both queries, k = [-1e5, 1], v = [1, 99], the causal mask; d = 1, so the
    scale is 1. Query 0 sees key 0 only: its one visible score is -1e10, far below -1e9, and it
    must read v[0] = 1. Query 1 sees both: scores [-1e10, 1e5], so it reads v[1] = 99."""
    q = np.full((1, 1, 2, 1), 1e5)  # (B, H, t_q, d)
    k = np.array([-1e5, 1.0]).reshape(1, 1, 2, 1)  # (B, H, t_k, d)
    v = np.array([1.0, 99.0]).reshape(1, 1, 2, 1)
    return q, k, v, causal_mask(2), np.array([1.0, 99.0]).reshape(1, 1, 2, 1)


def readable(q, k, v, mask):
    return scaled_dot_product_attention(q, k, v, mask)[0]


def readable_grouped(q, k, v, mask):
    return grouped_attention(q, k, v, mask)[0]


def fast_attention(q, k, v, mask):
    return fast.attention(q, k, v, mask)[0]


def fast_grouped(q, k, v, mask):
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)  # the model's (1|B, 1, t_q, t_k)
    return fast.grouped_attention(q, k, v, mask, want_weights=True)[0]


PATHS = {"readable": readable, "readable grouped": readable_grouped, "fast": fast_attention,
         "fast grouped": fast_grouped}
PATHS |= {f"flash {b}": (lambda q, k, v, m, b=b: flash_attention(q, k, v, m, block_size=b))
          for b in FLASH_BLOCKS}


@pytest.mark.parametrize("path", list(PATHS))
def test_the_hand_case_reads_only_what_each_query_sees(path):
    q, k, v, mask, expected = hand_case()
    np.testing.assert_array_equal(PATHS[path](q, k, v, mask), expected)


def test_the_hand_case_weights_are_exactly_zero_on_the_future():
    q, k, v, mask, _ = hand_case()
    for _, w in (scaled_dot_product_attention(q, k, v, mask), fast.attention(q, k, v, mask)):
        np.testing.assert_array_equal(w[0, 0], [[1.0, 0.0], [0.0, 1.0]])


def long_case(t: int = 200, last_blind: int = 130) -> tuple[np.ndarray, ...]:
    """t queries (more than one of the fast path's query blocks of 128) worked by hand: every
    query is 1e5 (d = 1), keys 0..last_blind are -1e5, the later ones 1. Query i <= last_blind
    sees only scores of -1e10, all equal: it reads the mean of v[0..i]. A later query sees scores
    of 1e5 on keys last_blind + 1 .. i, which take all of its weight: the mean of those values."""
    q = np.full((1, 1, t, 1), 1e5)
    k = np.where(np.arange(t) <= last_blind, -1e5, 1.0).reshape(1, 1, t, 1)
    v = np.arange(t, dtype=np.float64).reshape(1, 1, t, 1) ** 2
    values = v[0, 0, :, 0]
    expected = [values[:i + 1].mean() if i <= last_blind else values[last_blind + 1:i + 1].mean()
                for i in range(t)]
    return q, k, v, causal_mask(t), np.array(expected).reshape(1, 1, t, 1)


@pytest.mark.parametrize("path", list(PATHS))
def test_a_long_case_across_query_blocks_reads_only_what_each_query_sees(path):
    q, k, v, mask, expected = long_case()
    np.testing.assert_allclose(PATHS[path](q, k, v, mask), expected, rtol=1e-12, atol=0)


def huge_case(seed: int) -> tuple[np.ndarray, ...]:
    """q, k, v of 2 rows, 2 heads, 150 queries (two query blocks) after 30 cached keys, and a
    random bool mask with whole rows hidden (a pad query before any real token). Entries near
    1e5, and q . k < 0 except for every 23rd key: a query that sees none of those has only
    scores far below -1e9."""
    rng = np.random.default_rng(seed)
    t_q, t_k, d = 150, 180, 4
    q = np.abs(rng.standard_normal((2, 2, t_q, d))) * 1e5
    k = -np.abs(rng.standard_normal((2, 2, t_k, d))) * 1e5
    k[..., ::23, :] *= -1
    v = rng.standard_normal((2, 2, t_k, d))
    mask = causal_mask(t_q, t_k) & (rng.random((2, 1, t_q, t_k)) < 0.5)
    mask[0, 0, :7] = False  # row 0's first 7 queries see nothing
    return q, k, v, mask


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("path", list(PATHS))
def test_every_path_equals_torch_sdpa_with_an_explicit_bool_mask_at_huge_scores(path, seed):
    """torch gives a hidden key exactly zero and a row that sees nothing zeros. Scores near 1e10
    are rounded to about 1e-6 in float64, so each weight may differ by that factor."""
    q, k, v, mask = huge_case(seed)
    expected, _ = torch_attention(q, k, v, mask)
    np.testing.assert_allclose(PATHS[path](q, k, v, mask), expected, rtol=0, atol=1e-5)
    assert (expected[0, :, :7] == 0).all()


def test_a_row_that_sees_nothing_is_zeros_and_its_weights_too():
    """A pad query before any real token: nothing to read, so nothing is read (torch >= 2.5
    gives the same), never NaN, and the other rows are untouched by it."""
    q, k, v, mask = huge_case(0)
    for out, w in (scaled_dot_product_attention(q, k, v, mask), fast.attention(q, k, v, mask)):
        assert (out[0, :, :7] == 0).all() and (w[0, :, :7] == 0).all()
        assert np.isfinite(out).all() and np.isfinite(w).all()


# --- in a model: a later token never moves an earlier position -----------------------------------

def huge_model(fast_path: bool) -> GPT:
    """Weights of std 1e4: queries and keys near 1e5, scores far below -1e9 in some rows."""
    config = GPTConfig(vocab_size=32, max_seq_len=16, d_model=16, n_heads=4, n_layers=2,
                       init_std=1e4)
    return random_model(config, seed=1, dtype="float64", fast=fast_path)


@pytest.mark.parametrize("path", ["readable", "fast", "fast with flash"])
def test_changing_token_3_leaves_positions_0_to_2_exactly_unchanged(monkeypatch, path):
    """A hidden key contributes exactly 0 * v = 0, so positions 0-2 run the same arithmetic on the
    same numbers whatever token 3 is: equal, not close. With -1e9 they moved by up to 8e3."""
    if path == "fast with flash":
        monkeypatch.setattr(fast, "FLASH_FROM", 1)  # every call through attention_in_tiles
    model = huge_model(path != "readable")
    x = random_ids(0, 4, 8, vocab=32)
    y = x.copy()
    y[:, 3] = (y[:, 3] + 1) % 32
    a, b = model(x), model(y)
    assert np.isfinite(a).all() and np.abs(a).max() > 1e4  # huge, and finite
    np.testing.assert_array_equal(a[:, :3], b[:, :3])
    assert np.abs(a[:, 3:] - b[:, 3:]).max() > 1  # token 3 itself does matter
