"""The `ddptrain` command: train, eval, export, launch, sweep, plot, submit, keys.

Plain user mistakes (config, task, data, checkpoint) print one line, `ddptrain: error: ...`, on rank 0
and exit with status 2; a run stopped by non-finite gradients exits with 3. Anything else is a bug
or an environment failure and keeps its traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

EXIT_USER_ERROR = 2
EXIT_NONFINITE = 3
EXIT_COLLECTIVE = 4
QUIET_RANK_GRACE_S = 10.0  # how long a rank other than 0 waits before it exits on an error that rank 0 may say


class Parser(argparse.ArgumentParser):
    """argparse, whose usage errors are one line, `ddptrain: error: ...` (exit 2), as every other mistake is."""

    def error(self, message: str):
        self.exit(2, f"ddptrain: error: {self.prog}: {message} (`{self.prog} --help` shows the usage)\n")


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="ddptrain", description="Data-parallel training of PyTorch models.",
               epilog="A mistake is one line, `ddptrain: error: ...` (exit 2); --debug anywhere on the command line "
                      "(or DDPTRAIN_DEBUG=1) adds its traceback.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train in this process (or as one rank under torchrun/srun)")
    t.add_argument("config", help="config file (.yaml, .yml or .toml)")
    t.add_argument("overrides", nargs="*", help="section.key=value (or --section.key=value) overrides")
    t.add_argument("--print-config", action="store_true", help="print the resolved config with every default and exit")

    ev = sub.add_parser("eval", help="evaluate a trained run without training (one process, or each rank under torchrun)")
    ev.add_argument("run", help="run directory (with its config.yaml) or the run's config file")
    ev.add_argument("overrides", nargs="*", help="section.key=value overrides (data.eval_batch_size, val.mode, ...)")
    ev.add_argument("--checkpoint", default="auto",
                    help="auto (default: the weights the run's own test used, tested_weights in summary.json; before the run "
                         "has ended best.pt if whole, else the newest checkpoint), best, last, or a checkpoint's path")
    ev.add_argument("--split", choices=["val", "test"], default="test", help="default test")
    ev.add_argument("-o", "--output", default=None, help="also write the result as JSON to this file")

    ex = sub.add_parser("export", help="write a run's trained weights as one plain state dict (from a sharded "
                                       "checkpoint too), for inference on one device")
    ex.add_argument("run", help="run directory (with its config.yaml) or the run's config file")
    ex.add_argument("--checkpoint", default="auto", help="auto (default), best, last, or a checkpoint's path")
    ex.add_argument("-o", "--output", default=None, help="the file to write (default: RUN_DIR/model.pt)")

    la = sub.add_parser("launch", help="start torchrun with N processes on this node (`launch ... eval RUN` evaluates)")
    la.add_argument("--nproc-per-node", "--nproc_per_node", type=int, default=2, help="processes to start (default 2)")
    la.add_argument("--max-restarts", type=int, default=0, help="torchrun elastic restarts (default 0)")
    la.add_argument("config", help="config file")
    la.add_argument("overrides", nargs="*", help="section.key=value overrides")

    sw = sub.add_parser("sweep", help="hyperparameter search with Optuna; every trial is a full run",
                        description="Hyperparameter search with Optuna; every trial is a full run. Ctrl-C stops it "
                                    "(exit 130), SIGTERM, SIGUSR1 or SIGUSR2 preempt it (exit 75; under SLURM it "
                                    "requeues its job first); the same command continues the study, and interrupted "
                                    "trials continue from their checkpoints.")
    sw.add_argument("config", help="base config file")
    sw.add_argument("space", help="search-space file (.yaml or .toml)")
    sw.add_argument("overrides", nargs="*", help="section.key=value overrides of the base config")
    sw.add_argument("--sampler", choices=["grid", "random", "tpe", "gp"], default="tpe", help="default tpe")
    sw.add_argument("--trials", type=int, default=20, help="finished trials the study should reach (default 20); failed ones do not "
                    "count, but this command starts at most this many minus the finished ones")
    sw.add_argument("--workers", type=int, default=1, help="trials run at once by this process (default 1)")
    sw.add_argument("--nproc-per-node", type=int, default=1, help="processes per trial, via torchrun (default 1)")
    sw.add_argument("--storage", default=None, help="Optuna storage URL (default: SQLite in the sweep directory)")
    sw.add_argument("--study", default=None, help="study name (default: <config name>-sweep)")
    sw.add_argument("--seed", type=int, default=0, help="sampler seed (default 0; give each worker its own)")

    pl = sub.add_parser("plot", help="draw loss, monitored metric and learning rate curves of runs into a PNG")
    pl.add_argument("run_dirs", nargs="+", help="run directories (several are overlaid)")
    pl.add_argument("-o", "--output", default="curves.png", help="image file to write: .png (default curves.png), .pdf, .svg, ...")
    pl.add_argument("--log", action="store_true", help="loss and learning rate on log axes")

    sub.add_parser("keys", help="print every config key with its default and description (Markdown)")
    # Parsed by ddptrain/submit.py (unknown --options go to sbatch); listed here for `ddptrain --help`.
    sub.add_parser("submit", add_help=False, help="write the SLURM batch script for a run and sbatch it (submit -h)")
    return p


def _split_wandb_style(argv: list[str]) -> list[str]:
    """`wandb agent` passes `--optim.lr=0.01`; argparse would take that for an option, so treat it as an override."""
    out = []
    for arg in argv:
        if arg.startswith("--") and "=" in arg and "." in arg.split("=", 1)[0]:
            out.append(arg[2:])
        else:
            out.append(arg)
    return out


def _is_main() -> bool:
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


def _train(args) -> int:
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


# torchrun forwards only TERM, INT, HUP and QUIT to its workers unless told otherwise (pytorch#154849).
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2"


def torchrun_env() -> dict:
    """The environment for a torchrun agent. A fresh rendezvous store per attempt makes elastic restarts
    reliable: the shared one keeps the dead attempt's peer addresses (pytorch#135712)."""
    return {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def output_file(value: str, suffixes: dict | None = None):
    """-o's file as a Path, its directory made if missing; one that is a directory, or whose directory cannot be
    made, is a ConfigError (before any work, so no result is lost). `suffixes`: the formats known, by suffix."""
    from pathlib import Path
    from .config import ConfigError
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
    from .config import ConfigError
    try:
        write()
    except OSError as e:
        raise ConfigError(f"-o '{out}': cannot write it ({e.strerror or e})") from None


def _eval(args) -> int:
    from .runlog import write_json_atomic
    from .trained import evaluate
    out = output_file(args.output) if args.output else None
    result = evaluate(args.run, args.checkpoint, args.split, args.overrides)
    if _is_main():
        shown = ", ".join(f"{k} {v:.4g}" for k, v in result.items() if isinstance(v, float))
        print(f"{result['split']} ({result['checkpoint']}, step {result['step']}): {shown}", flush=True)
        if out is not None:
            _written(out, lambda: write_json_atomic(out, result))  # NaN and Infinity as strings: valid JSON
    return 0


def _export(args) -> int:
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


def _launch(args, command: str = "train", argv: list[str] = ()) -> int:
    """torchrun with N workers running `ddptrain <command> <argv>`, once the arguments are checked here."""
    import signal
    import subprocess
    from . import config as config_mod
    from . import configfile
    from .data import micro_batch_size
    from .preempt import EXIT_PREEMPTED
    from .task import resolve

    if args.nproc_per_node < 1:
        raise config_mod.ConfigError(f"--nproc-per-node: expected a positive integer, got {args.nproc_per_node}")
    if args.max_restarts < 0:
        raise config_mod.ConfigError(f"--max-restarts: expected 0 or more, got {args.max_restarts}")
    if command == "eval":  # fail here, not once per rank
        from .trained import run_config
        parsed = _parser().parse_args(["eval", *argv])
        cfg = run_config(parsed.run, parsed.overrides)
    else:
        argv = [args.config, *args.overrides]
        cfg = configfile.load(args.config, args.overrides)
        micro_batch_size(cfg.data, args.nproc_per_node, cfg.train.grad_accum_steps)
        from .preflight import check_strategy, check_sync_batchnorm
        check_sync_batchnorm(cfg, args.nproc_per_node)
        check_strategy(cfg, args.nproc_per_node)
    resolve(cfg.task)
    # ddptrain.agent is torchrun's own agent, passing the workers' exit status through (see agent.py)
    cmd = [sys.executable, "-m", "ddptrain.agent", "--standalone", f"--nproc-per-node={args.nproc_per_node}",
           f"--max-restarts={args.max_restarts}", f"--signals-to-handle={TORCHRUN_SIGNALS}",
           "-m", "ddptrain", command, *argv]
    sys.stdout.flush()
    started = time.time()
    env = torchrun_env()
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


def _split_launch(argv: list[str]) -> tuple[list[str], str, list[str]]:
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


def _sweep(args) -> int:
    from pathlib import Path
    from .config import ConfigError
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


def _keys() -> int:
    from .config import describe
    print("| key | default | description |\n|---|---|---|")
    for key, default, help in describe():
        print(f"| `{key}` | `{default}` | {help} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    if (sys.argv[1:] if argv is None else argv)[:1] == ["submit"]:
        from .submit import main as submit
        return submit(_split_wandb_style((sys.argv[1:] if argv is None else argv)[1:]))
    argv = _split_wandb_style(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv:  # also for the workers that `launch` starts
        argv = [a for a in argv if a != "--debug"]
        os.environ["DDPTRAIN_DEBUG"] = "1"
    launched, launch_argv = "train", []
    if argv[:1] == ["launch"]:
        own, launched, launch_argv = _split_launch(argv[1:])
        if launched == "eval":
            argv = ["launch", *own, "eval"]  # parsed for launch's options; the rest is eval's
        elif launch_argv:
            argv = ["launch", *own, *launch_argv]  # `launch ... train CONFIG`: the word is optional
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops filling `overrides` at the first option: `sweep CONFIG SPACE --trials 4 seed=1` leaves
    # seed=1 over. Such leftovers are overrides too; anything else is a mistake.
    if extra and (not hasattr(args, "overrides") or any(a.startswith("-") or "=" not in a for a in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides += extra
    from .config import ConfigError
    try:
        if args.command == "keys":
            return _keys()
        if args.command == "sweep":
            return _sweep(args)
        if args.command == "plot":
            from pathlib import Path
            try:
                from matplotlib.backend_bases import FigureCanvasBase
                from .plot import plot
            except ModuleNotFoundError as e:
                raise ConfigError(f"ddptrain plot needs '{e.name}': pip install 'ddptrain[plot]'") from None
            out = output_file(args.output, FigureCanvasBase.get_supported_filetypes())
            _written(out, lambda: plot([Path(d) for d in args.run_dirs], out, args.log))
            print(f"wrote {out}")
            return 0
        if args.command == "launch":
            return _launch(args, launched, launch_argv)
        if args.command == "eval":
            return _eval(args)
        if args.command == "export":
            return _export(args)
        return _train(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader of the output left (`ddptrain keys | head`): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the flush at exit would fail again
        return 141  # as a process that SIGPIPE ended
    except Exception as e:
        from .checkpoint import CheckpointError
        from .task import TaskError
        from .preempt import EXIT_PREEMPTED, Preempted
        from .dist import CollectiveError
        from .nonfinite import NonFiniteError
        if isinstance(e, Preempted):
            if _is_main():
                print(f"ddptrain: preempted by {e}; run the same command again to resume", file=sys.stderr, flush=True)
            return EXIT_PREEMPTED
        if isinstance(e, CollectiveError):  # every rank that saw it says so: which one failed first matters
            if not _is_main():  # most often another rank's own error ended it, which that rank says: torchrun stops
                time.sleep(QUIET_RANK_GRACE_S)  # this one once it has exited; one still running says its own
            print(f"ddptrain: error: {e}", file=sys.stderr, flush=True)
            return EXIT_COLLECTIVE
        if isinstance(e, (ConfigError, TaskError, CheckpointError, NonFiniteError)):
            if os.environ.get("DDPTRAIN_DEBUG") == "1":
                import traceback
                traceback.print_exc()
            # Every rank meets these the same way (the config, the task, decisions taken together), so rank 0
            # says it once; an error only some ranks meet says which rank it is.
            if _is_main():
                print(f"ddptrain: error: {e}", file=sys.stderr, flush=True)
            elif getattr(e, "rank_specific", False):
                print(f"[rank {os.environ.get('RANK', os.environ.get('SLURM_PROCID'))}] ddptrain: error: {e}", file=sys.stderr, flush=True)
            else:  # rank 0 says it: torchrun stops every worker once one has exited, so do not end before rank 0 can
                time.sleep(QUIET_RANK_GRACE_S)
            return EXIT_NONFINITE if isinstance(e, NonFiniteError) else EXIT_USER_ERROR
        if not _is_main():
            import traceback
            rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID"))
            for line in traceback.format_exc().splitlines():
                print(f"[rank {rank}] {line}", file=sys.stderr)
            return 1
        raise
