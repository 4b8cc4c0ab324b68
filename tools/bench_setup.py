"""What every section of the benchmark shares: how much to measure (FULL, the benchmark; QUICK,
a smoke run of every field at small sizes), the two model shapes, the pair of models built on
them with the same weights, and how a figure is saved.

The sections are tools/bench_decode.py (1, 2, 5, 6), tools/bench_hf.py (3, 4, 7) and
tools/bench_profile.py (8, 9); tools/bench.py runs them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from block import GPT
from fast.model import FastGPT
from parts.files import save_figure

# The two model shapes measured. Both are GPT-2 models with random weights built from a local
# config (nothing is downloaded); ours is loaded from the very same state_dict.
ASSIGNMENT_SHAPE = dict(vocab_size=256, n_positions=2048, n_embd=128, n_head=4, n_layer=2)
GPT2_SMALL_SHAPE = dict(vocab_size=512, n_positions=1024, n_embd=768, n_head=12, n_layer=12)
SHAPES = {"assignment": ASSIGNMENT_SHAPE, "gpt2_small": GPT2_SMALL_SHAPE}
NAMES = {"assignment": "assignment widths, 2048 positions, vocab 256",
         "gpt2_small": "GPT-2-small shapes, vocab 512"}
PROMPT_LEN = 16  # the prompt before every decode measurement of sections 1-6
DECODE_BLOCK = 8  # decode steps a side runs in a row before the other side takes over (3, 7, 9)
SHORT = {"assignment": "assignment widths", "gpt2_small": "GPT-2-small shapes"}  # in figures


@dataclass
class Settings:
    """How much to measure. FULL is the benchmark; QUICK keeps every field at small sizes."""

    positions: tuple[int, ...]  # cache lengths at which one decode step is timed (section 1)
    sweep_rounds: int  # naive steps per position (cached steps get cached_inner times as many)
    cached_inner: int
    total_tokens: tuple[int, ...]  # N of section 2
    total_rounds: tuple[int, ...]  # repeats for each N (naive at N = 1024 takes ~1 min)
    decode_steps: tuple[int, int]  # tokens decoded per round vs HF: (assignment, gpt2_small)
    decode_rounds: tuple[int, int]
    prefill_len: int
    prefill_rounds: int
    append_lengths: tuple[int, ...]
    append_repeats: int
    concat_decode_tokens: int  # new tokens of the whole-decode comparison of the two caches
    concat_rounds: int
    memory_seq_len: int
    batch_sizes: tuple[int, ...]  # section 7, GPT-2-small shapes
    batch_prompt_len: int
    batch_new_tokens: int
    batch_rounds: int
    profile_rounds: int  # section 8: repeats of the whole step and of each part
    tricks_len: int  # section 9: prompt length of the prefill, then one decode step after it
    tricks_rounds: int  # prefills per variant (decode steps: DECODE_BLOCK times as many)


FULL = Settings(positions=(16, 32, 64, 128, 256, 512, 768, 1024, 1536, 2047), sweep_rounds=5,
                cached_inner=20, total_tokens=(128, 512, 1024), total_rounds=(5, 3, 2),
                decode_steps=(128, 64), decode_rounds=(5, 3), prefill_len=512, prefill_rounds=7,
                append_lengths=(128, 256, 512, 1024, 2048), append_repeats=300,
                concat_decode_tokens=2048 - PROMPT_LEN, concat_rounds=3, memory_seq_len=2048,
                batch_sizes=(1, 8, 32), batch_prompt_len=64, batch_new_tokens=64,
                batch_rounds=2, profile_rounds=21, tricks_len=512, tricks_rounds=5)
QUICK = Settings(positions=(16, 256, 2047), sweep_rounds=2, cached_inner=5,
                 total_tokens=(64, 128), total_rounds=(1, 1), decode_steps=(16, 8),
                 decode_rounds=(2, 2), prefill_len=128, prefill_rounds=2,
                 append_lengths=(128, 2048), append_repeats=50, concat_decode_tokens=256,
                 concat_rounds=1, memory_seq_len=2048, batch_sizes=(1, 4), batch_prompt_len=16,
                 batch_new_tokens=8, batch_rounds=1, profile_rounds=3, tricks_len=160,
                 tricks_rounds=1)


# --- the models ----------------------------------------------------------------------------------

def build_pair(shape: dict, seed: int) -> tuple[object, GPT]:
    """A Hugging Face GPT2LMHeadModel with random weights and our fast path (FastGPT) with the
    same weights: what the benchmark times, unless a section says otherwise."""
    import torch

    from tools.references import hf_gpt2

    hf = hf_gpt2(shape["vocab_size"], shape["n_positions"], shape["n_embd"], shape["n_layer"],
                 shape["n_head"], seed=seed, jitter=0.0, dtype=torch.float32,
                 initializer_range=0.02)  # GPT-2's own scale, as a real checkpoint has
    hf.generation_config.pad_token_id = 0  # a random-weight model has no tokenizer or pad token
    hf.generation_config.eos_token_id = None  # never stop early: both sides make N tokens
    ours = FastGPT.from_gpt2(hf.state_dict(), dtype=np.float32, hf_config=hf.config)
    return hf, ours


def random_ids(rng: np.random.Generator, vocab: int, length: int) -> np.ndarray:
    """One random prompt of `length` token ids, (1, length)."""
    return rng.integers(0, vocab, (1, length))  # (B=1, length)


def save(fig: object, path: Path) -> str:
    """A pyplot figure written as a PNG at path, whole or not at all (parts/files.py), then
    closed, whether or not the write succeeded; returns the path."""
    import matplotlib.pyplot as plt

    try:
        fig.tight_layout()
        save_figure(fig, path, dpi=100)
    finally:
        plt.close(fig)
    return str(path)

