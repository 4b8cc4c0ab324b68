"""Train the string-reversal model with torch autograd, then hand its weights to the NumPy GPT.

    python tools/train.py                   the shipped model's recipe: out/reverse.npz, its log
    python tools/train.py --no-causal-mask  the ablation: same config, steps and seed, no mask
    python tools/train.py --plot            out/mask_ablation.png and a table, from the two logs
    python tools/train.py --quick           a smoke run of a few steps, written under out/quick/
    python tools/train.py --draft           a much smaller model, the draft of speculative decoding

Defaults are written under the repository's out/ (ignored by git), whatever the current
directory; `make train` and `make figures` name the shipped files with --out and --figure.
Every flag and path is checked before step 1, so a run never trains for minutes and then fails.

The torch model (TorchGPT) is the NumPy model's twin: its parameters have exactly the names and
shapes of block.weight_shapes, used as x @ W (in, out), so exporting is {name: p.numpy()} and the
trained model is block.GPT(config, weights=named). Training starts from the same random weights
as GPT(config, seed). Only the answer tokens are scored: the prompt is random, so predicting it
teaches nothing, and a loss on it would hide how well the answer is learned.

Why the ablation: without the causal mask, position i can read token i + 1, which is its target.
The loss falls as low as (or lower than) the honest model's, yet generating token by token, where
the next token does not exist yet, fails.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/x.py` from anywhere: find the repo
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (torch's own spelling)
from torch import nn

from beyond.latent import LatentConfig, LatentGPT
from block import GPT, GPTConfig, random_weights, weight_shapes
from parts import task
from parts.checks import SEED, cli_int, cli_output_file
from parts.files import save_figure, write_json
from tools import evaluate
from tools.cli_types import REPO, cli_float, default_output, refuse_unused

PAD_ID = 0  # right padding in a training batch; never a target
IGNORE = -100  # target of a position the loss skips (F.cross_entropy's ignore_index)

# The shipped files (relative to the repository); written only when named with --out/--figure.
SHIPPED_OUT = "checkpoints/reverse.npz"
LOG = "checkpoints/reverse.log.json"
NO_MASK_LOG = "checkpoints/reverse_no_mask.log.json"  # the ablation's weights are not shipped
FIGURE = "figures/mask_ablation.png"
DRAFT_OUT = "checkpoints/reverse_draft.npz"  # make train-draft: beyond/speculative.py's draft
# The draft: 2 layers are kept (reversal needs a previous-token head, then a mirroring head) but
# every width is halved, so each token costs about a quarter of the target's multiply-adds.
DRAFT_CONFIG = {"d_model": 64, "n_heads": 4, "d_ff": 256}
COMMITTED = (SHIPPED_OUT, LOG, NO_MASK_LOG, FIGURE, DRAFT_OUT,
             "checkpoints/reverse_draft.log.json")
QUICK_DIR = "quick"  # --quick's defaults go under out/quick/

# THREADS_NOTE: one torch thread by default. On a 2-core machine with other work running, torch's
# default of 2 OpenMP threads spin-waits for a thread that is not scheduled: a training step took
# 670-870 ms with 2 threads and 85-90 ms with 1 (memory.py limits BLAS for the same reason).
# On an idle machine --threads 2 may be faster.


@dataclass
class Settings:
    """Everything that decides a training run besides the model config."""

    steps: int = 4000  # 100% held-out exact match (seeds 0 and 1) in 6-8 min on 1 busy core
    batch: int = 64
    lr: float = 3e-3  # peak learning rate, reached after `warmup` steps
    warmup: int = 200  # linear warm-up: Adam's early steps are noisy, large ones can diverge
    min_lr_ratio: float = 0.05  # cosine decay ends at lr * min_lr_ratio
    weight_decay: float = 0.1  # on matrices only (AdamW), not on biases and LayerNorms
    clip: float = 1.0  # gradient-norm clipping: one bad batch cannot throw the weights far
    length_power: float = 0.0  # prompt length L drawn with probability ~ L ** length_power
    seed: int = 0
    causal: bool = True  # False: the ablation, every position sees the whole sequence
    eval_every: int = 500  # steps between held-out exact-match measurements
    monitor_per_length: int = 10  # held-out prompts of each length 1..24 measured every eval


# --- the torch twin of block.GPT -----------------------------------------------------------------

class LayerNorm(nn.Module):
    """Normalise the last axis, then scale by gamma and shift by beta (parameters named as in
    block.weight_shapes)."""

    def __init__(self, D: int, eps: float) -> None:
        super().__init__()
        self.gamma, self.beta, self.eps = nn.Parameter(torch.ones(D)), nn.Parameter(
            torch.zeros(D)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.gamma, self.beta, self.eps)


class Attention(nn.Module):
    """Multi-head self-attention with Q/K/V/O projections used as x @ W + b."""

    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        D, self.n_heads, self.latent = c.d_model, c.n_heads, getattr(c, "kv_latent", None)
        for name in ("q", "o") if self.latent else ("q", "k", "v", "o"):
            setattr(self, f"w_{name}", nn.Parameter(torch.zeros(D, D)))
            setattr(self, f"b_{name}", nn.Parameter(torch.zeros(D)))
        if self.latent:  # MLA (beyond/latent.py): c = x W_dkv, K = c W_uk, V = c W_uv, no biases
            self.w_dkv = nn.Parameter(torch.zeros(D, self.latent))
            self.w_uk, self.w_uv = (nn.Parameter(torch.zeros(self.latent, D)) for _ in "kv")

    def forward(self, x: torch.Tensor, real: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """x (N, D), the N real tokens of a (B, T) batch marked by real (B, T) bool; allowed
        (B, 1, T, T) bool, True = may attend. Returns (N, D)."""
        B, T = real.shape
        H, D = self.n_heads, x.shape[-1]

        def heads(y: torch.Tensor) -> torch.Tensor:
            rows = x.new_zeros(B, T, D)
            rows[real] = y  # (N, D) -> (B, T, D): tokens back in their rows, pads 0
            return rows.view(B, T, H, D // H).transpose(1, 2)  # (B, T, D) -> (B, H, T, d_head)

        q = heads(x @ self.w_q + self.b_q)
        if self.latent:
            c = x @ self.w_dkv  # (N, D) -> (N, d_c)
            k, v = heads(c @ self.w_uk), heads(c @ self.w_uv)
        else:
            k, v = heads(x @ self.w_k + self.b_k), heads(x @ self.w_v + self.b_v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)  # (B, H, T, d_head)
        out = out.transpose(1, 2).reshape(B, T, D)  # (B, H, T, d_head) -> (B, T, D)
        return out[real] @ self.w_o + self.b_o  # (B, T, D) -> (N, D)


class MLP(nn.Module):
    """(N, D) -> (N, d_ff) -> (N, D), token by token, with GPT-2's tanh GELU."""

    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.w_fc, self.b_fc = nn.Parameter(torch.zeros(c.d_model, c.d_ff)), nn.Parameter(
            torch.zeros(c.d_ff))
        self.w_proj, self.b_proj = nn.Parameter(torch.zeros(c.d_ff, c.d_model)), nn.Parameter(
            torch.zeros(c.d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x @ self.w_fc + self.b_fc, approximate="tanh") @ self.w_proj + self.b_proj


class Block(nn.Module):
    """GPT-2's pre-LN block: x + attention(ln_1(x)), then + mlp(ln_2(x))."""

    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.ln_1, self.attn = LayerNorm(c.d_model, c.ln_eps), Attention(c)
        self.ln_2, self.mlp = LayerNorm(c.d_model, c.ln_eps), MLP(c)

    def forward(self, x: torch.Tensor, real: torch.Tensor, allowed: torch.Tensor
                ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), real, allowed)
        return x + self.mlp(self.ln_2(x))


class TorchGPT(nn.Module):
    """block.GPT in torch, for autograd. named_parameters() gives exactly block.weight_shapes's
    names and shapes; the LM head is wte (tied), as in the NumPy model."""

    def __init__(self, config: GPTConfig, named: dict[str, np.ndarray]) -> None:
        super().__init__()
        if config.rope or config.n_kv_heads != config.n_heads:
            raise ValueError("TorchGPT trains learned positions and n_kv_heads == n_heads only")
        self.config = config
        self.wte = nn.Parameter(torch.zeros(config.vocab_size, config.d_model))
        self.wpe = nn.Parameter(torch.zeros(config.max_seq_len, config.d_model))
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_f = LayerNorm(config.d_model, config.ln_eps)
        shapes = {name: tuple(p.shape) for name, p in self.named_parameters()}
        assert shapes == weight_shapes(config), "TorchGPT's names or shapes drifted from block.py"
        # float64 weights make a float64 model (for exact comparisons), anything else float32
        wide = all(np.asarray(a).dtype == np.float64 for a in named.values())
        self.to(torch.float64 if wide else torch.float32)
        # strict: every name present, none extra
        self.load_state_dict({name: torch.from_numpy(np.array(a)) for name, a in named.items()})

    def hidden(self, ids: torch.Tensor, real: torch.Tensor, causal: bool = True) -> torch.Tensor:
        """ids (B, T) right-padded, real (B, T) bool -> final hidden states (N, D) of the N real
        tokens, row by row, after ln_f.

        Everything but attention works on one token at a time, so it runs on the real tokens
        only: with prompts of 1 to 24 characters nearly half of a padded batch is padding, and
        skipping it made a training step about a third cheaper. Positions are 0 .. T - 1: with
        right padding a real token's position is the number of real tokens before it, as in
        block.GPT.
        """
        T = ids.shape[1]
        allowed = real[:, None, None, :]  # (B, T) -> (B, 1, 1, T): pad keys are never read
        if causal:
            allowed = allowed & torch.ones(T, T, dtype=torch.bool).tril()  # (B, 1, T, T)
        else:
            allowed = allowed.expand(-1, 1, T, T)  # (B, 1, 1, T) -> (B, 1, T, T)
        x = (self.wte[ids] + self.wpe[:T])[real]  # (B, T) -> (B, T, D) -> (N, D)
        for block in self.h:
            x = block(x, real, allowed)
        return self.ln_f(x)

    def forward(self, ids: torch.Tensor, real: torch.Tensor | None = None,
                causal: bool = True) -> torch.Tensor:
        """ids (B, T) -> logits (B, T, V). real (B, T) bool marks right padding (default: none);
        a padded position's logits are 0."""
        real = torch.ones_like(ids, dtype=torch.bool) if real is None else real
        logits = self.hidden(ids, real, causal) @ self.wte.T  # (N, D) -> (N, V)
        rows = logits.new_zeros(*ids.shape, logits.shape[-1])
        rows[real] = logits  # (N, V) -> (B, T, V), padded positions 0
        return rows

    def export(self) -> dict[str, np.ndarray]:
        """name -> NumPy array for every weight: what block.GPT(config, weights=...) takes."""
        return {name: p.detach().numpy().copy() for name, p in self.named_parameters()}


def to_numpy_model(model: TorchGPT) -> GPT:
    """The trained weights in the NumPy GPT (always causal, with its own KV cache)."""
    named = model.export()
    cls = LatentGPT if isinstance(model.config, LatentConfig) else GPT
    return cls(model.config, dtype=next(iter(named.values())).dtype, weights=named)


# --- batches -------------------------------------------------------------------------------------

def make_batch(chars: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """B strings -> ids (B, T), targets (B, T), real (B, T) bool, right-padded to the longest.

    Row b is "chars=srahc." shifted by one: ids[t] predicts targets[t] = the token after it.
    Targets are the answer tokens only (the reversed characters and "."); every other target,
    prompt and padding, is IGNORE, so the loss never reads them.
    """
    rows = [task.encode(c + task.SEP + c[::-1] + task.END) for c in chars]
    B, T = len(rows), max(len(r) for r in rows) - 1
    ids = np.full((B, T), PAD_ID, dtype=np.int64)
    targets = np.full((B, T), IGNORE, dtype=np.int64)
    real = np.zeros((B, T), dtype=bool)
    for b, (c, row) in enumerate(zip(chars, rows, strict=True)):
        n = len(row) - 1
        ids[b, :n], real[b, :n] = row[:-1], True
        # The "=" sits at index len(c); from there on each position predicts an answer token.
        targets[b, len(c):n] = row[len(c) + 1:]
    return ids, targets, real


def answer_loss(model: TorchGPT, ids: np.ndarray, targets: np.ndarray, real: np.ndarray,
                causal: bool) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens of a batch (from make_batch). The LM head runs
    only where there is a target, about half the positions."""
    real_t = torch.from_numpy(real)
    targets_t = torch.from_numpy(targets)[real_t]  # (B, T) -> (N,), like the hidden states
    scored = targets_t != IGNORE
    h = model.hidden(torch.from_numpy(ids), real_t, causal)  # (N, D)
    return F.cross_entropy(h[scored] @ model.wte.T, targets_t[scored])  # (A, D) -> (A, V)


def length_weights(power: float) -> np.ndarray:
    """(MAX_CHARS,) probabilities ~ L ** power for L = 1 .. 24; power 0 is uniform. A long
    answer has more tokens to get right and more positions to learn, so it can use more draws."""
    w = np.arange(1, task.MAX_CHARS + 1, dtype=np.float64) ** power
    return w / w.sum()


def learning_rate(step: int, s: Settings) -> float:
    """Linear warm-up to s.lr, then cosine decay to s.lr * s.min_lr_ratio at the last step."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: TorchGPT, s: Settings) -> torch.optim.AdamW:
    """AdamW; weight decay pulls the matrices (embeddings included) toward 0, never a bias or a
    LayerNorm's gamma/beta, whose natural values are 0 and 1, not 0."""
    matrices = [p for p in model.parameters() if p.ndim == 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": matrices, "weight_decay": s.weight_decay},
                              {"params": vectors, "weight_decay": 0.0}],
                             lr=s.lr, betas=(0.9, 0.98))


# --- generating the way the model was trained -----------------------------------------------------

@torch.no_grad()
def greedy_answers(model: TorchGPT, prompts: list[str], causal: bool = True) -> list[str]:
    """Greedy answers, token by token, recomputing the whole sequence each step with the model's
    own mask (an unmasked model has no KV cache: every earlier position changes when a token is
    added). Prompts of one length run together, so no row needs padding. An answer ends at its
    first "." or after len(prompt) tokens (the length of a correct answer)."""
    answers = [""] * len(prompts)
    for P in sorted({len(p) for p in prompts}):
        rows = [i for i, p in enumerate(prompts) if len(p) == P]
        seq = torch.from_numpy(np.stack([task.encode(prompts[i]) for i in rows]))  # (b, P)
        for _ in range(P):
            logits = model(seq, causal=causal)[:, -1]  # (b, t, V) -> (b, V)
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)  # (b, t) -> (b, t+1)
        for i, row in zip(rows, seq[:, P:].numpy(), strict=True):
            text = task.decode(row)
            answers[i] = text[:text.index(task.END) + 1] if task.END in text else text
    return answers


@torch.no_grad()
def teacher_forced_exact(model: TorchGPT, chars: list[str], causal: bool = True) -> float:
    """Fraction of strings whose every answer token is the argmax GIVEN the true answer so far:
    one forward pass, no generation. For a causal model this equals greedy exact match; for an
    unmasked one it is what the loss sees, and generation is a different story."""
    ids, targets, real = make_batch(chars)
    guess = model(torch.from_numpy(ids), torch.from_numpy(real), causal).argmax(-1).numpy()
    right = (guess == targets) | (targets == IGNORE)
    return float(right.all(axis=1).mean())


def exact_match(prompts: list[str], answers: list[str]) -> float:
    """Fraction of answers equal to task.expected_answer of their prompt."""
    return float(np.mean([a == task.expected_answer(p) for p, a in zip(prompts, answers,
                                                                         strict=True)]))


def monitor_chars(seed: int, per_length: int) -> list[str]:
    """per_length held-out strings of every length 1 .. 24 (the "monitor" stream), so a
    measurement during training covers the long prompts as well as the short ones."""
    rng = task.prompt_rng(seed, "monitor")
    return [c for L in range(1, task.MAX_CHARS + 1)
            for c in task.random_chars(rng, per_length, np.eye(task.MAX_CHARS)[L - 1])]


# --- the training loop ---------------------------------------------------------------------------

def progress_line(step: int, steps: int, loss: float, elapsed: float) -> str:
    """The live line: step, loss, elapsed time, ETA (from the mean time per step so far)."""
    eta = elapsed / max(step, 1) * (steps - step)
    return (f"step {step:>5}/{steps}  loss {loss:.4f}  elapsed {clock(elapsed)}  "
            f"eta {clock(eta)}")


def show(line: str, keep: bool = False) -> None:
    """Rewrite the current terminal line in place (carriage return, padded over the old text);
    keep=True ends it with a newline so it stays on screen."""
    print("\r" + line.ljust(78), end="\n" if keep else "", flush=True)


def clock(seconds: float) -> str:
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


def train(config: GPTConfig, s: Settings, log_path: Path | None = None,
          verbose: bool = False) -> tuple[TorchGPT, dict]:
    """Train from GPT(config, s.seed)'s random weights for s.steps steps of s.batch fresh random
    prompts each; return the model and its log (also written to log_path, if given, at every
    measurement, so an interrupted run leaves its curve behind)."""
    torch.manual_seed(s.seed)
    start = random_weights(config, s.seed)  # float64 draws
    model = TorchGPT(config, {name: w.astype(np.float32) for name, w in start.items()})
    optimizer = make_optimizer(model, s)
    rng, weights = task.prompt_rng(s.seed, "train"), length_weights(s.length_power)
    monitor = monitor_chars(s.seed, s.monitor_per_length)
    monitor_prompts = [c + task.SEP for c in monitor]
    log = {"settings": asdict(s), "config": asdict(config), "losses": [], "evals": []}
    window: list[float] = []  # losses since the last log entry: the log keeps their mean
    start, eval_seconds = time.perf_counter(), 0.0
    for step in range(1, s.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step - 1, s)
        loss = answer_loss(model, *make_batch(task.random_chars(rng, s.batch, weights)), s.causal)
        if not torch.isfinite(loss):  # stop now: the export would refuse the weights anyway
            raise FloatingPointError(f"the loss is {loss.item()} at step {step} (a learning rate "
                                     f"of {s.lr} is too high?); nothing written")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.clip)
        optimizer.step()
        window.append(loss.item())
        if step % 10 == 0 or step == s.steps:
            log["losses"].append({"step": step, "loss": float(np.mean(window))})
            window = []
        elapsed = time.perf_counter() - start
        if verbose and (step % 10 == 0 or step == s.steps):
            show(progress_line(step, s.steps, log["losses"][-1]["loss"], elapsed))
        if step % s.eval_every == 0 or step == s.steps:
            t0 = time.perf_counter()
            model.eval()
            entry = {"step": step, "elapsed": round(elapsed, 1),
                     "generation_exact_match": exact_match(
                         monitor_prompts, greedy_answers(model, monitor_prompts, s.causal)),
                     "teacher_forced_exact_match": teacher_forced_exact(model, monitor, s.causal)}
            model.train()
            log["evals"].append(entry)
            eval_seconds += time.perf_counter() - t0
            if verbose:
                show(f"step {step:>5}  {clock(elapsed)}  loss {log['losses'][-1]['loss']:.4f}  "
                     f"held-out exact match: generated {entry['generation_exact_match']:.1%}, "
                     f"teacher-forced {entry['teacher_forced_exact_match']:.1%}", keep=True)
            write_log(log, log_path)
    log["train_seconds"] = round(time.perf_counter() - start, 1)
    log["eval_seconds"] = round(eval_seconds, 1)
    log["final_loss"] = float(np.mean([e["loss"] for e in log["losses"][-10:]]))  # last 100 steps
    write_log(log, log_path)
    return model, log


def write_log(log: dict, path: Path | None) -> None:
    """The log as JSON at path (if given), whole or not at all: it is rewritten at every
    measurement, and a run stopped during one keeps the previous log."""
    if path is not None:
        write_json(path, log, indent=1)


def final_evaluation(model: TorchGPT, causal: bool, n: int, seed: int) -> dict:
    """Exact match on n fresh prompts of the "test" stream (the ones `python tools/evaluate.py
    --seed seed` draws): generated in torch with the training mask, generated by the NumPy
    cached decoder (always causal), and teacher-forced."""
    prompts = task.random_prompts(task.prompt_rng(seed, "test"), n)
    model.eval()
    cached = evaluate.decode_prompts(to_numpy_model(model), prompts, naive=False)[0]
    return {"n": n, "seed": seed,
            "torch_generation_exact_match": exact_match(prompts,
                                                        greedy_answers(model, prompts, causal)),
            "numpy_cached_exact_match": exact_match(prompts, cached),
            "teacher_forced_exact_match": teacher_forced_exact(model, [p[:-1] for p in prompts],
                                                               causal)}


# --- the ablation figure -------------------------------------------------------------------------

def plot_ablation(masked: dict, unmasked: dict, path: Path) -> Path:
    """Loss curves (left) and held-out exact match during training (right) of both runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for log, name, color in ((masked, "causal mask", "tab:blue"),
                             (unmasked, "no mask", "tab:red")):
        steps = [e["step"] for e in log["losses"]]
        left.plot(steps, [e["loss"] for e in log["losses"]], color=color, lw=1, label=name)
        steps = [e["step"] for e in log["evals"]]
        right.plot(steps, [100 * e["generation_exact_match"] for e in log["evals"]], "o-",
                   color=color, label=f"{name}: generated token by token")
        # With the mask the two coincide: greedy generation feeds back exactly the tokens
        # teacher forcing would, as long as every argmax is right.
        right.plot(steps, [100 * e["teacher_forced_exact_match"] for e in log["evals"]], "x--",
                   color=color, alpha=0.6, label=f"{name}: teacher-forced (what the loss sees)")
    left.set(yscale="log", xlabel="step", ylabel="loss on answer tokens (mean of 10 steps)",
             title="training loss")
    left.legend()
    right.set(xlabel="step", ylabel="held-out exact match (%)", ylim=(-3, 103),
              title="greedy exact match on held-out prompts")
    right.legend(fontsize=7, loc="center right")
    fig.suptitle("With and without the causal mask: same config, steps and seed")
    try:
        fig.tight_layout()
        return save_figure(fig, path, dpi=90)
    finally:
        plt.close(fig)


def ablation_table(masked: dict, unmasked: dict) -> str:
    """A Markdown table of both runs' final numbers (greedy exact match on held-out prompts)."""
    keys = ("torch_generation_exact_match", "numpy_cached_exact_match",
            "teacher_forced_exact_match")
    # Each run generates in torch with the attention it was trained with (masked or not), and in
    # the NumPy decoder, which always masks; teacher-forced, the true answer is in the input.
    rows = ["| run | final loss | held-out prompts | torch, attention as trained | "
            "NumPy cached decoder (masked) | teacher-forced |", "|---|---|---|---|---|---|"]
    for name, log in (("causal mask", masked), ("no causal mask", unmasked)):
        f = log.get("final", {})
        cells = [f"{100 * f[k]:.1f}%" if k in f else "n/a" for k in keys]
        rows.append(f"| {name} | {log['final_loss']:.2e} | {f.get('n', 'n/a')} | "
                    + " | ".join(cells) + " |")
    return "\n".join(rows)


def read_log(path: Path) -> dict:
    """A loss log written by train(), or ValueError naming the path: --plot reads all of these."""
    try:
        log = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read the loss log {str(path)!r}: {err}") from None
    keys = ("losses", "evals", "final_loss")
    if not (isinstance(log, dict) and all(k in log for k in keys)
            and all(isinstance(e, dict) and {"step", "loss"} <= e.keys() for e in log["losses"])
            and all(isinstance(e, dict) and {"step", "generation_exact_match",
                                             "teacher_forced_exact_match"} <= e.keys()
                    for e in log["evals"])):
        raise ValueError(f"{str(path)!r} is not a loss log written by train.py (it needs "
                         f"{', '.join(keys)})")
    return log


# --- the command ---------------------------------------------------------------------------------

def is_committed(path: Path) -> bool:
    """Whether path is one of the shipped files."""
    return path.resolve() in {(REPO / p).resolve() for p in COMMITTED}


def output_paths(ap: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[Path, Path]:
    """The checkpoint and its log for this run: --out, else out/ (out/quick/ with --quick); the
    log goes next to the checkpoint as .log.json unless --log names it."""
    name = "reverse" if args.causal else "reverse_no_mask"
    name += "_draft" if args.draft else ""
    if args.kv_latent:  # an MLA model: its own name, never the shipped checkpoint's
        name = f"{name}_mla{args.kv_latent}"
    out = args.out or default_output(ap, f"{QUICK_DIR}/{name}.npz" if args.quick else
                                     f"{name}.npz")
    return out, args.log or out.with_name(out.stem + ".log.json")


D_MODEL = GPTConfig().d_model  # the width every non-draft run trains


def kv_latent(text: str) -> int:
    """--kv-latent: d_c in [1, d_model]. The latent c = x W_dkv is a linear image of the
    d_model-wide token vector x, so its rank is at most d_model: a wider latent holds nothing
    more, caches more (past 2 x d_model, more than the K and V it replaces), and its weights grow
    with it without limit."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
    if not 1 <= value <= D_MODEL:
        raise argparse.ArgumentTypeError(
            f"must be in [1, {D_MODEL}] (d_model), got {value}: the latent is a linear image of "
            f"the {D_MODEL}-wide token vector, so a wider one holds nothing more")
    return value


TRAINING_FLAGS = ("--out", "--log", "--steps", "--batch", "--lr", "--warmup", "--weight-decay",
                  "--length-power", "--seed", "--threads", "--eval-every", "--final-n",
                  "--kv-latent")
QUICK_SETS = ("--steps", "--batch", "--warmup", "--eval-every", "--final-n")  # --quick's own


def main(argv: list[str] | None = None) -> int:
    d = Settings()
    ap = argparse.ArgumentParser(description="Train the string-reversal model (torch), export it "
                                             "to the NumPy GPT. A flag the run would not use is "
                                             "refused.")
    ap.add_argument("--out", type=cli_output_file(".npz"), default=None,
                    help="checkpoint to write (default out/reverse.npz in the repository, "
                         "out/reverse_no_mask.npz with --no-causal-mask, under out/quick/ with "
                         f"--quick; make train writes {SHIPPED_OUT})")
    ap.add_argument("--log", type=cli_output_file(".json"), default=None,
                    help="loss log to write (default: next to the checkpoint, as .log.json)")
    ap.add_argument("--steps", type=cli_int(1, 10_000_000), default=None,
                    help=f"default {d.steps}")
    ap.add_argument("--batch", type=cli_int(1, 4096), default=None, help=f"default {d.batch}")
    ap.add_argument("--lr", type=cli_float(0, 1, low_open=True), default=None,
                    help=f"peak learning rate (default {d.lr})")
    ap.add_argument("--warmup", type=cli_int(1, 10_000_000), default=None,
                    help=f"default {d.warmup}")
    ap.add_argument("--weight-decay", type=cli_float(0, 10), default=None,
                    help=f"default {d.weight_decay}")
    ap.add_argument("--length-power", type=cli_float(-10, 10), default=None,
                    help=f"draw prompt length L with probability ~ L**power (default "
                         f"{d.length_power}: uniform)")
    ap.add_argument("--seed", type=SEED, default=None, help=f"default {d.seed}")
    ap.add_argument("--threads", type=cli_int(1, 512), default=None,
                    help="torch threads (default 1: see THREADS_NOTE in train.py)")
    ap.add_argument("--eval-every", type=cli_int(1, 10_000_000), default=None,
                    help=f"steps between held-out measurements (default {d.eval_every})")
    ap.add_argument("--kv-latent", type=kv_latent, default=None, metavar="D_C",
                    help=f"multi-head latent attention caching a D_C-wide latent per token, D_C "
                         f"in [1, {D_MODEL}] (beyond/latent.py; the latent is made from the "
                         f"{D_MODEL}-wide token vector, so a wider one holds nothing more); "
                         "written to out/reverse_mla{D_C}.npz by default")
    ap.add_argument("--no-causal-mask", dest="causal", action="store_false",
                    help="the ablation: attention without the causal mask")
    ap.add_argument("--draft", action="store_true",
                    help=f"train the small draft model {DRAFT_CONFIG} for speculative decoding "
                         f"(written to out/reverse_draft.npz; make train-draft writes {DRAFT_OUT})")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run of 20 steps on batch 8, written under out/quick/ unless "
                         "--out says otherwise (never over the shipped files)")
    ap.add_argument("--plot", action="store_true",
                    help="no training: draw the figure (default out/mask_ablation.png) and print "
                         "the ablation table from the two loss logs")
    ap.add_argument("--figure", type=cli_output_file(".png"), default=None,
                    help="with --plot: the figure to write (default out/mask_ablation.png, "
                         f"out/quick/mask_ablation.png with --quick; make figures writes {FIGURE})")
    ap.add_argument("--logs", type=Path, nargs=2, default=None, metavar=("MASKED", "UNMASKED"),
                    help=f"with --plot: the two loss logs (default {LOG} {NO_MASK_LOG})")
    ap.add_argument("--final-n", type=cli_int(1, 100_000), default=None,
                    help="held-out prompts for the final exact match (default 1000)")
    args = ap.parse_args(argv)
    if args.draft and (not args.causal or args.plot or args.kv_latent):
        ap.error("--draft trains the causal draft model: not with --no-causal-mask, --plot or "
                 "--kv-latent")

    if args.plot:
        refuse_unused(ap, args, TRAINING_FLAGS, "trains; --plot only draws from the logs")
        if not args.causal:
            ap.error("--no-causal-mask trains; --plot only draws from the logs")
        return plot(ap, args)
    refuse_unused(ap, args, ["--figure", "--logs"], "applies only with --plot")
    if args.quick:
        refuse_unused(ap, args, QUICK_SETS, "is set by --quick (20 steps of 8 prompts): drop one")
    out, log = output_paths(ap, args)
    if args.quick and (is_committed(out) or is_committed(log)):
        ap.error(f"--quick never writes over a shipped file ({out}, {log})")

    def given(name: str, default: object) -> object:
        value = getattr(args, name)
        return default if value is None else value

    s = Settings(**{name: given(name, getattr(d, name)) for name in
                    ("steps", "batch", "lr", "warmup", "weight_decay", "length_power", "seed",
                     "eval_every")}, causal=args.causal)
    final_n = given("final_n", 1000)
    if args.quick:
        s.steps, s.batch, s.warmup, s.eval_every, s.monitor_per_length = 20, 8, 5, 10, 1
        final_n = 48
    torch.set_num_threads(given("threads", 1))  # THREADS_NOTE
    config = (GPTConfig(**DRAFT_CONFIG) if args.draft else LatentConfig(kv_latent=args.kv_latent)
              if args.kv_latent else GPTConfig())
    print(f"training {'with' if s.causal else 'WITHOUT'} the causal mask: {s.steps} steps of "
          f"{s.batch} prompts (length power {s.length_power}), lr {s.lr}, warm-up {s.warmup}, "
          f"seed {s.seed}, torch threads {torch.get_num_threads()}")
    try:
        model, result = train(config, s, log, verbose=True)
    except FloatingPointError as err:
        print(f"\ntrain.py: {err}", file=sys.stderr)
        return 1
    print(f"trained in {clock(result['train_seconds'])} ({result['train_seconds']} s, "
          f"{result['eval_seconds']} s of it measuring); final loss {result['final_loss']:.2e}")
    result["final"] = final_evaluation(model, s.causal, final_n, s.seed)
    write_log(result, log)
    f = result["final"]
    print(f"exact match on {f['n']} held-out prompts: torch generation "
          f"{f['torch_generation_exact_match']:.1%}, NumPy cached decoder "
          f"{f['numpy_cached_exact_match']:.1%}, teacher-forced "
          f"{f['teacher_forced_exact_match']:.1%}")
    to_numpy_model(model).save(out)
    print(f"wrote {out} ({out.stat().st_size:,} bytes) and {log}")
    return 0


def plot(ap: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """--plot: the ablation table and figure from two loss logs (the shipped ones by default)."""
    paths = args.logs or [REPO / LOG, REPO / NO_MASK_LOG]
    try:
        masked, unmasked = (read_log(path) for path in paths)
    except ValueError as err:
        ap.error(str(err))
    figure = args.figure or default_output(ap, f"{QUICK_DIR}/mask_ablation.png" if args.quick
                                           else "mask_ablation.png")
    if args.quick and is_committed(figure):
        ap.error(f"--quick never writes over a shipped file ({figure})")
    print(ablation_table(masked, unmasked))
    print(f"wrote {plot_ablation(masked, unmasked, figure)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
