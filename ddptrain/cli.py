"""The `ddptrain` command (train, eval, export, launch, sweep, plot, submit, keys): parsed here, run by
commands.py, launch.py or submit.py. Plain user mistakes (config, task, data, checkpoint) print one line,
`ddptrain: error: ...`, on rank 0 and exit with status 2; a run stopped by non-finite gradients exits with 3.
Anything else is a bug or an environment failure and keeps its traceback.
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
        where = "" if self.prog == "ddptrain" else f"{self.prog}: "  # a sub-command's parser names it
        self.exit(2, f"ddptrain: error: {where}{message} (`{self.prog} --help` shows the usage)\n")


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="ddptrain", description="Data-parallel training of PyTorch models.",
               epilog="A mistake is one line, `ddptrain: error: ...` (exit 2); --debug anywhere on the command line "
                      "(or DDPTRAIN_DEBUG=1) adds its traceback.")
    sub = p.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_eval(sub)
    _add_export(sub)
    _add_launch(sub)
    _add_sweep(sub)
    _add_plot(sub)
    sub.add_parser("keys", help="print every config key with its default and description (Markdown)")
    # Parsed by ddptrain/submit.py (unknown --options go to sbatch); listed here for `ddptrain --help`.
    sub.add_parser("submit", add_help=False, help="write the SLURM batch script for a run and sbatch it (submit -h)")
    return p


def _add_train(sub) -> None:
    t = sub.add_parser("train", help="train in this process (or as one rank under torchrun/srun)")
    t.add_argument("config", help="config file (.yaml, .yml or .toml)")
    t.add_argument("overrides", nargs="*", default=[], help="section.key=value (or --section.key=value) overrides")
    t.add_argument("--print-config", action="store_true", help="print the resolved config with every default and exit")


def _add_eval(sub) -> None:
    ev = sub.add_parser("eval", help="evaluate a trained run without training (one process, or each rank under torchrun)")
    ev.add_argument("run", help="run directory (with its config.yaml) or the run's config file")
    ev.add_argument("overrides", nargs="*", default=[], help="section.key=value overrides (data.eval_batch_size, val.mode, ...)")
    ev.add_argument("--checkpoint", default="auto",
                    help="auto (default: the weights the run's own test used, tested_weights in summary.json; before the run "
                         "has ended best.pt if whole, else the newest checkpoint), best, last, or a checkpoint's path")
    ev.add_argument("--split", choices=["val", "test"], default="test", help="default test")
    ev.add_argument("-o", "--output", default=None, help="also write the result as JSON to this file")


def _add_export(sub) -> None:
    ex = sub.add_parser("export", help="write a run's trained weights as one plain state dict (from a sharded "
                                       "checkpoint too), for inference on one device")
    ex.add_argument("run", help="run directory (with its config.yaml) or the run's config file")
    ex.add_argument("--checkpoint", default="auto", help="auto (default), best, last, or a checkpoint's path")
    ex.add_argument("-o", "--output", default=None, help="the file to write (default: RUN_DIR/model.pt)")


def _add_launch(sub) -> None:
    la = sub.add_parser("launch", help="start torchrun with N processes on this node (`launch ... eval RUN` evaluates)")
    la.add_argument("--nproc-per-node", "--nproc_per_node", type=int, default=2, help="processes to start (default 2)")
    la.add_argument("--max-restarts", type=int, default=0, help="torchrun elastic restarts (default 0)")
    la.add_argument("config", help="config file")
    la.add_argument("overrides", nargs="*", default=[], help="section.key=value overrides")


def _add_sweep(sub) -> None:
    sw = sub.add_parser("sweep", help="hyperparameter search with Optuna; every trial is a full run",
                        description="Hyperparameter search with Optuna; every trial is a full run. Ctrl-C stops it "
                                    "(exit 130), SIGTERM, SIGUSR1 or SIGUSR2 preempt it (exit 75; under SLURM it "
                                    "requeues its job first); the same command continues the study, and interrupted "
                                    "trials continue from their checkpoints.")
    sw.add_argument("config", help="base config file")
    sw.add_argument("space", help="search-space file (.yaml or .toml)")
    sw.add_argument("overrides", nargs="*", default=[], help="section.key=value overrides of the base config")
    sw.add_argument("--sampler", choices=["grid", "random", "tpe", "gp"], default="tpe", help="default tpe")
    sw.add_argument("--trials", type=int, default=20, help="finished trials the study should reach (default 20); failed ones do not "
                    "count, but this command starts at most this many minus the finished ones")
    sw.add_argument("--workers", type=int, default=1, help="trials run at once by this process (default 1)")
    sw.add_argument("--nproc-per-node", type=int, default=1, help="processes per trial, via torchrun (default 1)")
    sw.add_argument("--storage", default=None, help="Optuna storage URL (default: SQLite in the sweep directory)")
    sw.add_argument("--study", default=None, help="study name (default: <config name>-sweep)")
    sw.add_argument("--seed", type=int, default=0, help="sampler seed (default 0; give each worker its own)")


def _add_plot(sub) -> None:
    pl = sub.add_parser("plot", help="draw loss, monitored metric and learning rate curves of runs into a PNG")
    pl.add_argument("run_dirs", nargs="+", help="run directories (several are overlaid)")
    pl.add_argument("-o", "--output", default="curves.png", help="image file to write: .png (default curves.png), .pdf, .svg, ...")
    pl.add_argument("--log", action="store_true", help="loss and learning rate on log axes")


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


def main(argv: list[str] | None = None) -> int:
    if (sys.argv[1:] if argv is None else argv)[:1] == ["submit"]:
        from .submit import main as submit
        return submit(_split_wandb_style((sys.argv[1:] if argv is None else argv)[1:]))
    args, launched, launch_argv = _parse(_split_wandb_style(sys.argv[1:] if argv is None else argv))
    from . import commands
    try:
        if args.command == "keys":
            return commands.keys()
        if args.command == "sweep":
            return commands.sweep(args)
        if args.command == "plot":
            return commands.plot(args)
        if args.command == "launch":
            from .launch import launch
            return launch(args, launched, launch_argv)
        if args.command == "eval":
            return commands.evaluate(args)
        if args.command == "export":
            return commands.export(args)
        return commands.train(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader of the output left (`ddptrain keys | head`): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the flush at exit would fail again
        return 141  # as a process that SIGPIPE ended
    except Exception as e:
        status = _said(e)
        if status is None:
            raise
        return status


def _parse(argv: list[str]) -> tuple[argparse.Namespace, str, list[str]]:
    """The command line -> (its arguments; for `launch`, the command it starts and that command's arguments).
    --debug anywhere sets DDPTRAIN_DEBUG=1; a usage error ends the process here (exit 2)."""
    if "--debug" in argv:  # also for the workers that `launch` starts
        argv = [a for a in argv if a != "--debug"]
        os.environ["DDPTRAIN_DEBUG"] = "1"
    launched, launch_argv = "train", []
    if argv[:1] == ["launch"]:
        from .launch import split_launch
        own, launched, launch_argv = split_launch(argv[1:])
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
    return args, launched, launch_argv


def parse_eval(argv: list[str]) -> argparse.Namespace:
    """`eval ARGS...` parsed as `ddptrain eval` parses them (for `ddptrain launch ... eval`)."""
    return _parse(["eval", *argv])[0]


def _said(e: Exception) -> int | None:
    """Says the command's error `e` as this rank should and returns the exit status; None for a bug or an
    environment failure on rank 0, which keeps its traceback (the caller re-raises it). Call inside the `except`."""
    from .checkpoint import CheckpointError
    from .config import ConfigError
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
        elif getattr(e, "rank_specific", False):  # and if rank 0 met it too, rank 0's line is the one said:
            time.sleep(QUIET_RANK_GRACE_S)  # torchrun stops this rank once rank 0 has exited
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
    return None
