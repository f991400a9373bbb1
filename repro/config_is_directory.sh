#!/bin/bash
# A config path that is a directory: before the fix "config file 'd.yaml': not found" (it exists);
# now "config file 'd.yaml': is a directory; expected a .yaml, .yml or .toml file".
cd "$(mktemp -d)" && mkdir d.yaml
python -m ddptrain train d.yaml; echo "exit $?"
