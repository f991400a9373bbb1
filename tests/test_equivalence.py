"""Equivalence on real gloo ranks: the world size and accumulation change nothing but rounding."""
import pytest
import torch

from ddptrain.configfile import from_dict
from ddptrain.dist import detect
from ddptrain.run import run
import os

from multirank import RankFailed, run_ranks
import tasks_for_tests


def train_and_get_weights(rank, cfg_dict, tmp):
    cfg = from_dict({"runs_dir": str(tmp), "task": "tasks_for_tests:regression", **cfg_dict})
    summary = run(cfg, detect(os.environ))
    return {"summary": summary, "weights": {k: v.clone() for k, v in tasks_for_tests.MODELS[-1].state_dict().items()}}


BASE = {"data": {"batch_size": 16}, "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "train": {"epochs": 3, "log_every": 2}, "checkpoint": {"every_epochs": 0, "save_best": False}}


def assert_same_weights(a, b, **tol):
    for k in a:
        torch.testing.assert_close(a[k], b[k], **tol, msg=lambda m: f"{k}: {m}")


def with_(base, **sections):
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in sections.items():
        out[section] = {**out.get(section, {}), **values}
    return out


def test_two_ranks_equal_one_rank_with_the_same_global_batch(tmp_path):
    """2 ranks x 8 per rank == 1 rank x 16: data.batch_size is global, so the config is the same."""
    one = run_ranks(train_and_get_weights, 1, BASE, tmp_path / "one")[0]
    two = run_ranks(train_and_get_weights, 2, BASE, tmp_path / "two")
    assert one["summary"]["steps"] == two[0]["summary"]["steps"] == 3 * (96 // 16)
    assert_same_weights(one["weights"], two[0]["weights"], rtol=0, atol=1e-6)
    # DDP keeps the replicas bitwise identical.
    assert_same_weights(two[0]["weights"], two[1]["weights"], rtol=0, atol=0)
    # and the weights did move
    init = run_ranks(train_and_get_weights, 1, with_(BASE, optim={"lr": 1e-12}), tmp_path / "init")[0]
    assert (one["weights"]["0.weight"] - init["weights"]["0.weight"]).abs().max() > 1e-3


def test_accumulation_equals_one_big_batch(tmp_path):
    big = run_ranks(train_and_get_weights, 1, BASE, tmp_path / "big")[0]
    accum = run_ranks(train_and_get_weights, 1, with_(BASE, train={"grad_accum_steps": 4}), tmp_path / "acc")[0]
    assert accum["summary"]["steps"] == big["summary"]["steps"]
    assert_same_weights(big["weights"], accum["weights"], rtol=0, atol=1e-6)
    # accumulation under no_sync on 2 ranks: 2 ranks x 2 micro-batches x 4 samples
    both = run_ranks(train_and_get_weights, 2, with_(BASE, train={"grad_accum_steps": 2}), tmp_path / "both")
    assert_same_weights(big["weights"], both[0]["weights"], rtol=0, atol=1e-6)
    assert_same_weights(both[0]["weights"], both[1]["weights"], rtol=0, atol=0)


def test_adamw_clipping_and_schedule_match_across_world_sizes(tmp_path):
    cfg = with_(BASE, optim={"name": "adamw", "lr": 0.01, "weight_decay": 0.1, "l1": 1e-4},
                sched={"name": "cosine", "warmup_steps": 3}, train={"clip_grad_norm": 0.5})
    one = run_ranks(train_and_get_weights, 1, cfg, tmp_path / "one")[0]
    three = run_ranks(train_and_get_weights, 2, with_(cfg, data={"batch_size": 16}), tmp_path / "two")
    assert_same_weights(one["weights"], three[0]["weights"], rtol=0, atol=1e-5)


def test_activation_checkpointing_trains_batch_norm_bitwise_like_the_plain_run(tmp_path):
    """The backward's recomputation of a block does not update its batch norm's running statistics a second time."""
    cfg = with_(BASE, task_args={"batch_norm": True, "dropout": 0.1}, train={"epochs": 1})
    plain = run_ranks(train_and_get_weights, 1, cfg, tmp_path / "plain")[0]
    checkpointed = run_ranks(train_and_get_weights, 1, with_(cfg, dist={"activation_checkpointing": True}),
                             tmp_path / "ac")[0]
    assert_same_weights(plain["weights"], checkpointed["weights"], rtol=0, atol=0)
    assert plain["summary"]["val"] == checkpointed["summary"]["val"]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="SyncBatchNorm needs 2 GPUs")
def test_sync_batchnorm_on_two_ranks_equals_batchnorm_on_one(tmp_path):
    cfg = with_(BASE, task_args={"batch_norm": True}, dist={"sync_batchnorm": True})
    one = run_ranks(train_and_get_weights, 1, cfg, tmp_path / "one")[0]
    two = run_ranks(train_and_get_weights, 2, cfg, tmp_path / "two")
    assert_same_weights(one["weights"], two[0]["weights"], rtol=0, atol=1e-5)
    # without SyncBatchNorm each rank normalises with its own half-batch statistics: not equivalent
    plain = run_ranks(train_and_get_weights, 2, with_(cfg, dist={"sync_batchnorm": False}), tmp_path / "plain")
    diff = max((one["weights"][k].float() - plain[0]["weights"][k].float()).abs().max() for k in one["weights"])
    assert diff > 1e-4


def test_sync_batchnorm_on_cpu_is_refused_before_training(tmp_path):
    cfg = with_(BASE, task_args={"batch_norm": True}, dist={"sync_batchnorm": True})
    with pytest.raises(RankFailed, match="dist.sync_batchnorm.*GPUs only"):
        run_ranks(train_and_get_weights, 2, cfg, tmp_path)
