"""Checkpoints written in the background (checkpoint.async_save), under DDP and FSDP, on real gloo ranks: a
rank SIGKILLed right after a save began never leaves a checkpoint that is taken as valid, the run resumes
bitwise, and a background copy slower than a step still holds its step's state. (A background write that fails is reported like a synchronous one: test_hardening.py.)"""
import numpy as np
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
    only reads until its update) and its write slowed down, so that the next optimizer step would overtake
    the copy if it did not wait, and the next save would reuse the copy's buffers (kept from save to save)
    while they are written if it did not wait; the checkpoints must then hold what they held when the save
    began."""
    import time

    from torch.distributed.checkpoint.staging import DefaultStager

    from ddptrain import async_save
    start, dcp_stage = async_save.Background.start, DefaultStager._stage

    def slow_start(self, write, stage=lambda: None, awaited=True):  # ddp: ddptrain's own copy on its thread
        start(self, lambda: (time.sleep(0.3), write()), lambda: (time.sleep(0.3), stage()), awaited)

    def slow_dcp_stage(self, *args, **kwargs):  # fsdp: DCP's copy on its staging thread
        if self._config.use_async_staging:  # (ddptrain's own copies use a DefaultStager too, in their thread)
            time.sleep(0.3)
        return dcp_stage(self, *args, **kwargs)
    async_save.Background.start, DefaultStager._stage = slow_start, slow_dcp_stage
    return train_rank(rank, runs_dir, cfg, None, None)


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return bool(np.all(a == b)) if isinstance(a, np.ndarray) else a == b


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_background_copies_hold_the_state_of_their_step_even_when_slower_than_a_step(tmp_path, strategy):
    # batch norm: its running statistics change at every forward, in place, so each save copies them at once
    cfg = {"task": "tasks_for_tests:regression", "task_args": {"batch_norm": True}, "data": {"batch_size": 16},
           "loss": {"name": "mse"}, "optim": {"name": "adamw", "lr": 0.01}, "train": {"epochs": 2, "log_every": 2},
           "early_stop": {"monitor": "val_loss"}, "dist": {"strategy": strategy, "timeout_s": 30},
           "checkpoint": {"every_steps": 2, "every_epochs": 0, "keep_last": 10, "save_best": False}}
    run_ranks(train_rank, 2, tmp_path / "sync", cfg, None, None, timeout=120)
    background = {**cfg, "checkpoint": {**cfg["checkpoint"], "async_save": True}}
    run_ranks(slow_background_copies, 2, tmp_path / "async", background, timeout=120)
    written = [checkpoint.step_files(tmp_path / run / "r" / "checkpoints") for run in ("sync", "async")]
    assert [p.name for p in written[0]] == [p.name for p in written[1]] and len(written[0]) == 6
    for sync, async_ in zip(*written):
        a, b = (ddptrain.load_model(tmp_path / run / "r", str(p)).state_dict()
                for run, p in (("sync", sync), ("async", async_)))
        assert all(torch.equal(a[k], b[k]) for k in a), sync.name
        # the rest too: the optimizer's state (ddp: in the file), each rank's train sums and random streams
        a, b = (checkpoint.load(p if p.is_file() else p / checkpoint.STATE) for p in (sync, async_))
        assert same(a["ranks"], b["ranks"]) and same(a.get("optimizer"), b.get("optimizer")), sync.name


def test_each_background_copy_reuses_the_buffers_of_the_one_before():
    from ddptrain.async_save import Background
    weights, background = torch.arange(1000.0), Background()
    first = background.copy({"w": weights})["w"]
    weights.add_(1)
    second = background.copy({"w": weights})["w"]
    assert second.data_ptr() == first.data_ptr() != weights.data_ptr() and torch.equal(second, weights)
    background.close()


def test_dcp_stagers_are_kept_only_where_torch_can_use_them_again():
    """torch 2.11's DefaultStager frees its copies after every stage, and a second stage of a DTensor then
    fails (KeyError: <class 'type'>): there every save gets a fresh one (the fsdp tests above pass on both)."""
    from ddptrain.async_save import Background, keeps_buffers
    if torch.__version__ >= (2, 13) or torch.__version__[:4] == "2.11":  # the two seen
        assert keeps_buffers() == (torch.__version__ >= (2, 13))
    background = Background()
    first = background.dcp_stager()
    assert (background.dcp_stager() is first) == keeps_buffers()
    background.close()


def test_the_first_background_copy_reuses_the_copy_made_ahead_of_it():
    from ddptrain.async_save import Background

    class Recording(Background):
        def _copied(self, obj, keep):
            out = super()._copied(obj, keep)
            if isinstance(obj, torch.Tensor):
                made.append(out)
            return out
    made, weights = [], torch.arange(1000.0)
    background = Recording()
    background.prepare({"w": weights})  # on the thread, and the optimizer step need not wait for it
    assert background.staging is None
    first = background.copy({"w": weights})["w"]  # waits for the copy made ahead
    assert len(made) == 2 and first.data_ptr() == made[0].data_ptr() and torch.equal(first, weights)
    background.close()
