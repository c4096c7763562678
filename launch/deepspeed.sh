#!/usr/bin/env bash
# Train with the DeepSpeed launcher: `megapatch train CONFIG [key=value ...]` on every rank.
#
#   one node:       launch/deepspeed.sh [--num_gpus N] CONFIG [key=value ...]
#   nodes via ssh:  launch/deepspeed.sh --hostfile FILE [--num_nodes N] [--num_gpus N] \
#                       [--master_addr NODE0] CONFIG [key=value ...]
#                   from one node, with passwordless ssh and pdsh to every host of FILE
#                   (lines "HOSTNAME slots=GPUS", see launch/hostfile.example)
#   per node:       on every node, for clusters without ssh between nodes:
#                   launch/deepspeed.sh --no_ssh --node_rank R (--hostfile FILE |
#                       --num_nodes N --master_addr NODE0) [--master_port P] CONFIG ...
#
#   --export VAR[,VAR...]  forward these variables too (ssh mode; see below)
#   --ssh_port P           sshd's port on the hosts (ssh mode; default: ssh's own)
#   --dry_run              print the launcher command (and forwarded variables), start nothing
#
# Ranks per node: parallel.gpus_per_node when the config sets it, else --num_gpus, else one
# per GPU here (1 on a CPU node). The config is checked against the launch first.
# Over ssh, the DeepSpeed launcher forwards only NCCL_*, PYTHON*, UCX_*, MV2_* and MLFLOW*
# variables; this script also forwards PATH, LD_LIBRARY_PATH, OMP_NUM_THREADS,
# TOKENIZERS_PARALLELISM and every MEGAPATCH_*, WANDB_*, HF_*, TORCH_*, TORCHDYNAMO_*,
# TORCHINDUCTOR_*, TRITON_*, CUDA_* and NVIDIA_* variable (through a DS_ENV_FILE it
# writes), plus those named with --export.
# SIGUSR1 or SIGTERM to this script: the ranks checkpoint and exit 0 (over ssh, the ranks
# of every node: the script signals the first node's through pdsh, see launch/README.md).
#
# Environment: PYTHON (interpreter with megapatch installed), DEEPSPEED_ARGS (extra
# launcher options, e.g. "--bind_cores_to_rank").
set -euo pipefail
PROG=deepspeed.sh
LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/common.sh
source "$LAUNCH_DIR/common.sh"

FORWARD_PREFIXES=(MEGAPATCH_ WANDB_ HF_ TORCH_ TORCHDYNAMO_ TORCHINDUCTOR_ TRITON_ CUDA_ NVIDIA_)
FORWARD_NAMES=(PATH LD_LIBRARY_PATH OMP_NUM_THREADS TOKENIZERS_PARALLELISM)

# Over ssh the ranks are not this script's descendants (each node's run below its sshd,
# this node's too), so a stop request goes out through pdsh: a helper on a node signals
# the ranks tagged with this launch's id there (common.sh, stop_tagged_ranks). One node's
# ranks are enough: at the next step boundary the ranks agree (an all-reduce of the stop
# flag), and all of them checkpoint and stop. Helpers on several nodes would each come at
# their own time, and a late SIGUSR1 kills a rank that is past its last step. So: the
# first host first, and the next one when a helper ends without having signalled a rank
# (none started there yet, or the host unreachable).
STOP_HELPER="" STOP_NEXT_HOST=0 STOP_DELIVERED=0
# shellcheck disable=SC2329  # called through DELIVER_STOP
_deliver_stop_over_ssh() {
    local -a hosts
    # shellcheck disable=SC2153  # HOSTS: from the preflight
    read -r -a hosts <<<"$HOSTS"
    [ "$STOP_DELIVERED" = 0 ] || return 0
    if ! command -v pdsh >/dev/null; then
        echo "$PROG: warning: no pdsh here: cannot reach the ranks on the nodes; signal them there" >&2
        DELIVER_STOP=:
        return 0
    fi
    if [ -n "$STOP_HELPER" ]; then
        ! _running "$STOP_HELPER" || return 0
        wait "$STOP_HELPER" && STOP_DELIVERED=1
        STOP_HELPER=""
        [ "$STOP_DELIVERED" = 0 ] || return 0
    fi
    _on_nodes "${hosts[STOP_NEXT_HOST]}" USR1
    STOP_HELPER=$!
    STOP_NEXT_HOST=$(((STOP_NEXT_HOST + 1) % ${#hosts[@]}))
}

# `stop_tagged_ranks ID SIGNAL` on the hosts $1 (comma-separated), in the background ($!).
_on_nodes() {
    (
        trap '' USR1 TERM # a second signal to the job must not cut a helper short
        export PDSH_RCMD_TYPE=ssh
        [ -z "$opt_ssh_port" ] || export PDSH_SSH_ARGS_APPEND="-p $opt_ssh_port"
        exec pdsh -S -w "$1" bash -c \
            "'PROG=$PROG; source \"$LAUNCH_DIR/common.sh\" && stop_tagged_ranks $LAUNCH_ID $2'"
    ) &
}

opt_num_gpus="" opt_num_nodes="" opt_hostfile="" opt_no_ssh=0 opt_node_rank="" opt_ssh_port=""
opt_master_addr="" opt_master_port=""
opt_dry_run=0 opt_exports=()
while [ $# -gt 0 ]; do
    case $1 in --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}" ;; esac
    case $1 in
        --num_gpus | --num-gpus | --num_accelerators) need_int "$@"; opt_num_gpus=$2; shift 2 ;;
        --num_nodes | --num-nodes) need_int "$@"; opt_num_nodes=$2; shift 2 ;;
        --hostfile) need_value "$@"; opt_hostfile=$2; shift 2 ;;
        --no_ssh | --no-ssh) opt_no_ssh=1; shift ;;
        --node_rank | --node-rank) need_int "$@"; opt_node_rank=$2; shift 2 ;;
        --master_addr | --master-addr) need_value "$@"; opt_master_addr=$2; shift 2 ;;
        --master_port | --master-port) need_int "$@"; opt_master_port=$2; shift 2 ;;
        --ssh_port | --ssh-port) need_int "$@"; opt_ssh_port=$2; shift 2 ;;
        --export) need_value "$@"; IFS=, read -r -a more <<<"$2"; opt_exports+=("${more[@]}"); shift 2 ;;
        --dry_run | --dry-run) opt_dry_run=1; shift ;;
        -h | --help) usage "$0"; exit 0 ;;
        --) shift; break ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) break ;;
    esac
done
[ $# -ge 1 ] || die "no config: usage: launch/deepspeed.sh [options] CONFIG [key=value ...]"
if [ "$opt_no_ssh" = 1 ]; then
    [ -n "$opt_node_rank" ] || die "--no_ssh needs --node_rank (this node's index, from 0)"
    [ -n "$opt_hostfile" ] || [ -n "$opt_num_nodes" ] || die "--no_ssh needs --hostfile FILE or --num_nodes N"
else
    [ -z "$opt_node_rank" ] || die "--node_rank is for --no_ssh mode (over ssh the launcher numbers the nodes)"
fi
ssh_mode=0
[ "$opt_no_ssh" = 1 ] || [ -z "$opt_hostfile" ] || ssh_mode=1

checks=(--launcher deepspeed)
[ -z "$opt_hostfile" ] || checks+=(--hostfile "$opt_hostfile")
[ "$ssh_mode" = 0 ] || checks+=(--ssh)
[ -z "$opt_num_nodes" ] || checks+=(--nnodes "$opt_num_nodes")
[ -z "$opt_node_rank" ] || checks+=(--node-rank "$opt_node_rank")
[ -z "$opt_num_gpus" ] || checks+=(--nproc-per-node "$opt_num_gpus")
[ -z "$opt_master_addr" ] || checks+=(--master-addr "$opt_master_addr")
preflight "${checks[@]}" -- "$@"

[ -n "$opt_master_port" ] || opt_master_port=${FREE_PORT:-29500}
cleanup=()
trap 'rm -f "${cleanup[@]}"' EXIT
launcher=("$PYTHON" -u -m deepspeed.launcher.runner --master_port "$opt_master_port")
if [ "$opt_no_ssh" = 1 ]; then
    if [ -z "$opt_hostfile" ]; then
        # The launcher takes the node count from a hostfile; the names are not used.
        opt_hostfile=$(mktemp "${TMPDIR:-/tmp}/megapatch-hostfile.XXXXXX")
        cleanup+=("$opt_hostfile")
        for ((i = 0; i < NNODES; i++)); do echo "node-$i slots=$NPROC_PER_NODE"; done >"$opt_hostfile"
    fi
    launcher+=(--no_ssh --hostfile "$opt_hostfile" --num_nodes "$NNODES" --node_rank "$NODE_RANK"
        --master_addr "$MASTER_ADDR" --num_gpus "$NPROC_PER_NODE")
elif [ "$ssh_mode" = 1 ]; then
    launcher+=(--hostfile "$opt_hostfile" --num_nodes "$NNODES" --num_gpus "$NPROC_PER_NODE")
    [ -z "$opt_master_addr" ] || launcher+=(--master_addr "$opt_master_addr")
    [ -z "$opt_ssh_port" ] || launcher+=(--ssh_port "$opt_ssh_port")
    # Variables for the ranks on the other nodes; DeepSpeed reads DS_ENV_FILE's KEY=VALUE lines.
    for wanted in "${opt_exports[@]}"; do
        [ -n "${!wanted+set}" ] || die "--export $wanted: no such variable in this environment"
    done
    env_file=$(mktemp "${TMPDIR:-/tmp}/megapatch-deepspeed-env.XXXXXX")
    cleanup+=("$env_file")
    while IFS= read -r name; do
        [ "$name" != MEGAPATCH_LAUNCH_ID ] || continue # this launch's own, below
        forward=0
        for prefix in "${FORWARD_PREFIXES[@]}"; do [[ $name == "$prefix"* ]] && forward=1; done
        for wanted in "${FORWARD_NAMES[@]}" "${opt_exports[@]}"; do [[ $name == "$wanted" ]] && forward=1; done
        [ "$forward" = 1 ] || continue
        value=${!name}
        if [[ $value == *[$'\n'\"\$\`\\]* ]]; then
            echo "$PROG: warning: not forwarding $name: its value has a newline, quote, \$, \` or \\" >&2
            continue
        fi
        printf '%s=%s\n' "$name" "$value"
    done < <(compgen -e | sort) >"$env_file"
    # Tags the remote launchers and ranks of this launch (and nothing here), so that a
    # stop request finds them on every node.
    LAUNCH_ID="${HOSTNAME%%.*}-$$-$RANDOM$RANDOM"
    echo "MEGAPATCH_LAUNCH_ID=$LAUNCH_ID" >>"$env_file"
    export DS_ENV_FILE=$env_file
    # (DeepSpeed starts the ranks of a one-host launch here, below itself, without ssh.)
    [ "$NNODES" -eq 1 ] || DELIVER_STOP=_deliver_stop_over_ssh
else
    # One node: localhost, with this node's devices (or the CUDA_VISIBLE_DEVICES subset).
    if [ -n "${CUDA_VISIBLE_DEVICES:-}" ] && [ "$DEVICE_KIND" = GPU ]; then
        devices=$(echo "$CUDA_VISIBLE_DEVICES" | cut -d, -f"1-$NPROC_PER_NODE")
        launcher+=(--include "localhost:$devices")
    else
        launcher+=(--num_gpus "$NPROC_PER_NODE")
        # The CPU accelerator counts NUMA nodes as devices unless told how many ranks.
        [ "$DEVICE_KIND" = GPU ] || export LOCAL_SIZE=$NPROC_PER_NODE
    fi
fi
# shellcheck disable=SC2206  # DEEPSPEED_ARGS is a list of options
launcher+=(${DEEPSPEED_ARGS:-} --no_local_rank --module megapatch train "$@")

echo "$PROG: $NNODES node(s) x $NPROC_PER_NODE rank(s) (world $WORLD_SIZE, $DEVICE_KIND)," \
    "run dir $RUN_DIR" >&2
if [ "$opt_dry_run" = 1 ]; then
    printf '%q ' "${launcher[@]}"
    echo
    if [ -n "${DS_ENV_FILE:-}" ]; then
        echo "# forwarded to every node (DS_ENV_FILE):"
        cat "$DS_ENV_FILE"
    fi
    exit 0
fi
rc=0
run_launcher "${launcher[@]}" || rc=$?
if [ "$DELIVER_STOP" = _deliver_stop_over_ssh ]; then
    trap '' USR1 TERM # a stop is under way, or the run is over
    [ -z "$STOP_HELPER" ] || wait "$STOP_HELPER" || true
    # DeepSpeed's launcher returns before the ranks do when it was signalled itself (its
    # own handler: each node's launcher then stops its ranks, see launch/README.md):
    # return only once no rank of this launch is left on any node.
    if [ "$rc" != 0 ]; then
        _on_nodes "${HOSTS// /,}" 0
        wait $! || true
    fi
fi
exit "$rc"
