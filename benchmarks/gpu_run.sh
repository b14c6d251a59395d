#!/usr/bin/env bash
# The real GPU run kept in benchmarks/results/gpu_run/: the pipeline's GPU stages (train and
# evaluate; generate with the reference teacher) on SmolLM2-135M-Instruct and 1,500 real
# training problems, evaluated on 180 held-out problems. Run from the repository root on a GPU
# host with the package importable and GLYPH_DATA_DIR pointing at the data.
set -euo pipefail
exec glyph run --profile demo --store "${STORE:-/tmp/store}" \
  --set unify.max_train_per_source=500 --set unify.max_test_per_source=60 \
  --set generate.teacher.backend=reference --set rewrite.glyph_min_bucket=medium \
  --set train.bf16=on --set train.device=cuda --set train.max_steps=-1 --set train.epochs=6 \
  --set train.learning_rate=0.001 --set train.batch_size=16 --set train.max_seq_len=1024 \
  --set train.save_steps=100000 --set evaluate.per_stratum=null --set evaluate.max_new_tokens=384 \
  --set evaluate.batch_size=96 "$@"
