"""What a checkpoint holds, listed once (`RunState`), the loop position, seeds and every rank's RNG, and
which checkpoint a run continues from.

A checkpoint holds the shared parts (model, optimizer, schedule, precision, early stopping, `Progress`)
once and, for each rank, its RNG states and its not-yet-logged train sums. Resumed on the same world
size, every rank gets its own back, so the run continues bitwise as if it had never stopped. On another
world size the data order is still exact (the batch is global and the sampler's permutation does not
depend on the world size); dropout and other random streams are re-seeded per rank, so the result
matches only statistically.
"""
from __future__ import annotations

import contextlib
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch

from . import checkpoint as ckpt
from . import config as config_mod
from . import configfile
from .config import Config, ConfigError
from .dist import Dist

CPU = torch.device("cpu")


@dataclass
class Progress:
    epoch: int = 0             # the epoch in progress (or the last one, when epoch_complete)
    step: int = 0              # optimizer steps taken in the whole run
    step_in_epoch: int = 0     # optimizer steps taken in `epoch`
    epoch_complete: bool = False  # `epoch` has ended (all its data read, or the run's steps done), its validation included
    pass_ended: bool = False   # all of `epoch`'s data has been read (not so when max_steps ended the run within it)
    stopped_early: bool = False
    skipped_total: int = 0     # steps skipped for non-finite gradients
    skipped_in_a_row: int = 0
    records: int = 0           # lines of metrics.jsonl written up to this point
    passes: int = 0            # complete passes over the training data
    last_val: dict | None = None  # the latest validation metrics
    val_step: int = -1         # the step of the latest validation

    @property
    def epoch_done(self) -> bool:
        """`epoch` is over: all its data read, and its end (validation, checkpoint) done."""
        return self.epoch_complete and self.pass_ended

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        state = {"pass_ended": state.get("epoch_complete", False), **state}  # older checkpoints: an epoch ended whole
        for key, value in state.items():
            setattr(self, key, value)


class Stateful(Protocol):
    def state_dict(self): ...
    def load_state_dict(self, state) -> None: ...


class RunState:
    """Every part of a checkpoint, each with state_dict() / load_state_dict(), named once.

    `shared` parts are identical on every rank, and rank 0's copy is saved. `per_rank` parts differ
    between ranks and are gathered: the RNG streams and the train sums not yet logged.
    """

    def __init__(self, shared: dict[str, Stateful], per_rank: dict[str, Stateful], dist: Dist):
        self.shared, self.per_rank, self.dist = shared, per_rank, dist

    def state_dict(self) -> dict | None:
        """The whole state on rank 0, None elsewhere. Call on all ranks."""
        ranks = self.dist.gather_object({name: part.state_dict() for name, part in self.per_rank.items()})
        if not self.dist.env.is_main:
            return None
        return {**{name: part.state_dict() for name, part in self.shared.items()}, "ranks": ranks}

    def load_state_dict(self, state: dict, path) -> None:
        for name, part in self.shared.items():
            try:
                part.load_state_dict(state[name])
            except (RuntimeError, ValueError, KeyError) as e:
                raise ckpt.CheckpointError(f"checkpoint '{path}': its {name} does not fit this run "
                                           f"({ckpt.mismatch(e)})") from None
        ranks, env = state["ranks"], self.dist.env
        for name, part in self.per_rank.items():
            if len(ranks) == env.world_size:
                part.load_state_dict(ranks[env.rank][name])
            else:
                part.load_other_world_size([r[name] for r in ranks], env.rank)


class RngState:
    """This rank's RNG streams (torch, CUDA, Python, NumPy) as a checkpoint part."""

    def __init__(self, device: torch.device, reseed: Callable[[int], None]):
        self.device, self.reseed = device, reseed

    def state_dict(self) -> dict:
        return rng_state(self.device)

    def load_state_dict(self, state: dict) -> None:
        set_rng_state(state, self.device)

    def load_other_world_size(self, states: list, rank: int) -> None:
        self.reseed(rank)  # new streams: no rank's old stream belongs to this rank now


class OwnRng:
    """CPU RNG streams (torch, Python, NumPy) of their own, for code that must not draw from the training's:
    `with rng:` swaps them in, and back out on leaving (about 0.2 ms). `state`: as `cpu_rng()` gives it."""

    def __init__(self):
        self.state: dict | None = None

    def seed(self, seed: int) -> None:
        outer = cpu_rng()
        seed_everything(seed)
        self.state = cpu_rng()
        set_cpu_rng(outer)

    def __enter__(self) -> "OwnRng":
        self._outer = cpu_rng()
        set_cpu_rng(self.state)
        return self

    def __exit__(self, *exc) -> None:
        self.state = cpu_rng()
        set_cpu_rng(self._outer)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % 2**32)
    except ImportError:
        pass


@contextlib.contextmanager
def callers_rng():
    """Leave the calling program's RNG streams (CPU, and CUDA's once in use) as they were: for the library
    functions that seed to build a task (load_model, evaluate), called from a user's own script."""
    outer = cpu_rng()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        set_cpu_rng(outer)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def rank_seed(seed: int, rank: int) -> int:
    """A distinct, reproducible seed per rank (for dropout and augmentation)."""
    return (seed * 1_000_003 + rank + 1) % 2**63


def cpu_rng() -> dict:
    """The CPU RNG states (torch, Python, NumPy) as they are: quick to take and set, not all saveable."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    try:
        import numpy as np
        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def set_cpu_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "numpy" in state:
        import numpy as np
        np.random.set_state(state["numpy"])


def saveable(state: dict) -> dict:
    """cpu_rng()'s states in types that weights_only loading accepts (no numpy arrays)."""
    return {**state, "numpy": saveable_numpy_state(state["numpy"])} if "numpy" in state else dict(state)


def from_saved(saved: dict) -> dict:
    """The inverse of saveable."""
    state = {"torch": saved["torch"], "python": _tuples(saved["python"])}
    if "numpy" in saved:
        state["numpy"] = numpy_state(saved["numpy"])
    return state


def rng_state(device: torch.device) -> dict:
    """This process's RNG states, in types that weights_only loading accepts."""
    state = saveable(cpu_rng())
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def saveable_numpy_state(state: tuple) -> tuple:
    """A NumPy generator's get_state() in types that weights_only loading accepts (its keys as a tensor)."""
    name, keys, pos, has_gauss, cached = state
    return name, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)


def numpy_state(saved: tuple) -> tuple:
    """The inverse of saveable_numpy_state: what set_state() takes."""
    import numpy as np
    name, keys, pos, has_gauss, cached = saved
    return name, keys.numpy().astype(np.uint32), pos, has_gauss, cached


def set_rng_state(state: dict, device: torch.device) -> None:
    set_cpu_rng(from_saved(state))
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _tuples(x):
    """random.setstate wants tuples; a round trip through torch.save may give lists."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


# Keys that shape the training itself: a checkpoint made under other values cannot be continued exactly.
# Everything else (logging, timeouts, validation mode, world size...) may change, and so may epochs and
# max_steps, which extends a run, unless the schedule is laid out over the run's length.
PINNED = ["task", "task_args", "seed", "data.batch_size", "data.val_fraction", "data.test_fraction",
          "data.split_seed", "model", "loss", "optim", "sched", "train.grad_accum_steps", "train.precision",
          "early_stop.monitor", "early_stop.mode",  # the best value saved is of this metric, in this direction
          "dist.strategy"]  # ddp saves one file, fsdp a directory of shards: `ddptrain export` turns one into a model


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


_ABSENT = object()  # a key one config has and the other has not


def _leaves(key: str, then, now):
    """The dotted keys under `key` whose values differ, as (key, then, now): within a mapping, the keys in it."""
    if not (isinstance(then, dict) and isinstance(now, dict)):
        yield key, then, now
        return
    for k in sorted(then.keys() | now.keys(), key=str):
        if then.get(k, _ABSENT) != now.get(k, _ABSENT):
            yield from _leaves(f"{key}.{k}", then.get(k, _ABSENT), now.get(k, _ABSENT))


def shown_value(value) -> str:
    return "not set" if value is _ABSENT else repr(value)


def pinned_diffs(saved: dict, current: dict, model_keys_matter: bool = True) -> list[tuple[str, object, object]]:
    """The keys that shape the training whose values differ between a checkpoint's config and `current`, each
    leaf of a section by itself, as (dotted key, saved value, current value) (`model.*` only matters to a task
    that reads it)."""
    try:  # keys added since the checkpoint was made take their defaults, which is what it trained with
        saved = config_mod.to_dict(configfile.from_dict(saved))
    except ConfigError:
        pass
    pinned = [k for k in PINNED if model_keys_matter or k != "model"]
    if _get(current, "sched.name") in config_mod.SPANS_RUN:
        pinned += ["train.epochs", "train.max_steps"]  # these schedules are laid out over the whole run
    return [leaf for k in pinned if _get(saved, k) != _get(current, k) for leaf in _leaves(k, _get(saved, k),
                                                                                           _get(current, k))]


def check_compatible(saved: dict, current: dict, path, model_keys_matter: bool = True) -> None:
    """Refuse to continue a checkpoint under a config that would train differently."""
    diffs = pinned_diffs(saved, current, model_keys_matter)
    if not diffs:
        return
    shown = "; ".join(f"{k}: {shown_value(then)} -> {shown_value(now)}" for k, then, now in diffs)
    if any(k in ("train.epochs", "train.max_steps") for k, _, _ in diffs):
        shown += f" (sched.name={_get(current, 'sched.name')} is laid out over the run's length)"
    raise ConfigError(f"checkpoint '{path}' was made with a different config ({shown}); use another "
                      f"`name`, `checkpoint.resume=none` to start over, or the original values")


def resume_path(cfg: Config, dist: Dist) -> Path | None:
    """The checkpoint to continue from (rank 0 looks, everyone learns), or None to start over. Call on all ranks."""
    found, error = None, None
    if cfg.checkpoint.resume not in ("auto", "none"):
        found = cfg.checkpoint.resume
    elif dist.env.is_main and cfg.checkpoint.resume == "auto":
        latest = ckpt.latest_valid(cfg.run_dir / "checkpoints")
        found = str(latest) if latest else None
    found = dist.broadcast_object(found)
    if found is not None and not Path(found).exists():  # a file, or a directory of shards (fsdp)
        error = f"checkpoint '{found}': not found"
        if cfg.checkpoint.resume not in ("auto", "none"):
            error = f"config key 'checkpoint.resume': {error}; expected auto, none or a checkpoint's path"
        if dist.env.world_size > 1:
            error += f" (on rank {dist.env.rank}: the run directory must be on a filesystem that every node sees)"
    first = dist.first_error(error)
    if first:
        raise ckpt.CheckpointError(first)
    return Path(found) if found else None
