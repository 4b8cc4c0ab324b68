"""block.GPT: shapes, causality of the whole model, chunked prefill through the cache, and bad
input refused before any cache changes.

Reference for chunked prefill: one forward over the whole sequence with no cache. The same model
code runs both, but with different query/key lengths, masks and cache reads, which is exactly what
a chunking bug (square mask, positions from the wrong place, a write at the wrong offset) breaks.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from block import GPT, GPTConfig
from cache import KVCache

FEW = settings(max_examples=20, deadline=None)

# Small, but every axis distinct: vocab 64, 32 positions, d_model 32, 4 heads of 8, 2 layers.
# init_std 0.2 so attention is far from uniform and logits differ clearly between tokens.
SMALL = {"vocab_size": 64, "max_seq_len": 32, "d_model": 32, "n_heads": 4, "n_layers": 2,
         "init_std": 0.2}
VARIANTS = {
    "mha": {},
    "gqa2": {"n_kv_heads": 2},
    "mqa": {"n_kv_heads": 1},
    "rope": {"rope": True},
    "rope_gqa2": {"rope": True, "n_kv_heads": 2},
}


@functools.cache
def small_model(variant: str = "mha", dtype: str = "float64") -> GPT:
    return GPT(GPTConfig(**SMALL, **VARIANTS[variant]), seed=1, dtype=dtype)


def random_ids(seed: int, B: int, T: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, SMALL["vocab_size"], (B, T))


def cache_state(caches: list[KVCache]) -> list[tuple[bytes, bytes, int]]:
    return [(c.keys.tobytes(), c.values.tobytes(), len(c)) for c in caches]


def run_in_chunks(model: GPT, ids: np.ndarray, sizes: list[int]) -> tuple[np.ndarray, list]:
    """Feed ids (B, P) through one cache in chunks of the given sizes; logits (B, P, V)."""
    caches = model.new_cache(ids.shape[0])
    out, start = [], 0
    for t in sizes:
        out.append(model(ids[:, start:start + t], caches))
        start += t
        assert all(len(c) == start for c in caches)  # every layer holds exactly what was fed
    return np.concatenate(out, axis=1), caches


# --- shapes --------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_shape_and_dtype(variant):
    for dtype in ("float32", "float64"):
        model = small_model(variant, dtype)
        logits = model(random_ids(0, 3, 7))
        assert logits.shape == (3, 7, SMALL["vocab_size"])
        assert logits.dtype == np.dtype(dtype)
        assert np.isfinite(logits).all()


def test_last_only_is_the_last_row():
    model = small_model()
    ids = random_ids(1, 2, 6)
    np.testing.assert_array_equal(model(ids, last_only=True).shape, (2, 1, SMALL["vocab_size"]))
    np.testing.assert_allclose(model(ids, last_only=True), model(ids)[:, -1:], rtol=0, atol=1e-12)


def test_returned_attention_is_causal_and_normalised():
    model = small_model("gqa2")
    ids = random_ids(2, 2, 5)
    caches = model.new_cache(2)
    model(ids[:, :3], caches)
    _, weights = model(ids[:, 3:], caches, return_attention=True)  # 2 queries after 3 cached
    assert len(weights) == SMALL["n_layers"]
    future = ~np.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=bool)  # positions 3, 4
    for w in weights:
        assert w.shape == (2, SMALL["n_heads"], 2, 5)
        assert np.all(w[..., future] == 0.0)
        np.testing.assert_allclose(w.sum(axis=-1), 1.0, rtol=0, atol=1e-12)


def test_all_ones_attention_mask_changes_nothing():
    model = small_model()
    ids = random_ids(3, 2, 6)
    np.testing.assert_allclose(model(ids, attention_mask=np.ones((2, 6), int)), model(ids),
                               rtol=0, atol=1e-12)


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


# --- chunked prefill -----------------------------------------------------------------------------

@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_uneven_chunks_5_1_3_equal_one_forward(variant):
    model = small_model(variant)
    ids = random_ids(4, 2, 9)
    chunked, caches = run_in_chunks(model, ids, [5, 1, 3])
    np.testing.assert_allclose(chunked, model(ids), rtol=0, atol=1e-10)
    # The cache holds what a single prefill would have written.
    _, one_shot = run_in_chunks(model, ids, [9])
    for c, ref in zip(caches, one_shot, strict=True):
        np.testing.assert_allclose(c.keys[:, :, :9], ref.keys[:, :, :9], rtol=0, atol=1e-12)
        np.testing.assert_allclose(c.values[:, :, :9], ref.values[:, :, :9], rtol=0, atol=1e-12)


def chunk_sizes(P: int) -> st.SearchStrategy[list[int]]:
    """Every way to cut P positions into consecutive non-empty chunks."""
    cuts = st.sets(st.integers(1, P - 1)) if P > 1 else st.just(set())
    return cuts.map(lambda c: np.diff([0, *sorted(c), P]).tolist())


@FEW
@given(variant=st.sampled_from(sorted(VARIANTS)), B=st.integers(1, 3), P=st.integers(1, 14),
       seed=st.integers(0, 2**16), data=st.data())
def test_any_chunk_split_equals_one_forward(variant, B, P, seed, data):
    sizes = data.draw(chunk_sizes(P), label="sizes")
    model = small_model(variant)
    ids = random_ids(seed, B, P)
    chunked, _ = run_in_chunks(model, ids, sizes)
    np.testing.assert_allclose(chunked, model(ids), rtol=0, atol=1e-10)


def test_chunked_prefill_float32():
    model = small_model("rope_gqa2", "float32")
    ids = random_ids(5, 3, 12)
    chunked, _ = run_in_chunks(model, ids, [5, 1, 3, 3])
    full = model(ids)
    # float32: different matmul shapes round differently, by a few ulps of the largest logit.
    np.testing.assert_allclose(chunked, full, rtol=1e-5, atol=1e-5 * np.abs(full).max())


def test_chunk_after_cache_is_not_a_square_mask():
    # The pitfall: a (T, T) mask for T new tokens after a non-empty cache. Two tokens after
    # three must match rows 3 and 4 of the full forward, which a square mask cannot produce.
    model = small_model()
    ids = random_ids(6, 1, 5)
    caches = model.new_cache(1)
    model(ids[:, :3], caches)
    np.testing.assert_allclose(model(ids[:, 3:], caches), model(ids)[:, 3:], rtol=0, atol=1e-10)


# --- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "match"), [
    ({"d_model": 30, "n_heads": 4}, "d_model=30"),
    ({"n_heads": 4, "n_kv_heads": 3}, "n_kv_heads=3"),
    ({"n_heads": 4, "n_kv_heads": 0}, "n_kv_heads=0"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"n_layers": 1.5}, "n_layers"),
])
def test_config_refuses_bad_sizes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**{**SMALL, **kwargs})


def test_model_refuses_other_dtypes():
    with pytest.raises(TypeError, match="dtype"):
        GPT(GPTConfig(**SMALL), dtype=np.float16)


@pytest.mark.parametrize(("ids", "error", "match"), [
    (np.zeros(5, int), ValueError, r"ids must be \(B, T\).*\(5,\)"),  # 1-D
    (np.zeros((1, 2, 3), int), ValueError, r"ids must be \(B, T\)"),   # 3-D
    (np.zeros((2, 0), int), ValueError, r"ids must be \(B, T\)"),      # no tokens
    (np.zeros((2, 3)), TypeError, "ids must be integers.*float64"),    # float ids
    (np.array([[1, 64]]), ValueError, r"ids must be in \[0, 64\)"),   # one past the vocabulary
    (np.array([[-1, 3]]), ValueError, r"ids must be in \[0, 64\)"),   # negative
])
def test_model_refuses_bad_ids_before_touching_the_cache(ids, error, match):
    model = small_model()
    caches = model.new_cache(ids.shape[0] if ids.ndim else 1)
    before = cache_state(caches)
    with pytest.raises(error, match=match):
        model(ids, caches)
    assert cache_state(caches) == before


def test_model_refuses_cache_of_another_batch():
    model = small_model()
    caches = model.new_cache(3)
    model(random_ids(7, 3, 4), caches)
    before = cache_state(caches)
    with pytest.raises(ValueError, match=r"cache is \(B, H_kv, d_head\) = \(3,"):
        model(random_ids(8, 2, 1), caches)
    assert cache_state(caches) == before


def test_model_refuses_cache_of_another_model():
    gqa_caches = small_model("gqa2").new_cache(2)
    with pytest.raises(ValueError, match="cache"):
        small_model("mha")(random_ids(9, 2, 3), gqa_caches)
    with pytest.raises(TypeError, match="cache must be a list of 2 KVCache"):
        small_model()(random_ids(9, 2, 3), gqa_caches[:1])


def test_model_refuses_layer_caches_of_different_lengths():
    model = small_model()
    caches = model.new_cache(1)
    caches[0].append(np.zeros((1, 4, 2, 8)), np.zeros((1, 4, 2, 8)))
    before = cache_state(caches)
    with pytest.raises(ValueError, match="disagree"):
        model(random_ids(10, 1, 1), caches)
    assert cache_state(caches) == before


def test_model_refuses_positions_past_max_seq_len():
    model = small_model()
    with pytest.raises(ValueError, match="max_seq_len=32"):
        model(random_ids(11, 1, 33))
    caches = model.new_cache(2)
    model(random_ids(12, 2, 30), caches)
    before = cache_state(caches)
    with pytest.raises(ValueError, match="max_len=32"):  # 30 cached + 3 new > 32
        model(random_ids(13, 2, 3), caches)
    assert cache_state(caches) == before
    model(random_ids(14, 2, 2), caches)  # exactly filling the table is allowed
    assert all(len(c) == 32 for c in caches)


@pytest.mark.parametrize("shape", [(2, 4), (2, 6), (1, 5), (2, 5, 1)])
def test_model_refuses_attention_mask_of_wrong_shape(shape):
    model = small_model()
    caches = model.new_cache(2)
    model(random_ids(15, 2, 2), caches)  # 2 cached + 3 new: the mask must be (2, 5)
    before = cache_state(caches)
    with pytest.raises(ValueError, match=r"attention_mask must be .*\(2, 5\)"):
        model(random_ids(16, 2, 3), caches, attention_mask=np.ones(shape, int))
    assert cache_state(caches) == before
