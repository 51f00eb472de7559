#!/usr/bin/env bash
# The README's GPU figures in one go, on one CUDA GPU:
#   1. the CUDA tests: CUDA-graph steps train the same model as eager steps, dropout stays random
#      under replay, a failed capture falls back to eager steps, resuming continues the run;
#   2. bench_train.py: mini against transformers in fp32 and bf16 on the seed command's batches
#      (eager and CUDA graphs) and at each side's best (compiled, CUDA graphs, both) on one shape;
#      the base preset in bf16 and its MFU;
#   3. the seed command exactly as a user types it, with its wall time.
#
#   bash benchmarks/gpu_checks.sh OUT_DIR [DATA_ROOT] [BENCH_LIMIT_S] [SEED_LIMIT_S] [TESTS_LIMIT_S]
#
# DATA_ROOT holds wikitext-2-v1/ (train.txt, validation.txt, test.txt) and, for the seed command
# without network, a prepared `datasets` cache in hf-cache/ (default ../shared/data); without that
# cache or the datasets package, the seed command reads the same text with --data_dir. Each stage
# has a time limit (defaults: 600 s for the benchmarks, 600 s for the seed command, 300 s for the
# tests), so one failing stage cannot starve the others.
# Everything is logged to OUT_DIR; nothing is written under checkpoints/.
set -uo pipefail
OUT=${1:?usage: gpu_checks.sh OUT_DIR [DATA_ROOT] [BENCH_LIMIT_S] [SEED_LIMIT_S] [TESTS_LIMIT_S]}
DATA_ROOT=$(realpath "${2:-../shared/data}")
BENCH_LIMIT=${3:-600}
SEED_LIMIT=${4:-600}
TESTS_LIMIT=${5:-300}
REPO=$PWD
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
log() { tr '\r' '\n' | grep --line-buffered -v 'it/s\]$' | tee -a "$1"; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/machine.txt"

echo "== 1. CUDA tests" | tee "$OUT/tests.txt"
timeout "$TESTS_LIMIT" python -m pytest -q tests/test_cuda.py 2>&1 | log "$OUT/tests.txt"

echo "== 2. bench_train.py" | tee "$OUT/bench.txt"
start=$(date +%s)
left() { local l=$(( BENCH_LIMIT - ($(date +%s) - start) )); echo $(( l > 30 ? l : 30 )); }
# The seed command's batches (WikiText-2, batch 16, eight shapes): eager steps and CUDA graphs.
timeout "$(left)" python benchmarks/bench_train.py --device cuda --data_dir "$DATA_ROOT/wikitext-2-v1" \
    --batch_size 16 --vocab_size 16384 --modes fp32 bf16 --variants eager graphs --batches 32 \
    --rounds 4 --steps 25 --json "$OUT/bench_seed_batches.json" 2>&1 | log "$OUT/bench.txt"
# Each side at its best, torch.compile included, on one shape (32 x 128, full-length pairs).
timeout "$(left)" python benchmarks/bench_train.py --device cuda --modes fp32 bf16 \
    --variants eager compile graphs compile+graphs --batches 8 --rounds 4 --steps 25 \
    --json "$OUT/bench_best.json" 2>&1 | log "$OUT/bench.txt"
# The base preset (110M parameters with a 30,522 vocabulary) in bf16, and its MFU.
timeout "$(left)" python benchmarks/bench_train.py --device cuda --model_size base --modes bf16 \
    --sides ours --variants eager graphs --batch_size 64 --batches 8 --rounds 4 --steps 10 \
    --json "$OUT/bench_base.json" 2>&1 | log "$OUT/bench.txt"

echo "== 3. the seed command" | tee "$OUT/seed.txt"
# From a scratch folder: the command writes checkpoints/bert_mini.pt where it runs. Offline, the
# unchanged command finds WikiText-2 in a datasets cache (see ../shared/data/README.md).
SEED=$(mktemp -d)
seed_command=(python "$REPO/BERT_from_scratch.py" --device cuda --epochs 2 --batch_size 16)
if [ -d "$DATA_ROOT/hf-cache/datasets" ] && python -c "import datasets" 2>/dev/null; then
  mkdir -p "$SEED/hf_home/datasets"
  for d in "$DATA_ROOT"/hf-cache/datasets/*/; do ln -sfn "$d" "$SEED/hf_home/datasets/$(basename "$d")"; done
  export HF_HOME="$SEED/hf_home" HF_HUB_OFFLINE=1
else  # no datasets package or cache: the same text from WikiText's files (the same corpus, tested)
  seed_command+=(--data_dir "$DATA_ROOT/wikitext-2-v1")
  echo "no datasets cache: ${seed_command[*]}" | tee -a "$OUT/seed.txt"
fi
start=$(date +%s)
(cd "$SEED" && timeout "$SEED_LIMIT" "${seed_command[@]}") 2>&1 | log "$OUT/seed.txt"
echo "seed command wall time: $(( $(date +%s) - start ))s" | tee -a "$OUT/seed.txt"
cp "$SEED/checkpoints/bert_mini.metrics.jsonl" "$OUT/seed.metrics.jsonl" 2>/dev/null
rm -rf "$SEED"
