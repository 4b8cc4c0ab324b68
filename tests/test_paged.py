"""The paged cache (beyond/paged.py): blocks taken only when the last one is full and given back
poisoned; a batch view that numbers ragged rows and says where every key sits; the gather (the
readable path) equal to a KVCache's keys and the block walk (the fast path) equal to the gather;
an allocation that fails changing nothing, and a failed step rolled back byte for byte."""

from __future__ import annotations

import functools
import weakref

import numpy as np
import pytest
from conftest import prompts_of, small_model

from attention import grouped_attention, mask_from_positions
from beyond.paged import BlockPool, PagedBatch, PoolFullError
from cache import EMPTY
from tools.measure import peak_during

TOL = 1e-12


def pool_for(model, num_blocks: int, block_size: int, **options) -> BlockPool:
    c = model.config
    return BlockPool(c.n_layers, *model.kv_shape, num_blocks, block_size, model.dtype, **options)


def pool_state(pool: BlockPool) -> tuple:
    """Everything a refused or rolled-back step must leave as it was, byte for byte (NaN
    included: its bytes compare equal where == would not)."""
    return (pool.keys.tobytes(), pool.values.tobytes(), list(pool.free), list(pool.refs),
            {s: list(t) for s, t in pool.tables.items()}, dict(pool.lengths), pool.filled_by,
            None if pool.index is None else pool.index.snapshot(), pool.copies)


def right_aligned(prompts: list[np.ndarray]) -> np.ndarray:
    """(B, T) ids, each prompt's tokens in the last columns of its row, pad id 0 before."""
    T = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), T), dtype=np.int64)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = p
    return ids


def prefill(model, pool: BlockPool, prompts: list[np.ndarray], seqs: list | None = None
            ) -> np.ndarray:
    """One ragged call bringing each prompt to its own sequence; the last logits (B, V)."""
    seqs = list(range(len(prompts))) if seqs is None else seqs
    batch = PagedBatch(pool, seqs, [len(p) for p in prompts])
    return model(right_aligned(prompts), batch, last_only=True)[:, -1]


# --- the pool ------------------------------------------------------------------------------------

@pytest.mark.parametrize("length", [1, 4, 5, 8, 9])
def test_a_sequence_takes_a_new_block_only_when_its_last_one_is_full(length):
    model = small_model("mha")
    pool = pool_for(model, 8, 4)
    prefill(model, pool, prompts_of([length]))
    assert len(pool.tables[0]) == -(-length // 4) == pool.blocks_in_use
    for n in range(1, 6):  # one token at a time: a new block exactly when length % 4 == 0
        before = pool.blocks_in_use
        model(np.array([[n]]), PagedBatch(pool, [0], [1]))
        assert pool.blocks_in_use - before == int((length + n - 1) % 4 == 0)
        assert pool.lengths[0] == length + n


def test_storage_holds_no_padding_and_the_unwritten_tail_is_poison():
    model = small_model("mha")
    pool = pool_for(model, 10, 4)
    prefill(model, pool, prompts_of([1, 6, 4], seed=3))  # padded to 6 in the call
    assert pool.tokens_cached == 11 and pool.blocks_in_use == 1 + 2 + 1  # not 3 rows x 6
    for seq, length in pool.lengths.items():
        last = pool.tables[seq][-1]
        tail = length - (len(pool.tables[seq]) - 1) * 4  # tokens in the last block
        assert np.isnan(pool.keys[:, last, :, tail:]).all()  # never written: still poison
        assert not np.isnan(pool.keys[:, last, :, :tail]).any()


def test_a_released_sequence_gives_its_blocks_back_poisoned():
    model = small_model("mha")
    pool = pool_for(model, 6, 2)
    prefill(model, pool, prompts_of([3, 4], seed=1))
    blocks = list(pool.tables[0])
    pool.release(0)
    assert 0 not in pool.tables and 0 not in pool.lengths
    assert set(blocks) <= set(pool.free) and pool.blocks_in_use == 2
    assert np.isnan(pool.keys[:, blocks]).all() and np.isnan(pool.values[:, blocks]).all()
    assert not np.isnan(pool.keys[:, pool.tables[1]]).any()  # the other one untouched


def test_an_allocation_that_fails_changes_nothing():
    model = small_model("mha")
    pool = pool_for(model, 5, 2)
    prefill(model, pool, prompts_of([3, 2], seed=2))  # 2 + 1 blocks: 2 free
    before = pool_state(pool)
    with pytest.raises(PoolFullError):  # sequence 0 would get its block, 2 would not
        pool.allocate({0: 2, 2: 4})
    assert pool_state(pool) == before
    with pytest.raises(PoolFullError, match="needs 3 new blocks, 2 are free"):  # refused in plan
        prefill(model, pool, prompts_of([1, 5], seed=4), seqs=[0, 2])
    assert pool_state(pool) == before


def test_a_shuffled_free_list_gives_tables_out_of_order():
    pool = BlockPool(1, 1, 2, 32, 1, shuffle=0)
    got = pool.allocate({"a": 10}).got["a"]
    assert sorted(got) != got and len(set(got)) == 10
    assert BlockPool(1, 1, 2, 32, 1).allocate({"a": 4}).got["a"] == [0, 1, 2, 3]


# --- the batch view: numbering ragged rows -------------------------------------------------------

def test_plan_numbers_each_row_from_its_own_length():
    """Hand-worked: rows holding 5 and 0 tokens bring 2 and 3, block_size 4. Row 0's new tokens
    are positions 5, 6 (its pad column: its last position, 4); row 1's 0, 1, 2. Keys: 2 blocks
    x 4 columns, in logical-slot order, EMPTY past each row's length after the step."""
    model = small_model("mha")
    pool = pool_for(model, 8, 4)
    prefill(model, pool, prompts_of([5]), seqs=["held"])
    step = PagedBatch(pool, ["held", "new"], [2, 3]).plan(model, 2, 3, None)
    np.testing.assert_array_equal(step.real, [[False, True, True], [True, True, True]])
    np.testing.assert_array_equal(step.positions, [[4, 5, 6], [0, 1, 2]])
    np.testing.assert_array_equal(step.key_positions, [[0, 1, 2, 3, 4, 5, 6, EMPTY],
                                                       [0, 1, 2, EMPTY, EMPTY, EMPTY, EMPTY,
                                                        EMPTY]])


def test_plan_refuses_what_it_cannot_serve():
    model = small_model("mha")
    pool = pool_for(model, 8, 4)
    batch = PagedBatch(pool, [0, 1], [2, 3])
    with pytest.raises(ValueError, match="attention_mask must be None"):
        batch.plan(model, 2, 3, np.ones((2, 3)))
    with pytest.raises(ValueError, match="cannot bring"):
        batch.plan(model, 2, 2, None)  # 3 new tokens do not fit in 2 columns
    with pytest.raises(ValueError, match="this model needs"):
        batch.plan(small_model("gqa"), 2, 3, None)  # other K/V heads
    with pytest.raises(ValueError, match="float32, the model float64"):
        PagedBatch(BlockPool(2, 4, 8, 8, 4), [0], [1]).plan(model, 1, 1, None)
    prefill(model, pool, prompts_of([2]))
    other = small_model("rope")  # same shapes, other weights
    with pytest.raises(ValueError, match="did not compute"):
        PagedBatch(pool, [0], [1]).plan(other, 1, 1, None)


@pytest.mark.parametrize(("args", "match"), [
    (("pool", [0], [1]), "pool must be a BlockPool"),
    ((None, [], [1]), "non-empty list"),
    ((None, [0, 0], [1, 1]), "distinct"),
    ((None, [0, 1], [1, 0]), "one count >= 1"),
    ((None, [0, 1], [1]), "one count >= 1"),
])
def test_a_batch_view_checks_its_arguments(args, match):
    pool = BlockPool(1, 1, 2, 4, 2)
    with pytest.raises((TypeError, ValueError), match=match):
        PagedBatch(*(pool if a is None else a for a in args))


@pytest.mark.parametrize(("name", "value"), [("num_blocks", 0), ("block_size", 0),
                                             ("n_kv_heads", -1), ("shuffle", -2),
                                             ("shuffle", 1.5), ("poison", 1)])
def test_a_pool_checks_its_arguments(name, value):
    args = {"n_layers": 1, "n_kv_heads": 1, "d_head": 2, "num_blocks": 4, "block_size": 2}
    with pytest.raises((TypeError, ValueError), match=name):
        BlockPool(**(args | {name: value}))


# --- the gather and the walk ---------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["mha", "rope_gqa", "mqa"])
@pytest.mark.parametrize("block_size", [1, 3, 4, 16])
def test_every_table_holds_its_sequences_keys(variant, block_size):
    """After a ragged prefill and two decode steps, each sequence's keys read through its
    (shuffled) table are a KVCache's, filled by the model on that sequence alone."""
    model = small_model(variant)
    pool = pool_for(model, 40, block_size, shuffle=7)
    prompts = prompts_of([1, block_size, block_size + 1, 9], seed=5)
    prefill(model, pool, prompts)
    seqs = [list(p) for p in prompts]
    for t in (3, 11):
        model(np.full((4, 1), t), PagedBatch(pool, [0, 1, 2, 3], [1] * 4))
        for s in seqs:
            s.append(t)
    for b, tokens in enumerate(seqs):
        alone = model.new_cache(1)
        model(np.array([tokens]), alone)
        for i, layer in enumerate(alone.layers):
            k, v = pool.sequence_keys(b, i)
            np.testing.assert_allclose(k, layer.keys[0, :, :len(tokens)], rtol=0, atol=TOL)
            np.testing.assert_allclose(v, layer.values[0, :, :len(tokens)], rtol=0, atol=TOL)


def ragged_layer_case(seed: int, block_size: int, H: int = 4, H_kv: int = 2, d: int = 8):
    """A pool holding ragged rows, a PagedBatch committed for a step of new tokens, and random
    q, k, v for one layer with the model's mask; a row whose every query is blind too."""
    rng = np.random.default_rng(seed)
    pool = BlockPool(1, H_kv, d, 64, block_size, np.float64, shuffle=seed)
    owner = shaped(H_kv, d)
    pool.filled_by = weakref.ref(owner)
    held, new = [0, 5, block_size, 2 * block_size + 1], [3, 1, 2, 4]
    pool.allocate(dict(enumerate(held)))
    for seq, n in enumerate(held):  # fill the held tokens with random keys
        blocks, offsets = pool.slots(seq, 0, n)
        pool.keys[0, blocks, :, offsets] = rng.standard_normal((n, H_kv, d))
        pool.values[0, blocks, :, offsets] = rng.standard_normal((n, H_kv, d))
        pool.lengths[seq] = n
    batch = PagedBatch(pool, [0, 1, 2, 3], new)
    T = max(new)
    step = batch.plan(owner, 4, T, None)
    batch.commit(step, owner)
    mask = mask_from_positions(step.positions, step.key_positions)  # (B, 1, T, t_k)
    mask[3, :, 1] = False  # row 3's query 1 sees nothing: uniform over every column
    q = rng.standard_normal((4, H, T, d))
    k, v = rng.standard_normal((2, 4, H_kv, T, d))
    return pool, batch, q, k, v, mask


class Shaped:
    """The least a plan asks of a model: its config (one layer), K/V shape and dtype."""

    def __init__(self, H_kv: int, d: int) -> None:
        self.config = type("Config", (), {"n_layers": 1})()
        self.kv_shape, self.dtype = (H_kv, d), np.dtype(np.float64)


@functools.cache
def shaped(H_kv: int, d: int) -> Shaped:
    """One such model per shape, kept alive (a pool remembers its model by a weak reference)."""
    return Shaped(H_kv, d)


@pytest.mark.parametrize("block_size", [1, 2, 3, 5, 16])
def test_the_block_walk_equals_the_gather(block_size):
    """attend (online softmax over each row's blocks, in table order) == the readable attention
    over update's gathered, zero-padded keys: float64, ragged rows, GQA, a blind query row."""
    pool, batch, q, k, v, mask = ragged_layer_case(1, block_size)
    keys, values = batch.layers[0].update(k, v)
    assert not np.isnan(keys).any() and not np.isnan(values).any()  # poison never read
    expected, _ = grouped_attention(q, keys, values, mask)
    got = batch.layers[0].attend(q, k, v, mask)  # writes the same k, v to the same slots again
    np.testing.assert_allclose(got, expected, rtol=0, atol=TOL)
    assert np.abs(expected).max() > 0.1  # not two zeros agreeing


def test_the_walk_makes_no_padded_copy_of_the_rows():
    """The gather copies every row's keys and values, padded to the longest, in each layer; the
    walk holds one block per row at a time. Peak memory of one layer's call, 8 rows of 200
    tokens."""
    block_size, H_kv, d = 16, 4, 64
    pool = BlockPool(1, H_kv, d, 8 * 13 + 8, block_size, np.float64)
    pool.allocate(dict.fromkeys(range(8), 200))
    for seq in range(8):
        pool.lengths[seq] = 200
    pool.keys[...] = pool.values[...] = 0.5
    pool.filled_by = weakref.ref(shaped(H_kv, d))
    q, k, v = (np.full((8, H_kv, 1, d), 0.1) for _ in range(3))
    mask = np.ones((8, 1, 1, 208), dtype=bool)

    def call(how: str) -> None:
        batch = PagedBatch(pool, list(range(8)), [1] * 8)
        batch.commit(batch.plan(shaped(H_kv, d), 8, 1, None), shaped(H_kv, d))
        layer = batch.layers[0]
        layer.update(k, v) if how == "gather" else layer.attend(q, k, v, mask)
        batch.roll_back(None)

    padded = 2 * 8 * H_kv * 208 * d * 8  # K and V of every row, float64
    _, gather = peak_during(lambda: call("gather"))
    _, walk = peak_during(lambda: call("walk"))
    assert gather >= padded and walk < padded / 4


# --- going back ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fast", [False, True], ids=["readable", "fast"])
def test_a_failed_step_is_rolled_back_byte_for_byte(monkeypatch, fast):
    """A step that fails in the second layer, after the first wrote into a partly full block and
    a new one: the blocks it took are free again (poisoned), every slot and length as before."""
    import block
    import fast.model as fast_model

    model = small_model("mha", fast=fast)
    pool = pool_for(model, 12, 4, shuffle=3)
    prefill(model, pool, prompts_of([3, 4, 6], seed=6))
    before = pool_state(pool)
    module = fast_model if fast else block
    real, calls = (module.gelu_in_place if fast else module.mlp), {"n": 0}

    def fails_in_the_second_layer(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise MemoryError("simulated")
        return real(*args)

    monkeypatch.setattr(module, "gelu_in_place" if fast else "mlp", fails_in_the_second_layer)
    with pytest.raises(MemoryError):  # a new sequence too, which must be forgotten again
        prefill(model, pool, prompts_of([2, 1, 1, 5], seed=7), seqs=[0, 1, 2, "new"])
    assert calls["n"] == 2
    assert pool_state(pool) == before
