#!/usr/bin/env bash
# Set up (if needed), lint, type-check and run the whole test suite, integration tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export GLYPH_DATA_DIR=${GLYPH_DATA_DIR:-$(cd .. && pwd)/shared/data}
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/pytest "$@"
