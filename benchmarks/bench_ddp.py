"""Throughput benchmark: ddptrain against a minimal DDP loop, HF Accelerate and Lightning Fabric.

One workload (an MLP on synthetic data, 2 ranks, gloo, CPU, SGD with momentum, fp32) is trained by every
runner, each launched the same way: `torchrun --standalone --nproc_per_node=2 ddp_worker.py`, with
OMP_NUM_THREADS=1. Runners are interleaved round by round in a random order; each runner's samples/s is
divided by that of the minimal loop of the same round, and the median of these ratios is reported with
their spread. A second minimal loop per round (A/A) shows the noise floor. Also measured: import times
(fresh subprocesses) and time to first step (launch to the end of the first optimizer step).

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
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKER = HERE / "ddp_worker.py"
RUNNERS = ["minimal", "minimal_aa", "ddptrain", "accelerate", "fabric"]  # minimal_aa: the A/A control
BASELINE = "minimal"

IMPORTS = {
    "torch": "import torch",
    "ddptrain": "import torch; import ddptrain",
    "ddptrain.trainer": "import torch; import ddptrain.trainer",
    "accelerate": "import torch; import accelerate",
    "lightning": "import torch; import lightning",
}
# Modules `import ddptrain` must not load (house style); a finder records even failed attempts.
FORBIDDEN = ("wandb", "optuna", "matplotlib", "sklearn")
WATCHED = (*FORBIDDEN, "scipy", "pandas", "torch._dynamo", "yaml", "tqdm", "numpy")

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
print(json.dumps({{"total_s": t2 - t0, "torch_s": t1 - t0, "over_torch_s": t2 - t1,
                  "attempted_forbidden": sorted(attempted),
                  "loaded_watched": sorted(m for m in {watched!r} if m in sys.modules),
                  "new_top_level": sorted({{m.split(".")[0] for m in sys.modules}} - after_torch)}}))
"""


def probe_source(statement: str) -> str:
    rest = statement.split(";", 1)[1].strip() if ";" in statement else "pass"
    return IMPORT_PROBE.format(forbidden=FORBIDDEN, watched=WATCHED, rest=rest)


def summarize(values: list[float]) -> dict:
    values = sorted(values)
    if not values:
        return {"n": 0}
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else (values[0],) * 3
    return {"n": len(values), "median": statistics.median(values), "min": values[0], "max": values[-1],
            "q1": q1, "q3": q3}


def launch(runner: str, size: str, warmup: int, steps: int, tmp: str, timeout: float) -> dict:
    """One torchrun launch; returns rank 0's result (or an error record)."""
    out = Path(tmp) / f"{runner}-{size}-{time.time_ns()}.json"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", str(WORKER),
           "--runner", runner.removesuffix("_aa"), "--size", size, "--warmup", str(warmup),
           "--steps", str(steps), "--out", str(out), "--tmp", tmp]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env["BENCH_T0"] = repr(time.time())  # time to first step is measured from here
    try:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if proc.returncode != 0 or not out.exists():
        return {"error": f"rc={proc.returncode}: {(proc.stdout + proc.stderr)[-2000:]}"}
    return json.loads(out.read_text())


def measure_imports(python: str, repeats: int, rng: random.Random) -> dict:
    samples = {name: [] for name in IMPORTS}
    details = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for _ in range(repeats):
        names = list(IMPORTS)
        rng.shuffle(names)
        for name in names:
            proc = subprocess.run([python, "-c", probe_source(IMPORTS[name])], env=env, cwd=ROOT,
                                  capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                details[name] = {"error": proc.stderr[-1000:]}
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            samples[name].append(r)
            details[name] = {k: r[k] for k in ("attempted_forbidden", "loaded_watched", "new_top_level")}
    result = {}
    for name, rs in samples.items():
        result[name] = {"statement": IMPORTS[name], **details.get(name, {}),
                        "total_s": summarize([r["total_s"] for r in rs]),
                        "over_torch_in_process_s": summarize([r["over_torch_s"] for r in rs])}
    return result


def forbidden_check(python: str) -> dict:
    """`import torch; import ddptrain; import ddptrain.trainer` in another interpreter (the dev venv has sklearn)."""
    proc = subprocess.run([python, "-c", probe_source("import torch; import ddptrain; import ddptrain.trainer")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        return {"python": python, "error": proc.stderr[-1000:]}
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    installed = subprocess.run([python, "-c", "import importlib.util as u; print([m for m in %r if u.find_spec(m)])"
                                % (FORBIDDEN,)], capture_output=True, text=True).stdout.strip()
    return {"python": python, "forbidden_installed_there": installed,
            **{k: r[k] for k in ("attempted_forbidden", "loaded_watched", "new_top_level")}}


def ddptrain_fingerprint() -> dict:
    """Which ddptrain was measured: commit, dirty files, a hash of its sources (it may change during a run)."""
    h = hashlib.sha256()
    for p in sorted((ROOT / "ddptrain").rglob("*.py")):
        h.update(p.read_bytes())

    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"commit": git("rev-parse", "HEAD"), "dirty": git("status", "--porcelain", "ddptrain"),
            "sources_sha256": h.hexdigest()[:16]}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    versions = subprocess.run([sys.executable, "-c", "import importlib.metadata as m; print({p: m.version(p) for p in "
                               "('torch', 'accelerate', 'lightning', 'ddptrain')})"], capture_output=True, text=True)
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "packages": versions.stdout.strip(), "loadavg_start": os.getloadavg()}


def fmt_stats(s: dict, scale: float = 1.0, digits: int = 3) -> str:
    if not s.get("n"):
        return "n/a"
    return f"{s['median'] * scale:.{digits}f} [{s['min'] * scale:.{digits}f}-{s['max'] * scale:.{digits}f}]"


def report(results: dict) -> str:
    lines = [f"# {results['date']}  {results['machine']['cpu']}, {results['machine']['cores']} cores, "
             f"{results['rounds']} rounds", ""]
    for size, spec in results["sizes"].items():
        lines += [f"## {size}: MLP {spec['model']}, batch {spec['per_rank_batch']}/rank x 2 ranks, "
                  f"warm-up {spec['warmup']}, timed {spec['steps']} steps", "",
                  "| runner | samples/s (median) | step ms (median) | ratio vs minimal: median [min-max] | IQR | "
                  "time to first step s: median | TTFS ratio vs minimal |",
                  "|---|---|---|---|---|---|---|"]
        for runner, r in spec["runners"].items():
            ratio = r["ratio_vs_minimal"]
            iqr = f"{ratio['q1']:.3f}-{ratio['q3']:.3f}" if ratio.get("n") else "-"
            name = "minimal (A/A)" if runner == "minimal_aa" else runner
            lines.append(f"| {name} | {r['samples_per_s']['median']:,.0f} | {r['step_ms']['median']:.2f} | "
                         f"{fmt_stats(ratio) if runner != BASELINE else '1 (baseline)'} | "
                         f"{iqr if runner != BASELINE else '-'} | {r['time_to_first_step_s']['median']:.2f} | "
                         f"{fmt_stats(r['ttfs_ratio_vs_minimal']) if runner != BASELINE else '1'} |")
        lines.append("")
    if results.get("imports"):
        torch_med = results["imports"]["torch"]["total_s"]["median"]
        lines += ["## import time (fresh subprocess each, median of "
                  f"{results['imports']['torch']['total_s']['n']})", "",
                  "| statement | total s: median [min-max] | minus `import torch` median | "
                  "in-process time after `import torch`: median |", "|---|---|---|---|"]
        for name, r in results["imports"].items():
            lines.append(f"| `{r['statement']}` | {fmt_stats(r['total_s'], digits=2)} | "
                         f"{r['total_s']['median'] - torch_med:+.2f} | {r['over_torch_in_process_s']['median']:.3f} |")
        lines.append("")
        for name in ("ddptrain", "ddptrain.trainer"):
            r = results["imports"][name]
            lines.append(f"`{r['statement']}`: imports of {'/'.join(FORBIDDEN)} attempted: "
                         f"{r.get('attempted_forbidden')}; top-level modules added to `import torch`'s: "
                         f"{r.get('new_top_level')}")
        if results.get("forbidden_check_dev_venv"):
            lines.append(f"dev venv check: {results['forbidden_check_dev_venv']}")
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
    p.add_argument("--seed", type=int, default=None, help="seed of the runner order (default: random)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per launch")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<date>_<time>.json)")
    args = p.parse_args()

    runners = args.runners.split(",")
    assert BASELINE in runners, "the minimal loop is the baseline of every ratio"
    sizes = args.sizes.split(",")
    plan = {"tiny": (args.tiny_warmup, args.tiny_steps), "big": (args.big_warmup, args.big_steps)}
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    rng = random.Random(seed)
    started = datetime.datetime.now()
    results = {"date": started.isoformat(timespec="seconds"), "seed": seed, "rounds": args.rounds,
               "command": " ".join([sys.executable, *sys.argv]),
               "machine": machine(), "ddptrain_start": ddptrain_fingerprint(), "launches": []}
    print(f"seed {seed}; {results['machine']}", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench_ddp_") as tmp:
        for rnd in range(args.rounds):
            order_sizes = sizes[:]
            rng.shuffle(order_sizes)
            for size in order_sizes:
                order = runners[:]
                rng.shuffle(order)
                for runner in order:
                    warmup, steps = plan[size]
                    r = launch(runner, size, warmup, steps, tmp, args.timeout)
                    r.update(round=rnd, label=runner, size=size, order=order.index(runner))
                    results["launches"].append(r)
                    msg = r.get("error") or (f"{r['samples_per_s']:,.0f} samples/s, {r['step_ms']:.2f} ms/step, "
                                             f"first step {r['time_to_first_step_s']:.2f} s")
                    print(f"round {rnd} {size:4} {runner:11} {msg}", flush=True)

    for size in sizes:
        warmup, steps = plan[size]
        ok = [r for r in results["launches"] if r["size"] == size and "error" not in r]
        by = {(r["round"], r["label"]): r for r in ok}
        spec = {"model": "256->" + "->".join(map(str, {"tiny": [64, 64], "big": [1024, 1024]}[size])) + "->10",
                "per_rank_batch": 128, "warmup": warmup, "steps": steps, "runners": {}}
        for runner in runners:
            mine = [r for r in ok if r["label"] == runner]
            pairs = [(r, by[(r["round"], BASELINE)]) for r in mine if (r["round"], BASELINE) in by]
            spec["runners"][runner] = {
                "samples_per_s": summarize([r["samples_per_s"] for r in mine]),
                "step_ms": summarize([r["step_ms"] for r in mine]),
                "time_to_first_step_s": summarize([r["time_to_first_step_s"] for r in mine]),
                "ratio_vs_minimal": summarize([r["samples_per_s"] / b["samples_per_s"] for r, b in pairs]),
                "extra_ms_per_step_vs_minimal": summarize([r["step_ms"] - b["step_ms"] for r, b in pairs]),
                "ttfs_ratio_vs_minimal": summarize([r["time_to_first_step_s"] / b["time_to_first_step_s"]
                                                    for r, b in pairs]),
                "failed_launches": sum(1 for r in results["launches"]
                                       if r["size"] == size and r["label"] == runner and "error" in r),
            }
        results.setdefault("sizes", {})[size] = spec

    if args.import_repeats > 0:
        print("measuring import times ...", flush=True)
        results["imports"] = measure_imports(sys.executable, args.import_repeats, rng)
        if args.dev_python and Path(args.dev_python).exists() and Path(args.dev_python) != Path(sys.executable):
            results["forbidden_check_dev_venv"] = forbidden_check(args.dev_python)

    results["machine"]["loadavg_end"] = os.getloadavg()
    results["ddptrain_end"] = ddptrain_fingerprint()
    results["ddptrain_changed_during_run"] = results["ddptrain_start"] != results["ddptrain_end"]
    results["wall_s"] = (datetime.datetime.now() - started).total_seconds()
    out = Path(args.out) if args.out else HERE / "results" / f"{started:%Y-%m-%d_%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print()
    print(report(results))
    if results["ddptrain_changed_during_run"]:
        print("\nWARNING: ddptrain's sources changed during the run; the ddptrain numbers mix versions.")
    print(f"\nwrote {out} (wall {results['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
