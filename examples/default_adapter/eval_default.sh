#!/usr/bin/env bash
# The default model's measured safety in the README: `mlx-safesig eval` on the dev split (never
# trained on), safety on vs off, greedy, 48 new tokens. Prompts per suite are limited so that the
# whole run takes about 40 minutes on a 2-core x86 CPU (safety-on generations run one at a time;
# safety-off ones are batched); raise or drop the --limit options for tighter numbers.
# Harmful rows of the Do-Not-Answer categories the adapter is not trained on are left out (see
# examples/default_adapter/make_data.py). Run from the repository root:
#   examples/default_adapter/eval_default.sh [DATA] [OUT] [MODEL]
# (MODEL: a safety model directory, e.g. from `mlx-safesig fuse`; default: the embedded one)
set -euo pipefail
DATA=${1:-data}
OUT=${2:-eval-results/default}
MODEL=${3:-}
COMMON=(${MODEL:+--model "$MODEL"} --data "$DATA" -m 48 --resume
        --exclude-category human_chatbox --exclude-category misinformation_harms)
mlx-safesig eval "${COMMON[@]}" --suite benign --limit 100 --out "$OUT/benign" > /dev/null
mlx-safesig eval "${COMMON[@]}" --suite direct,prefill,decoding --limit 12 --grid-size 3 \
  --out "$OUT/attacks" > /dev/null
mlx-safesig eval "${COMMON[@]}" --suite templates --limit 4 --out "$OUT/templates" > /dev/null
for d in benign attacks templates; do echo "== $OUT/$d/report.md"; cat "$OUT/$d/report.md"; done
