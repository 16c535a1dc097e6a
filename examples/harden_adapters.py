"""Run `align`'s hardening rounds (``mlx_safesig/align/harden.py``) on adapters trained with
`mlx-safesig train`, outside an align run: the testbed of docs/data-and-evaluation.md,
"Embedding-space adversarial training" (issue 26).

    python examples/harden_adapters.py --model BASE --rows ROWS --adapters A --out OUT [--rounds 3]

OUT gets ``rows/train.jsonl`` (a copy of ROWS') and ``adapters`` (a copy of A) as an align run
has them, then ``harden/round-R/`` as align writes it; a rerun continues (attacks row by row,
training from its checkpoints). Each round trains with the settings A was trained with (its
``adapter_config.json``), as align's rounds do with the recipe's: ``--harden-iters`` steps at
half the learning rate, a short warmup. Fuse the last round with ``mlx-safesig fuse --model BASE
--adapter-path OUT/harden/round-R/adapters --save-path M``.
"""

import argparse
import json
import shutil
import sys
from dataclasses import fields
from pathlib import Path

import mlx_safesig  # noqa: F401  (OpenBLAS before mlx)
from mlx_safesig.adapters import ADAPTER_CONFIG
from mlx_safesig.align.harden import LR_FACTOR, HardenSettings, harden
from mlx_safesig.model import SafesigError
from mlx_safesig.train import TrainConfig


def round_config(adapters: Path):
    """``iters -> TrainConfig``: the adapters' own training settings, for a hardening round."""
    saved = json.loads((adapters / ADAPTER_CONFIG).read_text())["safesig_training"]
    known = {f.name for f in fields(TrainConfig)}
    base = TrainConfig(**{k: v for k, v in saved.items() if k in known})

    def config(iters: int) -> TrainConfig:
        return TrainConfig(**{**base.__dict__, "iters": iters, "steps_per_eval": iters,
                              "learning_rate": base.learning_rate * LR_FACTOR,
                              "warmup": min(base.warmup, iters // 4), "save_every": 25})

    return config


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="The base model the adapters were trained on.")
    p.add_argument("--rows", required=True, type=Path, help="Folder with the training rows "
                   "(train.jsonl) the adapters were trained on; only these rows are attacked.")
    p.add_argument("--adapters", required=True, type=Path, help="Adapters from mlx-safesig train.")
    p.add_argument("--out", required=True, type=Path, help="Folder of the rounds.")
    for name, default, text in (("rounds", 3, "Hardening rounds."),
                                ("requests", 32, "Harmful training requests attacked per round."),
                                ("steps", 20, "GCG steps per request at most."),
                                ("iters", 40, "Training steps per round.")):
        p.add_argument(f"--{name}", type=int, default=default, help=text)
    a = p.parse_args(argv)
    try:
        if not (a.rows / "train.jsonl").is_file() or not (a.adapters / ADAPTER_CONFIG).is_file():
            raise SafesigError(f"need {a.rows}/train.jsonl and {a.adapters}/{ADAPTER_CONFIG}.")
        settings = HardenSettings(rounds=a.rounds, requests=a.requests, steps=a.steps, iters=a.iters)
        (a.out / "rows").mkdir(parents=True, exist_ok=True)
        if not (a.out / "rows" / "train.jsonl").is_file():
            shutil.copyfile(a.rows / "train.jsonl", a.out / "rows" / "train.jsonl")
        if not (a.out / "adapters").is_dir():
            shutil.copytree(a.adapters, a.out / "adapters")
        harden(a.out, Path(a.model), settings, round_config(a.adapters),
               lambda m: print(m, file=sys.stderr, flush=True))
    except SafesigError as e:
        sys.exit(f"Error: {e}")


if __name__ == "__main__":
    main()
