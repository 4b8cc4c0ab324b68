"""A tiny GPT: token ids (B, T) -> logits (B, T, vocab), built from GPT-2's pre-LN block.

    x = wte[ids] + wpe[positions]              (B, T, D)   learned positions (or RoPE in attention)
    for each block:
        x = x + attention(layer_norm_1(x))     (B, T, D)   tokens talk to earlier tokens
        x = x + mlp(layer_norm_2(x))           (B, T, D)   each token thinks on its own
    logits = layer_norm_f(x) @ wte.T           (B, T, V)   the LM head is the embedding, tied

That diagram is GPT.forward, line for line: the readable path, the one verify.py checks against
Hugging Face. GPT(..., fast=True), the default, runs the same model through the engine
(engine/fast.py), which is proved equal to it. Either way GPT.__call__ checks the whole call once
(ids, mask, cache), then runs.

A token's position is the number of real (non-padding) tokens before it in its row; with a cache
the model reads which earlier positions were real from the cache (cache.py), so positions and the
padding mask have one home however many calls a sequence takes.

GPTConfig(sliding_window=W, attention_sinks=S) narrows what a query sees to its last W keys and
the first S of its row: the band is one more rule on the mask, and the cache becomes a rolling
buffer of S + W slots (beyond/window.py, docs/window.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from attention import AttentionParams, causal_mask, layer_norm, multi_head_attention
from beyond import int8, latent
from beyond.window import RollingKVCache, WindowCache
from cache import KVCache, LayerCache, ModelCache, kv_cache_bytes
from engine import fast as engine
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
    sliding_window: int | None = None  # W: a query sees its last W keys (itself included)
    attention_sinks: int = 0  # S: ... and the first S real tokens of its row (needs a window)
    kv_latent: int | None = None  # MLA: cache one latent of this width per token (beyond/latent.py)

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
        if self.sliding_window is not None:
            self.sliding_window = positive_int("GPTConfig.sliding_window (None = full attention)",
                                               self.sliding_window)
        if not is_int(self.attention_sinks) or self.attention_sinks < 0:
            raise ValueError(f"GPTConfig.attention_sinks must be an int >= 0, got "
                             f"{self.attention_sinks!r}")
        if self.attention_sinks and self.sliding_window is None:
            raise ValueError(f"GPTConfig.attention_sinks={self.attention_sinks} needs a "
                             "sliding_window: with full attention every token is visible anyway")
        self.attention_sinks = int(self.attention_sinks)
        if self.kv_latent is not None:
            latent.check_config(self)
            if self.sliding_window is not None:
                raise ValueError("GPTConfig: kv_latent with a sliding_window is not implemented "
                                 "(a latent cache keeps every position)")

    @property
    def max_positions(self) -> int | None:
        """The most positions a sequence may have: max_seq_len, or None (no limit) with RoPE and
        a window, which need no position table and hold a fixed number of keys."""
        return None if self.rope and self.sliding_window is not None else self.max_seq_len

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
    attn = {"attn.w_q": (D, q), "attn.b_q": (q,), "attn.w_k": (D, kv), "attn.b_k": (kv,),
            "attn.w_v": (D, kv), "attn.b_v": (kv,), "attn.w_o": (q, D), "attn.b_o": (D,)}
    if c.kv_latent:  # MLA: W_dkv, W_uk, W_uv instead of W_k, W_v (and no K/V biases)
        attn = latent.latent_shapes(c)
    return {"ln_1.gamma": (D,), "ln_1.beta": (D,), **attn,
            "ln_2.gamma": (D,), "ln_2.beta": (D,),
            "mlp.w_fc": (D, F), "mlp.b_fc": (F,), "mlp.w_proj": (F, D), "mlp.b_proj": (D,)}


def count_weights(c: GPTConfig) -> int:
    """How many numbers the model holds, from the tables (without building the full one)."""
    def total(shapes: dict[str, tuple[int, ...]]) -> int:
        return sum(math.prod(shape) for shape in shapes.values())

    return total(outer_shapes(c)) + c.n_layers * total(block_shapes(c))


# --- one block ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class BlockParams:
    """One pre-LN block's weights: two LayerNorms, attention, and the MLP (used as x @ W + b).
    Frozen: weights change in place, never by rebinding."""

    ln_1: tuple[np.ndarray, np.ndarray]  # (gamma, beta), each (D,)
    attn: AttentionParams
    ln_2: tuple[np.ndarray, np.ndarray]
    w_fc: np.ndarray  # (D, d_ff)
    b_fc: np.ndarray  # (d_ff,)
    w_proj: np.ndarray  # (d_ff, D)
    b_proj: np.ndarray  # (D,)


def gelu(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation (GPT-2's "gelu_new"). Same shape in and out."""
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def mlp(x: np.ndarray, p: BlockParams) -> np.ndarray:
    """Position-wise feed-forward: (B, T, D) -> (B, T, d_ff) -> (B, T, D)."""
    return gelu(x @ p.w_fc + p.b_fc) @ p.w_proj + p.b_proj


def transformer_block(
    x: np.ndarray, p: BlockParams, mask: np.ndarray, cache: LayerCache | None,
    rotate: tuple[np.ndarray, np.ndarray] | None, eps: float,
) -> tuple[np.ndarray, np.ndarray]:
    """x (B, T, D) -> (B, T, D) and this layer's attention weights (B, H, T, t_k).

    Pre-LN residual: each sublayer reads a normalised copy and adds its answer to the stream, so
    the residual path from input to output stays an identity plus corrections.
    """
    attend = latent.latent_attention if isinstance(p.attn, latent.LatentParams) else (
        multi_head_attention)
    attn, weights = attend(layer_norm(x, *p.ln_1, eps), p.attn, mask, cache, rotate)
    x = x + attn  # tokens talk to earlier tokens
    x = x + mlp(layer_norm(x, *p.ln_2, eps), p)  # each token thinks on its own
    return x, weights


# --- the weights, by name ------------------------------------------------------------------------

def blocks_from_named(named: dict[str, np.ndarray], c: GPTConfig) -> tuple[BlockParams, ...]:
    """The blocks' weights, from the names of weight_shapes ("h.{i}.attn.w_q", ...)."""
    blocks = []
    for i in range(c.n_layers):
        w = {name.removeprefix(f"h.{i}."): a for name, a in named.items()
             if name.startswith(f"h.{i}.")}
        if c.kv_latent:
            attn = latent.LatentParams(*(w[f"attn.{n}"] for n in latent.LATENT_NAMES), c.n_heads)
        else:
            attn = AttentionParams(*(w[f"attn.{n}"] for n in ATTENTION_NAMES), c.n_heads,
                                   c.n_kv_heads)
        blocks.append(BlockParams((w["ln_1.gamma"], w["ln_1.beta"]), attn,
                                  (w["ln_2.gamma"], w["ln_2.beta"]), *(
                                      w[f"mlp.{n}"] for n in MLP_NAMES)))
    return tuple(blocks)


ATTENTION_NAMES = ("w_q", "b_q", "w_k", "b_k", "w_v", "b_v", "w_o", "b_o")
MLP_NAMES = ("w_fc", "b_fc", "w_proj", "b_proj")


def named_from_block(i: int, p: BlockParams) -> dict[str, np.ndarray]:
    """Block i's weights under their weight_shapes names: the inverse of blocks_from_named."""
    names = latent.LATENT_NAMES if isinstance(p.attn, latent.LatentParams) else ATTENTION_NAMES
    return ({f"h.{i}.ln_1.gamma": p.ln_1[0], f"h.{i}.ln_1.beta": p.ln_1[1],
             f"h.{i}.ln_2.gamma": p.ln_2[0], f"h.{i}.ln_2.beta": p.ln_2[1]}
            | {f"h.{i}.attn.{n}": getattr(p.attn, n) for n in names}
            | {f"h.{i}.mlp.{n}": getattr(p, n) for n in MLP_NAMES})


# --- positions and the mask ----------------------------------------------------------------------

def positions_and_mask(real: np.ndarray, T: int, window: int | None = None, sinks: int = 0
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the last T tokens and the mask they attend with; built once per forward.

    real (B, t_k) bool: which of the t_k positions (cached + new) hold real tokens. A token's
    position is the number of real tokens before it in its row, so a row's first real token is
    position 0 however much padding comes first (Hugging Face's generate does the same). The mask
    is causal (bottom-right aligned: the new tokens are the last T) and hides padding keys; with
    a window it also keeps each query to its band (see `band`). Returns positions (B, T) and
    mask (1 or B, 1, T, t_k).
    """
    t_k = real.shape[1]
    positions = np.maximum(np.cumsum(real, axis=1)[:, t_k - T:] - 1, 0)  # pads clamp to 0
    mask = causal_mask(T, t_k)[None, None]  # (T, t_k) -> (1, 1, T, t_k): all batches and heads
    if window is not None:  # the sliding window, from the same counts: padding never counts
        counted = np.cumsum(real, axis=1) - 1  # (B, t_k): each column's position (pads: the last)
        mask = mask & band(counted[:, t_k - T:], counted, window, sinks)
    if real.all():  # no padding anywhere: the causal mask alone is the whole story
        return positions, mask
    return positions, mask & real[:, None, None, :]  # (B, t_k) -> (B, 1, 1, t_k) for every query


def band(query_pos: np.ndarray, key_pos: np.ndarray, window: int, sinks: int = 0) -> np.ndarray:
    """The sliding window: a query at position p may see keys at p - window < j (window keys
    counting itself), and keys j < sinks whatever p. query_pos (B, T), key_pos (B, t_k) ->
    (B, 1, T, t_k), to be combined with the causal rule (it says nothing about j > p)."""
    q = query_pos[:, None, :, None]  # (B, T) -> (B, 1, T, 1)
    k = key_pos[:, None, None, :]  # (B, t_k) -> (B, 1, 1, t_k)
    return (k > q - window) | (k < sinks)


def mask_from_positions(query_pos: np.ndarray, key_pos: np.ndarray, window: int,
                        sinks: int = 0) -> np.ndarray:
    """The whole mask when keys come in any order (a rolling buffer's slots): causal by position
    (0 <= j <= p, -1 = padding or an empty slot) and inside the band. query_pos (B, T), -1 for
    a pad before any real token; key_pos (B, t_k) -> (B, 1, T, t_k)."""
    q = query_pos[:, None, :, None]  # (B, T) -> (B, 1, T, 1)
    k = key_pos[:, None, None, :]  # (B, t_k) -> (B, 1, 1, t_k)
    return (k >= 0) & (k <= q) & band(query_pos, key_pos, window, sinks)


# --- the model -----------------------------------------------------------------------------------

class GPT:
    """A GPT-2-style decoder. `model(ids)` runs the whole sequence; `model(ids, cache)` runs only
    the new tokens and reads earlier keys and values from the cache."""

    def __init__(
        self, config: GPTConfig, seed: int = 0, dtype: np.dtype | type | str = np.float32,
        weights: dict[str, np.ndarray] | None = None, fast: bool = True,
    ) -> None:
        """Random weights from `seed`, or the given `weights` (name -> array, as weight_shapes
        names them; copied and cast to dtype). fast chooses the engine (True) or the readable
        forward (False); both compute the same numbers. Every way of building a model comes
        through here: GPT(...), GPT.load and GPT.from_gpt2. Checks its own arguments."""
        if not isinstance(config, GPTConfig):
            raise TypeError(f"GPT: config must be a GPTConfig, got {type(config).__name__}")
        if not isinstance(fast, bool):
            raise TypeError(f"GPT: fast must be True or False, got {fast!r}")
        self.config, self.fast = config, fast
        self.dtype = float_dtype("GPT dtype", dtype, MODEL_DTYPES)
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
        if fast and not config.kv_latent:  # the engine stores W_Q, W_K, W_V side by side
            named = engine.fuse_qkv(named, config.n_layers)
        self.wte = named["wte"]  # (V, D)
        self.wpe = named.get("wpe")  # (max_seq_len, D), or None with RoPE
        self.blocks = blocks_from_named(named, config)
        self.ln_f = (named["ln_f.gamma"], named["ln_f.beta"])

    def named_weights(self) -> dict[str, np.ndarray]:
        """name -> array for every weight, the names of weight_shapes (the arrays themselves)."""
        named = {"wte": self.wte} | ({} if self.wpe is None else {"wpe": self.wpe})
        for i, p in enumerate(self.blocks):
            named |= named_from_block(i, p)
        return named | {"ln_f.gamma": self.ln_f[0], "ln_f.beta": self.ln_f[1]}

    # --- weights in and out ----------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the config and every weight to a .npz file (no pickle); return its path."""
        return weight_files.write_npz(path, asdict(self.config), self.named_weights())

    @classmethod
    def load(cls, path: str | Path, dtype: np.dtype | type | str = np.float32,
             fast: bool = True) -> GPT:
        """A model from a .npz file written by save(). The file is read header first and refused
        (FileNotFoundError, or ValueError naming the path) unless its config names every field
        and its weights match it (names, shapes, float dtype, finite values); TypeError for a
        dtype or path of the wrong kind. Checks its own door."""
        dtype = float_dtype("GPT.load dtype", dtype, MODEL_DTYPES)

        def shapes_for(config: dict) -> dict[str, tuple[int, ...]]:
            return weight_shapes(weight_files.config_from(config, GPTConfig))

        config, named = weight_files.read_npz(path, shapes_for)
        return cls(weight_files.config_from(config, GPTConfig), dtype=dtype, weights=named,
                   fast=fast)

    @classmethod
    def from_gpt2(
        cls, state_dict: dict, n_heads: int | None = None,
        dtype: np.dtype | type | str = np.float32, hf_config: object = None, fast: bool = True,
    ) -> GPT:
        """A model from a Hugging Face GPT2LMHeadModel (or GPT2Model) state_dict, whose values
        may be torch tensors or NumPy arrays. n_heads is needed unless hf_config (the model's
        GPT2Config) is given; from hf_config also the LayerNorm epsilon and the activation.
        Refused (ValueError/TypeError): an untied LM head, keys we do not compute, a config
        whose sizes contradict the weights or whose settings are not implemented."""
        sizes, named = weight_files.from_gpt2_state_dict(state_dict, n_heads, hf_config)
        return cls(GPTConfig(**sizes), dtype=dtype, weights=named, fast=fast)

    # --- the cache -------------------------------------------------------------------------------

    def new_cache(self, batch_size: int, dtype: np.dtype | type | str | None = None) -> ModelCache:
        """An empty cache for batch_size rows: one KVCache per layer, each (B, H_kv, max_seq_len,
        d_head) for K and for V, stored as dtype (default: the model's). dtype="int8": int8 K and
        V with float scales (beyond/int8.py); an MLA model (kv_latent) gets one latent per token
        (beyond/latent.py); with a sliding window, a WindowCache: one rolling buffer of
        attention_sinks + sliding_window slots per layer (beyond/window.py)."""
        c = self.config
        dtype = self.dtype if dtype is None else dtype
        zeros = engine.zeros_in_small_pages if self.fast else np.zeros
        if int8.is_int8(dtype) and not c.kv_latent:
            return int8.new_int8_cache(self, batch_size, zeros)
        if c.kv_latent:
            if int8.is_int8(dtype):
                raise ValueError("new_cache: dtype='int8' quantizes K and V; an MLA model "
                                 "(kv_latent) caches latents, which have no int8 cache here")
            return latent.new_latent_cache(self, batch_size, dtype, zeros)
        places = (c.max_seq_len if c.sliding_window is None
                  else c.attention_sinks + c.sliding_window)
        # All layers together must fit, not only one (a huge batch is refused before any layer).
        fits_in_memory(f"a cache for {batch_size!r} rows",
                       kv_cache_bytes(c.n_layers, batch_size, c.n_kv_heads, c.d_head, places,
                                      dtype))
        if c.sliding_window is not None:
            return WindowCache([RollingKVCache(batch_size, c.n_kv_heads, c.sliding_window,
                                               c.d_head, dtype, zeros, c.attention_sinks)
                                for _ in range(c.n_layers)])
        return ModelCache([KVCache(batch_size, c.n_kv_heads, c.max_seq_len, c.d_head, dtype,
                                   zeros) for _ in range(c.n_layers)])

    # --- the forward pass ------------------------------------------------------------------------

    def __call__(
        self, ids: np.ndarray, cache: ModelCache | None = None,
        attention_mask: np.ndarray | None = None, last_only: bool = False,
        return_attention: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, list[np.ndarray]]:
        """ids (B, T) int -> logits (B, T, V), or (B, 1, V) with last_only (generation needs
        only the last position's logits).

        cache: from new_cache(B); the T tokens follow the len(cache) positions it holds, and their
        keys and values are appended. attention_mask (B, len(cache) + T) of 1 real / 0 pad marks
        padding; with a cache it is needed only on the call that brings the padding (the cache
        keeps it) and is refused if it contradicts what the cache holds. Padding anywhere is
        allowed: a token's position counts the real tokens before it. return_attention also
        returns each layer's weights (B, H, T, len(cache) + T). The whole call is checked once,
        here, before the cache changes, and a call that fails anyway leaves the cache as it was.
        """
        for name, flag in (("last_only", last_only), ("return_attention", return_attention)):
            if not isinstance(flag, bool):
                raise TypeError(f"GPT: {name} must be True or False, got {flag!r}")
        if return_attention and isinstance(cache, WindowCache):
            raise ValueError("GPT: return_attention is refused with a WindowCache: its keys come "
                             "back in slot order; call without a cache for weights in position "
                             "order")
        ids, new_real = self.check_call(ids, cache, attention_mask)
        return self.run_checked(ids, new_real, cache, last_only, return_attention)

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
            self.check_cache(cache)
            new_real = cache.check_step(B, T, attention_mask)
            past = len(cache)
            owner = None if cache.filled_by is None else cache.filled_by()
            if past and owner is not self:
                raise ValueError("GPT: this cache holds keys and values this model did not "
                                 "compute; reset() it (or use model.new_cache) first")
        if c.max_positions is not None and past + T > c.max_positions:
            raise ValueError(f"GPT: {past} cached + {T} new = {past + T} positions exceed "
                             f"max_seq_len={c.max_seq_len}" + (
                                 " (a window runs past it only with rope=True: learned "
                                 "positions end with their table)" if c.sliding_window else ""))
        # The largest arrays of a forward: the logits, one layer's scores and MLP hidden layer.
        fits_in_memory(f"GPT: a forward of {B} x {T} tokens", self.dtype.itemsize * B * T * (
            c.vocab_size + 2 * c.n_heads * (past + T) + c.d_ff))
        return ids, new_real

    def check_cache(self, cache: ModelCache) -> None:
        """Raise unless cache is a ModelCache shaped for this model: its layers, K/V heads and
        d_head."""
        c = self.config
        if not isinstance(cache, ModelCache):
            raise TypeError(f"GPT: cache must be a ModelCache from model.new_cache(batch_size), "
                            f"got {type(cache).__name__}")
        if len(cache.layers) != c.n_layers:
            raise ValueError(f"GPT: cache has {len(cache.layers)} layers, the model "
                             f"{c.n_layers}")
        want = (1, c.kv_latent) if c.kv_latent else (c.n_kv_heads, c.d_head)
        for i, kv in enumerate(cache.layers):
            if (kv.n_kv_heads, kv.d_head) != want or (
                    isinstance(kv, latent.LatentCache) != bool(c.kv_latent)):
                raise ValueError(f"GPT: cache layer {i} is (H_kv, d_head) = "
                                 f"{(kv.n_kv_heads, kv.d_head)} ({type(kv).__name__}), this "
                                 f"model needs {want}"
                                 f"{' (a LatentCache)' if c.kv_latent else ''}")
        # A rolling buffer forgets what falls out of its window: only the same window may use it.
        # (A full cache serves any window: the band mask hides what the window excludes.)
        held = ((cache.window, cache.sinks) if isinstance(cache, WindowCache) else None)
        if held is not None and held != (c.sliding_window, c.attention_sinks):
            raise ValueError(f"GPT: cache is a rolling buffer for (sliding_window, "
                             f"attention_sinks) = {held}, this model has "
                             f"{(c.sliding_window, c.attention_sinks)}")

    def run_checked(
        self, ids: np.ndarray, new_real: np.ndarray, cache: ModelCache | None, last_only: bool,
        return_attention: bool,
    ) -> np.ndarray | tuple[np.ndarray, list[np.ndarray]]:
        """A call checked by check_call: positions and mask from the real-token flags (the
        cache's, with a cache), then the readable forward or the engine. A failure half-way (out
        of memory, Ctrl-C) rolls the cache back, so no layer is left a step ahead of another."""
        past = 0 if cache is None else len(cache)
        positions, mask = self.positions_and_mask(new_real, cache)  # (B, T), (1|B, 1, T, t_k)
        # The engine has no latent path: an MLA model runs the readable forward either way.
        forward = engine.forward if self.fast and not self.config.kv_latent else GPT.forward
        try:
            return forward(self, ids, positions, mask, cache, last_only, return_attention)
        except BaseException:
            if cache is not None:
                cache.roll_back(past)
            raise

    def positions_and_mask(self, new_real: np.ndarray, cache: ModelCache | None
                           ) -> tuple[np.ndarray, np.ndarray]:
        """Record the new tokens in the cache and return their positions (B, T) and the mask
        (1|B, 1, T, t_k) over the keys the cache's layers will return."""
        c = self.config
        if isinstance(cache, WindowCache):  # keys in slot order: the mask from their positions
            query_pos, key_pos = cache.record_positions(new_real, self)  # (B, T), (B, t_k)
            mask = mask_from_positions(query_pos, key_pos, c.sliding_window, c.attention_sinks)
            return np.maximum(query_pos, 0), mask  # pads before any real token: position 0
        real = new_real if cache is None else cache.record(new_real, self)  # in time order
        window = {} if c.sliding_window is None else {"window": c.sliding_window,
                                                      "sinks": c.attention_sinks}
        return positions_and_mask(real, new_real.shape[1], **window)

    def embed(self, ids: np.ndarray, positions: np.ndarray
              ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
        """Token vectors (B, T, D) plus the learned position vectors, or RoPE's (cos, sin) for
        attention to turn q and k by, for ids and positions (B, T)."""
        x = self.wte[ids]  # (B, T) -> (B, T, D)
        if self.config.rope:
            return x, rope_angles(positions, self.config.d_head, self.config.rope_base,
                                  self.dtype)
        return x + self.wpe[positions], None  # (B, T) -> (B, T, D)

    def forward(
        self, ids: np.ndarray, positions: np.ndarray, mask: np.ndarray,
        cache: ModelCache | None, last_only: bool = False, return_attention: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, list[np.ndarray]]:
        """The readable forward: the block diagram at the top of this file, line for line.
        ids, positions (B, T); mask (1|B, 1, T, t_k). Runs on checked input (see __call__)."""
        x, rotate = self.embed(ids, positions)  # (B, T, D)
        attention = []
        for layer, p in enumerate(self.blocks):
            kv = None if cache is None else cache.layers[layer]
            x, weights = transformer_block(x, p, mask, kv, rotate, self.config.ln_eps)
            if return_attention:  # else each layer's (B, H, T, t_k) weights go at once
                attention.append(weights)
        if last_only:
            x = x[:, -1:]  # (B, T, D) -> (B, 1, D): generation reads the last position only
        logits = layer_norm(x, *self.ln_f, self.config.ln_eps) @ self.wte.T  # (B, T, V)
        return (logits, attention) if return_attention else logits


def random_weights(shapes: dict[str, tuple[int, ...]], std: float, seed: int
                   ) -> dict[str, np.ndarray]:
    """GPT-2's initialisation: matrices ~ N(0, std^2), LayerNorm scales 1, every bias and shift
    0 (an MLA model's up-projections: latent.init_std). Drawn in float64 in the order of
    `shapes`, so a seed gives the same model in any dtype."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        if len(shape) == 2:
            out[name] = rng.standard_normal(shape) * latent.init_std(name, shape, std)
        else:
            out[name] = np.ones(shape) if name.endswith(".gamma") else np.zeros(shape)
    return out
