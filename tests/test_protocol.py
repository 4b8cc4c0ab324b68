"""The cache protocol (cache.py): the model knows no kind of cache. Two kinds written here, in the
test file, that the model has never seen, run unchanged through the readable and the fast path
and give the default cache's numbers to 1e-12 in float64:

- ReversedCache keeps each layer's keys in reversed slot order (position p in slot max_len-1-p)
  and returns them in that order; its plan says so through the key positions, and the mask,
  built from positions by the one rule, follows.
- ListCache is written from nothing (no ModelCache, no KVCache): per layer a Python list of the
  arrays each step brought, concatenated when asked. It also offers the optional `attend`, which
  the fast path must then use.
"""

from __future__ import annotations

import weakref

import numpy as np
import pytest
from conftest import cache_state, prompts_of, random_ids, small_model

from attention import grouped_attention
from cache import EMPTY, KVCache, ModelCache, Step, number_tokens
from generate import generate_cached, left_pad

TOL = 1e-12


# --- a kind that keeps its keys backwards --------------------------------------------------------

class ReversedLayer(KVCache):
    """One layer's K and V, position p at slot max_len - 1 - p; update returns the filled slots
    in slot order (newest first)."""

    def update(self, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        start, end = self.length, self.length + k.shape[2]
        slots = slice(self.max_len - end, self.max_len - start)
        self.keys[:, :, slots] = k[:, :, ::-1]  # (B, H_kv, t, d) written newest first
        self.values[:, :, slots] = v[:, :, ::-1]
        self.length = end
        return self.keys[:, :, self.max_len - end:], self.values[:, :, self.max_len - end:]

    def truncate(self, length: int) -> None:
        """Keep the first `length` positions: the slots at the end; the others zeroed."""
        self.keys[:, :, self.max_len - self.length:self.max_len - length] = 0
        self.values[:, :, self.max_len - self.length:self.max_len - length] = 0
        self.length = length


class ReversedCache(ModelCache):
    """A ModelCache whose layers keep time backwards: its plan returns the key positions in the
    same backwards order; everything else is ModelCache's."""

    def plan(self, model: object, B: int, T: int, attention_mask: np.ndarray | None = None
             ) -> Step:
        step = super().plan(model, B, T, attention_mask)
        return step._replace(key_positions=step.key_positions[:, ::-1])  # (B, t_k) backwards

    def commit(self, step: Step, model: object) -> None:
        super().commit(step._replace(key_positions=step.key_positions[:, ::-1]), model)


def reversed_cache(model: object, B: int) -> ReversedCache:
    c = model.config
    return ReversedCache([ReversedLayer(B, c.n_kv_heads, c.max_seq_len, c.d_head, model.dtype)
                          for _ in range(c.n_layers)])


# --- a kind written from nothing -----------------------------------------------------------------

class ListLayer:
    """One layer: the (k, v) each step brought, in a Python list."""

    def __init__(self, n_kv_heads: int, d_head: int, owner: ListCache) -> None:
        self.n_kv_heads, self.d_head, self.owner = n_kv_heads, d_head, owner
        self.steps: list[tuple[np.ndarray, np.ndarray]] = []

    def update(self, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.steps.append((k.copy(), v.copy()))
        return (np.concatenate([s[0] for s in self.steps], axis=2),  # (B, H_kv, t_k, d)
                np.concatenate([s[1] for s in self.steps], axis=2))


class ListCache:
    """Keeps the protocol with no help from cache.py's classes: plan numbers the tokens (cache.py's
    rule for positions), commit records them, roll_back forgets the last step."""

    def __init__(self, model: object, B: int, attend: bool = False) -> None:
        c = model.config
        self.layers = [(AttendingLayer if attend else ListLayer)(c.n_kv_heads, c.d_head, self)
                       for _ in range(c.n_layers)]
        self.B, self.key_positions = B, np.empty((B, 0), dtype=np.int64)
        self.count = np.zeros(B, dtype=np.int64)
        self.model: weakref.ref | None = None

    def __len__(self) -> int:
        return self.key_positions.shape[1]

    def plan(self, model: object, B: int, T: int, attention_mask: np.ndarray | None = None
             ) -> Step:
        if B != self.B:
            raise ValueError(f"ListCache: batch {B}, made for {self.B}")
        real = (np.ones((B, T), dtype=bool) if attention_mask is None
                else attention_mask[:, len(self):].astype(bool))
        positions, new_keys = number_tokens(self.count, real)
        return Step(real, positions, np.concatenate([self.key_positions, new_keys], axis=1))

    def commit(self, step: Step, model: object) -> None:
        self.key_positions = step.key_positions
        self.count = self.count + step.real.sum(axis=1)
        self.model = weakref.ref(model)

    def roll_back(self, step: Step) -> None:
        T = step.real.shape[1]
        for layer in self.layers:
            if layer.steps and sum(s[0].shape[2] for s in layer.steps) == len(self):
                layer.steps.pop()
        self.key_positions = self.key_positions[:, :-T]
        self.count = (self.key_positions >= 0).sum(axis=1)

    def truncate(self, length: int) -> None:
        raise ValueError("ListCache does not rewind")


class AttendingLayer(ListLayer):
    """A ListLayer that also attends over what it holds itself (the protocol's optional hook),
    counting its calls."""

    calls = 0

    def attend(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray
               ) -> np.ndarray:
        AttendingLayer.calls += 1
        keys, values = self.update(k, v)
        return grouped_attention(q, keys.astype(q.dtype), values.astype(q.dtype), mask)[0]


# --- the proofs ----------------------------------------------------------------------------------

KINDS = {"reversed": reversed_cache, "list": ListCache,
         "list, attending": lambda model, B: ListCache(model, B, attend=True)}


@pytest.mark.parametrize("fast", [False, True], ids=["readable", "fast"])
@pytest.mark.parametrize("variant", ["mha", "rope_gqa"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_cache_kind_the_model_never_saw_gives_the_default_caches_numbers(kind, variant, fast):
    model = small_model(variant, "float64", fast=fast)
    ids, mask = left_pad(prompts_of([7, 3, 5], seed=3))  # (3, 7), padding in two rows
    new = random_ids(4, 3, 4)
    out = {}
    for name, make in (("default", lambda m, B: m.new_cache(B)), (kind, KINDS[kind])):
        cache = make(model, 3)
        logits = [model(ids[:, :4], cache, attention_mask=mask[:, :4])[:, -1],  # two chunks
                  model(ids[:, 4:], cache, attention_mask=mask)[:, -1]]
        for t in range(new.shape[1]):  # then one token at a time
            logits.append(model(new[:, t:t + 1], cache)[:, -1])
        out[name] = np.stack(logits, axis=1)
    np.testing.assert_allclose(out[kind], out["default"], rtol=0, atol=TOL)
    assert np.abs(out["default"]).max() > 1  # not two zeros agreeing


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_generate_cached_takes_any_kind(kind):
    model = small_model("gqa", "float64")
    prompts = prompts_of([2, 6, 4], seed=5)
    want = generate_cached(model, prompts, 8)
    got = generate_cached(model, prompts, 8, prefill_chunk=3, cache=KINDS[kind](model, 3))
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logits, want.logits, rtol=0, atol=TOL)


def test_the_fast_path_uses_the_hook_where_a_cache_offers_it():
    model = small_model("mha", "float64", fast=True)
    AttendingLayer.calls = 0
    generate_cached(model, prompts_of([3, 5], seed=2), 4, cache=ListCache(model, 2, attend=True))
    assert AttendingLayer.calls == 4 * model.config.n_layers  # prefill and 3 decode steps
    readable = small_model("mha", "float64")
    AttendingLayer.calls = 0
    generate_cached(readable, prompts_of([3, 5], seed=2), 4,
                    cache=ListCache(readable, 2, attend=True))
    assert AttendingLayer.calls == 0  # the readable path runs the whiteboard's attention


def test_the_reversed_kind_really_keeps_its_keys_backwards():
    """The proofs above would pass if the kind did nothing unusual: it does."""
    model = small_model("mha", "float64")
    cache = reversed_cache(model, 1)
    step = cache.plan(model, 1, 3)
    np.testing.assert_array_equal(step.key_positions, [[2, 1, 0]])
    model(random_ids(0, 1, 3), cache)
    assert not cache.layers[0].keys[0, :, :-3].any() and cache.layers[0].keys[0, :, -3:].any()
    np.testing.assert_array_equal(cache.positions[0, :3], [0, 1, 2])
    assert (cache.positions[0, 3:] == EMPTY).all()


def test_a_failed_step_rolls_back_any_kind(monkeypatch):
    import block

    model = small_model("mha", "float64")
    cache = reversed_cache(model, 2)
    model(random_ids(1, 2, 3), cache)
    before = cache_state(cache)
    real = block.mlp
    calls = {"n": 0}

    def fails_in_the_second_layer(x, p):
        calls["n"] += 1
        if calls["n"] == 2:
            raise MemoryError("simulated")
        return real(x, p)

    monkeypatch.setattr(block, "mlp", fails_in_the_second_layer)
    with pytest.raises(MemoryError):
        model(random_ids(2, 2, 2), cache)
    assert cache_state(cache) == before
