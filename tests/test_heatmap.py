"""heatmap.py: the PNG is written, what it plots is exactly causal, and masked cells look masked."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.image import imread

import heatmap
from block import GPT, GPTConfig

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


def test_cli_writes_a_png_and_prints_the_ascii_head(tmp_path, capsys) -> None:
    out = tmp_path / "grid.png"
    assert heatmap.main(["--prompt-len", "6", "--layers", "1", "--out", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert 10_000 < len(data) < 300_000
    image = imread(out)
    assert image.ndim == 3 and image.shape[0] > 200 and image.std() > 0.05  # not a blank canvas
    printed = capsys.readouterr().out
    assert "query     5 |" in printed and "masked" in printed


def ascii_cells(text: str, n: int) -> np.ndarray:
    """The (n, n) characters of the grid: rows are 'query   i |' + two chars per cell + '|'."""
    rows = [line for line in text.splitlines() if line.startswith("query")]
    assert len(rows) == n
    return np.array([list(row.split("|")[1][::2]) for row in rows])


def test_ascii_marks_exactly_the_future_cells(maps: np.ndarray) -> None:
    cells = ascii_cells(heatmap.ascii_heatmap(maps[1, 2]), T)
    np.testing.assert_array_equal(cells == heatmap.MASKED, future())


def test_ascii_shades_by_tenths_and_a_visible_zero_is_not_masked() -> None:
    """A hand-made 3 x 3 causal matrix. The exact 0.0 at (2, 0) is a visible key whose probability
    happens to be 0: it is drawn blank, not as masked."""
    weights = np.array([[1.0, 0.0, 0.0],
                        [0.55, 0.45, 0.0],
                        [0.0, 0.95, 0.05]])
    cells = ascii_cells(heatmap.ascii_heatmap(weights), 3)
    expected = np.array([["@", "x", "x"],
                         ["+", "=", "x"],
                         [" ", "@", " "]])
    np.testing.assert_array_equal(cells, expected)


@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 3), (3,)])
def test_ascii_refuses_non_square_weights(shape) -> None:
    with pytest.raises(ValueError, match=r"weights must be \(T, T\)"):
        heatmap.ascii_heatmap(np.zeros(shape))


def test_attention_maps_refuses_a_batch() -> None:
    model = GPT(GPTConfig(n_layers=1), seed=0)
    with pytest.raises(ValueError, match="one prompt"):
        heatmap.attention_maps(model, np.zeros((2, 4), dtype=np.int64))
