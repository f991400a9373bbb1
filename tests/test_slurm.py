"""The slurm/ batch scripts and `ddptrain submit` on a real SLURM cluster, on CPU with gloo.

tests/slurm_cluster.sh starts the cluster (Debian's slurm-wlm: one slurmctld, two slurmd nodes n1 and n2
on this machine); it needs root. Every job is a real sbatch of a real script from slurm/; results are
compared with a plain torchrun run of the same config and global batch. Most jobs are submitted together
(the `batch` fixture) so that they overlap; the cluster preemption test runs alone, last.
"""
from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rundirs import assert_same_run, records, summary, train_steps

ROOT = Path(__file__).resolve().parent.parent
SLURM = ROOT / "slurm"
CLUSTER = Path(__file__).resolve().parent / "slurm_cluster.sh"
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}

# Small and deterministic: 3 epochs x 3 steps; the global batch of 64 splits over 1, 2 or 4 ranks.
PLAIN = """task: tasks_for_tests:classification
seed: 1
optim: {lr: 0.01}
train: {epochs: 3, log_every: 1}
dist: {timeout_s: 60}
"""
# For preemption: dropout (so an exact resume needs every RNG state back) and slow training items
# (0.24 s per step), 24 steps, a checkpoint every 5 steps and at every epoch's end.
SLOW = """task: tasks_for_tests:regression_for_launch
task_args: {{dropout: 0.2, delay: {delay}}}
data: {{batch_size: 16}}
optim: {{name: adamw, lr: 0.01}}
train: {{epochs: 4, log_every: 1}}
checkpoint: {{every_steps: 5}}
dist: {{timeout_s: 60}}
"""


# A tiny sweep over the learning rate: each trial 3 epochs x 6 steps of 0.16 s (0.01 s per training item).
SWEEP = """task: tasks_for_tests:regression_for_launch
task_args: {delay: 0.01}
data: {batch_size: 16}
train: {epochs: 3, log_every: 1}
"""
SPACE = """objective: val_loss
direction: minimize
params:
  optim.lr: {low: 0.001, high: 0.1, log: true}
pruner: {name: none}
"""


def job_env(**extra) -> dict:
    """What sbatch passes on to the job (its default is --export=ALL): this venv and the test tasks."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    env["PYTHONPATH"] = str(ROOT / "tests")
    env["PYTHON"] = sys.executable
    env.update(extra)
    return env


def scontrol_job(job: str) -> dict:
    """`scontrol show job` as a dict of its Key=Value fields."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for(job: str, timeout: float) -> dict:
    """Wait until the job has finished for good (a requeued job goes back to PENDING) and return its state."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = scontrol_job(job)
        if info.get("JobState") in FINISHED:
            return info
        time.sleep(0.5)
    raise AssertionError(f"job {job} not finished after {timeout} s: {scontrol_job(job)}")


def wait_for_step(run_dir: Path, step: int, job: str, timeout: float = 120, queued: float = 300) -> None:
    """Wait until the job's run has logged `step`: `timeout` s from when it left the queue, where it may wait up
    to `queued` s for the jobs submitted before it to free their CPUs."""
    deadline = time.monotonic() + queued
    while scontrol_job(job).get("JobState") == "PENDING":
        assert time.monotonic() < deadline, f"job {job} still pending after {queued} s"
        time.sleep(0.5)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").exists() and any(s >= step for s in train_steps(run_dir)):
            return
        assert scontrol_job(job).get("JobState") not in FINISHED, scontrol_job(job)
        time.sleep(0.2)
    raise AssertionError(f"job {job}: step {step} not reached in {timeout} s")


@pytest.fixture(scope="session")
def cluster():
    """A running local SLURM cluster; started here (packages installed if missing) unless already up."""
    if os.geteuid() != 0:
        pytest.fail("the SLURM tests need root: tests/slurm_cluster.sh installs slurm-wlm and starts its daemons")
    was_up = shutil.which("scontrol") is not None and subprocess.run(
        ["scontrol", "ping"], capture_output=True, text=True, timeout=30).stdout.count("is UP") > 0
    proc = subprocess.run([CLUSTER, "start"], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"could not start the local SLURM cluster with {CLUSTER}:\n{proc.stdout}{proc.stderr}")
    yield
    if not was_up:
        subprocess.run([CLUSTER, "stop"], capture_output=True, timeout=120)


@pytest.fixture
def jobs(cluster):
    """Submit jobs; whatever is still queued or running when the test ends is cancelled."""
    submitted = []

    def sbatch(*args, cwd: Path, env: dict | None = None) -> str:
        (cwd / "logs").mkdir(exist_ok=True)
        proc = subprocess.run(["sbatch", "--parsable", *map(str, args)], cwd=cwd, env=env or job_env(),
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        submitted.append(proc.stdout.strip())
        return submitted[-1]

    yield sbatch
    if submitted:
        subprocess.run(["scancel", *submitted], capture_output=True, timeout=60)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def torchrun_reference(tmp: Path, config_text: str, nproc: int = 2) -> Path:
    """The same config trained by a plain `ddptrain launch` (torchrun --standalone) on this machine."""
    config = write(tmp / "exp.yaml", config_text)
    proc = subprocess.run([sys.executable, "-m", "ddptrain", "launch", "--nproc-per-node", str(nproc), config,
                           "runs_dir=runs"], cwd=tmp, env=job_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "runs" / "exp"


@pytest.fixture(scope="module")
def plain_reference(tmp_path_factory):
    return torchrun_reference(tmp_path_factory.mktemp("plain-reference"), PLAIN)


@pytest.fixture(scope="module")
def slow_reference(tmp_path_factory):
    """The uninterrupted run that every preempted job must reproduce exactly (world size 2)."""
    return torchrun_reference(tmp_path_factory.mktemp("slow-reference"), SLOW.format(delay=0.0))


def trial_started(log: Path, job: str, timeout: float = 180) -> Path:
    """The run directory of the trial that the sweep worker writing `log` started last."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        started = re.findall(r"^trial \d+ started on .*; run ([^,\s]+)", log.read_text() if log.exists() else "", re.M)
        if started:
            return Path(started[-1])
        assert scontrol_job(job).get("JobState") not in FINISHED, scontrol_job(job)
        time.sleep(0.2)
    raise AssertionError(f"job {job}: no trial started in {timeout} s")


def log_of(cwd: Path, name: str, job: str) -> str:
    return (cwd / "logs" / f"{name}-{job}.out").read_text()


def attempts(log: str) -> list[int]:
    return [int(n) for n in re.findall(r"^=== ddptrain job \S+ \(.*\) attempt (\d+) started", log, re.M)]


# --- ddptrain submit ---------------------------------------------------------------------------------

def submit(*args, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ddptrain", "submit", *map(str, args)], cwd=cwd,
                          env=env or job_env(), capture_output=True, text=True, timeout=120)


def test_submit_tells_sbatch_options_from_overrides_and_renders_any_template():
    from ddptrain.config import ConfigError
    from ddptrain.submit import merge, render, split_extra, template_options

    assert split_extra(["--qos=high", "optim.lr=0.1", "--exclusive", "seed=3"]) == \
        ([("qos", "high"), ("exclusive", None)], ["optim.lr=0.1", "seed=3"])
    for bad, message in [(["-A", "ml"], "long form"), (["ml"], "neither a config override"),
                         (["--array=0-3"], "ddptrain_array.sbatch")]:
        with pytest.raises(ConfigError, match=message):
            split_extra(bad)
    template = "#!/bin/bash\n# how to use\n#SBATCH --nodes=1\n#SBATCH --requeue\n\necho \"$@\"\n"
    options = merge(template_options(template), [("nodes", "4")], [("time", "1:00:00")])
    assert options == [("nodes", "4"), ("requeue", None), ("time", "1:00:00")]
    assert render(template, options, ["a b.yaml", "x=1"], {"V": "2"}, note="n") == (
        "#!/bin/bash\n# n\n#SBATCH --nodes=4\n#SBATCH --requeue\n#SBATCH --time=1:00:00\n\n"
        "# This run (written by ddptrain submit):\nset -- 'a b.yaml' x=1\nexport V=2\n\necho \"$@\"\n")
    # a template without #SBATCH lines gets them after its leading comments
    assert render("#!/bin/bash\n# mine\nmodule load x\n", [("nodes", "2")], ["c.yaml"], {}, note="n") == \
        "#!/bin/bash\n# n\n#SBATCH --nodes=2\n\n# This run (written by ddptrain submit):\nset -- c.yaml\nmodule load x\n"


STUBS = {  # stand-ins for SLURM's commands and the Python interpreter: they say how they were called
    "scontrol": 'if [ "$1 $2" = "show hostnames" ]; then echo n1; echo n2; else echo "JobState=RUNNING Restarts=0"; fi',
    "scancel": "true",
    "srun": 'while [ "${1#--}" != "$1" ]; do shift; done; echo "srun: MASTER=${MASTER_ADDR:-}:${MASTER_PORT:-} '
            'SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-}"; SLURM_NODEID=0 exec "$@"',
    # the batch script's own step runner is ddptrain's, run for real; the training command only says how it was called
    "python": f'[ "$1 $2" = "-m ddptrain.slurm" ] && exec {sys.executable} "$@"; '
              'echo "python OMP_NUM_THREADS=${OMP_NUM_THREADS:-} $*"',
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("allocation, nproc, threads", [
    ({"SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_PER_TASK": "64"}, 8, "8"),
    ({"SLURM_GPUS_PER_NODE": "a100:4"}, 4, ""),
    ({"CUDA_VISIBLE_DEVICES": "0,1,2"}, 3, ""),
    ({"NPROC_PER_NODE": "2", "SLURM_CPUS_PER_TASK": "2"}, 2, "1"),
    ({}, 1, ""),
])
def test_torchrun_script_takes_processes_per_node_from_the_allocation(tmp_path, allocation, nproc, threads):
    """slurm/ddptrain.sbatch run by bash with SLURM's variables for a 2-node job and stub commands."""
    for name, body in STUBS.items():
        write(tmp_path / name, f"#!/bin/bash\n{body}\n").chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "PYTHON": str(tmp_path / "python"), "SLURM_JOB_ID": "123",
           "SLURM_JOB_NAME": "exp", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_NUM_NODES": "2", **allocation}
    proc = subprocess.run(["bash", SLURM / "ddptrain.sbatch", "exp.yaml", "optim.lr=0.1"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"nodes: n1 n2 (2 x {nproc} processes); rendezvous n1:20123" in proc.stdout
    assert f"srun: MASTER=: SRUN_CPUS_PER_TASK={allocation.get('SLURM_CPUS_PER_TASK', '')}\n" in proc.stdout
    assert (f"python OMP_NUM_THREADS={threads} -m ddptrain.agent --nnodes=2 --nproc-per-node={nproc} "
            f"--rdzv-backend=c10d --rdzv-endpoint=n1:20123 --rdzv-id=123 --rdzv-conf=is_host=1 --max-restarts=0 "
            f"-m ddptrain train exp.yaml optim.lr=0.1\n") in proc.stdout

    srun = subprocess.run(["bash", SLURM / "ddptrain_srun.sbatch", "exp.yaml"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=30, env={**env, "SLURM_NTASKS": "16", "SLURM_TASKS_PER_NODE": "8(x2)"})
    assert srun.returncode == 0, srun.stdout + srun.stderr
    assert "srun: MASTER=n1:20123 " in srun.stdout and "python OMP_NUM_THREADS=" in srun.stdout
    assert srun.stdout.rstrip().splitlines()[-2].endswith(" -m ddptrain train exp.yaml")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("env, args, nproc", [
    ({"SLURM_GPUS_ON_NODE": "8"}, [], "8"),
    ({"NPROC_PER_NODE": "2"}, [], "2"),
    ({"SLURM_GPUS_ON_NODE": "8"}, ["--nproc-per-node", "4"], None),
])
def test_sweep_script_takes_processes_per_trial_from_the_allocation(tmp_path, env, args, nproc):
    """slurm/ddptrain_sweep.sbatch run by bash as array task 1 with stub commands."""
    for name, body in STUBS.items():
        write(tmp_path / name, f"#!/bin/bash\n{body}\n").chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "PYTHON": str(tmp_path / "python"), "SLURM_JOB_ID": "124",
           "SLURM_JOB_NAME": "exp-sweep", "SLURM_ARRAY_JOB_ID": "123", "SLURM_ARRAY_TASK_ID": "1",
           "SLURMD_NODENAME": "n2", **env}
    proc = subprocess.run(["bash", SLURM / "ddptrain_sweep.sbatch", "exp.yaml", "space.yaml", "--trials", "8", *args,
                           "seed=1"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "=== ddptrain job 123_1 (exp-sweep, job id 124) attempt 1 started" in proc.stdout
    expected = " ".join(["-m ddptrain sweep exp.yaml space.yaml --trials 8", *args, "seed=1"]) + \
        (f" --nproc-per-node {nproc}" if nproc else "")
    assert proc.stdout.rstrip().splitlines()[-2].endswith(expected), proc.stdout


@pytest.mark.timeout(120)
def test_submit_sweep_renders_a_job_array_of_workers_and_checks_the_space_first(tmp_path):
    write(tmp_path / "exp.yaml", SWEEP)
    write(tmp_path / "space.yaml", SPACE)
    proc = submit("exp.yaml", "--sweep", "space.yaml", "--tasks", 3, "--gpus-per-node", 4, "--trials", 30,
                  "--storage", "postgresql://me@db/sweeps", "--time=1:00:00", "seed=2", "--dry-run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout
    assert re.findall(r"^#SBATCH --(\S+)$", script, re.M) == [
        "job-name=exp-sweep", "nodes=1", "ntasks-per-node=1", "output=logs/%x-%A_%a.out", "open-mode=append",
        "requeue", "signal=B:USR1@120", "gpus-per-node=4", "time=1:00:00", "array=0-2"]
    assert (f"set -- {tmp_path / 'exp.yaml'} {tmp_path / 'space.yaml'} --trials 30 --storage "
            f"postgresql://me@db/sweeps seed=2\n") in script
    assert 'exec "$PYTHON" -m ddptrain.slurm step sweep -- srun --ntasks=1 --kill-on-bad-exit=0 "$PYTHON" -m ddptrain sweep "$@"\n' in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0

    for args, message in [
        (["--nodes", 2], "--nodes 2: a sweep runs one worker per node; give the number of workers with --tasks"),
        (["--sampler", "grid"], "--sampler grid needs choices, not ranges, for: optim.lr"),
        (["optim.lr=-1"], "override 'optim.lr=-1': config key 'optim.lr': expected > 0, got -1"),
    ]:
        bad = submit("exp.yaml", "--sweep", "space.yaml", "--nproc-per-node", 1, *args, "--dry-run", cwd=tmp_path)
        assert bad.returncode == 2 and bad.stderr.startswith(f"ddptrain: error: {message}"), bad.stderr
        assert bad.stderr.count("\n") == 1
    write(tmp_path / "typo.yaml", SPACE.replace("val_loss", "val_los"))
    typo = submit("exp.yaml", "--sweep", "typo.yaml", "--nproc-per-node", 1, "--dry-run", cwd=tmp_path)
    assert typo.returncode == 2 and "objective 'val_los' is never reported; did you mean 'val_loss'?" in typo.stderr
    alone = submit("exp.yaml", "--nproc-per-node", 1, "--tasks", 2, "--dry-run", cwd=tmp_path)
    assert alone.returncode == 2 and alone.stderr == "ddptrain: error: --tasks: only with --sweep SPACE\n"


@pytest.mark.timeout(120)
def test_submit_dry_run_renders_a_script_that_sbatch_accepts(tmp_path, cluster):
    write(tmp_path / "exp.yaml", PLAIN)
    proc = submit("exp.yaml", "--nodes", 2, "--nproc-per-node", 2, "--time=00:10:00", "--account=ml",
                  "--exclusive", "optim.lr=0.02", "--dry-run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout
    header = re.findall(r"^#SBATCH --(\S+)$", script, re.M)
    assert header == ["job-name=exp", "nodes=2", "ntasks-per-node=1", "output=logs/%x-%j.out", "open-mode=append",
                      "requeue", "signal=B:USR1@120", "cpus-per-task=2", "time=00:10:00", "account=ml", "exclusive"]
    assert f"set -- {tmp_path / 'exp.yaml'} optim.lr=0.02\n" in script and "export NPROC_PER_NODE=2\n" in script
    assert "--rdzv-backend=c10d" in script and "-m ddptrain.agent --nnodes" in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    # SLURM checks it without queueing it (the account is unknown to this cluster: no accounting)
    test_only = subprocess.run(["sbatch", "--test-only"], input=script.replace("#SBATCH --account=ml\n", ""),
                               cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert test_only.returncode == 0 and "to start at" in test_only.stderr, test_only.stderr

    srun = submit("exp.yaml", "--launcher", "srun", "--nodes", 2, "--gpus-per-node", 8, "--dry-run", cwd=tmp_path)
    assert srun.returncode == 0, srun.stderr
    assert re.findall(r"^#SBATCH --(ntasks-per-node|gpus-per-node)=(\d+)$", srun.stdout, re.M) == \
        [("ntasks-per-node", "8"), ("gpus-per-node", "8")]
    assert "srun --kill-on-bad-exit=0 \"$PYTHON\" -m ddptrain train" in srun.stdout


@pytest.mark.timeout(120)
def test_submit_names_what_is_wrong(tmp_path, cluster):
    write(tmp_path / "exp.yaml", PLAIN)
    no_sbatch = submit("exp.yaml", "--nproc-per-node", 2, cwd=tmp_path, env=job_env(PATH=str(Path(sys.executable).parent)))
    assert no_sbatch.returncode == 2
    assert no_sbatch.stderr.startswith("ddptrain: error: sbatch not found on PATH") and no_sbatch.stderr.count("\n") == 1
    rejected = submit("exp.yaml", "--nproc-per-node", 2, "--partition=nope", cwd=tmp_path)
    assert rejected.returncode == 1
    assert rejected.stderr == ("ddptrain: error: sbatch rejected the job (exit status 1): invalid partition specified: "
                               "nope; Batch job submission failed: Invalid partition name specified\n")
    odd = submit("exp.yaml", "--nproc-per-node", 3, cwd=tmp_path)  # before anything reaches SLURM
    assert odd.returncode == 2 and "64 must be divisible by world_size * train.grad_accum_steps = 3 * 1" in odd.stderr
    array = submit("exp.yaml", "--nproc-per-node", 2, "--array=0-3", cwd=tmp_path)
    assert array.returncode == 2 and "slurm/ddptrain_array.sbatch" in array.stderr


# --- jobs that overlap -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def batch(cluster, tmp_path_factory):
    """Submit every job of the tests below at once: name -> (job id, its directory). Once they have trained
    3 steps, a thread sends USR1 to the batch shell of the jobs that test preemption, as `--signal=B:USR1@120`
    does before the time limit (`scancel --batch --signal=USR1`), and cancels one job (`scancel`)."""
    submitted, out = [], {}

    def sbatch(name, *args, config=PLAIN, env=None, files=None):
        cwd = tmp_path_factory.mktemp(name)
        write(cwd / "exp.yaml", config)
        for file, text in (files or {}).items():
            write(cwd / file, text)
        (cwd / "logs").mkdir()
        proc = subprocess.run(["sbatch", "--parsable", *map(str, args)], cwd=cwd, env=env or job_env(),
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        submitted.append(proc.stdout.strip())
        out[name] = (submitted[-1], cwd)
        return cwd

    try:
        # The sweeps first, so that both tasks of each array start at once.
        cwd = tmp_path_factory.mktemp("sweep")
        write(cwd / "exp.yaml", SWEEP)
        write(cwd / "space.yaml", SPACE)
        proc = submit("exp.yaml", "--sweep", "space.yaml", "--tasks", 2, "--nproc-per-node", 1, "--trials", 4,
                      "--time=00:10:00", cwd=cwd)
        assert proc.returncode == 0, proc.stderr
        submitted.append(proc.stdout.strip())
        out["sweep"] = (submitted[-1], cwd, proc.stderr)
        sbatch("sweep_usr1", "--job-name=sw", "--array=0-1", "--cpus-per-task=1", SLURM / "ddptrain_sweep.sbatch",
               "exp.yaml", "space.yaml", "--trials", 3, config=SWEEP, files={"space.yaml": SPACE},
               env=job_env(NPROC_PER_NODE="1"))
        cwd = tmp_path_factory.mktemp("submit")
        write(cwd / "exp.yaml", PLAIN)
        proc = submit("exp.yaml", "--nodes", 1, "--nproc-per-node", 2, "--time=00:10:00", cwd=cwd)
        assert proc.returncode == 0, proc.stderr
        submitted.append(proc.stdout.strip())
        out["submit"] = (submitted[-1], cwd, proc.stderr)
        sbatch("two_nodes", "--job-name=exp", "--nodes=2", "--cpus-per-task=1", SLURM / "ddptrain.sbatch", "exp.yaml",
               "runs_dir=runs", env=job_env(NPROC_PER_NODE="1"))
        sbatch("srun", "--job-name=exp", "--nodes=2", "--ntasks-per-node=2", SLURM / "ddptrain_srun.sbatch",
               "exp.yaml", "runs_dir=runs")
        sbatch("fails", "--job-name=exp", "--nodes=2", SLURM / "ddptrain_srun.sbatch", "exp.yaml", "optim.lr=-1")
        sbatch("usr1", "--job-name=exp", "--nodes=2", "--cpus-per-task=1", SLURM / "ddptrain.sbatch", "exp.yaml",
               "runs_dir=runs", config=SLOW.format(delay=0.03), env=job_env(NPROC_PER_NODE="1"))
        sbatch("array", "--job-name=arr", "--array=0-1", "--cpus-per-task=2", SLURM / "ddptrain_array.sbatch",
               "runs.txt", config=SLOW.format(delay=0.03), env=job_env(NPROC_PER_NODE="2"),
               files={"runs.txt": "# two runs of the same config\nexp.yaml name=a runs_dir=runs\n\n"
                                  "exp.yaml name=b runs_dir=runs\n"})
        sbatch("cancel", "--job-name=exp", "--ntasks-per-node=2", SLURM / "ddptrain_srun.sbatch", "exp.yaml",
               "runs_dir=runs", config=SLOW.format(delay=0.03))

        signal_errors = []

        def signal_at_step_3(job, find_run_dir, how):
            try:
                wait_for_step(find_run_dir(), 3, job, timeout=180)
                subprocess.run(["scancel", *how, job], check=True, timeout=30)
            except BaseException as e:  # reported by the tests that need the signal
                signal_errors.append(repr(e))

        sweep_task = f"{out['sweep_usr1'][0]}_1"
        signallers = [threading.Thread(target=signal_at_step_3, args=args, daemon=True) for args in [
            (out["usr1"][0], lambda: out["usr1"][1] / "runs" / "exp", ["--batch", "--signal=USR1"]),
            (f"{out['array'][0]}_1", lambda: out["array"][1] / "runs" / "b", ["--batch", "--signal=USR1"]),
            (out["cancel"][0], lambda: out["cancel"][1] / "runs" / "exp", []),
            (sweep_task, lambda: trial_started(out["sweep_usr1"][1] / "logs" / f"sw-{sweep_task}.out", sweep_task),
             ["--batch", "--signal=USR1"])]]
        for signaller in signallers:
            signaller.start()

        def signals_sent():
            deadline = time.monotonic() + 280  # within the timeout of the tests that call this
            for signaller in signallers:
                signaller.join(max(deadline - time.monotonic(), 0))
            assert not any(t.is_alive() for t in signallers) and not signal_errors, \
                signal_errors or "signals not sent in 280 s"
        out["signals_sent"] = signals_sent
        yield out
    finally:
        if submitted:
            subprocess.run(["scancel", *submitted], capture_output=True, timeout=60)


@pytest.mark.timeout(240)
def test_one_node_job_from_ddptrain_submit_matches_torchrun(batch, plain_reference):
    job, cwd, said = batch["submit"]
    assert re.fullmatch(r"\d+", job) and f"log logs/exp-{job}.out" in said
    info = wait_for(job, 180)
    log = log_of(cwd, "exp", job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", log
    assert "nodes: n1 (1 x 2 processes)" in log and re.search(r"^torch 2\.\S+, CUDA None, NCCL none", log, re.M)
    assert_same_run(cwd / "runs" / "exp", plain_reference)


@pytest.mark.timeout(240)
def test_two_node_torchrun_job_matches_torchrun(batch, plain_reference):
    job, cwd = batch["two_nodes"]
    info = wait_for(job, 180)
    log = log_of(cwd, "exp", job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", log
    assert "nodes: n1 n2 (2 x 1 processes)" in log
    assert_same_run(cwd / "runs" / "exp", plain_reference)  # 2 nodes x 1 = 1 node x 2, bitwise


@pytest.mark.timeout(240)
def test_srun_per_task_job_matches_torchrun(batch, plain_reference):
    job, cwd = batch["srun"]
    info = wait_for(job, 180)
    log = log_of(cwd, "exp", job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", log
    assert "(4 tasks: 2(x2) per node)" in log
    run = cwd / "runs" / "exp"
    assert summary(run)["world_size"] == 4
    assert_same_run(run, plain_reference, exact=False)  # 4 ranks vs 2, same global batch


@pytest.mark.timeout(240)
def test_a_job_that_fails_is_not_requeued(batch):
    job, cwd = batch["fails"]
    info = wait_for(job, 180)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0" and info["Restarts"] == "0"
    assert "ddptrain: error: override 'optim.lr=-1': config key 'optim.lr': expected > 0, got -1" in log_of(cwd, "exp", job)


# --- preemption: checkpoint, requeue, resume, the uninterrupted result -----------------------------------

@pytest.mark.timeout(300)
def test_signal_before_the_time_limit_checkpoints_requeues_and_resumes(batch, slow_reference):
    batch["signals_sent"]()
    job, cwd = batch["usr1"]
    info = wait_for(job, 240)
    log = log_of(cwd, "exp", job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    assert attempts(log) == [1, 2]
    first, second = log.split(" attempt 2 started")
    assert "SIGUSR1" in first and "passing it to the training processes" in first
    assert f"ddptrain: requeued job {job}\n" in first and "requeuing it" not in log
    assert "command: ddptrain train exp.yaml runs_dir=runs checkpoint.resume=auto" in second
    run = cwd / "runs" / "exp"
    assert 3 <= summary(run)["resumed_at_step"] < 24
    assert train_steps(run) == list(range(1, 25))  # nothing lost, nothing repeated
    assert_same_run(run, slow_reference, ignore_config=("task_args.delay",))


@pytest.mark.timeout(300)
def test_job_array_runs_one_line_per_task_and_requeues_only_the_signalled_task(batch, slow_reference):
    batch["signals_sent"]()
    array, cwd = batch["array"]
    first, second = wait_for(f"{array}_0", 240), wait_for(f"{array}_1", 240)
    logs = [(cwd / "logs" / f"arr-{array}_{i}.out").read_text() for i in (0, 1)]
    assert first["JobState"] == second["JobState"] == "COMPLETED", logs
    assert (first["Restarts"], second["Restarts"]) == ("0", "1")
    assert attempts(logs[0]) == [1] and attempts(logs[1]) == [1, 2]
    assert f"ddptrain: requeued job {array}_1\n" in logs[1]
    assert summary(cwd / "runs" / "b")["resumed_at_step"] > 0
    for name in "ab":
        assert_same_run(cwd / "runs" / name, slow_reference, ignore_config=("name", "task_args.delay"))


# --- sweeps: a job array of workers on one study ------------------------------------------------------------

def study_of(sweep_dir: Path):
    import optuna
    return optuna.load_study(study_name=sweep_dir.name, storage=f"sqlite:///{sweep_dir / 'study.db'}")


def val_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in records(run_dir) if r["split"] == "val"]


@pytest.mark.timeout(300)
def test_sweep_from_ddptrain_submit_shares_one_study_between_its_array_tasks(batch):
    array, cwd, said = batch["sweep"]
    assert f"log logs/exp-sweep-{array}_<task>.out; study runs/exp-sweep/study.db" in said
    infos = [wait_for(f"{array}_{i}", 240) for i in (0, 1)]
    logs = [(cwd / "logs" / f"exp-sweep-{array}_{i}.out").read_text() for i in (0, 1)]
    assert [(i["JobState"], i["Restarts"]) for i in infos] == [("COMPLETED", "0")] * 2, logs
    assert f"command: ddptrain sweep {cwd / 'exp.yaml'} {cwd / 'space.yaml'} --trials 4 --nproc-per-node 1\n" in logs[0]
    study = study_of(cwd / "runs" / "exp-sweep")
    ran = [t for t in study.trials if "log" in t.user_attrs]  # the others: started when the study was full
    assert [t.state.name for t in ran] == ["COMPLETE"] * 4
    assert sorted(p.name for p in (cwd / "runs" / "exp-sweep" / "logs").iterdir()) == \
        [f"trial-{t.number:04d}.log" for t in ran]  # each trial ran once, in its own run directory
    for t in ran:
        assert Path(t.user_attrs["log"]).read_text().count("done: ") == 1
        assert t.user_attrs["run_dir"] == str(cwd / "runs" / "exp-sweep" / f"trial-{t.number:04d}")
    workers = {t.user_attrs["worker"] for t in ran}
    assert {w.split("@")[0] for w in workers} == {f"{array}_0", f"{array}_1"}  # both tasks ran trials
    with open(cwd / "runs" / "exp-sweep" / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["worker"] for r in rows if r["state"] == "COMPLETE"} <= workers


@pytest.mark.timeout(300)
def test_a_signalled_sweep_task_requeues_itself_and_its_trial_continues_from_its_checkpoint(batch):
    batch["signals_sent"]()
    array, cwd = batch["sweep_usr1"]
    first, second = wait_for(f"{array}_0", 240), wait_for(f"{array}_1", 240)
    logs = [(cwd / "logs" / f"sw-{array}_{i}.out").read_text() for i in (0, 1)]
    assert (first["JobState"], first["Restarts"], second["JobState"], second["Restarts"]) == \
        ("COMPLETED", "0", "COMPLETED", "1"), logs
    assert attempts(logs[0]) == [1] and attempts(logs[1]) == [1, 2]
    before = logs[1].split(" attempt 2 started")[0]
    assert "SIGUSR1" in before and "passing it to the sweep" in before and "requeuing it" not in logs[1]
    assert "ddptrain: sweep stopped by SIGUSR1" in before and f"ddptrain: requeued job {array}_1\n" in before
    study = study_of(cwd / "runs" / "exp-sweep")
    assert sum(t.state.name == "COMPLETE" for t in study.trials) == 3
    (stopped,) = [t for t in study.trials if t.user_attrs.get("note", "").startswith("stopped with the sweep")]
    assert stopped.state.name == "FAIL" and "(SIGUSR1, exit status 75)" in stopped.user_attrs["note"]
    assert stopped.user_attrs["worker"].startswith(f"{array}_1@")
    # its parameters ran again in a later trial (on either task), continuing the same run from its checkpoint
    (resumed,) = [t for t in study.trials if t.user_attrs.get("resume_run_dir") == stopped.user_attrs["run_dir"]]
    assert resumed.number > stopped.number and resumed.state.name == "COMPLETE" and resumed.params == stopped.params
    run = Path(stopped.user_attrs["run_dir"])
    assert resumed.user_attrs["run_dir"] == str(run) and 3 <= summary(run)["resumed_at_step"] < 18
    assert train_steps(run) == list(range(1, 19))  # nothing lost, nothing repeated
    vals = val_losses(run)  # the pruner saw every validation of the run, those before the stop included
    assert resumed.intermediate_values == dict(enumerate(vals)) and resumed.value == min(vals)


@pytest.mark.timeout(300)
def test_scancel_stops_a_job_for_good(batch):
    """scancel sends SIGTERM like a preemption, and SLURM would still accept a requeue: ddptrain must not."""
    batch["signals_sent"]()
    job, cwd = batch["cancel"]
    info = wait_for(job, 120)  # a requeued job would run again and complete
    log = log_of(cwd, "exp", job)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", log
    assert f"ddptrain: job {job} is being cancelled (JobState=" in log and attempts(log) == [1]
    assert summary(cwd / "runs" / "exp")["status"] == "preempted"  # it did save a checkpoint


# --- alone: the cluster itself preempts the job ------------------------------------------------------------

@pytest.mark.timeout(300)
def test_a_job_preempted_by_the_cluster_resumes_after_the_preemptor(tmp_path, jobs, slow_reference):
    """The "urgent" partition preempts "debug" (tests/slurm_cluster.sh): SLURM sends SIGTERM to every task and
    gives it GraceTime; ddptrain checkpoints and requeues the job, which runs again once the nodes are free."""
    deadline = time.monotonic() + 120  # the preemptor would preempt any other job still running
    while subprocess.run(["squeue", "-h"], capture_output=True, text=True, timeout=30).stdout.strip():
        assert time.monotonic() < deadline, "jobs of earlier tests are still queued"
        time.sleep(0.5)
    write(tmp_path / "exp.yaml", SLOW.format(delay=0.03))
    job = jobs("--job-name=exp", "--nodes=2", "--ntasks-per-node=1", SLURM / "ddptrain_srun.sbatch", "exp.yaml",
               "runs_dir=runs", cwd=tmp_path)
    run = tmp_path / "runs" / "exp"
    wait_for_step(run, 3, job)
    urgent = jobs("--partition=urgent", "--nodes=2", "--exclusive", "--output=/dev/null", "--wrap=sleep 1",
                  cwd=tmp_path)
    info, preemptor = wait_for(job, 240), wait_for(urgent, 60)
    log = log_of(tmp_path, "exp", job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    assert preemptor["JobState"] == "COMPLETED"
    assert attempts(log) == [1, 2]
    assert f"ddptrain: requeued job {job}\n" in log
    assert info["StartTime"] >= preemptor["EndTime"]  # the second attempt ran after the preemptor
    assert train_steps(run) == list(range(1, 25))
    assert_same_run(run, slow_reference, ignore_config=("task_args.delay",))
