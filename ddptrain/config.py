"""The run configuration's schema: the typed sections and Config, each field with its default, range check and
the one-line description that the CLI, `--print-config` and the README show (`describe`).

Building a validated Config from plain data, a YAML or TOML file and overrides lives in `configfile`.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal


class ConfigError(ValueError):
    """A plain user mistake in the configuration; the CLI prints it without a traceback.

    `key` is the dotted config key it is about, where there is one, so that `build` can say which line of
    the file or which override gave it."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


def _f(default, help: str, check=None, expect: str = ""):
    """A config field: its default, a one-line description and an optional range check."""
    meta = {"help": help, "check": check, "expect": expect}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _positive(x):
    return x > 0


def _non_negative(x):
    return x >= 0


def _fraction(x):
    return 0 <= x < 1


def _seed(x):
    return 0 <= x < 2**63


def _timeout(x):
    return 0 < x <= MAX_TIMEOUT_S


MAX_TIMEOUT_S = 7 * 24 * 3600.0  # a week: beyond it the process group's millisecond timers misbehave


def _positive_or_none(x):
    return x is None or x > 0


OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
SCHEDULES = ("constant", "step", "cosine", "linear", "onecycle", "plateau")
SPANS_RUN = ("cosine", "linear", "onecycle")  # schedules laid out over the run's whole length


def _import_path(v: str) -> bool:
    """`package.module.Name` or `package.module:Name` (resolved when the run starts)."""
    return (":" in v or "." in v) and all(part.isidentifier() for part in v.replace(":", ".").split("."))


@dataclass
class DataConfig:
    batch_size: int = _f(64, "global batch per optimizer step, split evenly over ranks and accumulation steps", _positive, "> 0")
    eval_batch_size: int = _f(256, "batch size of each rank during validation and test", _positive, "> 0")
    val_fraction: float = _f(0.15, "share of the data held out for validation by the split helper", _fraction, "in [0, 1)")
    test_fraction: float = _f(0.15, "share of the data held out for test by the split helper", _fraction, "in [0, 1)")
    split_seed: int = _f(0, "seed of the train/val/test split (independent of `seed`)", _seed, "an integer in [0, 2**63)")
    num_workers: int = _f(0, "DataLoader worker processes per rank", _non_negative, ">= 0")
    pin_memory: bool = _f(True, "pin host memory for faster copies (used only on CUDA, for batches of CPU tensors)")
    persistent_workers: bool = _f(True, "keep workers alive between epochs (used only when num_workers > 0)")
    prefetch_factor: int | None = _f(None, "batches each worker loads ahead (None: torch's default, 2; used only when num_workers > 0)", _positive_or_none, "> 0 or null")
    stream_sharding: Literal["auto", "dataset"] = _f(
        "auto", "how a stream (IterableDataset) is split over ranks and workers; auto: by the stream's ddptrain.shard() "
                "call, else every (ranks x workers)-th item per part; dataset: the stream splits itself")


@dataclass
class ModelConfig:
    hidden: list[int] = _f([256, 128], "hidden layer widths of the built-in MLP", lambda v: all(h > 0 for h in v), "positive widths")
    activation: Literal["relu", "gelu", "tanh", "sigmoid"] = _f("relu", "activation of the built-in MLP")
    dropout: float = _f(0.0, "dropout probability after each hidden layer", _fraction, "in [0, 1)")
    batch_norm: bool = _f(False, "batch norm after each hidden linear layer")
    init: Literal["default", "kaiming", "xavier"] = _f("default", "weight initialisation of linear layers")


@dataclass
class LossConfig:
    name: Literal["task", "model", "cross_entropy", "mse", "l1", "huber", "bce_with_logits"] = _f(
        "task", "loss function; `task` uses the loss the task returns; `model`: the model returns its own loss "
                "(`output.loss` or `output['loss']`, Hugging Face style)")
    label_smoothing: float = _f(0.0, "label smoothing for cross_entropy", _fraction, "in [0, 1)")
    ignore_index: int = _f(-100, "target value that cross_entropy ignores (padding); (B, T, V) logits with (B, T) targets are a mean over the other tokens")
    huber_delta: float = _f(1.0, "delta of the huber loss", _positive, "> 0")


@dataclass
class OptimConfig:
    name: str = _f("adamw", "optimizer: sgd, adam, adamw, rmsprop, or any class by import path (torch.optim.NAdam, my_pkg.opt:Lion), built as cls(param_groups, lr=lr, **optim.args)", lambda v: v in OPTIMIZERS or _import_path(v), "sgd, adam, adamw, rmsprop or an import path such as torch.optim.NAdam or my_pkg.opt:Lion")
    args: dict = _f({}, "extra keyword arguments of the optimizer (for instance for one named by import path)")
    lr: float = _f(1e-3, "peak learning rate", _positive, "> 0")
    weight_decay: float = _f(0.0, "L2 penalty (decoupled for adamw) on weights with 2+ dims; biases and norms are exempt", _non_negative, ">= 0")
    l1: float = _f(0.0, "L1 penalty added to the loss, on weights with 2+ dims", _non_negative, ">= 0")
    momentum: float = _f(0.9, "momentum of sgd and rmsprop", _fraction, "in [0, 1)")
    nesterov: bool = _f(False, "nesterov momentum (sgd)")
    betas: list[float] = _f([0.9, 0.999], "betas of adam and adamw", lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two values in [0, 1)")
    eps: float = _f(1e-8, "epsilon of adam, adamw and rmsprop", _positive, "> 0")


@dataclass
class SchedConfig:
    name: str = _f("constant", "learning-rate schedule: constant, step, cosine, linear, onecycle, plateau, or a class by import path (torch.optim.lr_scheduler.ExponentialLR), built as cls(optimizer, **sched.args) and stepped every optimizer step", lambda v: v in SCHEDULES or _import_path(v), "constant, step, cosine, linear, onecycle, plateau or an import path such as torch.optim.lr_scheduler.ExponentialLR")
    args: dict = _f({}, "keyword arguments of a schedule named by import path")
    warmup_steps: int = _f(0, "linear warmup steps from lr/100 (constant, step, cosine, linear)", _non_negative, ">= 0")
    min_lr: float = _f(0.0, "final learning rate of cosine and linear", _non_negative, ">= 0")
    step_size: int = _f(1000, "optimizer steps between decays (step)", _positive, "> 0")
    gamma: float = _f(0.1, "decay factor (step, plateau)", lambda x: 0 < x < 1, "in (0, 1)")
    pct_start: float = _f(0.3, "share of steps spent increasing the lr (onecycle)", lambda x: 0 < x < 1, "in (0, 1)")
    plateau_patience: int = _f(5, "validations without improvement before the lr decays (plateau)", _non_negative, ">= 0")


@dataclass
class TrainConfig:
    epochs: int = _f(10, "epochs to train", _positive, "> 0")
    max_steps: int | None = _f(None, "stop after this many optimizer steps (None: run all epochs)", _positive_or_none, "> 0 or null")
    grad_accum_steps: int = _f(1, "micro-batches per optimizer step; gradients are all-reduced once per step", _positive, "> 0")
    precision: Literal["fp32", "bf16", "fp16"] = _f("fp32", "fp32, bf16 autocast, or fp16 autocast with a gradient scaler")
    clip_grad_norm: float | None = _f(None, "clip the global gradient norm to this value", _positive_or_none, "> 0 or null")
    clip_grad_value: float | None = _f(None, "clip each gradient element to [-v, v]", _positive_or_none, "> 0 or null")
    nonfinite: Literal["skip", "stop"] = _f("stop", "on NaN/Inf: skip the step (checked every step, one host sync each), or stop with an error (weights checked at log steps and epoch ends); all ranks agree")
    max_skips_in_a_row: int = _f(20, "non-finite steps in a row that nonfinite=skip (and fp16's gradient scaler) tolerate before the run stops as diverged", _positive, "> 0")
    log_every: int = _f(10, "optimizer steps between train log records (the only per-step collective)", _positive, "> 0")
    compile: bool = _f(False, "wrap the model in torch.compile")
    compile_backend: str = _f("inductor", "torch.compile backend")
    peak_flops: float | None = _f(None, "one device's peak FLOP/s, for the model FLOPs utilisation (mfu) in train events and the summary; null: the dense bf16 peak of a known GPU (H200, H100, A100, L40S, L4, ...), none on CPU", _positive_or_none, "> 0 or null")
    log_grad_norms: bool = _f(False, "log each layer's gradient norm at log steps (train events' grad_norms); ddptrain plot draws them as a layers-by-steps heat map")
    profile: list[int] | None = _f(None, "[first, last]: record these optimizer steps with torch.profiler into the run directory's profile/ (a trace per rank that opens in Perfetto or TensorBoard)", lambda x: x is None or (len(x) == 2 and 0 < x[0] <= x[1]), "[first, last] with 0 < first <= last, or null")
    profile_ranks: Literal["rank0", "all"] = _f("rank0", "which ranks train.profile records")
    memory_snapshot: bool = _f(False, "CUDA: record the allocator's history and write a memory snapshot (open at pytorch.org/memory_viz) on an out-of-memory error")


@dataclass
class ValConfig:
    mode: Literal["sharded", "rank0"] = _f("sharded", "sharded: every rank evaluates a disjoint shard; rank0: rank 0 evaluates all")
    every: int = _f(1, "epochs between validations", _positive, "> 0")
    every_steps: int | None = _f(None, "also validate every this many optimizer steps (for long or endless streams)", _positive_or_none, "> 0 or null")
    rank0_timeout_s: float = _f(7200.0, "how long other ranks wait for rank 0 in rank0 mode", _timeout, "in (0, 604800] (a week)")


@dataclass
class EarlyStopConfig:
    monitor: str = _f("val_loss", "metric that picks the best checkpoint and drives early stopping (val_<name>)")
    mode: Literal["min", "max"] = _f("min", "whether a lower or a higher monitored value is better")
    patience: int | None = _f(None, "stop after this many validations in a row without improvement, as Keras and Lightning count (0 and 1: at the first; None: never stop early)", lambda x: x is None or x >= 0, ">= 0 or null")
    min_delta: float = _f(0.0, "smallest change that counts as an improvement", _non_negative, ">= 0")
    restore_best: bool = _f(True, "load the best weights at the end, before the test evaluation")


@dataclass
class DistConfig:
    backend: Literal["auto", "gloo", "nccl"] = _f("auto", "process-group backend; auto: nccl with CUDA, else gloo")
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "auto: cuda:<local_rank> when CUDA is available, else cpu")
    init_timeout_s: float = _f(600.0, "timeout of process-group start-up", _timeout, "in (0, 604800] (a week)")
    timeout_s: float = _f(300.0, "timeout of each collective once training runs", _timeout, "in (0, 604800] (a week)")
    flight_recorder: bool = _f(True, "NCCL: PyTorch's Flight Recorder keeps each rank's last collectives and dumps them on a collective timeout into the run directory's flight_recorder/ (the error names the file)")
    find_unused_parameters: bool = _f(False, "DDP find_unused_parameters")
    static_graph: bool = _f(False, "DDP static_graph")
    gradient_as_bucket_view: bool = _f(False, "DDP gradient_as_bucket_view (true saves one gradient-sized buffer of memory)")
    bucket_cap_mb: float = _f(25.0, "DDP all-reduce bucket size in MiB", _positive, "> 0")
    sync_batchnorm: bool = _f(False, "convert every BatchNorm of the model to SyncBatchNorm")
    strategy: Literal["ddp", "fsdp"] = _f("ddp", "ddp: a whole copy of the model per rank; fsdp: parameters, gradients and optimizer state sharded over the ranks (FSDP2), sharded checkpoints (DCP)")
    blocks: list[str] = _f([], "class names of the modules sharded (fsdp) and checkpointed (activation_checkpointing) one by one; []: every direct child with parameters (each layer of a ModuleList)")
    reshard_after_forward: bool = _f(True, "fsdp: free each block's gathered weights after its forward (less memory, one more all-gather in backward)")
    cpu_offload: bool = _f(False, "fsdp: keep the sharded parameters, gradients and optimizer state in CPU memory")
    activation_checkpointing: bool = _f(False, "recompute each block's activations in backward instead of keeping them (ddp and fsdp)")
    comm_hook: Literal["none", "fp16", "bf16", "powersgd"] = _f("none", "ddp: compress the gradient all-reduce (PyTorch's DDP communication hooks); powersgd's error feedback is checkpointed")
    powersgd_rank: int = _f(1, "powersgd: rank of the low-rank approximation of each gradient matrix", _positive, "> 0")
    powersgd_start_step: int = _f(1000, "powersgd: plain all-reduce for this many steps first (accuracy), then PowerSGD", lambda v: v >= 2, ">= 2")


@dataclass
class CheckpointConfig:
    every_epochs: int = _f(1, "save a checkpoint at the end of every N epochs (0: never)", _non_negative, ">= 0")
    every_steps: int | None = _f(None, "also save every N optimizer steps, mid-epoch included (None: never)", _positive_or_none, "> 0 or null")
    keep_last: int = _f(2, "how many of the newest checkpoints to keep (best.pt is kept apart)", _positive, "> 0")
    save_best: bool = _f(True, "save checkpoints/best.pt when the monitored metric improves")
    async_save: bool = _f(False, "write step checkpoints in the background: training waits only while the state is copied to CPU memory (into one copy kept for the run and reused by every save); one write in flight at most, and a preemption or the end of the run waits for it")
    resume: str = _f("auto", "auto: continue from the newest valid checkpoint of the run, if any; none: start over "
                     "(earlier files are archived); or a checkpoint file's path")


@dataclass
class PreemptConfig:
    signals: list[str] = _f(["SIGTERM", "SIGUSR1", "SIGUSR2"], "signals that make every rank checkpoint at the same "
                            "step (within about 0.5 s or two steps) and exit with status 75", lambda v: all(x in ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP", "SIGCONT") for x in v),
                            "names among SIGTERM, SIGUSR1, SIGUSR2, SIGINT, SIGHUP, SIGCONT")
    requeue: bool = _f(True, "under SLURM, rank 0 requeues the job (or its array task) after the preemption checkpoint")


@dataclass
class WandbConfig:
    enabled: bool = _f(False, "log to Weights & Biases from rank 0 (pip install 'ddptrain[wandb]')")
    project: str | None = _f(None, "wandb project (None: WANDB_PROJECT, else 'ddptrain')")
    entity: str | None = _f(None, "wandb entity, user or team (None: WANDB_ENTITY or your default)")
    name: str | None = _f(None, "wandb run name (None: the run's `name`)")
    group: str | None = _f(None, "wandb group (None: WANDB_RUN_GROUP)")
    tags: list[str] = _f([], "wandb tags")
    notes: str | None = _f(None, "wandb notes")
    mode: Literal["auto", "online", "offline", "disabled"] = _f(
        "auto", "auto: WANDB_MODE if set, else online when an API key exists, else offline")
    log_best_checkpoint: bool = _f(False, "upload checkpoints/best.pt (fsdp: best/) as a model artifact at the end")


@dataclass
class Config:
    task: str = _f("digits", "built-in task name (digits, diabetes) or `module:function` or `file.py:function`")
    task_args: dict = _f({}, "free-form arguments for the task function (not validated by ddptrain)")
    name: str = _f("run", "run name: the run directory is <runs_dir>/<name> (the CLI defaults it to the config file's stem)")
    runs_dir: str = _f("runs", "where run directories are created")
    seed: int = _f(0, "seed of model initialisation and data order; each rank derives its own seed for dropout", _seed, "an integer in [0, 2**63)")
    deterministic: bool = _f(False, "use deterministic algorithms (slower; errors on ops that have none)")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    val: ValConfig = field(default_factory=ValConfig)
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    preempt: PreemptConfig = field(default_factory=PreemptConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


def _is_section(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def describe() -> list[tuple[str, str, str]]:
    """Every config key as (dotted key, default as YAML, description), for the README and --help."""
    import json
    rows = []

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if _is_section(hints[f.name]):
                walk(hints[f.name], prefix + f.name + ".")
                continue
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            rows.append((prefix + f.name, json.dumps(default), f.metadata["help"]))

    walk(Config, "")
    return rows
