#!/usr/bin/env bash
# The CLIP reference run (issue 8): CLIP, NegCLIP and TripletCLIP at equal compute, each
# trained through the software switch on loopback with 4 workers, then TripletCLIP again
# with DDP's allreduce; then switchml-eval clip compares them (markdown table, bar chart).
#
#   bash benchmarks/reference/clip.sh [STEPS] [OUT]      # defaults: 2000 steps, runs/clip_reference
#
# Equal compute: TripletCLIP uses --triplet-mode alternate (one half of its objective per
# step), so every method encodes the same number of images per step. Results (the report
# and every run's final_metrics.json) are copied to benchmarks/results/clip_reference/.
set -euo pipefail
cd "$(dirname "$0")/../.."
STEPS=${1:-2000}
OUT=${2:-runs/clip_reference}
BIN=${SWITCHML_BIN:-.venv/bin}
RESULTS=benchmarks/results/clip_reference
COMMON=(--workers 4 --steps "$STEPS" --seed 0 --no-progress)
mkdir -p "$OUT" "$RESULTS"
run() {  # name, then switchml-train options
  local name=$1
  shift
  echo "== $name: switchml-train clip ${COMMON[*]} $* --out $OUT/$name"
  "$BIN/switchml-train" clip "${COMMON[@]}" "$@" --out "$OUT/$name" > "$OUT/$name.log" 2>&1
  cp "$OUT/$name/final_metrics.json" "$RESULTS/$name.final_metrics.json"
}
run clip --method clip
run negclip --method negclip
run tripletclip --method tripletclip --triplet-mode alternate
run tripletclip_allreduce --method tripletclip --triplet-mode alternate --comm allreduce
"$BIN/switchml-eval" clip --ckpt "$OUT/clip" --compare "$OUT/negclip" --compare "$OUT/tripletclip" \
  --compare "tripletclip-allreduce=$OUT/tripletclip_allreduce" --report "$RESULTS" \
  --json "$RESULTS/metrics.json" > "$OUT/eval.log" 2>&1
echo "steps: $STEPS; command: bash benchmarks/reference/clip.sh $STEPS" > "$RESULTS/COMMAND"
echo "report: $RESULTS"
