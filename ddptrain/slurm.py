"""SLURM: requeue this job after a preemption checkpoint (the job id only; arrays: this task only), and the
batch script's part of a job, the same in every script of slurm/: run the job step, pass SLURM's signal on to
it, and requeue the job where the training processes could not (`python -m ddptrain.slurm step ...`).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time
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


# What the step runs, in the log's words: (who a signal is passed to, what exits)
STEPS = {"train": ("the training processes", "training step"), "sweep": ("the sweep", "sweep")}
FORWARDED = (signal.SIGUSR1, signal.SIGUSR2)  # what the scripts ask for with --signal=B:USR1@120 (or USR2)


def _say(text: str) -> None:
    print(f"=== ddptrain job {text} ===", flush=True)


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def run_step(command: list[str], kind: str, env: Mapping[str, str] = os.environ) -> int:
    """Run the job step `command` (an srun) from the batch script and return its exit status as a shell gives it.

    SLURM signals the batch script (`--signal=B:...`), not the training processes: USR1 or USR2 is passed to
    every process of this job's steps (an array task's own only) with scancel, since srun would turn a TERM
    into a KILL. Rank 0 requeues the job after its preemption checkpoint; if the signal came while no
    training loop ran (start-up, the final evaluation) and the step failed, the job is requeued from here."""
    job, restarts = job_to_requeue(env), env.get("SLURM_RESTART_COUNT", "0")
    told, exits = STEPS[kind]
    signalled = []

    def forward(signum, frame):
        name = signal.Signals(signum).name
        signalled.append(name)
        _say(f"{job}: {name} at {_now()}; passing it to {told}")
        try:
            subprocess.run(["scancel", f"--signal={name[3:]}", job])
        except OSError as e:  # no scancel here (inside a container?): the step runs on, unsignalled
            print(f"ddptrain: cannot pass {name} on: {e}", flush=True)
    for s in FORWARDED:
        signal.signal(s, forward)
    step = subprocess.Popen(command)
    rc = step.wait()  # a signal's handler runs inside the wait, which then goes on (PEP 475)
    rc = 128 - rc if rc < 0 else rc  # killed by signal n: 128 + n, as the shell says it
    _say(f"{job} attempt {int(restarts) + 1}: {exits} exited with status {rc} at {_now()}")
    if signalled and rc != 0 and job is not None:
        shown = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout \
            if shutil.which("scontrol") else ""  # requeue_and_log says what is missing
        now = re.search(r"\bRestarts=(\d+)", shown)
        if now is None or now.group(1) == restarts:  # not requeued by the training processes
            _say(f"{job}: not requeued by {told}; requeuing it")
            requeue_and_log(env)
    return rc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ddptrain.slurm", description="The part of ddptrain's batch "
                                "scripts that runs a job step: `step train|sweep -- srun ...`.")
    sub = p.add_subparsers(dest="what", required=True)
    step = sub.add_parser("step", help="run the job step, pass SLURM's USR1/USR2 on to it, requeue if needed")
    step.add_argument("kind", choices=sorted(STEPS))
    step.add_argument("command", nargs=argparse.REMAINDER, help="-- then the step's command (srun ...)")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("step: expected -- and the step's command")
    return run_step(command, args.kind)


if __name__ == "__main__":
    sys.exit(main())
