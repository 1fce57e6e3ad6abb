# shellcheck shell=bash
# shellcheck disable=SC2034  # MAIN, EXTRA_ARGS, ... are set here for the sourcing launcher.
# Shared plumbing for the launchers under training_scripts/; sourced, never run.
#
# Every launcher is `bash <script> [OUTPUT] [ZERO_STAGE] [extra main.py flags...]` and does:
#   source "$(dirname "${BASH_SOURCE[0]}")/../../common.sh"
#   parse_launcher_args <default ZERO_STAGE> "$@"   # sets OUTPUT, ZERO_STAGE, EXTRA_ARGS, LOG
#   single_gpu_launcher | single_node_launcher | multi_node_launcher   # sets LAUNCHER
#   run_logged "${LAUNCHER[@]}" "$MAIN" --config "$RECIPES/<family>.yaml" --flags... "${EXTRA_ARGS[@]}"
# The recipe holds the family's shared settings; the script's flags override it, and extra
# flags come last, so they override both (argparse keeps the last value).
#
# Environment a user may set:
#   NUM_GPUS      single-node scripts: how many GPUs to use (default: every visible GPU)
#   MASTER_PORT   rendezvous port (default: DeepSpeed's 29500)
#   HOSTFILE      multi-node scripts: DeepSpeed hostfile (default /job/hostfile)
#   NODE_RANK     multi-node without ssh (SLURM and similar start one launcher per node):
#                 this node's index in HOSTFILE (default: $SLURM_NODEID when set)
#   MASTER_ADDR   multi-node: address of the HOSTFILE's first node (required with NODE_RANK)
#   DS_LOG_LEVEL  DeepSpeed launcher verbosity (default warning; info shows its set-up lines)

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MAIN="$REPO_ROOT/main.py"
# Each launcher family's shared settings, passed to main.py with --config (its flags override).
RECIPES="$REPO_ROOT/training_scripts/recipes"
# Lines reach the terminal and training.log as they are printed, not in 4 KiB bursts.
export PYTHONUNBUFFERED=1

# die MESSAGE [MORE...]: one error line, each further argument on a line of its own.
die() {
    echo "error: $1" >&2
    shift
    if (($#)); then
        printf '  %s\n' "$@" >&2
    fi
    exit 2
}

# parse_launcher_args DEFAULT_STAGE [OUTPUT] [ZERO_STAGE] [extra flags...]
parse_launcher_args() {
    local default_stage=$1 usage
    shift
    OUTPUT=${1:-./output}
    ZERO_STAGE=${2:-$default_stage}
    EXTRA_ARGS=("${@:3}")
    usage="usage: bash $0 [OUTPUT] [ZERO_STAGE 0-3] [extra main.py flags...], e.g. bash $0 ./output $default_stage --dry_run"
    # A flag in the first two places means the positional arguments were left out.
    if [[ $OUTPUT == -* ]]; then
        die "OUTPUT (the first argument) is '$OUTPUT', a flag: give the output folder and ZERO_STAGE before any flag." \
            "$usage"
    fi
    if [[ ! $ZERO_STAGE =~ ^[0-3]$ ]]; then
        die "ZERO_STAGE (the second argument) is '$ZERO_STAGE'; use 0, 1, 2 or 3." "$usage"
    fi
    mkdir -p "$OUTPUT" || die "OUTPUT (the first argument) '$OUTPUT' cannot be created; choose a folder you can write."
    LOG="$OUTPUT/training.log"
}

single_gpu_launcher() {
    LAUNCHER=(deepspeed --log_level "${DS_LOG_LEVEL:-warning}" --num_gpus 1)
    add_master_port
}

# The DeepSpeed launcher on this machine: every GPU, or NUM_GPUS of them.
single_node_launcher() {
    LAUNCHER=(deepspeed --log_level "${DS_LOG_LEVEL:-warning}")
    if [[ -n ${NUM_GPUS:-} ]]; then
        LAUNCHER+=(--num_gpus "$NUM_GPUS")
    fi
    add_master_port
}

# The DeepSpeed launcher across the nodes of HOSTFILE: over ssh (pdsh) from one node, or,
# with NODE_RANK set, one launcher per node started by a scheduler (--no_ssh).
multi_node_launcher() {
    HOSTFILE=${HOSTFILE:-/job/hostfile}
    NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-}}
    [[ -f $HOSTFILE ]] ||
        die "hostfile '$HOSTFILE' not found: set HOSTFILE to a file with one line per node, e.g. 'worker-1 slots=8'"
    LAUNCHER=(deepspeed --log_level "${DS_LOG_LEVEL:-warning}" --hostfile "$HOSTFILE")
    if [[ -n $NODE_RANK ]]; then
        [[ -n ${MASTER_ADDR:-} ]] ||
            die "NODE_RANK=$NODE_RANK (launch without ssh) also needs MASTER_ADDR, the address of the first node in $HOSTFILE"
        LAUNCHER+=(--no_ssh --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR")
        # Nodes often share OUTPUT; each keeps its own log, node 0 the usual training.log.
        if [[ $NODE_RANK != 0 ]]; then
            LOG="$OUTPUT/training.node$NODE_RANK.log"
        fi
    elif [[ -n ${MASTER_ADDR:-} ]]; then
        LAUNCHER+=(--master_addr "$MASTER_ADDR")
    fi
    add_master_port
}

add_master_port() {
    if [[ -n ${MASTER_PORT:-} ]]; then
        LAUNCHER+=(--master_port "$MASTER_PORT")
    fi
}

# run_logged COMMAND...: run it with its output on the terminal and appended to $LOG,
# then say where the model and the log went, or why it failed.
run_logged() {
    local start status
    start=$(($(stat -c %s "$LOG" 2>/dev/null || echo 0) + 1))
    echo "=== $(date '+%Y-%m-%d %H:%M:%S') $*" >>"$LOG"
    set +e
    "$@" 2>&1 | tee -a "$LOG"
    status=${PIPESTATUS[0]}
    set -e
    if ((status != 0)); then
        explain_failure "$status" "$start"
        exit "$status"
    fi
    if [[ -f $OUTPUT/config.json ]]; then
        echo "fine-tuned model: $OUTPUT"
    else
        echo "no model saved in $OUTPUT (a --dry_run trains nothing)"
    fi
    echo "training log: $LOG"
    if [[ -f $OUTPUT/metrics.jsonl ]]; then
        echo "metrics: $OUTPUT/metrics.jsonl   curves: $OUTPUT/training_curves.png"
    fi
}

# explain_failure STATUS LOG_OFFSET: the kernel's out-of-memory killer leaves no Python
# error behind, only a SIGKILL (DeepSpeed's launcher reports it as return code -9).
explain_failure() {
    local status=$1 start=$2
    if ((status == 137)) || tail -c "+$start" "$LOG" | grep -q "return code = -9"; then
        {
            echo "error: a training process was killed (SIGKILL), most likely for lack of CPU memory."
            echo "  Each rank loads the model into CPU memory before DeepSpeed shards it, and"
            echo "  --offload keeps optimizer states there. Flags that need less CPU memory:"
            echo "    --zero_stage 3 (loads the model already sharded)"
            echo "    no --offload, or fewer ranks per node (NUM_GPUS)"
        } | tee -a "$LOG" >&2
    fi
    echo "training failed (exit status $status); full log: $LOG" | tee -a "$LOG" >&2
}
