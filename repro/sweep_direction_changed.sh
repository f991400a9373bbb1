#!/bin/bash
# A study continued with the opposite direction: Optuna keeps the stored one, so best.json reported the
# minimum although the search space says maximize. Now: one line, exit 2.
set -e; D=$(mktemp -d); cd $D
printf 'task: tasks_for_tests:regression\ndata: {batch_size: 32}\ntrain: {epochs: 2}\n' > reg.yaml
printf 'objective: val_loss\ndirection: minimize\nparams:\n  optim.lr: {low: 1.0e-4, high: 1.0e-1, log: true}\npruner: {name: none}\n' > space.yaml
export PYTHONPATH=/tmp/hunt6:/tmp/hunt6/tests
/work/main/.venv/bin/python -m ddptrain sweep reg.yaml space.yaml --sampler random --trials 2 | tail -2
sed -i 's/minimize/maximize/' space.yaml
/work/main/.venv/bin/python -m ddptrain sweep reg.yaml space.yaml --sampler random --trials 3 | tail -2 || echo "exit $?"
