"""Preemption signals and elastic restarts through the real launchers (torchrun agents, real signals)."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ddptrain import checkpoint
from ddptrain.configfile import from_dict
from ddptrain.dist import detect
from ddptrain.preempt import EXIT_PREEMPTED
from ddptrain.run import run

from multirank import RankFailed, run_ranks

ROOT = Path(__file__).resolve().parent.parent
CONFIG = """task: tasks_for_tests:regression_for_launch
task_args: {{dropout: 0.2, delay: {delay}, kill_after: {kill_after}}}
data: {{batch_size: 16}}
optim: {{name: adamw, lr: 0.01}}
train: {{epochs: {epochs}, log_every: 1}}
checkpoint: {{every_steps: 5}}
dist: {{timeout_s: 20}}
"""


def write_config(path: Path, delay=0.0, kill_after=0, epochs=4) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(CONFIG.format(delay=delay, kill_after=kill_after, epochs=epochs))
    return path


def launch(config: Path, *extra, overrides=(), **popen):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    return subprocess.Popen([sys.executable, "-m", "ddptrain", "launch", "--nproc-per-node", "2", *extra,
                             str(config), "runs_dir=runs", *overrides], cwd=config.parent, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def final_weights(run_dir: Path) -> dict:
    return checkpoint.load(checkpoint.step_files(run_dir / "checkpoints")[-1])["model"]


def train_steps(run_dir: Path) -> list[int]:
    return [e["step"] for e in map(json.loads, open(run_dir / "metrics.jsonl")) if e["split"] == "train"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted reference: same config, 2 processes, no signal, no crash."""
    config = write_config(tmp_path_factory.mktemp("straight") / "exp.yaml")
    proc = launch(config)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    return final_weights(config.parent / "runs" / "exp")


def wait_for_step(run_dir: Path, step: int, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").exists() and any(s >= step for s in train_steps(run_dir)):
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_to_the_launcher_checkpoints_exits_75_and_resumes_exactly(tmp_path, straight, sig):
    config = write_config(tmp_path / "exp.yaml", delay=0.01)
    run_dir = tmp_path / "runs" / "exp"
    proc = launch(config)
    wait_for_step(run_dir, 3, proc)
    t0 = time.monotonic()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    stopped_in = time.monotonic() - t0
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    assert f"ddptrain: preempted by {sig.name}: checkpoint written at step" in err
    assert "Traceback" not in err and "SignalException" not in err, err[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "preempted" and 3 <= summary["steps"] < 24
    assert checkpoint.step_files(run_dir / "checkpoints")[-1].name == f"step-{summary['steps']:09d}.pt"
    assert stopped_in < 30  # well inside torchrun's 30 s before SIGKILL

    again = launch(config)
    out, err = again.communicate(timeout=180)
    assert again.returncode == 0, err[-3000:]
    assert train_steps(run_dir) == list(range(1, 25))
    resumed = final_weights(run_dir)
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


@pytest.mark.parametrize("data", [
    ["task_args.delay=0.01", "data.num_workers=1"],  # map-style: torch's DataLoader workers
    ["task=tasks_stream:stream", "task_args={kind: slow, delay: 0.01}", "data.num_workers=2", "loss.name=mse"],
])  # a stream: torchdata's StatefulDataLoader workers
def test_a_preemption_signal_that_reaches_the_data_workers_too_still_checkpoints(tmp_path, data):
    """torchrun signals each worker's process group and SLURM every process of the step, the DataLoader workers
    with them: torch's worker dies of a SIGTERM its parent did not send, which the rank took for a failure of the
    data (status 2, no checkpoint). The workers leave the signal to the rank."""
    config = write_config(tmp_path / "exp.yaml", epochs=40)
    run_dir = tmp_path / "runs" / "exp"
    proc = launch(config, overrides=data)
    wait_for_step(run_dir, 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    assert "ddptrain: preempted by SIGTERM: checkpoint written at step" in err and "error" not in err, err[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "preempted"
    # and each rank exits: its workers still obey the SIGTERM that its multiprocessing stops them with at exit
    assert "Unable to shutdown process" not in err, err[-3000:]  # torchrun's word for a SIGKILL 30 s on


def test_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    def per_rank(rank, tmp):
        def hook(step, micro_step, batch):
            if rank == 1 and step == 4 and micro_step % 1 == 0:
                os.kill(os.getpid(), signal.SIGUSR2)
            return batch
        cfg = from_dict({"task": "tasks_for_tests:regression", "runs_dir": str(tmp), "data": {"batch_size": 16},
                         "train": {"epochs": 4}, "dist": {"timeout_s": 20}})
        return run(cfg, detect(os.environ), hooks={"before_micro_step": hook})

    with pytest.raises(RankFailed) as info:
        run_ranks(per_rank, 2, tmp_path)
    # rank 1 raised its flag during step 5; the ranks compare flags every ~0.25 s (the interval in steps is
    # rank 0's), so both stop at the same later step
    said = [re.match(r"Preempted: (.*): checkpoint written at step (\d+)\n", info.value.errors[r]) for r in (0, 1)]
    assert said[0] and said[1], info.value.errors
    assert (said[0][1], said[1][1]) == ("a signal on another rank", "SIGUSR2")
    step = int(said[1][2])
    assert int(said[0][2]) == step and 5 < step < 24  # 24: the whole run (4 epochs x 6 steps)
    assert [p.name for p in checkpoint.step_files(tmp_path / "run" / "checkpoints")][-1] == f"step-{step:09d}.pt"


def test_elastic_restart_after_sigkill_completes_with_the_uninterrupted_result(tmp_path, straight):
    """torchrun --max-restarts 1: rank 1 is SIGKILLed mid-run, the group restarts and resumes by itself."""
    config = write_config(tmp_path / "exp.yaml", kill_after=8 * 13)  # during step 14 (8 items per rank-step)
    proc = launch(config, "--max-restarts", "1")
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    run_dir = tmp_path / "runs" / "exp"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_at_step"] == 12 and summary["status"] == "completed"  # the end of epoch 2
    assert train_steps(run_dir) == list(range(1, 25))
    resumed = final_weights(run_dir)
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
