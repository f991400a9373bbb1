"""No clobbered run, nothing left behind, no endless divergence: the run-directory lock, temporaries of killed
writers, a full disk, and non-finite steps in a row."""
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ddptrain import checkpoint
from ddptrain.config import to_dict
from ddptrain.configfile import from_dict
from ddptrain.dist import detect
from ddptrain.nonfinite import NonFiniteError
from ddptrain.run import run

import tasks_for_tests

TESTS = Path(__file__).resolve().parent


def strict_json(path: Path):
    def refuse(name):
        raise ValueError(f"{path}: {name} is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def write_config(tmp_path: Path, name: str, **extra) -> Path:
    f = tmp_path / f"{name}.yaml"
    cfg = {"task": "tasks_for_tests:regression_for_launch", "name": "shared", "runs_dir": str(tmp_path / "runs"),
           "data": {"batch_size": 16}, "train": {"epochs": 2}, **extra}
    f.write_text(json.dumps(cfg))  # JSON is YAML
    return f


def test_a_second_run_in_the_same_directory_is_refused_while_the_first_runs(tmp_path):
    hold = tmp_path / "hold"
    first = subprocess.Popen([sys.executable, "-m", "ddptrain", "train", str(write_config(
        tmp_path, "a", task_args={"delay": 0.02, "hold_while": str(hold)}))], cwd=TESTS, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    lock = tmp_path / "runs" / ".shared.lock"
    deadline = time.monotonic() + 60
    while not (lock.exists() and lock.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    hold.touch()  # the first run holds the lock with seconds of training left: now its items wait for the second
    # another config with the same name, as in a typo'd copy of a config
    second = subprocess.run([sys.executable, "-m", "ddptrain", "train", str(write_config(tmp_path, "b", seed=1))],
                            cwd=TESTS, capture_output=True, text=True, timeout=60)
    hold.unlink()
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert second.returncode == 2
    assert second.stderr.startswith(f"ddptrain: error: run directory '{tmp_path / 'runs' / 'shared'}' is in use by "
                                    f"another run (host ") and f"pid {first.pid}" in second.stderr
    assert second.stderr.count("\n") == 1
    summary = json.loads((tmp_path / "runs" / "shared" / "summary.json").read_text())
    assert summary["status"] == "completed" and not (tmp_path / "runs" / "shared" / "archive").exists()
    assert lock.read_text() == ""  # released


def test_a_lock_left_by_a_dead_run_and_its_temporaries_are_taken_over(tmp_path, diagnostics):
    run_dir = tmp_path / "r"
    (run_dir / "checkpoints").mkdir(parents=True)
    (tmp_path / ".r.lock").write_text(json.dumps({"host": "node7", "pid": 999999, "slurm_job": "42", "since": "then"}))
    orphan = run_dir / "checkpoints" / ".step-000000004.pt.tmp999999"
    orphan.write_bytes(b"\0" * 2**20)  # what a writer killed mid-save leaves
    (run_dir / "summary.json.tmp").write_text("{")
    cfg = from_dict({"task": "tasks_for_tests:regression", "runs_dir": str(tmp_path), "name": "r",
                     "data": {"batch_size": 16}, "train": {"epochs": 1}})
    assert run(cfg, detect({}))["status"] == "completed"
    assert not orphan.exists() and not (run_dir / "summary.json.tmp").exists()
    assert any("taking over the lock of a run that ended without releasing it (host node7, pid 999999, SLURM job 42"
               in m for m in diagnostics)


@pytest.fixture
def small_disk(tmp_path):
    """A 700 KiB tmpfs (the SLURM and network-namespace tests need root too)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.parametrize("async_save", [False, True])
def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(small_disk, async_save):
    # each checkpoint is about 200 KiB (the model and AdamW's two moments); the third does not fit. Written in
    # the background, its failure is reported at the next save, the same way.
    args = [sys.executable, "-m", "ddptrain", "train", str(write_config(
        small_disk.parent, "full", runs_dir=str(small_disk), task_args={"width": 2000},
        checkpoint={"every_steps": 2, "keep_last": 2, "save_best": False, "async_save": async_save},
        train={"epochs": 3}))]
    proc = subprocess.run(args, cwd=TESTS, capture_output=True, text=True, timeout=120)
    ckpts = small_disk / "shared" / "checkpoints"
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"ddptrain: error: checkpoint '{ckpts / 'step-000000006.pt'}': no space left on "
                                  f"the device (") and "MiB needed); the previous checkpoint is kept\n" in proc.stderr
    assert proc.stderr.count("\n") == 1
    kept = checkpoint.step_files(ckpts)
    assert [p.name for p in kept] == ["step-000000002.pt", "step-000000004.pt"]
    assert all(checkpoint.verify(p) is None for p in kept)
    assert not list(ckpts.glob(".*tmp*"))  # nothing left to keep the disk full


def diverging(max_skips):
    return from_dict({"task": "tasks_for_tests:regression", "name": "d", "data": {"batch_size": 16},
                      "optim": {"name": "sgd", "lr": 1e6, "momentum": 0.0}, "train": {
                          "epochs": 4, "nonfinite": "skip", "max_skips_in_a_row": max_skips, "log_every": 1}})


def test_export_to_a_full_disk_is_one_line_and_keeps_the_previous_file(small_disk, tmp_path):
    # 300,000 weights (1.2 MB) do not fit on the 700 KiB disk
    run(from_dict({"task": "tasks_for_tests:regression", "task_args": {"width": 30000}, "name": "wide",
                   "runs_dir": str(tmp_path), "data": {"batch_size": 48}, "train": {"epochs": 1}}), detect({}))
    out = small_disk / "model.pt"
    out.write_bytes(b"an earlier export")
    proc = subprocess.run([sys.executable, "-m", "ddptrain", "export", str(tmp_path / "wide"), "-o", str(out)],
                          cwd=TESTS, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"ddptrain: error: -o '{out}': cannot write it (No space left on device)\n"
    assert out.read_bytes() == b"an earlier export" and [p.name for p in small_disk.iterdir()] == ["model.pt"]


def test_skipping_non_finite_steps_gives_up_after_a_few_in_a_row(tmp_path):
    cfg = from_dict({**to_dict(diverging(3)), "runs_dir": str(tmp_path)})
    with pytest.raises(NonFiniteError, match=r"3 steps in a row skipped for non-finite gradients "
                                             r"\(train.max_skips_in_a_row=3\)") as raised:
        run(cfg, detect({}))
    # skipping already: the hint is what to try next, not to turn on skipping
    assert "nonfinite=skip" not in str(raised.value) and "train.clip_grad_norm" in str(raised.value)
    diagnostic = strict_json(tmp_path / "d" / "nonfinite.json")  # valid JSON, though lr and losses may be inf
    assert diagnostic["step"] < 24


def test_a_run_that_ends_with_a_nan_loss_is_not_a_success(tmp_path):
    def nan_in_val(cfg):
        task = tasks_for_tests.regression(cfg)
        task.val.tensors[0][3, 0] = float("nan")
        return task
    cfg = from_dict({"task": "tasks_for_tests:regression", "runs_dir": str(tmp_path), "name": "d",
                     "data": {"batch_size": 16}, "train": {"epochs": 1}})
    with pytest.raises(NonFiniteError, match="training ended, but the val loss is not finite"):
        run(cfg, detect({}), nan_in_val)
    summary = strict_json(tmp_path / "d" / "summary.json")
    assert summary["status"] == "nonfinite" and summary["val"]["loss"] == "nan"


@pytest.mark.parametrize("extra, status, message", [
    ({"checkpoint": {"resume": "/no/such.pt"}}, 2, "checkpoint '/no/such.pt': not found"),
    ({"optim": {"name": "sgd", "lr": 1e6}}, 3, "the weights became non-finite after step"),
    ({"task": "tasks_for_tests:unused_parameter"}, 2, r"some of the model's parameters took no part in the loss of "
                                                      r"step 1, .*set dist.find_unused_parameters: true"),
    # rank 1 SIGKILLed: whichever torchrun notices first, rank 0's collective failure or the killed rank, is the line
    ({"task_args": {"kill_after": 20}, "dist": {"timeout_s": 5}}, 4,
     r"\[rank 0\] a collective failed during training|rank 1 \(pid \d+\) was killed by SIGKILL; the run resumes"),
])
def test_launch_passes_the_workers_status_through_with_one_line(tmp_path, extra, status, message):
    proc = subprocess.run([sys.executable, "-m", "ddptrain", "launch", "--nproc-per-node", "2",
                           str(write_config(tmp_path, "c", **extra))], cwd=TESTS, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == status, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "ddptrain: error:" in line]
    assert re.search(message, errors[0]) and "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr
    # a user mistake or a decision taken together is said once, by rank 0; a killed rank by the launcher, which
    # may notice the death after rank 0 has said what it saw: then both, each once, the cause last
    assert len(errors) == 1 or (status == 4 and len(errors) == 2 and "a collective failed" in errors[0]
                                and "was killed by SIGKILL" in errors[1]), proc.stderr


def test_a_task_module_that_raises_on_import_is_one_line_with_its_file_and_line(tmp_path):
    (tmp_path / "broken.py").write_text("import torch\n\nSETTINGS = {}['missing']\n")
    (tmp_path / "c.yaml").write_text("task: broken.py:build\n")
    proc = subprocess.run([sys.executable, "-m", "ddptrain", "train", "c.yaml"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr == (
        "ddptrain: error: config key 'task': importing 'broken.py' raised KeyError: 'missing' (broken.py:3)\n")
    debug = subprocess.run([sys.executable, "-m", "ddptrain", "train", "c.yaml", "--debug"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
    assert debug.returncode == 2 and "Traceback (most recent call last)" in debug.stderr


def test_running_a_finished_run_again_leaves_its_results_as_they_were(tmp_path):
    args = [sys.executable, "-m", "ddptrain", "train", str(write_config(tmp_path, "again"))]
    assert subprocess.run(args, cwd=TESTS, capture_output=True, timeout=120).returncode == 0
    run_dir = tmp_path / "runs" / "shared"
    before = {f: (run_dir / f).read_bytes() for f in ("summary.json", "metrics.jsonl", "config.yaml")}
    again = subprocess.run(args, cwd=TESTS, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "already trained" in again.stdout
    assert {f: (run_dir / f).read_bytes() for f in before} == before


def test_model_keys_that_the_task_does_not_read_are_reported_and_not_pinned_and_a_resume_is_said(tmp_path, diagnostics):
    base = {"task": "tasks_for_tests:regression", "runs_dir": str(tmp_path), "name": "m", "data": {"batch_size": 16},
            "train": {"epochs": 1}}
    run(from_dict({**base, "model": {"hidden": [8]}}), detect({}))
    assert diagnostics == ["model.hidden is set, but task 'tasks_for_tests:regression' does not read cfg.model (only "
                           "the built-in tasks' MLP does): ignored, and not pinned when the run resumes"]
    resumed = run(from_dict({**base, "model": {"hidden": [4, 4]}, "train": {"epochs": 2}}), detect({}))
    assert resumed["resumed_at_step"] == 6 and resumed["steps"] == 12  # not refused for model.hidden
    said = f"resuming from '{tmp_path / 'm' / 'checkpoints' / 'step-000000006.pt'}' at step 6, after epoch 0"
    assert diagnostics[-1] == said  # a resumed run says so; one that had ended says its summary alone:
    run(from_dict({**base, "model": {"hidden": [4, 4]}, "train": {"epochs": 2}}), detect({}))
    assert diagnostics.count(said) == 1 and not any(m.startswith("resuming from") and m != said for m in diagnostics)
    built_in = {"task": "diabetes", "runs_dir": str(tmp_path), "name": "b", "train": {"epochs": 1}}
    run(from_dict(built_in), detect({}))
    with pytest.raises(Exception, match=r"\(model\.hidden: \[256, 128\] -> \[8\]\)"):
        run(from_dict({**built_in, "model": {"hidden": [8]}, "train": {"epochs": 2}}), detect({}))


def test_diagnostics_go_through_the_ddptrain_logger(tmp_path, diagnostics):
    (tmp_path / ".r.lock").write_text(json.dumps({"host": "h", "pid": 1, "since": "t"}))
    cfg = from_dict({"task": "tasks_for_tests:regression", "runs_dir": str(tmp_path), "name": "r",
                     "data": {"batch_size": 16}, "train": {"epochs": 1}})
    run(cfg, detect({}))
    assert diagnostics == [f"run directory '{tmp_path / 'r'}': taking over the lock of a run that ended without "
                           f"releasing it (host h, pid 1, since t)"]


@pytest.mark.parametrize("task, workers, message", [
    ("label_out_of_range", 0, "on rank 0, raised IndexError: Target 9 is out of bounds. ("),
    ("bad_sample", 0, "ddptrain: error: the training data raised ValueError: sample 41 is corrupt (tasks_for_tests.py:"),
    # raised in a DataLoader worker: torch raises it again with the worker's traceback as text
    ("bad_sample", 1, "ddptrain: error: the training data raised ValueError: sample 41 is corrupt (tasks_for_tests.py:"),
])
def test_bad_data_met_mid_run_is_one_line(tmp_path, task, workers, message):
    (tmp_path / "c.yaml").write_text(f"task: tasks_for_tests:{task}\nruns_dir: {tmp_path}\ntrain: {{epochs: 2}}\n"
                                     f"data: {{num_workers: {workers}}}\n")
    proc = subprocess.run([sys.executable, "-m", "ddptrain", "train", str(tmp_path / "c.yaml")], cwd=TESTS,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def test_bad_data_met_mid_run_on_one_rank_is_one_line_under_launch(tmp_path):
    # sample 41 is on one rank: the other, in the gradient all-reduce, said "[rank 1] a collective failed" as a
    # second error line, and its status 4 came through instead of the user mistake's 2
    (tmp_path / "c.yaml").write_text(f"task: tasks_for_tests:bad_sample\nruns_dir: {tmp_path}\ntrain: {{epochs: 2}}\n")
    proc = subprocess.run([sys.executable, "-m", "ddptrain", "launch", "--nproc-per-node", "2", str(tmp_path / "c.yaml")],
                          cwd=TESTS, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith(
        "ddptrain: error: the training data raised ValueError: sample 41 is corrupt (tasks_for_tests.py:") and \
        proc.stderr.count("\n") == 1, proc.stderr


def test_a_warning_every_rank_meets_is_said_once_under_launch(tmp_path):
    # each rank builds the task: both said that the task does not read model.hidden
    (tmp_path / "c.yaml").write_text(f"task: tasks_for_tests:regression\nruns_dir: {tmp_path}\ntrain: {{epochs: 1}}\n"
                                     "model: {hidden: [8]}\n")
    proc = subprocess.run([sys.executable, "-m", "ddptrain", "launch", "--nproc-per-node", "2", str(tmp_path / "c.yaml")],
                          cwd=TESTS, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr.count("does not read cfg.model") == 1, proc.stderr


WRONG_LINEAR = """import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(8, 4), nn.Linear(8, 1)  # the head should take 4 features
        self.aux = nn.Linear(4, 4)

    def forward(self, x):
        h = self.body(x)
        if not self.training:  # the pre-flight check runs in eval mode: it misses the wrong head
            return self.aux(h).sum(1, keepdim=True)
        return self.head(h)
"""


@pytest.mark.parametrize("command, compile", [(["train"], False), (["train"], True),
                                              (["launch", "--nproc-per-node", "2"], False)])
def test_a_wrong_layer_size_met_mid_run_names_the_model_files_line(tmp_path, command, compile):
    # raised inside torch (F.linear): the line is the model's, not torch's; under torch.compile torch raised it
    # from its own frames alone, and the message named torch/_dynamo/exc.py; under launch, every rank met it
    # and each said it ("[rank 1] ddptrain: error: ..." below rank 0's line)
    (tmp_path / "wrong_model.py").write_text(WRONG_LINEAR)
    (tmp_path / "task.py").write_text(
        "import torch\nfrom torch.utils.data import TensorDataset\nimport ddptrain\nfrom wrong_model import Net\n\n"
        "def build(cfg):\n    data = TensorDataset(torch.randn(64, 8), torch.randn(64, 1))\n"
        "    return ddptrain.Task(model=Net(), train=data, loss=torch.nn.functional.mse_loss)\n")
    (tmp_path / "c.yaml").write_text(f"task: task.py:build\nruns_dir: runs\ndata: {{batch_size: 16}}\n"
                                     f"train: {{epochs: 1, compile: {str(compile).lower()}}}\n")
    proc = subprocess.run([sys.executable, "-m", "ddptrain", *command, "c.yaml"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    last = proc.stderr.strip().splitlines()[-1]  # torch.compile logs the failure on its own lines first
    assert proc.returncode == 2 and last.startswith("ddptrain: error: the model or the loss, at step 1 on rank 0, "
                                                    "raised ") and last.endswith(" (wrong_model.py:15)"), proc.stderr
    assert compile or proc.stderr.count("\n") == 1, proc.stderr


def test_the_users_frame_is_below_no_installed_packages_frame(tmp_path):
    from ddptrain.importing import user_frame
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "site-packages" / "somelib.py").write_text("def layer(x):\n    raise ValueError('bad width')\n")
    (tmp_path / "mine.py").write_text("import somelib\n\n\ndef forward(x):\n    return somelib.layer(x)\n")
    sys.path[:0] = [str(tmp_path / "site-packages"), str(tmp_path)]
    try:
        import mine
        with pytest.raises(ValueError) as caught:
            mine.forward(1)
    finally:
        del sys.path[:2]
        sys.modules.pop("mine", None), sys.modules.pop("somelib", None)
    assert user_frame(caught.value) == f"{tmp_path / 'mine.py'}:5"  # before: site-packages/somelib.py:2
