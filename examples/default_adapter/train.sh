#!/usr/bin/env bash
# Rebuild the default model's safety adapter (mlx_safesig/default_adapter/) from pinned data.
# Run from the repository root; takes ~1 h on a 2-core x86 CPU with OpenBLAS (training ~40 min
# alone on the machine, the base-model answers ~15 min), less on a Mac.
set -euo pipefail
OUT=${1:-adapters}
python examples/data/build_data.py --out data
python examples/default_adapter/make_data.py --data data --out data/adapter
BASE=$(python -c "from mlx_safesig.default_model import default_base_model; print(default_base_model())")
mlx-safesig train --model "$BASE" --add-safety --data data/adapter --adapter-path "$OUT" \
  --iters 250 --batch-size 8 --learning-rate 2e-4 --lambda 0.1 --num-layers 16 --lora-rank 8 \
  --probes 12 --max-seq-length 768 --warmup 20 --steps-per-eval 125 --val-batches -1 --save-every 25
