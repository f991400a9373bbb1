"""`ddptrain launch`: torchrun (ddptrain's agent, agent.py) with N workers on this node running
`ddptrain train` (or `eval`), once the arguments, the config and the task are checked here.
"""
from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Config


def launch(args, command: str = "train", argv: list[str] = ()) -> int:
    """torchrun with N workers running `ddptrain <command> <argv>`, once the arguments are checked here."""
    import signal
    import subprocess
    from .preempt import EXIT_PREEMPTED

    argv, cfg = _checked(args, command, argv)
    # ddptrain.agent is torchrun's own agent, passing the workers' exit status through (see agent.py)
    cmd = [sys.executable, "-m", "ddptrain.agent", "--standalone", f"--nproc-per-node={args.nproc_per_node}",
           f"--max-restarts={args.max_restarts}", "-m", "ddptrain", command, *argv]
    sys.stdout.flush()
    started = time.time()
    env = dict(os.environ)
    if args.nproc_per_node > 1:  # torchrun's own default, set here so that it does not print a 4-line warning
        env.setdefault("OMP_NUM_THREADS", "1")
    agent = subprocess.Popen(cmd, env=env)

    def forward(signum, frame):
        agent.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, forward)
    rc = agent.wait()
    # torchrun exits 1 after forwarding a signal, whatever its workers did; the summary says what they did.
    if rc != 0 and command == "train" and _status(cfg.run_dir, since=started) == "preempted":
        return EXIT_PREEMPTED
    return rc


def _checked(args, command: str, argv: list[str]) -> tuple[list[str], Config]:
    """(the workers' arguments, the run's config), once launch's options, the config and the task are checked."""
    from . import config as config_mod
    from . import configfile
    from .data import micro_batch_size
    from .task import resolve

    if args.nproc_per_node < 1:
        raise config_mod.ConfigError(f"--nproc-per-node: expected a positive integer, got {args.nproc_per_node}")
    if args.max_restarts < 0:
        raise config_mod.ConfigError(f"--max-restarts: expected 0 or more, got {args.max_restarts}")
    if command == "eval":  # fail here, not once per rank
        from .cli import parse_eval
        from .trained import run_config
        parsed = parse_eval(argv)
        cfg = run_config(parsed.run, parsed.overrides)
    else:
        argv = [args.config, *args.overrides]
        cfg = configfile.load(args.config, args.overrides)
        micro_batch_size(cfg.data, args.nproc_per_node, cfg.train.grad_accum_steps)
        from .preflight import check_strategy, check_sync_batchnorm
        check_sync_batchnorm(cfg, args.nproc_per_node)
        check_strategy(cfg, args.nproc_per_node)
    resolve(cfg.task)
    return argv, cfg


def split_launch(argv: list[str]) -> tuple[list[str], str, list[str]]:
    """`launch [options] [train|eval] ARGS...` -> (launch's own arguments, the command, the command's arguments)."""
    for i, arg in enumerate(argv):
        if arg in ("train", "eval") and (i == 0 or not argv[i - 1].startswith("--") or "=" in argv[i - 1]):
            return argv[:i], arg, argv[i + 1:]
        if not arg.startswith("-") and (i == 0 or not argv[i - 1].startswith("--") or "=" in argv[i - 1]):
            break  # the config: a training launch
    return argv, "train", []


def _status(run_dir, since: float) -> str | None:
    """The status in the run's summary.json, if this launch wrote it."""
    import json
    path = run_dir / "summary.json"
    try:
        return json.loads(path.read_text()).get("status") if path.stat().st_mtime >= since else None
    except (OSError, ValueError):
        return None
