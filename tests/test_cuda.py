"""On one CUDA GPU (skipped without one; benchmarks/gpu_check.py runs them): batches pinned for non-blocking
copies, a dataset that makes CUDA tensors itself, the memory figures in the log, and a real out-of-memory
error as one line."""
import json

import pytest
import torch
from torch.utils.data import TensorDataset

from ddptrain.configfile import from_dict
from ddptrain.dist import DistEnv
from ddptrain.task import TaskError
from ddptrain.run import run

import tasks_for_tests

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
BASE = {"task": "tasks_for_tests:regression", "data": {"batch_size": 16, "pin_memory": True},
        "optim": {"name": "adamw", "lr": 0.01}, "train": {"epochs": 2, "log_every": 2},
        "dist": {"device": "cuda"}, "checkpoint": {"save_best": False}}


def train(tmp_path, task=None, hook=None, **sections):
    cfg = from_dict({"name": "r", "runs_dir": str(tmp_path), **BASE, **sections})
    summary = run(cfg, DistEnv(), task, {"before_micro_step": hook} if hook else None)
    events = [json.loads(line) for line in open(tmp_path / "r" / "metrics.jsonl")]
    return summary, [e for e in events if e["split"] == "train"]


def test_cpu_batches_are_pinned_and_the_log_has_the_gpu_memory(tmp_path):
    pinned = []

    def look(step, micro_step, batch):
        pinned.append(all(t.is_pinned() for t in batch))
        return batch
    summary, events = train(tmp_path, hook=look)
    assert pinned and all(pinned)
    assert summary["status"] == "completed" and next(tasks_for_tests.MODELS[-1].parameters()).is_cuda
    assert events and all(e["gpu_mem_mb"] > 0 and e["gpu_reserved_mb"] >= e["gpu_mem_mb"] for e in events)


def cuda_items(cfg):
    """regression(), its tensors made on the GPU by the dataset itself: nothing for the loader to pin."""
    task = tasks_for_tests.regression(cfg)
    task.train, task.val = (TensorDataset(*(t.cuda() for t in part.tensors)) for part in (task.train, task.val))
    return task


def test_a_dataset_of_cuda_tensors_trains_with_pin_memory_on(tmp_path):
    summary, _ = train(tmp_path, task=cuda_items)
    assert summary["status"] == "completed" and summary["val"]["loss"] < 1.0


def too_big(cfg):
    task = tasks_for_tests.regression(cfg)
    task.model.register_forward_hook(lambda m, i, o: o + torch.empty(2 ** 40, device=o.device)[0] if m.training
                                     else None)
    return task


def test_a_real_cuda_out_of_memory_is_one_line_with_the_figures_and_a_snapshot(tmp_path):
    with pytest.raises(TaskError) as e:
        train(tmp_path, task=too_big, train={**BASE["train"], "memory_snapshot": True})
    message = str(e.value)
    assert "\n" not in message and "GiB allocated" in message and "grad_accum_steps" in message, message
    assert (tmp_path / "r" / "memory_snapshot_rank0.pickle").stat().st_size > 0, message
