"""Batch norm under dist.strategy=fsdp: the running statistics (buffers, which FSDP leaves each rank's own) drifted
apart per rank, so validation differed from ddp's (1.181 against 1.160 here), and DCP saved rank 1's copy. Now
rank 0's are broadcast before every training forward (as DDP does) and saved: fsdp equals ddp."""
import sys, tempfile, json
sys.path[:0] = ["/tmp/hunt5/repro", "/tmp/hunt5/tests"]
from harness import *
import harness, tasks_for_tests

def train2(rank, cfg_dict, tmp):
    cfg = from_dict({"runs_dir": str(tmp), "name": "r", **cfg_dict})
    summary = run(cfg, detect(os.environ))
    m = tasks_for_tests.MODELS[-1]
    own = {k: v.clone() for k, v in m.state_dict().items() if "running" in k} if cfg.dist.strategy == "fsdp" else {}
    w = ddptrain.load_model(cfg.run_dir, "last").state_dict()
    return {"summary": summary, "weights": w, "own": own}

cfg = with_(BASE, task="tasks_for_tests:regression", task_args={"batch_norm": True})
d = tempfile.mkdtemp()
a = run_ranks(train2, 2, cfg, d + "/ddp", timeout=120)
b = run_ranks(train2, 2, with_(cfg, dist={"strategy": "fsdp"}), d + "/fsdp", timeout=120)
print("val ddp", a[0]["summary"]["val"], "fsdp", b[0]["summary"]["val"])
for k in a[0]["weights"]:
    print(k, (a[0]["weights"][k].float() - b[0]["weights"][k].float()).abs().max().item())
print("fsdp rank0 vs rank1 running stats:", {k: (b[0]["own"][k].float() - b[1]["own"][k].float()).abs().max().item() for k in b[0]["own"]})
