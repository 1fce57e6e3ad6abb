#!/usr/bin/env bash
# One node's share of a Slurm job: started once per node by `srun --ntasks-per-node=1` (see
# sbatch_multi_node.sh), it turns Slurm's variables into what DeepSpeed's launcher needs
# without ssh (a hostfile, this node's rank, the first node as master) and runs a
# multi-node recipe, which starts this node's ranks with `deepspeed --no_ssh --node_rank`.
#
#   bash training_scripts/slurm/node.sh [OUTPUT] [ZERO_STAGE] [extra main.py flags...]
#
# Slurm variables read: SLURM_JOB_ID, SLURM_JOB_NODELIST, SLURM_NODEID, SLURM_GPUS_ON_NODE.
# Environment a user may set:
#   SFT_RECIPE       the multi-node launcher to run (default opt/multi_node/run_66b.sh)
#   GPUS_PER_NODE    ranks per node when Slurm does not say (no --gpus-per-node in the job)
#   MASTER_PORT      rendezvous port (default: 20000 + job id modulo 20000, so two jobs
#                    sharing a node do not collide)
#   SFT_REQUEUE=0    do not requeue the job when the run stops for preemption (exit 75)
set -euo pipefail
SLURM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=SCRIPTDIR/../common.sh
source "$SLURM_DIR/../common.sh"

PREEMPTED_EXIT=75 # main.py checkpointed on SIGTERM/SIGUSR1: rerun to continue

for var in SLURM_JOB_ID SLURM_JOB_NODELIST SLURM_NODEID; do
    [[ -n ${!var:-} ]] ||
        die "$var is not set: run this under srun inside a Slurm job (sbatch training_scripts/slurm/sbatch_multi_node.sh ...)"
done
RECIPE=${SFT_RECIPE:-$REPO_ROOT/training_scripts/opt/multi_node/run_66b.sh}
[[ -f $RECIPE ]] || die "SFT_RECIPE '$RECIPE' not found: name a launcher script under training_scripts/"
# A single-node recipe would run one independent job per node, each training the whole data.
grep -q '^multi_node_launcher' "$RECIPE" ||
    die "SFT_RECIPE '$RECIPE' is not a multi-node launcher (it never calls multi_node_launcher); use one such as training_scripts/opt/multi_node/run_66b.sh"

# Ranks per node: what Slurm allocated, else GPUS_PER_NODE.
SLOTS=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
[[ $SLOTS =~ ^[1-9][0-9]*$ ]] ||
    die "cannot tell how many GPUs this node has (SLURM_GPUS_ON_NODE='${SLURM_GPUS_ON_NODE:-}'): request them with #SBATCH --gpus-per-node=N, or set GPUS_PER_NODE=N"

mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
((${#NODES[@]} > 0)) || die "scontrol found no hosts in SLURM_JOB_NODELIST='$SLURM_JOB_NODELIST'"
((SLURM_NODEID < ${#NODES[@]})) ||
    die "SLURM_NODEID=$SLURM_NODEID but the job has ${#NODES[@]} nodes (${NODES[*]})"

# Every node writes its own copy (identical: same node list, same order), node-local, so
# no node reads a file another node is still writing on a shared file system.
HOSTFILE=$(mktemp "${TMPDIR:-/tmp}/sft-hostfile.$SLURM_JOB_ID.XXXXXX")
trap 'rm -f "$HOSTFILE"' EXIT
for node in "${NODES[@]}"; do
    echo "$node slots=$SLOTS"
done >"$HOSTFILE"

export HOSTFILE
export NODE_RANK=$SLURM_NODEID
export MASTER_ADDR=${MASTER_ADDR:-${NODES[0]}}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}

# Slurm signals every process of the job step, launchers and shells included. main.py
# turns SIGUSR1/SIGTERM into "checkpoint and exit 75", but the shells and DeepSpeed's
# launcher would die of SIGUSR1 (its default action) and take the ranks with them, so
# they ignore it (the ranks install their own handlers; DeepSpeed's launcher keeps its
# SIGTERM handler, which gives the ranks 30 s before killing them).
trap '' USR1 TERM

# A requeued job runs this same command again; `auto` continues from the newest
# checkpoint in OUTPUT (or starts fresh). Extra flags still come last and win.
set +e
bash "$RECIPE" "${1:-./output}" "${2:-}" --resume_from_checkpoint auto "${@:3}"
status=$?
set -e

if ((status == PREEMPTED_EXIT && SLURM_NODEID == 0)) && [[ ${SFT_REQUEUE:-1} != 0 ]]; then
    # Node 0's ranks exit only after every rank has published the checkpoint.
    echo "preempted: checkpoint written; requeueing job $SLURM_JOB_ID to continue it"
    scontrol requeue "$SLURM_JOB_ID" ||
        echo "could not requeue job $SLURM_JOB_ID; submit the same sbatch command again to continue" >&2
fi
exit "$status"
