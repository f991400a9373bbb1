#!/bin/bash
# A YAML syntax error: before the fix `ddptrain: error: ...` followed by four more lines of PyYAML's message
# (context, quoted line, caret); now one line ending "(line 2, column 1)", exit 2.
cd "$(mktemp -d)"
printf 'optim: [1, 2\n' > c.yaml
python -m ddptrain train c.yaml; echo "exit $?"
