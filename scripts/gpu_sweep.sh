#!/usr/bin/env bash
# Train several recipes of the default model side by side on one GPU, from scratch, with the data of the first
# stage of scripts/train-default-model (synth 12,000 @ 320 px, seed 2026, --relation-choice random), and bring
# back each run's weights (float16).
#
#   scripts/gpu_sweep.sh OUT_DIR DEADLINE_S [NAME=TRAIN_ARGS ...]
#
# DEADLINE_S: seconds from the start of this script by which everything (data, training, export) must be done;
# the training budget (--minutes) is what is left after the data is made. Each NAME=ARGS runs
# `densecap train ... ARGS` in its own process. Needs python3 with torch (CUDA), torchvision, h5py, Pillow, tqdm,
# matplotlib; no Java (validation runs with --no-meteor: detection mAP and exactness are real, caption mAP is
# not). Written for the lent GPU machine (docs/default-model.md); CPU works too for a smoke test
# (DEVICE=cpu NUM_IMAGES=120). RESERVE_S (default 75): seconds kept after training for preload, the final
# validation and the export.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=$1; DEADLINE=$2; shift 2
START=$(date +%s)
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
NUM_IMAGES=${NUM_IMAGES:-12000}
WORK=${WORK:-/tmp/densecap-sweep}
WORKERS=${WORKERS:-$(nproc)}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
DC="$PY -m densecap_core.cli"
mkdir -p "$OUT" "$WORK/logs"
elapsed() { echo $(( $(date +%s) - START )); }

$PY -c "import torch, torchvision, h5py; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" || exit 3

# 1. A smoke run of every recipe on 60 images, so a broken recipe fails in seconds, not at the end (SMOKE=0 skips).
if [[ ${SMOKE:-1} != 0 ]]; then
$DC synth --out "$WORK/mini" --num-images 60 --image-size 320 --seed 7 --val-fraction 0.1 --test-fraction 0.1 \
    --workers 4 > "$WORK/logs/mini-synth.log" 2>&1 || { cat "$WORK/logs/mini-synth.log"; exit 4; }
$DC preprocess --region-data "$WORK/mini/region_descriptions.json" --image-data "$WORK/mini/image_data.json" \
    --splits "$WORK/mini/densecap_splits.json" --image-dir "$WORK/mini/images" --image-size 320 \
    --min-token-instances 1 --output-h5 "$WORK/mini.h5" --output-json "$WORK/mini.json" \
    > "$WORK/logs/mini-prep.log" 2>&1 || { cat "$WORK/logs/mini-prep.log"; exit 4; }
smoke=()
for spec in "$@"; do
    name=${spec%%=*}; args=${spec#*=}
    # shellcheck disable=SC2086
    $DC train --data-h5 "$WORK/mini.h5" --data-json "$WORK/mini.json" --out "$WORK/smoke-$name" --iterations 12 \
        --val-every 0 --val-images 4 --no-meteor --regions-meta "$WORK/mini/regions_meta.json" --device "$DEVICE" \
        --preload --threads 2 $args > "$WORK/logs/smoke-$name.log" 2>&1 &
    smoke+=("$!:$name")
done
for entry in "${smoke[@]}"; do
    wait "${entry%%:*}" || { echo "smoke run of ${entry#*:} failed:"; tail -30 "$WORK/logs/smoke-${entry#*:}.log"; exit 5; }
done
echo "[$(elapsed) s] smoke runs passed: $*"
fi

# 2. The data, exactly as scripts/train-default-model makes its first stage's.
$DC synth --out "$WORK/synth12k" --num-images "$NUM_IMAGES" --image-size 320 --seed 2026 --val-fraction 0.0833 \
    --test-fraction 0.0833 --relation-choice random --workers "$WORKERS" 2>&1 | tail -1
$DC preprocess --region-data "$WORK/synth12k/region_descriptions.json" --image-data "$WORK/synth12k/image_data.json" \
    --splits "$WORK/synth12k/densecap_splits.json" --image-dir "$WORK/synth12k/images" --image-size 320 \
    --min-token-instances 1 --output-h5 "$WORK/synth12k.h5" --output-json "$WORK/synth12k.json" \
    --num-workers "$WORKERS" 2>&1 | tail -1
echo "[$(elapsed) s] data made"

# 3. The recipes in parallel; each stops on its own time budget (preload and the final save come after it).
minutes=$(awk -v left=$(( DEADLINE - $(elapsed) - ${RESERVE_S:-75} )) 'BEGIN { printf "%.2f", left / 60 }')
echo "[$(elapsed) s] training budget: $minutes min per recipe"
threads=$(( WORKERS / ($# > 0 ? $# : 1) )); (( threads < 1 )) && threads=1
pids=()
for spec in "$@"; do
    name=${spec%%=*}; args=${spec#*=}
    # shellcheck disable=SC2086
    $DC train --data-h5 "$WORK/synth12k.h5" --data-json "$WORK/synth12k.json" --out "$WORK/runs/$name" \
        --iterations 1000000 --minutes "$minutes" --val-every 1000 --val-images 150 --no-meteor \
        --regions-meta "$WORK/synth12k/regions_meta.json" --seed 123 --device "$DEVICE" --preload \
        --threads "$threads" $args > "$WORK/logs/train-$name.log" 2>&1 &
    pids+=($!)
done
if command -v nvidia-smi > /dev/null; then  # how busy the shared GPU is, once a minute
    (while sleep 60; do nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader; done \
        >> "$WORK/logs/gpu-usage.log" 2>&1) &
    sampler=$!
fi
for pid in "${pids[@]}"; do wait "$pid" || echo "a training process exited with status $?"; done
[[ -n ${sampler:-} ]] && kill "$sampler" 2>/dev/null
echo "[$(elapsed) s] training done"

# 4. Export: float16 weights per recipe, and one archive of logs, metrics and curves.
for spec in "$@"; do
    name=${spec%%=*}
    grep -h '\[val @' "$WORK/logs/train-$name.log" | tail -2 | sed "s/^/$name: /"
    [[ -f $WORK/runs/$name/last.pt ]] && $PY -c "
import sys
from densecap_core.checkpoint import load_checkpoint, save_checkpoint
ck = load_checkpoint(sys.argv[1])
save_checkpoint(sys.argv[2], ck.model, ck.config, ck.vocab, ck.card, half=True)
print(sys.argv[2], ck.card.get('iterations'), 'iterations')" "$WORK/runs/$name/last.pt" "$OUT/$name.pt"
done
tar -czf "$OUT/sweep-logs.tar.gz" -C "$WORK" logs $(cd "$WORK" && ls -d runs/*/metrics.jsonl runs/*/curves.png 2>/dev/null)
echo "[$(elapsed) s] exported to $OUT"
