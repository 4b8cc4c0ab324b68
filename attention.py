"""Causal self-attention in NumPy, in the order you would draw it on a whiteboard.

    1. the exam rule:        causal_mask       which keys each query may see
    2. turning scores into probabilities: softmax
    3. one attention step:   scaled_dot_product_attention
    4. the parallel graders: split_heads / merge_heads
    5. single-head causal attention, then the block exercise's multi-head block
    6. the layer the GPT model uses: multi_head_attention (Q/K/V lenses, heads, KV cache, W_O)

Shape letters: B batch, T new tokens this call, D d_model, H query heads, H_kv key/value heads,
d_head = D // H, t_q query positions, t_k key positions (t_k = cached + new).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from parts.checks import positive_int
from parts.rope import apply_rope

if TYPE_CHECKING:  # only for type hints; cache.py does not import this module
    from cache import KVCache

# A finite "minus infinity" for masked logits (the block exercise's choice). exp(-1e9 - max) is
# exactly 0.0 in float32 and float64, so masked keys get zero probability; and a row whose every
# key is masked becomes uniform (the mean of the values) instead of 0/0 = NaN, which -inf would
# give. PyTorch >= 2.5 returns zeros for such a row instead; either way it is padding nobody reads.
NEG_INF = -1e9


# --- 1. The exam rule ----------------------------------------------------------------------------

def causal_mask(t_q: int, t_k: int | None = None) -> np.ndarray:
    """Boolean (t_q, t_k) mask, True where a query may attend to a key.

    The t_q queries are the LAST t_q of the t_k positions (bottom-right aligned): query i sits at
    absolute position t_k - t_q + i and sees keys j <= t_k - t_q + i. With t_q == t_k this is the
    familiar lower triangle; with t_q == 1 (one decode step) it is a single row of True; with a
    chunk of new tokens after a cache it is a rectangle whose diagonal is shifted right.
    """
    t_k = t_q if t_k is None else t_k
    for name, value in (("t_q", t_q), ("t_k", t_k)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"causal_mask: {name} must be a positive int, got {value!r}")
    if t_q > t_k:
        raise ValueError(f"causal_mask: t_q={t_q} queries cannot be the last of t_k={t_k} keys")
    # np.tril with offset k keeps j <= i + k; the offset t_k - t_q shifts the diagonal right.
    return np.tril(np.ones((t_q, t_k), dtype=bool), k=t_k - t_q)


# --- 2. Scores to probabilities ------------------------------------------------------------------

def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax: subtracting the row max keeps exp() <= 1, so logits of 1e4 or
    -1e9 never overflow. Same shape in and out; x itself is not changed."""
    x = np.asarray(x)
    if x.ndim == 0 or not (np.issubdtype(x.dtype, np.number) and x.dtype.kind != "c"):
        raise ValueError(f"softmax: x must be an array of real numbers with at least one axis, "
                         f"got {x.dtype} of shape {x.shape}")
    # A copy to work in (integer logits become floats), so the caller's x is untouched.
    return softmax_in_place(x.astype(np.result_type(x.dtype, np.float32)), axis)


def softmax_in_place(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """softmax written over x itself (a float array nobody else needs), and returned.

    Why: attention's scores are (B, H, t_q, t_k), 12 MB per layer at GPT-2-small width and 512
    tokens, and NumPy runs each step as its own pass on one core. In place, the five passes
    (max, subtract, exp, sum, divide) work in one array instead of allocating three.
    """
    x -= x.max(axis=axis, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=axis, keepdims=True)
    return x


# --- 3. One attention step -----------------------------------------------------------------------

def scaled_dot_product_attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """softmax(q k^T / sqrt(d) + mask) v.

    q (..., t_q, d), k and v (..., t_k, d), all of one float dtype; mask bool broadcastable to
    (..., t_q, t_k), True = may attend (only bool: torch's additive 0 / -inf float masks mean
    the opposite of a 0 / 1 mask, so a float mask is refused rather than guessed at).
    Returns out (..., t_q, d) and weights (..., t_q, t_k).

    The mask goes on the logits BEFORE softmax: a masked logit becomes NEG_INF, so softmax gives it
    exactly zero probability and renormalises over the visible keys. Zeroing probabilities after
    softmax would leave rows that no longer sum to one (and the future already mixed into the max).
    The five steps are in `attend`; here the queries are cut into blocks (query_blocks) so that a
    block skips the keys none of its queries may see.
    """
    check_attention_inputs(q, k, v, mask)
    t_q, t_k = q.shape[-2], k.shape[-2]
    # Scale q (t_q x d numbers) rather than the scores (t_q x t_k); a Python float keeps float32.
    q = q * (1.0 / math.sqrt(q.shape[-1]))
    blocks = query_blocks(mask, t_q, t_k)
    hidden = None if mask is None else ~mask  # True = may NOT attend: where NEG_INF goes
    if len(blocks) > 1:  # full (t_q, t_k) axes, so that rows can be sliced out of it
        hidden = np.broadcast_to(hidden, np.broadcast_shapes(hidden.shape, (t_q, t_k)))
    # weights (..., t_q, t_k) over q's, k's (and the mask's) leading axes, in float32 at least
    # (softmax in float16 loses too much, as llama also avoids); out (..., t_q, d) over v's too.
    lead = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], () if mask is None else
                               hidden.shape[:-2])
    weights = np.empty((*lead, t_q, t_k), np.result_type(q.dtype, np.float32))
    out = np.empty((*np.broadcast_shapes(lead, v.shape[:-2]), t_q, v.shape[-1]), v.dtype)
    for rows, n_keys in blocks:
        attend(q[..., rows, :], k[..., :n_keys, :], v[..., :n_keys, :],
               None if hidden is None else hidden[..., rows, :n_keys],
               weights[..., rows, :], out[..., rows, :])
    return out, weights


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, hidden: np.ndarray | None,
           weights: np.ndarray, out: np.ndarray) -> None:
    """The whiteboard steps for one block of (already scaled) queries: scores, mask, softmax,
    weighted sum, written into weights (..., rows, t_k) and out (..., rows, d).

    k and v hold the first n_keys keys; weights past them are set to exactly 0. Every step writes
    in place into weights or out: no score-sized temporaries, which at 512 tokens are 12 MB each.
    """
    n_keys = k.shape[-2]
    scores = weights[..., :n_keys]  # a view: the scores become the weights in place
    np.matmul(q, k.swapaxes(-1, -2), out=scores)  # (..., rows, d) @ (..., d, n_keys)
    if hidden is not None:
        # the mask, BEFORE softmax; scores are float32 at least, so -1e9 is finite even for float16
        np.copyto(scores, NEG_INF, where=hidden)
    softmax_in_place(scores)
    weights[..., n_keys:] = 0.0  # keys no query of the block may see: exactly 0
    np.matmul(scores, v, out=out)  # (..., rows, n_keys) @ (..., n_keys, d) -> (..., rows, d)


QUERY_BLOCK = 128  # query rows per block in query_blocks


def query_blocks(mask: np.ndarray | None, t_q: int, t_k: int) -> list[tuple[slice, int]]:
    """Cut the t_q queries into blocks of QUERY_BLOCK rows, each with the number of leading keys
    it needs: up to the last key any of its queries may see.

    Why: with a causal mask the upper triangle of the scores is all NEG_INF, and its softmax
    weights are exactly 0. At 512 tokens in blocks of 128, the first block needs 128 keys and the
    last 512, so 3/8 of the scores are never computed, masked or exponentiated. The price is one
    Python iteration per block (decode, t_q = 1, is one block). The key counts are read off the
    mask, never assumed, so a wrong mask gives wrong weights here exactly as it would without
    blocks; and a query that may see no key at all is uniform over all t_k keys, so its block
    keeps every key.
    """
    if mask is None or t_q <= QUERY_BLOCK:
        return [(slice(0, t_q), t_k)]
    mask = np.broadcast_to(mask, np.broadcast_shapes(mask.shape, (t_q, t_k)))
    sees = mask.reshape(-1, t_q, t_k).any(axis=0)  # (..., t_q, t_k) -> (t_q, t_k): any batch/head
    needs = t_k - np.argmax(sees[:, ::-1], axis=1)  # (t_q,): one past the last key it may see
    blind = ~mask.any(axis=-1).reshape(-1, t_q).all(axis=0)  # (t_q,): blind in some batch/head
    needs[blind] = t_k
    return [(slice(i, min(i + QUERY_BLOCK, t_q)), int(needs[i:i + QUERY_BLOCK].max()))
            for i in range(0, t_q, QUERY_BLOCK)]


def check_attention_inputs(q: np.ndarray, k: np.ndarray, v: np.ndarray,
                           mask: np.ndarray | None) -> None:
    """Raise ValueError/TypeError naming the argument unless q, k, v are float arrays of one dtype
    with at least 2 dimensions (time, features) and the mask, if any, is bool."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, np.ndarray) or x.dtype.kind != "f":  # float16, 32, 64, longdouble
            raise TypeError(f"attention: {name} must be a float array, got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        if x.ndim < 2:
            raise ValueError(f"attention: {name} must be (..., time, features), got shape "
                             f"{x.shape}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"attention: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, "
                        f"{v.dtype}")
    if mask is not None and getattr(mask, "dtype", None) != np.bool_:
        raise TypeError(f"attention: mask must be bool (True = may attend), got "
                        f"{getattr(mask, 'dtype', type(mask).__name__)}")


# --- 4. The parallel graders ---------------------------------------------------------------------

def split_heads(x: np.ndarray, n_heads: int) -> np.ndarray:
    """(B, T, D) -> (B, H, T, D // H): cut the width into H slices, then put heads before time so
    every head is an independent (T, d_head) attention problem."""
    B, T, D = x.shape
    if positive_int("split_heads n_heads", n_heads) and D % n_heads:
        raise ValueError(f"split_heads: width {D} is not divisible by n_heads={n_heads}")
    x = x.reshape(B, T, n_heads, D // n_heads)  # (B, T, D) -> (B, T, H, d_head)
    return x.transpose(0, 2, 1, 3)  # (B, T, H, d_head) -> (B, H, T, d_head)


def merge_heads(x: np.ndarray) -> np.ndarray:
    """(B, H, T, d_head) -> (B, T, H * d_head): the exact inverse of split_heads (transpose back
    first, then reshape), so head h's output lands in columns [h * d_head, (h + 1) * d_head)."""
    B, H, T, d_head = x.shape
    x = x.transpose(0, 2, 1, 3)  # (B, H, T, d_head) -> (B, T, H, d_head)
    return x.reshape(B, T, H * d_head)  # (B, T, H, d_head) -> (B, T, D)


def grouped_attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Attention where H query heads share H_kv key/value heads in groups of G = H // H_kv.

    q (B, H, t_q, d), k and v (B, H_kv, t_k, d), mask broadcastable to (B, 1, t_q, t_k).
    Query head h reads key/value head h // G (as torch's enable_gqa does). G == 1 is ordinary
    multi-head attention, H_kv == 1 is multi-query attention. The sharing is a broadcast over a
    size-1 axis, so K and V are never copied H // H_kv times.
    Returns out (B, H, t_q, d) and weights (B, H, t_q, t_k).
    """
    B, H, t_q, d = q.shape
    H_kv, t_k = k.shape[1], k.shape[2]
    q = q.reshape(B, H_kv, H // H_kv, t_q, d)  # (B, H, t_q, d) -> (B, H_kv, G, t_q, d)
    k, v = k[:, :, None], v[:, :, None]  # (B, H_kv, t_k, d) -> (B, H_kv, 1, t_k, d)
    if mask is not None:
        mask = mask[:, :, None]  # (B, 1, t_q, t_k) -> (B, 1, 1, t_q, t_k)
    out, weights = scaled_dot_product_attention(q, k, v, mask)
    out = out.reshape(B, H, t_q, d)  # (B, H_kv, G, t_q, d) -> (B, H, t_q, d)
    return out, weights.reshape(B, H, t_q, t_k)  # (B, H_kv, G, t_q, t_k) -> (B, H, t_q, t_k)


# --- 5. Single head, then the block exercise -----------------------------------------------------

def single_head_causal_attention(
    x: np.ndarray, w_q: np.ndarray, w_k: np.ndarray, w_v: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The smallest complete version: x (B, T, D), weights (D, d) -> out (B, T, d) and the (B, T, T)
    attention weights, whose upper triangle (the future) is exactly zero."""
    q, k, v = x @ w_q, x @ w_k, x @ w_v  # three lenses on the same tokens: (B, T, d) each
    return scaled_dot_product_attention(q, k, v, causal_mask(x.shape[1]))


def layer_norm(
    x: np.ndarray, gamma: np.ndarray | None = None, beta: np.ndarray | None = None,
    eps: float = 1e-5,
) -> np.ndarray:
    """Normalise the last axis to mean 0, variance 1 (biased variance, as torch does), then scale
    by gamma and shift by beta when given. Same shape in and out."""
    D = x.shape[-1]
    # sum / D, not mean(): the same numbers without mean's Python-level bookkeeping, which costs
    # more than the arithmetic on a decode step's (B, 1, D) rows, 25 times per step.
    xc = x - x.sum(axis=-1, keepdims=True) / D  # centred once (a new array: x is untouched) ...
    var = np.vecdot(xc, xc)[..., None] / D  # ... its mean square, one dot product per row
    dtype = np.result_type(xc, 1.0 if gamma is None else gamma, 1.0 if beta is None else beta)
    if dtype != xc.dtype:  # a float64 gamma or beta on float32 x promotes, as x * gamma would
        xc = xc.astype(dtype)
    xc /= np.sqrt(var + eps)  # ... then scaled and shifted in place: one array, not four
    if gamma is not None:
        xc *= gamma
    if beta is not None:
        xc += beta
    return xc


def causal_self_attention_block(
    x: np.ndarray, w_q: np.ndarray, w_k: np.ndarray, w_v: np.ndarray, w_o: np.ndarray,
    num_heads: int,
) -> np.ndarray:
    """The block-exercise pipeline, step for step: x (N, T, D), weights (D, D) -> (N, T, D).

    project -> split heads -> masked scaled scores (-1e9) -> softmax -> weighted sum -> merge heads
    -> output projection -> + x -> LayerNorm (eps 1e-5, no learned scale or shift).
    """
    x = np.asarray(x)
    if x.ndim != 3:
        raise ValueError(f"causal_self_attention_block: x must be (N, T, d_model), got {x.shape}")
    D = x.shape[-1]
    for name, w in (("w_q", w_q), ("w_k", w_k), ("w_v", w_v), ("w_o", w_o)):
        if np.shape(w) != (D, D):
            raise ValueError(
                f"causal_self_attention_block: {name} must be ({D}, {D}), got {np.shape(w)}")
    if D < 1 or positive_int("causal_self_attention_block num_heads", num_heads) and D % num_heads:
        raise ValueError(
            f"causal_self_attention_block: num_heads={num_heads!r} must divide d_model={D}")
    q = split_heads(x @ w_q, num_heads)  # (N, T, D) -> (N, H, T, d_head)
    k = split_heads(x @ w_k, num_heads)  # (N, T, D) -> (N, H, T, d_head)
    v = split_heads(x @ w_v, num_heads)  # (N, T, D) -> (N, H, T, d_head)
    per_head, _ = scaled_dot_product_attention(q, k, v, causal_mask(x.shape[1]))
    concat = merge_heads(per_head)  # (N, H, T, d_head) -> (N, T, D)
    return layer_norm(concat @ w_o + x)


# --- 6. The layer the GPT model uses -------------------------------------------------------------

@dataclass
class AttentionParams:
    """One layer's projections, used as x @ W + b (GPT-2's layout).

    w_q (D, H * d_head), w_k and w_v (D, H_kv * d_head), w_o (H * d_head, D); biases match the
    output width. Separate Q/K/V matrices, because they are three different lenses on the same
    token: what am I looking for, what do I contain, what do I pass on.

    They are stored side by side, though: w_qkv (D, (H + 2 H_kv) d_head) holds [W_Q | W_K | W_V]
    and w_q, w_k, w_v are views of its column blocks (b_qkv likewise), so writing into w_q writes
    into w_qkv. One product x @ w_qkv then makes all three projections: a decode step reads them
    in one pass and one BLAS call instead of three (a bare pass over GPT-2-small's weights takes
    6% less time, one thread, measured), and a multi-threaded BLAS hands work to its threads once,
    not three times.
    """

    w_q: np.ndarray
    b_q: np.ndarray
    w_k: np.ndarray
    b_k: np.ndarray
    w_v: np.ndarray
    b_v: np.ndarray
    w_o: np.ndarray
    b_o: np.ndarray
    n_heads: int
    n_kv_heads: int
    w_qkv: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)
    b_qkv: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        w, b = (self.w_q, self.w_k, self.w_v), (self.b_q, self.b_k, self.b_v)
        arrays = (*w, *b)
        if not (all(isinstance(a, np.ndarray) for a in arrays)
                and len({a.dtype for a in arrays}) == 1 and {a.ndim for a in w} == {2}
                and {a.ndim for a in b} == {1} and len({a.shape[0] for a in w}) == 1):
            return  # anything unusual keeps three separate products (see fused_qkv)
        cuts = np.cumsum([a.shape[1] for a in w])[:2]  # where W_K and W_V start
        self.w_qkv = np.concatenate(w, axis=1)  # (D, q + kv + kv)
        self.b_qkv = np.concatenate(b)
        self.w_q, self.w_k, self.w_v = np.split(self.w_qkv, cuts, axis=1)  # views of w_qkv
        self.b_q, self.b_k, self.b_v = np.split(self.b_qkv, cuts)


def fused_qkv(p: AttentionParams) -> bool:
    """True while w_q, w_k, w_v (and the biases) are still the views of w_qkv (b_qkv) made at
    construction; an attribute set to another array since then turns the fused product off."""
    return p.w_qkv is not None and all(
        a.base is p.w_qkv for a in (p.w_q, p.w_k, p.w_v)) and all(
        a.base is p.b_qkv for a in (p.b_q, p.b_k, p.b_v))


def multi_head_attention(
    x: np.ndarray,
    p: AttentionParams,
    mask: np.ndarray | None,
    cache: KVCache | None = None,
    rotate: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Causal multi-head self-attention for T new tokens: x (B, T, D) -> (B, T, D).

    The naive path (cache=None, all tokens at once) and the cached path (the new tokens only, keys
    and values of earlier ones read from the cache) run this same code. mask (1 or B, 1, T, t_k)
    comes from the caller, built once per forward from the positions. rotate is RoPE's (cos, sin)
    for the new positions, or None for models with learned position embeddings.
    Returns the output (B, T, D) and the attention weights (B, H, T, t_k).
    """
    if fused_qkv(p):  # one product, then the three column blocks (views, no copies)
        qkv = linear(x, p.w_qkv, p.b_qkv)  # (B, T, D) -> (B, T, (H + 2 H_kv) d_head)
        k_at, v_at = p.w_q.shape[1], p.w_q.shape[1] + p.w_k.shape[1]  # where K and V start
        q, k, v = qkv[..., :k_at], qkv[..., k_at:v_at], qkv[..., v_at:]
    else:
        q, k, v = (linear(x, w, b) for w, b in ((p.w_q, p.b_q), (p.w_k, p.b_k), (p.w_v, p.b_v)))
    q = split_heads(q, p.n_heads)  # (B, T, D) -> (B, H, T, d_head)
    k, v = kv_heads(k, v, p, rotate)  # (B, T, H_kv d_head) -> (B, H_kv, T, d_head) each
    if rotate is not None:  # RoPE turns q and k by their absolute positions; v is left alone
        q = apply_rope(q, *rotate)
    if cache is not None:
        # Only K and V are worth keeping: a past query is never asked again.
        k, v = cache.append(k, v)  # (B, H_kv, T, d_head) -> (B, H_kv, cached + T, d_head)
        if k.dtype != q.dtype:  # a float16 cache saves memory; attention still runs in q's dtype
            k, v = k.astype(q.dtype), v.astype(q.dtype)
    out, weights = grouped_attention(q, k, v, mask)  # (B, H, T, d_head)
    # W_O mixes what the heads found; before it each head's slice is only that head's opinion.
    return linear(merge_heads(out), p.w_o, p.b_o), weights  # (B, H, T, d_head) -> (B, T, D)


def keys_and_values(
    x: np.ndarray, p: AttentionParams, rotate: tuple[np.ndarray, np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The two lenses a cache keeps: x (B, T, D) -> k, v (B, H_kv, T, d_head), k turned by RoPE
    when rotate is given; the same k and v multi_head_attention makes. For the model to cache a
    block's keys and values without running the block (block.last_position_only)."""
    return kv_heads(linear(x, p.w_k, p.b_k), linear(x, p.w_v, p.b_v), p, rotate)


def kv_heads(
    k: np.ndarray, v: np.ndarray, p: AttentionParams,
    rotate: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Projected keys and values (B, T, H_kv * d_head) into heads, k turned by RoPE when rotate is
    given: where multi_head_attention and keys_and_values both shape what the cache keeps."""
    k = split_heads(k, p.n_kv_heads)  # (B, T, H_kv d_head) -> (B, H_kv, T, d_head)
    v = split_heads(v, p.n_kv_heads)  # (B, T, H_kv d_head) -> (B, H_kv, T, d_head)
    return (k if rotate is None else apply_rope(k, *rotate)), v


def linear(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """x @ w + b for x (..., d_in), w (d_in, d_out), b (d_out,) -> (..., d_out).

    Two things NumPy would not do by itself. The leading axes are flattened into one, so BLAS
    runs ONE (B * T, d_in) @ (d_in, d_out) product: given a (B, 1, d_in) decode batch, matmul
    would loop over B and read all of w once per row. And the bias is added in place to the
    fresh product, not into a second (B, T, d_out) array.
    """
    y = x.reshape(-1, x.shape[-1]) @ w  # (B, T, d_in) -> (B * T, d_in) -> (B * T, d_out)
    if getattr(b, "dtype", None) == y.dtype:
        y += b
    else:  # another dtype (a float64 bias on float32), or not an array: as x @ w + b would
        y = y + b
    return y.reshape(*x.shape[:-1], w.shape[-1])  # (B * T, d_out) -> (B, T, d_out)
