"""block.GPT: its weights (one table, one constructor, .npz save/load), shapes, causality of the
whole model, positions and padding kept by the cache, and calls that are refused, or fail half-way,
leaving the cache exactly as it was.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import asdict

import numpy as np
import pytest
from conftest import SMALL, VARIANTS, cache_state, random_ids, small_model
from hypothesis import given, settings
from hypothesis import strategies as st

import block
from block import GPT, GPTConfig, weight_shapes
from cache import KVCache, ModelCache, kv_cache_bytes
from generate import decode, left_pad, prefill

FEW = settings(max_examples=20, deadline=None)
V = SMALL["vocab_size"]


# --- weights: one table, one constructor ---------------------------------------------------------

def test_weight_table_by_hand():
    shapes = weight_shapes(GPTConfig(vocab_size=10, max_seq_len=6, d_model=8, n_heads=4,
                                     n_kv_heads=2, n_layers=1, d_ff=12))
    # d_head = 2, so K and V have 2 heads x 2 = 4 columns; Q and the output 4 x 2 = 8.
    assert shapes == {
        "wte": (10, 8), "wpe": (6, 8), "h.0.ln_1.gamma": (8,), "h.0.ln_1.beta": (8,),
        "h.0.attn.w_q": (8, 8), "h.0.attn.b_q": (8,), "h.0.attn.w_k": (8, 4),
        "h.0.attn.b_k": (4,), "h.0.attn.w_v": (8, 4), "h.0.attn.b_v": (4,),
        "h.0.attn.w_o": (8, 8), "h.0.attn.b_o": (8,), "h.0.ln_2.gamma": (8,),
        "h.0.ln_2.beta": (8,), "h.0.mlp.w_fc": (8, 12), "h.0.mlp.b_fc": (12,),
        "h.0.mlp.w_proj": (12, 8), "h.0.mlp.b_proj": (8,), "ln_f.gamma": (8,),
        "ln_f.beta": (8,)}
    assert "wpe" not in weight_shapes(GPTConfig(rope=True))  # RoPE: no position table


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_named_weights_follow_the_table(variant):
    model = small_model(variant)
    named = model.named_weights()
    assert {k: w.shape for k, w in named.items()} == weight_shapes(model.config)
    assert all(w.dtype == np.float64 for w in named.values())


def test_random_init_is_gpt2s_and_the_same_in_every_dtype():
    config = GPTConfig(**SMALL)
    a, b = GPT(config, seed=3, dtype=np.float64), GPT(config, seed=3, dtype=np.float32)
    for name, w in a.named_weights().items():
        np.testing.assert_array_equal(b.named_weights()[name], w.astype(np.float32))
        if name.endswith(".gamma"):
            assert np.all(w == 1.0)
        elif w.ndim == 1:
            assert np.all(w == 0.0)
        else:
            assert abs(w.std() - 0.2) < 0.05  # init_std of SMALL
    assert not np.array_equal(GPT(config, seed=4).wte, b.wte)


def test_given_weights_are_copied_not_aliased():
    named = small_model().named_weights()
    model = GPT(small_model().config, dtype=np.float64, weights=named)
    assert not any(np.shares_memory(w, named[k]) for k, w in model.named_weights().items())
    ids = random_ids(0, 2, 5)
    np.testing.assert_array_equal(model(ids), small_model()(ids))


@pytest.mark.parametrize("dtype", [np.float16, np.int32, np.complex64, None, "float8", bool])
def test_model_refuses_other_dtypes(dtype):
    with pytest.raises(TypeError, match="dtype must be one of float32, float64"):
        GPT(GPTConfig(**SMALL), dtype=dtype)


def broken(name: str, value: object) -> dict:
    named = dict(small_model().named_weights())
    if value is None:
        del named[name]
    else:
        named[name] = value
    return named


@pytest.mark.parametrize(("weights", "error", "match"), [
    (broken("h.1.attn.w_k", None), ValueError, r"missing \['h.1.attn.w_k'\]"),
    (broken("h.2.attn.w_k", np.zeros((32, 32))), ValueError, r"unexpected \['h.2.attn.w_k'\]"),
    (broken("h.0.mlp.w_fc", np.zeros((32, 127))), ValueError, r"h.0.mlp.w_fc must have shape"),
    (broken("wte", np.zeros((V, 32), dtype=np.int64)), TypeError,
     "wte must be a floating-point array, got int64$"),
    (broken("wpe", np.zeros((32, 32), dtype=bool)), TypeError,
     "wpe must be a floating-point array, got bool$"),
    (broken("ln_f.beta", [0.0] * 32), TypeError, "ln_f.beta must be a floating-point array, got "
                                                 "list$"),
    (broken("h.0.attn.b_q", np.full(32, np.nan)), ValueError, r"\['h.0.attn.b_q'\] hold NaN"),
    (broken("wte", np.full((V, 32), 1e300)), ValueError, "hold NaN or inf .in float32"),
    ([("wte", np.zeros((V, 32)))], TypeError, "mapping"),
])
@pytest.mark.filterwarnings("error")  # a value overflowing float32 is refused, without a warning
def test_constructor_refuses_weights_that_do_not_fit_the_config(weights, error, match):
    with pytest.raises(error, match=match):
        GPT(small_model().config, dtype=np.float32, weights=weights)


def test_a_name_mismatch_lists_four_names_and_says_when_there_are_more():
    """The message stays one line for a model of any size: the first four names (sorted) of each
    kind, then ' ...' only when there are more than four."""
    named = dict(small_model().named_weights())
    gone = sorted(named)[:5]
    for extra, cut in ((5, 5), (4, 4)):
        weights = {k: w for k, w in named.items() if k not in gone[:cut]}
        weights |= {f"x{i}": np.zeros(1) for i in range(extra)}
        more = " ..." if cut > 4 else ""
        expected = (f"weights do not match the config: missing {gone[:4]}{more}, "
                    f"unexpected {['x0', 'x1', 'x2', 'x3']}{more}")
        with pytest.raises(ValueError) as err:
            GPT(small_model().config, weights=weights)
        assert str(err.value) == expected


# --- save and load -------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["mha", "rope_gqa"])
def test_save_then_load_is_the_same_model(tmp_path, variant):
    model = small_model(variant)
    path = model.save(tmp_path / "m.npz")
    assert path == tmp_path / "m.npz" and sorted(tmp_path.iterdir()) == [path]
    with np.load(path, allow_pickle=False) as f:  # a plain .npz: no pickled object inside
        assert set(f.files) == {"config", *weight_shapes(model.config)}
    loaded = GPT.load(path, dtype=np.float64)
    assert loaded.config == model.config
    ids = random_ids(1, 2, 6)
    np.testing.assert_array_equal(loaded(ids), model(ids))
    assert GPT.load(path).dtype == np.float32  # float32 unless asked


def write_zip(path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)


def npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def test_load_refuses_what_it_cannot_trust(tmp_path):
    model = small_model()
    good = model.save(tmp_path / "good.npz")
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        GPT.load(tmp_path / "missing.npz")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ValueError, match="not a .npz checkpoint"):
        GPT.load(tmp_path / "text.npz")
    write_zip(tmp_path / "pickle.npz", {"config.npy": npy(np.array([{"a": 1}], dtype=object),
                                                          allow_pickle=True)})
    with pytest.raises(ValueError, match="without pickles"):
        GPT.load(tmp_path / "pickle.npz")
    with zipfile.ZipFile(good) as z:
        members = {name: z.read(name) for name in z.namelist()}
    write_zip(tmp_path / "noconfig.npz", {k: v for k, v in members.items() if k != "config.npy"})
    with pytest.raises(ValueError, match="no 'config' entry"):
        GPT.load(tmp_path / "noconfig.npz")
    # The config must be one JSON string: not a number, not an array of strings.
    for name, config in (("number", np.array(5)), ("strings", np.array(['{"d_model": 32}']))):
        write_zip(tmp_path / f"{name}.npz", members | {"config.npy": npy(config)})
        with pytest.raises(ValueError, match=r"has no 'config' entry \(a JSON string\) "
                                             "describing the model$"):
            GPT.load(tmp_path / f"{name}.npz")
    for name, config, match in (("badjson", "{", "not valid JSON"),
                                ("list", "[1]", "JSON object"),
                                ("field", '{"d_model": 32, "colour": 1}', "invalid config"),
                                ("value", '{"d_model": 30, "n_heads": 4}', "invalid config")):
        write_zip(tmp_path / f"{name}.npz", members | {"config.npy": npy(np.array(config))})
        with pytest.raises(ValueError, match=match):
            GPT.load(tmp_path / f"{name}.npz")
    # A config that does not match the weights: another d_model.
    other = json.dumps(asdict(model.config) | {"d_model": 64, "d_ff": 256})
    write_zip(tmp_path / "mismatch.npz", members | {"config.npy": npy(np.array(other))})
    with pytest.raises(ValueError, match="wte must have shape .64, 64."):
        GPT.load(tmp_path / "mismatch.npz")


@pytest.mark.parametrize(("name", "match"), [("m.pt", r"must end in .npz, got '\S+/m.pt'$"),
                                             ("m", r"must end in .npz, got '\S+/m'$"),
                                             ("nowhere/m.npz", r"'\S+/nowhere' does not exist")])
def test_save_writes_exactly_the_path_asked_for_or_nothing(tmp_path, name, match):
    with pytest.raises(ValueError, match=match):
        small_model().save(tmp_path / name)
    assert list(tmp_path.iterdir()) == []


# --- the config ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "match"), [
    ({"d_model": 30, "n_heads": 4}, "d_model=30"),
    ({"n_heads": 4, "n_kv_heads": 3}, "n_kv_heads=3"),
    ({"n_heads": 4, "n_kv_heads": 0}, "n_kv_heads=0"),
    ({"n_kv_heads": True}, "n_kv_heads=True"),
    ({"n_kv_heads": 2.0}, "n_kv_heads=2.0"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"n_layers": 1.5}, "n_layers"),
    ({"max_seq_len": True}, "max_seq_len"),
    ({"d_ff": 0}, "d_ff"), ({"d_ff": -5}, "d_ff"), ({"d_ff": 2.5}, "d_ff"),
    ({"d_ff": True}, "d_ff"),
    ({"ln_eps": -1e-5}, "ln_eps"), ({"ln_eps": 0.0}, "ln_eps"),
    ({"ln_eps": float("nan")}, "ln_eps"),
    ({"init_std": float("nan")}, "init_std"), ({"init_std": -0.1}, "init_std"),
    ({"rope": True, "rope_base": 0.0}, "rope_base"), ({"rope_base": -2.0}, "rope_base"),
    ({"rope_base": float("inf")}, "rope_base"),
    ({"rope": "no"}, "rope must be True or False"), ({"rope": 1}, "rope must be True or False"),
    ({"rope": True, "d_model": 36, "n_heads": 4}, "even d_head"),
])
def test_config_refuses_bad_settings(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        GPTConfig(**{**SMALL, **kwargs})


def test_config_fills_its_defaults():
    c = GPTConfig(d_model=64, n_heads=8)
    assert (c.n_kv_heads, c.d_ff, c.d_head) == (8, 256, 8)


def test_model_refuses_a_config_that_is_not_one():
    with pytest.raises(TypeError, match="config must be a GPTConfig"):
        GPT(SMALL)
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        GPT(GPTConfig(**SMALL), seed=-1)


# --- shapes --------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_shape_and_dtype(variant):
    for dtype in ("float32", "float64"):
        logits = small_model(variant, dtype)(random_ids(0, 3, 7))
        assert logits.shape == (3, 7, V)
        assert logits.dtype == np.dtype(dtype)
        assert np.isfinite(logits).all()


def test_last_only_is_the_last_row():
    model = small_model()
    ids = random_ids(1, 2, 6)
    assert model(ids, last_only=True).shape == (2, 1, V)
    np.testing.assert_allclose(model(ids, last_only=True), model(ids)[:, -1:], rtol=0, atol=1e-12)


def test_returned_attention_is_causal_and_normalised():
    model = small_model("gqa")
    ids = random_ids(2, 2, 5)
    cache = model.new_cache(2)
    model(ids[:, :3], cache)
    _, weights = model(ids[:, 3:], cache, return_attention=True)  # 2 queries after 3 cached
    assert len(weights) == SMALL["n_layers"]
    future = ~np.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=bool)  # positions 3, 4
    for w in weights:
        assert w.shape == (2, SMALL["n_heads"], 2, 5)
        assert np.all(w[..., future] == 0.0)
        np.testing.assert_allclose(w.sum(axis=-1), 1.0, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_cache_stores_only_the_kv_heads(n_kv_heads):
    model = GPT(GPTConfig(n_heads=4, n_kv_heads=n_kv_heads, max_seq_len=64))
    cache = model.new_cache(2)
    model(np.zeros((2, 5), dtype=np.int64), cache)
    assert cache.layers[0].keys.shape == (2, n_kv_heads, 64, 32) and len(cache) == 5
    # 2 (K, V) * 2 layers * batch 2 * n_kv heads * 64 positions * d_head 32 * 4 bytes
    assert cache.nbytes == 2 * 2 * 2 * n_kv_heads * 64 * 32 * 4
    assert cache.nbytes == kv_cache_bytes(2, 2, n_kv_heads, 32, 64, np.float32)


def test_a_float16_cache_stores_rounded_keys():
    model = small_model("mha", "float32")
    cache = model.new_cache(1, dtype=np.float16)
    ids = random_ids(3, 1, 6)
    logits = model(ids, cache)
    assert cache.layers[0].keys.dtype == np.float16 and logits.dtype == np.float32
    np.testing.assert_allclose(logits, model(ids), rtol=0, atol=1e-2 * np.abs(logits).max())


# --- causality of the whole model ----------------------------------------------------------------

@FEW
@given(variant=st.sampled_from(sorted(VARIANTS)), B=st.integers(1, 3), T=st.integers(2, 10),
       seed=st.integers(0, 2**16), data=st.data())
def test_model_is_causal_under_perturbation(variant, B, T, seed, data):
    t = data.draw(st.integers(1, T - 1), label="t")
    model = small_model(variant)
    ids = random_ids(seed, B, T)
    changed = ids.copy()
    changed[:, t:] = (ids[:, t:] + 1 + random_ids(seed + 1, B, T - t) % 63) % 64  # every one new
    assert np.all(changed[:, t:] != ids[:, t:])
    a, b = model(ids), model(changed)
    np.testing.assert_array_equal(a[:, :t], b[:, :t])  # exactly: the past cannot see the future
    assert not np.array_equal(a[:, t:], b[:, t:])


# --- positions and padding live in the cache -----------------------------------------------------

def test_after_a_padded_prefill_decode_needs_no_mask():
    """The cache keeps the padding mask: a decode step with nothing but the new token gives the
    logits of a full forward with the whole mask (positions counted over real tokens only)."""
    model = small_model("rope_gqa")
    ids, mask = left_pad([np.array([5, 9, 2]), np.array([7]), np.array([1, 2, 3, 4])])
    cache = model.new_cache(3)
    prefill(model, ids, cache, attention_mask=mask)
    token = np.array([11, 12, 13])
    step = decode(model, token, cache)  # no mask
    full_ids = np.concatenate([ids, token[:, None]], axis=1)
    full_mask = np.concatenate([mask, np.ones((3, 1), dtype=mask.dtype)], axis=1)
    np.testing.assert_allclose(step, model(full_ids, attention_mask=full_mask)[:, -1], rtol=0,
                               atol=1e-10)
    np.testing.assert_array_equal(cache.real_counts(), [4, 2, 5])


def test_a_later_mask_that_agrees_is_accepted_and_one_that_contradicts_is_refused():
    model = small_model()
    ids, mask = left_pad([np.array([5, 9]), np.array([7])])
    cache = model.new_cache(2)
    model(ids, cache, attention_mask=mask)
    agreeing = np.concatenate([mask, [[1], [1]]], axis=1)
    model(np.array([[3], [4]]), cache, attention_mask=agreeing)
    before = cache_state(cache)
    contradicting = np.ones((2, 4), dtype=int)  # says row 1's pad was a token
    with pytest.raises(ValueError, match="contradicts the cache: row 1"):
        model(np.array([[3], [4]]), cache, attention_mask=contradicting)
    assert cache_state(cache) == before


def test_a_mask_with_holes_counts_real_tokens_for_positions():
    """Positions count the real tokens before a token, holes included: a row [a, pad, b] puts b
    at position 1, as if the pad were not there (the padded slot is also never attended)."""
    model = small_model()
    a, b = 5, 9
    with_hole = model(np.array([[a, 0, b]]), attention_mask=np.array([[1, 0, 1]]))
    without = model(np.array([[a, b]]))
    np.testing.assert_allclose(with_hole[:, [0, 2]], without, rtol=0, atol=1e-12)


# --- refused calls change nothing ----------------------------------------------------------------

def half_filled(model: GPT, B: int = 2, P: int = 4) -> ModelCache:
    cache = model.new_cache(B)
    model(random_ids(7, B, P), cache)
    return cache


@pytest.mark.parametrize(("ids", "error", "match"), [
    (np.zeros(5, int), ValueError, r"ids must have 2 dimension.*\(5,\)"),
    (np.zeros((2, 2, 3), int), ValueError, "ids must have 2 dimension"),
    (np.zeros((2, 0), int), ValueError, "ids must not be empty"),
    (np.zeros((2, 3)), TypeError, "ids must be integers.*float64"),
    (np.array([[1, 64], [0, 0]]), ValueError, r"ids must be in \[0, 64\)"),
    (np.array([[-1, 3], [0, 0]]), ValueError, r"ids must be in \[0, 64\)"),
    ("12", TypeError, "ids must be an integer array"),
    (np.zeros((3, 1), int), ValueError, "batch of 3 rows cannot use a cache of batch 2"),
    (np.zeros((2, 29), int), ValueError, "exceed the cache's max_len=32"),
])
def test_bad_ids_are_refused_before_the_cache_changes(ids, error, match):
    model = small_model()
    cache = half_filled(model)
    before = cache_state(cache)
    with pytest.raises(error, match=match):
        model(ids, cache)
    assert cache_state(cache) == before


@pytest.mark.parametrize(("mask", "error", "match"), [
    (np.ones((2, 4), int), ValueError, r"shape \(2, 5\), got \(2, 4\)"),
    (np.ones((2, 6), int), ValueError, r"shape \(2, 5\)"),
    (np.ones((1, 5), int), ValueError, r"shape \(2, 5\)"),
    (np.full((2, 5), 0.5), ValueError, "only 0 .padding. and 1"),
    (np.full((2, 5), 2), ValueError, "only 0 .padding. and 1"),
    (np.full((2, 5), -1), ValueError, "only 0 .padding. and 1"),
    (np.full((2, 5), np.nan), ValueError, "only 0 .padding. and 1"),
    (np.full((2, 5), "1"), TypeError, "0/1 .or bool."),
    ([[1] * 5] * 2, TypeError, "numpy array"),
])
def test_bad_attention_masks_are_refused_before_the_cache_changes(mask, error, match):
    model = small_model()
    cache = half_filled(model)  # 4 cached + 1 new: the mask must be (2, 5)
    before = cache_state(cache)
    with pytest.raises(error, match=match):
        model(random_ids(8, 2, 1), cache, attention_mask=mask)
    assert cache_state(cache) == before


def test_a_row_with_no_real_token_is_refused_without_a_cache():
    with pytest.raises(ValueError, match="row 1 of attention_mask has no real token"):
        small_model()(random_ids(9, 2, 3), attention_mask=np.array([[1, 1, 1], [0, 0, 0]]))


def test_caches_of_another_kind_are_refused_before_any_change():
    model = small_model("gqa")
    cache = half_filled(model)
    before = cache_state(cache)
    with pytest.raises(TypeError, match="cache must keep the cache protocol"):
        model(random_ids(9, 2, 1), cache.layers)  # the list of layers is not the cache
    with pytest.raises(TypeError, match="cache must keep the cache protocol"):
        model(random_ids(9, 2, 1), [])
    with pytest.raises(ValueError, match=r"cache layer 0 is \(H_kv, d_head\) = \(2, 8\)"):
        small_model("mha")(random_ids(9, 2, 1), cache)
    with pytest.raises(ValueError, match="cache has 2 layers, the model 3"):
        GPT(GPTConfig(**{**SMALL, "n_layers": 3, "n_kv_heads": 2}))(random_ids(9, 2, 1), cache)
    assert cache_state(cache) == before


def test_layer_caches_of_different_lengths_are_refused():
    model = small_model()
    cache = model.new_cache(1)
    cache.layers[0].append(np.zeros((1, 4, 2, 8)), np.zeros((1, 4, 2, 8)))
    before = cache_state(cache)
    with pytest.raises(ValueError, match="disagree"):
        model(random_ids(10, 1, 1), cache)
    assert cache_state(cache) == before


def test_positions_past_max_seq_len_are_refused():
    model = small_model()
    with pytest.raises(ValueError, match="max_seq_len=32"):
        model(random_ids(11, 1, 33))
    big = ModelCache([KVCache(2, 4, 40, 8, np.float64) for _ in range(2)])  # room past 32
    model(random_ids(12, 2, 30), big)
    before = cache_state(big)
    with pytest.raises(ValueError, match=r"position 32 is past max_seq_len=32"):
        model(random_ids(13, 2, 3), big)
    assert cache_state(big) == before
    model(random_ids(14, 2, 2), big)  # exactly filling the table is allowed
    assert len(big) == 32


def test_a_forward_that_fails_half_way_leaves_the_cache_as_it_was(monkeypatch):
    """Layer 0 has appended when layer 1 fails (here: a simulated out-of-memory): the cache is
    rolled back, and the same call then succeeds on it as on a fresh cache."""
    model = small_model()
    cache = half_filled(model)
    before = cache_state(cache)
    real_block, calls = block.transformer_block, []

    def fails_in_layer_1(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError("simulated")
        return real_block(*args, **kwargs)

    monkeypatch.setattr(block, "transformer_block", fails_in_layer_1)
    with pytest.raises(MemoryError):
        model(random_ids(15, 2, 3), cache)
    assert len(calls) == 2 and cache_state(cache) == before
    monkeypatch.undo()
    fresh = half_filled(model)
    np.testing.assert_array_equal(model(random_ids(15, 2, 3), cache),
                                  model(random_ids(15, 2, 3), fresh))


def test_a_model_that_cannot_fit_in_memory_is_refused_before_allocating(monkeypatch):
    """A million layers of the assignment's width: per block 2 LayerNorms (4 * 128) + Q, K, V, O
    (4 * 128 * 128 + 4 * 128) + MLP (2 * 128 * 512 + 512 + 128) = 198,272 weights, plus wte,
    wpe, ln_f (256 * 128 + 128 * 128 + 256 = 49,408): ~0.8 TB in float32. Refused from the
    weight tables alone, before any array exists (random_weights must never run)."""
    monkeypatch.setattr(block, "random_weights", lambda *a: pytest.fail("allocated"))
    with pytest.raises(ValueError, match=r"GPT: 198,272,049,408 weights needs .* GiB, more than"):
        GPT(GPTConfig(n_layers=1_000_000))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_count_weights_is_the_size_of_the_table(variant):
    config = small_model(variant).config
    assert block.count_weights(config) == sum(w.size for w in small_model(variant)
                                              .named_weights().values())


def test_a_cache_for_too_many_rows_is_refused_before_any_layer_exists(monkeypatch):
    from parts import checks

    monkeypatch.setattr(checks, "available_memory", lambda: 2**30)
    monkeypatch.setattr(block, "KVCache", lambda *a: pytest.fail("allocated a layer"))
    # 2 layers * 2 (K, V) * 8,192 rows * 4 heads * 128 positions * 32 * 4 bytes = 2 GiB > 1 GiB
    with pytest.raises(ValueError, match="a cache for 8192 rows needs 2.0 GiB"):
        GPT(GPTConfig()).new_cache(8192)
