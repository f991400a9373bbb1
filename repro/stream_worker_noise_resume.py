"""Bug: a stream without a state that draws random numbers in DataLoader workers (num_workers > 0, with the
default data.persistent_workers: true), killed and resumed in its second pass, ends with other weights than
the uninterrupted run: kept workers' random streams go on from pass 0, resumed workers start from the saved
base seed. Run: PYTHONPATH=/tmp/hunt4 python repro/stream_worker_noise_resume.py (AssertionError before the fix)."""
import pathlib, sys, tempfile
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
from killing import kill_and_resume
import test_stream as ts

cfg = ts.config({"kind": "noisy", "lengths": [24] * 8}, data={"num_workers": 2}, checkpoint={"every_steps": 3})
with tempfile.TemporaryDirectory() as d:
    summary = kill_and_resume(pathlib.Path(d), cfg, kill_at=20, models="tasks_stream")  # asserts bitwise equality
    print("OK: resumed at", summary["resumed_at_step"], "bitwise equal")
