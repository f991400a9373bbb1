"""Mixed precision, clipping, non-finite gradients, and stalled ranks."""
import json
import os

import pytest
import torch
from torch import nn

from ddptrain.configfile import from_dict
from ddptrain.dist import detect
from ddptrain.precision import Precision
from ddptrain.optim import optimizer_step
from ddptrain.nonfinite import NonFiniteError
from ddptrain.run import run

from multirank import RankFailed, run_ranks
import tasks_for_tests


def train_losses(rank, cfg_dict, tmp, hooks=None):
    cfg = from_dict({"task": "tasks_for_tests:classification", "runs_dir": str(tmp), "name": "t",
                     "dist": {"timeout_s": 20}, **cfg_dict})
    summary = run(cfg, detect(os.environ), hooks=hooks)
    events = [json.loads(l) for l in open(cfg.run_dir / "metrics.jsonl")] if rank == 0 else []
    return summary, [e["loss"] for e in events if e["split"] == "train"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_on_cpu(tmp_path, precision):
    summary, losses = run_ranks(train_losses, 2, {"train": {"precision": precision, "epochs": 4, "log_every": 3},
                                                  "optim": {"lr": 0.01}}, tmp_path)[0]
    assert len(losses) == 4 and all(map(lambda v: v == v, losses))
    assert losses[-1] < 0.5 * losses[0]
    assert summary["val"]["accuracy"] > 0.9


def one_step_update(precision, clip_norm=None, clip_value=None):
    """Parameter change of one SGD(lr=1) step: it is exactly the (clipped) gradient."""
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    prec = Precision(precision, torch.device("cpu"))
    if prec.scaler is not None:  # a scale at which these large test gradients fit in fp16
        prec.scaler = torch.amp.GradScaler("cpu", init_scale=256)
    cfg = from_dict({"train": {"clip_grad_norm": clip_norm, "clip_grad_value": clip_value}})
    before = [p.detach().clone() for p in model.parameters()]
    with prec.autocast():
        loss = model(10 * torch.randn(16, 8)).pow(2).mean()  # large gradients, but no fp16 overflow
    prec.backward(loss)
    norm, stepped = optimizer_step(list(model.parameters()), opt, prec, cfg.train)
    delta = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
    return float(norm), stepped, delta


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_clipping_by_norm_bounds_the_update_after_unscaling(precision):
    norm, stepped, delta = one_step_update(precision, clip_norm=0.5)
    assert stepped and norm > 10  # the logged norm is the true, unscaled, pre-clip norm
    # clipped to the bound, not below it: under fp16 clipping still-scaled gradients would give 0.5 / 65536
    assert delta.norm().item() == pytest.approx(0.5, rel=1e-3)


def test_clipping_by_value():
    norm, stepped, delta = one_step_update("fp32", clip_value=0.01)
    assert delta.abs().max().item() == pytest.approx(0.01, rel=1e-5)


def poison_rank1_at_step(step_to_poison):
    def hook(step, micro_step, batch):
        x, y = batch
        if int(os.environ.get("RANK", 0)) == 1 and step == step_to_poison:
            x = x.clone()
            x[0, 0] = float("nan")
        return x, y
    return hook


def test_nonfinite_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    def per_rank(rank, tmp):
        summary, _ = train_losses(rank, {"train": {"epochs": 2, "nonfinite": "skip"}}, tmp,
                                  hooks={"before_micro_step": poison_rank1_at_step(2)})
        from tasks_for_tests import MODELS
        return summary, MODELS[-1].state_dict()

    (s0, w0), (s1, w1) = run_ranks(per_rank, 2, tmp_path)
    assert s0["skipped_steps"] == s1["skipped_steps"] == 1
    assert s0["steps"] == s1["steps"] == 6
    for k in w0:
        assert torch.isfinite(w0[k]).all() and torch.equal(w0[k], w1[k])


@pytest.mark.parametrize("log_every, finite_at", [(10, 0), (1, 2)])
def test_nonfinite_on_one_rank_stops_every_rank_at_the_same_step(tmp_path, log_every, finite_at):
    def per_rank(rank, tmp):
        return train_losses(rank, {"train": {"epochs": 2, "nonfinite": "stop", "log_every": log_every}}, tmp,
                            hooks={"before_micro_step": poison_rank1_at_step(2)})

    with pytest.raises(RankFailed) as info:
        run_ranks(per_rank, 2, tmp_path)
    assert sorted(info.value.errors) == [0, 1]
    # rank 1's NaN input poisons step 3; without a per-step host sync the weights are checked at log steps
    # and at each epoch's end (here both at step 3), on all ranks together
    for err in info.value.errors.values():
        assert err.startswith(f"NonFiniteError: the weights became non-finite after step {finite_at} (a NaN/Inf "
                              f"loss or gradient); stopped at step 3, epoch 0"), err
    diagnostic = json.loads((tmp_path / "t" / "nonfinite.json").read_text())
    assert diagnostic["step"] == 3 and diagnostic["last_good_checkpoint"] is None


def test_the_diagnostic_names_the_newest_whole_checkpoint_not_an_unmarked_one(tmp_path):
    def hook(step, micro_step, batch):
        x, y = batch
        if step == 3:  # a dead attempt's step file without its marker, then a NaN input
            (tmp_path / "t" / "checkpoints" / "step-000000009.pt").write_bytes(b"half written")
            x = x.clone()
            x[0, 0] = float("nan")
        return x, y
    with pytest.raises(NonFiniteError):
        train_losses(0, {"train": {"epochs": 2, "nonfinite": "stop", "log_every": 1},
                         "checkpoint": {"every_steps": 2}}, tmp_path, hooks={"before_micro_step": hook})
    diagnostic = json.loads((tmp_path / "t" / "nonfinite.json").read_text())
    assert diagnostic["step"] == 4
    assert diagnostic["last_good_checkpoint"] == str(tmp_path / "t" / "checkpoints" / "step-000000003.pt")  # epoch 0 ends at 3


def test_stalled_rank_fails_within_the_timeout_instead_of_hanging(tmp_path):
    """Rank 1 stalls for 20 s at step 2; with a 3 s collective timeout rank 0 fails fast, naming the timeout."""
    def per_rank(rank, tmp):
        def stall(step, micro_step, batch):
            if rank == 1 and step == 2:
                import time
                time.sleep(20)
            return batch
        cfg = {"train": {"epochs": 3}, "dist": {"timeout_s": 3}}
        return train_losses(rank, cfg, tmp, hooks={"before_micro_step": stall})

    with pytest.raises(RankFailed) as info:
        run_ranks(per_rank, 2, tmp_path, timeout=60)
    assert info.value.exit_after[0] < 15  # start-up + 3 s timeout, long before rank 1 wakes up
    assert info.value.errors[0].startswith(
        "CollectiveError: [rank 0] a collective failed during training (step 2): another rank died, stalled or "
        "is unreachable; the timeout in force was dist.timeout_s=3 s (")


class StopRank1:
    """A metric whose compute() SIGSTOPs rank 1 at the first validation, between the evaluation's all-reduce
    and the broadcast of its result; a child process SIGKILLs the stopped rank 12 s later."""
    width = 1

    def batch_stats(self, output, target):
        return torch.zeros(1, dtype=torch.float64)

    def compute(self, stats, count):
        import signal
        import subprocess
        if os.environ.get("RANK") == "1":
            subprocess.Popen(["sh", "-c", f"sleep 12; kill -9 {os.getpid()}"])
            os.kill(os.getpid(), signal.SIGSTOP)
        return 0.0


def test_a_rank_stopped_right_after_a_validation_is_caught_within_the_collective_timeout(tmp_path):
    """The long val.rank0_timeout_s (default 2 hours) is only for rank 0's solo evaluation: the broadcast
    after a sharded validation fails within dist.timeout_s and says so."""
    def per_rank(rank, tmp):
        def task(cfg):
            t = tasks_for_tests.classification(cfg)
            t.metrics["stop"] = StopRank1()
            return t
        cfg = from_dict({"task": "tasks_for_tests:classification", "runs_dir": str(tmp), "train": {"epochs": 3},
                         "dist": {"timeout_s": 3}})
        return run(cfg, detect(os.environ), task)

    with pytest.raises(RankFailed) as info:
        run_ranks(per_rank, 2, tmp_path, timeout=60)
    assert info.value.exit_after[0] < 11  # start-up + 3 s: not val.rank0_timeout_s, and before the stopped rank dies
    assert info.value.errors[0].startswith(
        "CollectiveError: [rank 0] a collective failed during validation (step 3): another rank died, stalled or "
        "is unreachable; the timeout in force was dist.timeout_s=3 s ("), info.value.errors[0]
