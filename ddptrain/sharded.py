"""FSDP's checkpoints (`dist.strategy: fsdp`): directories of shards, through Distributed Checkpoint (DCP).

In `step-000000120/` every rank writes its shards of the model and optimizer, rank 0 `state.pt` (the rest);
written as `.step-000000120.tmp/`, it is renamed once every rank's shards are written, and only then marked
(`step-000000120.done` lists every file's size). DCP's metadata and non-tensor values are read with
restricted unpicklers: no pickled code runs.
"""
from __future__ import annotations

import collections
import functools
import json
import os
import pickle
import warnings
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import (FORMAT_VERSION, STATE, CheckpointError, _fsync_dir, _remove, _sha256, first_line, marker,
                         prune, write_atomic)


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
