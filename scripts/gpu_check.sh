#!/usr/bin/env bash
# On a lent GPU machine (the device tool), from the repository root, carrying .gpu (made
# here by `scripts/gpu_check.py pack`): install the carried wheels, run the checks, print
# the table (scripts/gpu_check.py run --help says what each row is).
#
#   run(command="bash scripts/gpu_check.sh", carry=[".gpu"], timeout_s=540)
set -euo pipefail
if [ "${1:-}" = "--help" ] || [ "${1:-}" = "-h" ]; then
    sed -n '2,6p' "$0"; exit 0
fi
[ -f .gpu/weights.pt ] || { echo "no .gpu/weights.pt: run scripts/gpu_check.py pack here first" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec python3 scripts/gpu_check.py run --dir .gpu --out "${OUT:-.gpu/out}" "$@"
