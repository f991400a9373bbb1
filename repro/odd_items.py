"""Items of unusual structures through a whole 1-rank run (pre-flight, training, validation)."""
import collections, sys, tempfile
import torch
from torch import nn
from torch.utils.data import Dataset
import ddptrain
from ddptrain.config import from_dict
from ddptrain.dist import detect
from ddptrain.trainer import run

KIND = sys.argv[1]

class M(nn.Module):
    def __init__(self):
        super().__init__(); self.l = nn.Linear(4, 1)
    def forward(self, x, *rest, **kw):
        return self.l(x).squeeze(-1) if KIND in ("float_target", "int_target") else self.l(x)

class D(Dataset):
    def __len__(self): return 24
    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i); x = torch.randn(4, generator=g); y = x.sum(0, keepdim=True)
        return {
            "str_int_fields": lambda: {"x": x, "labels": y, "name": f"s{i}", "n": i},
            "nested_dict": lambda: ((x, {"m": torch.ones(2)}), y),
            "ordered": lambda: collections.OrderedDict(x=x, labels=y),
            "float_target": lambda: (x, float(y)),
            "int_target": lambda: (x, int(i % 2)),
            "scalar_tensor_target": lambda: (x, y[0]),
            "defaultdict": lambda: collections.defaultdict(list, {"x": x, "labels": y}),
        }[KIND]()

def task(cfg):
    torch.manual_seed(0)
    return ddptrain.Task(model=M(), train=D(), val=D(), loss=nn.functional.mse_loss)

cfg = from_dict({"runs_dir": tempfile.mkdtemp(), "task": "odd_items:task", "data": {"batch_size": 8},
                 "train": {"epochs": 1}, "checkpoint": {"every_epochs": 0, "save_best": False}})
try:
    print(KIND, "val", run(cfg, detect({}))["val"])
except Exception as e:
    import traceback; print(KIND, "->", type(e).__name__, str(e)[:300]); 
    if "--tb" in sys.argv: traceback.print_exc()
