"""The run configuration: typed sections, loading from YAML or TOML, `section.key=value` overrides.

Everything a run can be told lives here, with its default and a one-line description that the CLI,
`--print-config` and the README show. Validation happens once, at the edge: unknown keys, wrong types
and out-of-range values raise ConfigError naming the key, the value and what was expected.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


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


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        item = typing.get_args(tp)[0]
        plural = {int: "integers", float: "numbers", str: "strings", bool: "true/false values"}
        return f"a list of {plural.get(item) or _type_name(item)}"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping"}.get(tp, str(tp))


def _coerce(value: Any, tp, key: str):
    """Return value converted to tp, or raise ConfigError naming key, value and the expected type."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise bad
    if origin is typing.Union or type(tp).__name__ == "UnionType":
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
            raise bad
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise bad
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise bad
        (item,) = typing.get_args(tp)
        try:
            return [_coerce(v, item, key) for v in value]
        except ConfigError:
            raise bad from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise bad
        try:
            number = float(value)  # YAML 1.1 reads `1e-3` as a string
        except ValueError:
            raise bad from None
        if not math.isfinite(number):
            raise ConfigError(f"config key '{key}': expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):  # `name: 2024`, `name=2024`
            return str(value)
        raise bad
    if tp is dict:
        if isinstance(value, dict):
            return dict(value)
        raise bad
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def _unknown_key(key: str, known: list[str]) -> ConfigError:
    name = key.rsplit(".", 1)[-1]
    prefix = key[: len(key) - len(name)]
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known keys: {', '.join(known)}"
    return ConfigError(f"unknown config key '{key}'{hint}", key)


def _build(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}': expected a mapping, got {data!r}",
                          prefix.rstrip(".") or None)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise _unknown_key(prefix + str(key), names)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        key, tp = prefix + f.name, hints[f.name]
        if _is_section(tp):
            kwargs[f.name] = _build(tp, data[f.name] if data[f.name] is not None else {}, key + ".")
            continue
        try:
            value = _coerce(data[f.name], tp, key)
        except ConfigError as e:
            e.key = key
            raise
        check = f.metadata.get("check")
        if check is not None and not check(value):
            raise ConfigError(f"config key '{key}': expected {f.metadata['expect']}, got {value!r}", key)
        kwargs[f.name] = value
    return cls(**kwargs)


def _cross_checks(cfg: Config) -> None:
    if not cfg.name or "/" in cfg.name or cfg.name in (".", ".."):
        raise ConfigError(f"config key 'name': expected a plain directory name, got {cfg.name!r}", "name")
    if cfg.data.val_fraction + cfg.data.test_fraction >= 1:
        raise ConfigError("config keys 'data.val_fraction' + 'data.test_fraction': expected a sum below 1, got "
                          f"{cfg.data.val_fraction} + {cfg.data.test_fraction}", "data.test_fraction")
    if not cfg.early_stop.monitor.startswith("val_"):
        raise ConfigError(f"config key 'early_stop.monitor': expected a validation metric named val_<name>, "
                          f"got {cfg.early_stop.monitor!r}", "early_stop.monitor")


def from_dict(data: dict) -> Config:
    """Build and validate a Config from nested plain data (raises ConfigError)."""
    cfg = _build(Config, data)
    _cross_checks(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def _parse_error(e: Exception) -> str:
    """A parser's error in one line: PyYAML's spans several (the context, the problem, each with a caret under
    the line quoted), TOML's is one already."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    if mark is not None and problem:
        context = f"{e.context}: " if getattr(e, "context", None) else ""
        return f"{context}{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(e).split())


def _safe_load(text: str):
    """yaml.safe_load, where a key given twice in one mapping is an error (PyYAML keeps the last one silently)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, typing.Hashable):
                    continue  # construct_mapping refuses it
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice",
                                                            key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep)
    return yaml.load(text, Loader=Loader)


def read_file(path: str | Path, what: str = "config file") -> dict:
    """Read a YAML (.yaml/.yml) or TOML (.toml) file into nested plain data; errors call it `what`."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} '{path}': is a directory; expected a .yaml, .yml or .toml file")
    if not path.is_file():
        raise ConfigError(f"{what} '{path}': not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} '{path}': cannot read it ({getattr(e, 'strerror', None) or e})") from None
    try:
        if path.suffix == ".toml":
            import tomllib
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = _safe_load(text)
        else:
            raise ConfigError(f"{what} '{path}': expected a .yaml, .yml or .toml file")
    except ConfigError:
        raise
    except Exception as e:  # the parsers' own errors carry line and column
        raise ConfigError(f"{what} '{path}': cannot parse: {_parse_error(e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} '{path}': expected a mapping at the top level")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` (or `--a.b=value`, as `wandb agent` passes it) -> (['a', 'b'], parsed value)."""
    body = text[2:] if text.startswith("--") else text
    if "=" not in body or not body.split("=", 1)[0]:
        raise ConfigError(f"override '{text}': expected section.key=value")
    key, raw = body.split("=", 1)
    import yaml
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Return a copy of data with each `section.key=value` override set (validation comes later)."""
    import copy
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return data


def key_line(path: str | Path, key: str | list[str]) -> int | None:
    """The line of `path` (YAML or TOML, read before) that sets `key` (dotted, or its parts), or None where
    it sets none.

    Only asked once a key is wrong, so a good config never pays for it."""
    parts = key.split(".") if isinstance(key, str) else key
    text = Path(path).read_text(encoding="utf-8")
    if Path(path).suffix == ".toml":
        return _toml_key_line(text, parts)
    import yaml
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    line = None
    for part in parts:
        if not isinstance(node, yaml.MappingNode):
            return None
        found = [(k, v) for k, v in node.value if k.value == part]
        if not found:
            return None
        key_node, node = found[-1]
        line = key_node.start_mark.line + 1
    return line


def _toml_key_line(text: str, parts: list[str]) -> int | None:
    """tomllib keeps no positions: find `[a.b]` headers and `key =` lines (dotted keys too; not inline tables)."""
    def split(dotted):
        return [p.strip().strip('"\'') for p in dotted.split(".")]
    table = []
    for number, line in enumerate(text.splitlines(), 1):
        header = re.match(r"\s*\[([^\[\]]+)\]", line)
        if header:
            table = split(header.group(1))
        elif (assign := re.match(r"\s*([\w.\"' -]+?)\s*=", line)) and table + split(assign.group(1)) == parts:
            return number
    return None


def _located(e: ConfigError, path: str | Path | None, overrides: list[str]) -> ConfigError:
    """e, prefixed with what set its key: the last override that did, else the line of the file that did."""
    if e.key is None:
        return e
    for text in reversed(overrides):
        set_key = ".".join(parse_override(text)[0])
        if e.key == set_key or e.key.startswith(set_key + "."):
            return ConfigError(f"override '{text}': {e}", e.key)
    if path is not None and (line := key_line(path, e.key)) is not None:
        return ConfigError(f"{path}:{line}: {e}", e.key)
    return e


def build(data: dict, path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """from_dict(apply_overrides(data, overrides)), where `data` was read from `path`; an error names the
    override or the file's line that set the wrong key."""
    try:
        return from_dict(apply_overrides(data, list(overrides)))
    except ConfigError as e:
        raise _located(e, path, list(overrides)) from None


def load(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None) -> Config:
    """Read a config file (or start from `base`), apply overrides, validate.

    The run name defaults to the file's stem, so re-running a config reuses its run directory.
    """
    data = dict(base or {})
    if path is not None:
        data = {**data, **read_file(path)}
        data.setdefault("name", Path(path).stem)
    return build(data, path, overrides)


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


def dump_yaml(cfg: Config) -> str:
    import yaml
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
