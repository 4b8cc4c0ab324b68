"""tools/hf_serving.py: Hugging Face's continuous batching, on a tiny GPT-2 (a few seconds).

Its greedy tokens must be generate()'s, request by request, each run alone: in float64, where a
packed batch and a lone request cannot part on rounding. Bad arguments are refused before the
engine starts.
"""

from __future__ import annotations

import pytest
import torch
from conftest import prompts_of

from tools.hf_serving import continuous_batching
from tools.references import hf_generate, hf_gpt2

V, N_POSITIONS = 64, 48


@pytest.fixture(scope="module")
def hf():
    return hf_gpt2(V, N_POSITIONS, 32, 2, 4, seed=2, dtype=torch.float64)


def test_greedy_tokens_are_generates_request_by_request(hf):
    prompts = prompts_of([5, 17, 1, 9], seed=3, vocab=V)
    run = continuous_batching(hf, [p.tolist() for p in prompts], 12, page_size=4)
    for prompt, tokens in zip(prompts, run.tokens, strict=True):
        alone, _ = hf_generate(hf, prompt[None], 12)
        assert tokens == alone[0].tolist()
    assert len({tuple(t) for t in run.tokens}) == 4  # four different answers, not one repeated
    # Pages of 4 for (5 + 12), (17 + 12), (1 + 12), (9 + 12) tokens: 5 + 8 + 4 + 6 = 23.
    assert run.settings["num_blocks"] == 23 and run.settings["page_size"] == 4
    assert run.settings["max_batch_tokens"] == 5 + 17 + 1 + 9
    assert run.setup_seconds > 0 and run.generate_seconds > 0


def test_each_request_may_have_its_own_count_and_the_running_limit_is_passed(hf):
    """One max_new_tokens per prompt, as a server's requests have: each request stops at its
    own count, its tokens still generate()'s; max_requests_per_batch reaches the engine."""
    prompts = prompts_of([5, 11, 3], seed=4, vocab=V)
    counts = [3, 12, 7]
    run = continuous_batching(hf, [p.tolist() for p in prompts], counts, page_size=4,
                              max_requests_per_batch=2)
    for prompt, n, tokens in zip(prompts, counts, run.tokens, strict=True):
        alone, _ = hf_generate(hf, prompt[None], n)
        assert tokens == alone[0].tolist()
    assert run.settings["max_requests_per_batch"] == 2
    # Pages of 4 for (5 + 3), (11 + 12), (3 + 7) tokens: 2 + 6 + 3 = 11.
    assert run.settings["num_blocks"] == 11


@pytest.mark.parametrize(("prompts", "kwargs", "error", "match"), [
    ([], {}, TypeError, "non-empty list"),
    ([[1, 2], []], {}, TypeError, "prompt 1"),
    ([[1, V]], {}, ValueError, "outside"),
    ([[1, 2]], {"page_size": 2}, ValueError, "page_size"),
    ([[1, 2]], {"max_new_tokens": 0}, ValueError, "max_new_tokens"),
    ([list(range(40))], {"max_new_tokens": 9}, ValueError, "n_positions=48"),
    ([[1, 2]], {"num_blocks": 0}, ValueError, "num_blocks"),
    ([[1, 2], [3]], {"max_new_tokens": [4]}, ValueError, "one per prompt"),
    ([[1, 2]], {"max_new_tokens": [0]}, ValueError, "max_new_tokens"),
    ([[1, 2]], {"max_requests_per_batch": 0}, ValueError, "max_requests_per_batch"),
    ([list(range(30)), [1]], {"max_new_tokens": [19, 4]}, ValueError, "n_positions=48"),
])
def test_bad_arguments_are_refused_before_the_engine_starts(hf, monkeypatch, prompts, kwargs,
                                                            error, match):
    monkeypatch.setattr(type(hf), "init_continuous_batching",
                        lambda *a, **k: pytest.fail("started the engine"))
    arguments = {"max_new_tokens": 4} | kwargs
    with pytest.raises(error, match=match):
        continuous_batching(hf, prompts, **arguments)
