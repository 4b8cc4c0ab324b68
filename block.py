"""A tiny GPT: token ids (B, T) -> logits (B, T, vocab), built from GPT-2's pre-LN block.

    x = wte[ids] + wpe[positions]              (B, T, D)   learned positions (or RoPE in attention)
    for each block:
        x = x + attention(layer_norm_1(x))     (B, T, D)   tokens talk to earlier tokens
        x = x + mlp(layer_norm_2(x))           (B, T, D)   each token thinks on its own
    logits = layer_norm_f(x) @ wte.T           (B, T, V)   the LM head is the embedding, tied

A token's position is the number of real (non-padding) tokens before it in its row; with a cache
the model reads which earlier positions were real from the cache (cache.py), so positions and the
padding mask have one home however many calls a sequence takes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from attention import (
    AttentionParams,
    causal_mask,
    keys_and_values,
    layer_norm,
    linear,
    multi_head_attention,
)
from cache import KVCache, ModelCache, kv_cache_bytes
from parts import weights as weight_files
from parts.checks import (
    finite_number,
    fits_in_memory,
    float_dtype,
    is_int,
    positive_int,
    token_ids,
    zero_one_mask,
)
from parts.rope import rope_angles

MODEL_DTYPES = ("float32", "float64")


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
            setattr(self, name, positive_int(f"GPTConfig.{name}", getattr(self, name)))
        if self.d_model % self.n_heads:
            raise ValueError(f"GPTConfig: d_model={self.d_model} is not divisible by "
                             f"n_heads={self.n_heads}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if not is_int(self.n_kv_heads) or self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
            raise ValueError(f"GPTConfig: n_kv_heads={self.n_kv_heads!r} must be a positive "
                             f"divisor of n_heads={self.n_heads}")
        self.d_ff = positive_int("GPTConfig.d_ff", 4 * self.d_model if self.d_ff is None
                                 else self.d_ff)
        if not isinstance(self.rope, bool):
            raise TypeError(f"GPTConfig.rope must be True or False, got {self.rope!r}")
        self.rope_base = finite_number("GPTConfig.rope_base", self.rope_base, above=0)
        self.ln_eps = finite_number("GPTConfig.ln_eps", self.ln_eps, above=0)
        self.init_std = finite_number("GPTConfig.init_std", self.init_std, at_least=0)
        if self.rope and self.d_head % 2:
            raise ValueError(f"GPTConfig: RoPE needs an even d_head, got {self.d_head}")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads


def weight_shapes(c: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every weight of the model, by name, with its shape: the one table that random init,
    loading, saving and Hugging Face conversion are all checked against. Matrices are used as
    x @ W (GPT-2's layout): (in, out)."""
    shapes = outer_shapes(c)
    for i in range(c.n_layers):
        shapes |= {f"h.{i}.{name}": shape for name, shape in block_shapes(c).items()}
    return shapes


def outer_shapes(c: GPTConfig) -> dict[str, tuple[int, ...]]:
    """The weights outside the blocks: the embeddings and the final LayerNorm."""
    D = c.d_model
    shapes = {"wte": (c.vocab_size, D)}
    if not c.rope:
        shapes["wpe"] = (c.max_seq_len, D)
    return shapes | {"ln_f.gamma": (D,), "ln_f.beta": (D,)}


def block_shapes(c: GPTConfig) -> dict[str, tuple[int, ...]]:
    """One block's weights, named as inside block i ("h.{i}." goes in front)."""
    D, F, q, kv = c.d_model, c.d_ff, c.n_heads * c.d_head, c.n_kv_heads * c.d_head
    return {"ln_1.gamma": (D,), "ln_1.beta": (D,),
            "attn.w_q": (D, q), "attn.b_q": (q,), "attn.w_k": (D, kv), "attn.b_k": (kv,),
            "attn.w_v": (D, kv), "attn.b_v": (kv,), "attn.w_o": (q, D), "attn.b_o": (D,),
            "ln_2.gamma": (D,), "ln_2.beta": (D,),
            "mlp.w_fc": (D, F), "mlp.b_fc": (F,), "mlp.w_proj": (F, D), "mlp.b_proj": (D,)}


def count_weights(c: GPTConfig) -> int:
    """How many numbers the model holds, from the tables (without building the full one)."""
    def total(shapes: dict[str, tuple[int, ...]]) -> int:
        return sum(math.prod(shape) for shape in shapes.values())

    return total(outer_shapes(c)) + c.n_layers * total(block_shapes(c))


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


SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def gelu(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation (GPT-2's "gelu_new"):
    0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))). Same shape in and out; x is not changed."""
    return gelu_in_place(np.array(x, dtype=np.result_type(x, 1.0)))  # a float copy to work in


def gelu_in_place(x: np.ndarray) -> np.ndarray:
    """gelu written over x (a fresh float array nobody else needs), and returned.

    Why: the MLP's hidden layer is (B, T, 4 D), 6 MB at GPT-2-small width and 512 tokens, and
    every NumPy operator is one single-threaded pass that, written as one expression, allocates
    its own result: seven arrays of that size. Here one temporary t holds the bracket.
    """
    t = x * x  # x^2 ...
    t *= 0.044715 * SQRT_2_OVER_PI
    t += SQRT_2_OVER_PI
    t *= x  # ... t = sqrt(2 / pi) (x + 0.044715 x^3), by multiplications (x**3 is a slow pow)
    np.tanh(t, out=t)
    t += 1.0
    t *= 0.5
    x *= t  # 0.5 x (1 + tanh(...))
    return x


def mlp(x: np.ndarray, p: BlockParams) -> np.ndarray:
    """Position-wise feed-forward: (B, T, D) -> (B, T, d_ff) -> (B, T, D)."""
    h = gelu_in_place(linear(x, p.w_fc, p.b_fc))  # (B, T, D) -> (B, T, d_ff): its own array
    return linear(h, p.w_proj, p.b_proj)  # (B, T, d_ff) -> (B, T, D)


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


def last_position_only(
    x: np.ndarray, p: BlockParams, mask: np.ndarray, kv: KVCache | None,
    rotate: tuple[np.ndarray, np.ndarray] | None, eps: float,
) -> tuple[np.ndarray, np.ndarray, KVCache, tuple[np.ndarray, np.ndarray] | None]:
    """Set up the LAST block of a forward pass whose caller reads only the last position's logits
    (last_only: prefill, and each step of the naive loop).

    That block's output at the other T - 1 positions is never read, but their keys and values
    are (every later token attends to them). So they go into the cache now, straight from
    layer_norm and W_K, W_V, and the block then runs on the last position alone, exactly like a
    decode step after a prefill. Without a cache (the naive path) a temporary one holds the T keys.
    At GPT-2-small shapes and 512 tokens this skips ~7% of a prefill: the other positions'
    queries, attention, W_O and MLP in that block. Hugging Face computes and then drops them.

    x (B, T, D), mask (1 or B, 1, T, t_k), rotate (cos, sin) for the T positions, or None.
    Returns x (B, 1, D), mask (1 or B, 1, 1, t_k), the cache to use, rotate for the last position.
    """
    B, T, _ = x.shape
    if kv is None:
        kv = KVCache(B, p.attn.n_kv_heads, T, x.shape[-1] // p.attn.n_heads, x.dtype)
    earlier = None if rotate is None else (rotate[0][:, :, :-1], rotate[1][:, :, :-1])
    kv.append(*keys_and_values(layer_norm(x[:, :-1], *p.ln_1, eps), p.attn, earlier))
    last = None if rotate is None else (rotate[0][:, :, -1:], rotate[1][:, :, -1:])
    return x[:, -1:], mask[:, :, -1:], kv, last  # (B, T, D) -> (B, 1, D); the last query row


def lm_head(x: np.ndarray, wte: np.ndarray) -> np.ndarray:
    """x (B, T, D) -> logits (B, T, V): each logit is x's dot product with one token's embedding
    (the LM head is the embedding table, tied). One (B * T, D) @ (D, V) product, as in linear."""
    logits = x.reshape(-1, x.shape[-1]) @ wte.T  # (B, T, D) -> (B * T, D) -> (B * T, V)
    return logits.reshape(*x.shape[:-1], wte.shape[0])  # (B * T, V) -> (B, T, V)


def positions_and_mask(real: np.ndarray, T: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the last T tokens and the mask they attend with; built once per forward.

    real (B, t_k) bool: which of the t_k positions (cached + new) hold real tokens. A token's
    position is the number of real tokens before it in its row, so a row's first real token is
    position 0 however much padding comes first (Hugging Face's generate does the same). The mask
    is causal (bottom-right aligned: the new tokens are the last T) and hides padding keys.
    Returns positions (B, T) and mask (1 or B, 1, T, t_k).
    """
    t_k = real.shape[1]
    positions = np.maximum(np.cumsum(real, axis=1)[:, t_k - T:] - 1, 0)  # pads clamp to 0
    mask = causal_mask(T, t_k)[None, None]  # (T, t_k) -> (1, 1, T, t_k): all batches and heads
    if real.all():  # no padding anywhere: the causal mask alone is the whole story
        return positions, mask
    return positions, mask & real[:, None, None, :]  # (B, t_k) -> (B, 1, 1, t_k) for every query


class GPT:
    """A GPT-2-style decoder. `model(ids)` runs the whole sequence; `model(ids, cache)` runs only
    the new tokens and reads earlier keys and values from the cache."""

    def __init__(
        self, config: GPTConfig, seed: int = 0, dtype: np.dtype | type | str = np.float32,
        weights: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Random weights from `seed`, or the given `weights` (name -> array, as weight_shapes
        names them; copied and cast to dtype). Every way of building a model comes through here:
        GPT(...), GPT.load and GPT.from_gpt2."""
        if not isinstance(config, GPTConfig):
            raise TypeError(f"GPT: config must be a GPTConfig, got {type(config).__name__}")
        self.config, self.dtype = config, float_dtype("GPT dtype", dtype, MODEL_DTYPES)
        n_params = count_weights(config)
        # random_weights draws in float64, then they are cast: both exist for a moment.
        fits_in_memory(f"GPT: {n_params:,} weights",
                       n_params * (self.dtype.itemsize + (8 if weights is None else 0)))
        shapes = weight_shapes(config)
        if weights is None:
            if not is_int(seed) or seed < 0:
                raise ValueError(f"GPT: seed must be an int >= 0, got {seed!r}")
            weights = random_weights(shapes, config.init_std, seed)
        named = weight_files.checked(weights, shapes, self.dtype)
        c = config
        self.wte = named["wte"]  # (V, D)
        self.wpe = named.get("wpe")  # (max_seq_len, D), or None with RoPE
        self.blocks = []
        for i in range(c.n_layers):
            w = {name.removeprefix(f"h.{i}."): a for name, a in named.items()
                 if name.startswith(f"h.{i}.")}
            self.blocks.append(BlockParams(
                ln_1=(w["ln_1.gamma"], w["ln_1.beta"]),
                attn=AttentionParams(w["attn.w_q"], w["attn.b_q"], w["attn.w_k"], w["attn.b_k"],
                                     w["attn.w_v"], w["attn.b_v"], w["attn.w_o"], w["attn.b_o"],
                                     c.n_heads, c.n_kv_heads),
                ln_2=(w["ln_2.gamma"], w["ln_2.beta"]),
                w_fc=w["mlp.w_fc"], b_fc=w["mlp.b_fc"], w_proj=w["mlp.w_proj"],
                b_proj=w["mlp.b_proj"]))
        self.ln_f = (named["ln_f.gamma"], named["ln_f.beta"])

    def named_weights(self) -> dict[str, np.ndarray]:
        """name -> array for every weight, the names of weight_shapes (the arrays themselves)."""
        named = {"wte": self.wte} | ({} if self.wpe is None else {"wpe": self.wpe})
        for i, p in enumerate(self.blocks):
            a = p.attn
            named |= {f"h.{i}.{name}": array for name, array in (
                ("ln_1.gamma", p.ln_1[0]), ("ln_1.beta", p.ln_1[1]),
                ("attn.w_q", a.w_q), ("attn.b_q", a.b_q), ("attn.w_k", a.w_k),
                ("attn.b_k", a.b_k), ("attn.w_v", a.w_v), ("attn.b_v", a.b_v),
                ("attn.w_o", a.w_o), ("attn.b_o", a.b_o), ("ln_2.gamma", p.ln_2[0]),
                ("ln_2.beta", p.ln_2[1]), ("mlp.w_fc", p.w_fc), ("mlp.b_fc", p.b_fc),
                ("mlp.w_proj", p.w_proj), ("mlp.b_proj", p.b_proj))}
        return named | {"ln_f.gamma": self.ln_f[0], "ln_f.beta": self.ln_f[1]}

    # --- weights in and out ----------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the config and every weight to a .npz file (no pickle); return its path."""
        return weight_files.write_npz(path, asdict(self.config), self.named_weights())

    @classmethod
    def load(cls, path: str | Path, dtype: np.dtype | type | str = np.float32) -> GPT:
        """A model from a .npz file written by save(). The file is read header first and refused
        (FileNotFoundError, or ValueError naming the path) unless its config names every field
        and its weights match it (names, shapes, float dtype, finite values); TypeError for a
        dtype or path of the wrong kind. Checks its own door."""
        dtype = float_dtype("GPT.load dtype", dtype, MODEL_DTYPES)

        def shapes_for(config: dict) -> dict[str, tuple[int, ...]]:
            return weight_shapes(weight_files.config_from(config, GPTConfig))

        config, named = weight_files.read_npz(path, shapes_for)
        return cls(weight_files.config_from(config, GPTConfig), dtype=dtype, weights=named)

    @classmethod
    def from_gpt2(
        cls, state_dict: dict, n_heads: int | None = None,
        dtype: np.dtype | type | str = np.float32, hf_config: object = None,
    ) -> GPT:
        """A model from a Hugging Face GPT2LMHeadModel (or GPT2Model) state_dict, whose values
        may be torch tensors or NumPy arrays. n_heads is needed unless hf_config (the model's
        GPT2Config) is given; from hf_config also the LayerNorm epsilon and the activation.
        Refused (ValueError/TypeError): an untied LM head, keys we do not compute, a config
        whose sizes contradict the weights or whose settings are not implemented."""
        sizes, named = weight_files.from_gpt2_state_dict(state_dict, n_heads, hf_config)
        return cls(GPTConfig(**sizes), dtype=dtype, weights=named)

    # --- the cache -------------------------------------------------------------------------------

    def new_cache(self, batch_size: int, dtype: np.dtype | type | str | None = None) -> ModelCache:
        """An empty cache for batch_size rows: one KVCache per layer, each (B, H_kv, max_seq_len,
        d_head) for K and for V, stored as dtype (default: the model's)."""
        c = self.config
        dtype = self.dtype if dtype is None else dtype
        # All layers together must fit, not only one (a huge batch is refused before any layer).
        fits_in_memory(f"a cache for {batch_size!r} rows",
                       kv_cache_bytes(c.n_layers, batch_size, c.n_kv_heads, c.d_head,
                                      c.max_seq_len, dtype))
        return ModelCache([KVCache(batch_size, c.n_kv_heads, c.max_seq_len, c.d_head, dtype)
                           for _ in range(c.n_layers)])

    # --- the forward pass ------------------------------------------------------------------------

    def __call__(
        self, ids: np.ndarray, cache: ModelCache | None = None,
        attention_mask: np.ndarray | None = None, last_only: bool = False,
        return_attention: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, list[np.ndarray]]:
        """ids (B, T) int -> logits (B, T, V), or (B, 1, V) with last_only (the LM head is then
        computed for the last position only, as generation needs).

        cache: from new_cache(B); the T tokens follow the len(cache) positions it holds, and their
        keys and values are appended. attention_mask (B, len(cache) + T) of 1 real / 0 pad marks
        padding; with a cache it is needed only on the call that brings the padding (the cache
        keeps it) and is refused if it contradicts what the cache holds. Padding anywhere is
        allowed: a token's position counts the real tokens before it. return_attention also
        returns each layer's weights (B, H, T, len(cache) + T). The whole call is checked before
        the cache changes, and a call that fails anyway leaves the cache as it was.
        """
        ids, new_real = self.check_call(ids, cache, attention_mask)
        if cache is None:
            return self._forward(ids, new_real, None, last_only, return_attention)
        past = len(cache)
        try:
            return self._forward(ids, cache.record(new_real), cache, last_only, return_attention)
        except BaseException:
            cache.truncate(past)  # a failure half-way (out of memory, Ctrl-C) must not leave
            raise                 # some layers one step ahead of the others

    def check_call(
        self, ids: np.ndarray, cache: ModelCache | None, attention_mask: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Check a whole call and return ids (B, T) and which new tokens are real (B, T) bool.
        Raises ValueError/TypeError naming the argument; changes nothing."""
        c = self.config
        ids = token_ids("ids", ids, 2, c.vocab_size)
        B, T = ids.shape
        if cache is None:
            past = 0
            new_real = (np.ones((B, T), dtype=bool) if attention_mask is None
                        else zero_one_mask("attention_mask", attention_mask, (B, T)))
            empty = ~new_real.any(axis=1)
            if empty.any():  # its logits would be meaningless (with a cache, later chunks may
                row = int(np.argmax(empty))  # still bring real tokens, so it is allowed there)
                raise ValueError(f"row {row} of attention_mask has no real token")
        else:
            self._check_cache(cache)
            past = len(cache)
            new_real = cache.check_step(B, T, attention_mask)
        if past + T > c.max_seq_len:
            raise ValueError(f"GPT: {past} cached + {T} new = {past + T} positions exceed "
                             f"max_seq_len={c.max_seq_len}")
        return ids, new_real

    def _check_cache(self, cache: ModelCache) -> None:
        c = self.config
        if not isinstance(cache, ModelCache):
            raise TypeError(f"GPT: cache must be a ModelCache from model.new_cache(batch_size), "
                            f"got {type(cache).__name__}")
        if len(cache.layers) != c.n_layers:
            raise ValueError(f"GPT: cache has {len(cache.layers)} layers, the model "
                             f"{c.n_layers}")
        for i, kv in enumerate(cache.layers):
            if (kv.n_kv_heads, kv.d_head) != (c.n_kv_heads, c.d_head):
                raise ValueError(f"GPT: cache layer {i} is (H_kv, d_head) = "
                                 f"{(kv.n_kv_heads, kv.d_head)}, this model needs "
                                 f"{(c.n_kv_heads, c.d_head)}")

    def _forward(
        self, ids: np.ndarray, real: np.ndarray, cache: ModelCache | None, last_only: bool,
        return_attention: bool,
    ) -> np.ndarray | tuple[np.ndarray, list[np.ndarray]]:
        """The forward pass proper, on checked input. real (B, t_k): which of the t_k positions
        (cached + new) are real tokens."""
        c = self.config
        positions, mask = positions_and_mask(real, ids.shape[1])  # (B, T), (1|B, 1, T, t_k)
        x = self.wte[ids]  # (B, T) -> (B, T, D)
        rotate = None
        if c.rope:
            rotate = rope_angles(positions, c.d_head, c.rope_base, self.dtype)
        else:
            x = x + self.wpe[positions]  # (B, T) -> (B, T, D)
        attention = []
        for layer, p in enumerate(self.blocks):
            kv = None if cache is None else cache.layers[layer]
            if layer == c.n_layers - 1 and last_only and not return_attention and x.shape[1] > 1:
                x, mask, kv, rotate = last_position_only(x, p, mask, kv, rotate, c.ln_eps)
            x, weights = transformer_block(x, p, mask, kv, rotate, c.ln_eps)
            if return_attention:  # otherwise let each layer's (B, H, T, t_k) weights go at once:
                attention.append(weights)  # kept, 12 layers of 512 tokens would hold 150 MB
        if last_only:
            x = x[:, -1:]  # (B, T, D) -> (B, 1, D)
        logits = lm_head(layer_norm(x, *self.ln_f, c.ln_eps), self.wte)  # (B, T, D) -> (B, T, V)
        return (logits, attention) if return_attention else logits


def random_weights(shapes: dict[str, tuple[int, ...]], std: float, seed: int
                   ) -> dict[str, np.ndarray]:
    """GPT-2's initialisation: matrices ~ N(0, std^2), LayerNorm scales 1, every bias and shift
    0. Drawn in float64 in the order of `shapes`, so a seed gives the same model in any dtype."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        if len(shape) == 2:
            out[name] = rng.standard_normal(shape) * std
        else:
            out[name] = np.ones(shape) if name.endswith(".gamma") else np.zeros(shape)
    return out
