"""Sharing the cache between requests, each request proved exact against itself alone.

Prefix caching (beyond/prefix.py), parallel samples with copy-on-write (BlockPool.fork, Engine.fork)
and cascade attention (beyond/cascade.py). Every request, shared, cached, forked, evicted and
recomputed, equals generate_cached on its own prompt alone (greedy, or with its own random
stream), logits to 1e-10 in float64; the pool's counts are checked by hand; the collision drill
shows what a hash without the token comparison would do.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import prompts_of, small_model
from test_paged import pool_for, pool_state, prefill, ragged_layer_case
from test_serving import TOL, engine_state

from attention import grouped_attention, mask_from_positions
from beyond import cascade, prefix
from beyond.flash import finish_rows, fold_keys, start_rows
from beyond.paged import PagedBatch, PoolFullError
from beyond.serving import CANCELLED, FINISHED, Engine
from generate import generate_cached

SAMPLED = {"temperature": 0.9, "top_k": 20}


def stream(seed: int | None, j: int) -> np.random.Generator | None:
    """Sample j's random stream, as Engine.fork documents it."""
    if seed is None:
        return None
    return np.random.default_rng(seed if j == 0 else [seed, j])


def assert_alone(engine: Engine, rid: int, prompt, max_new_tokens: int, seed=None, j: int = 0,
                 **options) -> None:
    """Request rid's tokens and logits == generate_cached on its prompt alone, with stream j."""
    want = generate_cached(engine.model, [np.asarray(prompt)], max_new_tokens,
                           rng=stream(seed, j), **options)
    got = engine.result(rid)
    np.testing.assert_array_equal(got.tokens, want.tokens[0])
    np.testing.assert_allclose(got.logits, want.logits[0], rtol=0, atol=TOL)


def with_system(system: np.ndarray, lengths: list[int], seed: int) -> list[np.ndarray]:
    """Prompts that all start with `system`, then suffixes of these lengths."""
    return [np.concatenate([system, s]) for s in prompts_of(lengths, seed=seed)]


def check_counts(pool) -> None:
    """Every block's count is the number of tables holding it; idle blocks are identified and
    held by none; the free list, the idle and the held blocks partition the pool."""
    held = [b for table in pool.tables.values() for b in table]
    assert pool.refs == [held.count(b) for b in range(pool.num_blocks)]
    idle = [] if pool.index is None else list(pool.index.idle)
    assert all(pool.refs[b] == 0 and b in pool.index.entries for b in idle)
    assert sorted(set(held) | set(idle) | set(pool.free)) == list(range(pool.num_blocks))
    assert len(set(held)) + len(idle) + len(pool.free) == pool.num_blocks


# --- prefix caching ------------------------------------------------------------------------------

@pytest.mark.parametrize("fast", [False, True], ids=["readable", "fast+cascade"])
@pytest.mark.parametrize("system", [1, 4, 5, 8], ids=lambda n: f"system of {n}")
def test_requests_sharing_a_system_prompt_equal_their_alone_runs(fast, system):
    """Block size 4: a shared prefix of 1 token (no full block), exactly one block, one block plus
    one, two blocks. Two requests in the first step, three join later (hits), one of them the
    bare system prompt (its whole prompt cached: it still computes its last token)."""
    model = small_model("rope_gqa", fast=fast)
    engine = Engine(model, num_blocks=24, block_size=4, prefix_caching=True, cascade=fast,
                    shuffle=2)
    base = prompts_of([system], seed=5)[0]
    prompts = [*with_system(base, [3, 6], seed=6), base, *with_system(base, [1, 4], seed=7)]
    specs = {}
    for i, p in enumerate(prompts):
        if i == 2:
            engine.step()
            engine.step()
        options = dict(SAMPLED, seed=i) if i % 2 else {}
        specs[engine.submit(p, 6, **options)] = (p, options)
    engine.run()
    for rid, (p, options) in specs.items():
        assert_alone(engine, rid, p, 6, **options)
    assert engine.stats()["prefix_hit_blocks"] == sum(
        min(system // 4, (len(p) - 1) // 4) for p in prompts[2:])
    check_counts(engine.pool)


def test_an_entirely_cached_prompt_still_computes_its_last_token():
    """A prompt of exactly two blocks, cached whole by an earlier request: the second takes the
    first block from the cache and feeds the second itself (its last token's logits choose the
    next token). Without that cap it would feed nothing and have no logits."""
    model = small_model("mha")
    engine = Engine(model, num_blocks=10, block_size=4, prefix_caching=True)
    prompt = prompts_of([8], seed=1)[0]
    first = engine.submit(prompt, 3)
    engine.run()
    fed = []
    real = engine.schedule
    engine.schedule = lambda: (rows := real(), fed.append([t for _, t in rows]))[0]
    second = engine.submit(prompt, 3)
    engine.run()
    assert fed[0] == [4] and engine.pool.index.hits == 1
    for rid in (first, second):
        assert_alone(engine, rid, prompt, 3)


def test_a_hit_on_a_block_whose_count_fell_to_zero():
    """A finished request's full blocks stay cached (keys kept, not poisoned) with count 0;
    a later request with the same prefix takes them back (count 1, no longer idle)."""
    model = small_model("mha")
    engine = Engine(model, num_blocks=12, block_size=4, prefix_caching=True)
    a, b = with_system(prompts_of([8], seed=3)[0], [2, 3], seed=4)
    engine.submit(a, 1)
    engine.run()
    pool = engine.pool
    idle = list(pool.index.idle)
    assert len(idle) == 2 and all(pool.refs[p] == 0 for p in idle)  # 8 + 2 tokens: 2 full
    assert not np.isnan(pool.keys[:, idle]).any()  # kept, not poisoned
    second = engine.submit(b, 3)
    engine.step()
    assert pool.tables[second][:2] == idle[::-1] or pool.tables[second][:2] == sorted(idle)
    assert [pool.refs[p] for p in pool.tables[second][:2]] == [1, 1] and not pool.index.idle
    engine.run()
    assert_alone(engine, second, b, 3)


def test_really_freed_blocks_are_poisoned_and_a_reused_slot_forgets_its_identity():
    """A pool of 4 blocks of 2: request A (two full blocks and a partial one) finishes: its
    partial block is freed (NaN), its full ones cached. B, with other tokens, needs the whole
    pool: the idle blocks are evicted (poisoned, then written), their identities forgotten; a
    third request with A's prompt finds nothing stale and equals its alone-run."""
    model = small_model("mha")
    engine = Engine(model, num_blocks=4, block_size=2, prefix_caching=True)
    pa, pb = prompts_of([5, 7], seed=9)
    engine.submit(pa, 1)  # holds 5 tokens: blocks of 2, 2, 1
    engine.run()
    pool = engine.pool
    cached = set(pool.index.idle)
    assert len(cached) == 2 and len(pool.free) == 2
    assert np.isnan(pool.keys[:, pool.free]).all()
    engine.submit(pb, 2)  # 7 tokens: all 4 blocks, the 2 idle ones evicted
    engine.step()
    assert cached <= set(pool.tables[1])
    assert not any(b in pool.index.entries and pool.index.entries[b].tokens == tuple(pa[:2])
                   for b in pool.index.entries)  # A's identity is gone with its slot
    engine.run()
    third = engine.submit(pa, 3)
    engine.run()
    assert_alone(engine, third, pa, 3)
    assert_alone(engine, 1, pb, 2)


def test_two_identical_prompts_in_one_step_are_computed_twice_and_kept_once():
    model = small_model("mha")
    engine = Engine(model, num_blocks=12, block_size=4, prefix_caching=True)
    prompt = prompts_of([10], seed=2)[0]
    a, b = engine.submit(prompt, 4), engine.submit(prompt, 4, temperature=1.0, seed=1)
    engine.step()
    pool = engine.pool
    assert pool.tables[a][:2] == pool.tables[b][:2]  # b's two full blocks swapped for a's
    assert pool.tables[a][2] != pool.tables[b][2]  # the partial ones stay each its own
    assert [pool.refs[p] for p in pool.tables[a]] == [2, 2, 1]
    assert pool.blocks_in_use == 4 and len(pool.free) == 12 - 4
    check_counts(pool)
    engine.run()
    assert_alone(engine, a, prompt, 4)
    assert_alone(engine, b, prompt, 4, seed=1, temperature=1.0)


def test_the_same_tokens_at_another_position_are_not_a_hit():
    """Block [e f g h] second in one prompt and first in another: other keys. The chained hash
    differs; with a hash that ignores the parent, the hash and the tokens match, and the parent
    link refuses it."""
    model = small_model("mha")
    x = prompts_of([8], seed=11)[0]
    y = np.concatenate([x[4:], prompts_of([3], seed=12)[0]])  # starts with x's second block
    for weak in (False, True):
        engine = Engine(model, num_blocks=12, block_size=4, prefix_caching=True)
        if weak:
            engine.pool.index.hash = lambda parent, tokens: sum(tokens)
        engine.submit(x, 2)
        engine.run()
        engine.submit(y, 2)
        engine.run()
        assert engine.pool.index.hits == 0
        assert engine.pool.index.refused == (1 if weak else 0)
        assert_alone(engine, 1, y, 2)


# --- the collision drill -------------------------------------------------------------------------

def test_the_collision_drill(monkeypatch):
    """A deliberately weak identity: a block's token sum (no chain). Prompts [1, 2, ...] and
    [2, 1, ...] collide. Without the token comparison the second request takes the first one's
    keys and its output changes; with it, the false hit is refused and the output is exact."""
    model = small_model("mha")
    tail = prompts_of([3], seed=13)[0]
    a, b = np.concatenate([[1, 2, 3, 4], tail]), np.concatenate([[2, 1, 4, 3], tail])

    def serve(compare: bool) -> Engine:
        engine = Engine(model, num_blocks=12, block_size=4, prefix_caching=True)
        engine.pool.index.hash = lambda parent, tokens: sum(tokens)
        if not compare:
            monkeypatch.setattr(engine.pool.index, "confirms", lambda *args: True)
        engine.submit(a, 4)
        engine.run()
        engine.submit(b, 4)
        engine.run()
        return engine

    fooled = serve(compare=False)
    assert fooled.pool.index.hits == 1  # a's block, taken for b's
    want = generate_cached(model, [b], 4)
    assert np.abs(fooled.result(1).logits - want.logits[0]).max() > 1e-3  # someone else's keys
    guarded = serve(compare=True)
    assert guarded.pool.index.hits == 0 and guarded.pool.index.refused == 1
    assert_alone(guarded, 1, b, 4)


def test_colliding_blocks_share_a_bucket_and_are_told_apart():
    """The weak hash again: both blocks are cached under one hash, and each request later finds
    its own block (the comparison picks it from the bucket)."""
    model = small_model("mha")
    tail = prompts_of([2], seed=14)[0]
    prompts = [np.concatenate([t, tail]) for t in ([1, 2, 3, 4], [4, 3, 2, 1])]
    engine = Engine(model, num_blocks=16, block_size=4, prefix_caching=True)
    engine.pool.index.hash = lambda parent, tokens: sum(tokens)
    for p in prompts:
        engine.submit(p, 2)
    engine.run()
    assert [len(b) for b in engine.pool.index.buckets.values()] == [2]
    again = [engine.submit(p, 2) for p in prompts[::-1]]
    engine.run()
    assert engine.pool.index.hits == 2
    for rid, p in zip(again, prompts[::-1], strict=True):
        assert_alone(engine, rid, p, 2)


# --- copy-on-write in the pool, both directions --------------------------------------------------

@pytest.mark.parametrize("length", [1, 4, 5], ids=lambda n: f"prompt of {n}")
@pytest.mark.parametrize("first", ["original", "sample"])
def test_copy_on_write_in_both_directions(length, first):
    """A sequence forked: both tables hold every block (counts 2). The first to append into the
    partly full last block copies it; the other then writes in place. A prompt of exactly one
    block has no partly full block: no copy. Each sequence's keys are its own alone-run's."""
    model = small_model("gqa")
    pool = pool_for(model, 8, 4, shuffle=1)
    prompt = prompts_of([length], seed=15)[0]
    prefill(model, pool, [prompt], seqs=["original"])
    pool.fork("original", "sample")
    assert pool.tables["sample"] == pool.tables["original"]
    assert all(pool.refs[b] == 2 for b in pool.tables["original"])
    shared_tail = pool.tables["original"][-1]
    order = ["original", "sample"] if first == "original" else ["sample", "original"]
    tokens = {"original": [7, 8], "sample": [9, 10]}
    for seq in order:
        model(np.array([[tokens[seq][0]]]), PagedBatch(pool, [seq], [1]))
    copies = int(length % 4 != 0)
    assert pool.copies == copies
    if copies:  # the first writer copied; the second still holds the block, alone now
        assert pool.tables[order[0]][-1] != shared_tail == pool.tables[order[1]][-1]
    else:  # the shared block was full: each appended into a new block of its own
        assert pool.tables[order[0]][-2] == shared_tail == pool.tables[order[1]][-2]
    model(np.array([[tokens["original"][1]], [tokens["sample"][1]]]),
          PagedBatch(pool, ["original", "sample"], [1, 1]))  # both at once, no copy left to make
    assert pool.copies == copies
    check_counts(pool)
    for seq in ("original", "sample"):
        alone = model.new_cache(1)
        sequence = np.concatenate([prompt, tokens[seq]])
        model(sequence[None], alone)
        for i, layer in enumerate(alone.layers):
            k, v = pool.sequence_keys(seq, i)
            np.testing.assert_allclose(k, layer.keys[0, :, :len(sequence)], rtol=0, atol=1e-12)
            np.testing.assert_allclose(v, layer.values[0, :, :len(sequence)], rtol=0, atol=1e-12)


def test_three_sharers_append_in_one_step_two_copies():
    pool = pool_for(small_model("mha"), 8, 4)
    prefill(small_model("mha"), pool, prompts_of([3], seed=16), seqs=["a"])
    pool.fork("a", "b")
    pool.fork("a", "c")
    assert pool.blocks_needed_all({"a": 1, "b": 1, "c": 1}) == 2
    done = pool.allocate({"a": 1, "b": 1, "c": 1})
    assert [seq for seq, _, _ in done.copies] == ["a", "b"] and pool.copies == 2
    check_counts(pool)


def test_an_allocation_that_fails_part_way_leaves_every_count_as_it_was():
    """Shared blocks, an idle cached block and a fork: a step that would copy, evict and take new
    blocks, but not all of them fit, is refused whole; one that fits and then fails in a layer
    is rolled back byte for byte (keys, free list order, counts, the index, the copy count)."""
    model = small_model("mha")
    pool = pool_for(model, 6, 2, prefix_caching=True)
    prompt = prompts_of([5], seed=17)[0]
    prefill(model, pool, [prompt], seqs=["gone"])
    pool.identify("gone", prompt)
    pool.release("gone")  # 2 idle cached blocks, 4 free
    prefill(model, pool, [prompt[:3]], seqs=["a"])  # 2 blocks, its second partly full
    pool.fork("a", "b")
    before = pool_state(pool)
    with pytest.raises(PoolFullError):  # a copy for "a", 1 new for "b", 3 for "c": 5 > 2 + 2
        pool.allocate({"a": 1, "b": 3, "c": 6})
    assert pool_state(pool) == before
    batch = PagedBatch(pool, ["a", "b", "c"], [1, 3, 3])  # 1 + 1 + 2: the free and the idle
    step = batch.plan(model, 3, 3, None)
    batch.commit(step, model)  # copies a's tail, evicts both idle blocks
    assert pool.copies == 1 and not pool.index.idle and pool.blocks_in_use == 6
    batch.roll_back(step)
    assert pool_state(pool) == before


# --- parallel samples through the engine ---------------------------------------------------------

@pytest.mark.parametrize("fast", [False, True], ids=["readable", "fast+cascade"])
@pytest.mark.parametrize("length", [1, 4, 5], ids=lambda n: f"prompt of {n}")
def test_n_samples_of_one_prompt_each_equal_their_alone_run(fast, length):
    """submit then fork(id, 3): the prompt is computed once, four tables share its blocks, each
    partly full block is copied at most once per sample, and sample j equals generate_cached
    with np.random.default_rng([seed, j]) (sample 0: default_rng(seed))."""
    model = small_model("rope_gqa", fast=fast)
    engine = Engine(model, num_blocks=20, block_size=4, cascade=fast)
    prompt = prompts_of([length], seed=18)[0]
    other = engine.submit(prompts_of([6], seed=19)[0], 5)  # a stranger in the same steps
    rid = engine.submit(prompt, 6, **SAMPLED, seed=7)
    samples = engine.fork(rid, 3)
    assert samples == [rid + 1, rid + 2, rid + 3]
    engine.step()  # the prompt once, then all four choose from its logits
    pool = engine.pool
    tables = [pool.tables[r] for r in [rid, *samples]]
    assert all(t == tables[0] for t in tables) and pool.refs[tables[0][0]] == 4
    engine.run()
    assert engine.stats()["copies_on_write"] == (3 if length % 4 else 0)
    for j, r in enumerate([rid, *samples]):
        assert_alone(engine, r, prompt, 6, seed=7, j=j, **SAMPLED)
    assert_alone(engine, other, prompts_of([6], seed=19)[0], 5)
    check_counts(pool)
    assert pool.blocks_in_use == 0


def test_a_fork_of_a_running_request_shares_its_tokens_so_far():
    """Forked after 3 tokens: the sample holds the same blocks and tokens, then draws from its
    own stream: its tokens are the 3, then generate_cached on prompt + those 3 with
    default_rng([seed, 1])."""
    model = small_model("mha")
    engine = Engine(model, num_blocks=20, block_size=4)
    prompt = prompts_of([6], seed=20)[0]
    rid = engine.submit(prompt, 8, **SAMPLED, seed=3)
    for _ in range(3):
        engine.step()
    (sample,) = engine.fork(rid, 1)
    assert engine.pool.tables[sample] == engine.pool.tables[rid]
    engine.run()
    assert_alone(engine, rid, prompt, 8, seed=3, **SAMPLED)
    head = engine.result(rid).tokens[:3]
    want = generate_cached(model, [np.concatenate([prompt, head])], 5, rng=stream(3, 1),
                           **SAMPLED)
    got = engine.result(sample)
    np.testing.assert_array_equal(got.tokens, np.concatenate([head, want.tokens[0]]))
    np.testing.assert_allclose(got.logits[3:], want.logits[0], rtol=0, atol=TOL)
    np.testing.assert_array_equal(got.logits[:3], engine.result(rid).logits[:3])


def test_cancelling_a_sample_leaves_its_siblings_exact():
    model = small_model("mha")
    engine = Engine(model, num_blocks=20, block_size=4, prefix_caching=True)
    prompt = prompts_of([6], seed=21)[0]
    rid = engine.submit(prompt, 7, **SAMPLED, seed=4)
    samples = engine.fork(rid, 2)
    engine.step()
    engine.step()
    engine.cancel(samples[0])
    check_counts(engine.pool)
    assert engine.pool.refs[engine.pool.tables[rid][0]] == 2  # held by the two left
    engine.run()
    assert engine.result(samples[0]).state == CANCELLED
    for j, r in ((0, rid), (2, samples[1])):
        assert_alone(engine, r, prompt, 7, seed=4, j=j, **SAMPLED)


def test_forks_of_a_cancelled_parent_prefill_on_their_own():
    model = small_model("mha")
    engine = Engine(model, num_blocks=20, block_size=4)
    prompt = prompts_of([5], seed=22)[0]
    rid = engine.submit(prompt, 4, **SAMPLED, seed=5)
    samples = engine.fork(rid, 2)
    engine.cancel(rid)
    engine.run()
    for j, r in enumerate(samples, start=1):
        assert engine.result(r).state == FINISHED
        assert_alone(engine, r, prompt, 4, seed=5, j=j, **SAMPLED)


def test_preempted_samples_recompute_and_stay_exact():
    """A request and its sample behind a stranger, in a pool too small for all three: the newest
    are preempted, recompute on their own (their full prompt blocks found in the cache) and
    still equal their alone-runs."""
    model = small_model("mha")
    engine = Engine(model, num_blocks=8, block_size=2, prefix_caching=True)
    stranger, prompt = prompts_of([5, 5], seed=23)
    engine.submit(stranger, 6)
    rid = engine.submit(prompt, 6, **SAMPLED, seed=6)
    samples = engine.fork(rid, 1)
    engine.run()
    assert engine.stats()["preemptions"] > 0
    assert_alone(engine, 0, stranger, 6)
    for j, r in enumerate([rid, *samples]):
        assert_alone(engine, r, prompt, 6, seed=6, j=j, **SAMPLED)


# --- bad input: refused before anything changes ---------------------------------------------------

@pytest.fixture
def engine_with_a_fork() -> Engine:
    """A finished request (0), a cancelled one (1), a running one with a sample (2, 3)."""
    engine = Engine(small_model("mha"), num_blocks=10, block_size=4, prefix_caching=True)
    p = prompts_of([3, 4, 5], seed=24)
    engine.submit(p[0], 1)
    engine.submit(p[1], 5)
    engine.submit(p[2], 5, temperature=1.0, seed=1)
    engine.fork(2, 1)
    engine.step()
    engine.cancel(1)
    return engine


@pytest.mark.parametrize(("call", "error", "match"), [
    (lambda e: e.fork(2, 0), ValueError, "fork n must be a positive int"),
    (lambda e: e.fork(2, 1.5), ValueError, "fork n"),
    (lambda e: e.fork(2, -1), ValueError, "fork n must be a positive int"),
    (lambda e: e.fork(2, True), ValueError, "fork n must be a positive int, got True"),
    (lambda e: e.fork(2, 4), ValueError, "could never run together"),
    (lambda e: e.fork(0), ValueError, "already finished"),
    (lambda e: e.fork(1), ValueError, "already cancelled"),
    (lambda e: e.fork(9), ValueError, "no request has id 9"),
    (lambda e: e.submit([1, 2], 3, temperature=1.0, seed=1.5), ValueError, "seed"),
    (lambda e: e.submit([1, 2], 3, temperature=1.0, seed="1"), ValueError, "seed"),
    (lambda e: e.submit([1, 2], 3, temperature=1.0, seed=True), ValueError, "seed"),
    (lambda e: e.submit([1, 2], 3, temperature=1.0, seed=-1), ValueError, "int >= 0"),
    (lambda e: e.submit([1, 2], 3, seed=2.0), ValueError, "seed"),  # greedy: still refused
])
def test_bad_sharing_input_is_refused_and_changes_nothing(engine_with_a_fork, call, error, match):
    before = engine_state(engine_with_a_fork), pool_state(engine_with_a_fork.pool)
    with pytest.raises(error, match=match):
        call(engine_with_a_fork)
    assert (engine_state(engine_with_a_fork), pool_state(engine_with_a_fork.pool)) == before
    engine_with_a_fork.run()
    assert engine_with_a_fork.requests[3].state == FINISHED


def test_an_engine_refuses_sharing_flags_that_are_not_bools():
    for name in ("prefix_caching", "cascade"):
        with pytest.raises(TypeError, match=name):
            Engine(small_model("mha"), 4, **{name: 1})
    with pytest.raises(TypeError, match="cascade"):
        PagedBatch(pool_for(small_model("mha"), 4, 2), [0], [1], cascade="yes")


# --- cascade attention ---------------------------------------------------------------------------

def test_the_merge_of_two_partials_is_the_softmax_over_both():
    """Hand-sized: 2 queries, 3 + 4 keys; merge(part A, part B) == one pass over all 7."""
    rng = np.random.default_rng(0)
    q_t = rng.standard_normal((1, 5, 2))  # (lead, d, n)
    k, v = rng.standard_normal((2, 1, 7, 5))
    parts = [fold_keys(*start_rows((1,), 2, 5, np.float64), q_t, k[:, s], v[:, s], None)
             for s in (slice(0, 3), slice(3, 7))]
    whole = fold_keys(*start_rows((1,), 2, 5, np.float64), q_t, k, v, None)
    merged = cascade.merge(*parts)
    np.testing.assert_allclose(finish_rows(merged[1], merged[2]), finish_rows(whole[1], whole[2]),
                               rtol=0, atol=1e-12)
    scores = q_t.swapaxes(-1, -2) @ k.swapaxes(-1, -2)  # (1, 2, 7): the five steps, by hand
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    np.testing.assert_allclose(finish_rows(merged[1], merged[2]),
                               weights / weights.sum(-1, keepdims=True) @ v, rtol=0, atol=1e-12)


def shared_layer_case(block_size: int, window_row: bool):
    """ragged_layer_case's pool, plus three rows forked from row 3 (which holds 2 blocks + 1
    full before the step): a group of four sharing two full blocks, and rows in no group."""
    pool, batch, q, k, v, mask = ragged_layer_case(2, block_size)
    batch.roll_back(None)
    for child in ("x", "y", "z"):
        pool.fork(3, child)
    seqs = [0, 1, 2, 3, "x", "y", "z"]
    new = [3, 1, 2, 1, 2, 1, 4]
    batch = PagedBatch(pool, seqs, new, cascade=True)
    T = max(new)
    owner = pool.filled_by()
    step = batch.plan(owner, len(seqs), T, None)
    batch.commit(step, owner)
    mask = mask_from_positions(step.positions, step.key_positions)
    if window_row:
        mask[5, :, :, 0] = False  # as if a window hid y's first key
    rng = np.random.default_rng(block_size)
    q = rng.standard_normal((len(seqs), 4, T, 8))
    k, v = rng.standard_normal((2, len(seqs), 2, T, 8))
    return pool, batch, q, k, v, mask


@pytest.mark.parametrize("window_row", [False, True], ids=["group of 4", "one key hidden"])
@pytest.mark.parametrize("block_size", [1, 2, 3, 5])
def test_cascade_equals_the_gather(block_size, window_row):
    """Cascade (the shared prefix once per group, each row's own blocks, merged) == the readable
    attention over the gathered keys, float64, to 1e-12; GQA; it reads fewer blocks. A row whose
    mask hides a prefix key stays in the group: the mask applies to the prefix part too."""
    pool, batch, q, k, v, mask = shared_layer_case(block_size, window_row)
    groups = cascade.shared_prefixes(pool.table_array(batch.seq_ids, 20), batch.past, block_size)
    assert [(list(rows), s) for rows, s in groups] == [
        ([3, 4, 5, 6], (2 * block_size + 1) // block_size)]
    keys, values = batch.layers[0].update(k, v)
    expected, _ = grouped_attention(q, keys, values, mask)
    read = pool.blocks_read
    got = batch.layers[0].attend(q, k, v, mask)
    cascaded = pool.blocks_read - read
    batch.cascade = False
    walked = batch.layers[0].attend(q, k, v, mask)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(walked, expected, rtol=0, atol=1e-12)
    assert np.abs(expected).max() > 0.1
    assert cascaded < pool.blocks_read - read - cascaded


def test_a_part_that_sees_no_key_merges_with_zero_weight():
    """Hand-sized, -inf as the mask gives it: merge(empty, B) is B exactly (its factor is
    exp(-inf) = 0, never -inf + inf = NaN), and two empty parts finish as zeros."""
    rng = np.random.default_rng(1)
    q_t = rng.standard_normal((1, 5, 2))  # (lead, d, n)
    k, v = rng.standard_normal((2, 1, 4, 5))
    empty = start_rows((1,), 2, 5, np.float64)  # m = -inf, l = 0, acc = 0: no key seen
    hidden = fold_keys(*start_rows((1,), 2, 5, np.float64), q_t, k, v,
                       np.zeros((1, 2, 4), dtype=bool))  # every key folded, every key hidden
    seen = fold_keys(*start_rows((1,), 2, 5, np.float64), q_t, k, v, None)
    for none in (empty, hidden):
        for merged in (cascade.merge(none, seen), cascade.merge(seen, none)):
            for got, want in zip(merged, seen, strict=True):
                np.testing.assert_array_equal(got, want)
        m, denom, acc = cascade.merge(none, empty)
        assert (m == -np.inf).all() and (denom == 0).all()
        np.testing.assert_array_equal(finish_rows(denom, acc), np.zeros((1, 2, 5)))


@pytest.mark.parametrize("block_size", [1, 2, 4])
def test_cascade_when_a_query_sees_nothing_in_one_part(block_size):
    """Four rows share two full blocks that end exactly where each row's past ends. A padding
    query sits at its row's latest position, so it sees the prefix and nothing of its row's own
    blocks (own part empty); a window-like mask hides the prefix from another query (prefix part
    empty); one query sees nothing at all. Cascade == the readable attention over the gathered
    keys, float64, 1e-12, no NaN."""
    pool, batch, *_ = ragged_layer_case(3, block_size)
    batch.roll_back(None)
    rng = np.random.default_rng(block_size)
    pool.allocate({"p": 2 * block_size})
    blocks, offsets = pool.slots("p", 0, 2 * block_size)
    pool.keys[0, blocks, :, offsets] = rng.standard_normal((2 * block_size, 2, 8))
    pool.values[0, blocks, :, offsets] = rng.standard_normal((2 * block_size, 2, 8))
    pool.lengths["p"] = 2 * block_size
    for child in ("a", "b", "c"):
        pool.fork("p", child)
    seqs, new = ["p", "a", "b", "c"], [1, 3, 2, 3]
    batch = PagedBatch(pool, seqs, new, cascade=True)
    owner = pool.filled_by()
    step = batch.plan(owner, 4, 3, None)
    batch.commit(step, owner)
    mask = mask_from_positions(step.positions, step.key_positions)  # (4, 1, 3, t_k)
    prefix_cols = slice(0, 2 * block_size)
    mask[1, :, 2, prefix_cols] = False  # row a's last query: the prefix hidden, as by a window
    mask[3, :, 1, :] = False  # row c's middle query sees no key at all
    own = mask[..., 2 * block_size:]
    assert not own[0, 0, 0].any() and mask[0, 0, 0, prefix_cols].all()  # row p's padding query
    assert not own[2, 0, 0].any() and mask[2, 0, 0, prefix_cols].all()  # row b's: the prefix only
    assert not mask[1, 0, 2, prefix_cols].any() and own[1, 0, 2].any()
    groups = cascade.shared_prefixes(pool.table_array(seqs, 20), batch.past, block_size)
    assert [(list(rows), s) for rows, s in groups] == [([0, 1, 2, 3], 2)]
    q = rng.standard_normal((4, 4, 3, 8))
    k, v = rng.standard_normal((2, 4, 2, 3, 8))
    keys, values = batch.layers[0].update(k, v)
    expected, _ = grouped_attention(q, keys, values, mask)
    got = batch.layers[0].attend(q, k, v, mask)
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(got[3, :, 1], 0.0)  # sees nothing: zeros, as the readable path
    assert np.abs(got[0]).max() > 0.1 and np.abs(got[1, :, 2]).max() > 0.1


def test_the_prefix_index_alone():
    """Hand-worked: block size 2, [5 1 | 9 9 | 2]: two full blocks, chained; a lookup of
    [5 1 | 9 9 | 3 3] finds both, of [9 9 | ...] none, and never more than `limit`."""
    index = prefix.PrefixIndex(2)
    assert index.register(10, None, (5, 1)) == 10
    assert index.register(11, 10, (9, 9)) == 11
    assert index.entries[11].parent == 10
    assert index.entries[11].hash == prefix.chained_hash(prefix.chained_hash(None, (5, 1)),
                                                         (9, 9))
    assert index.lookup([5, 1, 9, 9, 3, 3], 3) == [10, 11]
    assert index.lookup([5, 1, 9, 9, 3, 3], 1) == [10]
    assert index.lookup([9, 9, 5, 1], 2) == []
    assert index.register(12, None, (5, 1)) == 10  # the same identity: the block that has it
    index.park(11)
    index.park(10)
    block, entry = index.evict()  # the least recently used: the tail, parked first
    assert block == 11 and entry.tokens == (9, 9) and list(index.idle) == [10]
    assert 11 not in index.entries and index.lookup([5, 1, 9, 9], 2) == [10]
