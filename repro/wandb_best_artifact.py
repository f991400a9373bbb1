"""wandb.log_best_checkpoint: the best weights as a model artifact, under ddp (best.pt) and fsdp (best/, 2 ranks)."""
import os, sys, tempfile
from pathlib import Path
sys.path[:0] = ["tests"]
os.environ.pop("WANDB_API_KEY", None)
from ddptrain.config import from_dict
from ddptrain.dist import detect
from ddptrain.trainer import run
from multirank import run_ranks
from wandb_files import records


def train_rank(rank, runs_dir, cfg):
    return run(from_dict({**cfg, "runs_dir": str(runs_dir)}), detect(os.environ))


def artifacts(run_dir):
    out = []
    for d in (run_dir / "wandb").glob("offline-run-*"):
        for r in records(next(d.glob("run-*.wandb"))):
            if r.WhichOneof("record_type") == "artifact":
                out.append((r.artifact.name, [e.path for e in r.artifact.manifest.contents]))
    return out


for strategy in sys.argv[1:] or ["ddp", "fsdp"]:
    tmp = Path(tempfile.mkdtemp())
    cfg = {"task": "tasks_for_tests:classification", "name": "r", "data": {"batch_size": 32},
           "train": {"epochs": 2}, "dist": {"strategy": strategy, "timeout_s": 20},
           "wandb": {"enabled": True, "mode": "offline", "project": "tests", "log_best_checkpoint": True}}
    run_ranks(train_rank, 2, tmp, cfg, timeout=120)
    print(strategy, sorted(p.name for p in (tmp / "r" / "checkpoints").iterdir()), artifacts(tmp / "r"))
