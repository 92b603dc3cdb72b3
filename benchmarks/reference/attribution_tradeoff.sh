#!/usr/bin/env bash
# WOUAF's image quality against its robustness (issue 20): the WOUAF stage alone, once per
# PSNR budget, on one root generator, each with 4 workers through the software switch on
# loopback; then switchml-eval attribution on every run and a trade-off table and chart.
#
#   ROOT=runs/attribution_reference/root_generator.pt bash benchmarks/reference/attribution_tradeoff.sh [OUT]
#   ROOT=... TARGETS="27 31 35" WOUAF_STEPS=1500 SEED=0 bash benchmarks/reference/attribution_tradeoff.sh
#
# OUT (default runs/attribution_tradeoff) gets one folder per budget, psnr<T>/; a folder that
# already holds wouaf_model.pt is not trained again, so an interrupted sweep resumes and a run of
# attribution.sh with the same root, seed and steps can stand in for its budget. Each run takes
# the WOUAF options of attribution.sh (the PSNR curriculum ramps over half the steps). Results:
# $RESULTS (default benchmarks/results/attribution_tradeoff/): attribution_tradeoff.{md,png},
# each run's metrics as psnr<T>.json, and the command.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/attribution_tradeoff}
BIN=${SWITCHML_BIN:-.venv/bin}
ROOT=${ROOT:?set ROOT to the root_generator.pt to fingerprint (attribution.sh writes one)}
TARGETS=${TARGETS:-27 31 35}
WOUAF_STEPS=${WOUAF_STEPS:-1500}
SEED=${SEED:-0}
RESULTS=${RESULTS:-benchmarks/results/attribution_tradeoff}
mkdir -p "$OUT" "$RESULTS"
RUNS=()
for T in $TARGETS; do
  RUN="$OUT/psnr$T"
  mkdir -p "$RUN"
  [ -e "$RUN/root_generator.pt" ] || cp "$ROOT" "$RUN/root_generator.pt"
  if [ ! -e "$RUN/wouaf_model.pt" ]; then
    ARGS=(attribution --stage wouaf --workers 4 --comm switchml --seed "$SEED" --no-progress --wouaf-steps "$WOUAF_STEPS"
          --psnr-ramp-steps $((WOUAF_STEPS / 2)) --psnr-target "$T" --out "$RUN")
    echo "== switchml-train ${ARGS[*]}"
    "$BIN/switchml-train" "${ARGS[@]}" > "$RUN/train.log" 2>&1
  fi
  echo "== switchml-eval attribution --ckpt $RUN"
  "$BIN/switchml-eval" attribution --ckpt "$RUN" --reuse --fid-steps 0 --json "$RESULTS/psnr$T.json" > "$RUN/eval.log" 2>&1
  RUNS+=("psnr$T=$RUN")
done
COMPARE=()
for r in "${RUNS[@]:1}"; do COMPARE+=(--compare "$r"); done
"$BIN/switchml-eval" attribution --ckpt "${RUNS[0]}" "${COMPARE[@]}" --reuse --fid-steps 0 --report "$RESULTS" > "$OUT/report.log" 2>&1
echo "ROOT=$ROOT TARGETS=\"$TARGETS\" WOUAF_STEPS=$WOUAF_STEPS SEED=$SEED bash benchmarks/reference/attribution_tradeoff.sh $OUT" > "$RESULTS/COMMAND"
echo "report: $RESULTS/attribution_tradeoff.md"
