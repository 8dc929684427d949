"""The report: JSON and Markdown content, and figures whose pixels carry the data they claim to."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from matplotlib.image import imread

from slm_dist import report
from slm_dist.checkpoint.writer import write_json
from slm_dist.cli import EXIT_BAD_INPUT, EXIT_OK, main
from slm_dist.core.planner import MergePlan

# A 6-layer model whose outputs form two "patches" of near-identical layers: 1..2 and 3..4.
CKA = [
    [1.00, 0.91, 0.85, 0.80, 0.70, 0.62, 0.50],
    [0.91, 1.00, 0.97, 0.95, 0.78, 0.70, 0.58],
    [0.85, 0.97, 1.00, 0.98, 0.83, 0.74, 0.61],
    [0.80, 0.95, 0.98, 1.00, 0.96, 0.93, 0.66],
    [0.70, 0.78, 0.83, 0.96, 1.00, 0.97, 0.72],
    [0.62, 0.70, 0.74, 0.93, 0.97, 1.00, 0.80],
    [0.50, 0.58, 0.61, 0.66, 0.72, 0.80, 1.00],
]
BLOCK_INFLUENCE = [0.30, 0.04, 0.02, 0.05, 0.03, 0.20]
ANGULAR = [0.40, 0.09, 0.06, 0.10, 0.08, 0.30]
WINDOWS = ((1, 2), (3, 4))


@pytest.fixture()
def run_dir(tmp_path) -> Path:
    """The artifacts the stages write, with known values."""
    run = tmp_path / "run"
    run.mkdir()
    write_json(run / "similarity.json", {
        "labels": ["embed", *range(6)], "cka": CKA, "kernel": "linear", "unit": "token", "skip_first_token": True,
        "estimator": "minibatch unbiased HSIC", "num_batches": 4, "block_influence": BLOCK_INFLUENCE,
        "angular_distance": ANGULAR})
    plan = MergePlan(num_layers_before=6, windows=WINDOWS, rule="reference", criterion="cka", threshold=0.9)
    write_json(run / "plan.json", {**plan.to_json(), "details": {"target_layers_removed": 2}})
    write_json(run / "eval.json", {"perplexity_before": 10.0, "perplexity_after": 12.5,
                                   "perplexity_text": "/x/wiki.txt", "tasks": {"piqa": {"acc": 0.61}}})
    write_json(run / "state.json", {
        "format": 1, "run_key": "ab" * 32,
        "inputs": {"model_dir": "/models/src", "output_dir": str(run / "model")},
        "stages": {"calibrate": {"seconds": 3.5}, "plan": {"seconds": 0.25},
                   "merge": {"seconds": 1.0, "info": {"params_before": 6000, "params_after": 4500}},
                   "eval": {"seconds": 2.0}}})
    return run


def test_report_json_and_markdown(run_dir):
    r = report.write_report(run_dir)
    on_disk = json.loads((run_dir / "report.json").read_text())
    assert on_disk == r
    assert (r["layers_before"], r["layers_after"], r["params_before"], r["params_after"]) == (6, 4, 6000, 4500)
    assert (r["perplexity_before"], r["perplexity_after"]) == (10.0, 12.5)
    assert r["windows"] == [[1, 2], [3, 4]] and r["plan"]["index_map"] == [0, 1, 1, 2, 2, 3]
    assert r["seconds"] == {"calibrate": 3.5, "plan": 0.25, "merge": 1.0, "eval": 2.0}
    assert r["run_key"] == "ab" * 32 and r["eval"]["tasks"] == r["tasks"] == {"piqa": {"acc": 0.61}}
    md = (run_dir / "report.md").read_text()
    assert "| layers | 6 | 4 | -33.3% |" in md
    assert "| parameters | 6,000 | 4,500 | -25.0% |" in md
    assert "| perplexity (wiki.txt) | 10.00 | 12.50 | +25.0% |" in md
    assert "| [1..2] | 2 | 1 |" in md and "| [3..4] | 2 | 2 |" in md
    assert "| total | 6.8 |" in md and '"piqa"' in md
    assert "![CKA between layer outputs, merged windows outlined](similarity.png)" in md


@pytest.fixture()
def drawn(run_dir, monkeypatch) -> dict:
    """write_report on the run folder; the Figure objects it saved, by file name, and the PNGs it wrote."""
    figures = {}
    save = report.save_figure

    def recording(fig, path):
        figures[Path(path).name] = fig
        save(fig, path)

    monkeypatch.setattr(report, "save_figure", recording)
    report.write_report(run_dir)
    assert sorted(figures) == sorted([report.HEATMAP_NAME, report.INFLUENCE_NAME])
    return {name: (fig, imread(run_dir / name)) for name, fig in figures.items()}


def _pixel(png: np.ndarray, ax, x: float, y: float) -> np.ndarray:
    """The PNG's RGB at data point (x, y) of ``ax``, through the saved figure's own data->pixel transform."""
    px, py = ax.transData.transform((x, y))
    return png[int(png.shape[0] - py), int(px), :3]


def test_heatmap_pixels_equal_similarity_json(drawn):
    fig, png = drawn[report.HEATMAP_NAME]
    assert png.shape[:2] == (720, 840)  # 7 x 6 inches at 120 dpi
    ax = fig.axes[0]
    (image,) = ax.images
    # What write_report handed to matplotlib: the matrix of similarity.json, its colour range, its labels.
    np.testing.assert_array_equal(np.asarray(image.get_array()), np.array(CKA))
    vmin, vmax = image.get_clim()
    assert (vmin, vmax) == (0.5, 1.0) and image.get_cmap().name == report.HEATMAP_CMAP
    labels = ["embed", *map(str, range(6))]
    assert [t.get_text() for t in ax.get_xticklabels()] == labels == [t.get_text() for t in ax.get_yticklabels()]
    assert ax.get_title() == "Linear CKA between layer outputs; red: merged windows"
    assert fig.axes[1].get_ylabel() == "CKA"  # the colorbar
    # What the PNG shows: invert the colormap at each cell's centre (nearest of its 256 colours).
    n = len(CKA)
    colors = np.array([[_pixel(png, ax, j, i) for j in range(n)] for i in range(n)])
    lut = matplotlib.colormaps[report.HEATMAP_CMAP](np.linspace(0, 1, 256))[:, :3]
    nearest = np.argmin(((colors[:, :, None, :] - lut[None, None]) ** 2).sum(-1), axis=-1)
    decoded = vmin + (nearest + 0.5) / 256 * (vmax - vmin)
    # within two of the colormap's 256 steps (8-bit colours make neighbouring entries nearly alike)
    np.testing.assert_allclose(decoded, np.array(CKA), atol=2 * (vmax - vmin) / 256)


def test_heatmap_outlines_exactly_the_merged_windows(drawn):
    fig, png = drawn[report.HEATMAP_NAME]
    ax = fig.axes[0]
    red = [p for p in ax.patches if matplotlib.colors.same_color(p.get_edgecolor(), "red")]
    # window [lo..hi] spans matrix indices lo..hi+1: a square from lo-0.5 with side hi-lo+2
    assert sorted((p.get_xy(), p.get_width(), p.get_height()) for p in red) == [
        ((0.5, 0.5), 3, 3), ((2.5, 2.5), 3, 3)]

    def is_red(x: float, y: float) -> bool:
        r, g, b = _pixel(png, ax, x, y)
        return r > 0.8 and g < 0.35 and b < 0.35

    for lo, hi in WINDOWS:
        mid = (lo - 0.5 + hi + 1.5) / 2
        assert is_red(lo - 0.5, mid) and is_red(hi + 1.5, mid) and is_red(mid, lo - 0.5)
    assert not is_red(0.5, 0.0)  # the boundary between embed and layer 0 belongs to no window
    assert not is_red(5.5, 6.0)  # nor the last layer's


def test_block_influence_plot(drawn):
    fig, png = drawn[report.INFLUENCE_NAME]
    assert png.shape[:2] == (432, 1080)  # 9 x 3.6 inches at 120 dpi
    ax = fig.axes[0]
    bars = list(ax.containers[0])  # the BarContainer
    assert [b.get_height() for b in bars] == BLOCK_INFLUENCE
    assert [b.get_x() + b.get_width() / 2 for b in bars] == list(range(6))
    assert list(ax.lines[0].get_ydata()) == ANGULAR
    spans = [p for p in ax.patches if p not in bars]  # axvspan shading, one per window
    assert sorted((p.get_x(), p.get_x() + p.get_width()) for p in spans) == [(0.5, 2.5), (2.5, 4.5)]
    # The PNG shows those bars: blue at the middle of each bar, not blue above its top.
    blue = np.array(matplotlib.colors.to_rgb("tab:blue"))
    for layer, height in enumerate(BLOCK_INFLUENCE):
        assert np.abs(_pixel(png, ax, layer, height / 2) - blue).max() < 0.02, layer
        assert np.abs(_pixel(png, ax, layer, height + 0.02) - blue).max() > 0.2, layer


def test_cli_rebuilds_the_same_report_from_the_run_folder(run_dir):
    assert main(["report", str(run_dir)]) == EXIT_OK
    first = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.name.startswith(("report", "similarity.png",
                                                                                      "block_influence"))}
    assert sorted(first) == ["block_influence.png", "report.json", "report.md", "similarity.png"]
    for name in first:
        (run_dir / name).unlink()
    assert main(["report", str(run_dir)]) == EXIT_OK
    assert {name: (run_dir / name).read_bytes() for name in first} == first


def test_report_without_statistics_is_bad_input(run_dir, capsys):
    (run_dir / "similarity.json").unlink()
    assert main(["report", str(run_dir)]) == EXIT_BAD_INPUT
    assert "similarity.json is missing: the calibrate stage writes it" in capsys.readouterr().err
