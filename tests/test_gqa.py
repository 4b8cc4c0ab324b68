"""Grouped-query attention checked against torch's scaled_dot_product_attention(enable_gqa=True).

torch's reference repeats each K/V head G = H // H_kv times (repeat_interleave on the head axis),
so query head h reads K/V head h // G, which is what grouped_attention promises. The causal mask
is given explicitly (torch's is_causal aligns top-left, wrong whenever t_q < t_k).
The RoPE + GQA attention layer is also checked against Hugging Face LlamaAttention in
tests/test_rope.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.functional import scaled_dot_product_attention as torch_sdpa

from attention import (
    causal_mask,
    grouped_attention,
    merge_heads,
    multi_head_attention,
    scaled_dot_product_attention,
    split_heads,
)
from block import GPT, GPTConfig
from cache import KVCache, kv_cache_bytes
from generate import generate_cached, generate_naive


def torch_causal_mask(t_q: int, t_k: int) -> torch.Tensor:
    """Bool (t_q, t_k), True = may attend; query i sits at absolute position t_k - t_q + i."""
    query_pos = torch.arange(t_k - t_q, t_k)[:, None]
    return torch.arange(t_k)[None, :] <= query_pos


@settings(max_examples=30, deadline=None)
@given(B=st.integers(1, 3), H_kv=st.integers(1, 4), G=st.integers(1, 4), t_q=st.integers(1, 8),
       extra=st.integers(0, 8), d=st.integers(1, 16), seed=st.integers(0, 2**16))
def test_grouped_attention_matches_torch_enable_gqa(B, H_kv, G, t_q, extra, d, seed) -> None:
    """Outputs vs torch SDPA and weights vs softmax over torch's repeated K, float64; t_q < t_k
    whenever extra > 0 (new tokens after a cache)."""
    t_k = t_q + extra
    H = H_kv * G
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, H, t_q, d))
    k, v = rng.standard_normal((2, B, H_kv, t_k, d))
    out, weights = grouped_attention(q, k, v, causal_mask(t_q, t_k)[None, None])

    tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
    mask = torch_causal_mask(t_q, t_k)
    ref = torch_sdpa(tq, tk, tv, attn_mask=mask, enable_gqa=True)
    np.testing.assert_allclose(out, ref.numpy(), rtol=0, atol=1e-12)

    k_per_query_head = tk.repeat_interleave(G, dim=1)  # (B, H_kv, t_k, d) -> (B, H, t_k, d)
    scores = (tq @ k_per_query_head.transpose(-1, -2)) / d**0.5
    ref_weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    np.testing.assert_allclose(weights, ref_weights.numpy(), rtol=0, atol=1e-12)


def test_query_head_reads_kv_head_h_over_g() -> None:
    """A hand-made case: 4 query heads, 2 K/V heads whose values are the constants 10 and 20.
    Heads 0, 1 must read 10 and heads 2, 3 must read 20 (not 10, 20, 10, 20)."""
    q = np.zeros((1, 4, 1, 2))
    k = np.zeros((1, 2, 3, 2))
    v = np.stack([np.full((3, 2), 10.0), np.full((3, 2), 20.0)])[None]  # (1, 2, 3, 2)
    out, _ = grouped_attention(q, k, v, causal_mask(1, 3)[None, None])
    np.testing.assert_array_equal(out[0, :, 0, 0], [10.0, 10.0, 20.0, 20.0])


def test_one_group_is_plain_multi_head_attention_exactly() -> None:
    """G = 1: grouped_attention is bit-for-bit scaled_dot_product_attention over the head axis."""
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((3, 2, 4, 6, 8)).astype(np.float32)
    mask = causal_mask(6)[None, None]
    out, weights = grouped_attention(q, k, v, mask)
    plain_out, plain_weights = scaled_dot_product_attention(q, k, v, mask)
    np.testing.assert_array_equal(out, plain_out)
    np.testing.assert_array_equal(weights, plain_weights)


def test_n_kv_heads_equal_to_n_heads_is_the_default_model_exactly() -> None:
    ids = np.random.default_rng(0).integers(0, 256, (2, 9))
    default = GPT(GPTConfig(init_std=0.2), seed=5)
    explicit = GPT(GPTConfig(n_kv_heads=4, init_std=0.2), seed=5)
    np.testing.assert_array_equal(explicit(ids), default(ids))


def test_mha_layer_is_the_textbook_multi_head_path_exactly() -> None:
    """multi_head_attention with H_kv == H vs project -> split -> attend -> merge -> W_O written
    out by hand with the plain (ungrouped) attention, same float32 weights."""
    model = GPT(GPTConfig(init_std=0.2), seed=1)
    p = model.blocks[0].attn
    x = np.random.default_rng(2).standard_normal((2, 7, 128)).astype(np.float32)
    mask = causal_mask(7)[None, None]
    out, _ = multi_head_attention(x, p, mask)
    q = split_heads(x @ p.w_q + p.b_q, 4)  # (B, T, D) -> (B, H, T, d_head)
    k = split_heads(x @ p.w_k + p.b_k, 4)
    v = split_heads(x @ p.w_v + p.b_v, 4)
    heads, _ = scaled_dot_product_attention(q, k, v, mask)
    np.testing.assert_array_equal(out, merge_heads(heads) @ p.w_o + p.b_o)


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_cache_memory_is_n_heads_over_n_kv_heads_smaller(n_kv_heads: int) -> None:
    def cache_bytes(n_kv: int) -> int:
        model = GPT(GPTConfig(n_heads=4, n_kv_heads=n_kv, max_seq_len=64))
        return sum(kv.nbytes for kv in model.new_cache(2))

    mha, grouped = cache_bytes(4), cache_bytes(n_kv_heads)
    assert mha == grouped * (4 // n_kv_heads)
    # and the absolute size: 2 (K, V) * 2 layers * batch 2 * n_kv heads * 64 positions * 32 * 4 B
    assert grouped == 2 * 2 * 2 * n_kv_heads * 64 * 32 * 4
    assert grouped == kv_cache_bytes(2, 2, n_kv_heads, 32, 64, np.float32)


def test_cache_stores_only_the_kv_heads() -> None:
    model = GPT(GPTConfig(n_heads=4, n_kv_heads=1, max_seq_len=32))
    cache = model.new_cache(2)
    model(np.zeros((2, 5), dtype=np.int64), cache)
    assert cache[0].keys.shape == (2, 1, 32, 32)
    assert len(cache[0]) == 5


@pytest.mark.parametrize("n_kv_heads", [1, 2])
@pytest.mark.parametrize("rope", [False, True])
def test_naive_equals_cached_with_gqa(n_kv_heads: int, rope: bool) -> None:
    config = GPTConfig(vocab_size=64, max_seq_len=40, d_model=32, n_heads=4, n_layers=2,
                       n_kv_heads=n_kv_heads, rope=rope, init_std=0.3)
    model = GPT(config, seed=4, dtype=np.float64)
    prompt = np.random.default_rng(0).integers(0, 64, (2, 5))
    naive = generate_naive(model, prompt, 12)
    for chunk in (None, 2):
        cached = generate_cached(model, prompt, 12, prefill_chunk=chunk)
        np.testing.assert_array_equal(naive.tokens, cached.tokens)
        np.testing.assert_allclose(cached.logits, naive.logits, rtol=0, atol=1e-10)


@pytest.mark.parametrize("n_kv_heads", [1, 2])
@pytest.mark.parametrize("rope", [False, True])
def test_chunked_prefill_equals_full_forward_with_gqa(n_kv_heads: int, rope: bool) -> None:
    config = GPTConfig(vocab_size=64, max_seq_len=40, d_model=32, n_heads=4, n_layers=2,
                       n_kv_heads=n_kv_heads, rope=rope, init_std=0.3)
    model = GPT(config, seed=4, dtype=np.float64)
    ids = np.random.default_rng(1).integers(0, 64, (2, 17))
    full = model(ids)
    cache = model.new_cache(2)
    pieces = [model(ids[:, s:s + 5], cache) for s in range(0, 17, 5)]
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, rtol=0, atol=1e-10)


@pytest.mark.parametrize("n_kv_heads", [3, 8, 0, -2])
def test_config_refuses_n_kv_heads_that_do_not_divide_n_heads(n_kv_heads: int) -> None:
    with pytest.raises(ValueError, match=rf"n_kv_heads={n_kv_heads}.*n_heads=4"):
        GPTConfig(n_heads=4, n_kv_heads=n_kv_heads)


def test_model_refuses_a_cache_with_the_wrong_number_of_kv_heads() -> None:
    model = GPT(GPTConfig(n_heads=4, n_kv_heads=2, max_seq_len=16))
    wrong = [KVCache(1, 4, 16, 32) for _ in range(2)]  # an MHA-shaped cache
    with pytest.raises(ValueError, match="H_kv"):
        model(np.zeros((1, 3), dtype=np.int64), wrong)
    assert all(len(kv) == 0 for kv in wrong)
