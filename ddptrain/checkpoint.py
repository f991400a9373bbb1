"""Checkpoint files: written atomically by one writer, read back as untrusted input.

A write goes to a temporary file in the same directory, is fsynced, then renamed over the target,
so a reader sees the old file or the new one, never half of one. Loading uses
`torch.load(weights_only=True)`: a file that needs arbitrary pickled objects is refused.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file that is missing, truncated, corrupt, unsafe or does not fit the model."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(path: Path, state: dict) -> None:
    """Write `state` to `path` atomically. Call on one rank only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save({"format_version": FORMAT_VERSION, **state}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def load(path: Path) -> dict:
    """Read a checkpoint onto the CPU with weights_only=True; raise CheckpointError with the file's name."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}': not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint '{path}': refused, it needs objects that weights_only loading does "
                              f"not allow ({first})") from None
    except Exception as e:
        raise CheckpointError(f"checkpoint '{path}': unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or "format_version" not in state:
        raise CheckpointError(f"checkpoint '{path}': not a ddptrain checkpoint")
    return state


def load_model_state(module: torch.nn.Module, state: dict, path: Path) -> None:
    """Load weights, with an error naming the file when they do not fit the configured model."""
    try:
        module.load_state_dict(state["model"])
    except RuntimeError as e:
        detail = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"checkpoint '{path}': its weights do not fit the configured model ({detail})") from None
