"""Weights in and out of the NumPy model: .npz checkpoints, and Hugging Face GPT-2 state_dicts.

A checkpoint is one .npz file (NumPy's zip of .npy members): `config.npy`, the GPTConfig as one
JSON string naming every field, and one float array per weight under its name from
block.weight_shapes. It is read header first: the config, then every member's .npy header (dtype,
shape, size), and only once all of them match the weight table is any weight's data inflated. So
a file cannot make the reader allocate more than the model it describes, and cannot run code.
Refused, with a ValueError naming the path and the fault: a file that is not a zip, members that
are not .npy or appear twice, Python objects (pickles), a config that is missing, too large, not a
JSON object, or leaves a field out (see ADDED_LATER), names/shapes/dtypes other than the table's,
a member whose stored size or checksum disagrees with its header, NaN or inf weights.

From Hugging Face, only what this model computes is accepted: GPT-2 with its LM head tied to wte,
every key known (the stored causal-mask buffers aside), and a GPT2Config whose sizes match the
weights and whose settings (activation, score scaling, cross-attention) are the ones implemented.

block.GPT.save, GPT.load and GPT.from_gpt2 call the functions here and then build the model
through its one constructor, which checks every weight with `checked` (NumPy subclasses included:
a masked array is refused, since copying it would drop its mask).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from parts.checks import fits_in_memory, positive_int
from parts.files import replacing

CONFIG_KEY = "config"
# A GPTConfig is ~250 characters of JSON, 4 bytes each in a .npy string: 64 KiB is far beyond any
# real one, and bounds what the reader inflates before it knows the model's size.
CONFIG_MAX_BYTES = 1 << 16

# Fields of GPTConfig added after checkpoints were written, with the value that reproduces what
# those checkpoints computed (never simply the new default): checkpoints/reverse.npz was written
# before the sliding window and the latent cache existed, with full attention and plain K/V. A new
# field goes here with that older behaviour's value; any other missing field is refused, since a
# default could silently change the model.
ADDED_LATER: dict[str, object] = {"sliding_window": None, "attention_sinks": 0}


def checked(weights: Mapping[str, np.ndarray], shapes: dict[str, tuple[int, ...]],
            dtype: np.dtype) -> dict[str, np.ndarray]:
    """Copies of `weights` in `dtype`, after checking them against `shapes`: exactly the same
    names, the same shapes, real floating-point ndarrays (np.matrix honoured, a masked array
    refused), all finite after the cast. Checks its own door."""
    if not isinstance(weights, Mapping):
        raise TypeError(f"weights must be a mapping of name -> array, got "
                        f"{type(weights).__name__}")
    odd = [key for key in weights if not isinstance(key, str)]
    if odd:
        raise TypeError(f"weights must be named by str, got the key {odd[0]!r}")
    missing, unexpected = sorted(set(shapes) - set(weights)), sorted(set(weights) - set(shapes))
    if missing or unexpected:
        raise ValueError(f"weights do not match the config: missing {missing[:4]}"
                         f"{' ...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
                         f"{' ...' if len(unexpected) > 4 else ''}")
    for name, shape in shapes.items():
        w = weights[name]
        float_weights(f"weight {name}", w)
        if w.shape != shape:
            raise ValueError(f"weight {name} must have shape {shape}, got {w.shape}")
    with np.errstate(over="ignore"):  # a value too large for dtype becomes inf, refused below
        out = {name: np.array(weights[name], dtype=dtype, order="C", copy=True)
               for name in shapes}
    bad = [name for name, w in out.items() if not np.isfinite(w).all()]
    if bad:
        raise ValueError(f"weights {bad[:4]} hold NaN or inf (in {np.dtype(dtype).name})")
    return out


def config_from(config: dict, config_class: type) -> object:
    """config_class(**config) once `config` names every field of the dataclass exactly (fields in
    ADDED_LATER may be absent and get the value listed there). ValueError/TypeError otherwise."""
    fields = [field.name for field in dataclasses.fields(config_class)]
    given = {name: value for name, value in ADDED_LATER.items() if name in fields} | config
    missing, unknown = [f for f in fields if f not in given], sorted(set(config) - set(fields))
    if missing or unknown:
        raise ValueError(f"the config must give every field of {config_class.__name__}: "
                         f"missing {missing}, unknown {unknown}")
    return config_class(**given)


def float_weights(what: str, w: object) -> None:
    """Raise TypeError unless w is a floating-point ndarray and not a masked array (a copy would
    silently drop its mask; an np.matrix is taken as the plain array of its values)."""
    if isinstance(w, np.ma.MaskedArray):
        raise TypeError(f"{what} is a masked array: fill it first (w.filled(...)), a copy would "
                        "silently drop its mask")
    if not isinstance(w, np.ndarray) or not np.issubdtype(w.dtype, np.floating):
        raise TypeError(f"{what} must be a floating-point array, got "
                        f"{getattr(w, 'dtype', type(w).__name__)}")


# --- .npz checkpoints ----------------------------------------------------------------------------

def write_npz(path: str | Path, config: dict, named: dict[str, np.ndarray]) -> Path:
    """Write config (a dict of plain values) and the named arrays to exactly `path`, a .npz file
    in an existing directory; return the path.

    Whole or not at all: the config is serialised first (a value JSON cannot hold is refused
    before the file is touched), and the archive is written to a temporary file beside `path`
    that replaces it only once complete (parts/files.py). A save that fails, for any reason,
    leaves an existing checkpoint at `path` as it was."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"checkpoint path must end in .npz, got {str(path)!r}")
    if not path.parent.is_dir():
        raise ValueError(f"checkpoint directory {str(path.parent)!r} does not exist")
    text = config_json(config)
    with replacing(path) as temporary, open(temporary, "wb") as f:  # a file object: np.savez
        np.savez(f, **{CONFIG_KEY: np.array(text)}, **named)  # would append .npz to a bare name
    return path


def config_json(config: dict) -> str:
    """The config as one JSON object of plain values. A NumPy number (a field assigned after the
    config was built: a dataclass does not stop it) is written as the Python number it holds;
    anything else JSON cannot hold exactly (a list, an object, NaN) is refused by field name."""
    plain = {}
    for name, value in config.items():
        if isinstance(value, np.generic):
            value = value.item()
        finite = not isinstance(value, float) or math.isfinite(value)
        if not (value is None or isinstance(value, (bool, int, float, str))) or not finite:
            raise TypeError(f"checkpoint config field {name} must be an int, float, bool, str or "
                            f"None to be saved, got {type(value).__name__} {value!r:.40}")
        plain[name] = value
    return json.dumps(plain)


def read_npz(path: str | Path, shapes_for: Callable[[dict], dict[str, tuple[int, ...]]]
             ) -> tuple[dict, dict[str, np.ndarray]]:
    """(config dict, name -> array) from a .npz checkpoint, reading headers before data.

    shapes_for(config) -> {name: shape} is the weight table the config describes (ValueError or
    TypeError for a bad config). Only members with exactly those names and shapes and a float
    dtype are inflated. Raises FileNotFoundError, or ValueError naming the path and the fault
    (TypeError for a path that is not a str or Path). Checks its own door."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"checkpoint path must be a str or Path, got {type(path).__name__}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    with _reading(path, "the file"), zipfile.ZipFile(path) as z:
        members = _npy_members(path, z)
        config = _read_config(path, z, members.pop(CONFIG_KEY, None))
        try:
            shapes = shapes_for(config)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path} holds an invalid config: {err}") from None
        _same_names(path, members, shapes)
        headers = {name: _weight_header(path, z, members[name], shape)
                   for name, shape in shapes.items()}
        total = sum(info.file_size for info in members.values())
        fits_in_memory(f"{path}: reading its weights", total)
        return config, {name: _data(path, z, members[name], *headers[name]) for name in shapes}


ZIP_ERRORS = (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error, NotImplementedError,
              RuntimeError)  # RuntimeError: an encrypted member; NotImplementedError: a method


@contextmanager
def _reading(path: Path, what: str) -> Iterator[None]:
    """Turn whatever zipfile, zlib or NumPy's header parser raise into one ValueError naming the
    path (our own ValueErrors, which already name it, pass through)."""
    try:
        yield
    except ZIP_ERRORS as err:
        if type(err) is ValueError and str(path) in str(err):
            raise
        raise ValueError(f"{path} is not a .npz checkpoint without pickles ({what}: "
                         f"{type(err).__name__}: {err})") from None


def _npy_members(path: Path, z: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """name (without .npy) -> the member's zip entry; every member must be a .npy, once."""
    names = [info.filename for info in z.infolist()]
    twice = sorted(name for name, n in collections.Counter(names).items() if n > 1)
    if twice:
        raise ValueError(f"{path} holds the member(s) {twice[:4]} more than once")
    other = [name for name in names if not name.endswith(".npy")]
    if other:
        raise ValueError(f"{path} holds member(s) {other[:4]} that are not .npy arrays")
    return {info.filename.removesuffix(".npy"): info for info in z.infolist()}


def _read_config(path: Path, z: zipfile.ZipFile, info: zipfile.ZipInfo | None) -> dict:
    """The config member: one JSON string of at most CONFIG_MAX_BYTES, holding a JSON object."""
    no_config = f"{path} has no '{CONFIG_KEY}' entry (a JSON string) describing the model"
    if info is None:
        raise ValueError(no_config)
    if info.file_size > CONFIG_MAX_BYTES:
        raise ValueError(f"{path}: its config member declares {info.file_size:,} bytes, more "
                         f"than the {CONFIG_MAX_BYTES:,} any config needs")
    dtype, shape, fortran, offset = _header(path, z, info)
    if dtype.kind != "U" or shape != ():
        raise ValueError(no_config)
    _check_size(path, info, offset + dtype.itemsize)
    text = _data(path, z, info, dtype, shape, fortran, offset)
    try:
        config = json.loads(text.item())
    except (ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path}: its config is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: its config must be a JSON object, got {config!r:.60}")
    return config


def _same_names(path: Path, members: dict, shapes: dict) -> None:
    missing, unexpected = sorted(set(shapes) - set(members)), sorted(set(members) - set(shapes))
    if missing or unexpected:
        raise ValueError(f"{path}: its weights do not match its config: missing {missing[:4]}"
                         f"{' ...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
                         f"{' ...' if len(unexpected) > 4 else ''}")


def _header(path: Path, z: zipfile.ZipFile, info: zipfile.ZipInfo
            ) -> tuple[np.dtype, tuple[int, ...], bool, int]:
    """(dtype, shape, fortran_order, header bytes) of one .npy member, its data left unread."""
    with _reading(path, f"member {info.filename}"), z.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f".npy format version {version}, expected (1, 0) or (2, 0)")
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read(f)
        offset = f.tell()
    if dtype.hasobject:
        raise ValueError(f"{path}: member {info.filename} holds Python objects (a pickle); a "
                         "checkpoint is a .npz without pickles")
    return dtype, shape, fortran, offset


def _weight_header(path: Path, z: zipfile.ZipFile, info: zipfile.ZipInfo,
                   shape: tuple[int, ...]) -> tuple[np.dtype, tuple[int, ...], bool, int]:
    """A weight's header, checked against its shape in the table, a real float dtype, and the
    member's stored size."""
    name = info.filename.removesuffix(".npy")
    dtype, got, fortran, offset = _header(path, z, info)
    if got != shape:
        raise ValueError(f"{path}: weight {name} must have shape {shape}, got {got}")
    if dtype.kind != "f":
        raise ValueError(f"{path}: weight {name} must be floating-point, got dtype {dtype}")
    _check_size(path, info, offset + math.prod(shape) * dtype.itemsize)
    return dtype, shape, fortran, offset


def _check_size(path: Path, info: zipfile.ZipInfo, expected: int) -> None:
    if info.file_size != expected:
        raise ValueError(f"{path}: member {info.filename} declares {info.file_size:,} bytes, "
                         f"its .npy header implies {expected:,}")


def _data(path: Path, z: zipfile.ZipFile, info: zipfile.ZipInfo, dtype: np.dtype,
          shape: tuple[int, ...], fortran: bool, offset: int) -> np.ndarray:
    """The member's array (read-only, as stored), once its header and size are checked. zipfile
    stops at the declared size and checks the CRC, so an inflated member cannot run on."""
    with _reading(path, f"member {info.filename}"):
        raw = z.read(info)
    if len(raw) != info.file_size:
        raise ValueError(f"{path}: member {info.filename} holds {len(raw):,} bytes, it declares "
                         f"{info.file_size:,}")
    return np.frombuffer(raw, dtype, offset=offset).reshape(shape, order="F" if fortran else "C")


# --- Hugging Face GPT-2 --------------------------------------------------------------------------
# GPT-2's Conv1D stores weights as (in, out), exactly our x @ W layout; its fused c_attn (D, 3D)
# is split into W_q, W_k, W_v. Our LM head is wte, so lm_head.weight is accepted only equal to it.

GPT2_BLOCK = {  # Hugging Face's name in block i -> ours (c_attn is split separately)
    "ln_1.weight": "ln_1.gamma", "ln_1.bias": "ln_1.beta",
    "attn.c_proj.weight": "attn.w_o", "attn.c_proj.bias": "attn.b_o",
    "ln_2.weight": "ln_2.gamma", "ln_2.bias": "ln_2.beta",
    "mlp.c_fc.weight": "mlp.w_fc", "mlp.c_fc.bias": "mlp.b_fc",
    "mlp.c_proj.weight": "mlp.w_proj", "mlp.c_proj.bias": "mlp.b_proj",
}
GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # both are the tanh GELU of block.gelu
GPT2_BUFFERS = (".attn.bias", ".attn.masked_bias")  # older files' causal mask: not weights
GPT2_SIZES = {"vocab_size": "vocab_size", "max_seq_len": "n_positions", "d_model": "n_embd",
              "n_layers": "n_layer"}  # ours -> GPT2Config's name, each checked against the weights
# Read from a GPT2Config: n_head, layer_norm_epsilon, the sizes above and n_inner; refused unless
# implemented: model_type, activation_function, scale_attn_*, add_cross_attention,
# tie_word_embeddings. reorder_and_upcast_attn changes only where the scores are rounded (float32,
# the same function), and the dropouts act only in training: both are left alone.


def from_gpt2_state_dict(state_dict: Mapping, n_heads: int | None, hf_config: object = None
                         ) -> tuple[dict, dict[str, np.ndarray]]:
    """(GPTConfig keyword arguments, our name -> array) from a GPT-2 state_dict. Sizes come
    from the weights (and must match hf_config's); n_heads from the argument or hf_config.n_head;
    from hf_config also the LayerNorm epsilon, and anything this model does not implement is
    refused, an untied LM head and unknown keys included. Checks its own door."""
    sd = _gpt2_arrays(state_dict)
    head = sd.pop("lm_head.weight", None)
    for key in ("wte.weight", "wpe.weight", "h.0.mlp.c_fc.weight"):
        if key not in sd:
            raise ValueError(f"from_gpt2: state_dict is missing {key!r}")
        if sd[key].ndim != 2:
            raise ValueError(f"from_gpt2: {key} must be a 2-D matrix, got {sd[key].shape}")
    V, D = sd["wte.weight"].shape
    sizes = {"vocab_size": V, "max_seq_len": len(sd["wpe.weight"]), "d_model": D,
             "n_layers": _gpt2_layer_count(sd), "d_ff": sd["h.0.mlp.c_fc.weight"].shape[1]}
    sizes |= _from_hf_config(hf_config, n_heads)
    _check_hf_sizes(hf_config, sizes)
    _check_gpt2_shapes(sd, sizes)
    _check_tied_head(head, sd["wte.weight"])
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
    _refuse_unimplemented(hf_config)
    config_heads = getattr(hf_config, "n_head", None)
    if n_heads is not None and n_heads != config_heads:
        raise ValueError(f"from_gpt2: n_heads={n_heads!r} contradicts hf_config.n_head="
                         f"{config_heads!r}")
    return {"n_heads": positive_int("from_gpt2 hf_config.n_head", config_heads),
            "ln_eps": getattr(hf_config, "layer_norm_epsilon", 1e-5)}


def _refuse_unimplemented(hf_config: object) -> None:
    """Settings of a GPT2Config that change the function computed, other than ours. A setting the
    object does not have gets GPT2Config's default."""
    model_type = getattr(hf_config, "model_type", "gpt2")
    if model_type != "gpt2":
        raise ValueError(f"from_gpt2: hf_config is a {model_type!r} config, not GPT-2's")
    activation = getattr(hf_config, "activation_function", "gelu_new")
    if activation not in GPT2_ACTIVATIONS:
        raise ValueError(f"from_gpt2: activation_function {activation!r} is not implemented "
                         f"(this model computes the tanh GELU: {', '.join(GPT2_ACTIVATIONS)})")
    if not getattr(hf_config, "scale_attn_weights", True) or getattr(
            hf_config, "scale_attn_by_inverse_layer_idx", False):
        raise ValueError("from_gpt2: only scores scaled by 1 / sqrt(d_head) are implemented "
                         "(scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False)")
    if getattr(hf_config, "add_cross_attention", False):
        raise ValueError("from_gpt2: hf_config.add_cross_attention=True: cross-attention to an "
                         "encoder is not implemented (this is a decoder-only model)")
    if not getattr(hf_config, "tie_word_embeddings", True):
        raise ValueError("from_gpt2: hf_config.tie_word_embeddings=False: this GPT-2 has its own "
                         "LM head, and this model's LM head is wte (tied)")


def _check_hf_sizes(hf_config: object, sizes: dict) -> None:
    """The sizes hf_config states (those it has) must be the weights' own."""
    if hf_config is None:
        return
    stated = {ours: getattr(hf_config, theirs) for ours, theirs in GPT2_SIZES.items()
              if hasattr(hf_config, theirs)}
    if hasattr(hf_config, "n_inner"):  # None means GPT-2's 4 * n_embd
        n_inner = hf_config.n_inner
        stated["d_ff"] = 4 * stated.get("d_model", sizes["d_model"]) if n_inner is None else n_inner
    names = GPT2_SIZES | {"d_ff": "n_inner"}
    for ours, value in stated.items():
        if value != sizes[ours]:
            field = names[ours]
            raise ValueError(f"from_gpt2: hf_config.{field}={getattr(hf_config, field)!r} "
                             f"contradicts the weights, whose {ours} is {sizes[ours]}")


def _check_tied_head(head: np.ndarray | None, wte: np.ndarray) -> None:
    """A state_dict's lm_head.weight (GPT2LMHeadModel's) must be wte exactly: ours is tied."""
    if head is not None and (head.shape != wte.shape or not np.array_equal(head, wte)):
        raise ValueError("from_gpt2: lm_head.weight differs from wte.weight: this GPT-2 has its "
                         "own LM head (untied), and this model's LM head is wte")


def _gpt2_arrays(state_dict: Mapping) -> dict[str, np.ndarray]:
    """Strip the 'transformer.' prefix, skip the causal-mask buffers, and turn every value into a
    floating-point NumPy array."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"from_gpt2: state_dict must be a mapping, got {type(state_dict)}")
    out = {}
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise TypeError(f"from_gpt2: state_dict keys must be str, got {key!r}")
        name = key.removeprefix("transformer.")
        if name.endswith(GPT2_BUFFERS):
            continue
        if name in out:
            raise ValueError(f"from_gpt2: state_dict holds {name!r} twice, with and without "
                             "'transformer.'")
        out[name] = _gpt2_array(name, value)
    return out


def _gpt2_array(name: str, value: object) -> np.ndarray:
    """One weight as a floating-point ndarray, from a torch tensor (float types NumPy lacks,
    such as bfloat16, via float32; torch is never imported) or a NumPy array."""
    if hasattr(value, "detach") and hasattr(value, "is_floating_point"):  # a torch tensor
        if not value.is_floating_point():
            raise TypeError(f"from_gpt2: {name} must hold floating-point weights, got "
                            f"{value.dtype}")
        value = value.detach()
        if str(value.dtype) not in ("torch.float16", "torch.float32", "torch.float64"):
            value = value.float()
        try:
            value = value.cpu().numpy()
        except (TypeError, RuntimeError, NotImplementedError) as err:
            raise TypeError(f"from_gpt2: {name} cannot be read as a NumPy array: {err}") from None
    float_weights(f"from_gpt2: {name}", value)
    return np.asarray(value)  # an np.matrix becomes the plain array of the same values


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
    """Exactly the keys GPT-2 has, in Hugging Face's names, with the shapes the sizes imply;
    unknown keys (a LoRA adapter's, a cross-attention's) are refused by name."""
    D, F = sizes["d_model"], sizes["d_ff"]
    expected = {"wte.weight": (sizes["vocab_size"], D), "wpe.weight": (sizes["max_seq_len"], D),
                "ln_f.weight": (D,), "ln_f.bias": (D,)}
    block = {"attn.c_attn.weight": (D, 3 * D), "attn.c_attn.bias": (3 * D,),
             "attn.c_proj.weight": (D, D), "mlp.c_fc.weight": (D, F), "mlp.c_fc.bias": (F,),
             "mlp.c_proj.weight": (F, D)}
    for i in range(sizes["n_layers"]):
        expected |= {f"h.{i}.{key}": block.get(key, (D,)) for key in (*GPT2_BLOCK, *block)}
    missing, unknown = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing:
        raise ValueError(f"from_gpt2: state_dict is missing {len(missing)} keys, e.g. "
                         f"{missing[:4]}")
    if unknown:
        raise ValueError(f"from_gpt2: state_dict holds {len(unknown)} keys this model does not "
                         f"compute, e.g. {unknown[:4]}")
    wrong = [f"{k}: got {sd[k].shape}, expected {s}" for k, s in expected.items()
             if sd[k].shape != s]
    if wrong:
        raise ValueError(f"from_gpt2: mis-shaped weights: {wrong[:4]}")
