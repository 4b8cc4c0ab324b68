"""tools/export_hf.py: a model of this repository written in Hugging Face's GPT-2 format.

The export is loaded by transformers' own GPT2LMHeadModel.from_pretrained (a local directory,
nothing downloaded), which knows nothing of our code: its logits on a padded batch must be ours,
for the shipped checkpoint and for a random model whose every axis differs. Read back with
GPT.from_gpt2, the export gives the same weights bit for bit. What GPT-2 cannot express is
refused by name, and nothing is written unless the whole export is.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMALL, prompts_of
from safetensors.numpy import load_file
from transformers import GPT2Config, GPT2LMHeadModel

from beyond.latent import LatentConfig, LatentGPT
from block import GPT, GPTConfig
from generate import CHECKPOINT, left_pad
from parts import task
from tools import export_hf
from tools.references import hf_generate, random_model

# A random model with every size distinct from the others and from GPT-2's defaults: d_ff is not
# 4 * d_model (GPT2Config's n_inner), the LayerNorm epsilon is not 1e-5, 3 layers.
ODD = GPTConfig(**(SMALL | {"n_layers": 3, "d_ff": 80, "ln_eps": 1e-6}))


@pytest.fixture(scope="module")
def trained() -> GPT:
    return GPT.load(CHECKPOINT)


@pytest.fixture(scope="module")
def odd() -> GPT:
    return random_model(ODD, seed=3, dtype=np.float32)


@pytest.fixture(scope="module")
def odd_export(odd, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "odd"
    export_hf.export(odd, out)
    return out


@pytest.fixture
def unchecked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip export()'s own logit check (a Hugging Face load per export), for the tests of
    refusals and files; the tests above check the logits themselves."""
    monkeypatch.setattr(export_hf, "logit_error", lambda model, directory: 0.0)


def hf_padded_logits(hf: GPT2LMHeadModel, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Hugging Face's forward on a left-padded batch, positions counted over real tokens (its
    plain forward would number the pads too)."""
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        return hf(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                  position_ids=torch.from_numpy(positions)).logits.numpy()


def relative_error(ours: np.ndarray, theirs: np.ndarray, mask: np.ndarray) -> float:
    real = mask.astype(bool)
    return float(np.abs(ours[real] - theirs[real]).max() / np.abs(ours[real]).max())


# --- Hugging Face loads the export and computes our logits ---------------------------------------

def test_the_shipped_checkpoint_loads_in_hugging_face_with_our_logits(trained, tmp_path):
    assert export_hf.export(trained, tmp_path / "reverse") < export_hf.TOLERANCE  # its own check
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "reverse").eval()
    assert hf.dtype == torch.float32 and hf.config.n_layer == 2
    texts = ["attention=", "kv cache=noitnet", "a=", "the exam rule=elur maxe eht."]
    ids, mask = left_pad([task.encode(t) for t in texts], pad_id=0)
    error = relative_error(trained(ids, attention_mask=mask), hf_padded_logits(hf, ids, mask),
                           mask)
    assert error < 1e-5
    # And Hugging Face's own generate(), with its own cache, reverses a prompt with it.
    prompt = task.encode("attention=")[None]
    tokens, _ = hf_generate(hf, prompt, 10, eos_id=ord(task.END), pad_id=0)
    assert task.decode(tokens[0]) == "noitnetta."


def test_a_random_model_of_odd_sizes_loads_with_our_logits(odd, odd_export):
    hf = GPT2LMHeadModel.from_pretrained(odd_export).eval()
    assert (hf.config.n_inner, hf.config.layer_norm_epsilon, hf.config.n_layer) == (80, 1e-6, 3)
    ids, mask = left_pad(prompts_of([32, 9, 1, 20], seed=5), pad_id=0)
    ours, theirs = odd(ids, attention_mask=mask), hf_padded_logits(hf, ids, mask)
    assert relative_error(ours, theirs, mask) < 1e-5
    # The comparison can fail: a model with one bias changed is far off.
    named = odd.named_weights()
    named["h.2.attn.b_v"] = named["h.2.attn.b_v"] + 0.05
    nudged = GPT(ODD, weights=named)
    assert relative_error(nudged(ids, attention_mask=mask), theirs, mask) > 1e-3


# --- the files, read back ------------------------------------------------------------------------

def test_the_export_round_trips_through_from_gpt2_bit_for_bit(odd, odd_export):
    out = odd_export
    state_dict = load_file(out / "model.safetensors")
    back = GPT.from_gpt2(state_dict, hf_config=GPT2Config.from_pretrained(out))
    assert {**vars(back.config), "init_std": None} == {**vars(odd.config), "init_std": None}
    ours, theirs = odd.named_weights(), back.named_weights()
    assert ours.keys() == theirs.keys()
    for name, w in ours.items():
        np.testing.assert_array_equal(theirs[name], w, err_msg=name)


def test_the_files_are_what_hugging_face_itself_writes(odd, odd_export):
    """The weight names are GPT2LMHeadModel's own, less the tied lm_head (save_pretrained leaves
    it out too); c_attn holds W_q, W_k, W_v side by side in its columns."""
    out = odd_export
    state_dict = load_file(out / "model.safetensors")
    config = GPT2Config.from_pretrained(out)
    expected = set(GPT2LMHeadModel(config).state_dict()) - {"lm_head.weight"}
    assert set(state_dict) == expected
    c_attn = state_dict["transformer.h.1.attn.c_attn.weight"]  # (D, 3D)
    w_k = odd.named_weights()["h.1.attn.w_k"]
    np.testing.assert_array_equal(c_attn[:, 32:64], w_k)
    assert all(w.dtype == np.float32 for w in state_dict.values())
    saved = json.loads((out / "config.json").read_text())
    assert saved["architectures"] == ["GPT2LMHeadModel"] and saved["tie_word_embeddings"]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


# --- refusals: what GPT-2 cannot express ---------------------------------------------------------

@pytest.mark.parametrize(("change", "named"), [
    ({"rope": True}, "RoPE"),
    ({"n_kv_heads": 2}, "groups K/V heads"),
    ({"sliding_window": 8}, "sliding window"),
    ({"sliding_window": 8, "attention_sinks": 2}, "attention_sinks=2"),
], ids=["rope", "gqa", "window", "sinks"])
def test_what_gpt2_cannot_express_is_refused_by_name(tmp_path, change, named):
    model = GPT(GPTConfig(**(SMALL | change)))
    with pytest.raises(ValueError, match=named):
        export_hf.export(model, tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_an_mla_model_and_a_weight_outside_gpt2s_table_are_refused(tmp_path, monkeypatch):
    latent = LatentGPT(LatentConfig(**SMALL, kv_latent=8))
    with pytest.raises(ValueError, match="MLA"):
        export_hf.export(latent, tmp_path / "x")
    model = GPT(GPTConfig(**SMALL))
    untied = model.named_weights() | {"lm_head": model.wte.copy()}
    monkeypatch.setattr(model, "named_weights", lambda: untied)
    with pytest.raises(ValueError, match="lm_head"):
        export_hf.export(model, tmp_path / "x")
    with pytest.raises(TypeError, match="must be a GPT"):
        export_hf.export(object(), tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


# --- whole or not at all -------------------------------------------------------------------------

def test_a_failure_half_way_leaves_nothing_behind(trained, tmp_path, monkeypatch, unchecked):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.numpy.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        export_hf.export(trained, tmp_path / "x")
    assert list(tmp_path.iterdir()) == []  # no export, no staging directory


def test_logits_that_disagree_are_never_put_in_place(trained, tmp_path, monkeypatch):
    monkeypatch.setattr(export_hf, "logit_error", lambda model, directory: 0.5)
    with pytest.raises(ValueError, match="not written"):
        export_hf.export(trained, tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_an_earlier_export_is_replaced_and_other_files_are_never_touched(trained, odd, tmp_path,
                                                                        unchecked):
    out = tmp_path / "x"
    export_hf.export(odd, out)
    export_hf.export(trained, out)
    assert GPT2Config.from_pretrained(out).vocab_size == 256  # the second export, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]  # nothing left beside it
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="notes.txt"):
        export_hf.export(odd, out)
    assert (out / "notes.txt").read_text() == "mine"
    assert GPT2Config.from_pretrained(out).vocab_size == 256


# --- the command ---------------------------------------------------------------------------------

def usage_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        export_hf.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_the_command_writes_where_told_and_says_how_close(tmp_path, capsys):
    assert export_hf.main(["--out", str(tmp_path / "reverse")]) == 0
    printed = capsys.readouterr().out
    assert "model.safetensors" in printed and "tolerance 1e-05: pass" in printed
    assert sorted(p.name for p in (tmp_path / "reverse").iterdir()) == ["config.json",
                                                                        "model.safetensors"]


def test_the_command_refuses_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(export_hf, "export", lambda *a: pytest.fail("exported"))
    (tmp_path / "afile").write_text("")
    assert "not a directory" in usage_error(["--out", str(tmp_path / "afile")], capsys)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("")
    assert "keep.txt" in usage_error(["--out", str(tmp_path / "full")], capsys)
    (tmp_path / "garbage.npz").write_bytes(b"not a checkpoint")
    last = usage_error(["--checkpoint", str(tmp_path / "garbage.npz"), "--out",
                        str(tmp_path / "x")], capsys)
    assert "argument --checkpoint" in last
    LatentGPT(LatentConfig(**SMALL, kv_latent=8)).save(tmp_path / "mla.npz")
    last = usage_error(["--checkpoint", str(tmp_path / "mla.npz"), "--out", str(tmp_path / "x")],
                       capsys)
    assert "MLA" in last
    GPT(GPTConfig(**SMALL, rope=True)).save(tmp_path / "rope.npz")
    assert "RoPE" in usage_error(["--checkpoint", str(tmp_path / "rope.npz")], capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "full", "garbage.npz",
                                                          "mla.npz", "rope.npz"]
