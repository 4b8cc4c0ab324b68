"""heatmap.py: the PNG is written, what it plots is exactly causal, and masked cells look masked."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.image import imread

from block import GPT, GPTConfig
from tools import cli_types, heatmap

T = 7


@pytest.fixture(scope="module")
def maps() -> np.ndarray:
    model = GPT(GPTConfig(n_layers=2, init_std=0.1), seed=0)
    return heatmap.attention_maps(model, np.arange(10, 10 + T))  # (L, H, T, T)


def future() -> np.ndarray:
    """The cells a causal model must never attend to, built independently: j > i."""
    return np.triu(np.ones((T, T), dtype=bool), k=1)


def test_attention_maps_are_causal_probabilities(maps: np.ndarray) -> None:
    assert maps.shape == (2, 4, T, T)
    assert np.all(maps[..., future()] == 0.0)  # exactly zero, not merely small
    np.testing.assert_allclose(maps.sum(axis=-1), 1.0, rtol=0, atol=1e-6)
    assert maps[..., ~future()].min() > 0.0  # at init_std 0.1 no visible key underflows


def test_plotted_panels_are_the_maps_and_exactly_lower_triangular(maps: np.ndarray) -> None:
    fig = heatmap.heatmap_figure(maps, "test")
    images = [im for ax in fig.axes for im in ax.get_images()]
    assert len(images) == 2 * 4
    for (layer, head), image in zip(np.ndindex(2, 4), images, strict=True):
        plotted = image.get_array()  # the masked (T, T) array handed to imshow
        np.testing.assert_array_equal(np.ma.getmaskarray(plotted), future())
        assert np.all(plotted.data[future()] == 0.0)
        np.testing.assert_array_equal(plotted.data, maps[layer, head])  # row-major panel order
        np.testing.assert_allclose(plotted.data.sum(axis=-1), 1.0, rtol=0, atol=1e-6)


def pixel(canvas: FigureCanvasAgg, ax, i: int, j: int) -> np.ndarray:
    """RGB (0..1) at the centre of cell (row i, column j) of a rendered panel."""
    x, y = ax.transData.transform((j, i))
    rgba = np.asarray(canvas.buffer_rgba())
    return rgba[int(round(rgba.shape[0] - y)), int(round(x)), :3] / 255.0


def test_masked_cells_render_grey_not_as_a_small_probability(maps: np.ndarray) -> None:
    """Render the figure: a future cell is grey (r = g = b), far from the colour the colour map
    gives probability 0; a visible cell is drawn in the colour map's colour of its probability."""
    fig = heatmap.heatmap_figure(maps, "test")
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    ax = fig.axes[0]
    zero_colour = np.array(matplotlib.colormaps["viridis"](0.0)[:3])
    masked = pixel(canvas, ax, 0, T - 1)
    assert np.ptp(masked) < 0.05  # grey
    assert np.abs(masked - zero_colour).max() > 0.3
    i, j = 5, 2
    expected = np.array(matplotlib.colormaps["viridis"](float(maps[0, 0, i, j]))[:3])
    np.testing.assert_allclose(pixel(canvas, ax, i, j), expected, atol=0.02)


def test_random_cli_writes_a_png_and_prints_the_ascii_head(tmp_path, capsys) -> None:
    out = tmp_path / "grid.png"
    assert heatmap.main(["--random", "--prompt-len", "6", "--layers", "1", "--out",
                         str(out)]) == 0
    assert sorted(tmp_path.iterdir()) == [out]  # exactly the path asked for
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert 10_000 < len(data) < 300_000
    image = imread(out)
    assert image.ndim == 3 and image.shape[0] > 200 and image.std() > 0.05  # not a blank canvas
    printed = capsys.readouterr().out
    assert "query  5 5 |" in printed and "masked" in printed


def test_ascii_labels_name_the_rows_and_columns() -> None:
    text = heatmap.ascii_heatmap(np.eye(3), labels=["a", "b", "="])
    assert text.splitlines()[0] == "        key a b ="
    assert text.splitlines()[3].startswith("query  2 = |")


@pytest.mark.parametrize(("argv", "match"), [
    (["--random", "--out", "."], "must end in .png"),
    (["--random", "--out", ""], "must end in .png"),
    (["--random", "--out", "noext"], "must end in .png"),
    (["--random", "--out", "x.txt"], "must end in .png"),
    (["--random", "--out", "/proc/x.png"], "not writable"),
    (["--random", "--out", "adir.png"], "is a directory"),
    (["--random", "--layers", "0"], "--layers: must be in [1, 12]"),
    (["--random", "--seed", "-1"], "--seed: must be in"),
    (["--random", "--prompt-len", "200"], "--prompt-len: must be in [1, 128]"),
    (["--random", "--ascii-layer", "2"], "--ascii-layer/--ascii-head must be < (2, 4)"),
    (["--prompt", "Attention"], "'A' at index 0 is not in the alphabet"),
    (["--checkpoint", "nowhere.npz"], "no checkpoint at 'nowhere.npz'"),
])
def test_bad_arguments_are_one_line_usage_errors(tmp_path, monkeypatch, capsys, argv,
                                                 match) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adir.png").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        heatmap.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert match in err.strip().splitlines()[-1]
    assert [p.name for p in tmp_path.iterdir()] == ["adir.png"]  # nothing written


def test_mirror_and_previous_token_weights_by_hand() -> None:
    """"ab=ba.": n = 2. Query 2 ("=", writes b = c_1) must read key 2 and query 3 ("b", writes
    a = c_0) key 1, where a previous-token head has put c_1 and c_0. A head doing exactly that
    scores 1, one that looks at itself scores 1/2 (query 2 looks at key 2 either way)."""
    T = 6
    mirror, itself, previous = np.zeros((T, T)), np.eye(T), np.eye(T, k=-1)
    previous[0, 0] = 1.0
    mirror[2, 2] = mirror[3, 1] = 1.0
    maps = np.stack([mirror, itself, previous])[None]  # (1, 3, T, T)
    np.testing.assert_array_equal(heatmap.mirror_weights(maps, 2), [[1.0, 0.5, 0.0]])
    np.testing.assert_array_equal(heatmap.previous_token_weights(maps)[0, 2], 1.0)


def test_the_trained_model_has_a_mirroring_head_on_100_prompts() -> None:
    """The shipped checkpoint, on 100 fresh prompts: layer 0 has a previous-token head and a
    layer-1 head puts most of its weight, at every answer position, on the key holding the
    character to copy (the README names these heads)."""
    from parts import task

    model = GPT.load(heatmap.CHECKPOINT)
    rng = task.prompt_rng(7, "test")
    mirror, previous = np.zeros((2, 4)), np.zeros((2, 4))
    for chars in task.random_chars(rng, 100):
        maps, _ = heatmap.trained_maps(model, chars)
        mirror += heatmap.mirror_weights(maps, len(chars)) / 100
        previous += heatmap.previous_token_weights(maps) / 100
    assert previous[0].max() > 0.5 and mirror[1].max() > 0.5
    assert (int(np.argmax(previous[0])), int(np.argmax(mirror[1]))) == heatmap.KNOWN_HEADS


@pytest.mark.parametrize("random", [True, False], ids=["random", "trained"])
def test_the_default_output_is_under_out_whatever_the_directory(tmp_path, monkeypatch, capsys,
                                                                random) -> None:
    """Run from a directory without figures/: it used to do all the work, then fail writing
    figures/heatmap_*.png there (and, from the repository root, write over the committed figure).
    The default is out/ in the repository, made before any work (out/ is redirected here)."""
    assert cli_types.OUT_DIR == cli_types.REPO / "out"
    here, out_dir = tmp_path / "elsewhere", tmp_path / "repo_out"
    here.mkdir()
    monkeypatch.chdir(here)
    monkeypatch.setattr(cli_types, "OUT_DIR", out_dir)
    argv = ["--random", "--prompt-len", "4", "--layers", "1"] if random else ["--prompt", "ab"]
    assert heatmap.main(argv) == 0
    name = f"heatmap_{'random' if random else 'trained'}.png"
    assert [p.name for p in out_dir.iterdir()] == [name] and list(here.iterdir()) == []
    assert f"wrote {out_dir / name} " in capsys.readouterr().out


def test_an_unwritable_default_output_is_refused_before_any_work(monkeypatch, capsys) -> None:
    monkeypatch.setattr(cli_types, "OUT_DIR", Path("/proc/no_such_dir"))
    monkeypatch.setattr(heatmap, "attention_maps", lambda *a: pytest.fail("worked first"))
    with pytest.raises(SystemExit) as exit_info:
        heatmap.main(["--random"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "cannot write the default output" in err


@pytest.mark.parametrize(("argv", "match"), [
    (["--random", "--prompt", "ab"], "--prompt does not apply to --random"),
    (["--random", "--checkpoint", "x.npz"], "--checkpoint does not apply to --random"),
    (["--seed", "3"], "--seed applies only to --random"),
    (["--layers", "1"], "--layers applies only to --random"),
    (["--prompt-len", "5"], "--prompt-len applies only to --random"),
    (["--init-std", "0.5"], "--init-std applies only to --random"),
    (["--rope"], "--rope applies only to --random"),
])
def test_a_flag_the_mode_does_not_use_is_refused(monkeypatch, capsys, argv, match) -> None:
    """These were silently ignored: --seed 3 on the trained model drew the same picture as 0."""
    monkeypatch.setattr(heatmap, "attention_maps", lambda *a: pytest.fail("worked first"))
    with pytest.raises(SystemExit) as exit_info:
        heatmap.main(argv)
    assert exit_info.value.code == 2 and match in capsys.readouterr().err


def test_a_checkpoint_too_small_for_the_prompt_is_refused_before_decoding(tmp_path, capsys
                                                                          ) -> None:
    """A checkpoint with 16 positions cannot hold "abcdefghij=" and its 11-token answer."""
    path = GPT(GPTConfig(max_seq_len=16)).save(tmp_path / "short.npz")
    with pytest.raises(SystemExit) as exit_info:
        heatmap.main(["--checkpoint", str(path), "--prompt", "abcdefghij", "--out",
                      str(tmp_path / "h.png")])
    assert exit_info.value.code == 2 and "max_seq_len=16" in capsys.readouterr().err
    assert not (tmp_path / "h.png").exists()


def stops_at_once(tmp_path: Path) -> Path:
    """A checkpoint whose every answer is END at once: wte[END] is long and the final LayerNorm
    writes it into every position (gamma 0, beta = wte[END]), so its logit wins everywhere."""
    from block import random_weights
    from parts import task

    config = GPTConfig()
    weights = random_weights(config, seed=0)
    end = ord(task.END)
    weights["wte"][end] *= 10
    weights["ln_f.gamma"][:] = 0.0
    weights["ln_f.beta"][:] = weights["wte"][end]
    return GPT(config, weights=weights).save(tmp_path / "stops.npz")


def test_an_answer_shorter_than_the_prompt_is_pictured_not_an_index_error(tmp_path, capsys
                                                                          ) -> None:
    """The sequence is the prompt and the model's own answer; mirror_weights read answer
    positions that a short answer does not have. Only the ones it has are read, and the output
    says the answer was short."""
    path = stops_at_once(tmp_path)
    out = tmp_path / "h.png"
    assert heatmap.main(["--checkpoint", str(path), "--prompt", "attention", "--out",
                         str(out)]) == 0
    printed = capsys.readouterr().out
    assert "sequence: 'attention=.'" in printed and out.is_file()
    assert "answer of 1 token" in printed


def test_mirror_weights_reads_only_the_answer_positions_there_are() -> None:
    """Prompt of 3 characters and "=": the full answer would put queries at 3, 4, 5; with an
    answer of one token the sequence has 5 positions and only queries 3 and 4 exist: keys 3, 2."""
    maps = np.zeros((1, 1, 5, 5))
    maps[0, 0, 3, 3] = maps[0, 0, 4, 2] = 1.0
    np.testing.assert_allclose(heatmap.mirror_weights(maps, 3), [[1.0]])
