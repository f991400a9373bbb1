"""What a run shows about itself (observe.py), on CPU with real gloo ranks: MFU from a known FLOP count,
the slowest and fastest rank's own time per step with a warning for a persistent straggler, a profiler
trace that loads, and a CUDA out-of-memory error as one line."""
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ddptrain.configfile import from_dict
from ddptrain.dist import detect
from ddptrain.observe import Rates
from ddptrain.preempt import Preempted
from ddptrain.run import run

from multirank import run_ranks

TESTS = Path(__file__).resolve().parent
BASE = {"task": "tasks_any_batch:shapes", "data": {"batch_size": 16}, "optim": {"name": "adamw", "lr": 0.01},
        "train": {"epochs": 2, "log_every": 2}, "dist": {"timeout_s": 30}, "checkpoint": {"save_best": False}}
# OneInput: Linear(5, 16), Linear(3, 16), Linear(16, 1); a forward multiplies and adds once per weight
FORWARD_FLOPS = 2 * (5 * 16 + 3 * 16 + 16 * 1)


def train_events(run_dir):
    return [e for e in map(json.loads, open(run_dir / "metrics.jsonl")) if e["split"] == "train"]


def train(rank, runs_dir, cfg):
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger("ddptrain").addHandler(handler)
    summary = run(from_dict({"name": "r", **cfg, "runs_dir": str(runs_dir)}), detect(os.environ))
    return {"summary": summary, "warnings": seen}


def test_mfu_is_the_model_flops_per_second_over_the_configured_peak(tmp_path):
    peak = 1e9
    cfg = {**BASE, "train": {**BASE["train"], "peak_flops": peak}}
    summary = run_ranks(train, 2, tmp_path, cfg, timeout=120)[0]["summary"]
    assert summary["flops_per_sample"] == 3 * FORWARD_FLOPS
    assert summary["mfu"] == pytest.approx(summary["samples_per_s"] * 3 * FORWARD_FLOPS / (2 * peak), rel=1e-9)
    events = train_events(tmp_path / "r")
    assert events and all(e["mfu"] == pytest.approx(e["samples_per_s"] * 3 * FORWARD_FLOPS / (2 * peak), rel=1e-9)
                          for e in events)


def train_slow_first_step(rank, runs_dir, cfg):
    def first_step_takes_a_second(step, micro_step, batch):  # as a compile or a CUDA warm-up might
        if step == 0:
            time.sleep(1.0)
        return batch
    return run(from_dict({"name": "r", **cfg, "runs_dir": str(runs_dir)}), detect(os.environ),
               hooks={"before_micro_step": first_step_takes_a_second})


def test_the_summary_rate_leaves_out_the_first_step_which_time_to_first_step_shows(tmp_path):
    summary = run_ranks(train_slow_first_step, 2, tmp_path, BASE, timeout=120)[0]
    steady_s = (summary["steps"] - 1) * BASE["data"]["batch_size"] / summary["samples_per_s"]
    # 12 steps; over all of them the rate's time would be at least 11/12 s
    assert summary["time_to_first_step_s"] > 1.0 and steady_s < 0.5, summary


def test_rates_leave_out_the_warm_up_and_the_pauses_within_an_epoch():
    rates = Rates(start_step=10)  # resumed at step 10
    assert rates.steps_per_s(10) is None and rates.tokens_per_step() == 0.0
    rates.train_s, rates.warm_up_s = 7.0, 3.0  # step 11 took 3 s, steps 12-15 took 4 s with a 2 s validation
    rates.pause(2.0, in_epoch=True)
    rates.pause(5.0)  # an epoch-end save: outside the training time already
    assert rates.steps_per_s(15) == 4 / 2.0 and rates.paused_s == 7.0
    rates.tokens = 1000
    rates.next_interval(now=0.0, step=15)
    assert rates.tokens_per_step() == 200 and rates.paused_s == rates.data_wait_s == 0.0
    one = Rates(start_step=0)
    one.train_s = one.warm_up_s = 3.0
    assert one.steps_per_s(1) == 1 / 3.0  # one step: its own time, warm-up and all


def test_a_rank_with_a_slow_forward_is_named_the_slowest_and_warned_about(tmp_path):
    cfg = {**BASE, "task": "tasks_observe:slow_rank1", "train": {**BASE["train"], "epochs": 3}}
    results = run_ranks(train, 2, tmp_path, cfg, timeout=120)
    events = train_events(tmp_path / "r")
    assert len(events) == 9 and all(e["slowest_rank"] == 1 for e in events)
    assert all(e["slowest_rank_step_s"] >= 0.02 > e["fastest_rank_step_s"] for e in events)  # one 20 ms forward a step
    assert sum("rank 1 is persistently the slowest" in w for w in results[0]["warnings"]) == 1
    assert not any("slowest" in w for w in results[1]["warnings"])  # rank 0 alone says it


def test_train_profile_writes_a_trace_of_the_chosen_steps_that_loads(tmp_path):
    cfg = {**BASE, "train": {**BASE["train"], "profile": [3, 4]}}
    run_ranks(train, 2, tmp_path, cfg, timeout=120)
    assert [p.name for p in (tmp_path / "r" / "profile").iterdir()] == ["rank0.json"]  # profile_ranks: rank0
    trace = json.loads((tmp_path / "r" / "profile" / "rank0.json").read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert {n for n in names if n.startswith("ddptrain step")} == {"ddptrain step 3", "ddptrain step 4"}
    assert any(n.startswith("aten::addmm") for n in names)  # the model's own work is in it


@pytest.mark.parametrize("steps, said", [([13, 15], "no trace is recorded"), ([11, 15], "the trace ends at step 12")])
def test_a_profile_past_the_runs_length_is_said(tmp_path, steps, said):
    result = train(0, tmp_path, {**BASE, "train": {**BASE["train"], "profile": steps}})  # 2 epochs of 6 steps
    assert result["warnings"] == [f"train.profile={steps} goes past the run's 12 optimizer steps: {said}"]
    assert (tmp_path / "r" / "profile").exists() == (steps[0] <= 12)


def test_a_cuda_out_of_memory_error_is_one_line_with_what_to_try(tmp_path):
    config = tmp_path / "c.yaml"  # JSON is YAML
    config.write_text(json.dumps({**BASE, "task": "tasks_observe:out_of_memory", "runs_dir": str(tmp_path)}))
    proc = subprocess.run([sys.executable, "-m", "ddptrain", "train", str(config)], cwd=TESTS,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert ("ddptrain: error: CUDA out of memory at step 1 on rank 0; try a smaller micro-batch with gradient "
            "accumulation (train.grad_accum_steps), dist.strategy=fsdp") in proc.stderr


def test_the_flight_recorder_is_set_up_for_nccl_without_overriding_the_user_and_named_in_timeouts(tmp_path,
                                                                                                  monkeypatch):
    from ddptrain import observe
    from ddptrain.dist import DistEnv, explain_failure
    for name in ("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_DUMP_ON_TIMEOUT", "TORCH_FR_DUMP_TEMP_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TORCH_FR_BUFFER_SIZE", "50")  # the user's own choice stays
    assert observe.flight_recorder(tmp_path, False) is None and "TORCH_NCCL_DUMP_ON_TIMEOUT" not in os.environ
    prefix = observe.flight_recorder(tmp_path, True)
    assert prefix == str(tmp_path / "flight_recorder" / "rank_") == os.environ["TORCH_FR_DUMP_TEMP_FILE"]
    assert os.environ["TORCH_FR_BUFFER_SIZE"] == "50" and os.environ["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    error = explain_failure(RuntimeError("Watchdog caught collective operation timeout: WorkNCCL timed out"),
                            DistEnv(rank=1, world_size=2), "training", 7, "dist.timeout_s=30", prefix)
    assert str(error).endswith(f"; this rank's last collectives are in {prefix}1 (Flight Recorder)")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_per_layer_gradient_norms_at_log_steps_add_up_to_the_global_norm(tmp_path, strategy):
    # without clipping, the logged grad_norm is the pre-clip global norm: the root of the layers' squares' sum
    cfg = {**BASE, "train": {**BASE["train"], "log_grad_norms": True}, "dist": {**BASE["dist"], "strategy": strategy}}
    run_ranks(train, 2, tmp_path, cfg, timeout=120)
    events = train_events(tmp_path / "r")
    assert len(events) == 6 and all(list(e["grad_norms"]) == ["a", "b", "head"] for e in events)
    for e in events:
        assert sum(v * v for v in e["grad_norms"].values()) ** 0.5 == pytest.approx(e["grad_norm"], rel=1e-5)


def preempted_at(step: int, cfg: dict, runs_dir) -> None:
    """Run `cfg` in this process until the preemption signal, sent during optimizer step `step`, stops it."""
    def signal_at(s, micro_step, batch):
        if s == step - 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        return batch
    with pytest.raises(Preempted):
        run(from_dict({"name": "r", **cfg, "runs_dir": str(runs_dir)}), detect(os.environ),
            hooks={"before_micro_step": signal_at})


def test_a_profile_split_by_a_preemption_keeps_both_parts_and_a_longer_run_records_no_more(tmp_path):
    cfg = {**BASE, "train": {**BASE["train"], "profile": [2, 3], "max_steps": 4}}
    preempted_at(2, cfg, tmp_path)
    train(0, tmp_path, cfg)
    train(0, tmp_path, {**cfg, "train": {**cfg["train"], "max_steps": 6}})  # steps 5 and 6: past the range
    traces = {p.name: {e["name"] for e in json.loads(p.read_text())["traceEvents"]
                       if e.get("name", "").startswith("ddptrain step")} for p in (tmp_path / "r" / "profile").iterdir()}
    assert traces == {"rank0.json": {"ddptrain step 2"}, "rank0-from-step3.json": {"ddptrain step 3"}}


def test_tokens_per_second_after_a_resume_counts_this_attempts_tokens_alone(tmp_path):
    """Preempted at step 2 of 8, between logs: the resumed run's first log holds the train sums of steps 1-4 but
    timed steps 3-4 alone. 12 tokens per sample, always."""
    cfg = {"task": "tasks_any_batch:causal_lm", "data": {"batch_size": 16}, "loss": {"name": "cross_entropy"},
           "train": {"epochs": 1, "log_every": 4}, "checkpoint": {"every_steps": 2, "save_best": False}}
    preempted_at(2, cfg, tmp_path)
    summary = train(0, tmp_path, cfg)["summary"]
    events = train_events(tmp_path / "r")
    assert summary["resumed_at_step"] == 2 and [e["step"] for e in events] == [4, 8]
    for rates in (*events, summary):
        assert rates["tokens_per_s"] / rates["samples_per_s"] == pytest.approx(12)
