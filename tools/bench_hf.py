"""The benchmark's sections against Hugging Face (tools/bench.py runs them), with the same
weights in both (bench_setup.build_pair):

    3. cached decode per token, prefill and generate: ours vs Hugging Face GPT-2, at the
       assignment's widths and at GPT-2-small shapes
    4. the weight-streaming floor: one bare (1, D) @ W pass over every weight matrix, timed in the
       same loop, the least work any decode step can do
    7. batched cached decode, B rows at once: tokens per second, ours vs Hugging Face, beside the
       floor's bound (B tokens per pass over the weights)

Each section measures (returning a dict for bench.json), prints its table and draws its figure.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from block import GPT
from fast import model as fastpath
from generate import decode, generate_cached, greedy, prefill
from tools.bench_setup import (
    DECODE_BLOCK,
    GPT2_SMALL_SHAPE,
    NAMES,
    PROMPT_LEN,
    SHORT,
    Settings,
    build_pair,
    random_ids,
    save,
)
from tools.measure import fmt, interleave, note, ratio, summary

# --- 3 and 4. this repo vs Hugging Face, and the weight-streaming floor --------------------------

class OursGreedy:
    """Our cached greedy decode of B prompts at once, one token per row per step() (the (B, P)
    prompt is prefilled on creation)."""

    def __init__(self, model: GPT, prompt: np.ndarray) -> None:
        self.model, self.cache = model, model.new_cache(prompt.shape[0])
        self.token = greedy(prefill(model, prompt, self.cache))  # (B,)
        self.tokens: list[list[int]] = []  # one list of B tokens per step

    def step(self) -> None:
        self.token = greedy(decode(self.model, self.token, self.cache))  # (B,) -> (B, V) -> (B,)
        self.tokens.append(self.token.tolist())


class HFGreedy:
    """The same work with Hugging Face: one token per row per call, past_key_values carried
    along. Call inside torch.inference_mode()."""

    def __init__(self, hf: object, prompt: np.ndarray) -> None:
        import torch

        self.hf = hf
        out = hf(input_ids=torch.from_numpy(prompt), use_cache=True)
        self.past, self.token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        self.tokens: list[list[int]] = []

    def step(self) -> None:
        out = self.hf(input_ids=self.token, past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        self.token = out.logits[:, -1].argmax(-1, keepdim=True)  # (B, V) -> (B, 1)
        self.tokens.append(self.token[:, 0].tolist())


def weight_matrices(model: GPT) -> list[np.ndarray]:
    """Every matrix one decode step multiplies by, in the order the forward pass reads them:
    W_Q, W_K, W_V as the one side-by-side matrix the fast path multiplies by (fastpath.fuse_qkv)."""
    mats = []
    for p in model.blocks:
        a = p.attn
        fused = isinstance(model, fastpath.FastGPT) and fastpath.TRICKS["fused_qkv"]
        mats += [a.w_q.base] if fused else [a.w_q, a.w_k, a.w_v]
        mats += [a.w_o, p.w_fc, p.w_proj]
    return mats + [model.wte.T]  # the tied LM head, read as the same transposed view


def floor_pass(mats: list[np.ndarray], vectors: dict[int, np.ndarray]) -> None:
    """The least work any decode step can do: one (1, d_in) @ (d_in, d_out) per matrix, so every
    weight is read once. At GPT-2-small shapes the weights do not fit in cache, so this is the
    time to stream them from memory."""
    for w in mats:
        vectors[w.shape[0]] @ w  # (1, d_in) @ (d_in, d_out) -> (1, d_out)


def decode_side_by_side(model: GPT, hf: object, prompt: np.ndarray, steps: int,
                        rounds: int) -> dict:
    """Both greedy loops advance side by side: DECODE_BLOCK steps of ours, DECODE_BLOCK of Hugging
    Face, DECODE_BLOCK floor passes, and again, so a busy neighbour slows all three alike while
    each side still runs consecutive steps as a real decode loop does (alternating single steps
    would leave each side's code and data cold). Returns step times and each side's tokens."""
    mats = weight_matrices(model)
    vectors = {w.shape[0]: np.ones((1, w.shape[0]), np.float32) for w in mats}
    times: dict[str, list[float]] = {"ours": [], "hf": [], "floor": []}
    for _ in range(rounds):
        ours, theirs = OursGreedy(model, prompt), HFGreedy(hf, prompt)
        variants = {"ours": ours.step, "hf": theirs.step,
                    "floor": lambda: floor_pass(mats, vectors)}
        block = min(DECODE_BLOCK, steps)
        for who, t in interleave(variants, math.ceil(steps / block),
                                 dict.fromkeys(variants, block)).items():
            times[who] += t
    return {"times": times, "floor_bytes": sum(w.nbytes for w in mats),
            "tokens_equal": ours.tokens == theirs.tokens}


def prefill_side_by_side(model: GPT, hf: object, prompt: np.ndarray, rounds: int) -> dict:
    """Prefill of a (B, P) prompt into an empty cache. Ours computes the LM head for the last
    position only; Hugging Face is asked for the same with logits_to_keep=1. Each side's time
    includes making and dropping its cache, as a user's first call does: ours allocates all
    max_len positions up front (the OS backs a page when it is first written: see
    fastpath.zeros_in_small_pages for why that page is 4 KB), Hugging Face's grows to the P it
    holds."""
    import torch

    prompt_t = torch.from_numpy(prompt)
    hf_last = hf(input_ids=prompt_t, use_cache=True, logits_to_keep=1).logits[:, -1].numpy()
    B = prompt.shape[0]
    ours_last = prefill(model, prompt, model.new_cache(B))  # (B, V)
    times = interleave({"ours": lambda: prefill(model, prompt, model.new_cache(B)),
                        "hf": lambda: hf(input_ids=prompt_t, use_cache=True, logits_to_keep=1)},
                       rounds)
    return {"times": times,
            "argmax_equal": bool(np.array_equal(greedy(ours_last), greedy(hf_last))),
            "max_abs_logit_diff": float(np.abs(ours_last - hf_last).max())}


def generate_side_by_side(model: GPT, hf: object, prompt: np.ndarray, steps: int,
                          rounds: int) -> dict:
    """The whole call a user makes: our generate_cached vs hf.generate (greedy, same prompt)."""
    import torch

    prompt_t = torch.from_numpy(prompt)
    tokens = {}

    def ours():
        tokens["ours"] = generate_cached(model, prompt, steps).tokens  # (1, steps)

    def theirs():
        out = hf.generate(input_ids=prompt_t, attention_mask=torch.ones_like(prompt_t),
                          max_new_tokens=steps, do_sample=False)  # (1, P + steps)
        tokens["hf"] = out[:, prompt.shape[1]:].numpy()

    times = interleave({"ours": ours, "hf": theirs}, rounds)
    return {"times": times, "tokens_equal": bool(np.array_equal(tokens["ours"], tokens["hf"]))}


def versus_hf(name: str, shape: dict, steps: int, rounds: int, s: Settings, seed: int) -> dict:
    """Cached greedy decode per token (with the weight-streaming floor), prefill, and generate:
    ours vs Hugging Face with the same weights."""
    import torch

    hf, model = build_pair(shape, seed)
    rng = np.random.default_rng(seed)
    prompt = random_ids(rng, shape["vocab_size"], PROMPT_LEN)
    long_prompt = random_ids(rng, shape["vocab_size"], s.prefill_len)
    with torch.inference_mode():
        note(f"{SHORT[name]}: decode per token")
        dec = decode_side_by_side(model, hf, prompt, steps, rounds)
        note(f"{SHORT[name]}: prefill of {s.prefill_len}")
        pre = prefill_side_by_side(model, hf, long_prompt, s.prefill_rounds)
        note(f"{SHORT[name]}: generate {steps} tokens")
        gen = generate_side_by_side(model, hf, prompt, steps, rounds)
    d, p, g = ({who: summary(t) for who, t in x["times"].items()} for x in (dec, pre, gen))
    return {
        "name": name, "description": NAMES[name], "shape": shape,
        "hf_attention": hf.config._attn_implementation,
        "decode_steps": steps, "rounds": rounds, "decode_per_token": d,
        "decode_ours_over_hf": ratio(d, "ours", "hf"),
        "floor_bytes": dec["floor_bytes"],
        "floor_gb_per_s": dec["floor_bytes"] / d["floor"]["median_ms"] / 1e6,
        "decode_ours_over_floor": ratio(d, "ours", "floor"),
        "prefill_len": s.prefill_len, "prefill": p, "prefill_ours_over_hf": ratio(p, "ours", "hf"),
        "generate": g, "generate_ours_over_hf": ratio(g, "ours", "hf"),
        "decode_tokens_equal": dec["tokens_equal"], "generate_tokens_equal": gen["tokens_equal"],
        "prefill_argmax_equal": pre["argmax_equal"],
        "prefill_max_abs_logit_diff": pre["max_abs_logit_diff"],
    }


# --- 7. batched decode ---------------------------------------------------------------------------

def batched_decode(s: Settings, seed: int) -> dict:
    """B prompts of batch_prompt_len tokens decoded together for batch_new_tokens greedy steps,
    GPT-2-small shapes: our decode vs Hugging Face's, DECODE_BLOCK steps of each in turn with
    DECODE_BLOCK floor passes between (as in section 3). Tokens per second count decode steps
    only; the prefill of the (B, P) prompts is timed apart, also side by side."""
    import torch

    hf, model = build_pair(GPT2_SMALL_SHAPE, seed)
    rng = np.random.default_rng(seed)
    rows = []
    with torch.inference_mode():
        for B in s.batch_sizes:
            note(f"batch {B}")
            prompt = rng.integers(0, GPT2_SMALL_SHAPE["vocab_size"], (B, s.batch_prompt_len))
            dec = decode_side_by_side(model, hf, prompt, s.batch_new_tokens, s.batch_rounds)
            pre = prefill_side_by_side(model, hf, prompt, max(2, s.batch_rounds))
            step = {who: summary(t) for who, t in dec["times"].items()}
            per_s = {who: B / (step[who]["median_ms"] / 1e3) for who in ("ours", "hf")}
            # A decode step must read every weight once, whatever B: at best B tokens per pass.
            per_s["floor_bound"] = B / (step["floor"]["median_ms"] / 1e3)
            rows.append({"batch": B, "step": step, "tokens_per_s": per_s,
                         "ours_over_hf": per_s["ours"] / per_s["hf"],
                         "ours_over_floor_bound": per_s["ours"] / per_s["floor_bound"],
                         "prefill": {who: summary(t) for who, t in pre["times"].items()},
                         "tokens_equal": dec["tokens_equal"],
                         "prefill_argmax_equal": pre["argmax_equal"]})
    return {"name": "gpt2_small", "description": NAMES["gpt2_small"], "shape": GPT2_SMALL_SHAPE,
            "prompt_len": s.batch_prompt_len, "new_tokens": s.batch_new_tokens,
            "rounds": s.batch_rounds, "floor_bytes": sum(w.nbytes for w in weight_matrices(model)),
            "rows": rows}


# --- printing and plots --------------------------------------------------------------------------

def print_versus_hf(vs_hf: dict) -> None:
    """Sections 3 and 4: one block per model shape."""
    print("\n3-4. this repo vs Hugging Face (same weights, float32); the weight-streaming floor")
    for v in vs_hf.values():
        d, sh = v["decode_per_token"], v["shape"]
        print(f"  {v['description']}: {sh['n_layer']} layers, d_model {sh['n_embd']}, "
              f"{sh['n_head']} heads, {sh['n_positions']} positions (HF attention: "
              f"{v['hf_attention']}); prompt {PROMPT_LEN}")
        print(f"    decode/token  ours {fmt(d['ours'])}  HF {fmt(d['hf'])}  "
              f"ours/HF {v['decode_ours_over_hf']:.2f}")
        print(f"    floor (bare matvec over {v['floor_bytes'] / 1e6:.1f} MB) {fmt(d['floor'])} "
              f"= {v['floor_gb_per_s']:.1f} GB/s; decode/floor {v['decode_ours_over_floor']:.2f}")
        print(f"    prefill {v['prefill_len']}  ours {fmt(v['prefill']['ours'])}  "
              f"HF {fmt(v['prefill']['hf'])}  ours/HF {v['prefill_ours_over_hf']:.2f}")
        print(f"    generate {v['decode_steps']} tokens  ours {fmt(v['generate']['ours'])}  "
              f"HF generate() {fmt(v['generate']['hf'])}  ours/HF "
              f"{v['generate_ours_over_hf']:.2f}")


def print_batched(b: dict) -> None:
    """Section 7's table, then each batch's prefill."""
    print(f"\n7. batched cached decode, {b['description']}: prompt {b['prompt_len']}, "
          f"{b['new_tokens']} new tokens per row; decode steps only (prefill below)")
    print(f"{'B':>4} {'ours step':>27} {'HF step':>27} {'ours tok/s':>11} {'HF tok/s':>9} "
          f"{'ours/HF':>8} {'floor bound':>12} {'ours/bound':>11}")
    for row in b["rows"]:
        t, st = row["tokens_per_s"], row["step"]
        print(f"{row['batch']:>4} {fmt(st['ours']):>27} {fmt(st['hf']):>27} {t['ours']:>11.0f} "
              f"{t['hf']:>9.0f} {row['ours_over_hf']:>8.2f} {t['floor_bound']:>12.0f} "
              f"{row['ours_over_floor_bound']:>11.2f}")
    print(f"  floor bound = B tokens per bare pass over the {b['floor_bytes'] / 1e6:.0f} MB of "
          "weights, measured in the same loop")
    for row in b["rows"]:
        p = row["prefill"]
        print(f"  prefill (B={row['batch']}, {b['prompt_len']})  ours {fmt(p['ours'])}  "
              f"HF {fmt(p['hf'])}  ours/HF {ratio(p, 'ours', 'hf'):.2f}")


def plot_versus_hf(vs_hf: dict, prefill_len: int, machine: str, path: Path) -> str:
    """Sections 3 and 4 as bars: decode per token (with the floor) and prefill, per shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8.0, 3.8))
    labels = list(vs_hf)
    x = np.arange(len(labels))
    for ax, key, title in ((axes[0], "decode_per_token", "decode, ms per token"),
                           (axes[1], "prefill", f"prefill of {prefill_len} tokens, ms")):
        whos = ["ours", "hf", "floor"] if key == "decode_per_token" else ["ours", "hf"]
        for i, who in enumerate(whos):
            vals = [vs_hf[c][key][who]["median_ms"] for c in labels]
            bars = ax.bar(x + (i - (len(whos) - 1) / 2) * 0.25, vals, 0.25,
                          label={"ours": "this repo", "hf": "Hugging Face",
                                 "floor": "matvec floor"}[who])
            ax.bar_label(bars, [f"{v:.3g}" for v in vals], fontsize=7)
        ax.set(xticks=x, xticklabels=[SHORT[c] for c in labels], yscale="log", title=title)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Same weights, float32 ({machine})", fontsize=9)
    return save(fig, path)


def plot_batch(b: dict, machine: str, path: Path) -> str:
    """Decode tokens/s vs B: ours and Hugging Face, and the floor's bound B / (one bare pass)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    B = [row["batch"] for row in b["rows"]]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for who, label, style in (("ours", "this repo", "o-"), ("hf", "Hugging Face", "s-"),
                              ("floor_bound", "floor's bound: B tokens per pass over the "
                                              "weights", "k--")):
        ax.plot(B, [row["tokens_per_s"][who] for row in b["rows"]], style, label=label)
    for row in b["rows"]:
        ax.annotate(f"{row['ours_over_hf']:.2f}x HF", (row["batch"], row["tokens_per_s"]["ours"]),
                    textcoords="offset points", xytext=(5, -13), ha="left", fontsize=8)
    ax.set(xscale="log", yscale="log", xlabel="batch size B (rows decoded together)",
           ylabel="decode tokens per second (all rows)",
           title=f"Batched cached decode, {b['description']}\nprompt {b['prompt_len']}, "
                 f"{b['new_tokens']} new tokens per row; {machine}")
    ax.set_xticks(B, [str(x) for x in B])
    ax.set_xlim(min(B) / 1.5, max(B) * 2.5)  # room for the last label
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, path)

