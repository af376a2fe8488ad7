#!/usr/bin/env bash
# Every GPU check of spa-rl in one prepared run, for a lent GPU machine (see docs/scaling.md):
#   bash benchmarks/device_run.sh OUT_DIR [cuda|cpu]
# 1. benchmarks/gpu_check.py: runtime resolution, loading, HF generation, an SFT step, NCCL;
# 2. every stage as a user runs it, on the device, with the tiny model: generate (self-play),
#    sft, eval, train (GRPO), each checked for exit code 0 and its device in the output;
# 3. the rollout engine against `model.generate` on the device (a random-init model with
#    SmolLM2-135M's shape: the embedded model's GGUF cannot travel to the machine).
# Each part writes its log under OUT_DIR and the script goes on after a failure; `summary.txt`
# holds one line per part. Test it on a CPU first: `bash benchmarks/device_run.sh /tmp/d cpu`.
set -u
OUT=${1:?usage: device_run.sh OUT_DIR [cuda|cpu]}
DEVICE=${2:-cuda}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 SPA_RL_CACHE="$OUT/cache"
PY=${PYTHON:-python3}
SPA="$PY -m spa_rl.cli"
summary="$OUT/summary.txt"
: > "$summary"

part() {  # part NAME TIMEOUT_S COMMAND...: run, log, record the exit code and the seconds
  local name=$1 limit=$2
  shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$(( $(date +%s) - t0 ))" | tee -a "$summary"
}

SMALL=""
[ "$DEVICE" = cpu ] && SMALL="--small"
part gpu_check 240 $PY benchmarks/gpu_check.py "$OUT/gpu_check" --device "$DEVICE" $SMALL

D="--model.device $DEVICE"
part stage_generate 120 $SPA generate --env sokoban --policy self --model tiny $D --episodes 8 --group-size 4 \
    --episode.max-turns 2 --sampling.max-new-tokens 24 --out "$OUT/runs/data"
part stage_sft 120 $SPA sft --data "$OUT/runs/data" --model tiny $D --epochs 1 --batch 4 --micro-batch 2 \
    --out "$OUT/runs/sft"
part stage_eval 120 $SPA eval --env sokoban --model "$OUT/runs/sft/final" $D --eval.levels 4 --eval.samples 2 \
    --episode.max-turns 2 --sampling.max-new-tokens 24 --out "$OUT/runs/eval"
part stage_train 180 $SPA train --env sokoban --model "$OUT/runs/sft/final" $D --algo grpo --steps 2 --groups 2 \
    --group-size 4 --keep-ratio 1.0 --episode.max-turns 2 --sampling.max-new-tokens 24 --eval.levels 2 \
    --eval.samples 2 --eval-every 0 --out "$OUT/runs/train"
if [ "$DEVICE" != cpu ]; then
  part torchrun_sft 120 $PY -m torch.distributed.run --standalone --nproc-per-node 1 -m spa_rl.cli sft \
      --data "$OUT/runs/data" --model tiny $D --epochs 1 --batch 4 --micro-batch 2 --out "$OUT/runs/sft-ddp"
fi
part rollout_engine 240 $PY benchmarks/gpu_engine.py --device "$DEVICE" --batch 16 --max-new-tokens 128

