"""RoPE checked against Hugging Face's Llama rotary code, and by the properties it exists for.

Reference: transformers' LlamaRotaryEmbedding (the angle table) and apply_rotary_pos_emb (the
rotation, half-split pairing via rotate_half). LlamaRotaryEmbedding hard-codes float32 (its
inv_freq and angles are computed with torch.float), so it can only agree with us to float32
rounding. For float64 checks we evaluate the same default-RoPE formula in float64
(`hf_cos_sin_float64`), after first checking that HF's own module agrees with that formula.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import small_model
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

import cache
from attention import AttentionParams, causal_mask, multi_head_attention
from generate import generate_cached, generate_naive
from parts.rope import apply_rope, rope_angles

FLOAT32_EPS = float(np.finfo(np.float32).eps)


def hf_cos_sin_float64(positions: np.ndarray, d_head: int, base: float) -> tuple:
    """HF's default RoPE table, evaluated in float64: positions (B, T) -> cos, sin (B, T, d_head),
    laid out as HF does, cat(freqs, freqs), so dimension i and i + d_head/2 share an angle."""
    inv_freq = 1.0 / (base ** (torch.arange(0, d_head, 2, dtype=torch.float64) / d_head))
    freqs = torch.as_tensor(positions, dtype=torch.float64)[..., None] * inv_freq  # (B, T, d/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, d/2) -> (B, T, d)
    return emb.cos(), emb.sin()


def llama_config(d_model: int, n_heads: int, n_kv_heads: int, base: float, **kw) -> LlamaConfig:
    return LlamaConfig(hidden_size=d_model, num_attention_heads=n_heads,
                       num_key_value_heads=n_kv_heads, max_position_embeddings=4096,
                       rope_parameters={"rope_type": "default", "rope_theta": base}, **kw)


def ours_in_hf_layout(cos: np.ndarray, sin: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, 1, T, d/2) -> (B, T, d), HF's layout, to compare tables entry by entry."""
    cos, sin = cos[:, 0], sin[:, 0]  # (B, 1, T, d/2) -> (B, T, d/2)
    return np.concatenate([cos, cos], -1), np.concatenate([sin, sin], -1)


# --- the angle table -----------------------------------------------------------------------------

@pytest.mark.parametrize("d_head", [8, 32, 128])
@pytest.mark.parametrize("base", [10_000.0, 500_000.0])
def test_angle_table_matches_hf_rotary_embedding(d_head: int, base: float) -> None:
    """HF's module (float32 inside) vs the float64 formula and vs ours: equal to float32
    rounding of an angle of size max_position, and no closer (so the float64 stand-in is HF's)."""
    positions = np.arange(256)[None]  # (1, T)
    rotary = LlamaRotaryEmbedding(llama_config(d_head * 4, 4, 4, base))
    x = torch.zeros(1, 4, 256, d_head, dtype=torch.float64)  # only its dtype and device are read
    hf_cos, hf_sin = (t.numpy() for t in rotary(x, torch.as_tensor(positions)))
    ref_cos, ref_sin = (t.numpy() for t in hf_cos_sin_float64(positions, d_head, base))
    our_cos, our_sin = ours_in_hf_layout(*rope_angles(positions, d_head, base, np.float64))
    tol = 4 * FLOAT32_EPS * positions.max()  # float32 angle rounding, |d cos| <= |d angle|
    for hf, ref, ours in ((hf_cos, ref_cos, our_cos), (hf_sin, ref_sin, our_sin)):
        np.testing.assert_allclose(hf, ref, rtol=0, atol=tol)
        np.testing.assert_allclose(hf, ours, rtol=0, atol=tol)
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)  # float64 vs float64


def test_hand_worked_pairing_is_half_split() -> None:
    """d_head 4, base 1e4: inv_freq = [1, 1e4 ** -0.5] = [1, 0.01]. At position 3, pair 0 =
    (x[0], x[2]) turns by 3 rad and pair 1 = (x[1], x[3]) by 0.03 rad. The interleaved convention
    would pair x[0] with x[1] and give [cos 3, sin 3, 0, 0] instead."""
    cos, sin = rope_angles(np.array([[3]]), d_head=4, base=10_000.0)
    e0 = np.array([1.0, 0.0, 0.0, 0.0]).reshape(1, 1, 1, 4)
    e1 = np.array([0.0, 1.0, 0.0, 0.0]).reshape(1, 1, 1, 4)
    np.testing.assert_allclose(apply_rope(e0, cos, sin).ravel(),
                               [np.cos(3.0), 0.0, np.sin(3.0), 0.0], atol=1e-15)
    np.testing.assert_allclose(apply_rope(e1, cos, sin).ravel(),
                               [0.0, np.cos(0.03), 0.0, np.sin(0.03)], atol=1e-15)


# --- the rotation --------------------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 3), H=st.integers(1, 4), T=st.integers(1, 9),
       half=st.integers(1, 32), start=st.integers(0, 2000),
       base=st.sampled_from([100.0, 10_000.0, 500_000.0]), seed=st.integers(0, 2**16))
def test_apply_rope_matches_hf_apply_rotary_pos_emb(B, H, T, half, start, base, seed) -> None:
    """Angles and rotation together vs HF's apply_rotary_pos_emb, float64, with a different
    starting position per batch row (as left padding produces)."""
    d_head = 2 * half
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((2, B, H, T, d_head))
    positions = start + np.arange(T)[None] + 7 * np.arange(B)[:, None]  # (B, T)
    cos, sin = rope_angles(positions, d_head, base, np.float64)
    hf_q, hf_k = apply_rotary_pos_emb(torch.from_numpy(q), torch.from_numpy(k),
                                      *hf_cos_sin_float64(positions, d_head, base))
    np.testing.assert_allclose(apply_rope(q, cos, sin), hf_q.numpy(), rtol=0, atol=1e-10)
    np.testing.assert_allclose(apply_rope(k, cos, sin), hf_k.numpy(), rtol=0, atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(half=st.integers(1, 32), T=st.integers(1, 8), start=st.integers(0, 10_000),
       seed=st.integers(0, 2**16))
def test_rotation_preserves_norms(half, T, start, seed) -> None:
    x = np.random.default_rng(seed).standard_normal((2, 3, T, 2 * half))
    cos, sin = rope_angles(start + np.arange(T)[None], 2 * half)
    np.testing.assert_allclose(np.linalg.norm(apply_rope(x, cos, sin), axis=-1),
                               np.linalg.norm(x, axis=-1), rtol=1e-12)


def rotated_score(q: np.ndarray, k: np.ndarray, m: int, n: int) -> float:
    """q . k after rotating q to position m and k to position n; q, k (d,)."""
    d = q.shape[0]
    qm = apply_rope(q.reshape(1, 1, 1, d), *rope_angles(np.array([[m]]), d))
    kn = apply_rope(k.reshape(1, 1, 1, d), *rope_angles(np.array([[n]]), d))
    return float(qm.ravel() @ kn.ravel())


@settings(max_examples=30, deadline=None)
@given(half=st.integers(2, 32), m=st.integers(0, 5000), n=st.integers(0, 5000),
       shift=st.integers(-5000, 5000), seed=st.integers(0, 2**16))
def test_score_depends_only_on_relative_position(half, m, n, shift, seed) -> None:
    """Shifting both positions by the same amount leaves q_m . k_n unchanged; moving only one of
    them changes it (so the first check is not passing because position is ignored)."""
    if min(m, n) + shift < 0:
        shift = -min(m, n)
    q, k = np.random.default_rng(seed).standard_normal((2, 2 * half))
    same = rotated_score(q, k, m, n)
    np.testing.assert_allclose(rotated_score(q, k, m + shift, n + shift), same, rtol=0,
                               atol=1e-9 * np.linalg.norm(q) * np.linalg.norm(k))
    assert abs(rotated_score(q, k, m, n + 1) - same) > 1e-9


# --- RoPE inside attention and the model ---------------------------------------------------------

@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_attention_layer_matches_hf_llama_attention(n_kv_heads: int) -> None:
    """Our multi_head_attention with RoPE (and GQA when n_kv_heads < 4) vs HF LlamaAttention with
    the same weights and biases, float64, positions 11 .. 11 + T - 1 (not starting at 0)."""
    B, T, D, H, base = 2, 7, 64, 4, 10_000.0
    d_head = D // H
    torch.manual_seed(0)
    config = llama_config(D, H, n_kv_heads, base, attention_bias=True)
    config._attn_implementation = "sdpa"  # eager would do its softmax in float32
    hf = LlamaAttention(config, layer_idx=0).double()
    for lin in (hf.q_proj, hf.k_proj, hf.v_proj, hf.o_proj):
        torch.nn.init.normal_(lin.weight, std=0.3)
        torch.nn.init.normal_(lin.bias, std=0.3)

    def ours(lin: torch.nn.Linear) -> tuple[np.ndarray, np.ndarray]:
        w = lin.weight.detach().numpy().T.copy()  # torch's (out, in) -> our x @ W layout (in, out)
        return w, lin.bias.detach().numpy()

    p = AttentionParams(*ours(hf.q_proj), *ours(hf.k_proj), *ours(hf.v_proj), *ours(hf.o_proj),
                        n_heads=H, n_kv_heads=n_kv_heads)
    x = np.random.default_rng(1).standard_normal((B, T, D))
    positions = 11 + np.arange(T)[None]  # (1, T)
    mask = causal_mask(T)[None, None]  # (1, 1, T, T)
    out, _ = multi_head_attention(x, p, mask, rotate=rope_angles(positions, d_head, base))
    with torch.no_grad():
        rotate = hf_cos_sin_float64(positions, d_head, base)
        ref, _ = hf(torch.from_numpy(x), position_embeddings=rotate,
                    attention_mask=torch.from_numpy(mask))
    np.testing.assert_allclose(out, ref.numpy(), rtol=0, atol=1e-12)


def test_rope_model_has_no_position_table() -> None:
    assert small_model("rope").wpe is None


def test_decode_position_bug_breaks_naive_equals_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    """The classic RoPE cache bug: the new token is rotated as if it were at position 0 (its
    position taken from the new tokens alone, not from what the cache holds). Prefill is
    untouched, so the first token still agrees; every decoded step afterwards disagrees."""
    model = small_model("rope")
    prompt = np.random.default_rng(2).integers(0, 64, (2, 6))
    naive = generate_naive(model, prompt, 8)
    np.testing.assert_allclose(generate_cached(model, prompt, 8).logits, naive.logits,
                               rtol=0, atol=1e-10)  # the correct code, same model

    right = cache.number_tokens

    def forgets_the_cache(count, real):
        return right(np.zeros_like(count), real)  # numbered from 0 per call: decode rotates by 0

    monkeypatch.setattr(cache, "number_tokens", forgets_the_cache)
    buggy = generate_cached(model, prompt, 8)
    np.testing.assert_allclose(buggy.logits[:, 0], naive.logits[:, 0], rtol=0, atol=1e-10)
    step_error = np.abs(buggy.logits - naive.logits).max(axis=(0, 2))  # (N,)
    assert np.all(step_error[1:] > 1e-3), step_error


def test_default_base_is_ten_thousand() -> None:
    """Position 1, d_head 4: pair 1 turns by 1 * base ** (-2 / 4) = 0.01 rad when base = 1e4."""
    cos, sin = rope_angles(np.array([[1]]), d_head=4)
    np.testing.assert_allclose(np.arccos(cos).ravel(), [1.0, 0.01], rtol=1e-12)
    np.testing.assert_allclose(small_model("rope").config.rope_base, 10_000.0)


@pytest.mark.parametrize(("d_head", "match"), [
    (0, "^rope_angles d_head must be a positive int"), (-2, "^rope_angles d_head must be"),
    (True, "^rope_angles d_head must be"), (2.0, "^rope_angles d_head must be"),
    (3, "^rope_angles: d_head must be even"),
])
def test_rope_angles_refuses_a_head_size_it_cannot_pair(d_head, match) -> None:
    """The message names the function and the argument, whichever check refuses it."""
    with pytest.raises(ValueError, match=match):
        rope_angles(np.array([[0]]), d_head)
