"""Attention heatmaps: where each head of each layer looks, and the triangle the mask leaves.

    python tools/heatmap.py                      the trained string-reversal model on "attention="
    python tools/heatmap.py --prompt "kv cache"  another prompt (a-z and space, up to 24 characters)
    python tools/heatmap.py --random             the assignment's config with random weights

The PNG goes to out/heatmap_trained.png (or out/heatmap_random.png) in the repository unless --out
names one; `make figures` redraws the committed ones in figures/.

The trained model's sequence is the prompt, "=", and its own greedy answer, so the picture shows
the answer reading the prompt backwards: for reversal some head puts most of its weight, for every
answer position, on the mirrored prompt character (mirror_weights finds it). Row i is query
position i, column j is key position j, both labelled with the characters. Cells above the
diagonal (j > i, the future) are masked: their probability is exactly 0, and they are drawn
hatched grey, not as the lowest colour, so "masked" never looks like "small". With --random the
weights are noise, so the picture shows the mechanics only.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/x.py` from anywhere: find the repo
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse

import matplotlib
import numpy as np
from matplotlib.figure import Figure  # no pyplot: no GUI backend, nothing global to close
from matplotlib.patches import Patch

from attention import causal_mask
from block import GPT, GPTConfig
from generate import generate_cached, prepare_request
from parts import task
from parts.checks import SEED, cli_int, cli_output_file
from parts.files import save_figure
from tools.cli_types import (
    add_path_flag,
    cli_float,
    default_output,
    load_checkpoint,
    model_class,
    path_line,
    refuse_unused,
)
from tools.generate_cli import CHECKPOINT

SHADES = " .:-=+*#%@"  # probability in tenths: ' ' is [0, 0.1), '@' is [0.9, 1]
MASKED = "x"  # a future cell: masked before softmax, probability exactly 0
MASKED_STYLE = {"facecolor": "0.85", "edgecolor": "0.55", "hatch": "///"}
# In checkpoints/reverse.npz: layer 0's previous-token head, and layer 1's strongest mirroring
# head (all four layer-1 heads mirror); measured on 100 prompts by the tests, printed by main.
KNOWN_HEADS = (3, 1)


def attention_maps(model: GPT, ids: np.ndarray) -> np.ndarray:
    """One prompt's attention weights: ids (T,) or (1, T) -> (L, H, T, T), rows sum to one."""
    ids = np.asarray(ids)
    if ids.ndim == 1:
        ids = ids[None]  # (T,) -> (1, T)
    if ids.ndim != 2 or ids.shape[0] != 1:
        raise ValueError(f"attention_maps: ids must be one prompt (T,) or (1, T), got {ids.shape}")
    _, weights = model(ids, return_attention=True)  # L arrays of (1, H, T, T)
    return np.stack([w[0] for w in weights])  # L x (H, T, T) -> (L, H, T, T)


def ascii_heatmap(weights: np.ndarray, labels: list[str] | None = None) -> str:
    """One head's (T, T) weights as text: a shade per visible cell, MASKED for the future.

    The masked cells come from causal_mask, not from "weight == 0": a visible key whose
    probability underflows to 0 is still a visible key, and is drawn ' ', not 'x'.
    Each cell is two characters wide so the square matrix looks square in a terminal. labels
    (T one-character strings) name the positions; by default, the position number mod 10.
    """
    weights = np.asarray(weights)
    if weights.ndim != 2 or weights.shape[0] != weights.shape[1]:
        raise ValueError(f"ascii_heatmap: weights must be (T, T), got {weights.shape}")
    T = weights.shape[0]
    labels = labels or [str(j % 10) for j in range(T)]
    levels = np.clip((weights * len(SHADES)).astype(int), 0, len(SHADES) - 1)  # tenths
    cells = np.where(causal_mask(T), np.array(list(SHADES))[levels], MASKED)  # (T, T) of chars
    header = "        key " + " ".join(labels)  # each label over its two-character cell
    rows = [f"query {i:>2} {labels[i]} |" + "".join(c * 2 for c in row) + "|"
            for i, row in enumerate(cells)]
    legend = (f"shade = probability in tenths: '{SHADES[0]}' [0, .1)  '{SHADES[1]}' [.1, .2)  "
              f"'{SHADES[2]}' [.2, .3)  ...  '{SHADES[-1]}' [.9, 1]   (scale: {SHADES!r})\n"
              f"'{MASKED}' = future key (j > i), masked before softmax: probability exactly 0")
    return "\n".join([header, *rows, legend])


def heatmap_figure(maps: np.ndarray, title: str, labels: list[str] | None = None) -> Figure:
    """A grid of panels, rows = layers, columns = heads, from maps (L, H, T, T); labels (T
    strings) name the positions on both axes, position numbers by default.

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
        ticks = np.arange(T) if labels else np.arange(0, T, 1 if T <= 12 else max(2, T // 8))
        names = [labels[t] for t in ticks] if labels else ticks
        ax.set_xticks(ticks, labels=names, fontsize=6 if labels else 7)
        ax.set_yticks(ticks, labels=names, fontsize=6 if labels else 7)
        if layer == L - 1:
            ax.set_xlabel("key position j", fontsize=8)
        if head == 0:
            ax.set_ylabel("query position i", fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.8, label="attention probability")
    fig.legend(handles=[Patch(**MASKED_STYLE, label="masked future key (j > i), p = 0")],
               loc="outside lower center", fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    return fig


def plot_heatmaps(maps: np.ndarray, path: str | Path, title: str = "Causal attention",
                  labels: list[str] | None = None) -> Path:
    """Write the (L, H, T, T) grid to the PNG at exactly `path`, whole or not at all; return the
    path."""
    return save_figure(heatmap_figure(maps, title, labels), path, dpi=100, format="png")


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


def mirror_weights(maps: np.ndarray, n_chars: int) -> np.ndarray:
    """(L, H): each head's mean weight, over the answer positions, on the key that holds the
    prompt character that position must write next.

    maps (L, H, T, T) of "c_0 .. c_{n-1} = a_0 .. a_{n-1} .": the query at position n + k (the
    "=" for k = 0) predicts a_k = c_{n-1-k}. A two-layer model reads that character one position
    late: a layer-0 head copies each token's predecessor into it (previous_token_weights), so
    c_{n-1-k} is readable at position n - k, and the key a layer-1 head must find for query q is
    2n - q. The answer is the model's own: one that stops early (or a wrong model's) has fewer
    positions, and only those it has are read."""
    T = maps.shape[-1]
    queries = np.arange(n_chars, min(2 * n_chars, T))  # "=" and the answer characters there are
    return maps[:, :, queries, 2 * n_chars - queries].mean(axis=-1)  # (L, H, q) -> (L, H)


def previous_token_weights(maps: np.ndarray) -> np.ndarray:
    """(L, H): each head's mean weight on the key just before the query (positions 1 .. T-1)."""
    T = maps.shape[-1]
    queries = np.arange(1, T)
    return maps[:, :, queries, queries - 1].mean(axis=-1)  # (L, H, T - 1) -> (L, H)


def trained_maps(model: GPT, chars: str) -> tuple[np.ndarray, list[str]]:
    """The trained model's maps over the prompt and its own greedy answer, and the characters."""
    prompt = task.encode(task.make_prompt(chars))
    answer = generate_cached(model, prompt[None], len(chars) + 1, eos_id=ord(task.END)).tokens[0]
    ids = np.concatenate([prompt, answer])  # (T,): "attention=noitnetta."
    return attention_maps(model, ids), list(task.decode(ids).replace(" ", "_"))  # _ = space


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Attention heatmaps: the trained string-reversal "
                                             "model by default, random weights with --random.")
    ap.add_argument("--prompt", default=None, metavar="TEXT",
                    help="characters to reverse (a-z and space, up to 24; default attention)")
    ap.add_argument("--checkpoint", default=None,
                    help=f"the trained model's .npz (default {CHECKPOINT})")
    ap.add_argument("--random", action="store_true",
                    help="the assignment's config with random weights on random token ids")
    ap.add_argument("--prompt-len", type=cli_int(1, 128), default=None,
                    help="--random: prompt tokens T (default 12)")
    ap.add_argument("--layers", type=cli_int(1, 12), default=None,
                    help="--random: transformer blocks (default 2)")
    ap.add_argument("--seed", type=SEED, default=None,
                    help="--random: weights and prompt seed (default 0)")
    ap.add_argument("--init-std", type=cli_float(0, 10), default=None,
                    help="--random: std of the weights; larger = peakier rows (default 0.1)")
    ap.add_argument("--rope", action="store_true", help="--random: rotary positions")
    ap.add_argument("--out", type=cli_output_file(".png"), default=None,
                    help="PNG path (default out/heatmap_trained.png in the repository, or "
                         "out/heatmap_random.png with --random)")
    ap.add_argument("--ascii-layer", type=cli_int(0), default=None,
                    help="layer printed as ASCII (default: the mirroring head's, or 0)")
    ap.add_argument("--ascii-head", type=cli_int(0), default=None,
                    help="head printed as ASCII (default: the mirroring head, or 0)")
    add_path_flag(ap)
    args = ap.parse_args(argv)
    if args.random:  # a flag the run would ignore is refused, not dropped
        refuse_unused(ap, args, ["--prompt", "--checkpoint"], "does not apply to --random")
    else:
        refuse_unused(ap, args, ["--prompt-len", "--layers", "--seed", "--init-std", "--rope"],
                      "applies only to --random")
    for name, value in (("prompt", "attention"), ("checkpoint", str(CHECKPOINT)),
                        ("prompt_len", 12), ("layers", 2), ("seed", 0), ("init_std", 0.1)):
        if getattr(args, name) is None:
            setattr(args, name, value)

    try:  # every argument is checked before any work
        if args.random:
            config = GPTConfig(n_layers=args.layers, init_std=args.init_std, rope=args.rope)
            if args.prompt_len > config.max_seq_len:
                raise ValueError(f"--prompt-len {args.prompt_len} exceeds max_seq_len="
                                 f"{config.max_seq_len}")
        else:
            chars = task.check_chars(args.prompt)
            model = load_checkpoint(ap, args.checkpoint, model_class=model_class(args))
            config = model.config
            # the prompt and its answer must fit this checkpoint's vocabulary and max_seq_len
            prepare_request(model, [task.encode(task.make_prompt(chars))], len(chars) + 1)
        layer, head = args.ascii_layer or 0, args.ascii_head or 0
        if not (layer < config.n_layers and head < config.n_heads):
            raise ValueError(f"--ascii-layer/--ascii-head must be < ({config.n_layers}, "
                             f"{config.n_heads}), got ({layer}, {head})")
    except ValueError as err:
        ap.error(str(err))
    out = args.out or default_output(ap, f"heatmap_{'random' if args.random else 'trained'}.png")

    if args.random:
        model = model_class(args)(config, seed=args.seed)
        ids = np.random.default_rng(args.seed).integers(0, config.vocab_size, args.prompt_len)
        maps, labels = attention_maps(model, ids), None
        print(f"prompt ids: {ids.tolist()}")
        positions = "RoPE" if args.rope else "learned positions"
        title = (f"Causal attention of a random GPT ({positions}, init_std {args.init_std}), "
                 f"{args.prompt_len}-token prompt")
    else:
        maps, labels = trained_maps(model, chars)
        mirror = mirror_weights(maps, len(chars))  # (L, H)
        previous = previous_token_weights(maps)  # (L, H)
        best = np.unravel_index(np.argmax(mirror), mirror.shape)
        if args.ascii_layer is None and args.ascii_head is None:
            layer, head = int(best[0]), int(best[1])
        print(f"sequence: {''.join(labels)!r} (the prompt, then the model's own answer)")
        answer = len(labels) - len(chars) - 1  # tokens after the prompt's "="
        if answer < len(chars) + 1:
            print(f"(an answer of {answer} token{'s' * (answer != 1)}, shorter than the "
                  f"{len(chars) + 1} a reversal takes: the mirror is read on the answer "
                  "positions there are)")
        print("mean weight on the previous token / on the mirrored character's key:")
        for lay in range(config.n_layers):
            print(f"  layer {lay}: " + "  ".join(
                f"head {h} {previous[lay, h]:.2f} / {mirror[lay, h]:.2f}"
                for h in range(config.n_heads)))
        first = np.unravel_index(np.argmax(previous[:1]), previous[:1].shape)
        print(f"previous-token head: layer 0, head {first[1]}; mirroring head: layer {best[0]}, "
              f"head {best[1]}")
        title = f"Causal attention of the trained reversal model on {''.join(labels)!r}"
    path = plot_heatmaps(maps, out, title, labels)
    print(f"\nlayer {layer}, head {head} (row i = query position i):")
    print(ascii_heatmap(maps[layer, head], labels))
    print()
    print("\n".join(head_summary(maps)))
    print(f"\nwrote {path} ({config.n_layers} layers x {config.n_heads} heads; "
          f"{path_line(model)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
