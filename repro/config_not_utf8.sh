#!/bin/bash
# A config file saved in Latin-1 (not UTF-8): before the fix a UnicodeDecodeError traceback, exit 1;
# now `ddptrain: error: config file 'c.yaml': cannot read it ('utf-8' codec can't decode byte 0xe9 ...)`, exit 2.
cd "$(mktemp -d)"
printf 'task: digits\nname: caf\xe9\n' > c.yaml
python -m ddptrain train c.yaml; echo "exit $?"
