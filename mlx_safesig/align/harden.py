"""``align --harden-rounds R``: adversarial hardening of the ``[CLS]`` query verdict (the issue on
white-box attacks, item 2).

Each round attacks the adapters of the round before (round 1: the train stage's) with GCG on the
query verdict (``eval/adaptive.py``, the suite's own attack) on ``requests`` harmful training rows
(plain ones: one user message; picked by a hash of the round and the row), at most ``steps``
steps each, stopping when the verdict says benign. Then it trains ``iters`` more steps from those
adapters (a new optimizer and schedule, half the recipe's learning rate) on:

- every suffixed harmful row found so far (all rounds), labelled by its request: harmful, with the
  row's own refusal and continuation;
- the same suffixes after as many benign training rows, labelled benign (the suffix is no signal;
  a verdict that flags any odd suffix would flag benign users who paste one);
- ``REPLAY`` times as many rows of ``rows/train.jsonl`` as those two, so the rest is kept.

Only training rows are attacked: no dev, test or held-out row takes part. The attacks never show
text on the console (counts only); suffixes are in ``attacks.jsonl``.

    OUT/harden/round-R/attacks.jsonl   one line per attacked row (resumable)
    OUT/harden/round-R/rows/train.jsonl
    OUT/harden/round-R/adapters/       checkpoints every --save-every steps (resumable)
"""

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Sequence

from ..model import SafesigError
from .rows import read_jsonl, write_rows

HARDEN_DIR = "harden"
ATTACKS_FILE = "attacks.jsonl"
REPLAY = 3  # original training rows per adversarial row in a round's training rows
LR_FACTOR = 0.5  # a round's peak learning rate, as a share of the recipe's
SUFFIX_LEN, TOP_K, BATCH = 12, 64, 32  # GCG as the adaptive suite runs it by default


@dataclass
class HardenSettings:
    rounds: int = 0
    requests: int = 32  # harmful training rows attacked per round
    steps: int = 20  # GCG steps per row at most (a row stops once its verdict says benign)
    iters: int = 40  # training steps per round

    def __post_init__(self):
        if self.rounds < 0:
            raise SafesigError(f"--harden-rounds must be 0 or more, got {self.rounds}.")
        for name in ("requests", "steps", "iters"):
            if getattr(self, name) < 1:
                raise SafesigError(f"--harden-{name} must be at least 1, got {getattr(self, name)}.")


def _hash(*parts) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()


def round_dir(out: Path, r: int) -> Path:
    return Path(out) / HARDEN_DIR / f"round-{r}"


def final_adapters(out: Path, rounds: int) -> Path:
    """The adapters ``fuse`` fuses: the last hardening round's, or the train stage's."""
    return round_dir(out, rounds) / "adapters" if rounds else Path(out) / "adapters"


def plain(row: dict) -> bool:
    """A row of one user message and its answer, not framed, wrapped or translated."""
    roles = [m["role"] for m in row["messages"]]
    return roles == ["user", "assistant"] and ":" not in str(row.get("source"))


def pick(rows: Sequence[tuple], n: int, salt: str) -> List[tuple]:
    """``n`` of ``(index, row)`` by a hash of the salt and the row's prompt."""
    return sorted(rows, key=lambda x: _hash(salt, x[0], x[1]["messages"][0]["content"]))[:n]


def suffixed(row: dict, text: str) -> dict:
    """``row`` with ``text`` appended to its user message, as the adaptive suite pastes it."""
    from ..eval.adaptive_suite import suffixed_messages

    return dict(row, messages=suffixed_messages(row["messages"], text),
                source=f"{row.get('source')}:adversarial")


def read_attacks(path: Path) -> List[dict]:
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def attack_round(model, tokenizer, train_rows: Sequence[dict], r: int, settings: HardenSettings,
                 folder: Path, log: Callable[[str], None]) -> List[dict]:
    """Attack ``settings.requests`` plain harmful rows of ``train_rows`` with GCG on the query
    verdict of ``model``; one line per row in ``folder/attacks.jsonl`` (a rerun skips them)."""
    from ..decoding import SafetyConfig
    from ..eval.adaptive import Attack, AttackSettings, allowed_tokens

    config = SafetyConfig().resolved(model.args.safesig)
    harmful = [(i, x) for i, x in enumerate(train_rows) if x["label"] == 1 and plain(x)]
    if not harmful:
        raise SafesigError("no plain harmful training row to attack.")
    targets = pick(harmful, settings.requests, f"harden|{r}")
    path = folder / ATTACKS_FILE
    done = {a["index"]: a for a in read_attacks(path)}
    attack_settings = AttackSettings(attack="gcg", objective="verdict", suffix_len=SUFFIX_LEN,
                                     top_k=TOP_K, batch=BATCH, steps=settings.steps,
                                     loss_floor=None)  # one head, stopped below the threshold
    allowed = allowed_tokens(model, tokenizer)
    folder.mkdir(parents=True, exist_ok=True)
    for k, (i, row) in enumerate(targets, 1):
        if i in done:
            continue
        messages = row["messages"][:1]
        attack = Attack(model, tokenizer, config, attack_settings, [messages], allowed,
                        seed=int(_hash(r, i)[:12], 16))
        res = attack.run(check=lambda suffix: True)  # stop once the verdict says benign
        line = {"index": i, "suffix_ids": res.suffix,
                "suffix": attack.targets[0].prompt.decode(res.suffix),
                "p": round(res.ps[0], 6), "steps_to_success": res.steps_to_success,
                "steps_run": res.steps_run, "seconds": res.seconds}
        with path.open("a") as f:
            f.write(json.dumps(line) + "\n")
        done[i] = line
        broken = [a for a in done.values() if a["steps_to_success"] is not None]
        log(f"round {r}: attacked {len(done)}/{len(targets)} training requests, "
            f"{len(broken)} below the threshold within {settings.steps} steps")
    return [done[i] for i, _ in targets]


def adversarial_rows(train_rows: Sequence[dict], attacks: Sequence[dict], r: int) -> List[dict]:
    """Each attack's suffix after its harmful row (harmful) and after one benign plain row
    (benign, picked by a hash of the round)."""
    benign = pick([(i, x) for i, x in enumerate(train_rows) if x["label"] == 0 and plain(x)],
                  len(attacks), f"harden-benign|{r}")
    out = []
    for k, a in enumerate(attacks):
        out.append(suffixed(train_rows[a["index"]], a["suffix"]))
        if k < len(benign):
            out.append(suffixed(benign[k][1], a["suffix"]))
    return out


def round_rows(train_rows: Sequence[dict], adversarial: Sequence[dict], r: int) -> List[dict]:
    """The adversarial rows of rounds 1..r and ``REPLAY`` times as many training rows."""
    replay = pick(list(enumerate(train_rows)), REPLAY * len(adversarial), f"harden-replay|{r}")
    rows = list(adversarial) + [x for _, x in replay]
    return sorted(rows, key=lambda x: _hash(json.dumps(x, sort_keys=True)))


def harden(out: Path, model_dir: Path, settings: HardenSettings, train_config,
           log: Callable[[str], None]):
    """Run the rounds not done yet (a round is done when its adapters hold the final step)."""
    from ..adapters import STATE_FILE, checkpoint_step
    from ..loading import load
    from ..train import train_from_dir

    out = Path(out)
    train_rows = read_jsonl(out / "rows" / "train.jsonl")
    adversarial: List[dict] = []
    for r in range(1, settings.rounds + 1):
        folder = round_dir(out, r)
        adapters = folder / "adapters"
        previous = final_adapters(out, r - 1)
        finished = (checkpoint_step(adapters) or 0) >= settings.iters
        if finished:
            attacks = read_attacks(folder / ATTACKS_FILE)
        else:
            model, tokenizer = load(str(model_dir), adapter_path=str(previous))
            attacks = attack_round(model, tokenizer, train_rows, r, settings, folder, log)
            del model
        adversarial += adversarial_rows(train_rows, attacks, r)
        if finished:
            continue
        rows_dir = folder / "rows"
        rows_dir.mkdir(parents=True, exist_ok=True)
        rows = round_rows(train_rows, adversarial, r)
        write_rows(rows_dir / "train.jsonl", rows)
        broken = sum(a["steps_to_success"] is not None for a in attacks)
        log(f"round {r}: {broken}/{len(attacks)} suffixes broke the verdict; training "
            f"{settings.iters} steps on {len(adversarial)} adversarial rows and "
            f"{len(rows) - len(adversarial)} replayed ones")
        resume = (adapters / STATE_FILE).is_file()
        if not resume and adapters.exists():
            shutil.rmtree(adapters)
        train_from_dir(model_dir, rows_dir, adapters, train_config(settings.iters),
                       add_safety=True, resume=resume, log=log, drop_long=True,
                       init_from=None if resume else previous)


def harden_lines(out: Path) -> List[str]:
    """The model card's account of the hardening rounds in ``out`` (none: no lines)."""
    import statistics

    rounds = sorted((p for p in (Path(out) / HARDEN_DIR).glob("round-*") if p.is_dir()),
                    key=lambda p: int(p.name.split("-")[1]))
    if not rounds:
        return []
    lines = ["## Adversarial hardening", "",
             "After training, each round attacked the adapters of the round before with GCG "
             f"({SUFFIX_LEN}-token suffix, top-k {TOP_K}, {BATCH} swaps per step) on the query "
             "verdict of harmful *training* requests, then trained on the suffixed requests "
             "(harmful), the same suffixes after benign training prompts (benign) and "
             f"{REPLAY} times as many replayed training rows. No dev, test or held-out row took "
             "part.", "", "| round | attacked | verdict broken | median steps to break |",
             "|---|---|---|---|"]
    for folder in rounds:
        attacks = read_attacks(folder / ATTACKS_FILE)
        steps = [a["steps_to_success"] for a in attacks if a["steps_to_success"] is not None]
        median = f"{statistics.median(steps):g}" if steps else "-"
        lines.append(f"| {folder.name.split('-')[1]} | {len(attacks)} | {len(steps)} | {median} |")
    return lines + [""]
