"""The trained reversal model: the task by hand, the torch twin against the NumPy GPT, the mask
ablation's mechanism on a tiny run, the shipped checkpoint, --quick, and evaluate.py.

CI never trains a real model: the runs here are a few optimizer steps of a tiny config.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_limits

from block import GPT, GPTConfig, random_weights, weight_shapes
from generate import generate_cached, generate_naive
from parts import task
from tools import cli_types, evaluate, train
from tools.references import random_model

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = ROOT / "checkpoints" / "reverse.npz"
SHIPPED = [ROOT / p for p in train.COMMITTED]
# vocab 128 holds every byte the task uses ('z' is 122); 64 positions hold the longest
# training row (24 + 1 + 24 = 49 tokens)
TINY = GPTConfig(vocab_size=128, max_seq_len=64, d_model=16, n_heads=2, n_layers=2,
                 init_std=0.2)
LETTERS = "abcdefghijklmnopqrstuvwxyz "


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One torch thread, as train.py uses: on a busy 2-core machine torch's two spin-waiting
    threads made the tiny run below take 80 s instead of 1 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fingerprint(paths: list[Path]) -> dict[str, tuple[str, int] | None]:
    """Content hash and modification time of each file (None if absent)."""
    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            if p.exists() else None for p in paths}


# --- (d) the task, by hand -----------------------------------------------------------------------

@pytest.mark.parametrize(("prompt", "answer"), [
    ("attention=", "noitnetta."), ("a=", "a."), ("ab c=", "c ba."), ("  x=", "x  ."),
    ("racecar=", "racecar."), ("abcdefghijklmnopqrstuvwx=", "xwvutsrqponmlkjihgfedcba."),
])
def test_expected_answer_by_hand(prompt: str, answer: str) -> None:
    assert task.expected_answer(prompt) == answer


def test_encode_is_one_byte_per_character() -> None:
    ids = task.encode("az =.")
    assert ids.dtype == np.int64
    assert ids.tolist() == [97, 122, 32, 61, 46]  # ASCII: a, z, space, '=', '.'
    assert task.decode(np.array([110, 111, 46])) == "no."
    assert task.make_prompt("kv cache") == "kv cache="


@pytest.mark.parametrize(("text", "match"), [
    ("=", "empty"),
    ("a" * 25 + "=", "25 characters"),
    ("Hello=", "'H' at index 0"),
    ("ab1=", "'1' at index 2"),
    ("no-dash=", "'-' at index 2"),
    ("abc", "ends with '='"),
    ("a=b=", "'=' at index 1"),
])
def test_check_prompt_says_why_a_string_is_refused(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=re.escape(match)):
        task.check_prompt(text)


def test_random_prompts_are_seeded_valid_and_streams_differ() -> None:
    a = task.random_prompts(task.prompt_rng(7, "train"), 300)
    assert a == task.random_prompts(task.prompt_rng(7, "train"), 300)
    assert a != task.random_prompts(task.prompt_rng(7, "test"), 300)
    assert all(p.endswith("=") and set(p[:-1]) <= set(LETTERS) for p in a)
    assert {len(p) - 1 for p in a} == set(range(1, 25))  # 300 draws hit all 24 lengths
    only_24 = task.random_chars(task.prompt_rng(0, "train"), 20, np.eye(24)[23])
    assert {len(c) for c in only_24} == {24}


def test_make_batch_by_hand() -> None:
    """"ab" -> row "ab=ba." and "c" -> "c=c.", shifted by one and right-padded to 5 tokens:
    only the answer tokens (b, a, . and c, .) are targets."""
    ids, targets, real = train.make_batch(["ab", "c"])
    ign = train.IGNORE
    assert ids.tolist() == [[97, 98, 61, 98, 97], [99, 61, 99, 0, 0]]
    assert targets.tolist() == [[ign, ign, 98, 97, 46], [ign, 99, 46, ign, ign]]
    assert real.tolist() == [[True] * 5, [True, True, True, False, False]]


# --- (b) the torch twin and the NumPy GPT ---------------------------------------------------------

def test_torch_twin_has_the_numpy_names_and_gives_the_same_logits() -> None:
    """Every parameter random (biases and LayerNorms too), in float64 on both sides. The same
    algebra summed in another order agrees to ~1e-15 relative in float64, and these logits are
    O(1-10), so 1e-10 leaves a wide margin while a swapped, transposed or missing weight, a wrong
    position or a leaked pad is off by more than 1e-3."""
    config = GPTConfig(vocab_size=128, max_seq_len=64, d_model=32, n_heads=4, n_layers=2,
                       init_std=0.2)
    twin = train.TorchGPT(config, random_model(config, seed=3).named_weights())
    named = twin.export()
    assert {name: a.shape for name, a in named.items()} == weight_shapes(config)
    ours = GPT(config, dtype=np.float64, weights=named)
    ids = np.random.default_rng(0).integers(0, 128, (3, 20))
    with torch.no_grad():
        theirs = twin(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(theirs, ours(ids), rtol=0, atol=1e-10)

    # Right padding: the real tokens' logits are those of the unpadded rows.
    real = np.arange(20) < np.array([[20], [13], [1]])  # (3, 20): rows of 20, 13 and 1 tokens
    with torch.no_grad():
        padded = twin(torch.from_numpy(np.where(real, ids, 0)), torch.from_numpy(real)).numpy()
    for b, n in enumerate((20, 13, 1)):
        np.testing.assert_allclose(padded[b, :n], ours(ids[b:b + 1, :n])[0], rtol=0, atol=1e-10)

    # Without the causal mask real tokens would see the pads after them, unless pad keys are
    # hidden: padded rows must still give the unpadded rows' logits (NumPy has no unmasked model,
    # so the reference is the twin on each row alone).
    with torch.no_grad():
        padded = twin(torch.from_numpy(np.where(real, ids, 0)), torch.from_numpy(real),
                      causal=False).numpy()
        for b, n in enumerate((20, 13, 1)):
            alone = twin(torch.from_numpy(ids[b:b + 1, :n]), causal=False).numpy()[0]
            np.testing.assert_allclose(padded[b, :n], alone, rtol=0, atol=1e-10)


# --- (a) the mask ablation's mechanism, on a tiny run --------------------------------------------

@pytest.mark.parametrize("causal", [True, False])
def test_a_tiny_run_with_and_without_the_mask(causal: bool) -> None:
    """A few optimizer steps, then change token 6 of "abcd=dcba": with the mask the logits at
    positions 0-5 cannot move (token 6 is their future); without it they do."""
    s = train.Settings(steps=3, batch=4, warmup=1, eval_every=3, monitor_per_length=1,
                       causal=causal)
    model, log = train.train(TINY, s)
    start = random_weights(TINY, s.seed)
    # The optimizer stepped every weight but the key biases: q . b_k adds the same score to
    # every key of a query, which softmax ignores, so their gradient is zero (up to rounding).
    still = [name for name, w in model.export().items() if np.allclose(w, start[name])]
    assert all(name.endswith("attn.b_k") for name in still)
    assert len(still) < len(start) // 4
    assert [e["step"] for e in log["losses"]] == [3] and np.isfinite(log["final_loss"])

    ids = torch.from_numpy(task.encode("abcd=dcba"))[None]  # (1, 9)
    changed = ids.clone()
    changed[0, 6] = ord("z")
    with torch.no_grad():
        diff = (model(ids, causal=causal) - model(changed, causal=causal)).abs()[0]  # (9, V)
    past = diff[:6].max().item()
    if causal:
        assert past <= 1e-6  # float32 rounding at most: a masked key has weight exactly 0
    else:
        assert past > 1e-3
    assert diff[6:].max().item() > 1e-3  # the changed token itself is seen either way


# --- (c) the shipped checkpoint -------------------------------------------------------------------

def test_shipped_checkpoint_loads_and_reverses_fresh_prompts() -> None:
    """100 prompts drawn here (not by task.py), answers written here: a broken model, mask or
    cache would fail, and the naive decoder must pick exactly the cached decoder's tokens."""
    assert CHECKPOINT.stat().st_size <= 2 * 2**20
    with np.load(CHECKPOINT, allow_pickle=False) as f:  # a plain .npz: no pickled objects
        assert "config" in f.files and "wte" in f.files
    model = GPT.load(CHECKPOINT)
    assert model.config == GPTConfig()  # the assignment's config, defaults throughout

    rng = np.random.default_rng(20240601)
    chars = ["".join(rng.choice(list(LETTERS), size=n)) for n in rng.integers(1, 25, 100)]
    prompts = [np.frombuffer((c + "=").encode(), dtype=np.uint8).astype(np.int64) for c in chars]
    with threadpool_limits(limits=1, user_api="blas"):
        cached = generate_cached(model, prompts, 25, eos_id=ord("."))
        naive = generate_naive(model, prompts, 25, eos_id=ord("."))
    np.testing.assert_array_equal(naive.tokens, cached.tokens)
    right = 0
    for c, row in zip(chars, cached.tokens, strict=True):
        text = bytes(row.astype(np.uint8).tolist()).decode("latin-1")
        right += text[:len(c) + 1] == c[::-1] + "."
    assert right >= 95


# --- (e) --quick ---------------------------------------------------------------------------------

def test_quick_writes_where_it_is_told(tmp_path: Path) -> None:
    before = fingerprint(SHIPPED)
    out = tmp_path / "smoke.npz"
    assert train.main(["--quick", "--out", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smoke.log.json", "smoke.npz"]
    assert GPT.load(out).config == GPTConfig()
    assert fingerprint(SHIPPED) == before


def test_plot_draws_the_figure_and_table_from_two_logs(tmp_path: Path, capsys) -> None:
    before = fingerprint(SHIPPED)
    for flags, name in (([], "masked"), (["--no-causal-mask"], "unmasked")):
        assert train.main(["--quick", *flags, "--out", str(tmp_path / f"{name}.npz")]) == 0
    capsys.readouterr()
    figure = tmp_path / "ablation.png"
    assert train.main(["--plot", "--logs", str(tmp_path / "masked.log.json"),
                       str(tmp_path / "unmasked.log.json"), "--figure", str(figure)]) == 0
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert re.search(r"^\| causal mask \| [\d.e+-]+ \| 48 \|", table, flags=re.MULTILINE)
    assert re.search(r"^\| no causal mask \| [\d.e+-]+ \| 48 \|", table, flags=re.MULTILINE)
    assert fingerprint(SHIPPED) == before


def test_quick_defaults_under_out_quick(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """From another directory, the defaults land in the repository's out/quick/ (out/ is
    redirected to a scratch directory here), nothing where the command runs."""
    before = fingerprint(SHIPPED)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    monkeypatch.setattr(cli_types, "OUT_DIR", tmp_path / "out")
    assert train.main(["--quick", "--no-causal-mask"]) == 0
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["out/quick/reverse_no_mask.log.json", "out/quick/reverse_no_mask.npz"]
    assert fingerprint(SHIPPED) == before


def test_a_full_run_defaults_to_out_never_the_shipped_checkpoint(tmp_path: Path, monkeypatch,
                                                                  capsys) -> None:
    """Without --quick and --out, run from the repository root, it used to write over
    checkpoints/reverse.npz and its log; now out/reverse.npz (out/ redirected here). Two steps."""
    before = fingerprint(SHIPPED)
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(cli_types, "OUT_DIR", tmp_path)
    assert train.main(["--steps", "2", "--batch", "2", "--warmup", "1", "--eval-every", "2",
                       "--final-n", "2"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reverse.log.json", "reverse.npz"]
    assert f"wrote {tmp_path / 'reverse.npz'} " in capsys.readouterr().out
    assert fingerprint(SHIPPED) == before


def garbage_logs(tmp_path: Path) -> list[str]:
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "empty.json").write_text("{}")
    return [str(tmp_path / "bad.json"), str(tmp_path / "empty.json")]


@pytest.mark.parametrize(("argv", "match"), [
    (["--log", "no_such_dir/x.json"], "does not exist"),
    (["--out", "model.pt"], "must end in .npz"),
    (["--figure", "f.png"], "--figure applies only with --plot"),
    (["--logs", "a.json", "b.json"], "--logs applies only with --plot"),
    (["--quick", "--steps", "5"], "--steps is set by --quick"),
    (["--quick", "--final-n", "5"], "--final-n is set by --quick"),
    (["--plot", "--seed", "1"], "--seed trains; --plot only draws"),
    (["--plot", "--out", "x.npz"], "--out trains; --plot only draws"),
    (["--plot", "--no-causal-mask"], "--no-causal-mask trains"),
    (["--plot", "--figure", "f.txt"], "must end in .png"),
    (["--plot", "--logs", "BAD", "BAD"], "cannot read the loss log"),
    (["--plot", "--logs", "EMPTY", "EMPTY"], "is not a loss log written by train.py"),
    (["--plot", "--logs", "missing.json", "missing.json"], "cannot read the loss log"),
    (["--kv-latent", "1000000"], "argument --kv-latent: must be in [1, 128] (d_model)"),
    (["--kv-latent", "129"], "argument --kv-latent: must be in [1, 128] (d_model)"),
    (["--kv-latent", "0"], "argument --kv-latent: must be in [1, 128] (d_model)"),
])
def test_every_path_and_flag_is_checked_before_step_one(tmp_path, monkeypatch, capsys, argv,
                                                        match) -> None:
    """Inputs a run only reached at its end (the export, the plot) are checked first: a usage
    error, exit 2, before any training or drawing, and nothing written."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli_types, "OUT_DIR", tmp_path / "out")
    bad, empty = garbage_logs(tmp_path)
    argv = [bad if a == "BAD" else empty if a == "EMPTY" else a for a in argv]
    monkeypatch.setattr(train, "train", lambda *a, **k: pytest.fail("trained before refusing"))
    monkeypatch.setattr(train, "plot_ablation", lambda *a: pytest.fail("drew before refusing"))
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert match in err.strip().splitlines()[-1]
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["bad.json",
                                                                          "empty.json"]


def test_the_widest_latent_is_d_model(tmp_path, monkeypatch) -> None:
    """--kv-latent d_model is trained: a latent as wide as the token vector it is made from."""
    def reached(config, *args, **kwargs):  # noqa: ANN001, ANN202
        raise SystemExit(f"train reached with kv_latent={config.kv_latent}")

    monkeypatch.setattr(train, "train", reached)
    with pytest.raises(SystemExit, match="train reached with kv_latent=128"):
        train.main(["--kv-latent", "128", "--quick", "--out", str(tmp_path / "m.npz")])


def test_an_unwritable_default_output_is_refused_before_training(monkeypatch, capsys) -> None:
    monkeypatch.setattr(cli_types, "OUT_DIR", Path("/proc/no_such_dir"))
    monkeypatch.setattr(train, "train", lambda *a, **k: pytest.fail("trained before refusing"))
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--quick"])
    assert exit_info.value.code == 2
    assert "cannot write the default output" in capsys.readouterr().err


def test_a_loss_that_is_not_finite_stops_the_run_at_once(tmp_path, monkeypatch, capsys) -> None:
    """A diverged run used to train to the end, then fail exporting non-finite weights. Here the
    loss is NaN from step 1: the run stops there, exit 1, and no checkpoint is written."""
    calls = []

    def nan_loss(*args):
        calls.append(1)
        return torch.tensor(float("nan"), requires_grad=True)

    monkeypatch.setattr(train, "answer_loss", nan_loss)
    out = tmp_path / "m.npz"
    assert train.main(["--quick", "--out", str(out)]) == 1
    assert calls == [1] and not out.exists()
    assert "the loss is nan at step 1" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--out", "--log"])
def test_quick_refuses_to_write_over_a_shipped_file(flag: str, capsys) -> None:
    before = fingerprint(SHIPPED)
    target = CHECKPOINT if flag == "--out" else ROOT / "checkpoints" / "reverse.log.json"
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--quick", flag, str(target)])
    assert exit_info.value.code == 2
    assert "never writes over a shipped file" in capsys.readouterr().err
    assert fingerprint(SHIPPED) == before


# --- (f) evaluate.py -----------------------------------------------------------------------------

def test_evaluate_prints_a_row_per_length_and_the_overall(capsys) -> None:
    assert evaluate.main(["--n", "60", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    rows = [(int(L), int(n), acc) for L, n, acc in
            re.findall(r"^\s*(\d+)\s+(\d+)\s+([\d.]+%|-)$", out, flags=re.MULTILINE)]
    assert [L for L, _, _ in rows] == list(range(1, 25))  # one row per length, in order
    assert all((acc == "-") == (n == 0) for _, n, acc in rows)  # no accuracy without prompts
    assert sum(n for _, n, _ in rows) == 60
    rows = [(L, n, float(acc[:-1])) for L, n, acc in rows if n]
    right, total = map(int, re.search(r"^\s*all\s+60\s+[\d.]+%\s+\((\d+)/(\d+)\)$", out,
                                      flags=re.MULTILINE).groups())
    assert total == 60 and right >= 55
    assert right == round(sum(n * acc / 100 for _, n, acc in rows))
    assert "naive and cached tokens identical for every prompt: True" in out


def test_evaluate_exits_nonzero_when_the_decoders_disagree(monkeypatch, capsys) -> None:
    def naive_with_one_wrong_token(*args, **kwargs):
        out = generate_naive(*args, **kwargs)
        out.tokens[0, 0] = ord("#")
        return out

    monkeypatch.setattr(evaluate, "generate_naive", naive_with_one_wrong_token)
    assert evaluate.main(["--n", "10"]) == 1
    assert "identical for every prompt: False" in capsys.readouterr().out


def test_score_by_length_by_hand() -> None:
    """"ab=" answered right, "a=" wrong, "xy=" missing its "." (wrong)."""
    scores = evaluate.score_by_length(["ab=", "a=", "xy="], ["ba.", "b.", "yx"])
    assert scores[1] == (1, 0) and scores[2] == (2, 1)
    assert all(scores[L] == (0, 0) for L in range(3, 25))
    assert format_rows(evaluate.format_table(scores))[-1] == "all 3 33.3% (1/3)"


def format_rows(table: str) -> list[str]:
    return [" ".join(line.split()) for line in table.splitlines()]
