"""Every file the repository writes is written whole or not at all: a save or a command that fails
half-way (a full disk, Ctrl-C, a config the serialiser refuses) leaves the old file as it was and
no temporary file beside it.

The interruption is real: `disk_fills_up` lets every file opened for writing under the test's
directory take a few bytes and then raises ENOSPC, as a full disk would, whichever function opens
it (the writer itself, numpy's zipfile, matplotlib, Pillow). A writer that opens its destination
directly empties it first and fails the test; one that writes a temporary file and renames it
leaves the destination untouched.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import errno
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

from beyond.latent import LatentConfig, LatentGPT
from block import GPT, GPTConfig
from parts import files
from tools import bench, bench_setup, flash, heatmap, memory, train, window

ROOT = Path(__file__).resolve().parent.parent
TINY = {"vocab_size": 16, "max_seq_len": 8, "d_model": 8, "n_heads": 2, "n_layers": 1}
OLD = b"the old file, which must survive\n"


class FullDisk:
    """A file opened for writing that takes `budget` more bytes (or characters) and then fails
    as a full disk does; everything else is the real file's."""

    def __init__(self, f: io.IOBase, budget: int) -> None:
        self._f, self._budget = f, budget

    def write(self, data):  # noqa: ANN001, ANN201 (bytes or str, as the real file takes)
        if len(data) > self._budget:
            self._f.write(data[:self._budget])
            self._f.flush()
            self._budget = 0
            raise OSError(errno.ENOSPC, "No space left on device (the test's full disk)")
        self._budget -= len(data)
        return self._f.write(data)

    def __getattr__(self, name: str) -> object:
        return getattr(self._f, name)

    def __iter__(self):  # noqa: ANN204
        return iter(self._f)

    def __enter__(self) -> FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


@pytest.fixture
def disk_fills_up(tmp_path, monkeypatch):
    """Files opened for writing under tmp_path (by path, through open or io.open) get 64 bytes
    of room."""
    real_open = io.open

    def opener(file, mode="r", *args, **kwargs):  # noqa: ANN001, ANN202 (open's own signature)
        f = real_open(file, mode, *args, **kwargs)
        writing = any(m in mode for m in "wax+")
        inside = isinstance(file, (str, Path)) and Path(file).resolve().is_relative_to(
            tmp_path.resolve())
        return FullDisk(f, 64) if writing and inside else f

    monkeypatch.setattr(builtins, "open", opener)
    monkeypatch.setattr(io, "open", opener)


def old_file(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.write_bytes(OLD)
    return path


def assert_untouched(path: Path) -> None:
    """The old bytes, and nothing else in the directory (no temporary file left behind)."""
    assert path.read_bytes() == OLD
    assert [p.name for p in path.parent.iterdir()] == [path.name]


# --- checkpoints ----------------------------------------------------------------------------------

def test_a_save_cut_short_by_a_full_disk_leaves_the_old_checkpoint(tmp_path, disk_fills_up):
    path = old_file(tmp_path, "m.npz")
    with pytest.raises(OSError, match="No space left"):
        GPT(GPTConfig(**TINY)).save(path)
    assert_untouched(path)


def test_a_save_interrupted_inside_the_serialiser_leaves_the_old_checkpoint(tmp_path,
                                                                            monkeypatch):
    """np.savez writes some bytes, then Ctrl-C."""
    path = old_file(tmp_path, "m.npz")

    def interrupted(f, **arrays):  # noqa: ANN001, ANN202
        f.write(b"PK\x03\x04 half an archive")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", interrupted)
    with pytest.raises(KeyboardInterrupt):
        GPT(GPTConfig(**TINY)).save(path)
    assert_untouched(path)


def test_a_config_json_cannot_hold_is_refused_by_name_and_the_old_file_survives(tmp_path):
    """A config field changed after construction to something that is no number: refused before
    the file is opened, naming the field."""
    path = old_file(tmp_path, "m.npz")
    model = GPT(GPTConfig(**TINY))
    model.config.ln_eps = [1e-5]
    with pytest.raises(TypeError, match="ln_eps"):
        model.save(path)
    assert_untouched(path)


def test_numpy_numbers_set_on_a_config_after_construction_save_as_plain_numbers(tmp_path):
    """NumPy ints and floats slipped into a config (a dataclass: fields can be assigned) are the
    same numbers: they are written as JSON numbers and load back equal, over an existing file."""
    path = old_file(tmp_path, "m.npz")
    model = GPT(GPTConfig(**TINY), seed=3)
    model.config.n_kv_heads, model.config.d_ff = np.int64(2), np.int32(32)
    model.config.ln_eps, model.config.rope = np.float32(1e-5), np.bool_(False)
    model.save(path)
    loaded = GPT.load(path)
    assert dataclasses.asdict(loaded.config) == dataclasses.asdict(model.config)
    np.testing.assert_array_equal(loaded.wte, model.wte)


NUMPY_FIELDS = {"vocab_size": np.int64(16), "max_seq_len": np.int32(8), "d_model": np.uint16(8),
                "n_heads": np.int64(2), "n_layers": np.int8(1), "n_kv_heads": np.int64(1),
                "rope": np.bool_(True), "rope_base": np.float32(500.0), "d_ff": np.int64(24),
                "ln_eps": np.float16(1e-3), "init_std": np.float32(0.5),
                "sliding_window": np.int64(4), "attention_sinks": np.int64(1)}


@pytest.mark.parametrize("config_class", [GPTConfig, LatentConfig])
def test_every_config_field_given_as_a_numpy_number_is_kept_as_a_python_one(config_class):
    given = dict(NUMPY_FIELDS)
    if config_class is LatentConfig:  # no RoPE, no window, no grouped heads: see beyond/latent
        given |= {"rope": np.bool_(False), "sliding_window": None, "attention_sinks": 0,
                  "n_kv_heads": None, "kv_latent": np.int64(4)}
    config = config_class(**given)
    kinds = {name: type(value) for name, value in dataclasses.asdict(config).items()}
    assert all(kind in (int, float, bool, type(None)) for kind in kinds.values()), kinds
    assert config.rope is bool(given["rope"])
    json.dumps(dataclasses.asdict(config))  # what a checkpoint holds


def test_a_latent_model_saves_over_its_old_file_and_loads_back(tmp_path):
    path = old_file(tmp_path, "mla.npz")
    model = LatentGPT(LatentConfig(**TINY, kv_latent=np.int64(4)), seed=2)
    model.save(path)
    assert LatentGPT.load(path).config == model.config


# --- every writer of the commands ----------------------------------------------------------------

def tiny_maps() -> np.ndarray:
    return np.tril(np.ones((1, 1, 3, 3))) / np.arange(1, 4)[:, None]  # (L, H, T, T)


def a_log() -> dict:
    return {"losses": [{"step": 1, "loss": 1.0}], "final_loss": 1.0,
            "evals": [{"step": 1, "generation_exact_match": 0.5,
                       "teacher_forced_exact_match": 0.5}]}


def memory_rows() -> list:
    return [memory.Row(v, n_kv, dtype, ctx, 10 * ctx, 10 * ctx, 20 * ctx, 15 * ctx)
            for v, n_kv in memory.VARIANTS for dtype in memory.CACHE_DTYPES
            for ctx in memory.CONTEXTS]


def pyplot_figure() -> object:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    return fig


WRITERS = {  # name: (file name, the write)
    "checkpoint (GPT.save)": ("m.npz", lambda p: GPT(GPTConfig(**TINY)).save(p)),
    "train.py's loss log": ("r.log.json", lambda p: train.write_log(a_log(), p)),
    "bench.py's results": ("bench.json", lambda p: bench.write_results(
        {"x": np.float32(1.5), "rows": list(range(100))}, p)),
    "heatmap figure": ("h.png", lambda p: heatmap.plot_heatmaps(tiny_maps(), p)),
    "memory figure": ("c.png", lambda p: memory.plot_memory(memory_rows(), p)),
    "window figure": ("w.png", lambda p: window.plot_accuracy(
        {"full": {3: (2, 1), 4: (2, 2)}}, p)),
    "flash figure": ("f.png", lambda p: flash.draw(
        flash.trace_row(flash.SHOW_SCORES, np.ones((16, 3)), 4), flash.SHOW_SCORES, p)),
    "ablation figure": ("a.png", lambda p: train.plot_ablation(a_log(), a_log(), p)),
    "bench figure": ("b.png", lambda p: bench_setup.save(pyplot_figure(), p)),
}


@pytest.mark.parametrize("writer", WRITERS)
def test_a_write_cut_short_leaves_the_old_file_whole(tmp_path, disk_fills_up, writer):
    name, write = WRITERS[writer]
    path = old_file(tmp_path, name)
    with pytest.raises(OSError, match="No space left"):
        write(path)
    assert_untouched(path)


@pytest.mark.parametrize("writer", ["checkpoint (GPT.save)", "train.py's loss log",
                                    "bench.py's results", "heatmap figure", "bench figure"])
def test_a_write_that_succeeds_replaces_the_old_file(tmp_path, writer):
    """The writers of each kind (checkpoint, JSON, a Figure, a pyplot figure) with room on the
    disk: the new file is in place, with the permissions the old one had, and nothing else
    beside it."""
    name, write = WRITERS[writer]
    path = old_file(tmp_path, name)
    path.chmod(0o640)
    write(path)
    assert path.read_bytes() != OLD and path.stat().st_size > 0
    assert path.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_a_json_value_the_encoder_refuses_half_way_leaves_the_old_file(tmp_path):
    """json.dump streams: a value it cannot encode comes after part of the file is written."""
    path = old_file(tmp_path, "log.json")
    with pytest.raises(TypeError):
        files.write_json(path, {"fine": list(range(1000)), "bad": object()})
    assert_untouched(path)


def test_a_new_file_gets_the_permissions_open_would_give_it(tmp_path):
    import os

    umask = os.umask(0o027)
    try:
        path = files.write_text(tmp_path / "new.txt", "hello")
    finally:
        os.umask(umask)
    assert path.read_text() == "hello" and path.stat().st_mode & 0o777 == 0o640


def test_a_symlink_is_written_through(tmp_path):
    target = old_file(tmp_path, "target.json")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    files.write_json(link, [1, 2])
    assert link.is_symlink() and json.loads(target.read_text()) == [1, 2]


# --- no writer outside parts/files.py ------------------------------------------------------------

WRITES = re.compile(r"\.savefig\(|\.write_text\(|\.write_bytes\(|np\.savez?\w*\(|torch\.save\("
                    r"|json\.dump\(|\bopen\([^)]*[\"'][rwxab+]*[wxa][rwxab+]*[\"']")


def inside_replacing(source: str) -> set[int]:
    """The lines of every `with replacing(...)` block: what is written there goes to the
    temporary file."""
    lines = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.With) and any(
                isinstance(item.context_expr, ast.Call) and ast.unparse(
                    item.context_expr.func).rpartition(".")[2] == "replacing"
                for item in node.items):
            lines.update(range(node.lineno, node.end_lineno + 1))
    return lines


def test_every_file_is_written_through_parts_files():
    """A new writer that opens its destination directly is caught here: route it through
    parts/files.py (replacing, write_text, write_json, save_figure)."""
    direct = []
    for path in ROOT.rglob("*.py"):
        if {"tests", ".venv", "out"} & set(path.relative_to(ROOT).parts) or path == (
                ROOT / "parts" / "files.py"):
            continue
        source = path.read_text()
        fine = inside_replacing(source)
        direct += [f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
                   for n, line in enumerate(source.splitlines(), 1)
                   if WRITES.search(line) and not line.lstrip().startswith("#") and n not in fine]
    assert direct == []
