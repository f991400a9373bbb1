"""(N, C) logits with (N,) classes, some of them ignore_index (unlabelled samples): the validation loss was the
batches' means weighted by their samples, so it changed with eval_batch_size and the world size."""
import sys
sys.path[:0] = ["/tmp/hunt2/tests"]
import torch
from torch import nn
from torch.utils.data import TensorDataset
from ddptrain.batch import Forward
from ddptrain.config import DataConfig
from ddptrain.dist import Dist, DistEnv
from ddptrain.evaluation import Evaluator
from ddptrain.losses import CrossEntropy
from ddptrain.precision import Precision

g = torch.Generator().manual_seed(0)
logits, y = torch.randn(10, 4, generator=g), torch.randint(0, 4, (10,), generator=g)
y[[1, 2, 3, 7]] = -100
dist = Dist(DistEnv(), torch.device("cpu"), "gloo", 30, 30)
print("expected", nn.functional.cross_entropy(logits.double(), y).item())
for bs in (1, 3, 256):
    ev = Evaluator(dist, Forward(CrossEntropy()), {}, Precision("fp32", torch.device("cpu")), "sharded", DataConfig(eval_batch_size=bs))
    print("eval_batch_size", bs, ev(nn.Identity(), TensorDataset(logits, y))["loss"])
