"""The run's checkpoints, as the loop takes them: resuming from one, the step checkpoint and best.pt (of
finite weights only), and a failed write that stops every rank alike. What a checkpoint holds is state.py's
(`RunState`), its files checkpoint.py's (FSDP's shards sharded.py's), which rank writes what strategy.py's.
Functions of the run's `Training` (trainer.py).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from . import checkpoint as ckpt
from . import config as config_mod
from .dist import Dist
from .runlog import note, warn
from .state import check_compatible

if TYPE_CHECKING:
    from .trainer import Training


def resume(t: Training) -> dict:
    """Load the checkpoint into every part; return its tracking ids (wandb's run)."""
    saved = ckpt.load(t.resumed_from)
    if "config" not in saved or "progress" not in saved:
        raise ckpt.CheckpointError(
            f"checkpoint '{t.resumed_from}': holds the best validation's weights alone, not a run's state to "
            f"continue; resume from a step checkpoint (checkpoints/step-*), or test these weights with "
            f"`ddptrain eval`")
    check_compatible(saved["config"], config_mod.to_dict(t.cfg), t.resumed_from,
                     t.task.reads_model_config)
    t.state.load_state_dict(saved, t.resumed_from)
    t.strategy.load(t.resumed_from, t.module, t.optimizer)
    if t.dist.env.is_main:
        aside = ckpt.set_aside_newer(t.ckpt_dir, t.progress.step, t.strategy.name("best"))
        if aside is not None:
            warn(f"resumed at step {t.progress.step}, before the newest checkpoints of '{t.ckpt_dir}': "
                 f"those past it are moved to '{aside}' and never resumed from")
    return saved.get("tracking", {})


def say_resumed(t: Training) -> None:
    """Rank 0 tells where the run resumes (not when it had ended: its summary is all there is to say)."""
    p = t.progress
    where = f"after epoch {p.epoch}" if p.pass_ended else f"{p.step_in_epoch} steps into epoch {p.epoch}"
    note(f"resuming from '{t.resumed_from}' at step {p.step}, {where}")


def save_checkpoint(t: Training) -> None:
    """Write the whole run state as the newest step checkpoint. Call on all ranks."""
    p = t.progress
    p.records = t.log.records
    state = t.state.state_dict()
    if not t.strategy.finite(t.watched):
        if t.dist.env.is_main:
            warn(f"step {p.step}: the weights are not finite; keeping the previous checkpoint")
        return
    if state is not None:
        state.update(config=config_mod.to_dict(t.cfg), world_size=t.dist.env.world_size,
                     tracking=t.log.tracking)

    collectively(t.dist, lambda: t.strategy.save(t.ckpt_dir / t.strategy.name(f"step-{p.step:09d}"), state,
                                                 t.module, t.optimizer))


def save_best(t: Training, epoch: int) -> None:
    """Write the weights as best.pt, if they are finite, with what they scored. Call on all ranks."""
    if t.strategy.finite(t.watched):
        collectively(t.dist, lambda: t.strategy.save_weights(
            t.ckpt_dir / t.strategy.name("best"), t.module,
            # and the config, so that `ddptrain eval` can tell a config.yaml edited since from the one trained with
            {"epoch": epoch, "step": t.progress.step, "value": t.stopper.best, "config": config_mod.to_dict(t.cfg)}))


def collectively(dist: Dist, write: Callable) -> None:
    """Every rank runs `write` (only what is its to write); a CheckpointError (a full disk) on any rank stops
    every rank with the same message. Call on all ranks."""
    error = None
    try:
        write()
    except ckpt.CheckpointError as e:
        error = str(e)
    error = dist.first_error(error)
    if error:
        raise ckpt.CheckpointError(error)
