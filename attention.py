"""Causal self-attention in NumPy, in the order you would draw it on a whiteboard.

    1. the exam rule:         causal_mask, and the same rule    which keys each query may see
                              from positions: mask_from_positions
    2. scores to probability: softmax
    3. one attention step:    scaled_dot_product_attention      scores, scale, mask, softmax, sum
    4. the parallel graders:  split_heads / merge_heads, grouped_attention (shared K/V heads)
    5. the smallest version:  single_head_causal_attention, then the block exercise
    6. the model's layer:     multi_head_attention
                              project -> split -> (cache) -> attend -> merge -> W_O

This file is the specification: every line is a whiteboard step, and it is what verify.py checks
against PyTorch. The fast path (fast/model.py) computes the same numbers faster and is proved
equal to this file. Every public function checks its own arguments when called directly (its
`check_...` function, at the bottom of this file); inside the model's call, which checked the
whole call at its door, they are not checked again (parts/checks.py, `door`).

Shape letters: B batch, T new tokens this call, D d_model, H query heads, H_kv key/value heads,
d_head = D // H, t_q query positions, t_k key positions (t_k = cached + new).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from parts.checks import (
    door,
    finite_number,
    fits_in_memory,
    float_array,
    int_array,
    is_int,
    positive_int,
)
from parts.rope import apply_rope

if TYPE_CHECKING:  # only for type hints: a layer's cache is whatever keeps cache.LayerCache
    from cache import LayerCache

# A hidden key's score. exp(-inf) is exactly 0, so a hidden key gets exactly zero weight whatever
# the visible scores are. A finite constant is not enough: with the block exercise's -1e9, a row
# whose every visible score is below -1e9 (activations near 1e5) puts its weight on the hidden
# keys, the future or padding. The course's reason for a finite constant, that a row whose every
# key is hidden must not become 0/0 = NaN, is kept by softmax itself: such a row (a pad query
# before any real token, which nobody reads) comes out as zeros, as PyTorch >= 2.5 gives.
NEG_INF = -np.inf
EMPTY = -1  # the position of a key slot that holds nothing (padding, or a slot not yet written)


# --- 1. The exam rule ----------------------------------------------------------------------------

@door
def causal_mask(t_q: int, t_k: int | None = None) -> np.ndarray:
    """Boolean (t_q, t_k) mask, True where a query may attend to a key.

    The t_q queries are the LAST t_q of the t_k positions (bottom-right aligned): query i sits at
    absolute position t_k - t_q + i and sees keys j <= t_k - t_q + i. With t_q == t_k this is the
    familiar lower triangle; with t_q == 1 (one decode step) it is a single row of True; with a
    chunk of new tokens after a cache it is a rectangle whose diagonal is shifted right.
    """
    t_k = t_q if t_k is None else t_k
    # np.tril with offset k keeps j <= i + k; the offset t_k - t_q shifts the diagonal right.
    return np.tril(np.ones((t_q, t_k), dtype=bool), k=t_k - t_q)


@door
def mask_from_positions(query_pos: np.ndarray, key_pos: np.ndarray, window: int | None = None,
                        sinks: int = 0) -> np.ndarray:
    """The same rule, read off positions: the mask of every model call, whatever the cache.

    query_pos (B, T): each new token's position; key_pos (B, t_k): the position each key holds,
    EMPTY (-1) where a slot holds nothing. A query at position p sees key j when

        j >= 0            the slot holds a real token (padding and empty slots hold -1)
        j <= p            not the future: the causal rule
        j > p - window    with a sliding window, its last `window` positions (itself included),
        or j < sinks      ... and the first `sinks` positions of its row, always

    Returns (B, 1, T, t_k), one mask for every head. causal_mask(t_q, t_k) is this rule for
    queries at positions t_k - t_q .. t_k - 1 and keys at 0 .. t_k - 1; a cache that keeps its
    keys in any order (a rolling buffer's slots, a paged cache's blocks) says where each one sits.
    """
    q = query_pos[:, None, :, None]  # (B, T) -> (B, 1, T, 1)
    k = key_pos[:, None, None, :]  # (B, t_k) -> (B, 1, 1, t_k)
    visible = (k >= 0) & (k <= q)
    if window is not None:  # the band: the last `window` keys, and the sinks
        visible &= (k > q - window) | (k < sinks)
    return visible


# --- 2. Scores to probabilities ------------------------------------------------------------------

@door
def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """exp(x) / sum(exp(x)) along axis; same shape in and out. Subtracting the max first keeps
    every exp() <= 1, so logits of 1e4 never overflow; a -inf (a hidden key) gets exactly 0.

    A row of nothing but -inf (a query that may see no key) comes out as zeros, not NaN: it
    subtracts 0 instead of its max of -inf, and divides by 1 instead of its sum of 0."""
    top = x.max(axis=axis, keepdims=True)
    e = np.exp(x - np.where(top == -np.inf, 0, top))
    total = e.sum(axis=axis, keepdims=True)
    return e / np.where(total == 0, 1, total)


# --- 3. One attention step -----------------------------------------------------------------------

@door
def scaled_dot_product_attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """softmax(q k^T / sqrt(d_head), masked) v: the five whiteboard steps, one line each.

    q (..., t_q, d), k (..., t_k, d), v (..., t_k, d_v), one float dtype; mask bool, broadcastable
    to the scores (..., t_q, t_k), True = may attend (only bool: torch's additive 0 / -inf float
    masks mean the opposite of a 0 / 1 mask, so a float mask is refused rather than guessed at).
    Returns out (..., t_q, d_v) in v's dtype and weights (..., t_q, t_k). float16 is scored in
    float32, as torch does on a CPU.

    The mask goes on the scores BEFORE softmax: a masked score becomes NEG_INF (-inf), so softmax
    gives it exactly zero probability, whatever the other scores, and renormalises over the
    visible keys. Zeroing probabilities after softmax would leave rows that no longer sum to one
    (and the future already in the max). A query that may see no key gets zeros.
    """
    dtype = v.dtype
    q, k, v = (a.astype(np.result_type(a, np.float32), copy=False) for a in (q, k, v))
    scores = q @ k.swapaxes(-1, -2)  # 1. (..., t_q, d) @ (..., d, t_k) -> (..., t_q, t_k)
    scores = scores / math.sqrt(q.shape[-1])  # 2. scale, so scores do not grow with d_head
    if mask is not None:
        scores = np.where(mask, scores, NEG_INF)  # 3. mask the future, BEFORE softmax
    weights = softmax(scores, axis=-1)  # 4. over the keys: each query's row sums to 1
    out = weights @ v  # 5. (..., t_q, t_k) @ (..., t_k, d_v) -> (..., t_q, d_v)
    return out.astype(dtype, copy=False), weights


# --- 4. The parallel graders ---------------------------------------------------------------------

@door
def split_heads(x: np.ndarray, n_heads: int) -> np.ndarray:
    """(B, T, D) -> (B, H, T, D // H): cut the width into H slices, then put heads before time so
    every head is an independent (T, d_head) attention problem."""
    B, T, D = x.shape
    x = x.reshape(B, T, n_heads, D // n_heads)  # (B, T, D) -> (B, T, H, d_head)
    return x.transpose(0, 2, 1, 3)  # (B, T, H, d_head) -> (B, H, T, d_head)


@door
def merge_heads(x: np.ndarray) -> np.ndarray:
    """(B, H, T, d_head) -> (B, T, H * d_head): the exact inverse of split_heads (transpose back
    first, then reshape), so head h's output lands in columns [h * d_head, (h + 1) * d_head)."""
    B, H, T, d_head = x.shape
    x = x.transpose(0, 2, 1, 3)  # (B, H, T, d_head) -> (B, T, H, d_head)
    return x.reshape(B, T, H * d_head)  # (B, T, H, d_head) -> (B, T, D)


@door
def grouped_attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Attention where H query heads share H_kv key/value heads in groups of G = H // H_kv.

    q (B, H, t_q, d), k and v (B, H_kv, t_k, d), mask broadcastable to (B, H, t_q, t_k).
    Query head h reads key/value head h // G (as torch's enable_gqa does): each K/V head is
    repeated G times, then it is ordinary multi-head attention. G == 1 is multi-head attention,
    H_kv == 1 is multi-query attention. (The fast path shares them by broadcasting, without
    copies.) Returns out (B, H, t_q, d) and weights (B, H, t_q, t_k).
    """
    G = q.shape[1] // k.shape[1]
    k = np.repeat(k, G, axis=1)  # (B, H_kv, t_k, d) -> (B, H, t_k, d)
    v = np.repeat(v, G, axis=1)  # (B, H_kv, t_k, d) -> (B, H, t_k, d)
    return scaled_dot_product_attention(q, k, v, mask)


# --- 5. Single head, then the block exercise -----------------------------------------------------

@door
def single_head_causal_attention(
    x: np.ndarray, w_q: np.ndarray, w_k: np.ndarray, w_v: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The smallest complete version: x (B, T, D), weights (D, d) -> out (B, T, d) and the (B, T, T)
    attention weights, whose upper triangle (the future) is exactly zero."""
    q, k, v = x @ w_q, x @ w_k, x @ w_v  # three lenses on the same tokens: (B, T, d) each
    return scaled_dot_product_attention(q, k, v, causal_mask(x.shape[1]))


@door
def layer_norm(
    x: np.ndarray, gamma: np.ndarray | None = None, beta: np.ndarray | None = None,
    eps: float = 1e-5,
) -> np.ndarray:
    """Normalise the last axis to mean 0, variance 1 (biased variance, as torch does), then scale
    by gamma and shift by beta when given. Same shape in and out; float16 is computed in
    float32 (as torch does on a CPU) and returned as float16."""
    dtype = x.dtype
    x = x.astype(np.result_type(x, np.float32), copy=False)  # float16 squares overflow past 256
    mean = x.mean(axis=-1, keepdims=True)
    var = x.var(axis=-1, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps)
    y = y if gamma is None else y * gamma
    y = y if beta is None else y + beta
    return y.astype(np.float16) if dtype == np.float16 else y


@door
def causal_self_attention_block(
    x: np.ndarray, w_q: np.ndarray, w_k: np.ndarray, w_v: np.ndarray, w_o: np.ndarray,
    num_heads: int,
) -> np.ndarray:
    """The block-exercise pipeline, step for step: x (N, T, D), weights (D, D) -> (N, T, D).

    project -> split heads -> masked scaled scores (-1e9) -> softmax -> weighted sum -> merge heads
    -> output projection -> + x -> LayerNorm (eps 1e-5, no learned scale or shift).

    The exercise masks with the finite -1e9, so its masking is written out here rather than taken
    from scaled_dot_product_attention (which uses -inf). What that costs: a query whose every
    visible score is below -1e9 (activations near 1e5) puts its weight on the future instead.
    At the exercise's scales the two give the same numbers. float16 is scored in float32.
    """
    work = np.result_type(x, np.float32)  # float16 scores would overflow, and -1e9 with them
    q = split_heads(x @ w_q, num_heads).astype(work, copy=False)  # (N, T, D) -> (N, H, T, d)
    k = split_heads(x @ w_k, num_heads).astype(work, copy=False)  # (N, T, D) -> (N, H, T, d)
    v = split_heads(x @ w_v, num_heads).astype(work, copy=False)  # (N, T, D) -> (N, H, T, d)
    scores = q @ k.swapaxes(-1, -2) / math.sqrt(q.shape[-1])  # (N, H, T, T)
    scores = np.where(causal_mask(x.shape[1]), scores, -1e9)  # the exercise's finite mask
    per_head = (softmax(scores, axis=-1) @ v).astype(x.dtype)  # (N, H, T, T) -> (N, H, T, d)
    concat = merge_heads(per_head)  # (N, H, T, d_head) -> (N, T, D)
    return layer_norm(concat @ w_o + x)


# --- 6. The layer the GPT model uses -------------------------------------------------------------

@dataclass(frozen=True)
class AttentionParams:
    """One layer's projections, used as x @ W + b (GPT-2's layout).

    w_q (D, H * d_head), w_k and w_v (D, H_kv * d_head), w_o (H * d_head, D); biases match the
    output width. Separate Q/K/V matrices, because they are three different lenses on the same
    token: what am I looking for, what do I contain, what do I pass on. Frozen: a weight is
    changed in place (p.w_q[...] = ...), never rebound, so every view of it stays true.
    Calling the parameters runs the layer: p(x, mask, cache, rotate) is multi_head_attention.
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

    def __post_init__(self) -> None:
        """Checks the shapes agree with each other and with the head counts."""
        H, H_kv = (positive_int(f"AttentionParams {n}", getattr(self, n))
                   for n in ("n_heads", "n_kv_heads"))
        D, q_width = np.shape(self.w_q)[0], np.shape(self.w_q)[-1]
        d_head = q_width // H
        kv = H_kv * d_head
        expected = {"w_q": (D, H * d_head), "b_q": (H * d_head,), "w_k": (D, kv), "b_k": (kv,),
                    "w_v": (D, kv), "b_v": (kv,), "w_o": (H * d_head, D), "b_o": (D,)}
        for name, shape in expected.items():
            a = float_array(f"AttentionParams {name}", getattr(self, name))
            if a.shape != shape or H % H_kv or q_width % H:
                raise ValueError(f"AttentionParams: {name} must be {shape} for {H} heads and "
                                 f"{H_kv} K/V heads, got {a.shape}")

    def __call__(self, x: np.ndarray, mask: np.ndarray | None, cache: LayerCache | None = None,
                 rotate: tuple[np.ndarray, np.ndarray] | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
        return multi_head_attention(x, self, mask, cache, rotate)


@door
def multi_head_attention(
    x: np.ndarray,
    p: AttentionParams,
    mask: np.ndarray | None,
    cache: LayerCache | None = None,
    rotate: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Causal multi-head self-attention for T new tokens: x (B, T, D) -> (B, T, D).

    The naive path (cache=None, all tokens at once) and the cached path (the new tokens only, keys
    and values of earlier ones read from the cache) run this same code. mask, broadcastable to
    (B, H, T, t_k), comes from the caller (the model builds it once per forward from the
    positions). rotate is RoPE's (cos, sin) for the new positions, or None for models with
    learned position embeddings. Returns the output (B, T, D) and the attention weights
    (B, H, T, t_k).
    """
    q = split_heads(x @ p.w_q + p.b_q, p.n_heads)  # (B, T, D) -> (B, H, T, d_head)
    k = split_heads(x @ p.w_k + p.b_k, p.n_kv_heads)  # (B, T, D) -> (B, H_kv, T, d_head)
    v = split_heads(x @ p.w_v + p.b_v, p.n_kv_heads)  # (B, T, D) -> (B, H_kv, T, d_head)
    if rotate is not None:  # RoPE turns q and k by their absolute positions; v is left alone
        q, k = apply_rope(q, *rotate), apply_rope(k, *rotate)
    if cache is not None:  # only K and V are worth keeping: a past query is never asked again
        k, v = cache.update(k, v)  # (B, H_kv, T, d_head) -> (B, H_kv, t_k, d_head): every key
        k, v = k.astype(q.dtype, copy=False), v.astype(q.dtype, copy=False)  # a float16 cache
    out, weights = grouped_attention(q, k, v, mask)  # (B, H, T, d_head), (B, H, T, t_k)
    # W_O mixes what the heads found; before it each head's slice is only that head's opinion.
    return merge_heads(out) @ p.w_o + p.b_o, weights  # (B, H, T, d_head) -> (B, T, D)


# --- the doors: what each public function checks when called directly ---------------------------
# Each raises ValueError/TypeError naming the argument, and returns the positional arguments it
# converted (a list as an array), or None.

def check_causal_mask(t_q: int, t_k: int | None = None) -> tuple[int, int]:
    t_q = positive_int("causal_mask t_q", t_q)
    t_k = t_q if t_k is None else positive_int("causal_mask t_k", t_k)
    if t_q > t_k:
        raise ValueError(f"causal_mask: t_q={t_q} queries cannot be the last of t_k={t_k} keys")
    fits_in_memory(f"causal_mask({t_q}, {t_k})", t_q * t_k)  # one byte per cell
    return t_q, t_k


def check_mask_from_positions(query_pos: np.ndarray, key_pos: np.ndarray,
                              window: int | None = None, sinks: int = 0) -> tuple:
    query_pos = int_array("mask_from_positions query_pos", query_pos, 2)
    key_pos = int_array("mask_from_positions key_pos", key_pos, 2)
    if query_pos.shape[0] != key_pos.shape[0] or key_pos.shape[1] < 1:
        raise ValueError(f"mask_from_positions: need query_pos (B, T) and key_pos (B, t_k >= 1), "
                         f"got {query_pos.shape} and {key_pos.shape}")
    if window is not None:
        positive_int("mask_from_positions window", window)
    if not is_int(sinks) or sinks < 0:
        raise ValueError(f"mask_from_positions: sinks must be an int >= 0, got {sinks!r}")
    fits_in_memory(f"mask_from_positions of {query_pos.shape} x {key_pos.shape}",
                   query_pos.size * key_pos.shape[1])
    return query_pos, key_pos


def check_softmax(x: np.ndarray, axis: int = -1) -> tuple:
    x = float_array("softmax: x", x, min_ndim=1, allow_int=True)
    if not is_int(axis) or not -x.ndim <= axis < x.ndim:
        raise ValueError(f"softmax: axis must be an int in [{-x.ndim}, {x.ndim}), got {axis!r}")
    if x.shape[axis] == 0:
        raise ValueError(f"softmax: x of shape {x.shape} has no entries along axis {axis}: there "
                         "is nothing to normalise over")
    return (x,)


def check_scaled_dot_product_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray,
                                       mask: np.ndarray | None = None) -> None:
    check_attention_inputs(q, k, v, mask)


def check_attention_inputs(q: np.ndarray, k: np.ndarray, v: np.ndarray,
                           mask: np.ndarray | None, who: str = "attention") -> None:
    """Raise ValueError/TypeError naming the argument (and `who`, the function asking) unless
    q, k, v are float arrays of one dtype with matching time and feature axes, at least one key
    and one feature, and the mask, if any, is a bool array that broadcasts to the scores
    (..., t_q, t_k) without enlarging them. An empty query axis (t_q = 0) is accepted: nothing
    is asked, and nothing is answered."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if type(x) is not np.ndarray or x.dtype.kind != "f":  # float16, 32, 64, longdouble
            raise TypeError(f"{who}: {name} must be a float array (a plain ndarray), got "
                            f"{type(x).__name__} of {getattr(x, 'dtype', None)}")
        if x.ndim < 2:
            raise ValueError(f"{who}: {name} must be (..., time, features), got shape "
                             f"{x.shape}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"{who}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, "
                        f"{v.dtype}")
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise ValueError(f"{who}: need q (..., t_q, d), k (..., t_k, d), v (..., t_k, d_v), "
                         f"got q {q.shape}, k {k.shape}, v {v.shape}")
    if k.shape[-2] == 0 or q.shape[-1] == 0:
        raise ValueError(f"{who}: need at least one key (t_k >= 1) and one feature (d >= 1): "
                         f"a query with nothing to score has no answer, got q {q.shape}, "
                         f"k {k.shape}")
    try:
        lead = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    except ValueError:
        raise ValueError(f"{who}: the leading axes of q {q.shape}, k {k.shape}, v {v.shape} "
                         "do not broadcast") from None
    if mask is None:
        return
    if type(mask) is not np.ndarray or mask.dtype != bool:
        raise TypeError(f"{who}: mask must be bool (a plain ndarray, True = may attend), got "
                        f"{type(mask).__name__} of {getattr(mask, 'dtype', None)}")
    scores = (*lead, q.shape[-2], k.shape[-2])
    try:
        fits = np.broadcast_shapes(mask.shape, scores) == scores
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(f"{who}: mask of shape {mask.shape} does not broadcast to the "
                         f"scores {scores} (..., t_q, t_k)")


def check_split_heads(x: np.ndarray, n_heads: int) -> tuple:
    x = float_array("split_heads: x", x, ndim=3, allow_int=True)
    if x.shape[2] % positive_int("split_heads n_heads", n_heads):
        raise ValueError(f"split_heads: width {x.shape[2]} is not divisible by n_heads={n_heads}")
    return x, n_heads


def check_merge_heads(x: np.ndarray) -> tuple:
    return (float_array("merge_heads: x", x, ndim=4, allow_int=True),)


def check_grouped_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray,
                            mask: np.ndarray | None) -> None:
    fits = np.ndim(q) == np.ndim(k) == np.ndim(v) == 4 and np.shape(k)[1] >= 1
    if not fits or np.shape(q)[1] % np.shape(k)[1] or np.shape(v)[1] != np.shape(k)[1]:
        raise ValueError(f"grouped_attention: need q (B, H, t_q, d) and k, v (B, H_kv, t_k, d) "
                         f"with H_kv dividing H (H_kv >= 1), got q {np.shape(q)}, k {np.shape(k)}, "
                         f"v {np.shape(v)}")


def check_single_head_causal_attention(x: np.ndarray, w_q: np.ndarray, w_k: np.ndarray,
                                       w_v: np.ndarray) -> tuple:
    return (float_array("single_head_causal_attention: x", x, ndim=3), w_q, w_k, w_v)


def check_layer_norm(x: np.ndarray, gamma: np.ndarray | None = None,
                     beta: np.ndarray | None = None, eps: float = 1e-5) -> tuple:
    x = float_array("layer_norm: x", x, min_ndim=1)
    if x.shape[-1] == 0:
        raise ValueError(f"layer_norm: x of shape {x.shape} has no features on its last axis: "
                         "there is no mean or variance to normalise by")
    finite_number("layer_norm eps", eps, above=0)
    for name, p in (("gamma", gamma), ("beta", beta)):
        if p is not None and np.shape(p) != x.shape[-1:]:
            raise ValueError(f"layer_norm: {name} must have shape {x.shape[-1:]}, got "
                             f"{np.shape(p)}")
    return x, gamma, beta, eps


def check_causal_self_attention_block(x: np.ndarray, w_q: np.ndarray, w_k: np.ndarray,
                                      w_v: np.ndarray, w_o: np.ndarray, num_heads: int) -> tuple:
    x = float_array("causal_self_attention_block: x", x, ndim=3)
    D = x.shape[-1]
    for name, w in (("w_q", w_q), ("w_k", w_k), ("w_v", w_v), ("w_o", w_o)):
        if float_array(f"causal_self_attention_block {name}", w, ndim=2).shape != (D, D):
            raise ValueError(f"causal_self_attention_block: {name} must be ({D}, {D}), got "
                             f"{np.shape(w)}")
    if D % positive_int("causal_self_attention_block num_heads", num_heads) or D < 1:
        raise ValueError(f"causal_self_attention_block: num_heads={num_heads} must divide "
                         f"d_model={D} (at least 1)")
    return x, w_q, w_k, w_v, w_o, num_heads


def check_multi_head_attention(x: np.ndarray, p: AttentionParams, mask: np.ndarray | None,
                               cache: LayerCache | None = None,
                               rotate: tuple[np.ndarray, np.ndarray] | None = None) -> tuple:
    x = float_array("multi_head_attention: x", x, ndim=3)
    if x.shape[-1] != p.w_q.shape[0]:
        raise ValueError(f"multi_head_attention: x must be (B, T, {p.w_q.shape[0]}), got "
                         f"{x.shape}")
    return x, p, mask, cache, rotate
