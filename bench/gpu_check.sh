#!/usr/bin/env bash
# Check the Triton patch-op kernels on a CUDA machine, in under five minutes:
#   compile every kernel variant, check fp32 exactness against float64, check bf16 accuracy
#   against a float64 truth (no worse than plain bf16 PyTorch + 1e-2), time forward+backward
#   against the reference and the chunked torch backend.
#
#   bash bench/gpu_check.sh                  # JSON to $OUT/gpu_ops.json if OUT is set,
#                                            # else bench/results/gpu_ops.json
# Exit status: 0 all checks pass, 1 a check failed, 2 no usable GPU, 124 it ran too long.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: torch sees no CUDA device" >&2
    exit 2
fi
if ! "$PYTHON" -c 'import triton' 2>/dev/null; then
    echo "gpu_check: triton is not installed" >&2
    exit 2
fi
"$PYTHON" -c 'import torch, triton; print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}")'
nvidia-smi --query-gpu=name,memory.used,memory.total,utilization.gpu --format=csv,noheader || true

if [[ -n "${OUT:-}" ]]; then
    result="$OUT/gpu_ops.json"
    mkdir -p "$OUT"
else
    result="bench/results/gpu_ops.json"
fi
unset TRITON_INTERPRET  # compile for the GPU, never interpret
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# 290 s leaves room under the five-minute budget for the checks above.
timeout 290 "$PYTHON" bench/gpu_ops.py --out "$result" "$@"
