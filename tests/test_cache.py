"""cache.py: KVCache (exact length, writes along the sequence axis, views not copies, refused
appends that leave every byte as it was) and ModelCache (one KVCache per layer, and which
positions are real tokens: the padding mask is handed over once and kept).

Sizes are all different (B=2, H_kv=3, max_len=7, d_head=4) so a write along the wrong axis cannot
land in the right place by accident.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from conftest import cache_state
from hypothesis import given, settings
from hypothesis import strategies as st

from cache import EMPTY, KVCache, ModelCache, kv_cache_bytes

FEW = settings(max_examples=25, deadline=None)
B, H_KV, MAX_LEN, D_HEAD = 2, 3, 7, 4


def chunk(rng: np.random.Generator, t: int, dtype: type = np.float32) -> np.ndarray:
    """t new positions of keys (or values): (B, H_kv, t, d_head)."""
    return rng.standard_normal((B, H_KV, t, D_HEAD)).astype(dtype)


def snapshot(cache: KVCache) -> tuple[bytes, bytes, int, tuple, tuple]:
    """Everything a refused append must leave alone, copied out byte for byte."""
    return (cache.keys.tobytes(), cache.values.tobytes(), len(cache), cache.keys.shape,
            cache.values.shape)


def test_new_cache_is_preallocated_and_empty():
    cache = KVCache(B, H_KV, MAX_LEN, D_HEAD, np.float64)
    assert cache.keys.shape == cache.values.shape == (B, H_KV, MAX_LEN, D_HEAD)
    assert cache.keys.dtype == cache.values.dtype == np.float64
    assert len(cache) == 0
    assert cache.max_len == MAX_LEN
    assert not np.shares_memory(cache.keys, cache.values)


@pytest.mark.parametrize("numpy_asks_for_huge_pages", [True, False])
def test_a_large_cache_is_zeros_and_leaves_numpys_huge_page_switch_as_it_was(
        numpy_asks_for_huge_pages):
    """The buffers are allocated with NumPy's huge-page request switched off (4 MB and more is
    where NumPy would ask); whatever the switch was before, it is put back."""
    switch = np._core.multiarray._set_madvise_hugepage
    was = switch(numpy_asks_for_huge_pages)
    try:
        cache = KVCache(2, 8, 1024, 64, np.float32)  # 256 KB per (b, h) slab, 4 MB per buffer
        assert switch(numpy_asks_for_huge_pages) == numpy_asks_for_huge_pages
    finally:
        switch(was)
    assert cache.keys.nbytes >= 4 * 2**20
    assert not cache.keys.any() and not cache.values.any()
    assert cache.keys.flags.writeable and cache.keys.flags.c_contiguous


def test_nbytes_is_the_formula():
    for dtype, itemsize in ((np.float32, 4), (np.float64, 8), (np.float16, 2)):
        cache = KVCache(B, H_KV, MAX_LEN, D_HEAD, dtype)
        # K and V, each B * H_kv * max_len * d_head elements, full size from the start.
        assert cache.nbytes == 2 * B * H_KV * MAX_LEN * D_HEAD * itemsize
        cache.append(chunk(np.random.default_rng(0), 3, dtype), chunk(np.random.default_rng(1), 3,
                                                                      dtype))
        assert cache.nbytes == 2 * B * H_KV * MAX_LEN * D_HEAD * itemsize  # no growth


def test_kv_cache_bytes_by_hand():
    # 2 (K, V) * 2 layers * batch 3 * 4 kv heads * 16 positions * d_head 8 * 4 bytes = 24576.
    assert kv_cache_bytes(2, 3, 4, 8, 16, np.float32) == 24576
    assert kv_cache_bytes(2, 3, 4, 8, 16, "float64") == 2 * 24576
    # Linear in context length and in batch.
    assert kv_cache_bytes(2, 3, 4, 8, 32) == 2 * kv_cache_bytes(2, 3, 4, 8, 16)
    assert kv_cache_bytes(2, 6, 4, 8, 16) == 2 * kv_cache_bytes(2, 3, 4, 8, 16)


def test_append_one_grows_by_exactly_one():
    rng = np.random.default_rng(0)
    cache = KVCache(B, H_KV, MAX_LEN, D_HEAD)
    for step in range(MAX_LEN):
        keys, values = cache.append(chunk(rng, 1), chunk(rng, 1))
        assert len(cache) == step + 1
        assert keys.shape == values.shape == (B, H_KV, step + 1, D_HEAD)


def test_prefill_of_p_leaves_exactly_p():
    rng = np.random.default_rng(1)
    for P in range(1, MAX_LEN + 1):
        cache = KVCache(B, H_KV, MAX_LEN, D_HEAD)
        cache.append(chunk(rng, P), chunk(rng, P))
        assert len(cache) == P


@FEW
@given(sizes=st.lists(st.integers(1, 3), min_size=1, max_size=5).filter(
    lambda s: sum(s) <= MAX_LEN), seed=st.integers(0, 2**16))
def test_append_writes_along_the_sequence_axis_and_returns_views(sizes, seed):
    rng = np.random.default_rng(seed)
    cache = KVCache(B, H_KV, MAX_LEN, D_HEAD)
    all_k, all_v = [], []
    start = 0
    for t in sizes:
        k, v = chunk(rng, t), chunk(rng, t)
        keys, values = cache.append(k, v)
        end = start + t
        # The new positions sit at [start:end] on axis 2 of the preallocated buffers.
        np.testing.assert_array_equal(cache.keys[:, :, start:end], k)
        np.testing.assert_array_equal(cache.values[:, :, start:end], v)
        # Nothing beyond them has been written.
        assert not cache.keys[:, :, end:].any() and not cache.values[:, :, end:].any()
        # The returned arrays are views of the buffers (no copy), covering [0:end].
        assert np.shares_memory(keys, cache.keys) and np.shares_memory(values, cache.values)
        all_k.append(k)
        all_v.append(v)
        np.testing.assert_array_equal(keys, np.concatenate(all_k, axis=2))
        np.testing.assert_array_equal(values, np.concatenate(all_v, axis=2))
        assert len(cache) == end
        start = end


def test_reset_forgets_every_position():
    rng = np.random.default_rng(2)
    cache = KVCache(B, H_KV, MAX_LEN, D_HEAD)
    cache.append(chunk(rng, 5), chunk(rng, 5))
    cache.reset()
    assert len(cache) == 0
    k, v = chunk(rng, 2), chunk(rng, 2)
    keys, values = cache.append(k, v)  # writes start again at position 0
    assert len(cache) == 2
    np.testing.assert_array_equal(keys, k)
    np.testing.assert_array_equal(values, v)
    # After a reset the full max_len is available again.
    cache.reset()
    cache.append(chunk(rng, MAX_LEN), chunk(rng, MAX_LEN))
    assert len(cache) == MAX_LEN


def full_cache_at(length: int) -> KVCache:
    rng = np.random.default_rng(3)
    cache = KVCache(B, H_KV, MAX_LEN, D_HEAD)
    cache.append(chunk(rng, length), chunk(rng, length))
    return cache


GOOD = np.ones((B, H_KV, 1, D_HEAD), np.float32)


@pytest.mark.parametrize(("k", "v", "error", "match"), [
    (np.ones((B, H_KV, 3, D_HEAD), np.float32), np.ones((B, H_KV, 3, D_HEAD), np.float32),
     ValueError, "max_len=7"),                                       # past max_len (5 + 3 > 7)
    (np.ones((B, H_KV, D_HEAD), np.float32), GOOD, ValueError, "k must be"),       # wrong ndim
    (np.ones((B + 1, H_KV, 1, D_HEAD), np.float32), GOOD, ValueError, "k must be"),  # batch
    (GOOD, np.ones((B, H_KV + 1, 1, D_HEAD), np.float32), ValueError, "v must be"),  # heads
    (GOOD, np.ones((B, H_KV, 1, D_HEAD + 1), np.float32), ValueError, "v must be"),  # d_head
    (GOOD, np.ones((B, H_KV, 2, D_HEAD), np.float32), ValueError, "differ"),  # k, v mismatched
    (np.ones((B, H_KV, 0, D_HEAD), np.float32), np.ones((B, H_KV, 0, D_HEAD), np.float32),
     ValueError, "t = 0"),                                            # nothing to append
    (GOOD.tolist(), GOOD, TypeError, "k must be a numpy array"),      # not an array
    (GOOD, GOOD.tolist(), TypeError, "v must be a numpy array"),
])
def test_refused_append_leaves_the_cache_byte_identical(k, v, error, match):
    cache = full_cache_at(5)
    before = snapshot(cache)
    with pytest.raises(error, match=match):
        cache.append(k, v)
    assert snapshot(cache) == before
    # check_append alone refuses the same thing without touching anything either.
    with pytest.raises(error, match=match):
        cache.check_append(k, v)
    assert snapshot(cache) == before


def test_append_up_to_exactly_max_len_is_allowed_then_one_more_is_refused():
    cache = full_cache_at(MAX_LEN - 1)
    cache.append(GOOD, GOOD)
    assert len(cache) == MAX_LEN
    before = snapshot(cache)
    with pytest.raises(ValueError, match="max_len"):
        cache.append(GOOD, GOOD)
    assert snapshot(cache) == before


# A cache of floats must refuse keys/values that are not real numbers before writing anything
# (a string v refused only by the write itself would leave the keys already written).
@pytest.mark.parametrize("bad", [
    np.full((B, H_KV, 1, D_HEAD), "x"),
    np.full((B, H_KV, 1, D_HEAD), 1 + 2j),
    np.full((B, H_KV, 1, D_HEAD), None, dtype=object),
], ids=["str", "complex", "object"])
def test_append_of_wrong_dtype_is_refused_before_any_write(bad):
    cache = full_cache_at(2)
    before = snapshot(cache)
    with pytest.raises((TypeError, ValueError), match=r"\bv\b.*dtype"):
        cache.append(GOOD * 7, bad)
    assert snapshot(cache) == before


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"batch_size": 0}, "batch_size"), ({"n_kv_heads": -1}, "n_kv_heads"),
    ({"max_len": 2.5}, "max_len"), ({"d_head": True}, "d_head"),
])
def test_constructor_refuses_bad_sizes(kwargs, name):
    args = {"batch_size": B, "n_kv_heads": H_KV, "max_len": MAX_LEN, "d_head": D_HEAD}
    args.update(kwargs)
    with pytest.raises(ValueError, match=f"^KVCache {name} must be a positive int"):
        KVCache(**args)


def test_truncate_keeps_a_prefix_and_the_next_append_overwrites_the_rest():
    rng = np.random.default_rng(4)
    cache = KVCache(B, H_KV, MAX_LEN, D_HEAD)
    k, v = chunk(rng, 5), chunk(rng, 5)
    cache.append(k, v)
    cache.truncate(2)
    assert len(cache) == 2
    k2, v2 = chunk(rng, 3), chunk(rng, 3)
    keys, values = cache.append(k2, v2)
    np.testing.assert_array_equal(keys, np.concatenate([k[:, :, :2], k2], axis=2))
    np.testing.assert_array_equal(values, np.concatenate([v[:, :, :2], v2], axis=2))


@pytest.mark.parametrize("bad", [-1, 6, 2.0, True, None])
def test_truncate_refuses_lengths_it_does_not_hold(bad):
    cache = full_cache_at(5)
    before = snapshot(cache)
    with pytest.raises(ValueError, match=r"truncate: length must be an int in \[0, 5\]"):
        cache.truncate(bad)
    assert snapshot(cache) == before


def test_integer_keys_and_values_are_stored_as_the_cache_dtype():
    cache = KVCache(B, H_KV, MAX_LEN, D_HEAD, np.float64)
    k = np.arange(B * H_KV * 2 * D_HEAD).reshape(B, H_KV, 2, D_HEAD)  # int64
    keys, values = cache.append(k, -k)
    assert keys.dtype == np.float64
    np.testing.assert_array_equal(keys, k.astype(np.float64))
    np.testing.assert_array_equal(values, -k.astype(np.float64))


def test_repr_names_the_length_and_the_shape():
    cache = full_cache_at(3)
    assert repr(cache) == ("KVCache(length=3, max_len=7, batch=2, n_kv_heads=3, d_head=4, "
                           "dtype=float32)")


# --- ModelCache ----------------------------------------------------------------------------------

def model_cache(layers: int = 2) -> ModelCache:
    return ModelCache([KVCache(B, H_KV, MAX_LEN, D_HEAD) for _ in range(layers)])


class StandIn:
    """What ModelCache.plan reads of a model: its layer count and one token's K/V shape per
    layer (and the cache keeps a weak reference to the model that filled it)."""

    config = SimpleNamespace(n_layers=2)
    kv_shape = (H_KV, D_HEAD)


MODEL = StandIn()


def fill(cache: ModelCache, real: np.ndarray) -> None:
    """One step of len(real[0]) tokens as the model takes it: planned (the mask covers what the
    cache holds and the new tokens), committed, then every layer's update."""
    rng = np.random.default_rng(5)
    held = cache.positions[:, :len(cache)] >= 0
    step = cache.plan(MODEL, B, real.shape[1], np.concatenate([held, real], axis=1))
    cache.commit(step, MODEL)
    for kv in cache.layers:
        kv.update(chunk(rng, real.shape[1]), chunk(rng, real.shape[1]))


def test_model_cache_starts_empty_with_no_real_token():
    cache = model_cache(3)
    assert len(cache) == 0 and cache.batch_size == B and cache.max_len == MAX_LEN
    assert cache.positions.shape == (B, MAX_LEN) and (cache.positions == EMPTY).all()
    assert cache.nbytes == 3 * 2 * B * H_KV * MAX_LEN * D_HEAD * 4
    np.testing.assert_array_equal(cache.real_counts(), [0, 0])


def test_the_mask_is_handed_over_once_and_kept():
    cache = model_cache()
    mask = np.array([[0, 0, 1], [1, 1, 1]])  # row 0 left-padded by two
    step = cache.plan(MODEL, B, 3, mask)
    np.testing.assert_array_equal(step.real, mask.astype(bool))
    assert step.real.dtype == bool  # flags, as documented: ~real and masks built from it
    # A token's position counts the real tokens before it; a pad before any is -1, and holds
    # no key (EMPTY) that a query may see.
    np.testing.assert_array_equal(step.positions, [[-1, -1, 0], [0, 1, 2]])
    np.testing.assert_array_equal(step.key_positions, [[EMPTY, EMPTY, 0], [0, 1, 2]])
    assert len(cache) == 0  # planning changes nothing
    fill(cache, step.real)
    np.testing.assert_array_equal(cache.real_counts(), [1, 3])
    # The next step needs no mask: its tokens are real, and the padding is remembered.
    step = cache.plan(MODEL, B, 1)
    np.testing.assert_array_equal(step.real, [[True], [True]])
    assert step.real.dtype == bool  # without a mask too (float ones would compare equal above)
    np.testing.assert_array_equal(step.positions, [[1], [3]])
    np.testing.assert_array_equal(step.key_positions, [[EMPTY, EMPTY, 0, 1], [0, 1, 2, 3]])
    # A mask given again is accepted when it agrees with what the cache holds ...
    step = cache.plan(MODEL, B, 2, np.array([[0, 0, 1, 1, 1], [1] * 5]))
    np.testing.assert_array_equal(step.real, np.ones((B, 2), dtype=bool))


@pytest.mark.parametrize(("mask", "match"), [
    (np.array([[1, 0, 1, 1], [1, 1, 1, 1]]), "contradicts the cache: row 0 was cached as "
                                             r"\[0, 0, 1\], the mask says \[1, 0, 1\]"),
    (np.ones((B, 3)), r"^attention_mask must have shape \(2, 4\)"),  # the argument is named
    (np.array([[0, 0, 1, 2], [1, 1, 1, 1]]), "^attention_mask must hold only 0"),
    ([[0, 0, 1, 1], [1, 1, 1, 1]], "^attention_mask must be a numpy array"),
])
def test_a_mask_that_contradicts_the_cache_is_refused(mask, match):
    cache = model_cache()
    fill(cache, np.array([[False, False, True], [True, True, True]]))
    before = cache_state(cache)
    with pytest.raises((ValueError, TypeError), match=match):
        cache.plan(MODEL, B, 1, mask)
    assert cache_state(cache) == before


@pytest.mark.parametrize(("B_", "T", "match"), [(3, 1, "batch of 3 rows"),
                                                (B, 5, "exceed the cache's max_len=7")])
def test_plan_refuses_another_batch_or_no_room(B_, T, match):
    cache = model_cache()
    fill(cache, np.ones((B, 3), dtype=bool))
    with pytest.raises(ValueError, match=match):
        cache.plan(MODEL, B_, T)


def test_layers_that_disagree_on_length_are_refused():
    cache = model_cache()
    cache.layers[0].append(GOOD, GOOD)
    with pytest.raises(ValueError, match=r"disagree on length: \[0, 1\]"):
        cache.plan(MODEL, B, 1)


def test_a_layer_cannot_belong_to_two_model_caches():
    """Two model caches over one KVCache: truncating one would silently empty the other."""
    layers = [KVCache(B, H_KV, MAX_LEN, D_HEAD) for _ in range(2)]
    first = ModelCache(layers)
    with pytest.raises(ValueError, match="layer 0 already belongs to another model cache"):
        ModelCache([layers[0], KVCache(B, H_KV, MAX_LEN, D_HEAD)])
    del first  # once the first is gone, its layers are free again
    ModelCache(layers)


def test_a_failed_step_rolls_back_exactly():
    """plan, commit, one layer written, then a failure: roll_back leaves every byte as before."""
    cache = model_cache()
    fill(cache, np.array([[False, True, True], [True] * 3]))
    before = cache_state(cache)
    step = cache.plan(MODEL, B, 2)
    cache.commit(step, MODEL)
    cache.layers[0].update(chunk(np.random.default_rng(1), 2), chunk(np.random.default_rng(2), 2))
    cache.roll_back(step)
    assert cache_state(cache) == before


def test_truncate_and_reset_rewind_every_layer():
    cache = model_cache()
    fill(cache, np.array([[False, True, True, True], [True] * 4]))
    cache.truncate(2)
    assert len(cache) == 2 and [len(kv) for kv in cache.layers] == [2, 2]
    np.testing.assert_array_equal(cache.real_counts(), [1, 2])
    cache.reset()
    assert len(cache) == 0 and [len(kv) for kv in cache.layers] == [0, 0]
    np.testing.assert_array_equal(cache.real_counts(), [0, 0])
    with pytest.raises(ValueError, match=r"truncate: length must be an int in \[0, 0\]"):
        cache.truncate(1)


def test_model_cache_truncate_to_its_own_length_changes_nothing():
    """Rewinding to where the cache already is (a rollback of a call that added nothing) is
    allowed, not refused as out of range, and leaves every byte as it was."""
    cache = model_cache()
    fill(cache, np.array([[False, True, True], [True] * 3]))
    before = cache_state(cache)
    cache.truncate(3)
    assert cache_state(cache) == before


@pytest.mark.parametrize("bad", [-1, 4, 2.0, True])
def test_model_cache_truncate_refuses_by_its_own_name_before_any_layer(bad):
    """The ModelCache itself refuses (naming itself), before any layer is asked: a check left to
    the layers would report a KVCache the caller never handled."""
    cache = model_cache()
    fill(cache, np.array([[False, True, True], [True] * 3]))
    before = cache_state(cache)
    with pytest.raises(ValueError,
                       match=r"^ModelCache.truncate: length must be an int in \[0, 3\]"):
        cache.truncate(bad)
    assert cache_state(cache) == before


@pytest.mark.parametrize(("layers", "error"), [
    ([], TypeError), ("layers", TypeError),
    ([KVCache(B, H_KV, MAX_LEN, D_HEAD), KVCache(B + 1, H_KV, MAX_LEN, D_HEAD)], ValueError),
    ([KVCache(B, H_KV, MAX_LEN, D_HEAD), KVCache(B, H_KV, MAX_LEN + 1, D_HEAD)], ValueError),
])
def test_model_cache_refuses_mismatched_layers(layers, error):
    with pytest.raises(error, match="ModelCache"):
        ModelCache(layers)


def test_model_cache_refuses_a_layer_that_already_holds_positions():
    layer = full_cache_at(2)
    with pytest.raises(ValueError, match="layer 0 must be empty"):
        ModelCache([layer])


@pytest.mark.parametrize("dtype", [np.int32, np.uint8, bool, np.complex64, "float8", None])
def test_cache_buffers_must_be_float16_32_or_64(dtype):
    # an int cache would store 0.7 as 0, a bool cache everything as True, uint8 would wrap
    with pytest.raises(TypeError, match="KVCache dtype must be one of float16, float32, float64"):
        KVCache(B, H_KV, MAX_LEN, D_HEAD, dtype)


def test_kv_cache_bytes_does_not_overflow_with_numpy_int32_sizes():
    # Llama-2-7B: 32 layers, 32 KV heads, d_head 128, fp16, 32k context = 16 GiB, past 2**31.
    sizes = [np.int32(x) for x in (32, 1, 32, 128, 32768)]
    assert kv_cache_bytes(*sizes, np.float16) == 2 * 32 * 32 * 128 * 32768 * 2 == 16 * 2**30
    assert type(kv_cache_bytes(*sizes, np.float16)) is int


@pytest.mark.parametrize(("position", "bad"), [(0, -2), (1, 0), (2, 2.0), (3, True), (4, "512")])
def test_kv_cache_bytes_refuses_sizes_that_are_not_positive_ints(position, bad):
    sizes = [2, 1, 4, 8, 16]
    sizes[position] = bad
    name = ("n_layers", "batch", "n_kv_heads", "d_head", "seq_len")[position]
    with pytest.raises(ValueError, match=f"^{name} must be a positive int"):  # named, in order
        kv_cache_bytes(*sizes)
    with pytest.raises(TypeError, match="^dtype must be one of float16, float32, float64"):
        kv_cache_bytes(2, 1, 4, 8, 16, np.int8)


def test_a_cache_that_cannot_fit_in_memory_is_refused_before_allocating(monkeypatch):
    from parts import checks

    monkeypatch.setattr(checks, "available_memory", lambda: 2**30)  # a machine with 1 GiB free
    # 2 * 8,192 rows * 4 heads * 128 positions * 32 * 4 bytes = 1 GiB exactly: fits.
    assert KVCache(8192, 4, 128, 32).nbytes == 2**30
    with pytest.raises(ValueError, match=r"KVCache \(8193, 4, 128, 32\) x 2 .float32. needs "
                                         r"1.0 GiB, more than the 1.0 GiB"):
        KVCache(8193, 4, 128, 32)
