#!/usr/bin/env bash
# The CLIP reference run (issues 8 and 20): CLIP, NegCLIP and TripletCLIP at equal compute, each
# trained with every seed of SEEDS through the software switch on loopback with 4 workers, then
# TripletCLIP again at the first seed with DDP's allreduce (the switch's parity); then
# switchml-eval clip compares them: per method the mean and the seeds' range, each method's
# difference to CLIP seed by seed, every run's metrics (markdown), and a bar chart.
#
#   bash benchmarks/reference/clip.sh [STEPS] [OUT]      # defaults: 1000 steps, runs/clip_reference
#   SEEDS="0 1 2" DISTRACTORS=1 TRAIN_SCENES=20000 bash benchmarks/reference/clip.sh
#   REUSE=1 bash benchmarks/reference/clip.sh     # keep the runs OUT already holds from the same commands
#
# Equal compute: TripletCLIP uses --triplet-mode alternate (one half of its objective per
# step), so every method encodes the same number of images per step. The scenes have
# DISTRACTORS unmentioned objects each (trainer/data/scenes.py; 0: the first benchmark). Every
# method trains on the same TRAIN_SCENES scenes (TripletCLIP's negatives add one fixed negative
# scene to each, as its synthetic data does to CC3M): few enough that data, not steps, limits
# what CLIP learns, the regime TripletCLIP is for (README: "Data-limited and data-rich"). Results
# (the report, metrics.json and every run's final_metrics.json) go to benchmarks/results/clip_reference/.
set -euo pipefail
cd "$(dirname "$0")/../.."
STEPS=${1:-1000}
OUT=${2:-runs/clip_reference}
SEEDS=${SEEDS:-"0 1 2"}
DISTRACTORS=${DISTRACTORS:-1}
TRAIN_SCENES=${TRAIN_SCENES:-4000}
REUSE=${REUSE:-}  # non-empty: keep a run whose folder was trained by the same command (an interrupted reference resumes)
BIN=${SWITCHML_BIN:-.venv/bin}
RESULTS=${RESULTS:-benchmarks/results/clip_reference}
COMMON=(--workers 4 --steps "$STEPS" --distractors "$DISTRACTORS" --train-scenes "$TRAIN_SCENES" --no-progress)
mkdir -p "$OUT" "$RESULTS"
RUNS=()
run() {  # name (method@seed), seed, then switchml-train options
  local name=$1 seed=$2 dir="$OUT/${1/@/_s}"
  shift 2
  local cmd="switchml-train clip ${COMMON[*]} --seed $seed $* --out $dir"
  if [ -n "$REUSE" ] && [ -f "$dir/final_metrics.json" ] && [ "$(cat "$dir.cmd" 2>/dev/null)" = "$cmd" ]; then
    echo "== $name: reusing $dir (trained by the same command)"
  else
    echo "== $name: $cmd"
    rm -f "$dir.cmd"
    "$BIN/switchml-train" clip "${COMMON[@]}" --seed "$seed" "$@" --out "$dir" > "$dir.log" 2>&1
    echo "$cmd" > "$dir.cmd"
  fi
  cp "$dir/final_metrics.json" "$RESULTS/$(basename "$dir").final_metrics.json"
  RUNS+=("$name=$dir")
}
FIRST=${SEEDS%% *}
for seed in $SEEDS; do
  run "clip@$seed" "$seed" --method clip
  run "tripletclip@$seed" "$seed" --method tripletclip --triplet-mode alternate
  run "negclip@$seed" "$seed" --method negclip
done
run "tripletclip-allreduce@$FIRST" "$FIRST" --method tripletclip --triplet-mode alternate --comm allreduce
COMPARE=()
for r in "${RUNS[@]:1}"; do COMPARE+=(--compare "$r"); done
"$BIN/switchml-eval" clip --ckpt "${RUNS[0]}" "${COMPARE[@]}" --report "$RESULTS" \
  --json "$RESULTS/metrics.json" > "$OUT/eval.log" 2>&1
echo "steps: $STEPS; seeds: $SEEDS; distractors: $DISTRACTORS; training scenes: $TRAIN_SCENES; command: SEEDS=\"$SEEDS\" DISTRACTORS=$DISTRACTORS TRAIN_SCENES=$TRAIN_SCENES bash benchmarks/reference/clip.sh $STEPS" > "$RESULTS/COMMAND"
echo "report: $RESULTS"
