#!/usr/bin/env bash
# Set up (if needed) and run the whole pipeline on CPU with SmolLM2-135M and the real data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export GLYPH_DATA_DIR=${GLYPH_DATA_DIR:-$(cd .. && pwd)/shared/data}
exec .venv/bin/glyph run --profile "${PROFILE:-demo}" "$@"
