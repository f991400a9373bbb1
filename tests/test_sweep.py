"""Hyperparameter sweeps: real trials (subprocess runs), real Optuna storage, checked before any trial starts."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ddptrain.cli import main

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def sweep(cwd: Path, *args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ddptrain", "sweep", *map(str, args)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def trials(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "trials.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.timeout(600)
def test_digits_sweep_two_workers(tmp_path):
    config = write(tmp_path / "digits.yaml", "task: digits\ntrain:\n  epochs: 3\n  log_every: 100\n")
    space = write(tmp_path / "space.yaml", """
objective: val_accuracy
direction: maximize
params:
  optim.lr: {type: float, low: 1.0e-5, high: 3.0e-2, log: true}
  model.hidden: {choices: [[32], [256, 128]]}
  train.epochs: 3
pruner: {name: none}
""")
    proc = sweep(tmp_path, config, space, "--sampler", "random", "--trials", "6", "--workers", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep_dir = tmp_path / "runs" / "digits-sweep"
    rows = trials(sweep_dir)
    assert len(rows) == 6 and {r["state"] for r in rows} == {"COMPLETE"}
    values = [float(r["val_accuracy"]) for r in rows]
    assert max(values) > min(values)
    for name in ("best_config.yaml", "best.json", "history.png", "importance.png", "study.db"):
        assert (sweep_dir / name).stat().st_size > 0
    best = json.loads((sweep_dir / "best.json").read_text())
    assert best["value"] == max(values)
    assert f"best: trial {best['trial']}, val_accuracy" in proc.stdout and "| COMPLETE |" in proc.stdout
    # the best config, run again, reproduces its objective exactly
    rerun = subprocess.run([sys.executable, "-m", "ddptrain", "train", str(sweep_dir / "best_config.yaml"),
                            f"runs_dir={tmp_path / 'again'}"], env=ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    events = [json.loads(l) for l in open(tmp_path / "again" / "digits-best" / "metrics.jsonl")]
    assert max(e["accuracy"] for e in events if e["split"] == "val") == best["value"]


REGRESSION = "task: tasks_for_tests:regression\ndata:\n  batch_size: 16\ntrain:\n  epochs: 2\n"


def test_grid_sampler_covers_exactly_the_grid(tmp_path):
    config = write(tmp_path / "reg.yaml", REGRESSION)
    space = write(tmp_path / "space.yaml", """
objective: val_loss
direction: minimize
params:
  optim.lr: {choices: [0.001, 0.01, 0.1]}
  optim.name: {choices: [sgd, adam]}
pruner: {name: none}
""")
    proc = sweep(tmp_path, config, space, "--sampler", "grid", "--trials", "50")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = trials(tmp_path / "runs" / "reg-sweep")
    grid = {(json.loads(r["optim.lr"]), json.loads(r["optim.name"])) for r in rows}
    assert len(rows) == 6 and grid == {(lr, n) for lr in (0.001, 0.01, 0.1) for n in ("sgd", "adam")}


def test_stopped_sweep_continues_without_repeating_finished_trials(tmp_path):
    config = write(tmp_path / "reg.yaml", REGRESSION)
    space = write(tmp_path / "space.yaml", "objective: val_loss\ndirection: minimize\npruner: {name: none}\n"
                  "params:\n  optim.lr: {low: 0.001, high: 0.1, log: true}\n")
    cmd = [sys.executable, "-m", "ddptrain", "sweep", str(config), str(space), "--trials", "4"]
    first = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    logs = tmp_path / "runs" / "reg-sweep" / "logs"
    deadline = time.monotonic() + 120
    while not (logs / "trial-0002.log").exists():  # trials 0 and 1 are done, 2 is running
        assert time.monotonic() < deadline and first.poll() is None, first.communicate()[1][-3000:]
        time.sleep(0.1)
    done_before = {p.name: p.stat().st_mtime for p in logs.iterdir() if p.name != "trial-0002.log"}
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=60)
    assert first.returncode == 130 and "run the same command again to continue" in err

    again = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    rows = trials(tmp_path / "runs" / "reg-sweep")
    assert [r["state"] for r in rows] == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert all(logs.joinpath(n).stat().st_mtime == t for n, t in done_before.items())  # not run again
    assert len({r["optim.lr"] for r in rows}) == 5  # no repeated draws either


def test_pruning_stops_a_bad_trial_early(tmp_path):
    import optuna
    config = write(tmp_path / "slow.yaml", "task: tasks_for_tests:regression_for_launch\ntask_args: {delay: 0.005}\n"
                   "data: {batch_size: 16}\noptim: {name: sgd}\ntrain:\n  epochs: 8\n")  # ~0.5 s per epoch
    space = write(tmp_path / "space.yaml", """
objective: val_loss
direction: minimize
params:
  optim.lr: {low: 1.0e-9, high: 0.1, log: true}
pruner: {name: median, n_startup_trials: 2, n_warmup_steps: 0}
""")
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    study = optuna.create_study(study_name="p", storage=storage, direction="minimize")
    for lr in (0.05, 0.1, 1e-9):  # two good trials first, then a hopeless one
        study.enqueue_trial({"optim.lr": lr})
    proc = sweep(tmp_path, config, space, "--trials", "3", "--storage", storage, "--study", "p")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = trials(tmp_path / "runs" / "p")
    assert [r["state"] for r in rows] == ["COMPLETE", "COMPLETE", "PRUNED"]
    events = [json.loads(l) for l in open(tmp_path / "runs" / "p" / "trial-0002" / "metrics.jsonl")]
    assert 1 <= sum(e["split"] == "val" for e in events) < 8  # stopped long before its 8 epochs


def test_two_worker_processes_share_one_study_without_running_a_trial_twice(tmp_path):
    config = write(tmp_path / "reg.yaml", REGRESSION)
    space = write(tmp_path / "space.yaml", "objective: val_loss\ndirection: minimize\npruner: {name: none}\n"
                  "params:\n  optim.lr: {low: 0.001, high: 0.1, log: true}\n")
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    cmd = [sys.executable, "-m", "ddptrain", "sweep", str(config), str(space), "--trials", "6", "--storage", storage,
           "--study", "shared"]
    workers = [subprocess.Popen(cmd + ["--seed", str(i)], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [w.communicate(timeout=300) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    import optuna
    study = optuna.load_study(study_name="shared", storage=storage)
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers)) and 6 <= len(numbers) <= 7  # a race may start one extra
    logs = sorted(p.name for p in (tmp_path / "runs" / "shared" / "logs").iterdir())
    assert logs == [f"trial-{n:04d}.log" for n in sorted(numbers)]  # each trial ran in exactly one place
    for n in numbers:
        text = (tmp_path / "runs" / "shared" / "logs" / f"trial-{n:04d}.log").read_text()
        assert text.count("done: ") == 1


@pytest.mark.parametrize("space, message", [
    ("objective: val_loss\nparams:\n  optim.lrr: {low: 0.1, high: 1}\n", "unknown config key 'optim.lrr'; did you mean 'optim.lr'?"),
    ("objective: val_loss\nparams:\n  optim.lr: {low: 0.1, high: 0.01}\n", "empty or inverted range [0.1, 0.01]"),
    ("objective: val_loss\nparams:\n  optim.lr: {low: 0.1, high: 0.1}\n", "empty or inverted range"),
    ("objective: val_loss\nparams:\n  optim.weight_decay: {low: 0, high: 0.1, log: true}\n", "a log range must be above 0"),
    ("objective: val_loss\nparams:\n  optim.lr: {choices: []}\n", "choices must be a non-empty list"),
    ("objective: val_loss\nparams:\n  optim.lr: {low: -1, high: 0.1}\n", "config key 'optim.lr': expected > 0, got -1.0"),
    ("objective: val_acc\nparams:\n  optim.lr: {low: 0.01, high: 0.1}\n", "objective 'val_acc' is never reported; the runs report val_loss, val_mse"),
    ("objective: val_loss\nparams:\n  optim.lr: {low: 0.01, high: 0.1}\n", "--sampler grid needs choices, not ranges, for: optim.lr"),
])
def test_bad_search_spaces_fail_before_any_trial(tmp_path, capsys, monkeypatch, space, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    config = write(tmp_path / "reg.yaml", REGRESSION)
    space_file = write(tmp_path / "space.yaml", space)
    args = ["sweep", str(config), str(space_file)] + (["--sampler", "grid"] if "grid" in message else [])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("ddptrain: error: ") and message in err, err
    assert not (tmp_path / "runs" / "reg-sweep" / "logs").exists()


def test_a_crashing_trial_is_recorded_as_failed_and_the_sweep_goes_on(tmp_path):
    config = write(tmp_path / "reg.yaml", REGRESSION)
    space = write(tmp_path / "space.yaml", "objective: val_loss\ndirection: minimize\npruner: {name: none}\n"
                  "params:\n  data.batch_size: {choices: [16, 5000]}\n")  # 5000 > the training set: that run fails
    proc = sweep(tmp_path, config, space, "--sampler", "grid", "--trials", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {json.loads(r["data.batch_size"]): r for r in trials(tmp_path / "runs" / "reg-sweep")}
    assert rows[16]["state"] == "COMPLETE" and rows[5000]["state"] == "FAIL"
    assert "is larger than the training set" in Path(rows[5000]["log"]).read_text()
