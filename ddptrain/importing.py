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
                raise ConfigError(f"config key '{key}': file '{target}' not found")
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
    obj = getattr(module, name, None)
    if obj is None:
        raise ConfigError(f"config key '{key}': '{target}' has no '{name}'")
    return obj
