"""Cascade attention: a prefix that many rows share, read once for all of them.

With prefix caching (beyond/prefix.py) 64 requests that start with one system prompt hold the
same physical blocks at the start of their tables. The block walk (PagedLayer.attend) still
reads those blocks once per row: 64 reads of the same keys, each a matrix-vector product. Read
them once instead, for every query of the group at once (one matrix-matrix product), and each
row's own blocks separately; then merge the two partial softmaxes (Hydragen, Juravsky et al.,
2024; FlashInfer's cascade attention).

The merge is the online softmax's recurrence (beyond/flash.py) applied to two partial results
instead of a partial result and a block. For one query, over two disjoint sets of keys A and B:

    part A:  m_A = max_A s_j,   l_A = sum_A exp(s_j - m_A),   acc_A = sum_A exp(s_j - m_A) v_j
    part B:  the same over B
    merged:  m = max(m_A, m_B)
             l = l_A exp(m_A - m) + l_B exp(m_B - m)
             acc = acc_A exp(m_A - m) + acc_B exp(m_B - m)           out = acc / l

an identity: each part's terms are brought to the common max by one factor. So

    out(row b) = merge( prefix part: the group's queries x the shared blocks,   once per group
                        own part:    row b's query x row b's other blocks )     once per row

A group is rows whose tables begin with the same physical blocks, full before this step (never
written again). The mask applies to both parts, so a part may see no key at all: a sliding window
may hide the whole prefix from a query, and a padding query (which sits at its row's latest
position) sees no key of its row's own blocks when the prefix ends exactly there. Such a part
stays m = -inf, l = 0, acc = 0, and the merge gives it weight exp(-inf - m) = 0 exactly, as
beyond/flash.py's rescale_factor measures from 0 while both maxima are -inf (never -inf + inf =
NaN). A query that sees nothing in either part ends with l = 0 and finish_rows gives zeros, as the
readable path does.

When it does not pay: a group of one (nothing shared), a prefix short next to each row's own
keys, or rows that each run many queries (a prefill already reads its keys once for many
queries). tools/bench_sharing.py measures it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from beyond.flash import finish_rows, fold_keys, rescale_factor, start_rows

if TYPE_CHECKING:  # the layer whose storage it reads; imported only for the hint
    from beyond.paged import PagedLayer

Partial = tuple[np.ndarray, np.ndarray, np.ndarray]  # (m, l, acc): see beyond/flash.py


def merge(a: Partial, b: Partial) -> Partial:
    """The online-softmax merge of two partial results over disjoint keys: m, l (..., 1, n),
    acc (..., n, d) each -> the partial result over both. A part that saw no visible key (m =
    -inf, l = 0, acc = 0) contributes nothing: its factor is exp(-inf) = 0, and two empty parts
    merge into an empty one (m = -inf, not NaN)."""
    (m_a, l_a, acc_a), (m_b, l_b, acc_b) = a, b
    m = np.maximum(m_a, m_b)  # (..., 1, n)
    f_a, f_b = rescale_factor(m_a, m), rescale_factor(m_b, m)  # each part to the common max
    acc = acc_a * f_a.swapaxes(-1, -2) + acc_b * f_b.swapaxes(-1, -2)  # (..., n, 1) factors
    return m, l_a * f_a + l_b * f_b, acc


def shared_prefixes(table: np.ndarray, past: np.ndarray, block_size: int
                    ) -> list[tuple[np.ndarray, int]]:
    """Groups of at least two rows that share their first s >= 1 physical blocks: [(rows, s)].
    table (B, n_blocks), past (B,) tokens each row held before the step (its blocks below past
    // block_size are full, so no row of the step writes into them)."""
    full = past // block_size  # (B,)
    by_first: dict[int, list[int]] = {}
    for b in np.flatnonzero(full > 0):
        by_first.setdefault(int(table[b, 0]), []).append(int(b))
    groups = []
    for members in by_first.values():
        if len(members) < 2:
            continue
        rows = np.array(members)
        limit = int(full[rows].min())
        same = (table[rows, :limit] == table[rows[0], :limit]).all(axis=0)  # (limit,)
        s = limit if same.all() else int(np.argmin(same))  # the first column that differs
        groups.append((rows, s))  # s >= 1: every member's first block is the same
    return groups


def attend(layer: PagedLayer, q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray
           ) -> np.ndarray:
    """PagedLayer.attend with the cascade: write k, v (B, H_kv, T, d_head); then q (B, H,
    T_q, d_head) over each group's shared blocks once, and over each row's own blocks, merged.
    mask (B, 1, T_q, t_k). Returns out (B, H, T_q, d_head), equal to the walk's (and the
    gather's) up to the order of the sums."""
    layer.write(k, v)
    pool = layer.batch.pool
    B, H, T_q, d = q.shape
    H_kv, bs = pool.n_kv_heads, pool.block_size
    G = H // H_kv
    t_k = mask.shape[-1]
    table, valid = layer.tables(t_k)
    keys, values = pool.keys[layer.i], pool.values[layer.i]  # (num_blocks, H_kv, bs, d)
    q = q.reshape(B, H_kv, G, T_q, d)  # (B, H, T_q, d) -> (B, H_kv, G, T_q, d)
    q_t = (q * (1.0 / math.sqrt(d))).swapaxes(-1, -2)  # scaled, -> (B, H_kv, G, d, T_q)

    # 1. each group's prefix, read once: every query of the group against the shared blocks
    groups = shared_prefixes(table, layer.batch.past, bs)
    start = np.zeros(B, dtype=np.int64)  # each row's first block of its own
    prefix_parts = []
    for rows, s in groups:
        shared = table[rows[0], :s]  # (s,) physical blocks
        # (s, H_kv, bs, d) -> (H_kv, s, bs, d) -> (H_kv, s * bs, d): the prefix, one copy
        k_p = keys[shared].transpose(1, 0, 2, 3).reshape(H_kv, s * bs, d)
        v_p = values[shared].transpose(1, 0, 2, 3).reshape(H_kv, s * bs, d)
        n = len(rows) * G * T_q
        # (r, H_kv, G, d, T_q) -> (H_kv, d, r, G, T_q) -> (H_kv, d, n): all queries as columns
        q_g = q_t[rows].transpose(1, 3, 0, 2, 4).reshape(H_kv, d, n)
        seen = mask[rows][:, 0, :, :s * bs]  # (r, T_q, s * bs): which prefix keys each query sees
        visible = None if seen.all() else np.broadcast_to(  # usually all: no mask to apply
            seen[:, None], (len(rows), G, T_q, s * bs)).reshape(n, s * bs)  # as q_g's columns
        m, denom, acc = fold_keys(*start_rows((H_kv,), n, d, q.dtype), q_g, k_p, v_p, visible)
        # back to rows: m, l (H_kv, 1, n) -> (H_kv, 1, r, G, T_q) -> (r, H_kv, G, 1, T_q)
        m, denom = (x.reshape(H_kv, 1, len(rows), G, T_q).transpose(2, 0, 3, 1, 4)
                    for x in (m, denom))
        acc = acc.reshape(H_kv, len(rows), G, T_q, d).transpose(1, 0, 2, 3, 4)  # (r, H_kv, ..)
        prefix_parts.append((rows, (m, denom, acc)))
        start[rows] = s
        pool.blocks_read += s

    # 2. each row's own blocks: the walk, from the row's first own block (a row in no group
    #    walks every column, as PagedLayer.attend does; a grouped one stops at its last block)
    m, denom, acc = start_rows((B, H_kv, G), T_q, d, q.dtype)
    for j in range(t_k // bs):
        need = (j >= start) & ((start == 0) | (table[:, j] >= 0))  # (B,)
        if not need.any():
            continue
        r = slice(None) if need.all() else np.flatnonzero(need)
        cols = slice(j * bs, (j + 1) * bs)
        held = valid[r, None, cols, None]  # (b, 1, bs, 1): slots of block j with a token
        blocks = np.maximum(table[r, j], 0)  # (b,)
        k_j = np.where(held, keys[blocks], 0.0)[:, :, None]  # (b, H_kv, 1, bs, d)
        v_j = np.where(held, values[blocks], 0.0)[:, :, None]
        visible = mask[r][:, :, None, :, cols]  # (b, 1, T_q, bs) -> (b, 1, 1, T_q, bs)
        m[r], denom[r], acc[r] = fold_keys(m[r], denom[r], acc[r], q_t[r], k_j, v_j, visible)
        pool.blocks_read += int(need.sum())

    # 3. merge each group's prefix part into its rows' own parts
    for rows, part in prefix_parts:
        m[rows], denom[rows], acc[rows] = merge(part, (m[rows], denom[rows], acc[rows]))
    out = finish_rows(denom, acc)  # (B, H_kv, G, T_q, d)
    return out.reshape(B, H, T_q, d)  # (B, H_kv, G, T_q, d) -> (B, H, T_q, d)
