"""What `ddptrain train`, `eval`, `export`, `sweep`, `plot` and `keys` do once cli.py has parsed their
arguments, and the file that -o names. An error is raised for cli.py to say (`launch` is launch.py's).
"""
from __future__ import annotations

import os
import sys

from .cli import _is_main
from .config import ConfigError


def train(args) -> int:
    """`ddptrain train CONFIG`: one run in this process (or as this rank); --print-config prints its config."""
    from . import configfile
    from .run import run
    from .dist import detect

    cfg = configfile.load(args.config, args.overrides)
    if args.print_config:
        print(configfile.dump_yaml(cfg), end="")
        return 0
    summary = run(cfg, detect(os.environ))
    if _is_main():
        test = summary.get("test") or {}
        shown = ", ".join(f"{k} {v:.4g}" for k, v in test.items())
        if summary.get("already_trained") or summary["samples_per_s"] is None:  # nothing left to train
            trained = f"already trained ({summary['steps']} steps; checkpoint.resume=none starts over)"
        else:
            trained = f"{summary['steps']} steps, {summary['samples_per_s']:.0f} samples/s"
        print(f"done: {trained}" + (f"; test {shown}" if shown else "") + f"; run directory {cfg.run_dir}", flush=True)
    return 0


def output_file(value: str, suffixes: dict | None = None):
    """-o's file as a Path, its directory made if missing; one that is a directory, or whose directory cannot be
    made, is a ConfigError (before any work, so no result is lost). `suffixes`: the formats known, by suffix."""
    from pathlib import Path
    out = Path(value)
    if out.is_dir() or value.endswith(("/", os.sep)):
        raise ConfigError(f"-o '{value}': is a directory; expected a file name")
    if suffixes is not None and out.suffix[1:].lower() not in suffixes:
        raise ConfigError(f"-o '{value}': expected a file name ending in one of "
                          f"{', '.join('.' + k for k in sorted(suffixes))}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"-o '{value}': cannot make its directory '{out.parent}' ({e.strerror or e})") from None
    return out


def _written(out, write) -> None:
    try:
        write()
    except OSError as e:
        raise ConfigError(f"-o '{out}': cannot write it ({e.strerror or e})") from None


def evaluate(args) -> int:
    """`ddptrain eval RUN`: the run's trained weights on a split, printed (and with -o written as JSON)."""
    from .runlog import write_json_atomic
    from . import trained
    out = output_file(args.output) if args.output else None
    result = trained.evaluate(args.run, args.checkpoint, args.split, args.overrides)
    if _is_main():
        shown = ", ".join(f"{k} {v:.4g}" for k, v in result.items() if isinstance(v, float))
        print(f"{result['split']} ({result['checkpoint']}, step {result['step']}): {shown}", flush=True)
        if out is not None:
            _written(out, lambda: write_json_atomic(out, result))  # NaN and Infinity as strings: valid JSON
    return 0


def export(args) -> int:
    """`ddptrain export RUN`: the run's trained weights as one plain state dict."""
    import torch
    from .checkpoint import os_error, write_atomic
    from .trained import checkpoint_path, load_model, run_config
    cfg = run_config(args.run)
    out = output_file(args.output) if args.output else cfg.run_dir / "model.pt"
    source = checkpoint_path(cfg, args.checkpoint)
    model = load_model(args.run, str(source))
    model = getattr(model, "_orig_mod", model)  # a task's torch.compile wrapper: the network's own keys, unprefixed

    def write():  # to a temporary file, renamed once whole: a failed write leaves an earlier export as it was
        try:
            write_atomic(out, lambda f: torch.save(model.state_dict(), f))
        except RuntimeError as e:  # a failed write: its OSError, which _written makes one line
            if os_error(e) is None:
                raise
            raise os_error(e) from None
    _written(out, write)
    print(f"wrote {out} ({sum(t.numel() for t in model.state_dict().values())} values, from {source})")
    return 0


def sweep(args) -> int:
    """`ddptrain sweep CONFIG SPACE`: an Optuna study; 130 after Ctrl-C, EXIT_PREEMPTED once preempted."""
    from pathlib import Path
    for name in ("trials", "workers", "nproc_per_node"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(args, name)}")
    try:
        from .sweep import run_sweep
        result = run_sweep(Path(args.config), Path(args.space), args.overrides, args.sampler, args.trials,
                           args.workers, args.nproc_per_node, args.storage, args.study, args.seed)
    except ModuleNotFoundError as e:
        raise ConfigError(f"ddptrain sweep needs '{e.name}': pip install 'ddptrain[sweep]'") from None
    stopped = result["stopped_by"]
    if stopped is None:
        return 0
    print(f"ddptrain: sweep stopped by {stopped}; run the same command again to continue the study (its "
          f"interrupted trials continue from their checkpoints)", file=sys.stderr, flush=True)
    if stopped == "SIGINT":
        return 130
    # Preempted (SLURM's time limit or a preemption): under SLURM the worker's job comes back by itself.
    if result["requeue"]:
        from .slurm import requeue_and_log
        requeue_and_log()
    from .preempt import EXIT_PREEMPTED
    return EXIT_PREEMPTED


def plot(args) -> int:
    """`ddptrain plot RUN_DIR...`: the runs' curves drawn into one image."""
    from pathlib import Path
    try:
        from matplotlib.backend_bases import FigureCanvasBase
        from . import plot as curves
    except ModuleNotFoundError as e:
        raise ConfigError(f"ddptrain plot needs '{e.name}': pip install 'ddptrain[plot]'") from None
    out = output_file(args.output, FigureCanvasBase.get_supported_filetypes())
    _written(out, lambda: curves.plot([Path(d) for d in args.run_dirs], out, args.log))
    print(f"wrote {out}")
    return 0


def keys() -> int:
    """`ddptrain keys`: every config key with its default and description, as a Markdown table."""
    from .config import describe
    print("| key | default | description |\n|---|---|---|")
    for key, default, help in describe():
        print(f"| `{key}` | `{default}` | {help} |")
    return 0
