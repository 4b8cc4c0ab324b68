"""What every check compares against, written once: PyTorch, Hugging Face, and the rule itself.

verify.py, the tests and the benchmark (tools/bench_setup.py) call these; none of them
re-implements a reference. Nothing here imports the code under test except for building test
models (random_model) and for wiring our weights into torch's layout, so an answer from here is
evidence from outside our code. It builds on block.py, so it sits above the five root files, with
the commands, not in parts/ (which holds only what those five import).

    rule_mask                the causal rule spelled out cell by cell (no tril, no offsets)
    masked_softmax_by_hand   softmax over the visible keys only, written without attention.py
    torch_attention          F.scaled_dot_product_attention with an explicit bottom-right mask
    torch_mha                torch.nn.MultiheadAttention holding our projection weights
    torch_block_exercise     the block exercise's pipeline, step for step, in torch
    hf_gpt2 / hf_generate    a Hugging Face GPT-2 from a local config, and its own generate()
    random_model             our GPT with every parameter random (biases and LayerNorms too)
"""

from __future__ import annotations

import math
import os

# Nothing is downloaded: every Hugging Face model here is built from a local config.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402, N812 (torch's own spelling)

from attention import AttentionParams  # noqa: E402
from beyond.latent import LatentConfig, LatentGPT  # noqa: E402
from block import GPT, GPTConfig, weight_shapes  # noqa: E402
from fast.model import FastGPT  # noqa: E402


def t(x: np.ndarray) -> torch.Tensor:
    """NumPy -> torch, sharing memory where it can."""
    return torch.from_numpy(np.ascontiguousarray(x))


def n(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """torch (or NumPy) -> NumPy."""
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


# --- the rule, by hand ---------------------------------------------------------------------------

def rule_mask(t_q: int, t_k: int) -> np.ndarray:
    """Bool (t_q, t_k), True where query i may see key j: the queries are the LAST t_q of the t_k
    positions, so query i sits at absolute position t_k - t_q + i and sees keys j <= that."""
    allowed = np.zeros((t_q, t_k), dtype=bool)
    for i in range(t_q):
        for j in range(t_k):
            allowed[i, j] = j <= t_k - t_q + i
    return allowed


def masked_softmax_by_hand(scores: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Exponentiate the visible scores (shifted by their max), divide by their sum; 0 elsewhere."""
    row_max = np.where(allowed, scores, -np.inf).max(-1, keepdims=True)
    e = np.where(allowed, np.exp(scores - row_max), 0.0)
    return e / e.sum(-1, keepdims=True)


# --- PyTorch -------------------------------------------------------------------------------------

def torch_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, allowed: np.ndarray | None,
                    ) -> tuple[np.ndarray, np.ndarray]:
    """F.scaled_dot_product_attention with an explicit bool mask (True = may attend), and the
    weights recomputed in torch with -inf on masked scores. q (B, H, t_q, d); k, v (B, H_kv, t_k,
    d) with H a multiple of H_kv (grouped-query: query head h reads K/V head h // (H // H_kv),
    torch's enable_gqa). Returns out (B, H, t_q, d) and weights (B, H, t_q, t_k).

    The mask is always explicit: is_causal=True aligns the triangle top-left, which is wrong
    whenever t_q < t_k (new tokens after a cache)."""
    tq, tk, tv = t(q), t(k), t(v)
    mask = None if allowed is None else t(allowed)
    out = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=mask,
                                         enable_gqa=tk.shape[-3] != tq.shape[-3])
    group = tq.shape[-3] // tk.shape[-3]
    scores = tq @ tk.repeat_interleave(group, dim=-3).transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return n(out), n(torch.softmax(scores, dim=-1))


def torch_is_causal(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """F.scaled_dot_product_attention(is_causal=True): the top-left triangle (the trap)."""
    return n(F.scaled_dot_product_attention(t(q), t(k), t(v), is_causal=True))


def torch_mha(p: AttentionParams, query: np.ndarray, key_value: np.ndarray,
              blocked: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """torch.nn.MultiheadAttention (float64) holding our weights, on query (B, t_q, D) against
    key_value (B, t_k, D); blocked (t_q, t_k) bool is torch's convention, True = may NOT attend.
    Returns the output (B, t_q, D) and per-head weights (B, H, t_q, t_k).

    torch computes x @ W.T where we compute x @ W, so every matrix goes in transposed, and its
    fused in_proj stacks Q, K, V row-wise."""
    D = p.w_q.shape[0]
    mha = torch.nn.MultiheadAttention(D, p.n_heads, bias=True, batch_first=True,
                                      dtype=torch.float64).eval()
    with torch.no_grad():
        mha.in_proj_weight.copy_(t(np.concatenate([p.w_q.T, p.w_k.T, p.w_v.T])))  # (3D, D)
        mha.in_proj_bias.copy_(t(np.concatenate([p.b_q, p.b_k, p.b_v])))  # (3D,)
        mha.out_proj.weight.copy_(t(p.w_o.T))
        mha.out_proj.bias.copy_(t(p.b_o))
        out, weights = mha(t(query), t(key_value), t(key_value), attn_mask=t(blocked),
                           need_weights=True, average_attn_weights=False)
    return n(out), n(weights)


def torch_block_exercise(x: np.ndarray, w_q: np.ndarray, w_k: np.ndarray, w_v: np.ndarray,
                         w_o: np.ndarray, num_heads: int) -> np.ndarray:
    """The block exercise, step by step in torch (torch.tril + masked_fill(-1e9), as written):
    x (N, T, D) -> (N, T, D)."""
    x, w_q, w_k, w_v, w_o = map(t, (x, w_q, w_k, w_v, w_o))
    N, T, D = x.shape
    dh = D // num_heads

    def heads(m: torch.Tensor) -> torch.Tensor:
        return m.view(N, T, num_heads, dh).transpose(1, 2)  # (N, T, D) -> (N, H, T, dh)

    q, k, v = heads(x @ w_q), heads(x @ w_k), heads(x @ w_v)
    scores = q @ k.transpose(-2, -1) / math.sqrt(dh)  # (N, H, T, T)
    scores = scores.masked_fill(torch.tril(torch.ones(T, T)) == 0, -1e9)
    per_head = torch.softmax(scores, dim=-1) @ v  # (N, H, T, dh)
    concat = per_head.transpose(1, 2).reshape(N, T, D)  # (N, H, T, dh) -> (N, T, D)
    return n(F.layer_norm(concat @ w_o + x, (D,), eps=1e-5))


def torch_layer_norm(x: np.ndarray, gamma: np.ndarray | None = None,
                     beta: np.ndarray | None = None, eps: float = 1e-5) -> np.ndarray:
    g, b = (None if a is None else t(a) for a in (gamma, beta))
    return n(F.layer_norm(t(x), (x.shape[-1],), g, b, eps=eps))


# --- Hugging Face GPT-2 --------------------------------------------------------------------------

def hf_gpt2(vocab_size: int, n_positions: int, d_model: int, n_layers: int, n_heads: int,
            seed: int = 0, jitter: float = 0.1, dtype: torch.dtype = torch.float64,
            **config: object):
    """A Hugging Face GPT2LMHeadModel with random weights from a local GPT2Config, eval mode
    (dropout off). initializer_range 0.2 (GPT-2 uses 0.02) makes it opinionated, so its greedy
    tokens vary; `jitter` nudges every parameter, because HF starts biases at 0 and LayerNorm
    scales at 1 and a loader that dropped them would otherwise still agree."""
    from transformers import GPT2Config, GPT2LMHeadModel

    settings = dict(vocab_size=vocab_size, n_positions=n_positions, n_embd=d_model,
                    n_layer=n_layers, n_head=n_heads, initializer_range=0.2,
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                    bos_token_id=None, eos_token_id=None, pad_token_id=0) | config
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(GPT2Config(**settings)).eval().to(dtype)
    with torch.no_grad():
        for param in hf.parameters() if jitter else ():
            param.add_(jitter * torch.randn_like(param))
    return hf


def hf_logits(hf, ids: np.ndarray, **kwargs: object) -> np.ndarray:
    """Hugging Face forward: ids (B, T) -> logits (B, T, V)."""
    with torch.no_grad():
        return n(hf(t(ids), **kwargs).logits)


def hf_generate(hf, ids: np.ndarray, max_new_tokens: int, attention_mask: np.ndarray | None = None,
                pad_id: int = 0, eos_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Hugging Face greedy generate() with its own KV cache: new tokens (B, N) and the logits
    that chose them (B, N, V; generate hands them back in float32)."""
    mask = np.ones_like(ids) if attention_mask is None else attention_mask
    with torch.no_grad():
        out = hf.generate(t(ids), attention_mask=t(mask), pad_token_id=pad_id,
                          eos_token_id=eos_id, do_sample=False, max_new_tokens=max_new_tokens,
                          return_dict_in_generate=True, output_logits=True)
    return n(out.sequences[:, ids.shape[1]:]), n(torch.stack(out.logits, dim=1))


# --- our model, every parameter random -----------------------------------------------------------

def model_class(config: GPTConfig, fast: bool = False) -> type[GPT]:
    """The model class for a config: LatentGPT for an MLA config, FastGPT with fast=True, else
    the readable GPT."""
    if isinstance(config, LatentConfig):
        return LatentGPT
    return FastGPT if fast else GPT


def random_model(config: GPTConfig, seed: int = 0, dtype: type = np.float64,
                 jitter: float = 0.1, fast: bool = False) -> GPT:
    """A GPT whose biases and LayerNorm scales and shifts are random too (GPT(config) starts them
    at 0 and 1), so a dropped bias or a skipped LayerNorm parameter changes the numbers. The
    readable GPT unless fast=True (FastGPT): the checks test the code a learner reads."""
    cls = model_class(config, fast)
    base = cls(config, seed=seed, dtype=np.float64).named_weights()
    rng = np.random.default_rng(seed + 1)
    named = {name: w + (jitter * rng.standard_normal(w.shape) if w.ndim == 1 else 0.0)
             for name, w in base.items()}
    assert set(named) == set(weight_shapes(config))
    return cls(config, dtype=dtype, weights=named)


def random_ids(shape: tuple[int, ...], seed: int, vocab: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, shape)
