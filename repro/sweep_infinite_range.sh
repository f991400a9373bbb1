#!/bin/bash
# A search-space range with an infinite end ({low: 0.01, high: .inf}): before the fix it passed the checks and
# the first trial's suggestion crashed with OverflowError (traceback, exit 1); now one line before any trial, exit 2.
cd "$(mktemp -d)"
printf 'task: digits\ndata: {batch_size: 64}\ntrain: {epochs: 1}\n' > c.yaml
printf 'objective: val_loss\ndirection: minimize\nparams:\n  optim.lr: {low: 0.01, high: .inf}\n' > s.yaml
python -m ddptrain sweep c.yaml s.yaml --trials 1; echo "exit $?"
