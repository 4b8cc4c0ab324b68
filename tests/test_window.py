"""The sliding window and attention sinks: the rolling buffer equals the band-masked naive path.

The references are independent of the code under test: the band is checked against a loop over
(query, key) pairs written from its definition; the cached path against the naive one (the whole
sequence at once, no cache); what a query sees against perturbed tokens of a one-layer model.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
from conftest import SMALL, VARIANTS, random_ids

import block
from attention import mask_from_positions
from beyond.window import RollingKVCache, WindowCache, slot_of, window_cache
from block import GPT, GPTConfig
from cache import EMPTY, KVCache, ModelCache, first_step
from generate import generate_cached, generate_naive, prefill
from parts import checks
from tools.references import random_model

TOL = 1e-12


def windowed(variant: str = "mha", window: int = 4, sinks: int = 0, fast: bool = False,
             **changes: object) -> GPT:
    config = GPTConfig(**(SMALL | VARIANTS[variant] | changes), sliding_window=window,
                       attention_sinks=sinks)
    return random_model(config, seed=1, fast=fast)


def chunked(model: GPT, ids: np.ndarray, mask: np.ndarray, chunks: list[int]) -> np.ndarray:
    """Logits (B, T, V) of the whole sequence, fed to a fresh rolling buffer in chunks of these
    sizes."""
    cache, out, start = window_cache(model, ids.shape[0]), [], 0
    for size in chunks:
        end = start + size
        out.append(model(ids[:, start:end], cache, attention_mask=mask[:, :end]))
        start = end
    assert start == ids.shape[1]
    return np.concatenate(out, axis=1)


def padded(B: int, T: int, pads: list[list[int]]) -> np.ndarray:
    """A (B, T) mask of ones with zeros at the listed columns of each row."""
    mask = np.ones((B, T), dtype=np.int64)
    for row, columns in enumerate(pads):
        mask[row, columns] = 0
    return mask


def mask_of(real: np.ndarray, window: int | None, sinks: int = 0) -> np.ndarray:
    """The model's mask for a call of these (B, T) real flags with no cache: (B, 1, T, T)."""
    step = first_step(real)
    return mask_from_positions(step.positions, step.key_positions, window, sinks)


# --- the band, by hand ---------------------------------------------------------------------------

def band_by_hand(real: np.ndarray, window: int, sinks: int) -> np.ndarray:
    """mask[b, i, j] straight from the definition, one pair at a time: key j is a real token, not
    after query i, and its position is among the last `window` of i's (itself counted) or below
    `sinks`. A position is the number of real tokens before it in the row."""
    B, T = real.shape
    mask = np.zeros((B, T, T), dtype=bool)
    for b in range(B):
        pos = [int(real[b, :i].sum()) for i in range(T)]  # real tokens BEFORE column i
        for i in range(T):
            p = pos[i] if real[b, i] else pos[i] - 1  # a pad sees what the last real token saw
            for j in range(i + 1):
                if real[b, j] and (p - window < pos[j] or pos[j] < sinks):
                    mask[b, i, j] = True
    return mask


@pytest.mark.parametrize(("window", "sinks"), [(1, 0), (3, 0), (3, 2), (5, 1), (40, 0)])
def test_the_band_is_the_definition(window, sinks):
    real = np.ones((3, 12), dtype=bool)
    real[1, :4] = False  # left padding
    real[2, [3, 4, 8]] = False  # padding in the middle: it must not count towards the window
    mask = mask_of(real, window, sinks)
    np.testing.assert_array_equal(mask[:, 0], band_by_hand(real, window, sinks))


def test_a_decode_step_sees_exactly_window_keys_counting_itself():
    mask = mask_from_positions(np.array([[9]]), np.arange(10)[None], window=4)
    np.testing.assert_array_equal(mask[0, 0, 0], [0] * 6 + [1] * 4)  # positions 6, 7, 8, 9


def test_the_mask_from_slot_positions_is_the_same_mask_in_slot_order():
    """Keys in any order (a rolling buffer's slots) give the same mask as the columns in time
    order, permuted: the rule reads positions, never where a key sits."""
    real = np.ones((2, 9), dtype=bool)
    real[1, :3] = False
    query_pos = np.cumsum(real, axis=1) - 1  # (B, T)
    key_pos = np.where(real, query_pos, EMPTY)
    order = np.random.default_rng(0).permutation(9)
    got = mask_from_positions(query_pos, key_pos[:, order], 3, 1)
    np.testing.assert_array_equal(got, mask_of(real, 3, 1)[..., order])


def test_slots_by_hand():
    """W=4, S=1 after 10 tokens: position 0 keeps slot 0; 1..9 cycle through slots 1..4, so the
    window slots hold 9, 6, 7, 8 (worked by hand: slot 1 + (j - 1) mod 4)."""
    model = windowed("rope", window=4, sinks=1)
    cache = window_cache(model, 1)
    model(random_ids(0, 1, 10), cache)
    np.testing.assert_array_equal(cache.held[0], [0, 9, 6, 7, 8])
    np.testing.assert_array_equal(slot_of(np.arange(10), 4, 1), [0, 1, 2, 3, 4, 1, 2, 3, 4, 1])


# --- cached == naive -----------------------------------------------------------------------------

CASES = [  # variant, window, sinks, chunks (30 tokens), padded columns per row
    ("mha", 4, 0, [3] * 10, [[], []]),
    ("mha", 4, 2, [7, 1, 9, 2, 11], [[0, 1, 2], []]),  # chunks longer than W cross the wrap
    ("gqa", 4, 0, [5, 1, 1, 1, 6, 16], [[0, 1], [7, 8, 9, 10, 11]]),  # pads longer than W
    ("rope", 4, 2, [1] * 30, [[], []]),
    ("rope_gqa", 5, 1, [2, 9, 1, 13, 5], [[0, 1, 2, 3], [12]]),
    ("mqa", 1, 0, [4, 4, 22], [[], [0]]),  # W = 1: each token sees only itself
    ("rope", 4, 3, [30], [[0], []]),  # one prefill longer than the whole buffer
]


@pytest.mark.parametrize("fast", [False, True], ids=["readable", "fast"])
@pytest.mark.parametrize(("variant", "window", "sinks", "chunks", "pads"), CASES)
def test_cached_equals_naive_across_the_wrap(variant, window, sinks, chunks, pads, fast):
    model = windowed(variant, window, sinks, fast=fast)
    ids, mask = random_ids(4, 2, 30), padded(2, 30, pads)
    naive = model(ids, attention_mask=mask)
    cached = chunked(model, ids, mask, chunks)
    real = mask.astype(bool)  # a pad's own output is never read; real positions must agree
    np.testing.assert_allclose(cached[real], naive[real], rtol=0, atol=TOL)


def test_the_window_changes_the_answer():
    """The comparison above could pass if the window did nothing: it does something."""
    ids = random_ids(4, 2, 30)
    full = random_model(GPTConfig(**SMALL), seed=1)
    assert np.abs(windowed("mha", 4)(ids) - full(ids)).max() > 1e-2
    np.testing.assert_allclose(windowed("mha", 30)(ids), full(ids), rtol=0, atol=TOL)


def test_a_full_cache_serves_a_windowed_model_through_the_band():
    model = windowed("rope", 4, 1)
    ids, mask = random_ids(5, 2, 20), padded(2, 20, [[0, 1], []])
    cache = ModelCache([KVCache(2, model.config.n_kv_heads, 32, model.config.d_head, np.float64)
                        for _ in range(model.config.n_layers)])
    out = np.concatenate([model(ids[:, :9], cache, attention_mask=mask[:, :9]),
                          model(ids[:, 9:], cache)], axis=1)
    real = mask.astype(bool)
    np.testing.assert_allclose(out[real], model(ids, attention_mask=mask)[real], rtol=0, atol=TOL)


def test_generation_with_a_window_matches_naive_with_padding_and_chunks():
    model = windowed("rope_gqa", 4, 2, fast=True)
    prompts = [np.arange(1, 12), np.arange(5, 8)]
    naive = generate_naive(model, prompts, 15)
    for cache in (None, window_cache(model, 2)):  # a full cache (the band in the mask), a rolling
        cached = generate_cached(model, prompts, 15, prefill_chunk=5, cache=cache)
        np.testing.assert_array_equal(cached.tokens, naive.tokens)
        np.testing.assert_allclose(cached.logits, naive.logits, rtol=0, atol=TOL)


def test_padding_never_takes_a_slot():
    """A row with pads in the middle gives the same logits as the row without them, and its
    slots hold only real tokens' positions."""
    model = windowed("rope", 4, 1)
    ids = random_ids(6, 1, 12)
    mask = padded(1, 12, [[4, 5, 6, 7, 8]])  # 5 pads, more than the window
    cache = window_cache(model, 1)
    with_pads = model(ids, cache, attention_mask=mask)
    real = mask[0].astype(bool)
    alone = model(ids[:, real])
    np.testing.assert_allclose(with_pads[:, real], alone, rtol=0, atol=TOL)
    assert sorted(cache.held[0]) == [0, 3, 4, 5, 6]  # 7 real: sink 0, last four


# --- past max_seq_len, in constant memory --------------------------------------------------------

def test_rope_with_a_window_runs_past_max_seq_len_in_constant_memory():
    model = windowed("rope", 4, 2, fast=True)  # max_seq_len 32
    prompt = random_ids(7, 2, 5)
    cache = window_cache(model, 2)
    nbytes, logits = cache.nbytes, [prefill(model, prompt, cache)]
    seq = list(prompt.T)
    for _ in range(75):  # to position 80, 2.5 x max_seq_len
        seq.append(logits[-1].argmax(axis=-1))
        logits.append(model(seq[-1][:, None], cache, last_only=True)[:, -1])
        assert cache.nbytes == nbytes
    full = model(np.stack(seq, axis=1))  # the naive path, all 80 positions at once
    np.testing.assert_allclose(np.stack(logits, axis=1), full[:, 4:], rtol=0, atol=TOL)
    assert len(cache) == 80
    generate_cached(model, prompt, 60, cache=window_cache(model, 2))  # allowed past the table
    with pytest.raises(ValueError, match="exceed the cache's 32 .*window_cache"):
        generate_cached(model, prompt, 60)  # the default cache keeps every key: 32 of them


@pytest.mark.parametrize("changes", [{"rope": False}, {"sliding_window": None,
                                                       "attention_sinks": 0}],
                         ids=["learned positions", "full attention"])
def test_past_max_seq_len_is_still_refused_without_rope_and_a_window(changes):
    config = dataclasses.replace(windowed("rope", 4, 2).config, **changes)
    model = GPT(config, seed=0, dtype=np.float64)
    with pytest.raises(ValueError, match="max_seq_len=32"):
        generate_cached(model, random_ids(0, 1, 5), 28)
    cache = model.new_cache(1)
    model(random_ids(0, 1, 30), cache)
    with pytest.raises(ValueError, match="max_(seq_)?len=32"):  # the model's or the cache's
        model(random_ids(0, 1, 3), cache)
    assert len(cache) == 30


# --- what a query sees ---------------------------------------------------------------------------

def last_logits_change(model: GPT, ids: np.ndarray, at: int, cached: bool) -> float:
    """How far the last position's logits move when token `at` is replaced."""
    other = ids.copy()
    other[0, at] = (ids[0, at] + 1) % model.config.vocab_size

    def last(x: np.ndarray) -> np.ndarray:
        if not cached:
            return model(x)[0, -1]
        cache = window_cache(model, 1)
        model(x[:, :7], cache)
        return model(x[:, 7:], cache)[0, -1]

    return float(np.abs(last(other) - last(ids)).max())


@pytest.mark.parametrize("cached", [False, True], ids=["naive", "cached"])
def test_the_key_just_outside_the_window_moves_nothing_the_one_inside_does(cached):
    model = windowed("rope", 4, 0, n_layers=1)  # one layer: no second hop through a neighbour
    ids = random_ids(8, 1, 16)  # the last query is position 15: it sees 12, 13, 14, 15
    assert last_logits_change(model, ids, 11, cached) == 0.0
    assert last_logits_change(model, ids, 12, cached) > 1e-6


@pytest.mark.parametrize("cached", [False, True], ids=["naive", "cached"])
def test_a_sink_far_back_moves_the_logits_the_token_after_the_sinks_does_not(cached):
    model = windowed("mha", 4, 2, n_layers=1)
    ids = random_ids(9, 1, 16)
    assert last_logits_change(model, ids, 1, cached) > 1e-6  # the last sink, 14 positions back
    assert last_logits_change(model, ids, 2, cached) == 0.0  # after the sinks, outside the window


# --- memory --------------------------------------------------------------------------------------

@pytest.mark.parametrize("sinks", [0, 3])
def test_nbytes_is_fixed_by_the_window_not_max_seq_len(sinks):
    for max_seq_len in (32, 4096):
        model = GPT(GPTConfig(**(SMALL | {"max_seq_len": max_seq_len, "n_kv_heads": 2}),
                              sliding_window=6, attention_sinks=sinks, rope=True), seed=0)
        # 2 (K, V) x 2 layers x batch 3 x 2 K/V heads x (S + W) slots x 8 d_head x 4 bytes
        assert window_cache(model, 3).nbytes == 2 * 2 * 3 * 2 * (sinks + 6) * 8 * 4


# --- truncate, reset, rollback -------------------------------------------------------------------

def state(cache: WindowCache) -> list:
    """Every byte and count a refused or rolled-back call must leave as it was."""
    return [cache.held.tobytes(), cache.written_at.tobytes(), cache.count.tobytes(),
            len(cache), cache.floor, cache.filled_by,
            *[(kv.keys.tobytes(), kv.values.tobytes(), len(kv)) for kv in cache.layers]]


def test_truncate_works_until_the_buffer_wraps_then_is_refused_below_what_it_holds():
    model = windowed("rope", 4, 1)
    ids = random_ids(10, 1, 12)
    cache = window_cache(model, 1)
    model(ids[:, :3], cache)
    model(ids[:, 3:5], cache)  # 5 positions in 5 slots: nothing overwritten yet
    cache.truncate(3)
    np.testing.assert_allclose(model(ids[:, 3:], cache), model(ids)[:, 3:], rtol=0, atol=TOL)
    before = state(cache)  # 12 positions: the window has overwritten slots at the last call
    with pytest.raises(ValueError, match=r"WindowCache.truncate: .*\[12, 12\].*lost keys"):
        cache.truncate(11)
    assert state(cache) == before
    cache.truncate(12)  # its own length: nothing to undo
    assert state(cache) == before


@pytest.mark.parametrize("length", [7, 3, 0])
def test_a_chunk_longer_than_the_window_cannot_be_truncated_into(length):
    """A 10-token prefill into W = 4 stores only the last 4: a truncate inside it would need keys
    that were never stored, so it is refused (7 was accepted, and the logits were off by 0.96);
    truncate(0) too (it left a row's count at 6, so the next token took position 6)."""
    cfg = GPTConfig(vocab_size=32, max_seq_len=16, d_model=16, n_heads=4, n_layers=2,
                    init_std=0.3, sliding_window=4)
    model = GPT(cfg, seed=1, dtype="float64")
    x = random_ids(3, 1, 12, vocab=32)
    cache = window_cache(model, 1)
    model(x[:, :10], cache)
    before = state(cache)
    with pytest.raises(ValueError, match=r"truncate: length must be an int in \[10, 10\]"):
        cache.truncate(length)
    assert state(cache) == before
    cache.reset()
    np.testing.assert_allclose(model(x[:, :9], cache), model(x[:, :9]), rtol=0, atol=TOL)


def test_truncate_to_zero_before_any_key_is_lost_leaves_no_count_behind():
    """Two rows of different padding, three columns into W = 4 (nothing lost): truncate(0) is a
    fresh cache, every count 0, and the next call numbers its tokens from 0."""
    model = windowed("mha", 4, 0)
    cache = window_cache(model, 2)
    model(random_ids(4, 2, 3), cache, attention_mask=padded(2, 3, [[0], []]))
    assert cache.count.tolist() == [2, 3]
    cache.truncate(0)
    assert state(cache) == state(window_cache(model, 2))
    ids = random_ids(5, 2, 6)
    np.testing.assert_allclose(model(ids, cache), model(ids), rtol=0, atol=TOL)


@pytest.mark.parametrize("failure", ["float16 overflow", "before the write", "after the write"])
def test_a_padded_wrapping_step_that_fails_in_the_last_layer_restores_every_count(failure):
    """Rows of different counts, a step that wraps the buffer, a failure in layer 1 after layer 0
    wrote: a refused float16 key, an error before layer 1 writes, or one after it wrote. Every
    slot, count, column and the floor come back, and the next call is the undisturbed one's."""
    model = windowed("mha", 4, 1)
    ids, mask = random_ids(18, 2, 9), padded(2, 9, [[0, 1, 2], []])
    cache = window_cache(model, 2, dtype="float16")
    model(ids[:, :5], cache, attention_mask=mask[:, :5])
    before = state(cache)
    layer = cache.layers[1]
    update = layer.update

    def fails(k, v):
        if failure == "float16 overflow":
            return update(k + 1e5, v)  # only layer 1's keys overflow float16
        if failure == "after the write":
            update(k, v)
        raise MemoryError("simulated")

    layer.update = fails
    with pytest.raises(ValueError if failure == "float16 overflow" else MemoryError):
        model(ids[:, 5:8], cache, attention_mask=mask[:, :8])  # 3 more: rows wrap their slots
    del layer.update
    assert state(cache) == before
    undisturbed = window_cache(model, 2, dtype="float16")
    model(ids[:, :5], undisturbed, attention_mask=mask[:, :5])
    np.testing.assert_array_equal(model(ids[:, 5:], cache, attention_mask=mask),
                                  model(ids[:, 5:], undisturbed, attention_mask=mask))


def test_a_chunk_one_longer_than_the_window_never_stores_its_first_key():
    """W + 1 = 5 tokens in one chunk: the first would share a slot with the last, so it is not
    stored, and a truncate to any length inside the chunk is refused (the floor is 5)."""
    model = windowed("mha", 4, 0)
    cache = window_cache(model, 1)
    model(random_ids(13, 1, 5), cache)
    assert cache.floor == 5 and sorted(cache.held[0].tolist()) == [1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"length must be an int in \[5, 5\]"):
        cache.truncate(1)


def test_the_floor_rises_only_when_a_key_is_lost():
    """Token by token, nothing is lost until the fifth token overwrites position 0 (W = 4): up to
    then every length can be rebuilt, exactly as a cache that saw only that many."""
    model = windowed("rope", 4, 0)
    ids = random_ids(11, 1, 6)
    cache = window_cache(model, 1)
    for t in range(4):
        model(ids[:, t:t + 1], cache)
        assert cache.floor == 0
    cache.truncate(2)
    fresh = window_cache(model, 1)
    model(ids[:, :2], fresh)
    assert state(cache)[:5] == state(fresh)[:5]  # slots, columns, counts, length, floor
    for t in range(2, 6):
        model(ids[:, t:t + 1], cache)
    assert cache.floor == 6  # the fifth and sixth tokens overwrote positions 0 and 1


def test_reset_starts_again_at_position_zero():
    model = windowed("rope_gqa", 3, 1, fast=True)
    ids = random_ids(11, 2, 9)
    cache = window_cache(model, 2)
    model(random_ids(12, 2, 20), cache)
    cache.reset()
    assert len(cache) == 0 and (cache.held == EMPTY).all() and cache.floor == 0
    np.testing.assert_allclose(model(ids, cache), model(ids), rtol=0, atol=TOL)


def test_reset_leaves_the_bytes_of_a_new_cache():
    model = windowed("rope", 3, 1)
    cache = window_cache(model, 2)
    model(random_ids(12, 2, 9), cache, attention_mask=padded(2, 9, [[0, 1], []]))
    cache.reset()
    assert state(cache) == state(window_cache(model, 2))


@pytest.mark.parametrize("wrapped", [False, True])
@pytest.mark.parametrize("fast", [False, True], ids=["readable", "fast"])
def test_a_step_that_fails_half_way_is_undone_exactly(monkeypatch, wrapped, fast):
    """A failure after both layers wrote (and overwrote slots, when the buffer wraps): every
    byte, count and the floor come back, and the cache goes on as if the step never ran."""
    model = windowed("mha", 4, 0, fast=fast)
    cache = window_cache(model, 1)
    model(random_ids(13, 1, 2), cache)
    before = state(cache)
    calls = {"n": 0}
    target = block if not fast else __import__("fast.model", fromlist=["model"])
    name = "mlp" if not fast else "gelu_in_place"
    real = getattr(target, name)

    def fails_in_the_second_layer(*args):
        calls["n"] += 1
        if calls["n"] == 2:  # layer 0 has written its keys, layer 1 too: then it fails
            raise MemoryError("simulated")
        return real(*args)

    monkeypatch.setattr(target, name, fails_in_the_second_layer)
    with pytest.raises(MemoryError):
        model(random_ids(14, 1, 5 if wrapped else 2), cache)  # 7 > 4 slots wraps; 4 does not
    monkeypatch.undo()
    assert state(cache) == before
    ids = np.concatenate([random_ids(13, 1, 2), random_ids(15, 1, 3)], axis=1)
    np.testing.assert_allclose(model(ids[:, 2:], cache), model(ids)[:, 2:], rtol=0, atol=TOL)


def test_a_refused_float16_overflow_in_a_later_layer_restores_the_counts():
    """float16 storage refuses a key beyond 65504 in the second layer, after the first layer
    wrote: the step is rolled back, counts included (they were left changed)."""
    model = windowed("mha", 4, 1)
    cache = window_cache(model, 1, dtype="float16")
    model(random_ids(16, 1, 3), cache)
    before = state(cache)
    model.blocks[1].attn.b_k[...] += 1e5  # only layer 1's keys overflow float16
    try:
        with pytest.raises(ValueError, match="float16"):
            model(random_ids(17, 1, 4), cache)
    finally:
        model.blocks[1].attn.b_k[...] -= 1e5
    assert state(cache) == before


# --- the interface and bad input -----------------------------------------------------------------

def test_both_layer_caches_keep_the_one_layer_protocol():
    for layer in (KVCache(1, 2, 8, 4), RollingKVCache(1, 2, 4, 4, sinks=1)):
        assert callable(layer.update) and (layer.n_kv_heads, layer.d_head) == (2, 4)
    with pytest.raises(TypeError, match="layer 0 must be a layer cache"):
        ModelCache([object()])


def test_a_rolling_layer_refuses_an_update_outside_a_window_cache():
    kv = RollingKVCache(1, 2, 4, 4)
    with pytest.raises(ValueError, match="WindowCache"):
        kv.update(np.zeros((1, 2, 1, 4)), np.zeros((1, 2, 1, 4)))
    assert len(kv) == 0


@pytest.mark.parametrize(("changes", "error", "match"), [
    ({"sliding_window": 0}, ValueError, "sliding_window.*got 0"),
    ({"sliding_window": -3}, ValueError, "sliding_window.*got -3"),
    ({"sliding_window": True}, ValueError, "sliding_window.*got True"),
    ({"sliding_window": 2.5}, ValueError, "sliding_window.*got 2.5"),
    ({"sliding_window": 4, "attention_sinks": -1}, ValueError, "attention_sinks.*got -1"),
    ({"sliding_window": 4, "attention_sinks": 1.0}, ValueError, "attention_sinks.*got 1.0"),
    ({"sliding_window": 4, "attention_sinks": True}, ValueError, "attention_sinks.*got True"),
    ({"attention_sinks": 2}, ValueError, "attention_sinks=2 needs a sliding_window"),
])
def test_bad_window_settings_are_refused_naming_the_argument(changes, error, match):
    with pytest.raises(error, match=match):
        GPTConfig(**SMALL, **changes)


@pytest.mark.parametrize("sinks", [-1, 1.5, True, "2"])
def test_a_rolling_layer_refuses_sinks_that_are_not_an_int_of_at_least_zero(sinks):
    assert RollingKVCache(2, 3, 4, 5).sinks == 0  # no sinks unless asked: W slots
    assert RollingKVCache(2, 3, 4, 5).max_len == 4
    with pytest.raises(ValueError, match=f"RollingKVCache sinks must be an int >= 0, got "
                                         f"{re.escape(repr(sinks))}"):
        RollingKVCache(2, 3, 4, 5, sinks=sinks)


def test_a_window_cache_larger_than_memory_is_refused_before_allocating(monkeypatch):
    """On a machine with 1 GiB free: 8,192 rows of 4 heads x 128 slots x 32 float32, K and V, is
    1 GiB exactly and fits; one row more is refused with its size. window_cache sizes all its
    layers together: K and V x 2 layers x 4 heads x 4 slots x 8 numbers x 8 bytes = 4 KiB a
    row, so 262,145 rows need just over 1 GiB."""
    monkeypatch.setattr(checks, "available_memory", lambda: 2**30)
    assert RollingKVCache(8192, 4, 127, 32, sinks=1).nbytes == 2**30
    with pytest.raises(ValueError, match=r"RollingKVCache \(8193, 4, 128, 32\) x 2 \(float32\) "
                                         r"needs 1.0 GiB, more than the 1.0 GiB"):
        RollingKVCache(8193, 4, 127, 32, sinks=1)
    with pytest.raises(ValueError, match="a window cache for 262145 rows needs 1.0 GiB"):
        window_cache(windowed("mha", 4, 0), 262145)


def test_a_rolling_cache_for_another_window_is_refused_before_any_work():
    cache = window_cache(windowed("mha", 4, 1), 1)
    for other in (windowed("mha", 5, 1), windowed("mha", 4, 0),
                  random_model(GPTConfig(**SMALL), seed=1)):
        with pytest.raises(ValueError, match=r"rolling buffer for \(sliding_window, "
                                             r"attention_sinks\) = \(4, 1\)"):
            other(random_ids(0, 1, 3), cache)
        assert len(cache) == 0


def test_return_attention_follows_the_keys_the_cache_returns():
    """With a rolling buffer the weights come over its keys in slot order: the plan's key
    positions put them back in time order, where they are the naive weights."""
    model = windowed("mha", 3, 1)
    ids = random_ids(0, 1, 8)
    cache = window_cache(model, 1)
    model(ids[:, :5], cache)
    key_pos = cache.plan(model, 1, 3).key_positions[0]  # (t_k,): planning changes nothing
    _, cached = model(ids[:, 5:], cache, return_attention=True)
    _, naive = model(ids, return_attention=True)
    held = key_pos >= 0
    for c, n in zip(cached, naive, strict=True):  # per layer: (1, H, 3, t_k), (1, H, 8, 8)
        np.testing.assert_allclose(c[..., held], n[:, :, 5:, key_pos[held]], rtol=0, atol=TOL)
        assert (c[..., ~held] == 0).all()
    weights = naive
    outside = ~band_by_hand(np.ones((1, 8), dtype=bool), 3, 1)[:, None]  # (1, 1, 8, 8)
    assert (weights[0][np.broadcast_to(outside, weights[0].shape)] == 0).all()
    np.testing.assert_allclose(weights[0].sum(axis=-1), 1.0, rtol=0, atol=TOL)


def test_a_loaded_model_runs_with_a_window_by_replacing_its_config():
    """The reversal checkpoint predates the window: it loads as full attention (ADDED_LATER),
    and the same weights run with a window through dataclasses.replace."""
    from tools.evaluate import CHECKPOINT

    model = GPT.load(CHECKPOINT, np.float64)
    assert model.config.sliding_window is None and model.config.attention_sinks == 0
    narrow = GPT(dataclasses.replace(model.config, sliding_window=2), dtype=np.float64,
                 weights=model.named_weights())
    ids = random_ids(0, 1, 10, vocab=128)
    assert np.abs(narrow(ids) - model(ids)).max() > 1e-3
    np.testing.assert_array_equal(narrow(ids[:, :2]), model(ids[:, :2]))  # no key left out yet


def test_a_mask_that_contradicts_the_counts_is_refused_before_any_work():
    model = windowed("rope", 4, 1)
    cache = window_cache(model, 2)
    model(random_ids(0, 2, 6), cache, attention_mask=padded(2, 6, [[0, 1], []]))
    before = state(cache)
    with pytest.raises(ValueError, match="row 0 holds 4 real tokens, the mask says 6"):
        model(random_ids(1, 2, 1), cache, attention_mask=np.ones((2, 7), dtype=np.int64))
    assert state(cache) == before
