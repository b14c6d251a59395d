#!/usr/bin/env bash
# The H100 study of issue 16 in one command: `glyph sweep` over the 8 recipes of
# benchmarks/sweep_study.yaml (docs/sweep.md), SmolLM2-135M-Instruct as the student, the
# reference teacher, the real data from $GLYPH_DATA_DIR, evaluation through vLLM on a stratified
# held-out sample of 100 problems per (source, difficulty level): ~1,180 problems, 200 per MATH
# level group (levels 1-2, 4-5) and 300-500 per difficulty bucket, so the rates' 95 % intervals
# are about +-7 points or narrower. It writes the sweep's table, plot, record, each point's
# metrics, the command and the log to $OUT (a folder to copy to benchmarks/results/sweep/).
#
#   GLYPH_DATA_DIR=/path/to/data bash benchmarks/sweep_study.sh
#   DRY_RUN=1 bash benchmarks/sweep_study.sh     # on CPU: the tiny profile, a few problems, seconds a point
#
# Planned for ~15 minutes on one H100; measured there (benchmarks/results/sweep/README.md): ~4 min
# a point (eager-mode vLLM decodes SmolLM2 at 2,000-3,400 tokens/s), ~35 min for all: 8 trainings of
# 309-714 rows (3 epochs; one point 6) and 8 evaluations of the tuned model; the base model's
# completions are computed once and reused by every point (their cache key has no tuned model).
# It can be cut short and run again: finished stages come back Cached from $STORE, so a second
# call finishes the points the first one did not (use that where one call is limited to 10 min).
#
# Environment: OUT (default benchmarks/results/sweep), STORE (default .glyph/sweep-study, kept
# between calls), PYTHON (default .venv/bin/python if present, else python3), DRY_RUN=1.
# Extra arguments go to `glyph sweep` (e.g. --set train.batch_size=32).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1
OUT=${OUT:-benchmarks/results/sweep}
STORE=${STORE:-.glyph/sweep-study}
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
GLYPH_DATA_DIR=${GLYPH_DATA_DIR:-$(cd .. && pwd)/shared/data}
if [ ! -f "$GLYPH_DATA_DIR/gsm8k/train.jsonl" ]; then
  echo "error: GLYPH_DATA_DIR=$GLYPH_DATA_DIR must hold the data (gsm8k/train.jsonl, svamp/, math/)" >&2
  exit 2
fi
export GLYPH_DATA_DIR

if [ "${DRY_RUN:-0}" = 1 ]; then
  # Same recipes and outputs on CPU: a tiny random model, 12 training problems per source, one
  # held-out problem per stratum, 16 new tokens (the numbers mean nothing; the machinery does).
  sizes=(
    --profile tiny
    --set unify.data_dir="$GLYPH_DATA_DIR" --set unify.max_train_per_source=12
    --set unify.max_test_per_source=8 --set evaluate.per_stratum=1
  )
else
  sizes=(
    --profile demo
    --set unify.data_dir="$GLYPH_DATA_DIR" --set unify.max_train_per_source=300
    --set unify.max_test_per_source=null
    --set train.bf16=on --set train.device=cuda --set train.max_steps=-1 --set train.batch_size=16
    --set train.grad_accum=1 --set train.max_seq_len=1024 --set train.num_threads=null
    --set train.save_steps=100000 --set train.logging_steps=20
    --set evaluate.backend=vllm --set evaluate.per_stratum=100 --set evaluate.max_new_tokens=512
    --set evaluate.batch_size=400 --set evaluate.vllm.gpu_memory_utilization=0.6
    --set evaluate.vllm.enforce_eager=true
  )
fi

mkdir -p "$OUT"
cmd=("$PYTHON" -m glyph_cli.main sweep --file benchmarks/sweep_study.yaml "${sizes[@]}"
  --store "$STORE" --out "$OUT" --max-parallel 1 --no-server "$@")
printf '%q ' env GLYPH_DATA_DIR="$GLYPH_DATA_DIR" DRY_RUN="${DRY_RUN:-0}" OUT="$OUT" STORE="$STORE" \
  bash benchmarks/sweep_study.sh "$@" > "$OUT/study_command.txt"
echo >> "$OUT/study_command.txt"
echo "==> $(cat "$OUT/study_command.txt")"
start=$(date +%s)
set +e
"${cmd[@]}" 2>&1 | tee "$OUT/sweep.log"
rc=${PIPESTATUS[0]}
set -e
echo "==> glyph sweep exit status $rc after $(( $(date +%s) - start )) s; results in $OUT" | tee -a "$OUT/sweep.log"
exit "$rc"
