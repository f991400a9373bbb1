#!/bin/bash
# --storage that SQLAlchemy cannot open (a typo in the dialect, or no URL at all): before the fix five retries,
# then a NoSuchModuleError/ArgumentError traceback, exit 1; now one line with the password hidden, exit 2.
cd "$(mktemp -d)"
printf 'task: digits\ndata: {batch_size: 64}\ntrain: {epochs: 1}\n' > c.yaml
printf 'objective: val_loss\nparams:\n  optim.lr: {low: 0.001, high: 0.01}\n' > s.yaml
python -m ddptrain sweep c.yaml s.yaml --trials 1 --storage 'postgresqlx://me:secret@db/study'; echo "exit $?"
