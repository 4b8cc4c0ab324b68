"""Multi-head latent attention (beyond/latent.py): what each kind of KV cache costs, measured.

    python tools/latent.py --memory    bytes per token per layer, formula against ModelCache.nbytes

One table for Llama-2-7B's shapes and this repo's: MHA, GQA, MQA, the int8 cache, the latent
cache (and DeepSeek-V2's latent + RoPE key, formula only), a sliding window and sinks + window.
Every row that this repo builds is allocated for real (never written) and its ModelCache.nbytes
compared with the formula; docs/latent.md shows the table.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/x.py` from anywhere: find the repo
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
from collections.abc import Callable

import numpy as np

from beyond.int8 import Int8KVCache
from beyond.latent import LatentCache
from beyond.window import RollingKVCache, WindowCache
from cache import KVCache, ModelCache
from tools.measure import human

# --- memory: one table, formula against ModelCache.nbytes ----------------------------------------

LLAMA = {"name": "Llama-2-7B shapes", "short": "Llama-2-7B", "layers": 32, "heads": 32,
         "d_head": 128, "dtype": "float16"}
REPO = {"name": "this repo", "short": "repo", "layers": 2, "heads": 4, "d_head": 32,
        "dtype": "float32"}
CONTEXTS = (4096, 32768)


def variants(cfg: dict) -> list[tuple[str, str, Callable[[], int] | None, Callable[[int], int]]]:
    """(cache, formula text, bytes per token per layer by formula, total bytes at T tokens by
    formula) for one config; memory_rows measures every row. A window's rolling buffer holds
    S + W slots from the start, whatever T: its total is flat."""
    H, d, b = cfg["heads"], cfg["d_head"], np.dtype(cfg["dtype"]).itemsize
    L = cfg["layers"]
    d_c = 512 if H * d >= 4096 else 32  # DeepSeek-V2's d_c; the trained MLA model's here
    W, S = (4096, 4) if H * d >= 4096 else (64, 4)
    g = 8 if H * d >= 4096 else 2
    rows = [("MHA", f"2*H*d*{b} = 2*{H}*{d}*{b}", 2 * H * d * b),
            (f"GQA ({g} K/V heads)", f"2*H_kv*d*{b} = 2*{g}*{d}*{b}", 2 * g * d * b),
            ("MQA (1 K/V head)", f"2*1*d*{b} = 2*{d}*{b}", 2 * d * b),
            ("int8 (MHA)", f"2*H*(d+4) = 2*{H}*({d}+4)", 2 * H * (d + 4)),
            (f"MLA d_c={d_c}", f"d_c*{b} = {d_c}*{b}", d_c * b)]
    out = [(name, text, per, lambda T, per=per: L * T * per) for name, text, per in rows]
    if H * d >= 4096:
        out.append((f"MLA d_c={d_c} + RoPE key 64", f"(d_c+64)*{b} = 576*{b}",
                    (d_c + 64) * b, lambda T: L * T * (d_c + 64) * b))
    out.append((f"window W={W} (MHA)", f"2*W*H*d*{b} per layer, flat", None,
                lambda T: L * 2 * W * H * d * b))
    out.append((f"sinks S={S} + window W={W}", f"2*(S+W)*H*d*{b} per layer, flat", None,
                lambda T: L * 2 * (S + W) * H * d * b))
    return out


def measured_bytes(cfg: dict, name: str, positions: int) -> int | None:
    """ModelCache.nbytes of a real cache of every layer at `positions` positions, batch 1, for
    the variant `name` (its buffers allocated, never written). A window's cache holds its slots
    whatever `positions` is."""
    H, d, dtype, L = cfg["heads"], cfg["d_head"], cfg["dtype"], cfg["layers"]

    def layer() -> KVCache | None:
        if name.startswith("MHA"):
            return KVCache(1, H, positions, d, dtype)
        if name.startswith(("GQA", "MQA")):
            g = 1 if name.startswith("MQA") else int(name.split("(")[1].split()[0])
            return KVCache(1, g, positions, d, dtype)
        if name.startswith("int8"):
            return Int8KVCache(1, H, positions, d, "float32")
        if name.startswith("MLA") and "RoPE" not in name:
            return LatentCache(1, positions, int(name.split("=")[1]), dtype)
        return None

    if "window" in name:  # "window W=64 (MHA)" or "sinks S=4 + window W=64"
        W = int(name.split("W=")[1].split()[0])
        S = int(name.split("S=")[1].split()[0]) if name.startswith("sinks") else 0
        return WindowCache([RollingKVCache(1, H, W, d, dtype, np.zeros, S)
                            for _ in range(L)]).nbytes
    first = layer()
    if first is None:
        return None
    return ModelCache([first] + [layer() for _ in range(L - 1)]).nbytes


def memory_rows() -> list[list[str]]:
    """The table's rows. For this repo's config the caches are allocated at 4k and 32k
    positions and their nbytes compared with the formula's total; for Llama-2-7B shapes (16 GiB
    at 32k) every layer is allocated at 64 positions and the per-token bytes compared."""
    body, mha = [], 1
    for cfg in (LLAMA, REPO):
        for name, text, per, total in variants(cfg):
            probe = 64 if cfg is LLAMA else CONTEXTS[0]
            got = measured_bytes(cfg, name, probe)
            measured = None if got is None or per is None else got // (cfg["layers"] * probe)
            equal = "formula only" if got is None else "yes" if got == total(probe) else "NO"
            if got is not None and cfg is REPO:
                big = measured_bytes(cfg, name, CONTEXTS[1])
                equal = "yes" if equal == "yes" and big == total(CONTEXTS[1]) else "NO"
            mha = total(CONTEXTS[1]) if name == "MHA" else mha
            body.append([cfg["short"], name, text, "-" if per is None else f"{per:,}",
                         "-" if measured is None else f"{measured:,}", equal,
                         *(human(total(T)) for T in CONTEXTS),
                         f"{total(CONTEXTS[1]) / mha:.3f}"])
    return body


def memory_table() -> str:
    """The memory table as text (what `python tools/latent.py --memory` prints)."""
    headers = ["config", "cache", "per token per layer", "bytes", "nbytes", "equal",
               "total 4k", "total 32k", "32k / MHA"]
    rows = memory_rows()
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    lines = []
    for r in [headers, *rows]:
        lines.append("  ".join(f"{x:<{w}}" if i < 3 else f"{x:>{w}}"
                               for i, (x, w) in enumerate(zip(r, widths, strict=True))))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """The command: --memory prints the table."""
    ap = argparse.ArgumentParser(description="Multi-head latent attention: cache memory.")
    ap.add_argument("--memory", action="store_true",
                    help="bytes per token per layer and totals at 4k and 32k, formula against "
                         "ModelCache.nbytes")
    args = ap.parse_args(argv)
    if not args.memory:
        ap.error("give --memory")
    print("KV cache per token per layer and in total, batch 1 (H heads, d = d_head, H_kv K/V "
          "heads,\nd_c latent width). bytes: the formula; nbytes: ModelCache.nbytes of real "
          "caches / (layers x positions).")
    print(f"{LLAMA['name']}: {LLAMA['layers']} layers, {LLAMA['heads']} heads, d_head "
          f"{LLAMA['d_head']}, {LLAMA['dtype']} (int8: int8 + float32 scales);\n"
          f"{REPO['name']}: {REPO['layers']} layers, {REPO['heads']} heads, d_head "
          f"{REPO['d_head']}, {REPO['dtype']}.\n")
    print(memory_table())
    print("\nWindow rows: a rolling buffer of W slots (or S sinks + W), allocated whole, so their "
          "bytes are\nflat in T; 'equal' compares the allocated buffers with the formula. MLA + "
          "RoPE key:\nDeepSeek-V2's layout, formula only: refused here (GPTConfig explains why).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
