#!/bin/bash
# optim.args / sched.args / optim.name that the optimizer or schedule refuses, or a Task.optimizer that raises:
# before the fix a traceback and exit 1; now one line `ddptrain: error: config keys 'optim.name', 'optim.args': ...`, exit 2.
cd "$(mktemp -d)"
printf 'task: digits\ndata: {batch_size: 64}\nmodel: {hidden: [16]}\nloss: {name: cross_entropy}\ntrain: {epochs: 1, max_steps: 2}\n' > c.yaml
python -m ddptrain train c.yaml 'optim.args={bogus: 1}'; echo "exit $?"
python -m ddptrain train c.yaml sched.name=torch.optim.lr_scheduler.ExponentialLR; echo "exit $?"
