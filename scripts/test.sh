#!/usr/bin/env bash
# Set up (if needed), lint, type-check, check the import layers, run a shortened demo (the `tiny` profile through the same
# entry point as the README's demo) and the whole test suite, integration tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export GLYPH_DATA_DIR=${GLYPH_DATA_DIR:-$(cd .. && pwd)/shared/data}
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/lint-imports
PROFILE=tiny bash scripts/demo.sh --no-server --store "$(mktemp -d)/store"
.venv/bin/pytest "$@"
