#!/bin/bash
# Task(metrics=[fn]) (a list, not a dict): before the fix AttributeError traceback, exit 1; now one line, exit 2.
cd "$(mktemp -d)"
cat > t.py <<'PY'
import torch, ddptrain
from torch.utils.data import TensorDataset
def build(cfg):
    return ddptrain.Task(model=torch.nn.Linear(8, 3), train=TensorDataset(torch.randn(64, 8), torch.randint(0, 3, (64,))),
                         loss=torch.nn.functional.cross_entropy, metrics=[lambda o, t: (o.argmax(-1) == t).float()])
PY
printf 'task: t:build\ndata: {batch_size: 16}\ntrain: {epochs: 1}\n' > c.yaml
python -m ddptrain train c.yaml; echo "exit $?"
