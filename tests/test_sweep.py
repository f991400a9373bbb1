"""Hyperparameter sweeps: real trials (subprocess runs), real Optuna storage, checked before any trial starts."""
import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ddptrain.cli import main

from wandb_files import read_run

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


def train_steps(run_dir: Path) -> list[int]:
    """The train steps logged so far (complete lines only: the run may be writing the next one)."""
    path = run_dir / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    lines = text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]
    return [json.loads(line)["step"] for line in lines if '"split": "train"' in line]


def wait_until(condition, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)


@pytest.mark.timeout(600)
def test_digits_sweep_two_workers(tmp_path):
    config = write(tmp_path / "digits.yaml", "task: digits\ntrain:\n  epochs: 2\n  log_every: 100\n")
    space = write(tmp_path / "space.yaml", """
objective: val_accuracy
direction: maximize
params:
  optim.lr: {type: float, low: 1.0e-5, high: 3.0e-2, log: true}
  model.hidden: {choices: [[32], [256, 128]]}
  train.epochs: 2
pruner: {name: none}
""")
    proc = sweep(tmp_path, config, space, "--sampler", "random", "--trials", "4", "--workers", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep_dir = tmp_path / "runs" / "digits-sweep"
    rows = trials(sweep_dir)
    assert len(rows) == 4 and {r["state"] for r in rows} == {"COMPLETE"}
    values = [float(r["val_accuracy"]) for r in rows]
    assert max(values) > min(values)
    for name in ("best_config.yaml", "best.json", "history.png", "importance.png", "study.db"):
        assert (sweep_dir / name).stat().st_size > 0
    best = json.loads((sweep_dir / "best.json").read_text())
    assert best["value"] == max(values)
    assert f"best: trial {best['trial']}, val_accuracy" in proc.stdout and "| COMPLETE |" in proc.stdout
    assert f"model.hidden={json.dumps(best['params']['model.hidden'])}" in proc.stdout  # as an override, not a dict
    # the best config, run again, reproduces its objective exactly
    rerun = subprocess.run([sys.executable, "-m", "ddptrain", "train", str(sweep_dir / "best_config.yaml"),
                            f"runs_dir={tmp_path / 'again'}"], env=ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    events = [json.loads(l) for l in open(tmp_path / "again" / "digits-best" / "metrics.jsonl")]
    assert max(e["accuracy"] for e in events if e["split"] == "val") == best["value"]


REGRESSION = "task: tasks_for_tests:regression\ndata:\n  batch_size: 16\ntrain:\n  epochs: 2\n"


def test_grid_sampler_covers_exactly_the_grid_and_wandb_groups_the_trials(tmp_path):
    config = write(tmp_path / "reg.yaml", REGRESSION)
    space = write(tmp_path / "space.yaml", """
objective: val_loss
direction: minimize
params:
  optim.lr: {choices: [0.01, 0.1]}
  optim.name: {choices: [sgd, adam]}
pruner: {name: none}
""")
    proc = sweep(tmp_path, config, space, "--sampler", "grid", "--trials", "50", "wandb.enabled=true",
                 "wandb.mode=offline")
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep_dir = tmp_path / "runs" / "reg-sweep"
    rows = trials(sweep_dir)
    grid = {(json.loads(r["optim.lr"]), json.loads(r["optim.name"])) for r in rows}
    assert len(rows) == 4 and grid == {(lr, n) for lr in (0.01, 0.1) for n in ("sgd", "adam")}
    for r in rows:  # every trial's wandb run is in one group named after the study
        (run_file,) = (sweep_dir / r["run"] / "wandb").glob("offline-run-*/run-*.wandb")
        assert read_run(run_file)["group"] == "reg-sweep"


@pytest.mark.timeout(300)
def test_a_grid_runs_each_point_once_with_two_workers_and_when_run_again(tmp_path):
    """Optuna's grid sampler hands out a running point again once every point is taken (the first worker done
    while the second runs), and a visited one to a finished study run again: neither runs twice."""
    config = write(tmp_path / "reg.yaml", "task: tasks_for_tests:regression_for_launch\ntask_args: {delay: 0.005}\n"
                                          "data: {batch_size: 16}\ntrain: {epochs: 2}\n")
    space = write(tmp_path / "space.yaml", "objective: val_loss\ndirection: minimize\npruner: {name: none}\n"
                  "params:\n  optim.lr: {choices: [0.01, 0.02]}\n")
    args = (config, space, "--sampler", "grid", "--trials", "50", "--workers", "2")
    first = sweep(tmp_path, *args)
    assert first.returncode == 0, first.stderr[-3000:]
    sweep_dir = tmp_path / "runs" / "reg-sweep"
    ran = sorted(json.loads(r["optim.lr"]) for r in trials(sweep_dir) if r["state"] == "COMPLETE")
    assert ran == [0.01, 0.02], trials(sweep_dir)
    again = sweep(tmp_path, *args)
    assert again.returncode == 0 and "started" not in again.stdout and "re-evaluating" not in again.stderr, \
        again.stdout + again.stderr[-3000:]
    assert sorted(d.name for d in sweep_dir.glob("trial-*")) == ["trial-0000", "trial-0001"]


@pytest.mark.timeout(300)
def test_stopped_sweep_continues_without_repeating_finished_trials(tmp_path):
    """SIGTERM (a preemption) stops the sweep with 75, SIGINT (Ctrl-C) with 130; either way the interrupted
    trial is queued again and continues its run from its checkpoint, and no finished trial runs again."""
    config = write(tmp_path / "reg.yaml", "task: tasks_for_tests:regression_for_launch\ntask_args: {delay: 0.01}\n"
                                          "data: {batch_size: 16}\ntrain: {epochs: 3, log_every: 1}\n")  # 18 x 0.16 s
    space = write(tmp_path / "space.yaml", "objective: val_loss\ndirection: minimize\npruner: {name: none}\n"
                  "params:\n  optim.lr: {low: 0.001, high: 0.1, log: true}\n")
    cmd = [sys.executable, "-m", "ddptrain", "sweep", str(config), str(space), "--trials", "3"]
    env = {k: v for k, v in ENV.items() if not k.startswith("SLURM_")}  # outside SLURM: nothing to requeue
    sweep_dir = tmp_path / "runs" / "reg-sweep"
    logs, run = sweep_dir / "logs", sweep_dir / "trial-0002"

    def start():
        return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    first = start()
    wait_until(lambda: len(train_steps(run)) >= 2, first)  # trials 0 and 1 are done, 2 is training
    done_before = {p: p.stat().st_mtime for p in [*logs.iterdir(), *sweep_dir.glob("trial-000[01]/*")]
                   if p.name != "trial-0002.log"}
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=60)
    assert first.returncode == 75, err[-3000:]
    assert "ddptrain: sweep stopped by SIGTERM; run the same command again to continue" in err
    stopped_at = train_steps(run)[-1]
    queued = trials(sweep_dir)[-1]  # its parameters shown: the table had an empty cell
    assert queued["state"] == "WAITING" and queued["optim.lr"] == trials(sweep_dir)[2]["optim.lr"] != ""

    second = start()  # trial 3 continues trial 2's run; Ctrl-C stops it again
    wait_until(lambda: train_steps(run)[-1:] >= [stopped_at + 2], second)
    second.send_signal(signal.SIGINT)
    out, err = second.communicate(timeout=60)
    assert second.returncode == 130 and "ddptrain: sweep stopped by SIGINT; run the same command" in err, err[-3000:]
    assert f"; run {run} (continued from its checkpoint), log {logs / 'trial-0003.log'}" in out

    third = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]
    rows = trials(sweep_dir)
    assert [(r["state"], r["run"]) for r in rows] == [
        ("COMPLETE", "trial-0000"), ("COMPLETE", "trial-0001"), ("FAIL", "trial-0002"), ("FAIL", "trial-0002"),
        ("COMPLETE", "trial-0002")]
    assert rows[2]["note"].startswith("stopped with the sweep (SIGTERM, exit status 75); queued again")
    assert rows[3]["note"].startswith("stopped with the sweep (SIGINT, exit status 75); queued again")
    assert len({rows[i]["optim.lr"] for i in (2, 3, 4)}) == 1 and len({r["optim.lr"] for r in rows}) == 3
    assert all(p.stat().st_mtime == t for p, t in done_before.items())  # finished trials did not run again
    result = json.loads((run / "summary.json").read_text())
    assert result["status"] == "completed" and result["resumed_at_step"] > stopped_at
    assert train_steps(run) == list(range(1, 19))  # across three sessions: no step lost or repeated
    import optuna  # the pruner saw every validation of the run, those of earlier sessions included
    study = optuna.load_study(study_name="reg-sweep", storage=f"sqlite:///{sweep_dir / 'study.db'}")
    vals = [json.loads(line)["loss"] for line in open(run / "metrics.jsonl") if '"split": "val"' in line]
    assert study.trials[4].intermediate_values == dict(enumerate(vals)) and study.trials[4].value == min(vals)


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
    ran = [t for t in study.trials if "log" in t.user_attrs]
    # exactly the budget: a trial that a worker started when the other had just taken the last place
    # is recorded as not run
    assert [t.state.name for t in ran] == ["COMPLETE"] * 6
    assert all(t.user_attrs["note"].startswith("not run: the study already has its 6 trials")
               for t in study.trials if "log" not in t.user_attrs)
    logs = sorted(p.name for p in (tmp_path / "runs" / "shared" / "logs").iterdir())
    assert logs == [f"trial-{t.number:04d}.log" for t in ran]  # each trial ran in exactly one place
    for t in ran:
        assert Path(t.user_attrs["log"]).read_text().count("done: ") == 1
        assert re.fullmatch(r".+:\d+", t.user_attrs["worker"])  # host:pid outside SLURM


@pytest.mark.parametrize("space, message", [
    ("objective: val_loss\nparams:\n  optim.lrr: {low: 0.1, high: 1}\n", "unknown config key 'optim.lrr'; did you mean 'optim.lr'?"),
    ("objective: val_loss\nparams:\n  optim.lr: {low: 0.1, high: 0.01}\n", "empty or inverted range [0.1, 0.01]"),
    ("objective: val_loss\nparams:\n  optim.lr: {low: 0.1, high: 0.1}\n", "empty or inverted range"),
    ("objective: val_loss\nparams:\n  optim.weight_decay: {low: 0, high: 0.1, log: true}\n", "a log range must be above 0"),
    ("objective: val_loss\nparams:\n  optim.lr: {choices: []}\n", "choices must be a non-empty list"),
    ("objective: val_loss\nparams:\n  optim.lr: {low: -1, high: 0.1}\n", "config key 'optim.lr': expected > 0, got -1.0"),
    ("objective: val_acc\nparams:\n  optim.lr: {low: 0.01, high: 0.1}\n", "objective 'val_acc' is never reported; the runs report val_loss, val_mse"),
    ("objective: val_loss\nparams:\n  optim.lr: {low: 0.01, high: 0.1}\n", "--sampler grid needs choices, not ranges, for: optim.lr"),
    ("objective: val_loss\nparams:\n  optim.lr: {low: 0.01, high: 0.1}\npruner: median\n",
     "pruner must be a mapping such as {name: median}, got 'median'"),
    ("objective: val_loss\nparams:\n  optim.lr: {low: 0.01, high: 0.1}\npruner: {name: median, n_startup_trials: -1}\n",
     "search space: pruner median: Number of startup trials cannot be negative"),
    ("objective: val_loss\nparams:\n  optim.lr: {low: 0.01, high: .inf}\n",
     "search space key 'optim.lr': a range needs finite low and high, got [0.01, inf]"),
    ("objective: val_loss\nparams:\n  optim.lr: {type: int, low: 0.5, high: 3}\n",
     "config key 'optim.lr': expected > 0, got 0.0"),  # the integers suggested, 0 to 3, are checked
    ("objective: val_loss\nparams:\n  optim.lr: {low: 0.01, high: 0.1, log: \"false\"}\n",
     "search space key 'optim.lr': log must be true or false, got 'false'"),
    ("objective: val_mse\nparams:\n  optim.lr: {low: 0.01, high: 0.1}\n",
     "direction: maximize or minimize val_mse? (a loss is minimized, the monitored metric follows early_stop.mode"),
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


def test_a_bad_value_in_a_search_space_names_the_space_file_and_its_line(tmp_path, capsys, monkeypatch):
    # it was "config key 'model.hidden': ...", naming neither file, as if the config were wrong
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    config = write(tmp_path / "reg.yaml", REGRESSION)
    write(tmp_path / "space.yaml", "objective: val_loss\nparams:\n  optim.lr: {low: 0.01, high: 0.1}\n"
                                   "  model.hidden: {choices: [[16], wide]}\n")
    assert main(["sweep", str(config), "space.yaml"]) == 2
    assert capsys.readouterr().err == ("ddptrain: error: space.yaml:4: config key 'model.hidden': expected a list "
                                       "of integers, got 'wide'\n")


def test_a_search_space_file_that_cannot_be_read_is_named_as_one(tmp_path, capsys, monkeypatch):
    # it was "config file 'nope.yaml': not found", though the config was there
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    config = write(tmp_path / "reg.yaml", REGRESSION)
    assert main(["sweep", str(config), "nope.yaml"]) == 2
    assert capsys.readouterr().err == "ddptrain: error: search space file 'nope.yaml': not found\n"
    assert main(["sweep", str(config), str(write(tmp_path / "space.yaml", "params: {a: [1,\n"))]) == 2
    assert capsys.readouterr().err.startswith(f"ddptrain: error: search space file '{tmp_path / 'space.yaml'}': cannot parse")


def test_a_storage_url_that_cannot_be_opened_is_one_line_without_its_password(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    config = write(tmp_path / "reg.yaml", REGRESSION)
    space_file = write(tmp_path / "space.yaml", "objective: val_loss\nparams:\n  optim.lr: {low: 0.01, high: 0.1}\n")
    assert main(["sweep", str(config), str(space_file), "--storage", "nosuchdb://me:hunter2@db/study"]) == 2
    err = capsys.readouterr().err
    assert err == ("ddptrain: error: --storage 'nosuchdb://me:***@db/study': Can't load plugin: "
                   "sqlalchemy.dialects:nosuchdb; expected a database URL such as sqlite:///study.db\n"), err


def test_a_database_that_cannot_be_opened_is_one_line_and_leaves_no_sweep_directory(tmp_path, capsys, monkeypatch):
    # before: SQLAlchemy's OperationalError as a traceback after five tries, and an empty runs/<study>/ left
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    monkeypatch.setattr(time, "sleep", lambda s: None)  # the tries between racing workers
    config = write(tmp_path / "reg.yaml", REGRESSION)
    space_file = write(tmp_path / "space.yaml", "objective: val_loss\nparams:\n  optim.lr: {low: 0.01, high: 0.1}\n")
    url = f"sqlite:///{tmp_path}/no/such/dir/study.db"
    assert main(["sweep", str(config), str(space_file), "--storage", url, "runs_dir=out"]) == 2
    assert capsys.readouterr().err == f"ddptrain: error: --storage '{url}': cannot open it: unable to open database file\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("url, module, package", [("postgresql://me:hunter2@db/study", "psycopg", "psycopg"),
                                                  ("mysql://me@db/study", "MySQLdb", "mysqlclient")])
def test_a_storage_url_whose_driver_is_missing_names_that_driver(tmp_path, capsys, monkeypatch, url, module, package):
    # before: a traceback with Optuna's "Please install appropriate one", after five tries
    monkeypatch.setitem(sys.modules, module, None)  # not installed, whether or not it is on this machine
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    config = write(tmp_path / "reg.yaml", REGRESSION)
    space_file = write(tmp_path / "space.yaml", "objective: val_loss\nparams:\n  optim.lr: {low: 0.01, high: 0.1}\n")
    assert main(["sweep", str(config), str(space_file), "--storage", url]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ddptrain: error: --storage '{url.replace('hunter2', '***')}': SQLAlchemy's driver for "
                          f"it, the module '{module}', is not installed: pip install {package}, ") and \
        err.count("\n") == 1, err


def test_a_crashing_trial_is_recorded_as_failed_and_the_sweep_goes_on(tmp_path):
    config = write(tmp_path / "reg.yaml", REGRESSION)
    space = write(tmp_path / "space.yaml", "objective: val_loss\ndirection: minimize\npruner: {name: none}\n"
                  "params:\n  data.batch_size: {choices: [16, 5000]}\n")  # 5000 > the training set: that run fails
    proc = sweep(tmp_path, config, space, "--sampler", "grid", "--trials", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {json.loads(r["data.batch_size"]): r for r in trials(tmp_path / "runs" / "reg-sweep")}
    assert rows[16]["state"] == "COMPLETE" and rows[5000]["state"] == "FAIL"
    assert "is larger than the training set" in Path(rows[5000]["log"]).read_text()


def test_validation_values_are_read_as_numbers_nan_included(tmp_path):
    from ddptrain.sweep import _val_values
    lines = [{"split": "val", "step": 2, "loss": 0.5}, {"split": "train", "step": 3, "loss": 0.1},
             {"split": "val", "step": 4, "loss": "nan"}, {"split": "val", "step": 6, "loss": "inf"}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"split": "va')
    values, seen = _val_values(tmp_path / "metrics.jsonl", 0, "loss")
    assert seen == 4 and values[0] == 0.5 and math.isnan(values[1]) and values[2] == math.inf


@pytest.mark.parametrize("space, message", [
    ("objective: val_loss\ndirection: maximize\n", "was run to minimize val_loss; the search space asks to maximize val_loss"),
    ("objective: val_mse\ndirection: minimize\n", "was run to minimize val_loss; the search space asks to minimize val_mse"),
])
def test_continuing_a_study_with_another_direction_or_objective_fails_before_any_trial(tmp_path, capsys, monkeypatch,
                                                                                        space, message):
    import optuna
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    config = write(tmp_path / "reg.yaml", REGRESSION)
    params = "params:\n  optim.lr: {low: 0.01, high: 0.1}\npruner: {name: none}\n"
    (tmp_path / "runs" / "reg-sweep").mkdir(parents=True)
    storage = f"sqlite:///{tmp_path / 'runs' / 'reg-sweep' / 'study.db'}"
    study = optuna.create_study(study_name="reg-sweep", storage=storage, direction="minimize")
    study.set_user_attr("objective", "val_loss")
    study.add_trial(optuna.trial.create_trial(params={"optim.lr": 0.05}, value=0.3,
                                              distributions={"optim.lr": optuna.distributions.FloatDistribution(0.01, 0.1)}))
    assert main(["sweep", str(config), str(write(tmp_path / "space.yaml", space + params)), "--trials", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ddptrain: error: study 'reg-sweep'") and message in err, err
    assert not (tmp_path / "runs" / "reg-sweep" / "logs").exists()


def test_a_direction_left_out_minimizes_a_loss_and_follows_early_stop_for_the_monitored_metric(tmp_path):
    from ddptrain.space import load_space
    params = "params:\n  optim.lr: {low: 0.01, high: 0.1}\n"
    loss = write(tmp_path / "loss.yaml", "objective: val_loss\n" + params)
    assert load_space(loss, {}).direction == "minimize"  # it was maximize: the sweep sought the worst trial
    monitored = write(tmp_path / "acc.yaml", "objective: val_accuracy\n" + params)
    base = {"early_stop": {"monitor": "val_accuracy", "mode": "max"}}
    assert load_space(monitored, base).direction == "maximize"


def test_the_printed_table_shows_string_choices_plainly_and_trials_csv_keeps_json(tmp_path, capsys):
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from ddptrain.configfile import from_dict
    from ddptrain.space import Param, Space
    from ddptrain.sweep_report import report
    space = Space("val_loss", "minimize", [Param("optim.name", "choice", choices=["adam", "sgd"]),
                                           Param("optim.lr", "float", low=0.001, high=0.1),
                                           Param("model.hidden", "choice", choices=[[32], [64, 32]]),
                                           Param("optim.nesterov", "choice", choices=[True, False])], {"name": "none"})
    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(
        params={"optim.name": "adam", "optim.lr": 0.01, "model.hidden": "[64, 32]", "optim.nesterov": True},
        distributions={"optim.name": CategoricalDistribution(["adam", "sgd"]),
                       "optim.lr": FloatDistribution(0.001, 0.1),
                       "model.hidden": CategoricalDistribution(["[32]", "[64, 32]"]),
                       "optim.nesterov": CategoricalDistribution([True, False])}, value=0.5))
    report(study, space, from_dict({"task": "digits"}), {"task": "digits"}, tmp_path)
    assert "| adam | 0.01 | [64, 32] | true |" in capsys.readouterr().out  # before: | "adam" |
    (row,) = trials(tmp_path)
    assert [json.loads(row[k]) for k in ("optim.name", "optim.lr", "model.hidden")] == ["adam", 0.01, [64, 32]]
