#!/usr/bin/env bash
# Train on one node with torchrun: one process per GPU (or NPROC processes on CPU).
#
#   launch/single_node.sh CONFIG [section.key=value ...]
#
# Environment: NPROC (default: number of GPUs, or 2 without any), MAX_RESTARTS (default 0).
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 CONFIG [section.key=value ...]" >&2
  exit 2
fi
gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
nproc=${NPROC:-$([ "$gpus" -gt 0 ] && echo "$gpus" || echo 2)}
# ddptrain's torchrun (ddptrain/agent.py): it forwards SIGUSR1/SIGUSR2 to the workers too, starts each
# elastic attempt with a fresh rendezvous store, and exits with the workers' ddptrain status.
exec python3 -m ddptrain.agent --standalone --nproc-per-node="$nproc" --max-restarts="${MAX_RESTARTS:-0}" \
  -m ddptrain train "$@"
