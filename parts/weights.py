"""Weights in and out of the NumPy model: .npz checkpoints, and Hugging Face GPT-2 state_dicts.

A checkpoint is one .npz file (NumPy's zip of .npy arrays, read with allow_pickle=False, so
loading one cannot run code): every weight under its name from block.weight_shapes, and `config`,
the GPTConfig as a JSON string. block.GPT.save, GPT.load and GPT.from_gpt2 call the functions here
and then build the model through its one constructor, which checks every weight with `checked`.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from parts.checks import positive_int

CONFIG_KEY = "config"


def checked(weights: Mapping[str, np.ndarray], shapes: dict[str, tuple[int, ...]],
            dtype: np.dtype) -> dict[str, np.ndarray]:
    """Copies of `weights` in `dtype`, after checking them against `shapes`: exactly the same
    names, the same shapes, real floating-point values, all finite after the cast."""
    if not isinstance(weights, Mapping):
        raise TypeError(f"weights must be a mapping of name -> array, got "
                        f"{type(weights).__name__}")
    missing, unexpected = sorted(set(shapes) - set(weights)), sorted(set(weights) - set(shapes))
    if missing or unexpected:
        raise ValueError(f"weights do not match the config: missing {missing[:4]}"
                         f"{' ...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
                         f"{' ...' if len(unexpected) > 4 else ''}")
    for name, shape in shapes.items():
        w = weights[name]
        if not isinstance(w, np.ndarray) or not np.issubdtype(w.dtype, np.floating):
            raise TypeError(f"weight {name} must be a floating-point array, got "
                            f"{getattr(w, 'dtype', type(w).__name__)}")
        if w.shape != shape:
            raise ValueError(f"weight {name} must have shape {shape}, got {w.shape}")
    with np.errstate(over="ignore"):  # a value too large for dtype becomes inf, refused below
        out = {name: np.array(weights[name], dtype=dtype, order="C", copy=True)
               for name in shapes}
    bad = [name for name, w in out.items() if not np.isfinite(w).all()]
    if bad:
        raise ValueError(f"weights {bad[:4]} hold NaN or inf (in {np.dtype(dtype).name})")
    return out


# --- .npz checkpoints ----------------------------------------------------------------------------

def write_npz(path: str | Path, config: dict, named: dict[str, np.ndarray]) -> Path:
    """Write config (a JSON-able dict) and the named arrays to exactly `path`, a .npz file in an
    existing directory; return the path."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"checkpoint path must end in .npz, got {str(path)!r}")
    if not path.parent.is_dir():
        raise ValueError(f"checkpoint directory {str(path.parent)!r} does not exist")
    with open(path, "wb") as f:  # a file object: np.savez would append .npz to a bare name
        np.savez(f, **{CONFIG_KEY: np.array(json.dumps(config))}, **named)
    return path


def read_npz(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(config dict, name -> array) from a .npz checkpoint. Refuses, with the path in the
    message, a missing file, a file that is not a plain .npz (pickled objects included), and a
    missing or unreadable config."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {name: f[name] for name in f.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as err:
        raise ValueError(f"{path} is not a .npz checkpoint without pickles: {err}") from None
    raw = arrays.pop(CONFIG_KEY, None)
    if raw is None or raw.ndim != 0 or raw.dtype.kind != "U":
        raise ValueError(f"{path} has no '{CONFIG_KEY}' entry (a JSON string) describing the "
                         "model")
    try:
        config = json.loads(str(raw))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: its config is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: its config must be a JSON object, got {config!r:.60}")
    return config, arrays


# --- Hugging Face GPT-2 --------------------------------------------------------------------------
# GPT-2's Conv1D stores weights as (in, out), exactly our x @ W layout; its fused c_attn (D, 3D)
# is split into W_q, W_k, W_v. The LM head is tied to wte, so lm_head.weight is not read.

GPT2_BLOCK = {  # Hugging Face's name in block i -> ours (c_attn is split separately)
    "ln_1.weight": "ln_1.gamma", "ln_1.bias": "ln_1.beta",
    "attn.c_proj.weight": "attn.w_o", "attn.c_proj.bias": "attn.b_o",
    "ln_2.weight": "ln_2.gamma", "ln_2.bias": "ln_2.beta",
    "mlp.c_fc.weight": "mlp.w_fc", "mlp.c_fc.bias": "mlp.b_fc",
    "mlp.c_proj.weight": "mlp.w_proj", "mlp.c_proj.bias": "mlp.b_proj",
}
GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # both are the tanh GELU of block.gelu


def from_gpt2_state_dict(state_dict: Mapping, n_heads: int | None, hf_config: object = None
                         ) -> tuple[dict, dict[str, np.ndarray]]:
    """(GPTConfig keyword arguments, our name -> array) from a GPT-2 state_dict. Sizes come
    from the weights; n_heads from the argument or hf_config.n_head; from hf_config also the
    LayerNorm epsilon, and anything this model does not implement is refused."""
    sd = _gpt2_arrays(state_dict)
    for key in ("wte.weight", "wpe.weight", "h.0.mlp.c_fc.weight"):
        if key not in sd:
            raise ValueError(f"from_gpt2: state_dict is missing {key!r}")
        if sd[key].ndim != 2:
            raise ValueError(f"from_gpt2: {key} must be a 2-D matrix, got {sd[key].shape}")
    V, D = sd["wte.weight"].shape
    sizes = {"vocab_size": V, "max_seq_len": len(sd["wpe.weight"]), "d_model": D,
             "n_layers": _gpt2_layer_count(sd), "d_ff": sd["h.0.mlp.c_fc.weight"].shape[1]}
    sizes |= _from_hf_config(hf_config, n_heads)
    _check_gpt2_shapes(sd, sizes)
    named = {"wte": sd["wte.weight"], "wpe": sd["wpe.weight"], "ln_f.gamma": sd["ln_f.weight"],
             "ln_f.beta": sd["ln_f.bias"]}
    for i in range(sizes["n_layers"]):
        named |= {f"h.{i}.{ours}": sd[f"h.{i}.{theirs}"] for theirs, ours in GPT2_BLOCK.items()}
        w_q, w_k, w_v = np.split(sd[f"h.{i}.attn.c_attn.weight"], 3, axis=1)  # (D, 3D) -> 3 (D, D)
        b_q, b_k, b_v = np.split(sd[f"h.{i}.attn.c_attn.bias"], 3)  # (3D,) -> 3 x (D,)
        named |= {f"h.{i}.attn.w_q": w_q, f"h.{i}.attn.w_k": w_k, f"h.{i}.attn.w_v": w_v,
                  f"h.{i}.attn.b_q": b_q, f"h.{i}.attn.b_k": b_k, f"h.{i}.attn.b_v": b_v}
    return sizes, named


def _from_hf_config(hf_config: object, n_heads: int | None) -> dict:
    """n_heads and ln_eps, from the argument and/or a GPT2Config; refuse what we do not compute."""
    if hf_config is None:
        if n_heads is None:
            raise ValueError("from_gpt2: give n_heads, or hf_config (the model's GPT2Config)")
        return {"n_heads": positive_int("from_gpt2 n_heads", n_heads)}
    activation = getattr(hf_config, "activation_function", "gelu_new")
    if activation not in GPT2_ACTIVATIONS:
        raise ValueError(f"from_gpt2: activation_function {activation!r} is not implemented "
                         f"(this model computes the tanh GELU: {', '.join(GPT2_ACTIVATIONS)})")
    if not getattr(hf_config, "scale_attn_weights", True) or getattr(
            hf_config, "scale_attn_by_inverse_layer_idx", False):
        raise ValueError("from_gpt2: only scores scaled by 1 / sqrt(d_head) are implemented "
                         "(scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False)")
    config_heads = getattr(hf_config, "n_head", None)
    if n_heads is not None and n_heads != config_heads:
        raise ValueError(f"from_gpt2: n_heads={n_heads!r} contradicts hf_config.n_head="
                         f"{config_heads!r}")
    return {"n_heads": positive_int("from_gpt2 hf_config.n_head", config_heads),
            "ln_eps": getattr(hf_config, "layer_norm_epsilon", 1e-5)}


def _gpt2_arrays(state_dict: Mapping) -> dict[str, np.ndarray]:
    """Strip the 'transformer.' prefix, drop what we do not use, and turn every value into a
    floating-point NumPy array (bfloat16 tensors, which NumPy has no type for, via float32)."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"from_gpt2: state_dict must be a mapping, got {type(state_dict)}")
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("transformer.")
        if key.startswith("lm_head") or key.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # the LM head is tied to wte; attn.bias is GPT-2's stored causal mask
        if hasattr(value, "detach"):  # a torch tensor, converted without importing torch
            value = value.detach().cpu()
            value = (value.float() if str(value.dtype) == "torch.bfloat16" else value).numpy()
        value = np.asarray(value)
        if not np.issubdtype(value.dtype, np.floating):
            raise TypeError(f"from_gpt2: {key} must hold floating-point weights, got "
                            f"{value.dtype}")
        out[key] = value
    return out


def _gpt2_layer_count(sd: dict[str, np.ndarray]) -> int:
    """Highest block index of ANY 'h.N.' key + 1, so that a block with a key missing is reported
    as missing rather than silently dropped."""
    indices = set()
    for key in sd:
        if key.startswith("h."):
            index = key.split(".")[1]
            if not index.isdigit():
                raise ValueError(f"from_gpt2: unexpected key {key!r} (expected 'h.<int>.')")
            indices.add(int(index))
    return 1 + max(indices)


def _check_gpt2_shapes(sd: dict[str, np.ndarray], sizes: dict) -> None:
    """Every key GPT-2 must have, in Hugging Face's names, with the shape the sizes imply."""
    D, F = sizes["d_model"], sizes["d_ff"]
    expected = {"wte.weight": (sizes["vocab_size"], D), "wpe.weight": (sizes["max_seq_len"], D),
                "ln_f.weight": (D,), "ln_f.bias": (D,)}
    block = {"attn.c_attn.weight": (D, 3 * D), "attn.c_attn.bias": (3 * D,),
             "attn.c_proj.weight": (D, D), "mlp.c_fc.weight": (D, F), "mlp.c_fc.bias": (F,),
             "mlp.c_proj.weight": (F, D)}
    for i in range(sizes["n_layers"]):
        expected |= {f"h.{i}.{key}": block.get(key, (D,)) for key in (*GPT2_BLOCK, *block)}
    missing = sorted(set(expected) - set(sd))
    if missing:
        raise ValueError(f"from_gpt2: state_dict is missing {len(missing)} keys, e.g. "
                         f"{missing[:4]}")
    wrong = [f"{k}: got {sd[k].shape}, expected {s}" for k, s in expected.items()
             if sd[k].shape != s]
    if wrong:
        raise ValueError(f"from_gpt2: mis-shaped weights: {wrong[:4]}")
