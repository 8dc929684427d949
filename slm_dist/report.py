"""The run's report: ``report.json``, ``report.md`` and two figures, rebuilt from the run folder alone.

Everything comes from artifacts the stages wrote (``similarity.json``, ``plan.json``,
``eval.json``, ``state.json``, ``config.resolved.yaml``), so ``slm-dist report RUN`` can redraw a
report long after the run, on a machine without the model. Figures use matplotlib's Agg canvas
directly (no pyplot state, no display):

- ``similarity.png``: the CKA heatmap over the embedding output and every layer output, with each
  merged window outlined (window [lo..hi] spans matrix rows lo..hi+1: its input and outputs). The
  square "patches" of high similarity are what the sliding window folds.
- ``block_influence.png``: per layer, Block Influence (1 - mean cos(input, output), ShortGPT) and
  the angular distance, merged windows shaded.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from slm_dist.checkpoint.writer import write_json
from slm_dist.run_state import load_state

if TYPE_CHECKING:  # matplotlib is imported only when a figure is drawn (not on every `run` or `plan`)
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

HEATMAP_NAME = "similarity.png"
INFLUENCE_NAME = "block_influence.png"
DPI = 120
HEATMAP_CMAP = "viridis"
# eval.json keys the summary table shows itself; any other key is listed under "Evaluation".
_PERPLEXITY_KEYS = ("perplexity_before", "perplexity_after", "perplexity_text")


class ReportError(ValueError):
    """The run folder lacks what a report needs; names the file and the stage that writes it."""


# ------------------------------------------------------------------------------ figures
def heatmap_range(cka: Sequence[Sequence[float]]) -> tuple[float, float]:
    """Colour range: from the smallest value (rounded down to 0.05) to 1, so patches stand out."""
    values = [v for row in cka for v in row]
    low = math.floor(min(values) * 20) / 20
    return max(min(low, 0.95), -1.0), max(1.0, max(values))


def heatmap_figure(cka: Sequence[Sequence[float]], labels: Sequence[Any],
                   windows: Sequence[Sequence[int]]) -> Figure:
    """CKA matrix (rows/cols: embedding output, then layer 0..L-1 outputs), merged windows outlined."""
    n = len(cka)
    vmin, vmax = heatmap_range(cka)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    fig = Figure(figsize=(7.0, 6.0), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(cka, cmap=HEATMAP_CMAP, vmin=vmin, vmax=vmax, interpolation="nearest", origin="upper")
    for lo, hi in windows:
        # Window [lo..hi] compares its input h_{lo-1} (matrix index lo) with outputs h_lo..h_hi (lo+1..hi+1).
        ax.add_patch(Rectangle((lo - 0.5, lo - 0.5), hi - lo + 2, hi - lo + 2, fill=False, edgecolor="red",
                               linewidth=1.5))
    step = max(1, math.ceil(n / 24))
    ticks = list(range(0, n, step))
    ax.set_xticks(ticks, [str(labels[i]) for i in ticks], rotation=90, fontsize=7)
    ax.set_yticks(ticks, [str(labels[i]) for i in ticks], fontsize=7)
    ax.set_xlabel("layer output (embed = embedding output)")
    ax.set_ylabel("layer output")
    ax.set_title("Linear CKA between layer outputs" + ("; red: merged windows" if windows else ""))
    fig.colorbar(image, ax=ax, label="CKA")
    return fig


def block_influence_figure(block_influence: Sequence[float], angular_distance: Sequence[float],
                           windows: Sequence[Sequence[int]]) -> Figure:
    """Bars: Block Influence per layer; line: angular distance; shaded: merged windows."""
    layers = list(range(len(block_influence)))
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.0, 3.6), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for k, (lo, hi) in enumerate(windows):
        ax.axvspan(lo - 0.5, hi + 0.5, color="red", alpha=0.12, label="merged window" if k == 0 else None)
    ax.bar(layers, block_influence, color="tab:blue", label="Block Influence = 1 - cos(in, out)")
    if angular_distance:
        ax.plot(layers, angular_distance, color="tab:orange", marker=".", label="angular distance")
    ax.set_xlabel("layer")
    ax.set_ylabel("change made by the layer")
    ax.set_xlim(-0.5, len(layers) - 0.5)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("Per-layer Block Influence (small: the layer barely changes its input)")
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: Path) -> None:
    """PNG at the figure's own dpi and size (no tight bbox: pixel positions stay predictable)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    fig.savefig(tmp, dpi=fig.dpi, format="png")
    tmp.replace(path)


# ------------------------------------------------------------------------------ report data
def _read_json(run_dir: Path, name: str, stage: str, required: bool = True) -> dict | None:
    path = Path(run_dir) / name
    if not path.is_file():
        if required:
            raise ReportError(f"{path} is missing: the {stage} stage writes it. Run `slm-dist run` with this "
                              "run.dir first")
        return None
    return json.loads(path.read_text())


def _params(model_dir: str | None) -> int | None:
    """Parameters of a checkpoint from its headers (None when it is not there any more)."""
    if not model_dir:
        return None
    from slm_dist.checkpoint.index import CheckpointError, open_index

    try:
        index = open_index(Path(model_dir))
    except CheckpointError:
        return None
    return sum(math.prod(t.shape) for t in index.tensors.values())


def _stage_seconds(stages: Mapping[str, dict]) -> dict[str, float]:
    """Seconds per stage as state.json recorded them (the run that produced each artifact)."""
    seconds = {}
    for name, entry in stages.items():
        if "seconds" in entry:
            seconds[name] = entry["seconds"]
        if name == "merge" and "verify_seconds" in entry.get("info", {}):
            seconds["verify"] = entry["info"]["verify_seconds"]
    return seconds


def build_report(run_dir: Path) -> dict:
    """The report's data, from the artifacts in ``run_dir``."""
    run_dir = Path(run_dir)
    similarity = _read_json(run_dir, "similarity.json", "calibrate")
    plan = _read_json(run_dir, "plan.json", "plan")
    evaluation = _read_json(run_dir, "eval.json", "eval", required=False) or {}
    state = load_state(run_dir)
    inputs = state.get("inputs", {})
    stages = state.get("stages", {})
    merge_info = stages.get("merge", {}).get("info", {})
    params_before = merge_info.get("params_before") or _params(inputs.get("model_dir"))
    params_after = merge_info.get("params_after") or _params(inputs.get("output_dir"))
    report = {
        "run_key": state.get("run_key"),
        "model": inputs.get("model_dir"),
        "output": inputs.get("output_dir"),
        "layers_before": plan["num_layers_before"],
        "layers_after": plan["num_layers_after"],
        "params_before": params_before,
        "params_after": params_after,
        "windows": plan["windows"],
        "rule": plan["rule"],
        "criterion": plan["criterion"],
        "threshold": plan["threshold"],
        "perplexity_before": evaluation.get("perplexity_before"),
        "perplexity_after": evaluation.get("perplexity_after"),
        "perplexity_text": evaluation.get("perplexity_text"),
        "similarity": {"kernel": similarity.get("kernel"), "unit": similarity.get("unit"),
                       "skip_first_token": similarity.get("skip_first_token"),
                       "num_batches": similarity.get("num_batches"), "estimator": similarity.get("estimator"),
                       "note": ("position 0 of every sequence is left out of token statistics (its massive "
                                "activations swamp linear CKA)") if similarity.get("unit") == "token"
                       and similarity.get("skip_first_token") else None},
        "plan": plan,
        "eval": evaluation,
        "seconds": _stage_seconds(stages),
        "figures": {"similarity": HEATMAP_NAME, "block_influence": INFLUENCE_NAME},
    }
    # Whatever else the eval stage measured (zero-shot tasks, healed perplexity) is also top-level.
    report.update({k: v for k, v in evaluation.items() if k not in report})
    return report


# ------------------------------------------------------------------------------ markdown
def _num(x: Any, digits: int = 2) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _change(before: Any, after: Any) -> str:
    if not isinstance(before, (int, float)) or not isinstance(after, (int, float)) or not before:
        return ""
    return f"{(after - before) / before * 100:+.1f}%"


def render_markdown(report: Mapping) -> str:
    r = report
    plan = r["plan"]
    lines = [f"# slm-dist report: {Path(r['model']).name if r.get('model') else 'run'}", ""]
    if r.get("run_key"):
        lines += [f"Run `{r['run_key'][:12]}`; source `{r.get('model')}`; pruned checkpoint `{r.get('output')}`.", ""]
    ppl_label = f"perplexity ({Path(r['perplexity_text']).name})" if r.get("perplexity_text") else "perplexity"
    lines += ["| | before | after | change |", "|---|---:|---:|---:|",
              f"| layers | {r['layers_before']} | {r['layers_after']} | "
              f"{_change(r['layers_before'], r['layers_after'])} |",
              f"| parameters | {_num(r['params_before'])} | {_num(r['params_after'])} | "
              f"{_change(r['params_before'], r['params_after'])} |",
              f"| {ppl_label} | {_num(r['perplexity_before'])} | {_num(r['perplexity_after'])} | "
              f"{_change(r['perplexity_before'], r['perplexity_after'])} |", ""]
    threshold = "n/a" if r["threshold"] is None else f"{r['threshold']:.4f}"
    lines += ["## Plan", "",
              f"Criterion `{r['criterion']}`, threshold {threshold}, merge rule `{r['rule']}`. Windows are inclusive "
              "original layer indices; each folds into one layer at its bottom position.", ""]
    if r["windows"]:
        new_of = plan.get("index_map") or []
        alphas = plan.get("alphas") or [None] * len(r["windows"])
        fits = {tuple(f["window"]): f for f in (plan.get("details") or {}).get("corrections", [])}
        lines += ["| window | layers merged | becomes new layer | alpha | correction |",
                  "|---|---:|---:|---:|---|"]
        for (lo, hi), alpha in zip(r["windows"], alphas):
            fit = fits.get((lo, hi))
            corrected = ("n/a" if fit is None else "kept the plain merge (no gain held out)" if fit["ridge"] is None
                         else f"{fit.get('kind', 'linear')}: held-out error {fit['loss']:.3f} of the plain merge's, "
                              f"ridge {fit['ridge']:g}")
            lines.append(f"| [{lo}..{hi}] | {hi - lo + 1} | {new_of[lo] if lo < len(new_of) else 'n/a'} | "
                         f"{_num(alpha, 3) if alpha is not None else 'n/a'} | {corrected} |")
    else:
        lines.append("No window passed the threshold: the model is unchanged.")
    if plan.get("index_map"):
        lines += ["", f"Old layer -> new layer: `{plan['index_map']}`"]
    sim = r["similarity"]
    lines += ["", "## Similarity", "",
              f"Kernel `{sim.get('kernel')}`, unit `{sim.get('unit')}`, {sim.get('num_batches')} calibration batches; "
              f"{sim.get('estimator') or ''}.", ""]
    if sim.get("note"):
        lines += [f"Note: {sim['note']}.", ""]
    lines += [f"![CKA between layer outputs, merged windows outlined]({r['figures']['similarity']})", "",
              f"![Per-layer Block Influence]({r['figures']['block_influence']})", ""]
    extra = {k: v for k, v in r.get("eval", {}).items() if k not in _PERPLEXITY_KEYS}
    if extra:
        lines += ["## Evaluation", "", "```json", json.dumps(extra, indent=2, default=str), "```", ""]
    if r["seconds"]:
        lines += ["## Time per stage", "", "| stage | seconds |", "|---|---:|"]
        lines += [f"| {name} | {seconds:.1f} |" for name, seconds in r["seconds"].items()]
        lines += [f"| total | {sum(r['seconds'].values()):.1f} |", ""]
    lines += ["Files: `config.resolved.yaml` (the configuration), `plan.json`, `similarity.json`, `state.json`.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ write
def write_report(run_dir: Path) -> dict:
    """Rebuild report.json, report.md and both figures from the run folder; returns the report."""
    run_dir = Path(run_dir)
    report = build_report(run_dir)
    similarity = _read_json(run_dir, "similarity.json", "calibrate")
    save_figure(heatmap_figure(similarity["cka"], similarity["labels"], report["windows"]), run_dir / HEATMAP_NAME)
    save_figure(block_influence_figure(similarity["block_influence"], similarity.get("angular_distance") or [],
                                       report["windows"]), run_dir / INFLUENCE_NAME)
    write_json(run_dir / "report.json", report)
    tmp = run_dir / ".report.md.partial"
    tmp.write_text(render_markdown(report), encoding="utf-8")
    tmp.replace(run_dir / "report.md")
    log.info("report: %s", run_dir / "report.md")
    return report


def load_report(run_dir: Path) -> dict:
    return _read_json(Path(run_dir), "report.json", "report")
