"""ddptrain: train any PyTorch model data-parallel, on one CPU or across many GPU nodes.

`import ddptrain` stays light: the training machinery loads on first use.
"""
__version__ = "0.1.0"

__all__ = ["train", "evaluate", "load_model", "Task", "Config", "load_config", "split", "shard"]
SUBMODULES = ("data", "losses", "stream")  # the modules a task's code may reach through ddptrain.<name>


def __getattr__(name):
    if name == "train":
        from .run import train
        return train
    if name in ("evaluate", "load_model"):
        from . import trained
        return getattr(trained, name)
    if name == "Task":
        from .task import Task
        return Task
    if name == "Config":
        from .config import Config
        return Config
    if name == "load_config":
        from .configfile import load
        return load
    if name == "shard":
        from .stream import shard
        return shard
    if name == "split":
        from .data import split
        return split
    if name in SUBMODULES:  # `ddptrain.losses.R2()` after a plain `import ddptrain`, as the README writes it
        import importlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'ddptrain' has no attribute {name!r}")
