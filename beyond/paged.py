"""A paged KV cache: the keys and values of many sequences in one pool of fixed-size blocks.

A full KVCache reserves max_seq_len columns for every row, used or not. Here memory is handed
out the way an operating system hands out pages (PagedAttention, Kwon et al., SOSP 2023):

    BlockPool   per layer, num_blocks physical blocks of block_size token slots, K and V each:
                keys (n_layers, num_blocks, H_kv, block_size, d_head). A free list, and per
                sequence a block table (its logical block j lives in physical block table[j])
                and its length. A sequence takes a new block only when its last one is full,
                so it wastes less than one block; a finished sequence gives its blocks back.
                A freed block is filled with NaN (poison): a read of a slot that holds nothing
                cannot pass silently.
    PagedBatch  one model call over some of the pool's sequences, keeping cache.py's protocol.
                Row b is sequence seq_ids[b], with new[b] real new tokens, right-aligned in the
                (B, T) ids (left padding before them). Its keys come back in logical-slot order:
                column s of row b holds position s while s < that row's length, else nothing.
    PagedLayer  one layer of that call: update(k, v) writes the new tokens into their blocks and
                returns every row's keys gathered through its table, zero-padded (the readable
                path); attend(q, k, v, mask) writes them and walks the blocks with the online
                softmax of beyond/flash.py, never making that padded copy (the fast path).

    logical block:   0      1      2           row "A", 10 tokens, block_size 4
    table[A]:        7      2      5           physical blocks, in any order
    slots:        [AAAA] [AAAA] [AA..]         the last block partly full; '..' is never read

Only slots a sequence has written may be read. The gather zeroes the rest; the walk zeroes them
before they meet a score or a weight (a masked NaN would still poison weights @ v: 0 * NaN is NaN).

Sharing (docs/sharing.md). A block may sit in several tables: refs[p] counts them. fork(seq,
child) gives a child every block of seq, the partly full last one included; the first of them to
append into a shared, partly full block copies it first (copy-on-write), so no one else's keys
change. With prefix_caching the pool keeps a PrefixIndex (beyond/prefix.py): share(seq, blocks)
starts a table with cached full blocks, identify(seq, tokens) names the blocks that filled, and
a block whose count falls to zero stays cached, keys and all, until its slot is needed. Only a
block that is really freed is poisoned.
The engine that schedules requests onto the pool is beyond/serving.py; docs/serving.md draws it.
"""

from __future__ import annotations

import math
import weakref
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from beyond import cascade
from beyond.flash import finish_rows, fold_keys, start_rows
from beyond.prefix import PrefixIndex
from cache import CACHE_DTYPES, EMPTY, Step, number_tokens
from parts.checks import fits_in_memory, float_dtype, int_array, is_int, positive_int

BLOCK_SIZE = 16  # tokens per block, vLLM's default


class PoolFullError(ValueError):
    """A step needs more free blocks than the pool has; nothing was allocated. The engine
    never lets it happen (it preempts first); a caller driving the pool itself sees it."""


@dataclass
class Allocation:
    """What one allocate changed, in order, so that undo can put every count back: tables made,
    blocks taken (from the free list, or evicted from the cache with what they held) and
    copy-on-write copies."""

    got: dict[object, list[int]] = field(default_factory=dict)  # seq -> blocks appended
    made: list[object] = field(default_factory=list)  # sequences this allocation gave a table
    copies: list[tuple[object, int, int]] = field(default_factory=list)  # (seq, shared, copy)
    taken: list[int] = field(default_factory=list)  # every block taken, in order
    evicted: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    index_state: tuple | None = None  # the prefix index before its first eviction


# --- the pool ------------------------------------------------------------------------------------

class BlockPool:
    """Physical blocks of K/V for every layer, a free list, and a block table and length per
    sequence (sequences are named by any hashable id; the engine uses its request ids)."""

    def __init__(
        self, n_layers: int, n_kv_heads: int, d_head: int, num_blocks: int,
        block_size: int = BLOCK_SIZE, dtype: np.dtype | type | str = np.float32,
        shuffle: int | None = None, poison: bool = True, prefix_caching: bool = False,
    ) -> None:
        """Both arrays allocated here, (n_layers, num_blocks, H_kv, block_size, d_head) each.
        shuffle: a seed to shuffle the free list, so that tables come out non-monotonic (the
        outputs must not change); poison: fill free blocks with NaN (off: zeros);
        prefix_caching: keep a PrefixIndex, and keep identified blocks cached when no table
        holds them. Checks its arguments."""
        shape = tuple(positive_int(f"BlockPool {name}", value) for name, value in (
            ("n_layers", n_layers), ("num_blocks", num_blocks), ("n_kv_heads", n_kv_heads),
            ("block_size", block_size), ("d_head", d_head)))
        dtype = float_dtype("BlockPool dtype", dtype, CACHE_DTYPES)
        if shuffle is not None and (not is_int(shuffle) or shuffle < 0):
            raise ValueError(f"BlockPool shuffle must be None or a seed (an int >= 0), got "
                             f"{shuffle!r}")
        if not isinstance(poison, bool):
            raise TypeError(f"BlockPool poison must be True or False, got {poison!r}")
        if not isinstance(prefix_caching, bool):
            raise TypeError(f"BlockPool prefix_caching must be True or False, got "
                            f"{prefix_caching!r}")
        fits_in_memory(f"BlockPool {shape} x 2 ({dtype.name})",
                       2 * math.prod(shape) * dtype.itemsize)
        self.poison = poison
        empty = np.nan if poison else 0.0
        self.keys = np.full(shape, empty, dtype)  # (L, num_blocks, H_kv, block_size, d_head)
        self.values = np.full(shape, empty, dtype)
        order = np.arange(shape[1])[::-1]  # popped from the end: block 0 first
        if shuffle is not None:
            order = np.random.default_rng(shuffle).permutation(shape[1])
        self.free = [int(p) for p in order]  # free physical blocks; the next one is the last
        self.tables: dict[object, list[int]] = {}  # sequence -> its physical blocks, in order
        self.lengths: dict[object, int] = {}  # sequence -> tokens written
        self.refs = [0] * shape[1]  # how many tables hold each block
        self.index = PrefixIndex(shape[3]) if prefix_caching else None
        self.peak = 0  # the most blocks ever in use at once
        self.copies = 0  # copy-on-write copies made
        self.blocks_read = 0  # blocks of keys and values the attend hooks read (all layers)
        self.filled_by: weakref.ref | None = None  # the model whose keys it holds

    @property
    def n_layers(self) -> int:
        return self.keys.shape[0]

    @property
    def num_blocks(self) -> int:
        return self.keys.shape[1]

    @property
    def n_kv_heads(self) -> int:
        return self.keys.shape[2]

    @property
    def block_size(self) -> int:
        return self.keys.shape[3]

    @property
    def d_head(self) -> int:
        return self.keys.shape[4]

    @property
    def idle(self) -> int:
        """Cached blocks no table holds: their keys kept, their slots taken when needed."""
        return 0 if self.index is None else len(self.index.idle)

    @property
    def available(self) -> int:
        """Blocks a step may take: the free ones, and the idle cached ones (evicted if taken)."""
        return len(self.free) + self.idle

    @property
    def blocks_in_use(self) -> int:
        """Blocks some table holds (each counted once, however many tables share it)."""
        return self.num_blocks - self.available

    @property
    def tokens_cached(self) -> int:
        return sum(self.lengths.values())

    def __repr__(self) -> str:
        return (f"BlockPool({self.num_blocks} blocks of {self.block_size}, {self.blocks_in_use} "
                f"in use by {len(self.tables)} sequences, {self.tokens_cached} tokens)")

    def blocks_for(self, tokens: int) -> int:
        """Blocks a sequence of `tokens` tokens holds: ceil(tokens / block_size)."""
        return -(-tokens // self.block_size)

    def blocks_needed(self, seq: object, new: int) -> int:
        """How many more blocks sequence `seq` (new or held) needs for `new` more tokens."""
        return self.blocks_needed_all({seq: new})

    def blocks_needed_all(self, wants: dict[object, int]) -> int:
        """How many blocks allocate(wants) takes: each sequence's new blocks, and a copy for each
        one that appends into a shared, partly full last block (in order: once all but one
        sharer have copied, the last writes in place)."""
        dropped: Counter[int] = Counter()  # sharers that copied away from a block, so far
        total = 0
        for seq, n in wants.items():
            table, length = self.tables.get(seq, []), self.lengths.get(seq, 0)
            total += self.blocks_for(length + n) - len(table)
            if n and length % self.block_size and self.refs[table[-1]] - dropped[table[-1]] > 1:
                total += 1
                dropped[table[-1]] += 1
        return total

    def must_copy(self, seq: object, new: int) -> bool:
        """Copy-on-write: seq appends into its last block, which is partly full and shared."""
        table = self.tables.get(seq)
        return bool(new and table and self.lengths[seq] % self.block_size
                    and self.refs[table[-1]] > 1)

    # --- taking and giving back blocks -----------------------------------------------------------

    def allocate(self, wants: dict[object, int]) -> Allocation:
        """Give each sequence the blocks it needs for wants[seq] more tokens (a new sequence gets
        a table), copying a shared, partly full last block first (copy-on-write), all or
        nothing: PoolFullError, with every table, count and list as they were, if the free and
        idle blocks do not cover them all. Returns what it did, for undo."""
        need = self.blocks_needed_all(wants)
        if need > self.available:
            raise PoolFullError(f"{need} blocks needed, {self.available} free")
        done = Allocation()
        for seq, n in wants.items():
            if seq not in self.tables:
                self.tables[seq], self.lengths[seq] = [], 0
                done.made.append(seq)
            table = self.tables[seq]
            if self.must_copy(seq, n):  # the others keep the block as it is
                shared, copy = table[-1], self.take(done)
                self.keys[:, copy], self.values[:, copy] = self.keys[:, shared], self.values[
                    :, shared]
                table[-1] = copy
                self.refs[shared] -= 1
                done.copies.append((seq, shared, copy))
                self.copies += 1
            done.got[seq] = [self.take(done) for _ in range(self.blocks_for(
                self.lengths[seq] + n) - len(table))]
            table.extend(done.got[seq])
        self.peak = max(self.peak, self.blocks_in_use)
        return done

    def take(self, done: Allocation) -> int:
        """One block for a table: a free one, else the least recently used idle cached one,
        which forgets its identity and is poisoned (what it held kept in `done`, for undo)."""
        if self.free:
            block = self.free.pop()
        else:
            if done.index_state is None:
                done.index_state = self.index.snapshot()
            block, _ = self.index.evict()
            done.evicted[block] = (self.keys[:, block].copy(), self.values[:, block].copy())
            self.poison_blocks([block])
        self.refs[block] = 1
        done.taken.append(block)
        return block

    def undo(self, done: Allocation) -> None:
        """Put back what allocate did, in reverse: tables, counts, copies, the free list in its
        order, evicted blocks with their keys and identities."""
        for seq, blocks in reversed(done.got.items()):
            del self.tables[seq][len(self.tables[seq]) - len(blocks):]
        for seq, shared, _ in reversed(done.copies):
            self.tables[seq][-1] = shared
            self.refs[shared] += 1
            self.copies -= 1
        for seq in done.made:
            del self.tables[seq], self.lengths[seq]
        for block in reversed(done.taken):
            self.refs[block] = 0
            if block in done.evicted:
                self.keys[:, block], self.values[:, block] = done.evicted[block]
            else:
                self.give_back([block])
        if done.index_state is not None:
            self.index.restore(done.index_state)

    def release(self, seq: object) -> None:
        """A finished or cancelled sequence: its table and length forgotten, each of its blocks
        held by one table fewer. A block no table holds any more is freed (poisoned), or, if the
        prefix index knows it, stays cached (idle), its keys kept. The last block is let go
        first, so a cached prefix outlives its tails (least recently used goes first)."""
        table = self.tables.pop(seq)
        del self.lengths[seq]
        freed = []
        for block in reversed(table):
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if self.index is not None and block in self.index.entries:
                    self.index.park(block)
                else:
                    freed.append(block)
        self.give_back(freed[::-1])
        if not self.tables and not self.idle:  # cached blocks still hold the model's keys
            self.filled_by = None

    # --- sharing ---------------------------------------------------------------------------------

    def fork(self, seq: object, child: object) -> None:
        """A new sequence `child` holding every block of `seq` (each held by one table more),
        the partly full last one included: nothing is copied until one of them appends."""
        if child in self.tables:
            raise ValueError(f"BlockPool.fork: sequence {child!r} already has a table")
        self.tables[child] = list(self.tables[seq])
        self.lengths[child] = self.lengths[seq]
        for block in self.tables[child]:
            self.refs[block] += 1

    def share(self, seq: object, blocks: list[int]) -> None:
        """A new sequence whose first len(blocks) blocks are these cached full ones (a prefix
        hit): each held by one table more, an idle one no longer idle."""
        if seq in self.tables:
            raise ValueError(f"BlockPool.share: sequence {seq!r} already has a table")
        for block in blocks:
            if self.refs[block] == 0:
                self.index.unpark(block)
            self.refs[block] += 1
        self.tables[seq], self.lengths[seq] = list(blocks), len(blocks) * self.block_size
        self.index.hits += len(blocks)
        self.peak = max(self.peak, self.blocks_in_use)

    def identify(self, seq: object, tokens: np.ndarray) -> None:
        """Name every full block of seq not named yet (tokens: its sequence, at least its
        length), in order. A block whose identity another block holds already is swapped for
        that one and freed: one copy of a prefix however many computed it (two identical prompts
        admitted in one step)."""
        table, full = self.tables[seq], self.lengths[seq] // self.block_size
        first = full
        while first > 0 and table[first - 1] not in self.index.entries:  # named: a prefix
            first -= 1
        for j in range(first, full):
            block = table[j]
            same = self.index.register(block, table[j - 1] if j else None,
                                       self.index.chunk(tokens, j))
            if same != block and self.refs[block] == 1:  # keep the cached one, free ours
                if self.refs[same] == 0:
                    self.index.unpark(same)
                self.refs[same] += 1
                table[j] = same
                self.refs[block] = 0
                self.give_back([block])

    def give_back(self, blocks: list[int]) -> None:
        """Blocks back on the free list, poisoned, so that whatever they held can never be read
        as a key again."""
        self.poison_blocks(blocks)
        self.free.extend(reversed(blocks))  # the last given back is the next taken

    def poison_blocks(self, blocks: list[int]) -> None:
        """Fill blocks with NaN (or zeros without poison) in every layer."""
        if blocks:
            self.keys[:, blocks] = np.nan if self.poison else 0.0
            self.values[:, blocks] = np.nan if self.poison else 0.0

    # --- where a sequence's tokens are -----------------------------------------------------------

    def slots(self, seq: object, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Physical block and offset of the tokens start .. start + n - 1 of sequence seq:
        (n,) each. Its logical block is the token's index // block_size, found in its table."""
        index = np.arange(start, start + n)
        table = np.asarray(self.tables[seq], dtype=np.int64)
        return table[index // self.block_size], index % self.block_size

    def table_array(self, seqs: list[object], n_blocks: int) -> np.ndarray:
        """The tables of seqs as one (B, n_blocks) array, -1 past a sequence's last block."""
        out = np.full((len(seqs), n_blocks), -1, dtype=np.int64)
        for b, seq in enumerate(seqs):
            table = self.tables[seq]
            out[b, :len(table)] = table
        return out

    def sequence_keys(self, seq: object, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """One sequence's keys and values in one layer, read through its table, in time order:
        (H_kv, length, d_head) each (copies; for tests and pictures)."""
        n = self.lengths[seq]
        blocks, offsets = self.slots(seq, 0, n)
        # advanced indices around a slice: (n,) and (n,) -> (n, H_kv, d_head)
        k, v = self.keys[layer, blocks, :, offsets], self.values[layer, blocks, :, offsets]
        return k.transpose(1, 0, 2), v.transpose(1, 0, 2)  # (n, H_kv, d) -> (H_kv, n, d)


# --- one model call over some of the pool's sequences --------------------------------------------

class PagedBatch:
    """The cache of one model call: rows are the pool's sequences seq_ids, row b bringing new[b]
    real tokens, right-aligned in the call's (B, T) ids. Keeps cache.py's protocol (plan,
    commit, layers[i].update or attend, roll_back); built afresh for every call."""

    def __init__(self, pool: BlockPool, seq_ids: list[object], new: np.ndarray | list[int],
                 cascade: bool = False) -> None:
        """seq_ids: distinct sequences (held by the pool, or new ones); new (B,) >= 1 each;
        cascade: the attend hook reads a prefix that rows share once for all of them
        (beyond/cascade.py) instead of once per row."""
        if not isinstance(pool, BlockPool):
            raise TypeError(f"PagedBatch: pool must be a BlockPool, got {type(pool).__name__}")
        if not isinstance(seq_ids, list) or not seq_ids:
            raise TypeError(f"PagedBatch: seq_ids must be a non-empty list, got {seq_ids!r:.60}")
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"PagedBatch: seq_ids must be distinct, got {seq_ids}")
        new = int_array("PagedBatch new", new, 1)
        if new.shape != (len(seq_ids),) or (new < 1).any():
            raise ValueError(f"PagedBatch: new must hold one count >= 1 per sequence "
                             f"({len(seq_ids)}), got {new.tolist()}")
        if not isinstance(cascade, bool):
            raise TypeError(f"PagedBatch: cascade must be True or False, got {cascade!r}")
        self.pool, self.seq_ids, self.new, self.cascade = pool, list(seq_ids), new, cascade
        self.layers = [PagedLayer(self, i) for i in range(pool.n_layers)]
        self.past = np.array([pool.lengths.get(s, 0) for s in seq_ids])  # (B,) tokens held
        self.writes: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
        self.t_k = 0  # key columns the layers return, set by commit from the step
        self.undo: dict | None = None  # what commit changed, for roll_back

    # --- the protocol ----------------------------------------------------------------------------

    def plan(self, model: object, B: int, T: int, attention_mask: np.ndarray | None = None
             ) -> Step:
        """Number each row's new tokens from that row's own length (ragged rows), and say where
        every key sits: t_k = the most blocks any row will hold x block_size columns, column s
        of row b holding position s while s < that row's length after the step, else EMPTY.
        Refused (ValueError): another model's shape, dtype or keys, another batch size, more
        new tokens than T, an attention_mask (the batch knows its real tokens), more blocks
        than are free (PoolFullError). Changes nothing."""
        self.check_model(model)
        if attention_mask is not None:
            raise ValueError("PagedBatch: attention_mask must be None: each row's real new tokens "
                             "are the last new[b] of the call, as the batch was built")
        if B != len(self.seq_ids) or T < int(self.new.max()):
            raise ValueError(f"PagedBatch: a call of {B} rows x {T} tokens cannot bring "
                             f"{self.new.tolist()} new tokens to {len(self.seq_ids)} sequences")
        real = np.arange(T) >= T - self.new[:, None]  # (T,) vs (B, 1) -> (B, T): right-aligned
        positions, _ = number_tokens(self.past, real)  # past + cumsum(real) - 1
        need = self.pool.blocks_needed_all(dict(zip(self.seq_ids, self.new.tolist(),
                                                    strict=True)))
        if need > self.pool.available:
            raise PoolFullError(f"PagedBatch: the step needs {need} new blocks, "
                                f"{self.pool.available} are free")
        after = self.past + self.new  # (B,) tokens each row holds after the step
        t_k = int(self.pool.blocks_for(after).max()) * self.pool.block_size
        slot = np.arange(t_k)  # (t_k,) logical slots, in the order the layers return them
        key_positions = np.where(slot < after[:, None], slot, EMPTY)  # (B, t_k)
        return Step(real, positions, key_positions)

    def check_model(self, model: object) -> None:
        """Refuse a model whose layers, K/V shape or dtype the pool was not built for, or a
        model other than the one whose keys the pool holds."""
        pool, c = self.pool, model.config
        if (pool.n_layers, pool.n_kv_heads, pool.d_head) != (c.n_layers, *model.kv_shape):
            raise ValueError(f"GPT: the block pool holds (layers, H_kv, d_head) = "
                             f"{(pool.n_layers, pool.n_kv_heads, pool.d_head)}, this model needs "
                             f"{(c.n_layers, *model.kv_shape)}")
        if pool.keys.dtype != model.dtype:
            raise ValueError(f"GPT: the block pool is {pool.keys.dtype}, the model "
                             f"{model.dtype}")
        owner = None if pool.filled_by is None else pool.filled_by()
        if (pool.tables or pool.idle) and owner is not model:
            raise ValueError("GPT: the block pool holds keys and values this model did not "
                             "compute")

    def commit(self, step: Step, model: object) -> None:
        """Take the blocks the step needs (all or nothing) and record where each real new token
        goes: row b's token t -> (physical block, offset)."""
        pool = self.pool
        done = pool.allocate(dict(zip(self.seq_ids, self.new.tolist(), strict=True)))
        self.undo = {"allocation": done, "layers": {}, "filled_by": pool.filled_by}
        T, self.t_k = step.real.shape[1], step.key_positions.shape[1]
        rows, cols, blocks, offsets = [], [], [], []
        for b, seq in enumerate(self.seq_ids):
            n = int(self.new[b])
            where = pool.slots(seq, int(self.past[b]), n)
            rows.append(np.full(n, b))
            cols.append(np.arange(T - n, T))  # the row's last n columns: its real tokens
            blocks.append(where[0])
            offsets.append(where[1])
            pool.lengths[seq] += n
        self.writes = tuple(np.concatenate(a) for a in (rows, cols, blocks, offsets))
        pool.filled_by = weakref.ref(model)

    def roll_back(self, step: Step) -> None:
        """Undo the committed step exactly: every slot a layer overwrote as it was, every length
        as it was, then the allocation (blocks taken back on the free list, poisoned, as they
        were; copies undone; evicted blocks cached again, keys and all)."""
        pool, undo = self.pool, self.undo
        if undo is None:
            return
        _, _, blocks, offsets = self.writes
        for i, (old_k, old_v) in undo["layers"].items():
            pool.keys[i, blocks, :, offsets], pool.values[i, blocks, :, offsets] = old_k, old_v
        for b, seq in enumerate(self.seq_ids):
            pool.lengths[seq] = int(self.past[b])
        pool.undo(undo["allocation"])  # a sequence this step brought: forgotten again
        pool.filled_by = undo["filled_by"]
        self.undo = self.writes = None


class PagedLayer:
    """Layer i of a PagedBatch: cache.LayerCache's update, and the optional attend hook."""

    def __init__(self, batch: PagedBatch, i: int) -> None:
        self.batch, self.i = batch, i
        self.n_kv_heads, self.d_head = batch.pool.n_kv_heads, batch.pool.d_head

    def write(self, k: np.ndarray, v: np.ndarray) -> None:
        """The step's real new tokens into their slots: k, v (B, H_kv, T, d_head). What they
        overwrite is kept until the step ends, for a roll-back."""
        pool, batch = self.batch.pool, self.batch
        rows, cols, blocks, offsets = batch.writes
        keys, values = pool.keys[self.i], pool.values[self.i]  # (num_blocks, H_kv, bs, d)
        # advanced indices around a slice: (n,) blocks and offsets -> (n, H_kv, d_head)
        batch.undo["layers"][self.i] = (keys[blocks, :, offsets], values[blocks, :, offsets])
        keys[blocks, :, offsets] = k[rows, :, cols]  # (n, H_kv, d): row b's token t
        values[blocks, :, offsets] = v[rows, :, cols]

    def tables(self, t_k: int) -> tuple[np.ndarray, np.ndarray]:
        """Every row's table (B, t_k // block_size), -1 past its blocks, and which of its t_k
        logical slots hold a token (B, t_k)."""
        batch = self.batch
        bs = batch.pool.block_size
        table = batch.pool.table_array(batch.seq_ids, t_k // bs)
        valid = np.arange(t_k) < (batch.past + batch.new)[:, None]  # (t_k,) vs (B, 1)
        return table, valid

    def update(self, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """k, v (B, H_kv, T, d_head) -> keys, values (B, H_kv, t_k, d_head): the new tokens
        written, then every row's keys gathered through its table in logical-slot order, zeros
        where a row holds no token (never a stale or poisoned slot)."""
        self.write(k, v)
        pool, B, t_k = self.batch.pool, len(self.batch.seq_ids), self.batch.t_k
        table, valid = self.tables(t_k)
        out = []
        for store in (pool.keys[self.i], pool.values[self.i]):
            rows = store[np.maximum(table, 0)]  # (B, n_blocks) -> (B, n_blocks, H_kv, bs, d)
            rows = rows.transpose(0, 2, 1, 3, 4)  # -> (B, H_kv, n_blocks, bs, d)
            rows = rows.reshape(B, pool.n_kv_heads, t_k, pool.d_head)  # -> (B, H_kv, t_k, d)
            out.append(np.where(valid[:, None, :, None], rows, 0.0))  # only written slots
        return out[0], out[1]

    def attend(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray
               ) -> np.ndarray:
        """The fast path's hook: write k, v (B, H_kv, T, d_head), then attend q (B, H, T_q,
        d_head) over every row's blocks with the online softmax, one logical block at a time
        (block j's columns of mask (B, 1, T_q, t_k) are j * bs .. (j + 1) * bs - 1). Returns
        out (B, H, T_q, d_head); no padded copy of the rows' keys is made."""
        if self.batch.cascade:
            return cascade.attend(self, q, k, v, mask)
        self.write(k, v)
        pool = self.batch.pool
        B, H, T_q, d = q.shape
        H_kv, bs = pool.n_kv_heads, pool.block_size
        t_k = mask.shape[-1]
        table, valid = self.tables(t_k)
        q = q.reshape(B, H_kv, H // H_kv, T_q, d)  # (B, H, T_q, d) -> (B, H_kv, G, T_q, d)
        q_t = (q * (1.0 / math.sqrt(d))).swapaxes(-1, -2)  # scaled, -> (B, H_kv, G, d, T_q)
        m, denom, acc = start_rows(q.shape[:3], T_q, d, q.dtype)
        keys, values = pool.keys[self.i], pool.values[self.i]  # (num_blocks, H_kv, bs, d)
        for j in range(t_k // bs):
            cols = slice(j * bs, (j + 1) * bs)
            held = valid[:, None, cols, None]  # (B, 1, bs, 1): slots of block j with a token
            blocks = np.maximum(table[:, j], 0)  # (B,): row b's physical block j (any, if none)
            k_j = np.where(held, keys[blocks], 0.0)[:, :, None]  # (B, H_kv, 1, bs, d)
            v_j = np.where(held, values[blocks], 0.0)[:, :, None]
            visible = mask[:, :, None, :, cols]  # (B, 1, T_q, bs) -> (B, 1, 1, T_q, bs)
            m, denom, acc = fold_keys(m, denom, acc, q_t, k_j, v_j, visible)
        pool.blocks_read += B * (t_k // bs)  # every row reads every one of its blocks
        out = finish_rows(denom, acc)  # (B, H_kv, G, T_q, d)
        return out.reshape(B, H, T_q, d)  # (B, H_kv, G, T_q, d) -> (B, H, T_q, d)
