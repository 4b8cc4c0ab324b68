"""python generate.py: the trained model on text, --random on token ids, --hf on a Hugging Face
GPT-2 directory; each prints naive == cached and exits non-zero when they disagree, and every
bad argument is a one-line usage error before any work."""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import pytest

import generate
from block import GPT, GPTConfig
from tools import generate_cli


def run(argv: list[str], capsys) -> tuple[int, str]:
    code = generate_cli.main(argv)
    return code, capsys.readouterr().out


def step_lines(out: str) -> list[list[str]]:
    """The rows of the 'step  cache length  tokens' table."""
    block = out.split("step  cache length")[1].split("\n\n")[0]
    return [line.split() for line in block.splitlines()[1:]]


# --- --random: the assignment's config with random weights ----------------------------------------

def test_random_reports_agreement_and_the_cache_length_per_step(capsys):
    code, out = run(["--random", "--new-tokens", "4", "--prompt-len", "3", "--layers", "1",
                     "--dtype", "float64"], capsys)
    assert code == 0
    assert "tokens identical (naive vs cached): True" in out
    assert "cache grew by exactly 1 per step:   True" in out
    assert [int(row[1]) for row in step_lines(out)] == [3, 4, 5, 6]
    assert float(re.search(r"largest \|logit difference\|: +(\S+)", out)[1]) < 1e-10
    assert re.search(r"time cached: .* tokens/s \(2 rows x 4 steps\)", out)


def test_random_ragged_batch_is_shown_left_padded(capsys):
    code, out = run(["--random", "--prompt-lens", "3,5,1", "--new-tokens", "3"], capsys)
    assert code == 0
    rows = [line for line in out.splitlines() if line.rstrip().endswith(("00111", "11111",
                                                                         "00001"))]
    assert [line.split()[-1] for line in rows] == ["00111", "11111", "00001"]
    assert rows[2].split()[:4] == [".", ".", ".", "."]  # four pads before the one real token
    assert [len(line.split()) for line in rows] == [6, 6, 6]  # 5 columns apart, then the mask
    assert [int(row[1]) for row in step_lines(out)] == [5, 6, 7]


@pytest.mark.parametrize("flags", [["--temperature", "0.8", "--top-k", "5", "--seed", "3"],
                                   ["--temperature", "1.5", "--top-p", "0.9"],
                                   ["--temperature", "1e-310"],
                                   ["--prefill-chunk", "2"]])
def test_random_sampling_and_chunking_agree_naive_and_cached(capsys, flags):
    code, out = run(["--random", "--new-tokens", "6", *flags], capsys)
    assert code == 0 and "tokens identical (naive vs cached): True" in out
    if "1e-310" in flags:  # a tiny temperature is greedy, not token 0 for every row
        greedy = generate_cli.main(["--random", "--new-tokens", "6"])
        assert greedy == 0
        assert step_lines(out) == step_lines(capsys.readouterr().out)


def test_random_stops_at_eos(capsys):
    _, free = run(["--random", "--new-tokens", "12", "--batch", "1"], capsys)
    tokens = [int(row[2].strip("[],")) for row in step_lines(free)]
    eos = tokens[2]
    first = tokens.index(eos)  # the row finishes the first time it emits eos
    code, out = run(["--random", "--new-tokens", "12", "--batch", "1", "--eos-id", str(eos)],
                    capsys)
    assert code == 0
    assert f"steps taken: {first + 1} of max 12" in out
    assert len(step_lines(out)) == first + 1


def test_a_large_batch_is_printed_in_a_few_lines(capsys):
    code, out = run(["--random", "--batch", "40", "--new-tokens", "2"], capsys)
    assert code == 0
    assert "... (35 more rows)" in out
    assert len(out.splitlines()) < 30


@pytest.mark.parametrize("args", [["--random", "--new-tokens", "3"], ["--prompt", "ab"]],
                         ids=["random", "trained"])
def test_the_command_fails_when_cached_and_naive_disagree(capsys, monkeypatch, args):
    real = generate.generate_cached

    def off_by_one(model, prompts, n, *args, **kwargs):
        out = real(model, prompts, n, *args, **kwargs)
        return out._replace(tokens=(out.tokens + 1) % model.config.vocab_size)

    monkeypatch.setattr(generate, "generate_cached", off_by_one)
    code, out = run(args, capsys)
    assert code == 1 and "tokens identical (naive vs cached): False" in out


# --- the trained model ---------------------------------------------------------------------------

def test_trained_mode_decodes_text_and_checks_each_answer(tmp_path, capsys):
    """A random model saved as a checkpoint: its answers are wrong ("NO"), but naive and cached
    still agree, and each prompt, left-padded, is shown as text."""
    path = GPT(GPTConfig(), seed=5).save(tmp_path / "r.npz")
    code, out = run(["--checkpoint", str(path), "--prompt", "kv cache", "--prompt", "ab"],
                    capsys)
    assert code == 0
    assert "______ab=   000000111" in out
    assert re.search(r"^kv cache=\s+\S+\s+(yes|NO)$", out, flags=re.M)
    assert "tokens identical (naive vs cached): True" in out
    assert [int(row[1]) for row in step_lines(out)][:2] == [9, 10]
    steps = step_lines(out)  # this model never says '.': it runs to the limit, the longest
    assert all("'.'" not in row for row in steps)  # prompt's length + 1 (its reversal and '.')
    assert len(steps) == len("kv cache") + 1


# --- --hf: a Hugging Face GPT-2 directory --------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory):
    """A small random GPT-2 and a byte-level BPE tokenizer trained here on a few lines, saved with
    save_pretrained: what a user's downloaded checkpoint looks like, without a download."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["the cat sat on the mat", "attention is all you need"] * 5,
                            vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer,
                                        eos_token="<|endoftext|>")
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32,
                                    n_layer=2, n_head=4, initializer_range=0.2,
                                    eos_token_id=tokenizer.eos_token_id))
    path = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    hf.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_hf_generates_text_and_matches_hugging_faces_logits(tiny_hf_dir, capsys):
    code, out = run(["--hf", str(tiny_hf_dir), "--prompt", "the cat", "--prompt", "attention",
                     "--new-tokens", "6"], capsys)
    assert code == 0
    assert "'the cat' -> " in out and "'attention' -> " in out
    assert re.search(r"\d+ tokens in .* tokens/s", out)
    assert float(re.search(r"on the same tokens: (\S+)", out)[1]) < 1e-4


def test_hf_stops_at_the_tokenizers_eos(tiny_hf_dir, tmp_path, capsys):
    """--hf takes eos from the tokenizer: with eos set to the token Hugging Face's model picks
    first after the prompt (found here with torch, greedily), the run stops after that one
    token instead of going on for --new-tokens."""
    import shutil

    import torch
    from transformers import AutoTokenizer, GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(tiny_hf_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_hf_dir)
    with torch.no_grad():
        ids = torch.tensor([tokenizer("the cat")["input_ids"]])
        first = int(hf(ids).logits[0, -1].argmax())
    path = tmp_path / "eos-is-the-first-token"
    shutil.copytree(tiny_hf_dir, path)
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(first)
    tokenizer.save_pretrained(path)
    assert AutoTokenizer.from_pretrained(path).eos_token_id == first
    code, out = run(["--hf", str(path), "--prompt", "the cat", "--new-tokens", "6"], capsys)
    assert code == 0 and re.search(r"^1 tokens in ", out, flags=re.M), out
    _, free = run(["--hf", str(tiny_hf_dir), "--prompt", "the cat", "--new-tokens", "6"],
                  capsys)
    assert re.search(r"^6 tokens in ", free, flags=re.M), free  # power: it would go on


def test_hf_runs_in_float32_and_stops_at_an_eos_of_id_zero(tiny_hf_dir, tmp_path, capsys,
                                                           monkeypatch):
    """The tiny tokenizer's eos is token 0 (its first special token). A copy of the model made to
    pick token 0 always (final LayerNorm out -> a fixed vector v, token 0's embedding 10 v) must
    stop after one token: id 0 is a valid eos. The converted model is float32, as printed."""
    import shutil

    import torch
    from transformers import AutoTokenizer, GPT2LMHeadModel

    assert AutoTokenizer.from_pretrained(tiny_hf_dir).eos_token_id == 0
    hf = GPT2LMHeadModel.from_pretrained(tiny_hf_dir).eval()
    v = torch.linspace(-1.0, 1.0, hf.config.n_embd)
    with torch.no_grad():
        hf.transformer.ln_f.weight.zero_()
        hf.transformer.ln_f.bias.copy_(v)
        hf.transformer.wte.weight[0] = 10 * v
    path = tmp_path / "always-eos"
    shutil.copytree(tiny_hf_dir, path)
    hf.save_pretrained(path)
    models = []
    real = generate.generate_cached

    def recorded(model, *args, **kwargs):
        models.append(model)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(generate, "generate_cached", recorded)
    code, out = run(["--hf", str(path), "--prompt", "the cat", "--new-tokens", "6"], capsys)
    assert code == 0 and re.search(r"^1 tokens in ", out, flags=re.M), out
    assert [m.dtype for m in models] == [np.float32]


def test_hf_logit_difference_finds_one_wrong_logit(tiny_hf_dir):
    """The comparison reads, for every row, the logits Hugging Face gives the prompt plus the new
    tokens at the positions that chose each new token: it is tiny for our own run, and a single
    logit moved by 0.5 (in the last step of the shorter row) shows up as 0.5."""
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(tiny_hf_dir).eval()
    model = GPT.from_gpt2(hf.state_dict(), dtype=np.float32, hf_config=hf.config)
    prompts = [np.array([5, 9, 2, 40]), np.array([7, 1])]
    out = generate.generate_cached(model, prompts, 4)
    diff, largest = generate_cli.hf_logit_difference(hf, prompts, out)
    assert diff < 1e-4 and largest > 1.0  # init 0.2: logits of order 1-10
    logits = out.logits.copy()
    logits[1, -1, 17] += 0.5
    moved, _ = generate_cli.hf_logit_difference(hf, prompts, out._replace(logits=logits))
    assert abs(moved - 0.5) < 1e-4
    logits[0, 0, 3] = 1e3  # the largest |logit| is Hugging Face's, not ours
    assert generate_cli.hf_logit_difference(hf, prompts, out._replace(logits=logits))[1] == largest


def test_hf_fails_when_the_converted_model_disagrees_with_hugging_face(tiny_hf_dir, capsys,
                                                                       monkeypatch):
    """The conversion made wrong on purpose (every embedding scaled by 1.01): the command prints
    the relative difference against its stated tolerance and exits 1, not 0."""
    real = GPT.from_gpt2

    def slightly_wrong(*args, **kwargs):
        model = real(*args, **kwargs)
        named = model.named_weights()
        return GPT(model.config, dtype=model.dtype, weights=named | {"wte": named["wte"] * 1.01})

    monkeypatch.setattr(GPT, "from_gpt2", slightly_wrong)
    code = generate_cli.main(["--hf", str(tiny_hf_dir), "--prompt", "the cat", "--new-tokens", "3"])
    out, err = capsys.readouterr()
    assert code == 1
    line = re.search(r"vs Hugging Face on the same tokens: (\S+) = (\S+) x max\|HF logit\| .*"
                     r"tolerance 1e-04: FAIL", out)
    assert line and float(line[2]) > 1e-4, out
    assert "differ from Hugging Face's" in err
    monkeypatch.undo()
    code = generate_cli.main(["--hf", str(tiny_hf_dir), "--prompt", "the cat", "--new-tokens", "3"])
    assert code == 0 and "tolerance 1e-04: pass" in capsys.readouterr().out


@pytest.mark.parametrize("args", [["--random", "--new-tokens", "3"], ["--prompt", "ab"]],
                         ids=["random", "trained"])
def test_the_command_fails_when_cached_logits_drift_but_tokens_agree(capsys, monkeypatch, args):
    """Same tokens, but every cached logit moved by 1% of the largest: the logit check alone must
    fail the run (a 1e-2 relative error is a bug, float32 rounding is ~1e-6)."""
    real = generate.generate_cached

    def drifted(model, prompts, n, *args, **kwargs):
        out = real(model, prompts, n, *args, **kwargs)
        return out._replace(logits=out.logits + 0.01 * np.abs(out.logits).max())

    monkeypatch.setattr(generate, "generate_cached", drifted)
    code, out = run(args, capsys)
    assert code == 1 and "tokens identical (naive vs cached): True" in out
    assert re.search(r"largest \|logit difference\|: +\S+ = 1\.0e-02 x max\|logit\| "
                     r"\(tolerance 1e-04: FAIL\)", out), out


@pytest.mark.parametrize(("argv", "match"), [
    (["--hf", "no-such-model-here", "--prompt", "x"], "no Hugging Face GPT-2 at"),
    (["--hf", "DIR"], "--hf needs --prompt"),
    (["--hf", "DIR", "--random", "--prompt", "x"], "pick one"),
    (["--hf", "DIR", "--prompt", "the cat", "--new-tokens", "64"], "max_seq_len=64"),
])
def test_hf_refusals_are_one_line(tiny_hf_dir, capsys, argv, match):
    argv = [str(tiny_hf_dir) if a == "DIR" else a for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        generate_cli.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and match in err and "Traceback" not in err


@pytest.fixture
def nothing_loads_or_connects(monkeypatch):
    """transformers cannot be imported and no socket can connect: whatever the command does
    before its refusal, it neither loads a model nor waits for the network."""
    import socket
    import sys
    import types

    def refuse(*args, **kwargs):  # noqa: ANN202
        raise AssertionError("tried to load a Hugging Face model or reach the network")

    fake = types.ModuleType("transformers")
    fake.__getattr__ = lambda name: refuse()
    for name in ("transformers", "transformers.utils"):
        monkeypatch.setitem(sys.modules, name, fake)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_hf_offline_without_the_weights_is_refused_at_once_saying_how_to_get_them(
        tmp_path, capsys, monkeypatch, nothing_loads_or_connects, offline):
    """`make` sets HF_HUB_OFFLINE: a hub name this machine has never downloaded is refused from
    the local cache alone (no model load, no retries), and the message says how to get it."""
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv(offline, "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(SystemExit) as exit_info:
        generate_cli.main(["--hf", "gpt2", "--prompt", "hello"])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and captured.out == ""
    last = captured.err.strip().splitlines()[-1]
    assert "argument --hf: no Hugging Face GPT-2 at 'gpt2'" in last
    assert f"{offline} is set" in last and str(tmp_path / "hub") in last
    assert "hf download gpt2" in last and "save_pretrained" in last


def test_hf_offline_with_a_directory_does_not_ask_the_cache(tiny_hf_dir, capsys, monkeypatch):
    """A save_pretrained directory is read as it is, offline or not."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out = run(["--hf", str(tiny_hf_dir), "--prompt", "the cat", "--new-tokens", "2"],
                    capsys)
    assert code == 0 and "pass" in out


# --- bad arguments -------------------------------------------------------------------------------

@pytest.mark.parametrize(("argv", "match"), [
    (["--random", "--seed", "-1"], "--seed: must be in [0, 4294967295]"),
    (["--random", "--layers", "0"], "--layers: must be in [1, 1000000]"),
    (["--random", "--layers", "1000000"], "needs"),  # the weights would not fit in memory
    (["--random", "--batch", "0"], "--batch: must be in"),
    (["--random", "--batch", "1000000"], "needs"),  # nor would the cache
    (["--random", "--prompt-len", "200"], "max_seq_len=128"),
    (["--random", "--prompt-lens", "3,0"], "positive ints"),
    (["--random", "--temperature", "-1"], "temperature"),
    (["--random", "--temperature", "nan"], "temperature"),
    (["--random", "--top-k", "0"], "--top-k"),
    (["--random", "--top-p", "1.5", "--temperature", "1"], "--top-p"),
    (["--random", "--eos-id", "256"], "eos_id"),
    (["--random", "--prefill-chunk", "0"], "--prefill-chunk: must be"),
    (["--prompt", "Hello"], "'H' at index 0 is not in the alphabet"),
    (["--prompt", "a" * 25], "more than MAX_CHARS=24"),
    (["--prompt", ""], "empty"),
    (["--checkpoint", "nowhere.npz"], "no checkpoint at 'nowhere.npz'"),
])
def test_bad_arguments_are_one_line_usage_errors(capsys, argv, match):
    with pytest.raises(SystemExit) as exit_info:
        generate_cli.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "Traceback" not in err and match in err.strip().splitlines()[-1]


# --- every flag in every mode: used or refused; an invalid value is refused in every mode -----

MODES = {"trained": [], "random": ["--random"], "hf": ["--hf", "some-dir"]}
NAMES = {"trained": "the trained model", "random": "--random", "hf": "--hf"}
# flag, a valid value (None for a switch), the modes that use it: written out here from the
# --help text, independently of the command's own table
FLAGS = [
    ("--prompt", "ab", {"trained", "hf"}),
    ("--checkpoint", "c.npz", {"trained"}),
    ("--new-tokens", "3", {"random", "hf"}),
    ("--prompt-len", "3", {"random"}),
    ("--batch", "3", {"random"}),
    ("--prompt-lens", "2,3", {"random"}),
    ("--layers", "1", {"random"}),
    ("--seed", "3", {"random"}),
    ("--dtype", "float64", {"random"}),
    ("--temperature", "0.5", {"random"}),
    ("--eos-id", "3", {"random"}),
    ("--prefill-chunk", "2", {"trained", "random", "hf"}),
]


def stub_the_runs(monkeypatch: pytest.MonkeyPatch, seen: Callable) -> None:
    """Every model's run replaced by `seen(args)`: generate.py's trained and random runs (which
    tools/generate_cli.py calls through the generate module: the trained one as load_trained,
    then show_trained) and the command's own --hf run."""
    monkeypatch.setattr(generate, "trained", lambda args, *a: (seen(args) or 0, None, []))
    monkeypatch.setattr(generate, "load_trained", lambda args, *a: (None, [], []))
    monkeypatch.setattr(generate, "show_trained", lambda args, *a: seen(args) or 0)
    monkeypatch.setattr(generate, "random_weights", lambda args, *a: seen(args) or 0)
    monkeypatch.setattr(generate_cli, "hugging_face", lambda args, *a: seen(args) or 0)


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize(("flag", "value", "users"), FLAGS, ids=[f[0] for f in FLAGS])
def test_every_flag_is_used_by_its_modes_and_refused_by_the_others(capsys, monkeypatch, mode,
                                                                   flag, value, users):
    """A flag either reaches the mode's run (checked on the parsed arguments the run receives;
    the run itself is stubbed) or is a one-line usage error naming it: never silently ignored."""
    seen = {}
    stub_the_runs(monkeypatch, lambda args: seen.update(vars(args)))
    argv = [*MODES[mode], flag, value]
    if mode == "hf" and flag != "--prompt":
        argv += ["--prompt", "ab"]  # --hf needs a prompt
    if mode in users:
        assert generate_cli.main(argv) == 0
        dest = flag[2:].replace("-", "_")
        parsed = {"--prompt": ["ab"], "--prompt-lens": [2, 3], "--dtype": "float64",
                  "--checkpoint": "c.npz", "--temperature": 0.5}.get(flag, None)
        assert seen[dest] == (parsed if parsed is not None else int(value))
    else:
        with pytest.raises(SystemExit) as exit_info:
            generate_cli.main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "Traceback" not in err and not seen
        last = err.strip().splitlines()[-1]
        assert f"error: {flag} does not apply to {NAMES[mode]} (only to " in last
        assert all(NAMES[m] in last.split("(only to ")[1] for m in users)


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize(("flag", "value"), [
    ("--temperature", "nan"), ("--temperature", "inf"), ("--temperature", "1e400"),
    ("--temperature", "-0.5"), ("--top-k", "-5"), ("--top-k", "0"), ("--top-k", "2.5"),
    ("--top-p", "nan"), ("--top-p", "0"), ("--top-p", "1.5"), ("--eos-id", "-1"),
    ("--new-tokens", "0"), ("--prompt-len", "-3"), ("--batch", "nan"), ("--layers", "1e400"),
    ("--seed", "-1"), ("--prefill-chunk", "-2"), ("--prompt-lens", "2,-1"), ("--dtype", "int8"),
])
def test_an_invalid_value_is_refused_in_every_mode(capsys, monkeypatch, mode, flag, value):
    """The hostile case: `--temperature nan --top-k -5` in trained mode exited 0, greedy."""
    stub_the_runs(monkeypatch, lambda args: pytest.fail("ran"))
    with pytest.raises(SystemExit) as exit_info:
        generate_cli.main([*MODES[mode], "--prompt", "ab", f"{flag}={value}"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and f"error: argument {flag}: " in last


@pytest.mark.parametrize(("argv", "match"), [
    (["--random", "--top-k", "3"], "--top-k shapes a random draw: it needs --temperature > 0"),
    (["--random", "--top-p", "0.5", "--temperature", "0"], "--top-p shapes a random draw"),
    (["--random", "--prompt-lens", "2,3", "--batch", "2"], "--batch and --prompt-lens both"),
    (["--random", "--prompt-lens", "2,3", "--prompt-len", "2"], "--prompt-len and --prompt-lens"),
])
def test_combinations_that_would_drop_a_flag_are_refused(capsys, argv, match):
    with pytest.raises(SystemExit) as exit_info:
        generate_cli.main(argv)
    assert exit_info.value.code == 2 and match in capsys.readouterr().err


# --- defaults, ranges and flags that must reach the decoder ---------------------------------------

def without_timings(out: str) -> list[str]:
    """The output minus the lines that report wall-clock time (they differ between two runs)."""
    return [line for line in out.splitlines()
            if not line.startswith(("time ", "cached is"))]


def test_random_defaults_are_the_ones_the_help_states(capsys):
    """--help says --new-tokens 16, --prompt-len 8, --batch 2 and --layers 2 by default; the
    seed is 0 and the dtype float32 unless given. Spelled out, they give the same run."""
    code, default = run(["--random"], capsys)
    assert code == 0
    explicit_code, explicit = run(["--random", "--new-tokens", "16", "--prompt-len", "8",
                                   "--batch", "2", "--layers", "2", "--seed", "0",
                                   "--dtype", "float32"], capsys)
    assert explicit_code == 0
    assert without_timings(default) == without_timings(explicit)
    assert "prompt (B=2, P=8)" in default and "layers=2 " in default
    assert "dtype=float32" in default
    assert [int(row[1]) for row in step_lines(default)] == list(range(8, 8 + 16))


@pytest.mark.parametrize(("flag", "value", "expected"), [
    ("--new-tokens", "0", "must be in [1, 4096], got 0"),
    ("--new-tokens", "4097", "must be in [1, 4096], got 4097"),
    ("--prompt-len", "0", "must be in [1, 4096], got 0"),
    ("--prompt-len", "4097", "must be in [1, 4096], got 4097"),
    ("--batch", "1000001", "must be in [1, 1000000], got 1000001"),
    ("--layers", "1000001", "must be in [1, 1000000], got 1000001"),
    ("--seed", "4294967296", "must be in [0, 4294967295], got 4294967296"),
    ("--prefill-chunk", "0", "must be >= 1, got 0"),
    ("--prompt-lens", "3,x", "must look like 3,7,1, got '3,x'"),
    ("--prompt-lens", "", "must look like 3,7,1, got ''"),
    ("--prompt-lens", "2,0,1", "must be positive ints, got '2,0,1'"),
    ("--dtype", "float16", "invalid choice: 'float16'"),
])
def test_out_of_range_flags_are_refused_naming_the_flag_and_the_range(capsys, flag, value,
                                                                       expected):
    with pytest.raises(SystemExit) as exit_info:
        generate_cli.main(["--random", flag, value])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2
    assert f"argument {flag}: {expected}" in last


@pytest.mark.parametrize("flags", [["--new-tokens", "1"], ["--prompt-len", "1"],
                                   ["--batch", "1"], ["--layers", "1"], ["--seed", "4294967295"],
                                   ["--prefill-chunk", "1"], ["--prompt-lens", "1"],
                                   ["--dtype", "float64"]])
def test_the_ends_of_each_range_are_accepted(capsys, flags):
    code, out = run(["--random", "--new-tokens", "2", *flags], capsys)
    assert code == 0 and "tokens identical (naive vs cached): True" in out


def test_seed_and_dtype_reach_the_random_model(capsys, monkeypatch):
    """--seed seeds the random weights (another seed, other weights; the same seed, the same
    weights in either dtype) and --dtype is the model's dtype (float32 unless given)."""
    models = []
    real = generate.generate_cached

    def recorded(model, *args, **kwargs):
        models.append(model)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(generate, "generate_cached", recorded)
    for flags in (["--seed", "0"], ["--seed", "3"], ["--seed", "3", "--dtype", "float64"]):
        code, _ = run(["--random", "--new-tokens", "1", "--layers", "1", *flags], capsys)
        assert code == 0
    zero, three, three64 = models
    assert zero.dtype == three.dtype == np.float32 and three64.dtype == np.float64
    assert not np.allclose(zero.wte, three.wte)
    np.testing.assert_allclose(three.wte, three64.wte, rtol=1e-6)


@pytest.mark.parametrize("mode", [["--random"], ["--prompt", "kv cache"],
                                  ["--hf", "DIR", "--prompt", "the cat sat"]])
def test_prefill_chunk_reaches_the_cached_prefill(capsys, monkeypatch, tiny_hf_dir, mode):
    """--prefill-chunk 3 reaches the cached decoder's prefill, in every mode (chunked and one-shot
    prefill agree, so only the call can tell); without the flag the prompt goes in one piece."""
    calls = []
    real = generate.prefill

    def recorded(model, ids, cache, chunk_size=None, attention_mask=None):
        calls.append(chunk_size)
        return real(model, ids, cache, chunk_size, attention_mask)

    monkeypatch.setattr(generate, "prefill", recorded)
    argv = [str(tiny_hf_dir) if a == "DIR" else a for a in mode]
    argv += [] if "--prompt" in mode and "--hf" not in mode else ["--new-tokens", "2"]
    code, _ = run([*argv, "--prefill-chunk", "3"], capsys)
    assert code == 0 and calls == [3]
    calls.clear()
    run(argv, capsys)
    assert calls == [None]


def test_top_k_of_one_and_a_tiny_top_p_sample_the_greedy_tokens(capsys):
    """Top-k 1 (or a nucleus of 1e-9, the top token alone) leaves one token to draw at any
    temperature, so the run prints greedy's tokens; at the same temperature without them the
    draws differ from greedy (so the flags, not the temperature, made it greedy)."""
    _, greedy = run(["--random", "--new-tokens", "8", "--batch", "4"], capsys)
    hot = ["--random", "--new-tokens", "8", "--batch", "4", "--temperature", "50", "--seed", "0"]
    for extra in (["--top-k", "1"], ["--top-p", "1e-9"]):
        code, out = run([*hot, *extra], capsys)
        assert code == 0 and step_lines(out) == step_lines(greedy)
    code, out = run(hot, capsys)
    assert code == 0 and step_lines(out) != step_lines(greedy)


@pytest.mark.parametrize("batch", [6, 7])
def test_step_lines_show_at_most_six_rows_of_tokens(capsys, batch):
    """A batch of 6 prints all six tokens per step; 7 prints six and then '...'."""
    code, out = run(["--random", "--new-tokens", "2", "--batch", str(batch)], capsys)
    assert code == 0
    tokens = out.split("step  cache length")[1].split("\n\n")[0].splitlines()[1:]
    shown = r"\[(\d+, ){5}\d+" + (r", \.\.\.\]" if batch > 6 else r"\]")
    assert all(re.fullmatch(r"\s+\d+\s+\d+\s+" + shown, line) for line in tokens), tokens


def test_side_by_side_times_each_decoder_separately(monkeypatch):
    """naive_s is the time from before generate_naive to after it, cached_s from there to after
    generate_cached; a fake clock reading 1, 3, 7 makes them 2 and 4 exactly."""
    clock = iter([1.0, 3.0, 7.0])
    monkeypatch.setattr(generate.time, "perf_counter", lambda: next(clock))
    model = GPT(GPTConfig(vocab_size=16, max_seq_len=8, d_model=8, n_heads=2, n_layers=1))
    run_ = generate.side_by_side(model, [np.array([1, 2])], 2, seed=0)
    assert (run_.naive_s, run_.cached_s) == (2.0, 4.0)


def test_rows_keeps_six_lines_and_summarises_the_rest():
    lines = [f"row {i}" for i in range(9)]
    assert generate.rows(lines[:6]) == lines[:6]
    assert generate.rows(lines[:7]) == [*lines[:5], "... (2 more rows)"]
    assert generate.rows(lines) == [*lines[:5], "... (4 more rows)"]


def test_show_padded_cuts_to_the_last_columns_by_hand(capsys):
    """ids (2, 5), mask [[0 0 1 1 1], [1 1 1 1 1]], last=3: only columns 2..4 are shown, after
    '... '; pads print as the pad string, real tokens through `token`, joined by sep."""
    ids = np.array([[0, 0, 7, 8, 9], [1, 2, 3, 4, 5]])
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    generate.show_padded(ids, mask, token=lambda t: f"<{t}>", pad="_", sep="|", last=3)
    assert capsys.readouterr().out.splitlines() == ["  ... <7>|<8>|<9>   111",
                                                    "  ... <3>|<4>|<5>   111"]
    generate.show_padded(ids, mask, token=str, pad="_", last=5)
    assert capsys.readouterr().out.splitlines() == ["  __789   00111", "  12345   11111"]
    wide = np.arange(30)[None] % 10  # 30 columns: by default only the last 24 are shown
    generate.show_padded(wide, np.ones_like(wide), token=str, pad="_")
    assert capsys.readouterr().out.splitlines() == [
        "  ... " + "".join(str(i % 10) for i in range(6, 30)) + "   " + "1" * 24]


def test_agreement_needs_both_the_same_tokens_and_a_cache_growing_by_one(capsys):
    """print_agreement's verdict, on hand-made runs: same tokens and lengths 3, 4, 5 pass;
    different tokens fail; same tokens with a cache that skipped a length fail."""
    tokens, logits = np.array([[1, 2, 3]]), np.zeros((1, 3, 4))

    def side(cached_tokens, lengths):
        naive = generate.Generation(tokens, logits, None)
        return generate.SideBySide(naive, generate.Generation(cached_tokens, logits, lengths),
                                   0.2, 0.1)

    assert generate.print_agreement(side(tokens, [3, 4, 5])) is True
    assert generate.print_agreement(side(tokens + 1, [3, 4, 5])) is False
    assert generate.print_agreement(side(tokens, [3, 5, 6])) is False
    out = capsys.readouterr().out
    assert "cache grew by exactly 1 per step:   False" in out


def test_the_trained_checkpoint_reverses_the_prompts(capsys):
    """The default checkpoint (make train) reverses each prompt, ends it with '.', and a row that
    has finished repeats '.' while the longer one goes on; the run has room for the longest
    answer plus its '.' (len + 1 steps)."""
    code, out = run(["--prompt", "kv cache", "--prompt", "ab"], capsys)
    assert code == 0
    assert re.search(r"^kv cache=\s+ehcac vk\.\s+yes$", out, flags=re.M)
    assert re.search(r"^ab=\s+ba\.\s+yes$", out, flags=re.M)
    steps = step_lines(out)
    assert len(steps) == len("kv cache") + 1
    columns = ["ehcac vk.", "ba." + "." * 6]  # each row's token per step, by hand
    assert [" ".join(row[2:]) for row in steps] == [
        f"{a!r} {b!r}" for a, b in zip(*columns, strict=True)]


def test_the_trained_model_answers_every_demo_prompt(capsys):
    """With no --prompt, the demo batch is decoded and every answer is right."""
    code, out = run([], capsys)
    answers = out.split("right\n")[1].split("\n\n")[0].splitlines()
    assert code == 0 and len(answers) > 1
    assert all(line.endswith(" yes") for line in answers), answers


# --- what runs: the readable code by default, the fast path when asked ---------------------------

@pytest.mark.parametrize(("main", "argv", "readable"), [
    (lambda argv: generate.main(argv), [], True),
    (lambda argv: generate_cli.main(argv), [], True),
    (lambda argv: generate_cli.main(argv), ["--fast"], False),
], ids=["generate.py", "generate_cli", "generate_cli --fast"])
def test_the_command_runs_the_path_it_names(capsys, monkeypatch, main, argv, readable):
    """`python generate.py` runs the whiteboard code (attention.py's five lines), as its output
    says; tools/generate_cli.py --fast runs fast/model.py and never calls them."""
    import attention

    calls = []
    real = attention.scaled_dot_product_attention
    monkeypatch.setattr(attention, "scaled_dot_product_attention",
                        lambda *args: calls.append(1) or real(*args))
    assert main([*argv, "--prompt", "kv"]) == 0
    out = capsys.readouterr().out
    if readable:
        assert "path: GPT (readable: attention.py, block.py)" in out and calls
    else:
        assert "path: FastGPT (fast.model)" in out and not calls


def test_generate_py_has_no_flag_past_the_assignment(capsys):
    """The ideas past the assignment live in tools/: generate.py imports nothing above it."""
    for flag in ("--fast", "--cache-dtype", "--draft", "--hf"):
        with pytest.raises(SystemExit) as exit_info:
            generate.main([flag, "x"])
        assert exit_info.value.code == 2
        assert "unrecognized arguments" in capsys.readouterr().err
