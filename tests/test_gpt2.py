"""GPT.from_gpt2 against Hugging Face's GPT2LMHeadModel, built from a local GPT2Config with random
weights (nothing is downloaded).

Hugging Face runs its own attention, its own mask, its own positions for padded rows and its own
KV cache in generate(), so agreement is evidence from outside our code. Its random model is
opinionated (initializer_range 0.2) and every parameter is nudged off its initial constant (see
references.hf_gpt2), so the same tokens are a strong check, not 20 copies of one token.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import assert_close_float32, prompts_of

from block import GPT
from generate import generate_cached, generate_naive, left_pad
from tools.references import hf_generate, hf_gpt2, hf_logits

V, N_POSITIONS, D, N_HEADS = 100, 64, 64, 4


def gpt2(n_layers: int = 3, seed: int = 0, dtype: torch.dtype = torch.float64, **config):
    return hf_gpt2(V, N_POSITIONS, D, n_layers, N_HEADS, seed=seed, dtype=dtype, **config)


@pytest.fixture(scope="module")
def hf64():
    return gpt2()


@pytest.fixture(scope="module")
def hf32():
    return gpt2(dtype=torch.float32)


def ours(hf, dtype=np.float64) -> GPT:
    return GPT.from_gpt2(hf.state_dict(), dtype=dtype, hf_config=hf.config)


def random_ids(seed: int, B: int, T: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, V, (B, T))


# --- logits --------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_layers", [2, 4])
def test_logits_match_float64(n_layers):
    hf = gpt2(n_layers, seed=n_layers)
    model = GPT.from_gpt2(hf.state_dict(), n_heads=N_HEADS, dtype=np.float64)
    assert model.config.n_layers == n_layers and model.config.vocab_size == V
    ids = random_ids(0, 3, 40)
    np.testing.assert_allclose(model(ids), hf_logits(hf, ids), rtol=0, atol=1e-10)


def test_logits_match_float32(hf32):
    model = GPT.from_gpt2(hf32.state_dict(), n_heads=N_HEADS)  # float32 is the default
    ids = random_ids(1, 2, N_POSITIONS)  # the whole position table
    got = model(ids)
    assert got.dtype == np.float32
    assert_close_float32(got, hf_logits(hf32, ids))


def test_attention_weights_match():
    hf = gpt2(attn_implementation="eager")  # the fused kernels return no weights
    ids = random_ids(2, 2, 9)
    _, weights = ours(hf)(ids, return_attention=True)
    with torch.no_grad():
        theirs = hf(torch.from_numpy(ids), output_attentions=True).attentions
    assert len(weights) == len(theirs) == 3
    for a, b in zip(weights, theirs, strict=True):
        np.testing.assert_allclose(a, b.numpy(), rtol=0, atol=1e-12)


def test_numpy_state_dict_and_gpt2model_keys_give_the_same_model(hf64):
    # GPT2Model's keys have no 'transformer.' prefix and no lm_head; the LM head is wte (tied).
    bare = hf64.transformer.state_dict()
    assert not any(k.startswith(("transformer.", "lm_head")) for k in bare)
    ids = random_ids(3, 2, 12)
    expected = hf_logits(hf64, ids)
    for sd in (bare, {k: v.numpy() for k, v in hf64.state_dict().items()}):
        np.testing.assert_allclose(GPT.from_gpt2(sd, N_HEADS, np.float64)(ids), expected,
                                   rtol=0, atol=1e-10)


def test_padded_forward_with_hf_positions(hf64):
    """A mask with a hole: positions count real tokens only (as HF's generate computes them);
    HF's plain forward needs those position_ids passed, and then agrees on every real token."""
    ids = random_ids(4, 2, 6)
    mask = np.array([[0, 1, 1, 0, 1, 1], [1, 1, 1, 1, 1, 1]])
    position_ids = np.maximum(np.cumsum(mask, axis=1) - 1, 0)  # HF generate's own formula
    expected = hf_logits(hf64, ids, attention_mask=torch.from_numpy(mask),
                         position_ids=torch.from_numpy(position_ids))
    got = ours(hf64)(ids, attention_mask=mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], expected[real], rtol=0, atol=1e-10)
    without = hf_logits(hf64, ids, attention_mask=torch.from_numpy(mask))  # HF's default positions
    assert np.abs(without[real] - got[real]).max() > 1e-3  # differ: the positions matter


# --- generation ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("B", "P", "N"), [(2, 5, 16), (3, 1, 10), (1, 30, 16)])
def test_cached_greedy_matches_hf_generate_float64(hf64, B, P, N):
    prompt = random_ids(P, B, P)
    hf_tokens, _ = hf_generate(hf64, prompt, N)
    got = generate_cached(ours(hf64), prompt, N)
    assert hf_tokens.shape == (B, N)
    np.testing.assert_array_equal(got.tokens, hf_tokens)
    assert all(len(set(row)) > 2 for row in got.tokens.tolist())  # not a collapsed model
    # generate() hands back its logits cast to float32, so the float64 logits of each step come
    # from one Hugging Face forward over the finished sequence: row P - 1 + n chose token n.
    full = hf_logits(hf64, np.concatenate([prompt, hf_tokens], axis=1))
    np.testing.assert_allclose(got.logits, full[:, P - 1:P - 1 + N], rtol=0, atol=1e-10)


def test_cached_and_naive_greedy_match_hf_generate_float32(hf32):
    model = GPT.from_gpt2(hf32.state_dict(), n_heads=N_HEADS)
    prompt = random_ids(5, 2, 6)
    hf_tokens, hf_step_logits = hf_generate(hf32, prompt, 24)
    cached = generate_cached(model, prompt, 24, prefill_chunk=4)
    np.testing.assert_array_equal(cached.tokens, hf_tokens)
    assert_close_float32(cached.logits, hf_step_logits)
    np.testing.assert_array_equal(generate_naive(model, prompt, 24).tokens, hf_tokens)


def test_left_padded_batch_matches_hf_generate(hf64):
    prompts = prompts_of([3, 7, 1, 5], seed=4, vocab=V)
    ids, mask = left_pad(prompts, pad_id=0)
    tokens, logits = hf_generate(hf64, ids, 10, attention_mask=mask, pad_id=0)
    got = generate_cached(ours(hf64), prompts, 10)
    np.testing.assert_array_equal(got.tokens, tokens)
    assert_close_float32(got.logits, logits)  # HF's generate keeps its logits in float32
    # The same padded ids and mask passed as an array give the same tokens, naive too.
    np.testing.assert_array_equal(generate_naive(ours(hf64), ids, 10, attention_mask=mask)
                                  .tokens, tokens)


def test_stopping_at_eos_matches_hf_generate(hf64):
    """HF fills a finished row with pad_token_id; with pad_token_id = eos_id that is our
    'repeat eos' convention, and both stop when every row has finished."""
    model = ours(hf64)
    prompts = prompts_of([3, 7, 1, 5], seed=5, vocab=V)
    ids, mask = left_pad(prompts, pad_id=0)
    free = generate_cached(model, prompts, 12).tokens
    eos = int(free[0, 2])
    firsts = [np.flatnonzero(row == eos) for row in free]
    assert len({h[0] if h.size else 99 for h in firsts}) > 1  # rows finish at different steps
    got = generate_cached(model, prompts, 12, eos_id=eos)
    tokens, _ = hf_generate(hf64, ids, 12, attention_mask=mask, pad_id=eos, eos_id=eos)
    assert got.tokens.shape == tokens.shape
    np.testing.assert_array_equal(got.tokens, tokens)


# --- what from_gpt2 refuses ----------------------------------------------------------------------

def numpy_sd(hf) -> dict[str, np.ndarray]:
    """Copies: .numpy() alone shares memory with the model, which a test would then corrupt."""
    return {k: v.numpy().copy() for k, v in hf.state_dict().items()}


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


def test_one_dimensional_embedding_is_named(hf32):
    sd = numpy_sd(hf32)
    sd["transformer.wte.weight"] = np.zeros(V, np.float32)
    with pytest.raises(ValueError, match=r"wte\.weight"):
        GPT.from_gpt2(sd, n_heads=N_HEADS)


@pytest.mark.parametrize(("n_heads", "match"), [
    (3, "d_model=64 is not divisible by n_heads=3"),
    (0, "^from_gpt2 n_heads must be a positive int, got 0"),
    (2.0, "^from_gpt2 n_heads must be a positive int"), (True, "^from_gpt2 n_heads must be"),
    (None, r"^from_gpt2: give n_heads, or hf_config \(the model's GPT2Config\)$"),
])
def test_n_heads_must_be_given_and_divide_d_model(hf32, n_heads, match):
    with pytest.raises(ValueError, match=match):
        GPT.from_gpt2(hf32.state_dict(), n_heads=n_heads)


def test_n_heads_must_agree_with_the_config(hf32):
    with pytest.raises(ValueError, match="n_heads=2 contradicts hf_config.n_head=4"):
        GPT.from_gpt2(hf32.state_dict(), n_heads=2, hf_config=hf32.config)


def test_state_dict_must_be_a_mapping(hf32):
    with pytest.raises(TypeError, match="^from_gpt2: state_dict must be a mapping, got "
                                        "<class 'list'>$"):
        GPT.from_gpt2(list(hf32.state_dict().items()), n_heads=N_HEADS)


@pytest.mark.parametrize("dtype", [np.float16, np.int32, np.complex64, None])
def test_from_gpt2_refuses_the_dtypes_the_constructor_refuses(hf32, dtype):
    with pytest.raises(TypeError, match="dtype must be one of float32, float64"):
        GPT.from_gpt2(hf32.state_dict(), n_heads=N_HEADS, dtype=dtype)


@pytest.mark.parametrize("weight_dtype", [np.int32, bool, np.complex64])
def test_from_gpt2_refuses_weights_that_are_not_real_floats(hf32, weight_dtype):
    sd = numpy_sd(hf32)
    sd["transformer.h.0.mlp.c_fc.bias"] = sd["transformer.h.0.mlp.c_fc.bias"].astype(weight_dtype)
    with pytest.raises(TypeError, match="h.0.mlp.c_fc.bias must be a floating-point array"):
        GPT.from_gpt2(sd, n_heads=N_HEADS)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_from_gpt2_refuses_nan_or_inf_weights(hf32, value):
    sd = numpy_sd(hf32)
    sd["transformer.h.1.ln_2.weight"][3] = value
    with pytest.raises(ValueError, match=r"h.1.ln_2.gamma'\] hold NaN or inf"):
        GPT.from_gpt2(sd, n_heads=N_HEADS)


def test_bfloat16_and_float16_checkpoints_are_converted(hf32):
    ids = random_ids(6, 2, 8)
    expected = hf_logits(hf32, ids)
    for dtype, tol in ((torch.bfloat16, 3e-2), (torch.float16, 3e-3)):
        sd = {k: v.to(dtype) for k, v in hf32.state_dict().items()}
        got = GPT.from_gpt2(sd, n_heads=N_HEADS)(ids)  # weights rounded to 8 / 11 bits
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=0, atol=tol * np.abs(expected).max())


def test_the_configs_activation_and_epsilon_are_used_or_refused(hf32):
    for refused in ({"activation_function": "gelu"}, {"activation_function": "relu"},
                    {"scale_attn_weights": False}, {"scale_attn_by_inverse_layer_idx": True}):
        hf = gpt2(2, dtype=torch.float32, **refused)
        match = (r"is not implemented \(this model computes the tanh GELU: gelu_new, "
                 r"gelu_pytorch_tanh\)$" if "activation_function" in refused else
                 r"^from_gpt2: only scores scaled by 1 / sqrt\(d_head\) are implemented "
                 r"\(scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False\)$")
        with pytest.raises(ValueError, match=match):
            ours(hf, np.float32)
    hf = gpt2(2, activation_function="gelu_pytorch_tanh", layer_norm_epsilon=1e-3)
    model = ours(hf)
    assert model.config.ln_eps == 1e-3
    ids = random_ids(7, 2, 8)
    np.testing.assert_allclose(model(ids), hf_logits(hf, ids), rtol=0, atol=1e-10)


def test_a_config_that_leaves_settings_out_gets_gpt2s_defaults(hf64):
    """hf_config is read attribute by attribute: an object that gives only n_head gets the
    defaults of GPT2Config itself (tanh GELU, scores scaled by 1 / sqrt(d_head), LayerNorm epsilon
    1e-5), so the model still matches Hugging Face's (which uses those defaults)."""
    from transformers import GPT2Config

    defaults = GPT2Config()
    assert (defaults.activation_function, defaults.scale_attn_weights,
            defaults.scale_attn_by_inverse_layer_idx) == ("gelu_new", True, False)
    model = GPT.from_gpt2(hf64.state_dict(), dtype=np.float64,
                          hf_config=SimpleNamespace(n_head=N_HEADS))
    assert model.config.ln_eps == defaults.layer_norm_epsilon == 1e-5
    ids = random_ids(8, 2, 8)
    np.testing.assert_allclose(model(ids), hf_logits(hf64, ids), rtol=0, atol=1e-10)


def test_a_config_without_n_head_is_refused_by_name(hf32):
    with pytest.raises(ValueError, match="^from_gpt2 hf_config.n_head must be a positive int, "
                                         "got None"):
        GPT.from_gpt2(hf32.state_dict(), hf_config=SimpleNamespace())


def test_old_checkpoints_causal_mask_buffers_are_skipped(hf64):
    """Older GPT-2 checkpoints store, in every block, the causal mask as a uint8 buffer
    (attn.bias) and attn.masked_bias; they are not weights. Skipped, whatever comes after them,
    the model is Hugging Face's; read as weights, the uint8 mask would be refused."""
    sd = {}
    for key, value in hf64.state_dict().items():
        sd[key] = value
        if key.endswith(".ln_1.weight"):  # first key of a block: the buffers come before the rest
            block = key.removesuffix("ln_1.weight")
            tril = torch.tril(torch.ones(N_POSITIONS, N_POSITIONS, dtype=torch.uint8))
            sd[block + "attn.bias"] = tril[None, None]
            sd[block + "attn.masked_bias"] = torch.tensor(-1e4)
    model = GPT.from_gpt2(sd, n_heads=N_HEADS, dtype=np.float64)
    ids = random_ids(9, 2, 8)
    np.testing.assert_allclose(model(ids), hf_logits(hf64, ids), rtol=0, atol=1e-10)
