#!/usr/bin/env bash
# The default model's measured safety in the README: `mlx-safesig eval` on the dev split (never
# trained on), safety on vs off, greedy, 48 new tokens. Every benign dev prompt; direct and
# prefill attacks on the first 48 harmful dev prompts by id, the decoding grid and the templates
# on the first 24 (the grid's sampled generations run one at a time, templates are long prompts),
# so that the whole run takes about 45 minutes on a 2-core x86 CPU;
# raise or drop the --limit options for tighter numbers.
# Harmful rows of the Do-Not-Answer categories the adapter is not trained on are left out (see
# python -m mlx_safesig.align.rows). Run from the repository root:
#   examples/default_adapter/eval_default.sh [DATA] [OUT] [MODEL]
# (MODEL: a safety model directory, e.g. from `mlx-safesig fuse`; default: the embedded one)
set -euo pipefail
DATA=${1:-data}
OUT=${2:-eval-results/default}
MODEL=${3:-}
COMMON=(${MODEL:+--model "$MODEL"} --data "$DATA" -m 48 --resume
        --exclude-category human_chatbox --exclude-category misinformation_harms)
mlx-safesig eval "${COMMON[@]}" --suite benign --out "$OUT/benign" > /dev/null
mlx-safesig eval "${COMMON[@]}" --suite direct,prefill --limit 48 --out "$OUT/attacks" > /dev/null
mlx-safesig eval "${COMMON[@]}" --suite decoding --limit 24 --grid-size 3 --out "$OUT/decoding" \
  > /dev/null
mlx-safesig eval "${COMMON[@]}" --suite templates --limit 24 --out "$OUT/templates" > /dev/null
for d in benign attacks decoding templates; do echo "== $OUT/$d/report.md"; cat "$OUT/$d/report.md"; done
