"""Bug: a stream run stopped inside a pass (max_steps, a preemption, a crash) and resumed with another
data.num_workers crashed with torchdata's AssertionError ("State doesn't contain key '_num_yielded' expected for
single process dataloader"), exit 1, instead of starting the pass again as on another world size.
Run from /tmp/hunt4/tests: PYTHONPATH=/tmp/hunt4:. python ../repro/stream_resume_other_workers.py"""
import subprocess, sys, tempfile

with tempfile.TemporaryDirectory() as d:
    common = [sys.executable, "-m", "ddptrain", "launch", "--nproc-per-node", "2", "stream.yaml", f"runs_dir={d}",
              "task_args.kind=items"]
    subprocess.run(common + ["data.num_workers=2", "train.max_steps=5", "checkpoint.every_steps=5"], check=True,
                   capture_output=True)
    proc = subprocess.run(common + ["data.num_workers=0"], capture_output=True, text=True)
    print("exit", proc.returncode, proc.stderr.strip().splitlines()[-1])
