#!/usr/bin/env bash
# The README's GPU figures in one go, on one CUDA GPU, most important first:
#   1. the CUDA tests: CUDA-graph steps train the same model as eager steps, dropout stays random
#      under replay, a failed capture falls back to eager steps, resuming continues the run, GLUE
#      fine-tuning runs on the GPU;
#   2. bench_train.py: mini against transformers in fp32 and bf16 on the seed command's batches
#      (eager and CUDA graphs);
#   3. the seed command exactly as a user types it, with its wall time (a cold data cache);
#   4. bench_train.py: each side at its best (compiled, CUDA graphs, both) on one shape, and the
#      base preset in bf16 with its MFU.
#
#   bash benchmarks/gpu_checks.sh OUT_DIR [DATA_ROOT] [BENCH_LIMIT_S] [SEED_LIMIT_S] [TESTS_LIMIT_S]
#
# DATA_ROOT holds wikitext-2-v1/ (train.txt, validation.txt, test.txt) and, for the seed command
# without network, a prepared `datasets` cache in hf-cache/ (default ../shared/data); without that
# cache or the datasets package, the seed command reads the same text with --data_dir. Each stage
# has a time limit (defaults: 600 s for the benchmarks together, 600 s for the seed command, 300 s
# for the tests), so one failing stage cannot starve the others; a benchmark that finds its time
# spent is skipped. Everything is logged to OUT_DIR (8 files); nothing is written under checkpoints/.
set -uo pipefail
OUT=${1:?usage: gpu_checks.sh OUT_DIR [DATA_ROOT] [BENCH_LIMIT_S] [SEED_LIMIT_S] [TESTS_LIMIT_S]}
DATA_ROOT=$(realpath -m "${2:-../shared/data}")
BENCH_LIMIT=${3:-600}
SEED_LIMIT=${4:-600}
TESTS_LIMIT=${5:-300}
PY=${PYTHON:-$(command -v python3 || command -v python)}
REPO=$PWD
if [ ! -f "$DATA_ROOT/wikitext-2-v1/train.txt" ]; then
  echo "no WikiText-2 in $DATA_ROOT/wikitext-2-v1: pass DATA_ROOT, the folder that holds it" >&2
  exit 2
fi
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
log() { tr '\r' '\n' | grep --line-buffered -vE '[0-9](it/s|s/it)[],]' | tee -a "$1"; }  # no progress bars

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/machine.txt"

echo "== 1. CUDA tests" | tee "$OUT/tests.txt"
timeout "$TESTS_LIMIT" "$PY" -m pytest -q tests/test_cuda.py 2>&1 | log "$OUT/tests.txt"

bench_used=0
bench() {  # bench NAME FLAGS...: one bench_train.py run, within what is left of BENCH_LIMIT_S
  local name=$1 left=$(( BENCH_LIMIT - bench_used )) t0
  shift
  if [ "$left" -le 10 ]; then
    echo "$name: skipped, the benchmarks' time limit is spent" | tee -a "$OUT/bench.txt"
    return
  fi
  t0=$(date +%s)
  timeout "$left" "$PY" benchmarks/bench_train.py --device cuda "$@" --json "$OUT/$name.json" 2>&1 | log "$OUT/bench.txt"
  bench_used=$(( bench_used + $(date +%s) - t0 ))
}

echo "== 2. bench_train.py on the seed command's batches" | tee "$OUT/bench.txt"
# WikiText-2, batch 16, eight shapes: eager steps and CUDA graphs, both models.
bench bench_seed_batches --data_dir "$DATA_ROOT/wikitext-2-v1" --batch_size 16 --vocab_size 16384 \
    --modes fp32 bf16 --variants eager graphs --batches 32 --rounds 4 --steps 25

echo "== 3. the seed command" | tee "$OUT/seed.txt"
# From a scratch folder, with its own data cache: the command writes checkpoints/bert_mini.pt where
# it runs, and learns its tokenizer as a first run does. Offline, the unchanged command finds
# WikiText-2 in a datasets cache (see ../shared/data/README.md).
SEED=$(mktemp -d)
seed_command=("$PY" "$REPO/BERT_from_scratch.py" --device cuda --epochs 2 --batch_size 16)
if [ -d "$DATA_ROOT/hf-cache/datasets" ] && "$PY" -c "import datasets" 2>/dev/null; then
  mkdir -p "$SEED/hf_home/datasets"
  for d in "$DATA_ROOT"/hf-cache/datasets/*/; do ln -sfn "$d" "$SEED/hf_home/datasets/$(basename "$d")"; done
  export HF_HOME="$SEED/hf_home" HF_HUB_OFFLINE=1
else  # no datasets package or cache: the same text from WikiText's files (the same corpus, tested)
  seed_command+=(--data_dir "$DATA_ROOT/wikitext-2-v1")
  echo "no datasets cache: ${seed_command[*]}" | tee -a "$OUT/seed.txt"
fi
start=$(date +%s)
(cd "$SEED" && XDG_CACHE_HOME="$SEED/cache" timeout "$SEED_LIMIT" "${seed_command[@]}") 2>&1 | log "$OUT/seed.txt"
echo "seed command wall time: $(( $(date +%s) - start ))s" | tee -a "$OUT/seed.txt"
cp "$SEED/checkpoints/bert_mini.metrics.jsonl" "$OUT/seed.metrics.jsonl" 2>/dev/null
rm -rf "$SEED"

echo "== 4. bench_train.py: each side at its best; the base preset" | tee -a "$OUT/bench.txt"
# One shape (32 x 128, full-length pairs), torch.compile included.
bench bench_best --modes fp32 bf16 --variants eager compile graphs compile+graphs --batches 8 --rounds 4 --steps 25
# The base preset (110M parameters with a 30,522 vocabulary) in bf16, and its MFU.
bench bench_base --model_size base --modes bf16 --sides ours --variants eager graphs --batch_size 64 \
    --batches 8 --rounds 4 --steps 10
