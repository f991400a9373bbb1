#!/bin/bash
# A search space whose pruner is not a mapping (`pruner: median`), or whose pruner argument Optuna refuses
# (n_startup_trials: -1): before the fix AttributeError / ValueError tracebacks, exit 1; now one line, exit 2.
cd "$(mktemp -d)"
printf 'task: digits\ndata: {batch_size: 64}\ntrain: {epochs: 1}\n' > c.yaml
printf 'objective: val_loss\ndirection: minimize\nparams:\n  optim.lr: {low: 0.001, high: 0.01}\npruner: median\n' > s.yaml
python -m ddptrain sweep c.yaml s.yaml --trials 1; echo "exit $?"
printf 'objective: val_loss\ndirection: minimize\nparams:\n  optim.lr: {low: 0.001, high: 0.01}\npruner: {name: median, n_startup_trials: -1}\n' > s.yaml
python -m ddptrain sweep c.yaml s.yaml --trials 1; echo "exit $?"
