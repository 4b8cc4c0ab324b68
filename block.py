"""A tiny GPT: token ids (B, T) -> logits (B, T, vocab), built from GPT-2's pre-LN block.

    x = wte[ids] + wpe[positions]              (B, T, D)   learned positions (or RoPE in attention)
    for each block:
        x = x + attention(layer_norm_1(x))     (B, T, D)   tokens talk to earlier tokens
        x = x + mlp(layer_norm_2(x))           (B, T, D)   each token thinks on its own
    logits = layer_norm_f(x) @ wte.T           (B, T, V)   the LM head is the embedding, tied

Positions live in one place: the cache length. A forward with a cache treats `ids` as the positions
that follow what the cache already holds; without a cache they start at 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from attention import AttentionParams, causal_mask, layer_norm, multi_head_attention
from cache import KVCache
from rope import rope_angles


@dataclass
class GPTConfig:
    """The model's sizes. Defaults are the assignment's suggested config."""

    vocab_size: int = 256  # token ids are 0 .. vocab_size - 1
    max_seq_len: int = 128  # the answer sheet: no position beyond this exists
    d_model: int = 128  # width of every token's hidden vector
    n_heads: int = 4  # query heads; d_head = d_model // n_heads = 32
    n_layers: int = 2  # blocks stacked
    n_kv_heads: int | None = None  # key/value heads: None = n_heads (MHA), 1 = multi-query (MQA)
    rope: bool = False  # rotary positions in attention instead of a learned position table
    rope_base: float = 10000.0  # RoPE's frequency base
    d_ff: int | None = None  # MLP hidden width; None = 4 * d_model as in GPT-2
    ln_eps: float = 1e-5  # LayerNorm epsilon, GPT-2's value
    init_std: float = 0.02  # std of the random weights (GPT-2's initializer_range)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_seq_len", "d_model", "n_heads", "n_layers"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTConfig: {name} must be a positive int, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"GPTConfig: d_model={self.d_model} is not divisible by "
                             f"n_heads={self.n_heads}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if (not isinstance(self.n_kv_heads, (int, np.integer)) or self.n_kv_heads < 1
                or self.n_heads % self.n_kv_heads):
            raise ValueError(f"GPTConfig: n_kv_heads={self.n_kv_heads!r} must be a positive "
                             f"divisor of n_heads={self.n_heads}")
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        if self.rope and self.d_head % 2:
            raise ValueError(f"GPTConfig: RoPE needs an even d_head, got {self.d_head}")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads


@dataclass
class BlockParams:
    """One pre-LN block's weights: two LayerNorms, attention, and the MLP (used as x @ W + b)."""

    ln_1: tuple[np.ndarray, np.ndarray]  # (gamma, beta), each (D,)
    attn: AttentionParams
    ln_2: tuple[np.ndarray, np.ndarray]
    w_fc: np.ndarray  # (D, d_ff)
    b_fc: np.ndarray  # (d_ff,)
    w_proj: np.ndarray  # (d_ff, D)
    b_proj: np.ndarray  # (D,)


def gelu(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation (GPT-2's "gelu_new"). Same shape in and out."""
    # x * x * x, not x**3: NumPy's float32 power is a scalar pow per element, ~200x slower here.
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * (x * x * x))))


def mlp(x: np.ndarray, p: BlockParams) -> np.ndarray:
    """Position-wise feed-forward: (B, T, D) -> (B, T, d_ff) -> (B, T, D)."""
    return gelu(x @ p.w_fc + p.b_fc) @ p.w_proj + p.b_proj


def transformer_block(
    x: np.ndarray, p: BlockParams, mask: np.ndarray, cache: KVCache | None,
    rotate: tuple[np.ndarray, np.ndarray] | None, eps: float,
) -> tuple[np.ndarray, np.ndarray]:
    """x (B, T, D) -> (B, T, D) and this layer's attention weights (B, H, T, t_k).

    Pre-LN residual: each sublayer reads a normalised copy and adds its answer to the stream, so
    the residual path from input to output stays an identity plus corrections.
    """
    attn_out, weights = multi_head_attention(layer_norm(x, *p.ln_1, eps), p.attn, mask, cache,
                                             rotate)
    x = x + attn_out
    x = x + mlp(layer_norm(x, *p.ln_2, eps), p)
    return x, weights


def positions_and_mask(
    past: int, T: int, attention_mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the T new tokens and the mask they attend with; built once per forward.

    Without padding: positions past .. past + T - 1, shape (1, T), and the causal mask
    (1, 1, T, past + T), bottom-right aligned because the new tokens are the last T.
    With attention_mask (B, past + T), 1 = real token, 0 = pad: each row counts only its real
    tokens (position = real tokens before it), and pads are hidden as keys:
    mask (B, 1, T, past + T).
    """
    mask = causal_mask(T, past + T)[None, None]  # (T, t_k) -> (1, 1, T, t_k): all batches, heads
    if attention_mask is None:
        return np.arange(past, past + T)[None], mask
    real = attention_mask.astype(bool)  # (B, t_k)
    positions = np.maximum(np.cumsum(real, axis=1)[:, past:] - 1, 0)  # (B, T); pads clamp to 0
    return positions, mask & real[:, None, None, :]  # (B, t_k) -> (B, 1, 1, t_k) for every query


class GPT:
    """A GPT-2-style decoder. `model(ids)` runs the whole sequence; `model(ids, cache)` runs only
    the new tokens and reads earlier keys and values from the cache."""

    def __init__(self, config: GPTConfig, seed: int = 0, dtype: np.dtype | type = np.float32):
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise TypeError(f"GPT: dtype must be float32 or float64, got {dtype}")
        self.config, self.dtype = config, dtype
        c, rng = config, np.random.default_rng(seed)

        def normal(*shape: int) -> np.ndarray:
            return (rng.standard_normal(shape) * c.init_std).astype(dtype)

        def zeros(n: int) -> np.ndarray:
            return np.zeros(n, dtype)

        def ones(n: int) -> np.ndarray:
            return np.ones(n, dtype)

        D, kv = c.d_model, c.n_kv_heads * c.d_head
        self.wte = normal(c.vocab_size, D)  # (V, D)
        self.wpe = None if c.rope else normal(c.max_seq_len, D)  # (max_seq_len, D)
        self.blocks = [
            BlockParams(
                ln_1=(ones(D), zeros(D)),
                attn=AttentionParams(normal(D, D), zeros(D), normal(D, kv), zeros(kv),
                                     normal(D, kv), zeros(kv), normal(D, D), zeros(D),
                                     c.n_heads, c.n_kv_heads),
                ln_2=(ones(D), zeros(D)),
                w_fc=normal(D, c.d_ff), b_fc=zeros(c.d_ff),
                w_proj=normal(c.d_ff, D), b_proj=zeros(D),
            )
            for _ in range(c.n_layers)
        ]
        self.ln_f = (ones(D), zeros(D))

    # --- loading GPT-2 weights -------------------------------------------------------------------

    @classmethod
    def from_gpt2(cls, state_dict: dict, n_heads: int, dtype: np.dtype | type = np.float32) -> GPT:
        """Build the model from a Hugging Face GPT2LMHeadModel (or GPT2Model) state_dict, whose
        values may be torch tensors or NumPy arrays. GPT-2's Conv1D stores weights as (in, out),
        which is exactly our x @ W layout; its fused c_attn (D, 3D) is split into W_q, W_k, W_v."""
        sd = _gpt2_arrays(state_dict, dtype)
        for key in ("wte.weight", "wpe.weight", "h.0.mlp.c_fc.weight"):
            if key not in sd:
                raise ValueError(f"from_gpt2: state_dict is missing {key!r}")
            if sd[key].ndim != 2:
                raise ValueError(f"from_gpt2: {key} must be a 2-D matrix, got {sd[key].shape}")
        # Sizes come from these three; every other key is then checked against them.
        V, D = sd["wte.weight"].shape
        max_seq_len, d_ff = len(sd["wpe.weight"]), sd["h.0.mlp.c_fc.weight"].shape[1]
        if not isinstance(n_heads, (int, np.integer)) or n_heads < 1 or D % n_heads:
            raise ValueError(f"from_gpt2: n_heads={n_heads!r} must divide d_model={D}")
        config = GPTConfig(vocab_size=V, max_seq_len=max_seq_len, d_model=D, n_heads=n_heads,
                           n_layers=_gpt2_layer_count(sd), d_ff=d_ff)
        _check_gpt2_shapes(sd, config)
        model = cls.__new__(cls)
        model.config, model.dtype = config, np.dtype(dtype)
        model.wte, model.wpe = sd["wte.weight"], sd["wpe.weight"]
        model.blocks = []
        for i in range(config.n_layers):
            h = {key: sd[f"h.{i}.{key}"] for key in _GPT2_BLOCK_KEYS}
            w_q, w_k, w_v = np.split(h["attn.c_attn.weight"], 3, axis=1)  # (D, 3D) -> 3 x (D, D)
            b_q, b_k, b_v = np.split(h["attn.c_attn.bias"], 3)  # (3D,) -> 3 x (D,)
            model.blocks.append(BlockParams(
                ln_1=(h["ln_1.weight"], h["ln_1.bias"]),
                attn=AttentionParams(np.ascontiguousarray(w_q), b_q, np.ascontiguousarray(w_k),
                                     b_k, np.ascontiguousarray(w_v), b_v,
                                     h["attn.c_proj.weight"], h["attn.c_proj.bias"],
                                     n_heads, n_heads),
                ln_2=(h["ln_2.weight"], h["ln_2.bias"]),
                w_fc=h["mlp.c_fc.weight"], b_fc=h["mlp.c_fc.bias"],
                w_proj=h["mlp.c_proj.weight"], b_proj=h["mlp.c_proj.bias"],
            ))
        model.ln_f = (sd["ln_f.weight"], sd["ln_f.bias"])
        return model

    # --- the cache -------------------------------------------------------------------------------

    def new_cache(self, batch_size: int, dtype: np.dtype | type | None = None) -> list[KVCache]:
        """One empty KVCache per layer, each (B, H_kv, max_seq_len, d_head) for K and for V."""
        c = self.config
        return [KVCache(batch_size, c.n_kv_heads, c.max_seq_len, c.d_head, dtype or self.dtype)
                for _ in range(c.n_layers)]

    # --- the forward pass ------------------------------------------------------------------------

    def __call__(
        self, ids: np.ndarray, cache: list[KVCache] | None = None,
        attention_mask: np.ndarray | None = None, last_only: bool = False,
        return_attention: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, list[np.ndarray]]:
        """ids (B, T) int -> logits (B, T, V), or (B, 1, V) with last_only (the LM head is then
        computed for the last position only, as generation needs).

        cache: from new_cache(B); the T tokens follow the len(cache) positions it holds, and their
        keys and values are appended. attention_mask (B, len(cache) + T): 1 real, 0 pad (for left
        padding). return_attention also returns each layer's weights (B, H, T, len(cache) + T).
        Every argument is checked before any cache is touched.
        """
        ids = self._check_ids(ids)
        B, T = ids.shape
        past = self._check_cache(cache, B, T)
        if attention_mask is not None:
            attention_mask = np.asarray(attention_mask)
            if attention_mask.shape != (B, past + T):
                raise ValueError(f"GPT: attention_mask must be (B, cached + T) = {(B, past + T)}, "
                                 f"got {attention_mask.shape}")
        positions, mask = positions_and_mask(past, T, attention_mask)  # (1|B, T), (1|B, 1, T, t_k)
        c = self.config
        x = self.wte[ids]  # (B, T) -> (B, T, D)
        rotate = None
        if c.rope:
            rotate = rope_angles(positions, c.d_head, c.rope_base, self.dtype)
        else:
            x = x + self.wpe[positions]  # (1|B, T) -> (1|B, T, D), broadcast over the batch
        attention = []
        for layer, p in enumerate(self.blocks):
            x, weights = transformer_block(x, p, mask, None if cache is None else cache[layer],
                                           rotate, c.ln_eps)
            attention.append(weights)
        if last_only:
            x = x[:, -1:]  # (B, T, D) -> (B, 1, D)
        logits = layer_norm(x, *self.ln_f, c.ln_eps) @ self.wte.T  # (B, T, D) -> (B, T, V)
        return (logits, attention) if return_attention else logits

    def _check_ids(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        if not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"GPT: ids must be integers, got dtype {ids.dtype}")
        if ids.ndim != 2 or ids.shape[1] < 1:
            raise ValueError(f"GPT: ids must be (B, T) with T >= 1, got shape {ids.shape}")
        V = self.config.vocab_size
        if ids.size and (ids.min() < 0 or ids.max() >= V):
            raise ValueError(f"GPT: token ids must be in [0, {V}), got min {ids.min()} "
                             f"max {ids.max()}")
        return ids

    def _check_cache(self, cache: list[KVCache] | None, B: int, T: int) -> int:
        """Return the number of cached positions (0 without a cache) after checking that the
        cache fits this model and batch and has room for T more."""
        c = self.config
        past = 0
        if cache is not None:
            if len(cache) != c.n_layers or not all(isinstance(kv, KVCache) for kv in cache):
                raise TypeError(f"GPT: cache must be a list of {c.n_layers} KVCache "
                                "(use model.new_cache(batch_size))")
            lengths = {len(kv) for kv in cache}
            if len(lengths) != 1:
                raise ValueError(f"GPT: layer caches disagree on length: {sorted(lengths)}")
            past = lengths.pop()
            shape = (B, c.n_kv_heads, c.d_head)
            for kv in cache:
                got = (kv.keys.shape[0], kv.keys.shape[1], kv.keys.shape[3])
                if got != shape:
                    raise ValueError(f"GPT: cache is (B, H_kv, d_head) = {got}, this call needs "
                                     f"{shape}")
                if past + T > kv.max_len:
                    raise ValueError(f"GPT: {T} new tokens after {past} cached exceed the "
                                     f"cache's max_len={kv.max_len}")
        if past + T > c.max_seq_len:
            raise ValueError(f"GPT: {past + T} positions exceed max_seq_len={c.max_seq_len}")
        return past


# --- GPT-2 state_dict helpers --------------------------------------------------------------------

_GPT2_BLOCK_KEYS = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
                    "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
                    "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")


def _gpt2_arrays(state_dict: dict, dtype: np.dtype | type) -> dict[str, np.ndarray]:
    """Strip the 'transformer.' prefix, drop buffers we do not use, convert to NumPy `dtype`."""
    if not hasattr(state_dict, "items"):
        raise TypeError(f"from_gpt2: state_dict must be a mapping, got {type(state_dict)}")
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("transformer.")
        if key.startswith("lm_head") or key.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # the LM head is tied to wte; attn.bias is GPT-2's stored causal mask
        if hasattr(value, "detach"):  # a torch tensor, converted without importing torch
            value = value.detach().cpu().numpy()
        out[key] = np.array(value, dtype=dtype, order="C", copy=True)  # never alias the caller
    return out


def _gpt2_layer_count(sd: dict[str, np.ndarray]) -> int:
    """Highest block index of ANY 'h.N.' key + 1, so that a block with a key missing is reported
    as missing rather than silently dropped."""
    indices = set()
    for key in sd:
        if key.startswith("h."):
            index = key.split(".")[1]
            if not index.isdigit():
                raise ValueError(f"from_gpt2: unexpected key {key!r} (expected 'h.<int>.')")
            indices.add(int(index))
    return 1 + max(indices)


def _check_gpt2_shapes(sd: dict[str, np.ndarray], c: GPTConfig) -> None:
    D, F = c.d_model, c.d_ff
    expected = {"wte.weight": (c.vocab_size, D), "wpe.weight": (c.max_seq_len, D),
                "ln_f.weight": (D,), "ln_f.bias": (D,)}
    block = dict(zip(_GPT2_BLOCK_KEYS, [(D,), (D,), (D, 3 * D), (3 * D,), (D, D), (D,), (D,),
                                        (D,), (D, F), (F,), (F, D), (D,)], strict=True))
    for i in range(c.n_layers):
        expected.update({f"h.{i}.{k}": shape for k, shape in block.items()})
    missing = sorted(set(expected) - set(sd))
    if missing:
        raise ValueError(f"from_gpt2: state_dict is missing {len(missing)} keys, e.g. "
                         f"{missing[:4]}")
    wrong = [f"{k}: got {sd[k].shape}, expected {s}" for k, s in expected.items()
             if sd[k].shape != s]
    if wrong:
        raise ValueError(f"from_gpt2: mis-shaped weights: {wrong[:4]}")

