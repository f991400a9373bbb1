"""Streams: where the time goes when training reads many small files, with 0, 1 and 2 DataLoader workers.

A. One process trains an MLP on a stream of CSV files (each rank's each worker parses its own files, split
   with ddptrain.shard). For each worker count: the stream read alone (one pass through ddptrain's
   loader, no model), training on it (samples/s and the mean `data_wait_share` of the train events), and,
   as the ceiling, training on the same samples held in memory (a map-style TensorDataset).
B. The cost of the end-of-pass agreement: the small all-reduce on the gloo control group that a stream
   makes once per read-ahead window (StreamSteps), timed alone on 2 real ranks, and 2-rank training on an
   even stream with it and with a loop that reads each rank's steps without any agreement (interleaved
   rounds, the ratio of samples/s).
C. The cost of a mid-pass resume: the time to the first batch after loading a checkpointed loader state
   at the middle of a pass, for a stream with a state (it seeks) and one without (torchdata re-reads
   the batches already trained and skips them).

Run from the repository root:  .venv/bin/python benchmarks/bench_stream.py [--files 1000]
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import IterableDataset, TensorDataset

import ddptrain
from ddptrain.config import DataConfig
from ddptrain.data import stream_train_loader
from ddptrain.dist import DistEnv
from ddptrain.steps import StreamSteps

from spawned import on_ranks

HERE = Path(__file__).resolve().parent
FEATURES, ROWS, CLASSES = 32, 64, 10


class CsvFiles(IterableDataset):
    """Rows `label,f1,...,f32` of CSV files, this part's files (ddptrain.shard) parsed one by one."""

    def __init__(self, paths: list[str]):
        self.paths, self.at, self.start = paths, (0, 0), (0, 0)  # (files of this part done, rows of the next)

    def __iter__(self):
        (files_done, rows_done), self.start = self.start, (0, 0)
        for j, path in enumerate(ddptrain.shard(self.paths)):
            if j < files_done:
                continue
            with open(path) as f:
                rows = [[float(v) for v in line.split(",")] for line in f]
            for i in range(rows_done if j == files_done else 0, len(rows)):
                self.at = (j, i + 1)
                yield torch.tensor(rows[i][1:]), int(rows[i][0])


class StatefulCsvFiles(CsvFiles):
    """With a state: a resume opens the file it stopped in, and no other before it."""

    def state_dict(self) -> dict:
        return {"files_done": self.at[0], "rows_done": self.at[1]}

    def load_state_dict(self, state: dict) -> None:
        self.start = self.at = (state["files_done"], state["rows_done"])


def write_files(d: Path, n: int) -> list[str]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(FEATURES, CLASSES, generator=g)
    paths = []
    for i in range(n):
        x = torch.randn(ROWS, FEATURES, generator=g)
        y = (x @ w).argmax(1)
        path = d / f"part-{i:05d}.csv"
        path.write_text("".join(f"{int(c)}," + ",".join(f"{v:.5f}" for v in row) + "\n" for c, row in zip(y, x.tolist())))
        paths.append(str(path))
    return paths


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, CLASSES))


def config(workers: int, batch: int, runs: Path, name: str) -> dict:
    return {"name": name, "runs_dir": str(runs), "loss": {"name": "cross_entropy"}, "optim": {"name": "sgd", "lr": 0.05},
            "data": {"batch_size": batch, "num_workers": workers}, "train": {"epochs": 1, "log_every": 20},
            "checkpoint": {"every_epochs": 0, "save_best": False}}


def train(train_set, cfg: dict) -> dict:
    summary = ddptrain.train(cfg, task=lambda c: ddptrain.Task(model=model(), train=train_set))
    events = [json.loads(line) for line in open(Path(cfg["runs_dir"]) / cfg["name"] / "metrics.jsonl")]
    waits = [e["data_wait_share"] for e in events if e["split"] == "train"]
    return {"samples_per_s": summary["samples_per_s"], "data_wait_share": statistics.mean(waits)}


def read_only(paths: list[str], workers: int, batch: int) -> float:
    loader = stream_train_loader(CsvFiles(paths), DataConfig(batch_size=batch, num_workers=workers),
                                 DistEnv(), 1, False)
    start, n = time.perf_counter(), 0
    for x, _ in loader:
        n += len(x)
    return n / (time.perf_counter() - start)


def part_a(paths: list[str], batch: int, runs: Path) -> dict:
    out = {}
    for workers in (0, 1, 2):
        out[f"{workers} workers"] = {"read_only_samples_per_s": read_only(paths, workers, batch),
                                     **train(CsvFiles(paths), config(workers, batch, runs, f"a{workers}"))}
    xs, ys = zip(*CsvFiles(paths))
    out["in memory (map-style)"] = train(TensorDataset(torch.stack(xs), torch.tensor(ys)),
                                         config(0, batch, runs, "mem"))
    return out


def agreement(calls: int) -> float:
    """The median time of one end-of-pass agreement, in us (on each of the spawned ranks)."""
    from ddptrain.dist import Dist, detect
    dist = Dist(detect(os.environ), torch.device("cpu"), "gloo", 60, 60)
    for _ in range(100):
        dist.any(False)
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        dist.any(False)
        times.append(time.perf_counter() - t)
    dist.close()
    return statistics.median(times) * 1e6


def part_b(calls: int = 2000) -> dict:
    return {"agreement_median_us": on_ranks(agreement, calls), "calls": calls}


class NoAgreement(StreamSteps):
    """A rank's own whole steps, one at a time, until its part ends: no agreement, no read-ahead window, no
    position kept (safe only on equal parts; no exact resume)."""

    def __iter__(self):
        it = iter(self.batches)
        while len(step := list(itertools.islice(it, self.k))) == self.k:
            yield step

    def read_ahead(self) -> None:
        pass


class Even(IterableDataset):
    """An in-memory stream that every rank reads to the same length: the agreement never ends a pass early."""

    def __init__(self, n: int):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, FEATURES, generator=g), torch.randint(0, CLASSES, (n,), generator=g)

    def __iter__(self):
        for i in ddptrain.shard(range(len(self.x))):
            yield self.x[i], self.y[i]


def steps_with(agree: bool, batch: int, runs: str, name: str) -> float:
    """2-rank training on an even stream, with or without the end-of-pass agreement (without it, the
    pass ends on each rank when its part does, which is safe only because the parts are equal): samples/s."""
    from ddptrain import train_data
    if not agree:
        train_data.StreamSteps = NoAgreement
    cfg = config(0, batch, Path(runs), name)
    cfg["train"]["log_every"] = 50
    return ddptrain.train(cfg, task=lambda c: ddptrain.Task(model=model(), train=Even(batch * 600)))["samples_per_s"]


def part_b2(runs: Path, rounds: int, batch: int = 64) -> dict:
    """Interleaved rounds of 2-rank training with and without the agreement: the ratio of samples/s."""
    ratios = []
    for _ in range(rounds):
        without = on_ranks(steps_with, False, batch, str(runs), f"without-{len(ratios)}")
        with_ = on_ranks(steps_with, True, batch, str(runs), f"with-{len(ratios)}")
        ratios.append(with_ / without)
    return {"with_over_without": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
            "rounds": rounds, "batch": batch, "steps": 600}


def part_c(paths: list[str], batch: int) -> dict:
    out = {}
    for stateful in (True, False):
        cfg = DataConfig(batch_size=batch, num_workers=0)
        kind = StatefulCsvFiles if stateful else CsvFiles
        first = stream_train_loader(kind(paths), cfg, DistEnv(), 1, False)
        it = iter(first)
        half = len(paths) * ROWS // batch // 2
        for _ in range(half):
            next(it)
        state = first.state_dict()
        resumed = stream_train_loader(kind(paths), cfg, DistEnv(), 1, False)
        start = time.perf_counter()
        resumed.load_state_dict(state)
        next(iter(resumed))
        out["with a state (seeks)" if stateful else "without a state (re-reads)"] = {
            "resume_to_first_batch_s": time.perf_counter() - start, "batches_skipped": half}
    return out


def report(results: dict) -> str:
    lines = [f"Stream benchmark {results['date']}: {results['files']} CSV files x {ROWS} rows, batch {results['batch']}, "
             f"{results['machine']}"]
    if "A" in results:
        lines += ["", "| data | read only (samples/s) | training (samples/s) | data_wait_share |", "|---|---|---|---|"]
        for name, r in results["A"].items():
            read = f"{r['read_only_samples_per_s']:.0f}" if "read_only_samples_per_s" in r else "-"
            lines.append(f"| {name} | {read} | {r['samples_per_s']:.0f} | {r['data_wait_share']:.2f} |")
    if "B" in results:
        b = results["B"]
        lines += ["", f"End-of-pass agreement (2 gloo ranks): median {b['agreement_median_us']:.0f} us per call "
                      f"({b['calls']} calls)"]
    if "B2" in results:
        b2 = results["B2"]
        lines += ["", f"2-rank training on an even in-memory stream (MLP, batch {b2['batch']}, {b2['steps']} steps) runs "
                      f"at {b2['with_over_without']:.3f}x the samples/s of the same loop without the agreement (median "
                      f"of {b2['rounds']} interleaved rounds, range {b2['min']:.3f}-{b2['max']:.3f})"]
    if "C" in results:
        lines += ["", "| mid-pass resume | time to the first batch (s) | batches skipped |", "|---|---|---|"]
        for name, r in results["C"].items():
            lines.append(f"| {name} | {r['resume_to_first_batch_s']:.3f} | {r['batches_skipped']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=1000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5, help="rounds of the with/without agreement comparison")
    p.add_argument("--parts", default="A,B,B2,C", help="which parts to run (comma-separated)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/stream_<date>.json)")
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        paths = write_files(Path(d), args.files)
        parts = {"A": lambda: part_a(paths, args.batch, Path(d) / "runs"), "B": part_b,
                 "B2": lambda: part_b2(Path(d) / "runs", args.rounds), "C": lambda: part_c(paths, args.batch)}
        results = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "files": args.files,
                   "batch": args.batch, "machine": f"{os.cpu_count()} CPUs, {platform.python_version()}, torch "
                                                   f"{torch.__version__}",
                   **{name: parts[name]() for name in args.parts.split(",")}}
    out = Path(args.out or HERE / "results" / f"stream_{results['date'][:10]}.json")
    out.write_text(json.dumps(results, indent=2))
    print(report(results))
    print(f"\nwritten: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
