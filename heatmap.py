"""Attention heatmaps: where each head of each layer looks, and the triangle the mask leaves.

    python heatmap.py [--prompt-len 12] [--layers 2] [--seed 0] [--init-std 0.1] [--rope]
                      [--out figures/heatmap.png] [--ascii-layer 0] [--ascii-head 0]

Runs a random prompt through a random GPT, draws one panel per (layer, head) of the (T, T)
attention weights, and prints one head as ASCII art. Row i is query position i, column j is key
position j. Cells above the diagonal (j > i, the future) are masked: their probability is exactly
0, and they are drawn hatched grey, not as the lowest colour, so "masked" never looks like "small".
The weights are random, so the picture shows the mechanics, not learned behaviour. init_std 0.1
(GPT-2 uses 0.02) makes the scores large enough that rows are not all near-uniform, yet not so
large (0.2 and up) that every row collapses onto a single key.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure  # no pyplot: no GUI backend, nothing global to close
from matplotlib.patches import Patch

from attention import causal_mask
from block import GPT, GPTConfig

SHADES = " .:-=+*#%@"  # probability in tenths: ' ' is [0, 0.1), '@' is [0.9, 1]
MASKED = "x"  # a future cell: masked before softmax, probability exactly 0
MASKED_STYLE = {"facecolor": "0.85", "edgecolor": "0.55", "hatch": "///"}


def attention_maps(model: GPT, ids: np.ndarray) -> np.ndarray:
    """One prompt's attention weights: ids (T,) or (1, T) -> (L, H, T, T), rows sum to one."""
    ids = np.asarray(ids)
    if ids.ndim == 1:
        ids = ids[None]  # (T,) -> (1, T)
    if ids.ndim != 2 or ids.shape[0] != 1:
        raise ValueError(f"attention_maps: ids must be one prompt (T,) or (1, T), got {ids.shape}")
    _, weights = model(ids, return_attention=True)  # L arrays of (1, H, T, T)
    return np.stack([w[0] for w in weights])  # L x (H, T, T) -> (L, H, T, T)


def ascii_heatmap(weights: np.ndarray) -> str:
    """One head's (T, T) weights as text: a shade per visible cell, MASKED for the future.

    The masked cells come from causal_mask, not from "weight == 0": a visible key whose
    probability underflows to 0 is still a visible key, and is drawn ' ', not 'x'.
    Each cell is two characters wide so the square matrix looks square in a terminal.
    """
    weights = np.asarray(weights)
    if weights.ndim != 2 or weights.shape[0] != weights.shape[1]:
        raise ValueError(f"ascii_heatmap: weights must be (T, T), got {weights.shape}")
    T = weights.shape[0]
    levels = np.clip((weights * len(SHADES)).astype(int), 0, len(SHADES) - 1)  # tenths
    cells = np.where(causal_mask(T), np.array(list(SHADES))[levels], MASKED)  # (T, T) of chars
    header = "  key j % 10 " + " ".join(f"{j % 10}" for j in range(T))  # lines up with the rows
    rows = [f"query {i:>5} |" + "".join(c * 2 for c in row) + "|" for i, row in enumerate(cells)]
    legend = (f"shade = probability in tenths: '{SHADES[0]}' [0, .1)  '{SHADES[1]}' [.1, .2)  "
              f"'{SHADES[2]}' [.2, .3)  ...  '{SHADES[-1]}' [.9, 1]   (scale: {SHADES!r})\n"
              f"'{MASKED}' = future key (j > i), masked before softmax: probability exactly 0")
    return "\n".join([header, *rows, legend])


def heatmap_figure(maps: np.ndarray, title: str) -> Figure:
    """A grid of panels, rows = layers, columns = heads, from maps (L, H, T, T).

    Each panel is a masked array: the future cells are masked, the colour map's "bad" colour is
    transparent, and the hatched grey axes background shows through them.
    """
    maps = np.asarray(maps)
    if maps.ndim != 4 or maps.shape[2] != maps.shape[3]:
        raise ValueError(f"heatmap_figure: maps must be (L, H, T, T), got {maps.shape}")
    L, H, T, _ = maps.shape
    future = ~causal_mask(T)  # (T, T), True above the diagonal
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad=(0, 0, 0, 0))
    fig = Figure(figsize=(2.2 * H + 1.6, 2.2 * L + 1.3), layout="constrained")
    axes = fig.subplots(L, H, squeeze=False, sharex=True, sharey=True)
    for (layer, head), ax in np.ndenumerate(axes):  # a handful of panels, not a hot path
        ax.patch.set(**MASKED_STYLE)
        image = ax.imshow(np.ma.masked_array(maps[layer, head], mask=future), cmap=cmap,
                          vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(f"layer {layer}, head {head}", fontsize=9)
        ticks = np.arange(0, T, 1 if T <= 12 else max(2, T // 8))
        ax.set_xticks(ticks, labels=ticks, fontsize=7)
        ax.set_yticks(ticks, labels=ticks, fontsize=7)
        if layer == L - 1:
            ax.set_xlabel("key position j", fontsize=8)
        if head == 0:
            ax.set_ylabel("query position i", fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.8, label="attention probability")
    fig.legend(handles=[Patch(**MASKED_STYLE, label="masked future key (j > i), p = 0")],
               loc="outside lower center", fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    return fig


def plot_heatmaps(maps: np.ndarray, path: str | Path, title: str = "Causal attention") -> Path:
    """Write the (L, H, T, T) grid to a PNG at path; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    heatmap_figure(maps, title).savefig(path, dpi=100)
    return path


def head_summary(maps: np.ndarray) -> list[str]:
    """One line per head: how peaked its rows are and how far back it looks on average."""
    L, H, T, _ = maps.shape
    distance = np.arange(T)[:, None] - np.arange(T)[None, :]  # (T, T): i - j, >= 0 where visible
    peak = maps.max(axis=-1).mean(axis=-1)  # (L, H, T, T) -> (L, H)
    back = (maps * np.maximum(distance, 0)).sum(axis=-1).mean(axis=-1)  # (L, H)
    on_first = maps[..., 0].mean(axis=-1)  # (L, H): mean weight on key position 0
    return [f"layer {layer} head {head}: mean row max {peak[layer, head]:.2f}, "
            f"mean look-back {back[layer, head]:.1f} positions, "
            f"mean weight on position 0 {on_first[layer, head]:.2f}"
            for layer, head in np.ndindex(L, H)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Attention heatmaps of a random tiny GPT.")
    ap.add_argument("--prompt-len", type=int, default=12, help="prompt tokens T (default 12)")
    ap.add_argument("--layers", type=int, default=2, help="transformer blocks (default 2)")
    ap.add_argument("--seed", type=int, default=0, help="weights and prompt seed (default 0)")
    ap.add_argument("--init-std", type=float, default=0.1,
                    help="std of the random weights; larger = peakier rows (default 0.1)")
    ap.add_argument("--rope", action="store_true", help="rotary positions instead of learned")
    ap.add_argument("--out", default="figures/heatmap.png", help="PNG path")
    ap.add_argument("--ascii-layer", type=int, default=0, help="layer printed as ASCII")
    ap.add_argument("--ascii-head", type=int, default=0, help="head printed as ASCII")
    args = ap.parse_args(argv)

    config = GPTConfig(n_layers=args.layers, init_std=args.init_std, rope=args.rope)
    if not 1 <= args.prompt_len <= config.max_seq_len:
        ap.error(f"--prompt-len must be in [1, {config.max_seq_len}], got {args.prompt_len}")
    if not (0 <= args.ascii_layer < config.n_layers and 0 <= args.ascii_head < config.n_heads):
        ap.error(f"--ascii-layer/--ascii-head must be < ({config.n_layers}, {config.n_heads}), "
                 f"got ({args.ascii_layer}, {args.ascii_head})")
    model = GPT(config, seed=args.seed)
    ids = np.random.default_rng(args.seed).integers(0, config.vocab_size, args.prompt_len)
    maps = attention_maps(model, ids)  # (L, H, T, T)
    positions = "RoPE" if args.rope else "learned positions"
    title = (f"Causal attention of a random GPT ({positions}, init_std {args.init_std}), "
             f"{args.prompt_len}-token prompt")
    path = plot_heatmaps(maps, args.out, title)

    print(f"prompt ids: {ids.tolist()}")
    print(f"\nlayer {args.ascii_layer}, head {args.ascii_head} (row i = query position i):")
    print(ascii_heatmap(maps[args.ascii_layer, args.ascii_head]))
    print()
    print("\n".join(head_summary(maps)))
    print(f"\nwrote {path} ({path.stat().st_size} bytes): {config.n_layers} layers x "
          f"{config.n_heads} heads")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
