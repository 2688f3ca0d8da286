#!/bin/bash
# One node's DeepSpeed launcher under srun (see pretrain.sbatch): starts this node's ranks.
#
#   node_launch.sh PYTHON WORLD_INFO MASTER_ADDR MASTER_PORT SCRIPT [SCRIPT ARGS ...]
#
# The node rank comes from SLURM_NODEID, which srun sets per task; the script's arguments are
# passed on as they are (exec with "$@": no shell re-parsing, so quotes and spaces survive).
# Every rank's stdout and stderr go to this task's, i.e. to the job's log.
set -euo pipefail
PYTHON=$1 WORLD_INFO=$2 MASTER_ADDR=$3 MASTER_PORT=$4
shift 4
exec "$PYTHON" -u -m deepspeed.launcher.launch \
    --world_info="$WORLD_INFO" --node_rank="${SLURM_NODEID:?node_launch.sh runs under srun}" \
    --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" "$@"
