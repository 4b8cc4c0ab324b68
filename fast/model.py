"""The fast path: the readable model of block.py and attention.py, computed faster, same numbers.

FastGPT is GPT with `forward` below instead of GPT.forward: the same weights, the same door (the
call is checked and planned by GPT.__call__), the same cache protocol; only the arithmetic is
rearranged. Each trick is one switch in TRICKS, so tools/bench.py can time the fast path with any
one of them off, and the tests prove it equal to the readable path with every switch on or off.
The tricks, and why each helps on a CPU (figures measured by `python tools/bench.py --tricks`):

    flat_products       (B, T, D) -> (B * T, D) before every matrix product: ONE BLAS call; a
                        (B, 1, D) decode batch would otherwise read all of W once per row
    fused_qkv           W_Q, W_K, W_V stored side by side: one product reads them in one pass
    in_place            LayerNorm, GELU, mask and softmax overwrite one array instead of
                        allocating a temporary per NumPy operator
    query_blocks        queries in blocks of 128 skip the keys the causal mask hides from the
                        whole block: 3/8 of the score work at 512 tokens
    last_position_only  when only the last logits are read (prefill, each naive step), the last
                        block runs queries, attention, W_O and the MLP for the last position alone
    small_pages         cache buffers backed in 4 KB pages, not NumPy's 2 MB huge pages
    flash               from FLASH_FROM query rows on, when the weights are not returned,
                        attention is the online softmax of beyond/flash.py: no (T, t_k)
                        weights (0.74x the time at 1024 tokens, 0.15x at 4096)
    shared_kv_heads     grouped-query attention broadcasts each K/V head over its group of query
                        heads instead of repeating it

A layer cache that attends in its own way (cache.py's optional `attend`: a paged cache walks
its blocks) is asked to, when the weights are not wanted.

The model's entry (GPT.__call__) has checked the whole call; nothing here checks again.
"""

from __future__ import annotations

import math

import numpy as np

from attention import NEG_INF, AttentionParams, layer_norm, softmax
from beyond.flash import attention_in_tiles
from block import GPT, BlockParams, blocks_from_named
from cache import Cache, LayerCache
from parts.rope import rotate_pairs

TRICKS = {"flat_products": True, "fused_qkv": True, "in_place": True, "query_blocks": True,
          "last_position_only": True, "small_pages": True, "shared_kv_heads": True,
          "flash": True}
QUERY_BLOCK = 128  # query rows per block in query_blocks
FLASH_FROM = 1024  # query rows from which `flash` runs (a tie at 512: docs/flash.md)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


# --- the model -----------------------------------------------------------------------------------

class FastGPT(GPT):
    """GPT with the fast forward: build it as a GPT (FastGPT(config, seed, dtype, weights),
    FastGPT.load(path), FastGPT.from_gpt2(...)); it computes the same numbers. The attention
    layers must be AttentionParams (an MLA model, beyond/latent.py, has no fast path here)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        if not all(type(p.attn) is AttentionParams for p in self.blocks):
            kind = type(self.blocks[0].attn).__name__
            raise ValueError(f"FastGPT: the fast path runs AttentionParams layers, this config "
                             f"builds {kind}; use the readable model")
        # W_Q, W_K, W_V stored side by side, always (the fused_qkv switch chooses how to read them)
        self.blocks = blocks_from_named(fuse_qkv(self.named_weights(), self.config.n_layers),
                                        self.config)

    @staticmethod
    def zeros(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        return zeros_in_small_pages(shape, dtype)

    def forward(
        self, ids: np.ndarray, positions: np.ndarray, mask: np.ndarray,
        cache: Cache | None, last_only: bool = False, return_attention: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, list[np.ndarray]]:
        """GPT.forward's numbers: ids, positions (B, T), mask (B, 1, T, t_k) -> logits
        (B, T, V), or (B, 1, V) with last_only; with return_attention also each layer's
        weights."""
        c = self.config
        x, rotate = self.embed(ids, positions)  # (B, T, D)
        attention = []
        for layer, p in enumerate(self.blocks):
            kv = None if cache is None else cache.layers[layer]
            last = (last_only and layer == c.n_layers - 1 and x.shape[1] > 1
                    and not return_attention and TRICKS["last_position_only"])
            x, weights = block(x, p, mask, kv, rotate, c.ln_eps, last, return_attention)
            if return_attention:  # otherwise each layer's (B, H, T, t_k) weights go at once:
                attention.append(weights)  # 12 layers of 512 tokens would hold 150 MB
        if last_only:
            x = x[:, -1:]  # (B, T, D) -> (B, 1, D)
        logits = linear(norm(x, *self.ln_f, c.ln_eps), self.wte.T)  # (B, T, D) -> (B, T, V)
        return (logits, attention) if return_attention else logits


def block(
    x: np.ndarray, p: BlockParams, mask: np.ndarray, kv: LayerCache | None,
    rotate: tuple[np.ndarray, np.ndarray] | None, eps: float, last: bool,
    want_weights: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """block.transformer_block: x (B, T, D) -> (B, T, D), or (B, 1, D) with `last`, when every
    position's keys and values are made (later tokens read them) but only the last position
    goes on through attention, W_O and the MLP."""
    a = p.attn
    q, k, v = project_qkv(norm(x, *p.ln_1, eps), p, last)  # q for the last position if `last`
    B, T_q = q.shape[:2]
    q = q.reshape(B, T_q, a.n_heads, -1).transpose(0, 2, 1, 3)  # (B, T_q, D) -> (B, H, T_q, d)
    k = k.reshape(B, k.shape[1], a.n_kv_heads, -1).transpose(0, 2, 1, 3)  # -> (B, H_kv, T, d)
    v = v.reshape(B, v.shape[1], a.n_kv_heads, -1).transpose(0, 2, 1, 3)  # -> (B, H_kv, T, d)
    if rotate is not None:
        k = rotate_pairs(k, *rotate)
        q = rotate_pairs(q, *(r[:, :, -T_q:] for r in rotate))  # the query rows' own angles
    attend = getattr(kv, "attend", None)  # a cache that attends over its own storage
    if attend is not None and not want_weights:
        out, weights = attend(q, k, v, mask[:, :, -T_q:]), None  # (B, H, T_q, d)
    else:
        if kv is not None:
            k, v = kv.update(k, v)  # (B, H_kv, T, d) -> (B, H_kv, t_k, d)
            k, v = k.astype(q.dtype, copy=False), v.astype(q.dtype, copy=False)
        out, weights = grouped_attention(q, k, v, mask[:, :, -T_q:], want_weights)
    out = out.transpose(0, 2, 1, 3).reshape(B, T_q, -1)  # (B, H, T_q, d) -> (B, T_q, D)
    x = x[:, -T_q:] + linear(out, a.w_o, a.b_o)
    h = gelu_in_place(linear(norm(x, *p.ln_2, eps), p.w_fc, p.b_fc))  # (B, T_q, d_ff)
    return x + linear(h, p.w_proj, p.b_proj), weights


def project_qkv(h: np.ndarray, p: BlockParams, last: bool
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """q, k, v (B, T, widths) from h (B, T, D); q of the last position only when `last`."""
    a = p.attn
    if not TRICKS["fused_qkv"]:
        q = linear(h[:, -1:] if last else h, a.w_q, a.b_q)
        return q, linear(h, a.w_k, a.b_k), linear(h, a.w_v, a.b_v)
    w_qkv, b_qkv = a.w_q.base, a.b_q.base  # fuse_qkv made w_q, w_k, w_v views of one matrix
    at_k, at_v = a.w_q.shape[1], a.w_q.shape[1] + a.w_k.shape[1]  # where K and V start
    if last:  # K and V for every position (one product), Q for the last one
        kv = linear(h, w_qkv[:, at_k:], b_qkv[at_k:])  # (B, T, 2 H_kv d)
        return linear(h[:, -1:], a.w_q, a.b_q), kv[..., :at_v - at_k], kv[..., at_v - at_k:]
    qkv = linear(h, w_qkv, b_qkv)  # (B, T, D) -> (B, T, (H + 2 H_kv) d): views, no copies
    return qkv[..., :at_k], qkv[..., at_k:at_v], qkv[..., at_v:]


def fuse_qkv(named: dict[str, np.ndarray], n_layers: int) -> dict[str, np.ndarray]:
    """The weights with each layer's W_Q, W_K, W_V (and biases) copied side by side into one
    (D, q + kv + kv) matrix, and attn.w_q, w_k, w_v replaced by views of its column blocks:
    a weight changed in place through w_q changes the fused matrix too."""
    named = dict(named)
    for i in range(n_layers):
        for kind in ("w", "b"):
            names = [f"h.{i}.attn.{kind}_{x}" for x in "qkv"]
            parts = [named[n] for n in names]
            axis = parts[0].ndim - 1  # columns of a matrix, the only axis of a bias
            fused = np.concatenate(parts, axis=axis)  # (D, q + kv + kv) or (q + kv + kv,)
            cuts = np.cumsum([w.shape[axis] for w in parts])[:2]
            named |= dict(zip(names, np.split(fused, cuts, axis=axis), strict=True))
    return named


# --- the building blocks, faster -----------------------------------------------------------------

def linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """x @ w + b for x (..., d_in), w (d_in, d_out), b (d_out,) -> (..., d_out), as ONE
    (B * T, d_in) @ (d_in, d_out) product; given a (B, 1, d_in) decode batch, matmul would loop
    over B and read all of w once per row. The bias is added in place to the fresh product."""
    if not TRICKS["flat_products"]:
        return x @ w if b is None else x @ w + b
    y = x.reshape(-1, x.shape[-1]) @ w  # (B, T, d_in) -> (B * T, d_in) -> (B * T, d_out)
    if b is not None:
        y += b
    return y.reshape(*x.shape[:-1], w.shape[-1])  # (B * T, d_out) -> (B, T, d_out)


def norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
    """attention.layer_norm in one fresh array: centred once (x is untouched), then scaled and
    shifted in place, with the variance as one dot product per row."""
    if not TRICKS["in_place"]:
        return layer_norm(x, gamma, beta, eps)
    xc = x - x.sum(axis=-1, keepdims=True) / x.shape[-1]
    var = np.vecdot(xc, xc)[..., None] / x.shape[-1]  # (..., 1): the mean square of each row
    xc /= np.sqrt(var + eps)
    xc *= gamma
    xc += beta
    return xc


def gelu_in_place(x: np.ndarray) -> np.ndarray:
    """block.gelu written over x (a fresh float array nobody else needs), and returned. Written
    as one expression, NumPy would allocate seven (B, T, 4 D) temporaries; here one holds the
    bracket, and x^3 is two multiplications (float32 x**3 is a slow pow)."""
    if not TRICKS["in_place"]:
        return 0.5 * x * (1.0 + np.tanh(SQRT_2_OVER_PI * (x + 0.044715 * x**3)))
    t = x * x
    t *= 0.044715 * SQRT_2_OVER_PI
    t += SQRT_2_OVER_PI
    t *= x  # t = sqrt(2 / pi) (x + 0.044715 x^3)
    np.tanh(t, out=t)
    t += 1.0
    t *= 0.5
    x *= t  # 0.5 x (1 + tanh(...))
    return x


def grouped_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray,
                      want_weights: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """attention.grouped_attention: q (B, H, t_q, d), k, v (B, H_kv, t_k, d), mask (1|B, 1, t_q,
    t_k) -> out (B, H, t_q, d), weights (B, H, t_q, t_k). Each K/V head is shared by its group of
    G = H // H_kv query heads through a size-1 axis: broadcast, never copied G times."""
    B, H, t_q, d = q.shape
    H_kv, t_k = k.shape[1], k.shape[2]
    if not TRICKS["shared_kv_heads"]:
        k, v = np.repeat(k, H // H_kv, axis=1), np.repeat(v, H // H_kv, axis=1)
        return attention(q, k, v, mask)
    q = q.reshape(B, H_kv, H // H_kv, t_q, d)  # (B, H, t_q, d) -> (B, H_kv, G, t_q, d)
    k, v = k[:, :, None], v[:, :, None]  # (B, H_kv, t_k, d) -> (B, H_kv, 1, t_k, d)
    if TRICKS["flash"] and not want_weights and t_q >= FLASH_FROM:
        out = attention_in_tiles(q, k, v, mask[:, :, None], QUERY_BLOCK)  # (B, H_kv, G, t_q, d)
        return out.reshape(B, H, t_q, d), None  # (B, H_kv, G, t_q, d) -> (B, H, t_q, d)
    out, weights = attention(q, k, v, mask[:, :, None])  # mask -> (1|B, 1, 1, t_q, t_k)
    out = out.reshape(B, H, t_q, d)  # (B, H_kv, G, t_q, d) -> (B, H, t_q, d)
    return out, weights.reshape(B, H, t_q, t_k)  # (B, H_kv, G, t_q, t_k) -> (B, H, t_q, t_k)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
    """attention.scaled_dot_product_attention for q (..., t_q, d), k, v (..., t_k, d) and a bool
    mask (..., t_q, t_k), in query blocks that each stop at the last key any of their queries
    may see, every step written in place into the weights and the output."""
    t_q, t_k = q.shape[-2], k.shape[-2]
    q = q * (1.0 / math.sqrt(q.shape[-1]))  # scale q (t_q x d numbers), not the scores (t_q x t_k)
    blocks = query_blocks(mask, t_q, t_k)
    hidden = ~mask  # True = may NOT attend: where NEG_INF goes
    if len(blocks) > 1:  # full (t_q, t_k) axes, so that rows can be sliced out of it
        hidden = np.broadcast_to(hidden, (*hidden.shape[:-2], t_q, t_k))
    # weights in float32 at least (softmax in float16 loses too much); out in v's dtype
    lead = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], hidden.shape[:-2])
    weights = np.empty((*lead, t_q, t_k), np.result_type(q.dtype, np.float32))
    out = np.empty((*np.broadcast_shapes(lead, v.shape[:-2]), t_q, v.shape[-1]), v.dtype)
    for rows, n_keys in blocks:
        attend(q[..., rows, :], k[..., :n_keys, :], v[..., :n_keys, :],
               hidden[..., rows, :n_keys], weights[..., rows, :], out[..., rows, :])
    return out, weights


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, hidden: np.ndarray,
           weights: np.ndarray, out: np.ndarray) -> None:
    """The whiteboard steps for one block of (already scaled) queries: scores, mask, softmax,
    weighted sum, written into weights (..., rows, t_k) and out (..., rows, d). k and v hold the
    first n_keys keys; the weights past them are exactly 0."""
    n_keys = k.shape[-2]
    scores = weights[..., :n_keys]  # a view: the scores become the weights in place
    np.matmul(q, k.swapaxes(-1, -2), out=scores)  # (..., rows, d) @ (..., d, n_keys)
    np.copyto(scores, NEG_INF, where=hidden)  # the mask, BEFORE softmax: -inf, exactly 0 after
    if TRICKS["in_place"]:  # attention.softmax, guards included, on (..., rows, 1) arrays
        top = scores.max(axis=-1, keepdims=True)
        top[top == -np.inf] = 0  # a row that sees nothing: exp(-inf - 0) = 0, not NaN
        scores -= top
        np.exp(scores, out=scores)
        total = scores.sum(axis=-1, keepdims=True)
        total[total == 0] = 1  # ... and 0 / 1 = 0, not 0 / 0
        scores /= total
    else:
        scores[...] = softmax(scores)
    weights[..., n_keys:] = 0.0  # keys no query of the block may see: exactly 0
    np.matmul(scores, v, out=out)  # (..., rows, n_keys) @ (..., n_keys, d) -> (..., rows, d)


def query_blocks(mask: np.ndarray, t_q: int, t_k: int) -> list[tuple[slice, int]]:
    """Cut the t_q queries into blocks of QUERY_BLOCK rows, each with the number of leading keys
    it needs: up to the last key any of its queries may see (read off the mask, never assumed,
    so a wrong mask gives the same wrong weights as without blocks). A query that may see no key
    at all needs none (its row is zeros): a block of such queries keeps one key, so that no
    array is empty."""
    if t_q <= QUERY_BLOCK or not TRICKS["query_blocks"]:
        return [(slice(0, t_q), t_k)]
    mask = np.broadcast_to(mask, (*mask.shape[:-2], t_q, t_k))
    sees = mask.reshape(-1, t_q, t_k).any(axis=0)  # (..., t_q, t_k) -> (t_q, t_k): any row/head
    last = t_k - np.argmax(sees[:, ::-1], axis=1)  # (t_q,): one past the last key it may see
    needs = np.where(sees.any(axis=1), last, 1)  # (t_q,): one key for a query that sees none
    return [(slice(i, min(i + QUERY_BLOCK, t_q)), int(needs[i:i + QUERY_BLOCK].max()))
            for i in range(0, t_q, QUERY_BLOCK)]


# --- the cache's memory --------------------------------------------------------------------------

def zeros_in_small_pages(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """np.zeros(shape, dtype), without NumPy's request for 2 MB huge pages.

    Why: the zeros cost nothing until written (the OS backs a page on its first write), and a
    cache is written a few positions at a time into every (b, h) slab of max_len * d_head numbers,
    256 KB at GPT-2-small shapes. On Linux NumPy asks for huge pages for arrays of 4 MB or more,
    so the first write into each slab would make the kernel find and zero a whole 2 MB page: a
    64-token prefill of 8 rows zeroed (and timed) all 604 MB of its 1024-position cache instead of
    the 1/16 it writes. In 4 KB pages memory is backed as the cache fills.
    """
    # NumPy's own switch (the env variable NUMPY_MADVISE_HUGEPAGE sets it for every array). It is
    # private: should a later NumPy drop it, the cache gets plain zeros, only slower to fill.
    set_hugepage = getattr(np._core.multiarray, "_set_madvise_hugepage", None)
    if set_hugepage is None or not TRICKS["small_pages"]:
        return np.zeros(shape, dtype=dtype)
    was = set_hugepage(False)
    try:
        return np.zeros(shape, dtype=dtype)
    finally:
        set_hugepage(was)
