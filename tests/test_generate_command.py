"""python generate.py: the trained model on text, --random on token ids, --hf on a Hugging Face
GPT-2 directory; each prints naive == cached and exits non-zero when they disagree, and every
bad argument is a one-line usage error before any work."""

from __future__ import annotations

import re

import pytest

import generate
from block import GPT, GPTConfig


def run(argv: list[str], capsys) -> tuple[int, str]:
    code = generate.main(argv)
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
    assert [int(row[1]) for row in step_lines(out)] == [5, 6, 7]


@pytest.mark.parametrize("flags", [["--temperature", "0.8", "--top-k", "5", "--seed", "3"],
                                   ["--temperature", "1.5", "--top-p", "0.9"],
                                   ["--temperature", "1e-310"],
                                   ["--prefill-chunk", "2"]])
def test_random_sampling_and_chunking_agree_naive_and_cached(capsys, flags):
    code, out = run(["--random", "--new-tokens", "6", *flags], capsys)
    assert code == 0 and "tokens identical (naive vs cached): True" in out
    if "1e-310" in flags:  # a tiny temperature is greedy, not token 0 for every row
        greedy = generate.main(["--random", "--new-tokens", "6"])
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


def test_the_command_fails_when_cached_and_naive_disagree(capsys, monkeypatch):
    real = generate.generate_cached

    def off_by_one(model, prompts, n, *args, **kwargs):
        out = real(model, prompts, n, *args, **kwargs)
        return out._replace(tokens=(out.tokens + 1) % model.config.vocab_size)

    monkeypatch.setattr(generate, "generate_cached", off_by_one)
    code, out = run(["--random", "--new-tokens", "3"], capsys)
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


@pytest.mark.parametrize(("argv", "match"), [
    (["--hf", "no-such-model-here", "--prompt", "x"], "no Hugging Face GPT-2 at"),
    (["--hf", "DIR"], "--hf needs --prompt"),
    (["--hf", "DIR", "--random", "--prompt", "x"], "pick one"),
    (["--hf", "DIR", "--prompt", "the cat", "--new-tokens", "64"], "max_seq_len=64"),
])
def test_hf_refusals_are_one_line(tiny_hf_dir, capsys, argv, match):
    argv = [str(tiny_hf_dir) if a == "DIR" else a for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        generate.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and match in err and "Traceback" not in err


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
    (["--random", "--top-k", "0"], "top_k"),
    (["--random", "--top-p", "1.5", "--temperature", "1"], "top_p"),
    (["--random", "--eos-id", "256"], "eos_id"),
    (["--random", "--prefill-chunk", "0"], "--prefill-chunk: must be"),
    (["--prompt", "Hello"], "'H' at index 0 is not in the alphabet"),
    (["--prompt", "a" * 25], "more than MAX_CHARS=24"),
    (["--prompt", ""], "empty"),
    (["--checkpoint", "nowhere.npz"], "no checkpoint at 'nowhere.npz'"),
])
def test_bad_arguments_are_one_line_usage_errors(capsys, argv, match):
    with pytest.raises(SystemExit) as exit_info:
        generate.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "Traceback" not in err and match in err.strip().splitlines()[-1]
