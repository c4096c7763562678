#!/usr/bin/env bash
# Everything issue 16 needs a GPU for, in one run of at most 8 minutes on one H200:
#   1. ops (bench/gpu_ops.py): every Triton loss mode (atomic, gemm, recompute, in-forward)
#      compiled, checked in fp32 against float64 and in bf16 against plain bf16 PyTorch's
#      error, and timed forward+backward with its peak memory at N=8192 V=32000 D=1024 and
#      N=16384 V=128256 D=4096 (K=4), beside plain bf16 PyTorch, torch's
#      F.linear_cross_entropy, Liger-Kernel's fused linear cross-entropy and
#      cut-cross-entropy (unpacked from wheels/ when not installed); it names the fastest
#      mode that passed (verdict.fastest_mode in gpu_ops.json);
#   2. train-fastest (bench/train.py): the paper's 370M model (bf16, ZeRO-2, L=2048,
#      V=32,000, every block torch.compiled), patch and token steps interleaved on one
#      DeepSpeed engine, MFU per phase, with the fastest mode (MEGAPATCH_LOSS_BACKWARD) and
#      a profile of one step of each phase (top lines printed and kept in the JSON);
#   3. train-default: the same with today's default mode, when it is not the fastest and
#      the time budget has room.
#
#   bash bench/gpu_check.sh [DATA]     # DATA: a `megapatch prep` output (default data/shakespeare)
#   bash bench/gpu_check.sh --dry-run  # on a CPU: the same plumbing at tiny sizes (interpreter)
#
# JSON lands in $OUT if it is set, else bench/results/: gpu_ops.json, gpu_train_*.json,
# profile_*.txt and gpu_check.json (each part's exit status and seconds). The whole run is
# bounded by GPU_CHECK_BUDGET_S (default 470 s): a part gets what is left of it, an optional
# part is skipped when too little is. GPU_CHECK_PARTS="ops train" (default) picks parts (a
# rerun of the training alone: GPU_CHECK_PARTS=train, with GPU_CHECK_MODE=MODE or the mode
# an earlier ops part wrote). Exit status: 0 every part passed, 1 a part failed (the others
# still run), 2 no usable GPU.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
if [[ ${1:-} == --dry-run ]]; then
    DRY_RUN=1
    shift
fi
PYTHON=${PYTHON:-python}
DATA=${1:-data/shakespeare}
RESULTS=${OUT:-bench/results}
BUDGET=${GPU_CHECK_BUDGET_S:-470}
OPS_LIMIT=240
if ((DRY_RUN)); then # the interpreter is slow, and a CPU shared with other jobs slower
    BUDGET=${GPU_CHECK_BUDGET_S:-900}
    OPS_LIMIT=600
fi
PARTS=" ${GPU_CHECK_PARTS:-ops train} "
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

if ((DRY_RUN)); then
    echo "gpu_check: dry run on the CPU (Triton interpreter, tiny shapes, the tiny config)"
else
    if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        echo "gpu_check: torch sees no CUDA device" >&2
        exit 2
    fi
    "$PYTHON" -c 'import torch, triton; print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}")' || exit 2
    nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader || true
    unset TRITON_INTERPRET # compile for the GPU, never interpret
fi

failed=()
parts=()
part() { # part NAME LIMIT COMMAND...: run one part within min(LIMIT, the budget left)
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - SECONDS))
    ((limit > left)) && limit=$left
    if ((limit < 20)); then
        echo "== $name: skipped, ${left}s of the budget left"
        failed+=("$name")
        parts+=("\"$name\": {\"skipped\": true}")
        return
    fi
    echo
    echo "== $name (limit ${limit}s, ${left}s of the budget left)"
    local start=$SECONDS
    timeout "$limit" "$@"
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start))s"
    [[ $rc == 0 ]] || failed+=("$name")
    parts+=("\"$name\": {\"exit\": $rc, \"seconds\": $((SECONDS - start))}")
}

json_get() { # json_get FILE EXPRESSION: a value from a JSON file ('' if absent)
    "$PYTHON" - "$1" "$2" <<'EOF'
import json, sys
try:
    value = eval(sys.argv[2], {"j": json.load(open(sys.argv[1]))})
except Exception:
    value = None
print("" if value is None else value)
EOF
}

ops_args=(--out "$RESULTS/gpu_ops.json")
((DRY_RUN)) && ops_args+=(--dry-run)
[[ $PARTS == *" ops "* ]] && part ops $OPS_LIMIT "$PYTHON" bench/gpu_ops.py "${ops_args[@]}"

FASTEST=${GPU_CHECK_MODE:-$(json_get "$RESULTS/gpu_ops.json" 'j["verdict"]["fastest_mode"]')}
DEFAULT=$(json_get "$RESULTS/gpu_ops.json" 'j["verdict"]["default_mode"]')
FASTEST_FP32=$(json_get "$RESULTS/gpu_ops.json" 'j["verdict"]["fastest_logits_fp32"]')
DEFAULT=${DEFAULT:-atomic}
if [[ -z $FASTEST ]]; then
    echo "gpu_check: the ops part named no fastest mode; training with the default ($DEFAULT)"
    FASTEST=$DEFAULT
fi
LOGITS_FP32=0
[[ $FASTEST_FP32 == True ]] && LOGITS_FP32=1
echo "gpu_check: fastest Triton loss mode $FASTEST (fp32 logits: $LOGITS_FP32), default $DEFAULT"

if [[ $PARTS != *" train "* ]]; then
    echo "gpu_check: training not asked for (GPU_CHECK_PARTS=$PARTS)"
elif [[ -f "$DATA/manifest.json" ]]; then
    if ((DRY_RUN)); then
        train_args=(--config configs/tiny.yaml --data "$DATA" --steps 1 train.ops_backend=torch)
        fastest_limit=240
    else
        # 30 steps of 262,144 tokens: 20 patch steps (32 windows of 8,192 tokens), 10 token
        # steps (128 windows of 2,048); the bench times 4 steps of each phase after a warm-up.
        train_args=(--config configs/paper-370m-patch.yaml --data "$DATA" --steps 4
            train.tokens_per_step=262144 train.total_tokens=7864320 train.micro_batch_size=16
            train.warmup_steps=2 parallel.gpus_per_node=null train.ops_backend=triton
            train.compile=true)
        fastest_limit=240
    fi
    MEGAPATCH_LOSS_BACKWARD=$FASTEST MEGAPATCH_LOSS_LOGITS_FP32=$LOGITS_FP32 part train-fastest $fastest_limit "$PYTHON" bench/train.py \
        "${train_args[@]}" --out "$RESULTS/gpu_train_$FASTEST.json" --profile "$RESULTS"
    if [[ $FASTEST != "$DEFAULT" ]] && ((BUDGET - SECONDS >= 120)); then
        MEGAPATCH_LOSS_BACKWARD=$DEFAULT part train-default 180 "$PYTHON" bench/train.py \
            "${train_args[@]}" --out "$RESULTS/gpu_train_$DEFAULT.json"
    elif [[ $FASTEST != "$DEFAULT" ]]; then
        echo "gpu_check: train-default skipped, $((BUDGET - SECONDS))s of the budget left"
    fi
else
    echo "gpu_check: $DATA/manifest.json not found: run \`megapatch prep --sample shakespeare --out $DATA\` (needs the network) or bring the folder" >&2
    failed+=(train)
fi

train_summary() { # train_summary FILE: tokens/s and MFU per phase, one line
    "$PYTHON" - "$1" <<'EOF'
import json, sys
try:
    inter = json.load(open(sys.argv[1]))["interleaved"]
except Exception as exc:
    sys.exit(f"unreadable ({exc})")
parts = []
for name, row in inter["phases"].items():
    mfu = "-" if row["mfu"] is None else f"{row['mfu']:.1%}"
    parts.append(f"{name} {row['tokens_per_s']:,.0f} tok/s, MFU {mfu}")
print(f"loss mode {inter.get('triton_loss_mode')}: " + "; ".join(parts)
      + f"; patch/token {inter['patch_over_token']:.2f}x")
EOF
}

echo
modes=("$FASTEST")
[[ $DEFAULT != "$FASTEST" ]] && modes+=("$DEFAULT")
for mode in "${modes[@]}"; do
    f="$RESULTS/gpu_train_$mode.json"
    [[ -f $f ]] && echo "train: $(train_summary "$f")"
done
{
    printf '{"dry_run": %s, "budget_s": %s, "seconds": %s, "fastest_mode": "%s", "default_mode": "%s", "parts": {' \
        "$( ((DRY_RUN)) && echo true || echo false)" "$BUDGET" "$SECONDS" "$FASTEST" "$DEFAULT"
    (IFS=,; printf '%s' "${parts[*]}")
    printf '}, "failed": ['
    first=1
    for name in "${failed[@]}"; do
        ((first)) || printf ','
        printf '"%s"' "$name"
        first=0
    done
    printf ']}\n'
} >"$RESULTS/gpu_check.json"
if ((${#failed[@]})); then
    echo "gpu_check: failed: ${failed[*]} (${SECONDS}s); JSON in $RESULTS"
    exit 1
fi
echo "gpu_check: all parts passed in ${SECONDS}s; JSON in $RESULTS"
