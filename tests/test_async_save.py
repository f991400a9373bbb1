"""Checkpoints written in the background (checkpoint.async_save), under DDP and FSDP, on real gloo ranks: a
rank SIGKILLed right after a save began never leaves a checkpoint that is taken as valid, and the run
resumes bitwise. (A background write that fails is reported like a synchronous one: test_hardening.py.)"""
import pytest

from killing import kill_and_resume

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
