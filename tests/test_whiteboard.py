"""The code a learner opens is the whiteboard, and the engine beside it computes the same numbers.

- scaled_dot_product_attention is the five whiteboard steps, one line each, in order; and the
  reference comparison here fails for each classic slip written into those lines (softmax over
  the wrong axis, the mask after softmax, K not transposed), so it is a test that can fail.
- generate_naive builds no cache at all, on either path: it reruns the model on the prefix.
- The engine (GPT(..., fast=True)) equals the readable path to 1e-12 in float64 over the
  equivalence matrix (MHA, GQA, MQA, RoPE, padding, chunked prefill), with every trick on and
  with each one off.
"""

from __future__ import annotations

import inspect
import math
import re

import numpy as np
import pytest
from conftest import VARIANTS, prompts_of, random_ids, small_model

import attention
import cache
from attention import causal_mask, scaled_dot_product_attention
from fast import model as fastpath
from generate import generate_cached, generate_naive, left_pad
from tools.references import torch_attention

STEPS = ["q @ k.swapaxes(-1, -2)", "/ math.sqrt(q.shape[-1])", "np.where(mask, scores, NEG_INF)",
         "softmax(scores, axis=-1)", "weights @ v"]


def test_attention_is_the_five_whiteboard_lines_in_order():
    lines = inspect.getsource(scaled_dot_product_attention).splitlines()
    numbered = [line for line in lines if re.search(r"# [1-5]\. ", line)]
    assert len(numbered) == 5
    for n, (line, step) in enumerate(zip(numbered, STEPS, strict=True), start=1):
        assert f"# {n}. " in line and step in line, (n, line)


def agrees_with_torch(sdpa) -> bool:
    """sdpa's output and weights against torch's attention with an explicit bottom-right mask:
    3 queries after 4 cached keys (t_q != t_k != d), batch 2, 2 heads, float64."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 2, 3, 5))
    k, v = rng.standard_normal((2, 2, 2, 7, 5))
    mask = causal_mask(3, 7)
    try:
        out, weights = sdpa(q, k, v, mask)
    except ValueError:  # a shape error is a failure too, the loud kind
        return False
    expected_out, expected_weights = torch_attention(q, k, v, mask)
    return (np.shape(out) == expected_out.shape and np.allclose(out, expected_out, atol=1e-12)
            and np.allclose(weights, expected_weights, atol=1e-12))


SLIPS = {
    "softmax over the queries": ("softmax(scores, axis=-1)", "softmax(scores, axis=-2)"),
    "K not transposed": ("q @ k.swapaxes(-1, -2)", "q @ k"),
    "mask after softmax": (
        "        scores = np.where(mask, scores, NEG_INF)  # 3. mask the future, BEFORE softmax\n"
        "    weights = softmax(scores, axis=-1)  # 4. over the keys: each query's row sums to 1\n",
        "        pass\n"
        "    weights = softmax(scores, axis=-1)\n"
        "    weights = np.where(mask, weights, 0.0)\n"),
}


def with_slip(old: str, new: str):
    """scaled_dot_product_attention compiled from its own source with one line changed."""
    source = inspect.getsource(scaled_dot_product_attention)
    assert old in source, old
    namespace = dict(vars(attention))
    exec(compile(source.replace(old, new), "slip", "exec"), namespace)  # noqa: S102
    return namespace["scaled_dot_product_attention"]


def test_the_reference_comparison_passes_the_real_attention():
    assert agrees_with_torch(scaled_dot_product_attention)


@pytest.mark.parametrize("slip", sorted(SLIPS))
def test_the_reference_comparison_catches_each_slip(slip):
    assert not agrees_with_torch(with_slip(*SLIPS[slip]))


@pytest.mark.parametrize("fast", [False, True], ids=["readable", "engine"])
def test_naive_decoding_builds_no_cache(fast, monkeypatch):
    """With every cache constructor made to raise, naive decoding still runs (and gives the
    cached tokens computed before); cached decoding, the control, does not."""
    model = small_model("rope_gqa", fast=fast)
    batch = prompts_of([5, 2, 7])
    expected = generate_cached(model, batch, 6)

    def refuse(*args, **kwargs):
        raise AssertionError("a cache was built")

    monkeypatch.setattr(cache.KVCache, "__init__", refuse)
    monkeypatch.setattr(cache.ModelCache, "__init__", refuse)
    naive = generate_naive(model, batch, 6)
    np.testing.assert_array_equal(naive.tokens, expected.tokens)
    with pytest.raises(AssertionError, match="a cache was built"):
        generate_cached(model, batch, 6)


def readable_and_fast(variant: str, dtype: str):
    return small_model(variant, dtype), small_model(variant, dtype, fast=True)


def assert_equal_to(got, expected, dtype: str) -> None:
    if dtype == "float64":
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    else:
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("padded", [False, True], ids=["equal", "padded"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_engine_equals_the_readable_path(variant, padded, dtype):
    readable, fast = readable_and_fast(variant, dtype)
    batch = prompts_of([7, 2, 5]) if padded else random_ids(3, 3, 7)
    ids, mask = left_pad(batch) if padded else (batch, None)
    (a, a_weights), (b, b_weights) = (m(ids, attention_mask=mask, return_attention=True)
                                      for m in (readable, fast))
    assert_equal_to(b, a, dtype)
    for x, y in zip(b_weights, a_weights, strict=True):
        assert_equal_to(x, y, dtype)
    for chunk in (None, 3):
        slow, quick = (generate_cached(m, batch, 8, prefill_chunk=chunk) for m in (readable, fast))
        np.testing.assert_array_equal(quick.tokens, slow.tokens)
        assert_equal_to(quick.logits, slow.logits, dtype)
        assert quick.cache_lengths == slow.cache_lengths


@pytest.mark.parametrize("trick", sorted(fastpath.TRICKS))
def test_each_trick_alone_changes_no_number(trick, monkeypatch):
    """Each switch off in turn (the benchmark's variants): still the readable path's numbers,
    with 200 queries so the query blocks are more than one."""
    monkeypatch.setitem(fastpath.TRICKS, trick, False)
    readable, fast = readable_and_fast("rope_gqa", "float64")
    ids = random_ids(9, 2, 30)
    np.testing.assert_allclose(fast(ids), readable(ids), rtol=0, atol=1e-12)
    slow, quick = (generate_cached(m, ids, 2, prefill_chunk=7) for m in (readable, fast))
    np.testing.assert_allclose(quick.logits, slow.logits, rtol=0, atol=1e-12)
    q = np.random.default_rng(3).standard_normal((2, 4, 200, 8))
    k, v = np.random.default_rng(4).standard_normal((2, 2, 2, 200, 8))
    mask = causal_mask(200)[None, None]
    out, weights = fastpath.grouped_attention(q, k, v, mask)
    expected_out, expected_weights = attention.grouped_attention(q, k, v, mask)
    np.testing.assert_allclose(out, expected_out, rtol=0, atol=1e-12)
    np.testing.assert_allclose(weights, expected_weights, rtol=0, atol=1e-12)


def test_the_engine_skips_work_the_readable_path_does():
    """Not only equal: the engine really takes its shortcuts. A 200-query causal attention runs in
    two blocks, the first stopping at key 128; a prefill's last block makes W_O, MLP and LM-head
    products for one row, not all of them."""
    blocks = fastpath.query_blocks(causal_mask(200)[None, None], 200, 200)
    assert blocks == [(slice(0, 128), 128), (slice(128, 200), 200)]
    model = small_model("mha", fast=True)
    rows = []
    real_linear = fastpath.linear

    def counting(x, w, b=None):
        rows.append(math.prod(x.shape[:-1]))
        return real_linear(x, w, b)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fastpath, "linear", counting)
        model(random_ids(1, 1, 9), last_only=True)
    # layer 0: QKV, W_O, fc, proj on 9 rows; layer 1: K|V on 9 rows, then Q, W_O, fc, proj and
    # the LM head on the last row alone.
    assert rows == [9, 9, 9, 9, 9, 1, 1, 1, 1, 1]
