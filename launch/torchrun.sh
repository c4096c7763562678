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

nnodes="" node_rank="" master_addr="" master_port=29500 nproc="" hostfile=""
while [ $# -gt 0 ]; do
    case $1 in --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}" ;; esac
    case $1 in
        --nproc_per_node | --nproc-per-node) need_int "$@"; nproc=$2; shift 2 ;;
        --nnodes) need_int "$@"; nnodes=$2; shift 2 ;;
        --node_rank | --node-rank) need_int "$@"; node_rank=$2; shift 2 ;;
        --master_addr | --master-addr) need_value "$@"; master_addr=$2; shift 2 ;;
        --master_port | --master-port) need_int "$@"; master_port=$2; shift 2 ;;
        --hostfile) need_value "$@"; hostfile=$2; shift 2 ;;
        -h | --help) usage "$0"; exit 0 ;;
        --) shift; break ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) break ;;
    esac
done
[ $# -ge 1 ] || die "no config: usage: launch/torchrun.sh [options] CONFIG [key=value ...]"

checks=(--launcher torchrun)
[ -z "$hostfile" ] || checks+=(--hostfile "$hostfile")
[ -z "$nnodes" ] || checks+=(--nnodes "$nnodes")
[ -z "$node_rank" ] || checks+=(--node-rank "$node_rank")
[ -z "$nproc" ] || checks+=(--nproc-per-node "$nproc")
[ -z "$master_addr" ] || checks+=(--master-addr "$master_addr")
preflight "${checks[@]}" -- "$@"

if [ "$NNODES" -eq 1 ]; then
    rendezvous=(--standalone) # a free local port: several single-node runs can share a machine
else
    rendezvous=(--nnodes "$NNODES" --node_rank "$NODE_RANK"
        --master_addr "$MASTER_ADDR" --master_port "$master_port")
fi
echo "$PROG: node ${NODE_RANK:-0} of $NNODES, $NPROC_PER_NODE rank(s) per node" \
    "(world $WORLD_SIZE, $DEVICE_KIND), run dir $RUN_DIR" >&2
# shellcheck disable=SC2086  # TORCHRUN_ARGS is a list of options
run_launcher "$PYTHON" -m torch.distributed.run "${rendezvous[@]}" \
    --nproc_per_node "$NPROC_PER_NODE" --max_restarts 0 ${TORCHRUN_ARGS:-} \
    -m megapatch train "$@"
