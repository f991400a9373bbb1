"""The end of a run: the best weights restored, the test, and the summary (summary.json) with its throughput
and MFU; on a resume at the end of a run that completed, that run's summary instead.
Functions of the run's `Training` (trainer.py), called at its end: never per step.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from . import saving
from .dist import Dist
from .nonfinite import NonFiniteError
from .runlog import warn

if TYPE_CHECKING:
    from .trainer import Training


def finished_summary(dist: Dist, run_dir: Path, step: int) -> dict | None:
    """When resumed from the checkpoint at the end of a run that completed (at `step`), its summary (unchanged,
    with `already_trained`), else None. Call on all ranks."""
    summary = None
    if dist.env.is_main:
        try:
            summary = json.loads((run_dir / "summary.json").read_text())
        except (OSError, ValueError):
            summary = None
        if summary is not None and (summary.get("status") != "completed" or summary.get("steps") != step):
            summary = None
    summary = dist.broadcast_object(summary)
    return None if summary is None else {**summary, "already_trained": True}


def finish(t: Training) -> dict:
    """Restore the best weights (when whole), test, write the summary. Call on all ranks."""
    t.phase = "the final evaluation"
    saving.collectively(t.dist, t.strategy.wait)  # the last checkpoint is whole before the run says it is done
    weights, why = restore_best(t)
    test = t.evaluate(t.module, t.task.test) if t.task.test is not None else None
    if test is not None:
        t.log.record({"split": "test", "step": t.progress.step, "epoch": t.progress.epoch, **test,
                      "time": t.clock()})
    # A metric may be undefined (R^2 of a constant target); a loss that is not finite means divergence.
    bad = [f"the {split} loss" for split, values in (("val", t.progress.last_val), ("test", test))
           if values and not math.isfinite(values["loss"])]
    summary = summarize(t, "nonfinite" if bad else "completed", test=test, tested=weights)
    if why:
        summary["best_unusable"] = why
    t.log.summary(summary)
    t.log.close()
    if bad:  # the values were broadcast from rank 0: every rank raises
        raise NonFiniteError(f"training ended, but {', '.join(bad)} is not finite (NaN/Inf): the run diverged; "
                             f"lower optim.lr, clip gradients (train.clip_grad_norm) or use fp32")
    return summary


def restore_best(t: Training) -> tuple[str, str | None]:
    """Load the best weights into every rank's model if they are whole and fit: ("best", None), else
    ("last", why). Call on all ranks."""
    cfg = t.cfg
    if not (cfg.early_stop.restore_best and cfg.checkpoint.save_best and t.stopper.best_epoch is not None):
        return "last", None
    path = t.ckpt_dir / t.strategy.name("best")
    why = t.strategy.load_weights(path, t.module)
    if why is not None:
        if t.dist.env.is_main:
            warn(f"'{path}' cannot be used ({why}); the test runs on the last weights")
        return "last", why
    return "best", None


def summarize(t: Training, status: str, test: dict | None = None, tested: str | None = None) -> dict:
    """The run's summary (summary.json): how it ended, its best and last results, its throughput."""
    p, s, rates = t.progress, t.stopper, t.rates
    rate = rates.steps_per_s(p.step)
    out = {
        "status": status, "world_size": t.dist.env.world_size, "strategy": t.cfg.dist.strategy,
        "epochs_completed": p.passes if t.data.stream else p.step // t.data.steps_per_epoch, "steps": p.step,
        "stopped_early": p.stopped_early,
        "monitor": t.cfg.early_stop.monitor, "best_value": s.best, "best_epoch": s.best_epoch,
        "best_step": s.best_step, "restored_best": tested == "best", "tested_weights": tested,
        "val": p.last_val, "test": test, "skipped_steps": p.skipped_total,
        "resumed_from": str(t.resumed_from) if t.resumed_from else None, "resumed_at_step": rates.start_step,
        "samples_per_s": rate and rate * t.cfg.data.batch_size,
        "time_to_first_step_s": rates.first_step_time, "wall_time_s": t.clock(),
    }
    if rates.tokens:  # the logged intervals' tokens per step, at the steady rate
        out["tokens_per_s"] = rate and rate * rates.tokens_per_step()
    if t.flops_per_sample:
        out["flops_per_sample"] = t.flops_per_sample  # of training: 3 forwards
        if t.peak_flops and out["samples_per_s"]:
            out["mfu"] = mfu(out["samples_per_s"], t.flops_per_sample, t.peak_flops, t.dist.env.world_size)
    return out


def mfu(samples_per_s: float, flops_per_sample: float, peak_flops: float, world_size: int) -> float:
    """The model FLOPs utilisation at this rate: the model's FLOPs per second over all devices' peak."""
    return samples_per_s * flops_per_sample / (peak_flops * world_size)
