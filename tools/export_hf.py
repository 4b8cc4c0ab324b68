"""Export a model of this repository to Hugging Face's GPT-2 format: the step to a real server.

    python tools/export_hf.py [--checkpoint checkpoints/reverse.npz] [--out DIR]
                              (default DIR: out/export_hf/<checkpoint name>, e.g. .../reverse)

DIR gets the two files a server reads: `config.json`, a GPT2Config, and `model.safetensors`, the
weights under GPT2LMHeadModel's names, float32. Hugging Face's from_pretrained(DIR) loads it, and
so do servers that take Hugging Face GPT-2 checkpoints (vLLM, SGLang): docs/export.md.

It is GPT.from_gpt2 run backwards (parts/weights.from_gpt2_state_dict), name for name:

    ours                      Hugging Face (GPT2LMHeadModel)
    wte, wpe                  transformer.wte.weight, transformer.wpe.weight
    h.i.ln_1.gamma, .beta     transformer.h.i.ln_1.weight, .bias     (ln_2, ln_f alike)
    h.i.attn.w_q|w_k|w_v      transformer.h.i.attn.c_attn.weight     (D, 3D): side by side
    h.i.attn.b_q|b_k|b_v      transformer.h.i.attn.c_attn.bias       (3D,)
    h.i.attn.w_o, .b_o        transformer.h.i.attn.c_proj.weight, .bias
    h.i.mlp.w_fc ... b_proj   transformer.h.i.mlp.c_fc / c_proj .weight, .bias
    (the LM head)             none: tie_word_embeddings=true, lm_head is wte

No matrix is transposed: GPT-2's Conv1D stores (in, out) and computes x @ W + b, as we do.

Refused, naming why, before anything is written: what GPT-2's config cannot express. RoPE
(GPT-2 adds a learned position table), grouped K/V heads (GPT-2's c_attn holds as many K and V
heads as query heads), a sliding window or attention sinks (every GPT-2 query sees every earlier
key), an MLA model (a latent in place of K and V), and any weight outside GPT-2's table (an
untied LM head among them: every GPT-2 head here is tied to wte).

The export is written whole or not at all: into a new directory beside DIR, renamed into place
once both files are complete. A DIR that holds anything but an earlier export is refused.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/x.py` from anywhere: find the repo
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import os
import shutil
import tempfile

import numpy as np

from beyond.latent import LatentConfig, LatentGPT
from block import GPT, GPTConfig, weight_shapes
from generate import CHECKPOINT
from parts.checks import cli_output_dir, one_line
from parts.weights import GPT2_BLOCK
from tools.cli_types import OUT_DIR, REPO, load_checkpoint, umask

CONFIG, WEIGHTS = "config.json", "model.safetensors"
EXPORT_FILES = (CONFIG, WEIGHTS)
PREFIX = "transformer."  # GPT2LMHeadModel's body; its lm_head is tied and not stored
# Two float32 computations of the same logits sum in different orders: they agree to a few ulps
# of the largest logit. A wrong name, a transposed matrix or a dropped bias is off by far more.
TOLERANCE = 1e-5


# --- what GPT-2 can express ----------------------------------------------------------------------

def refusal(model: GPT) -> str | None:
    """Why GPT-2's format cannot hold `model`, or None if it can."""
    c = model.config
    if isinstance(model, LatentGPT) or isinstance(c, LatentConfig):
        return ("it is an MLA model (beyond/latent.py): each layer caches one latent per token "
                "and rebuilds K and V from it, and GPT-2 has no such layer")
    if type(c) is not GPTConfig:
        return f"its config is a {type(c).__name__}, not the GPTConfig GPT-2's format mirrors"
    if c.rope:
        return ("it uses RoPE (rope=True): GPT-2 adds a learned position table (wpe) to the "
                "embeddings and never rotates q and k")
    if c.n_kv_heads != c.n_heads:
        return (f"it groups K/V heads (n_kv_heads={c.n_kv_heads}, n_heads={c.n_heads}): GPT-2's "
                "c_attn holds as many K and V heads as query heads")
    if c.sliding_window is not None or c.attention_sinks:
        return (f"it attends through a sliding window (sliding_window={c.sliding_window}, "
                f"attention_sinks={c.attention_sinks}): every GPT-2 query sees every earlier key")
    other = sorted(set(model.named_weights()) ^ set(weight_shapes(c)))
    if other:
        return (f"its weights are not GPT-2's table ({', '.join(other[:4])}): an untied LM head "
                "or a layer GPT-2 does not have")
    return None


def check_exportable(model: GPT) -> None:
    """ValueError naming why, unless GPT-2's format can hold `model`; TypeError for a non-GPT."""
    if not isinstance(model, GPT):
        raise TypeError(f"export: model must be a GPT, got {type(model).__name__}")
    why = refusal(model)
    if why is not None:
        raise ValueError(f"cannot export to GPT-2's format: {why}")


# --- the two files -------------------------------------------------------------------------------

def gpt2_config(model: GPT) -> dict:
    """GPT2Config's keyword arguments for `model` (checked exportable): the sizes GPT.from_gpt2
    reads back, and the settings it checks, spelled out."""
    c = model.config
    return dict(
        vocab_size=c.vocab_size, n_positions=c.max_seq_len, n_embd=c.d_model,
        n_layer=c.n_layers, n_head=c.n_heads,
        n_inner=None if c.d_ff == 4 * c.d_model else c.d_ff,  # None: GPT-2's 4 * n_embd
        layer_norm_epsilon=c.ln_eps, initializer_range=c.init_std,
        activation_function="gelu_new",  # block.gelu: the tanh approximation
        scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,  # scores / sqrt(d_head)
        tie_word_embeddings=True,  # logits = ln_f(x) @ wte.T
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # this model has no dropout
        bos_token_id=None, eos_token_id=None, pad_token_id=None,  # no special tokens: bytes
        architectures=["GPT2LMHeadModel"], dtype="float32",
    )


def gpt2_state_dict(model: GPT) -> dict[str, np.ndarray]:
    """GPT2LMHeadModel's weights, by its names (the lm_head left out: it is wte), float32 and
    C-contiguous: the inverse of parts/weights.from_gpt2_state_dict. `model` checked exportable."""
    ours = model.named_weights()
    theirs = {"wte.weight": ours["wte"], "wpe.weight": ours["wpe"],
              "ln_f.weight": ours["ln_f.gamma"], "ln_f.bias": ours["ln_f.beta"]}
    for i in range(model.config.n_layers):
        theirs |= {f"h.{i}.{hf}": ours[f"h.{i}.{name}"] for hf, name in GPT2_BLOCK.items()}
        w = [ours[f"h.{i}.attn.{name}"] for name in ("w_q", "w_k", "w_v")]
        b = [ours[f"h.{i}.attn.{name}"] for name in ("b_q", "b_k", "b_v")]
        theirs[f"h.{i}.attn.c_attn.weight"] = np.concatenate(w, axis=1)  # 3 (D, D) -> (D, 3D)
        theirs[f"h.{i}.attn.c_attn.bias"] = np.concatenate(b)  # 3 (D,) -> (3D,)
    return {PREFIX + name: np.ascontiguousarray(w, dtype=np.float32)
            for name, w in theirs.items()}


def export(model: GPT, out: str | Path) -> float:
    """Write `model` to directory `out` in Hugging Face's GPT-2 format (config.json and
    model.safetensors), whole or not at all, and return how far Hugging Face's logits from the
    written files are from ours (logit_error). `out` may be new, empty, or an earlier export
    (replaced); anything else is refused before any work, as is a model GPT-2 cannot express
    (ValueError naming why). An export whose logits differ by more than TOLERANCE is never put
    in place (ValueError)."""
    from safetensors.numpy import save_file
    from transformers import GPT2Config

    check_exportable(model)
    out = Path(out)
    check_destination(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        GPT2Config(**gpt2_config(model)).to_json_file(staging / CONFIG)
        save_file(gpt2_state_dict(model), staging / WEIGHTS,
                  metadata={"format": "pt"})  # the metadata Hugging Face writes and expects
        error = logit_error(model, staging)
        if not error <= TOLERANCE:
            raise ValueError(f"the export's logits differ from the model's by {error:.1e} of the "
                             f"largest logit (tolerance {TOLERANCE:.0e}): not written")
        readable_as_usual(staging)
        replace_directory(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already unless something failed
    return error


def padded_batch(config: GPTConfig, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """ids (3, L) and attention_mask (3, L), L = max_seq_len: random tokens, left-padded rows of
    L, L // 2 + 1 and 1 real tokens (every position, padding, a one-token row)."""
    L = config.max_seq_len
    lengths = (L, L // 2 + 1, 1)
    ids = np.random.default_rng(seed).integers(0, config.vocab_size, (len(lengths), L))
    mask = (np.arange(L) >= L - np.array(lengths)[:, None]).astype(np.int64)  # (3, L), 0 = pad
    return ids * mask, mask


def logit_error(model: GPT, directory: Path) -> float:
    """max |HF - ours| / max |ours| over the real tokens of padded_batch, HF being
    GPT2LMHeadModel.from_pretrained(directory) in float32. Hugging Face's plain forward numbers
    positions 0, 1, ... whatever the padding, so each row's positions are passed: the count of
    real tokens before each one, as our model numbers them."""
    import torch
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf = GPT2LMHeadModel.from_pretrained(directory).eval()
    ids, mask = padded_batch(model.config)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)  # (3, L)
    with torch.no_grad():
        theirs = hf(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(positions)).logits.numpy()  # (3, L, V)
    ours = model(ids, attention_mask=mask)  # (3, L, V)
    real = mask.astype(bool)
    return float(np.abs(theirs[real] - ours[real]).max() / np.abs(ours[real]).max())


def readable_as_usual(directory: Path) -> None:
    """Give the directory and its files the modes a plain mkdir and open would (mkdtemp makes
    the directory private, 0700): a server run by another user must be able to read them."""
    mask = umask()
    directory.chmod(0o777 & ~mask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~mask)


def check_destination(out: Path) -> None:
    """ValueError unless `out` is new, an empty directory, or an earlier export (only its files):
    an export replaces a directory whole, so it must never hold anything else."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{str(out)!r} exists and is not a directory")
    if out.is_dir():
        other = sorted(p.name for p in out.iterdir() if p.name not in EXPORT_FILES)
        if other:
            raise ValueError(f"{str(out)!r} holds files that are not an export "
                             f"({', '.join(other[:3])}): give a new or empty directory")


def replace_directory(new: Path, out: Path) -> None:
    """Move the finished directory `new` to `out`. An earlier export is first moved aside, then
    removed, so `out` holds one whole export at every moment, or none for an instant."""
    if out.is_dir() and any(out.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(new, out)
        shutil.rmtree(old)
    else:
        os.replace(new, out)  # onto nothing, or onto an empty directory


# --- the command ---------------------------------------------------------------------------------

def load_any(ap: argparse.ArgumentParser, path: Path) -> GPT:
    """The checkpoint as a GPT or, when it holds an MLA config, a LatentGPT (so that the refusal
    can say what it is); a usage error for anything else."""
    try:
        return GPT.load(path)
    except (ValueError, TypeError, OSError):
        try:
            return LatentGPT.load(path)
        except (ValueError, TypeError, OSError):
            return load_checkpoint(ap, path)  # GPT's own refusal, as a usage error


def shown(path: Path) -> str:
    """A path as printed: relative to the repository when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Export a checkpoint to Hugging Face's GPT-2 format (config.json, "
                    "model.safetensors), for from_pretrained and servers such as vLLM.")
    ap.add_argument("--checkpoint", type=Path, default=CHECKPOINT,
                    help=f"a .npz written by GPT.save (default {shown(CHECKPOINT)})")
    ap.add_argument("--out", type=cli_output_dir, default=None,
                    help="the directory to write: new, empty, or an earlier export "
                         "(default out/export_hf/<checkpoint name> in the repository)")
    args = ap.parse_args(argv)
    out = args.out or OUT_DIR / "export_hf" / args.checkpoint.stem
    try:
        check_destination(out)
    except ValueError as err:
        ap.error(f"argument --out: {one_line(err)}")
    model = load_any(ap, args.checkpoint)
    why = refusal(model)
    if why is not None:
        ap.error(f"argument --checkpoint: cannot export {shown(args.checkpoint)} to GPT-2's "
                 f"format: {why}")
    try:
        error = export(model, out)
    except OSError as err:
        ap.error(f"argument --out: cannot write {str(out)!r}: {one_line(err)}")
    except ValueError as err:  # logits that disagree: a bug here, not a usage error
        print(f"export_hf.py: {one_line(err)}", file=sys.stderr)
        return 1
    c = model.config
    print(f"exported {shown(args.checkpoint)}: {c.n_layers} layers, d_model {c.d_model}, "
          f"{c.n_heads} heads, vocab {c.vocab_size}, {c.max_seq_len} positions, float32")
    for name in EXPORT_FILES:
        print(f"  {shown(out / name)}  {(out / name).stat().st_size:,} bytes")
    print(f"GPT2LMHeadModel.from_pretrained(DIR) vs this model, float32, padded batch of 3: "
          f"max |difference| = {error:.1e} x max|logit| (tolerance {TOLERANCE:.0e}: pass)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
