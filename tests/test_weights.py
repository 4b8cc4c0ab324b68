"""What weight loading refuses: hostile .npz files, incomplete configs, NumPy subclasses, and
GPT-2 state_dicts or GPT2Configs describing a model other than the one we compute.

Every hostile file is written here, byte by byte where it must be (a header with no data, a
central directory that lies), and every refusal must be a ValueError/TypeError/FileNotFoundError
naming the path or key: never a MemoryError, AttributeError, KeyError or zipfile's own errors.
"""

from __future__ import annotations

import io
import json
import re
import struct
import warnings
import zipfile
from dataclasses import asdict, fields
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import SMALL, VARIANTS, assert_close_float32, random_ids, small_model

import parts.checks
from block import GPT, GPTConfig, weight_shapes
from parts import weights
from tools.measure import peak_bytes
from tools.references import hf_gpt2, hf_logits

ROOT = Path(__file__).resolve().parent.parent


# --- building .npz files by hand -----------------------------------------------------------------

def npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def header_only(shape: tuple[int, ...], dtype: str = "<f8") -> bytes:
    """A .npy header declaring `shape`, and no data after it."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def matrix(values: np.ndarray) -> np.matrix:
    """np.matrix, which NumPy discourages (with a warning) but still ships and people pass."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        return np.matrix(values)


def write_zip(path: Path, members: dict[str, bytes], method: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression=method) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


@pytest.fixture(scope="module")
def members(tmp_path_factory) -> dict[str, bytes]:
    """A good checkpoint of the small model: member name (config.npy, wte.npy...) -> bytes."""
    path = small_model().save(tmp_path_factory.mktemp("good") / "good.npz")
    with zipfile.ZipFile(path) as z:
        return {name: z.read(name) for name in z.namelist()}


def with_config(members: dict[str, bytes], config: dict) -> dict[str, bytes]:
    return members | {"config.npy": npy(np.array(json.dumps(config)))}


def full_config() -> dict:
    return asdict(small_model().config)


def refused(path: Path, error: type, match: str) -> str:
    """GPT.load(path) must raise exactly `error` (not a subclass such as a zipfile error), with
    the path and `match` in its message; returns the message."""
    with pytest.raises(Exception) as info:  # noqa: PT011 (the exact type is checked below)
        GPT.load(path)
    assert type(info.value) is error, f"{type(info.value).__name__}: {info.value}"
    message = str(info.value)
    assert str(path) in message
    assert re.search(match, message), message
    return message


# --- hostile files -------------------------------------------------------------------------------

def test_a_good_checkpoint_loads_and_the_shipped_one_names_every_field(tmp_path, members):
    path = write_zip(tmp_path / "copy.npz", members)
    ids = random_ids(0, 2, 5)
    np.testing.assert_array_equal(GPT.load(path, np.float64)(ids), small_model()(ids))
    shipped = ROOT / "checkpoints" / "reverse.npz"
    with np.load(shipped) as f:
        config = json.loads(str(f["config"]))
    # every field but those added after it was written, which ADDED_LATER fills in
    assert set(config) == {field.name for field in fields(GPTConfig)} - set(weights.ADDED_LATER)
    assert GPT.load(shipped).config == GPTConfig(**config, **weights.ADDED_LATER)


def test_not_a_zip(tmp_path, members):
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(3))
    (tmp_path / "renamed.npz").write_bytes(buffer.getvalue())  # a .npy renamed .npz
    refused(tmp_path / "renamed.npz", ValueError, "not a .npz checkpoint")
    whole = write_zip(tmp_path / "whole.npz", members).read_bytes()
    for cut in (len(whole) // 2, len(whole) - 10):
        (tmp_path / "cut.npz").write_bytes(whole[:cut])
        refused(tmp_path / "cut.npz", ValueError, "not a .npz checkpoint")


def test_path_that_is_not_a_file_or_not_a_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        GPT.load(tmp_path)  # a directory
    with pytest.raises(TypeError, match="^checkpoint path must be a str or Path, got int$"):
        GPT.load(3)


@pytest.mark.parametrize("where", ["config.npy", "wte.npy"])
def test_pickled_member(tmp_path, members, where):
    pickled = npy(np.array([{"a": 1}], dtype=object), allow_pickle=True)
    path = write_zip(tmp_path / "pickle.npz", members | {where: pickled})
    refused(path, ValueError, "holds Python objects .* without pickles")


def test_member_that_is_not_npy_or_appears_twice(tmp_path, members):
    refused(write_zip(tmp_path / "txt.npz", members | {"notes.txt": b"hello"}), ValueError,
            r"\['notes.txt'\] that are not .npy")
    path = tmp_path / "twice.npz"
    with pytest.warns(UserWarning, match="Duplicate name"):
        write_zip(path, members | {"h.0.attn.w_q.npy": members["h.0.attn.w_q.npy"]})
        with zipfile.ZipFile(path, "a") as z:
            z.writestr("h.0.attn.w_q.npy", npy(np.zeros((32, 32))))
    refused(path, ValueError, r"\['h.0.attn.w_q.npy'\] more than once")


def test_huge_declared_shape_is_refused_before_any_allocation(tmp_path, members):
    """A tiny file whose header claims (1e7, 1e7) float64 (800 TB): refused by its shape, then,
    with a config that really asks for it, by its stored size; never a MemoryError."""
    path = write_zip(tmp_path / "huge.npz", members | {"wte.npy": header_only((10**7, 10**7))})
    assert path.stat().st_size < 300_000  # the small model's weights and one header
    refused(path, ValueError, r"weight wte must have shape \(64, 32\), got \(10000000, 10000000\)")
    big = full_config() | {"vocab_size": 10**7, "d_model": 10**7, "n_heads": 1, "n_kv_heads": 1,
                           "d_ff": 4}
    sizes = weight_shapes(GPTConfig(**big))
    huge = {f"{name}.npy": header_only(shape) for name, shape in sizes.items()}
    path = write_zip(tmp_path / "huge2.npz", with_config(huge, big))
    refused(path, ValueError,
            r"member wte.npy declares \d+ bytes, its .npy header implies 800,000,000,000,\d+$")


def test_unexpected_compressed_member_is_refused_without_inflating_it(tmp_path, members):
    path = tmp_path / "bomb.npz"
    write_zip(path, members, zipfile.ZIP_DEFLATED)
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as z:
        with z.open("junk.npy", "w", force_zip64=True) as f:
            f.write(header_only((25 * 2**20 // 8,)))
            for _ in range(25):
                f.write(bytes(2**20))  # 25 MB of zeros, ~25 kB compressed
    assert path.stat().st_size < 400_000
    peak = peak_bytes(lambda: refused(path, ValueError, r"unexpected \['junk'\]"))
    assert peak < 2 * 2**20, f"{peak:,} bytes allocated to refuse it"


def patch_sizes(path: Path, name: str, size: int) -> None:
    """Rewrite the uncompressed size zip stores for member `name`, in its local header and in
    the central directory, leaving its data and CRC as they are."""
    data = bytearray(path.read_bytes())
    encoded = name.encode()
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = data.find(signature)
        while at >= 0:
            name_at = at + (30 if signature == b"PK\x03\x04" else 46)
            if data[name_at:name_at + len(encoded)] == encoded:
                data[at + offset:at + offset + 4] = struct.pack("<I", size)
            at = data.find(signature, at + 1)
    path.write_bytes(bytes(data))


def test_member_whose_stored_size_disagrees(tmp_path, members):
    # Data shorter than the header says (a truncated member inside an intact zip).
    path = write_zip(tmp_path / "short.npz", members | {"wte.npy": members["wte.npy"][:-8]})
    refused(path, ValueError, "member wte.npy declares .* bytes, its .npy header implies")
    # A compressed member that holds more than its stated size: the size claimed matches the
    # header, so only the content gives it away (zipfile stops at that size: the CRC disagrees).
    longer = members | {"wte.npy": members["wte.npy"] + bytes(4096)}
    path = write_zip(tmp_path / "long.npz", longer, zipfile.ZIP_DEFLATED)
    patch_sizes(path, "wte.npy", len(members["wte.npy"]))
    refused(path, ValueError, "not a .npz checkpoint.*wte.npy.*BadZipFile")


def test_missing_or_unreadable_config(tmp_path, members):
    no_config = {k: v for k, v in members.items() if k != "config.npy"}
    refused(write_zip(tmp_path / "none.npz", no_config), ValueError, "no 'config' entry")
    for name, text, match in (("badjson", "{", "not valid JSON: Expecting property name"),
                              ("list", "[1]", "config must be a JSON object"),
                              ("deep", "[" * 10_000, "not valid JSON: maximum recursion depth")):
        path = write_zip(tmp_path / f"{name}.npz", members | {"config.npy": npy(np.array(text))})
        refused(path, ValueError, match)
    big = json.dumps(full_config() | {"note": "x" * 20_000})
    path = write_zip(tmp_path / "big.npz", members | {"config.npy": npy(np.array(big))})
    refused(path, ValueError, r"config member declares [\d,]+ bytes, more than the 65,536")


def test_a_config_key_missing_is_refused_not_defaulted(tmp_path):
    """A RoPE model trained with rope_base=50 whose file lacks the key used to load with 10000
    (logits off by ~1): every field must be present, unknown ones are refused too."""
    model = GPT(GPTConfig(**SMALL, **VARIANTS["rope"], rope_base=50.0), seed=3)
    path = model.save(tmp_path / "rope.npz")
    with zipfile.ZipFile(path) as z:
        files = {name: z.read(name) for name in z.namelist()}
    config = asdict(model.config)
    lacking = {k: v for k, v in config.items() if k != "rope_base"}
    message = refused(write_zip(tmp_path / "lacking.npz", with_config(files, lacking)),
                      ValueError, r"invalid config: .*missing \['rope_base'\], unknown \[\]")
    assert "GPTConfig" in message
    extra = config | {"colour": "red"}
    refused(write_zip(tmp_path / "extra.npz", with_config(files, extra)), ValueError,
            r"missing \[\], unknown \['colour'\]")


def test_a_field_added_later_gets_its_listed_value(tmp_path, monkeypatch):
    """ADDED_LATER is the one way a missing field is filled: with the value listed there."""
    # the window's fields came after checkpoints were first written (kv_latent is LatentConfig's:
    # no checkpoint of an MLA model predates it)
    assert weights.ADDED_LATER == {"sliding_window": None, "attention_sinks": 0}
    model = GPT(GPTConfig(**SMALL, **VARIANTS["rope"], rope_base=50.0), seed=3)
    path = model.save(tmp_path / "rope.npz")
    with zipfile.ZipFile(path) as z:
        files = {name: z.read(name) for name in z.namelist()}
    lacking = {k: v for k, v in asdict(model.config).items() if k != "rope_base"}
    path = write_zip(tmp_path / "old.npz", with_config(files, lacking))
    monkeypatch.setattr(weights, "ADDED_LATER", {"rope_base": 50.0})
    ids = random_ids(1, 2, 7)
    np.testing.assert_array_equal(GPT.load(path)(ids), model(ids))


@pytest.mark.parametrize("dtype", [np.int32, np.complex64, bool, "S4", [("a", "<f4")]])
def test_weights_that_are_not_real_floats(tmp_path, members, dtype):
    w = np.zeros((64, 32), dtype=dtype)
    path = write_zip(tmp_path / "dtype.npz", members | {"wte.npy": npy(w)})
    refused(path, ValueError, "weight wte must be floating-point, got dtype")


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nan_or_inf_weights(tmp_path, members, value):
    w = np.zeros(32)
    w[5] = value
    path = write_zip(tmp_path / "nan.npz", members | {"ln_f.beta.npy": npy(w)})
    with pytest.raises(ValueError, match=r"weights \['ln_f.beta'\] hold NaN or inf"):
        GPT.load(path)


def test_fortran_order_and_big_endian_members_are_honoured(tmp_path, members):
    """np.save keeps a Fortran-ordered or big-endian array as it is; its values must come back."""
    wte = small_model().wte  # (64, 32) float64
    flipped = {"wte.npy": npy(np.asfortranarray(wte)),
               "ln_f.gamma.npy": npy(small_model().ln_f[0].astype(">f8"))}
    assert np.lib.format.read_array_header_1_0(io.BytesIO(flipped["wte.npy"][8:]))[1]
    path = write_zip(tmp_path / "flipped.npz", members | flipped)
    ids = random_ids(2, 2, 6)
    np.testing.assert_array_equal(GPT.load(path, np.float64)(ids), small_model()(ids))


def test_config_whose_sizes_the_weights_do_not_match(tmp_path, members):
    other = full_config() | {"d_model": 64, "d_ff": 256}
    refused(write_zip(tmp_path / "other.npz", with_config(members, other)), ValueError,
            r"weight wte must have shape \(64, 64\), got \(64, 32\)")


def test_a_model_larger_than_memory_is_refused_before_reading(tmp_path, members, monkeypatch):
    monkeypatch.setattr(parts.checks, "available_memory", lambda: 1000)
    monkeypatch.setattr(parts.checks, "SMALL_ALLOCATION", 0)  # every size asks
    refused(write_zip(tmp_path / "ok.npz", members), ValueError,
            "reading its weights needs .* GiB, more than the")


def test_the_dtype_is_checked_before_the_file_is_read(tmp_path):
    with pytest.raises(TypeError, match="GPT.load dtype must be one of float32, float64"):
        GPT.load(tmp_path / "missing.npz", dtype=np.int8)


# --- weights.checked: subclasses and odd values --------------------------------------------------

def named64() -> dict[str, np.ndarray]:
    return dict(small_model().named_weights())


def test_a_masked_weight_is_refused_not_unmasked():
    named = named64()
    named["wte"] = np.ma.masked_array(named["wte"], mask=np.eye(64, 32, dtype=bool))
    with pytest.raises(TypeError, match="weight wte is a masked array"):
        GPT(small_model().config, weights=named)


def test_a_matrix_weight_is_honoured():
    named = named64()
    named["wte"] = matrix(named["wte"])
    model = GPT(small_model().config, dtype=np.float64, weights=named)
    assert type(model.wte) is np.ndarray
    ids = random_ids(3, 2, 5)
    np.testing.assert_array_equal(model(ids), small_model()(ids))


@pytest.mark.parametrize(("value", "error", "match"), [
    (np.float64(1.0), TypeError, "ln_f.beta must be a floating-point array, got float64"),
    (1.0, TypeError, "ln_f.beta must be a floating-point array, got float$"),
    ([1.0] * 32, TypeError, "ln_f.beta must be a floating-point array, got list"),
    (torch.ones(32, dtype=torch.float64), TypeError, "array, got torch.float64"),
    (np.array(1.0), ValueError, r"ln_f.beta must have shape \(32,\), got \(\)"),
])
def test_values_that_are_not_float_arrays_of_the_shape(value, error, match):
    named = named64() | {"ln_f.beta": value}
    with pytest.raises(error, match=match):
        GPT(small_model().config, dtype=np.float64, weights=named)


def test_weight_names_must_be_strings():
    with pytest.raises(TypeError, match="^weights must be named by str, got the key 3$"):
        GPT(small_model().config, weights=named64() | {3: np.zeros(1)})


# --- Hugging Face GPT-2 --------------------------------------------------------------------------

V, N_POSITIONS, D, N_HEADS = 50, 16, 16, 4


def gpt2(**config):
    return hf_gpt2(V, N_POSITIONS, D, 2, N_HEADS, seed=0, dtype=torch.float64, **config)


@pytest.fixture(scope="module")
def hf():
    return gpt2()


def test_an_untied_head_is_refused(hf):
    """The hostile tester's model: tie_word_embeddings=False and its own head. Converted, its
    logits were off by ~11; it must be refused with hf_config and, without, by comparison."""
    from transformers import GPT2Config, GPT2LMHeadModel

    hc = GPT2Config(vocab_size=V, n_positions=N_POSITIONS, n_embd=D, n_layer=2, n_head=N_HEADS,
                    tie_word_embeddings=False)
    torch.manual_seed(0)
    untied = GPT2LMHeadModel(hc).eval()
    with torch.no_grad():
        untied.lm_head.weight.normal_()
    sd = untied.state_dict()
    assert not torch.equal(sd["lm_head.weight"], sd["transformer.wte.weight"])
    with pytest.raises(ValueError, match="tie_word_embeddings=False: this GPT-2 has its own LM"):
        GPT.from_gpt2(sd, hf_config=hc)
    with pytest.raises(ValueError, match="lm_head.weight differs from wte.weight"):
        GPT.from_gpt2(sd, n_heads=N_HEADS)
    # Off by one value in one place is enough (an exact comparison), and so is another shape.
    tied = {k: v.clone() for k, v in hf.state_dict().items()}
    tied["lm_head.weight"][7, 3] += 1e-12
    with pytest.raises(ValueError, match="lm_head.weight differs from wte.weight"):
        GPT.from_gpt2(tied, n_heads=N_HEADS)
    tied["lm_head.weight"] = tied["lm_head.weight"][:-1]
    with pytest.raises(ValueError, match="lm_head.weight differs from wte.weight"):
        GPT.from_gpt2(tied, n_heads=N_HEADS)


@pytest.mark.parametrize("extra", [
    {"transformer.h.0.attn.c_attn.lora_A.weight": torch.zeros(4, D)},
    {"transformer.h.1.mlp.c_fc.lora_B.weight": torch.zeros(4 * D, 4)},
    {"lm_head.bias": torch.zeros(V)},
    {"transformer.h.0.ln_3.weight": torch.ones(D)},
    {"score.weight": torch.zeros(2, D)},
])
def test_unknown_keys_are_refused_by_name(hf, extra):
    sd = dict(hf.state_dict()) | extra
    key = next(iter(extra)).removeprefix("transformer.")
    with pytest.raises(ValueError, match=rf"holds 1 keys this model does not compute, e.g. "
                                         rf"\['{key}'\]"):
        GPT.from_gpt2(sd, n_heads=N_HEADS)


def test_a_key_given_with_and_without_the_prefix_is_refused(hf):
    sd = dict(hf.state_dict())
    sd["wte.weight"] = torch.zeros(V, D, dtype=torch.float64)
    with pytest.raises(ValueError, match="holds 'wte.weight' twice"):
        GPT.from_gpt2(sd, n_heads=N_HEADS)


def test_cross_attention_is_refused():
    hf = gpt2(add_cross_attention=True)
    with pytest.raises(ValueError, match="add_cross_attention=True: cross-attention"):
        GPT.from_gpt2(hf.state_dict(), hf_config=hf.config)
    with pytest.raises(ValueError, match=r"keys this model does not compute, e.g. \['h.0.cross"):
        GPT.from_gpt2(hf.state_dict(), n_heads=N_HEADS)


@pytest.mark.parametrize(("field", "value"), [("n_inner", 3 * D), ("n_embd", 2 * D),
                                              ("n_positions", 2 * N_POSITIONS),
                                              ("vocab_size", V + 1), ("n_layer", 3)])
def test_a_config_that_contradicts_the_weights_is_refused(hf, field, value):
    from transformers import GPT2Config

    config = GPT2Config(**(hf.config.to_dict() | {field: value}))
    with pytest.raises(ValueError, match=rf"hf_config.{field}={value} contradicts the weights"):
        GPT.from_gpt2(hf.state_dict(), hf_config=config)


def test_n_inner_is_read_and_a_model_with_it_matches():
    hf = gpt2(n_inner=3 * D)
    model = GPT.from_gpt2(hf.state_dict(), dtype=np.float64, hf_config=hf.config)
    assert model.config.d_ff == 3 * D
    ids = random_ids(4, 2, 9, V)
    np.testing.assert_allclose(model(ids), hf_logits(hf, ids), rtol=0, atol=1e-10)


def test_reorder_and_upcast_attn_is_the_same_function():
    """Hugging Face's eager kernel then scores in float32 with the scale folded in: the function
    we compute, rounded elsewhere, so it is accepted, and our float32 model agrees."""
    hf = hf_gpt2(V, N_POSITIONS, D, 2, N_HEADS, seed=1, dtype=torch.float32,
                 reorder_and_upcast_attn=True, attn_implementation="eager")
    ids = random_ids(5, 2, N_POSITIONS, V)
    model = GPT.from_gpt2(hf.state_dict(), hf_config=hf.config)
    assert_close_float32(model(ids), hf_logits(hf, ids))


def test_a_config_of_another_model_type_is_refused(hf):
    config = SimpleNamespace(model_type="gpt_neo", n_head=N_HEADS)
    with pytest.raises(ValueError, match="hf_config is a 'gpt_neo' config, not GPT-2's"):
        GPT.from_gpt2(hf.state_dict(), hf_config=config)


@pytest.mark.parametrize(("value", "error", "match"), [
    (None, TypeError, "h.0.ln_1.weight must be a floating-point array, got NoneType"),
    ("weights", TypeError, "h.0.ln_1.weight must be a floating-point array, got str"),
    ([1.0] * D, TypeError, "h.0.ln_1.weight must be a floating-point array, got list"),
    (np.ma.masked_array(np.ones(D), mask=np.arange(D) == 3), TypeError, "is a masked array"),
    (torch.ones(D, dtype=torch.int64), TypeError, "got torch.int64"),
    (np.float64(1.0), TypeError, "must be a floating-point array, got float64"),
    (torch.tensor(1.0), ValueError, r"h.0.ln_1.weight: got \(\), expected \(16,\)"),
    (matrix(np.ones(D)), ValueError, r"h.0.ln_1.weight: got \(1, 16\), expected \(16,\)"),
])
def test_state_dict_values_that_are_not_float_arrays(hf, value, error, match):
    sd = dict(hf.state_dict()) | {"transformer.h.0.ln_1.weight": value}
    with pytest.raises(error, match=match):
        GPT.from_gpt2(sd, n_heads=N_HEADS)


def test_state_dict_keys_must_be_strings(hf):
    with pytest.raises(TypeError, match="^from_gpt2: state_dict keys must be str, got 0$"):
        GPT.from_gpt2(dict(hf.state_dict()) | {0: torch.zeros(1)}, n_heads=N_HEADS)


def test_float_types_numpy_lacks_are_converted(hf):
    """bfloat16 and float8 tensors have no NumPy type: read via float32, with their rounding."""
    ids = random_ids(6, 2, 8, V)
    expected = hf_logits(hf, ids)
    sd = {k: v.to(torch.float8_e4m3fn).to(torch.float64) for k, v in hf.state_dict().items()}
    sd8 = {k: v.to(torch.float8_e4m3fn) for k, v in hf.state_dict().items()}
    same = GPT.from_gpt2(sd, n_heads=N_HEADS, dtype=np.float64)(ids)
    got = GPT.from_gpt2(sd8, n_heads=N_HEADS, dtype=np.float64)(ids)
    np.testing.assert_array_equal(got, same)  # the float8 values themselves, nothing lost
    assert np.abs(got - expected).max() < 0.2 * np.abs(expected).max()


# --- any corruption: refused with the path, or the very same model -------------------------------

@pytest.mark.parametrize("method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_random_corruption_is_refused_or_harmless(tmp_path, method):
    """A few random bytes changed (and sometimes the end cut off) anywhere in a checkpoint: the
    load is refused with a ValueError naming the path, or, when only a field nothing reads was
    hit (a timestamp, a local header zip ignores), gives exactly the original model."""
    model = GPT(GPTConfig(vocab_size=8, max_seq_len=4, d_model=8, n_heads=2, n_layers=1), seed=0)
    with zipfile.ZipFile(model.save(tmp_path / "m.npz")) as z:
        files = {name: z.read(name) for name in z.namelist()}
    base = write_zip(tmp_path / "base.npz", files, method).read_bytes()
    rng = np.random.default_rng(method)
    ids = np.arange(4)[None]
    outcomes = {"refused": 0, "same": 0}
    for _ in range(300):
        data = bytearray(base)
        for at in rng.integers(0, len(data), rng.integers(1, 4)):
            data[at] = rng.integers(256)
        if rng.random() < 0.1:
            data = data[:rng.integers(len(data))]
        path = tmp_path / "hit.npz"
        path.write_bytes(bytes(data))
        try:
            loaded = GPT.load(path)
        except ValueError as err:
            assert str(path) in str(err)
            outcomes["refused"] += 1
            continue
        np.testing.assert_array_equal(loaded(ids), model(ids))
        outcomes["same"] += 1
    assert outcomes["refused"] > 250, outcomes


@pytest.mark.parametrize(("member", "match"), [
    (b"garbage!" * 20, "not a .npz checkpoint.*member wte.npy"),
    (b"\x93NUMPY\x03\x00" + npy(np.zeros((64, 32)))[8:], r"format version \(3, 0\)"),
])
def test_member_that_is_not_a_readable_npy(tmp_path, members, member, match):
    refused(write_zip(tmp_path / "odd.npz", members | {"wte.npy": member}), ValueError, match)


def test_a_compression_method_zipfile_lacks(tmp_path, members):
    path = write_zip(tmp_path / "method.npz", members, zipfile.ZIP_DEFLATED)
    data = bytearray(path.read_bytes())
    at = data.find(b"PK\x01\x02")  # the first central-directory entry: config.npy's
    data[at + 10:at + 12] = struct.pack("<H", 99)  # its compression method: unknown
    path.write_bytes(bytes(data))
    refused(path, ValueError, "not a .npz checkpoint.*NotImplementedError")
