"""DDP communication hooks (dist.comm_hook) on real gloo ranks: fp16 and PowerSGD train to about the same
result as the plain all-reduce without hanging, a PowerSGD run resumes bitwise, and bf16 (NCCL only) is
refused in one line."""
import pytest

from ddptrain import checkpoint

from killing import kill_and_resume, train_rank
from multirank import RankFailed, run_ranks

BASE = {"task": "tasks_any_batch:shapes", "data": {"batch_size": 16}, "optim": {"name": "adamw", "lr": 0.01},
        "train": {"epochs": 4, "log_every": 2}, "dist": {"timeout_s": 30},
        "checkpoint": {"every_epochs": 0, "save_best": False}}


def hooked(hook, **dist):
    return {**BASE, "dist": {**BASE["dist"], "comm_hook": hook, **dist}}


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return run_ranks(train_rank, 2, tmp_path_factory.mktemp("plain"), BASE, None, timeout=120)[0]["summary"]


# How close each comes to the plain all-reduce's test loss (measured: see the README's "Communication hooks").
@pytest.mark.parametrize("hook,extra,rel", [("fp16", {}, 1e-3),
                                            ("powersgd", {"powersgd_rank": 2, "powersgd_start_step": 2}, 0.25)])
def test_each_hook_trains_to_about_the_plain_result(plain, tmp_path, hook, extra, rel):
    summary = run_ranks(train_rank, 2, tmp_path, hooked(hook, **extra), None, timeout=120)[0]["summary"]
    assert summary["status"] == "completed"
    assert summary["test"]["loss"] == pytest.approx(plain["test"]["loss"], rel=rel)


def test_a_powersgd_run_killed_mid_run_resumes_bitwise(tmp_path):
    # The error feedback and warm-start factors are saved per parameter and put back into whatever buckets
    # the resumed process's DDP lays out (powersgd.py), so the resumed run is the uninterrupted one.
    # The built-in MLP (10-256-128-1): its weight matrices are big enough for rank-2 compression to pay.
    cfg = {**hooked("powersgd", powersgd_rank=2, powersgd_start_step=2), "task": "diabetes",
           "data": {"batch_size": 32}, "train": {"epochs": 2, "log_every": 2},
           "checkpoint": {"every_steps": 4, "save_best": False}}
    summary = kill_and_resume(tmp_path, cfg, kill_at=14, models=None)
    assert summary["resumed_at_step"] == 12 and summary["steps"] == 18
    saved = checkpoint.load(checkpoint.step_files(tmp_path / "killed" / "r" / "checkpoints")[0])
    part = saved["ranks"][1]["comm_hook"]
    assert part["iter"] > 2 and set(part["q"]) == {"0.0.weight", "0.2.weight"} and "0.4.bias" in part["error"]


def test_the_bf16_hook_outside_nccl_is_a_one_line_config_error(tmp_path):
    with pytest.raises(RankFailed) as failed:
        run_ranks(train_rank, 2, tmp_path, hooked("bf16"), None, timeout=60)
    assert all("ConfigError: config key 'dist.comm_hook': bf16 needs CUDA and NCCL" in e
               for e in failed.value.errors.values())


def nan_on_rank1_at(at):
    def hook(step, micro_step, batch):
        import os
        if os.environ.get("RANK") == "1" and step == at:
            x, y = batch
            x = x.clone()
            x[0, 0] = float("nan")
            return x, y
        return batch
    return hook


def train_summary(rank, runs_dir, cfg_dict, hook=None):
    import os
    from ddptrain.config import from_dict
    from ddptrain.dist import detect
    from ddptrain.trainer import run
    cfg = from_dict({"name": "r", **cfg_dict, "runs_dir": str(runs_dir)})
    return run(cfg, detect(os.environ), hooks={"before_micro_step": hook} if hook else None)


# The built-in MLP (10-256-128-1), whose weight matrices PowerSGD compresses; PowerSGD from step 2.
SKIPPING = {**hooked("powersgd", powersgd_rank=2, powersgd_start_step=2), "task": "diabetes",
            "data": {"batch_size": 32}, "train": {"epochs": 3, "log_every": 3}}


def test_a_step_skipped_for_a_nan_under_powersgd_is_the_only_one_skipped(tmp_path):
    """PowerSGD's error feedback and warm-start Q are made from the step's gradients: a NaN made them NaN, and
    added to every later step's gradients they made every step skip, until max_skips_in_a_row stopped the run."""
    cfg = {**SKIPPING, "train": {**SKIPPING["train"], "nonfinite": "skip"}}
    summaries = run_ranks(train_summary, 2, tmp_path, cfg, nan_on_rank1_at(5), timeout=120)
    assert [s["skipped_steps"] for s in summaries] == [1, 1]
    assert summaries[0]["status"] == "completed" and summaries[0]["test"] == summaries[1]["test"]


def test_fp16_under_powersgd_skips_the_steps_plain_fp16_skips(tmp_path):
    """fp16's scaler skips the first steps while it lowers its scale: their inf gradients must not stay in
    PowerSGD's state (which made every later step overflow too, and the run stop as diverged)."""
    fp16 = {**SKIPPING, "train": {**SKIPPING["train"], "precision": "fp16"}}
    plain = run_ranks(train_summary, 2, tmp_path / "plain", {**fp16, "dist": BASE["dist"]}, timeout=120)[0]
    hooked_ = run_ranks(train_summary, 2, tmp_path / "powersgd", fp16, timeout=120)[0]
    assert 0 < plain["skipped_steps"] < plain["steps"] - 5
    assert hooked_["status"] == "completed" and hooked_["skipped_steps"] == plain["skipped_steps"]
