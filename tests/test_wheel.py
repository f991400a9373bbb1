"""What `pip install ddptrain` gives, without extras, in a fresh virtual environment outside the checkout: a
two-process run of the user's own task, `ddptrain submit --dry-run` (its batch scripts ship in the wheel),
`ddptrain eval`, sharded training and `ddptrain export`, a stream read by workers, and `ddptrain plot`'s
one-line install hint."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

TASK = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset
import ddptrain

def build(cfg):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 6, generator=g)
    y = (x.sum(1) > 0).long()
    train, val, test = ddptrain.split(TensorDataset(x, y), [0.2, 0.2], seed=0)
    return ddptrain.Task(model=nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2)), train=train, val=val,
                         test=test, loss=nn.functional.cross_entropy,
                         metrics={"accuracy": lambda out, y: (out.argmax(-1) == y).float()})


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(256, 6, generator=g)
        for i in ddptrain.shard(range(256)):
            yield x[i], (x[i].sum() > 0).long()


def stream(cfg):
    return ddptrain.Task(model=nn.Linear(6, 2), train=Stream(), loss=nn.functional.cross_entropy)
'''


def test_a_plain_wheel_install_runs_the_documented_commands(tmp_path):
    def sh(*args, cwd=tmp_path, ok=True, timeout=600):
        proc = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
        assert (proc.returncode == 0) == ok, f"{args}: {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        return proc

    sh(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp_path / "dist", ROOT)
    wheel = next((tmp_path / "dist").glob("ddptrain-*.whl"))
    sh(sys.executable, "-m", "venv", tmp_path / "venv")
    venv = tmp_path / "venv" / "bin"
    sh(venv / "pip", "install", "-q", "torch==2.13.0", wheel)  # the CPU build; no extras
    (tmp_path / "mytask.py").write_text(TASK)
    (tmp_path / "mine.yaml").write_text("task: mytask:build\ndata: {batch_size: 32}\ntrain: {epochs: 20}\n")

    sh(venv / "ddptrain", "launch", "--nproc-per-node", "2", "mine.yaml")
    summary = json.loads((tmp_path / "runs" / "mine" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["test"]["accuracy"] > 0.75
    assert "test (" in sh(venv / "ddptrain", "eval", "runs/mine").stdout

    # sharded training and its export; a stream read by DataLoader workers (torchdata comes with the wheel)
    sh(venv / "ddptrain", "launch", "--nproc-per-node", "2", "mine.yaml", "name=sharded", "dist.strategy=fsdp")
    assert "wrote" in sh(venv / "ddptrain", "export", "runs/sharded", "-o", "model.pt").stdout
    sh(venv / "ddptrain", "train", "mine.yaml", "name=stream", "task=mytask:stream", "data.num_workers=2",
       "train.epochs=2")
    assert json.loads((tmp_path / "runs" / "stream" / "summary.json").read_text())["epochs_completed"] == 2

    script = sh(venv / "ddptrain", "submit", "mine.yaml", "--nodes", "1", "--nproc-per-node", "2", "--dry-run").stdout
    assert script.startswith("#!/bin/bash") and "-m ddptrain.agent" in script and "mine.yaml" in script

    plot = sh(venv / "ddptrain", "plot", "runs/mine", ok=False)
    assert plot.returncode == 2 and plot.stderr == "ddptrain: error: ddptrain plot needs 'matplotlib': pip install " \
                                                   "'ddptrain[plot]'\n"
