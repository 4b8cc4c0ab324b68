"""Bad input, tried as a hostile user would: no silent wrong answer, no raw NumPy error.

Each group is one class of defect. The first test of a group is the reported case; the others are
members of the same class found by looking for it. Every refusal names the argument and is raised
before any work, so a cache that refuses is left byte for byte as it was.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import cache_state, random_ids, small_model

import attention
from attention import (
    AttentionParams,
    causal_mask,
    grouped_attention,
    layer_norm,
    merge_heads,
    multi_head_attention,
    scaled_dot_product_attention,
    softmax,
    split_heads,
)
from beyond.flash import flash_attention
from beyond.int8 import attention_error_bound, quantize
from block import GPT
from cache import KVCache, ModelCache
from generate import generate_cached, generate_naive, prefill
from parts import checks, sampling
from parts.rope import apply_rope, rope_angles

# --- narrowing casts into the cache --------------------------------------------------------------


def test_a_value_too_large_for_a_float16_cache_is_refused_not_stored_as_inf():
    """The reported case: 7e4 added to a bias of V, then a prefill into a float16 cache. The
    naive logits stay finite; the cached call must refuse (and leave the cache as it was), not
    return NaN logits from an inf in the cache."""
    model = small_model(dtype="float32")
    named = model.named_weights()
    named["h.0.attn.b_v"] = named["h.0.attn.b_v"] + 7e4
    loud = GPT(model.config, weights=named)
    ids = random_ids(0, 1, 5)
    assert np.isfinite(loud(ids)).all()
    cache = loud.new_cache(1, dtype="float16")
    before = cache_state(cache)
    with pytest.raises(ValueError, match="v holds values up to 7.*float16.*inf"):
        loud(ids, cache)
    assert cache_state(cache) == before


@pytest.mark.parametrize("fast", [False, True], ids=["readable", "fast"])
def test_both_paths_refuse_the_overflowing_cache_write(fast):
    model = small_model(dtype="float32", fast=fast)
    named = model.named_weights()
    named["h.1.attn.b_k"] = named["h.1.attn.b_k"] + 1e5
    loud = type(model)(model.config, weights=named)
    cache = loud.new_cache(2, dtype="float16")
    with pytest.raises(ValueError, match="k holds values"):
        prefill(loud, random_ids(1, 2, 4), cache)
    assert len(cache) == 0 and all(len(kv) == 0 for kv in cache.layers)


def test_float64_into_a_float32_cache_past_its_range_is_refused():
    kv = KVCache(1, 1, 4, 2, np.float32)
    big = np.full((1, 1, 1, 2), 1e39)
    with pytest.raises(ValueError, match="beyond float32's largest"):
        kv.append(big, big)
    assert len(kv) == 0 and not kv.keys.any()
    fine = np.full((1, 1, 1, 2), 1e38)  # in range: stored, rounded to float32
    keys, _ = kv.append(fine, fine)
    assert keys.dtype == np.float32 and np.isfinite(keys).all()


def test_integers_too_large_for_float16_are_refused_too():
    kv = KVCache(1, 1, 4, 2, np.float16)
    with pytest.raises(ValueError, match="float16"):
        kv.append(np.full((1, 1, 1, 2), 70000), np.zeros((1, 1, 1, 2), dtype=np.int64))


# --- a refused truncate has cut nothing ----------------------------------------------------------

def test_a_refused_truncate_cuts_no_layer():
    """The reported case: layer 1 reset by hand, then truncate(3) on [5, 0]: refused, and layer
    0 still holds 5."""
    model = small_model()
    cache = model.new_cache(2)
    prefill(model, random_ids(2, 2, 5), cache)
    cache.layers[1].reset()
    before = cache_state(cache)
    with pytest.raises(ValueError, match=r"ModelCache.truncate: length must be an int in \[0, 0\]"):
        cache.truncate(3)
    assert cache_state(cache) == before and [len(kv) for kv in cache.layers] == [5, 0]
    cache.truncate(0)  # what every layer still holds: allowed
    assert [len(kv) for kv in cache.layers] == [0, 0]


# --- a cache belongs to the model that filled it -------------------------------------------------

def test_a_cache_filled_by_one_model_is_refused_by_another():
    """The reported case: two models of the same shapes; B decoding on A's cache was silently
    off by 3.5. Refused, naming the cache; after reset() B may use it."""
    a, b = small_model(), GPT(small_model().config, seed=7, dtype="float64")
    cache = a.new_cache(2)
    prefill(a, random_ids(3, 2, 4), cache)
    before = cache_state(cache)
    with pytest.raises(ValueError, match="did not compute"):
        b(random_ids(4, 2, 1), cache)
    assert cache_state(cache) == before
    cache.reset()
    logits = b(random_ids(3, 2, 4), cache)
    np.testing.assert_allclose(logits, b(random_ids(3, 2, 4)), rtol=0, atol=1e-12)


def test_one_kv_cache_given_for_two_layers_is_refused():
    kv = KVCache(1, 4, 8, 8)
    with pytest.raises(ValueError, match="layer 1 is the same object as an earlier layer"):
        ModelCache([kv, kv])
    with pytest.raises(TypeError, match="layer 0 must be a layer cache"):
        ModelCache([object()])


# --- large allocations are sized first -----------------------------------------------------------

def test_a_logits_buffer_larger_than_memory_is_refused_before_any_work(monkeypatch, model_calls):
    """The (B, N, V) logits of a generation are sized up front, with the repo's own refusal
    rather than a raw MemoryError half-way."""
    model = small_model()  # built first: alone, the test would refuse the model itself
    monkeypatch.setattr(checks, "available_memory", lambda: 10_000)
    monkeypatch.setattr(checks, "SMALL_ALLOCATION", 0)  # every size asks
    for generate in (generate_naive, generate_cached):
        with pytest.raises(ValueError, match="logits of 3 rows x 20 steps x 64 tokens needs"):
            generate(model, random_ids(5, 3, 4), 20)
    assert model_calls == {"forward": 0, "new_cache": 0}


def test_a_forward_larger_than_memory_is_refused_before_it_runs(monkeypatch, model_calls):
    model = small_model()
    monkeypatch.setattr(checks, "available_memory", lambda: 1_000)
    monkeypatch.setattr(checks, "SMALL_ALLOCATION", 0)  # every size asks
    with pytest.raises(ValueError, match="a forward of 2 x 9 tokens needs"):
        model(random_ids(6, 2, 9))
    assert model_calls["forward"] == 0


# --- every mask shape the docs promise -----------------------------------------------------------

def random_params(D: int = 16, H: int = 4, H_kv: int = 2) -> AttentionParams:
    rng = np.random.default_rng(9)
    d = D // H
    return AttentionParams(rng.standard_normal((D, D)), rng.standard_normal(D),
                           rng.standard_normal((D, H_kv * d)), rng.standard_normal(H_kv * d),
                           rng.standard_normal((D, H_kv * d)), rng.standard_normal(H_kv * d),
                           rng.standard_normal((D, D)), rng.standard_normal(D), H, H_kv)


@pytest.mark.parametrize("shape", ["(T, T)", "(1, 1, T, T)", "(B, 1, T, T)", "(B, H, T, T)"])
def test_the_model_layer_takes_every_broadcastable_mask(shape):
    """The reported case: multi_head_attention(x, p, causal_mask(8)), the (T, T) mask of the
    README's shape table, died in a reshape. Every shape that broadcasts gives the same answer."""
    p = random_params()
    x = np.random.default_rng(1).standard_normal((2, 8, 16))
    square = causal_mask(8)
    mask = {"(T, T)": square, "(1, 1, T, T)": square[None, None],
            "(B, 1, T, T)": np.broadcast_to(square, (2, 1, 8, 8)),
            "(B, H, T, T)": np.broadcast_to(square, (2, 4, 8, 8))}[shape]
    out, weights = multi_head_attention(x, p, mask)
    expected, _ = multi_head_attention(x, p, square[None, None])
    np.testing.assert_array_equal(out, expected)
    assert np.all(np.triu(weights, k=1) == 0)


def test_a_one_dimensional_key_mask_broadcasts_too():
    """A (t_k,) mask hides the same keys from every query."""
    rng = np.random.default_rng(2)
    q, k, v = rng.standard_normal((3, 2, 5, 4))
    keys = np.array([True, False, True, True, False])
    out, weights = scaled_dot_product_attention(q, k, v, keys)
    assert np.all(weights[..., ~keys] == 0)
    expected, _ = scaled_dot_product_attention(q, k, v, np.broadcast_to(keys, (2, 5, 5)))
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("mask_shape", [(7,), (5, 7), (3, 5, 5), (2, 1, 1, 5, 5)])
def test_a_mask_that_does_not_fit_is_refused_naming_the_shape_expected(mask_shape):
    rng = np.random.default_rng(3)
    q, k, v = rng.standard_normal((3, 2, 5, 4))
    with pytest.raises(ValueError, match=r"mask of shape .* does not broadcast to the scores "
                                         r"\(2, 5, 5\)"):
        scaled_dot_product_attention(q, k, v, np.ones(mask_shape, dtype=bool))


# --- every public helper checks its own door -----------------------------------------------------

@pytest.mark.parametrize(("call", "error", "match"), [
    (lambda: rope_angles(np.arange(4)[None], 8, base=0.0), ValueError, "base must be > 0"),
    (lambda: rope_angles(np.arange(4)[None], 8, base=-2.0), ValueError, "base must be > 0"),
    (lambda: rope_angles(np.arange(4)[None], 8, base=float("nan")), ValueError, "base must be"),
    (lambda: rope_angles(np.arange(4)[None] - 1, 8), ValueError, "positions must be >= 0"),
    (lambda: rope_angles(np.arange(4.0)[None], 8), TypeError, "positions must be integers"),
    (lambda: rope_angles(np.arange(4), 8), ValueError, "positions must have 2 dimension"),
    (lambda: apply_rope(np.zeros((1, 2, 3, 5)), np.zeros((1, 1, 3, 2)), np.zeros((1, 1, 3, 2))),
     ValueError, "even last axis"),
    (lambda: apply_rope(np.zeros((1, 2, 3, 4)), np.zeros((1, 1, 4, 2)), np.zeros((1, 1, 3, 2))),
     ValueError, "cos broadcastable to"),
    (lambda: layer_norm(np.zeros((2, 4)), eps=0.0), ValueError, "eps must be > 0"),
    (lambda: layer_norm(np.zeros((2, 4)), eps=float("nan")), ValueError, "eps must be a finite"),
    (lambda: layer_norm(np.zeros((2, 4)), gamma=np.ones(3)), ValueError, "gamma must have shape"),
    (lambda: sampling.sampling_probs(np.zeros((1, 4)), 0.0), ValueError, "temperature must be >"),
    (lambda: sampling.sampling_probs(np.zeros((1, 4)), -1.0), ValueError, "temperature must be >"),
    (lambda: sampling.sampling_probs(np.zeros((1, 4)), float("nan")), ValueError, "temperature"),
    (lambda: sampling.sampling_probs(np.zeros((1, 4)), 1.0, top_k=0), ValueError, "top_k"),
    (lambda: sampling.keep_top_k(np.zeros((1, 4)), 0), ValueError, "top_k must be a positive"),
    (lambda: sampling.keep_top_k(np.zeros(4), 2), ValueError, r"logits must be a \(B, V\)"),
    (lambda: sampling.keep_top_p(np.full((1, 4), 0.25), 1.5), ValueError, "top_p must be"),
    (lambda: sampling.keep_top_p(np.full((1, 4), np.nan), 0.5), ValueError, "probs must be"),
    (lambda: sampling.greedy(np.array([[np.nan, 1.0]])), ValueError, "NaN"),
    (lambda: split_heads(np.zeros((2, 3)), 2), ValueError, "split_heads: x must have 3"),
    (lambda: merge_heads(np.zeros((2, 3, 4))), ValueError, "merge_heads: x must have 4"),
    (lambda: grouped_attention(np.zeros((1, 3, 2, 4)), np.zeros((1, 2, 2, 4)),
                               np.zeros((1, 2, 2, 4)), None), ValueError, "H_kv dividing H"),
    (lambda: scaled_dot_product_attention(np.zeros((2, 4)), np.zeros((3, 5)), np.zeros((3, 5)),
                                          None), ValueError, r"q \(..., t_q, d\)"),
    (lambda: scaled_dot_product_attention(np.zeros((2, 2, 4)), np.zeros((3, 3, 4)),
                                          np.zeros((3, 3, 4)), None), ValueError, "broadcast"),
    (lambda: AttentionParams(*[np.zeros((4, 4)), np.zeros(4)] * 3, np.zeros((4, 3)),
                             np.zeros(4), 2, 2), ValueError, r"w_o must be \(4, 4\)"),
    (lambda: small_model()(random_ids(0, 1, 2), last_only=1), TypeError, "last_only must be"),
    (lambda: small_model()(random_ids(0, 1, 2), return_attention="yes"), TypeError,
     "return_attention must be"),
])
def test_public_helpers_refuse_bad_arguments_by_name(call, error, match):
    with pytest.raises(error, match=match):
        call()


# --- float16 arithmetic accumulates as torch does ------------------------------------------------

def test_float16_layer_norm_does_not_overflow_where_torch_does_not():
    """Squares of float16 values over 256 overflow float16; torch's CPU LayerNorm accumulates in
    float32, and so does ours."""
    x = (np.random.default_rng(4).standard_normal((2, 3, 8)) * 300).astype(np.float16)
    ours = layer_norm(x)
    theirs = torch.nn.functional.layer_norm(torch.tensor(x).float(), (8,)).half().numpy()
    assert ours.dtype == np.float16 and np.isfinite(ours).all()
    np.testing.assert_allclose(ours.astype(np.float32), theirs.astype(np.float32), atol=2e-3)


def test_float16_attention_scores_do_not_overflow():
    """q . k over 65504 is fine: the scores are formed in float32, like torch on a CPU."""
    q = np.full((1, 2, 64), 40.0, dtype=np.float16)
    k = np.full((1, 3, 64), 40.0, dtype=np.float16)
    v = np.random.default_rng(5).standard_normal((1, 3, 64)).astype(np.float16)
    out, weights = scaled_dot_product_attention(q, k, v, causal_mask(2, 3))
    assert out.dtype == np.float16 and np.isfinite(out).all() and np.isfinite(weights).all()
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)


# --- NumPy subclasses are refused, never half-understood -----------------------------------------

def masked(a: np.ndarray) -> np.ma.MaskedArray:
    return np.ma.masked_array(a, mask=np.zeros(a.shape, dtype=bool) | (a == a.flat[0]))


@pytest.mark.parametrize(("call", "match"), [
    (lambda: softmax(masked(np.arange(4.0))), "softmax: x must be a plain numpy array"),
    (lambda: layer_norm(np.eye(2).view(np.matrix)), "layer_norm: x must be a plain numpy array"),
    (lambda: split_heads(masked(np.zeros((1, 2, 4))), 2), "split_heads: x must be a plain"),
    (lambda: scaled_dot_product_attention(masked(np.ones((2, 3))), np.ones((2, 3)),
                                          np.ones((2, 3))), "q must be a float array"),
    (lambda: scaled_dot_product_attention(np.ones((2, 3)), np.ones((2, 3)), np.ones((2, 3)),
                                          masked(np.ones((2, 2), dtype=bool))),
     "mask must be bool"),
    (lambda: small_model()(masked(random_ids(0, 1, 3))), "ids must be a plain numpy array"),
    (lambda: small_model()(random_ids(0, 1, 3), attention_mask=masked(np.ones((1, 3), int))),
     "attention_mask must be a numpy array of 0/1"),
    (lambda: KVCache(1, 1, 4, 2).append(masked(np.ones((1, 1, 1, 2))), np.ones((1, 1, 1, 2))),
     "k must be a numpy array"),
    (lambda: sampling.greedy(masked(np.arange(4.0)[None])), "logits must be a plain numpy array"),
])
def test_numpy_subclasses_are_refused(call, match):
    with pytest.raises(TypeError, match=match):
        call()


# --- arrays that alias the cache's own buffers ---------------------------------------------------

def test_appending_a_view_of_the_cache_itself_stores_what_the_view_held():
    """k and v may be views of the cache's own buffers (copying position 0 to position 3, say):
    the write reads them before it overwrites anything."""
    rng = np.random.default_rng(6)
    kv = KVCache(1, 2, 6, 3, np.float64)
    kv.append(rng.standard_normal((1, 2, 3, 3)), rng.standard_normal((1, 2, 3, 3)))
    expected_k, expected_v = kv.keys[:, :, 1:3].copy(), kv.values[:, :, 1:3].copy()
    keys, values = kv.append(kv.keys[:, :, 1:3], kv.values[:, :, 1:3])
    np.testing.assert_array_equal(keys[:, :, 3:5], expected_k)
    np.testing.assert_array_equal(values[:, :, 3:5], expected_v)


def test_appending_a_v_that_views_the_very_slots_k_is_written_to_stores_what_v_held():
    """v a view of keys [2, 4) while k is written into [3, 5): writing k first would change what
    v reads (slot 3 held nothing; v would read k's first key there). v is read as it was."""
    rng = np.random.default_rng(7)
    kv = KVCache(1, 2, 6, 3, np.float64)
    kv.append(rng.standard_normal((1, 2, 3, 3)), rng.standard_normal((1, 2, 3, 3)))
    k = rng.standard_normal((1, 2, 2, 3))
    v = kv.keys[:, :, 2:4]  # key 2, then the empty slot k's first key is about to fill
    expected_v = v.copy()
    keys, values = kv.append(k, v)
    np.testing.assert_array_equal(keys[:, :, 3:5], k)
    np.testing.assert_array_equal(values[:, :, 3:5], expected_v)
    assert not values[:, :, 4].any()  # the empty slot v read: zeros, not k's first key


def test_the_views_append_returns_see_a_truncate():
    """append returns views, not copies: after truncate the dropped slots read as zeros, as in a
    new cache, so nobody reads stale keys through an old view by mistake."""
    kv = KVCache(1, 1, 4, 2, np.float64)
    keys, _ = kv.append(np.ones((1, 1, 3, 2)), np.ones((1, 1, 3, 2)))
    kv.truncate(1)
    assert keys[0, 0, 0].tolist() == [1.0, 1.0] and not keys[0, 0, 1:].any()


def test_attention_does_not_write_into_its_inputs():
    rng = np.random.default_rng(7)
    q, k, v = rng.standard_normal((3, 2, 4, 4))
    copies = [a.copy() for a in (q, k, v)]
    scaled_dot_product_attention(q, k, v, causal_mask(4))
    attention.softmax(q)
    layer_norm(k)
    for a, b in zip((q, k, v), copies, strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_scores_lead_axes_come_from_q_k_and_v_together():
    """The mask is checked against the scores' shape, whose leading axes broadcast q's, k's and
    v's: a (2, 4, 4) mask fits a batched q with shared k and v, and a batched k with a shared q;
    leading axes that do not broadcast are refused by name, not by NumPy."""
    rng = np.random.default_rng(8)
    mask = np.broadcast_to(causal_mask(4), (2, 4, 4))
    for q, k in (((2, 4, 8), (4, 8)), ((4, 8), (2, 4, 8))):
        out, weights = scaled_dot_product_attention(rng.standard_normal(q), rng.standard_normal(k),
                                                    rng.standard_normal((4, 8)), mask)
        assert weights.shape == (2, 4, 4) and np.all(np.triu(weights, k=1) == 0)
    with pytest.raises(ValueError, match="do not broadcast"):
        scaled_dot_product_attention(rng.standard_normal((2, 4, 8)), rng.standard_normal((3, 4, 8)),
                                     rng.standard_normal((4, 8)))


def test_a_causal_mask_larger_than_memory_is_refused_by_name_not_a_memory_error(monkeypatch):
    """A 10^6 x 10^6 mask is 931 GiB of bools: refused with its size before NumPy tries (it
    raised a raw MemoryError). The machine is given 16 GiB free, so the test holds anywhere."""
    monkeypatch.setattr(checks, "available_memory", lambda: 16 * 2**30)
    with pytest.raises(ValueError, match=r"causal_mask\(1000000, 1000000\) needs 931.3 GiB, more "
                                         r"than the 16.0 GiB"):
        causal_mask(10**6, 10**6)


# --- degenerate shapes: refused by name, never NaN, a NumPy reduction error or 0/0 ---------------

def z(*shape: int) -> np.ndarray:
    return np.zeros(shape)


@pytest.mark.parametrize(("call", "match"), [
    (lambda: softmax(z(2, 0)), r"softmax: x of shape \(2, 0\) has no entries along axis -1"),
    (lambda: softmax(z(0)), r"softmax: x of shape \(0,\) has no entries"),
    (lambda: softmax(z(0, 3), axis=0), "softmax: .* has no entries along axis 0"),
    (lambda: scaled_dot_product_attention(z(1, 1, 2, 4), z(1, 1, 0, 4), z(1, 1, 0, 4)),
     r"attention: need at least one key \(t_k >= 1\)"),
    (lambda: scaled_dot_product_attention(z(1, 1, 2, 0), z(1, 1, 3, 0), z(1, 1, 3, 4)),
     r"attention: .* one feature \(d >= 1\)"),
    (lambda: flash_attention(z(1, 1, 2, 4), z(1, 1, 0, 4), z(1, 1, 0, 4)),
     r"flash_attention: need at least one key \(t_k >= 1\)"),
    (lambda: flash_attention(z(1, 1, 2, 0), z(1, 1, 3, 0), z(1, 1, 3, 4), block_size=2),
     r"flash_attention: .* one feature \(d >= 1\)"),
    (lambda: grouped_attention(z(1, 2, 2, 4), z(1, 0, 3, 4), z(1, 0, 3, 4), None),
     r"grouped_attention: .* H_kv dividing H \(H_kv >= 1\), got .* k \(1, 0, 3, 4\)"),
    (lambda: layer_norm(z(2, 0)), r"layer_norm: x of shape \(2, 0\) has no features"),
    (lambda: quantize(z(2, 0)), r"quantize: x of shape \(2, 0\) has empty rows"),
    (lambda: attention_error_bound(z(1, 2, 4), z(1, 0, 4), z(1, 0, 4)),
     r"attention_error_bound: need at least one key"),
    (lambda: attention_error_bound(z(1, 2, 0), z(1, 3, 0), z(1, 3, 0)),
     r"attention_error_bound: .* one feature"),
])
def test_an_empty_axis_that_leaves_nothing_to_compute_is_refused_by_name(call, match):
    """No row of keys, no feature, no K/V head, a softmax over nothing: each refused by its own
    name before any arithmetic (a NumPy warning or error on the way would surface here too)."""
    with np.errstate(all="raise"), warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=match):
            call()


def test_no_query_is_accepted_and_answers_nothing():
    """t_q = 0: nothing is asked, so the answer is an empty (..., 0, d_v), from either path."""
    q, k, v = z(1, 2, 0, 4), z(1, 2, 3, 4), z(1, 2, 3, 5)
    with np.errstate(all="raise"), warnings.catch_warnings():
        warnings.simplefilter("error")
        out, weights = scaled_dot_product_attention(q, k, v, causal_mask(3)[:0])
        assert out.shape == (1, 2, 0, 5) and weights.shape == (1, 2, 0, 3)
        assert flash_attention(q, k, v, block_size=2).shape == (1, 2, 0, 5)
