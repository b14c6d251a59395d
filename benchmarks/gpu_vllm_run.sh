#!/usr/bin/env bash
# The pipeline on a GPU with the vllm backend, under Prefect (its temporary server), on real data:
# SmolLM2-135M-Instruct as teacher and student, evaluation through vLLM, then the same evaluation
# through transformers and the agreement of their greedy completions. What it writes lands in
# $OUT (default benchmarks/results/gpu_vllm_run): logs, the evaluation tables, metrics and plots.
#
#   GLYPH_DATA_DIR=/path/to/data bash benchmarks/gpu_vllm_run.sh [PART ...]
#
# PARTs, in order (default: all four; ~8 min on an H100, so run them as two calls):
#   teacher       `glyph run` with SmolLM2 as the teacher through vLLM (glyph prompt, 4 samples):
#                 generate runs and its traces are summed up (teacher_summary.json); SmolLM2 rarely
#                 writes the five-glyph structure, so filter may keep nothing and train then
#                 refuses (an expected, recorded outcome: the run's exit status is kept)
#   pipeline      `glyph run` with the reference teacher, TRL LoRA on SmolLM2, evaluation of base
#                 and tuned through vLLM in one engine (the adapter as a LoRARequest)
#   transformers  the same run with evaluate.backend=transformers: every stage but evaluate cached
#   agreement     benchmarks/agreement.py on the two evaluations
# Run from the repository root with the package importable (PYTHONPATH=. is set here).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1
OUT=${OUT:-benchmarks/results/gpu_vllm_run}
STORE=${STORE:-/tmp/store-vllm}
TEACHER_STORE=${TEACHER_STORE:-/tmp/store-vllm-teacher}
PY=${PYTHON:-python3}
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(teacher pipeline transformers agreement)
for p in "${parts[@]}"; do
  case "$p" in teacher|pipeline|transformers|agreement) ;; *) echo "error: unknown part $p" >&2; exit 2 ;; esac
done
if [ -z "${GLYPH_DATA_DIR:-}" ] || [ ! -f "$GLYPH_DATA_DIR/gsm8k/train.jsonl" ]; then
  echo "error: GLYPH_DATA_DIR must point at the data (gsm8k/train.jsonl, svamp/, math/)" >&2
  exit 2
fi
mkdir -p "$OUT"
glyph() { "$PY" -m glyph_cli.main "$@"; }

# The earlier GPU run's sizes (benchmarks/gpu_run.sh), a few hundred training problems.
common=(
  --profile demo --no-server
  --set unify.max_train_per_source=200 --set unify.max_test_per_source=60
  --set rewrite.glyph_min_bucket=medium
  --set train.bf16=on --set train.device=cuda --set train.max_steps=-1 --set train.epochs=6
  --set train.learning_rate=0.001 --set train.batch_size=16 --set train.max_seq_len=1024
  --set train.num_threads=null --set train.save_steps=100000
  --set evaluate.per_stratum=null --set evaluate.max_new_tokens=384 --set evaluate.batch_size=96
)
vllm_eval=(--set evaluate.backend=vllm --set evaluate.vllm.gpu_memory_utilization=0.6)

for p in "${parts[@]}"; do
  echo "==> $p"
  case "$p" in
    teacher)
      set +e
      glyph run "${common[@]}" --store "$TEACHER_STORE" "${vllm_eval[@]}" \
        --set generate.teacher.backend=vllm --set generate.teacher.model=smollm2-135m \
        --set generate.teacher.prompt=glyph --set generate.teacher.n=4 \
        --set generate.teacher.temperature=0.7 --set generate.teacher.max_new_tokens=384 \
        --set generate.teacher.vllm.gpu_memory_utilization=0.6 2>&1 | tee "$OUT/teacher_run.log"
      rc=${PIPESTATUS[0]}
      set -e
      "$PY" - "$TEACHER_STORE" "$OUT/teacher_summary.json" "$rc" <<'EOF'
import json, sys
from collections import Counter
from pathlib import Path
import pyarrow.parquet as pq
from glyph_core.glyphs import validate_trace
store, out, rc = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
shards = sorted((store / "generate" / "shards").glob("*/data.parquet"))
rows = [r for s in shards for r in pq.read_table(s).to_pylist()]
ok = [r for r in rows if r["finish_reason"] != "error"]
summary = {
    "run_exit_status": rc,
    "shards": len(shards),
    "completions": len(rows),
    "finish_reasons": dict(Counter(r["finish_reason"] for r in rows)),
    "valid_glyph_structure": sum(1 for r in ok if not validate_trace(r["completion"])),
    "completion_tokens": sum(r["completion_tokens"] for r in rows),
    "teacher": rows[0]["teacher"] if rows else None,
    "example": rows[0]["completion"][:600] if rows else None,
}
out.write_text(json.dumps(summary, indent=2))
print(json.dumps({k: v for k, v in summary.items() if k != "example"}, indent=2))
EOF
      ;;
    pipeline)
      glyph run "${common[@]}" --store "$STORE" "${vllm_eval[@]}" \
        --set generate.teacher.backend=reference 2>&1 | tee "$OUT/run.log"
      ;;
    transformers)
      glyph run "${common[@]}" --store "$STORE" --set evaluate.backend=transformers \
        --set generate.teacher.backend=reference 2>&1 | tee "$OUT/run_transformers.log"
      ;;
    agreement)
      "$PY" benchmarks/agreement.py --store "$STORE" --out "$OUT" 2>&1 | tee "$OUT/agreement.log"
      ;;
  esac
done
