#!/usr/bin/env bash
# The extra wheels for fast SFT on the lent H100 (issue 18), installed after the main set
# (scripts/wheelsets/h100-vllm.sh): Liger Kernel, pure Python + Triton, whose dependencies
# (torch, triton) the host has.
#
#   bash scripts/wheelsets/h100-sft.sh DEST HOST_FREEZE
#   # on the host, after the main set's install.sh:  bash DEST/batch-01/install.sh
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
dest=${1:?usage: h100-sft.sh DEST HOST_FREEZE}
freeze=${2:?usage: h100-sft.sh DEST HOST_FREEZE (pip list --format=freeze of the host)}
exec bash "$repo/scripts/offline_wheels.sh" \
  --python "${PYTHON312:-python3.12}" --python-version 3.12 --glibc 2.35 --arch x86_64 \
  --host-freeze "$freeze" --dest "$dest" \
  liger-kernel==0.8.5 \
  --split-mib 55 --batch-mib 58 \
  --smoke-import liger_kernel --smoke-import liger_kernel.transformers
