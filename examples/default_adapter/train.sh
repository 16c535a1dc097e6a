#!/usr/bin/env bash
# Rebuild the default model's safety adapter (mlx_safesig/default_adapter/) from pinned data.
# Run from the repository root; takes ~1 h 30 min on a 2-core x86 CPU with OpenBLAS (training ~70 min
# alone on the machine, the base-model answers ~20 min), less on a Mac.
#   examples/default_adapter/train.sh [OUT [extra train options]]
# Defaults: the shipped adapter (v15: the refusal prefix given, 128-token harmful continuations,
# mlx_safesig/align/prompts/extra_benign.txt in the train rows, framed copies of 10% of the harmful
# and 5% of the benign train prompts (mlx_safesig/align/prompts/framings.txt), lambda 0.3, 375
# steps). Versions v7 to v12 (docs/default-model.md) take "--iters 250 --steps-per-eval 125" and:
# MAKE_DATA_ARGS="" with "--lambda 0.1" (v7); MAKE_DATA_ARGS="--give-refusal-prefix" with "--lambda 0.1" (v8) or
# without (v9a); v9b: MAKE_DATA_ARGS="--give-refusal-prefix --max-tokens 128" (v9b seed 1: also
# "--seed 1"); v10c / v10d: MAKE_DATA_ARGS="--give-refusal-prefix --max-tokens 128
# --mismatched-continuations 0.25" / "... 0.1" with "--window-query"; v11: the default
# MAKE_DATA_ARGS without the framing options; v12: v11's plus "--framings
# mlx_safesig/align/prompts/framings.txt"; v13: v11's MAKE_DATA_ARGS with the default 375 steps; v14:
# v12's MAKE_DATA_ARGS with the default 375 steps.
# Extra train options come last, and click takes the last of a repeated option. ADAPTER_DATA: the
# rows' folder (default data/adapter; its cached base-model generations are reused for every version).
set -euo pipefail
OUT=${1:-adapters}
shift $(( $# > 0 ? 1 : 0 ))
ADAPTER_DATA=${ADAPTER_DATA:-data/adapter}
MAKE_DATA_ARGS=${MAKE_DATA_ARGS---give-refusal-prefix --max-tokens 128 --extra-benign mlx_safesig/align/prompts/extra_benign.txt --framings mlx_safesig/align/prompts/framings.txt --framed-harmful 0.1 --framed-benign 0.05}
python -m mlx_safesig.align.build --out data
# shellcheck disable=SC2086  # MAKE_DATA_ARGS is a list of options
python -m mlx_safesig.align.rows --data data --out "$ADAPTER_DATA" $MAKE_DATA_ARGS
BASE=$(python -c "from mlx_safesig.default_model import default_base_model; print(default_base_model())")
mlx-safesig train --model "$BASE" --add-safety --data "$ADAPTER_DATA" --adapter-path "$OUT" \
  --iters 375 --batch-size 8 --learning-rate 2e-4 --lambda 0.3 --num-layers 16 --lora-rank 8 \
  --probes 12 --max-seq-length 768 --warmup 20 --steps-per-eval 375 --val-batches -1 --save-every 25 \
  "$@"
