"""Validation and test numbers are the same for any world size, in both modes; rank 0 owns the decisions."""
import os
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from ddptrain.configfile import from_dict
from ddptrain.dist import Dist, detect
from ddptrain.batch import Forward
from ddptrain.evaluation import Evaluator
from ddptrain.losses import R2, CrossEntropy, as_metric, squared_error
from ddptrain.precision import Precision
from ddptrain.run import run

from multirank import run_ranks
import tasks_for_tests

N_VAL = 101  # divisible by neither 2 nor 3


class Count:
    """A metric that reports how many samples it saw: any duplicate or missing sample shows."""
    width = 1

    def batch_stats(self, output, target):
        return torch.tensor([float(len(target))], dtype=torch.float64)

    def compute(self, stats, count):
        return float(stats[0])


def evaluate_on_ranks(rank, mode):
    cfg = from_dict({"val": {"mode": mode}, "data": {"eval_batch_size": 8}})
    env = detect(os.environ)
    dist = Dist(env, torch.device("cpu"), "gloo", 30, 30)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        x = torch.randn(N_VAL, 4, generator=torch.Generator().manual_seed(1))
        ids = torch.arange(N_VAL, dtype=torch.float32).unsqueeze(1)  # the target is the sample's id
        metrics = {"mean_id": as_metric(lambda out, y: y), "mse": as_metric(squared_error), "r2": R2(), "n": Count()}
        evaluate = Evaluator(dist, Forward(nn.functional.mse_loss), metrics, Precision("fp32", torch.device("cpu")),
                             cfg.val.mode, cfg.data)
        values = evaluate(model, TensorDataset(x, ids))
        del model
        return values
    finally:
        dist.close()


@pytest.mark.parametrize("mode", ["sharded", "rank0"])
def test_validation_is_identical_for_world_size_1_2_3(mode):
    results = {ws: run_ranks(evaluate_on_ranks, ws, mode) for ws in (1, 2, 3)}
    reference = results[1][0]
    assert reference["n"] == N_VAL
    assert reference["mean_id"] == (N_VAL - 1) / 2  # every sample exactly once
    for ws, per_rank in results.items():
        for values in per_rank:  # every rank receives the same numbers
            assert values["n"] == N_VAL and values["mean_id"] == reference["mean_id"]
            for key in ("loss", "mse", "r2"):
                assert values[key] == pytest.approx(reference[key], rel=1e-9), (ws, key)


def evaluate_tokens_on_ranks(rank, eval_batch_size):
    """Next-token logits (as given) of padded sequences, the last of which is padding alone."""
    cfg = from_dict({"data": {"eval_batch_size": eval_batch_size}})
    dist = Dist(detect(os.environ), torch.device("cpu"), "gloo", 30, 30)
    try:
        g = torch.Generator().manual_seed(3)
        logits, y = torch.randn(9, 5, 4, generator=g), torch.randint(0, 4, (9, 5), generator=g)
        y[:, 3:], y[-1] = -100, -100
        evaluate = Evaluator(dist, Forward(CrossEntropy()), {}, Precision("fp32", torch.device("cpu")), "sharded",
                             cfg.data)
        return evaluate(nn.Identity(), TensorDataset(logits, y))
    finally:
        dist.close()


def test_a_batch_of_padding_alone_counts_nothing_instead_of_making_the_loss_nan():
    g = torch.Generator().manual_seed(3)
    logits, y = torch.randn(9, 5, 4, generator=g), torch.randint(0, 4, (9, 5), generator=g)
    y[:, 3:], y[-1] = -100, -100
    expected = nn.functional.cross_entropy(logits.reshape(-1, 4).double(), y.reshape(-1)).item()
    for world_size, eval_batch_size in ((1, 1), (1, 256), (2, 1)):
        values = run_ranks(evaluate_tokens_on_ranks, world_size, eval_batch_size)[0]
        assert values["loss"] == pytest.approx(expected, rel=1e-12), (world_size, eval_batch_size)


def test_classes_of_which_some_are_ignored_give_the_mean_over_the_others_for_any_eval_batch_size():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(10, 4, generator=g), torch.randint(0, 4, (10,), generator=g)
    y[[1, 2, 3, 7]] = -100  # unlabelled samples
    expected = nn.functional.cross_entropy(logits.double(), y).item()
    dist = Dist(detect({}), torch.device("cpu"), "gloo", 30, 30)
    for eval_batch_size in (1, 3, 256):
        evaluate = Evaluator(dist, Forward(CrossEntropy()), {}, Precision("fp32", torch.device("cpu")), "sharded",
                             from_dict({"data": {"eval_batch_size": eval_batch_size}}).data)
        assert evaluate(nn.Identity(), TensorDataset(logits, y))["loss"] == pytest.approx(expected, rel=1e-12)


def test_r2_matches_scikit_learn():
    from sklearn.metrics import r2_score
    y, out = torch.randn(50, 1, dtype=torch.float64), torch.randn(50, 1, dtype=torch.float64)
    r2 = R2()
    stats = r2.batch_stats(out[:20], y[:20]) + r2.batch_stats(out[20:], y[20:])
    assert r2.compute(stats, 50) == pytest.approx(r2_score(y.numpy(), out.numpy()), rel=1e-12)


def train_on_ranks(rank, cfg_dict, workdir):
    # each rank works in its own directory: anything a rank writes shows up under its own folder
    wd = Path(workdir) / f"rank{rank}"
    wd.mkdir(parents=True, exist_ok=True)
    os.chdir(wd)
    cfg = from_dict({"task": "tasks_for_tests:classification", "runs_dir": "runs", "name": "t",
                     "dist": {"timeout_s": 20}, **cfg_dict})
    return run(cfg, detect(os.environ))


def test_sharded_and_rank0_modes_give_the_same_run(tmp_path):
    base = {"train": {"epochs": 2}, "optim": {"lr": 0.01}}
    sharded = run_ranks(train_on_ranks, 2, {**base, "val": {"mode": "sharded"}}, tmp_path / "a")
    rank0 = run_ranks(train_on_ranks, 2, {**base, "val": {"mode": "rank0"}}, tmp_path / "b")
    for a, b in zip(sharded, rank0):
        assert a["val"] == pytest.approx(b["val"], rel=1e-9)
        assert a["best_value"] == pytest.approx(b["best_value"], rel=1e-9)


def test_only_rank0_writes_the_run_directory(tmp_path):
    run_ranks(train_on_ranks, 2, {"train": {"epochs": 2}}, tmp_path)
    run_dir = tmp_path / "rank0" / "runs" / "t"
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "config.yaml", "metrics.jsonl", "summary.json"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "best.pt", "best.pt.done", "step-000000003.pt", "step-000000003.pt.done", "step-000000006.pt",
        "step-000000006.pt.done"]
    assert list((tmp_path / "rank1").iterdir()) == []


def test_early_stop_decided_by_rank0_reaches_every_rank(tmp_path):
    """Only rank 0's stopper wants to stop (rank 1 has no patience); both stop at the same step, no hang."""
    def per_rank(rank, workdir):
        stop = {"patience": 0, "min_delta": 1e9} if rank == 0 else {"patience": None}
        return train_on_ranks(rank, {"train": {"epochs": 20}, "early_stop": stop}, workdir)

    summaries = run_ranks(per_rank, 2, tmp_path, timeout=60)
    steps_per_epoch = 192 // 64
    for s in summaries:
        assert s["stopped_early"] is True
        assert s["steps"] == 2 * steps_per_epoch  # best at the first validation, stop at the second
    assert summaries[0]["steps"] == summaries[1]["steps"]


def test_rank0_mode_waits_longer_than_the_collective_timeout(tmp_path):
    """Rank 0 evaluates alone for ~4 s while the training timeout is 2 s: the others must not time out."""
    def slow_val(cfg):
        task = tasks_for_tests.classification(cfg)
        task.val = tasks_for_tests.Slow(task.val, 4.0 / len(task.val))
        return task

    def per_rank(rank, workdir):
        os.chdir(workdir)
        cfg = from_dict({"runs_dir": f"runs{rank}", "train": {"epochs": 2},
                         "val": {"mode": "rank0", "every": 2}, "dist": {"timeout_s": 2}})
        return run(cfg, detect(os.environ), slow_val)

    summaries = run_ranks(per_rank, 2, tmp_path, timeout=90)
    assert summaries[0]["val"] == summaries[1]["val"]


def test_eval_refuses_a_split_other_than_the_runs(tmp_path):
    # data.split_seed=1 evaluated a "test" set holding samples the run trained on, silently
    from ddptrain import evaluate, train
    from ddptrain.config import ConfigError
    train({"task": "digits", "runs_dir": str(tmp_path), "name": "run", "model": {"hidden": [8]},
           "train": {"max_steps": 1}})
    run_dir = tmp_path / "run"
    for override in ("data.split_seed=1", "data.val_fraction=0.2", "data.test_fraction=0.1"):
        with pytest.raises(ConfigError, match=f"config key '{override.split('=')[0]}': the run was trained with"):
            evaluate(run_dir, "last", "test", [override])
    assert evaluate(run_dir, "last", "test", ["data.eval_batch_size=7"])["loss"] == \
        pytest.approx(evaluate(run_dir, "last", "test")["loss"], rel=1e-6)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_batch_norm_is_validated_with_the_running_statistics_the_checkpoint_holds(tmp_path, strategy):
    """Each rank's running statistics follow its own batches; rank 0's are saved and evaluated in rank0 mode, and
    sharded validation and test evaluate every shard with them too (they gave other numbers, from no saved model)."""
    import ddptrain
    from killing import train_rank
    cfg = {"task": "tasks_for_tests:regression", "task_args": {"batch_norm": True, "n_test": 32},
           "data": {"batch_size": 16}, "optim": {"name": "sgd", "lr": 0.05}, "train": {"epochs": 2},
           "checkpoint": {"save_best": False}, "early_stop": {"restore_best": False},
           "dist": {"timeout_s": 30, "strategy": strategy}}
    sharded = run_ranks(train_rank, 2, tmp_path / "sharded", cfg, None, None, timeout=120)[0]
    reference = ddptrain.evaluate(tmp_path / "sharded" / "r", checkpoint="last", split="test")  # one process
    assert sharded["summary"]["test"]["loss"] == pytest.approx(reference["loss"], rel=1e-9)
    if strategy == "ddp":  # rank0 mode: rank 0 alone, with its own statistics; the training is the same
        rank0 = run_ranks(train_rank, 2, tmp_path / "rank0", {**cfg, "val": {"mode": "rank0"}}, None, None,
                          timeout=120)[0]
        assert sharded["summary"]["val"] == pytest.approx(rank0["summary"]["val"], rel=1e-9)
        for k, v in rank0["weights"].items():
            assert torch.equal(sharded["weights"][k], v), k
