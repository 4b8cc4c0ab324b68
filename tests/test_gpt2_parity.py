"""GPT.from_gpt2 against Hugging Face's GPT2LMHeadModel, built from a local GPT2Config with random
weights (nothing is downloaded).

initializer_range=0.2 (GPT-2 uses 0.02) makes the random model opinionated: its greedy output
varies from token to token, so "same tokens as Hugging Face" is a strong check, not 20 copies of
one token. Hugging Face runs its own attention, its own mask and its own KV cache in generate(), so
agreement is evidence from outside our code.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from block import GPT
from generate import generate_cached, generate_naive

V, N_POSITIONS, D, N_HEADS = 100, 64, 64, 4


def hf_gpt2(n_layer: int = 3, seed: int = 0) -> GPT2LMHeadModel:
    """A small random GPT-2 in eval mode (dropout off), no parameter left at its initial constant.
    eos_token_id keeps GPT-2's 50256, outside this vocabulary of 100: generate() never stops early.
    """
    config = GPT2Config(vocab_size=V, n_positions=N_POSITIONS, n_embd=D, n_layer=n_layer,
                        n_head=N_HEADS, initializer_range=0.2, attn_implementation="eager")
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(config).eval()
    # Hugging Face initialises every bias to 0 and every LayerNorm scale to 1, which would let a
    # loader that drops biases or LayerNorm weights pass. Nudge every parameter off those values.
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return hf


@pytest.fixture(scope="module")
def hf32() -> GPT2LMHeadModel:
    return hf_gpt2()


@pytest.fixture(scope="module")
def hf64(hf32) -> GPT2LMHeadModel:
    return copy.deepcopy(hf32).double()


def random_ids(seed: int, B: int, T: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, V, (B, T))


def hf_logits(hf: GPT2LMHeadModel, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.from_numpy(ids)).logits.numpy()


# float32 tolerance: both sides round at every one of ~10 sums of 64-256 terms, and matmul
# libraries sum in different orders, so the two differ by a few ulps of the largest logit
# (|logit| up to ~6 here, measured difference ~6e-6). rtol 1e-5 plus an absolute allowance of
# 1e-5 * max|logit| covers that; a wrong weight, layout or GELU variant is off by > 1e-2.
def assert_close_float32(got: np.ndarray, ref: np.ndarray) -> None:
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


# --- logits --------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_layer", [2, 4])
def test_logits_match_float64(n_layer):
    hf = hf_gpt2(n_layer, seed=n_layer).double()
    model = GPT.from_gpt2(hf.state_dict(), n_heads=N_HEADS, dtype=np.float64)
    assert model.config.n_layers == n_layer and model.config.vocab_size == V
    ids = random_ids(0, 3, 40)
    np.testing.assert_allclose(model(ids), hf_logits(hf, ids), rtol=0, atol=1e-10)


def test_logits_match_float32(hf32):
    model = GPT.from_gpt2(hf32.state_dict(), n_heads=N_HEADS)  # float32 is the default
    ids = random_ids(1, 2, N_POSITIONS)  # the whole position table
    got = model(ids)
    assert got.dtype == np.float32
    assert_close_float32(got, hf_logits(hf32, ids))


def test_attention_weights_match(hf64):
    model = GPT.from_gpt2(hf64.state_dict(), n_heads=N_HEADS, dtype=np.float64)
    ids = random_ids(2, 2, 9)
    _, ours = model(ids, return_attention=True)
    with torch.no_grad():
        theirs = hf64(torch.from_numpy(ids), output_attentions=True).attentions
    assert len(ours) == len(theirs) == 3
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b.numpy(), rtol=0, atol=1e-12)


def test_numpy_state_dict_gives_the_same_model(hf64):
    sd = hf64.state_dict()
    from_torch = GPT.from_gpt2(sd, n_heads=N_HEADS, dtype=np.float64)
    from_numpy = GPT.from_gpt2({k: v.numpy() for k, v in sd.items()}, n_heads=N_HEADS,
                               dtype=np.float64)
    ids = random_ids(3, 2, 12)
    np.testing.assert_array_equal(from_numpy(ids), from_torch(ids))
    np.testing.assert_allclose(from_numpy(ids), hf_logits(hf64, ids), rtol=0, atol=1e-10)


def test_gpt2model_state_dict_without_prefix(hf64):
    # GPT2Model's keys have no 'transformer.' prefix and no lm_head; the LM head is wte (tied).
    sd = hf64.transformer.state_dict()
    assert not any(k.startswith(("transformer.", "lm_head")) for k in sd)
    model = GPT.from_gpt2(sd, n_heads=N_HEADS, dtype=np.float64)
    ids = random_ids(4, 2, 10)
    np.testing.assert_allclose(model(ids), hf_logits(hf64, ids), rtol=0, atol=1e-10)


# --- generation ----------------------------------------------------------------------------------

def hf_generate(hf: GPT2LMHeadModel, prompt: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Hugging Face greedy decoding with its own KV cache: new tokens (B, n), logits (B, n, V)."""
    ids = torch.from_numpy(prompt)
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                          min_new_tokens=n, do_sample=False, pad_token_id=0, output_logits=True,
                          return_dict_in_generate=True)
    tokens = out.sequences[:, prompt.shape[1]:].numpy()
    return tokens, torch.stack(out.logits, dim=1).numpy()


@pytest.mark.parametrize(("B", "P", "N"), [(2, 5, 16), (3, 1, 10), (1, 30, 16)])
def test_cached_greedy_matches_hf_generate_float64(hf64, B, P, N):
    model = GPT.from_gpt2(hf64.state_dict(), n_heads=N_HEADS, dtype=np.float64)
    prompt = random_ids(P, B, P)
    hf_tokens, _ = hf_generate(hf64, prompt, N)
    ours = generate_cached(model, prompt, N)
    assert hf_tokens.shape == (B, N)
    np.testing.assert_array_equal(ours.tokens, hf_tokens)
    assert all(len(set(row)) > 2 for row in ours.tokens.tolist())  # not a collapsed model
    # generate() hands back its logits cast to float32, so the float64 logits of each step come
    # from one Hugging Face forward over the finished sequence: row P - 1 + n chose token n.
    full = hf_logits(hf64, np.concatenate([prompt, hf_tokens], axis=1))
    np.testing.assert_allclose(ours.logits, full[:, P - 1:P - 1 + N], rtol=0, atol=1e-10)


def test_cached_and_naive_greedy_match_hf_generate_float32(hf32):
    model = GPT.from_gpt2(hf32.state_dict(), n_heads=N_HEADS)
    prompt = random_ids(5, 2, 6)
    hf_tokens, hf_step_logits = hf_generate(hf32, prompt, 24)
    cached = generate_cached(model, prompt, 24, prefill_chunk=4)
    np.testing.assert_array_equal(cached.tokens, hf_tokens)
    assert_close_float32(cached.logits, hf_step_logits)
    np.testing.assert_array_equal(generate_naive(model, prompt, 24).tokens, hf_tokens)


# --- bad state_dicts -----------------------------------------------------------------------------

def numpy_sd(hf: GPT2LMHeadModel) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in hf.state_dict().items()}


# A missing embedding, or a missing key of the LAST block, must be named like any other missing
# key (a layer count taken from the ln_1 keys alone would silently drop that block).
@pytest.mark.parametrize("key", ["transformer.h.0.attn.c_proj.bias",
                                 "transformer.h.1.mlp.c_fc.weight", "transformer.ln_f.weight",
                                 "transformer.h.2.ln_2.bias", "transformer.wte.weight",
                                 "transformer.wpe.weight", "transformer.h.2.ln_1.weight"])
def test_missing_key_is_named(hf32, key):
    sd = numpy_sd(hf32)
    del sd[key]
    with pytest.raises(ValueError, match=r"missing.*" + key.removeprefix("transformer.")):
        GPT.from_gpt2(sd, n_heads=N_HEADS)


@pytest.mark.parametrize(("key", "shape"), [
    ("transformer.h.1.attn.c_attn.weight", (3 * D, D)),  # nn.Linear layout instead of Conv1D
    ("transformer.h.0.attn.c_proj.bias", (D + 1,)),
    ("transformer.h.2.ln_1.weight", (D, 1)),
    ("transformer.wpe.weight", (N_POSITIONS, D + 2)),
])
def test_misshaped_key_is_named(hf32, key, shape):
    sd = numpy_sd(hf32)
    sd[key] = np.zeros(shape, np.float32)
    short = key.removeprefix("transformer.")
    with pytest.raises(ValueError, match=rf"mis-shaped.*{short}: got \({shape[0]}"):
        GPT.from_gpt2(sd, n_heads=N_HEADS)


# A 1-D wte must be named, not fail in a tuple unpack ("not enough values to unpack").
def test_one_dimensional_embedding_is_named(hf32):
    sd = numpy_sd(hf32)
    sd["transformer.wte.weight"] = np.zeros(V, np.float32)
    with pytest.raises(ValueError, match=r"wte\.weight"):
        GPT.from_gpt2(sd, n_heads=N_HEADS)


@pytest.mark.parametrize("n_heads", [3, 0, 2.0])
def test_n_heads_must_divide_d_model(hf32, n_heads):
    with pytest.raises(ValueError, match="n_heads"):
        GPT.from_gpt2(hf32.state_dict(), n_heads=n_heads)


def test_state_dict_must_be_a_mapping(hf32):
    with pytest.raises(TypeError, match="state_dict"):
        GPT.from_gpt2(list(hf32.state_dict().items()), n_heads=N_HEADS)
