"""Compare two run directories: the same files, metrics, summary and config, apart from timings."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

# differ between any two runs (and every key ending in _s)
TIMING = {"time", "samples_per_s", "tokens_per_s", "data_wait_share", "mfu", "slowest_rank"}
SUMMARY = ["status", "world_size", "epochs_completed", "steps", "stopped_early", "monitor", "best_value",
           "best_epoch", "best_step", "restored_best", "val", "test", "skipped_steps"]


def records(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING and not k.endswith("_s")}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def train_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in records(run_dir) if r["split"] == "train"]


def assert_same_run(run: Path, reference: Path, exact: bool = True, ignore_config: tuple[str, ...] = ()) -> None:
    """`run` did what `reference` did: same files, metrics records, summary and config (bitwise with `exact`,
    else up to 1e-6, for runs on different world sizes with the same global batch)."""
    def near(a, b):
        if exact or isinstance(a, (str, bool)) or a is None:
            return a == b
        if isinstance(a, dict):
            return isinstance(b, dict) and a.keys() == b.keys() and all(near(a[k], b[k]) for k in a)
        if isinstance(a, list):
            return isinstance(b, list) and len(a) == len(b) and all(map(near, a, b))
        return a == pytest.approx(b, rel=1e-6, abs=1e-9)

    assert sorted(p.name for p in run.rglob("*") if p.is_file()) == \
        sorted(p.name for p in reference.rglob("*") if p.is_file())
    got, want = records(run), records(reference)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert near(g, w), (g, w)
    s, r = summary(run), summary(reference)
    for key in SUMMARY:
        if key == "world_size" and not exact:
            continue
        assert near(s[key], r[key]), (key, s[key], r[key])

    def config(d):
        c = yaml.safe_load((d / "config.yaml").read_text())
        for dotted in ignore_config:
            *parents, last = dotted.split(".")
            node = c
            for p in parents:
                node = node[p]
            node.pop(last, None)
        return c
    assert config(run) == config(reference)
