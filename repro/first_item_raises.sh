#!/bin/bash
# A training set whose first item (read by the pre-flight check) raises: before the fix a traceback, exit 1;
# now `ddptrain: error: task 'bad:build': reading the training set's first items raised ValueError: ... (bad.py:N)`, exit 2.
cd "$(mktemp -d)"
cat > bad.py <<'PY'
import torch, ddptrain
from torch.utils.data import Dataset
class D(Dataset):
    def __len__(self): return 64
    def __getitem__(self, i): raise ValueError(f"sample {i} is corrupt")
def build(cfg):
    return ddptrain.Task(model=torch.nn.Linear(8, 3), train=D(), loss=torch.nn.functional.cross_entropy)
PY
printf 'task: bad:build\ndata: {batch_size: 16}\ntrain: {epochs: 1}\n' > c.yaml
python -m ddptrain train c.yaml; echo "exit $?"
