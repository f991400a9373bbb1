"""The command line as users run it: bad input gets one line and exit 2; the README's commands work."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ddptrain.cli import main

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent


def write(tmp_path, text, name="exp.yaml"):
    f = tmp_path / name
    f.write_text(text)
    return f


@pytest.mark.parametrize("config, overrides, message", [
    ("optim:\n  lrr: 0.1\n", [], "unknown config key 'optim.lrr'; did you mean 'optim.lr'?"),
    ("optim:\n  lr: -0.1\n", [], "config key 'optim.lr': expected > 0, got -0.1"),
    ("", ["optim.name=adagrad"], "config key 'optim.name': expected sgd, adam, adamw, rmsprop or an import path"),
    ("", ["early_stop.patience=-2"], "config key 'early_stop.patience': expected >= 0 or null, got -2"),
    ("task: no_such_module:build\n", [], "config key 'task': cannot import 'no_such_module'"),
    ("task: tasks_for_tests:nope\n", [], "config key 'task': 'tasks_for_tests' has no 'nope'"),
    ("task: tasks_for_tests:needs_missing_module\n", [], "task 'tasks_for_tests:needs_missing_module' needs the "
     "module 'no_such_package', which is not installed"),
    ("task: tasks_for_tests:wrong_shapes\n", [], "task 'tasks_for_tests:wrong_shapes': the model fails on a training "
     "batch of input Tensor(2, 7): mat1 and mat2 shapes cannot be multiplied"),
    ("task: tasks_for_tests:flat_targets\nloss:\n  name: mse\n", [], "loss 'mse' expects the model output (2, 1) "
     "and the target (2,) to have the same shape"),
    ("task: tasks_for_tests:flat_targets\n", [], "config key 'loss.name': the task returns no loss"),
    ("task: digits\nearly_stop:\n  monitor: val_acc\n", [], "the task reports no 'val_acc'; did you mean 'val_accuracy'?"),
    ("data:\n  batch_size: 5000\n", [], "config key 'data.batch_size': 5000 is larger than the training set"),
    ("seed: 18446744073709551616\n", [], "config key 'seed': expected an integer in [0, 2**63), got 18446744073709551616"),
    ("", ["dist.timeout_s=inf"], "config key 'dist.timeout_s': expected a finite number, got 'inf'"),
    ("", ["dist.timeout_s=1e10"], "config key 'dist.timeout_s': expected in (0, 604800] (a week), got 10000000000.0"),
    ("", ["train.compile=true", "train.compile_backend=nope"], "config key 'train.compile_backend': expected one of "),
    ("task: tasks_for_tests:raises_in_build\n", [], "task 'tasks_for_tests:raises_in_build': the task function raised "
     "FileNotFoundError: no data in /data/x ("),
    ("task: tasks_for_tests:flat_targets_own_loss\n", [], "the model output (2, 1) and the target (2,) broadcast to "
     "(2, 2) in the task's loss"),
    ("task: tasks_for_tests:batch_mean_metric\n", [], "metric 'mse' must return one value per sample (first "
     "dimension 2 here), got ()"),
    ("runs_dir: exp.yaml\n", [], "config key 'runs_dir': cannot create the run directory 'exp.yaml/exp'"),
    ("task: tasks_for_tests:first_sample_bad\n", [], "task 'tasks_for_tests:first_sample_bad': reading the training "
     f"set's first items raised ValueError: sample 0 is corrupt ({TESTS / 'tasks_for_tests.py'}:"),
    ("task: tasks_for_tests:forward_raises\n", [], "task 'tasks_for_tests:forward_raises': the model fails on a "
     f"training batch of input Tensor(2, 8): no forward today ({TESTS / 'tasks_for_tests.py'}:"),
    ("task: tasks_for_tests:metrics_as_list\n", [], "task 'tasks_for_tests:metrics_as_list': metrics must be a dict "
     "of name -> metric, got list"),
])
def test_bad_input_gives_one_line_and_exit_2(tmp_path, capsys, monkeypatch, config, overrides, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(TESTS))
    f = write(tmp_path, config + "train:\n  epochs: 1\n" if "train" not in config else config)
    assert main(["train", str(f), *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ddptrain: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()  # nothing was started


@pytest.mark.parametrize("overrides, message", [
    (["optim.args={bogus: 1}"], "config keys 'optim.name', 'optim.args': adamw with lr=0.001 and args {'bogus': 1} "
     "raised TypeError: AdamW.__init__() got an unexpected keyword argument 'bogus'"),
    (["optim.name=torch.nn.Linear"], "config keys 'optim.name', 'optim.args': torch.nn.Linear with lr=0.001 and args "
     "{} raised TypeError: Linear.__init__() got an unexpected keyword argument 'lr'"),
    (["optim.name=builtins.dict"], "builtins.dict with lr=0.001 and args {}: expected a torch.optim.Optimizer, got dict"),
    (["sched.name=torch.optim.lr_scheduler.ExponentialLR"], "config keys 'sched.name', 'sched.args': "
     "torch.optim.lr_scheduler.ExponentialLR with args {} raised TypeError: "),
    (["task=tasks_for_tests:optimizer_raises"], "the task's optimizer (Task.optimizer) raised ValueError: no such "
     "optimizer setting (tasks_for_tests.py:"),
])
def test_an_optimizer_or_schedule_that_cannot_be_built_is_one_line(tmp_path, capsys, monkeypatch, overrides, message):
    monkeypatch.chdir(TESTS)
    f = write(tmp_path, f"task: tasks_for_tests:regression\nruns_dir: {tmp_path}\ntrain:\n  epochs: 1\n")
    assert main(["train", str(f), *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ddptrain: error: ") and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("name", ["adam", "torch.optim.NAdam"])
def test_wrong_arguments_of_torchs_optimizer_leave_no_run_directory(tmp_path, capsys, monkeypatch, name):
    # found after the run directory's lock and the process group, they left runs/ with the lock file (and on NCCL
    # an empty runs/exp/flight_recorder/)
    monkeypatch.chdir(TESTS)
    f = write(tmp_path, f"task: tasks_for_tests:regression\nruns_dir: {tmp_path / 'runs'}\ntrain:\n  epochs: 1\n")
    assert main(["train", str(f), f"optim.name={name}", "optim.args={bogus: 1}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ddptrain: error: config keys 'optim.name', 'optim.args': ") and err.count("\n") == 1, err
    assert "unexpected keyword argument 'bogus'" in err and not (tmp_path / "runs").exists()


def test_bad_input_under_torchrun_exits_before_any_rank_starts(tmp_path):
    f = write(tmp_path, "data:\n  batch_size: 63\n")
    proc = subprocess.run([sys.executable, "-m", "ddptrain", "launch", "--nproc-per-node", "2", str(f)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("ddptrain: error: config key 'data.batch_size': 63 must be divisible by world_size "
                                   "* train.grad_accum_steps = 2 * 1 = 2")
    assert "Traceback" not in proc.stdout + proc.stderr


def test_a_resume_value_that_is_no_checkpoint_names_the_key_and_what_it_takes(tmp_path, capsys, monkeypatch):
    # `last` is what `ddptrain eval --checkpoint` takes; one process was told about nodes that share a filesystem
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(write(tmp_path, "train:\n  epochs: 1\n")), "checkpoint.resume=last"]) == 2
    assert capsys.readouterr().err == "ddptrain: error: config key 'checkpoint.resume': checkpoint 'last': not " \
                                      "found; expected auto, none or a checkpoint's path\n"


def test_a_task_file_not_found_says_where_a_relative_path_was_looked_for(tmp_path, capsys, monkeypatch):
    # examples/charlm.yaml names examples/charlm.py: run from another directory, the file is not found there
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "my_task.py").write_text("def build(cfg):\n    pass\n")
    f = write(tmp_path / "proj", "task: proj/my_task.py:build\n")
    monkeypatch.chdir(tmp_path / "proj")
    assert main(["train", str(f)]) == 2
    assert capsys.readouterr().err == f"ddptrain: error: config key 'task': file 'proj/my_task.py' not found (a " \
                                      f"relative path is taken from the current directory, {tmp_path / 'proj'})\n"


def test_help_tells_of_debug(capsys):
    # --debug works anywhere on the command line, but no --help named it
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--debug anywhere on the command line" in " ".join(capsys.readouterr().out.split())


def test_print_config_shows_every_default(tmp_path, capsys):
    f = write(tmp_path, "optim:\n  lr: 0.5\n")
    assert main(["train", "--print-config", str(f), "train.epochs=3"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.5" in out and "epochs: 3" in out and "bucket_cap_mb: 25.0" in out and "name: exp" in out


def test_keys_lists_every_config_key(capsys):
    from ddptrain.config import describe
    assert main(["keys"]) == 0
    out = capsys.readouterr().out
    assert all(f"| `{key}` |" in out for key, _, _ in describe())


def test_readme_documents_every_config_key(capsys):
    """The README's table is exactly what `ddptrain keys` prints: every key, its default, its description."""
    readme = (ROOT / "README.md").read_text()
    table = re.search(r"<!-- keys:start.*?-->\n(.*?)\n<!-- keys:end -->", readme, re.S).group(1)
    assert main(["keys"]) == 0
    assert table == capsys.readouterr().out.strip()


def test_import_ddptrain_is_light():
    code = ("import sys, ddptrain; heavy = [m for m in ('wandb', 'optuna', 'matplotlib', 'sklearn', 'tqdm', 'yaml')"
            " if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


def readme_command(marker: str) -> str:
    """The shell command in the README's code block that follows `<!-- marker -->`."""
    readme = (ROOT / "README.md").read_text()
    match = re.search(rf"<!-- {marker} -->\s*```(?:bash|sh)?\n(.*?)```", readme, re.S)
    assert match, f"README has no command marked {marker}"
    return match.group(1).strip()


def test_readme_main_command_trains_digits_on_two_processes():
    """The README's main command, exactly as written, run from the repository root."""
    cmd = readme_command("main-command")
    run_dir = ROOT / "runs" / "digits"
    if run_dir.exists():  # as on a fresh checkout: an earlier run here would only be reported as trained
        run_dir.rename(run_dir.with_name(f"digits-before-{time.time_ns()}"))
    proc = subprocess.run(["bash", "-c", cmd], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] > 0
    assert summary["test"]["accuracy"] >= 0.98
    assert (run_dir / "checkpoints" / "best.pt").exists() and (run_dir / "metrics.jsonl").exists()


def test_diabetes_example_reports_test_mse_and_r2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ddptrain", "train", str(ROOT / "examples" / "diabetes.yaml"),
                           f"runs_dir={tmp_path}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "diabetes" / "summary.json").read_text())
    assert summary["test"]["r2"] > 0.4 and summary["test"]["mse"] < 3500


def test_compile_option_trains_like_eager(tmp_path):
    from ddptrain import train
    cfg = {"task": "tasks_for_tests:classification", "runs_dir": str(tmp_path),
           "optim": {"lr": 0.01}, "train": {"epochs": 3}}
    eager = train(cfg)
    compiled = train({**cfg, "train": {**cfg["train"], "compile": True, "compile_backend": "aot_eager"}})
    assert compiled["val"]["accuracy"] > 0.9
    assert compiled["val"]["loss"] == pytest.approx(eager["val"]["loss"], rel=1e-4)


def test_a_task_file_imports_its_siblings_from_any_directory(tmp_path):
    # as under `python tasks/task.py`: the file's own directory is importable, not only the current one
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "sibling_net.py").write_text("from torch import nn\nNet = lambda: nn.Linear(3, 1)\n")
    (tmp_path / "tasks" / "task.py").write_text(
        "import torch\nfrom torch.utils.data import TensorDataset\nimport ddptrain\nfrom sibling_net import Net\n"
        "def build(cfg):\n    g = torch.Generator().manual_seed(0)\n"
        "    data = TensorDataset(torch.randn(32, 3, generator=g), torch.randn(32, 1, generator=g))\n"
        "    return ddptrain.Task(model=Net(), train=data, loss=torch.nn.functional.mse_loss)\n")
    f = write(tmp_path, f"task: tasks/task.py:build\nruns_dir: {tmp_path}\nname: s\ntrain:\n  epochs: 1\n"
                        "data:\n  batch_size: 16\n")
    proc = subprocess.run([sys.executable, "-m", "ddptrain", "train", str(f)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "s" / "summary.json").read_text())["steps"] == 2


def test_python_api_takes_a_task_function(tmp_path):
    import tasks_for_tests
    from ddptrain import train
    summary = train({"runs_dir": str(tmp_path), "name": "api", "train": {"epochs": 1}}, task=tasks_for_tests.regression)
    assert summary["steps"] == 96 // 64 and (tmp_path / "api" / "summary.json").exists()


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert readme_command("test-command") in ci.splitlines()


def test_launch_refuses_a_negative_max_restarts_before_starting_torchrun(tmp_path, capsys):
    assert main(["launch", "--max-restarts", "-1", str(write(tmp_path, "train:\n  epochs: 1\n"))]) == 2
    assert capsys.readouterr().err == "ddptrain: error: --max-restarts: expected 0 or more, got -1\n"


def test_errors_name_the_task_function_that_was_passed(tmp_path):
    import tasks_for_tests
    from ddptrain import train
    from ddptrain.task import TaskError
    with pytest.raises(TaskError, match=r"^task 'tasks_for_tests:batch_mean_metric': metric 'mse' must return one "
                                        r"value per sample"):
        train({"runs_dir": str(tmp_path)}, task=tasks_for_tests.batch_mean_metric)


def test_launch_refuses_sync_batchnorm_on_cpu_before_starting_torchrun(tmp_path, capsys, monkeypatch):
    def no_torchrun(*args, **kwargs):
        raise AssertionError(f"torchrun was started: {args}")
    monkeypatch.setattr(subprocess, "Popen", no_torchrun)
    f = write(tmp_path, "dist:\n  sync_batchnorm: true\n  device: cpu\n")
    assert main(["launch", "--nproc-per-node", "2", str(f)]) == 2
    assert capsys.readouterr().err == "ddptrain: error: config key 'dist.sync_batchnorm': torch's SyncBatchNorm runs " \
                                      "on GPUs only; set it to false on CPU\n"


@pytest.mark.parametrize("argv, expected", [
    (["eval", "runs/x", "--split", "train"], "ddptrain eval: argument --split: invalid choice: 'train'"),
    ([], "the following arguments are required: command"),
    (["train"], "ddptrain train: the following arguments are required: config"),
    (["submit", "c.yaml"], "ddptrain submit: one of the arguments --gpus-per-node --nproc-per-node is required"),
])
def test_a_usage_mistake_is_one_line(argv, expected, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"ddptrain: error: {expected}") and err.count("\n") == 1, err


def test_output_into_a_closed_pipe_ends_quietly():
    # `true` reads nothing and exits at once, as `head` does after its lines
    proc = subprocess.run(f"{sys.executable} -m ddptrain keys | true", shell=True, capture_output=True, text=True,
                          timeout=60)
    assert proc.stderr == "", proc.stderr


def test_a_task_error_under_launch_is_one_line_without_torchruns_thread_banner(tmp_path):
    # the user's shell has no OMP_NUM_THREADS (the suite's conftest sets one): torchrun printed four lines of
    # "Setting OMP_NUM_THREADS ..." warning above the one-line error of every launch
    f = write(tmp_path, "task: tasks_for_tests:raises_in_build\ntrain:\n  epochs: 1\n")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])])
    proc = subprocess.run([sys.executable, "-m", "ddptrain", "launch", "--nproc-per-node", "2", str(f)],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("ddptrain: error: task 'tasks_for_tests:raises_in_build'") \
        and proc.stderr.count("\n") == 1, proc.stderr


def test_the_submodules_a_task_uses_are_reached_after_a_plain_import():
    """The README writes `ddptrain.losses.R2()` and `ddptrain.data.check_fractions` after `import ddptrain`."""
    code = ("import ddptrain; print(type(ddptrain.losses.R2()).__name__, ddptrain.data.check_fractions.__name__, "
            "ddptrain.stream.shard is ddptrain.shard)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["R2", "check_fractions", "True"], out.stderr
