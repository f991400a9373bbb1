#!/bin/bash
# {type: int, low: 0.5, high: 3} on optim.lr: the pre-trial check validated 0.5 and 3, but trials suggest the
# integers 0..3, so trials with lr=0 failed one by one ("no trial completed"); now the integer ends are checked
# before any trial: "config key 'optim.lr': expected > 0, got 0.0", exit 2.
cd "$(mktemp -d)"
printf 'task: digits\ndata: {batch_size: 64}\ntrain: {epochs: 1}\n' > c.yaml
printf 'objective: val_loss\ndirection: minimize\nparams:\n  optim.lr: {type: int, low: 0.5, high: 3}\n' > s.yaml
timeout 300 python -m ddptrain sweep c.yaml s.yaml --trials 1 --sampler random; echo "exit $?"
