"""attention.py against hand-worked examples, independent formulas and PyTorch.

Every reference is written separately from the code under test (references.py): masks from the
rule "query i sits at absolute position t_k - t_q + i" spelled out in Python loops, attention from
torch, and head slices by plain column indexing.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attention import (
    NEG_INF,
    AttentionParams,
    causal_mask,
    causal_self_attention_block,
    grouped_attention,
    layer_norm,
    merge_heads,
    multi_head_attention,
    scaled_dot_product_attention,
    single_head_causal_attention,
    softmax,
    split_heads,
)
from tools.references import (
    masked_softmax_by_hand,
    rule_mask,
    torch_attention,
    torch_block_exercise,
    torch_layer_norm,
    torch_mha,
)

FEW = settings(max_examples=25, deadline=None)


def random_params(rng: np.random.Generator, D: int, H: int, H_kv: int | None = None,
                  dtype: type = np.float64) -> AttentionParams:
    """Random projections and biases in the x @ W + b layout (std chosen so softmax is not flat)."""
    H_kv = H if H_kv is None else H_kv
    kv = H_kv * (D // H)

    def normal(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.5).astype(dtype)

    return AttentionParams(normal(D, D), normal(D), normal(D, kv), normal(kv), normal(D, kv),
                           normal(kv), normal(D, D), normal(D), H, H_kv)


# --- causal_mask ---------------------------------------------------------------------------------

def test_causal_mask_square_by_hand():
    expected = np.array([[1, 0, 0],
                         [1, 1, 0],
                         [1, 1, 1]], dtype=bool)
    got = causal_mask(3)
    assert got.dtype == np.bool_
    np.testing.assert_array_equal(got, expected)


def test_causal_mask_rectangle_by_hand():
    # 2 new queries after 3 cached keys: they sit at absolute positions 3 and 4.
    expected = np.array([[1, 1, 1, 1, 0],   # position 3 sees keys 0..3
                         [1, 1, 1, 1, 1]],  # position 4 sees keys 0..4
                        dtype=bool)
    np.testing.assert_array_equal(causal_mask(2, 5), expected)


def test_causal_mask_one_decode_step_sees_everything():
    # A single decode query is the newest token: it sees every key, including itself.
    np.testing.assert_array_equal(causal_mask(1, 4), np.ones((1, 4), dtype=bool))


@FEW
@given(t_k=st.integers(1, 24), data=st.data())
def test_causal_mask_is_bottom_right_aligned(t_k, data):
    t_q = data.draw(st.integers(1, t_k), label="t_q")
    got = causal_mask(t_q, t_k)
    assert got.shape == (t_q, t_k)
    np.testing.assert_array_equal(got, rule_mask(t_q, t_k))
    # The last t_q rows of the square mask are the same thing: chunking never changes the rule.
    np.testing.assert_array_equal(got, causal_mask(t_k)[t_k - t_q:])


@pytest.mark.parametrize(("args", "name"), [
    ((0,), "t_q"), ((-2,), "t_q"), ((2.0,), "t_q"), ((True,), "t_q"), (("3",), "t_q"),
    ((2, 0), "t_k"), ((2, 1.5), "t_k"), ((3, 2), "t_q=3"),
])
def test_causal_mask_refuses_bad_arguments(args, name):
    with pytest.raises(ValueError, match=name):
        causal_mask(*args)


# --- softmax -------------------------------------------------------------------------------------

@FEW
@given(rows=st.integers(1, 5), cols=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_softmax_matches_torch_and_rows_sum_to_one(rows, cols, seed):
    x = np.random.default_rng(seed).standard_normal((rows, cols)) * 5
    got = softmax(x)
    np.testing.assert_allclose(got.sum(axis=-1), 1.0, rtol=0, atol=1e-12)
    everything = np.ones(x.shape, dtype=bool)
    np.testing.assert_allclose(got, masked_softmax_by_hand(x, everything), rtol=0, atol=1e-12)
    # Another axis, same reference on the transpose.
    np.testing.assert_allclose(softmax(x, axis=0), masked_softmax_by_hand(x.T, everything.T).T,
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_is_stable_for_huge_logits(dtype):
    x = np.array([[1e4, 0.0, -1e4],
                  [1e4, 1e4, 0.0],
                  [-1e9, 0.0, -1e9],
                  [-1e9, -1e9, -1e9],
                  [-np.inf, 0.0, -np.inf],
                  [-np.inf, -np.inf, -np.inf]], dtype=dtype)
    # Underflow to 0 is the point (masked keys); overflow or 0/0 would raise here.
    with np.errstate(over="raise", divide="raise", invalid="raise", under="ignore"):
        got = softmax(x)
    assert got.dtype == dtype
    expected = np.array([[1.0, 0.0, 0.0],
                         [0.5, 0.5, 0.0],
                         [0.0, 1.0, 0.0],
                         [1 / 3, 1 / 3, 1 / 3],  # equal finite scores: uniform
                         [0.0, 1.0, 0.0],  # -inf: exactly 0
                         [0.0, 0.0, 0.0]])  # nothing but -inf: zeros, not 0/0 = NaN
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)


# --- scaled_dot_product_attention ----------------------------------------------------------------

def test_attention_by_hand():
    # d = 1, so the scale is 1. Scores for both queries: [1 * 0, 1 * ln 3] = [0, ln 3].
    q = np.array([[1.0], [1.0]])
    k = np.array([[0.0], [math.log(3.0)]])
    v = np.array([[1.0], [5.0]])
    out, w = scaled_dot_product_attention(q, k, v, causal_mask(2))
    # Query 0 may only see key 0: weight 1. Query 1 sees both: softmax([0, ln 3]) = [1/4, 3/4].
    np.testing.assert_allclose(w, [[1.0, 0.0], [0.25, 0.75]], rtol=0, atol=1e-15)
    np.testing.assert_allclose(out, [[1.0], [0.25 * 1 + 0.75 * 5]], rtol=0, atol=1e-14)


def test_mask_is_applied_before_softmax():
    # If the future were zeroed AFTER softmax, query 0 would keep only e^0 / (e^0 + e^ln3) = 1/4
    # of its mass and its row would sum to 1/4; applied before softmax it renormalises to 1.
    q = np.array([[1.0], [1.0]])
    k = np.array([[0.0], [math.log(3.0)]])
    _, w = scaled_dot_product_attention(q, k, np.ones((2, 1)), causal_mask(2))
    np.testing.assert_allclose(w.sum(axis=-1), 1.0, rtol=0, atol=1e-15)
    assert w[0, 0] == 1.0


@FEW
@given(B=st.integers(1, 3), H=st.integers(1, 3), t_k=st.integers(1, 10), d=st.integers(1, 8),
       seed=st.integers(0, 2**16), data=st.data())
def test_attention_matches_torch_with_rectangular_mask(B, H, t_k, d, seed, data):
    t_q = data.draw(st.integers(1, t_k), label="t_q")  # includes t_q < t_k (chunk after cache)
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, H, t_q, d))
    k, v = rng.standard_normal((2, B, H, t_k, d))
    allowed = rule_mask(t_q, t_k)
    out, w = scaled_dot_product_attention(q, k, v, causal_mask(t_q, t_k))
    ref_out, ref_w = torch_attention(q, k, v, allowed)
    np.testing.assert_allclose(out, ref_out, rtol=0, atol=1e-12)
    np.testing.assert_allclose(w, ref_w, rtol=0, atol=1e-12)
    assert np.all(w[..., ~allowed] == 0.0)  # the future gets exactly zero, not "about zero"
    np.testing.assert_allclose(w.sum(axis=-1), 1.0, rtol=0, atol=1e-12)


def test_attention_without_mask_matches_torch():
    rng = np.random.default_rng(1)
    q, k, v = rng.standard_normal((3, 2, 5, 4))
    out, w = scaled_dot_product_attention(q, k, v)
    ref_out, ref_w = torch_attention(q, k, v, np.ones((5, 5), dtype=bool))
    np.testing.assert_allclose(out, ref_out, rtol=0, atol=1e-12)
    np.testing.assert_allclose(w, ref_w, rtol=0, atol=1e-12)


def test_attention_keeps_float32():
    rng = np.random.default_rng(2)
    q, k, v = rng.standard_normal((3, 1, 4, 8)).astype(np.float32)
    out, w = scaled_dot_product_attention(q, k, v, causal_mask(4))
    assert out.dtype == np.float32 and w.dtype == np.float32
    ref_out, _ = torch_attention(q, k, v, rule_mask(4, 4))
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-6)


def test_a_hidden_score_is_minus_infinity_and_the_block_exercise_keeps_its_minus_1e9():
    """The model's attention hides a key with -inf (exactly zero weight at any scale); the block
    exercise masks with its literal -1e9, as torch's version of it does (tools/references.py), and
    pays for it as its docstring says: token 0's only visible score is -5e9, below -1e9, so its
    hidden future (score 0) takes the weight and token 0 reads token 1's value."""
    assert NEG_INF == -np.inf
    x = np.eye(4)[None, :2]  # (1, 2, 4): token 0 is e0, token 1 is e1
    w_q, w_k, w_v, w_o = 1e5 * np.eye(4), -1e5 * np.eye(4), np.eye(4), np.eye(4)
    got = causal_self_attention_block(x, w_q, w_k, w_v, w_o, 1)
    np.testing.assert_allclose(got, torch_block_exercise(x, w_q, w_k, w_v, w_o, 1), rtol=0,
                               atol=1e-12)
    read_future = layer_norm(x[0, 0] + x[0, 1])  # v_1 = e1 added to token 0's residual
    np.testing.assert_allclose(got[0, 0], read_future, rtol=0, atol=1e-12)
    out, _ = scaled_dot_product_attention(x @ w_q, x @ w_k, x @ w_v, causal_mask(2))
    np.testing.assert_array_equal(out[0, 0], x[0, 0])  # -inf: token 0 reads its own value


# --- split_heads / merge_heads -------------------------------------------------------------------

@FEW
@given(B=st.integers(1, 3), T=st.integers(1, 6), H=st.integers(1, 4), d_head=st.integers(1, 5),
       seed=st.integers(0, 2**16))
def test_split_and_merge_heads(B, T, H, d_head, seed):
    x = np.random.default_rng(seed).standard_normal((B, T, H * d_head))
    heads = split_heads(x, H)
    assert heads.shape == (B, H, T, d_head)
    for h in range(H):  # head h is exactly columns [h * d_head, (h + 1) * d_head) of the input
        np.testing.assert_array_equal(heads[:, h], x[:, :, h * d_head:(h + 1) * d_head])
    merged = merge_heads(heads)
    assert merged.shape == (B, T, H * d_head)
    np.testing.assert_array_equal(merged, x)


def test_split_heads_refuses_indivisible_width():
    with pytest.raises(ValueError, match="n_heads=3"):
        split_heads(np.zeros((1, 2, 8)), 3)


# --- single head ---------------------------------------------------------------------------------

def test_single_head_shapes_and_weights():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 5, 6))
    w_q, w_k, w_v = rng.standard_normal((3, 6, 4))
    out, w = single_head_causal_attention(x, w_q, w_k, w_v)
    assert out.shape == (2, 5, 4) and w.shape == (2, 5, 5)
    assert np.all(w[:, ~rule_mask(5, 5)] == 0.0)
    np.testing.assert_allclose(w.sum(axis=-1), 1.0, rtol=0, atol=1e-12)
    ref_out, _ = torch_attention(x @ w_q, x @ w_k, x @ w_v, rule_mask(5, 5))
    np.testing.assert_allclose(out, ref_out, rtol=0, atol=1e-12)


@FEW
@given(B=st.integers(1, 3), T=st.integers(2, 8), seed=st.integers(0, 2**16), data=st.data())
def test_single_head_is_causal_under_perturbation(B, T, seed, data):
    t = data.draw(st.integers(1, T - 1), label="t")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, 6))
    w_q, w_k, w_v = rng.standard_normal((3, 6, 4))
    changed = x.copy()
    changed[:, t:] = rng.standard_normal((B, T - t, 6)) * 10  # rewrite the future
    out, _ = single_head_causal_attention(x, w_q, w_k, w_v)
    out2, _ = single_head_causal_attention(changed, w_q, w_k, w_v)
    np.testing.assert_array_equal(out[:, :t], out2[:, :t])  # the past did not move, not by 1 ulp
    assert not np.array_equal(out[:, t:], out2[:, t:])  # the perturbation did reach the future


# --- multi-head (the model's layer) --------------------------------------------------------------

@FEW
@given(B=st.integers(1, 3), T=st.integers(2, 8), H=st.sampled_from([1, 2, 4]),
       seed=st.integers(0, 2**16), data=st.data())
def test_multi_head_shape_and_causality(B, T, H, seed, data):
    t = data.draw(st.integers(1, T - 1), label="t")
    rng = np.random.default_rng(seed)
    D = 4 * H
    p = random_params(rng, D, H)
    x = rng.standard_normal((B, T, D))
    changed = x.copy()
    changed[:, t:] += rng.standard_normal((B, T - t, D)) * 10
    mask = causal_mask(T)[None, None]
    out, w = multi_head_attention(x, p, mask)
    out2, _ = multi_head_attention(changed, p, mask)
    assert out.shape == (B, T, D)  # merged back to d_model
    assert w.shape == (B, H, T, T)
    np.testing.assert_array_equal(out[:, :t], out2[:, :t])
    assert not np.array_equal(out[:, t:], out2[:, t:])


@FEW
@given(B=st.integers(1, 3), T=st.integers(1, 7), H=st.sampled_from([1, 2, 4]),
       d_head=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_multi_head_matches_torch_multihead_attention(B, T, H, d_head, seed):
    rng = np.random.default_rng(seed)
    D = H * d_head
    p = random_params(rng, D, H)
    x = rng.standard_normal((B, T, D))
    out, w = multi_head_attention(x, p, causal_mask(T)[None, None])
    ref_out, ref_w = torch_mha(p, x, x, blocked=~rule_mask(T, T))  # torch: True = NOT allowed
    assert ref_w.shape == (B, H, T, T)  # per-head weights, not averaged
    np.testing.assert_allclose(out, ref_out, rtol=0, atol=1e-10)
    np.testing.assert_allclose(w, ref_w, rtol=0, atol=1e-12)


@FEW
@given(H_kv=st.sampled_from([1, 2, 4]), t_k=st.integers(1, 7), seed=st.integers(0, 2**16),
       data=st.data())
def test_grouped_attention_matches_torch_enable_gqa(H_kv, t_k, seed, data):
    t_q = data.draw(st.integers(1, t_k), label="t_q")
    rng = np.random.default_rng(seed)
    B, H, d = 2, 4, 3
    q = rng.standard_normal((B, H, t_q, d))
    k, v = rng.standard_normal((2, B, H_kv, t_k, d))
    out, w = grouped_attention(q, k, v, causal_mask(t_q, t_k)[None, None])
    # torch's GQA: query head h reads key/value head h // (H // H_kv).
    ref_out, ref_w = torch_attention(q, k, v, rule_mask(t_q, t_k))
    np.testing.assert_allclose(out, ref_out, rtol=0, atol=1e-12)
    np.testing.assert_allclose(w, ref_w, rtol=0, atol=1e-12)
    # And by hand: repeat each kv head G times, then plain attention.
    G = H // H_kv
    plain, _ = scaled_dot_product_attention(q, np.repeat(k, G, axis=1), np.repeat(v, G, axis=1),
                                            causal_mask(t_q, t_k))
    np.testing.assert_allclose(out, plain, rtol=0, atol=1e-12)


# --- the block exercise ---------------------------------------------------------------------------

@pytest.mark.parametrize(("dtype", "atol"), [(np.float64, 1e-12), (np.float32, 2e-5)])
@pytest.mark.parametrize(("N", "T", "D", "H"), [(2, 5, 8, 2), (1, 1, 6, 3), (3, 7, 16, 4)])
def test_exercise_block_matches_torch(N, T, D, H, dtype, atol):
    rng = np.random.default_rng(N * 100 + T)
    x = rng.standard_normal((N, T, D)).astype(dtype)
    w_q, w_k, w_v, w_o = (rng.standard_normal((4, D, D)) / math.sqrt(D)).astype(dtype)
    got = causal_self_attention_block(x, w_q, w_k, w_v, w_o, H)
    assert got.shape == (N, T, D) and got.dtype == dtype
    # float32 tolerance: LayerNorm output is O(1), a handful of float32 roundings (~1e-7 each)
    # through D-term sums; 2e-5 is that with a wide margin, yet far below any real mistake.
    expected = torch_block_exercise(x, w_q, w_k, w_v, w_o, H)
    np.testing.assert_allclose(got, expected, rtol=0, atol=atol)


def test_exercise_block_is_causal():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 6, 8))
    ws = rng.standard_normal((4, 8, 8))
    changed = x.copy()
    changed[:, 3:] = rng.standard_normal((2, 3, 8))
    a = causal_self_attention_block(x, *ws, 2)
    b = causal_self_attention_block(changed, *ws, 2)
    np.testing.assert_array_equal(a[:, :3], b[:, :3])


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"x": np.zeros((4, 8))}, "x"),
    ({"w_k": np.zeros((8, 6))}, "w_k"),
    ({"w_o": np.zeros((6, 8))}, "w_o"),
    ({"num_heads": 3}, "num_heads"),
    ({"num_heads": 0}, "num_heads"),
])
def test_exercise_block_refuses_bad_arguments(kwargs, name):
    args = {"x": np.zeros((1, 2, 8)), "w_q": np.eye(8), "w_k": np.eye(8), "w_v": np.eye(8),
            "w_o": np.eye(8), "num_heads": 2}
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        causal_self_attention_block(**args)


def test_layer_norm_matches_torch():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 3, 10)) * 3 + 1
    gamma, beta = rng.standard_normal((2, 10))
    np.testing.assert_allclose(layer_norm(x, gamma, beta, 1e-5), torch_layer_norm(x, gamma, beta),
                               rtol=0, atol=1e-12)
    np.testing.assert_allclose(layer_norm(x), torch_layer_norm(x), rtol=0, atol=1e-12)
    np.testing.assert_allclose(layer_norm(x, eps=0.5), torch_layer_norm(x, eps=0.5), rtol=0,
                               atol=1e-12)


def test_softmax_accepts_integer_logits():
    # Integer logits are valid input; the result must equal the float computation, worked by hand
    # for [0, 1]: e^0 / (e^0 + e^1) = 1 / (1 + e).
    out = softmax(np.array([[0, 1], [5, 5]]))
    np.testing.assert_allclose(out, [[1 / (1 + np.e), np.e / (1 + np.e)], [0.5, 0.5]], rtol=1e-12)


def test_query_head_reads_kv_head_h_over_g():
    """A hand-made case: 4 query heads, 2 K/V heads whose values are the constants 10 and 20.
    Heads 0, 1 must read 10 and heads 2, 3 must read 20 (not 10, 20, 10, 20)."""
    q = np.zeros((1, 4, 1, 2))
    k = np.zeros((1, 2, 3, 2))
    v = np.stack([np.full((3, 2), 10.0), np.full((3, 2), 20.0)])[None]  # (1, 2, 3, 2)
    out, _ = grouped_attention(q, k, v, causal_mask(1, 3)[None, None])
    np.testing.assert_array_equal(out[0, :, 0, 0], [10.0, 10.0, 20.0, 20.0])


def test_one_group_is_plain_multi_head_attention_exactly():
    """G = 1: grouped_attention is bit-for-bit scaled_dot_product_attention over the head axis."""
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((3, 2, 4, 6, 8)).astype(np.float32)
    mask = causal_mask(6)[None, None]
    out, weights = grouped_attention(q, k, v, mask)
    plain_out, plain_weights = scaled_dot_product_attention(q, k, v, mask)
    np.testing.assert_array_equal(out, plain_out)
    np.testing.assert_array_equal(weights, plain_weights)


def test_mha_layer_is_the_textbook_multi_head_path_exactly():
    """multi_head_attention with H_kv == H vs project -> split -> attend -> merge -> W_O written
    out by hand with the plain (ungrouped) attention, same float32 weights."""
    rng = np.random.default_rng(1)
    p = random_params(rng, 16, 4, dtype=np.float32)
    x = rng.standard_normal((2, 7, 16)).astype(np.float32)
    mask = causal_mask(7)[None, None]
    out, _ = multi_head_attention(x, p, mask)
    q = split_heads(x @ p.w_q + p.b_q, 4)  # (B, T, D) -> (B, H, T, d_head)
    k = split_heads(x @ p.w_k + p.b_k, 4)
    v = split_heads(x @ p.w_v + p.b_v, 4)
    heads, _ = scaled_dot_product_attention(q, k, v, mask)
    np.testing.assert_array_equal(out, merge_heads(heads) @ p.w_o + p.b_o)


# --- what attention refuses, and float16 -------------------------------------------------------

Q = np.zeros((1, 2, 3, 4))


@pytest.mark.parametrize(("args", "error", "match"), [
    ((Q, Q, Q, np.where(rule_mask(3, 3), 0.0, -np.inf)), TypeError, "mask must be bool"),
    ((Q, Q, Q, rule_mask(3, 3).astype(int)), TypeError, "mask must be bool"),
    ((Q, Q.astype(np.float32), Q, None), TypeError, "share one dtype"),
    ((Q, Q, Q.astype(np.float16), None), TypeError, "share one dtype"),
    ((np.zeros(4), np.zeros(4), np.zeros(4), None), ValueError, r"q must be \(..., time"),
    ((Q.astype(int), Q, Q, None), TypeError, "q must be a float array"),
    ((Q.tolist(), Q, Q, None), TypeError, "q must be a float array"),
])
def test_attention_refuses_what_it_would_misread(args, error, match):
    with pytest.raises(error, match=match):
        scaled_dot_product_attention(*args)


def test_a_torch_style_additive_mask_would_have_been_inverted():
    """Why float masks are refused: torch's additive mask uses 0 for 'may attend' and -inf for
    'blocked', so reading it as truth values (non-zero = attend) flips it."""
    additive = np.where(rule_mask(3, 3), 0.0, -np.inf)
    assert np.array_equal(additive.astype(bool), ~rule_mask(3, 3))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_a_fully_masked_row_is_zeros_in_every_float_dtype(dtype):
    """A row whose every key is masked (a pad query) reads nothing: zeros, as torch >= 2.5 gives,
    never NaN, and with no invalid operation on the way (0/0 or -inf + inf would raise here)."""
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((1, 1, 2, 4)).astype(dtype) for _ in range(3))
    mask = np.array([[False, False], [True, False]])  # query 0 sees nothing
    with np.errstate(invalid="raise", divide="raise"):
        out, w = scaled_dot_product_attention(q, k, v, mask)
    assert out.dtype == dtype and np.isfinite(out).all()
    np.testing.assert_array_equal(w[0, 0, 0], [0.0, 0.0])
    np.testing.assert_array_equal(out[0, 0, 0], np.zeros(4))
    np.testing.assert_array_equal(w[0, 0, 1], [1.0, 0.0])


def test_softmax_accepts_a_list_and_refuses_a_scalar_or_text():
    np.testing.assert_allclose(softmax([[1.0, 2.0]]), [[1 / (1 + np.e), np.e / (1 + np.e)]],
                               rtol=1e-12)
    for bad, error in ((np.float64(3.0), ValueError), (np.array(["a", "b"]), TypeError),
                       (np.array([1j, 2j]), TypeError)):
        with pytest.raises(error, match="softmax: x must"):
            softmax(bad)


@pytest.mark.parametrize("n_heads", [0, -1, True, 2.0])
def test_split_heads_refuses_a_head_count_that_is_not_positive(n_heads):
    with pytest.raises(ValueError, match="n_heads"):
        split_heads(np.zeros((1, 2, 8)), n_heads)


@pytest.mark.parametrize(("D", "num_heads"), [(8, True), (0, 1), (8, 1.0)])
def test_exercise_block_refuses_true_heads_and_zero_width(D, num_heads):
    eye = np.eye(D)
    with pytest.raises(ValueError, match="num_heads"):
        causal_self_attention_block(np.zeros((1, 2, D)), eye, eye, eye, eye, num_heads)


def test_exercise_block_with_one_head_matches_torch():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 5, 6))
    ws = rng.standard_normal((4, 6, 6)) / np.sqrt(6)
    np.testing.assert_allclose(causal_self_attention_block(x, *ws, 1),
                               torch_block_exercise(x, *ws, 1), rtol=0, atol=1e-12)


# --- query blocks: the masked triangle is skipped, never guessed ---------------------------------

def test_query_blocks_give_each_block_the_keys_its_last_query_sees():
    """Worked by hand for QUERY_BLOCK = 128: a causal prefill of 300 needs 128, 256, 300 keys;
    200 new queries after 100 cached need 228 and 300; no mask, or <= 128 queries: one block."""
    from fast.model import QUERY_BLOCK, query_blocks

    assert QUERY_BLOCK == 128
    assert query_blocks(causal_mask(300), 300, 300) == [
        (slice(0, 128), 128), (slice(128, 256), 256), (slice(256, 300), 300)]
    assert query_blocks(causal_mask(200, 300), 200, 300) == [
        (slice(0, 128), 228), (slice(128, 200), 300)]
    assert query_blocks(causal_mask(128), 128, 128) == [(slice(0, 128), 128)]
    assert query_blocks(causal_mask(129), 129, 129) == [(slice(0, 128), 128),
                                                        (slice(128, 129), 129)]


def test_query_blocks_read_every_batch_row_and_need_no_key_for_a_blind_query():
    """Keys are counted over every batch row and head (the widest row decides); a query that sees
    no key at all needs none (its row is zeros), and a block of only such queries keeps one."""
    from fast.model import query_blocks

    mask = np.broadcast_to(causal_mask(260), (2, 1, 260, 260)).copy()
    mask[1, 0, 5, :] = True  # row 1, query 5 sees everything: block 0 needs all 260 keys
    assert query_blocks(mask, 260, 260)[0] == (slice(0, 128), 260)
    assert query_blocks(mask, 260, 260)[1] == (slice(128, 256), 256)
    blind = np.broadcast_to(causal_mask(260), (3, 1, 260, 260)).copy()
    blind[:, 0, 255, :] = False  # query 255 sees nothing in any row: block 1 needs 255 keys
    assert query_blocks(blind, 260, 260)[1] == (slice(128, 256), 255)
    blind[:, 0, 128:256, :] = False  # the whole block blind: one key, so nothing is empty
    assert query_blocks(blind, 260, 260)[1] == (slice(128, 256), 1)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_attention_in_several_query_blocks_matches_torch(dtype):
    """300 queries (three blocks) against torch's SDPA with the same bool mask: a padding row and a
    fully blind query included. Future weights are exactly 0 and every row sums to 1."""
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((2, 2, 300, 8)).astype(dtype) for _ in range(3))
    mask = np.broadcast_to(causal_mask(300), (2, 1, 300, 300)).copy()
    mask[1, 0, :, :40] = False  # row 1: 40 pads on the left
    mask[1, 0, :40, :] = False  # whose queries see nothing
    out, w = scaled_dot_product_attention(q, k, v, mask)
    assert out.dtype == dtype and np.isfinite(out).all()
    np.testing.assert_array_equal(w[np.broadcast_to(~mask, w.shape)], 0.0)
    seen = mask.any(-1)[:, 0]  # (B, t_q): a blind row's weights sum to 0, the others to 1
    np.testing.assert_allclose(w.sum(-1), np.broadcast_to(seen[:, None], w.shape[:-1]), rtol=1e-6)
    ref_out, ref_w = torch_attention(q.astype(np.float64), k.astype(np.float64),
                                     v.astype(np.float64), mask)
    tol = {np.float16: 2e-2, np.float32: 1e-5, np.float64: 1e-12}[dtype]
    np.testing.assert_allclose(out, ref_out, atol=tol)  # torch's blind rows are zeros too
    for b in range(2):  # torch's softmax of a row of -inf is NaN: compare weights where seen
        np.testing.assert_allclose(w[b][:, seen[b]], ref_w[b][:, seen[b]], atol=tol)
