"""Checkpoint files: written atomically, found again only when whole, read as untrusted input.

`checkpoints/step-000000120.pt` is written to a temporary file, fsynced and renamed; then a marker
`step-000000120.pt.done` with its size and SHA-256 is written the same way. A checkpoint without its
marker, or whose size or hash differs, is incomplete or corrupt and is skipped when resuming. Loading
uses `torch.load(weights_only=True)`: a file that needs arbitrary pickled objects is refused.

Under FSDP (`dist.strategy: fsdp`) a checkpoint is a directory, `step-000000120/`: every rank writes its
shards of the model and optimizer there with Distributed Checkpoint (DCP), rank 0 adds `state.pt` (the
rest, as above); it is written as `.step-000000120.tmp/` and renamed once every rank's shards are written,
and only then its marker `step-000000120.done` lists every file's size. DCP's metadata and non-tensor
values are read with restricted unpicklers: no pickled code runs.
"""
from __future__ import annotations

import collections
import errno
import functools
import hashlib
import json
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Callable

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

# ---- directory checkpoints (FSDP): Distributed Checkpoint, read without unpickling code ----------------------
def save_sharded(path: Path, tensors: dict, rest: dict | None, dist, keep_last: int | None = None,
                 background=None, group=None,
                 live: Callable[[torch.Tensor], bool] = lambda t: False) -> None:
    """Every rank writes its shards of `tensors` (DCP), rank 0 `rest` (state.pt); the directory is renamed into
    place and marked complete only after all ranks wrote theirs, then (with keep_last) older ones are
    pruned. With `background` (an async_save.Background), the shards are copied to CPU memory and written by
    DCP's threads (collectives on `group`), the rest by `background`'s: the tensors that `live` names
    (parameters and optimizer state) are copied in the background while training goes on
    (`Background.staged` waits for it), the others now.
    Call on all ranks; raises CheckpointError on the ranks that failed (the caller makes it collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException as DCPException  # a BaseException
    tmp = path.with_name(f".{path.name}.tmp")
    if background is not None:
        background.wait()  # one write in flight at most
    if dist.env.is_main:
        _remove(tmp)
        tmp.mkdir(parents=True)
    dist.barrier()
    try:
        if background is None:
            dcp.save(tensors, storage_writer=dcp.FileSystemWriter(tmp))  # returns once every rank's shards are written
        else:
            response = dcp.async_save(background.copy(tensors, keep=live), storage_writer=dcp.FileSystemWriter(tmp),
                                      process_group=group, async_stager=background.dcp_stager())
    except (Exception, DCPException) as e:
        if dist.env.is_main:
            _remove(tmp)
        raise CheckpointError(f"checkpoint '{path}': writing the shards failed ({first_line(e)}); the previous "
                              f"checkpoint is kept") from None

    def finish():
        if background is not None:
            try:
                response.upload_completion.result()  # on rank 0: every rank's shards are written
            except (Exception, DCPException) as e:
                raise CheckpointError(f"checkpoint '{path}': writing the shards failed ({first_line(e)}); the "
                                      f"previous checkpoint is kept") from None
        if dist.env.is_main:
            _finish_sharded(path, tmp, rest, keep_last)
    if background is None:
        finish()
    else:
        rest = background.copy(rest)
        background.start(finish, stage=response.staging_completion.result)


def _finish_sharded(path: Path, tmp: Path, rest: dict, keep_last: int | None) -> None:
    """Rank 0, once every shard is written: state.pt, the rename, the marker listing every file's size."""
    old = path.with_name(f".{path.name}.old.tmp")
    try:
        with open(tmp / STATE, "wb") as f:
            torch.save({"format_version": FORMAT_VERSION, **rest}, f)
            f.flush()
            os.fsync(f.fileno())
        files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.name != STATE}
        meta = {"files": files, STATE: {"size": (tmp / STATE).stat().st_size, "sha256": _sha256(tmp / STATE)},
                "step": rest["progress"]["step"] if "progress" in rest else rest.get("step")}
        if path.exists():  # the same step saved again: a rename moves the whole one aside, removed once replaced
            _remove(old)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        write_atomic(marker(path), lambda f: f.write(json.dumps(meta).encode()))
        _remove(old)
    except OSError as e:
        _remove(tmp)
        if old.exists():  # the marker still describes it: back into place
            _remove(path)
            os.replace(old, path)
        raise CheckpointError(f"checkpoint '{path}': {e.strerror or e}; the previous checkpoint is kept") from None
    if keep_last:
        prune(path.parent, keep_last, path)


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def load_sharded(path: Path, tensors: dict, no_dist: bool = False) -> None:
    """Fill `tensors` (a state dict of DTensors, or of whole tensors with no_dist) from the shards in `path`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException as DCPException  # a BaseException
    reader_class, planner = _reader_classes()
    reader = reader_class(path)
    try:
        with warnings.catch_warnings():  # no_dist: DCP warns that it loads in one process, which is the point
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(tensors, storage_reader=reader, planner=planner(), no_dist=no_dist)
    except (Exception, DCPException) as e:  # DCP wraps what a rank raised in its CheckpointException, as text
        # (torch >= 2.11 swallows a failed metadata read and fails later, so the reader keeps its refusal)
        if reader.refused or isinstance(e, pickle.UnpicklingError) or REFUSED in str(e):
            what = reader.refused or next((line.strip() for line in str(e).splitlines() if REFUSED in line),
                                          first_line(e))
            raise CheckpointError(f"checkpoint '{path}': refused, its metadata holds objects that safe loading does "
                                  f"not allow ({what})") from None
        raise CheckpointError(f"checkpoint '{path}': its shards do not fit this model ({first_line(e)})") from None


def _safe_globals() -> dict:
    """What DCP metadata may name: its own metadata classes, torch's sizes, dtypes and layouts, paths."""
    import pathlib
    from torch.distributed.checkpoint import filesystem, metadata
    allowed = {("torch", "Size"): torch.Size, ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
               ("pathlib", "PosixPath"): pathlib.PosixPath, ("pathlib", "PurePosixPath"): pathlib.PurePosixPath,
               ("collections", "OrderedDict"): collections.OrderedDict,
               ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): filesystem._StorageInfo}
    for name in dir(metadata):
        value = getattr(metadata, name)
        if isinstance(value, type):
            allowed[("torch.distributed.checkpoint.metadata", name)] = value
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[("torch", name)] = getattr(torch, name)
    return allowed


REFUSED = "not allowed in a checkpoint's metadata"


class _MetadataUnpickler(pickle.Unpickler):
    allowed: dict = {}

    def find_class(self, module, name):
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"{module}.{name}: {REFUSED}") from None


@functools.lru_cache(maxsize=None)
def _reader_classes():
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader

    _MetadataUnpickler.allowed = _safe_globals()

    class SafeReader(FileSystemReader):
        refused = None  # why the metadata was refused, if it was

        def read_metadata(self, *args, **kwargs):
            with open(Path(self.path) / ".metadata", "rb") as f:
                try:
                    metadata = _MetadataUnpickler(f).load()
                except pickle.UnpicklingError as e:
                    self.refused = str(e)
                    raise
            if getattr(metadata, "storage_meta", None) is not None:
                metadata.storage_meta.load_id = self.load_id
            return metadata

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):  # DCP's own reads these with weights_only=False
            loaded = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._traverse import set_element
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded
    return SafeReader, SafePlanner
