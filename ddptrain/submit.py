"""`ddptrain submit`: write the SLURM batch script for one run (or, with --sweep, a job array of sweep
workers) from slurm/*.sbatch and sbatch it.

The script is the template with this run's `#SBATCH` options and command line filled in, so what
`--dry-run` prints is exactly what SLURM runs (`scontrol write batch_script JOBID` shows it again).
Options that ddptrain does not know (`--account=A`, `--qos=Q`, ...) go to sbatch as `#SBATCH` lines.
"""
from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from .config import ConfigError
from .sweep import SAMPLERS

TEMPLATES = {"torchrun": "ddptrain.sbatch", "srun": "ddptrain_srun.sbatch"}
SWEEP_TEMPLATE = "ddptrain_sweep.sbatch"
SWEEP_OPTIONS = ("sampler", "trials", "storage", "study")  # passed on to `ddptrain sweep`
SLURM_DIR = Path(__file__).resolve().parent / "sbatch"  # shipped in the wheel; slurm/ in the checkout links here
EXIT_USER_ERROR = 2
EXIT_REJECTED = 1


class SubmitError(Exception):
    """sbatch is missing (exit status 2) or refused the job (exit status 1)."""

    def __init__(self, message: str, exit_status: int):
        super().__init__(message)
        self.exit_status = exit_status


def _parser() -> argparse.ArgumentParser:
    from .cli import Parser
    p = Parser(
        prog="ddptrain submit", allow_abbrev=False,
        description="Write the SLURM batch script for this run and submit it with sbatch. Other --option=value "
                    "arguments (--account=A, --qos=Q, --cpus-per-task=C, ...) become #SBATCH lines.")
    p.add_argument("config", help="config file")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    per_node = p.add_mutually_exclusive_group(required=True)
    per_node.add_argument("--gpus-per-node", type=int, help="GPUs per node: one process per GPU")
    per_node.add_argument("--nproc-per-node", type=int, help="processes per node on CPU partitions (one CPU each)")
    p.add_argument("--launcher", choices=sorted(TEMPLATES), default="torchrun",
                   help="torchrun: one srun task per node running torchrun (default); srun: one srun task per process")
    p.add_argument("--partition", help="SLURM partition")
    p.add_argument("--time", help="time limit, e.g. 4:00:00 (SLURM signals the job 120-180 s before it)")
    p.add_argument("--template", type=Path, help="batch script to start from (default: slurm/ddptrain.sbatch or "
                                                 "slurm/ddptrain_srun.sbatch)")
    p.add_argument("--dry-run", action="store_true", help="print the batch script instead of submitting it")
    s = p.add_argument_group("hyperparameter search", "a job array of K sweep workers, one node each, on one study")
    s.add_argument("--sweep", type=Path, metavar="SPACE", help="search-space file: submit slurm/ddptrain_sweep.sbatch")
    s.add_argument("--tasks", type=int, help="sweep workers (array tasks, one node each; default 1)")
    s.add_argument("--sampler", choices=SAMPLERS, help="as for ddptrain sweep (default tpe)")
    s.add_argument("--trials", type=int, help="finished trials the study should reach (default 20)")
    s.add_argument("--storage", help="Optuna storage URL; with many nodes a database server (postgresql://...) "
                                     "rather than the default SQLite file runs/<study>/study.db")
    s.add_argument("--study", help="study name (default: <config name>-sweep)")
    return p


def split_extra(extra: list[str]) -> tuple[list[tuple[str, str | None]], list[str]]:
    """Separate sbatch options (`--name=value`, `--flag`) from config overrides (`section.key=value`)."""
    options, overrides = [], []
    for arg in extra:
        if arg.startswith("--") and len(arg) > 2:
            name, _, value = arg[2:].partition("=")
            options.append((name, value if "=" in arg else None))
        elif arg.startswith("-"):
            raise ConfigError(f"sbatch option '{arg}': give sbatch options in the long form, --option=value")
        elif "=" in arg:
            overrides.append(arg)
        else:
            raise ConfigError(f"'{arg}' is neither a config override (section.key=value) nor an option; "
                              f"give sbatch options as --option=value")
    if any(name == "array" for name, _ in options):
        raise ConfigError("ddptrain submit starts one run (or, with --sweep SPACE --tasks K, K sweep workers); for "
                          "several configs or seeds use a job array: sbatch --array=0-N slurm/ddptrain_array.sbatch "
                          "RUNS_FILE (see README, 'Running on SLURM')")
    return options, overrides


def template_options(text: str) -> list[tuple[str, str | None]]:
    """The template's `#SBATCH --name=value` lines, in order."""
    out = []
    for line in text.splitlines():
        m = re.match(r"#SBATCH\s+--([\w-]+)(?:[=\s]\s*(\S.*?))?\s*$", line)
        if m:
            out.append((m.group(1), m.group(2)))
    return out


def run_options(args, job_name: str) -> list[tuple[str, str | None]]:
    """The #SBATCH options that this run's command line asks for."""
    opts = [("job-name", job_name), ("nodes", str(args.nodes))]
    if args.launcher == "torchrun":  # one task per node; torchrun starts the processes
        opts.append(("ntasks-per-node", "1"))
        opts.append(("gpus-per-node", str(args.gpus_per_node)) if args.gpus_per_node
                    else ("cpus-per-task", str(args.nproc_per_node)))
    else:  # one task per process
        opts.append(("ntasks-per-node", str(args.gpus_per_node or args.nproc_per_node)))
        opts.append(("gpus-per-node", str(args.gpus_per_node)) if args.gpus_per_node else ("cpus-per-task", "1"))
    if args.partition:
        opts.append(("partition", args.partition))
    if args.time:
        opts.append(("time", args.time))
    return opts


def merge(*layers: list[tuple[str, str | None]]) -> list[tuple[str, str | None]]:
    """Later layers win; the first layer's order is kept and new names are appended."""
    merged: dict[str, str | None] = {}
    for layer in layers:
        for name, value in layer:
            merged[name] = value
    return list(merged.items())


def render(template: str, options: list[tuple[str, str | None]], command: list[str], env: dict[str, str],
           note: str) -> str:
    """The template with its #SBATCH block replaced by `options`, then `set -- command` and `env` exports."""
    lines = template.splitlines()
    # SLURM reads #SBATCH lines up to the first command: they go after the leading comments
    leading = next((i for i, line in enumerate(lines) if i and not line.startswith("#")), len(lines))
    last_sbatch = max([i for i, line in enumerate(lines) if line.startswith("#SBATCH")], default=leading - 1)
    head = [lines[0], f"# {note}"]
    sbatch = [f"#SBATCH --{name}" + (f"={value}" if value is not None else "") for name, value in options]
    this_run = ["", "# This run (written by ddptrain submit):", "set -- " + " ".join(map(shlex.quote, command))]
    this_run += [f"export {k}={v}" for k, v in env.items()]
    return "\n".join(head + sbatch + this_run + lines[last_sbatch + 1:]) + "\n"


def _option(options, name) -> str | None:
    return dict(options).get(name)


def sbatch(script: str, cwd: Path) -> str:
    """Submit `script` (on stdin) and return the job id."""
    exe = shutil.which("sbatch")
    if exe is None:
        raise SubmitError("sbatch not found on PATH: run this on a SLURM login node "
                          "(--dry-run prints the batch script without submitting it)", EXIT_USER_ERROR)
    proc = subprocess.run([exe, "--parsable"], input=script, capture_output=True, text=True, cwd=cwd, timeout=120)
    if proc.returncode != 0:
        message = "; ".join(line.strip().removeprefix("sbatch: error: ") for line in (proc.stderr or proc.stdout).splitlines()
                            if line.strip())
        raise SubmitError(f"sbatch rejected the job (exit status {proc.returncode}): {message or 'no message'}",
                          EXIT_REJECTED)
    return proc.stdout.strip().split(";")[0]


def _check_arguments(args) -> None:
    """Mistakes in the command line itself."""
    sweep_only = [f"--{name.replace('_', '-')}" for name in ("tasks", *SWEEP_OPTIONS)
                  if getattr(args, name) is not None]
    if args.sweep is None and sweep_only:
        raise ConfigError(f"{', '.join(sweep_only)}: only with --sweep SPACE")
    if args.sweep is not None and args.nodes != 1:
        raise ConfigError(f"--nodes {args.nodes}: a sweep runs one worker per node; give the number of workers "
                          f"with --tasks")
    if args.sweep is not None and args.launcher == "srun":
        raise ConfigError("--launcher srun: a sweep runs each trial with torchrun on its worker's node")
    for flag, value in (("--nodes", args.nodes), ("--gpus-per-node / --nproc-per-node", args.gpus_per_node or
                        args.nproc_per_node), ("--tasks", args.tasks), ("--trials", args.trials)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag}: expected a positive integer, got {value}")


def _check_run(args, overrides: list[str]) -> tuple[str, list[str], str]:
    """Check the run or sweep as far as the login node can (fail here, not after hours in the queue);
    return the job name, the batch script's arguments and where the results will be."""
    from . import configfile
    from .data import micro_batch_size
    from .task import resolve

    per_node = args.gpus_per_node or args.nproc_per_node
    config = str(Path(args.config).resolve())
    if args.sweep is None:
        cfg = configfile.load(args.config, overrides)
        micro_batch_size(cfg.data, args.nodes * per_node, cfg.train.grad_accum_steps)
        resolve(cfg.task)
        return cfg.name, [config, *overrides], f"run directory {cfg.run_dir}"
    from .sweep import prepare
    _, cfg, _ = prepare(Path(args.config), args.sweep, overrides, args.sampler or "tpe")
    micro_batch_size(cfg.data, per_node, cfg.train.grad_accum_steps)  # every trial runs on one node
    study = args.study or f"{cfg.name}-sweep"
    options = [arg for name in SWEEP_OPTIONS if getattr(args, name) is not None
               for arg in (f"--{name}", str(getattr(args, name)))]
    where = f"study {args.storage or Path(cfg.runs_dir) / study / 'study.db'}"
    return study, [config, str(args.sweep.resolve()), *options, *overrides], where


def _submit(argv: list[str]) -> int:
    args, extra = _parser().parse_known_args(argv)
    extra_options, overrides = split_extra(extra)
    _check_arguments(args)
    name, command, where = _check_run(args, overrides)

    path = args.template or SLURM_DIR / (TEMPLATES[args.launcher] if args.sweep is None else SWEEP_TEMPLATE)
    if not path.is_file():
        raise ConfigError(f"batch script template '{path}' not found")
    template = path.read_text()
    array = [("array", f"0-{(args.tasks or 1) - 1}")] if args.sweep is not None else []
    options = merge(template_options(template), run_options(args, name), array, extra_options)
    env = {"PYTHON": f"${{PYTHON:-{shlex.quote(sys.executable)}}}"}
    if args.launcher == "torchrun" and args.nproc_per_node:
        env["NPROC_PER_NODE"] = str(args.nproc_per_node)
    shown = path.relative_to(SLURM_DIR.parent.parent) if path.is_relative_to(SLURM_DIR.parent.parent) else path
    script = render(template, options, command, env,
                    note=f"Written by `ddptrain submit` from {shown}: ddptrain submit "
                         f"{shlex.join(a for a in argv if a != '--dry-run')}")
    if args.dry_run:
        print(script, end="")
        return 0

    cwd = Path(_option(options, "chdir") or ".")
    output = _option(options, "output")
    if output:  # SLURM does not create the log's folder: without it the job fails without a word
        (cwd / output).parent.mkdir(parents=True, exist_ok=True)
    job = sbatch(script, cwd)
    print(job, flush=True)
    log = (output or "slurm-%j.out").replace("%x", name).replace("%j", job).replace("%A", job).replace("%a", "<task>")
    per_node = f"{args.gpus_per_node or args.nproc_per_node} {'GPUs' if args.gpus_per_node else 'processes'}"
    size = f"{args.tasks or 1} sweep workers x 1 node x {per_node}" if args.sweep else f"{args.nodes} x {per_node}"
    print(f"ddptrain: submitted job {job} ({size}); log {cwd / log}; {where}", file=sys.stderr, flush=True)
    return 0


def main(argv: list[str]) -> int:
    """`ddptrain submit ...`: 0 when submitted (or printed), 2 for a mistake in the command, 1 when sbatch
    refuses the job."""
    try:
        return _submit(argv)
    except ConfigError as e:
        print(f"ddptrain: error: {e}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except SubmitError as e:
        print(f"ddptrain: error: {e}", file=sys.stderr, flush=True)
        return e.exit_status
