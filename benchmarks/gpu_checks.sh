#!/usr/bin/env bash
# The GPU figures of the README in one go, on one CUDA GPU:
#   1. bench_train.py on the GPU (fp32, and each side's best settings), against transformers;
#   2. the user's seed command, exactly as the README gives it;
#   3. the release training run of the shipped model, and its export to a small release file.
# Each stage has a time limit, so one failing stage cannot starve the others.
#
#   bash benchmarks/gpu_checks.sh OUT_DIR [DATA_DIR] [RELEASE_FLAGS...]
#
# The seed command loads WikiText-2 with `datasets`; offline, point HF_HOME at a prepared cache
# and set HF_HUB_OFFLINE=1 (README). Everything is logged to OUT_DIR.
set -uo pipefail
OUT=${1:?usage: gpu_checks.sh OUT_DIR [DATA_DIR] [RELEASE_FLAGS...]}
DATA=${2:-../shared/data/wikitext-2-v1}
shift $(( $# >= 2 ? 2 : 1 ))
RELEASE_FLAGS=("$@")
RUN=${RUN_DIR:-/tmp/bert_gpu_run}  # large training checkpoints (with optimizer state) stay here
T0=$(date +%s); BUDGET=${BUDGET_SECONDS:-560}  # the release run gets what the first stages leave
mkdir -p "$OUT" "$RUN"
export PYTHONUNBUFFERED=1
log() { tr '\r' '\n' | grep --line-buffered -v 'it/s' | tee -a "$1"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/bench_cuda.txt"
python -c "import torch, transformers, tokenizers; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'tokenizers', tokenizers.__version__)" | tee -a "$OUT/bench_cuda.txt"

echo "== 1. bench_train.py on the GPU" | tee -a "$OUT/bench_cuda.txt"
timeout 120 python benchmarks/bench_train.py --device cuda --modes fp32 best --warmup 10 --rounds 6 \
    --steps 25 --json "$OUT/bench_cuda.json" 2>&1 | log "$OUT/bench_cuda.txt"

echo "== 2. the seed command" | tee "$OUT/seed.txt"
# Run from a scratch folder: the command writes checkpoints/bert_mini.pt where it runs, and a
# user's own checkpoints/ must not be touched.
REPO=$PWD; SEED="$RUN/seed"; rm -rf "$SEED"; mkdir -p "$SEED"
start=$(date +%s)
if python -c "import datasets" 2>/dev/null; then
  (cd "$SEED" && timeout 300 python "$REPO/BERT_from_scratch.py" --device cuda --epochs 2 --batch_size 16) \
      2>&1 | log "$OUT/seed.txt"
else  # no `datasets` here: the same command on the local copy of the data
  echo "(datasets is not importable here: adding --data_dir $DATA)" | tee -a "$OUT/seed.txt"
  DATA_ABS=$(realpath "$DATA")
  (cd "$SEED" && timeout 300 python "$REPO/BERT_from_scratch.py" --device cuda --epochs 2 --batch_size 16 \
      --data_dir "$DATA_ABS") 2>&1 | log "$OUT/seed.txt"
fi
echo "seed command wall time: $(( $(date +%s) - start ))s" | tee -a "$OUT/seed.txt"
cp "$SEED/checkpoints/bert_mini.metrics.jsonl" "$OUT/seed.metrics.jsonl" 2>/dev/null

echo "== 3. the release training run: ${RELEASE_FLAGS[*]}" | tee "$OUT/release.txt"
ckpt="$RUN/bert-mini-release-run.pt"
rm -f "$ckpt"
start=$(date +%s)
left=$(( BUDGET - ($(date +%s) - T0) - 20 ))
echo "release run time limit: ${left}s" | tee -a "$OUT/release.txt"
timeout "$left" python BERT_from_scratch.py --device cuda --data_dir "$DATA" \
    --checkpoint "$ckpt" --plot "${RELEASE_FLAGS[@]}" 2>&1 | log "$OUT/release.txt"
echo "release run wall time: $(( $(date +%s) - start ))s" | tee -a "$OUT/release.txt"
cp "${ckpt%.pt}.metrics.jsonl" "$OUT/release.metrics.jsonl" 2>/dev/null
cp "${ckpt%.pt}.png" "$OUT/release.png" 2>/dev/null
python test_mini_bert.py --checkpoint "$ckpt" --export_release "$OUT/bert-mini-wikitext2.pt" 2>&1 | tee -a "$OUT/release.txt"
