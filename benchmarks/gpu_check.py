"""One prepared GPU check of ddptrain: the gpu tests, both examples in every precision (eager and compiled)
against a CPU fp32 reference, the multi-rank CUDA paths (gloo over CUDA tensors, NCCL), FSDP, and throughput
of a GPT-2-small against a minimal hand-written loop; every figure goes to a JSON file and a markdown table.

GPU time is rare and short, so it is one command with no arguments needed, run from the repository root
with the Python whose torch has CUDA; ddptrain is taken from this tree, installed or not:

    python3 benchmarks/gpu_check.py                # about 8 minutes on one H200 at most (--budget-s)
    python3 benchmarks/gpu_check.py --out "$OUT"   # the device tool's machine: only $OUT comes back
    python benchmarks/gpu_check.py --cpu-quick     # what can run on CPU, tiny sizes, about a minute (CI)

The report is rewritten after every item, so a run killed from outside keeps what it did.

Each item runs in subprocesses with a timeout, so a hang costs one item, not the session; an item that would
not fit in what is left of the budget is skipped. Without a GPU the CPU quick mode runs by itself. Exit
status: 0 when nothing failed (skips allowed), 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import namedtuple
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # ddptrain from this tree: the GPU machine gets a copy of it, not an install
MARK = "GPU_CHECK_RESULT "  # a worker's result lines; the rest of its output is ddptrain's own
PRECISIONS = ("fp32", "bf16", "fp16")
REFERENCE = {"device": "cpu", "precision": "fp32", "compile": False}
# (metric of the test split, tolerance, relative?) against the CPU fp32 run of the same config
EXAMPLES = {"digits": ("accuracy", 0.03, False), "charlm": ("loss", 0.05, True)}
# Dropout off: runs then differ by numerics alone, not by random masks that depend on the device and the rank.
COMMON = {"digits": ["model.dropout=0.0", "checkpoint.every_epochs=0"], "charlm": ["checkpoint.every_epochs=0"]}
SIZES = {  # per mode: run lengths, and the throughput workload
    "gpu": {"digits": ["train.epochs=20"], "charlm": ["train.max_steps=300"],
            "gpt": dict(vocab=50304, ctx=1024, n_layer=12, n_head=12, d=768, batch=32),
            "warm": 10, "measure": 30, "rounds": 3, "precision": "bf16", "compile": True},
    "cpu": {"digits": ["train.epochs=3"], "charlm": ["train.max_steps=20"],
            "gpt": dict(vocab=256, ctx=64, n_layer=2, n_head=4, d=64, batch=8),
            "warm": 5, "measure": 10, "rounds": 2, "precision": "fp32", "compile": False},
}
# The MFU target by a piece of torch.cuda.get_device_name() (nanoGPT's class of result); the peaks are ddptrain's
# own table (observe.PEAK_BF16_FLOPS), the one its train events' mfu uses.
MFU_TARGET = {"H200": 0.40, "H100": 0.40}
RATIO_TARGET = 0.97
RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
             "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RESTART_COUNT", "SLURM_PROCID", "SLURM_STEP_ID")
PEER_GRACE_S = 20  # once a rank has failed, how long the others get before they are killed (not the whole timeout)

Proc = namedtuple("Proc", "rc out err")  # rc None: killed (timeout, or a peer rank failed)


# ---- processes -----------------------------------------------------------------------------------
def run_procs(commands: list[tuple[list[str], dict]], timeout: float) -> list[Proc]:
    """Start the (command, env) pairs at once (the ranks of one job) and wait, at most `timeout` s.

    Each gets its own session, so a kill takes its children too (compile workers); output goes to files,
    since a full pipe could stall one rank while another waits for it in a collective."""
    with tempfile.TemporaryDirectory() as d:
        procs = []
        for i, (cmd, env) in enumerate(commands):
            out, err = open(f"{d}/{i}.out", "w+"), open(f"{d}/{i}.err", "w+")
            procs.append((subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=err, start_new_session=True),
                          out, err))
        deadline, failed_at = time.monotonic() + timeout, None
        while any(p.poll() is None for p, _, _ in procs) and time.monotonic() < deadline:
            if failed_at is None and any(p.poll() not in (None, 0) for p, _, _ in procs):
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > PEER_GRACE_S:
                break
            time.sleep(0.1)
        results = []
        for p, out, err in procs:
            rc = p.poll()
            try:
                os.killpg(p.pid, signal.SIGKILL)  # the leader if still running, and whatever it left behind
            except ProcessLookupError:
                pass
            p.wait()
            out.seek(0), err.seek(0)
            results.append(Proc(rc, out.read(), err.read()))
            out.close(), err.close()
        return results


def plain_env(**extra) -> dict:
    """This environment without any launcher's variables (a child would take itself for a rank), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # every rank is on this machine; a VM's hostname may not resolve
    return {**env, **{k: str(v) for k, v in extra.items()}}


def error_line(proc: Proc, timeout: float) -> str:
    """The one line that says why a process failed: ddptrain's error, else the exception, else the last line."""
    if proc.rc is None:
        return f"killed after {timeout:.0f} s (timed out, or a peer rank failed)"
    lines = [line.strip() for line in proc.err.splitlines() if line.strip()]
    ours = [line for line in lines if line.startswith("ddptrain: error:")]
    raised = [line for line in lines if re.match(r"^([\w.]+(Error|Exception|Failed)|\[rank \d+\] \w+)\b", line)]
    return (ours or raised or lines or [f"exit status {proc.rc}, no output"])[-1][:300]


def worker(ctx, kind: str, spec: dict, expected: int) -> list[dict]:
    """Run `kind` of work in a child of this script; its `expected` results, a failure for each one missing."""
    timeout = ctx.timeout
    proc = run_procs([([sys.executable, __file__, "--worker", kind, json.dumps(spec)], plain_env())], timeout)[0]
    results = [json.loads(line[len(MARK):]) for line in proc.out.splitlines() if line.startswith(MARK)]
    why = error_line(proc, timeout)
    return results + [{"error": why}] * (expected - len(results))


def emit(**result) -> None:
    print(MARK + json.dumps(result), flush=True)


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:300]


# ---- work done in the children -------------------------------------------------------------------
def work_runs(spec: dict) -> None:
    """Train one example once per run of `spec` in this process, with a look at every batch before it is moved
    to the device (is it pinned?). One result line per run."""
    import inspect
    import torch
    from ddptrain import configfile
    from ddptrain.run import run as train_run
    from ddptrain.batch import first_tensor, to_device
    from ddptrain.dist import detect

    example, metric = spec["example"], EXAMPLES[spec["example"]][0]
    non_blocking = inspect.signature(to_device).parameters["non_blocking"].default  # the loop calls it so
    for run in spec["runs"]:
        seen = {}

        def look(step, micro_step, batch):
            seen.setdefault("pinned", first_tensor(batch).is_pinned())
            return batch
        label = f"{example}-{run['device']}-{run['precision']}-{'compiled' if run['compile'] else 'eager'}"
        overrides = [*spec["overrides"], f"runs_dir={spec['runs_dir']}", f"name={label}",
                     f"dist.device={run['device']}", f"train.precision={run['precision']}",
                     f"train.compile={str(run['compile']).lower()}"]
        if run["compile"]:
            torch._dynamo.reset()  # each compiled run compiles as a fresh process would (the disk caches stay)
        started = time.perf_counter()
        try:
            cfg = configfile.load(REPO / "examples" / f"{example}.yaml", overrides)
            summary = train_run(cfg, detect(os.environ), hooks={"before_micro_step": look})
        except Exception as e:
            emit(error=first_line(e))
            continue
        emit(value=summary["test"][metric], steps=summary["steps"], pin_memory=seen.get("pinned"),
             non_blocking=non_blocking, seconds=round(time.perf_counter() - started, 1))


def work_nccl_probe(spec: dict) -> None:
    """NCCL itself at world size 1: a process group and one all-reduce on cuda:0 (ddptrain makes no group there)."""
    import torch
    import torch.distributed as dist
    try:
        torch.cuda.set_device(0)
        dist.init_process_group("nccl", rank=0, world_size=1, store=dist.HashStore(), device_id=torch.device("cuda", 0))
        t = torch.full((4,), 3.0, device="cuda")
        dist.all_reduce(t)
        torch.cuda.synchronize()
        ok = bool((t == 3.0).all())
        dist.destroy_process_group()
        emit(value=ok, **({} if ok else {"error": f"all_reduce gave {t.tolist()}"}))
    except Exception as e:
        emit(error=first_line(e))


def make_gpt(vocab: int, ctx: int, n_layer: int, n_head: int, d: int):
    """A GPT-2-style decoder (pre-norm blocks, causal SDPA, tied embeddings) that computes its own loss, as
    Hugging Face models do: GPT-2 small at 12 layers, 12 heads, d 768 (124M parameters)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))

        def forward(self, x):
            B, T, _ = x.shape
            q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, n_head, d // n_head).permute(2, 0, 3, 1, 4)
            x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, d))
            return x + self.mlp(self.ln2(x))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
            self.blocks = nn.ModuleList(Block() for _ in range(n_layer))
            self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)
            self.head.weight = self.tok.weight
            for p in self.parameters():
                if p.dim() == 2:
                    nn.init.normal_(p, std=0.02)

        def forward(self, idx, labels):
            x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
            for block in self.blocks:
                x = block(x)
            logits = self.head(self.ln(x))
            return {"loss": F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())}

    return GPT()


def count_flops(fn) -> int:
    """FLOPs of what `fn` runs, counted by torch, not estimated: matmuls, and attention as full (not causal)
    attention; on CPU attention is not counted (torch's counter has no formula for its CPU kernel)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def work_throughput(spec: dict) -> None:
    """ddptrain against a minimal loop on one model and one batch size, in alternating rounds; compile warm-up
    is excluded from both. The tokens live on the device, so neither side pays for loading data."""
    import contextlib
    import torch
    from torch import nn
    import ddptrain

    device, g, lr = torch.device(spec["device"]), spec["gpt"], 3e-4
    warm, measure, B, T = spec["warm"], spec["measure"], g["batch"], g["ctx"]
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    torch.manual_seed(0)
    model = make_gpt(g["vocab"], T, g["n_layer"], g["n_head"], g["d"]).to(device)
    tokens = torch.randint(0, g["vocab"], (B * (warm + measure), T + 1), device=device)
    batch = {"idx": tokens[:B, :-1].contiguous(), "labels": tokens[:B, 1:].contiguous()}  # as collate stacks them

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if spec["precision"] == "bf16" \
            else contextlib.nullcontext()

    def forward_backward():
        with autocast():
            loss = model(**batch)["loss"]
        loss.backward()
    flops = count_flops(forward_backward)
    model.zero_grad(set_to_none=True)
    x = torch.randn(8, 64, requires_grad=True)  # a known layer, to check the counting: 3 x 2 x 8 x 64 x 64
    linear_flops = count_flops(lambda: nn.Linear(64, 64)(x).sum().backward())

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(tokens)

        def __getitem__(self, i):
            return {"idx": tokens[i, :-1], "labels": tokens[i, 1:]}

    def task(cfg):  # the same model object every round: compiled once, as the minimal loop's is
        return ddptrain.Task(model=model, train=Rows(), loss="model",
                             optimizer=lambda groups: torch.optim.AdamW(groups, lr=lr, fused=True))

    def ddptrain_step_s(r: int) -> float:
        """One ddptrain run; its step time from the train records after the first (which holds the compile)."""
        name = f"gpt-{r}"
        ddptrain.train({"name": name, "runs_dir": spec["runs_dir"], "data": {"batch_size": B, "pin_memory": False},
                        "train": {"epochs": 1, "max_steps": warm + measure, "log_every": warm,
                                  "precision": spec["precision"], "compile": spec["compile"]},
                        "dist": {"device": device.type}, "checkpoint": {"every_epochs": 0, "save_best": False}},
                       task=task)
        lines = (Path(spec["runs_dir"]) / name / "metrics.jsonl").read_text().splitlines()
        records = [e for e in map(json.loads, lines) if e["split"] == "train"]
        seconds = sum((e["step"] - p["step"]) * B / e["samples_per_s"] for p, e in zip(records, records[1:]))
        return seconds / (records[-1]["step"] - records[0]["step"])

    compiled = torch.compile(model) if spec["compile"] else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)

    def minimal_step_s() -> float:
        model.train()
        for i in range(warm + measure):
            if i == warm:
                sync()
                started = time.perf_counter()
            with autocast():
                loss = compiled(**batch)["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sync()
        return (time.perf_counter() - started) / measure

    minimal_step_s()  # compiles the model (and lets compile workers settle): every round below runs warm
    emit(flops_per_step=flops, flops_linear_64x64_b8=linear_flops, tokens_per_step=B * T,
         params=sum(p.numel() for p in model.parameters()), measured_peak_flops=matmul_flops_per_s(device))
    for r in range(spec["rounds"]):  # a line each: a kill keeps the rounds done
        emit(round=(ddptrain_step_s(r), minimal_step_s()))


def matmul_flops_per_s(device) -> float | None:
    """What this GPU gives a large bf16 matrix product (8192^3, the mean of 10 after 3 warm-ups): a peak it
    reaches, beside the datasheet's."""
    import torch
    if device.type != "cuda":
        return None
    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    end.synchronize()
    return 10 * 2 * n ** 3 / (start.elapsed_time(end) / 1e3)


WORK = {"runs": work_runs, "nccl-probe": work_nccl_probe, "throughput": work_throughput}


# ---- the items -----------------------------------------------------------------------------------
class Check:
    """What the items share: the mode, the item at hand's deadline, the references, a runs dir."""

    def __init__(self, cuda: bool, device_count: int, why_no_cuda: str, gpu: str | None, peak: float | None,
                 runs: Path):
        self.cuda, self.device_count, self.why_no_cuda, self.runs = cuda, device_count, why_no_cuda, runs
        self.gpu, self.peak = gpu, peak
        self.sizes = SIZES["gpu" if cuda else "cpu"]
        self.device = "cuda" if cuda else "cpu"
        self.refs: dict[str, float | None] = {}
        self.deadline = 0.0  # the item at hand's end: its children share its time

    @property
    def timeout(self) -> float:
        """What is left of the item at hand's time, for its next child process."""
        return max(self.deadline - time.monotonic(), 1.0)

    def overrides(self, example: str) -> list[str]:
        return COMMON[example] + self.sizes[example]

    def peak_and_target(self) -> tuple[str | None, float | None, float | None]:
        """(where the peak comes from, peak FLOP/s, MFU target): --peak-flops wins, else the GPU's row of the table."""
        if self.peak:
            return "--peak-flops", self.peak, None
        from ddptrain.observe import PEAK_BF16_FLOPS
        for piece, peak in PEAK_BF16_FLOPS:
            if self.gpu and piece in self.gpu:
                target = None if "PCIe" in self.gpu else next((t for p, t in MFU_TARGET.items() if p in piece), None)
                return f"{piece} dense bf16", peak, target
        return None, None, None


def entry(item: str, check: str, status: str, reason: str, cuda_only: bool = False, **figures) -> dict:
    return {"item": item, "check": check, "status": status, "reason": reason, "cuda_only": cuda_only,
            "figures": figures}


def compared(item: str, check: str, example: str, value: float, ref: float | None, **figures) -> dict:
    """Pass when `value` is within the example's tolerance of the CPU fp32 reference."""
    metric, tol, relative = EXAMPLES[example]
    if ref is None:
        return entry(item, check, "fail", "no CPU fp32 reference to compare with (it failed)", value=value, **figures)
    diff = abs(value - ref) / (abs(ref) if relative else 1.0)
    kind = "relative" if relative else "absolute"
    reason = f"test {metric} {value:.4f} vs {ref:.4f} on cpu fp32: {kind} diff {diff:.3g} (tolerance {tol:g})"
    return entry(item, check, "pass" if diff <= tol else "fail", reason, value=value, reference=ref, diff=diff,
                 **figures)


def train_runs(ctx: Check, item: str, example: str, runs: list[dict]) -> list[dict]:
    """Train `example` once per run in one child, each compared with the CPU fp32 reference, which runs first
    (and gets an entry) when this check has not run it yet."""
    with_ref = example not in ctx.refs
    all_runs = [REFERENCE] * with_ref + runs
    if not all_runs:
        return []
    results = worker(ctx, "runs", {"example": example, "overrides": ctx.overrides(example), "runs": all_runs,
                                   "runs_dir": str(ctx.runs)}, len(all_runs))
    entries = []
    if with_ref:
        ref = results.pop(0)
        ctx.refs[example] = ref.get("value")
        metric = EXAMPLES[example][0]
        entries.append(entry(item, "cpu fp32 eager (reference)", "fail", ref["error"]) if "error" in ref else
                       entry(item, "cpu fp32 eager (reference)", "pass", f"test {metric} {ref['value']:.4f}", **ref))
    for run, result in zip(runs, results):
        check = f"{run['device']} {run['precision']} {'compiled' if run['compile'] else 'eager'}"
        if "error" in result:
            entries.append(entry(item, check, "fail", result["error"], cuda_only=True))
            continue
        e = compared(item, check, example, result.pop("value"), ctx.refs[example], **result)
        if not (result["pin_memory"] and result["non_blocking"]):  # what ddptrain promises on CUDA
            e.update(status="fail", reason=f"pin_memory {result['pin_memory']}, non_blocking {result['non_blocking']}; "
                                           f"{e['reason']}")
        entries.append({**e, "cuda_only": True})
    return entries


def example_item(example: str, compiled: bool):
    def item(ctx: Check) -> list[dict]:
        name, mode = f"{example}-{'compiled' if compiled else 'eager'}", "compiled" if compiled else "eager"
        if not ctx.cuda:
            skipped = [entry(name, f"cuda {p} {mode}", "skip", ctx.why_no_cuda, cuda_only=True) for p in PRECISIONS]
            return skipped if compiled else train_runs(ctx, name, example, []) + skipped
        return train_runs(ctx, name, example, [{"device": "cuda", "precision": p, "compile": compiled}
                                               for p in PRECISIONS])
    return item


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_ranks(ctx: Check, name: str, world_size: int, overrides: list[str], spread: bool = False):
    """digits through the CLI on `world_size` ranks with torchrun's variables, set here: under torchrun every rank
    takes cuda:<local_rank>, and two ranks on one GPU need local rank 0 (`spread`: one GPU per rank).
    Returns (test accuracy or None, why not)."""
    port = free_port()
    cmd = [sys.executable, "-m", "ddptrain", "train", "examples/digits.yaml", *ctx.overrides("digits"), *overrides,
           f"runs_dir={ctx.runs}", f"name={name}"]
    env = dict(WORLD_SIZE=world_size, LOCAL_WORLD_SIZE=world_size, MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    if world_size > 1:
        env["OMP_NUM_THREADS"] = 1  # as torchrun sets it
    timeout = ctx.timeout
    procs = run_procs([(cmd, plain_env(RANK=r, LOCAL_RANK=r if spread else 0, **env)) for r in range(world_size)],
                      timeout)
    failed = [p for p in procs if p.rc != 0]
    if failed:
        first = next((p for p in failed if p.rc is not None), failed[0])
        return None, error_line(first, timeout)
    return json.loads((ctx.runs / name / "summary.json").read_text())["test"]["accuracy"], None


def digits_on_ranks(ctx: Check, item: str, check: str, world_size: int, overrides: list[str], cuda_only: bool,
                    spread: bool = False) -> list[dict]:
    entries = train_runs(ctx, item, "digits", [])  # the reference, if not run yet
    value, why = on_ranks(ctx, item, world_size, overrides, spread)
    if why is not None:
        return entries + [entry(item, check, "fail", why, cuda_only)]
    return entries + [{**compared(item, check, "digits", value, ctx.refs["digits"]), "cuda_only": cuda_only}]


def item_gpu_tests(ctx: Check) -> list[dict]:
    marked = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                    if "mark.gpu" in p.read_text())
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", *marked]
    timeout = ctx.timeout
    proc = run_procs([(cmd, plain_env())], timeout)[0]
    if proc.rc is None:
        return [entry("gpu-tests", "pytest -m gpu", "fail", error_line(proc, timeout))]
    summary = (proc.out.strip().splitlines() or [""])[-1]
    counts = {word.rstrip("s"): int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", summary)}
    figures = {k: counts.get(k, 0) for k in ("passed", "failed", "skipped", "error")}
    if figures["failed"] or figures["error"] or proc.rc not in (0, 5):
        return [entry("gpu-tests", "pytest -m gpu", "fail", summary or error_line(proc, timeout), **figures)]
    if figures["passed"]:
        return [entry("gpu-tests", "pytest -m gpu", "pass", summary, **figures)]
    reasons = "; ".join(line.split("] ", 1)[-1] for line in proc.out.splitlines() if line.startswith("SKIPPED"))
    return [entry("gpu-tests", "pytest -m gpu", "skip", f"{summary}: {reasons or 'none selected'}", **figures)]


def item_ddp_2ranks(ctx: Check) -> list[dict]:
    return digits_on_ranks(ctx, "ddp-2ranks", f"digits, 2 ranks on {ctx.device}:0, gloo", 2,
                           ["dist.backend=gloo", f"dist.device={ctx.device}"], cuda_only=False)


def item_nccl_ws1(ctx: Check) -> list[dict]:
    if not ctx.cuda:
        return [entry("nccl-ws1", "NCCL at world size 1", "skip", ctx.why_no_cuda, cuda_only=True)]
    probe = worker(ctx, "nccl-probe", {}, 1)[0]
    raw = entry("nccl-ws1", "NCCL process group + all_reduce at world size 1", "fail" if "error" in probe else "pass",
                probe.get("error") or "all_reduce on cuda:0 gave the input back", cuda_only=True)
    ours = digits_on_ranks(ctx, "nccl-ws1", "digits, 1 rank, dist.backend=nccl (ws 1: no process group)", 1,
                           ["dist.backend=nccl", "dist.device=cuda"], cuda_only=True)
    return [raw, *ours]


def item_nccl_ws2(ctx: Check) -> list[dict]:
    check = "digits, 2 ranks on cuda:0 and cuda:1, nccl"
    if not ctx.cuda or ctx.device_count < 2:
        why = ctx.why_no_cuda if not ctx.cuda else \
            f"needs 2 GPUs (NCCL takes one per rank); this machine has {ctx.device_count}"
        return [entry("nccl-ws2", check, "skip", why, cuda_only=True)]
    return digits_on_ranks(ctx, "nccl-ws2", check, 2, ["dist.backend=nccl", "dist.device=cuda"], cuda_only=True,
                           spread=True)


def item_fsdp_2ranks(ctx: Check) -> list[dict]:
    entries = digits_on_ranks(ctx, "fsdp-2ranks", f"digits, fsdp, 2 ranks on {ctx.device}:0, gloo", 2,
                              ["dist.strategy=fsdp", "dist.backend=gloo", f"dist.device={ctx.device}"], cuda_only=False)
    last = entries[-1]
    unsupported = re.search(r"gloo|not supported|unsupported|not implemented", last["reason"], re.IGNORECASE)
    if ctx.cuda and last["status"] == "fail" and "diff" not in last["figures"] and unsupported:
        last.update(status="skip", reason=f"gloo cannot run FSDP2 on CUDA tensors: {last['reason']}")
    return entries


def item_fsdp_ws1(ctx: Check) -> list[dict]:
    overrides = ["dist.strategy=fsdp", *(["dist.backend=nccl", "dist.device=cuda"] if ctx.cuda else [])]
    entries = digits_on_ranks(ctx, "fsdp-ws1", f"digits, fsdp, 1 rank on {ctx.device}", 1, overrides, cuda_only=False)
    if "2 or more ranks" in entries[-1]["reason"]:  # ddptrain's pre-flight refusal, by design
        entries[-1]["status"] = "skip"
    return entries


def item_throughput(ctx: Check) -> list[dict]:
    s = ctx.sizes
    check = "GPT {n_layer}x{d}, batch {batch}x{ctx}, ".format(**s["gpt"]) + \
        f"{s['precision']}, {'compiled' if s['compile'] else 'eager'}"
    spec = {k: s[k] for k in ("gpt", "warm", "measure", "rounds", "precision", "compile")}
    lines = worker(ctx, "throughput", {**spec, "device": ctx.device, "runs_dir": str(ctx.runs)}, 1 + s["rounds"])
    result, rounds = lines[0], [line["round"] for line in lines[1:] if "round" in line]
    if "error" in result or not rounds:
        return [entry("throughput", check, "fail", result.get("error") or lines[-1]["error"])]
    ours, minimal = map(statistics.median, zip(*rounds))
    measured = result["measured_peak_flops"]
    flops, tokens = result["flops_per_step"], result["tokens_per_step"]
    name, peak, mfu_target = ctx.peak_and_target()
    figures = {**{k: result[k] for k in ("params", "flops_per_step", "flops_linear_64x64_b8", "tokens_per_step")},
               "ratio": minimal / ours, "round_ratios": [m / o for o, m in rounds], "rounds": len(rounds),
               "ddptrain_step_s": ours, "minimal_step_s": minimal,
               "ddptrain_tokens_per_s": tokens / ours, "minimal_tokens_per_s": tokens / minimal,
               "peak_flops": peak, "peak_source": name,
               "ddptrain_mfu": flops / ours / peak if peak else None,
               "minimal_mfu": flops / minimal / peak if peak else None,
               "measured_peak_flops": measured, "ddptrain_mfu_of_measured_peak": measured and flops / ours / measured}
    mfu = "n/a" if not peak else f"{figures['ddptrain_mfu']:.1%} (minimal {figures['minimal_mfu']:.1%})"
    reason = f"ddptrain at {figures['ratio']:.3f}x the minimal loop's tokens/s; MFU {mfu}"
    if measured:
        reason += f" ({figures['ddptrain_mfu_of_measured_peak']:.1%} of a measured {measured / 1e12:.0f} TFLOP/s)"
    short = []
    if ctx.cuda and figures["ratio"] < RATIO_TARGET:
        short.append(f"ratio below {RATIO_TARGET}")
    if ctx.cuda and mfu_target and figures["ddptrain_mfu"] < mfu_target:
        short.append(f"MFU below {mfu_target:.0%}")
    return [entry("throughput", check, "fail" if short else "pass", "; ".join([reason, *short]), **figures)]


def item_async_save(ctx: Check) -> list[dict]:
    """benchmarks/bench_async_save.py under ddp on the GPU: how long an asynchronous save of 400 MB of training
    state stalls the loop against a synchronous one (issue 12's target: at most a tenth), and what it costs (the
    training time it adds, a figure alone: it swings with the write's competition for the machine)."""
    check = "async save of 400 MB, ddp, the loop's stall against a synchronous save's"
    if not ctx.cuda:
        return [entry("async-save", check, "skip", f"{ctx.why_no_cuda} (on CPU: benchmarks/README.md)", cuda_only=True)]
    out = ctx.runs / "async_save.json"
    # a GPU's steps take milliseconds: 600 of them between saves give a write the seconds it needs
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_async_save.py"), "--strategies", "ddp",
           "--every", "600", "--out", str(out)]
    timeout = ctx.timeout
    proc = run_procs([(cmd, plain_env())], timeout)[0]
    if proc.rc != 0 or not out.exists():
        return [entry("async-save", check, "fail", error_line(proc, timeout), cuda_only=True)]
    results = json.loads(out.read_text())
    ratio, later, stall = (results["ddp async/sync"], results["ddp async/sync, later saves"],
                           results["ddp async/sync stall"])
    figures = {"ratio": ratio, "ratio_after_the_first": later, "stall_ratio": stall,
               **{f"{mode}_{what}": results[f"ddp, {mode}"][what] for mode in ("sync", "async")
                  for what in ("stall_per_save_s", "cost_per_save_s", "each_save_s", "step_s")}}
    return [entry("async-save", check, "pass" if stall <= 0.1 else "fail",
                  f"an asynchronous save stalls the loop {stall:.3f} as long as a synchronous one (target <= 0.1); "
                  f"it costs {ratio:.3f} of one, {later:.3f} after the first", cuda_only=True, **figures)]


# name: (function, timeout s, the least time left to start it). In the order of what a short GPU session
# must not miss (issue 13's items first, issue 12's save last); the estimates on one H200 add up to about
# 450 s (a compile of GPT-2 small is about a minute, each compiled example compiles three times).
ITEMS = {
    "gpu-tests": (item_gpu_tests, 120, 30),
    "digits-eager": (example_item("digits", False), 90, 30),
    "charlm-eager": (example_item("charlm", False), 120, 40),
    "ddp-2ranks": (item_ddp_2ranks, 60, 20),
    "nccl-ws1": (item_nccl_ws1, 60, 20),
    "fsdp-2ranks": (item_fsdp_2ranks, 60, 20),
    "throughput": (item_throughput, 200, 150),
    "digits-compiled": (example_item("digits", True), 120, 90),
    "charlm-compiled": (example_item("charlm", True), 150, 120),
    "fsdp-ws1": (item_fsdp_ws1, 30, 10),
    "nccl-ws2": (item_nccl_ws2, 60, 20),
    "async-save": (item_async_save, 150, 75),
}


# ---- the report ----------------------------------------------------------------------------------
def versions(cuda: bool) -> dict:
    import platform
    import torch
    import ddptrain
    v = {"gpu": None, "gpu_count": torch.cuda.device_count() if cuda else 0, "driver": None,
         "cuda": torch.version.cuda, "torch": torch.__version__, "nccl": None, "python": platform.python_version(),
         "ddptrain": f"{ddptrain.__version__} ({commit()})"}
    if cuda:
        v["gpu"] = torch.cuda.get_device_name(0)
        try:
            nccl = torch.cuda.nccl.version()
            v["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
        except Exception as e:  # a build without NCCL: say so, go on
            v["nccl"] = f"n/a ({first_line(e)})"
        smi = quietly(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        v["driver"] = smi.splitlines()[0] if smi else None
    return v


def quietly(cmd: list[str]) -> str:
    """What `cmd` prints, or "" when it fails, hangs (15 s) or is not there."""
    try:
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def commit() -> str:
    """This tree's commit: git's, else GPU_CHECK_COMMIT (a copy of the tree may have no .git)."""
    return quietly(["git", "rev-parse", "--short", "HEAD"]) or os.environ.get("GPU_CHECK_COMMIT") or "no git"


def shown(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(shown(v) for v in value) + "]"
    return str(value)


def markdown(report: dict) -> str:
    v, counts = report["versions"], report["counts"]
    lines = [f"# ddptrain GPU check, {report['date']} ({report['mode']} mode)", "",
             ", ".join(f"{k} {v[k]}" for k in v), "",
             f"Tolerances against the CPU fp32 run of the same config: digits test accuracy within 0.03 absolute, "
             f"charlm test loss within 5% relative. Throughput targets on CUDA: ddptrain >= {RATIO_TARGET}x the "
             f"minimal loop, MFU >= 40% on H100/H200.", "",
             f"{counts['pass']} pass, {counts['fail']} fail, {counts['skip']} skip in {report['wall_s']:.0f} s", "",
             "| item | check | status | reason | figures |", "|---|---|---|---|---|"]
    for e in report["results"]:
        figures = ", ".join(f"{k} {shown(x)}" for k, x in e["figures"].items() if x is not None)
        lines.append(f"| {e['item']} | {e['check']} | {e['status']} | {e['reason'].replace('|', '/')} | {figures} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()  # the budget counts torch's import too (10-20 s cold, with CUDA)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-quick", action="store_true", help="tiny sizes on CPU; CUDA items are skipped")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="where the JSON and .md go")
    p.add_argument("--only", type=lambda s: s.split(","), default=list(ITEMS),
                   help=f"comma-separated items to run, of: {', '.join(ITEMS)}")
    p.add_argument("--budget-s", type=float, default=480,
                   help="the whole run's time (default 480); items that would not fit are skipped")
    p.add_argument("--peak-flops", type=float, default=None,
                   help="peak FLOP/s for MFU (default: the GPU's dense bf16 peak from the table; none on CPU)")
    p.add_argument("--worker", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        WORK[args.worker[0]](json.loads(args.worker[1]))
        return 0
    unknown = [name for name in args.only if name not in ITEMS]
    if unknown:
        p.error(f"unknown item {', '.join(unknown)}; items: {', '.join(ITEMS)}")

    import torch
    has_cuda = torch.cuda.is_available()
    if not has_cuda and not args.cpu_quick and (Path("/dev/nvidia0").exists() or quietly(["nvidia-smi", "-L"])):
        print(f"gpu_check: error: this machine has an NVIDIA GPU, but torch {torch.__version__} (CUDA "
              f"{torch.version.cuda}) at {sys.executable} cannot use it; run this with the Python whose torch "
              f"has CUDA (or pass --cpu-quick)", file=sys.stderr)
        return 2
    cuda = has_cuda and not args.cpu_quick
    why = "--cpu-quick: CUDA items skipped" if has_cuda else "no CUDA GPU"
    if not has_cuda:
        print("no CUDA GPU: running the CPU quick mode", flush=True)
    runs = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    report = {"date": time.strftime("%Y-%m-%d_%H%M%S"), "mode": "gpu" if cuda else "cpu-quick",
              "budget_s": args.budget_s, "versions": versions(cuda), "items": args.only, "results": []}
    ctx = Check(cuda, report["versions"]["gpu_count"], why, report["versions"]["gpu"], args.peak_flops, runs)
    table = save(report, started, args.out)
    try:
        for name in args.only:
            function, timeout, need = ITEMS[name]
            elapsed = time.monotonic() - started
            left = args.budget_s - elapsed
            if left < need:
                why = f"budget: {left:.0f} s left of {args.budget_s:.0f} s, needs {need} s"
                entries = [entry(name, "-", "skip", why)]
            else:
                ctx.deadline = time.monotonic() + min(timeout, left)
                print(f"[{elapsed:6.1f} s] {name} (timeout {min(timeout, left):.0f} s)", flush=True)
                try:
                    entries = function(ctx)
                except Exception as e:  # a bug of this script costs its item, not the session
                    entries = [entry(name, "-", "fail", f"gpu_check itself: {first_line(e)}")]
            for e in entries:
                when = time.monotonic() - started
                print(f"[{when:6.1f} s]   {e['item']}: {e['check']}: {e['status']}: {e['reason']}", flush=True)
            report["results"] += entries
            table = save(report, started, args.out)  # after every item: a run killed from outside keeps what it did
    finally:
        shutil.rmtree(runs, ignore_errors=True)
    print("\n" + table + f"\nwritten: {args.out}/gpu_check_{report['date']}.json and .md", flush=True)
    return 1 if report["counts"]["fail"] else 0


def save(report: dict, started: float, out: Path) -> str:
    """Write the report so far as JSON and markdown; return the markdown."""
    report["wall_s"] = time.monotonic() - started
    report["counts"] = {s: sum(e["status"] == s for e in report["results"]) for s in ("pass", "fail", "skip")}
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"gpu_check_{report['date']}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    table = markdown(report)
    stem.with_suffix(".md").write_text(table)
    return table


if __name__ == "__main__":
    sys.exit(main())
