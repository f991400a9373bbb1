"""Sharded data parallelism (dist.strategy: fsdp, FSDP2 with Distributed Checkpoint) on real gloo ranks: it
trains like DDP, accumulates like a big batch, resumes bitwise after SIGKILL, on another world size too,
never takes a truncated shard, exports a plain state dict, and evaluates a set smaller than the ranks exactly
as one rank does."""
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

import ddptrain
from ddptrain import checkpoint, sharded
from ddptrain.batch import Forward
from ddptrain.configfile import from_dict
from ddptrain.dist import Dist, detect
from ddptrain.evaluation import Evaluator
from ddptrain.losses import CrossEntropy, accuracy, as_metric
from ddptrain.precision import Precision
from ddptrain.fsdp import Sharded
from ddptrain.task import TaskError
from ddptrain.run import run

from killing import kill_and_resume, train_rank
from multirank import RankFailed, run_ranks

TESTS = Path(__file__).resolve().parent
BASE = {"task": "tasks_any_batch:shapes", "data": {"batch_size": 16}, "optim": {"name": "adamw", "lr": 0.01},
        "train": {"epochs": 3, "log_every": 2, "clip_grad_norm": 1.0}, "dist": {"timeout_s": 30},
        "checkpoint": {"every_steps": 4}}
# float32 sums in another order: FSDP reduce-scatters, DDP all-reduces the same gradients
TOLERANCE = 1e-5


def with_(base, **sections):
    out = dict(base)
    for section, values in sections.items():
        out[section] = {**out.get(section, {}), **values} if isinstance(values, dict) else values
    return out


def fsdp(cfg, **dist):
    return with_(cfg, dist={"strategy": "fsdp", **dist})


def assert_close(a, b):
    for k in a["weights"]:
        torch.testing.assert_close(a["weights"][k], b["weights"][k], rtol=0, atol=TOLERANCE, msg=lambda m: f"{k}: {m}")
    for split in ("val", "test"):
        assert a["summary"][split] == pytest.approx(b["summary"][split], rel=TOLERANCE), split


@pytest.fixture(scope="module")
def ddp_and_fsdp(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs")
    ddp = run_ranks(train_rank, 2, d / "ddp", BASE, None, None, timeout=120)[0]
    sharded = run_ranks(train_rank, 2, d / "fsdp", fsdp(BASE), None, None, timeout=120)[0]
    return ddp, sharded, d / "fsdp" / "r"


def test_fsdp_trains_like_ddp_at_the_same_global_batch(ddp_and_fsdp):
    ddp, sharded, run_dir = ddp_and_fsdp
    assert sharded["summary"]["strategy"] == "fsdp" and sharded["summary"]["tested_weights"] == "best"
    assert_close(sharded, ddp)
    assert (run_dir / "checkpoints" / "best").is_dir() and (run_dir / "checkpoints" / "best.done").is_file()


def test_accumulation_under_fsdp_equals_one_big_batch(ddp_and_fsdp, tmp_path):
    _, big_batch, _ = ddp_and_fsdp
    accumulated = run_ranks(train_rank, 2, tmp_path, fsdp(with_(BASE, train={"grad_accum_steps": 2})), None, None,
                            timeout=120)[0]
    assert_close(accumulated, big_batch)


@pytest.mark.parametrize("option", [{"cpu_offload": True}, {"activation_checkpointing": True},
                                    {"reshard_after_forward": False}])
def test_offload_activation_checkpointing_and_no_resharding_train_like_plain_fsdp(ddp_and_fsdp, tmp_path, option):
    _, sharded, _ = ddp_and_fsdp
    assert_close(run_ranks(train_rank, 2, tmp_path, fsdp(BASE, **option), None, None, timeout=120)[0], sharded)


def test_compiled_fsdp_trains_like_eager_fsdp(ddp_and_fsdp, tmp_path):
    _, sharded, _ = ddp_and_fsdp
    compiled = fsdp(with_(BASE, train={"compile": True, "compile_backend": "aot_eager"}))
    assert_close(run_ranks(train_rank, 2, tmp_path, compiled, None, None, timeout=240)[0], sharded)


def test_l1_under_fsdp_trains_like_ddp(tmp_path):
    # once a block is resharded after its forward, its parameters are DTensor shards: the penalty is each
    # rank's own part, added to a plain loss
    cfg = with_(BASE, optim={"l1": 1e-2}, train={"epochs": 1}, checkpoint={"save_best": False})
    ddp = run_ranks(train_rank, 2, tmp_path / "ddp", cfg, None, None, timeout=120)[0]
    sharded = run_ranks(train_rank, 2, tmp_path / "fsdp", fsdp(cfg), None, None, timeout=120)[0]
    assert_close(sharded, ddp)


def test_l1_with_a_token_mean_loss_under_fsdp_trains_like_ddp(tmp_path):
    # padded sequences: each rank's loss is weighted by its share of the step's tokens, the penalty is not (under
    # FSDP each rank's part of it reaches its own shard alone, unaveraged)
    cfg = {"task": "tasks_any_batch:padded_lm", "data": {"batch_size": 16}, "loss": {"name": "cross_entropy"},
           "optim": {"name": "adamw", "lr": 0.01, "l1": 1e-2}, "train": {"epochs": 1},
           "checkpoint": {"save_best": False}, "dist": {"timeout_s": 30}}
    ddp = run_ranks(train_rank, 2, tmp_path / "ddp", cfg, None, None, timeout=120)[0]
    sharded = run_ranks(train_rank, 2, tmp_path / "fsdp", fsdp(cfg), None, None, timeout=120)[0]
    assert_close(sharded, ddp)


def test_a_models_own_loss_given_num_items_in_batch_under_fsdp_trains_like_ddp(tmp_path):
    # padded sequences, 2 micro-batches: the model divides its summed loss by the step's tokens over the world size,
    # and FSDP's reduce-scatter averages the ranks' gradients as DDP's all-reduce does
    cfg = {"task": "tasks_any_batch:padded_own_loss", "data": {"batch_size": 16, "eval_batch_size": 5},
           "optim": {"name": "adamw", "lr": 0.01}, "train": {"epochs": 1, "grad_accum_steps": 2},
           "checkpoint": {"save_best": False}, "dist": {"timeout_s": 30}}
    ddp = run_ranks(train_rank, 2, tmp_path / "ddp", cfg, None, None, timeout=120)[0]
    sharded = run_ranks(train_rank, 2, tmp_path / "fsdp", fsdp(cfg), None, None, timeout=120)[0]
    assert_close(sharded, ddp)


def test_tied_weights_under_fsdp_train_like_ddp(tmp_path):
    # the embedding and the head hold one parameter: neither can be sharded alone, so both stay in the root's group
    cfg = {"task": "tasks_any_batch:padded_lm", "task_args": {"tied": True}, "data": {"batch_size": 16},
           "loss": {"name": "cross_entropy"}, "optim": {"name": "adamw", "lr": 0.01}, "train": {"epochs": 2},
           "checkpoint": {"save_best": False}, "dist": {"timeout_s": 30}}
    ddp = run_ranks(train_rank, 2, tmp_path / "ddp", cfg, None, None, timeout=120)[0]
    sharded = run_ranks(train_rank, 2, tmp_path / "fsdp", fsdp(cfg), None, None, timeout=120)[0]
    assert sharded["weights"].keys() == ddp["weights"].keys()
    assert_close(sharded, ddp)


def test_batch_norm_under_fsdp_trains_and_saves_like_ddp(tmp_path):
    # the running statistics are buffers, each rank's own under FSDP: rank 0's before every training forward, as
    # DDP has them, and rank 0's in the checkpoint
    cfg = {"task": "tasks_for_tests:regression", "task_args": {"batch_norm": True, "n_test": 32}, "data": {"batch_size": 16},
           "optim": {"name": "sgd", "lr": 0.05}, "train": {"epochs": 2}, "checkpoint": {"save_best": False},
           "dist": {"timeout_s": 30}}
    ddp = run_ranks(train_rank, 2, tmp_path / "ddp", cfg, None, None, timeout=120)[0]
    sharded = run_ranks(train_rank, 2, tmp_path / "fsdp", fsdp(cfg), None, None, timeout=120)[0]
    assert "1.running_mean" in sharded["weights"]
    assert_close(sharded, ddp)


def poison_rank1_at_step_2(step, micro_step, batch):
    x, y = batch
    if int(os.environ.get("RANK", 0)) == 1 and step == 2:
        x = x.clone()
        x[0, 0] = float("nan")
    return x, y


def nan_on_rank_1(rank, runs_dir):
    cfg = from_dict({**fsdp(with_(BASE, train={"nonfinite": "skip", "epochs": 2})), "runs_dir": str(runs_dir),
                     "name": "nan", "checkpoint": {"every_epochs": 1, "save_best": False}})
    return run(cfg, detect(os.environ), hooks={"before_micro_step": poison_rank1_at_step_2})


def test_a_nan_on_one_rank_skips_that_step_on_every_rank_under_fsdp(tmp_path):
    summaries = run_ranks(nan_on_rank_1, 2, tmp_path, timeout=120)
    assert [s["skipped_steps"] for s in summaries] == [1, 1] and summaries[0]["steps"] == summaries[1]["steps"]
    weights = ddptrain.load_model(tmp_path / "nan", "last").state_dict()
    assert all(torch.isfinite(v).all() for v in weights.values())


def nan_stops_the_run(rank, runs_dir):
    cfg = from_dict({**fsdp(with_(BASE, train={"nonfinite": "stop"})), "runs_dir": str(runs_dir), "name": "stop",
                     "checkpoint": {"every_steps": 1, "save_best": False}})
    return run(cfg, detect(os.environ), hooks={"before_micro_step": poison_rank1_at_step_2})


def test_nonfinite_sharded_weights_stop_the_run_and_never_replace_a_good_checkpoint(tmp_path):
    # the weights a NaN made are the training's own DTensor shards: what the check watches
    with pytest.raises(RankFailed, match="the weights became non-finite after step 2"):
        run_ranks(nan_stops_the_run, 2, tmp_path, timeout=120)
    kept = checkpoint.step_files(tmp_path / "stop" / "checkpoints")
    assert kept[-1].name == "step-000000002"  # the last written before step 3's NaN reached the weights
    weights = ddptrain.load_model(tmp_path / "stop", str(kept[-1])).state_dict()
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_a_model_built_on_the_meta_device_gets_the_same_weights_and_trains_bitwise_the_same(ddp_and_fsdp, tmp_path):
    # each block gets its weights on the CPU from the seed alone and is sharded at once (models.materialize)
    _, sharded, _ = ddp_and_fsdp
    meta = run_ranks(train_rank, 2, tmp_path, fsdp(with_(BASE, task_args={"meta": True})), None, None,
                     timeout=120)[0]
    assert meta["summary"]["val"] == sharded["summary"]["val"]
    for k, v in sharded["weights"].items():
        assert torch.equal(meta["weights"][k], v), k


class Tied(torch.nn.Module):
    """An embedding, blocks with batch norm in a ModuleList, and a head whose weight is the embedding's."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.emb = nn.Embedding(10, 6)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6)) for _ in range(3))
        self.head = nn.Linear(6, 10)
        self.head.weight = self.emb.weight


def test_materialized_weights_are_the_seeds_with_ties_kept_and_one_block_whole_at_a_time():
    from ddptrain.models import materialize, on_meta
    from ddptrain.state import seed_everything
    seed_everything(5)
    built = Tied()
    torch.manual_seed(123)  # the training's RNG: materializing must neither read nor move it
    before = torch.get_rng_state()
    with torch.device("meta"):
        meta = Tied()
    assert on_meta(meta)
    whole = []

    def done(block):  # the blocks before this one are done, the ones after it still have no storage
        i = list(meta.blocks).index(block)
        whole.append(i)
        assert not on_meta(block) and all(on_meta(b) for b in meta.blocks[i + 1:])
    materialize(meta, None, 5, meta.blocks, done)
    assert whole == [0, 1, 2] and not on_meta(meta) and meta.head.weight is meta.emb.weight
    assert torch.equal(torch.get_rng_state(), before)
    assert built.state_dict().keys() == meta.state_dict().keys()
    for k, v in built.state_dict().items():
        assert torch.equal(meta.state_dict()[k], v), k


def test_modules_given_real_weights_before_keep_them_when_the_rest_is_materialized():
    from ddptrain.models import materialize, on_meta, uninitialisable
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    model[0] = torch.nn.Linear(4, 4)  # weights loaded into part of a meta-built model
    torch.nn.init.constant_(model[0].weight, 0.5)
    model[0].bias.data.zero_()
    assert on_meta(model) and uninitialisable(model) is None
    materialize(model, None, 5)
    assert not on_meta(model) and bool((model[0].weight == 0.5).all()) and bool((model[0].bias == 0).all())
    assert model[2].weight.abs().sum() > 0


class Scaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(8, 1)
        self.register_buffer("scale", torch.ones(1))  # a buffer only this module's own code can set

    def forward(self, x):
        return self.linear(x) * self.scale


def meta_without_init(cfg):
    import tasks_any_batch
    task = tasks_any_batch.shapes(cfg)
    with torch.device("meta"):
        task.model = Scaled()
    return task


def test_a_meta_model_with_a_module_that_cannot_initialise_itself_is_a_one_line_error(tmp_path):
    cfg = {**BASE, "runs_dir": str(tmp_path)}
    with pytest.raises(TaskError, match=r"the model is on the meta device, and module Scaled \(the model itself\) has "
                                                  r"parameters or buffers of its own but no reset_parameters\(\)"):
        ddptrain.train(cfg, task=meta_without_init)


def test_a_checkpoint_whose_dcp_metadata_holds_code_is_refused(ddp_and_fsdp, tmp_path):
    *_, run_dir = ddp_and_fsdp
    bad = tmp_path / "step-000000099"
    shutil.copytree(checkpoint.step_files(run_dir / "checkpoints")[0], bad)

    class Boom:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)
    (bad / ".metadata").write_bytes(pickle.dumps(Boom()))
    model = ddptrain.load_model(run_dir, "best")
    with pytest.raises(checkpoint.CheckpointError, match="refused, its metadata holds objects that safe loading"):
        sharded.load_sharded(bad, {"model": model.state_dict()}, no_dist=True)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_under_fsdp_trains_like_ddp(tmp_path, precision):
    cfg = with_(BASE, train={"precision": precision, "epochs": 2}, checkpoint={"every_steps": None, "save_best": False})
    ddp = run_ranks(train_rank, 2, tmp_path / "ddp", cfg, None, None, timeout=120)[0]["summary"]
    sharded = run_ranks(train_rank, 2, tmp_path / "fsdp", fsdp(cfg), None, None, timeout=120)[0]["summary"]
    assert sharded["status"] == "completed" and sharded["skipped_steps"] == ddp["skipped_steps"]
    assert sharded["test"]["loss"] == pytest.approx(ddp["test"]["loss"], rel=0.02)


def test_a_truncated_shard_makes_its_checkpoint_invalid_and_the_previous_one_is_used(ddp_and_fsdp):
    *_, run_dir = ddp_and_fsdp
    older, newest = checkpoint.step_files(run_dir / "checkpoints")[-2:]
    assert checkpoint.verify(newest) is None and checkpoint.latest_valid(run_dir / "checkpoints") == newest
    shard = next(newest.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-10])
    assert "truncated" in checkpoint.verify(newest)
    assert checkpoint.latest_valid(run_dir / "checkpoints") == older


def test_the_exported_state_dict_reproduces_the_test_metrics_in_one_process(ddp_and_fsdp, tmp_path):
    _, sharded, run_dir = ddp_and_fsdp
    out = tmp_path / "model.pt"
    proc = subprocess.run([sys.executable, "-m", "ddptrain", "export", str(run_dir), "--checkpoint", "best",
                           "-o", str(out)], cwd=TESTS, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    weights = torch.load(out, weights_only=True)
    assert all(type(v) is torch.Tensor for v in weights.values())  # whole tensors, not shards
    model = ddptrain.load_model(run_dir, "best")
    model.load_state_dict(weights)
    import tasks_any_batch  # the test set the run used
    cfg = from_dict({**fsdp(BASE), "runs_dir": str(run_dir.parent), "name": "r"})
    data = tasks_any_batch.shapes(cfg).test
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.stack([data[i][1] for i in range(len(data))])
    with torch.no_grad():
        mse = torch.nn.functional.mse_loss(model(x), y).item()
    assert mse == pytest.approx(sharded["summary"]["test"]["loss"], rel=1e-5)


LM = {"task": "tasks_any_batch:causal_lm", "data": {"batch_size": 24}, "loss": {"name": "cross_entropy"},
      "optim": {"name": "adamw", "lr": 0.01}, "train": {"epochs": 3, "log_every": 2},
      "checkpoint": {"every_steps": 3}, "early_stop": {"monitor": "val_accuracy", "mode": "max"},
      "dist": {"timeout_s": 30, "strategy": "fsdp"}}


def test_an_fsdp_run_killed_mid_epoch_resumes_bitwise(tmp_path):
    summary = kill_and_resume(tmp_path, LM, kill_at=8, models=None)
    assert summary["resumed_at_step"] == 6 and summary["steps"] == 15 and summary["strategy"] == "fsdp"


def test_an_fsdp_checkpoint_of_2_ranks_resumes_on_3(tmp_path):
    with pytest.raises(RankFailed):
        run_ranks(train_rank, 2, tmp_path, LM, 8, None, timeout=120)
    resumed = run_ranks(train_rank, 3, tmp_path, LM, None, None, timeout=120)[0]["summary"]
    assert resumed["resumed_at_step"] == 6 and resumed["steps"] == 15 and resumed["world_size"] == 3
    assert resumed["test"]["accuracy"] > 0.3  # learning went on from the resharded state


@pytest.mark.parametrize("overrides,expected", [
    ([], "config key 'dist.strategy': fsdp shards the model over 2 or more ranks; this run has 1"),
    (["dist.static_graph=true"], "config key 'dist.static_graph': true is a DDP setting, which fsdp does not use; "
                                 "leave it at false (its default)"),
    (["val.mode=rank0", "--nproc-per-node=2"], "config key 'val.mode': rank0 needs the whole model on rank 0"),
    (["dist.blocks=[Conv2d]", "--nproc-per-node=2"], "config key 'dist.blocks': no module of the model is a Conv2d"),
])
def test_fsdp_setups_that_cannot_work_are_one_line_errors(tmp_path, overrides, expected):
    config = tmp_path / "c.yaml"  # JSON is YAML
    config.write_text(json.dumps(fsdp({**BASE, "runs_dir": str(tmp_path)})))
    launch = [a for a in overrides if a.startswith("--")]
    rest = [a for a in overrides if not a.startswith("--")]
    command = ["launch", *launch] if launch else ["train"]
    proc = subprocess.run([sys.executable, "-m", "ddptrain", *command, str(config), *rest], cwd=TESTS,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"ddptrain: error: {expected}" in proc.stderr


def test_the_same_step_saved_again_keeps_the_whole_one_until_the_new_one_is_marked(tmp_path, monkeypatch):
    """A step's sharded checkpoint written a second time (an epoch's end after a resume at its last step) is
    renamed aside, not removed, until the new one is in place: a failure before its marker puts it back."""
    path = tmp_path / "step-000000006"

    def finish(value):
        tmp = tmp_path / ".step-000000006.tmp"
        tmp.mkdir()
        (tmp / "__0_0.distcp").write_bytes(bytes([value]) * 8)
        sharded._finish_sharded(path, tmp, {"progress": {"step": 6}, "value": value}, None)
    finish(1)
    assert checkpoint.verify(path) is None
    writes = sharded.write_atomic

    def marker_fails(target, write):
        if target.name.endswith(".done"):
            raise OSError(28, "No space left on device")
        writes(target, write)
    monkeypatch.setattr(sharded, "write_atomic", marker_fails)
    with pytest.raises(checkpoint.CheckpointError, match="No space left on device; the previous checkpoint is kept"):
        finish(2)
    assert checkpoint.verify(path) is None and checkpoint.load(path)["value"] == 1
    assert (path / "__0_0.distcp").read_bytes() == bytes([1]) * 8
    monkeypatch.setattr(sharded, "write_atomic", writes)
    finish(3)
    assert checkpoint.verify(path) is None and checkpoint.load(path)["value"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000006", "step-000000006.done"]


class Items(torch.utils.data.IterableDataset):
    """A stream of the samples of `tensors`, split over the ranks by ddptrain (every world-size-th item)."""

    def __init__(self, *tensors):
        self.tensors = tensors

    def __iter__(self):
        return iter(zip(*self.tensors))


def evaluate_few(rank, n, eval_batch_size, strategy, stream=False):
    """Loss and accuracy of `n` samples, and the batch size of each forward this rank ran: under fsdp with the
    model sharded and the batches in lockstep, as the trainer evaluates it; under ddp (or world size 1) the whole
    model."""
    cfg = from_dict({"data": {"eval_batch_size": eval_batch_size}, "dist": {"strategy": strategy}})
    dist = Dist(detect(os.environ), torch.device("cpu"), "gloo", 30, 30)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        if strategy == "fsdp":
            Sharded(cfg, dist).wrap(model)
        forwards = []
        model.register_forward_hook(lambda m, i, o: forwards.append(len(i[0])))
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)
        evaluate = Evaluator(dist, Forward(CrossEntropy()), {"accuracy": as_metric(accuracy)},
                             Precision("fp32", torch.device("cpu")), "sharded", cfg.data, lockstep=strategy == "fsdp")
        values = evaluate(model, Items(x, y) if stream else TensorDataset(x, y))
        return {**values, "forwards": forwards}
    finally:
        dist.close()


@pytest.mark.parametrize("n,eval_batch_size,world_size,stream,forwards", [
    (1, 4, 2, False, [[1], [1]]),  # rank 1's shard is empty: it runs rank 0's batch
    (3, 1, 2, False, [[1, 1], [1, 1]]),  # 2 batches and 1: rank 1 repeats its last
    (2, 1, 3, False, [[1], [1], [1]]),  # rank 2's shard is empty
    (1, 4, 2, True, [[1], [1]]),  # a stream with fewer items than ranks
])
def test_fsdp_evaluates_a_set_smaller_than_the_ranks_exactly_as_one_rank(n, eval_batch_size, world_size, stream,
                                                                           forwards):
    # every rank runs every forward (each gathers the weights): a rank without a batch of its own runs a real one,
    # uncounted, so the numbers are those of the n samples alone
    reference = run_ranks(evaluate_few, 1, n, eval_batch_size, "ddp", stream, timeout=60)[0]
    ddp = run_ranks(evaluate_few, world_size, n, eval_batch_size, "ddp", stream, timeout=60)
    sharded = run_ranks(evaluate_few, world_size, n, eval_batch_size, "fsdp", stream, timeout=60)
    assert [r["forwards"] for r in sharded] == forwards
    for values in ddp + sharded:
        assert values["accuracy"] == reference["accuracy"]
        assert values["loss"] == pytest.approx(reference["loss"], rel=1e-12, abs=0)


def test_a_run_validates_and_tests_a_set_smaller_than_the_ranks_under_fsdp_like_ddp(tmp_path):
    # 1 validation and 1 test sample on 2 ranks, through the trainer (best weights, then the test)
    cfg = {"task": "tasks_for_tests:regression", "task_args": {"n_val": 1, "n_test": 1}, "data": {"batch_size": 16},
           "train": {"epochs": 1}, "dist": {"timeout_s": 30}}
    ddp = run_ranks(train_rank, 2, tmp_path / "ddp", cfg, None, None, timeout=120)[0]
    sharded = run_ranks(train_rank, 2, tmp_path / "fsdp", fsdp(cfg), None, None, timeout=120)[0]
    assert_close(sharded, ddp)
