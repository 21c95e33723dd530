#!/usr/bin/env bash
# StepOPSD on several GPU nodes with torchrun: run this script once on EVERY node, same settings, each with
# its own NODE_RANK (0 on the node at MASTER_ADDR). Extra arguments are Hydra overrides for train.py.
#
#   node 0:  NNODES=2 NODE_RANK=0 MASTER_ADDR=gpu-node-0 experiments/launch/torchrun_multinode.sh experiment=alfworld_heat
#   node 1:  NNODES=2 NODE_RANK=1 MASTER_ADDR=gpu-node-0 experiments/launch/torchrun_multinode.sh experiment=alfworld_heat
#
# The ranks agree on one run directory (rank 0's time stamp) and rank 0 prepares the data and the policy
# cache first; the others then read them, so data/ (PROJECT_ROOT or data.path and paths.cache_dir) and
# outputs/ must be on a filesystem every node sees. MASTER_PORT must be free on node 0.
set -euo pipefail

NNODES=${NNODES:-1}                   # number of nodes
NODE_RANK=${NODE_RANK:-0}             # this node: 0 .. NNODES-1
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1} # address of node 0, reachable from every node
MASTER_PORT=${MASTER_PORT:-29500}     # a free TCP port on node 0 (the torchrun agent's store listens there)
GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}   # one process per GPU
if [ "${GPUS_PER_NODE}" -lt 1 ]; then
  echo "no GPU found: set GPUS_PER_NODE (and add trainer.accelerator=cpu to try it on CPUs)" >&2
  exit 2
fi
if [ "$#" -eq 0 ]; then set -- experiment=alfworld_heat; fi

cd "$(dirname "$0")/../.."            # the repository root (train.py, conf/)
exec python -m torch.distributed.run \
  --nnodes="${NNODES}" --nproc_per_node="${GPUS_PER_NODE}" --node_rank="${NODE_RANK}" \
  --master_addr="${MASTER_ADDR}" --master_port="${MASTER_PORT}" \
  train.py trainer=ddp trainer.num_nodes="${NNODES}" trainer.devices="${GPUS_PER_NODE}" "$@"
