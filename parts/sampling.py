"""Choosing the next token from a row of logits: greedy, or a seeded draw.

    logits (B, V) -> / temperature -> keep top k -> softmax -> keep top p -> renormalise -> draw

temperature  rescales confidence before softmax: T < 1 sharpens, T > 1 flattens, and T = 0 (or
             None) is greedy: the argmax, no randomness at all.
top_k        keeps only the k highest logits, and any tied with the k-th (k >= V keeps all).
top_p        nucleus: keeps the smallest set of most likely tokens whose probability reaches p.
The filters run in that order (temperature, top-k, top-p), as Hugging Face's do.

The draw uses exactly one uniform number per row per call, whatever the logits are, so two decoders
that see the same logits consume a seeded np.random.Generator identically and pick the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from parts.checks import finite_number, optional_positive_int, positive_int


def check_logits(logits: np.ndarray) -> np.ndarray:
    """logits as a (B, V) float array, refusing NaN and +inf (which would silently pick token 0);
    -inf is a banned token and allowed, as long as some token in every row is not banned."""
    if isinstance(logits, np.ndarray) and type(logits) is not np.ndarray:
        raise TypeError(f"logits must be a plain numpy array, got {type(logits).__name__} (a "
                        "masked array's mask would be dropped)")
    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.shape[1] < 1 or logits.dtype.kind not in "fiu":
        raise ValueError(f"logits must be a (B, V) array of numbers, got {logits.dtype} of shape "
                         f"{logits.shape}")
    if np.isnan(logits).any() or np.isposinf(logits).any():
        raise ValueError("logits hold NaN or +inf: no token can be chosen from them")
    if np.isneginf(logits).all(axis=-1).any():
        raise ValueError("a row of logits is -inf everywhere: every token is banned")
    return logits


def greedy(logits: np.ndarray) -> np.ndarray:
    """(B, V) -> (B,): the most likely next token of each row (the first one on a tie). Checks
    its own argument (check_logits)."""
    return check_logits(logits).argmax(axis=-1)


def keep_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """(B, V) -> bool (B, V), True for the logits >= each row's k-th highest. Ties with the k-th
    are kept, as Hugging Face's top-k does, so a row may keep more than k tokens (never fewer).
    Checks its own arguments."""
    return _keep_top_k(check_logits(logits), positive_int("top_k", k))


def _keep_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    V = logits.shape[-1]
    if k >= V:
        return np.ones(logits.shape, dtype=bool)
    kth = np.partition(logits, V - k, axis=-1)[:, V - k, None]  # (B, 1): the k-th highest
    return logits >= kth


def keep_top_p(probs: np.ndarray, p: float) -> np.ndarray:
    """(B, V) probabilities -> bool (B, V), True for the nucleus: the most likely tokens, taken in
    order, until their total probability reaches p. A token is in if the mass of the tokens ranked
    above it is still below p, so the most likely token is always in. Checks its own
    arguments."""
    probs = np.asarray(probs)
    if probs.ndim != 2 or probs.dtype.kind != "f" or not np.isfinite(probs).all():
        raise ValueError(f"keep_top_p: probs must be a finite (B, V) float array, got "
                         f"{probs.dtype} of shape {probs.shape}")
    if not 0 < finite_number("top_p", p) <= 1:
        raise ValueError(f"top_p must be a number in (0, 1], got {p!r}")
    return _keep_top_p(probs, p)


def _keep_top_p(probs: np.ndarray, p: float) -> np.ndarray:
    order = np.argsort(-probs, axis=-1, kind="stable")  # (B, V): most likely first
    ranked = np.take_along_axis(probs, order, axis=-1)  # (B, V) probabilities, descending
    mass_above = np.cumsum(ranked, axis=-1) - ranked  # (B, V) mass of the tokens ranked higher
    keep = np.empty(probs.shape, dtype=bool)
    np.put_along_axis(keep, order, mass_above < p, axis=-1)  # back from ranked order to token order
    return keep


def sampling_probs(
    logits: np.ndarray, temperature: float, top_k: int | None = None, top_p: float | None = None
) -> np.ndarray:
    """(B, V) logits -> (B, V) float64 probabilities the draw uses: softmax(logits / T) with the
    tokens outside top-k and the nucleus set to zero, renormalised to sum to one. Checks its own
    arguments: temperature must be > 0 here (0 is greedy, which draws nothing)."""
    finite_number("temperature", temperature, above=0)
    check_filters(top_k, top_p)
    logits = check_logits(logits).astype(np.float64)  # float64: the draw is exact
    # Shift by the row max BEFORE dividing: every value is then <= 0, so even temperature 1e-310
    # gives -inf (probability 0) for the rest and 0 (probability 1) for the max, never inf - inf.
    with np.errstate(over="ignore"):  # -x / 1e-310 overflows to -inf: probability 0, as meant
        scaled = (logits - logits.max(axis=-1, keepdims=True)) / temperature
    if top_k is not None:
        scaled = np.where(_keep_top_k(scaled, top_k), scaled, -np.inf)  # the max is always kept
    probs = np.exp(scaled)  # exp(-inf) = 0 exactly
    probs /= probs.sum(axis=-1, keepdims=True)
    if top_p is not None:
        probs = np.where(_keep_top_p(probs, top_p), probs, 0.0)
        probs /= probs.sum(axis=-1, keepdims=True)
    return probs


def draw(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(B, V) probabilities -> (B,) tokens, one uniform number per row (inverse CDF).

    Lay each row's probabilities end to end on [0, 1] and throw a dart u: the token whose segment
    it lands in is chosen. u is drawn in (0, 1], never 0, so a zero-probability token (an empty
    segment) can never be hit.
    """
    probs = np.asarray(probs)
    if (probs.ndim != 2 or not np.isfinite(probs).all() or (probs < 0).any()
            or not (probs.sum(axis=-1) > 0).all()):
        raise ValueError("draw: probs must be (B, V), finite, >= 0, each row summing to > 0")
    u = 1.0 - rng.random(probs.shape[0])  # (B,) in (0, 1]
    cdf = np.cumsum(probs, axis=-1)  # (B, V) right edge of every segment
    # Count the segments that end before the dart; scaling by cdf[:, -1] keeps rounding in range.
    return (cdf < u[:, None] * cdf[:, -1:]).sum(axis=-1)


@dataclass(frozen=True)
class Sampler:
    """How to pick the next token, checked once up front (before any decoding).

    temperature None or 0 is greedy (top_k and top_p are then irrelevant and rng is not used);
    otherwise rng, a seeded np.random.Generator, is required. Call it on logits (B, V) -> (B,).
    """

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    rng: np.random.Generator | None = None

    def __post_init__(self) -> None:
        check_sampling(self.temperature, self.top_k, self.top_p, self.rng)

    @property
    def is_greedy(self) -> bool:
        return self.temperature is None or self.temperature == 0

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        if self.is_greedy:  # greedy and sampling_probs each check the logits, once
            return greedy(logits)
        return draw(sampling_probs(logits, self.temperature, self.top_k, self.top_p), self.rng)


def check_sampling(
    temperature: float | None, top_k: int | None, top_p: float | None,
    rng: np.random.Generator | None,
) -> None:
    """Raise ValueError/TypeError naming the argument if a sampling setting is invalid."""
    if temperature is not None:
        finite_number("temperature (None or 0 = greedy)", temperature, at_least=0)
    check_filters(top_k, top_p)
    if rng is not None and not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a np.random.Generator (np.random.default_rng(seed)), "
                        f"got {type(rng).__name__}")
    if temperature and rng is None:
        raise ValueError(f"temperature={temperature!r} samples, so rng must be given: "
                         "rng=np.random.default_rng(seed)")


def check_filters(top_k: int | None, top_p: float | None) -> None:
    """Raise ValueError naming the argument unless top_k is None or a positive int and top_p is
    None or a number in (0, 1]."""
    optional_positive_int("top_k", top_k)
    if top_p is not None and not 0 < finite_number("top_p", top_p) <= 1:
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")
