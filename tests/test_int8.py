"""The int8 KV cache (beyond/int8.py): rounding within half a step, the proved attention bound,
bytes with the scales counted, refusals that change nothing, and the logits against the float
cache on random models and on the trained one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL, VARIANTS, assert_close, random_ids, small_model

from attention import causal_mask, scaled_dot_product_attention
from beyond import int8
from beyond.int8 import Int8KVCache, attention_error_bound, dequantize, int8_cache, quantize
from beyond.latent import LatentConfig, LatentGPT
from block import GPT, GPTConfig
from cache import KVCache, ModelCache
from generate import generate_cached, generate_naive
from tools import generate_cli
from tools import int8 as int8_command

ROOT = Path(__file__).resolve().parent.parent


def with_outliers(seed: int, shape: tuple[int, ...], dtype: str = "float64") -> np.ndarray:
    """Random numbers with a few channels 30x larger (what keys of big models look like) and one
    all-zero row."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    x[..., :2] *= 30.0
    x.reshape(-1, shape[-1])[0] = 0.0
    return x.astype(dtype)


def int8_state(cache: ModelCache) -> tuple:
    """Every byte a refused call must leave alone: length, real flags, int8 buffers, scales."""
    return (len(cache), cache.positions.tobytes(),
            [(kv.keys.tobytes(), kv.values.tobytes(), kv.key_scales.tobytes(),
              kv.value_scales.tobytes(), len(kv)) for kv in cache.layers])


# --- rounding ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_round_trip_is_within_half_a_step_of_each_rows_own_scale(dtype):
    x = with_outliers(0, (3, 4, 50, 32), dtype)
    q, scale = quantize(x)
    assert q.dtype == np.int8 and scale.shape == (3, 4, 50, 1)
    step = np.abs(x.astype(np.float64)).max(axis=-1, keepdims=True) / 127  # worked here, again
    np.testing.assert_allclose(scale, step, rtol=1e-6)
    error = np.abs(dequantize(q, scale, np.float64) - x)
    assert np.all(error <= step / 2 * (1 + 1e-6) + 1e-30)
    assert np.all(np.abs(q).max(axis=-1) == np.where(step[..., 0] > 0, 127, 0))  # full range
    assert np.all(dequantize(q, scale, np.float64).reshape(-1, 32)[0] == 0)  # zero row exact


def test_round_trip_fails_for_rounding_down():
    # the bound above can fail: truncating toward zero instead of rounding exceeds it
    x = with_outliers(1, (200, 32))
    _, scale = quantize(x)
    truncated = np.trunc(x / np.where(scale > 0, scale, 1)) * scale
    assert np.any(np.abs(truncated - x) > scale / 2 * (1 + 1e-6))


@pytest.mark.parametrize("bad", [np.array([[1.0, np.nan]]), np.array([[np.inf, 0.0]])])
def test_nan_and_inf_are_refused(bad):
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize(bad)


# --- the bound for one attention call ------------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
def test_attention_over_the_int8_cache_stays_within_the_proved_bound(seed):
    rng = np.random.default_rng(seed)
    t_q, t_k = int(rng.integers(1, 6)), int(rng.integers(6, 40))
    q = with_outliers(seed, (2, 4, t_q, 32)) * rng.uniform(0.05, 1.0)
    k = with_outliers(seed + 100, (2, 4, t_k, 32)) * rng.uniform(0.05, 1.0)
    v = with_outliers(seed + 200, (2, 4, t_k, 32))
    cache = Int8KVCache(2, 4, 64, 32, "float64")
    k_hat, v_hat = cache.append(k, v)
    mask = causal_mask(t_q, t_k)
    exact, _ = scaled_dot_product_attention(q, k, v, mask)
    rounded, _ = scaled_dot_product_attention(q, k_hat, v_hat, mask)
    bound = attention_error_bound(q, k, v)
    gap = np.abs(rounded - exact)
    assert np.all(gap <= bound + 1e-12)
    assert gap.max() > 0  # int8 did round something


# --- the cache -----------------------------------------------------------------------------------

def test_nbytes_count_the_scales_and_stay_under_three_tenths_of_float32():
    model = GPT(GPTConfig(), seed=0)  # the assignment's widths: d_head 32
    small, full = int8_cache(model, 3), model.new_cache(3, dtype="float32")
    c = model.config
    by_hand = 2 * c.n_layers * 3 * c.n_kv_heads * c.max_seq_len * (c.d_head + 4)
    assert small.nbytes == by_hand == int8.int8_cache_bytes(c.n_layers, 3, c.n_kv_heads,
                                                            c.max_seq_len, c.d_head)
    allocated = sum(a.nbytes for kv in small.layers
                    for a in (kv.keys, kv.values, kv.key_scales, kv.value_scales))
    assert small.nbytes == allocated
    assert small.nbytes / full.nbytes == pytest.approx(72 / 256)
    assert small.nbytes < 0.3 * full.nbytes


def test_append_returns_the_dequantized_floats_of_every_position():
    cache = Int8KVCache(2, 2, 16, 8, "float32")
    k1, v1 = with_outliers(3, (2, 2, 5, 8), "float32"), with_outliers(4, (2, 2, 5, 8), "float32")
    k2, v2 = with_outliers(5, (2, 2, 1, 8), "float32"), with_outliers(6, (2, 2, 1, 8), "float32")
    cache.append(k1, v1)
    keys, values = cache.append(k2, v2)
    assert keys.dtype == values.dtype == np.float32 and keys.shape == (2, 2, 6, 8)
    for got, x in ((keys, np.concatenate([k1, k2], 2)), (values, np.concatenate([v1, v2], 2))):
        assert np.all(np.abs(got - x) <= np.abs(x).max(-1, keepdims=True) / 254 * (1 + 1e-5))
    assert cache.keys.dtype == np.int8 and len(cache) == 6


def test_refused_appends_leave_every_byte_as_it_was():
    model = small_model("mha", "float32")
    cache = int8_cache(model, 2)
    model(random_ids(0, 2, 6), cache)
    before = int8_state(cache)
    kv = cache.layers[0]
    good = np.ones((2, 4, 1, 8), np.float32)
    bad = good.copy()
    bad[0, 0, 0, 0] = np.nan
    for k, v, error in ((bad, good, ValueError), (good, bad, ValueError),
                        (good[:, :2], good[:, :2], ValueError),
                        (np.ones((2, 4, 40, 8), np.float32),) * 2 + (ValueError,),
                        (good.tolist(), good, TypeError)):
        with pytest.raises(error):
            kv.append(k, v)
    with pytest.raises(ValueError):
        model(random_ids(1, 2, 30), cache)  # past max_seq_len
    assert int8_state(cache) == before


def test_truncate_and_reset_give_the_bytes_of_a_cache_filled_only_that_far():
    # The same K/V arrays go into both layer caches, so the bytes compare exactly (K/V computed by
    # the model for 9 tokens and for 4 may differ in their last bits, by how BLAS blocks them).
    rng = np.random.default_rng(2)
    k, v = rng.standard_normal((2, 2, 9, 8)), rng.standard_normal((2, 2, 9, 8))
    kv, shorter = Int8KVCache(2, 2, 16, 8, "float64"), Int8KVCache(2, 2, 16, 8, "float64")
    kv.append(k, v)
    shorter.append(k[:, :, :4], v[:, :, :4])
    kv.truncate(4)
    assert layer_state(kv) == layer_state(shorter)
    kv.reset()
    assert layer_state(kv) == layer_state(Int8KVCache(2, 2, 16, 8, "float64"))
    # Through the model: truncated, then continued, as if filled only that far: to rounding, or
    # within the stated int8 tolerance should one of the 9-token products round across an int8
    # step where the 4-token one did not.
    model = small_model("gqa", "float64")
    ids = random_ids(2, 2, 9)
    cache, fresh = int8_cache(model, 2), int8_cache(model, 2)
    model(ids, cache)
    model(ids[:, :4], fresh)
    cache.truncate(4)
    assert len(cache) == len(fresh) == 4
    expected = model(ids[:, 4:], fresh)
    np.testing.assert_allclose(model(ids[:, 4:], cache), expected,
                               atol=int8.LOGIT_TOLERANCE * np.abs(expected).max())


def layer_state(kv: Int8KVCache) -> tuple:
    return (kv.keys.tobytes(), kv.values.tobytes(), kv.key_scales.tobytes(),
            kv.value_scales.tobytes(), len(kv))


# --- the model with an int8 cache ----------------------------------------------------------------

@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_int8_logits_stay_within_the_stated_bound_of_the_float_ones(variant, dtype):
    # Against the float model on the very tokens the int8 run chose: a near tie (random models
    # have them: 2.320 against 2.327) may pick another token, after which the two runs' logits
    # describe different sequences.
    model = small_model(variant, dtype)
    prompts = [random_ids(s, 1, n)[0] for s, n in ((3, 4), (4, 9), (5, 6))]
    cached = generate_cached(model, prompts, 12, cache=int8_cache(model, len(prompts)))
    assert cached.logits.dtype == model.dtype
    reference = int8.teacher_forced_logits(model, prompts, cached.tokens)
    assert_close(reference[:, 0], generate_naive(model, prompts, 1).logits[:, 0], dtype)
    gap = np.abs(cached.logits - reference).max()
    assert 0 < gap <= int8.LOGIT_TOLERANCE * np.abs(reference).max()


@pytest.mark.parametrize("variant", ["mha", "rope_gqa"])
def test_the_fast_path_reads_the_int8_cache_as_the_readable_path_does(variant):
    readable, engine = small_model(variant, "float64"), small_model(variant, "float64", fast=True)
    ids = random_ids(6, 2, 10)
    out = [generate_cached(m, ids, 8, prefill_chunk=3, cache=int8_cache(m, 2)).logits
           for m in (readable, engine)]
    np.testing.assert_allclose(out[1], out[0], rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype", ["int4", "bfloat16", "bool", 8, np.int16, "int8"])
def test_a_cache_dtype_that_is_not_a_float_is_refused_by_name_before_any_work(dtype,
                                                                              model_calls):
    """cache_dtype names the float dtype of the cache generate_cached builds; an int8 cache is
    built with int8_cache and passed as cache=."""
    model = small_model("mha", "float32")
    with pytest.raises(TypeError, match="cache_dtype must be one of float16, float32"):
        generate_cached(model, random_ids(7, 2, 4), 3, cache_dtype=dtype)
    assert model_calls["forward"] == 0
    with pytest.raises(TypeError):
        model.new_cache(2, dtype=dtype)


def test_an_int8_cache_of_latents_serves_an_mla_model_within_the_int8_tolerance():
    """The protocol knows no kinds: an int8 cache shaped (1 head, d_c) stores an MLA model's
    latents rounded to int8, and the logits stay within the stated tolerance."""
    model = LatentGPT(LatentConfig(**SMALL, kv_latent=8), seed=0, dtype="float64")
    prompts = [random_ids(s, 1, n)[0] for s, n in ((3, 4), (4, 9))]
    run = generate_cached(model, prompts, 6, cache=int8_cache(model, 2))
    reference = int8.teacher_forced_logits(model, prompts, run.tokens)
    gap = np.abs(run.logits - reference).max()
    assert 0 < gap <= int8.LOGIT_TOLERANCE * np.abs(reference).max()


def test_an_int8_cache_is_still_a_layer_cache():
    kv = int8_cache(small_model("mqa", "float32"), 1).layers[0]
    assert isinstance(kv, KVCache) and (kv.n_kv_heads, kv.d_head, kv.max_len) == (1, 8, 32)


# --- the trained model ---------------------------------------------------------------------------

def test_on_the_trained_model_int8_matches_at_least_99_percent_of_held_out_prompts():
    model = GPT.load(ROOT / "checkpoints" / "reverse.npz")
    r = int8_command.compare(model, n=1000)
    assert r["float_exact"] >= 0.99 and r["int8_exact"] >= 0.99
    assert r["tokens_differ"] <= 0.01
    assert 0 < r["max_logit_diff"] <= int8.LOGIT_TOLERANCE * r["max_abs_logit"]


def test_generate_command_with_an_int8_cache(capsys):
    assert generate_cli.main(["--cache-dtype", "int8"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "along the int8 run's own tokens" in line)
    assert line.endswith("of the largest |logit|): pass")
    with pytest.raises(SystemExit):
        generate_cli.main(["--cache-dtype", "int4"])


# --- generate_cli --cache-dtype int8: the logits along the int8 run's own tokens -----------------
# A random model has near-ties: where two logits differ by less than the int8 error, the int8 run
# may take the other token, and from there on it decodes another sequence. Its logits are then
# compared with the float model's on that same sequence (teacher-forced), and the tokens are
# reported apart. On this machine 10 of these 24 seeds take another token at some step.

INT8_SEEDS = range(24)


def test_the_int8_command_passes_every_seed_and_reports_the_tokens_apart(capsys):
    failed, parted = [], 0
    for seed in INT8_SEEDS:
        code = generate_cli.main(["--random", "--cache-dtype", "int8", "--seed", str(seed),
                                  "--new-tokens", "8"])
        out = capsys.readouterr().out
        identical = "tokens identical (naive vs cached): True" in out
        parts = [line for line in out.splitlines() if " parts from the float run at step " in line]
        assert identical != bool(parts), out  # where the tokens part is said exactly when they do
        parted += not identical
        if code != 0:
            failed.append(seed)
    assert failed == []


def test_the_int8_command_with_an_eos_the_two_runs_reach_at_different_steps(capsys):
    """Seed 1, row 0: the int8 run takes token 144 at step 2 where the float run does not; with
    --eos-id 144 the int8 run stops there and the float run goes on. Arrays of two lengths."""
    code = generate_cli.main(["--random", "--cache-dtype", "int8", "--seed", "1", "--batch", "1",
                              "--eos-id", "144"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "of the largest |logit|): pass" in out


def test_the_int8_comparison_is_against_the_float_model_on_the_int8_tokens(capsys, monkeypatch):
    """The reference is teacher_forced_logits along the int8 run's own tokens: replaced by
    logits far from them, the command fails."""
    def far(model, prompts, tokens):  # noqa: ANN001, ANN202
        return int8.teacher_forced_logits(model, prompts, tokens) + 1e3

    monkeypatch.setattr(generate_cli, "teacher_forced_logits", far)
    assert generate_cli.main(["--random", "--cache-dtype", "int8", "--new-tokens", "4"]) == 1
    assert "FAIL" in capsys.readouterr().out
