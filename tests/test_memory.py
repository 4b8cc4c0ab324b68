"""memory.py and cache.kv_cache_bytes: hand-computed sizes, allocated bytes equal to the formula,
the GQA/MQA ratios, measured peaks that must contain what they claim, and a --quick smoke run."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest

from block import GPT, GPTConfig
from cache import kv_cache_bytes
from tools import cli_types, memory


def test_gpt2_small_by_hand() -> None:
    """2 (K, V) * 12 layers * batch 1 * 12 heads * 1024 positions * 64 dims * 2 bytes (fp16):
    24 * 12 = 288; 288 * 1024 = 294,912; * 64 = 18,874,368; * 2 = 37,748,736 bytes (36 MiB)."""
    assert kv_cache_bytes(12, 1, 12, 64, 1024, np.float16) == 37_748_736
    assert kv_cache_bytes(12, 1, 12, 64, 1024, np.float16) == 36 * 2**20


def test_llama_models_by_hand() -> None:
    """Llama-2-7B: 2 * 32 layers * 32 heads * 128 dims * 2 bytes = 524,288 B = 512 KiB per token,
    so 4096 tokens take 2 GiB. Llama-3-8B keeps 8 K/V heads: 131,072 B = 128 KiB per token."""
    assert kv_cache_bytes(32, 1, 32, 128, 1, np.float16) == 524_288
    assert kv_cache_bytes(32, 1, 32, 128, 4096, np.float16) == 2 * 2**30
    assert kv_cache_bytes(32, 1, 8, 128, 1, np.float16) == 131_072


def test_assignment_config_by_hand() -> None:
    """2 * 2 layers * batch 1 * 4 heads * 2048 positions * 32 dims * 4 bytes = 4 MiB."""
    assert kv_cache_bytes(2, 1, 4, 32, 2048, np.float32) == 4_194_304


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
@pytest.mark.parametrize("context", [128, 512, 2048])
def test_allocated_nbytes_equal_the_formula(n_kv_heads: int, dtype, context: int) -> None:
    model = memory.assignment_model(n_kv_heads)
    cache = memory.allocate_cache(model, context, np.dtype(dtype))
    assert cache.nbytes == kv_cache_bytes(2, 1, n_kv_heads, 32, context, dtype)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_model_new_cache_nbytes_equal_the_formula(n_kv_heads: int) -> None:
    model = GPT(GPTConfig(max_seq_len=96, n_kv_heads=n_kv_heads, n_layers=3))
    for dtype in (np.float32, np.float16):
        cache = model.new_cache(2, dtype)
        assert cache.nbytes == kv_cache_bytes(3, 2, n_kv_heads, 32, 96, dtype)


def test_mqa_is_exactly_n_heads_times_smaller_than_mha() -> None:
    for layers, heads, d_head in ((2, 4, 32), (12, 12, 64), (32, 32, 128)):
        mha = kv_cache_bytes(layers, 1, heads, d_head, 2048, np.float16)
        mqa = kv_cache_bytes(layers, 1, 1, d_head, 2048, np.float16)
        assert mha == heads * mqa
    measured = {n_kv: memory.assignment_model(n_kv).new_cache(1).nbytes
                for n_kv in (4, 2, 1)}
    assert measured[4] == 4 * measured[1] == 2 * measured[2]


def test_measure_fills_the_cache_and_its_peaks_contain_the_cache() -> None:
    row = memory.measure(memory.assignment_model(2), "GQA", 128, np.dtype(np.float16),
                         decode_steps=3)
    assert row.formula == row.nbytes == 2 * 2 * 1 * 2 * 128 * 32 * 2
    assert row.peak_decode >= row.nbytes  # the cache is alive while decoding
    assert row.peak_fill >= row.peak_decode


def test_one_shot_prefill_holds_the_full_score_matrix_and_chunks_do_not() -> None:
    """A (1, H, T, T) float32 score matrix must exist at some point in a one-shot prefill; chunks
    of 32 only ever build (1, H, 32, <= T) ones, so their peak is lower."""
    model = GPT(GPTConfig(max_seq_len=256), seed=0)
    one_shot, a = memory.prefill_peak(model, 256, None)
    chunked, b = memory.prefill_peak(model, 256, 32)
    assert one_shot >= 1 * 4 * 256 * 256 * 4
    assert chunked < one_shot
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """--quick with no --out, run from another directory: a smoke run writes the repository's
    out/quick/ only (out/ is redirected to a scratch directory here), nothing where it runs."""
    here, out_dir = tmp_path_factory.mktemp("elsewhere"), tmp_path_factory.mktemp("out")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.MonkeyPatch.context() as mp:
        mp.chdir(here)
        mp.setattr(cli_types, "OUT_DIR", out_dir)
        assert memory.main(["--quick"]) == 0
    assert list(here.iterdir()) == []
    written = [p for p in out_dir.rglob("*") if p.is_file()]
    assert written == [out_dir / "quick/cache_memory.png"]
    return printed.getvalue(), written[0]


def test_the_full_run_defaults_to_out_not_the_committed_figure(tmp_path, monkeypatch) -> None:
    """It used to write figures/cache_memory.png, the committed figure, when run from the
    repository root. The run is stopped once its output path is chosen: only the path is tested."""
    monkeypatch.setattr(cli_types, "OUT_DIR", tmp_path)
    chosen, real = [], memory.default_output

    def record_and_stop(ap, name):
        chosen.append(real(ap, name))
        raise SystemExit(0)

    monkeypatch.setattr(memory, "default_output", record_and_stop)
    with pytest.raises(SystemExit):
        memory.main([])
    assert chosen == [tmp_path / "cache_memory.png"]


def test_quick_run_prints_the_tables(quick_run) -> None:
    text, _ = quick_run
    rows = [line.split() for line in text.splitlines()
            if line.split()[:1] in (["MHA"], ["GQA"], ["MQA"])]
    assert len(rows) == 3 * 2 * 3  # variants x cache dtypes x contexts
    for variant, n_kv, dtype, context, formula, nbytes, equal, *_ in rows:
        assert int(n_kv) == dict(memory.VARIANTS)[variant]
        expected = kv_cache_bytes(2, 1, int(n_kv), 32, int(context), dtype)
        assert int(formula.replace(",", "")) == int(nbytes.replace(",", "")) == expected
        assert equal == "yes"
    for name in ("GPT-2 small", "Llama-2-7B", "Llama-3-8B", "one shot", "chunks of 256"):
        assert name in text
    assert "16.00 GiB" in text  # Llama-2-7B at 32k: 512 KiB/token * 32768 tokens


def test_quick_run_writes_the_figure(quick_run) -> None:
    _, out = quick_run
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and 20_000 < len(data) < 300_000


@pytest.mark.parametrize("broken", ["chunked prefill", "nbytes"])
def test_the_command_fails_when_its_own_checks_fail(tmp_path, monkeypatch, capsys, broken):
    """The run prints two agreements: allocated bytes == formula, and chunked prefill == one
    shot (within 1e-4 of the largest logit). Either one broken must exit 1, not 0. The
    measurements are stubbed to be fast; only the verdict is under test."""
    def fake_measure(model, variant, context, dtype, decode_steps):
        c = model.config
        formula = kv_cache_bytes(c.n_layers, 1, c.n_kv_heads, c.d_head, context, dtype)
        wrong = broken == "nbytes" and context == 512
        return memory.Row(variant, c.n_kv_heads, dtype, context, formula,
                          formula + 4 * wrong, formula, formula)

    def fake_peak(model, T, chunk):
        logits = np.linspace(-5.0, 5.0, 256)[None]
        return 1000, logits + (0.01 if broken == "chunked prefill" and chunk else 0.0)

    monkeypatch.setattr(memory, "measure", fake_measure)
    monkeypatch.setattr(memory, "prefill_peak", fake_peak)
    assert memory.main(["--out", str(tmp_path / "m.png")]) == 1
    out, err = capsys.readouterr()
    assert ("tolerance 1e-04: FAIL" in out) == (broken == "chunked prefill")
    assert (" NO " in out) == (broken == "nbytes")
    assert ("differs from one-shot" if broken == "chunked prefill" else "differ from the formula") \
        in err
