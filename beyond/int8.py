"""An int8 KV cache: keys and values stored as 8-bit integers, one float scale per token and head.

    store:  s = max |x| / 127 over one token's d_head numbers     (float32, one per token and head)
            q = round(x / s), an int8 in [-127, 127]
    read:   x_hat = q * s,  and |x - x_hat| <= s / 2 for every element (rounding to nearest)

A float32 cache keeps 2 * d_head * 4 bytes per token and K/V head; this one keeps 2 * d_head
bytes of int8 plus 2 * 4 bytes of scales: (64 + 8) / 256 = 0.281 of float32 at d_head 32. Attention
reads the keys and values dequantized (append returns floats of the model's dtype), so the model
code does not change; only what is remembered between steps is rounded.

Per token, not per channel. Keys of large models have a few outlier channels, so KIVI (Liu et al.,
2024) scales keys per channel and values per token. A per-channel scale must stay fixed for a
group of tokens, so KIVI keeps the newest tokens (an unfinished group) in full precision. On the
trained model here the largest channel is only about twice the median one, and
`python beyond/int8.py --scales` measures (1000 held-out prompts): per-channel scales in groups of
16 cut the key error by 26-32% but the mean |logit difference| by only 4% (0.0142 against 0.0148;
rounding the values alone gives 0.0118) and the largest one not at all (0.54 against 0.49), while
the full-precision group would cost another 0.06-0.13 of a float32 cache at 128 positions, past
0.3x. Per token is kept.

    python beyond/int8.py --compare    int8 against the float cache on held-out prompts
    python beyond/int8.py --scales     per-token against per-channel key scales, measured
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python beyond/int8.py` from anywhere: find the repo
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from cache import KVCache, ModelCache
from parts.checks import fits_in_memory, float_array, float_dtype, positive_int

if TYPE_CHECKING:  # type hints only
    from block import GPT

INT8 = np.dtype(np.int8)
QMAX = 127  # symmetric: -127 .. 127 (-128 unused, so q and -q are both representable)
SCALE_DTYPE = np.dtype(np.float32)  # 4 bytes per scale whatever the model's dtype
READ_DTYPES = ("float32", "float64")  # what append hands back: the model's dtype
# The stated end-to-end tolerance (measured, not proved; the proof is attention_error_bound, per
# attention call): with an int8 cache every logit stays within this fraction of the largest
# |logit| of the float run. Measured: 3.0% on the trained model (1000 held-out prompts), 1.0%
# at most on the small test models, 2.5% on `generate.py --random`.
LOGIT_TOLERANCE = 0.05


# --- quantize and dequantize ---------------------------------------------------------------------

def quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x (..., d) float -> q (..., d) int8 and scale (..., 1) float32, one scale per row of d.

    scale = max |row| / 127, so the largest element maps to +-127; an all-zero row gets scale 0
    and q = 0. Rounding to nearest makes |x - q * scale| <= scale / 2. Checks its own door
    (finite floats)."""
    x = float_array("quantize: x", x, min_ndim=1)
    if not np.isfinite(x).all():
        raise ValueError("quantize: x holds NaN or inf; int8 with a finite scale cannot store it")
    work = np.result_type(x, np.float32)
    scale = (np.abs(x).max(axis=-1, keepdims=True) / QMAX).astype(SCALE_DTYPE)  # (..., 1)
    safe = np.where(scale > 0, scale, 1).astype(work)  # an all-zero row divides by 1, gives 0
    q = np.clip(np.rint(x.astype(work, copy=False) / safe), -QMAX, QMAX).astype(INT8)
    return q, scale


def dequantize(q: np.ndarray, scale: np.ndarray, dtype: np.dtype | type | str = np.float32
               ) -> np.ndarray:
    """q (..., d) int8 and scale (..., 1) -> q * scale (..., d) in dtype."""
    return q.astype(dtype) * scale.astype(dtype)


# --- the cache -----------------------------------------------------------------------------------

class Int8KVCache(KVCache):
    """One layer's keys and values as int8, (B, H_kv, max_len, d_head) each, and their scales,
    (B, H_kv, max_len, 1) float32 each. update(k, v) takes floats and returns every position held
    so far dequantized, in `dtype` (the model's). The checks, room and rollback are KVCache's."""

    def __init__(
        self, batch_size: int, n_kv_heads: int, max_len: int, d_head: int,
        dtype: np.dtype | type | str = np.float32, zeros: Callable[..., np.ndarray] = np.zeros,
    ) -> None:
        """Allocates the int8 buffers and the scales, zeroed, at full length. dtype is what
        update returns (float32 or float64). Checks its arguments."""
        shape = tuple(positive_int(f"Int8KVCache {name}", value) for name, value in (
            ("batch_size", batch_size), ("n_kv_heads", n_kv_heads), ("max_len", max_len),
            ("d_head", d_head)))
        self.read_dtype = float_dtype("Int8KVCache dtype", dtype, READ_DTYPES)
        fits_in_memory(f"Int8KVCache {shape}", int8_cache_bytes(1, *shape[:3], shape[3]))
        self.keys = zeros(shape, dtype=INT8)  # (B, H_kv, max_len, d_head)
        self.values = zeros(shape, dtype=INT8)  # (B, H_kv, max_len, d_head)
        self.key_scales = zeros((*shape[:3], 1), dtype=SCALE_DTYPE)  # (B, H_kv, max_len, 1)
        self.value_scales = zeros((*shape[:3], 1), dtype=SCALE_DTYPE)  # (B, H_kv, max_len, 1)
        self.length = 0

    @property
    def nbytes(self) -> int:
        """Bytes of the int8 buffers AND their scales: 2 * (d_head + 4) per token and head."""
        return (self.keys.nbytes + self.values.nbytes + self.key_scales.nbytes
                + self.value_scales.nbytes)

    def __repr__(self) -> str:
        return (f"Int8KVCache(length={self.length}, max_len={self.max_len}, "
                f"batch={self.batch_size}, n_kv_heads={self.n_kv_heads}, d_head={self.d_head}, "
                f"reads as {self.read_dtype})")

    def narrowed(self, name: str, x: np.ndarray) -> np.ndarray:
        """x as floats to quantize, refusing NaN or inf (no finite scale stores them) and values
        whose scale, max |x| / 127, would overflow the float32 scale (about 4.3e40)."""
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            raise ValueError(f"Int8KVCache.append: {name} holds NaN or inf; an int8 cache "
                             "stores finite values only")
        largest = float(np.abs(x).max()) if x.size else 0.0
        if largest / QMAX > float(np.finfo(SCALE_DTYPE).max):
            raise ValueError(f"Int8KVCache.append: {name} holds values up to {largest:.3g}, whose "
                             f"scale ({largest:.3g} / {QMAX}) overflows the float32 scale")
        return x if x.dtype.kind == "f" else x.astype(self.read_dtype)

    def update(self, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Quantize the t new positions into [length : length + t] and return every position
        held, dequantized: keys, values (B, H_kv, length + t, d_head) in the read dtype."""
        k, v = self.narrowed("k", k), self.narrowed("v", v)
        start, end = self.length, self.length + k.shape[2]
        (k_q, k_s), (v_q, v_s) = quantize(k), quantize(v)  # both first: v may view the buffers
        self.keys[:, :, start:end], self.key_scales[:, :, start:end] = k_q, k_s
        self.values[:, :, start:end], self.value_scales[:, :, start:end] = v_q, v_s
        self.length = end
        return (dequantize(self.keys[:, :, :end], self.key_scales[:, :, :end], self.read_dtype),
                dequantize(self.values[:, :, :end], self.value_scales[:, :, :end],
                           self.read_dtype))

    def truncate(self, length: int) -> None:
        """KVCache.truncate, and the dropped positions' scales zeroed too."""
        held = self.length
        super().truncate(length)  # checks length, zeroes the int8 buffers past it
        self.key_scales[:, :, self.length:held] = 0
        self.value_scales[:, :, self.length:held] = 0


def int8_cache_bytes(n_layers: int, batch: int, n_kv_heads: int, seq_len: int,
                     d_head: int) -> int:
    """2 (K and V) * layers * batch * kv heads * positions * (d_head int8 + one 4-byte scale)."""
    return 2 * n_layers * batch * n_kv_heads * seq_len * (d_head * INT8.itemsize
                                                          + SCALE_DTYPE.itemsize)


def int8_cache(model: GPT, batch_size: int) -> ModelCache:
    """An empty int8 cache for batch_size rows: one Int8KVCache per layer, max_seq_len positions,
    reading back in the model's dtype. All layers must fit in memory together, checked before
    the first. Use it as any cache: model(ids, cache), generate_cached(..., cache=cache)."""
    c = model.config
    H_kv, d_head = model.kv_shape
    fits_in_memory(f"an int8 cache for {batch_size!r} rows",
                   int8_cache_bytes(c.n_layers, positive_int("batch_size", batch_size),
                                    H_kv, c.max_seq_len, d_head))
    return ModelCache([Int8KVCache(batch_size, H_kv, c.max_seq_len, d_head, model.dtype,
                                   model.zeros) for _ in range(c.n_layers)])


# --- the proved bound for one attention call -----------------------------------------------------

def attention_error_bound(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """How far attention over the int8 cache's K and V can be from attention over the float ones:
    a bound on |out_int8 - out_float| per element, (..., t_q, d) for q (..., t_q, d) and k, v
    (..., t_k, d), whatever the mask.

    Each key element moves by at most s_k / 2, so a score q . k / sqrt(d) moves by at most
    eps = ||q||_1 * max s_k / (2 sqrt(d)). Moving every score by at most eps multiplies each
    softmax weight by a factor in [e^-2eps, e^2eps], so sum_j |p_hat_j - p_j| <= e^2eps - 1.
    Then out_hat - out = sum_j (p_hat_j - p_j) v_j + sum_j p_hat_j (v_hat_j - v_j), at most
    (e^2eps - 1) max |v| + max s_v / 2 per element.
    """
    d = q.shape[-1]
    s_k = quantize(k)[1].max(axis=-2, keepdims=True)  # (..., 1, 1): the largest key scale
    s_v = quantize(v)[1].max(axis=-2, keepdims=True)  # (..., 1, 1)
    eps = np.abs(q).sum(axis=-1, keepdims=True) * s_k / (2 * math.sqrt(d))  # (..., t_q, 1)
    v_max = np.abs(v).max(axis=-2, keepdims=True)  # (..., 1, d)
    return np.expm1(2 * eps) * v_max + s_v / 2  # (..., t_q, d)


# --- measured on the trained model ---------------------------------------------------------------

def compare(model: GPT, n: int = 1000, seed: int = 0, batch: int = 100) -> dict[str, float]:
    """Greedy answers to n held-out prompts (tools/evaluate.py's test stream and scoring) with the
    float cache and with the int8 cache. Returns exact match of each, the fraction of generated
    tokens where the two differ, and the largest |logit difference| (the int8 run's logits
    against the float model's on the very same tokens, so a divergence is not counted twice)."""
    from generate import generate_cached
    from parts import task
    from tools import evaluate

    prompts = task.random_prompts(task.prompt_rng(seed, "test"), n)
    answers = {"float": [""] * n, "int8": [""] * n}
    differ = total = 0
    worst = largest = 0.0
    eos = evaluate.EOS_ID
    for rows in evaluate.length_batches(prompts, batch):
        ids = [task.encode(prompts[i]) for i in rows]
        steps = max(len(p) for p in ids)
        runs = {name: generate_cached(model, ids, steps, eos_id=eos, cache=cache)
                for name, cache in (("float", None), ("int8", int8_cache(model, len(ids))))}
        for name, run in runs.items():
            for i, tokens in zip(rows, run.tokens, strict=True):
                answers[name][i] = evaluate.answer_of(tokens)
        a, b = runs["float"].tokens, runs["int8"].tokens
        N = min(a.shape[1], b.shape[1])
        for row_a, row_b in zip(a, b, strict=True):
            stop = int(np.argmax(row_a == eos)) + 1 if (row_a == eos).any() else N
            stop = min(stop, N)
            differ += int((row_a[:stop] != row_b[:stop]).sum())
            total += stop
        reference = teacher_forced_logits(model, ids, runs["int8"].tokens)
        worst = max(worst, float(np.abs(reference - runs["int8"].logits).max()))
        largest = max(largest, float(np.abs(reference).max()))
    score = {name: sum(a == task.expected_answer(p) for a, p in zip(got, prompts, strict=True)) / n
             for name, got in answers.items()}
    return {"n": n, "float_exact": score["float"], "int8_exact": score["int8"],
            "tokens_differ": differ / total, "tokens": total, "max_logit_diff": worst,
            "max_abs_logit": largest}


def teacher_forced_logits(model: GPT, prompts: list[np.ndarray], tokens: np.ndarray
                          ) -> np.ndarray:
    """The model's logits (no cache, float) for the generated tokens (B, N) after left-padded
    prompts: step n's logits (B, N, V), the ones generated token n was chosen from."""
    from generate import left_pad

    ids, mask = left_pad(prompts)  # (B, P) each
    B, P = ids.shape
    N = tokens.shape[1]
    seq = np.concatenate([ids, tokens[:, :N - 1]], axis=1)  # (B, P + N - 1)
    full = np.concatenate([mask, np.ones((B, N - 1), dtype=mask.dtype)], axis=1)
    return model(seq, attention_mask=full)[:, P - 1:]  # (B, P + N - 1, V) -> (B, N, V)


def per_channel(k: np.ndarray, group: int) -> np.ndarray:
    """k (B, H, T, d) rounded through int8 with one scale per channel for each group of `group`
    tokens (KIVI's key scales; every token quantized, as if no full-precision group were kept)."""
    out = np.empty_like(k)
    for start in range(0, k.shape[2], group):
        chunk = k[:, :, start:start + group].swapaxes(-1, -2)  # (B, H, g, d) -> (B, H, d, g)
        out[:, :, start:start + group] = dequantize(*quantize(chunk), k.dtype).swapaxes(-1, -2)
    return out


def per_token(x: np.ndarray) -> np.ndarray:
    """x (..., d) rounded through int8 with one scale per token (this cache)."""
    return dequantize(*quantize(x), x.dtype)


def key_scale_study(model: GPT, n: int = 300, seed: int = 0) -> dict[str, dict[str, float]]:
    """Per-token against per-channel key scales on the trained model, teacher-forced on n
    held-out prompts and their true answers: each layer's relative squared key error, and the
    largest |logit difference| from the float model with keys rounded each way (values per token
    in both) and how many next-token choices change. Also each layer's outlier measure: the
    largest channel's mean |k| over the median channel's."""
    from attention import (
        causal_mask,
        layer_norm,
        merge_heads,
        scaled_dot_product_attention,
        split_heads,
    )
    from block import mlp
    from parts import task

    schemes: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "not rounded (values only)": lambda k: k, "per token": per_token,
        "per channel, groups of 16": lambda k: per_channel(k, 16),
        "per channel, groups of 32": lambda k: per_channel(k, 32)}
    c = model.config
    stats = {name: {"logit": 0.0, "mean": 0.0, "changed": 0,
                    **{f"mse{i}": 0.0 for i in range(c.n_layers)}}
             for name in [*schemes, "outliers"]}
    energy = [0.0] * c.n_layers
    channel_means = [[] for _ in range(c.n_layers)]
    for prompt in task.random_prompts(task.prompt_rng(seed, "test"), n):
        seq = task.encode(prompt + task.expected_answer(prompt))[None]  # (1, T)
        T = seq.shape[1]
        reference = None
        for name, round_keys in [("float", None), *schemes.items()]:
            x = model.wte[seq] + model.wpe[np.arange(T)]  # (1, T, D)
            for i, p in enumerate(model.blocks):
                h, a = layer_norm(x, *p.ln_1, c.ln_eps), p.attn
                q, k, v = (split_heads(h @ w + b, c.n_heads)  # (1, T, D) -> (1, H, T, d)
                           for w, b in ((a.w_q, a.b_q), (a.w_k, a.b_k), (a.w_v, a.b_v)))
                if round_keys is None:
                    energy[i] += float((k ** 2).sum())
                    channel_means[i].append(np.abs(k).mean(axis=(0, 2)))  # (H, d)
                else:
                    k_hat = round_keys(k)
                    stats[name][f"mse{i}"] += float(((k - k_hat) ** 2).sum())
                    k, v = k_hat, per_token(v)
                out, _ = scaled_dot_product_attention(q, k, v, causal_mask(T))
                x = x + merge_heads(out) @ a.w_o + a.b_o
                x = x + mlp(layer_norm(x, *p.ln_2, c.ln_eps), p)
            logits = layer_norm(x, *model.ln_f, c.ln_eps) @ model.wte.T  # (1, T, V)
            logits = logits[0, len(prompt) - 1:-1]  # the positions that choose answer tokens
            if reference is None:
                reference = logits
                continue
            stats[name]["logit"] = max(stats[name]["logit"],
                                       float(np.abs(logits - reference).max()))
            stats[name]["mean"] += float(np.abs(logits - reference).mean()) / n
            stats[name]["changed"] += int((logits.argmax(-1) != reference.argmax(-1)).sum())
    for name in schemes:
        for i in range(c.n_layers):
            stats[name][f"mse{i}"] /= energy[i]
    for i in range(c.n_layers):
        means = np.mean(channel_means[i], axis=0).ravel()  # (H * d,) mean |k| per channel
        stats["outliers"][f"mse{i}"] = float(means.max() / np.median(means))
    return stats


# --- the command ---------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    from block import GPT
    from parts.checks import SEED, cli_int

    checkpoint = Path(__file__).resolve().parents[1] / "checkpoints" / "reverse.npz"
    ap = argparse.ArgumentParser(description="The int8 KV cache, measured on the trained model.")
    ap.add_argument("--compare", action="store_true",
                    help="int8 against the float cache on held-out prompts")
    ap.add_argument("--scales", action="store_true",
                    help="per-token against per-channel key scales")
    ap.add_argument("--n", type=cli_int(1), default=None,
                    help="held-out prompts (default 1000 for --compare, 300 for --scales)")
    ap.add_argument("--seed", type=SEED, default=0, help="seed of the test stream (default 0)")
    ap.add_argument("--checkpoint", type=Path, default=checkpoint, help="a trained .npz")
    args = ap.parse_args(argv)
    if not (args.compare or args.scales):
        ap.error("give --compare or --scales")
    try:
        model = GPT.load(args.checkpoint)
    except (OSError, ValueError, TypeError) as err:
        ap.error(str(err))
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):  # small products on a shared machine
        if args.compare:
            print_compare(compare(model, args.n or 1000, args.seed), model)
        if args.scales:
            print_scales(key_scale_study(model, args.n or 300, args.seed), args.n or 300)
    return 0


def print_compare(r: dict[str, float], model: GPT) -> None:
    c = model.config
    float_bytes = model.new_cache(1).nbytes
    int8_bytes = model.new_cache(1, dtype="int8").nbytes
    print(f"{r['n']} held-out prompts (test stream), greedy, float32 model; cache for 1 row of "
          f"{c.max_seq_len} positions:")
    print(f"  float32 cache  {float_bytes:>7,} bytes   exact match {100 * r['float_exact']:5.1f}%")
    print(f"  int8 cache     {int8_bytes:>7,} bytes   exact match {100 * r['int8_exact']:5.1f}%"
          f"   ({int8_bytes / float_bytes:.3f}x the bytes, scales counted)")
    print(f"generated tokens that differ: {int(round(r['tokens_differ'] * r['tokens']))} of "
          f"{r['tokens']} ({100 * r['tokens_differ']:.2f}%)")
    print(f"largest |logit difference|: {r['max_logit_diff']:.3f} (largest |logit| "
          f"{r['max_abs_logit']:.1f}: {100 * r['max_logit_diff'] / r['max_abs_logit']:.2f}%; "
          f"stated bound {100 * LOGIT_TOLERANCE:.0f}%)")


def print_scales(stats: dict[str, dict[str, float]], n: int) -> None:
    layers = sorted(int(key[3:]) for key in stats["outliers"] if key.startswith("mse"))
    out = stats["outliers"]
    print(f"key scales on the trained model, {n} held-out prompts teacher-forced")
    print("outlier channels (largest channel's mean |k| / the median channel's): "
          + ", ".join(f"layer {i} {out[f'mse{i}']:.2f}" for i in layers))
    head = "".join(f"  key error L{i}" for i in layers)
    print(f"{'keys rounded':<26}{head}  mean |logit diff|  max  next tokens changed")
    for name, s in stats.items():
        if name == "outliers":
            continue
        cells = "".join(f"{s[f'mse{i}']:>13.2e}" for i in layers)
        print(f"{name:<26}{cells}  {s['mean']:>17.4f}  {s['logit']:.2f}  {s['changed']:>19}")
    print("(key error: sum of squared errors / sum of squares; values rounded per token in "
          "every row)")


if __name__ == "__main__":
    raise SystemExit(main())
