"""Tied weights (one Parameter in two direct children) under dist.strategy=fsdp: every block was sharded on its
own, and the first forward failed ('Parameter ... is shared with a parameter already managed by another FSDP
group', blamed on the model or the loss). Now the tied blocks stay in the root's group and train like ddp."""
import sys, tempfile
sys.path.insert(0, "/tmp/hunt5/repro")
from harness import *
cfg = with_(BASE, task_args={"tied": True})
d = tempfile.mkdtemp()
a = go(cfg, 2, d + "/ddp")[0]
b = go(with_(cfg, dist={"strategy": "fsdp"}), 2, d + "/fsdp")[0]
print("fsdp vs ddp, max weight difference:", diff(a, b))
