"""optim.l1 under dist.strategy=fsdp: the first step failed with 'mixed torch.Tensor and DTensor' (blamed on the
model or the loss); it should train like ddp."""
import sys, tempfile
sys.path.insert(0, "/tmp/hunt5/repro")
from harness import *
cfg = with_(BASE, optim={"l1": 1e-2})
d = tempfile.mkdtemp()
a = go(cfg, 2, d + "/ddp")[0]
for extra in ({}, {"reshard_after_forward": False}):
    b = go(with_(cfg, dist={"strategy": "fsdp", **extra}), 2, d + f"/fsdp{len(extra)}")[0]
    print("fsdp", extra, "vs ddp, max weight difference:", diff(a, b))
