#!/usr/bin/env bash
# The prepared GPU check (issue 17): paper-preset training steps in bf16 with MFU, the oracle on the
# device on a slice of patterns against the CPU, routed generation. Under ~8 minutes on one H200:
#   bash benchmarks/gpu_check.sh                    # paper preset on cuda, figures into ./gpu_check.json
#   bash benchmarks/gpu_check.sh tiny cpu           # the same code on the CPU (CI runs this: it cannot rot)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
config="${1:-paper}"
device="${2:-cuda}"
shift $(( $# < 2 ? $# : 2 ))
extra=()
if [ "$config" = "paper" ]; then extra=(--steps 30 --batch 8 --oracle-tokens 2048); fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
python "$here/gpu_check.py" --config "$config" --device "$device" "${extra[@]}" --json gpu_check.json "$@"
