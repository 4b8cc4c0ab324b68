"""Prefix caching: a full block's identity is its tokens and everything before them.

Many requests start with the same tokens (a system prompt, a few-shot preamble). Their keys are
the same numbers: a token's keys depend only on the tokens up to it. So a block of block_size
tokens can be computed once and shared by every table whose sequence starts the same way.

Which blocks are "the same"? Not those holding the same tokens: block [3, 4] after [1, 2] and
block [3, 4] at the start of a prompt hold different keys (other positions, other context). A
block's identity is the whole prefix up to its end. Two ways to index that:

    chained hash   hash(parent's hash, this block's tokens): one dict lookup per block, the
                   parent's hash standing for everything before (vLLM's automatic prefix
                   caching; nano-vllm, with xxh64)
    radix tree     a tree of token sequences, a path per prefix (SGLang's RadixAttention):
                   matches to the token, frees least recently used leaves

We chain hashes: the pool shares whole blocks only, so matching to the token buys nothing, and a
dict keyed by the chained hash is a line of code per block. But a hash is not an identity: two
prefixes can collide (vLLM moved to sha256 after a collision advisory). So a hit is confirmed by
what the block really holds: its stored tokens, and a link to the block before it (that block's
serial number, which a reused slot never keeps), which was confirmed the same way. By induction
a confirmed hit holds exactly this prefix. Blocks whose hashes collide share a bucket and are
told apart by that comparison (tests/test_sharing.py's collision drill turns it off).

    logical block:    0           1           2
    tokens:        [5 1 9 9]   [2 7 7 0]   [4 4 1 .]        block_size 4, 11 tokens
    identity:      h0 = H(-, 5199)   h1 = H(h0, 2770)       only full blocks are identified

    PrefixIndex    hash -> blocks (a bucket), block -> its Identity, and the idle blocks:
                   identified blocks no table holds, least recently used first. An idle block
                   keeps its keys and stays findable until its slot is needed; then it is
                   evicted and forgets its identity (beyond/paged.py poisons it).

The pool (beyond/paged.py) counts how many tables hold each block and asks the index what to do
when a count falls to zero; the engine (beyond/serving.py) looks a prompt up at admission and
identifies every block that fills. docs/sharing.md draws it.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

Hash = Callable[[int | None, tuple[int, ...]], int]


def chained_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    """A block's hash: blake2b (64 bits) of its parent's hash and its tokens. The first block of
    a sequence has no parent (None), so the same tokens elsewhere hash otherwise."""
    h = hashlib.blake2b(digest_size=8)
    h.update(b"root" if parent is None else parent.to_bytes(8, "little"))
    h.update(np.asarray(tokens, dtype=np.int64).tobytes())
    return int.from_bytes(h.digest(), "little")


@dataclass(frozen=True)
class Identity:
    """What an identified (full) block holds: its tokens, after the block with serial
    parent_serial (None: the first block). serial is this identity's own, never reused."""

    hash: int
    tokens: tuple[int, ...]
    parent: int | None  # the physical block before it, when it was identified
    parent_serial: int | None
    serial: int


class PrefixIndex:
    """The identified blocks of one pool: found by chained hash, confirmed by their tokens and
    their parent's serial. Holds no keys; the pool does."""

    def __init__(self, block_size: int, hash_fn: Hash = chained_hash) -> None:
        self.block_size = block_size
        self.hash = hash_fn
        self.buckets: dict[int, list[int]] = {}  # hash -> identified blocks with that hash
        self.entries: dict[int, Identity] = {}  # physical block -> its identity
        self.idle: OrderedDict[int, None] = OrderedDict()  # held by no table, LRU first
        self.serials = itertools.count()
        self.hits = 0  # blocks a new table took from the index (counted by the pool)
        self.refused = 0  # lookups whose hash matched and whose comparison failed

    def confirms(self, entry: Identity, tokens: tuple[int, ...], parent_serial: int | None
                 ) -> bool:
        """The comparison that makes a hash match a hit: the same tokens, after the same block."""
        return entry.tokens == tokens and entry.parent_serial == parent_serial

    def find(self, h: int, tokens: tuple[int, ...], parent_serial: int | None) -> int | None:
        """The block with hash h that confirms, or None."""
        for block in self.buckets.get(h, ()):
            if self.confirms(self.entries[block], tokens, parent_serial):
                return block
        return None

    def chunk(self, tokens: Sequence[int], j: int) -> tuple[int, ...]:
        """Logical block j's tokens."""
        return tuple(int(t) for t in tokens[j * self.block_size:(j + 1) * self.block_size])

    def lookup(self, tokens: Sequence[int], limit: int) -> list[int]:
        """The cached blocks holding the first full blocks of `tokens`, at most `limit` of them,
        in order: block j is a hit only if block j - 1 was (a prefix, never a hole)."""
        found: list[int] = []
        parent_hash = parent_serial = None
        for j in range(limit):
            chunk = self.chunk(tokens, j)
            h = self.hash(parent_hash, chunk)
            block = self.find(h, chunk, parent_serial)
            if block is None:
                self.refused += h in self.buckets  # the hash matched, what it holds did not
                break
            found.append(block)
            parent_hash, parent_serial = h, self.entries[block].serial
        return found

    def register(self, block: int, parent: int | None, tokens: tuple[int, ...]) -> int:
        """Identify a block that just filled, after block `parent` (identified, or None for a
        first block). Returns the block that holds this identity: `block`, or an identified one
        found already (the caller keeps that one and frees its own copy)."""
        above = None if parent is None else self.entries[parent]
        parent_hash, parent_serial = (None, None) if above is None else (above.hash, above.serial)
        h = self.hash(parent_hash, tokens)
        same = self.find(h, tokens, parent_serial)
        if same is not None:
            return same
        self.entries[block] = Identity(h, tokens, parent, parent_serial, next(self.serials))
        self.buckets.setdefault(h, []).append(block)
        return block

    # --- idle blocks: no table holds them, their keys are kept -----------------------------------

    def park(self, block: int) -> None:
        """An identified block no table holds any more: idle, the most recently used."""
        self.idle[block] = None

    def unpark(self, block: int) -> None:
        """An idle block a table holds again (a hit)."""
        del self.idle[block]

    def evict(self) -> tuple[int, Identity]:
        """The least recently used idle block, its identity forgotten: its slot is needed."""
        block, _ = self.idle.popitem(last=False)
        return block, self.forget(block)

    def forget(self, block: int) -> Identity:
        entry = self.entries.pop(block)
        bucket = self.buckets[entry.hash]
        bucket.remove(block)
        if not bucket:
            del self.buckets[entry.hash]
        return entry

    def snapshot(self) -> tuple:
        """Everything, to put back after a failed step (a step that evicts is rolled back)."""
        return (dict(self.entries), {h: list(b) for h, b in self.buckets.items()},
                list(self.idle), self.hits, self.refused)

    def restore(self, state: tuple) -> None:
        entries, buckets, idle, self.hits, self.refused = state
        self.entries, self.buckets = dict(entries), {h: list(b) for h, b in buckets.items()}
        self.idle = OrderedDict.fromkeys(idle)
