"""Online-softmax ("Flash") attention: the readable attention's output, without its weights.

attention.scaled_dot_product_attention forms every score of a call, (..., t_q, t_k), then
normalises each row. Here the keys are read in blocks of `block_size`, and each query row keeps
three running numbers instead of a row of weights. For one row with scores s_j (a hidden key's
score is NEG_INF = -inf, as in the readable path):

    m   = the largest score seen so far                      (starts at -inf)
    l   = sum over the keys seen of exp(s_j - m)             (starts at 0)
    acc = sum over the keys seen of exp(s_j - m) * v_j       (starts at 0, one d_v vector)

A block of keys B whose scores raise the max to m' = max(m, max_B s_j) turns every earlier
term exp(s_j - m) into exp(s_j - m') = exp(s_j - m) * exp(m - m'): one factor for the whole sum,
so

    l'   = l   * exp(m - m') + sum_B exp(s_j - m')
    acc' = acc * exp(m - m') + sum_B exp(s_j - m') * v_j

This is an identity, not an approximation. After the last block m is the row's max, l is the
softmax's denominator and acc / l is the readable path's output row, up to the order in which
the terms were added (float64: 1e-15). exp(m - m') <= 1 because m' >= m, so nothing overflows, and
the first block's factor is exp(-inf) = 0. A hidden key adds exp(-inf - m') = 0 exactly. While a
row has seen only hidden keys, m' is -inf: it subtracts 0 instead (every term exp(-inf) = 0, not
exp(-inf + inf) = NaN), and a row that never sees a key ends with l = 0 and acc = 0, divided by 1:
zeros, as in the readable path. The online softmax is Milakov and Gimelshein (2018);
computing attention this way in tiles that fit a GPU's on-chip SRAM is FlashAttention (Dao et al.,
2022). docs/flash.md has the picture and the measurements (`python tools/flash.py --show`,
`--bench`).

Extra memory is O(t_q): the output, plus per query tile of block_size rows the (tile, block)
scores and m, l, acc; never a (t_q, t_k) array.
"""

from __future__ import annotations

import math

import numpy as np

from attention import NEG_INF, check_attention_inputs
from parts.checks import positive_int

BLOCK_SIZE = 128  # query rows per tile and keys per block (measured: docs/flash.md)


# --- the recurrence ------------------------------------------------------------------------------

def shift(m: np.ndarray) -> np.ndarray:
    """What a row's terms are measured from: its running max m, or 0 while m is -inf (the row has
    seen only hidden keys), so that exp(-inf - shift) is 0 rather than exp(-inf + inf) = NaN."""
    return np.where(m == -np.inf, 0, m)


def rescale_factor(m_old: np.ndarray, m_new: np.ndarray) -> np.ndarray:
    """exp(m_old - m_new): what every earlier term is multiplied by when the max rises from m_old
    to m_new. At most 1, since m_new >= m_old; exactly 1 when the block did not raise it (0 while
    both are -inf: there is nothing to rescale yet)."""
    return np.exp(m_old - shift(m_new))


def online_softmax_step(m: np.ndarray, denom: np.ndarray, acc: np.ndarray,
                        scores: np.ndarray, v: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fold one block of b keys into the running (m, l, acc) of n query rows; l is called denom
    here (the running denominator).

    scores (..., b, n) hold one COLUMN per query (scaled and masked; overwritten): NumPy reduces
    across rows (an elementwise max or sum of whole rows) several times faster than along each
    short row. m, denom (..., 1, n), acc (..., n, d_v), v (..., b, d_v) -> the new m, denom, acc;
    acc is updated in place.
    """
    m_new = np.maximum(m, scores.max(axis=-2, keepdims=True))  # (..., 1, n)
    rescale = rescale_factor(m, m_new)  # (..., 1, n): brings the old terms to the new max
    scores -= shift(m_new)
    p = np.exp(scores, out=scores)  # (..., b, n): exp(s_j - m_new) <= 1, in the scores' place
    denom = denom * rescale + p.sum(axis=-2, keepdims=True)
    acc *= rescale.swapaxes(-1, -2)  # (..., 1, n) -> (..., n, 1): one factor per query row
    acc += p.swapaxes(-1, -2) @ v  # (..., n, b) @ (..., b, d_v) -> (..., n, d_v)
    return m_new, denom, acc


# --- attention in tiles --------------------------------------------------------------------------

def flash_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None = None,
                    block_size: int = BLOCK_SIZE) -> np.ndarray:
    """attention.scaled_dot_product_attention(q, k, v, mask)[0], one block of keys at a time.

    q (..., t_q, d), k (..., t_k, d), v (..., t_k, d_v), one float dtype; mask bool, broadcastable
    to (..., t_q, t_k), True = may attend. Returns out (..., t_q, d_v) in v's dtype, and never the
    weights: queries go in tiles of block_size rows, keys in blocks of block_size, and only a
    (tile, block) array of scores exists at a time. float16 is computed in float32, as the
    readable path does. Checks its own arguments (as the readable path does, and block_size).
    """
    check_attention_inputs(q, k, v, mask, "flash_attention")
    block_size = positive_int("flash_attention block_size", block_size)
    return attention_in_tiles(q, k, v, mask, block_size)


def attention_in_tiles(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None,
                       block_size: int) -> np.ndarray:
    """flash_attention without the checks, for a caller that has checked the call already (the
    engine's model entry does): the tiles over the queries, each walking its key blocks."""
    dtype = v.dtype
    q, k, v = (a.astype(np.result_type(a, np.float32), copy=False) for a in (q, k, v))
    t_q, t_k = q.shape[-2], k.shape[-2]
    q = q * (1.0 / math.sqrt(q.shape[-1]))  # scale the t_q x d queries, not every score
    if mask is not None:  # a view with the full (t_q, t_k) axes (stride 0 where it had size 1)
        mask = np.broadcast_to(mask, (*mask.shape[:-2], t_q, t_k))
    lead = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    out = np.empty((*lead, t_q, v.shape[-1]), dtype)
    for start in range(0, t_q, block_size):
        rows = slice(start, start + block_size)
        tile_mask = None if mask is None else mask[..., rows, :]
        out[..., rows, :] = attend_tile(q[..., rows, :], k, v, tile_mask, block_size, lead)
    return out


def attend_tile(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None,
                block_size: int, lead: tuple[int, ...]) -> np.ndarray:
    """One tile of (scaled) queries q (..., n, d) against the key blocks it needs: returns
    acc / l, its output rows (..., n, d_v). mask (..., n, t_k) or None."""
    m, denom, acc = start_rows(lead, q.shape[-2], v.shape[-1], q.dtype)
    q_t = q.swapaxes(-1, -2)  # (..., n, d) -> (..., d, n): a view, BLAS reads it transposed
    for keys, partly_hidden in key_blocks(mask, k.shape[-2], block_size):
        visible = mask[..., keys] if partly_hidden else None
        m, denom, acc = fold_keys(m, denom, acc, q_t, k[..., keys, :], v[..., keys, :], visible)
    return finish_rows(denom, acc)


def start_rows(lead: tuple[int, ...], n: int, d_v: int, dtype: np.dtype
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The running (m, l, acc) of n query rows before any key: m (..., 1, n) = -inf, l (..., 1,
    n) = 0, acc (..., n, d_v) = 0."""
    m = np.full((*lead, 1, n), -np.inf, dtype)  # running max: nothing seen yet
    denom = np.zeros((*lead, 1, n), dtype)  # l: running sum of exp(s_j - m)
    acc = np.zeros((*lead, n, d_v), dtype)  # running sum of exp(s_j - m) * v_j
    return m, denom, acc


def fold_keys(m: np.ndarray, denom: np.ndarray, acc: np.ndarray, q_t: np.ndarray,
              k: np.ndarray, v: np.ndarray, visible: np.ndarray | None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Score one block of b keys k (..., b, d) against the (scaled) queries q_t (..., d, n),
    mask them (visible (..., n, b), True = may attend, or None: all visible) and fold them
    and their values v (..., b, d_v) into the running (m, l, acc). A caller that keeps its keys
    in blocks of its own (a paged cache) walks them with this, block by block."""
    scores = k @ q_t  # (..., b, d) @ (..., d, n) -> (..., b, n)
    if visible is not None:  # the mask, BEFORE the softmax, with the readable path's NEG_INF
        scores = np.where(visible.swapaxes(-1, -2), scores, NEG_INF)  # (..., b, n)
    return online_softmax_step(m, denom, acc, scores, v)


def finish_rows(denom: np.ndarray, acc: np.ndarray) -> np.ndarray:
    """acc / l: the output rows (..., n, d_v) once every key has been folded in."""
    denom = np.where(denom == 0, 1, denom)  # a row that saw no key: acc = 0, and 0 / 1 = 0
    return acc / denom.swapaxes(-1, -2)  # (..., 1, n) -> (..., n, 1): each row by its own l


def key_blocks(mask: np.ndarray | None, t_k: int, block_size: int) -> list[tuple[slice, bool]]:
    """The key blocks one query tile must visit, each with whether the mask hides any of its keys
    from any of the tile's queries; mask (..., n, t_k) is read, never assumed causal.

    A block hidden from every query of the tile (in every batch row and head) is skipped: a hidden
    key's weight is exp(-inf) = 0 exactly, visited or not. A tile whose queries see no key at all
    visits no block, and its rows are zeros, as in the readable path.
    """
    blocks = [slice(j, min(j + block_size, t_k)) for j in range(0, t_k, block_size)]
    if mask is None:
        return [(keys, False) for keys in blocks]
    over_rows = tuple(range(mask.ndim - 1))  # every axis but the keys: batch, heads, queries
    seen = mask.any(axis=over_rows)  # (t_k,): some query of the tile may see the key
    seen_by_all = mask.all(axis=over_rows)  # (t_k,): every query of the tile may see it
    return [(keys, not seen_by_all[keys].all()) for keys in blocks if seen[keys].any()]

