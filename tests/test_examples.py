"""The shipped examples, run as a user runs them: the character-level LM and the two-input tabular model on
2 processes with `ddptrain launch` from the repository root."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def launch(config: str, runs_dir: Path, *overrides: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "ddptrain", "launch", "--nproc-per-node", "2", f"examples/{config}.yaml",
                           f"runs_dir={runs_dir}", *overrides], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads((runs_dir / config / "summary.json").read_text())


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
