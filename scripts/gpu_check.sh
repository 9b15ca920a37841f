#!/usr/bin/env bash
# The device run of scripts/gpu_check.py, from the repository root, carrying .gpu (made
# here by `scripts/gpu_check.py pack`): check the machine's imports, install the carried
# wheels, run the checks; rows print as they are measured and go to $OUT/rows.jsonl.
#
#   run(command="bash scripts/gpu_check.sh", carry=[".gpu"], timeout_s=420)   # on the card
#   bash scripts/gpu_check.sh --rehearse                  # here: the same path on the CPU
set -euo pipefail
case "${1:-}" in
  -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
esac
DIR="${GPU_DIR:-.gpu}"  # what `gpu_check.py pack` wrote (its --dir)
[ -f "$DIR/weights.pt" ] || { echo "no $DIR/weights.pt: run scripts/gpu_check.py pack here first" >&2; exit 2; }
export PYTHONUNBUFFERED=1
if [ "${1:-}" = "--rehearse" ]; then
  shift
  # Here: the project's interpreter, the modules the GPU machine lacks blocked (gpu_check.py).
  PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
  exec "$PY" scripts/gpu_check.py run --device cpu --rehearse --dir "$DIR" --out "${OUT:-$DIR/rehearsal}" "$@"
fi
# There: what the image must have before anything is unpacked (a missing one fails in seconds).
python3 -c "import numba, numpy, torch, tiktoken, onnxruntime, transformers, regex" \
  || { echo "preflight: the machine lacks a module the run needs" >&2; exit 3; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$DIR"/wheels/*.whl
export PYTHONPATH=/tmp/site
python3 -c "import whisper, silero_vad, jiwer, rapidfuzz" \
  || { echo "preflight: a carried wheel does not import" >&2; exit 3; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec python3 scripts/gpu_check.py run --dir "$DIR" --out "${OUT:-$DIR/out}" "$@"
