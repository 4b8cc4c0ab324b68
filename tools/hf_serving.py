"""Hugging Face's own continuous batching, run on a CPU: the other side of a future throughput
comparison with a paged engine of this repository.

transformers (5.23) ships a continuous-batching engine over a paged KV cache. Its one-call form is

    outputs = hf.generate_batch(prompts, generation_config=GenerationConfig(...),
                                continuous_batching_config=ContinuousBatchingConfig(...))

which builds a manager, sizes and allocates the paged cache, starts a background thread that
schedules the requests, and returns {request id: GenerationOutput}, whose `generated_tokens` are
one request's new tokens. generate_batch times none of it, so `continuous_batching` below takes
the same steps itself (init_continuous_batching, warmup, start, add_request for each prompt with
its own max_new_tokens, get_result, stop) and times setup apart from generation.

What must be given on a CPU. Left to itself the engine sizes its buffers from the free memory of
"the device": on a CPU (psutil absent) 60% of the machine's memory, shared between the paged
cache and, with sdpa attention, an attention mask of max_batch_tokens (8,192 by default) by
(cache tokens + max_batch_tokens), all allocated before the first token. Both setup and
generation grow with that budget: measured on a tiny GPT-2 (2 layers, d_model 32, 4 short
requests), setup 1.4 s and generation 0.5 s at 2% of a 24 GiB VM's memory, 7.5 s and 2.1 s at
10%. At GPT-2-small shapes the default cache alone would take 8.75 GiB of that VM. So this
helper always passes num_blocks (by default just enough pages for every request at full length
at once) and max_batch_tokens (by default every prompt in one forward):

    page_size        tokens per page (vLLM's block size); the engine refuses less than 4
    num_blocks       pages of page_size tokens, each holding every layer's K and V
    max_batch_tokens new tokens one forward may carry (prefill chunks plus one per decoding row)

Greedy tokens: on GPT-2-small shapes with random weights, float64, they equal generate()'s for
every request; in float32 a request can part from generate() where two logits are within float32
rounding of each other (measured: one of 8 requests, at a top-two gap of 7e-6 of the largest
logit), because a packed batch sums in another order than one request alone.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from parts.checks import is_int

ENGINE_LOG = "ContinuousBatchingLogger"  # the engine's logger: on a CPU it reports psutil missing
PAGE_MIN = 4  # ContinuousBatchingConfig refuses a smaller page_size


@dataclass
class ServingRun:
    """One run of Hugging Face's continuous batching."""

    tokens: list[list[int]]  # each request's new tokens, in the order the prompts were given
    setup_seconds: float  # manager, config resolution, the paged cache and the batch processor
    generate_seconds: float  # from the first request added to the last result received
    settings: dict  # what the engine ran with, after it resolved its config


def continuous_batching(hf, prompts: Sequence[Sequence[int]],
                        max_new_tokens: int | Sequence[int], page_size: int = 16,
                        num_blocks: int | None = None, max_batch_tokens: int | None = None,
                        eos_id: int | None = None, max_requests_per_batch: int | None = None,
                        ) -> ServingRun:
    """Greedy decoding of every prompt (lists of token ids) by `hf` (a transformers causal LM,
    such as tools/references.hf_gpt2's) through transformers' continuous batching: max_new_tokens
    each, or one count per prompt (fewer if eos_id is given and chosen). num_blocks defaults to
    enough pages for every request at full length, max_batch_tokens to the sum of the prompt
    lengths, max_requests_per_batch (the most requests in one forward) to the engine's own
    choice. Raises ValueError/TypeError for bad arguments before any work; RuntimeError if a
    request fails."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints

    prompts = check_prompts(prompts, hf.config.vocab_size)
    counts = new_token_counts(max_new_tokens, len(prompts))
    if not is_int(page_size) or page_size < PAGE_MIN:
        raise ValueError(f"continuous_batching: page_size must be an int >= {PAGE_MIN}, got "
                         f"{page_size!r}")
    longest = max(len(p) + n for p, n in zip(prompts, counts, strict=True))
    if longest > hf.config.n_positions:
        raise ValueError(f"continuous_batching: a request of {longest} tokens is past the "
                         f"model's n_positions={hf.config.n_positions}")
    if num_blocks is None:  # every request at full length, at once: nobody waits for a page
        num_blocks = sum(math.ceil((len(p) + n) / page_size)
                         for p, n in zip(prompts, counts, strict=True))
    if max_batch_tokens is None:  # every prompt fits one forward
        max_batch_tokens = sum(map(len, prompts))
    for name, value in (("num_blocks", num_blocks), ("max_batch_tokens", max_batch_tokens),
                        ("max_requests_per_batch", max_requests_per_batch)):
        if (value is not None or name != "max_requests_per_batch") and (
                not is_int(value) or value < 1):
            raise ValueError(f"continuous_batching: {name} must be an int >= 1, got {value!r}")

    eos = -1 if eos_id is None else eos_id
    generation = GenerationConfig(do_sample=False, max_new_tokens=max(counts), eos_token_id=eos,
                                  pad_token_id=0)
    paged = ContinuousBatchingConfig(page_size=page_size, num_blocks=num_blocks,
                                     max_batch_tokens=max_batch_tokens,
                                     max_requests_per_batch=max_requests_per_batch)
    hints = WorkloadHints(max_prompt_length=max(map(len, prompts)),
                          max_generated_length=max(counts), num_requests=len(prompts))
    with quiet_engine():
        start = time.perf_counter()
        manager = hf.init_continuous_batching(generation_config=generation,
                                              continuous_batching_config=paged,
                                              workload_hints=hints)
        try:
            manager.warmup()  # builds the paged cache and the batch processor (no graphs on a CPU)
            setup = time.perf_counter() - start
            manager.start()
            start = time.perf_counter()
            ids = [manager.add_request(input_ids=p, max_new_tokens=n, eos_token_id=eos)
                   for p, n in zip(prompts, counts, strict=True)]
            results = collect(manager, ids)
            generate = time.perf_counter() - start
            resolved = manager.continuous_batching_config
            settings = {"page_size": resolved.page_size, "num_blocks": resolved.num_blocks,
                        "max_batch_tokens": resolved.max_batch_tokens,
                        "max_requests_per_batch": resolved.max_requests_per_batch,
                        "attention": hf.config._attn_implementation,
                        "prefix_sharing": manager._use_prefix_sharing}
        finally:
            manager.stop(block=True, timeout=30)
            manager.destroy()
    return ServingRun([list(results[i].generated_tokens) for i in ids], setup, generate,
                      settings)


def new_token_counts(max_new_tokens: object, n: int) -> list[int]:
    """One count >= 1 per prompt: an int for all n, or a sequence of n ints; ValueError else."""
    counts = [max_new_tokens] * n if is_int(max_new_tokens) else max_new_tokens
    if (isinstance(counts, (str, bytes)) or not isinstance(counts, Sequence)
            or len(counts) != n or not all(is_int(c) and c >= 1 for c in counts)):
        raise ValueError(f"continuous_batching: max_new_tokens must be an int >= 1 or one per "
                         f"prompt ({n}), got {max_new_tokens!r:.60}")
    return [int(c) for c in counts]


def check_prompts(prompts: object, vocab_size: int) -> list[list[int]]:
    """A non-empty list of non-empty prompts of ints in [0, vocab_size), or ValueError/TypeError
    naming the prompt."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise TypeError("continuous_batching: prompts must be a non-empty list of token-id lists")
    out = []
    for i, prompt in enumerate(prompts):
        ids = prompt.tolist() if hasattr(prompt, "tolist") else prompt  # a NumPy row too
        if (isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence) or not ids
                or not all(is_int(t) for t in ids)):
            raise TypeError(f"continuous_batching: prompt {i} must be a non-empty list of ints")
        if min(ids) < 0 or max(ids) >= vocab_size:
            raise ValueError(f"continuous_batching: prompt {i} holds a token outside "
                             f"[0, {vocab_size})")
        out.append([int(t) for t in ids])
    return out


def collect(manager, ids: list[str], timeout: float = 600.0) -> dict:
    """Every request's finished GenerationOutput, by request id. RuntimeError if one failed, if
    the engine's thread stopped, or if nothing arrives for `timeout` seconds."""
    results, waited = {}, 0.0
    while len(results) < len(ids):
        result = manager.get_result(timeout=1.0)
        if result is None:
            waited += 1.0
            if not manager.is_running() or waited > timeout:
                raise RuntimeError(f"continuous batching stopped with {len(ids) - len(results)} "
                                   f"of {len(ids)} requests unfinished")
            continue
        waited = 0.0
        if result.error is not None:
            raise RuntimeError(f"continuous batching: request {result.request_id} failed: "
                               f"{result.error}")
        if result.is_finished():
            results[result.request_id] = result
    return results


@contextmanager
def quiet_engine() -> Iterator[None]:
    """Silence the engine's logger while it runs: on a CPU it logs an ERROR that psutil is
    missing, harmless once num_blocks is given. Failures still surface: collect raises them."""
    log = logging.getLogger(ENGINE_LOG)
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)
