"""The training basics: losses, optimizers, schedules, the MLP builder, loaders, best-weight restore."""
import json
import os
import weakref

import pytest
import torch
from torch import nn

from ddptrain import checkpoint, train
from ddptrain.config import ConfigError
from ddptrain.configfile import from_dict
from ddptrain.dist import Dist, DistEnv
from ddptrain.batch import Forward
from ddptrain.evaluation import Evaluator
from ddptrain.losses import as_metric, build_loss, squared_error
from ddptrain.models import mlp
from ddptrain.optim import build_optimizer, build_scheduler
from ddptrain.precision import Precision

from multirank import run_ranks
import tasks_for_tests

F = nn.functional


@pytest.mark.parametrize("name, reference", [
    ("cross_entropy", lambda o, y: F.cross_entropy(o, y.argmax(-1))),
    ("mse", F.mse_loss), ("l1", F.l1_loss), ("huber", F.huber_loss),
    ("bce_with_logits", lambda o, y: F.binary_cross_entropy_with_logits(o, y)),
])
def test_losses_by_name(name, reference):
    out, y = torch.randn(6, 3), torch.rand(6, 3)
    target = y.argmax(-1) if name == "cross_entropy" else y
    loss = build_loss(from_dict({"loss": {"name": name}}).loss)
    assert torch.allclose(loss(out, target), reference(out, y))


def test_label_smoothing_and_huber_delta_are_used():
    cfg = from_dict({"loss": {"name": "cross_entropy", "label_smoothing": 0.2}})
    out, y = torch.randn(6, 3), torch.randint(0, 3, (6,))
    assert torch.allclose(build_loss(cfg.loss)(out, y), F.cross_entropy(out, y, label_smoothing=0.2))
    cfg = from_dict({"loss": {"name": "huber", "huber_delta": 0.3}})
    out, y = torch.randn(6), torch.randn(6)
    assert torch.allclose(build_loss(cfg.loss)(out, y), F.huber_loss(out, y, delta=0.3))


def initial_val_loss():
    torch.manual_seed(0)  # as ddptrain seeds before it builds the task
    task = tasks_for_tests.regression(from_dict({}))
    with torch.no_grad():
        x, y = task.val.tensors
        return F.mse_loss(task.model(x), y).item()


@pytest.mark.parametrize("optim", [{"name": "sgd", "lr": 0.01}, {"name": "sgd", "lr": 0.01, "nesterov": True},
                                   {"name": "adam", "lr": 0.01}, {"name": "adamw", "lr": 0.01, "weight_decay": 0.1},
                                   {"name": "rmsprop", "lr": 0.001}, {"name": "sgd", "lr": 0.01, "l1": 1e-3}])
def test_every_optimizer_trains(tmp_path, optim):
    s = train({"task": "tasks_for_tests:regression", "runs_dir": str(tmp_path), "optim": optim,
               "data": {"batch_size": 16}, "train": {"epochs": 5}, "checkpoint": {"save_best": False}})
    assert s["val"]["loss"] < 0.5 * initial_val_loss()


def test_weight_decay_and_l1_skip_biases():
    model = mlp(4, 2, from_dict({"model": {"hidden": [3], "batch_norm": True}}).model)
    opt = build_optimizer(model, from_dict({"optim": {"weight_decay": 0.1}}).optim)
    decayed, exempt = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decayed["params"])
    assert exempt["weight_decay"] == 0.0 and len(exempt["params"]) == 3  # BN weight, BN bias, head bias


def test_plateau_schedule_decays_after_patience():
    cfg = from_dict({"sched": {"name": "plateau", "plateau_patience": 1, "gamma": 0.5}})
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, cfg.sched, total_steps=10, lr=1.0)
    for value in (1.0, 1.0, 1.0):
        sched.step(value)
    assert opt.param_groups[0]["lr"] == 0.5


def test_plateau_schedule_follows_the_early_stopping_mode(tmp_path):
    """Monitoring a value that rises as the run improves (early_stop.mode: max), plateau keeps the lr."""
    def task(cfg):
        t = tasks_for_tests.regression(cfg)
        t.metrics = {"score": lambda out, y: -squared_error(out, y)}
        return t
    cfg = {"task": "tasks_for_tests:regression", "runs_dir": str(tmp_path), "name": "p",
           "optim": {"name": "sgd", "lr": 0.05}, "train": {"epochs": 4, "log_every": 1},
           "sched": {"name": "plateau", "plateau_patience": 0, "gamma": 0.5},
           "early_stop": {"monitor": "val_score", "mode": "max"}, "checkpoint": {"every_epochs": 0, "save_best": False}}
    train(cfg, task=task)
    events = [json.loads(line) for line in open(tmp_path / "p" / "metrics.jsonl")]
    scores = [e["score"] for e in events if e["split"] == "val"]
    assert scores == sorted(scores)  # every validation improved on the one before
    assert {e["lr"] for e in events if e["split"] == "train"} == {0.05}


@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh", "sigmoid"])
def test_mlp_builder(activation):
    cfg = from_dict({"model": {"hidden": [32, 16], "activation": activation, "dropout": 0.5, "batch_norm": True,
                               "init": "xavier"}}).model
    model = mlp(10, 3, cfg)
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["Linear", "BatchNorm1d", type(model[2]).__name__, "Dropout"] * 2 + ["Linear"]
    assert type(model[2]).__name__.lower() == activation
    assert model[0].bias is None  # batch norm follows: the bias would be redundant
    assert model(torch.randn(5, 10)).shape == (5, 3)


def test_kaiming_init_has_he_variance():
    torch.manual_seed(0)
    model = mlp(1000, 10, from_dict({"model": {"hidden": [500], "init": "kaiming"}}).model)
    assert model[0].weight.std().item() == pytest.approx((2 / 1000) ** 0.5, rel=0.05)
    assert torch.count_nonzero(model[0].bias) == 0


@pytest.mark.parametrize("task, key", [("digits", "val_fraction"), ("diabetes", "test_fraction")])
def test_a_built_in_task_refuses_a_fraction_that_holds_no_sample(tmp_path, task, key):
    # 0.0002 of 1797 or 442 samples rounds to none: before, the run went on without that set, silently
    with pytest.raises(ConfigError, match=f"config key 'data.{key}': 0.0002 of the"):
        train({"task": task, "runs_dir": str(tmp_path), "data": {key: 0.0002}})


def test_data_loader_workers_give_the_same_training(tmp_path):
    base = {"task": "tasks_for_tests:regression", "runs_dir": str(tmp_path), "data": {"batch_size": 16},
            "train": {"epochs": 2}, "checkpoint": {"save_best": False, "every_epochs": 0}}
    a = train(base)
    b = train({**base, "data": {"batch_size": 16, "num_workers": 2, "persistent_workers": True}})
    assert a["val"] == b["val"]


def test_deterministic_mode_reproduces_bitwise(tmp_path):
    cfg = {"task": "tasks_for_tests:classification", "runs_dir": str(tmp_path), "deterministic": True,
           "train": {"epochs": 2}}
    assert train({**cfg, "name": "a"})["val"] == train({**cfg, "name": "b"})["val"]


def test_best_weights_are_restored_before_the_test_split(tmp_path):
    """The test metrics are those of the best checkpoint, whose validation value is the reported best."""
    s = train({"task": "tasks_for_tests:regression", "task_args": {"n_test": 40}, "runs_dir": str(tmp_path),
               "optim": {"name": "sgd", "lr": 0.3, "momentum": 0.9}, "data": {"batch_size": 16},
               "train": {"epochs": 12}})
    assert s["restored_best"] and s["best_epoch"] is not None
    state = checkpoint.load(tmp_path / "run" / "checkpoints" / "best.pt")
    assert state["epoch"] == s["best_epoch"]
    task = tasks_for_tests.regression(from_dict({"task_args": {"n_test": 40}}))
    task.model.load_state_dict(state["model"])
    cfg = from_dict({})
    dist = Dist(DistEnv(), torch.device("cpu"), "gloo", 10, 10)
    prec = Precision("fp32", torch.device("cpu"))
    metrics = {"mse": as_metric(squared_error)}
    evaluate = Evaluator(dist, Forward(F.mse_loss), metrics, prec, "sharded", cfg.data)
    assert evaluate(task.model, task.val)["loss"] == pytest.approx(s["best_value"], rel=1e-9)
    assert evaluate(task.model, task.test) == pytest.approx(s["test"], rel=1e-9)


def test_train_loss_is_the_mean_over_all_ranks(tmp_path):
    """The logged train loss at each step is the same on 1 and 2 ranks: not rank 0's half of the batch."""
    def losses(rank, ws_dir):
        from ddptrain.dist import detect
        from ddptrain.run import run
        cfg = from_dict({"task": "tasks_for_tests:regression", "runs_dir": str(ws_dir), "data": {"batch_size": 16},
                         "optim": {"name": "sgd", "lr": 0.05}, "train": {"epochs": 2, "log_every": 1}})
        run(cfg, detect(os.environ))
        if rank == 0:
            return [e["loss"] for e in map(json.loads, open(cfg.run_dir / "metrics.jsonl")) if e["split"] == "train"]

    one = run_ranks(losses, 1, tmp_path / "one")[0]
    two = run_ranks(losses, 2, tmp_path / "two")[0]
    assert len(one) == len(two) == 12
    assert two == pytest.approx(one, rel=1e-5)


def test_train_sums_of_a_format_1_checkpoint_load_into_named_slots():
    from ddptrain.losses import Sums
    sums = Sums({"mse": as_metric(squared_error)}, torch.device("cpu"))
    sums.load_state_dict(torch.tensor([6.0, 4.0, 2.0], dtype=torch.float64))  # [loss sum, samples, mse sum]
    assert sums.values() == {"loss": 1.5, "mse": 0.5}
    assert torch.equal(sums.state_dict(), torch.tensor([6.0, 0.0, 4.0, 0.0, 2.0], dtype=torch.float64))


def test_a_micro_batch_output_is_freed_before_the_optimizer_step(tmp_path):
    """Only the loss of a micro-batch outlives its backward: its output (a language model's logits, often the
    largest tensor of a step) is not held through the optimizer step and into the next forward."""
    outputs, alive_at_step = [], []

    class Recorded(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            out = self.inner(x)
            outputs.append(weakref.ref(out))
            return out

    class Watching(torch.optim.SGD):
        def step(self, closure=None):
            alive_at_step.append(outputs[-1]() is not None)
            return super().step(closure)

    def task(cfg):
        t = tasks_for_tests.regression(cfg)
        t.model, t.optimizer = Recorded(t.model), lambda groups: Watching(groups, lr=0.01)
        return t
    train({"task": "tasks_for_tests:regression", "runs_dir": str(tmp_path), "train": {"epochs": 1, "log_every": 2},
           "data": {"batch_size": 16}, "checkpoint": {"every_epochs": 0, "save_best": False}}, task=task)
    assert len(alive_at_step) == 6 and not any(alive_at_step)


def test_token_accuracy_is_a_mean_over_the_counted_tokens_whatever_the_batching():
    from ddptrain.losses import CrossEntropy, Sums, token_accuracy
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(6, 5, 4, generator=g), torch.randint(0, 4, (6, 5), generator=g)
    for row, length in enumerate([5, 1, 3, 2, 4, 5]):  # padded sequences of unequal lengths
        y[row, length:] = -100
    counted = y != -100
    expected = float((logits.argmax(-1) == y)[counted].double().mean())

    def metric(batches):
        sums = Sums({"acc": token_accuracy}, torch.device("cpu"))
        for rows in batches:
            sums.add(Forward(CrossEntropy())(lambda x: x, (logits[rows], y[rows])))
        return sums.values()["acc"]
    assert metric([range(6)]) == pytest.approx(expected, rel=1e-12)
    assert metric([range(0, 2), range(2, 3), range(3, 6)]) == pytest.approx(expected, rel=1e-12)
    per_sample_mean = float(as_metric(lambda o, t: (o.argmax(-1) == t).float()).batch_stats(logits, y)[0]) / 6
    assert per_sample_mean != pytest.approx(expected)  # what a plain per-sample function reports here


def test_an_epoch_left_early_shuts_its_loader_workers_down_at_once():
    # they lived on in the step generators until a garbage collection, where torch's loader waits 5 s for each
    import gc
    import itertools
    import multiprocessing
    from torch.utils.data import DataLoader, TensorDataset
    from ddptrain.steps import Steps
    from ddptrain.observe import Rates
    from ddptrain.train_data import _timed
    loader = DataLoader(TensorDataset(torch.arange(40.0)), batch_size=2, num_workers=1)
    gc.disable()  # what is freed must be freed by reference counts alone
    try:
        steps = Steps(_timed(itertools.islice(loader, 20), Rates(0)), 2, 10)
        for i, _ in enumerate(steps):
            if i == 2:
                break
        assert multiprocessing.active_children()  # the worker is still there, the epoch's loop left
        steps.settle()
        assert not multiprocessing.active_children()
    finally:
        gc.enable()
