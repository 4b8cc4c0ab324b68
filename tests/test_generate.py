"""generate.py beyond the equivalences: left padding, stopping at eos, requests refused before any
decoding, prefill and decode refusing bad calls without touching the cache, pad slots that are
never read, and no NaN from rows whose every key is padding."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import V, cache_state, prompts_of, random_ids, small_model

import attention
from block import GPT
from generate import decode, generate_cached, generate_naive, left_pad, prefill, prepare_request
from parts.sampling import Sampler

TOL = 1e-10


# --- left padding --------------------------------------------------------------------------------

def test_left_pad_hand_worked_example():
    ids, mask = left_pad([np.array([5, 6, 7]), np.array([8]), np.array([9, 10])], pad_id=3)
    np.testing.assert_array_equal(ids, [[5, 6, 7], [3, 3, 8], [3, 9, 10]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 1], [0, 1, 1]])


def test_left_pad_pads_with_token_zero_by_default():
    ids, mask = left_pad([np.array([4]), np.array([5, 6])])
    np.testing.assert_array_equal(ids, [[0, 4], [5, 6]])
    np.testing.assert_array_equal(mask, [[0, 1], [1, 1]])
    assert np.issubdtype(ids.dtype, np.integer) and np.issubdtype(mask.dtype, np.integer)


@pytest.mark.parametrize("prompts", [(np.array([1, 2]) for _ in range(2)), {1: np.array([1])},
                                     np.array([[1, 2]]), [], 7])
def test_left_pad_refuses_anything_but_a_non_empty_list_of_prompts(prompts):
    """A generator or a dict would iterate, and a (B, P) array would pass row by row, but none
    is the documented list of 1-D prompts: each is refused by name."""
    with pytest.raises(TypeError, match=r"^prompts must be a non-empty list of 1-D int arrays, "
                                        "got "):
        left_pad(prompts)


@pytest.mark.parametrize(("pad_id", "kwargs", "error", "match"), [
    (2.7, {}, TypeError, "got 2.7"),  # was padded with 2
    (np.float64(1.0), {}, TypeError, "got np.float64"),
    (True, {}, TypeError, "got True"),
    ("0", {}, TypeError, "got '0'"),
    (None, {}, TypeError, "got None"),
    (-1, {}, ValueError, "got -1"),
    (2**70, {}, ValueError, "got 1180591620717411303424"),  # past int64: np.full's OverflowError
    (64, {"vocab_size": 64}, ValueError, r"in \[0, 64\), got 64"),
])
def test_left_pad_refuses_a_pad_id_that_is_no_token_id(pad_id, kwargs, error, match):
    with pytest.raises(error, match=r"^pad_id must be .*" + match):
        left_pad([np.array([1, 2]), np.array([3])], pad_id, **kwargs)


@pytest.mark.parametrize("pad_id", [0, 63, np.int64(5), np.uint8(7)])
def test_left_pad_takes_any_integer_token_id(pad_id):
    ids, _ = left_pad([np.array([1, 2]), np.array([3])], pad_id, vocab_size=64)
    assert ids[1, 0] == pad_id and ids.dtype == np.int64


def test_generation_leaves_the_callers_prompts_alone():
    prompts = [np.array([1, 2]), np.array([3])]
    array = random_ids(1, 2, 5)
    copy = array.copy()
    for generate in (generate_naive, generate_cached):
        generate(small_model(), prompts, 3)
        generate(small_model(), array, 3)
    assert [p.tolist() for p in prompts] == [[1, 2], [3]]
    np.testing.assert_array_equal(array, copy)


def test_list_of_equal_lengths_equals_the_array():
    prompts = prompts_of([5, 5])
    a, b = generate_cached(small_model(), prompts, 5), generate_cached(small_model(),
                                                                       np.stack(prompts), 5)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logits, b.logits, rtol=0, atol=TOL)


def test_generation_is_not_one_repeated_token():
    # Guards the other tests' meaning: with a collapsed model every step would pick the same token
    # and a wrong cache could go unnoticed in the tokens.
    tokens = generate_cached(small_model(), random_ids(0, 2, 4), 12).tokens
    assert all(len(set(row)) > 2 for row in tokens.tolist())


def test_prompt_may_fill_max_seq_len_exactly():
    prompt = random_ids(3, 2, 28)
    naive = generate_naive(small_model(), prompt, 4)  # 28 + 4 = 32 = max_seq_len
    cached = generate_cached(small_model(), prompt, 4)
    np.testing.assert_array_equal(cached.tokens, naive.tokens)
    assert cached.cache_lengths == [28, 29, 30, 31]


# --- padding is invisible ------------------------------------------------------------------------

def test_pad_slots_in_the_cache_are_never_read():
    """Overwrite the cache's pad slots with garbage: the next logits do not change at all."""
    model = small_model()
    ids, mask = left_pad(prompts_of([2, 6, 1]), pad_id=0)
    clean, dirty = model.new_cache(3), model.new_cache(3)
    prefill(model, ids, clean, attention_mask=mask)
    prefill(model, ids, dirty, attention_mask=mask)
    pads = np.broadcast_to((mask == 0)[:, None, :, None], (3, 4, 6, 8))  # (B, P) -> K's shape
    for kv in dirty.layers:
        kv.keys[:, :, :6][pads] = 1e3
        kv.values[:, :, :6][pads] = -7
    token = np.array([1, 2, 3])
    np.testing.assert_array_equal(decode(model, token, clean), decode(model, token, dirty))


def run_ragged_with_cache(model) -> tuple[np.ndarray, object]:
    """Prefill a ragged batch (a length-1 prompt: its pad queries see no real key at all) and
    decode two steps; return all logits and the cache."""
    ids, mask = left_pad(prompts_of([1, 6, 3]), pad_id=0)
    cache = model.new_cache(3)
    logits = [model(ids, cache, attention_mask=mask)]  # every position's logits, pads too
    for step in range(2):
        logits.append(model(np.array([[1], [2], [3]]) + step, cache))
    return np.concatenate(logits, axis=1), cache


def softmax_without_the_guard(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def test_fully_masked_pad_rows_stay_finite(monkeypatch: pytest.MonkeyPatch):
    # Hidden scores are -inf. Without softmax's guard, a pad query whose every key is masked
    # computes exp(-inf - (-inf)) = NaN, the NaN becomes that slot's key/value in the next layer,
    # and 0 * NaN spreads it to real rows.
    model = small_model()
    monkeypatch.setattr(attention, "softmax", softmax_without_the_guard)
    with np.errstate(invalid="ignore"):
        naive_logits, naive_cache = run_ragged_with_cache(model)
    assert np.isnan(naive_logits).any()
    assert any(np.isnan(kv.keys[:, :, :len(kv)]).any() for kv in naive_cache.layers)
    monkeypatch.undo()
    with np.errstate(invalid="raise"):  # the real softmax: no invalid operation at all
        logits, cache = run_ragged_with_cache(model)
    assert np.isfinite(logits).all()
    for kv in cache.layers:
        assert np.isfinite(kv.keys[:, :, :len(kv)]).all()
        assert np.isfinite(kv.values[:, :, :len(kv)]).all()
    assert np.isfinite(generate_cached(model, prompts_of([1, 6, 3]), 4, prefill_chunk=2)
                       .logits).all()


# --- stopping at eos -----------------------------------------------------------------------------

def test_a_finished_row_repeats_eos_while_the_others_continue():
    model = small_model()
    prompts = prompts_of([4, 2, 6], seed=2)
    free = generate_cached(model, prompts, 12)
    eos = int(free.tokens[1, 1])  # row 1 emits it at step 1; find where the others first do
    firsts = [np.flatnonzero(row == eos) for row in free.tokens]
    assert firsts[1][0] == 1
    for generate in (generate_cached, generate_naive):
        out = generate(model, prompts, 12, eos_id=eos)
        N = out.tokens.shape[1]
        for b, hits in enumerate(firsts):
            end = N if hits.size == 0 else min(hits[0] + 1, N)  # up to and with its first eos
            np.testing.assert_array_equal(out.tokens[b, :end], free.tokens[b, :end])
            np.testing.assert_allclose(out.logits[b, :end], free.logits[b, :end], rtol=0,
                                       atol=TOL)
            assert np.all(out.tokens[b, end:] == eos)  # finished: eos from then on
        # N = steps taken: max_new_tokens unless every row finished earlier
        last = max(h[0] if h.size else 11 for h in firsts)
        assert N == min(12, last + 1)


def test_generation_ends_when_every_row_has_finished():
    model = small_model()
    prompt = prompts_of([5], seed=7)
    free = generate_cached(model, prompt, 10)
    eos = int(free.tokens[0, 3])
    first = int(np.argmax(free.tokens[0] == eos))
    out = generate_cached(model, prompt, 10, eos_id=eos)
    assert out.tokens.shape == (1, first + 1) and out.logits.shape == (1, first + 1, V)
    assert out.cache_lengths == list(range(5, 5 + first + 1))
    assert generate_naive(model, prompt, 10, eos_id=eos).tokens.shape == (1, first + 1)


def test_eos_batch_invariance():
    model = small_model("gqa")
    prompts = prompts_of([3, 8, 1], seed=5)
    eos = int(generate_cached(model, prompts, 6).tokens[1, 2])
    together = generate_cached(model, prompts, 6, eos_id=eos)
    for b, prompt in enumerate(prompts):
        alone = generate_cached(model, [prompt], 6, eos_id=eos)
        n = alone.tokens.shape[1]
        np.testing.assert_array_equal(together.tokens[b, :n], alone.tokens[0])
        np.testing.assert_allclose(together.logits[b, :n], alone.logits[0], rtol=0, atol=TOL)


# --- requests refused before any decoding --------------------------------------------------------

def test_counter_sees_a_normal_request(model_calls):
    # The counting fixture itself must be able to see work, or the refusals below prove nothing.
    generate_cached(small_model(), random_ids(4, 1, 3), 3)
    assert model_calls == {"forward": 3, "new_cache": 1}  # 1 prefill + 2 decodes
    generate_naive(small_model(), random_ids(4, 1, 3), 3)
    assert model_calls["forward"] == 6


BAD_REQUESTS = [
    (dict(prompt_ids=np.zeros((2, 30), int), max_new_tokens=3), ValueError,
     r"30 \+ max_new_tokens=3 = 33 .*max_seq_len=32"),
    (dict(prompt_ids=np.zeros((1, 33), int), max_new_tokens=1), ValueError, "max_seq_len=32"),
    (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
    (dict(max_new_tokens=2.0), ValueError, "max_new_tokens"),
    (dict(max_new_tokens=True), ValueError, "max_new_tokens"),
    (dict(prompt_ids=np.zeros(3, int)), ValueError, "prompt_ids must have 2 dimension"),
    (dict(prompt_ids=np.zeros((2, 0), int)), ValueError, "prompt_ids must not be empty"),
    (dict(prompt_ids=np.zeros((0, 3), int)), ValueError, "prompt_ids must not be empty"),
    (dict(prompt_ids=np.zeros((2, 3))), TypeError, "prompt_ids must be integers"),
    (dict(prompt_ids=np.full((2, 3), 64)), ValueError, r"prompt_ids must be in \[0, 64\)"),
    (dict(prompt_ids=np.full((2, 3), -1)), ValueError, r"prompt_ids must be in \[0, 64\)"),
    (dict(prompt_ids="hello"), TypeError, "prompt_ids must be an integer array"),
    (dict(prompt_ids=[np.array([1, 2]), np.array([], dtype=int)]), ValueError, r"prompt_ids\[1\]"),
    (dict(prompt_ids=[np.array([1, 2]), np.array([[3]])]), ValueError, r"prompt_ids\[1\]"),
    (dict(prompt_ids=[np.array([1.0, 2.0])]), TypeError, r"prompt_ids\[0\]"),
    (dict(prompt_ids=[1, 2, 3]), TypeError, r"prompt_ids\[0\] must be an integer array"),
    (dict(prompt_ids=[]), TypeError, "prompts"),
    (dict(prompt_ids=[np.array([1, 99])]), ValueError, "prompt_ids"),
    (dict(prompt_ids=[np.arange(30), np.array([1])], max_new_tokens=3), ValueError,
     "max_seq_len"),
    (dict(prompt_ids=[np.array([1])], attention_mask=np.ones((1, 1))), ValueError,
     "attention_mask"),
    (dict(prompt_ids=np.ones((2, 3), int), attention_mask=np.array([[1, 1, 0], [1, 1, 1]])),
     ValueError, "left padding"),
    (dict(prompt_ids=np.ones((2, 3), int), attention_mask=np.array([[0, 0, 0], [1, 1, 1]])),
     ValueError, "left padding"),
    (dict(prompt_ids=np.ones((2, 3), int), attention_mask=np.array([[1, 0, 1], [1, 1, 1]])),
     ValueError, "left padding"),
    (dict(prompt_ids=np.ones((2, 3), int), attention_mask=np.ones((2, 2))), ValueError,
     "attention_mask"),
    (dict(prompt_ids=np.ones((1, 2), int), attention_mask=np.array([[0, 2]])), ValueError,
     "attention_mask"),
    (dict(prompt_ids=np.ones((1, 2), int), attention_mask=[[1, 1]]), TypeError,
     "attention_mask"),
    (dict(pad_id=64), ValueError, "pad_id"),
    (dict(pad_id=True), ValueError, "pad_id"),
    (dict(eos_id=-1), ValueError, "eos_id"),
    (dict(eos_id=1.5), ValueError, "eos_id"),
]


@pytest.mark.parametrize("generate", [generate_cached, generate_naive], ids=["cached", "naive"])
@pytest.mark.parametrize(("bad", "error", "match"), BAD_REQUESTS)
def test_bad_requests_are_refused_before_decoding(model_calls, generate, bad, error, match):
    request = dict(prompt_ids=[np.array([1, 2, 3]), np.array([4])], max_new_tokens=2) | bad
    with pytest.raises(error, match=match):
        generate(small_model(), **request)
    assert model_calls == {"forward": 0, "new_cache": 0}


@pytest.mark.parametrize("chunk", [0, -2, 1.5, True])
def test_bad_prefill_chunk_is_refused_before_decoding(model_calls, chunk):
    with pytest.raises(ValueError, match="prefill_chunk"):
        generate_cached(small_model(), [np.array([1, 2])], 2, prefill_chunk=chunk)
    assert model_calls == {"forward": 0, "new_cache": 0}


def test_generate_refuses_something_that_is_not_a_model(model_calls):
    with pytest.raises(TypeError, match="model must be a GPT"):
        generate_cached(lambda ids: ids, [np.array([1])], 2)


# --- prefill and decode refuse a bad call without touching the cache ----------------------------

def started_cache(B: int = 2):
    """A cache holding a 3-token prompt, so a wrong refusal would have stale positions to break."""
    model = small_model()
    cache = model.new_cache(B)
    prefill(model, random_ids(20, B, 3), cache)
    return model, cache


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(prompt_ids=np.array([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 64]]), chunk_size=2),
     ValueError, r"ids must be in \[0, 64\)"),  # a bad id in the LAST chunk
    (dict(prompt_ids=np.ones((2, 30), int), chunk_size=4), ValueError, "max_len=32"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(chunk_size=-2), ValueError, "chunk_size"),
    (dict(chunk_size=1.5), ValueError, "chunk_size"),
    (dict(attention_mask=np.ones((2, 4), int)), ValueError, r"shape \(2, 7\)"),
    (dict(attention_mask=np.array([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0]])), ValueError,
     "last prompt token of every row must be real"),
    (dict(attention_mask=np.array([[0, 1, 1, 1, 1, 1, 1], [1] * 7])), ValueError,
     "contradicts the cache: row 0"),
    (dict(prompt_ids=np.ones((2, 0), int)), ValueError, "must not be empty"),
    (dict(prompt_ids=np.ones((3, 4), int)), ValueError, "batch of 3 rows"),
    (dict(prompt_ids=[[1, 2], [3, 4]]), None, None),  # a nested list is a (2, 2) prompt: fine
])
def test_prefill_refuses_the_whole_request_before_any_chunk(kwargs, error, match):
    model, cache = started_cache()
    before = cache_state(cache)
    request = dict(prompt_ids=random_ids(21, 2, 4)) | kwargs
    if error is None:
        prefill(model, cache=cache, **request)
        assert len(cache) == 5
        return
    with pytest.raises(error, match=match):
        prefill(model, cache=cache, **request)
    assert cache_state(cache) == before
    # A retry with a good request then builds on the right positions.
    good = random_ids(22, 2, 4)
    fresh_model, fresh = started_cache()
    np.testing.assert_array_equal(prefill(model, good, cache), prefill(fresh_model, good, fresh))


@pytest.mark.parametrize(("token", "error", "match"), [
    (np.int64(3), TypeError, "token_ids must be an integer array"),
    (np.array([[3], [4]]), ValueError, "token_ids must have 1 dimension"),
    (np.array([3, 4, 5]), ValueError, "batch of 3 rows"),
    (np.array([3.0, 4.0]), TypeError, "token_ids must be integers"),
    (np.array([3, 64]), ValueError, r"ids must be in \[0, 64\)"),
    (7, TypeError, "token_ids must be an integer array"),
])
def test_decode_refuses_a_bad_token_without_touching_the_cache(token, error, match):
    model, cache = started_cache()
    before = cache_state(cache)
    with pytest.raises(error, match=match):
        decode(model, token, cache)
    assert cache_state(cache) == before


@pytest.mark.parametrize("fn", [prefill, decode])
@pytest.mark.parametrize("cache", [None, [], "cache"])
def test_prefill_and_decode_need_a_model_cache(fn, cache):
    with pytest.raises(TypeError, match="cache must keep the cache protocol"):
        fn(small_model(), np.array([1, 2]) if fn is decode else np.array([[1, 2]]), cache)


# --- refusals name the argument; the pieces of a request reach the decoder -----------------------

@pytest.mark.parametrize(("bad", "error", "match"), [
    (dict(max_new_tokens=0), ValueError, r"^max_new_tokens must be a positive int, got 0$"),
    (dict(pad_id=64), ValueError, r"^pad_id must be a token id in \[0, 64\), got 64$"),
    (dict(eos_id=-1), ValueError, r"^eos_id must be a token id in \[0, 64\), got -1$"),
    (dict(prompt_ids=np.ones((2, 3), int), attention_mask=np.ones((2, 2), int)), ValueError,
     r"^attention_mask must have shape \(2, 3\), got \(2, 2\)$"),
    (dict(prefill_chunk=0), ValueError, r"^prefill_chunk must be a positive int, got 0$"),
])
def test_refusals_start_with_the_arguments_name(model_calls, bad, error, match):
    request = dict(prompt_ids=[np.array([1, 2, 3]), np.array([4])], max_new_tokens=2) | bad
    with pytest.raises(error, match=match):
        generate_cached(small_model(), **request)
    assert model_calls == {"forward": 0, "new_cache": 0}


def test_prefill_refuses_a_bad_chunk_size_by_its_name():
    model, cache = started_cache()
    with pytest.raises(ValueError, match=r"^chunk_size must be a positive int, got 0$"):
        prefill(model, random_ids(21, 2, 4), cache, chunk_size=0)


def test_prepare_request_pads_with_pad_id_and_returns_a_bool_mask():
    """A list of prompts is left-padded with the pad_id asked for (5 here, not the default 0);
    an array without a mask gets an all-True bool mask, as the docstring says."""
    model = small_model()
    ids, mask = prepare_request(model, [np.array([1, 2, 3]), np.array([4])], 2, pad_id=5)
    np.testing.assert_array_equal(ids, [[1, 2, 3], [5, 5, 4]])
    np.testing.assert_array_equal(mask, [[True, True, True], [False, False, True]])
    ids, mask = prepare_request(model, np.array([[7, 8]]), 2)
    assert mask.dtype == bool and mask.tolist() == [[True, True]]


def test_prepare_request_checks_the_sampler_it_is_given():
    model = small_model()
    prepare_request(model, np.array([[7, 8]]), 2, sampler=Sampler())  # a Sampler is accepted
    with pytest.raises(TypeError, match=r"^sampler must be a Sampler, got str$"):
        prepare_request(model, np.array([[7, 8]]), 2, sampler="greedy")


def test_a_prefill_that_fails_half_way_leaves_the_cache_as_it_was(monkeypatch):
    """The second chunk's model call fails after the first chunk was written: the cache is rolled
    back to its length before the call, and the original error reaches the caller."""
    model, cache = started_cache()
    before = cache_state(cache)
    real, calls = GPT.run, []

    def fails_on_the_second_chunk(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the second chunk failed")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(GPT, "run", fails_on_the_second_chunk)
    with pytest.raises(RuntimeError, match="^the second chunk failed$"):
        prefill(model, random_ids(21, 2, 4), cache, chunk_size=2)
    assert len(calls) == 2 and cache_state(cache) == before
