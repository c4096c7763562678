#!/usr/bin/env bash
# Everything only a GPU can show, in one run of a few minutes:
#   1. the Triton patch ops: compile every variant, fp32 exactness and bf16 accuracy against
#      float64, forward+backward time and memory against the reference, the chunked torch
#      backend, plain bf16 PyTorch and F.linear_cross_entropy (bench/gpu_ops.py);
#   2. training throughput and MFU of both phases of the paper's 370M model (bf16, ZeRO-2,
#      L=2048, V=32,000), patch and token steps interleaved on one DeepSpeed engine, with the
#      Triton ops (plus a profile of one step of each), with the Triton ops and every block
#      torch.compiled (train.compile=true), and with the chunked torch ops (bench/train.py).
#
#   bash bench/gpu_check.sh [DATA]    # DATA: a `megapatch prep` output (default data/shakespeare)
#
# JSON lands in $OUT if it is set, else bench/results/. Exit status: 0 every part passed,
# 1 a part failed (the others still run), 2 no usable GPU.
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
DATA=${1:-data/shakespeare}
RESULTS=${OUT:-bench/results}
mkdir -p "$RESULTS"
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: torch sees no CUDA device" >&2
    exit 2
fi
"$PYTHON" -c 'import torch, triton; print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}")' || exit 2
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader || true

unset TRITON_INTERPRET  # compile for the GPU, never interpret
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
failed=()

part() {  # part NAME SECONDS COMMAND...: run one part under a time limit, keep going on failure
    local name=$1 limit=$2
    shift 2
    echo
    echo "== $name (limit ${limit}s)"
    local start=$SECONDS
    timeout "$limit" "$@"
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start))s"
    [[ $rc == 0 ]] || failed+=("$name")
}

part ops 240 "$PYTHON" bench/gpu_ops.py --out "$RESULTS/gpu_ops.json"

if [[ -f "$DATA/manifest.json" ]]; then
    # 30 steps of 262,144 tokens: 20 patch steps (32 windows of 8,192 tokens), 10 token steps
    # (128 windows of 2,048); the bench times 4 steps of each phase after one warm-up round.
    train_args=(--config configs/paper-370m-patch.yaml --data "$DATA" --steps 4
        train.tokens_per_step=262144 train.total_tokens=7864320 train.micro_batch_size=16
        train.warmup_steps=2 parallel.gpus_per_node=null)
    part train-triton 180 "$PYTHON" bench/train.py "${train_args[@]}" --out "$RESULTS/gpu_train_triton.json" --profile "$RESULTS" \
        train.ops_backend=triton
    part train-triton-compiled 240 "$PYTHON" bench/train.py "${train_args[@]}" --out "$RESULTS/gpu_train_compiled.json" \
        train.ops_backend=triton train.compile=true
    part train-torch 180 "$PYTHON" bench/train.py "${train_args[@]}" --out "$RESULTS/gpu_train_torch.json" \
        train.ops_backend=torch
else
    echo "gpu_check: $DATA/manifest.json not found: run \`megapatch prep --sample shakespeare --out $DATA\`" >&2
    failed+=(train)
fi

echo
if ((${#failed[@]})); then
    echo "gpu_check: failed: ${failed[*]}"
    exit 1
fi
echo "gpu_check: all parts passed; JSON in $RESULTS"
