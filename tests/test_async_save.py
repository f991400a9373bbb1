"""Checkpoints written in the background (checkpoint.async_save), under DDP and FSDP, on real gloo ranks: a
rank SIGKILLed right after a save began never leaves a checkpoint that is taken as valid, the run resumes
bitwise, and a background copy slower than a step still holds its step's state. (A background write that fails is reported like a synchronous one: test_hardening.py.)"""
import pytest
import torch

import ddptrain
from ddptrain import checkpoint

from killing import kill_and_resume, train_rank
from multirank import run_ranks

LM = {"task": "tasks_any_batch:causal_lm", "data": {"batch_size": 24}, "loss": {"name": "cross_entropy"},
      "optim": {"name": "adamw", "lr": 0.01}, "train": {"epochs": 3, "log_every": 2},
      "checkpoint": {"every_steps": 3, "async_save": True}, "early_stop": {"monitor": "val_accuracy", "mode": "max"},
      "dist": {"timeout_s": 30}}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_rank_killed_while_a_background_save_runs_resumes_bitwise_from_a_whole_checkpoint(tmp_path, strategy):
    cfg = {**LM, "dist": {**LM["dist"], "strategy": strategy}}
    # killed at the first micro-batch after step 6's save began: that save may or may not have finished
    summary = kill_and_resume(tmp_path, cfg, kill_at=6, models=None)
    assert summary["resumed_at_step"] in (5, 6) and summary["steps"] == 15  # 5: the end of epoch 0


def slow_background_copies(rank, runs_dir, cfg):
    """Training, with the checkpoint thread's copy (the parameters and optimizer state, which the next step
    only reads until its update) slowed down, so that the next optimizer step would overtake it if it did
    not wait; the checkpoints must then hold what they held when the save began."""
    import time

    from torch.distributed.checkpoint.staging import DefaultStager

    from ddptrain import checkpoint as ckpt
    start, dcp_stage = ckpt.Background.start, DefaultStager._stage

    def slow_start(self, write, stage=lambda: None):  # ddp: ddptrain's own copy on its thread
        start(self, write, lambda: (time.sleep(0.3), stage()))

    def slow_dcp_stage(self, *args, **kwargs):  # fsdp: DCP's copy on its staging thread
        time.sleep(0.3)
        return dcp_stage(self, *args, **kwargs)
    ckpt.Background.start, DefaultStager._stage = slow_start, slow_dcp_stage
    return train_rank(rank, runs_dir, cfg, None, None)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_background_copies_hold_the_state_of_their_step_even_when_slower_than_a_step(tmp_path, strategy):
    cfg = {**LM, "train": {**LM["train"], "epochs": 1}, "early_stop": {"monitor": "val_loss"},
           "dist": {**LM["dist"], "strategy": strategy},
           "checkpoint": {"every_steps": 2, "every_epochs": 0, "keep_last": 10, "save_best": False}}
    run_ranks(train_rank, 2, tmp_path / "sync", cfg, None, None, timeout=120)
    background = {**cfg, "checkpoint": {**cfg["checkpoint"], "async_save": True}}
    run_ranks(slow_background_copies, 2, tmp_path / "async", background, timeout=120)
    written = [checkpoint.step_files(tmp_path / run / "r" / "checkpoints") for run in ("sync", "async")]
    assert [p.name for p in written[0]] == [p.name for p in written[1]] and len(written[0]) == 2
    for sync, async_ in zip(*written):
        a, b = (ddptrain.load_model(tmp_path / run / "r", str(p)).state_dict()
                for run, p in (("sync", sync), ("async", async_)))
        assert all(torch.equal(a[k], b[k]) for k in a), sync.name
