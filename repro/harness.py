"""Preempt (SIGUSR1) a one-process run at given steps, resume, compare with an uninterrupted run."""
import json, os, signal, sys, tempfile
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from ddptrain import checkpoint
from ddptrain.config import from_dict
from ddptrain.dist import detect
from ddptrain.preempt import Preempted
from ddptrain.trainer import run
import rundirs

def train(d, cfg, at=None, micro=0):
    fired = []
    def hook(step, micro_step, batch):
        if at is not None and step == at and not fired:
            fired.append(1)
            os.kill(os.getpid(), signal.SIGUSR1)
        return batch
    return run(from_dict({**cfg, "runs_dir": str(d), "name": "r"}), detect({}), hooks={"before_micro_step": hook})

def compare(cfg, stops, micro=0):
    base = Path(tempfile.mkdtemp())
    s = train(base / "straight", cfg); print("straight:", {k: s.get(k) for k in ("steps", "stopped_early", "best_step", "tested_weights")})
    d = base / "stopped"
    for at in stops:
        try:
            train(d, cfg, at, micro); print("not preempted at", at)
        except Preempted as e:
            print("preempted:", e)
    r = train(d, cfg)
    ok = True
    a, b = rundirs.records(d / "r"), rundirs.records(base / "straight" / "r")
    if a != b:
        ok = False
        print("RECORDS DIFFER", len(a), len(b))
        for x, y in zip(a, b):
            if x != y: print(" got", x, "\n want", y); break
    for k in rundirs.SUMMARY + ["tested_weights"]:
        if r.get(k) != s.get(k):
            ok = False; print("SUMMARY", k, r.get(k), s.get(k))
    for name in ["best.pt"]:
        p, q = d / "r/checkpoints" / name, base / "straight/r/checkpoints" / name
        if p.exists() != q.exists():
            ok = False; print(name, "exists differs")
        elif p.exists():
            x, y = checkpoint.load(p), checkpoint.load(q)
            for k in x["model"]:
                if not torch.equal(x["model"][k], y["model"][k]): ok = False; print(name, "differs", k)
            if {k: v for k, v in x.items() if k != "model"} != {k: v for k, v in y.items() if k != "model"}:
                ok = False; print(name, "extra differs", {k: v for k, v in x.items() if k != "model"}, {k: v for k, v in y.items() if k != "model"})
    fa, fb = checkpoint.step_files(d / "r/checkpoints"), checkpoint.step_files(base / "straight/r/checkpoints")
    if [p.name for p in fa] != [p.name for p in fb]:
        ok = False; print("step files differ", [p.name for p in fa], [p.name for p in fb])
    else:
        x, y = checkpoint.load(fa[-1]), checkpoint.load(fb[-1])
        for k in x["model"]:
            if not torch.equal(x["model"][k], y["model"][k]): ok = False; print("last ckpt differs", k)
        if x["progress"] != y["progress"]: ok = False; print("progress", x["progress"], y["progress"])
        if x["early_stop"] != y["early_stop"]: ok = False; print("early_stop", x["early_stop"], y["early_stop"])
        if str(x["scheduler"]) != str(y["scheduler"]): ok = False; print("sched", x["scheduler"], y["scheduler"])
    print("OK" if ok else "MISMATCH", base)
    return ok
