"""tools/bench.py and its sections (bench_decode, bench_hf, bench_profile): the --quick run writes
every field it promises, its correctness guards pass, and its numbers are finite; the batched
section and the profile breakdown are there and the breakdown's parts add up to the measured total;
the tricks section times every switch of fast/model.py's TRICKS, each switch really changes the fast
path's code and none changes a result; the concatenating cache it compares against really is a KV
cache; the query blocks its prefill relies on change no result; the timing harness
(tools/measure.py) rotates, prepares untimed and keeps the collector out.
No timing assertions: the machine may be busy."""

from __future__ import annotations

import contextlib
import gc
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attention import causal_mask
from block import GPT, GPTConfig
from cache import KVCache
from fast import model as fastpath
from fast.model import FastGPT
from generate import decode, greedy, prefill
from tools import bench, bench_decode, bench_hf, bench_profile, measure


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One --quick run shared by the tests below (82 s with --threads 1 on a 2-core Intel Xeon
    shared with other jobs), from an empty directory with no output paths given: a smoke run
    writes under out/quick/ only."""
    tmp = tmp_path_factory.mktemp("bench")
    printed, progress = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed), \
            contextlib.redirect_stderr(progress):
        mp.chdir(tmp)
        mp.setattr(bench, "OUT_ROOT", tmp / "out")
        code = bench.main(["--quick", "--threads", "1"])
    QUICK_PROGRESS.append(progress.getvalue())
    return code, json.loads((tmp / "out/quick/bench.json").read_text()), tmp, printed.getvalue()


QUICK_PROGRESS: list[str] = []  # what the shared --quick run wrote to stderr


def test_quick_run_says_where_it_is_on_stderr_and_not_on_stdout(quick):
    """A line per section as it starts (and per part of the long ones), on stderr: the run takes
    minutes, and its stdout (the report) is what it was."""
    _, _, _, text = quick
    lines = [line.split("] ", 1)[1] for line in QUICK_PROGRESS[0].splitlines()
             if line.startswith("tools/bench.py [")]
    stages = [line for line in lines if not line.startswith("  ")]
    assert stages == [f"{i}/10 {title}" for i, title in enumerate(
        [*bench.SECTION_TITLES.values(), "the figures"], start=1)]
    assert "  GPT-2-small shapes: decode per token" in lines and "  batch 4" in lines
    assert "tools/bench.py [" not in text


def test_quick_run_writes_only_under_out_quick(quick):
    _, r, tmp, _ = quick
    written = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    assert written == ["out/quick/bench.json", "out/quick/bench_batch.png",
                       "out/quick/bench_cache_append.png", "out/quick/bench_decode_latency.png",
                       "out/quick/bench_profile.png", "out/quick/bench_vs_hf.png"]


def test_quick_run_passes_its_correctness_guards(quick):
    code, r, _, text = quick
    failed = [k for k, ok in r["correctness"].items() if not ok]
    assert failed == []
    assert code == 0
    # naive == cached (4), ours == HF (4 per config), and per batch size ours == HF (2 each).
    assert len(r["correctness"]) == 4 + 4 * 2 + 2 * len(r["settings"]["batch_sizes"]) + 1
    assert {f"batch_{B}_decode_tokens_ours_vs_hf" for B in r["settings"]["batch_sizes"]} <= set(
        r["correctness"])
    assert "Correctness guard: PASS" in text


def test_json_has_every_promised_field(quick):
    _, r, _, _ = quick
    assert {"header", "settings", "latency_vs_position", "total_time", "vs_hf", "cache_append",
            "cache_decode", "memory", "batched_decode", "profile", "tricks", "targets",
            "correctness", "figures"} <= set(r)
    # The header names the machine: CPU, threads, BLAS library and kernel, versions, load.
    assert {"cpu", "cpu_count", "blas_library", "blas_kernel", "blas_threads", "torch_threads",
            "numpy", "torch", "openblas_coretype", "load_average_at_start",
            "load_average_at_end", "busy_processes_at_start", "busy_processes_at_end",
            "nice", "autogroup", "cpu_shares_during_run"} <= set(
        r["header"])
    for busy in r["header"]["busy_processes_at_start"] + r["header"]["busy_processes_at_end"]:
        assert {"name", "nice", "core_share"} <= set(busy)
    shares = r["header"]["cpu_shares_during_run"]  # {} where /proc/stat does not exist
    assert not shares or sum(shares.values()) == pytest.approx(1.0)
    assert r["header"]["blas_threads"] == r["header"]["torch_threads"] == 1
    # 1. naive and cached latency at every sampled position, up to a 2048-token context.
    sweep = r["latency_vs_position"]
    assert len(sweep["positions"]) == len(sweep["naive"]) == len(sweep["cached"]) >= 2
    assert max(sweep["positions"]) >= 2047
    # 2. totals with the speed-up.
    assert all({"new_tokens", "naive", "cached", "speedup"} <= set(row) for row in r["total_time"])
    # 3 and 4. both shapes, decode and prefill against Hugging Face, and the floor.
    assert set(r["vs_hf"]) == {"assignment", "gpt2_small"}
    small = r["vs_hf"]["gpt2_small"]["shape"]
    assert (small["n_layer"], small["n_embd"], small["n_head"]) == (12, 768, 12)
    for v in r["vs_hf"].values():
        assert set(v["decode_per_token"]) == {"ours", "hf", "floor"}
        assert set(v["prefill"]) == set(v["generate"]) == {"ours", "hf"}
        assert {"decode_ours_over_hf", "decode_ours_over_floor", "prefill_ours_over_hf"} <= set(v)
    # 5. append cost at 128 and 2048 for both caches; 6. memory beside the formula.
    assert {128, 2048} <= set(r["cache_append"]["lengths"])
    assert {"preallocated", "concatenating"} <= set(r["cache_decode"])
    assert r["memory"]["seq_len"] == 2048
    # The formula, worked by hand for the assignment widths: 2 (K, V) * 2 layers * 4 heads * 2048
    # positions * 32 dims * 4 bytes = 4 MiB.
    assert r["memory"]["kv_cache_formula_bytes"] == 2 * 2 * 4 * 2048 * 32 * 4
    # 7 fixed targets, then one batched-decode target per batch size.
    assert len(r["targets"]) == 7 + len(r["settings"]["batch_sizes"])
    assert all({"target", "goal", "value", "met"} <= set(t) for t in r["targets"])


def test_the_batched_section_has_every_batch_size(quick):
    _, r, _, text = quick
    b = r["batched_decode"]
    assert [row["batch"] for row in b["rows"]] == r["settings"]["batch_sizes"]
    assert (b["shape"]["n_layer"], b["shape"]["n_embd"], b["shape"]["vocab_size"]) == (12, 768,
                                                                                       512)
    for row in b["rows"]:
        assert set(row["step"]) == {"ours", "hf", "floor"}
        assert set(row["prefill"]) == {"ours", "hf"}
        tps = row["tokens_per_s"]
        # tokens/s are B over the median step time, and the bound is B per floor pass.
        assert tps["ours"] == pytest.approx(row["batch"] * 1e3 / row["step"]["ours"]["median_ms"])
        assert tps["floor_bound"] == pytest.approx(
            row["batch"] * 1e3 / row["step"]["floor"]["median_ms"])
        assert row["ours_over_hf"] == pytest.approx(tps["ours"] / tps["hf"])
    assert "7. batched cached decode" in text


def test_the_profile_parts_add_up_to_the_measured_total(quick):
    _, r, _, text = quick
    prof = r["profile"]
    assert prof["parts"] == [*bench_profile.PARTS, bench_profile.OVERHEAD]
    c = bench_hf.GPT2_SMALL_SHAPE["n_layer"]
    for step, extra in ((prof["decode"], 0), (prof["prefill"], 1)):
        parts = step["parts_ms"]
        assert set(parts) == set(prof["parts"])
        assert sum(parts.values()) == pytest.approx(step["total_ms"], rel=1e-9)
        assert sum(step["share"].values()) == pytest.approx(1.0, rel=1e-9)
        assert step["total_ms"] == step["total"]["median_ms"]
        # only the overhead may come out negative
        assert all(parts[p] > 0 for p in bench_profile.PARTS)
        # The recorded calls are the real forward pass's: per layer QKV (one product), O, fc,
        # proj and one LM head; one attention call and one cache append per layer; 2 LayerNorms
        # and a GELU per layer plus the final LayerNorm. A prefill's last block makes K and V
        # for every position but Q for the last one only (the engine's last_position_only): one
        # more product, [W_K | W_V] and then W_Q.
        assert step["calls"] == {"matrix products": 4 * c + 1 + extra, "attention": c,
                                 "cache writes": c, "elementwise": 3 * c + 1}
        assert step["weight_bytes"] == r["batched_decode"]["floor_bytes"]
    assert "where the time goes" in text and "Python overhead" in text


def test_no_config_is_called_seed(quick):
    *_, text = quick
    assert "seed" not in text.lower()


def numbers(x, path=""):
    """Every (path, number) in a nested JSON value, bools and None excluded."""
    if isinstance(x, dict):
        for k, v in x.items():
            yield from numbers(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from numbers(v, f"{path}[{i}]")
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        yield path, x


def test_every_number_is_finite_and_every_time_positive(quick):
    _, r, _, _ = quick
    values = list(numbers(r))
    assert len(values) > 100
    assert [p for p, v in values if not math.isfinite(v)] == []
    times = [(p, v) for p, v in values if p.endswith(("median_ms", "q1_ms", "q3_ms"))
             and "Python overhead" not in p]
    assert len(times) > 30
    assert [p for p, v in times if v <= 0] == []
    assert all(t["value"] > 0 for t in r["targets"])
    assert r["memory"]["peak_bytes"] >= r["memory"]["cache_nbytes"]  # the cache itself is in it


def test_plots_are_small_pngs(quick):
    _, r, tmp, _ = quick
    assert [Path(p).name for p in r["figures"]] == [
        "bench_decode_latency.png", "bench_cache_append.png", "bench_vs_hf.png",
        "bench_batch.png", "bench_profile.png"]
    for path in r["figures"]:
        data = (tmp / path).read_bytes()  # relative to the directory the run started in
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert 1_000 < len(data) < 300_000


@settings(max_examples=15, deadline=None)
@given(chunks=st.lists(st.integers(1, 5), min_size=1, max_size=6), heads=st.integers(1, 3))
def test_concat_cache_returns_what_the_preallocated_cache_returns(chunks, heads):
    rng = np.random.default_rng(len(chunks))
    max_len = sum(chunks)
    pre, cat = KVCache(2, heads, max_len, 4), bench_decode.ConcatKVCache(2, heads, max_len, 4)
    for t in chunks:
        k = rng.standard_normal((2, heads, t, 4)).astype(np.float32)
        v = rng.standard_normal((2, heads, t, 4)).astype(np.float32)
        for (a, b) in zip(pre.append(k, v), cat.append(k, v), strict=True):
            np.testing.assert_array_equal(a, b)
        assert len(pre) == len(cat)
    with pytest.raises(ValueError, match="max_len"):
        cat.append(k[:, :, :1], v[:, :, :1])  # full: one more position is refused
    assert len(cat) == max_len  # and nothing changed


def test_concat_cache_gives_the_same_tokens_as_the_real_cache():
    model = GPT(GPTConfig(max_seq_len=32, n_layers=2, init_std=0.2), seed=3)
    prompt = np.random.default_rng(3).integers(0, 256, (1, 5))
    tokens = {}
    for name, cache in (("pre", model.new_cache(1)), ("cat", bench_decode.concat_cache(model))):
        token = greedy(prefill(model, prompt, cache))
        tokens[name] = [int(token[0])]
        for _ in range(10):
            token = greedy(decode(model, token, cache))
            tokens[name].append(int(token[0]))
    assert tokens["pre"] == tokens["cat"]


def test_floor_reads_every_weight_matrix_once():
    model = FastGPT(GPTConfig(n_layers=3))
    mats = bench_hf.weight_matrices(model)
    # By hand: per block [W_q | W_k | W_v] (one matrix, as the model multiplies by it), W_o,
    # W_fc, W_proj, then the tied LM head.
    D, F, V = 128, 512, 256
    assert sum(w.size for w in mats) == 3 * (4 * D * D + 2 * D * F) + V * D
    assert len(mats) == 3 * 4 + 1
    assert [w.shape for w in mats[:4]] == [(D, 3 * D), (D, D), (D, F), (F, D)]


def test_interleave_rotates_and_counts():
    calls = []
    times = measure.interleave({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                               rounds=3, inner={"b": 2})
    assert calls == ["a", "b", "b", "b", "b", "a", "a", "b", "b"]
    assert (len(times["a"]), len(times["b"])) == (3, 6)


def test_interleave_prepares_untimed_warms_up_and_keeps_the_collector_out():
    calls = []
    times = measure.interleave({"a": lambda: calls.append(("a", gc.isenabled()))}, rounds=2,
                               prepare={"a": lambda: calls.append("rewind")}, warmup=1)
    assert calls == ["rewind", ("a", False)] * 3  # the warm-up round runs too...
    assert len(times["a"]) == 2  # ...and is not kept
    assert gc.isenabled()
    with measure.no_gc():
        measure.interleave({"a": lambda: None}, rounds=1)
        assert not gc.isenabled()  # a nested no_gc leaves the outer one's setting alone
    assert gc.isenabled()


def test_profile_alone_writes_under_out_profile_only(tmp_path):
    """--profile never touches the committed figures/ (nor does --quick, tested above)."""
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()):
        mp.chdir(tmp_path)
        mp.setattr(bench, "OUT_ROOT", tmp_path / "out")
        mp.setattr(bench, "FULL", bench.QUICK)  # the full profile's sizes take a minute
        assert bench.main(["--profile", "--threads", "1"]) == 0
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["out/profile/bench.json", "out/profile/bench_profile.png"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_query_blocks_change_no_result(dtype, monkeypatch):
    """The engine's attention runs in query blocks that skip keys the mask hides from the whole
    block. With blocks and without (one block of every query): the same weights to rounding,
    exact zeros in the same places, for a causal mask, left padding with a query that sees
    nothing, and grouped K/V heads."""
    rng = np.random.default_rng(0)
    B, H, H_kv, t_q, t_k, d = 2, 4, 2, 300, 340, 8
    q = rng.standard_normal((B, H, t_q, d)).astype(dtype)
    k, v = rng.standard_normal((2, B, H_kv, t_k, d)).astype(dtype)
    real = np.ones((B, t_k), dtype=bool)
    real[1, :60] = False  # row 1 is left-padded: its first queries see only padding
    masks = [causal_mask(t_q, t_k)[None, None],
             causal_mask(t_q, t_k)[None, None] & real[:, None, None, :]]
    for mask in masks:
        assert len(fastpath.query_blocks(mask, t_q, t_k)) > 1  # the blocked path is tested
        blocked = fastpath.grouped_attention(q, k, v, mask)
        monkeypatch.setitem(fastpath.TRICKS, "query_blocks", False)
        whole = fastpath.grouped_attention(q, k, v, mask)
        monkeypatch.undo()
        tol = 1e-5 if dtype == np.float32 else 1e-12
        for a, b in zip(blocked, whole, strict=True):
            assert a.shape == b.shape and a.dtype == b.dtype
            np.testing.assert_allclose(a, b, rtol=0, atol=tol)
        np.testing.assert_array_equal(blocked[1] == 0, whole[1] == 0)


def test_the_floor_streams_the_matrices_the_engine_multiplies_by():
    """The engine multiplies by [W_q | W_k | W_v] as one matrix, of which w_q, w_k, w_v are
    views: the floor streams that one matrix (one per layer, plus W_O, the MLP and the head), a
    weight changed in place through w_k changes the engine's product too, and the readable
    model of the same weights multiplies by the three (so its floor lists three)."""
    fast = FastGPT(GPTConfig(n_layers=2, init_std=0.2), seed=1, dtype=np.float64)
    readable = GPT(GPTConfig(n_layers=2, init_std=0.2), seed=1, dtype=np.float64)
    ids = np.random.default_rng(1).integers(0, 256, (2, 9))
    assert len(bench_hf.weight_matrices(fast)) == 2 * 4 + 1
    assert len(bench_hf.weight_matrices(readable)) == 2 * 6 + 1
    a = fast.blocks[0].attn
    assert a.w_k.base is a.w_q.base and a.w_q.base.shape == (128, 3 * 128)
    before = fast(ids)
    a.w_k[0, 0] += 1.0
    readable.blocks[0].attn.w_k[0, 0] += 1.0
    changed = fast(ids)
    assert np.abs(changed - before).max() > 1e-6
    np.testing.assert_allclose(changed, readable(ids), rtol=0, atol=1e-12)


# --- 9. what each trick buys ---------------------------------------------------------------------

def test_the_tricks_section_times_every_switch(quick):
    _, r, _, text = quick
    t = r["tricks"]
    assert t["tricks"] == list(fastpath.TRICKS) and t["prompt_len"] == bench.QUICK.tricks_len
    expected = {"mha": ["readable", "fast", *(f"without {x}" for x in fastpath.TRICKS)],
                "gqa": ["readable", "fast", "without shared_kv_heads"]}
    for key, variants in expected.items():
        x = t[key]
        assert x["variants"] == variants
        assert all(d <= bench_profile.TRICKS_RTOL for d in x["max_rel_logit_diff"].values())
        for step in ("prefill", "decode"):
            assert list(x[step]) == variants
            fast_ms = x[step]["fast"]["median_ms"]
            for name in variants:  # each ratio is that variant's median over the fast path's
                assert x[f"{step}_over_fast"][name] == pytest.approx(
                    x[step][name]["median_ms"] / fast_ms, rel=1e-12)
        assert x["decode"]["fast"]["n"] == bench.QUICK.tricks_rounds * bench_profile.DECODE_BLOCK
    assert t["gqa"]["n_kv_heads"] == 4 and t["n_heads"] == 12
    assert "9. what each trick buys" in text
    lines = text[text.index("9. what each trick buys"):].splitlines()
    for name in expected["mha"][2:]:
        assert sum(line.lstrip().startswith(name + " ") for line in lines) == (
            2 if name == "without shared_kv_heads" else 1)


TINY_SHAPE = dict(vocab_size=64, n_positions=192, n_embd=48, n_head=6, n_layer=2)


def test_tricks_alone_writes_under_out_tricks_only(tmp_path):
    """--tricks runs section 9 alone, with the machine header (BLAS library, kernel, threads),
    and writes out/tricks/bench.json only. GPT-2-small shapes swapped for tiny ones: fast."""
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.chdir(tmp_path)
        mp.setattr(bench, "OUT_ROOT", tmp_path / "out")
        mp.setattr(bench, "FULL", bench.QUICK)
        mp.setattr(bench_profile, "GPT2_SMALL_SHAPE", TINY_SHAPE)
        assert bench.main(["--tricks", "--threads", "1"]) == 0
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["out/tricks/bench.json"]
    r = json.loads((tmp_path / written[0]).read_text())
    assert set(r) == {"header", "settings", "tricks", "figures"}
    assert r["tricks"]["gqa"]["n_kv_heads"] == 2 and r["tricks"]["n_heads"] == 6
    text = printed.getvalue()
    assert "BLAS: " in text and "kernel=" in text and "threads=1" in text
    assert "grouped-query attention, 2 K/V heads shared by the 6 query heads" in text


def test_a_broken_switch_stops_the_tricks_section(monkeypatch):
    """The section checks every variant against the readable path before timing: a switch whose
    path computes a LayerNorm 1% off is refused, by name."""
    real = fastpath.norm

    def broken(x, gamma, beta, eps):
        y = real(x, gamma, beta, eps)
        return y if fastpath.TRICKS["in_place"] else 1.01 * y

    monkeypatch.setattr(fastpath, "norm", broken)
    config = GPTConfig(vocab_size=64, max_seq_len=16, d_model=32, n_heads=2, n_layers=1,
                       init_std=0.2)
    variants = bench_profile.trick_variants(config, 0, ["fused_qkv", "in_place"])
    with pytest.raises(RuntimeError, match="'without in_place'"):
        bench_profile.trick_timings(variants, np.arange(8)[None], rounds=1)
    assert fastpath.TRICKS["in_place"]  # switched back on after the failure


class MatmulSpy(np.ndarray):
    """An array that records the ndim of the left operand of every matmul it takes part in."""

    ndims: list[int] = []

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if ufunc is np.matmul:
            MatmulSpy.ndims.append(inputs[0].ndim)
        return getattr(ufunc, method)(*(np.asarray(a) for a in inputs), **kwargs)


def spy(monkeypatch, owner, name: str, record) -> None:
    """owner.name replaced by a function that calls record(*args) and then the real one."""
    real = getattr(owner, name)

    def spied(*args):
        record(*args)
        return real(*args)

    monkeypatch.setattr(owner, name, spied)


def spy_on_products(monkeypatch, seen: list) -> None:
    real = fastpath.linear
    MatmulSpy.ndims = seen
    monkeypatch.setattr(fastpath, "linear",
                        lambda x, w, b=None: np.asarray(real(x.view(MatmulSpy), w, b)))


def spy_on_pages(monkeypatch, seen: list) -> None:
    multiarray = np._core.multiarray
    spy(monkeypatch, multiarray, "_set_madvise_hugepage", seen.append)


# Per switch: how to watch the engine, and what it must see with the switch on and off, worked
# out by hand for the run in run_engine (prefill of 300 tokens, one decode step, the full
# forward; 2 layers, d_model 128, 4 query heads, 2 K/V heads of 32, d_ff 512, vocab 100, 2 rows).
PROBES = {
    # the left operand of every weight product: (B * T, D) flattened, or (B, T, D) as it comes
    "flat_products": (spy_on_products, lambda seen: set(seen), {2}, {3}),
    # the width of every weight product: [W_Q | W_K | W_V] is 128 + 64 + 64 = 256 wide
    "fused_qkv": (lambda mp, seen: spy(mp, fastpath, "linear", lambda x, w, b=None: seen.append(
        w.shape[1])), lambda seen: 256 in seen, True, False),
    # the readable layer_norm and softmax, called only with the switch off: 3 runs of 2 layers
    # with 2 LayerNorms each and a final one; one softmax per query block (as below)
    "in_place": (lambda mp, seen: (spy(mp, fastpath, "layer_norm", lambda *a: seen.append(1)),
                                   spy(mp, fastpath, "softmax", lambda *a: seen.append(1))),
                 len, 0, 3 * (2 * 2 + 1) + ((3 + 1) + 2 + 2 * 3)),
    # query blocks: 300 queries = 128 + 128 + 44 in each layer of the full forward and in the
    # prefill's first layer (its last runs the last query alone); a decode step's one query is
    # one block
    "query_blocks": (lambda mp, seen: spy(mp, fastpath, "attend", lambda *a: seen.append(1)),
                     len, (3 + 1) + 2 + 2 * 3, 2 + 2 + 2),
    # query rows into the MLP (W_fc is 512 wide) of each layer: prefill, decode, full forward
    "last_position_only": (lambda mp, seen: spy(mp, fastpath, "linear", lambda x, w, b=None: (
        seen.append(x.shape[1]) if w.shape[1] == 512 else None)), list,
        [300, 1, 1, 1, 300, 300], [300, 300, 1, 1, 300, 300]),
    # NumPy's huge-page request is switched off (and back) for each cache buffer: 2 per layer
    "small_pages": (spy_on_pages, lambda seen: seen.count(False), 2 * 2, 0),
    # K as attention gets it: (B, H_kv, 1, t, d), broadcast over each group, or (B, H, t, d)
    "shared_kv_heads": (lambda mp, seen: spy(mp, fastpath, "attention", lambda q, k, v, m: (
        seen.append(k.shape[1:3]))), set, {(2, 1)}, {(4, 300), (4, 301)}),
    # online-softmax attention from 256 queries on (lowered from FLASH_FROM for this run): the
    # prefill's first layer and both layers of the full forward; never a decode step
    "flash": (lambda mp, seen: (mp.setattr(fastpath, "FLASH_FROM", 256), spy(
        mp, fastpath, "attention_in_tiles", lambda *a: seen.append(1))), len, 1 + 2, 0),
}


def run_engine(model_of, off: tuple[str, ...] = ()) -> np.ndarray:
    """Prefill 300 tokens of 2 rows (last logits), one decode step, and the full forward of the
    300 tokens, with `off` switched off while the model and its cache are built and run:
    logits (2, 2 + 300, V) stacked."""
    ids = np.random.default_rng(5).integers(0, 100, (2, 300))
    with bench_profile.switched_off(off):
        model = model_of()
        cache = model.new_cache(2)
        last = prefill(model, ids, cache)
        step = decode(model, ids[:, 0], cache)
        return np.concatenate([last[:, None], step[:, None], model(ids)], axis=1)


SWITCH_CONFIG = GPTConfig(vocab_size=100, max_seq_len=320, n_heads=4, n_kv_heads=2, init_std=0.2)


@pytest.fixture(scope="module")
def readable_logits():
    return run_engine(lambda: GPT(SWITCH_CONFIG, seed=2, dtype=np.float64))


@pytest.mark.parametrize("trick", list(fastpath.TRICKS))
def test_each_switch_changes_the_path_not_the_numbers(trick, readable_logits, monkeypatch):
    assert set(PROBES) == set(fastpath.TRICKS)  # a new switch needs a probe here
    watch, observe, when_on, when_off = PROBES[trick]
    engine_model = lambda: FastGPT(SWITCH_CONFIG, seed=2, dtype=np.float64)  # noqa: E731
    seen: list = []
    for off, expected in (((), when_on), ((trick,), when_off)):
        seen.clear()
        with monkeypatch.context() as mp:
            watch(mp, seen)
            logits = run_engine(engine_model, off)
        assert observe(seen) == expected, (trick, off)
        np.testing.assert_allclose(logits, readable_logits, rtol=1e-12, atol=1e-12)
