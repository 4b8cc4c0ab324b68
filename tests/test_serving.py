"""Continuous batching (beyond/serving.py) proved exact against each request decoded alone.

Every request's tokens are generate_cached's on its prompt alone, and in float64 its logits agree
to 1e-10: greedy and seeded sampling, prompts of 1 token, exactly one block and one block plus
one, eos, requests that join and leave mid-run, cancels, preemption, chunked prefill, the
readable path (gather) and the fast path (block walk). A hypothesis state machine drives random
submit / step / cancel sequences over random pools and checks the pool after every step.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from conftest import prompts_of, small_model
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from beyond.latent import LatentConfig
from beyond.serving import CANCELLED, FINISHED, RUNNING, WAITING, Engine
from block import GPTConfig
from generate import generate_cached
from tools.references import random_model

TOL = 1e-10


def alone(model, prompt, max_new_tokens: int, eos_id=None, temperature=None, top_k=None,
          top_p=None, seed=None):
    """The reference: generate_cached on this prompt alone, with the request's own generator."""
    rng = None if seed is None else np.random.default_rng(seed)
    return generate_cached(model, [np.asarray(prompt)], max_new_tokens, eos_id=eos_id,
                           temperature=temperature, top_k=top_k, top_p=top_p, rng=rng)


def assert_alone(engine: Engine, rid: int, prompt, max_new_tokens: int, **options) -> None:
    want = alone(engine.model, prompt, max_new_tokens, **options)
    got = engine.result(rid)
    np.testing.assert_array_equal(got.tokens, want.tokens[0])
    np.testing.assert_allclose(got.logits, want.logits[0], rtol=0, atol=TOL)


SAMPLED = {"temperature": 0.9, "top_k": 20, "top_p": 0.95}


# --- exactness -----------------------------------------------------------------------------------

@pytest.mark.parametrize("budget", [None, 5], ids=["whole prefills", "token budget 5"])
@pytest.mark.parametrize("fast", [False, True], ids=["readable", "fast"])
def test_every_request_equals_its_alone_run(fast, budget):
    """Block size 4 in a pool of 9 blocks: prompts of 1, 4 (one block), 5 (one block plus one),
    7 and 12 tokens; greedy and seeded; one with eos; two join after 3 steps; one is cancelled
    while running; the pool is too small for all of them, so requests are preempted."""
    model = small_model("rope_gqa", fast=fast)
    engine = Engine(model, num_blocks=9, block_size=4, token_budget=budget, shuffle=1)
    prompts = prompts_of([1, 4, 5, 7, 12, 3, 9], seed=11)
    made = alone(model, prompts[3], 8, **SAMPLED, seed=23).tokens[0].tolist()
    eos = made[3]  # request 3 (sampled) stops at its 4th token, or earlier if it made eos before
    stops_after = made.index(eos) + 1
    specs = {}
    for i, p in enumerate(prompts[:5]):
        options = dict(SAMPLED, seed=20 + i) if i % 2 else {}
        options |= {"eos_id": eos} if i == 3 else {}
        specs[engine.submit(p, 8, **options)] = (p, 8, options)
    for _ in range(3):
        engine.step()
    for p in prompts[5:]:
        specs[engine.submit(p, 6, seed=1, temperature=1.5)] = (p, 6, {"seed": 1,
                                                                     "temperature": 1.5})
    engine.step()
    cancelled = next(r.id for r in reversed(engine.running) if r.id != 3)  # 3 is the eos one
    engine.cancel(cancelled)
    engine.run()
    assert engine.stats()["preemptions"] > 0
    assert len(engine.result(3).tokens) == stops_after < 8
    for rid, (p, n, options) in specs.items():
        if rid != cancelled:
            assert engine.result(rid).state == FINISHED
            assert_alone(engine, rid, p, n, **options)
    assert engine.pool.blocks_in_use == 0 and not engine.pool.tables


def test_a_preempted_seeded_request_draws_only_when_it_emits():
    """Two seeded requests that cannot both fit: the newer is preempted (more than once) and
    recomputes its tokens; its generator has drawn exactly one number per token it made."""
    model = small_model("mha")
    engine = Engine(model, num_blocks=4, block_size=2)
    preempted = []
    real = engine.preempt
    engine.preempt = lambda r: (preempted.append(r.id), real(r))[1]
    prompts = prompts_of([3, 3], seed=4)
    a, b = (engine.submit(p, 5, seed=s, temperature=1.0) for p, s in zip(prompts, (5, 6),
                                                                         strict=True))
    engine.run()
    assert b in preempted and a not in preempted
    for rid, p, s in ((a, prompts[0], 5), (b, prompts[1], 6)):
        assert_alone(engine, rid, p, 5, seed=s, temperature=1.0)
        used = np.random.default_rng(s)
        used.random(5)  # one uniform per emitted token, none for a recompute
        assert (engine.requests[rid].sampler.rng.bit_generator.state
                == used.bit_generator.state)


@pytest.mark.parametrize("fast", [False, True], ids=["readable", "fast"])
def test_layout_does_not_matter(fast):
    """The same requests through pools whose free lists are shuffled by different seeds (tables
    out of order) and unshuffled: bit-identical tokens and logits."""
    model = small_model("gqa", fast=fast)
    prompts = prompts_of([2, 9, 5, 1], seed=3)
    runs = []
    for shuffle in (None, 0, 1):
        engine = Engine(model, num_blocks=12, block_size=3, shuffle=shuffle)
        for i, p in enumerate(prompts):
            engine.submit(p, 7, seed=i, temperature=0.7)
        tables = []
        engine.step()
        tables = [list(t) for t in engine.pool.tables.values()]
        engine.run()
        runs.append((tables, [engine.result(r) for r in engine.requests]))
    assert any(t != sorted(t) for t in runs[1][0] + runs[2][0])  # really out of order
    for _, results in runs[1:]:
        for got, want in zip(results, runs[0][1], strict=True):
            np.testing.assert_array_equal(got.tokens, want.tokens)
            np.testing.assert_array_equal(got.logits, want.logits)


def test_a_windowed_model_with_learned_positions_pages_exactly():
    config = GPTConfig(vocab_size=32, max_seq_len=24, d_model=16, n_heads=2, n_layers=2,
                       sliding_window=3, attention_sinks=1, init_std=0.3)
    model = random_model(config, seed=2)
    engine = Engine(model, num_blocks=10, block_size=2)
    prompts = prompts_of([6, 1, 3], seed=8, vocab=32)
    for p in prompts:
        engine.submit(p, 9)
    engine.run()
    for rid, p in enumerate(prompts):
        assert_alone(engine, rid, p, 9)


def test_a_latent_model_pages_its_latents():
    """MLA's layers cache one latent per token through the same update: the pool holds those."""
    config = LatentConfig(vocab_size=32, max_seq_len=24, d_model=16, n_heads=2, n_layers=2,
                          kv_latent=4, init_std=0.3)
    model = random_model(config, seed=3)
    engine = Engine(model, num_blocks=6, block_size=4)
    assert (engine.pool.n_kv_heads, engine.pool.d_head) == (1, 4)
    prompts = prompts_of([5, 2, 8], seed=9, vocab=32)
    for p in prompts:
        engine.submit(p, 6)
    engine.run()
    for rid, p in enumerate(prompts):
        assert_alone(engine, rid, p, 6)


# --- one forward per step, and the scheduler's promises -------------------------------------------

def test_a_step_makes_one_forward_for_its_decodes_and_one_for_its_prefills(model_calls):
    """Decoding rows are never padded to a prompt's width: a step that admits calls the model
    twice (every decode in one (B, 1) call, every prefill in another), a step that admits none
    once."""
    model = small_model("mha")
    engine = Engine(model, num_blocks=20, block_size=4)
    first = engine.submit(prompts_of([3])[0], 6)
    takes, real = [], engine.forward

    def forward(rows):
        takes.append(sorted(take for _, take in rows))
        return real(rows)

    engine.forward = forward
    engine.step()  # its prefill alone
    for p in prompts_of([5, 2], seed=1):
        engine.submit(p, 4)
    calls = model_calls["forward"]
    made = engine.step()  # one decode and two prefills
    assert model_calls["forward"] == calls + 2 and takes[-2:] == [[1], [2, 5]]
    assert set(made) == {first, 1, 2}
    calls = model_calls["forward"]
    engine.step()  # three decodes
    assert model_calls["forward"] == calls + 1 and takes[-1] == [1, 1, 1]
    engine.run()
    for rid, p in enumerate([prompts_of([3])[0], *prompts_of([5, 2], seed=1)]):
        assert_alone(engine, rid, p, 6 if rid == first else 4)


def test_max_running_and_the_token_budget_are_kept():
    model = small_model("mha")
    engine = Engine(model, num_blocks=30, block_size=4, max_running=2, token_budget=6)
    fed, real = [], engine.schedule

    def schedule():
        rows = real()
        fed.append((len(rows), sum(take for _, take in rows)))
        return rows

    engine.schedule = schedule
    prompts = prompts_of([9, 2, 4, 7], seed=2)
    for p in prompts:
        engine.submit(p, 3)
    engine.run()
    assert max(n for n, _ in fed) == 2 and max(t for _, t in fed) == 6
    for rid, p in enumerate(prompts):
        assert_alone(engine, rid, p, 3)


def test_stats_count_what_the_pool_and_queue_hold():
    model = small_model("mha")
    engine = Engine(model, num_blocks=8, block_size=4)
    for p in prompts_of([5, 3, 2], seed=6):
        engine.submit(p, 5)
    engine.step()
    s = engine.stats()
    assert s["blocks_in_use"] == 2 + 1 + 1 == s["peak_blocks_in_use"]
    assert s["tokens_cached"] == 10 and s["requests_running"] == 3
    assert s["requests_waiting"] == 0 and s["blocks_total"] == 8 and s["preemptions"] == 0
    engine.cancel(0)
    assert engine.stats()["blocks_in_use"] == 2 and engine.stats()["requests_cancelled"] == 1
    engine.run()
    assert engine.stats()["blocks_in_use"] == 0 and engine.stats()["requests_finished"] == 2


# --- bad input: refused before anything changes ---------------------------------------------------

def engine_state(engine: Engine) -> tuple:
    pool = engine.pool
    return (engine.stats(), [r.id for r in engine.waiting], [r.id for r in engine.running],
            {rid: (r.state, list(r.tokens), r.cached) for rid, r in engine.requests.items()},
            pool.keys.tobytes(), list(pool.free), dict(pool.lengths))


@pytest.fixture
def busy_engine() -> Engine:
    """An engine with a finished, a cancelled, a running and a waiting request."""
    engine = Engine(small_model("mha"), num_blocks=6, block_size=4, max_running=2)
    prompts = prompts_of([3, 4, 5, 2], seed=7)
    engine.submit(prompts[0], 1)
    engine.submit(prompts[1], 5)
    engine.step()  # request 0 finishes at once
    engine.submit(prompts[2], 5)
    engine.submit(prompts[3], 5)
    engine.cancel(2)
    return engine


BAD_SUBMITS = [
    ({"prompt_ids": []}, ValueError, "at least one token"),
    ({"prompt_ids": [[1, 2]]}, ValueError, "prompt_ids"),
    ({"prompt_ids": [1, 64]}, ValueError, "prompt_ids"),  # vocabulary of 64
    ({"prompt_ids": [1, -1]}, ValueError, "prompt_ids"),
    ({"prompt_ids": [1.5]}, TypeError, "prompt_ids"),
    ({"max_new_tokens": 0}, ValueError, "max_new_tokens"),
    ({"prompt_ids": list(range(30)), "max_new_tokens": 3}, ValueError, "max_seq_len=32"),
    ({"prompt_ids": list(range(20)), "max_new_tokens": 10}, ValueError, "could never run"),
    ({"eos_id": 64}, ValueError, "eos_id"),
    ({"temperature": 0.5}, ValueError, "seed must be given"),
    ({"temperature": -1, "seed": 1}, ValueError, "temperature"),
    ({"top_p": 1.5}, ValueError, "top_p"),
    ({"seed": -1}, ValueError, "seed"),
]


@pytest.mark.parametrize(("bad", "error", "match"), BAD_SUBMITS,
                         ids=[m for _, _, m in BAD_SUBMITS])
def test_a_bad_request_is_refused_and_the_others_go_on(busy_engine, bad, error, match):
    before = engine_state(busy_engine)
    with pytest.raises(error, match=match):
        busy_engine.submit(**({"prompt_ids": [1, 2], "max_new_tokens": 3} | bad))
    assert engine_state(busy_engine) == before
    busy_engine.run()
    assert [busy_engine.result(r).state for r in range(4)] == [FINISHED, FINISHED, CANCELLED,
                                                              FINISHED]


@pytest.mark.parametrize(("rid", "match"), [(7, "no request has id 7"), ("0", "no request"),
                                            (0, "already finished"), (2, "already cancelled")])
def test_cancel_refuses_what_is_not_there(busy_engine, rid, match):
    before = engine_state(busy_engine)
    with pytest.raises(ValueError, match=match):
        busy_engine.cancel(rid)
    assert engine_state(busy_engine) == before


def test_cancel_frees_a_running_requests_blocks_at_once(busy_engine):
    assert busy_engine.requests[1].state == RUNNING and 1 in busy_engine.pool.tables
    free, held = len(busy_engine.pool.free), len(busy_engine.pool.tables[1])
    busy_engine.cancel(1)
    assert 1 not in busy_engine.pool.tables and len(busy_engine.pool.free) == free + held > free
    busy_engine.cancel(3)  # a waiting one
    assert busy_engine.requests[3].state == CANCELLED and not busy_engine.waiting


def test_submit_during_run_is_refused_clearly(busy_engine):
    step = busy_engine.step_once

    def submits_while_running():
        busy_engine.submit([1], 1)
        return step()

    busy_engine.step_once = submits_while_running
    with pytest.raises(RuntimeError, match="run\\(\\) is in progress"):
        busy_engine.run()
    busy_engine.step_once = step
    assert busy_engine.run()  # the flag is down again, and the engine goes on


@pytest.mark.parametrize(("make", "error", "match"), [
    (lambda: Engine(small_model("mha"), 0), ValueError, "num_blocks"),
    (lambda: Engine(small_model("mha"), 4, 0), ValueError, "block_size"),
    (lambda: Engine(small_model("mha"), 4, 2, 0), ValueError, "max_running"),
    (lambda: Engine(small_model("mha"), 4, token_budget=0), ValueError, "token_budget"),
    (lambda: Engine("gpt", 4), TypeError, "must be a GPT"),
    (lambda: Engine(random_model(GPTConfig(vocab_size=16, max_seq_len=8, d_model=8, n_heads=2,
                                           n_layers=1, rope=True, sliding_window=4)), 4),
     ValueError, "no position limit"),
])
def test_an_engine_refuses_what_it_cannot_serve(make, error, match):
    with pytest.raises(error, match=match):
        make()


# --- the state machine ---------------------------------------------------------------------------

TINY = GPTConfig(vocab_size=16, max_seq_len=16, d_model=8, n_heads=2, n_kv_heads=1, n_layers=2,
                 init_std=0.5)


@functools.cache
def tiny(fast: bool):
    return random_model(TINY, seed=4, fast=fast)


@functools.cache
def tiny_alone(fast: bool, prompt: tuple[int, ...], max_new_tokens: int, eos_id: int | None,
               seed: int | None, j: int = 0):
    """generate_cached alone, with sample j's stream (Engine.fork: default_rng([seed, j]))."""
    if seed is None:
        return alone(tiny(fast), prompt, max_new_tokens, eos_id=eos_id)
    rng = np.random.default_rng(seed if j == 0 else [seed, j])
    return generate_cached(tiny(fast), [np.asarray(prompt)], max_new_tokens, eos_id=eos_id,
                           temperature=1.0, rng=rng)


SYSTEMS = ((3, 1, 4, 1, 5), (9, 2, 6))  # prompts that share a prefix start with one of these


class ServingMachine(RuleBasedStateMachine):
    """Random submits (some sharing a system prompt), forks, steps and cancels (of a sample
    while its siblings run too) on a random pool, with or without prefix caching and cascade;
    the pool checked after every step, every finished request against its alone-run, and at
    the end every request done."""

    @initialize(num_blocks=st.integers(1, 10), block_size=st.integers(1, 3) | st.integers(1, 16),
                fast=st.booleans(), shuffle=st.none() | st.integers(0, 3),
                max_running=st.none() | st.integers(1, 3),
                budget=st.none() | st.integers(1, 6), prefix_caching=st.booleans(),
                cascade=st.booleans())
    def start(self, num_blocks, block_size, fast, shuffle, max_running, budget, prefix_caching,
              cascade):
        self.fast = fast
        self.engine = Engine(tiny(fast), num_blocks, block_size, max_running,
                             token_budget=budget, shuffle=shuffle,
                             prefix_caching=prefix_caching, cascade=cascade and fast)
        self.specs: dict[int, tuple] = {}  # id -> (prompt, max_new, eos, seed, j, head)
        self.checked: set[int] = set()
        self.preempted: set[int] = set()
        preempt = self.engine.preempt
        self.engine.preempt = lambda r: (self.preempted.add(r.id), preempt(r))[1]

    @rule(length=st.integers(1, 6), max_new_tokens=st.integers(1, 8), seed=st.integers(0, 9),
          sampled=st.sampled_from([True, True, False]), eos=st.none() | st.integers(0, 15),
          system=st.sampled_from([None, None, 0, 1]))
    def submit(self, length, max_new_tokens, seed, sampled, eos, system):
        prompt = tuple(np.random.default_rng(seed).integers(0, 16, length).tolist())
        if system is not None:
            prompt = SYSTEMS[system] + prompt[:3]
        pool = self.engine.pool
        options = {"eos_id": eos, "seed": seed if sampled else None}
        if pool.blocks_for(len(prompt) + max_new_tokens - 1) > pool.num_blocks:
            with pytest.raises(ValueError, match="could never run"):
                self.engine.submit(prompt, max_new_tokens, eos, temperature=1.0, seed=seed)
            return
        rid = self.engine.submit(list(prompt), max_new_tokens, eos,
                                 temperature=1.0 if sampled else None, seed=options["seed"])
        self.specs[rid] = (prompt, max_new_tokens, eos, options["seed"], 0, ())

    @rule(length=st.integers(1, 4), seed=st.integers(0, 9), n=st.integers(1, 2))
    def submit_samples(self, length, seed, n):
        """Parallel sampling, the usual way: submit a seeded prompt and fork it at once."""
        self.submit(length, 3, seed, True, None, None)
        if self.specs and self.engine.requests[max(self.specs)].state == WAITING:
            self.fork_one(max(self.specs), n)

    @precondition(lambda self: self.specs)
    @rule(data=st.data(), n=st.integers(1, 2))
    def fork(self, data, n):
        self.fork_one(data.draw(st.sampled_from(sorted(self.specs))), n)

    def fork_one(self, rid: int, n: int) -> None:
        parent = self.engine.requests[rid]
        if parent.state in (FINISHED, CANCELLED):
            with pytest.raises(ValueError, match="already"):
                self.engine.fork(rid, n)
            return
        try:
            ids = self.engine.fork(rid, n)
        except ValueError as e:
            assert "could never run together" in str(e)
            return
        prompt, max_new, eos, seed, _, _ = self.specs[rid]
        for child in ids:
            request = self.engine.requests[child]
            self.specs[child] = (prompt, max_new, eos, seed, request.sample, tuple(parent.tokens))
        event(f"fork of a {parent.state} request" + (" that has emitted" if parent.tokens
                                                     else ""))

    @rule()
    def step(self):
        self.engine.step()
        self.check_the_pool_holds_each_sequences_keys()
        self.check_every_cached_identity()

    @precondition(lambda self: self.specs)
    @rule(data=st.data())
    def cancel(self, data):
        rid = data.draw(st.sampled_from(sorted(self.specs)))
        if self.engine.requests[rid].state in (FINISHED, CANCELLED):
            with pytest.raises(ValueError, match="already"):
                self.engine.cancel(rid)
        else:
            if self.engine.requests[rid].sample or any(
                    r.group == self.engine.requests[rid].group and r.id != rid
                    for r in self.engine.running):
                event("a cancel while samples of its group run")
            self.engine.cancel(rid)
            assert rid not in self.engine.pool.tables

    @invariant()
    def blocks_are_a_partition_of_the_pool(self):
        pool = self.engine.pool
        held = [p for table in pool.tables.values() for p in table]
        idle = [] if pool.index is None else list(pool.index.idle)
        assert sorted([*set(held), *idle, *pool.free]) == list(range(pool.num_blocks))
        assert pool.blocks_in_use <= pool.num_blocks and pool.peak <= pool.num_blocks
        for rid, table in pool.tables.items():
            assert len(table) == len(set(table)) == pool.blocks_for(pool.lengths[rid])

    @invariant()
    def every_count_is_the_number_of_tables_holding_the_block(self):
        pool = self.engine.pool
        held = [p for table in pool.tables.values() for p in table]
        assert pool.refs == [held.count(p) for p in range(pool.num_blocks)]

    @invariant()
    def a_block_in_two_tables_is_full_and_named_or_an_unwritten_shared_tail(self):
        pool, bs = self.engine.pool, self.engine.pool.block_size
        holders: dict[int, list[tuple[object, int]]] = {}  # block -> (seq, logical index)
        for seq, table in pool.tables.items():
            for j, p in enumerate(table):
                holders.setdefault(p, []).append((seq, j))
        for p, where in holders.items():
            if len(where) < 2:
                continue
            full = all(j < pool.lengths[seq] // bs for seq, j in where)
            if full:
                assert pool.index is None or p in pool.index.entries
                continue
            event("a shared, partly full tail")
            lengths = {pool.lengths[seq] for seq, _ in where}
            assert len(lengths) == 1 and all(j == len(pool.tables[seq]) - 1 for seq, j in where)

    def check_every_cached_identity(self):
        """Every identity names a block holding exactly the keys of its prefix: the tokens of
        its chain of parents (each link intact), computed alone in a KVCache, to 1e-12."""
        e = self.engine
        index = e.pool.index
        if index is None:
            return
        for block, entry in index.entries.items():
            path, node = [], entry
            while True:  # up the chain of parents, each link checked by its serial
                path.append(node.tokens)
                if node.parent_serial is None:
                    break
                parent = index.entries.get(node.parent)
                assert parent is not None and parent.serial == node.parent_serial
                node = parent
            tokens = [t for chunk in reversed(path) for t in chunk]
            cache = e.model.new_cache(1)
            e.model(np.array([tokens]), cache)
            bs = e.pool.block_size
            for i, layer in enumerate(cache.layers):
                want = layer.keys[0, :, len(tokens) - bs:len(tokens)]  # (H_kv, bs, d)
                np.testing.assert_allclose(e.pool.keys[i, block], want, rtol=0, atol=1e-12)

    @invariant()
    def no_request_is_lost(self):
        e = self.engine
        assert set(e.requests) == set(self.specs)
        waiting = [r.id for r in e.waiting]
        assert len(waiting) == len(set(waiting))
        assert set(waiting) == {r for r, q in e.requests.items() if q.state == WAITING}
        assert {r.id for r in e.running} == {r for r, q in e.requests.items()
                                            if q.state == RUNNING} == set(e.pool.tables)
        for r in e.waiting:
            assert r.state == WAITING and r.cached == 0
        for r in e.running:
            assert e.pool.lengths[r.id] == r.cached > 0
        if e.max_running is not None:
            assert len(e.running) <= e.max_running

    @invariant()
    def finished_requests_equal_their_alone_run(self):
        for rid, request in self.engine.requests.items():
            if request.state == FINISHED and rid not in self.checked:
                prompt, max_new, eos, seed, j, head = self.specs[rid]
                want = tiny_alone(self.fast, prompt + head, max_new - len(head), eos, seed, j)
                got = self.engine.result(rid)
                np.testing.assert_array_equal(got.tokens, [*head, *want.tokens[0]])
                np.testing.assert_allclose(got.logits[len(head):], want.logits[0], rtol=0,
                                           atol=TOL)
                self.checked.add(rid)
                if rid in self.preempted:
                    event("a preempted request finished: " + (
                        "seeded" if seed is not None else "greedy"))
                if j:
                    event("a sample finished" + (" (forked after tokens)" if head else ""))

    def check_the_pool_holds_each_sequences_keys(self):
        """Every table's blocks hold exactly that sequence's keys and values: a KVCache filled
        by the model on the sequence's cached tokens alone, to 1e-12."""
        e = self.engine
        for r in e.running:
            cache = e.model.new_cache(1)
            e.model(r.sequence()[None, :r.cached], cache)
            for i, layer in enumerate(cache.layers):
                k, v = e.pool.sequence_keys(r.id, i)
                np.testing.assert_allclose(k, layer.keys[0, :, :r.cached], rtol=0, atol=1e-12)
                np.testing.assert_allclose(v, layer.values[0, :, :r.cached], rtol=0, atol=1e-12)

    def teardown(self):
        if hasattr(self, "engine"):
            self.engine.run()
            if self.engine.pool.copies:
                event("copy-on-write fired")
            if self.engine.pool.index is not None and self.engine.pool.index.hits:
                event("a prefix hit")
            assert self.engine.pool.blocks_in_use == 0
            assert all(r.state in (FINISHED, CANCELLED) for r in self.engine.requests.values())
            self.finished_requests_equal_their_alone_run()


ServingMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=20, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_serving_machine = ServingMachine.TestCase
