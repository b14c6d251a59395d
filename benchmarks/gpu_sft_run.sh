#!/usr/bin/env bash
# Issue 18's GPU measurements, in parts that each fit one device call (< 10 min on an H100).
# Output under $OUT (default benchmarks/results/gpu_sft): JSON, logs, tables, the loss plot.
#
#   GLYPH_DATA_DIR=/path/to/data bash benchmarks/gpu_sft_run.sh PART [PART ...]
#
# PARTs:
#   sft-a       benchmarks/gpu.py SFT on the Qwen2.5-7B shape, the study's real rows (<= 2,048
#               tokens): original, today, padding_free, liger, micro, checkpointing (~7 min)
#   sft-b       the same rows: flex, flex_checkpointing, compile, auto, packing (~7 min)
#   uniform     the issue's bare-loop setting, rows of 1,024 tokens: today, liger, micro,
#               checkpointing, auto (~6 min)
#   loss        benchmarks/sft_loss_check.py: SmolLM2, 300 steps, current / fast / current seed 1 (~5 min)
#   projection  benchmarks/projection.py from the rates in $OUT (CPU, ~1 min)
# Needs the packages of scripts/wheelsets/h100-sft.sh (or the vLLM set plus liger-kernel).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-benchmarks/results/gpu_sft}
PY=${PYTHON:-python3}
parts=("$@")
[ ${#parts[@]} -gt 0 ] || { echo "error: name one or more PARTs: sft-a sft-b uniform loss projection" >&2; exit 2; }
for p in "${parts[@]}"; do
  case "$p" in sft-a|sft-b|uniform|loss|projection) ;; *) echo "error: unknown part $p" >&2; exit 2 ;; esac
done
if [ -z "${GLYPH_DATA_DIR:-}" ] || [ ! -f "$GLYPH_DATA_DIR/gsm8k/train.jsonl" ]; then
  echo "error: GLYPH_DATA_DIR must point at the data (gsm8k/train.jsonl, svamp/, math/)" >&2
  exit 2
fi
mkdir -p "$OUT"
tok=$("$PY" -c 'from glyph_core.models import resolve_base_model; print(resolve_base_model("smollm2-135m"))')
sft() {  # NAME CONFIG... : one benchmarks/gpu.py SFT run
  local name=$1; shift
  "$PY" benchmarks/gpu.py --tokenizer "$tok" --skip generate vllm --data "$GLYPH_DATA_DIR" \
    --out "$OUT/$name.json" --sft-timeout 240 "$@" 2>&1 | tee "$OUT/$name.log"
}
for p in "${parts[@]}"; do
  echo "==> $p"
  case "$p" in
    sft-a) sft sft_a --sft-configs original today padding_free liger micro checkpointing ;;
    sft-b) sft sft_b --sft-configs flex flex_checkpointing compile auto packing ;;
    uniform)
      sft sft_uniform1024 --sft-rows uniform --sft-seq-len 1024 \
        --sft-configs today liger micro checkpointing auto ;;
    loss) "$PY" benchmarks/sft_loss_check.py --data "$GLYPH_DATA_DIR" --out "$OUT/loss_check" 2>&1 \
        | tee "$OUT/loss_check.log" ;;
    projection)
      gpu=()
      for f in benchmarks/results/gpu_vllm/throughput.json "$OUT/sft_a.json" "$OUT/sft_b.json"; do
        [ -f "$f" ] && gpu+=(--from-gpu-json "$f")
      done
      "$PY" benchmarks/projection.py --data "$GLYPH_DATA_DIR" "${gpu[@]}" --out "$OUT/projection.json" 2>&1 \
        | tee "$OUT/projection.log" ;;
  esac
done
