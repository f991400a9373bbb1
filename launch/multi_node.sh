#!/usr/bin/env bash
# Train on several nodes without a scheduler: run this script once on every node.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/multi_node.sh CONFIG [section.key=value ...]   # node 0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 launch/multi_node.sh CONFIG [section.key=value ...]   # node 1
#
# Environment:
#   NNODES, NODE_RANK, MASTER_ADDR   required; MASTER_ADDR is node 0's address, reachable from every node
#   MASTER_PORT                      default 29500
#   NPROC_PER_NODE                   default: number of GPUs, or 1 without any
#   MAX_RESTARTS                     elastic restarts of the whole group after a failure (default 0)
#   LOCAL_ADDR                       this node's own address, if its hostname does not resolve to it
#   GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME  the network interface to use, if not the default route's
# Rendezvous is static (node ranks fixed by NODE_RANK), so node 0 hosts the store at MASTER_ADDR:MASTER_PORT.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: NNODES=N NODE_RANK=R MASTER_ADDR=HOST $0 CONFIG [section.key=value ...]" >&2
  exit 2
fi
: "${NNODES:?set NNODES (number of nodes)}" "${NODE_RANK:?set NODE_RANK (0..NNODES-1)}"
: "${MASTER_ADDR:?set MASTER_ADDR (address of node 0)}"
gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
nproc=${NPROC_PER_NODE:-$([ "$gpus" -gt 0 ] && echo "$gpus" || echo 1)}
extra=()
[ -n "${LOCAL_ADDR:-}" ] && extra+=(--local-addr="$LOCAL_ADDR")
# ddptrain's torchrun (ddptrain/agent.py): it forwards SIGUSR1/SIGUSR2 to the workers too, starts each
# elastic attempt with a fresh rendezvous store, and exits with the workers' ddptrain status.
exec python3 -m ddptrain.agent --nnodes="$NNODES" --node-rank="$NODE_RANK" --nproc-per-node="$nproc" \
  --master-addr="$MASTER_ADDR" --master-port="${MASTER_PORT:-29500}" \
  --max-restarts="${MAX_RESTARTS:-0}" "${extra[@]}" \
  -m ddptrain train "$@"
