"""`ddptrain submit`: write the SLURM batch script for one run from slurm/*.sbatch and sbatch it.

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

TEMPLATES = {"torchrun": "ddptrain.sbatch", "srun": "ddptrain_srun.sbatch"}
SLURM_DIR = Path(__file__).resolve().parent.parent / "slurm"
EXIT_USER_ERROR = 2
EXIT_REJECTED = 1


class SubmitError(Exception):
    """sbatch is missing (exit status 2) or refused the job (exit status 1)."""

    def __init__(self, message: str, exit_status: int):
        super().__init__(message)
        self.exit_status = exit_status


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
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
        raise ConfigError("ddptrain submit starts one run; for several configs or seeds use a job array: "
                          "sbatch --array=0-N slurm/ddptrain_array.sbatch RUNS_FILE (see README, 'Running on SLURM')")
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


def _submit(argv: list[str]) -> int:
    from . import config as config_mod
    from .data import micro_batch_size
    from .task import resolve

    args, extra = _parser().parse_known_args(argv)
    extra_options, overrides = split_extra(extra)
    per_node = args.gpus_per_node or args.nproc_per_node
    for flag, value in (("--nodes", args.nodes), ("--gpus-per-node / --nproc-per-node", per_node)):
        if value < 1:
            raise ConfigError(f"{flag}: expected a positive integer, got {value}")
    cfg = config_mod.load(args.config, overrides)  # fail here, not after hours in the queue
    micro_batch_size(cfg.data, args.nodes * per_node, cfg.train.grad_accum_steps)
    resolve(cfg.task)

    path = args.template or SLURM_DIR / TEMPLATES[args.launcher]
    if not path.is_file():
        raise ConfigError(f"batch script template '{path}' not found (ddptrain submit uses the slurm/ folder "
                          f"of a source checkout; give one with --template)")
    template = path.read_text()
    options = merge(template_options(template), run_options(args, cfg.name), extra_options)
    env = {"PYTHON": f"${{PYTHON:-{shlex.quote(sys.executable)}}}"}
    if args.launcher == "torchrun" and args.nproc_per_node:
        env["NPROC_PER_NODE"] = str(args.nproc_per_node)
    command = [str(Path(args.config).resolve()), *overrides]
    shown = path.relative_to(SLURM_DIR.parent) if path.is_relative_to(SLURM_DIR.parent) else path
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
    log = (output or "slurm-%j.out").replace("%x", cfg.name).replace("%j", job)
    print(f"ddptrain: submitted job {job} ({args.nodes} x {per_node} {'GPUs' if args.gpus_per_node else 'processes'}); "
          f"log {cwd / log}; run directory {cfg.run_dir}",
          file=sys.stderr, flush=True)
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
