"""The three equivalences the KV cache stands on, each one parametrized matrix over the configs.

    naive == cached     recomputing the whole prefix every step gives the tokens and logits of
                        prefill + one-token decode steps through the cache
    chunked == full     a prompt fed through the cache in pieces gives the logits (and fills the
                        cache with the keys and values) of one forward over all of it
    batched == alone    a left-padded row decodes exactly as its prompt decoded alone

The matrix: MHA, GQA (2 K/V heads), MQA (1), RoPE, RoPE + GQA; with and without left padding;
prefill in one piece or in chunks; float64 (exact to 1e-10) and float32 (to rounding). The naive
path is the reference: it uses no cache at all, so a wrong cache write, a wrong position or a
stale padding mask shows up as different logits.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import (
    SMALL,
    VARIANTS,
    assert_close,
    prompts_of,
    random_ids,
    small_model,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from generate import decode, generate_cached, generate_naive, greedy, left_pad, prefill

FEW = settings(max_examples=20, deadline=None)
DTYPES = ["float64", "float32"]
LAYERS = SMALL["n_layers"]


def prompts(padded: bool, seed: int = 0) -> np.ndarray | list[np.ndarray]:
    """A batch of 3: equal lengths as one (3, 7) array, or lengths 7, 2, 5 (left-padded)."""
    return prompts_of([7, 2, 5], seed) if padded else random_ids(seed, 3, 7)


# --- naive == cached -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk", [None, 3])
@pytest.mark.parametrize("padded", [False, True], ids=["equal", "padded"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_naive_equals_cached(variant, padded, chunk, dtype):
    model = small_model(variant, dtype)
    batch = prompts(padded)
    naive = generate_naive(model, batch, 10)
    cached = generate_cached(model, batch, 10, prefill_chunk=chunk)
    assert naive.tokens.shape == cached.tokens.shape == (3, 10)
    np.testing.assert_array_equal(cached.tokens, naive.tokens)
    assert_close(cached.logits, naive.logits, dtype)
    assert cached.logits.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(naive.tokens, naive.logits.argmax(axis=-1))  # greedy, really
    assert cached.cache_lengths == list(range(7, 17))  # P after prefill, then +1 per step
    assert naive.cache_lengths is None


def test_the_matrix_can_fail():
    """Power: with positions taken from the cache length alone (the padding ignored), the padded
    rows' logits differ by far more than the tolerance, so the matrix above could fail."""
    model = small_model()
    batch = prompts(padded=True)
    ids, _ = left_pad(batch)
    right = generate_cached(model, batch, 3).logits
    unmasked = generate_cached(model, ids, 3).logits  # the same ids as if every pad were a token
    assert np.abs(right[1] - unmasked[1]).max() > 1e-2


@FEW
@given(variant=st.sampled_from(sorted(VARIANTS)), B=st.integers(1, 3), P=st.integers(1, 12),
       N=st.integers(1, 8), chunk=st.none() | st.integers(1, 6), seed=st.integers(0, 2**16))
def test_prefill_and_decode_by_hand_equal_naive(variant, B, P, N, chunk, seed):
    """prefill, then decode one token at a time, by hand: every step's logits are the naive
    ones, and every layer's cache holds exactly P, then P + 1, P + 2, ... positions."""
    model = small_model(variant)
    prompt = random_ids(seed, B, P)
    naive = generate_naive(model, prompt, N)
    cache = model.new_cache(B)
    assert [len(kv) for kv in cache.layers] == [0] * LAYERS
    logits = prefill(model, prompt, cache, chunk_size=chunk)
    for n in range(N):
        assert [len(kv) for kv in cache.layers] == [P + n] * LAYERS and len(cache) == P + n
        assert_close(logits, naive.logits[:, n])
        token = greedy(logits)
        np.testing.assert_array_equal(token, naive.tokens[:, n])
        logits = decode(model, token, cache)
    assert len(cache) == P + N


# --- chunked == full -----------------------------------------------------------------------------

def run_in_chunks(model, ids: np.ndarray, sizes: list[int]):
    """Feed ids (B, P) through one cache in chunks of the given sizes; logits (B, P, V)."""
    cache = model.new_cache(ids.shape[0])
    out, start = [], 0
    for t in sizes:
        out.append(model(ids[:, start:start + t], cache))
        start += t
        assert [len(kv) for kv in cache.layers] == [start] * LAYERS
    return np.concatenate(out, axis=1), cache


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes", [[5, 1, 3], [1] * 9, [8, 1], [2, 7]], ids=str)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_chunked_equals_full(variant, sizes, dtype):
    """Each chunk's queries are the last rows of a rectangular, bottom-right mask; a square mask
    or positions restarting per chunk would break every chunk after the first."""
    model = small_model(variant, dtype)
    ids = random_ids(4, 2, 9)
    chunked, cache = run_in_chunks(model, ids, sizes)
    assert_close(chunked, model(ids), dtype)
    _, one_shot = run_in_chunks(model, ids, [9])  # and the cache holds what one prefill writes
    for kv, expected in zip(cache.layers, one_shot.layers, strict=True):
        for got, want in ((kv.keys, expected.keys), (kv.values, expected.values)):
            assert_close(got[:, :, :9], want[:, :, :9], dtype)


def chunk_sizes(P: int) -> st.SearchStrategy[list[int]]:
    """Every way to cut P positions into consecutive non-empty chunks."""
    cuts = st.sets(st.integers(1, P - 1)) if P > 1 else st.just(set())
    return cuts.map(lambda c: np.diff([0, *sorted(c), P]).tolist())


@FEW
@given(variant=st.sampled_from(sorted(VARIANTS)), B=st.integers(1, 3), P=st.integers(1, 14),
       seed=st.integers(0, 2**16), data=st.data())
def test_any_chunk_split_equals_full(variant, B, P, seed, data):
    sizes = data.draw(chunk_sizes(P), label="sizes")
    model = small_model(variant)
    ids = random_ids(seed, B, P)
    chunked, _ = run_in_chunks(model, ids, sizes)
    assert_close(chunked, model(ids))


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 9, 50])
@pytest.mark.parametrize("variant", ["mha", "rope_gqa"])
def test_chunked_prefill_with_padding_equals_one_shot(variant, chunk):
    """Left-padded prompts through prefill in chunks: the same last logits, and the same keys
    and values in every real slot, as one prefill (the pad slots are never read)."""
    model = small_model(variant)
    ids, mask = left_pad(prompts_of([9, 4, 1, 6], seed=6))
    whole, parts = model.new_cache(4), model.new_cache(4)
    assert_close(prefill(model, ids, parts, chunk_size=chunk, attention_mask=mask),
                 prefill(model, ids, whole, attention_mask=mask))
    np.testing.assert_array_equal(parts.positions, whole.positions)
    real = mask.astype(bool)[:, None, :, None]  # (B, P) -> (B, 1, P, 1): the real slots
    for a, b in zip(whole.layers, parts.layers, strict=True):
        assert len(a) == len(b) == 9
        assert_close(np.where(real, a.keys[:, :, :9], 0), np.where(real, b.keys[:, :, :9], 0))
        assert_close(np.where(real, a.values[:, :, :9], 0), np.where(real, b.values[:, :, :9], 0))


# --- batched == alone ----------------------------------------------------------------------------

@pytest.mark.parametrize("generate", [generate_cached, generate_naive], ids=["cached", "naive"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_each_padded_row_equals_its_prompt_alone(variant, generate):
    model = small_model(variant)
    batch = prompts_of([3, 7, 1, 5])
    together = generate(model, batch, 6)
    for b, prompt in enumerate(batch):
        alone = generate(model, prompt[None], 6)  # a (1, L) array: no padding at all
        np.testing.assert_array_equal(together.tokens[b], alone.tokens[0])
        assert_close(together.logits[b], alone.logits[0])


@settings(max_examples=12, deadline=None)
@given(lengths=st.lists(st.integers(1, 9), min_size=1, max_size=4), seed=st.integers(0, 99))
def test_batch_invariance_over_lengths(lengths: list[int], seed: int):
    model = small_model("rope")
    batch = prompts_of(lengths, seed)
    together = generate_cached(model, batch, 4)
    for b, prompt in enumerate(batch):
        alone = generate_cached(model, [prompt], 4)
        np.testing.assert_array_equal(together.tokens[b], alone.tokens[0])
        assert_close(together.logits[b], alone.logits[0])
