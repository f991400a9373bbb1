"""What rank 0 tells the world: the run directory's files, the console, and (later) trackers.

Every rank holds a logger, but only rank 0's does anything: other ranks get NullLogger, so the
training loop calls `log.record(...)` without asking who it is. A logger never communicates.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Protocol


class _Format(logging.Formatter):
    """`ddptrain: warning: ...` (from ranks other than 0: `[rank N] ddptrain: warning: ...`), as before logging."""

    def format(self, record):
        prefix = f"[rank {_rank}] " if _rank else ""
        level = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
        return f"{prefix}ddptrain: {level}{record.getMessage()}"


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (a notebook or a test may replace it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


_rank = 0
diagnostics = logging.getLogger("ddptrain")
if not diagnostics.handlers:  # users silence or redirect them with the logging module
    _handler = _Stderr()
    _handler.setFormatter(_Format())
    diagnostics.addHandler(_handler)
    diagnostics.propagate = False
    diagnostics.setLevel(logging.INFO)


def warn(message: str) -> None:
    """A diagnostic: `ddptrain: warning: ...` on stderr by default, through the `ddptrain` logger."""
    diagnostics.warning(message)


def note(message: str) -> None:
    """What the run did that its user should know of (not a problem): `ddptrain: ...` on stderr by default."""
    diagnostics.info(message)


def warn_once(message: str) -> None:
    """A diagnostic that every rank meets alike (of the task or the config): said by rank 0 alone."""
    if not _rank and os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
        warn(message)


class Logger(Protocol):
    def record(self, event: dict) -> None: ...     # one metrics event (split, step, epoch, values)
    def progress(self, step: int, total: int) -> None: ...
    def summary(self, summary: dict) -> None: ...
    def close(self, failed: bool = False) -> None: ...


class NullLogger:
    records = 0
    tracking: dict = {}

    def record(self, event): pass
    def progress(self, step, total): pass
    def summary(self, summary): pass
    def close(self, failed=False): pass


def write_json_atomic(path: Path, obj) -> None:
    """Valid JSON (NaN and Infinity written as strings), replacing `path` at once."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_clean(obj), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _clean(value):
    """JSON has no NaN or Infinity: write them as strings (in nested values too) so every line stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


_NONFINITE = ("nan", "inf", "-inf")  # what _clean writes


def _restore(value):
    """_clean's inverse: the strings it wrote for NaN and Infinity as floats again."""
    if value in _NONFINITE:
        return float(value)
    if isinstance(value, dict):
        return {k: _restore(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_restore(v) for v in value]
    return value


def read_event(line: str) -> dict:
    """One line of metrics.jsonl as written, NaN and Infinity as floats."""
    return _restore(json.loads(line))


def _key(line: str) -> tuple | None:
    """(split, step) of one line of metrics.jsonl; None for a line cut short."""
    try:
        event = json.loads(line)
        return event["split"], event["step"]
    except (ValueError, KeyError, TypeError):
        return None


class RunDirLogger:
    """metrics.jsonl (one JSON object per event, flushed at once) and summary.json in the run directory.

    `keep_records=n` continues a resumed run: the first n lines stay, later ones (written after the
    checkpoint by the attempt that died) go, so no step appears twice or is missing.
    """

    def __init__(self, run_dir: Path, keep_records: int | None = None):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir = run_dir
        path = run_dir / "metrics.jsonl"
        self.records, self.replayed = 0, []
        if keep_records is not None and path.exists():
            with open(path) as f:
                lines = f.readlines()
            kept = lines[:keep_records]
            # (split, step) of the events the dead attempt wrote after the checkpoint, which the resumed run may write again
            self.replayed = [_key(line) for line in lines[len(kept):]]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, path)
            self.records = len(kept)
        self._metrics = open(path, "a" if keep_records is not None else "w", buffering=1)

    def record(self, event):
        self._metrics.write(json.dumps({k: _clean(v) for k, v in event.items()}) + "\n")
        self.records += 1

    def progress(self, step, total):
        pass

    def summary(self, summary):
        write_json_atomic(self.run_dir / "summary.json", summary)

    def close(self, failed=False):
        self._metrics.close()


def _fmt(event: dict) -> str:
    skip = {"split", "step", "epoch", "time"}
    parts = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in event.items()
             if k not in skip and not isinstance(v, dict)]  # per-layer values (grad_norms) are for plots
    return f"{event['split']:<5} epoch {event['epoch']} step {event['step']}: " + ", ".join(parts)


class ConsoleLogger:
    """A tqdm bar when stderr is a terminal; otherwise plain lines, one per event, for cluster logs."""

    def __init__(self, total_steps: int, start_step: int = 0):
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self._last = start_step

    def record(self, event):
        if self.bar is not None and event["split"] == "train":
            self.bar.set_postfix(loss=f"{event['loss']:.4g}", refresh=False)
        elif self.bar is not None:
            self.bar.write(_fmt(event))
        else:
            print(_fmt(event), flush=True)

    def progress(self, step, total):
        if self.bar is not None:
            self.bar.update(step - self._last)
        self._last = step

    def summary(self, summary):
        pass

    def close(self, failed=False):
        if self.bar is not None:
            self.bar.close()


class Loggers:
    """Fan one call out to several loggers."""

    def __init__(self, *loggers):
        self.loggers = loggers

    @property
    def records(self) -> int:
        return self.loggers[0].records

    @property
    def tracking(self) -> dict:
        """Ids of external tracking runs (wandb), saved in checkpoints so that a restart continues them."""
        out = {}
        for lg in self.loggers:
            out.update(getattr(lg, "tracking", {}))
        return out

    def record(self, event):
        for lg in self.loggers:
            lg.record(event)

    def progress(self, step, total):
        for lg in self.loggers:
            lg.progress(step, total)

    def summary(self, summary):
        for lg in self.loggers:
            lg.summary(summary)

    def close(self, failed: bool = False):
        for lg in self.loggers:
            lg.close(failed)


def run_loggers(cfg, tracking: dict | None, records: int, total_steps: int | None, start_step: int) -> Loggers:
    """Rank 0's loggers: the run directory, the console and, if enabled, wandb (continuing the resumed run's).
    `tracking` is the resumed checkpoint's (None when starting over: an earlier run's files are archived)."""
    from . import configfile
    if tracking is None:
        archive(cfg.run_dir)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    (cfg.run_dir / "config.yaml").write_text(configfile.dump_yaml(cfg))
    run_dir = RunDirLogger(cfg.run_dir, records if tracking is not None else None)
    loggers = [run_dir, ConsoleLogger(total_steps, start_step)]
    if cfg.wandb.enabled:
        from .tracking import WandbLogger
        loggers.append(WandbLogger(cfg, (tracking or {}).get("wandb_run_id"), replayed=run_dir.replayed))
    return Loggers(*loggers)

def archive(run_dir: Path) -> Path | None:
    """Move an earlier run's files into run_dir/archive/<time>/ before starting over: nothing is lost."""
    old = [p for p in run_dir.iterdir() if p.name not in ("archive", ".lock")] if run_dir.is_dir() else []
    if not old:
        return None
    dest = run_dir / "archive" / time.strftime("%Y%m%d-%H%M%S")
    dest.mkdir(parents=True, exist_ok=True)
    for p in old:
        os.replace(p, dest / p.name)
    return dest


def prefix_warnings(rank: int) -> None:
    """Ranks other than 0 stay quiet unless they have something to say, and then say who they are."""
    global _rank
    _rank = rank
    import warnings
    show = warnings.showwarning

    def prefixed(message, category, filename, lineno, file=None, line=None):
        show(f"[rank {rank}] {message}", category, filename, lineno, file, line)

    warnings.showwarning = prefixed


class Clock:
    """Wall time since the run started, for the `time` field of every event."""

    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return round(time.perf_counter() - self.start, 4)
