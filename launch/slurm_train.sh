#!/usr/bin/env bash
# Slurm: N nodes x G GPUs, one torchrun per node, c10d rendezvous on the first node.
#   sbatch --nodes 2 launch/slurm_train.sh launch/configs/voc_resnet50_puzzle.yaml train.grad_accum_steps=1
# (global batch = micro_batch_size x grad_accum_steps x nodes x GPUs must equal train.global_batch_size.)
# A failed worker restarts the node's workers up to MAX_RESTARTS times; they resume from the newest
# complete checkpoint in RUN_DIR (--resume auto), which must be on a shared filesystem.
#SBATCH --job-name=puzzlecam
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=12:00:00
#SBATCH --output=slurm-%j.out
set -euo pipefail

CONFIG=${1:?usage: sbatch launch/slurm_train.sh CONFIG.yaml [key=value ...]}
shift
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-4}}
MAX_RESTARTS=${MAX_RESTARTS:-2}
RUN_DIR=${RUN_DIR:-runs/$(basename "$CONFIG" .yaml)-$SLURM_JOB_ID}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${PORT:-29500}

srun --kill-on-bad-exit=1 torchrun \
  --nnodes "$SLURM_NNODES" \
  --nproc-per-node "$GPUS_PER_NODE" \
  --rdzv-id "$SLURM_JOB_ID" \
  --rdzv-backend c10d \
  --rdzv-endpoint "$HEAD_NODE:$PORT" \
  --max-restarts "$MAX_RESTARTS" \
  launch/train.py --config "$CONFIG" --run-dir "$RUN_DIR" --resume auto "$@"
