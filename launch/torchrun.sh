#!/usr/bin/env bash
# Train with torchrun: `megapatch train CONFIG [key=value ...]` on every rank of this node.
#
#   one node:     launch/torchrun.sh [--nproc_per_node N] CONFIG [key=value ...]
#   many nodes:   run on every node, with the same options except the node rank:
#                 launch/torchrun.sh --nnodes N --node_rank R --master_addr NODE0 \
#                     [--master_port P] CONFIG [key=value ...]
#                 or --hostfile FILE: nodes and master from the file, rank from this host
#
# Ranks per node: parallel.gpus_per_node when the config sets it, else one per GPU here,
# else 1 (CPU). The config is checked against the launch before anything starts.
# SIGUSR1 or SIGTERM to this script: the ranks checkpoint at the next step and exit 0.
#
# Environment: PYTHON (interpreter with megapatch installed), TORCHRUN_ARGS (extra
# torchrun options, e.g. "--rdzv_conf timeout=900").
set -euo pipefail
PROG=torchrun.sh
LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/common.sh
source "$LAUNCH_DIR/common.sh"

opt_nnodes="" opt_node_rank="" opt_master_addr="" opt_master_port=29500
opt_nproc="" opt_hostfile=""
while [ $# -gt 0 ]; do
    case $1 in --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}" ;; esac
    case $1 in
        --nproc_per_node | --nproc-per-node) need_int "$@"; opt_nproc=$2; shift 2 ;;
        --nnodes) need_int "$@"; opt_nnodes=$2; shift 2 ;;
        --node_rank | --node-rank) need_int "$@"; opt_node_rank=$2; shift 2 ;;
        --master_addr | --master-addr) need_value "$@"; opt_master_addr=$2; shift 2 ;;
        --master_port | --master-port) need_int "$@"; opt_master_port=$2; shift 2 ;;
        --hostfile) need_value "$@"; opt_hostfile=$2; shift 2 ;;
        -h | --help) usage "$0"; exit 0 ;;
        --) shift; break ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) break ;;
    esac
done
[ $# -ge 1 ] || die "no config: usage: launch/torchrun.sh [options] CONFIG [key=value ...]"

checks=(--launcher torchrun)
[ -z "$opt_hostfile" ] || checks+=(--hostfile "$opt_hostfile")
[ -z "$opt_nnodes" ] || checks+=(--nnodes "$opt_nnodes")
[ -z "$opt_node_rank" ] || checks+=(--node-rank "$opt_node_rank")
[ -z "$opt_nproc" ] || checks+=(--nproc-per-node "$opt_nproc")
[ -z "$opt_master_addr" ] || checks+=(--master-addr "$opt_master_addr")
preflight "${checks[@]}" -- "$@"

if [ "$NNODES" -eq 1 ]; then
    rendezvous=(--standalone) # a free local port: several single-node runs can share a machine
else
    rendezvous=(--nnodes "$NNODES" --node_rank "$NODE_RANK"
        --master_addr "$MASTER_ADDR" --master_port "$opt_master_port")
fi
echo "$PROG: node ${NODE_RANK:-0} of $NNODES, $NPROC_PER_NODE rank(s) per node" \
    "(world $WORLD_SIZE, $DEVICE_KIND), run dir $RUN_DIR" >&2
# shellcheck disable=SC2086  # TORCHRUN_ARGS is a list of options
run_launcher "$PYTHON" -m torch.distributed.run "${rendezvous[@]}" \
    --nproc_per_node "$NPROC_PER_NODE" --max_restarts 0 ${TORCHRUN_ARGS:-} \
    -m megapatch train "$@"
