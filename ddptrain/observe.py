"""What a run shows about itself beyond its losses: MFU (the FLOPs are counted in the pre-flight check, task.py),
each rank's own time per step (to find stragglers), torch.profiler traces of chosen steps, CUDA memory (its
peaks and out-of-memory errors) and NCCL's Flight Recorder.
Each part costs nothing when off; what is on by default costs two clock reads per micro-batch.
"""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch

# Dense bf16 peak FLOP/s of one device, by a part of its name (the first that matches): the vendors' data
# sheets, without sparsity. MFU is the model's FLOPs per second over this.
PEAK_BF16_FLOPS = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("GH200", 989e12),
                   ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("A10", 125e12),
                   ("V100", 125e12), ("4090", 165e12), ("MI300X", 1307e12), ("MI250", 362e12)]


def peak_flops(device: torch.device, configured: float | None) -> float | None:
    """One device's peak FLOP/s: train.peak_flops, else a known GPU's dense bf16 peak, else None."""
    if configured is not None:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for part, peak in PEAK_BF16_FLOPS if part in name), None)


class Rates:
    """The clocks behind the rates of the train log and the summary, for this attempt (from step `start_step`):
    its training time and, apart, its first step's (compiling, CUDA's and the loader's start); since the last
    train log, the wait for data and the pauses (validation, epoch-end saves), which the rates leave out."""

    def __init__(self, start_step: int):
        self.start_step, self.train_s, self.warm_up_s = start_step, 0.0, 0.0
        self.first_step_time: float | None = None  # the run's clock when this attempt's first step ended
        self.log_time, self.log_step = time.perf_counter(), start_step  # where the current log interval began
        self.data_wait_s = self.paused_s = 0.0  # in the current log interval
        self.tokens = 0  # of the logged intervals

    def pause(self, seconds: float, in_epoch: bool = False) -> None:
        """Seconds spent validating or saving: out of the log interval's rates, and out of the training time
        when they were spent within an epoch's training."""
        self.paused_s += seconds
        if in_epoch:
            self.train_s -= seconds

    def next_interval(self, now: float, step: int) -> None:
        self.log_time, self.log_step, self.data_wait_s, self.paused_s = now, step, 0.0, 0.0

    def steps_per_s(self, step: int) -> float | None:
        """Optimizer steps per second after this attempt's first step (its warm-up is time_to_first_step_s);
        over every step when it trained only one; None when it trained none."""
        trained = step - self.start_step
        if trained > 1 and self.train_s > self.warm_up_s:
            return (trained - 1) / (self.train_s - self.warm_up_s)
        return trained / self.train_s if trained and self.train_s else None

    def tokens_per_step(self) -> float:
        """The logged intervals' tokens per optimizer step."""
        return self.tokens / (self.log_step - self.start_step) if self.log_step > self.start_step else 0.0


class RankTime:
    """The time this rank's forwards take (with its wait for data, the rank's own time per step).

    The gradient all-reduce makes every rank's step take as long as the slowest's, so wall time cannot show
    a straggler. A forward holds no collective under ddp (fsdp's all-gathers do wait), so a slow host or
    GPU shows there, as a slow data loader shows in the wait for data. On CUDA the forwards are timed with
    events, read at log steps, where the loop syncs anyway.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pairs: list[tuple] = []  # CUDA events of the forwards since the last `take`
        self.free: list[tuple] = []
        self.cpu_s = self.began = 0.0

    def begin(self) -> None:
        if self.cuda:
            pair = self.free.pop() if self.free else (torch.cuda.Event(enable_timing=True),
                                                      torch.cuda.Event(enable_timing=True))
            pair[0].record()
            self.pairs.append(pair)
        else:
            self.began = time.perf_counter()

    def end(self) -> None:
        if self.cuda:
            self.pairs[-1][1].record()
        else:
            self.cpu_s += time.perf_counter() - self.began

    def take(self) -> float:
        """Seconds of forwards since the last take."""
        total, self.cpu_s = self.cpu_s, 0.0
        if self.pairs:
            self.pairs[-1][1].synchronize()
            total += sum(start.elapsed_time(end) for start, end in self.pairs) / 1e3
            self.free.extend(self.pairs)
            self.pairs = []
        return total


class Untimed:
    """RankTime at world size 1: no other rank to compare with, so nothing is timed (and no CUDA event made)."""

    def begin(self) -> None:
        pass

    def end(self) -> None:
        pass


class Stragglers:
    """Rank 0's watch over the ranks' own times per step (`RankTime`), which ride on the log's all-reduce."""

    RATIO, IN_A_ROW = 1.25, 3  # slower than the median rank by this much, at this many log steps in a row

    def __init__(self):
        self.suspect, self.count, self.warned = None, 0, set()

    def fields(self, per_rank: list[float]) -> dict:
        slowest = max(range(len(per_rank)), key=per_rank.__getitem__)
        median = statistics.median(per_rank)
        ratio = per_rank[slowest] / median if median > 0 else 1.0
        if ratio >= self.RATIO:
            self.count = self.count + 1 if slowest == self.suspect else 1
            self.suspect = slowest
        else:
            self.suspect, self.count = None, 0
        if self.count >= self.IN_A_ROW and slowest not in self.warned:
            from .runlog import warn
            self.warned.add(slowest)
            warn(f"rank {slowest} is persistently the slowest: {ratio:.2f}x the median rank's own time per step "
                 f"(data and forward) at {self.count} log steps in a row; every rank waits for it in the gradient "
                 f"all-reduce (a slow host, data loader or GPU there?)")
        return {"slowest_rank_step_s": per_rank[slowest], "fastest_rank_step_s": min(per_rank), "slowest_rank": slowest}


class Profile:
    """train.profile: torch.profiler over optimizer steps [first, last], each step marked `ddptrain step N`,
    as a Chrome trace per rank (`profile/rank<r>.json`) that Perfetto and TensorBoard's profiler open."""

    def __init__(self, steps: list[int] | None, ranks: str, rank: int, run_dir: Path, total_steps: int | None):
        self.first, self.last = steps if steps else (None, None)
        self.on = steps is not None and (ranks == "all" or rank == 0)
        if steps is not None and total_steps is not None and self.last > total_steps and rank == 0:
            from .runlog import warn
            warn(f"train.profile={list(steps)} goes past the run's {total_steps} optimizer steps: "
                 + ("no trace is recorded" if self.first > total_steps else f"the trace ends at step {total_steps}"))
        self.path = run_dir / "profile" / f"rank{rank}.json"
        self.profiler = self.mark = None

    def before_step(self, step: int) -> None:
        """`step`: the optimizer step about to run (1-based)."""
        if not self.on or not self.first <= step <= self.last:  # a resumed run may start past the range
            return
        if self.profiler is None:
            if self.path.exists():  # an earlier attempt's trace, of the range's first steps: kept
                self.path = self.path.with_name(f"{self.path.stem}-from-step{step}.json")
            from torch.profiler import ProfilerActivity, profile
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.profiler = profile(activities=activities, record_shapes=True)
            self.profiler.__enter__()
        self.mark = torch.profiler.record_function(f"ddptrain step {step}")
        self.mark.__enter__()

    def after_step(self, step: int) -> None:
        if self.mark is not None:
            self.mark.__exit__(None, None, None)
            self.mark = None
            if step >= self.last:
                self.close()

    def close(self) -> None:
        """Write the trace (at the last step, or where the run ended before it)."""
        if self.profiler is not None:
            profiler, self.profiler, self.on = self.profiler, None, False
            profiler.__exit__(None, None, None)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            profiler.export_chrome_trace(str(self.path))


def flight_recorder(run_dir: Path, on: bool) -> str | None:
    """dist.flight_recorder: PyTorch's Flight Recorder keeps the last 2000 collectives of each NCCL process
    group and, on a collective timeout, dumps them to a file per rank (`<prefix><rank>`, read with
    `python -m torch.distributed.flight_recorder.fr_trace`). Set before the process group starts; the
    user's own TORCH_FR_* and TORCH_NCCL_* settings win. Returns the dump files' prefix, or None when off."""
    if not on:
        return None
    os.environ.setdefault("TORCH_FR_BUFFER_SIZE", "2000")
    os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
    return os.environ.setdefault("TORCH_FR_DUMP_TEMP_FILE", str(run_dir / "flight_recorder" / "rank_"))


def memory_fields(device: torch.device) -> dict:
    """Peak CUDA memory since the last call (MB), allocated and reserved; {} off CUDA."""
    if device.type != "cuda":
        return {}
    fields = {"gpu_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20,
              "gpu_reserved_mb": torch.cuda.max_memory_reserved(device) / 2**20}
    torch.cuda.reset_peak_memory_stats(device)
    return fields


def start_memory_history(device: torch.device, on: bool) -> None:
    if on and device.type == "cuda":
        torch.cuda.memory._record_memory_history(max_entries=100_000)


def out_of_memory(e: BaseException, device: torch.device, step: int, rank: int, snapshot_dir: Path | None) -> str:
    """A CUDA out-of-memory error as one line: the figures, what to try, and the snapshot file if recorded."""
    figures = ""
    if device.type == "cuda" and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(device)
        figures = (f" ({torch.cuda.memory_allocated(device) / 2**30:.2f} GiB allocated, "
                   f"{torch.cuda.memory_reserved(device) / 2**30:.2f} GiB reserved by PyTorch, "
                   f"{free / 2**30:.2f} of {total / 2**30:.2f} GiB free on the device)")
    where = ""
    if snapshot_dir is not None and device.type == "cuda":
        snapshot_dir.mkdir(parents=True, exist_ok=True)
        path = snapshot_dir / f"memory_snapshot_rank{rank}.pickle"
        torch.cuda.memory._dump_snapshot(str(path))
        where = f"; the allocations are in {path} (open it at https://pytorch.org/memory_viz)"
    return (f"CUDA out of memory at step {step + 1} on rank {rank}{figures}; try a smaller micro-batch with "
            f"gradient accumulation (train.grad_accum_steps), dist.strategy=fsdp, dist.activation_checkpointing=true "
            f"or train.precision=bf16{where}")
