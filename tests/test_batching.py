"""Prompts of different lengths in one batch: left padding, batch invariance, Hugging Face parity,
no NaN from fully masked pad rows, stopping at eos, chunked prefill, and up-front validation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import attention
from block import GPT, GPTConfig
from generate import generate_cached, generate_naive, left_pad, prefill

TINY = dict(vocab_size=64, max_seq_len=32, d_model=32, n_heads=4, n_layers=2, init_std=0.2)
MODEL = GPT(GPTConfig(**TINY), seed=1, dtype=np.float64)
# RoPE and grouped-query attention: positions from the padding mask must reach the rotation too.
ROPE_GQA = GPT(GPTConfig(**TINY, rope=True, n_kv_heads=2), seed=2, dtype=np.float64)
TOL = 1e-10


def prompts_of(lengths: list[int], seed: int = 0, vocab: int = 64) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n) for n in lengths]


def forbid_model_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any forward pass fail, to prove an error is raised before decoding starts."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model ran before the request was refused")
    monkeypatch.setattr(GPT, "__call__", refuse)


# --- left padding --------------------------------------------------------------------------------

def test_left_pad_hand_worked_example():
    ids, mask = left_pad([np.array([5, 6, 7]), np.array([8]), np.array([9, 10])], pad_id=3)
    np.testing.assert_array_equal(ids, [[5, 6, 7], [3, 3, 8], [3, 9, 10]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 1], [0, 1, 1]])


def test_left_pad_does_not_mutate_the_callers_prompts():
    prompts = [np.array([1, 2]), np.array([3])]
    left_pad(prompts, pad_id=0)
    assert [p.tolist() for p in prompts] == [[1, 2], [3]]


# --- batch invariance: every row decodes as if it were alone -------------------------------------

def assert_rows_match_alone(model: GPT, prompts: list[np.ndarray], n: int, **kw: object) -> None:
    for generate in (generate_cached, generate_naive):
        batch = generate(model, prompts, n, **kw)
        for b, prompt in enumerate(prompts):
            alone = generate(model, prompt[None], n, **kw)  # a (1, L) array: no padding at all
            steps = alone.tokens.shape[1]
            np.testing.assert_array_equal(batch.tokens[b, :steps], alone.tokens[0])
            np.testing.assert_allclose(batch.logits[b, :steps], alone.logits[0], rtol=0,
                                       atol=TOL)


@pytest.mark.parametrize("model", [MODEL, ROPE_GQA], ids=["learned-positions", "rope-gqa"])
def test_each_row_equals_its_prompt_alone(model: GPT):
    assert_rows_match_alone(model, prompts_of([3, 7, 1, 5]), 6)


def test_ragged_batch_actually_differs_when_positions_ignore_padding():
    """Power check: the same padded ids with NO mask (pads attended, positions from the cache
    length) give different logits, so the invariance test above could fail."""
    prompts = prompts_of([3, 7, 1, 5])
    ids, _ = left_pad(prompts, pad_id=0)
    padded = generate_cached(MODEL, prompts, 3).logits
    unmasked = generate_cached(MODEL, ids, 3).logits
    assert np.max(np.abs(padded[0] - unmasked[0])) > 1e-3


@settings(max_examples=12, deadline=None)
@given(lengths=st.lists(st.integers(1, 9), min_size=1, max_size=4), seed=st.integers(0, 99))
def test_batch_invariance_over_lengths(lengths: list[int], seed: int):
    prompts = prompts_of(lengths, seed)
    batch = generate_cached(MODEL, prompts, 4)
    for b, prompt in enumerate(prompts):
        alone = generate_cached(MODEL, [prompt], 4)
        np.testing.assert_array_equal(batch.tokens[b], alone.tokens[0])
        np.testing.assert_allclose(batch.logits[b], alone.logits[0], rtol=0, atol=TOL)


def test_naive_equals_cached_on_a_ragged_batch():
    prompts = prompts_of([2, 9, 1])
    naive, cached = generate_naive(MODEL, prompts, 8), generate_cached(MODEL, prompts, 8)
    np.testing.assert_array_equal(naive.tokens, cached.tokens)
    np.testing.assert_allclose(naive.logits, cached.logits, rtol=0, atol=TOL)
    assert cached.cache_lengths == list(range(9, 17))  # padded length P = 9, +1 per step


def test_list_of_equal_lengths_equals_the_array():
    prompts = prompts_of([5, 5])
    a, b = generate_cached(MODEL, prompts, 5), generate_cached(MODEL, np.stack(prompts), 5)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logits, b.logits, rtol=0, atol=TOL)


def test_pad_slots_in_the_cache_are_never_read():
    """Overwrite the cache's pad slots with garbage: the next logits do not change at all."""
    prompts = prompts_of([2, 6, 1])
    ids, mask = left_pad(prompts, pad_id=0)
    mask = np.concatenate([mask, np.ones((3, 1), dtype=mask.dtype)], axis=1)  # one decode step
    clean, dirty = MODEL.new_cache(3), MODEL.new_cache(3)
    prefill(MODEL, ids, clean, attention_mask=mask[:, :-1])
    prefill(MODEL, ids, dirty, attention_mask=mask[:, :-1])
    pads = mask[:, :-1] == 0  # (B, P)
    for kv in dirty:
        kv.keys[:, :, :6][np.broadcast_to(pads[:, None, :, None], kv.keys[:, :, :6].shape)] = 1e3
        kv.values[:, :, :6][np.broadcast_to(pads[:, None, :, None], kv.keys[:, :, :6].shape)] = -7
    token = np.array([1, 2, 3])
    a = MODEL(token[:, None], clean, attention_mask=mask)
    b = MODEL(token[:, None], dirty, attention_mask=mask)
    np.testing.assert_array_equal(a, b)


# --- Hugging Face parity -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_pair():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2,
                                     n_head=4, initializer_range=0.2)
    hf = transformers.GPT2LMHeadModel(config).double().eval()
    return torch, hf, GPT.from_gpt2(hf.state_dict(), n_heads=4, dtype=np.float64)


def hf_generate(torch, hf, ids, mask, n, pad_id, eos_id=None):  # noqa: ANN001
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          pad_token_id=pad_id, eos_token_id=eos_id, do_sample=False,
                          max_new_tokens=n, output_scores=True, return_dict_in_generate=True)
    tokens = out.sequences[:, ids.shape[1]:].numpy()
    return tokens, torch.stack(out.scores, dim=1).numpy()  # scores (B, N, V), float32 in HF


def test_hugging_face_generate_gives_the_same_tokens_on_a_left_padded_batch(hf_pair):
    torch, hf, model = hf_pair
    prompts = prompts_of([3, 7, 1, 5], seed=4)
    ids, mask = left_pad(prompts, pad_id=0)
    ours = generate_cached(model, prompts, 10)
    tokens, scores = hf_generate(torch, hf, ids, mask, 10, pad_id=0)
    np.testing.assert_array_equal(ours.tokens, tokens)
    # HF's generate keeps its scores in float32, so compare at float32 rounding.
    np.testing.assert_allclose(ours.logits, scores, rtol=0, atol=1e-5 * np.abs(scores).max())
    # The same padded ids and mask passed as an array give the same tokens.
    np.testing.assert_array_equal(generate_naive(model, ids, 10, attention_mask=mask).tokens,
                                  tokens)


def test_hugging_face_generate_stops_at_eos_like_ours(hf_pair):
    """HF fills a finished row with pad_token_id; with pad_token_id = eos_id that is our
    'repeat eos' convention, and both stop when every row has finished."""
    torch, hf, model = hf_pair
    prompts = prompts_of([3, 7, 1, 5], seed=5)
    ids, mask = left_pad(prompts, pad_id=0)
    eos = 50  # with these weights and prompts every row emits 50, first at steps 0, 7, 8 and 1
    firsts = [np.flatnonzero(row == eos)[0] for row in generate_cached(model, prompts, 12).tokens]
    assert sorted(firsts) == [0, 1, 7, 8]  # rows finish at different steps, all before step 11
    ours = generate_cached(model, prompts, 12, eos_id=eos)
    tokens, _ = hf_generate(torch, hf, ids, mask, 12, pad_id=eos, eos_id=eos)
    assert ours.tokens.shape == tokens.shape == (4, 9)  # both stopped after 9 of 12 steps
    np.testing.assert_array_equal(ours.tokens, tokens)


# --- no NaN with fully masked pad rows -----------------------------------------------------------

def run_ragged_with_cache(model: GPT) -> tuple[np.ndarray, list]:
    """Prefill a ragged batch (a length-1 prompt: its pad queries see no real key at all) and
    decode two steps; return all logits and the cache."""
    ids, mask = left_pad(prompts_of([1, 6, 3]), pad_id=0)
    mask = np.concatenate([mask, np.ones((3, 2), dtype=mask.dtype)], axis=1)
    cache = model.new_cache(3)
    logits = [model(ids, cache, attention_mask=mask[:, :6])]  # every position's logits, pads too
    for step in range(2):
        logits.append(model(np.array([[1], [2], [3]]), cache, attention_mask=mask[:, :7 + step]))
    return np.concatenate(logits, axis=1), cache


def test_fully_masked_pad_rows_stay_finite(monkeypatch: pytest.MonkeyPatch):
    # With -inf, a pad query whose every key is masked computes exp(-inf - (-inf)) = NaN, the NaN
    # becomes that slot's key/value in the next layer, and 0 * NaN spreads it to real rows.
    monkeypatch.setattr(attention, "NEG_INF", -np.inf)
    with np.errstate(invalid="ignore"):
        naive_logits, naive_cache = run_ragged_with_cache(MODEL)
    assert np.isnan(naive_logits).any()
    assert any(np.isnan(kv.keys[:, :, :len(kv)]).any() for kv in naive_cache)
    monkeypatch.undo()
    with np.errstate(invalid="raise"):  # the real constant: no invalid operation at all
        logits, cache = run_ragged_with_cache(MODEL)
    assert np.isfinite(logits).all()
    for kv in cache:
        assert np.isfinite(kv.keys[:, :, :len(kv)]).all()
        assert np.isfinite(kv.values[:, :, :len(kv)]).all()
    ours = generate_cached(MODEL, prompts_of([1, 6, 3]), 4, prefill_chunk=2)
    assert np.isfinite(ours.logits).all()


# --- stopping at eos -----------------------------------------------------------------------------

def test_a_finished_row_repeats_eos_while_the_others_continue():
    prompts = prompts_of([4, 2, 6], seed=2)
    free = generate_cached(MODEL, prompts, 12)
    eos = 32  # every row emits 32 here, first at steps 6, 1 and 9: they finish one by one
    stop0 = int(np.argmax(free.tokens[0] == eos))  # row 0 finishes at its first eos
    for generate in (generate_cached, generate_naive):
        out = generate(MODEL, prompts, 12, eos_id=eos)
        N = out.tokens.shape[1]
        assert np.all(out.tokens[0, stop0:] == eos)
        np.testing.assert_array_equal(out.tokens[0, :stop0 + 1], free.tokens[0, :stop0 + 1])
        for b in (1, 2):  # rows still running (or finishing later) are unaffected by row 0
            hits = np.flatnonzero(free.tokens[b, :N] == eos)
            end = N if hits.size == 0 else hits[0] + 1
            np.testing.assert_array_equal(out.tokens[b, :end], free.tokens[b, :end])
            np.testing.assert_allclose(out.logits[b, :end], free.logits[b, :end], rtol=0,
                                       atol=TOL)
            assert np.all(out.tokens[b, end:] == eos)
        # N = steps taken: max_new_tokens unless every row finished earlier
        firsts = [int(np.flatnonzero(row == eos)[0]) for row in free.tokens]
        assert firsts == [6, 1, 9] and N == 10


def test_generation_ends_when_every_row_has_finished():
    prompt = prompts_of([5], seed=7)
    free = generate_cached(MODEL, prompt, 10)
    eos = int(free.tokens[0, 3])
    first = int(np.argmax(free.tokens[0] == eos))
    out = generate_cached(MODEL, prompt, 10, eos_id=eos)
    assert out.tokens.shape == (1, first + 1) and out.logits.shape == (1, first + 1, 64)
    assert out.cache_lengths == list(range(5, 5 + first + 1))
    assert generate_naive(MODEL, prompt, 10, eos_id=eos).tokens.shape == (1, first + 1)


def test_eos_batch_invariance():
    prompts = prompts_of([3, 8, 1], seed=5)
    eos = int(generate_cached(MODEL, prompts, 6).tokens[1, 2])
    assert_rows_match_alone(MODEL, prompts, 6, eos_id=eos)


# --- chunked prefill -----------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 9, 50])
def test_chunked_prefill_equals_one_shot_with_padding(chunk: int):
    prompts = prompts_of([9, 4, 1, 6], seed=6)
    one_shot = generate_cached(MODEL, prompts, 5)
    chunked = generate_cached(MODEL, prompts, 5, prefill_chunk=chunk)
    np.testing.assert_array_equal(chunked.tokens, one_shot.tokens)
    np.testing.assert_allclose(chunked.logits, one_shot.logits, rtol=0, atol=TOL)
    assert chunked.cache_lengths == one_shot.cache_lengths


def test_chunked_prefill_fills_the_same_cache():
    ids, mask = left_pad(prompts_of([7, 3]), pad_id=0)
    whole, parts = MODEL.new_cache(2), MODEL.new_cache(2)
    a = prefill(MODEL, ids, whole, attention_mask=mask)
    b = prefill(MODEL, ids, parts, chunk_size=3, attention_mask=mask)
    np.testing.assert_allclose(a, b, rtol=0, atol=TOL)
    real = mask.astype(bool)[:, None, :, None]  # (B, P) -> (B, 1, P, 1): compare real slots
    for x, y in zip(whole, parts, strict=True):
        assert len(x) == len(y) == 7
        np.testing.assert_allclose(np.where(real, x.keys[:, :, :7], 0),
                                   np.where(real, y.keys[:, :, :7], 0), rtol=0, atol=TOL)


# --- validation before any decoding --------------------------------------------------------------

BAD_REQUESTS = [
    (dict(prompt_ids=[np.array([1, 2]), np.array([], dtype=int)]), ValueError, "prompt_ids[1]"),
    (dict(prompt_ids=[np.array([1, 2]), np.array([[3]])]), ValueError, "prompt_ids[1]"),
    (dict(prompt_ids=[np.array([1.0, 2.0])]), TypeError, "prompt_ids[0]"),
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
    (dict(prompt_ids=np.ones((2, 3), int), attention_mask=np.ones((2, 2))), ValueError,
     "attention_mask"),
    (dict(prompt_ids=np.ones((1, 2), int), attention_mask=np.array([[0, 2]])), ValueError,
     "attention_mask"),
    (dict(pad_id=64), ValueError, "pad_id"),
    (dict(eos_id=-1), ValueError, "eos_id"),
    (dict(eos_id=1.5), ValueError, "eos_id"),
]


@pytest.mark.parametrize("generate", [generate_cached, generate_naive])
@pytest.mark.parametrize(("bad", "error", "name"), BAD_REQUESTS)
def test_bad_requests_are_refused_before_decoding(monkeypatch, generate, bad, error, name):
    request = dict(prompt_ids=[np.array([1, 2, 3]), np.array([4])], max_new_tokens=2) | bad
    forbid_model_calls(monkeypatch)
    with pytest.raises(error, match=name.replace("[", r"\[").replace("]", r"\]")):
        generate(MODEL, **request)


@pytest.mark.parametrize("chunk", [0, -2, 1.5, True])
def test_bad_prefill_chunk_is_refused_before_decoding(monkeypatch, chunk):
    forbid_model_calls(monkeypatch)
    with pytest.raises(ValueError, match="prefill_chunk"):
        generate_cached(MODEL, [np.array([1, 2])], 2, prefill_chunk=chunk)


def test_prefill_refuses_a_wrong_mask_before_touching_the_cache():
    ids, mask = left_pad(prompts_of([5, 2]), pad_id=0)
    cache = MODEL.new_cache(2)
    with pytest.raises(ValueError, match="attention_mask"):
        prefill(MODEL, ids, cache, chunk_size=2, attention_mask=mask[:, :4])
    assert len(cache[0]) == 0
