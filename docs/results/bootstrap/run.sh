#!/usr/bin/env bash
# Can SmolLM2-135M enter self-play in the world-model format? (issue 13, item 2)
# Measures the format-valid share of the model's own play (generate's card, `format_valid_share`)
# before and after a short format warm-up: SFT on random-policy episodes whose
# <observation>/<prediction> hold the simulator's true states.
#   bash docs/results/bootstrap/run.sh [ENV] [OUT] [ENV_OPTIONS]   (from the repository root; resumes)
#   e.g. bash docs/results/bootstrap/run.sh frozenlake runs/bootstrap-frozenlake '{is_slippery: false}'
# The warm-up is the cpu-small-self-play preset's (warmup-generate, warmup-sft).
set -euo pipefail
ENV=${1:-sokoban}
OUT=${2:-runs/bootstrap-$ENV}
OPTS=${3:-}
EO=(); [ -n "$OPTS" ] && EO=(--env.options "$OPTS")
SPA=${SPA:-.venv/bin/spa}
SELF="--policy self --episodes 32 --group-size 2 --first-level 1000 --episode.max-turns 2 --sampling.max-new-tokens 288 --seed 1"
[ -f "$OUT/before/README.md" ] || $SPA generate --env "$ENV" "${EO[@]}" --model default $SELF --out "$OUT/before"
[ -f "$OUT/warmup-data/README.md" ] || $SPA generate --env "$ENV" "${EO[@]}" --policy random --episodes 64 --group-size 1 --episode.max-turns 3 --seed 0 --out "$OUT/warmup-data"
[ -e "$OUT/warmup/final" ] || $SPA sft --data "$OUT/warmup-data" --model default --epochs 1 --batch 8 --micro-batch 4 --optim.lr 1e-4 --gradient-checkpointing --seed 0 --out "$OUT/warmup"
[ -f "$OUT/after/README.md" ] || $SPA generate --env "$ENV" "${EO[@]}" --model "$OUT/warmup/final" $SELF --out "$OUT/after"
for part in before after; do
  printf '%s: ' "$part"; grep -E '^\| all ' "$OUT/$part/README.md" || true
done
