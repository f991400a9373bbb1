"""wandb from rank 0 only, one run continued across restarts, never fatal; curves as pictures."""
import json
import os
from pathlib import Path

import pytest

from ddptrain.cli import main
from ddptrain.configfile import from_dict
from ddptrain.dist import detect
from ddptrain.run import run

from multirank import RankFailed, run_ranks
from wandb_files import read_run

BASE = {"task": "tasks_for_tests:classification", "name": "r", "data": {"batch_size": 32},
        "train": {"epochs": 3, "log_every": 1}, "checkpoint": {"every_steps": 4},
        "dist": {"timeout_s": 20}, "wandb": {"enabled": True, "mode": "offline", "project": "tests", "tags": ["ci"]}}


def train_rank(rank, runs_dir, cfg_dict, fail_at=None):
    def hook(step, micro_step, batch):
        if rank == 1 and step == fail_at:
            raise RuntimeError("injected crash")
        return batch
    os.environ.pop("WANDB_API_KEY", None)
    cfg = from_dict({**cfg_dict, "runs_dir": str(runs_dir)})
    return run(cfg, detect(os.environ), hooks={"before_micro_step": hook})


def wandb_runs(run_dir: Path) -> list[dict]:
    return [read_run(next(d.glob("run-*.wandb"))) for d in sorted((run_dir / "wandb").glob("offline-run-*"))]


def test_two_ranks_write_exactly_one_run_with_config_metrics_and_summary(tmp_path):
    summaries = run_ranks(train_rank, 2, tmp_path, BASE, timeout=120)
    (wb,) = wandb_runs(tmp_path / "r")  # one run, not one per rank
    assert wb["config"]["optim"]["lr"] == 0.001 and wb["config"]["data"]["batch_size"] == 32
    train_rows = [h for h in wb["history"] if "train/loss" in h]
    val_rows = [h for h in wb["history"] if "val/loss" in h]
    assert [h["_step"] for h in train_rows] == list(range(1, 19))  # 6 steps per epoch, 3 epochs
    assert [h["_step"] for h in val_rows] == [6, 12, 18]
    assert {"train/lr", "train/grad_norm", "train/samples_per_s", "train/data_wait_share", "train/accuracy"} <= set(train_rows[0])
    local = [json.loads(l) for l in open(tmp_path / "r" / "metrics.jsonl")]
    assert [e["loss"] for e in local if e["split"] == "val"] == [h["val/loss"] for h in val_rows]
    s = wb["summary"]
    assert s["best/val_loss"] == summaries[0]["best_value"] and s["status"] == "completed"
    assert s["val/accuracy"] == summaries[0]["val"]["accuracy"]


def test_a_restart_continues_the_same_run_and_steps_only_increase(tmp_path):
    with pytest.raises(RankFailed):  # rank 1 crashes during step 11: attempt 1 logged steps 1..10, checkpoint at 8
        run_ranks(train_rank, 2, tmp_path, BASE, 10, timeout=120)
    run_ranks(train_rank, 2, tmp_path, BASE, timeout=120)
    first, second = wandb_runs(tmp_path / "r")
    assert first["id"] == second["id"]
    steps = [h["_step"] for h in first["history"] + second["history"] if "train/loss" in h]
    assert steps == list(range(1, 19))  # strictly increasing across attempts, none lost, none repeated


def test_a_longer_run_after_a_completed_one_sends_every_new_step(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    from ddptrain import train
    cfg = {**BASE, "task": "tasks_for_tests:regression", "task_args": {"n_test": 40}, "runs_dir": str(tmp_path),
           "checkpoint": {}, "train": {"epochs": 10, "log_every": 1, "max_steps": 8}}
    train(cfg)  # its test event comes after its last checkpoint, and the longer run does not test at step 8
    train({**cfg, "train": {**cfg["train"], "max_steps": 12}})
    steps = [h["_step"] for wb in wandb_runs(tmp_path / "r") for h in wb["history"] if "train/loss" in h]
    assert steps == list(range(1, 13))


@pytest.mark.parametrize("strategy, files", [("ddp", ["best.pt"]), ("fsdp", ["best/.metadata", "best/state.pt"])])
def test_the_best_checkpoint_is_uploaded_as_an_artifact_under_either_strategy(tmp_path, strategy, files):
    from wandb_files import records
    cfg = {**BASE, "train": {"epochs": 1}, "checkpoint": {}, "dist": {**BASE["dist"], "strategy": strategy},
           "wandb": {**BASE["wandb"], "log_best_checkpoint": True}}
    run_ranks(train_rank, 2, tmp_path, cfg, timeout=120)
    (d,) = (tmp_path / "r" / "wandb").glob("offline-run-*")
    (artifact,) = [r.artifact for r in records(next(d.glob("run-*.wandb"))) if r.WhichOneof("record_type") == "artifact"]
    assert artifact.name == "r-best" and set(files) <= {e.path for e in artifact.manifest.contents}


def test_a_damaged_best_checkpoint_is_not_uploaded(tmp_path, capsys):
    from wandb_files import records
    best = tmp_path / "r" / "checkpoints" / "best.pt"

    def damage(step, micro_step, batch):
        if step == 17 and best.exists():  # the last step: best.pt was written at an earlier validation
            best.write_bytes(best.read_bytes()[:-10])
        return batch
    cfg = from_dict({**BASE, "runs_dir": str(tmp_path), "checkpoint": {},
                     "early_stop": {"min_delta": 1e6},  # best.pt is the first validation's alone
                     "wandb": {**BASE["wandb"], "log_best_checkpoint": True}})
    summary = run(cfg, detect({}), hooks={"before_micro_step": damage})
    assert summary["status"] == "completed" and summary["tested_weights"] == "last"
    (d,) = (tmp_path / "r" / "wandb").glob("offline-run-*")
    assert not [r for r in records(next(d.glob("run-*.wandb"))) if r.WhichOneof("record_type") == "artifact"]
    assert f"wandb: '{best}' is not uploaded as the model artifact: size" in capsys.readouterr().err


def test_a_wandb_failure_leaves_training_and_local_logs_complete(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no ~/.config/wandb: online mode cannot log in
    cfg = {**BASE, "runs_dir": str(tmp_path), "wandb": {**BASE["wandb"], "mode": "online"}}
    from ddptrain import train
    summary = train(cfg)
    assert summary["status"] == "completed"
    err = capsys.readouterr().err
    assert err.count("ddptrain: warning: wandb disabled for this run after an error") == 1
    events = [json.loads(l) for l in open(tmp_path / "r" / "metrics.jsonl")]
    assert [e["step"] for e in events if e["split"] == "train"] == list(range(1, 19))


def test_a_key_from_wandb_login_makes_auto_online(tmp_path, monkeypatch):
    import wandb
    from urllib.parse import urlsplit
    from ddptrain.tracking import resolve_mode
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_mode("auto") == "offline"
    # where `wandb login` puts the key: the installed wandb's server (api.forge.coreweave.com for wandb 0.31)
    (tmp_path / ".netrc").write_text(f"machine {urlsplit(wandb.Settings().base_url).netloc} login user password k\n")
    assert resolve_mode("auto") == "online"
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")  # another server: no key for it
    assert resolve_mode("auto") == "offline"
    (tmp_path / "elsewhere").write_text("machine wandb.example.com login user password k\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "elsewhere"))  # the netrc file wandb reads
    assert resolve_mode("auto") == "online"


def test_wandb_agent_argument_style(tmp_path, capsys):
    f = tmp_path / "exp.yaml"
    f.write_text("train:\n  epochs: 1\n")
    assert main(["train", "--print-config", str(f), "--optim.lr=0.25", "--wandb.tags=[a, b]"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.25" in out and "- a\n" in out


def test_api_key_is_never_written(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "secret-key-0123456789abcdef0123456789abcdef01234567")
    monkeypatch.setenv("WANDB_MODE", "offline")
    from ddptrain import train
    train({**BASE, "runs_dir": str(tmp_path), "train": {"epochs": 1}, "wandb": {**BASE["wandb"], "mode": "auto"}})
    for path in (tmp_path / "r").rglob("*"):
        if path.is_file():
            assert b"secret-key-0123456789" not in path.read_bytes(), path


def test_plot_one_and_two_runs(tmp_path):
    from ddptrain import train
    base = {"task": "tasks_for_tests:classification", "runs_dir": str(tmp_path), "train": {"epochs": 6, "log_every": 2},
            "optim": {"lr": 0.01}, "early_stop": {"monitor": "val_accuracy", "mode": "max"}}
    a = train({**base, "name": "a"})
    stopped = train({**base, "name": "b", "early_stop": {**base["early_stop"], "patience": 0, "min_delta": 1.0}})
    assert stopped["stopped_early"]
    for dirs, png in (([tmp_path / "a"], tmp_path / "one.png"), ([tmp_path / "a", tmp_path / "b"], tmp_path / "two.png")):
        assert main(["plot", *map(str, dirs), "-o", str(png)]) == 0
        import matplotlib.image
        assert matplotlib.image.imread(png).shape[:2] == (450, 1600)
    from ddptrain.plot import plot
    fig = plot([tmp_path / "a", tmp_path / "b"], tmp_path / "again.png")
    loss, metric, lr = fig.axes
    labels = [l.get_label() for l in loss.get_lines()]
    assert labels == ["a train", "a val", "b train", "b val", "_child4"]  # the last is b's early-stop line
    expected = {f"a best (epoch {a['best_epoch']})", f"b best (epoch {stopped['best_epoch']})", "b early stop"}
    assert expected <= {l.get_label() for l in metric.get_lines()}
    (star,) = [l for l in metric.get_lines() if l.get_label().startswith("a best")]
    assert list(star.get_xdata()) == [a["best_step"]] and list(star.get_ydata()) == [a["best_value"]]
    assert [l.get_label() for l in lr.get_lines()] == ["a", "b"]
    assert len(lr.get_lines()[0].get_xdata()) == 9  # 18 steps, a record every 2
    assert [ax.get_yscale() for ax in fig.axes] == ["linear"] * 3
    assert main(["plot", str(tmp_path / "a"), "--log", "-o", str(tmp_path / "log.png")]) == 0
    assert [ax.get_yscale() for ax in plot([tmp_path / "a"], tmp_path / "log.png", log=True).axes] == \
        ["log", "linear", "log"]


def test_plot_names_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert main(["plot", str(tmp_path), "-o", str(tmp_path / "x.png")]) == 2
    assert f"run directory '{tmp_path}': no metrics.jsonl" in capsys.readouterr().err


def test_wandb_dir_from_the_environment_is_honoured(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))
    (tmp_path / "elsewhere").mkdir()
    run_ranks(train_rank, 1, tmp_path / "runs", {**BASE, "train": {"epochs": 1}}, timeout=120)
    assert not (tmp_path / "runs" / "r" / "wandb").exists()
    (wb,) = wandb_runs(tmp_path / "elsewhere")
    assert wb["summary"]["status"] == "completed"
