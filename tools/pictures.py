"""The pictures a learner draws on the whiteboard, drawn by running the real code.

    python tools/pictures.py            every picture
    python tools/pictures.py mask       one of: mask, heads, cache, padding, gqa, timeline

Each picture is computed, not typed: the masks come from causal_mask and mask_from_positions, the
heads from split_heads on a labelled array, the cache from a real KVCache, the GQA wiring from
grouped_attention, the timeline from a real prefill and decode. The README shows this output and
a test fails if the two drift apart.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/x.py` from anywhere: find the repo
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse

import numpy as np

from attention import causal_mask, grouped_attention, mask_from_positions, split_heads
from block import GPT, GPTConfig
from cache import KVCache, first_step
from generate import greedy, left_pad


def grid(rows: list[str], mask: np.ndarray, first_query: int) -> list[str]:
    """A (t_q, t_k) bool mask as text: 1 where the query may attend, . where it may not."""
    header = "key j:    " + " ".join(str(j % 10) for j in range(mask.shape[1]))
    return [header] + [f"{rows[i] if rows else f'pos {first_query + i}':<10}"
                       + " ".join("1" if m else "." for m in row) for i, row in enumerate(mask)]


def side_by_side(left: list[str], right: list[str], gap: int = 6) -> str:
    width = max(map(len, left)) + gap
    return "\n".join(f"{a:<{width}}{b}".rstrip() for a, b in zip(left, right, strict=True))


def mask_picture(t_q: int = 3, t_k: int = 7) -> str:
    """Bottom-right (what a chunk after a cache needs) beside top-left (is_causal=True)."""
    right = causal_mask(t_q, t_k)  # queries are the last t_q positions
    wrong = np.tril(np.ones((t_q, t_k), dtype=bool))  # torch's is_causal=True, top-left
    first = t_k - t_q
    return (f"{t_q} new queries after {t_k - t_q} cached keys: scores are ({t_q}, {t_k})\n\n"
            + side_by_side(["causal_mask(3, 7): bottom-right", *grid([], right, first)],
                           ["is_causal=True: top-left (wrong)", *grid([], wrong, first)])
            + f"\n\nrows are the new queries' positions: t_k - t_q + i = {first} + i for query i,"
              f"\nwhich sees keys j <= {first} + i; top-left, pos {first} would see 1 of its"
              f" {first + 1} keys.")


def heads_picture(T: int = 3, H: int = 2, d_head: int = 2) -> str:
    """A labelled (1, T, D) array: entry "t.d" is token t, dimension d. split_heads (reshape,
    then transpose) gives every head all tokens; reshaping straight to (B, H, T, d_head) mixes
    tokens into the wrong head."""
    D = H * d_head
    x = (10 * np.arange(T)[:, None] + np.arange(D)[None, :])[None]  # (1, T, D): 10 t + d
    right = split_heads(x, H)  # (1, T, D) -> (1, H, T, d_head)
    wrong = x.reshape(1, H, T, d_head)  # the same shape, without the transpose

    def label(v: int) -> str:
        return f"{v // 10}.{v % 10}"

    def block(a: np.ndarray) -> list[str]:
        lines = []
        for h in range(H):
            cells = "  ".join(" ".join(label(v) for v in row) for row in a[0, h])
            lines.append(f"head {h}: {cells}")
        return lines

    tokens = "   ".join(" ".join(label(v) for v in x[0, t]) for t in range(T))
    return (f"x (1, T={T}, D={D}), entry t.d = token t, dim d:   {tokens}\n\n"
            + "split_heads: reshape (1, T, H, d_head), then transpose to (1, H, T, d_head)\n"
            + "\n".join(block(right))
            + "\n\nreshape straight to (1, H, T, d_head): right shape, wrong numbers\n"
            + "\n".join(block(wrong))
            + f"\n\nright: head h holds dims {d_head}h..{d_head}h+{d_head - 1} of EVERY token;"
              "\nwrong: head 0 holds all of token 0 and half of token 1.")


def cache_picture(max_len: int = 8, prompt: int = 4, steps: int = 2) -> str:
    """A real KVCache (one head, d_head 1) whose key at position p is p: its buffer and length
    after a prefill of `prompt` tokens and each decode step."""
    cache = KVCache(1, 1, max_len, 1, np.float64)

    def row(label: str) -> str:
        held = cache.keys[0, 0, :, 0]
        cells = " ".join(f"k{int(held[p])}" if p < len(cache) else " ." for p in range(max_len))
        return f"{label:<20}{cells}   length {len(cache)}"

    lines = [f"{'':<20}" + " ".join(f"{p:>2}" for p in range(max_len)) + "   (positions)",
             row("new, preallocated")]
    position = np.arange(max_len, dtype=np.float64).reshape(1, 1, max_len, 1)  # key = position
    cache.append(position[:, :, :prompt], position[:, :, :prompt])
    lines.append(row(f"prefill {prompt} tokens"))
    for n in range(steps):
        start = len(cache)
        cache.append(position[:, :, start:start + 1], position[:, :, start:start + 1])
        lines.append(row(f"decode step {n + 1}"))
    return ("\n".join(lines)
            + "\n\nappend writes at [length : length + t] on the sequence axis and returns views"
              "\n[:length + t]; nothing is copied, the buffer never grows.")


def padding_picture(lengths: tuple[int, ...] = (3, 5)) -> str:
    """A left-padded batch: each row's positions (real tokens counted) and its mask (causal AND
    real keys), as the model makes them: the step's positions, then the one mask rule."""
    ids, attention_mask = left_pad([np.arange(1, n + 1) for n in lengths])
    real = attention_mask.astype(bool)
    step = first_step(real)  # a call with no cache numbers its tokens from 0
    positions = step.positions  # (B, T)
    mask = mask_from_positions(step.positions, step.key_positions)  # (B, 1, T, T)
    parts = []
    for b, n in enumerate(lengths):
        labels = [f"{'pad' if not r else f'pos {p}':<10}" for p, r in zip(positions[b], real[b],
                                                                         strict=True)]
        parts.append(f"row {b}: a prompt of {n}, attention_mask {attention_mask[b].tolist()}\n"
                     + "\n".join(grid(labels, mask[b, 0], 0)))
    return ("\n\n".join(parts)
            + "\n\nA row's first real token is position 0; no query sees a pad key. A pad query"
              "\nsees nothing at all: its weights are zeros (not NaN), and never read.")


def gqa_picture(H: int = 4, H_kv: int = 2) -> str:
    """Which K/V head each query head reads, found by running grouped_attention on values that
    are the K/V head's own number."""
    q = np.zeros((1, H, 1, 1))
    k = np.zeros((1, H_kv, 1, 1))
    v = np.arange(H_kv, dtype=np.float64).reshape(1, H_kv, 1, 1)  # value = its head's number
    out, _ = grouped_attention(q, k, v, None)  # (1, H, 1, 1): the K/V head each query head read
    read = out[0, :, 0, 0].astype(int)
    lines = [f"query head {h}  ->  K/V head {read[h]}" for h in range(H)]
    return (f"H = {H} query heads share H_kv = {H_kv} K/V heads, groups of G = {H // H_kv}:\n"
            + "\n".join(lines)
            + f"\n\nquery head h reads K/V head h // G; the cache holds {H_kv} heads, not {H}:"
              f" {H // H_kv}x smaller.")


def timeline_picture(prompt: int = 4, steps: int = 2) -> str:
    """A real prefill and decode steps on a tiny model: what each step computes, what it reads
    from the cache, the shape of its scores, and the cache length after it."""
    model = GPT(GPTConfig(vocab_size=16, max_seq_len=16, d_model=8, n_heads=2, n_layers=1),
                seed=0)
    cache = model.new_cache(1)
    ids = np.arange(prompt)[None] % 16
    rows = [f"{'step':<12}{'computes Q, K, V for':<24}{'reads from cache':<20}{'scores':<10}"
            "cache length after"]

    def step(name: str, new_ids: np.ndarray) -> np.ndarray:
        """Run the new tokens through the cache; add a row read off the real attention."""
        before = len(cache)
        logits, attention = model(new_ids, cache, return_attention=True)
        new = (f"positions {before}..{len(cache) - 1}" if new_ids.shape[1] > 1
               else f"position {before}")
        read = f"positions 0..{before - 1}" if before else "nothing"
        scores = str(attention[0].shape[-2:])  # (t_q, t_k) of layer 0's weights
        rows.append(f"{name:<12}{new:<24}{read:<20}{scores:<10}{len(cache)}")
        return logits[:, -1]

    logits = step("prefill", ids)
    for n in range(steps):
        logits = step(f"decode {n + 1}", greedy(logits)[:, None])
    return ("\n".join(rows)
            + "\n\nprefill: many queries, a triangular mask, matrix-matrix work (compute-bound)."
              "\ndecode: one query, a row of ones, every weight read for one token (memory-bound).")


PICTURES = {"mask": mask_picture, "heads": heads_picture, "cache": cache_picture,
            "padding": padding_picture, "gqa": gqa_picture, "timeline": timeline_picture}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="The whiteboard pictures, drawn by the real code.")
    ap.add_argument("names", nargs="*", choices=[[], *PICTURES], metavar="NAME",
                    help=f"which pictures (default all): {', '.join(PICTURES)}")
    args = ap.parse_args(argv)
    for name in args.names or PICTURES:
        print(f"== {name} ==\n{PICTURES[name]()}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
