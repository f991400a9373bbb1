"""sched.name=plateau with early_stop.mode=max (monitoring a score that rises): ReduceLROnPlateau was built in its
default mode min, so a rising accuracy counted as no improvement and the lr decayed while the run improved."""
import json, sys, tempfile
sys.path[:0] = ["/tmp/hunt5/repro"]
import ddptrain
d = tempfile.mkdtemp()
cfg = {"task": "tasks_hunt:regression", "runs_dir": d, "name": "p", "optim": {"name": "sgd", "lr": 0.05},
       "train": {"epochs": 4, "log_every": 1000}, "sched": {"name": "plateau", "plateau_patience": 0, "gamma": 0.5},
       "early_stop": {"monitor": "val_score", "mode": "max"}, "checkpoint": {"every_epochs": 0, "save_best": False}}
ddptrain.train(cfg)
for line in open(f"{d}/p/metrics.jsonl"):
    e = json.loads(line)
    print(e["split"], e["step"], "lr", e.get("lr"), "val_score", e.get("score"))
