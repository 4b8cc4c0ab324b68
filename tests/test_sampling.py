"""Sampling: temperature, top-k and top-p draw from the right set with the right frequencies, a
seeded generator makes naive and cached decoding pick the same tokens, and bad settings are refused
before any decoding."""

from __future__ import annotations

import math

import numpy as np
import pytest

from block import GPT, GPTConfig
from generate import generate_cached, generate_naive
from parts.sampling import Sampler, draw, keep_top_k, keep_top_p, sampling_probs

MODEL = GPT(GPTConfig(vocab_size=64, max_seq_len=32, d_model=32, n_heads=4, n_layers=2,
                      init_std=0.2), seed=1, dtype=np.float64)
PROMPTS = [np.array([5, 9, 2]), np.array([7]), np.array([1, 2, 3, 4, 5, 6])]


def softmax(x: np.ndarray) -> np.ndarray:
    """The test's own softmax, written out again rather than imported from the code under test."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def chi_square_p_value(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson's chi-square goodness of fit, p-value in closed form. For an even number of degrees
    of freedom k, P(chi2_k > x) = exp(-x/2) * sum_{i < k/2} (x/2)^i / i!  (no scipy needed)."""
    expected = counts.sum() * probs
    assert expected.min() >= 5, "the chi-square approximation needs >= 5 expected per cell"
    stat = float(((counts - expected) ** 2 / expected).sum())
    k = len(probs) - 1
    assert k % 2 == 0, "the closed form is for even degrees of freedom"
    half = stat / 2
    return math.exp(-half) * sum(half**i / math.factorial(i) for i in range(k // 2))


# --- the filters ---------------------------------------------------------------------------------

def test_top_p_hand_worked_example():
    probs = np.array([[0.1, 0.5, 0.25, 0.15]])
    # ranked: 0.5 (token 1), 0.25 (token 2), 0.15 (token 3), 0.1 (token 0)
    assert np.flatnonzero(keep_top_p(probs, 0.5)).tolist() == [1]  # 0.5 already reaches 0.5
    assert np.flatnonzero(keep_top_p(probs, 0.6)).tolist() == [1, 2]
    assert np.flatnonzero(keep_top_p(probs, 0.75)).tolist() == [1, 2]  # 0.75 reaches 0.75
    assert np.flatnonzero(keep_top_p(probs, 0.76)).tolist() == [1, 2, 3]
    assert np.flatnonzero(keep_top_p(probs, 1.0)).tolist() == [0, 1, 2, 3]
    assert np.flatnonzero(keep_top_p(probs, 1e-9)).tolist() == [1]  # the top token always stays


def test_top_k_never_picks_outside_the_k_largest():
    logits = np.random.default_rng(0).standard_normal((4000, 16))
    picks = Sampler(1.5, top_k=3, rng=np.random.default_rng(1))(logits)
    top3 = np.argsort(-logits, axis=-1)[:, :3]  # (B, 3), the reference set
    assert (picks[:, None] == top3).any(axis=-1).all()
    rank = (top3 == picks[:, None]).argmax(axis=-1)
    assert set(rank.tolist()) == {0, 1, 2}  # it really samples: all three ranks occur
    unfiltered = Sampler(1.5, rng=np.random.default_rng(1))(logits)  # power: without top_k...
    assert not (unfiltered[:, None] == top3).any(axis=-1).all()  # ...some picks fall outside


def nucleus(probs: np.ndarray, p: float) -> set[int]:
    """Reference nucleus of one row, by hand: add tokens from the most likely down until the total
    reaches p."""
    total, chosen = 0.0, set()
    for token in sorted(range(len(probs)), key=lambda i: -probs[i]):
        chosen.add(token)
        total += probs[token]
        if total >= p:
            break
    return chosen


def test_top_p_never_picks_outside_the_nucleus():
    logits = np.random.default_rng(2).standard_normal((3000, 12)) * 2
    T, p = 1.3, 0.7
    picks = Sampler(T, top_p=p, rng=np.random.default_rng(3))(logits)
    sets = [nucleus(row, p) for row in softmax(logits / T)]
    assert all(int(t) in s for t, s in zip(picks, sets, strict=True))
    assert np.mean([len(s) for s in sets]) > 1.5  # the nuclei are not trivially one token
    free = Sampler(T, rng=np.random.default_rng(3))(logits)  # power: without top_p some escape
    assert not all(int(t) in s for t, s in zip(free, sets, strict=True))


def test_draw_uses_one_uniform_per_row():
    probs = softmax(np.random.default_rng(4).standard_normal((7, 5)))
    a, b = np.random.default_rng(9), np.random.default_rng(9)
    draw(probs, a)
    b.random(7)
    assert a.bit_generator.state == b.bit_generator.state


# --- the distribution ----------------------------------------------------------------------------

LOGITS = np.array([1.2, -0.3, 0.4, 2.0, -1.0, 0.0, 0.9, -0.6, 1.5])  # V = 9: 8 degrees of freedom
DRAWS = 20_000


def counts_of(sampler: Sampler, V: int) -> np.ndarray:
    picks = sampler(np.tile(LOGITS, (DRAWS, 1)))  # (DRAWS, V): one draw per row
    return np.bincount(picks, minlength=V)


def test_draws_follow_softmax_of_logits_over_temperature():
    """Chi-square goodness of fit at the 0.1% level: a correct sampler fails with probability
    1e-3 for a random seed (the seed is fixed, so the test is deterministic). Power check: the same
    counts are rejected against T = 1, so a sampler that ignored the temperature would fail."""
    T = 0.7
    counts = counts_of(Sampler(T, rng=np.random.default_rng(5)), 9)
    assert chi_square_p_value(counts, softmax(LOGITS / T)) > 1e-3
    assert chi_square_p_value(counts, softmax(LOGITS)) < 1e-6


def test_top_k_draws_follow_the_renormalised_top_k():
    top5 = np.argsort(-LOGITS)[:5]  # k = 5: 4 degrees of freedom
    counts = counts_of(Sampler(1.2, top_k=5, rng=np.random.default_rng(6)), 9)
    assert counts[np.setdiff1d(np.arange(9), top5)].sum() == 0
    assert chi_square_p_value(counts[top5], softmax(LOGITS[top5] / 1.2)) > 1e-3


def test_very_low_temperature_is_greedy():
    logits = np.random.default_rng(7).standard_normal((500, 20))
    for kw in ({}, {"top_k": 4}, {"top_p": 0.5}):
        picks = Sampler(1e-6, rng=np.random.default_rng(8), **kw)(logits)
        np.testing.assert_array_equal(picks, logits.argmax(axis=-1))
    greedy = generate_cached(MODEL, PROMPTS, 8)
    cold = generate_cached(MODEL, PROMPTS, 8, temperature=1e-6, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(cold.tokens, greedy.tokens)


@pytest.mark.parametrize("temperature", [None, 0, 0.0])
def test_temperature_zero_or_none_is_greedy_and_leaves_the_rng_alone(temperature):
    rng = np.random.default_rng(11)
    out = generate_cached(MODEL, PROMPTS, 6, temperature=temperature, top_k=3, rng=rng)
    np.testing.assert_array_equal(out.tokens, out.logits.argmax(axis=-1))
    assert rng.bit_generator.state == np.random.default_rng(11).bit_generator.state


# --- naive and cached sample the same tokens -----------------------------------------------------

@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.8, top_k=10),
                                dict(temperature=1.5, top_p=0.9, top_k=20),
                                dict(temperature=2.0, eos_id=12)])
def test_naive_and_cached_draw_identical_tokens_for_the_same_seed(kw):
    a, b = np.random.default_rng(42), np.random.default_rng(42)
    naive = generate_naive(MODEL, PROMPTS, 10, rng=a, **kw)
    cached = generate_cached(MODEL, PROMPTS, 10, rng=b, **kw)
    np.testing.assert_array_equal(naive.tokens, cached.tokens)
    np.testing.assert_allclose(naive.logits, cached.logits, rtol=0, atol=1e-10)
    assert a.bit_generator.state == b.bit_generator.state  # they consumed the stream identically
    if "eos_id" in kw:  # some rows finished (and then repeated eos) while others went on
        assert (cached.tokens == kw["eos_id"]).any(axis=1).tolist() == [False, True, True]
    other = generate_cached(MODEL, PROMPTS, 10, rng=np.random.default_rng(43), **kw)
    assert not np.array_equal(other.tokens, cached.tokens)  # power: the seed does matter


def test_sampling_with_chunked_prefill_matches_one_shot():
    kw = dict(temperature=1.0, top_p=0.95)
    one = generate_cached(MODEL, PROMPTS, 8, rng=np.random.default_rng(1), **kw)
    chunked = generate_cached(MODEL, PROMPTS, 8, 2, rng=np.random.default_rng(1), **kw)
    np.testing.assert_array_equal(one.tokens, chunked.tokens)


# --- bad settings are refused before any decoding ------------------------------------------------

RNG = np.random.default_rng(0)
TEMPERATURE = r"^temperature \(None or 0 = greedy\) must be"  # each message names its argument
TOP_P_RANGE = r"^top_p must be None or a number in \(0, 1\], got "
BAD_SETTINGS = [
    (dict(temperature=-0.5, rng=RNG), ValueError, TEMPERATURE + " >= 0, got -0.5"),
    (dict(temperature=float("nan"), rng=RNG), ValueError, TEMPERATURE + " a finite number"),
    (dict(temperature=float("inf"), rng=RNG), ValueError, TEMPERATURE + " a finite number"),
    (dict(temperature="1", rng=RNG), ValueError, TEMPERATURE + " a finite number"),
    (dict(temperature=1.0, top_k=0, rng=RNG), ValueError, "^top_k must be a positive int"),
    (dict(temperature=1.0, top_k=-3, rng=RNG), ValueError, "^top_k must be a positive int"),
    (dict(temperature=1.0, top_k=2.5, rng=RNG), ValueError, "^top_k must be a positive int"),
    (dict(temperature=1.0, top_k=True, rng=RNG), ValueError, "^top_k must be a positive int"),
    (dict(temperature=1.0, top_p=0.0, rng=RNG), ValueError, TOP_P_RANGE + "0.0"),
    (dict(temperature=1.0, top_p=1.01, rng=RNG), ValueError, TOP_P_RANGE + "1.01"),
    (dict(temperature=1.0, top_p=-0.2, rng=RNG), ValueError, TOP_P_RANGE + "-0.2"),
    (dict(temperature=1.0, top_p=float("nan"), rng=RNG), ValueError,
     "^top_p must be a finite number"),
    (dict(top_k=0), ValueError, "^top_k must be"),  # checked even when greedy
    (dict(temperature=1.0, rng=np.random.RandomState(0)), TypeError,
     r"^rng must be a np.random.Generator .*, got RandomState$"),
    (dict(temperature=1.0, rng=0), TypeError, "^rng must be .*, got int$"),
    (dict(rng=0), TypeError, "^rng must be"),
    (dict(temperature=1.0), ValueError,  # sampling needs a seeded generator, and says how
     r"^temperature=1.0 samples, so rng must be given: rng=np\.random\.default_rng\(seed\)$"),
]


@pytest.mark.parametrize("generate", [generate_cached, generate_naive])
@pytest.mark.parametrize(("bad", "error", "name"), BAD_SETTINGS)
def test_bad_sampling_settings_are_refused_before_decoding(monkeypatch, generate, bad, error,
                                                            name):
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model ran before the request was refused")
    monkeypatch.setattr(GPT, "__call__", refuse)
    with pytest.raises(error, match=name):
        generate(MODEL, PROMPTS, 4, **bad)


# --- hostile numbers -----------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1e-310, 5e-324, 1e-30])
def test_a_tiny_temperature_is_greedy_not_token_zero(temperature):
    logits = np.random.default_rng(12).standard_normal((50, 20)) * 3
    picks = Sampler(temperature, rng=np.random.default_rng(0))(logits)
    np.testing.assert_array_equal(picks, logits.argmax(axis=-1))
    assert (picks != 0).any()  # power: token 0 for every row was the old failure


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("temperature", [None, 1.0])
def test_nan_or_inf_logits_are_refused_not_read_as_token_zero(bad, temperature):
    logits = np.zeros((2, 5))
    logits[1, 3] = bad
    with pytest.raises(ValueError, match=r"^logits hold NaN or \+inf: no token can be chosen"):
        Sampler(temperature, rng=np.random.default_rng(0))(logits)


def test_banned_tokens_at_minus_inf_are_never_drawn():
    logits = np.array([[0.0, -np.inf, 1.0, -np.inf]] * 2000)
    picks = Sampler(1.0, rng=np.random.default_rng(3))(logits)
    assert set(picks.tolist()) == {0, 2}
    with pytest.raises(ValueError, match="^a row of logits is -inf everywhere: every token is "
                                         "banned$"):
        Sampler()(np.full((1, 3), -np.inf))


@pytest.mark.parametrize("probs", [np.array([[0.5, np.nan]]), np.array([[0.5, -0.1]]),
                                   np.array([[0.0, 0.0]]), np.array([0.5, 0.5])])
def test_draw_refuses_probabilities_that_are_not_a_distribution(probs):
    with pytest.raises(ValueError, match=r"^draw: probs must be \(B, V\), finite, >= 0, each row "
                                         "summing to > 0$"):
        draw(probs, np.random.default_rng(0))


@pytest.mark.parametrize("logits", [np.zeros(5), np.zeros((2, 0)), np.array([["a", "b"]])])
def test_sampler_refuses_logits_that_are_not_a_batch_of_rows(logits):
    with pytest.raises(ValueError, match=r"logits must be a \(B, V\) array"):
        Sampler()(logits)


@pytest.mark.parametrize("temperature", [10**400, -(10**400)])
def test_a_temperature_too_large_for_a_float_is_refused(temperature):
    with pytest.raises(ValueError, match="temperature"):
        Sampler(temperature, rng=np.random.default_rng(0))


# --- top-k against a full sort -------------------------------------------------------------------

@pytest.mark.parametrize("rows", [1, 3, 40])
def test_top_k_keeps_exactly_the_k_highest_for_every_k(rows):
    """Against a full argsort, for every k from 1 to V, on one row and on many (rows both fewer
    and more than k: a top-k reading the wrong axis would pass on one of them only)."""
    logits = np.random.default_rng(rows).standard_normal((rows, 9))  # no ties
    order = np.argsort(-logits, axis=-1)
    for k in range(1, 10):
        expected = np.zeros(logits.shape, dtype=bool)
        np.put_along_axis(expected, order[:, :k], True, axis=-1)
        np.testing.assert_array_equal(keep_top_k(logits, k), expected)
    np.testing.assert_array_equal(keep_top_k(logits, 100), np.ones(logits.shape, dtype=bool))


def test_top_k_keeps_every_token_tied_with_the_kth_as_hugging_face_does():
    logits = np.array([[3.0, 1.0, 2.0, 2.0, 0.0]])
    # k = 2: 3.0 and the 2.0s (both tied with the 2nd highest), as HF's TopKLogitsWarper keeps.
    assert np.flatnonzero(keep_top_k(logits, 2)).tolist() == [0, 2, 3]
    assert np.flatnonzero(keep_top_k(logits, 1)).tolist() == [0]


def test_top_k_of_one_is_greedy():
    logits = np.random.default_rng(13).standard_normal((300, 11))
    for temperature in (0.5, 1.0, 5.0):
        picks = Sampler(temperature, top_k=1, rng=np.random.default_rng(1))(logits)
        np.testing.assert_array_equal(picks, logits.argmax(axis=-1))


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.9, 1.0])
def test_top_p_probabilities_are_a_distribution_over_the_nucleus(top_p):


    logits = np.random.default_rng(14).standard_normal((25, 12)) * 2
    probs = sampling_probs(logits, 1.3, top_k=8, top_p=top_p)
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, rtol=0, atol=1e-12)
    assert (probs >= 0).all()
    full = softmax(logits / 1.3)
    for row, p in zip(probs, full, strict=True):
        kept = np.flatnonzero(row)
        assert 1 <= len(kept) <= 8
        assert p[kept].min() >= p[np.setdiff1d(np.arange(12), kept)].max(initial=0)  # the top


# --- edges of each step --------------------------------------------------------------------------

class Darts:
    """A stand-in for np.random.Generator that throws chosen darts: random() returns 1 - u, so
    draw's u (in (0, 1]) is exactly the given value. It reaches u = 1, which a real generator
    returns with probability 2**-53."""

    def __init__(self, *u: float) -> None:
        self.u = np.array(u)

    def random(self, n: int) -> np.ndarray:
        assert n == len(self.u)
        return 1.0 - self.u


def test_draw_by_hand_on_dyadic_segments():
    """Segments [0, .25], (.25, .25] (empty), (.25, .75], (.75, 1]: a dart picks the segment it
    lands in, the empty one never, and a dart at the very end (u = 1) the last non-empty token,
    never the index V one past the end."""
    probs = np.array([[0.25, 0.0, 0.5, 0.25, 0.0]] * 4)
    assert draw(probs, Darts(0.125, 0.5, 0.875, 1.0)).tolist() == [0, 2, 3, 3]


def test_draw_treats_a_row_as_weights_scaled_by_its_total():
    """draw accepts any non-negative row with a positive sum: [1, 3] is 1/4 and 3/4, so a dart at
    u = 0.5 lands in token 1 (a dart not scaled by the total would always hit token 0)."""
    assert draw(np.array([[1.0, 3.0], [3.0, 1.0]]), Darts(0.5, 0.5)).tolist() == [1, 0]


def test_draw_refuses_one_empty_row_among_good_ones():
    """Every row must have mass; a check on the whole batch's total would let an all-zero row
    through (and it would pick the index V, past the last token)."""
    with pytest.raises(ValueError, match="probs must be"):
        draw(np.array([[0.5, 0.5], [0.0, 0.0]]), np.random.default_rng(0))


def test_one_row_banned_everywhere_is_refused_even_if_another_row_is_fine():
    with pytest.raises(ValueError, match="every token is banned"):
        Sampler()(np.array([[0.0, 1.0], [-np.inf, -np.inf]]))


@pytest.mark.parametrize("temperature", [None, 1.0])
def test_a_one_token_vocabulary_is_accepted(temperature):
    """V = 1 is a valid (if dull) model: its only token is always chosen."""
    picks = Sampler(temperature, rng=np.random.default_rng(0))(np.zeros((3, 1)))
    assert picks.tolist() == [0, 0, 0]


def test_top_p_of_one_is_accepted_and_keeps_every_token():
    """top_p = 1 is in (0, 1]: the nucleus is the whole vocabulary, so the draws are those of
    no top_p at all for the same seed."""
    logits = np.random.default_rng(15).standard_normal((200, 7))
    full = Sampler(1.0, top_p=1.0, rng=np.random.default_rng(2))(logits)
    np.testing.assert_array_equal(full, Sampler(1.0, rng=np.random.default_rng(2))(logits))


def test_the_filters_return_bool_masks():
    """keep_top_k and keep_top_p are documented as bool (B, V): a float mask would turn ~keep
    into an error and keep * x into a multiplication. k >= V takes its own early return."""
    logits = np.random.default_rng(16).standard_normal((3, 5))
    for keep in (keep_top_k(logits, 2), keep_top_k(logits, 5), keep_top_k(logits, 9),
                 keep_top_p(softmax(logits), 0.5)):
        assert keep.dtype == bool and keep.shape == (3, 5)


def test_top_p_breaks_ties_toward_the_lower_token_id():
    """With ties across the nucleus edge, the kept tokens are the lower ids among the tied, as
    greedy's argmax does (a sort that is not stable keeps an arbitrary subset). Reference: the
    by-hand nucleus above, whose Python sort is stable. Dyadic probabilities: no rounding."""
    rng = np.random.default_rng(17)
    base = np.array([1 / 16] * 8 + [1 / 32] * 16)  # sums to 1; V = 24, 8-way and 16-way ties
    probs = np.stack([rng.permutation(base) for _ in range(30)])
    for p in (0.25, 0.6, 0.8):
        keep = keep_top_p(probs, p)
        for row, kept in zip(probs, keep, strict=True):
            assert set(np.flatnonzero(kept).tolist()) == nucleus(row, p)


@pytest.mark.filterwarnings("error")
def test_a_tiny_temperature_overflows_silently():
    """logits / 1e-310 overflows to -inf on purpose (probability 0): no RuntimeWarning."""
    logits = np.random.default_rng(18).standard_normal((4, 6)) * 3
    picks = Sampler(1e-310, rng=np.random.default_rng(0))(logits)
    np.testing.assert_array_equal(picks, logits.argmax(axis=-1))


def test_sampling_probs_are_the_float64_softmax_of_the_kept_logits():
    """Without filters the draw's probabilities are softmax(logits / T), each row summing to one,
    in float64 even for float32 logits (the docstring's promise: the draw is exact); with top-k
    they are the softmax of the k highest logits alone, zero elsewhere. Reference: the test's own
    softmax on the logits widened to float64 first."""
    logits = (np.random.default_rng(19).standard_normal((5, 9)) * 3).astype(np.float32)
    wide = logits.astype(np.float64)
    probs = sampling_probs(logits, 0.7)
    assert probs.dtype == np.float64
    np.testing.assert_allclose(probs, softmax(wide / 0.7), rtol=1e-13, atol=0)
    top3 = np.argsort(-wide, axis=-1)[:, :3]  # (B, 3) the kept tokens
    expected = np.zeros_like(wide)
    np.put_along_axis(expected, top3, softmax(np.take_along_axis(wide, top3, -1) / 0.7), -1)
    np.testing.assert_allclose(sampling_probs(logits, 0.7, top_k=3), expected, rtol=1e-13,
                               atol=0)
