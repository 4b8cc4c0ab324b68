"""Multi-head latent attention (beyond/latent.py), in float64 to 1e-12: cached == naive, absorbed ==
explicit, MLA with W_dkv = I is the MHA model; its cache holds one latent per token; what it
refuses; the torch twin that trains it; the memory table against the formulas."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from conftest import SMALL, prompts_of, random_ids, small_model

from attention import causal_mask
from beyond import latent
from beyond.latent import (
    LatentCache,
    LatentConfig,
    LatentGPT,
    LatentParams,
    absorbed_attention,
    explicit_attention,
)
from block import GPT, GPTConfig, count_weights, weight_shapes
from cache import KVCache, ModelCache
from fast import model as fastpath
from generate import generate_cached, generate_naive
from parts import ROOT
from tools import latent as latent_command
from tools import train
from tools.references import random_model

TOL = 1e-12


def mla(d_c: int = 8, **overrides: object) -> LatentGPT:
    return random_model(LatentConfig(**(SMALL | overrides), kv_latent=d_c), seed=2,
                        dtype=np.float64)


def latent_state(cache: ModelCache) -> tuple:
    return (len(cache), cache.positions.tobytes(), [(kv.latents.tobytes(), len(kv))
                                               for kv in cache.layers])


# --- the three proofs ----------------------------------------------------------------------------

@pytest.mark.parametrize("d_c", [1, 8, 32, 48])
def test_cached_equals_naive(d_c):
    model = mla(d_c)
    prompts = prompts_of([3, 9, 6], seed=4)
    naive = generate_naive(model, prompts, 10)
    for chunk in (None, 2):
        cached = generate_cached(model, prompts, 10, prefill_chunk=chunk)
        np.testing.assert_array_equal(cached.tokens, naive.tokens)
        np.testing.assert_allclose(cached.logits, naive.logits, rtol=0, atol=TOL)


@pytest.mark.parametrize(("t_q", "t_k"), [(1, 1), (1, 13), (5, 5), (4, 11)])
def test_absorbed_equals_explicit(t_q, t_k):
    rng = np.random.default_rng(t_q * 100 + t_k)
    D, H, d, d_c = 32, 4, 8, 12
    p = LatentParams(*(rng.standard_normal(s) * 0.3 for s in (
        (D, H * d), (H * d,), (D, d_c), (d_c, H * d), (d_c, H * d), (H * d, D), (D,))), H)
    q = rng.standard_normal((2, H, t_q, d))
    c = rng.standard_normal((2, t_k, d_c))
    mask = causal_mask(t_q, t_k)[None, None]
    mask = mask & (rng.random((2, 1, 1, t_k)) < 0.8) | np.eye(t_q, t_k, t_k - t_q, dtype=bool)
    out_a, w_a = absorbed_attention(q, c, p, mask)
    out_e, w_e = explicit_attention(q, c, p, mask)
    np.testing.assert_allclose(out_a, out_e, rtol=0, atol=TOL)
    np.testing.assert_allclose(w_a, w_e, rtol=0, atol=TOL)
    assert np.abs(out_e).max() > 0.1  # not two zeros agreeing


def mha_as_mla(mha: GPT) -> GPT:
    """The MHA model's weights as an MLA model with d_c = D: W_dkv = I, W_uk = W_k, W_uv = W_v.
    Its key bias is dropped (it adds q . b_k to a whole row of scores, which softmax ignores),
    its value bias folded into b_o (the weights sum to 1, so it comes out as b_v W_O)."""
    named, D = mha.named_weights(), mha.config.d_model
    out = {}
    for name, w in named.items():
        if ".attn.w_k" in name:
            out[name.replace("w_k", "w_uk")] = w
            out[name.replace("w_k", "w_dkv")] = np.eye(D)
        elif ".attn.w_v" in name:
            out[name.replace("w_v", "w_uv")] = w
        elif ".attn.b_o" in name:
            prefix = name.removesuffix("b_o")
            out[name] = w + named[prefix + "b_v"] @ named[prefix + "w_o"]
        elif not name.endswith((".attn.b_k", ".attn.b_v")):
            out[name] = w
    config = LatentConfig(**(SMALL | {"kv_latent": D}))
    return LatentGPT(config, dtype=np.float64, weights=out)


def test_mla_with_the_identity_as_w_dkv_is_the_mha_model():
    mha = small_model("mha", "float64")  # random biases: b_k and b_v are far from 0
    assert min(np.abs(mha.named_weights()[f"h.0.attn.{b}"]).max() for b in ("b_k", "b_v")) > 0.1
    model = mha_as_mla(mha)
    ids = random_ids(5, 2, 12)
    np.testing.assert_allclose(model(ids), mha(ids), rtol=0, atol=TOL)
    prompts = prompts_of([4, 7], seed=6)
    np.testing.assert_allclose(generate_cached(model, prompts, 8).logits,
                               generate_naive(mha, prompts, 8).logits, rtol=0, atol=TOL)


def test_the_value_bias_must_be_folded_into_b_o():
    # the proof above can fail: leave b_v out instead of folding it, and the logits move
    mha = small_model("mha", "float64")
    model = mha_as_mla(mha)
    for i, p in enumerate(model.blocks):
        p.attn.b_o[...] -= mha.named_weights()[f"h.{i}.attn.b_v"] @ p.attn.w_o
    ids = random_ids(5, 2, 12)
    assert np.abs(model(ids) - mha(ids)).max() > 1e-3


# --- the weights and the cache -------------------------------------------------------------------

def test_weight_table_of_an_mla_model():
    c = LatentConfig(kv_latent=32)  # the assignment's widths
    shapes = weight_shapes(c)
    assert shapes["h.1.attn.w_dkv"] == (128, 32)
    assert shapes["h.1.attn.w_uk"] == shapes["h.1.attn.w_uv"] == (32, 128)
    assert not [n for n in shapes if n.endswith(("w_k", "w_v", "b_k", "b_v"))]
    mha = GPTConfig()
    # per layer: W_k, W_v (2 D^2) and their biases (2 D) become D d_c + 2 d_c D
    assert count_weights(mha) - count_weights(c) == 2 * (2 * 128 * 128 + 2 * 128 - 3 * 128 * 32)


def test_keys_of_a_new_mla_model_start_at_the_scale_of_mha_keys():
    # W_uk ~ 1 / sqrt(d_c): the product W_dkv W_uk is distributed like an MHA model's W_k
    # (std 0.02), where 0.02 for both factors would give 0.02 * 0.02 * sqrt(32) = 0.0028
    mla_attn = LatentGPT(LatentConfig(kv_latent=32), seed=0).blocks[0].attn
    mha_attn = GPT(GPTConfig(), seed=0).blocks[0].attn
    for product in (mla_attn.w_dkv @ mla_attn.w_uk, mla_attn.w_dkv @ mla_attn.w_uv):
        assert product.std() == pytest.approx(mha_attn.w_k.std(), rel=0.1)
    assert mla_attn.w_dkv.std() == pytest.approx(0.02, rel=0.1)
    assert not LatentGPT(LatentConfig(kv_latent=8, init_std=0.0), seed=0).blocks[0].attn.w_uk.any()


def test_save_and_load_an_mla_model(tmp_path):
    model = mla(8)
    path = model.save(tmp_path / "mla.npz")
    loaded = LatentGPT.load(path, np.float64)
    assert loaded.config.kv_latent == 8
    with pytest.raises(ValueError, match="unknown \\['kv_latent'\\]"):  # a plain GPT says so
        GPT.load(path)
    ids = random_ids(8, 2, 6)
    np.testing.assert_array_equal(loaded(ids), model(ids))


def test_the_cache_holds_one_latent_per_token():
    model = mla(8)
    cache = model.new_cache(3)
    c = model.config
    assert all(isinstance(kv, LatentCache) for kv in cache.layers)
    assert cache.nbytes == c.n_layers * 3 * c.max_seq_len * 8 * 8 == latent.latent_cache_bytes(
        c.n_layers, 3, c.max_seq_len, 8, np.float64)
    full = small_model("mha", "float64").new_cache(3)
    assert full.nbytes == 8 * cache.nbytes  # 2 H d = 64 numbers per token against d_c = 8
    ids = random_ids(9, 3, 5)
    model(ids, cache)
    # the latents of layer 0 are ln_1(x) @ W_dkv, worked here again
    x = model.wte[ids] + model.wpe[np.arange(5)]
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    h = (x - mu) / np.sqrt(var + c.ln_eps) * model.blocks[0].ln_1[0] + model.blocks[0].ln_1[1]
    by_hand = h @ model.blocks[0].attn.w_dkv
    np.testing.assert_allclose(cache.layers[0].latents[:, :5], by_hand, rtol=0, atol=TOL)
    assert not cache.layers[0].latents[:, 5:].any()


def test_refused_calls_leave_the_latents_as_they_were():
    model = mla(8)
    cache = model.new_cache(2)
    model(random_ids(1, 2, 6), cache)
    before = latent_state(cache)
    kv = cache.layers[0]
    one = np.ones((2, 1, 1, 8))
    with pytest.raises(ValueError, match="same latent"):
        kv.append(one, one * 2)
    with pytest.raises(ValueError):
        kv.append(np.ones((2, 4, 1, 8)), np.ones((2, 4, 1, 8)))  # K/V heads, not one latent
    with pytest.raises(ValueError):
        model(random_ids(2, 2, 40), cache)
    assert latent_state(cache) == before
    cache.truncate(2)
    shorter = model.new_cache(2)
    model(random_ids(1, 2, 6)[:, :2], shorter)
    # The same two latents, from a product over 6 rows and one over 2: equal to rounding (a BLAS
    # kernel may block the two products differently), and nothing past them.
    assert len(cache) == len(shorter) == 2
    for kv, fresh in zip(cache.layers, shorter.layers, strict=True):
        assert len(kv) == len(fresh) == 2
        np.testing.assert_allclose(kv.latents, fresh.latents, rtol=0, atol=1e-12)
        assert not kv.latents[:, 2:].any()


def test_a_cache_shaped_for_another_model_is_refused():
    model, mha = mla(8), small_model("mha", "float64")  # MHA: four K/V heads of 8
    with pytest.raises(ValueError, match=r"\(H_kv, d_head\) = \(4, 8\) \(KVCache\), this "
                                         r"model needs \(1, 8\)"):
        model(random_ids(3, 1, 3), mha.new_cache(1))
    with pytest.raises(ValueError, match=r"\(H_kv, d_head\) = \(1, 8\) \(LatentCache\)"):
        mha(random_ids(3, 1, 3), model.new_cache(1))


def test_any_cache_of_the_latents_shape_serves_the_latent_model():
    """The protocol asks a layer's cache for its shape, not its kind: a plain KVCache of one head
    of d_c holds the latent twice (as key and as value) and gives the same numbers."""
    model = mla(8)
    two = ModelCache([KVCache(2, 1, 32, 8, np.float64) for _ in range(2)])
    prompts = prompts_of([3, 6], seed=7)
    np.testing.assert_allclose(generate_cached(model, prompts, 5, cache=two).logits,
                               generate_naive(model, prompts, 5).logits, rtol=0, atol=TOL)
    assert two.nbytes == 2 * model.new_cache(2).nbytes


@pytest.mark.parametrize(("model_dtype", "cache_dtype", "rtol"), [
    ("float32", "float64", 1e-5), ("float64", "float32", 1e-5), ("float32", "float16", 3e-3),
    ("float64", "float16", 3e-3)])
def test_a_latent_model_decodes_into_a_cache_of_another_dtype(model_dtype, cache_dtype, rtol):
    """The latents are cast into the cache and back to the model's dtype on the way out: a
    prefill, a decode step and a chunk agree with the float64 model without a cache to the
    rounding of the narrower dtype (relative to the largest logit). A float32 model with a
    float64 cache is its float32 cache's run exactly: float32 latents are exact in float64."""
    config = LatentConfig(**SMALL, kv_latent=8)
    model = random_model(config, seed=2, dtype=model_dtype)
    expected = random_model(config, seed=2, dtype=np.float64)(ids := random_ids(5, 2, 9))

    def cached(cache_dtype: str | None) -> np.ndarray:
        cache = model.new_cache(2, cache_dtype)
        return np.concatenate([model(ids[:, :6], cache), model(ids[:, 6:7], cache),
                               model(ids[:, 7:], cache)], axis=1)

    got = cached(cache_dtype)
    assert got.dtype == model_dtype
    np.testing.assert_allclose(got, expected, rtol=0, atol=rtol * np.abs(expected).max())
    if (model_dtype, cache_dtype) == ("float32", "float64"):
        np.testing.assert_array_equal(got, cached(None))


def test_latent_attention_called_directly_checks_its_door_and_runs():
    """Outside the model the layer checks its own arguments: x (B, T, D) is taken and gives the
    model's own layer output; a 2-D x or RoPE angles are refused by name."""
    model = mla(8)
    p = model.blocks[0].attn
    x = np.random.default_rng(0).standard_normal((2, 5, 32))
    out, weights = latent.latent_attention(x, p, causal_mask(5))
    assert out.shape == (2, 5, 32) and weights.shape == (2, 4, 5, 5)
    q = x @ p.w_q + p.b_q  # (2, 5, H d): the explicit form worked here, head by head
    k, v = x @ p.w_dkv @ p.w_uk, x @ p.w_dkv @ p.w_uv
    heads = []
    for h in range(4):
        cut = slice(8 * h, 8 * h + 8)
        scores = q[..., cut] @ k[..., cut].swapaxes(-1, -2) / np.sqrt(8)  # (2, 5, 5)
        scores = np.where(causal_mask(5), scores, -np.inf)
        w = np.exp(scores - scores.max(-1, keepdims=True))
        heads.append(w / w.sum(-1, keepdims=True) @ v[..., cut])
    np.testing.assert_allclose(out, np.concatenate(heads, -1) @ p.w_o + p.b_o, rtol=0, atol=TOL)
    with pytest.raises(ValueError, match="latent_attention: x must have 3 dimension"):
        latent.latent_attention(x[0], p, None)
    with pytest.raises(ValueError, match="latent_attention: x must be .* and rotate None"):
        latent.latent_attention(x, p, None, rotate=(np.ones((2, 1, 5, 4)),) * 2)
    with pytest.raises(ValueError, match=r"latent_attention: x must be \(B, T, 32\)"):
        latent.latent_attention(x[..., :16], p, None)


def test_a_latent_cache_larger_than_memory_is_refused_for_all_layers_together(monkeypatch):
    """On a machine with 1 GiB free: one layer of 393,216 rows x 32 positions x 8 float64 is
    0.75 GiB and would fit alone; the model's two layers need 1.5 GiB and are refused first."""
    from parts import checks

    model = mla(8)
    monkeypatch.setattr(checks, "available_memory", lambda: 2**30)
    with pytest.raises(ValueError, match="a latent cache for 393216 rows needs 1.5 GiB"):
        model.new_cache(393216)


# --- what is refused -----------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [0, -3, 2.0, True, "8", None])
def test_a_latent_width_below_one_or_not_an_int_is_refused(bad):
    with pytest.raises(ValueError, match="LatentConfig.kv_latent must be a positive int"):
        LatentConfig(kv_latent=bad)


def test_grouped_kv_heads_with_a_latent_are_refused():
    with pytest.raises(ValueError, match="n_kv_heads=2 < n_heads=4 is refused"):
        LatentConfig(n_kv_heads=2, kv_latent=32)


def test_a_window_with_a_latent_is_refused():
    with pytest.raises(ValueError, match="kv_latent with a sliding_window"):
        LatentConfig(sliding_window=4, kv_latent=32)


def test_rope_with_a_latent_is_refused_and_says_why():
    with pytest.raises(ValueError, match="depends on the pair of positions") as err:
        LatentConfig(rope=True, kv_latent=32)
    assert "cannot be folded into one fixed matrix" in str(err.value)


def test_the_absorption_really_fails_with_a_rotation_between_q_and_k():
    # the reason, checked: with RoPE a score is x_m W_q R_m . x_n W_k R_n = x_m M x_n^T with
    # M = W_q R_(m-n) W_k^T, which differs for every gap m - n: no single matrix absorbs it
    from parts.rope import apply_rope, rope_angles

    rng = np.random.default_rng(0)
    d = 8
    w_q, w_k = rng.standard_normal((d, d)), rng.standard_normal((d, d))

    def between(m: int, n: int) -> np.ndarray:
        """M (d, d) with M[i, j] = the score of token e_i at position m against e_j at n."""
        q = apply_rope(w_q[None, None], *rope_angles(np.full((1, d), m), d))  # (1, 1, d, d)
        k = apply_rope(w_k[None, None], *rope_angles(np.full((1, d), n), d))  # rows: tokens e_j
        return (q @ k.swapaxes(-1, -2))[0, 0]

    np.testing.assert_allclose(between(3, 1), between(7, 5), rtol=0, atol=1e-12)  # the gap only
    assert np.abs(between(3, 1) - between(3, 2)).max() > 0.1  # and it changes with the gap
    assert np.abs(between(3, 1) - w_q @ w_k.T).max() > 0.1  # not the fixed W_q W_k^T


# --- the fast path and training -----------------------------------------------------------------

def test_the_fast_path_refuses_a_latent_model_by_name():
    """FastGPT computes AttentionParams layers; an MLA model runs the readable LatentGPT."""
    with pytest.raises(ValueError, match="FastGPT: the fast path runs AttentionParams layers, "
                                         "this config builds LatentParams"):
        fastpath.FastGPT(LatentConfig(**SMALL, kv_latent=8), seed=0)


def test_the_torch_twin_computes_the_numpy_mla_model():
    model = mla(8)
    twin = train.TorchGPT(model.config, model.named_weights())
    ids = random_ids(7, 3, 10)
    with torch.no_grad():
        theirs = twin(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(model(ids), theirs, rtol=0, atol=1e-10)


def test_train_writes_an_mla_model_under_out_and_never_over_the_shipped_files(tmp_path):
    for causal, name in ((True, "reverse_mla32"), (False, "reverse_no_mask_mla32")):
        args = argparse.Namespace(causal=causal, out=None, log=None, quick=False, kv_latent=32,
                                  draft=False)
        out, log = train.output_paths(argparse.ArgumentParser(), args)
        assert (out, log) == (ROOT / f"out/{name}.npz", ROOT / f"out/{name}.log.json")
        assert not train.is_committed(out) and not train.is_committed(log)
    path = tmp_path / "mla.npz"
    assert train.main(["--quick", "--kv-latent", "8", "--out", str(path)]) == 0
    assert LatentGPT.load(path).config.kv_latent == 8


# --- memory --------------------------------------------------------------------------------------

def test_the_memory_table_matches_the_formulas():
    rows = {(r[0], r[1]): r for r in latent_command.memory_rows()}
    per = {key: r[3] for key, r in rows.items()}
    llama, repo = latent_command.LLAMA["short"], latent_command.REPO["short"]
    assert per[(llama, "MHA")] == f"{2 * 32 * 128 * 2:,}"  # fp16
    assert per[(llama, "GQA (8 K/V heads)")] == f"{2 * 8 * 128 * 2:,}"
    assert per[(llama, "MLA d_c=512")] == f"{512 * 2:,}"
    assert per[(repo, "MHA")] == f"{2 * 4 * 32 * 4:,}"  # float32
    assert per[(repo, "int8 (MHA)")] == f"{2 * 4 * (32 + 4):,}"
    assert per[(repo, "MLA d_c=32")] == f"{32 * 4:,}"
    measured = [r for r in rows.values() if r[5] != "formula only"]
    per_token = [r for r in measured if r[3] != "-"]
    assert len(measured) == 14 and all(r[5] == "yes" for r in measured)
    assert len(per_token) == 10 and all(r[3] == r[4] for r in per_token)
    # the windows' buffers: S + W slots per layer, whatever the context
    assert rows[(repo, "sinks S=4 + window W=64")][6:8] == ["136.00 KiB", "136.00 KiB"]
    assert rows[(llama, "MHA")][7] == "16.00 GiB"  # 32k tokens: the README's figure
    assert rows[(llama, "MLA d_c=512")][8] == f"{1 / 16:.3f}"  # 1,024 of 16,384 bytes
    assert rows[(repo, "MLA d_c=32")][8] == f"{1 / 8:.3f}"  # 128 of 1,024 bytes
    assert isinstance(LatentCache(1, 4, 8), KVCache)
