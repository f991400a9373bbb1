"""Objects named in a config by import path: `package.module:Name`, `package.module.Name` or `path/file.py:Name`.

The current directory is importable (as under `python -m`), so a task or optimizer beside the config is found.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

from .config import ConfigError


WORKER_TRACEBACK = "\nOriginal Traceback (most recent call last):\n"  # how torch raises again what a DataLoader worker raised


def message(error: BaseException) -> str:
    """The first line of the error's message; for one raised in a DataLoader worker, the worker's own message (torch
    raises it again with the worker's traceback as text)."""
    text = str(error).strip()
    if WORKER_TRACEBACK in text:
        lines = text.split(WORKER_TRACEBACK, 1)[1].splitlines()
        last = max((i for i, line in enumerate(lines) if line.startswith("  File ")), default=-1)
        shown = next((line for line in lines[last + 1:] if line.strip() and not line.startswith(" ")), "")
        return shown.split(": ", 1)[1] if ": " in shown else ""
    return text.splitlines()[0] if text else ""


def _library(filename: str) -> bool:
    """Whether a frame's file is ddptrain's, the standard library's, torch's or an installed package's."""
    path = Path(filename)
    ours = (Path(__file__).resolve().parent, Path(os.__file__).resolve().parent)
    return filename.startswith("<frozen") or any(map(path.is_relative_to, ours)) or \
        bool({"torch", "site-packages", "dist-packages"} & set(path.parts))


def user_frame(error: BaseException, fallback: bool = True) -> str | None:
    """`file:line` of the innermost frame of the error's traceback in the user's code (not torch's, ddptrain's,
    the standard library's or an installed package's); the innermost frame if there is none (None, without
    `fallback`). For an error raised in a DataLoader worker, the worker's frames count; for one that
    torch.compile met while tracing, the traced frames (its `real_stack`)."""
    import re
    import traceback
    frames = traceback.extract_tb(error.__traceback__) + list(getattr(error, "real_stack", None) or [])
    if WORKER_TRACEBACK in str(error):
        worker = str(error).split(WORKER_TRACEBACK, 1)[1]
        frames = [traceback.FrameSummary(f, int(n), name, lookup_line=False)
                  for f, n, name in re.findall(r'^  File "(.+)", line (\d+), in (.+)$', worker, re.M)] or frames
    if isinstance(error, SyntaxError) and error.filename:
        return f"{os.path.relpath(error.filename)}:{error.lineno}"
    mine = [f for f in frames if not _library(f.filename)]
    if not mine and not fallback:
        return None
    where = (mine or frames)[-1] if frames else None
    if where is None:
        return "unknown location"
    shown = os.path.relpath(where.filename)
    return f"{where.filename if shown.startswith('..') else shown}:{where.lineno}"


def import_object(spec: str, key: str):
    """The object `spec` names; a ConfigError naming the config `key` when it cannot be imported."""
    if ":" in spec:
        target, name = spec.rsplit(":", 1)
    elif "." in spec:
        target, name = spec.rsplit(".", 1)
    else:
        raise ConfigError(f"config key '{key}': expected 'module:name' or 'module.name', got {spec!r}")
    try:
        if target.endswith(".py"):
            if not Path(target).is_file():
                where = "" if Path(target).is_absolute() else \
                    f" (a relative path is taken from the current directory, {os.getcwd()})"
                raise ConfigError(f"config key '{key}': file '{target}' not found{where}")
            home = str(Path(target).resolve().parent)  # its siblings import, as under `python file.py`
            if home not in sys.path:
                sys.path.insert(0, home)
            mod_spec = importlib.util.spec_from_file_location(Path(target).stem, target)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(target)
    except ConfigError:
        raise
    except ImportError as e:
        raise ConfigError(f"config key '{key}': cannot import '{target}': {e}") from None
    except Exception as e:  # the user's module itself raised while it was imported
        raise ConfigError(f"config key '{key}': importing '{target}' raised {type(e).__name__}: {e} "
                          f"({user_frame(e)})") from e
    obj = getattr(module, name, None)
    if obj is None:
        raise ConfigError(f"config key '{key}': '{target}' has no '{name}'")
    return obj
