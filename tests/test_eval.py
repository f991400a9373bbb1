"""Using a trained run: `ddptrain eval` and `ddptrain.evaluate` on 1, 2 and 3 ranks, and `load_model`."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ddptrain
from ddptrain.configfile import from_dict
from ddptrain.dist import detect
from ddptrain.run import run

from multirank import RankFailed, run_ranks
import tasks_for_tests

TESTS = Path(__file__).resolve().parent
# dropout: evaluation must switch it off; 40 test samples do not split evenly over 3 ranks
CFG = {"task": "tasks_for_tests:regression", "task_args": {"n_test": 40, "dropout": 0.2}, "name": "r",
       "data": {"batch_size": 16, "eval_batch_size": 7}, "optim": {"name": "adamw", "lr": 0.01}, "train": {"epochs": 4}}


def train_rank(rank, runs_dir):
    return run(from_dict({**CFG, "runs_dir": str(runs_dir)}), detect(os.environ))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("trained")
    summary = run_ranks(train_rank, 2, d)[0]
    assert summary["tested_weights"] == "best"
    return d / "r", summary


def evaluate_rank(rank, run_dir, checkpoint, split):
    return ddptrain.evaluate(run_dir, checkpoint, split)


def test_eval_gives_the_same_metrics_on_1_2_and_3_ranks_as_the_run_itself(trained):
    run_dir, summary = trained
    results = {ws: run_ranks(evaluate_rank, ws, str(run_dir), "best", "test") for ws in (1, 2, 3)}
    # The run evaluated on 2 ranks: the same shards and batches, so the same numbers to the last bit.
    assert results[2][0]["loss"] == summary["test"]["loss"] and results[2][0]["mse"] == summary["test"]["mse"]
    # Other world sizes cut the 40 samples into other batches, and a float32 matmul of another batch size may
    # round a sample's output differently (1 ulp); the sums themselves are float64.
    reference = results[1][0]
    assert reference["split"] == "test" and reference["step"] == summary["best_step"]
    for ws, per_rank in results.items():
        for values in per_rank:
            assert values.keys() == reference.keys()
            for k in ("loss", "mse"):
                assert values[k] == pytest.approx(reference[k], rel=1e-6, abs=0), (ws, k)
    last = run_ranks(evaluate_rank, 2, str(run_dir), "last", "val")[0]
    assert last["step"] == summary["steps"] and last["checkpoint"].endswith(f"step-{summary['steps']:09d}.pt")


def test_load_model_reproduces_the_final_test_predictions(trained):
    run_dir, summary = trained
    model = ddptrain.load_model(run_dir)
    assert not model.training and next(model.parameters()).device.type == "cpu"
    test = tasks_for_tests.regression(from_dict(CFG)).test
    x, y = test.tensors
    with torch.no_grad():
        mse = float(((model(x).double() - y.double()) ** 2).mean())
    assert mse == pytest.approx(summary["test"]["mse"], rel=1e-6)


def test_load_model_and_evaluate_leave_the_callers_random_streams_as_they_were(trained):
    # they seeded the global generators with the run's seed, so a script's next draws were the run's
    import random
    import numpy as np
    run_dir, _ = trained

    def draws(between=lambda: None):
        torch.manual_seed(123), random.seed(123), np.random.seed(123)
        first = torch.rand(2).tolist()
        between()
        return first, torch.rand(2).tolist(), random.random(), float(np.random.rand())

    expected = draws()
    assert draws(lambda: ddptrain.load_model(run_dir)) == expected
    assert draws(lambda: ddptrain.evaluate(run_dir)) == expected


def test_the_export_of_a_model_the_task_compiled_loads_into_the_plain_model(tmp_path):
    # its keys were the compiled wrapper's (_orig_mod.0.weight), which the plain network does not take
    from ddptrain.cli import main
    cfg = {**CFG, "runs_dir": str(tmp_path), "task_args": {**CFG["task_args"], "compiled": True}, "train": {"epochs": 1}}
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ddptrain.train(cfg)
    assert not [w for w in caught if "torch.compile" in str(w.message)]  # the pre-flight check runs the network
    assert main(["export", str(tmp_path / "r"), "-o", str(tmp_path / "model.pt")]) == 0
    plain = tasks_for_tests.regression(from_dict(CFG)).model
    plain.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))  # strict: every key, no other


def test_eval_under_launch_writes_the_result_and_bad_input_is_one_line(trained, tmp_path):
    run_dir, summary = trained
    out = tmp_path / "results" / "eval.json"  # -o makes its directory
    proc = subprocess.run([sys.executable, "-m", "ddptrain", "launch", "--nproc-per-node", "2", "eval", str(run_dir),
                           "--checkpoint", "best", "-o", str(out), "data.eval_batch_size=7"], cwd=TESTS,
                          capture_output=True, text=True, timeout=120)  # an override after the options, as in eval
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["mse"] == pytest.approx(summary["test"]["mse"], rel=1e-12)
    assert f"test ({run_dir / 'checkpoints' / 'best.pt'}, step {summary['best_step']}): loss" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "ddptrain", "eval", str(tmp_path)], cwd=TESTS, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr == f"ddptrain: error: '{tmp_path}': not a run directory (it has no " \
                                                 f"config.yaml)\n"


def test_eval_and_export_check_their_output_before_the_work(trained, tmp_path, capsys):
    from ddptrain.cli import main
    run_dir, _ = trained
    for command in ("eval", "export"):
        assert main([command, str(run_dir), "-o", str(tmp_path)]) == 2
        assert capsys.readouterr().err == f"ddptrain: error: -o '{tmp_path}': is a directory; expected a file name\n"
    assert main(["export", str(run_dir), "-o", str(tmp_path / "new" / "model.pt")]) == 0
    assert set(torch.load(tmp_path / "new" / "model.pt", weights_only=True)) == set(ddptrain.load_model(run_dir).state_dict())


def test_a_checkpoint_or_run_that_is_not_there_names_what_is_expected(trained, tmp_path, capsys):
    # `bets` for `best`: it said "checkpoint 'bets': not found", and a missing run was a "config file"
    from ddptrain.cli import main
    run_dir, _ = trained
    for command in ("eval", "export"):
        assert main([command, str(run_dir), "--checkpoint", "bets"]) == 2
        assert capsys.readouterr().err == "ddptrain: error: checkpoint 'bets': not found; expected auto, best, last " \
                                          "or a checkpoint's path\n"
        assert main([command, str(tmp_path / "nope")]) == 2
        assert capsys.readouterr().err == f"ddptrain: error: '{tmp_path / 'nope'}': not found; expected a run " \
                                          f"directory or a config file\n"


def test_auto_evaluates_the_weights_the_run_tested(tmp_path):
    # restore_best off: the run tests its last weights, and so does auto; best stays best.pt's
    cfg = {**CFG, "optim": {"name": "adamw", "lr": 0.3}, "train": {"epochs": 8}}  # best at step 30 of 48
    summary = run(from_dict({**cfg, "runs_dir": str(tmp_path), "early_stop": {"restore_best": False}}), detect({}))
    assert summary["tested_weights"] == "last" and summary["best_step"] != summary["steps"]
    auto = ddptrain.evaluate(tmp_path / "r", "auto", "test")
    assert auto["step"] == summary["steps"] and auto["loss"] == summary["test"]["loss"]
    assert ddptrain.evaluate(tmp_path / "r", "best", "test")["step"] == summary["best_step"]


def test_a_run_directory_named_by_dot_or_dot_dot_is_the_run(trained, monkeypatch, capsys):
    from ddptrain.cli import main
    run_dir, summary = trained
    monkeypatch.chdir(run_dir / "checkpoints")
    assert main(["eval", "..", "--checkpoint", "best"]) == 0
    assert f"step {summary['best_step']}): loss" in capsys.readouterr().out
    monkeypatch.chdir(run_dir)
    assert ddptrain.evaluate(".", "best")["loss"] == pytest.approx(summary["test"]["loss"], rel=1e-6)
    assert ddptrain.load_model(".").state_dict().keys() == ddptrain.load_model(run_dir).state_dict().keys()


def test_eval_writes_a_non_finite_result_as_valid_json(tmp_path, monkeypatch, capsys):
    from ddptrain import cli, trained
    monkeypatch.setattr(trained, "evaluate", lambda *args: {"split": "test", "checkpoint": "c.pt", "step": 3,
                                                            "loss": float("inf"), "mse": float("nan")})
    out = tmp_path / "eval.json"
    assert cli.main(["eval", str(tmp_path), "-o", str(out)]) == 0
    assert "test (c.pt, step 3): loss inf, mse nan" in capsys.readouterr().out

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    assert json.loads(out.read_text(), parse_constant=refuse) == {"split": "test", "checkpoint": "c.pt", "step": 3,
                                                                 "loss": "inf", "mse": "nan"}


def test_auto_says_so_when_the_best_weights_the_run_tested_are_damaged(trained, tmp_path, diagnostics):
    import shutil
    run_dir, summary = trained
    copy = tmp_path / "r"
    shutil.copytree(run_dir, copy)
    best = copy / "checkpoints" / "best.pt"
    best.write_bytes(best.read_bytes()[:100])
    assert ddptrain.evaluate(copy, "auto")["step"] == summary["steps"]
    assert diagnostics == [f"checkpoint '{best}': size 100 differs from the {(run_dir / 'checkpoints' / 'best.pt').stat().st_size} "
                           f"bytes written (truncated?); the run tested it, so the newest step checkpoint's numbers "
                           f"are not the run's"]


def evaluate_in_callers_group(rank, run_dir, launcher_variables):
    """A user's script that made the process group itself, then evaluates: under torchrun (env://), or as
    mp.spawn starts ranks (no launcher variables, the group's rank and world size given to init_process_group)."""
    import torch.distributed as dist
    if launcher_variables:
        dist.init_process_group("gloo")
    else:
        port = os.environ.pop("MASTER_PORT")
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR"):
            del os.environ[var]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    result = ddptrain.evaluate(run_dir, "best", "test")
    model = ddptrain.load_model(run_dir)
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)  # the caller's group is still theirs, and still works
    dist.destroy_process_group()
    return result, float(total), sum(float(p.detach().sum()) for p in model.parameters())


@pytest.mark.parametrize("launcher_variables", [True, False], ids=["torchrun", "spawn"])
def test_eval_inside_the_callers_process_group_uses_it_and_leaves_it_to_the_caller(trained, launcher_variables):
    # it raised "trying to initialize the default process group twice", and destroyed the caller's group at the end
    run_dir, _ = trained
    alone = run_ranks(evaluate_rank, 1, str(run_dir), "best", "test")[0]
    weights = sum(float(p.detach().sum()) for p in ddptrain.load_model(run_dir).parameters())
    for result, total, loaded in run_ranks(evaluate_in_callers_group, 2, str(run_dir), launcher_variables):
        assert result.keys() == alone.keys() and result["step"] == alone["step"]
        for k in ("loss", "mse"):
            assert result[k] == pytest.approx(alone[k], rel=1e-6, abs=0), k
        assert total == 3.0 and loaded == weights


def train_in_callers_group(rank, runs_dir):
    import datetime
    import torch.distributed as dist
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=123))
    summary = ddptrain.train({**CFG, "runs_dir": str(runs_dir)})
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)
    timeout = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu")).options._timeout
    dist.destroy_process_group()
    return summary, float(total), timeout.total_seconds()


def test_training_inside_the_callers_process_group_trains_as_under_torchrun_and_leaves_it(trained, tmp_path):
    # the same code path as eval's: it made a second default group, and destroyed the caller's at the end
    _, alone = trained  # 2 ranks, as ddptrain makes them
    for summary, total, timeout in run_ranks(train_in_callers_group, 2, tmp_path):
        assert summary["test"] == alone["test"] and summary["best_step"] == alone["best_step"]
        assert total == 3.0 and timeout == 123  # dist.timeout_s is for ddptrain's groups, not the caller's


def train_in_a_group_without_cpu(rank, runs_dir):
    """A real 2-rank group whose backend serves CUDA tensors alone, as an NCCL group does (gloo underneath, declared
    for cuda only: this machine has no NCCL)."""
    import torch.distributed as dist
    from ddptrain.config import ConfigError
    dist.Backend.register_backend("cudaonly", lambda store, rank, size, timeout: dist.ProcessGroupGloo(
        store, rank, size, timeout), devices=["cuda"])
    dist.init_process_group("cudaonly")
    try:
        ddptrain.train({**CFG, "runs_dir": str(runs_dir), "dist": {"device": "cpu"}})
    except ConfigError as e:
        return str(e)
    finally:
        dist.destroy_process_group()


def test_a_callers_group_that_cannot_carry_the_runs_tensors_is_one_line(tmp_path):
    # DDP failed at its first broadcast: "No backend type associated with device type cpu"
    for message in run_ranks(train_in_a_group_without_cpu, 2, tmp_path):
        assert message == (
            "config key 'dist.device': this run's tensors are on cpu, but the process group made before ddptrain "
            "(backend cudaonly) has no backend for cpu tensors; expected a group that carries them: make it with "
            "backend 'gloo' (or 'cpu:gloo,cuda:nccl'), or set dist.device to match it")
    assert not list(tmp_path.rglob("*.pt"))


def group_against_variables(rank, port):
    import torch.distributed as dist
    from ddptrain.config import ConfigError
    from ddptrain.dist import DistEnv, in_callers_group
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        in_callers_group(DistEnv(rank=1, world_size=2, launcher="torchrun"))
    except ConfigError as e:
        return str(e)
    finally:
        dist.destroy_process_group()


def test_a_callers_group_that_contradicts_the_launcher_variables_is_one_line():
    from multirank import free_port
    assert run_ranks(group_against_variables, 1, free_port())[0] == (
        "the process group made before ddptrain has rank 0 of 1, but the torchrun variables say rank 1 of 2; "
        "expected the same: make the group from them (init_process_group() with no rank or world_size)")


def edited_copy(run_dir, tmp_path, **changes):
    """A copy of the run whose config.yaml was edited after training: `changes` as dotted keys (a__b for a.b)."""
    import shutil
    import yaml
    copy = tmp_path / "r"
    shutil.copytree(run_dir, copy)
    data = yaml.safe_load((copy / "config.yaml").read_text())
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        section = data
        for part in parents:
            section = section.setdefault(part, {})
        section[last] = value
    (copy / "config.yaml").write_text(yaml.safe_dump(data))
    return copy


@pytest.mark.parametrize("checkpoint", ["best", "last"])
def test_eval_refuses_a_config_yaml_edited_since_training(trained, tmp_path, capsys, checkpoint):
    # 30 test samples instead of 40: it evaluated other samples (some of them trained on), and said nothing
    from ddptrain.cli import main
    run_dir, summary = trained
    copy = edited_copy(run_dir, tmp_path, task_args__n_test=30)
    found = ddptrain.evaluate(run_dir, checkpoint)["checkpoint"]
    found = found.replace(str(run_dir), str(copy))
    assert main(["eval", str(copy), "--checkpoint", checkpoint]) == 2
    assert capsys.readouterr().err == (
        f"ddptrain: error: '{copy / 'config.yaml'}' no longer matches the config checkpoint '{found}' was trained "
        f"with: config key 'task_args.n_test' is 30 in the file, 40 in the checkpoint; put back the values it was "
        f"trained with, then give a change as an override (key=value) to evaluate under it on purpose\n")
    with pytest.raises(RankFailed, match="config key 'task_args.n_test' is 30 in the file") as failed:
        run_ranks(evaluate_rank, 2, str(copy), checkpoint, "test")
    assert set(failed.value.errors) == {0, 1}  # every rank refuses: none waits for the others
    with pytest.raises(ddptrain.config.ConfigError, match="config key 'task_args.n_test' is 30 in the file"):
        ddptrain.load_model(copy, checkpoint)
    # named by its config file, which names the original run directory (runs_dir, name)
    with pytest.raises(ddptrain.config.ConfigError, match=f"is 30 in the file, 40 in the checkpoint; name the run "
                                                          f"directory '{run_dir}' instead, put back"):
        ddptrain.evaluate(copy / "config.yaml", checkpoint)
    # the same change given as an override is the user's choice, and an edit that does not shape the model or
    # its data (the eval batch size) is no disagreement
    overridden = ddptrain.evaluate(run_dir, checkpoint, overrides=["task_args.n_test=30"])
    assert overridden["loss"] != ddptrain.evaluate(run_dir, checkpoint)["loss"]
    batch = edited_copy(run_dir, tmp_path / "batch", data__eval_batch_size=5)
    assert ddptrain.evaluate(batch, checkpoint)["loss"] == pytest.approx(
        ddptrain.evaluate(run_dir, checkpoint)["loss"], rel=1e-6)


def test_a_checkpoint_without_its_config_leaves_the_file_unchecked(trained, tmp_path):
    # best.pt made before it held the config: the run directory's config.yaml is all there is
    from ddptrain import checkpoint as ckpt
    copy = edited_copy(trained[0], tmp_path, task_args__n_test=30)
    best = copy / "checkpoints" / "best.pt"
    state = ckpt.load(best)
    del state["format_version"]
    state.pop("config", None)
    ckpt.save(best, state)
    result = ddptrain.evaluate(copy, "best")
    assert result["step"] == trained[1]["best_step"] and result["loss"] != trained[1]["test"]["loss"]  # 30 samples


def test_a_run_trained_from_python_values_that_yaml_writes_otherwise_is_not_edited(tmp_path):
    # a tuple in task_args is a list in config.yaml: the same value, not an edit
    cfg = {**CFG, "task_args": {**CFG["task_args"], "unused": (1, 2)}, "train": {"epochs": 1}}
    summary = run(from_dict({**cfg, "runs_dir": str(tmp_path)}), detect({}))
    assert ddptrain.evaluate(tmp_path / "r", "auto")["loss"] == summary["test"]["loss"]
