"""Kill a rank mid-run with SIGKILL, resume, and compare with an uninterrupted run: weights bitwise, and
metrics.jsonl line by line (timings aside)."""
import importlib
import os
import signal
from pathlib import Path

import pytest
import torch

import ddptrain

from ddptrain import checkpoint
from ddptrain.configfile import from_dict
from ddptrain.dist import detect
from ddptrain.run import run

import rundirs
from multirank import RankFailed, run_ranks


def train_rank(rank, runs_dir, cfg_dict, kill_at=None, models="tasks_any_batch", seen=None):
    """Train; with kill_at, rank 1 kills itself when it reaches that step. `models` names the task module whose
    MODELS list holds the model (None: take the weights from the last checkpoint); with `seen`, the first
    input column of every batch is returned by step."""
    ids = []

    def hook(step, micro_step, batch):
        if kill_at is not None and rank == 1 and step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if seen:
            ids.append((step, batch[0][:, 0].long().tolist()))
        return batch
    cfg = from_dict({"name": "r", **cfg_dict, "runs_dir": str(runs_dir)})
    summary = run(cfg, detect(os.environ), hooks={"before_micro_step": hook})
    if models is None:  # the final weights as the run's last checkpoint holds them (a file, or FSDP's shards)
        weights = ddptrain.load_model(cfg.run_dir, "last").state_dict()
    else:
        weights = {k: v.clone() for k, v in importlib.import_module(models).MODELS[-1].state_dict().items()}
    return {"summary": summary, "weights": weights, "seen": ids}


def records(run_dir):
    return rundirs.records(Path(run_dir))


def kill_and_resume(tmp_path, cfg, kill_at, models="tasks_any_batch", timeout=120):
    """An uninterrupted run, and one whose rank 1 is SIGKILLed at `kill_at` then resumed: the resumed summary,
    after checking that both end with the same weights and the same metrics.jsonl."""
    straight = run_ranks(train_rank, 2, tmp_path / "straight", cfg, None, models, timeout=timeout)
    with pytest.raises(RankFailed):
        run_ranks(train_rank, 2, tmp_path / "killed", cfg, kill_at, models, timeout=timeout)
    last = checkpoint.latest_valid(tmp_path / "killed" / "r" / "checkpoints")  # what resume: auto takes
    assert 0 < int(last.name.split("-")[1].split(".")[0]) <= kill_at
    resumed = run_ranks(train_rank, 2, tmp_path / "killed", cfg, None, models, timeout=timeout)
    assert resumed[0]["summary"]["resumed_from"] == str(last)
    for k, v in straight[0]["weights"].items():
        assert torch.equal(resumed[0]["weights"][k], v) and torch.equal(resumed[1]["weights"][k], v), k
    assert records(tmp_path / "killed" / "r") == records(tmp_path / "straight" / "r")
    return resumed[0]["summary"]
