"""SLURM: requeue this job after a preemption checkpoint (the job id only; arrays: this task only)."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from typing import Mapping


def job_to_requeue(env: Mapping[str, str]) -> str | None:
    """The id `scontrol requeue` needs for this job, or None outside SLURM.

    For an array job only this task is requeued, never the whole array (Lightning #15022).
    """
    if "SLURM_JOB_ID" not in env:
        return None
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env["SLURM_JOB_ID"]


def requeue_self(env: Mapping[str, str] = os.environ) -> str:
    """Ask SLURM to requeue this job; return what happened, in words, for the log. Call on one rank."""
    job = job_to_requeue(env)
    if job is None:
        return "not under SLURM: nothing to requeue"
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return f"cannot requeue job {job}: scontrol is not on PATH (inside a container?)"
    # `scancel` sends SIGTERM too, and a cancelled job can still be requeued while it ends: don't undo it.
    shown = subprocess.run([scontrol, "show", "job", "-o", job], capture_output=True, text=True, timeout=60).stdout
    state = re.search(r"\bJobState=(\w+)", shown)
    if state and state.group(1) in ("CANCELLED", "COMPLETING"):
        return f"job {job} is being cancelled (JobState={state.group(1)}): not requeued"
    proc = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        return f"scontrol requeue {job} failed: {(proc.stderr or proc.stdout).strip()}"
    return f"requeued job {job}"


def requeue_and_log(env: Mapping[str, str] = os.environ) -> None:
    """Requeue this job and print what happened, as this process ends. Call on one rank.

    The requeue ends the job at once, with SIGTERM to all its processes, often before this one has
    printed the outcome: ignore SIGTERM from here on, so the line reaches the log and the process ends
    with its own exit status (SLURM's SIGKILL, KillWait later, still ends one that hangs).
    """
    if job_to_requeue(env) is None:  # not under SLURM: nothing to requeue, nothing to say
        return
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print(f"ddptrain: {requeue_self(env)}", flush=True)
