import json, os, sys
sys.path[:0] = ["/tmp/hunt5/tests", "/tmp/hunt5/repro"]
import torch
import ddptrain
from ddptrain.config import from_dict
from ddptrain.dist import detect
from ddptrain.trainer import run
from multirank import run_ranks

BASE = {"task": "tasks_hunt:regression", "data": {"batch_size": 16}, "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "train": {"epochs": 2, "log_every": 1}, "checkpoint": {"every_epochs": 1, "save_best": False},
        "dist": {"timeout_s": 30}}


def with_(base, **sections):
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for s, v in sections.items():
        out[s] = {**out.get(s, {}), **v} if isinstance(v, dict) else v
    return out


def train(rank, cfg_dict, tmp):
    cfg = from_dict({"runs_dir": str(tmp), "name": "r", **cfg_dict})
    summary = run(cfg, detect(os.environ))
    import tasks_hunt
    m = tasks_hunt.MODELS[-1]
    if cfg.dist.strategy == "fsdp":
        w = ddptrain.load_model(cfg.run_dir, "last").state_dict() if rank == 0 else {}
    else:
        w = {k: v.clone() for k, v in m.state_dict().items()}
    events = [json.loads(l) for l in open(cfg.run_dir / "metrics.jsonl")] if rank == 0 else []
    return {"summary": summary, "weights": w, "events": [e for e in events if e["split"] == "train"]}


def go(cfg, n, tmp, timeout=120):
    return run_ranks(train, n, cfg, tmp, timeout=timeout)


def diff(a, b):
    return max((a["weights"][k].float() - b["weights"][k].float()).abs().max().item() for k in a["weights"])
