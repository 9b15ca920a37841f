#!/usr/bin/env bash
# Build model-store/whisper.mar: the handler, its modules, the rendered model-config.yaml
# and the checkpoint whisper-models/whisper_<model>.pth.
#
# Environment: WHISPER_MODEL (default base), WHISPER_MODEL_STORE (default ./model-store),
# WHISPER_DEVICE, WHISPER_WORKERS and the handler settings of handler/settings.py (HANDLER_ENV).
# The archive is rebuilt only when one of its inputs changed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODEL="${WHISPER_MODEL:-base}"
STORE="${WHISPER_MODEL_STORE:-$ROOT/model-store}"
CHECKPOINT="$ROOT/whisper-models/whisper_${MODEL}.pth"
HANDLER="$ROOT/handler/whisper_handler.py"

case "${1:-}" in -h|--help) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; esac

command -v torch-model-archiver >/dev/null 2>&1 || python -m pip install --quiet -r "$ROOT/model-archiver/requirements.txt"
[ -f "$HANDLER" ] || { echo "error: handler not found: $HANDLER" >&2; exit 1; }
[ -f "$CHECKPOINT" ] || { echo "error: no checkpoint $CHECKPOINT; run scripts/download_model.py --model $MODEL" >&2; exit 1; }

mkdir -p "$STORE"
# Build beside the store so the final mv is a rename on one filesystem.
BUILD="$(mktemp -d "$STORE/.build.XXXXXX")"
trap 'rm -rf "$BUILD"' EXIT

python "$ROOT/model-archiver/render_model_config.py" "$ROOT/config/model-config.yaml" "$BUILD/model-config.yaml" --model "$MODEL"

# Every plain module in handler/ travels with the handler (flat, importable by name).
EXTRA_FILES="$(find "$ROOT/handler" -maxdepth 1 -name '*.py' ! -name whisper_handler.py | sort | paste -sd, -)"

STAMP="$STORE/.whisper.mar.inputs"
INPUTS="$( { sha256sum "$HANDLER" $(echo "$EXTRA_FILES" | tr ',' ' ') "$BUILD/model-config.yaml"; stat -c '%n %s %Y' "$CHECKPOINT"; } | sed "s#$ROOT/##; s#$BUILD/##" | sha256sum | cut -d' ' -f1)"
if [ -f "$STORE/whisper.mar" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$INPUTS" ]; then
  echo "whisper.mar is up to date ($STORE/whisper.mar)" >&2
  exit 0
fi

echo "building $STORE/whisper.mar (model $MODEL)" >&2
torch-model-archiver \
  --model-name whisper \
  --version 1.0 \
  --serialized-file "$CHECKPOINT" \
  --handler "$HANDLER" \
  --extra-files "$EXTRA_FILES" \
  --config-file "$BUILD/model-config.yaml" \
  --export-path "$BUILD" \
  --force
# Move into place atomically so a running TorchServe never sees half an archive.
mv -f "$BUILD/whisper.mar" "$STORE/whisper.mar"
echo "$INPUTS" > "$STAMP"
echo "built $STORE/whisper.mar" >&2
