#!/usr/bin/env bash
# Multi-node fine-tuning under Slurm: srun starts one DeepSpeed launcher per node
# (training_scripts/slurm/node.sh), the first node of the job is the master.
#
#   sbatch training_scripts/slurm/sbatch_multi_node.sh [OUTPUT] [ZERO_STAGE] [extra main.py flags...]
#
# Submit from the repository root with its environment active (sbatch passes the
# environment on): Slurm runs a copy of this file, so the repository is found through the
# submit directory (or SFT_REPO). OUTPUT must be on a file system every node sees. Each
# node runs SFT_RECIPE (default training_scripts/opt/multi_node/run_66b.sh) with these
# arguments; node 0 logs to OUTPUT/training.log, node N to OUTPUT/training.node<N>.log.
# Ten minutes before the time limit Slurm sends SIGUSR1: the run checkpoints, exits 75 and
# the job is requeued to continue (--resume_from_checkpoint auto). Edit the defaults below.
#SBATCH --job-name=sft
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

REPO=${SFT_REPO:-${SLURM_SUBMIT_DIR:-}}
NODE_SCRIPT=$REPO/training_scripts/slurm/node.sh
if [[ -z ${SLURM_JOB_ID:-} ]]; then
    echo "error: submit this script with sbatch: sbatch $0 [OUTPUT] [ZERO_STAGE] [extra flags...]" >&2
    exit 2
fi
if [[ ! -f $NODE_SCRIPT ]]; then
    echo "error: $NODE_SCRIPT not found: submit from the repository root, or set SFT_REPO to it" >&2
    exit 2
fi

SRUN=(srun --nodes "$SLURM_JOB_NUM_NODES" --ntasks-per-node 1 --kill-on-bad-exit=1)
# Since Slurm 22.05, srun no longer inherits --cpus-per-task from sbatch: without it the
# node's one task (and every rank it starts) would be bound to a single core.
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
    SRUN+=(--cpus-per-task "$SLURM_CPUS_PER_TASK")
fi
echo "job $SLURM_JOB_ID on $SLURM_JOB_NUM_NODES nodes ($SLURM_JOB_NODELIST): ${*:-(default arguments)}"
exec "${SRUN[@]}" bash "$NODE_SCRIPT" "$@"
