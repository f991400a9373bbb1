"""`ddptrain plot`: training curves from metrics.jsonl as a PNG, several runs overlaid.

Three panels against the optimizer step: train and validation loss, the monitored validation metric,
and the learning rate. The best validation is starred; a dotted line marks where early stopping ended a run.
Each run whose train events carry `grad_norms` (per-layer gradient norms) gets a row below: a heat map of
log10(norm), layers top to bottom in module order against the step, on one color scale for all runs.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from .config import ConfigError
from .runlog import read_event

MAX_LAYER_LABELS = 80  # beyond this, every k-th layer is named so the labels stay legible


def _events(metrics: Path) -> list[dict]:
    """The events of metrics.jsonl. Its last line may be cut short (the run is writing it, or was killed while it
    did): it is left out. A damaged line before it is a ConfigError naming it."""
    lines = metrics.read_text().splitlines()
    events = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            event = read_event(line)
            if not isinstance(event, dict) or not {"split", "step"} <= event.keys():
                raise ValueError(line)
            events.append(event)
        except ValueError:
            if number == len(lines):
                break
            raise ConfigError(f"'{metrics}' line {number}: not a JSON object (damaged?)") from None
    return events


def _read(run_dir: Path) -> tuple[list[dict], dict]:
    """The run's events and its summary; a run without one yet (still training, or stopped) has the monitored
    metric of its config.yaml."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise ConfigError(f"run directory '{run_dir}': no metrics.jsonl (is this a ddptrain run directory?)")
    events = _events(metrics)
    summary_file = run_dir / "summary.json"
    summary = {}
    if summary_file.is_file():
        try:
            summary = json.loads(summary_file.read_text())
        except ValueError:
            summary = None
        if not isinstance(summary, dict):
            raise ConfigError(f"'{summary_file}': not a JSON object (damaged?)")
    if "monitor" not in summary and (run_dir / "config.yaml").is_file():
        from .configfile import read_file  # a damaged file is one line
        config = read_file(run_dir / "config.yaml")
        summary["monitor"] = (config.get("early_stop") or {}).get("monitor", "val_loss")
    return events, summary


def _values(events: list[dict], key: str) -> list[float]:
    """`key` of each event, NaN where an event lacks it."""
    return [e.get(key, math.nan) for e in events]


def _label(run_dir: Path, all_dirs: list[Path]) -> str:
    names = [d.name for d in all_dirs]
    return run_dir.name if names.count(run_dir.name) == 1 else str(run_dir)


def _grad_norms(events: list[dict]):
    """(steps, layer names in module order, log10 norms as a layers x steps masked array), or None without norms.
    A norm of 0, a non-finite one, or a layer missing at a step is masked."""
    import numpy as np
    logged = [e for e in events if e["split"] == "train" and e.get("grad_norms")]
    if not logged:
        return None
    names = list(dict.fromkeys(name for e in logged for name in e["grad_norms"]))
    norms = np.array([[e["grad_norms"].get(name, math.nan) for e in logged] for name in names], dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        log = np.log10(norms)
    return [e["step"] for e in logged], names, np.ma.masked_invalid(log)


def _edges(steps: list[int]):
    """Cell edges halfway between logged steps, so uneven logging (a resume) keeps the step axis true."""
    import numpy as np
    s = np.asarray(steps, dtype=float)
    if len(s) == 1:
        return np.array([s[0] - 0.5, s[0] + 0.5])
    mid = (s[1:] + s[:-1]) / 2
    return np.concatenate([[2 * s[0] - mid[0]], mid, [2 * s[-1] - mid[-1]]])


def _heat_map(fig, ax, label: str, steps, names, log, vmin, vmax) -> None:
    import matplotlib
    import numpy as np
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    mesh = ax.pcolormesh(_edges(steps), np.arange(len(names) + 1), log, cmap=cmap, vmin=vmin, vmax=vmax)
    every = math.ceil(len(names) / MAX_LAYER_LABELS)
    ax.set_yticks(np.arange(0, len(names), every) + 0.5, names[::every], fontsize=7)
    ax.invert_yaxis()  # the first layer on top
    ax.set_title(f"{label}: per-layer gradient norms, log10 (grey: zero or non-finite)")
    ax.set_xlabel("step")
    fig.colorbar(mesh, ax=ax, label="log10 gradient norm", pad=0.01)


def plot(run_dirs: list[Path], out: Path, log: bool = False):
    """Draw the runs' curves (and heat maps of their per-layer gradient norms, where recorded) into `out` (PNG)
    and return the matplotlib Figure; `log` puts the loss and the learning rate on log axes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(run_dir, *_read(run_dir)) for run_dir in run_dirs]
    maps = [(run_dir, m) for run_dir, events, _ in runs if (m := _grad_norms(events)) is not None]
    heights = [min(max(1.2 + 0.16 * min(len(names), MAX_LAYER_LABELS), 2.5), 14) for _, (_, names, _) in maps]
    fig = plt.figure(figsize=(16, 4.5 + sum(heights)), constrained_layout=True)
    grid = fig.add_gridspec(1 + len(maps), 3, height_ratios=[4.5, *heights])
    ax_loss, ax_metric, ax_lr = (fig.add_subplot(grid[0, j]) for j in range(3))
    for i, (run_dir, events, summary) in enumerate(runs):
        color, label = f"C{i}", _label(run_dir, run_dirs)
        train = [e for e in events if e["split"] == "train"]
        val = [e for e in events if e["split"] == "val"]
        monitor = summary.get("monitor", "val_loss")[4:]
        dot = {"marker": "o", "ms": 3} if len(train) == 1 else {}  # a line of one point is not drawn
        ax_loss.plot(_values(train, "step"), _values(train, "loss"), color=color, label=f"{label} train", **dot)
        if val:
            ax_loss.plot(_values(val, "step"), _values(val, "loss"), color=color, ls="--", marker="o",
                         ms=3, label=f"{label} val")
            ax_metric.plot(_values(val, "step"), _values(val, monitor), color=color, marker="o", ms=3,
                           label=f"{label} val_{monitor}")
        if summary.get("best_step") is not None:
            ax_metric.plot([summary["best_step"]], [summary["best_value"]], color=color, marker="*", ms=14, ls="",
                           label=f"{label} best (epoch {summary['best_epoch']})")
        if summary.get("stopped_early"):
            for ax in (ax_loss, ax_metric):
                ax.axvline(summary["steps"], color=color, ls=":", label=f"{label} early stop" if ax is ax_metric else None)
        ax_lr.plot(_values(train, "step"), _values(train, "lr"), color=color, label=label, **dot)
    for ax, title in ((ax_loss, "loss"), (ax_metric, "monitored validation metric"), (ax_lr, "learning rate")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if log and ax is not ax_metric:  # a loss falling by decades; a warmup or decay (a 0 is left out)
            ax.set_yscale("log", nonpositive="mask")
        if ax.get_legend_handles_labels()[0]:  # a run without validation has no metric to name
            ax.legend(fontsize=8)
    shown = [log.compressed() for _, (_, _, log) in maps if log.count()]
    vmin = min((float(v.min()) for v in shown), default=None)  # one color scale, so runs compare by eye
    vmax = max((float(v.max()) for v in shown), default=None)
    for row, (run_dir, (steps, names, log)) in enumerate(maps, start=1):
        _heat_map(fig, fig.add_subplot(grid[row, :]), _label(run_dir, run_dirs), steps, names, log, vmin, vmax)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return fig
