"""Checkpoint files: written atomically, found again only when whole, read as untrusted input.

`step-000000120.pt` is fsynced and renamed into place, then its marker `step-000000120.pt.done` (size and
SHA-256) the same way; one without a matching marker is skipped when resuming. `torch.load(weights_only=True)`
refuses a file that needs arbitrary pickled objects. FSDP's directories of shards are sharded.py's; their
markers and `state.pt` (the rest) are checked and read here.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import torch

from .runlog import warn

FORMAT_VERSION = 2  # 2: named train sums (losses.Sums); format 1 still loads
STEP_FILE = re.compile(r"^step-(\d{9})(\.pt)?$")  # a file, or a directory of shards (FSDP)
STATE = "state.pt"  # in a directory checkpoint: what is not sharded


class CheckpointError(ValueError):
    """A checkpoint file that is missing, truncated, corrupt, unsafe or does not fit the model."""


class _HashingWriter:
    """A file object that hashes what passes through it, so the file is not read back to hash it."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data):
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self):
        self.f.flush()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write) -> None:
    """`write(f)` into a temporary file beside `path`, fsynced and renamed to it once whole."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write leaves nothing behind to fill the disk
        raise


NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def os_error(e: BaseException) -> OSError | None:
    """The OSError behind `e`: `e` itself, or the one torch.save reports a failed write with (as a RuntimeError)."""
    err = e if isinstance(e, OSError) else e.__cause__ or e.__context__
    return err if isinstance(err, OSError) else None


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def save(path: Path, state: dict) -> None:
    """Write `state` to `path` atomically, then its completeness marker. Call on one rank only.

    A full disk (or quota) is a CheckpointError naming the path and the space needed; the previous
    checkpoint stays as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta, written = {}, [0]

    def write(f):
        w = _HashingWriter(f)
        try:
            torch.save({"format_version": FORMAT_VERSION, **state}, w)
        finally:
            written[0] = w.size
        meta.update(size=w.size, sha256=w.sha.hexdigest())

    try:
        write_atomic(path, write)
        write_atomic(marker(path), lambda f: f.write(json.dumps({**meta, "step": state.get("step")}).encode()))
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        err = os_error(e)
        if not (err is not None and err.errno in NO_SPACE) and "No space left" not in str(e):
            raise
        marker(path).unlink(missing_ok=True)
        previous = [p.stat().st_size for p in step_files(path.parent) if p != path]
        need = max([written[0], *previous])
        free = shutil.disk_usage(path.parent).free
        raise CheckpointError(f"checkpoint '{path}': no space left on the device ({free / 2**20:.1f} MiB free in "
                              f"'{path.parent}', about {need / 2**20:.1f} MiB needed); the previous checkpoint is "
                              f"kept") from None
    _fsync_dir(path.parent)


def remove_temporaries(run_dir: Path) -> list[Path]:
    """Delete the temporary files of writes that never finished (a writer killed mid-save, a full disk).
    Only the run directory's lock holder may call this: then no write is in progress."""
    found = [p for p in (run_dir / "checkpoints").glob(".*.tmp*")] if (run_dir / "checkpoints").is_dir() else []
    found += [p for p in run_dir.glob("*.tmp") if p.is_file()]
    for p in found:
        _remove(p)
    return found


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def marker(path: Path) -> Path:
    """The completeness marker: `step-N.pt.done` beside a file, `step-N.done` beside a directory."""
    return path.with_name(path.name + ".done")


def _sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def verify(path: Path) -> str | None:
    """None if the checkpoint is whole (its marker exists; sizes, and the hash of what is not sharded, match),
    else what is wrong."""
    if not path.exists():
        return "missing"
    try:
        meta = json.loads(marker(path).read_text())
    except (OSError, ValueError):
        meta = None
    if not isinstance(meta, dict):
        return "no completeness marker (the write did not finish)"
    if path.is_dir() != ("files" in meta):  # a directory of shards has its files listed in its marker
        return "a directory, where its marker describes a file" if path.is_dir() else \
            "a file, where its marker describes a directory of shards"
    if path.is_dir():
        for name, size in meta["files"].items():
            f = path / name
            if not f.is_file() or f.stat().st_size != size:
                return f"shard '{name}' is missing or not the {size} bytes written (truncated?)"
        path, meta = path / STATE, meta.get(STATE, {})
        if not path.is_file():
            return f"its {STATE} is missing"
    if path.stat().st_size != meta.get("size"):
        return f"size {path.stat().st_size} differs from the {meta.get('size')} bytes written (truncated?)"
    if _sha256(path) != meta.get("sha256"):
        return "content differs from what was written (corrupt)"
    return None


def step_files(directory: Path) -> list[Path]:
    """The step checkpoints in `directory`, oldest first."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if STEP_FILE.match(p.name))


def latest_valid(directory: Path) -> Path | None:
    """The newest whole step checkpoint; each newer one that is not whole is skipped with a warning."""
    for path in reversed(step_files(directory)):
        problem = verify(path)
        if problem is None:
            return path
        warn(f"skipping checkpoint '{path}': {problem}")
    return None


def prune(directory: Path, keep_last: int, written: Path | None = None) -> None:
    """Delete all but the newest `keep_last` step checkpoints (and their markers), counting from `written`, the
    one just saved: a newer one (left unmarked by an attempt that died, the run resumed before it) never counts
    and never makes it go."""
    for path in [p for p in step_files(directory) if written is None or p.name <= written.name][:-keep_last]:
        marker(path).unlink(missing_ok=True)
        _remove(path)


def best_path(run_dir: Path, strategy: str) -> Path:
    """A run's best weights: checkpoints/best.pt, or under fsdp the directory of shards checkpoints/best/."""
    return run_dir / "checkpoints" / ("best" if strategy == "fsdp" else "best.pt")


def marked_step(path: Path) -> int | None:
    """The step that a checkpoint's completeness marker records (None without a marker)."""
    try:
        return json.loads(marker(path).read_text()).get("step")
    except (OSError, ValueError):
        return None


def set_aside_newer(directory: Path, step: int, best: str) -> Path | None:
    """A run resumed from an earlier step than its newest checkpoints abandons what came after: its step
    checkpoints past `step`, and `best` if written past it, go (with their markers) to `abandoned-after-step-N/`,
    kept but never resumed from or tested. Returns that directory, or None if nothing was newer. Rank 0 only."""
    newer = [p for p in step_files(directory) if int(STEP_FILE.match(p.name).group(1)) > step]
    if (marked_step(directory / best) or -1) > step:
        newer.append(directory / best)
    if not newer:
        return None
    aside = directory / f"abandoned-after-step-{step:09d}"
    aside.mkdir(exist_ok=True)
    for path in newer:
        for part in (path, marker(path)):
            if part.exists():
                os.replace(part, aside / part.name)
    _fsync_dir(directory)
    return aside


def load(path: Path) -> dict:
    """Read a checkpoint onto the CPU with weights_only=True; raise CheckpointError naming the file."""
    path = Path(path)
    if path.name.endswith(".done"):
        raise CheckpointError(f"checkpoint '{path}': a completeness marker, not a checkpoint; name the checkpoint "
                              f"beside it, '{path.with_name(path.name[:-5])}'")
    if path.is_dir():  # FSDP: the shards are read by the strategy, the rest is here
        return _read(path / STATE, path)
    return _read(path, path)


def _read(path: Path, name: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{name}': not found")
    path, file = name, path
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint '{path}': refused, it holds objects that safe (weights-only) loading "
                              f"does not allow; only load checkpoints you trust ({first})") from None
    except Exception as e:
        raise CheckpointError(f"checkpoint '{path}': unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or "format_version" not in state:
        raise CheckpointError(f"checkpoint '{path}': not a ddptrain checkpoint")
    if state["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint '{path}': format {state['format_version']} is newer than this "
                              f"ddptrain understands ({FORMAT_VERSION}); upgrade ddptrain")
    return state


def mismatch(e: Exception) -> str:
    """The telling part of torch's load_state_dict error: size mismatches first, at most 400 characters."""
    lines = [l.strip() for l in str(e).splitlines()[1:] if l.strip()]
    lines.sort(key=lambda l: not l.startswith("size mismatch"))
    return "; ".join(lines)[:400] or str(e)[:400]


def load_model_state(module: torch.nn.Module, state: dict, path: Path) -> None:
    """Load weights, with an error naming the file when they do not fit the configured model."""
    try:
        module.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as e:
        raise CheckpointError(f"checkpoint '{path}': its weights do not fit the configured model ({mismatch(e)})") from None


def fits(module: torch.nn.Module, weights: dict) -> str | None:
    """None if `weights` has exactly the module's keys and shapes (so loading cannot stop half-way), else why not."""
    own = module.state_dict()
    missing, unexpected = sorted(own.keys() - weights.keys()), sorted(weights.keys() - own.keys())
    shapes = [k for k in own.keys() & weights.keys()
              if isinstance(own[k], torch.Tensor) and getattr(weights[k], "shape", None) != own[k].shape]
    if missing or unexpected or shapes:
        return f"missing {missing[:3]}, unexpected {unexpected[:3]}, other shapes {shapes[:3]}"
    return None


def watched(module: torch.nn.Module) -> list[torch.Tensor]:
    """The tensors whose finiteness `finite` checks: the parameters, and the floating buffers that are finite
    at the start. A buffer that holds -inf by design (a causal attention mask) is not a sign of divergence."""
    buffers = [b for b in module.buffers() if b.is_floating_point() and bool(torch.isfinite(b).all())]
    return list(module.parameters()) + buffers


def finite(tensors: list[torch.Tensor]) -> bool:
    """True if every tensor is finite: only such weights may replace a checkpoint.

    A NaN or Inf anywhere makes a tensor's sum non-finite, so the sums (fast: no tensor of flags) clear the
    usual case; only a tensor whose sum is not finite (or overflowed) is checked element by element."""
    if not tensors:
        return True
    sums = torch.stack([t.detach().sum(dtype=torch.float32) for t in tensors])
    if bool(torch.isfinite(sums).all()):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)
