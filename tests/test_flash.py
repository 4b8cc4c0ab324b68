"""beyond/flash.py: online-softmax attention equals the readable attention, without its weights;
its command, tools/flash.py, prints the trace of one row and draws only where told.

References are independent of the code under test: the readable attention.py (which forms the
weights), torch's F.scaled_dot_product_attention, hand-worked block counts and a hand-worked
running max, and tracemalloc for the memory bound.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attention
from beyond import flash
from beyond.flash import flash_attention
from tools import flash as flash_command
from tools.measure import peak_bytes
from tools.references import rule_mask

TOL64 = 1e-12
BLOCK_SIZES = (1, 3, 7, "t_k", "past t_k")


def randn(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape)


def padded_causal(real: list[int], t: int) -> np.ndarray:
    """(B, 1, t, t): left padding (row b's first t - real[b] keys hidden) AND the causal rule.
    A padded query sees only padded keys, so its row is all hidden."""
    padding = np.array([[j >= t - n for j in range(t)] for n in real])[:, None, None, :]
    return padding & rule_mask(t, t)  # (B, 1, 1, t) & (t, t) -> (B, 1, t, t)


def cases() -> dict[str, tuple[np.ndarray, ...]]:
    """name -> (q, k, v, mask, expected out), float64; expected from the readable attention."""
    rng = np.random.default_rng(0)
    B, H, d = 2, 3, 8
    found = {}

    def add(name, q, k, v, mask, expected=None):
        if expected is None:
            expected = attention.scaled_dot_product_attention(q, k, v, mask)[0]
        found[name] = (q, k, v, mask, expected)

    def qkv(t_q, t_k, d_v=d):
        return randn(rng, B, H, t_q, d), randn(rng, B, H, t_k, d), randn(rng, B, H, t_k, d_v)

    add("square", *qkv(10, 10), rule_mask(10, 10))
    add("bottom-right 3 after 7", *qkv(3, 7), rule_mask(3, 7))
    add("bottom-right 1 after 40", *qkv(1, 40, d_v=5), rule_mask(1, 40))
    add("single query", *qkv(1, 1), rule_mask(1, 1))
    add("padded", *qkv(9, 9), padded_causal([9, 5], 9))
    add("no mask", *qkv(5, 11), None)
    blind = rule_mask(6, 6).copy()
    blind[2] = False  # query 2 may see nothing: zeros in the readable path
    add("all-masked row", *qkv(6, 6), blind)
    # grouped-query: 2 K/V heads, each shared by 3 query heads through a broadcast axis, against
    # the readable grouped_attention (which repeats the K/V heads)
    H_kv, G, t = 2, 3, 8
    q = randn(rng, B, H_kv, G, t, d)  # (B, H_kv, G, t, d): query head h_kv * G + g
    k, v = randn(rng, B, H_kv, 1, t, d), randn(rng, B, H_kv, 1, t, d)  # one K/V per group
    expected = attention.grouped_attention(q.reshape(B, H_kv * G, t, d), k[:, :, 0], v[:, :, 0],
                                           rule_mask(t, t))[0]  # (B, H_kv * G, t, d)
    add("GQA", q, k, v, rule_mask(t, t), expected.reshape(B, H_kv, G, t, d))
    return found


CASES = cases()


def block(size: int | str, t_k: int) -> int:
    return {"t_k": t_k, "past t_k": t_k + 5}.get(size, size)


@pytest.mark.parametrize("size", BLOCK_SIZES)
@pytest.mark.parametrize("name", list(CASES))
def test_equals_the_readable_attention_in_float64(name, size):
    q, k, v, mask, expected = CASES[name]
    out = flash_attention(q, k, v, mask, block_size=block(size, k.shape[-2]))
    assert out.shape == expected.shape and out.dtype == np.float64
    assert np.abs(out - expected).max() <= TOL64


def test_all_masked_row_is_zeros_as_in_the_readable_path_and_torch():
    # every score -inf: the recurrence keeps m = -inf, l = 0, acc = 0, and 0 / 1 = 0, never NaN
    q, k, v, mask, _ = CASES["all-masked row"]
    expected = torch.nn.functional.scaled_dot_product_attention(
        *(torch.from_numpy(a) for a in (q, k, v)), attn_mask=torch.from_numpy(mask)).numpy()
    assert (expected[:, :, 2] == 0).all()
    for size in (1, 4, 6):
        out = flash_attention(q, k, v, mask, block_size=size)
        assert (out[:, :, 2] == 0).all()
        assert np.abs(out - expected).max() <= TOL64


def test_hidden_keys_get_exactly_zero_weight_in_a_mixed_row():
    # query 4 of 10 (square causal) sees keys 0..4: the values of keys 5..9 must not matter at all
    q, k, v, mask, _ = CASES["square"]
    moved = v.copy()
    moved[..., 5:, :] += 1e6
    for size in (1, 3, 10):
        a, b = (flash_attention(q, k, x, mask, block_size=size) for x in (v, moved))
        assert np.array_equal(a[..., :5, :], b[..., :5, :])


def test_float32_agrees_to_rounding_and_float16_is_scored_in_float32():
    q, k, v, mask, expected = CASES["padded"]
    for dtype, rtol in ((np.float32, 1e-6), (np.float16, 1e-3)):
        args = [a.astype(dtype) for a in (q, k, v)]
        out = flash_attention(*args, mask, block_size=3)
        readable = attention.scaled_dot_product_attention(*args, mask)[0]
        assert out.dtype == dtype
        scale = np.abs(expected).max()
        # within rounding of the float64 answer, and as close to it as the readable path is
        assert np.abs(out - expected).max() <= 2 * np.abs(readable - expected).max() + rtol * scale
        assert np.abs(out.astype(float) - readable).max() <= 2 * rtol * scale


def test_equals_torch_sdpa_with_an_explicit_bottom_right_mask():
    rng = np.random.default_rng(5)
    for t_q, t_k in ((6, 6), (3, 7), (1, 40)):
        q, k, v = randn(rng, 2, 4, t_q, 16), randn(rng, 2, 4, t_k, 16), randn(rng, 2, 4, t_k, 16)
        allowed = rule_mask(t_q, t_k)
        expected = torch.nn.functional.scaled_dot_product_attention(
            *(torch.from_numpy(a) for a in (q, k, v)), attn_mask=torch.from_numpy(allowed))
        out = flash_attention(q, k, v, allowed, block_size=4)
        assert np.abs(out - expected.numpy()).max() <= TOL64


@settings(max_examples=30, deadline=None)
@given(t_q=st.integers(1, 9), extra=st.integers(0, 9), size=st.integers(1, 12),
       seed=st.integers(0, 2**16), blind_rows=st.booleans())
def test_random_masks_and_blocks_equal_the_readable_path(t_q, extra, size, seed, blind_rows):
    rng = np.random.default_rng(seed)
    t_k = t_q + extra
    q, k, v = randn(rng, 2, t_q, 4), randn(rng, 2, t_k, 4), randn(rng, 2, t_k, 3)
    mask = rng.random((2, t_q, t_k)) < 0.4  # any pattern at all, not causal
    if blind_rows:
        mask[rng.integers(2), rng.integers(t_q)] = False
    expected = attention.scaled_dot_product_attention(q, k, v, mask)[0]
    assert np.abs(flash_attention(q, k, v, mask, block_size=size) - expected).max() <= TOL64


# --- the recurrence itself ----------------------------------------------------------------------

def test_a_wrong_rescale_is_caught(monkeypatch):
    # exp(m_new - m_old) instead of exp(m_old - m_new), or no rescale at all: the tests above
    # would fail. A single block needs no rescale and is unaffected by the second bug.
    q, k, v, mask, expected = CASES["square"]
    for wrong in (lambda old, new: np.exp(new - old), lambda old, new: np.ones_like(new)):
        monkeypatch.setattr(flash, "rescale_factor", wrong)
        with np.errstate(all="ignore"):
            out = flash_attention(q, k, v, mask, block_size=3)
        assert not np.abs(out - expected).max() <= TOL64  # wrong, or NaN
    monkeypatch.undo()
    assert np.abs(flash_attention(q, k, v, mask, block_size=3) - expected).max() <= TOL64


def test_the_trace_matches_a_hand_worked_running_max():
    # SHOW_SCORES block maxima are 1.2, 2.1, 1.5, 3.0: m goes -inf, 1.2, 2.1, 2.1, 3.0
    steps = flash_command.trace_row(flash_command.SHOW_SCORES, np.eye(16),
                                   flash_command.SHOW_BLOCK)
    assert [s["m_new"] for s in steps] == [1.2, 2.1, 2.1, 3.0]
    factors = [s["rescale"] for s in steps]
    assert factors[0] == 0.0 and factors[2] == 1.0
    assert factors[1] == pytest.approx(math.exp(-0.9), abs=1e-15)
    assert factors[3] == pytest.approx(math.exp(-0.9), abs=1e-15)
    scores = flash_command.SHOW_SCORES
    assert steps[-1]["l_new"] == pytest.approx(np.exp(scores - 3.0).sum(), rel=1e-15)
    # v = I: the output is the weights themselves
    assert np.abs(steps[-1]["out"] - attention.softmax(scores)).max() <= 1e-15


# --- the blocks it skips -------------------------------------------------------------------------

def visits(monkeypatch, q, k, v, mask, size) -> int:
    """How many (query tile, key block) steps flash_attention runs."""
    count = {"steps": 0}
    step = flash.online_softmax_step

    def counting(*args):
        count["steps"] += 1
        return step(*args)

    monkeypatch.setattr(flash, "online_softmax_step", counting)
    flash_attention(q, k, v, mask, block_size=size)
    monkeypatch.undo()
    return count["steps"]


def test_blocks_hidden_by_the_causal_mask_are_skipped(monkeypatch):
    rng = np.random.default_rng(1)
    q, k, v = randn(rng, 1, 2, 8, 4), randn(rng, 1, 2, 8, 4), randn(rng, 1, 2, 8, 4)
    # 8 x 8 causal in 2 x 2 tiles: query tile i needs key blocks 0..i -> 1 + 2 + 3 + 4 = 10 of 16
    assert visits(monkeypatch, q, k, v, rule_mask(8, 8), 2) == 10
    assert visits(monkeypatch, q, k, v, None, 2) == 16
    # read off the mask: each query sees itself and the FUTURE -> tile i needs blocks i..3
    future = ~rule_mask(8, 8) | np.eye(8, dtype=bool)
    assert visits(monkeypatch, q, k, v, future, 2) == 10
    # 3 queries after 7 keys (absolute positions 4, 5, 6), blocks of 2: tile {4, 5} needs keys
    # 0..5 (3 blocks), tile {6} keys 0..6 (4 blocks) -> 7 of 8
    assert visits(monkeypatch, q[..., :3, :], k[..., :7, :], v[..., :7, :], rule_mask(3, 7),
                  2) == 7
    # a query that sees nothing needs no block (its row is zeros): tile {0, 1} visits the one
    # block query 1 needs; with query 1 blind too, tile 0 visits none
    blind = rule_mask(8, 8).copy()
    blind[0] = False
    assert visits(monkeypatch, q, k, v, blind, 2) == 1 + 2 + 3 + 4
    blind[1] = False
    assert visits(monkeypatch, q, k, v, blind, 2) == 0 + 2 + 3 + 4
    out = flash_attention(q, k, v, blind, block_size=2)
    assert (out[..., :2, :] == 0).all() and np.isfinite(out).all()


# --- memory --------------------------------------------------------------------------------------

peak = peak_bytes  # tracemalloc's peak while a call runs


def test_never_allocates_a_query_by_key_array():
    # t = 2048: one (t_q, t_k) float64 array is 32 MiB, even a bool one 4 MiB. The whole call
    # (output, scaled queries, tiles, the mask's per-tile reductions) stays under 1 MiB.
    rng = np.random.default_rng(2)
    t, d = 2048, 16
    q, k, v = randn(rng, 1, 1, t, d), randn(rng, 1, 1, t, d), randn(rng, 1, 1, t, d)
    mask = rule_mask(t, t)[None, None]
    flash_peak = peak(lambda: flash_attention(q, k, v, mask, block_size=64))
    assert flash_peak < t * t // 4, f"{flash_peak} B"
    # the yardstick can fail: the readable path forms the weights
    readable_peak = peak(lambda: attention.scaled_dot_product_attention(q, k, v, mask))
    assert readable_peak > t * t * 8
    # and the flash peak grows linearly: half the tokens, about half the memory
    half = peak(lambda: flash_attention(q[..., :t // 2, :], k[..., :t // 2, :],
                                        v[..., :t // 2, :], mask[..., :t // 2, :t // 2], 64))
    assert flash_peak < 2.5 * half


def test_decode_against_a_long_cache_holds_one_block_of_scores():
    rng = np.random.default_rng(3)
    t_k = 200_000
    q, k, v = randn(rng, 1, 4, 1, 8), randn(rng, 1, 4, t_k, 8), randn(rng, 1, 4, t_k, 8)
    # readable weights would be 4 * 200_000 * 8 B = 6.4 MB; the mask's (t_k,) reductions 200 KB
    assert peak(lambda: flash_attention(q, k, v, rule_mask(1, t_k), block_size=256)) < 1_000_000


# --- refusals ------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, -3, True, 2.0, "4", None])
def test_bad_block_size_is_refused_by_name_before_any_work(monkeypatch, size):
    def no_work(*args):
        raise AssertionError("work started")

    monkeypatch.setattr(flash, "attend_tile", no_work)
    q, k, v, mask, _ = CASES["square"]
    with pytest.raises(ValueError, match=f"block_size must be a positive int, got {size!r}"):
        flash_attention(q, k, v, mask, block_size=size)


def test_bad_inputs_are_refused_as_the_readable_path_refuses_them(monkeypatch):
    monkeypatch.setattr(flash, "attend_tile", lambda *a: pytest.fail("work started"))
    q, k, v, mask, _ = CASES["square"]
    bad = [((q.astype(int), k, v, mask), TypeError, "q must be a float array"),
           ((q, k.astype(np.float32), v, mask), TypeError, "share one dtype"),
           ((q, k[..., :5], v, mask), ValueError, "need q"),
           ((q, k, v, mask.astype(float)), TypeError, "mask must be bool"),
           ((q, k, v, rule_mask(10, 9)), ValueError, "does not broadcast")]
    for args, error, words in bad:
        with pytest.raises(error, match=words):
            flash_attention(*args)
        with pytest.raises(error, match=words):
            attention.scaled_dot_product_attention(*args)


# --- the command ---------------------------------------------------------------------------------

def test_show_prints_the_trace_and_draws_only_where_told(tmp_path, capsys, monkeypatch):
    default = tmp_path / "default.png"
    monkeypatch.setattr(flash_command, "DEFAULT_PNG", default)
    assert flash_command.main(["--show"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    # the last block raises m from 2.1 to 3.0: factor exp(-0.9)
    assert ["3", "12-15", "3.0000", "2.1000", "->", "3.0000", f"{math.exp(-0.9):.6f}"] in [
        row[:7] for row in rows]
    assert not default.exists()
    assert flash_command.main(["--show", "--draw"]) == 0
    assert default.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = tmp_path / "trace.png"
    assert flash_command.main(["--show", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- the fast path's use of it (fast/model.py TRICKS["flash"]) -----------------------------------

@pytest.mark.parametrize("variant", ["mha", "gqa", "rope_gqa"])
def test_the_fast_path_with_flash_prefill_equals_the_readable_model(monkeypatch, variant):
    from conftest import small_model

    import generate
    from fast import model as fastpath

    calls = {"n": 0}
    inner = fastpath.attention_in_tiles

    def counting(*args):
        calls["n"] += 1
        return inner(*args)

    monkeypatch.setattr(fastpath, "FLASH_FROM", 4)  # the small model's prompts take flash
    monkeypatch.setattr(fastpath, "attention_in_tiles", counting)
    rng = np.random.default_rng(7)
    ids, real = generate.left_pad([rng.integers(0, 64, n) for n in (20, 13)])
    readable, engine = small_model(variant), small_model(variant, fast=True)
    expected = readable(ids, attention_mask=real)
    out = engine(ids, attention_mask=real)
    assert calls["n"] == 2  # both layers
    assert np.abs(out - expected).max() <= 1e-10
