"""A tiny GPT: token ids (B, T) -> logits (B, T, vocab), built from GPT-2's pre-LN block.

    x = wte[ids] + wpe[positions]              (B, T, D)   learned positions (or RoPE in attention)
    for each block:
        x = x + attention(layer_norm_1(x))     (B, T, D)   tokens talk to earlier tokens
        x = x + mlp(layer_norm_2(x))           (B, T, D)   each token thinks on its own
    logits = layer_norm_f(x) @ wte.T           (B, T, V)   the LM head is the embedding, tied

That diagram is GPT.forward, line for line: the readable path, the one verify.py checks against
Hugging Face, and the one `GPT(...)` runs. fast/model.py's FastGPT is the same model computed
faster, and is proved equal to it.

A call goes through one door, GPT.__call__: the ids are checked, then the cache plans the step
(cache.py's protocol: which new tokens are real, every new token's position and the position of
every key the layers will return), the mask comes from those positions by one rule
(attention.mask_from_positions), the cache commits the step, and the forward runs. The model never
asks what kind of cache it holds: a full KVCache, a rolling buffer, int8 or a paged batch all
answer the same questions. GPTConfig(sliding_window=W, attention_sinks=S) narrows what a query
sees to its last W keys and the first S of its row: one more clause of the same rule.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from attention import AttentionParams, layer_norm, mask_from_positions
from cache import CACHE_DTYPES, Cache, KVCache, ModelCache, Step, first_step, kv_cache_bytes
from parts import weights as weight_files
from parts.checks import (
    checked_call,
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
        self.n_kv_heads = int(self.n_kv_heads)
        self.d_ff = positive_int("GPTConfig.d_ff", 4 * self.d_model if self.d_ff is None
                                 else self.d_ff)
        if not isinstance(self.rope, (bool, np.bool_)):
            raise TypeError(f"GPTConfig.rope must be True or False, got {self.rope!r}")
        self.rope = bool(self.rope)  # every field a plain Python value: a checkpoint is JSON
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

    @property
    def max_positions(self) -> int | None:
        """The most positions a sequence may have: max_seq_len, or None (no limit) with RoPE and
        a window, which need no position table and hold a fixed number of keys."""
        return None if self.rope and self.sliding_window is not None else self.max_seq_len

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_shape(self) -> tuple[int, int]:
        """(H_kv, d_head): one token's keys (and values) in one layer, what a layer cache holds."""
        return self.n_kv_heads, self.d_head

    # --- the attention layer's weights: a kind of attention (beyond/latent.py) changes these ---

    def attention_shapes(self) -> dict[str, tuple[int, ...]]:
        """One attention layer's weights, named as inside block i ("h.{i}." goes in front)."""
        D, q, kv = self.d_model, self.n_heads * self.d_head, self.n_kv_heads * self.d_head
        return {"attn.w_q": (D, q), "attn.b_q": (q,), "attn.w_k": (D, kv), "attn.b_k": (kv,),
                "attn.w_v": (D, kv), "attn.b_v": (kv,), "attn.w_o": (q, D), "attn.b_o": (D,)}

    def attention_params(self, w: dict[str, np.ndarray]) -> AttentionParams:
        """The attention layer from its weights ("attn.w_q", ...): the parameters, which attend
        when called."""
        return AttentionParams(*(w[f"attn.{n}"] for n in ATTENTION_NAMES), self.n_heads,
                               self.n_kv_heads)

    def init_std_of(self, name: str, shape: tuple[int, ...]) -> float:
        """The std of weight matrix `name`'s random init: GPT-2's init_std for every one."""
        return self.init_std


ATTENTION_NAMES = ("w_q", "b_q", "w_k", "b_k", "w_v", "b_v", "w_o", "b_o")
MLP_NAMES = ("w_fc", "b_fc", "w_proj", "b_proj")


# --- one block ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class BlockParams:
    """One pre-LN block's weights: two LayerNorms, attention, and the MLP (used as x @ W + b).
    Frozen: weights change in place, never by rebinding."""

    ln_1: tuple[np.ndarray, np.ndarray]  # (gamma, beta), each (D,)
    attn: AttentionParams  # or any parameters that attend when called (beyond/latent.py)
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
    x: np.ndarray, p: BlockParams, mask: np.ndarray, cache: object | None,
    rotate: tuple[np.ndarray, np.ndarray] | None, eps: float,
) -> tuple[np.ndarray, np.ndarray]:
    """x (B, T, D) -> (B, T, D) and this layer's attention weights (B, H, T, t_k).

    Pre-LN residual: each sublayer reads a normalised copy and adds its answer to the stream, so
    the residual path from input to output stays an identity plus corrections.
    """
    attn, weights = p.attn(layer_norm(x, *p.ln_1, eps), mask, cache, rotate)
    x = x + attn  # tokens talk to earlier tokens
    x = x + mlp(layer_norm(x, *p.ln_2, eps), p)  # each token thinks on its own
    return x, weights


# --- the model -----------------------------------------------------------------------------------

class GPT:
    """A GPT-2-style decoder. `model(ids)` runs the whole sequence; `model(ids, cache)` runs only
    the new tokens and reads earlier keys and values from the cache."""

    config_class = GPTConfig  # the config a checkpoint of this class holds
    zeros = staticmethod(np.zeros)  # how this model's caches allocate (FastGPT: small pages)

    def __init__(
        self, config: GPTConfig, seed: int = 0, dtype: np.dtype | type | str = np.float32,
        weights: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Random weights from `seed`, or the given `weights` (name -> array, as weight_shapes
        names them; copied and cast to dtype). Every way of building a model comes through here:
        GPT(...), GPT.load and GPT.from_gpt2. Checks its own arguments."""
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__}: config must be a "
                            f"{self.config_class.__name__}, got {type(config).__name__}")
        self.config = config
        self.dtype = float_dtype(f"{type(self).__name__} dtype", dtype, MODEL_DTYPES)
        n_params = count_weights(config)
        # random_weights draws in float64, then they are cast: both exist for a moment.
        fits_in_memory(f"{type(self).__name__}: {n_params:,} weights",
                       n_params * (self.dtype.itemsize + (8 if weights is None else 0)))
        shapes = weight_shapes(config)
        if weights is None:
            if not is_int(seed) or seed < 0:
                raise ValueError(f"GPT: seed must be an int >= 0, got {seed!r}")
            weights = random_weights(config, seed)
        named = weight_files.checked(weights, shapes, self.dtype)
        self.wte = named["wte"]  # (V, D)
        self.wpe = named.get("wpe")  # (max_seq_len, D), or None with RoPE
        self.blocks = blocks_from_named(named, config)
        self.ln_f = (named["ln_f.gamma"], named["ln_f.beta"])

    @property
    def kv_shape(self) -> tuple[int, int]:
        """(H_kv, d_head): what one layer's cache must hold per token (cache.py checks it)."""
        return self.config.kv_shape

    # --- the cache -------------------------------------------------------------------------------

    def new_cache(self, batch_size: int, dtype: np.dtype | type | str | None = None
                  ) -> ModelCache:
        """An empty cache for batch_size rows: one KVCache per layer, each (B, H_kv, max_seq_len,
        d_head) for K and for V, stored as dtype (default: the model's). Other kinds of cache are
        built beside their idea (beyond/window.py, beyond/int8.py, beyond/paged.py) and given to
        the model the same way."""
        c = self.config
        dtype = self.dtype if dtype is None else float_dtype("new_cache dtype", dtype, CACHE_DTYPES)
        H_kv, d_head = c.kv_shape
        # All layers together must fit, not only one (a huge batch is refused before any layer).
        fits_in_memory(f"a cache for {batch_size!r} rows",
                       kv_cache_bytes(c.n_layers, batch_size, H_kv, d_head, c.max_seq_len, dtype))
        return ModelCache([KVCache(batch_size, H_kv, c.max_seq_len, d_head, dtype, self.zeros)
                           for _ in range(c.n_layers)])

    # --- the forward pass ------------------------------------------------------------------------

    def __call__(
        self, ids: np.ndarray, cache: Cache | None = None,
        attention_mask: np.ndarray | None = None, last_only: bool = False,
        return_attention: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, list[np.ndarray]]:
        """ids (B, T) int -> logits (B, T, V), or (B, 1, V) with last_only (generation needs
        only the last position's logits).

        cache: from new_cache(B) (or any cache that keeps cache.py's protocol); the T tokens
        follow the ones it holds, and their keys and values are kept. attention_mask (B,
        len(cache) + T) of 1 real / 0 pad marks padding; with a cache it is needed only on the call
        that brings the padding (the cache keeps it) and is refused if it contradicts what the
        cache holds. Padding anywhere is allowed: a token's position counts the real tokens before
        it. return_attention also returns each layer's weights (B, H, T, t_k), over the keys in
        the order the cache returns them (a KVCache: time order). The whole call is checked once,
        here, before the cache changes, and a call that fails anyway leaves the cache as it was.
        """
        for name, flag in (("last_only", last_only), ("return_attention", return_attention)):
            if not isinstance(flag, bool):
                raise TypeError(f"GPT: {name} must be True or False, got {flag!r}")
        ids, step = self.check_call(ids, cache, attention_mask)
        return self.run(ids, step, cache, last_only, return_attention)

    def check_call(
        self, ids: np.ndarray, cache: Cache | None, attention_mask: np.ndarray | None
    ) -> tuple[np.ndarray, Step]:
        """Check a whole call and plan it: ids (B, T) and the Step (which new tokens are real,
        their positions, the positions of the keys they attend over). Raises ValueError/TypeError
        naming the argument; changes nothing."""
        c = self.config
        ids = token_ids("ids", ids, 2, c.vocab_size)
        B, T = ids.shape
        if cache is None:
            real = (np.ones((B, T), dtype=bool) if attention_mask is None
                    else zero_one_mask("attention_mask", attention_mask, (B, T)))
            empty = ~real.any(axis=1)
            if empty.any():  # its logits would be meaningless (with a cache, later chunks may
                row = int(np.argmax(empty))  # still bring real tokens, so it is allowed there)
                raise ValueError(f"row {row} of attention_mask has no real token")
            step = first_step(real)
        else:
            if not callable(getattr(cache, "plan", None)):
                raise TypeError(f"GPT: cache must keep the cache protocol (plan, commit, "
                                f"roll_back; a ModelCache from model.new_cache), got "
                                f"{type(cache).__name__}")
            step = cache.plan(self, B, T, attention_mask)
        last = int(step.positions.max())
        if c.max_positions is not None and last >= c.max_positions:
            raise ValueError(f"GPT: position {last} is past max_seq_len={c.max_seq_len} (the "
                             "model knows positions 0 .. max_seq_len - 1)" + (
                                 "; a window runs past it only with rope=True: learned "
                                 "positions end with their table" if c.sliding_window else ""))
        # The largest arrays of a forward: the logits, one layer's scores and MLP hidden layer.
        t_k = step.key_positions.shape[1]
        fits_in_memory(f"GPT: a forward of {B} x {T} tokens", self.dtype.itemsize * B * T * (
            c.vocab_size + 2 * c.n_heads * t_k + c.d_ff))
        return ids, step

    def run(
        self, ids: np.ndarray, step: Step, cache: Cache | None, last_only: bool = False,
        return_attention: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, list[np.ndarray]]:
        """A call checked and planned by check_call: the mask from the step's positions by the
        one rule, the step committed to the cache, then the forward. A failure half-way (out of
        memory, Ctrl-C) rolls the cache back, so no layer is left a step ahead of another."""
        c = self.config
        if cache is not None:
            cache.commit(step, self)
        try:
            with checked_call():  # the door above checked it all: the blocks do not check again
                mask = mask_from_positions(step.positions, step.key_positions, c.sliding_window,
                                           c.attention_sinks)  # (B, 1, T, t_k)
                positions = np.maximum(step.positions, 0)  # a pad before any real token: 0
                return self.forward(ids, positions, mask, cache, last_only, return_attention)
        except BaseException:
            if cache is not None:
                cache.roll_back(step)
            raise

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
        cache: Cache | None, last_only: bool = False, return_attention: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, list[np.ndarray]]:
        """The readable forward: the block diagram at the top of this file, line for line.
        ids, positions (B, T); mask (B, 1, T, t_k). Runs on checked input (see __call__)."""
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

    # --- weights in and out ----------------------------------------------------------------------

    def named_weights(self) -> dict[str, np.ndarray]:
        """name -> array for every weight, the names of weight_shapes (the arrays themselves)."""
        named = {"wte": self.wte} | ({} if self.wpe is None else {"wpe": self.wpe})
        for i, p in enumerate(self.blocks):
            named |= named_from_block(i, p)
        return named | {"ln_f.gamma": self.ln_f[0], "ln_f.beta": self.ln_f[1]}

    def save(self, path: str | Path) -> Path:
        """Write the config and every weight to a .npz file (no pickle); return its path."""
        return weight_files.write_npz(path, asdict(self.config), self.named_weights())

    @classmethod
    def load(cls, path: str | Path, dtype: np.dtype | type | str = np.float32) -> GPT:
        """A model of this class from a .npz file written by save(). The file is read header
        first and refused (FileNotFoundError, or ValueError naming the path) unless its config
        names every field of cls.config_class and its weights match it (names, shapes, float
        dtype, finite values); TypeError for a dtype or path of the wrong kind."""
        dtype = float_dtype(f"{cls.__name__}.load dtype", dtype, MODEL_DTYPES)

        def shapes_for(config: dict) -> dict[str, tuple[int, ...]]:
            return weight_shapes(weight_files.config_from(config, cls.config_class))

        config, named = weight_files.read_npz(path, shapes_for)
        return cls(weight_files.config_from(config, cls.config_class), dtype=dtype, weights=named)

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


# --- the weights, by name: the one table behind init, load, save and Hugging Face ---------------

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
    D, F = c.d_model, c.d_ff
    return {"ln_1.gamma": (D,), "ln_1.beta": (D,), **c.attention_shapes(),
            "ln_2.gamma": (D,), "ln_2.beta": (D,),
            "mlp.w_fc": (D, F), "mlp.b_fc": (F,), "mlp.w_proj": (F, D), "mlp.b_proj": (D,)}


def count_weights(c: GPTConfig) -> int:
    """How many numbers the model holds, from the tables (without building the full one)."""
    def total(shapes: dict[str, tuple[int, ...]]) -> int:
        return sum(math.prod(shape) for shape in shapes.values())

    return total(outer_shapes(c)) + c.n_layers * total(block_shapes(c))


def blocks_from_named(named: dict[str, np.ndarray], c: GPTConfig) -> tuple[BlockParams, ...]:
    """The blocks' weights, from the names of weight_shapes ("h.{i}.attn.w_q", ...)."""
    blocks = []
    for i in range(c.n_layers):
        w = {name.removeprefix(f"h.{i}."): a for name, a in named.items()
             if name.startswith(f"h.{i}.")}
        blocks.append(BlockParams((w["ln_1.gamma"], w["ln_1.beta"]), c.attention_params(w),
                                  (w["ln_2.gamma"], w["ln_2.beta"]),
                                  *(w[f"mlp.{n}"] for n in MLP_NAMES)))
    return tuple(blocks)


def named_from_block(i: int, p: BlockParams) -> dict[str, np.ndarray]:
    """Block i's weights under their weight_shapes names: the inverse of blocks_from_named. The
    attention layer's weights are its array fields, by name."""
    attn = {f.name: getattr(p.attn, f.name) for f in dataclasses.fields(p.attn)}
    return ({f"h.{i}.ln_1.gamma": p.ln_1[0], f"h.{i}.ln_1.beta": p.ln_1[1],
             f"h.{i}.ln_2.gamma": p.ln_2[0], f"h.{i}.ln_2.beta": p.ln_2[1]}
            | {f"h.{i}.attn.{n}": a for n, a in attn.items() if isinstance(a, np.ndarray)}
            | {f"h.{i}.mlp.{n}": getattr(p, n) for n in MLP_NAMES})


def random_weights(c: GPTConfig, seed: int) -> dict[str, np.ndarray]:
    """GPT-2's initialisation: matrices ~ N(0, std^2) (std from the config, init_std for every
    one of GPT-2's), LayerNorm scales 1, every bias and shift 0. Drawn in float64 in the order of
    weight_shapes, so a seed gives the same model in any dtype."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in weight_shapes(c).items():
        if len(shape) == 2:
            out[name] = rng.standard_normal(shape) * c.init_std_of(name, shape)
        else:
            out[name] = np.ones(shape) if name.endswith(".gamma") else np.zeros(shape)
    return out
