"""Every cache kind restores its state exactly after a refused or failed call.

One matrix over the kinds (KINDS: one line each; a new kind is one more line), the two paths
(the readable GPT and the fast FastGPT, where the kind's model has one) and the ways a call can
go wrong:

    failed    layer 0 or the last layer fails before or after writing its keys (an error, a
              KeyboardInterrupt), so some layers have written and others have not
    refused   another batch size, an attention_mask that contradicts the padding held, and keys
              the cache cannot store (past float16's range, an int8 scale past float32's), in
              layer 0 (before anything is written) or in the last layer (after the others wrote)

Each case snapshots every buffer, count and number of the cache and its layers before the call
and compares them byte for byte after it; then the cache must go on exactly as a twin that never
saw the call (the same next call, the same arithmetic: equal logits, not close ones). The prefix
is a left-padded batch, so the rows hold different counts, and the failing step wraps the
rolling buffer of the window kind.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import pytest
from conftest import random_ids

from beyond.int8 import int8_cache
from beyond.latent import LatentConfig
from beyond.window import window_cache
from block import GPT, GPTConfig
from cache import Cache
from tools.references import random_model

TINY = {"vocab_size": 32, "max_seq_len": 16, "d_model": 16, "n_heads": 4, "n_layers": 3,
        "init_std": 0.3}


class Kind(NamedTuple):
    """A cache kind: the config its model needs, how to build an empty cache for B rows, and a
    value that, added to a layer's keys, takes them past what the cache stores (None: it stores
    any float its model makes)."""

    config: dict
    cache: Callable[[GPT, int], Cache]
    overflow: float | None
    fast: bool = True  # FastGPT serves its model


KINDS = {
    "float64": Kind({}, lambda model, B: model.new_cache(B), None),
    "float16": Kind({}, lambda model, B: model.new_cache(B, "float16"), 1e5),
    "window": Kind({"sliding_window": 4, "attention_sinks": 1},
                   lambda model, B: window_cache(model, B, "float16"), 1e5),
    "int8": Kind({}, int8_cache, 1e41),
    "latent": Kind({"kv_latent": 8}, lambda model, B: model.new_cache(B, "float16"), 1e5,
                   fast=False),
}
PATHS = ["readable", "fast"]


def model_of(kind: Kind, path: str) -> GPT:
    config = (LatentConfig if "kv_latent" in kind.config else GPTConfig)(**TINY, **kind.config)
    return random_model(config, seed=3, fast=path == "fast")


def cases(kinds: dict[str, Kind], ways: list[str]) -> list:
    """(kind, path, way) for every kind, the paths its model has, and the ways that apply."""
    return [pytest.param(name, path, way, id=f"{name}-{path}-{way}")
            for name, kind in kinds.items() for path in PATHS if path == "readable" or kind.fast
            for way in ways if kind.overflow is not None or "overflow" not in way]


# --- the state, every byte of it -----------------------------------------------------------------

SCRATCH = {"undo", "writes", "before"}  # what a step keeps only to undo itself


def snapshot(obj: object, root: object = None, seen: set | None = None) -> object:
    """Every array (dtype, shape, bytes), number and flag reachable from obj's attributes, its
    lists and dicts, and what a weak reference points to (the cache itself, or an object by
    identity); SCRATCH attributes excepted. Two caches filled alike have equal snapshots."""
    root = obj if root is None else root
    seen = set() if seen is None else seen
    if isinstance(obj, np.ndarray):
        return ("array", obj.dtype.str, obj.shape, obj.tobytes())
    if obj is None or isinstance(obj, (bool, int, float, str, np.generic)):
        return obj
    if isinstance(obj, np.dtype):
        return ("dtype", obj.str)
    if isinstance(obj, weakref.ref):
        return ("ref", "the cache" if obj() is root else id(obj()))
    if isinstance(obj, (list, tuple)):
        return [snapshot(x, root, seen) for x in obj]
    if isinstance(obj, dict):
        return {k: snapshot(v, root, seen) for k, v in obj.items()}
    if id(obj) in seen:
        return ("seen", id(obj))
    seen.add(id(obj))
    return (type(obj).__name__, {name: snapshot(value, root, seen)
                                 for name, value in vars(obj).items() if name not in SCRATCH})


def test_the_snapshot_sees_every_buffer_a_step_writes():
    """A snapshot that missed a buffer would pass every test below: one step must change it,
    for every kind."""
    for name, kind in KINDS.items():
        model = model_of(kind, "readable")
        cache = kind.cache(model, 2)
        before = snapshot(cache)
        model(random_ids(0, 2, 3, vocab=32), cache)
        after = snapshot(cache)
        for i in range(len(cache.layers)):
            assert after[1]["layers"][i] != before[1]["layers"][i], (name, i)


# --- the matrix ----------------------------------------------------------------------------------

PREFIX = 5  # columns held before the step: row 0 has 2 pads, so rows hold 3 and 5 real tokens
STEP = 3  # new tokens of the step that fails: row 1 wraps the window kind's 5 slots


def prepared(kind: Kind, path: str) -> tuple[GPT, Cache, Cache, np.ndarray, np.ndarray]:
    """The model, a cache after the padded prefix, an identical twin, and the ids and mask of
    the prefix and the step."""
    model = model_of(kind, path)
    ids = random_ids(7, 2, PREFIX + STEP, vocab=32)
    mask = np.ones((2, PREFIX + STEP), dtype=np.int64)
    mask[0, :2] = 0
    cache, twin = kind.cache(model, 2), kind.cache(model, 2)
    for c in (cache, twin):
        model(ids[:, :PREFIX], c, attention_mask=mask[:, :PREFIX])
    return model, cache, twin, ids, mask


def goes_on_as_its_twin(model: GPT, cache: Cache, twin: Cache, ids: np.ndarray,
                        mask: np.ndarray) -> None:
    """The step, now run for real on both: the same logits, bit for bit, and the same state."""
    got = model(ids[:, PREFIX:], cache, attention_mask=mask)
    expected = model(ids[:, PREFIX:], twin, attention_mask=mask)
    np.testing.assert_array_equal(got, expected)
    assert snapshot(cache) == snapshot(twin)


def wrap_layer(cache: Cache, layer: int, wrapper: Callable) -> None:
    """Replace layer's update (and attend, where the kind offers one) by wrapper(real)."""
    target = cache.layers[layer]
    for name in ("update", "attend"):
        real = getattr(target, name, None)
        if real is not None:
            setattr(target, name, wrapper(real))


def unwrap_layer(cache: Cache, layer: int) -> None:
    for name in ("update", "attend"):
        vars(cache.layers[layer]).pop(name, None)


FAILURES = ["layer 0 before its write", "layer 0 after its write", "last layer before its write",
            "last layer after its write"]


@pytest.mark.parametrize(("name", "path", "failure"), cases(KINDS, FAILURES))
def test_a_call_that_fails_in_a_layer_leaves_the_cache_as_it_was(name, path, failure):
    model, cache, twin, ids, mask = prepared(KINDS[name], path)
    before = snapshot(cache)
    layer = 0 if failure.startswith("layer 0") else len(cache.layers) - 1
    error = KeyboardInterrupt if "after" in failure else MemoryError

    def failing(real: Callable) -> Callable:
        def call(*args):
            if "after" in failure:
                real(*args)
            raise error("simulated")
        return call

    wrap_layer(cache, layer, failing)
    with pytest.raises(error):
        model(ids[:, PREFIX:], cache, attention_mask=mask)
    unwrap_layer(cache, layer)
    assert snapshot(cache) == before
    goes_on_as_its_twin(model, cache, twin, ids, mask)


REFUSALS = ["another batch size", "a mask that contradicts the padding", "overflow in layer 0",
            "overflow in the last layer"]


@pytest.mark.parametrize(("name", "path", "refusal"), cases(KINDS, REFUSALS))
def test_a_refused_call_leaves_the_cache_as_it_was(name, path, refusal):
    kind = KINDS[name]
    model, cache, twin, ids, mask = prepared(kind, path)
    before = snapshot(cache)
    step, step_mask, match = ids[:, PREFIX:], mask, "overflow|beyond"  # past the dtype's range
    if refusal == "another batch size":
        step, step_mask, match = random_ids(8, 3, STEP, vocab=32), None, "batch of 3"
    elif refusal == "a mask that contradicts the padding":
        step_mask, match = np.ones_like(mask), "attention_mask contradicts the cache"
    else:
        layer = 0 if refusal == "overflow in layer 0" else len(cache.layers) - 1
        wrap_layer(cache, layer, lambda real: lambda k, v: real(k + kind.overflow, v))
    try:
        with pytest.raises(ValueError, match=match):
            model(step, cache, attention_mask=step_mask)
    finally:
        unwrap_layer(cache, 0)
        unwrap_layer(cache, len(cache.layers) - 1)
    assert snapshot(cache) == before
    goes_on_as_its_twin(model, cache, twin, ids, mask)
