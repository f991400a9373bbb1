"""The prepared GPU check (benchmarks/gpu_check.py) in its CPU quick mode, as CI runs it, so that the script is
known to work before a GPU is: every item reported, the CUDA ones skipped with their reason, the CPU ones
passing with real figures, the FLOP counting and MFU arithmetic right, the JSON and the table written."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PEAK = 1e11  # a made-up CPU peak, so that the MFU arithmetic has something to divide by


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_quick_mode_reports_every_item_with_real_figures(tmp_path):
    gpu_check = load_script()
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--cpu-quick", "--out", str(tmp_path),
                           "--peak-flops", str(PEAK), "--budget-s", "240"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    [json_file], [md_file] = list(tmp_path.glob("gpu_check_*.json")), list(tmp_path.glob("gpu_check_*.md"))
    report = json.loads(json_file.read_text())
    assert report["mode"] == "cpu-quick"
    assert report["versions"]["torch"] == torch.__version__
    assert {"gpu", "driver", "cuda", "nccl", "python", "ddptrain"} <= set(report["versions"])

    results = report["results"]
    assert {e["item"] for e in results} == set(gpu_check.ITEMS)  # every item has its entry, none was cut short
    assert report["counts"] == {s: sum(e["status"] == s for e in results) for s in ("pass", "fail", "skip")}
    assert report["counts"]["fail"] == 0
    why = "--cpu-quick" if torch.cuda.is_available() else "no CUDA GPU"
    for e in results:
        if e["cuda_only"]:
            assert e["status"] == "skip" and why in e["reason"], e
        elif e["item"] == "gpu-tests":  # the gpu-marked tests skip themselves here
            assert e["status"] in ("pass", "skip") and e["figures"]["failed"] == 0, e
        elif e["item"] == "fsdp-ws1":  # ddptrain refuses fsdp on one rank before it starts
            assert e["status"] == "skip" and "2 or more ranks" in e["reason"], e
        else:
            assert e["status"] == "pass", e
    by = {(e["item"], e["check"]): e for e in results}

    digits = by["digits-eager", "cpu fp32 eager (reference)"]["figures"]
    assert digits["value"] > 0.5  # chance is 0.1
    assert digits["pin_memory"] is False and digits["non_blocking"] is True  # pinned only on CUDA
    charlm = by["charlm-eager", "cpu fp32 eager (reference)"]["figures"]
    assert 0 < charlm["value"] < math.log(100)  # below the loss of a uniform guess over its 100 characters
    for item in ("ddp-2ranks", "fsdp-2ranks"):
        [e] = [e for e in results if e["item"] == item and "reference" not in e["check"]]
        assert e["figures"]["reference"] == digits["value"] and e["figures"]["diff"] <= 0.03

    [e] = [e for e in results if e["item"] == "throughput"]
    f, g = e["figures"], gpu_check.SIZES["cpu"]["gpt"]
    assert f["flops_linear_64x64_b8"] == 3 * 2 * 8 * 64 * 64  # forward, grad of the input, grad of the weight
    # per token: qkv, proj and the MLP's two layers (24 d^2 per layer) and the head (2 d V), three times (fwd + bwd);
    # CPU attention is not counted by torch
    tokens = g["batch"] * g["ctx"]
    assert f["flops_per_step"] == 3 * tokens * (g["n_layer"] * 24 * g["d"] ** 2 + 2 * g["d"] * g["vocab"])
    assert f["tokens_per_step"] == tokens and f["rounds"] == gpu_check.SIZES["cpu"]["rounds"]
    assert f["ratio"] > 0 and math.isclose(f["ratio"], f["minimal_step_s"] / f["ddptrain_step_s"])
    assert math.isclose(f["ddptrain_tokens_per_s"], tokens / f["ddptrain_step_s"])
    assert math.isclose(f["ddptrain_mfu"], f["flops_per_step"] / f["ddptrain_step_s"] / PEAK)
    assert math.isclose(f["minimal_mfu"], f["flops_per_step"] / f["minimal_step_s"] / PEAK)

    table = md_file.read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + len(results)  # the header, then one row per entry
    assert "| throughput |" in table and "pass" in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch can use the GPU: the case does not arise")
def test_a_gpu_that_torch_cannot_use_stops_the_check_instead_of_passing_on_cpu(tmp_path):
    """A torch without CUDA on a GPU machine would otherwise run the CPU quick mode and exit 0 (a green run that
    checked no GPU path); an nvidia-smi that lists a GPU stands in for the machine's."""
    (tmp_path / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-0)'\n")
    (tmp_path / "nvidia-smi").chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", str(tmp_path / "out")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "has an NVIDIA GPU, but torch" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def cuda_check(gpu_check, tmp_path, seconds: float = 30.0):
    """A Check as the GPU mode makes it, its item's deadline `seconds` away."""
    import time
    ctx = gpu_check.Check(True, 1, "", "NVIDIA H200", None, tmp_path)
    ctx.deadline = time.monotonic() + seconds
    return ctx


def test_the_async_save_item_is_judged_on_the_loops_stall_and_shares_its_items_time(tmp_path, monkeypatch):
    """Issue 12's target is the stall (a synchronous save's 1.3 s against 0.012 s); the cost swings from -0.08 to
    1.2 between runs with the write's competition for the machine, so it is a figure, not the verdict. The child
    gets what is left of the item's time, not the item's whole timeout again."""
    gpu_check = load_script()
    ctx, given = cuda_check(gpu_check, tmp_path, seconds=30), []

    def bench(commands, timeout):
        given.append(timeout)
        out = Path(commands[0][0][commands[0][0].index("--out") + 1])
        runs = {f"ddp, {mode}": {k: 0.5 for k in ("stall_per_save_s", "cost_per_save_s", "each_save_s", "step_s")}
                for mode in ("sync", "async")}
        out.write_text(json.dumps({"ddp async/sync": stall_and_cost[1], "ddp async/sync, later saves": 0.2,
                                   "ddp async/sync stall": stall_and_cost[0], **runs}))
        return [gpu_check.Proc(0, "", "")]
    monkeypatch.setattr(gpu_check, "run_procs", bench)
    for stall_and_cost, status in (((0.009, 0.6), "pass"), ((0.3, 0.05), "fail")):
        [e] = gpu_check.item_async_save(ctx)
        assert e["status"] == status and e["figures"]["stall_ratio"] == stall_and_cost[0], e
    assert all(t <= 30 for t in given) and given[0] > 25


def test_a_run_with_its_reference_and_nothing_to_run_starts_no_process(tmp_path, monkeypatch):
    """The multi-rank items ask for the digits reference, which an earlier item already ran: no child for it."""
    gpu_check = load_script()
    ctx = cuda_check(gpu_check, tmp_path)
    ctx.refs["digits"] = 0.95

    def started(commands, timeout):
        raise AssertionError(f"started {commands[0][0]}")
    monkeypatch.setattr(gpu_check, "run_procs", started)
    assert gpu_check.train_runs(ctx, "ddp-2ranks", "digits", []) == []
