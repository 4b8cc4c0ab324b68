"""Multi-head latent attention (MLA): cache one narrow latent per token instead of K and V.

    c = x W_dkv                   (B, T, d_c)      the ONLY thing cached, shared by every head
    K = c W_uk,  V = c W_uv       (B, T, H * d)    keys and values, rebuilt from the latent
    q = x W_q + b_q               (B, T, H * d)

The explicit form rebuilds K and V from every cached latent at every step. The absorbed form never
builds them: for head h, with W_uk_h (d_c, d) its slice of W_uk,

    score = q_h . (c W_uk_h) / sqrt(d) = (q_h W_uk_h^T) . c / sqrt(d)     W_uk moves into the query
    out   = sum_j p_j (c_j W_uv_h) W_O_h = (sum_j p_j c_j) (W_uv_h W_O_h)  W_uv moves into W_O

so attention runs on the latents directly: every head's query, turned into a d_c-wide vector,
meets the same latents, which serve as the one shared key AND the one shared value (multi-query
attention of width d_c). A cached layer therefore holds d_c numbers per token instead of
2 * H * d. DeepSeek-V2 (DeepSeek-AI, 2024, arXiv:2405.04434) caches d_c = 512 plus a 64-wide
decoupled RoPE key per token and reports a 93.3% smaller KV cache than its earlier DeepSeek 67B.

Biases: b_q and b_o stay, W_dkv, W_uk, W_uv have none. A key bias adds q . b_k to every score of a
query's row, which softmax ignores; a value bias comes out as b_v W_O whatever the weights (they
sum to 1), which is a change of b_o. tests/test_latent.py proves both by turning an MHA model
with random biases into this one.

MLA is a different attention, not only a different cache, so it is a model of its own kind:
LatentConfig (GPTConfig plus kv_latent) says which weights a layer has and builds LatentParams,
which attend when called; LatentGPT is GPT with that config and a cache of LatentCache layers.
GPT itself, and the mask, the cache protocol and generate.py, are unchanged: block.py never
names MLA. RoPE is refused (see ROPE_REFUSAL), and so are grouped K/V heads. There is no fast
path for it (fast/model.py's FastGPT refuses a LatentConfig): LatentGPT runs the readable forward.

What each kind of cache costs per token, formula against real caches: `python tools/latent.py
--memory`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from attention import (
    grouped_attention,
    merge_heads,
    scaled_dot_product_attention,
    split_heads,
)
from block import GPT, GPTConfig
from cache import CACHE_DTYPES, KVCache, ModelCache
from parts.checks import door, fits_in_memory, float_array, float_dtype, is_int, positive_int

if TYPE_CHECKING:  # type hints only
    from cache import LayerCache

LATENT_NAMES = ("w_q", "b_q", "w_dkv", "w_uk", "w_uv", "w_o", "b_o")
ROPE_REFUSAL = (
    "GPTConfig: kv_latent with rope=True is not implemented. RoPE turns q by R_m and k by R_n, "
    "so a score is q W_q R_m . R_n^T (c W_uk)... = x W_q R_(m-n) W_uk^T c^T: the rotation R_(m-n) "
    "sits between W_q and W_uk and depends on the pair of positions, so it cannot be folded into "
    "one fixed matrix, and W_uk could no longer be absorbed into the query. DeepSeek-V2 keeps a "
    "separate small RoPE key per token for that; this repo does not build it.")


@dataclass
class LatentConfig(GPTConfig):
    """GPTConfig plus kv_latent = d_c: each layer caches one latent of this width per token."""

    kv_latent: int | None = None  # d_c, the latent width (required: None is refused)

    def __post_init__(self) -> None:
        """Checks kv_latent (a positive int), no grouped K/V heads (every head already reads the
        one shared latent), no RoPE, and no window (a latent cache keeps every position)."""
        super().__post_init__()
        if not is_int(self.kv_latent) or self.kv_latent < 1:
            raise ValueError(f"LatentConfig.kv_latent must be a positive int (the latent width "
                             f"d_c), got {self.kv_latent!r}")
        self.kv_latent = int(self.kv_latent)
        if self.n_kv_heads != self.n_heads:
            raise ValueError(f"GPTConfig: kv_latent with n_kv_heads={self.n_kv_heads} < n_heads="
                             f"{self.n_heads} is refused: every head already reads the one shared "
                             "latent, so there are no K/V heads left to group")
        if self.rope:
            raise ValueError(ROPE_REFUSAL)
        if self.sliding_window is not None:
            raise ValueError("GPTConfig: kv_latent with a sliding_window is not implemented "
                             "(a latent cache keeps every position)")

    @property
    def kv_shape(self) -> tuple[int, int]:
        """One latent per token and layer: one shared K/V "head" of width d_c."""
        return 1, self.kv_latent

    def attention_shapes(self) -> dict[str, tuple[int, ...]]:
        """W_dkv, W_uk, W_uv instead of W_k, W_v (and no K/V biases)."""
        D, d_c, q = self.d_model, self.kv_latent, self.n_heads * self.d_head
        return {"attn.w_q": (D, q), "attn.b_q": (q,), "attn.w_dkv": (D, d_c),
                "attn.w_uk": (d_c, q), "attn.w_uv": (d_c, q), "attn.w_o": (q, D),
                "attn.b_o": (D,)}

    def attention_params(self, w: dict[str, np.ndarray]) -> LatentParams:
        return LatentParams(*(w[f"attn.{n}"] for n in LATENT_NAMES), self.n_heads)

    def init_std_of(self, name: str, shape: tuple[int, ...]) -> float:
        """init_std, except W_uk and W_uv, which start at 1 / sqrt(d_c) (unless init_std is 0).
        Why: K = x W_dkv W_uk is a product of two matrices, and with 0.02 for both, keys and
        values start about 9x smaller than an MHA model's x W_k and each factor's gradient is
        scaled by the other, small one; training stalled (loss 2.6 against MHA's 0.6 after 400
        steps). With W_uk ~ 1 / sqrt(d_c) the product starts at MHA's scale."""
        if self.init_std and name.endswith((".attn.w_uk", ".attn.w_uv")):
            return 1 / math.sqrt(shape[0])  # shape (d_c, H d): preserves the latent's scale
        return self.init_std


class LatentGPT(GPT):
    """GPT with latent attention: LatentGPT(LatentConfig(..., kv_latent=32)), LatentGPT.load(path).
    Its cache holds one latent per token and layer."""

    config_class = LatentConfig

    def new_cache(self, batch_size: int, dtype: np.dtype | type | str | None = None
                  ) -> ModelCache:
        """An empty cache for batch_size rows: one LatentCache (B, max_seq_len, d_c) per layer,
        stored as dtype (default: the model's)."""
        c = self.config
        dtype = self.dtype if dtype is None else dtype
        fits_in_memory(f"a latent cache for {batch_size!r} rows",
                       latent_cache_bytes(c.n_layers, positive_int("batch_size", batch_size),
                                          c.max_seq_len, c.kv_latent, dtype))
        return ModelCache([LatentCache(batch_size, c.max_seq_len, c.kv_latent, dtype, self.zeros)
                           for _ in range(c.n_layers)])


@dataclass(frozen=True)
class LatentParams:
    """One latent attention layer, used as x @ W (+ b): w_q (D, H d), b_q (H d,), w_dkv (D, d_c),
    w_uk and w_uv (d_c, H d), w_o (H d, D), b_o (D,). Frozen: weights change in place only."""

    w_q: np.ndarray
    b_q: np.ndarray
    w_dkv: np.ndarray
    w_uk: np.ndarray
    w_uv: np.ndarray
    w_o: np.ndarray
    b_o: np.ndarray
    n_heads: int

    def __post_init__(self) -> None:
        """Checks the shapes agree with each other and with the head count."""
        H = positive_int("LatentParams n_heads", self.n_heads)
        D, q = np.shape(self.w_q)[0], np.shape(self.w_q)[-1]
        d_c = np.shape(self.w_dkv)[-1]
        expected = {"w_q": (D, q), "b_q": (q,), "w_dkv": (D, d_c), "w_uk": (d_c, q),
                    "w_uv": (d_c, q), "w_o": (q, D), "b_o": (D,)}
        for name, shape in expected.items():
            a = float_array(f"LatentParams {name}", getattr(self, name))
            if a.shape != shape or q % H:
                raise ValueError(f"LatentParams: {name} must be {shape} for {H} heads, got "
                                 f"{a.shape}")

    @property
    def d_latent(self) -> int:
        return self.w_dkv.shape[1]

    def __call__(self, x: np.ndarray, mask: np.ndarray | None, cache: LayerCache | None = None,
                 rotate: tuple[np.ndarray, np.ndarray] | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
        return latent_attention(x, self, mask, cache, rotate)


# --- the cache -----------------------------------------------------------------------------------

class LatentCache(KVCache):
    """One layer's latents, (B, max_len, d_c), allocated once at full length.

    In the absorbed form the latent is the one key and the one value every head reads, so this is
    a KVCache of one K/V head of width d_c whose keys and values are the same buffer: `keys` and
    `values` are both views (B, 1, max_len, d_c) of `latents`, and append(c, c) takes the latent
    as both (anything else is refused). nbytes counts the buffer once."""

    def __init__(
        self, batch_size: int, max_len: int, d_latent: int,
        dtype: np.dtype | type | str = np.float32, zeros: Callable[..., np.ndarray] = np.zeros,
    ) -> None:
        """Allocates the latent buffer, zeroed. Checks its arguments."""
        shape = tuple(positive_int(f"LatentCache {name}", value) for name, value in (
            ("batch_size", batch_size), ("max_len", max_len), ("d_latent", d_latent)))
        dtype = float_dtype("LatentCache dtype", dtype, CACHE_DTYPES)
        fits_in_memory(f"LatentCache {shape}", math.prod(shape) * dtype.itemsize)
        self.latents = zeros(shape, dtype=dtype)  # (B, max_len, d_c)
        self.length = 0

    @property
    def keys(self) -> np.ndarray:
        return self.latents[:, None]  # (B, max_len, d_c) -> (B, 1, max_len, d_c): a view

    @property
    def values(self) -> np.ndarray:
        return self.latents[:, None]  # the same buffer: the latent is also the value

    @property
    def nbytes(self) -> int:
        """Bytes of the one latent buffer: d_c * itemsize per token, per row."""
        return self.latents.nbytes

    def __repr__(self) -> str:
        return (f"LatentCache(length={self.length}, max_len={self.max_len}, "
                f"batch={self.batch_size}, d_latent={self.d_head}, dtype={self.dtype})")

    def check_append(self, k: np.ndarray, v: np.ndarray) -> None:
        """KVCache's checks, and k and v must be the same latent."""
        super().check_append(k, v)
        if v is not k and not np.array_equal(k, v):
            raise ValueError("LatentCache.append: k and v must be the same latent c "
                             "(B, 1, t, d_c): one latent per token is the key and the value")

    def update(self, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Write the t new latents once and return views of every latent held, as (keys,
        values), both (B, 1, length + t, d_c). v is k (the latent), so only k is read."""
        k = self.narrowed("k", k)
        start, end = self.length, self.length + k.shape[2]
        self.latents[:, start:end] = k[:, 0]  # (B, 1, t, d_c) -> (B, t, d_c)
        self.length = end
        held = self.latents[:, None, :end]  # (B, 1, length + t, d_c): a view
        return held, held


def latent_cache_bytes(n_layers: int, batch: int, seq_len: int, d_latent: int,
                       dtype: np.dtype | type | str = np.float32) -> int:
    """layers * batch * positions * d_c * bytes: one latent per token and layer, no factor 2."""
    itemsize = float_dtype("dtype", dtype, CACHE_DTYPES).itemsize
    return n_layers * batch * seq_len * d_latent * itemsize


# --- attention on latents ------------------------------------------------------------------------

@door
def latent_attention(
    x: np.ndarray, p: LatentParams, mask: np.ndarray | None,
    cache: LayerCache | None = None, rotate: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The model's MLA layer, multi_head_attention's signature: x (B, T, D) -> (B, T, D) and the
    weights (B, H, T, t_k). Without a cache, the explicit form over the T tokens' own latents;
    with one, the new latents are appended and the absorbed form runs on every latent held.
    rotate must be None (LatentConfig refuses RoPE)."""
    q = split_heads(x @ p.w_q + p.b_q, p.n_heads)  # (B, T, D) -> (B, H, T, d)
    c = x @ p.w_dkv  # (B, T, D) -> (B, T, d_c): all this token leaves behind
    if cache is None:
        return explicit_attention(q, c, p, mask)
    c = c[:, None]  # (B, T, d_c) -> (B, 1, T, d_c): one shared K/V head
    c, _ = cache.update(c, c)  # (B, 1, cached + T, d_c): the latent is key and value
    return absorbed_attention(q, c[:, 0].astype(q.dtype, copy=False), p, mask)


def explicit_attention(q: np.ndarray, c: np.ndarray, p: LatentParams, mask: np.ndarray | None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """K and V rebuilt from the latents, then ordinary multi-head attention: q (B, H, T, d),
    c (B, t_k, d_c) -> (B, T, D) and weights (B, H, T, t_k). The specification."""
    k = split_heads(c @ p.w_uk, p.n_heads)  # (B, t_k, d_c) -> (B, t_k, H d) -> (B, H, t_k, d)
    v = split_heads(c @ p.w_uv, p.n_heads)  # (B, t_k, d_c) -> (B, H, t_k, d)
    out, weights = scaled_dot_product_attention(q, k, v, mask)  # (B, H, T, d)
    return merge_heads(out) @ p.w_o + p.b_o, weights  # (B, H, T, d) -> (B, T, D)


def absorbed_attention(q: np.ndarray, c: np.ndarray, p: LatentParams, mask: np.ndarray | None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """explicit_attention's numbers without building K or V: W_uk absorbed into the query, W_uv
    into W_O. q (B, H, T, d), c (B, t_k, d_c) -> (B, T, D) and weights (B, H, T, t_k)."""
    B, H, T, d = q.shape
    d_c = c.shape[-1]
    w_uk = p.w_uk.reshape(d_c, H, d).transpose(1, 0, 2)  # (d_c, H d) -> (H, d_c, d)
    w_uv = p.w_uv.reshape(d_c, H, d).transpose(1, 0, 2)  # (d_c, H d) -> (H, d_c, d)
    w_o = p.w_o.reshape(H, d, -1)  # (H d, D) -> (H, d, D): head h's rows of W_O
    # A serving engine computes these two once per set of weights; here they follow any in-place
    # change of the weights for free. (H, d, d_c) and (H, d_c, D).
    q_c = q @ w_uk.transpose(0, 2, 1)  # (B, H, T, d) @ (H, d, d_c) -> (B, H, T, d_c)
    w_uvo = w_uv @ w_o  # (H, d_c, d) @ (H, d, D) -> (H, d_c, D)
    # Attention divides scores by sqrt(width) = sqrt(d_c); the model's scores use sqrt(d).
    q_c = q_c * math.sqrt(d_c / d)
    shared = c[:, None]  # (B, t_k, d_c) -> (B, 1, t_k, d_c): one K/V head for all H
    out_c, weights = grouped_attention(q_c, shared, shared, mask)  # (B, H, T, d_c)
    out = np.einsum("bhtc,hcD->btD", out_c, w_uvo)  # sum over heads of out_c[h] @ w_uvo[h]
    return out + p.b_o, weights  # (B, T, D)


def check_latent_attention(x: np.ndarray, p: LatentParams, mask: np.ndarray | None,
                           cache: LayerCache | None = None,
                           rotate: tuple[np.ndarray, np.ndarray] | None = None) -> tuple:
    x = float_array("latent_attention: x", x, ndim=3)
    if x.shape[-1] != p.w_q.shape[0] or rotate is not None:
        raise ValueError(f"latent_attention: x must be (B, T, {p.w_q.shape[0]}) and rotate None, "
                         f"got {x.shape} and {'angles' if rotate is not None else None}")
    return (x,)
