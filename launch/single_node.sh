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
# A fresh rendezvous store per attempt keeps elastic restarts reliable (pytorch#135712); torchrun
# forwards SIGUSR1/SIGUSR2 to the workers only when told to (pytorch#154849).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
exec torchrun --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2 --standalone --nproc-per-node="$nproc" --max-restarts="${MAX_RESTARTS:-0}" \
  -m ddptrain train "$@"
