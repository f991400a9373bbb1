"""Non-finite weights and gradients: the loop's checks (agreed by every rank), skipped steps counted, and the
stop (`train.nonfinite: stop`, or too many skips in a row) with its diagnostic, nonfinite.json.
Functions of the run's `Training` (trainer.py), called at log steps, epoch ends and skipped steps.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import checkpoint as ckpt

if TYPE_CHECKING:
    from .trainer import Training


class NonFiniteError(RuntimeError):
    """Training hit NaN/Inf gradients with `train.nonfinite: stop`; raised on every rank at the same step."""


def skipped(t: Training) -> None:
    """The optimizer step was skipped for non-finite gradients (fp16's scaler, or train.nonfinite: skip)."""
    p, limit = t.progress, t.cfg.train.max_skips_in_a_row
    t.strategy.skipped()
    p.skipped_in_a_row += 1
    p.skipped_total += 1
    # A few skipped steps are normal under fp16 (the scaler is finding its scale) and the point of
    # nonfinite=skip; many in a row mean the run has diverged.
    if p.skipped_in_a_row >= limit:
        stop(t, f"{p.skipped_in_a_row} steps in a row skipped for non-finite gradients "
                f"(train.max_skips_in_a_row={limit})")


def check_finite(t: Training, finite: torch.Tensor) -> None:
    """Note that the weights are finite now; with train.nonfinite=stop, stop if they are not.
    `finite` was all-reduced, so every rank takes the same branch. Call on all ranks."""
    if bool(finite):
        t.finite_at = t.progress.step
    elif t.cfg.train.nonfinite == "stop":
        stop(t, f"the weights became non-finite after step {t.finite_at} (a NaN/Inf loss or gradient)")


def stop(t: Training, what: str) -> None:
    """Write a diagnostic (rank 0) and raise NonFiniteError on every rank. Call on all ranks."""
    p, cfg = t.progress, t.cfg
    losses = t.dist.gather_object(float(t.last_loss.detach()))
    if cfg.train.nonfinite == "stop":
        fix = "set train.nonfinite=skip to skip such steps (it checks every step), or lower optim.lr"
    else:  # skipping already: the steps keep failing
        fix = "lower optim.lr, clip the gradients (train.clip_grad_norm) or raise train.max_skips_in_a_row"
    message = f"{what}; stopped at step {p.step}, epoch {p.epoch}; {fix}"
    if t.dist.env.is_main:
        from .runlog import write_json_atomic
        last = ckpt.latest_valid(t.ckpt_dir)  # whole: not one a dead attempt left unmarked
        write_json_atomic(cfg.run_dir / "nonfinite.json", {
            "what": what, "step": p.step, "epoch": p.epoch,
            "grad_norm": None if t.norm is None else str(float(t.norm)),
            "lr": t.optimizer.param_groups[0]["lr"], "last_loss_per_rank": [str(v) for v in losses],
            "last_good_checkpoint": str(last) if last else None})
    raise NonFiniteError(message)
