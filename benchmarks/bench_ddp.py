"""Throughput benchmark: ddptrain against a minimal DDP loop, HF Accelerate and Lightning Fabric.

One workload (an MLP on synthetic data, 2 ranks, gloo, CPU, SGD with momentum, fp32) is trained by every
runner, each launched the same way: `torchrun --standalone --nproc_per_node=2 ddp_worker.py`, with
OMP_NUM_THREADS=1. Runners are interleaved round by round in a random order; each runner's samples/s is
divided by that of the minimal loop of the same round, and the median of these ratios is reported with
their spread. A second minimal loop per round (A/A) shows the noise floor. Also measured: import times
(fresh subprocesses) and time to first step (launch to the end of the first optimizer step).

The machine is shared, so before each launch the harness waits (a bounded time) for the other processes
to go quiet, each launch reports how much CPU other processes took during its timed window, and a launch
where they took more than --max-foreign is run again (up to --retries times; the least disturbed
attempt counts). ddptrain is copied once at the start and that copy is benchmarked throughout, so edits
made to the working tree during a run cannot mix versions.

Run from the repository root with the benchmark venv:  .venv-bench/bin/python benchmarks/bench_ddp.py
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKER = HERE / "ddp_worker.py"
# minimal_aa: the A/A control; ddptrain_dict: ddptrain on {"input": x, "labels": y} items instead of (x, y);
# ddptrain_observed: ddptrain logging at its default interval (train.log_every 10) with per-layer gradient
# norms and MFU on (the other ddptrain runners never log)
RUNNERS = ["minimal", "minimal_aa", "ddptrain", "ddptrain_dict", "ddptrain_observed", "accelerate", "fabric"]
BASELINE = "minimal"
MODELS = {"tiny": "256->64->64->10", "big": "256->1024->1024->10"}

IMPORTS = {
    "torch": "import torch",
    "ddptrain": "import torch; import ddptrain",
    "ddptrain.trainer": "import torch; import ddptrain.trainer",
    "accelerate": "import torch; import accelerate",
    "lightning": "import torch; import lightning",
}
# Modules `import ddptrain` must not load (house style); a finder records even failed attempts.
FORBIDDEN = ("wandb", "optuna", "matplotlib", "sklearn")

IMPORT_PROBE = r"""
import json, sys, time
FORBIDDEN = {forbidden!r}
attempted = set()
class Spy:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in FORBIDDEN:
            attempted.add(name)
        return None
sys.meta_path.insert(0, Spy())
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
after_torch = {{m.split(".")[0] for m in sys.modules}}
{rest}
t2 = time.perf_counter()
ddptrain = sys.modules.get("ddptrain")
print(json.dumps({{"total_s": t2 - t0, "torch_s": t1 - t0, "over_torch_s": t2 - t1,
                  "attempted_forbidden": sorted(attempted),
                  "new_top_level": sorted({{m.split(".")[0] for m in sys.modules}} - after_torch),
                  "torch_dynamo_loaded": "torch._dynamo" in sys.modules,
                  "ddptrain_file": getattr(ddptrain, "__file__", None)}}))
"""


def probe_source(statement: str) -> str:
    rest = statement.split(";", 1)[1].strip() if ";" in statement else "pass"
    return IMPORT_PROBE.format(forbidden=FORBIDDEN, rest=rest)


def summarize(values: list[float]) -> dict:
    values = sorted(values)
    if not values:
        return {"n": 0}
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else (values[0],) * 3
    return {"n": len(values), "median": statistics.median(values), "min": values[0], "max": values[-1],
            "q1": q1, "q3": q3}


def cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine since boot; steal counts as busy."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


def wait_until_quiet(threshold: float, max_wait: float) -> dict:
    """Sample the machine's busy share each second until it is below threshold, for at most max_wait s."""
    start = time.monotonic()
    while True:
        b0, t0 = cpu_times()
        time.sleep(1.0)
        b1, t1 = cpu_times()
        busy = (b1 - b0) / max(t1 - t0, 1)
        waited = time.monotonic() - start
        if busy <= threshold or waited >= max_wait:
            return {"busy_before_launch": round(busy, 3), "waited_s": round(waited, 1)}


def launch(runner: str, size: str, warmup: int, steps: int, tmp: Path, env: dict, timeout: float) -> dict:
    """One torchrun launch; returns rank 0's result (or an error record)."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"{runner}-{size}-", dir=tmp))  # ddptrain would resume from a reused one
    out = run_dir / "result.json"
    torchrun = Path(sys.executable).with_name("torchrun")
    # A label is a runner, `minimal_aa` (the A/A control), or `ddptrain-<patch>[+<patch>]` (diagnosis,
    # see ddp_worker.patch_ddptrain).
    name, _, patches = runner.removesuffix("_aa").partition("-")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", str(WORKER),
           "--runner", name, "--size", size, "--warmup", str(warmup),
           "--steps", str(steps), "--out", str(out), "--tmp", str(run_dir)]
    cmd += [a for p in filter(None, patches.split("+")) for a in ("--patch", p)]
    env = {**env, "BENCH_T0": repr(time.time())}  # time to first step is measured from here
    try:
        proc = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if proc.returncode != 0 or not out.exists():
        return {"error": f"rc={proc.returncode}: {(proc.stdout + proc.stderr)[-3000:]}"}
    return json.loads(out.read_text())


def measure_imports(python: str, repeats: int, rng: random.Random, env: dict, cwd: Path) -> dict:
    samples = {name: [] for name in IMPORTS}
    details = {}
    for _ in range(repeats):
        names = list(IMPORTS)
        rng.shuffle(names)
        for name in names:
            proc = subprocess.run([python, "-c", probe_source(IMPORTS[name])], env=env, cwd=cwd,
                                  capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                details[name] = {"error": proc.stderr[-1000:]}
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            samples[name].append(r)
            details[name] = {k: r[k] for k in ("attempted_forbidden", "new_top_level", "torch_dynamo_loaded",
                                                "ddptrain_file")}
    return {name: {"statement": IMPORTS[name], **details.get(name, {}),
                   "total_s": summarize([r["total_s"] for r in rs]),
                   "over_torch_in_process_s": summarize([r["over_torch_s"] for r in rs])}
            for name, rs in samples.items()}


def forbidden_check(python: str, env: dict, cwd: Path) -> dict:
    """`import torch; import ddptrain; import ddptrain.trainer` in another interpreter (the dev venv has sklearn)."""
    proc = subprocess.run([python, "-c", probe_source("import torch; import ddptrain; import ddptrain.trainer")],
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        return {"python": python, "error": proc.stderr[-1000:]}
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    installed = subprocess.run([python, "-c", f"import importlib.util as u; print([m for m in {FORBIDDEN!r} "
                                "if u.find_spec(m)])"], capture_output=True, text=True).stdout.strip()
    return {"python": python, "forbidden_installed_there": installed,
            **{k: r[k] for k in ("attempted_forbidden", "new_top_level", "ddptrain_file")}}


def snapshot_ddptrain(dest: Path, ref: str | None) -> dict:
    """Copy ddptrain (the working tree, or git `ref`) to dest/ddptrain; return what was copied."""
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    if ref:
        subprocess.run(f"git archive {ref} ddptrain | tar -x -C {dest}", shell=True, cwd=ROOT, check=True)
    else:
        shutil.copytree(ROOT / "ddptrain", dest / "ddptrain", ignore=shutil.ignore_patterns("__pycache__"))
    h = hashlib.sha256()
    for p in sorted((dest / "ddptrain").rglob("*.py")):
        h.update(p.relative_to(dest).as_posix().encode() + p.read_bytes())
    return {"source": f"git {ref}" if ref else "working tree", "head": git("rev-parse", "--short", "HEAD"),
            "ref_commit": git("rev-parse", "--short", ref) if ref else None,
            "uncommitted_changes_in_ddptrain": git("status", "--porcelain", "ddptrain").splitlines() if not ref else [],
            "sources_sha256": h.hexdigest()[:16]}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    versions = subprocess.run([sys.executable, "-c", "import importlib.metadata as m; print({p: m.version(p) for p in "
                               "('torch', 'accelerate', 'lightning')})"], capture_output=True, text=True)
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "packages": versions.stdout.strip(), "loadavg_start": os.getloadavg()}


def analyse(launches: list[dict], size: str, runners: list[str], max_foreign: float) -> dict:
    ok = [r for r in launches if r["size"] == size and r.get("counted") and "error" not in r]
    by = {(r["round"], r["label"]): r for r in ok}
    out = {}
    for runner in runners:
        mine = [r for r in ok if r["label"] == runner]
        pairs = [(r, by[(r["round"], BASELINE)]) for r in mine if (r["round"], BASELINE) in by]
        clean = [(r, b) for r, b in pairs if max(r["foreign_cpu_frac"], b["foreign_cpu_frac"]) <= max_foreign]
        out[runner] = {
            "samples_per_s": summarize([r["samples_per_s"] for r in mine]),
            "step_ms": summarize([r["step_ms"] for r in mine]),
            "time_to_first_step_s": summarize([r["time_to_first_step_s"] for r in mine]),
            "foreign_cpu_frac": summarize([r["foreign_cpu_frac"] for r in mine]),
            "ratio_vs_minimal": summarize([r["samples_per_s"] / b["samples_per_s"] for r, b in pairs]),
            "ratio_vs_minimal_clean_pairs": summarize([r["samples_per_s"] / b["samples_per_s"] for r, b in clean]),
            "ratio_vs_minimal_from_median_step": summarize([b["step_ms_median"] / r["step_ms_median"] for r, b in pairs]),
            "cpu_ms_per_step": summarize([r["cpu_ms_per_step"] for r in mine]),
            "cpu_ratio_vs_minimal": summarize([r["cpu_ms_per_step"] / b["cpu_ms_per_step"] for r, b in pairs]),
            "extra_ms_per_step_vs_minimal": summarize([r["step_ms"] - b["step_ms"] for r, b in pairs]),
            "ttfs_ratio_vs_minimal": summarize([r["time_to_first_step_s"] / b["time_to_first_step_s"] for r, b in pairs]),
            "failed_launches": sum(1 for r in launches if r["size"] == size and r["label"] == runner
                                   and r.get("counted") and "error" in r),
        }
    return out


def fmt(s: dict, digits: int = 3) -> str:
    if not s.get("n"):
        return "n/a"
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def report(results: dict) -> str:
    m = results["machine"]
    lines = [f"{results['date']}, {m['cpu']}, {m['cores']} cores, {results['rounds']} rounds, "
             f"ddptrain {results['ddptrain']['source']} at {results['ddptrain']['head']} "
             f"(sources {results['ddptrain']['sources_sha256']})", ""]
    for size, spec in results["sizes"].items():
        lines += [f"{size}: MLP {spec['model']}, batch {spec['per_rank_batch']}/rank x 2 ranks, "
                  f"warm-up {spec['warmup']} steps, {spec['steps']} timed steps", "",
                  "| runner | samples/s | ms/step | ratio vs minimal, median [min-max] | IQR of ratio | "
                  "ratio of per-step medians | CPU ms/step, 2 ranks | CPU cost vs minimal | time to first step, s | TTFS ratio |",
                  "|---|---:|---:|---|---|---|---:|---|---:|---|"]
        for runner, r in spec["runners"].items():
            base = runner == BASELINE
            ratio = r["ratio_vs_minimal"]
            iqr = f"{ratio['q1']:.3f}-{ratio['q3']:.3f}" if ratio.get("n") else "n/a"
            lines.append(
                f"| {'minimal (A/A)' if runner == 'minimal_aa' else runner} | {r['samples_per_s']['median']:,.0f} | "
                f"{r['step_ms']['median']:.2f} | {'1 (baseline)' if base else fmt(ratio)} | "
                f"{'' if base else iqr} | "
                f"{'' if base else fmt(r['ratio_vs_minimal_from_median_step'])} | "
                f"{r['cpu_ms_per_step']['median']:.2f} | {'' if base else fmt(r['cpu_ratio_vs_minimal'])} | "
                f"{r['time_to_first_step_s']['median']:.2f} | {'' if base else fmt(r['ttfs_ratio_vs_minimal'])} |")
        lines.append("")
    lines.append(f"Launches re-run because other processes took > {results['max_foreign']:.0%} of the CPU in the "
                 f"window: {results['retried_launches']}; counted launches still above it: "
                 f"{results['disturbed_counted_launches']} of {results['counted_launches']}.")
    lines.append("")
    if results.get("imports"):
        imp = results["imports"]
        torch_med = imp["torch"]["total_s"]["median"]
        lines += [f"Import time, fresh subprocess each, median [min-max] of {imp['torch']['total_s']['n']}:", "",
                  "| statement | total s | minus `import torch` (medians) | measured after `import torch` in the same process |",
                  "|---|---|---:|---:|"]
        for name, r in imp.items():
            lines.append(f"| `{r['statement']}` | {fmt(r['total_s'], 2)} | {r['total_s']['median'] - torch_med:+.2f} | "
                         f"{r['over_torch_in_process_s']['median']:.3f} |")
        lines.append("")
        for name in ("ddptrain", "ddptrain.trainer"):
            r = imp[name]
            lines.append(f"`{r['statement']}`: attempted imports of {'/'.join(FORBIDDEN)}: {r.get('attempted_forbidden')}; "
                         f"new top-level modules: {r.get('new_top_level')}; torch._dynamo loaded: {r.get('torch_dynamo_loaded')}")
        if results.get("forbidden_check_dev_venv"):
            lines.append(f"Dev venv check: {results['forbidden_check_dev_venv']}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--sizes", default="tiny,big")
    p.add_argument("--runners", default=",".join(RUNNERS))
    p.add_argument("--tiny-warmup", type=int, default=20)
    p.add_argument("--tiny-steps", type=int, default=600)
    p.add_argument("--big-warmup", type=int, default=10)
    p.add_argument("--big-steps", type=int, default=60)
    p.add_argument("--import-repeats", type=int, default=7, help="0 skips the import-time measurement")
    p.add_argument("--dev-python", default=str(ROOT / ".venv/bin/python"),
                   help="another interpreter for the forbidden-import check (skipped if missing)")
    p.add_argument("--ddptrain-ref", default=None, help="benchmark ddptrain from this git ref (default: working tree)")
    p.add_argument("--quiet-below", type=float, default=0.10, help="machine busy share that counts as quiet")
    p.add_argument("--max-wait", type=float, default=30.0, help="seconds to wait for quiet before each launch")
    p.add_argument("--max-foreign", type=float, default=0.05, help="foreign CPU share of the window that forces a re-run")
    p.add_argument("--retries", type=int, default=1)
    p.add_argument("--seed", type=int, default=None, help="seed of the runner order (default: random)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per launch")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<date>_<time>.json)")
    args = p.parse_args()

    out = Path(args.out) if args.out else HERE / "results" / f"{datetime.datetime.now():%Y-%m-%d_%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    runners = args.runners.split(",")
    assert BASELINE in runners, "the minimal loop is the baseline of every ratio"
    sizes = args.sizes.split(",")
    plan = {"tiny": (args.tiny_warmup, args.tiny_steps), "big": (args.big_warmup, args.big_steps)}
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    rng = random.Random(seed)
    started = datetime.datetime.now()

    with tempfile.TemporaryDirectory(prefix="bench_ddp_") as tmp:
        tmp = Path(tmp)
        (tmp / "snapshot").mkdir()
        snapshot = snapshot_ddptrain(tmp / "snapshot", args.ddptrain_ref)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join([str(tmp / "snapshot"), *filter(None, [os.environ.get("PYTHONPATH")])])}
        results = {"date": started.isoformat(timespec="seconds"), "command": " ".join([sys.executable, *sys.argv]),
                   "seed": seed, "rounds": args.rounds, "max_foreign": args.max_foreign, "machine": machine(),
                   "ddptrain": snapshot, "launches": []}
        print(f"seed {seed}; {results['machine']}; ddptrain {snapshot}", flush=True)

        for rnd in range(args.rounds):
            order_sizes = sizes[:]
            rng.shuffle(order_sizes)
            for size in order_sizes:
                order = runners[:]
                rng.shuffle(order)
                for runner in order:
                    warmup, steps = plan[size]
                    attempts = []
                    for attempt in range(args.retries + 1):
                        quiet = wait_until_quiet(args.quiet_below, args.max_wait)
                        r = launch(runner, size, warmup, steps, tmp, env, args.timeout)
                        r.update(quiet, round=rnd, label=runner, size=size, position=order.index(runner),
                                 attempt=attempt, counted=False)
                        attempts.append(r)
                        msg = r.get("error") or (
                            f"{r['samples_per_s']:,.0f} samples/s, {r['step_ms']:.2f} ms/step, first step "
                            f"{r['time_to_first_step_s']:.2f} s, foreign CPU {r['foreign_cpu_frac']:.0%}")
                        print(f"round {rnd} {size:4} {runner:11} {msg} (waited {quiet['waited_s']:.0f} s)", flush=True)
                        if "error" in r or r["foreign_cpu_frac"] <= args.max_foreign:
                            break
                    good = [a for a in attempts if "error" not in a]
                    chosen = min(good, key=lambda a: a["foreign_cpu_frac"]) if good else attempts[-1]
                    chosen["counted"] = True
                    results["launches"] += attempts
                    out.write_text(json.dumps(results, indent=1) + "\n")  # partial results survive an interruption

        results["sizes"] = {size: {"model": MODELS[size], "per_rank_batch": 128, "warmup": plan[size][0],
                                   "steps": plan[size][1],
                                   "runners": analyse(results["launches"], size, runners, args.max_foreign)}
                            for size in sizes}
        counted = [r for r in results["launches"] if r["counted"] and "error" not in r]
        results["counted_launches"] = len(counted)
        results["retried_launches"] = sum(1 for r in results["launches"] if r["attempt"] > 0)
        results["disturbed_counted_launches"] = sum(1 for r in counted if r["foreign_cpu_frac"] > args.max_foreign)
        results["ddptrain_files_used"] = sorted({r["ddptrain_file"] for r in counted if "ddptrain_file" in r})

        if args.import_repeats > 0:
            print("measuring import times ...", flush=True)
            results["imports"] = measure_imports(sys.executable, args.import_repeats, rng, env, tmp)
            if args.dev_python and Path(args.dev_python).exists() and Path(args.dev_python) != Path(sys.executable):
                results["forbidden_check_dev_venv"] = forbidden_check(args.dev_python, env, tmp)

    results["machine"]["loadavg_end"] = os.getloadavg()
    results["wall_s"] = round((datetime.datetime.now() - started).total_seconds())
    out.write_text(json.dumps(results, indent=1) + "\n")
    print()
    print(report(results))
    print(f"\nwrote {out} (wall {results['wall_s']} s)")


if __name__ == "__main__":
    main()
