"""The shipped examples, run as a user runs them: the character-level LM and the two-input tabular model on
2 processes with `ddptrain launch` from the repository root."""
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ddptrain.config import ConfigError
from ddptrain.configfile import from_dict
from ddptrain.stream import rank_stream
from killing import kill_and_resume

ROOT = Path(__file__).resolve().parent.parent


def launch(config: str, runs_dir: Path, *overrides: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "ddptrain", "launch", "--nproc-per-node", "2", f"examples/{config}.yaml",
                           f"runs_dir={runs_dir}", *overrides], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads((runs_dir / config / "summary.json").read_text())


def example_module(name: str):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "examples"))


def test_the_character_lm_learns_checkpoints_its_masked_model_and_reports_tokens_per_second(tmp_path):
    # 150 of the example's 1200 steps, in dict batches: enough to be far below the unigram's 4.5 bits
    summary = launch("charlm", tmp_path, "train.max_steps=150", "train.log_every=50", "task_args.batch=dict",
                     "sched.warmup_steps=10")
    assert summary["status"] == "completed" and summary["world_size"] == 2 and summary["steps"] == 150
    assert summary["tested_weights"] == "best" and summary["test"]["bpc"] < 3.6, summary
    assert summary["tokens_per_s"] > 0
    assert (tmp_path / "charlm" / "checkpoints" / "best.pt").exists()
    assert (tmp_path / "charlm" / "checkpoints" / "step-000000150.pt").exists()


def test_the_two_input_model_trains_unmodified(tmp_path):
    summary = launch("tabular", tmp_path)
    assert summary["test"]["r2"] > 0.4, summary


def test_the_token_stream_trains_on_2_ranks_with_2_workers_each_and_resumes_mid_pass_bitwise(tmp_path):
    # A small model, 30 steps (a pass is about 124): killed at step 17, resumed from step 10's checkpoint.
    cfg = yaml.safe_load((ROOT / "examples" / "tokenstream.yaml").read_text())
    cfg.update(task=f"{ROOT}/examples/tokenstream.py:build", task_args={"block": 32, "n_layer": 1, "n_embd": 32},
               train={**cfg["train"], "max_steps": 30, "log_every": 5}, val={"every_steps": None},
               checkpoint={"every_steps": 10}, sched={**cfg["sched"], "warmup_steps": 5})
    summary = kill_and_resume(tmp_path, cfg, kill_at=17, models=None)
    assert summary["steps"] == 30 and summary["resumed_at_step"] == 10 and summary["epochs_completed"] == 0
    assert summary["test"]["bpb"] < 6.5 and summary["tokens_per_s"] > 0, summary  # uniform bytes: 8 bits


def test_the_token_streams_validation_and_test_windows_are_the_same_for_any_number_of_parts():
    # Packed across the files of a part, they depended on which files shared one: 754, 753 and 752
    # windows on 1, 2 and 4 parts (ranks x workers), so val_bpb depended on the world size.
    task = example_module("tokenstream").build(from_dict({"data": {"val_fraction": 0.1, "test_fraction": 0.1}}))
    for stream in (task.val, task.test):
        windows = [sorted(tuple(x.tolist()) for r in range(parts) for x, _ in rank_stream(stream, r, parts))
                   for parts in (1, 2, 4)]
        assert windows[0] == windows[1] == windows[2] and len(windows[0]) > 600


@pytest.mark.parametrize("example, key, fraction", [("tabular", "val_fraction", 0.001),
                                                    ("charlm", "val_fraction", 0.0001),
                                                    ("charlm", "test_fraction", 0.0001)])
def test_an_example_refuses_a_fraction_that_holds_no_sample(example, key, fraction):
    # 0.001 of 442 patients, 0.0001 of each source file (shorter than a window): before, the set was dropped silently
    with pytest.raises(ConfigError, match=f"config key 'data.{key}': {fraction} of the"):
        example_module(example).build(from_dict({"data": {key: fraction}}))
