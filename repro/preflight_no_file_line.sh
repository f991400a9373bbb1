#!/bin/bash
# A model whose forward raises in the pre-flight check: before the fix the one line named no file:line
# ("the model fails on a training batch of input Tensor(2, 8): boom"), unlike the same error mid-run;
# now it ends "(m.py:5)". The same for the loss, metrics, the task's step and its collate.
cd "$(mktemp -d)"
cat > m.py <<'PY'
import torch, ddptrain
from torch.utils.data import TensorDataset
class M(torch.nn.Linear):
    def forward(self, x):
        raise RuntimeError("boom")
def build(cfg):
    return ddptrain.Task(model=M(8, 3), train=TensorDataset(torch.randn(64, 8), torch.randint(0, 3, (64,))),
                         loss=torch.nn.functional.cross_entropy)
PY
printf 'task: m:build\ndata: {batch_size: 16}\ntrain: {epochs: 1}\n' > c.yaml
python -m ddptrain train c.yaml; echo "exit $?"
