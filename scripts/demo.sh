#!/usr/bin/env bash
# Set up (if needed) and run the whole pipeline on CPU with SmolLM2-135M and the real data.
#
# Data: $GLYPH_DATA_DIR, else ../shared/data beside the checkout; without either, the sources
# are loaded from the Hugging Face Hub (needs network). Prefect: a local server is started in
# the background on first use and reused (UI at the address printed at the end); stop it with
# `.venv/bin/glyph server stop`. Extra arguments go to `glyph run` (e.g. --set train.epochs=2).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -z "${GLYPH_DATA_DIR:-}" ] && [ -d ../shared/data ]; then
  GLYPH_DATA_DIR=$(cd ../shared/data && pwd)
  export GLYPH_DATA_DIR
fi
if [ -n "${GLYPH_DATA_DIR:-}" ] && [ -d "$GLYPH_DATA_DIR" ]; then
  echo "==> data: local files in $GLYPH_DATA_DIR"
else
  [ -n "${GLYPH_DATA_DIR:-}" ] && echo "==> GLYPH_DATA_DIR=$GLYPH_DATA_DIR does not exist" >&2
  unset GLYPH_DATA_DIR
  echo "==> data: no ../shared/data beside the checkout; loading GSM8K, SVAMP and MATH from the Hugging Face Hub"
fi
echo "==> glyph run --profile ${PROFILE:-demo} (first run: converts SmolLM2 to safetensors, trains, evaluates)"
exec .venv/bin/glyph run --profile "${PROFILE:-demo}" "$@"
