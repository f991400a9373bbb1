"""The batch scripts' step runner (`python -m ddptrain.slurm step`), on its own: SLURM's signal to the batch
script is passed to the job's processes, the exit status is the shell's, and the job is requeued from there
only where the training processes did not requeue it. `scancel` and `scontrol` are small stand-ins on PATH
that do what SLURM's do to this job (the real ones run in tests/test_slurm.py, on a real cluster)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

# The job step: writes its pid, and exits 75 on USR1 as ddptrain does after a preemption checkpoint (or dies of
# the signal, where it has no handler yet: start-up).
STEP = """import os, signal, sys, time
if sys.argv[2] == "handles":
    signal.signal(signal.SIGUSR1, lambda *a: sys.exit(75))
open(sys.argv[1], "w").write(str(os.getpid()))
time.sleep(60)
"""


def fake_slurm(tmp_path, restarts: int):
    """scancel signals the step (its pid file), scontrol shows the job with `restarts`; both log their calls."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    scripts = {"scancel": f'kill -s "${{1#--signal=}}" "$(cat {tmp_path / "pid"})"',
               "scontrol": f'echo "JobId=7 JobName=exp JobState=RUNNING Restarts={restarts}"'}
    for name, body in scripts.items():
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*" >> {calls}\n{body}\n')
        (bin_dir / name).chmod(0o755)
    return bin_dir, calls


def run_signalled(tmp_path, restarts: int, step_handles: bool):
    bin_dir, calls = fake_slurm(tmp_path, restarts)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "7",
           "SLURM_RESTART_COUNT": str(restarts - 1 if restarts else 0)}
    env.pop("SLURM_ARRAY_JOB_ID", None)
    runner = subprocess.Popen([sys.executable, "-m", "ddptrain.slurm", "step", "train", "--", sys.executable, "-c",
                               STEP, str(tmp_path / "pid"), "handles" if step_handles else "dies"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (tmp_path / "pid").exists() or not (tmp_path / "pid").read_text():
        assert time.monotonic() < deadline and runner.poll() is None, runner.communicate()
        time.sleep(0.05)
    runner.send_signal(signal.SIGUSR1)  # as SLURM's --signal=B:USR1@120 does, to the batch script
    out, err = runner.communicate(timeout=30)
    return runner.returncode, out, err, calls.read_text().splitlines()


@pytest.mark.timeout(60)
def test_a_signal_the_training_processes_could_not_requeue_for_is_requeued_by_the_runner(tmp_path):
    rc, out, err, calls = run_signalled(tmp_path, restarts=0, step_handles=True)
    assert rc == 75, err
    assert calls == ["scancel --signal=USR1 7", "scontrol show job -o 7", "scontrol show job -o 7",
                     "scontrol requeue 7"]
    lines = [line for line in out.splitlines()]
    assert lines[0].startswith("=== ddptrain job 7: SIGUSR1 at ") and \
        lines[0].endswith("; passing it to the training processes ===")
    assert lines[1].startswith("=== ddptrain job 7 attempt 1: training step exited with status 75 at ")
    assert lines[2:] == ["=== ddptrain job 7: not requeued by the training processes; requeuing it ===",
                         "ddptrain: requeued job 7"]


@pytest.mark.timeout(60)
def test_a_job_its_rank_0_requeued_is_not_requeued_again_and_a_signals_death_is_128_plus_it(tmp_path):
    # scontrol shows one more restart than this attempt's SLURM_RESTART_COUNT: rank 0 requeued it already
    rc, out, err, calls = run_signalled(tmp_path, restarts=1, step_handles=False)
    assert rc == 128 + signal.SIGUSR1, err
    assert calls == ["scancel --signal=USR1 7", "scontrol show job -o 7"]
    assert "requeuing it" not in out and "training step exited with status 138" in out
