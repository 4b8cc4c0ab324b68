"""What the test files share: the small models, their inputs, snapshots and tolerances.

pyproject.toml puts the repository root on the import path, so the flat modules import directly;
test files import these helpers with `from conftest import ...`.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest

# Hugging Face models in the tests are built from local configs with random weights: nothing is
# ever fetched, and no chatter reaches the test output.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from block import GPT, GPTConfig  # noqa: E402
from cache import ModelCache  # noqa: E402
from tools.references import random_model  # noqa: E402

# Small, but every axis distinct: vocab 64, 32 positions, d_model 32, 4 heads of 8, 2 layers.
# init_std 0.2 so attention is far from uniform and logits differ clearly between tokens.
SMALL = {"vocab_size": 64, "max_seq_len": 32, "d_model": 32, "n_heads": 4, "n_layers": 2,
         "init_std": 0.2}
VARIANTS = {"mha": {}, "gqa": {"n_kv_heads": 2}, "mqa": {"n_kv_heads": 1}, "rope": {"rope": True},
            "rope_gqa": {"rope": True, "n_kv_heads": 2}}
V = SMALL["vocab_size"]
TOL64 = 1e-10  # float64: the same algebra in another order agrees to ~1e-14


@functools.cache
def small_model(variant: str = "mha", dtype: str = "float64", fast: bool = False) -> GPT:
    """A small GPT of one of the VARIANTS with every parameter random (biases and LayerNorms
    too), built once per session: the readable GPT, or FastGPT with fast=True (the same
    weights). Tests must not modify it."""
    return random_model(GPTConfig(**SMALL, **VARIANTS[variant]), seed=1, dtype=dtype, fast=fast)


def random_ids(seed: int, B: int, T: int, vocab: int = V) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (B, T))


def prompts_of(lengths: list[int], seed: int = 0, vocab: int = V) -> list[np.ndarray]:
    """One random 1-D prompt per length: a batch of different lengths."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n) for n in lengths]


def cache_state(cache: ModelCache) -> tuple:
    """Everything a refused call must leave alone, copied out byte for byte: the length, the
    positions and counts, the owner, and every layer's keys, values and length."""
    return (len(cache), cache.positions.tobytes(), cache.count.tobytes(), cache.filled_by,
            [(kv.keys.tobytes(), kv.values.tobytes(), len(kv)) for kv in cache.layers])


def assert_close_float32(got: np.ndarray, expected: np.ndarray) -> None:
    """float32 agreement. Two float32 computations of the same logits round at every one of ~10
    sums of 32-512 terms, in different orders, so they differ by a few ulps of the largest logit
    (measured ~3e-6 relative here), not of each logit: rtol 1e-5 plus an absolute allowance of
    1e-5 * max|logit|. A wrong weight, position or cache slot is off by > 1e-2."""
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


# --- printed figures ------------------------------------------------------------------------------
# What a test may compare exactly. A figure a command prints is either a count (an int: tokens that
# differ, shapes, bytes), compared exactly; or a rounded real number, whose last digit can fall
# either way when the true value sits on a rounding boundary (0.544996 on one BLAS kernel and
# 0.545020 on another print as 0.54 and 0.55), so it may move by one unit of its last digit; or a
# rounding-level error (in e-notation, below 1e-4): the difference between two computations of
# the same thing, whose digits are the machine's (kernel, CPU, threads), not the code's. Those
# below FLOAT64_ROUNDING are float64 round-off and all agree with each other, 0 included; the
# others (float32 round-off) agree within a factor of 10. Exactness itself is never loosened
# here: the checks that print these figures assert their own tolerances (1e-10, 1e-12).
FLOAT64_ROUNDING = 1e-10


def figures_agree(shown: str, printed: str) -> bool:
    """Whether a figure printed now (`printed`) is the figure a page shows (`shown`), by the rule
    above. Both are number strings as printed: "3", "0.54", "2.53e-05", "1.9e-14"."""
    if shown == printed:
        return True
    if not any(c in shown + printed for c in ".eE"):
        return False  # counts are exact
    a, b = abs(float(shown)), abs(float(printed))
    e_notation = "e" in shown.lower() and "e" in printed.lower()
    if e_notation and max(a, b) < FLOAT64_ROUNDING:
        return True
    if e_notation and max(a, b) < 1e-4:
        return min(a, b) > 0 and max(a, b) <= 10 * min(a, b)
    return abs(float(shown) - float(printed)) <= max(last_digit(shown), last_digit(printed)) * (
        1 + 1e-9)


def last_digit(figure: str) -> float:
    """The value of one unit in the last printed digit: "0.54" -> 0.01, "2.53e-05" -> 1e-07,
    "14" -> 1."""
    mantissa, _, exponent = figure.lower().partition("e")
    decimals = len(mantissa.partition(".")[2])
    return 10.0 ** (int(exponent or 0) - decimals)


def assert_close(got: np.ndarray, expected: np.ndarray, dtype: str = "float64") -> None:
    if dtype == "float64":
        np.testing.assert_allclose(got, expected, rtol=0, atol=TOL64)
    else:
        assert_close_float32(got, expected)


@pytest.fixture
def model_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count every forward pass (a checked call that runs) and every cache creation of any GPT
    during one test."""
    calls = {"forward": 0, "new_cache": 0}
    forward, new_cache = GPT.run, GPT.new_cache

    def counted_forward(self, *args, **kwargs):
        calls["forward"] += 1
        return forward(self, *args, **kwargs)

    def counted_new_cache(self, *args, **kwargs):
        calls["new_cache"] += 1
        return new_cache(self, *args, **kwargs)

    monkeypatch.setattr(GPT, "run", counted_forward)
    monkeypatch.setattr(GPT, "new_cache", counted_new_cache)
    return calls
