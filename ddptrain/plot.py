"""`ddptrain plot`: training curves from metrics.jsonl as a PNG, several runs overlaid.

Three panels against the optimizer step: train and validation loss, the monitored validation metric,
and the learning rate. The best validation is starred; a dotted line marks where early stopping ended a run.
"""
from __future__ import annotations

import json
from pathlib import Path

from .config import ConfigError


def _read(run_dir: Path) -> tuple[list[dict], dict]:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise ConfigError(f"run directory '{run_dir}': no metrics.jsonl (is this a ddptrain run directory?)")
    events = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    return events, summary


def _label(run_dir: Path, all_dirs: list[Path]) -> str:
    names = [d.name for d in all_dirs]
    return run_dir.name if names.count(run_dir.name) == 1 else str(run_dir)


def plot(run_dirs: list[Path], out: Path):
    """Draw the runs' curves into `out` (PNG) and return the matplotlib Figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_metric, ax_lr) = plt.subplots(1, 3, figsize=(16, 4.5), constrained_layout=True)
    for i, run_dir in enumerate(run_dirs):
        events, summary = _read(run_dir)
        color, label = f"C{i}", _label(run_dir, run_dirs)
        train = [e for e in events if e["split"] == "train"]
        val = [e for e in events if e["split"] == "val"]
        monitor = summary.get("monitor", "val_loss")[4:]
        ax_loss.plot([e["step"] for e in train], [e["loss"] for e in train], color=color, label=f"{label} train")
        if val:
            ax_loss.plot([e["step"] for e in val], [e["loss"] for e in val], color=color, ls="--", marker="o",
                         ms=3, label=f"{label} val")
            ax_metric.plot([e["step"] for e in val], [e.get(monitor) for e in val], color=color, marker="o", ms=3,
                           label=f"{label} val_{monitor}")
        if summary.get("best_step") is not None:
            ax_metric.plot([summary["best_step"]], [summary["best_value"]], color=color, marker="*", ms=14, ls="",
                           label=f"{label} best (epoch {summary['best_epoch']})")
        if summary.get("stopped_early"):
            for ax in (ax_loss, ax_metric):
                ax.axvline(summary["steps"], color=color, ls=":", label=f"{label} early stop" if ax is ax_metric else None)
        ax_lr.plot([e["step"] for e in train], [e["lr"] for e in train], color=color, label=label)
    for ax, title in ((ax_loss, "loss"), (ax_metric, "monitored validation metric"), (ax_lr, "learning rate")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return fig
