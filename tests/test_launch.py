"""The launch/ scripts start real torchrun agents: one node with 2 processes, and 2 nodes x 1 process."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from multirank import free_port

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ["task=tasks_for_tests:classification", "train.epochs=3", "optim.lr=0.01", "dist.timeout_s=30"]


def env_with(**extra):
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # this venv's torchrun
    env["PYTHONPATH"] = str(ROOT / "tests")
    env.update(extra)
    return env


def summary(runs: Path) -> dict:
    return json.loads((runs / "exp" / "summary.json").read_text())


@pytest.fixture
def config(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("seed: 1\n")
    return f


def test_single_node_and_two_node_launches_agree(tmp_path, config):
    one = subprocess.run([ROOT / "launch" / "single_node.sh", config, *CONFIG, f"runs_dir={tmp_path / 'one'}"],
                         env=env_with(NPROC="2"), capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr[-3000:]
    # only rank 0 speaks: one line per validation (3 epochs) and one final line
    lines = one.stdout.splitlines()
    assert sum(l.startswith("val ") for l in lines) == 3 and sum(l.startswith("done:") for l in lines) == 1

    port = str(free_port())
    nodes = [subprocess.Popen([ROOT / "launch" / "multi_node.sh", config, *CONFIG, f"runs_dir={tmp_path / 'two'}"],
                              env=env_with(NNODES="2", NODE_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                                           NPROC_PER_NODE="1"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        outs = [n.communicate(timeout=120) for n in nodes]
    finally:
        for n in nodes:
            n.kill()
    assert [n.returncode for n in nodes] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]

    a, b = summary(tmp_path / "one"), summary(tmp_path / "two")
    assert a["world_size"] == b["world_size"] == 2 and a["steps"] == b["steps"]
    assert a["val"] == pytest.approx(b["val"], rel=1e-6)


def test_multi_node_script_says_what_is_missing(config):
    proc = subprocess.run([ROOT / "launch" / "multi_node.sh", config], env=env_with(NNODES="2"),
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and "NODE_RANK" in proc.stderr


def test_accelerate_launch_starts_two_ranks(tmp_path, config):
    accelerate = Path(sys.executable).parent / "accelerate"
    proc = subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "ddptrain", "train", config,
                           *CONFIG, f"runs_dir={tmp_path / 'acc'}"],
                          env=env_with(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary(tmp_path / "acc")["world_size"] == 2


def test_a_signal_to_the_agent_is_its_status_without_torchruns_traceback(monkeypatch, capsys):
    """`ddptrain launch` forwards SIGTERM to its torchrun agent, which passes it on to the workers and then raises
    SignalException: that is status 143 (launch reads the preemption in the summary), not a 25-line traceback."""
    import signal
    import torch.distributed.run
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from ddptrain import agent

    def torchrun(argv):
        raise SignalException("Process 1 got signal: 15", sigval=signal.SIGTERM)

    monkeypatch.setattr(torch.distributed.run, "main", torchrun)
    assert agent.main([]) == 128 + signal.SIGTERM
    captured = capsys.readouterr()
    assert captured.out == captured.err == ""


def test_the_agent_forwards_usr1_and_usr2_and_starts_each_attempt_afresh_unless_told_otherwise(monkeypatch):
    """ddptrain's agent is what launch, launch/*.sh and the sbatch scripts run: the one place of these defaults."""
    import torch.distributed.run
    from ddptrain import agent
    seen = []
    monkeypatch.setattr(torch.distributed.run, "main", lambda argv: seen.append(
        (argv, os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE"))))
    monkeypatch.delenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", raising=False)
    assert agent.main(["--standalone", "-m", "ddptrain", "train", "c.yaml"]) == 0
    assert seen.pop() == (["--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2", "--standalone", "-m",
                           "ddptrain", "train", "c.yaml"], "1")
    monkeypatch.setenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "0")
    assert agent.main(["--signals-to-handle=SIGTERM", "-m", "ddptrain", "train", "c.yaml"]) == 0
    assert seen.pop() == (["--signals-to-handle=SIGTERM", "-m", "ddptrain", "train", "c.yaml"], "0")
