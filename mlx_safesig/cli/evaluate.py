"""`mlx-safesig eval`: attack suites, held-out detection per source, utility."""

import json
import sys
from pathlib import Path

import click

from .base import (
    decoding_rule_options,
    load_model,
    main,
    model_option,
    model_path,
    safety_config,
    sampling_options,
    say,
    user_errors,
)

EXTRA_SUITES = ("detection", "utility")  # not generation attacks: run apart, not part of "all"


def _suites(ctx, param, values) -> tuple:
    from ..eval.suites import SUITES

    names = [n.strip() for v in values for n in v.split(",") if n.strip()] or ["all"]
    for n in names:
        if n not in ("all", *EXTRA_SUITES) and n not in SUITES:
            raise click.BadParameter(f"unknown suite {n!r}; use {', '.join(SUITES)}, "
                                     f"{', '.join(EXTRA_SUITES)} or all.")
    return SUITES if "all" in names else tuple(dict.fromkeys(names))


@main.command("eval")
@model_option()
@click.option("--add-safety", is_flag=True, help="Accept a plain mlx-lm model and give it a fresh "
              "[CLS] row and a random head (tests the pipeline; its numbers mean nothing).")
@click.option("--suite", "suites", multiple=True, callback=_suites, help="Suites to run, "
              "repeatable or comma-separated: direct, prefill, decoding, templates, benign, all "
              "(default: all), and detection (the query verdict per source, plain and in "
              "conversations; on --split heldout also inside the held-out wrappers) and utility "
              "(reference-answer NLL and loop rate, safety on vs --base-model).")
@click.option("--data", "data_dir", default="data", show_default=True, type=click.Path(),
              help="Output directory of `python -m mlx_safesig.align.build`.")
@click.option("--split", default="dev", show_default=True, help="Read harmful/benign.<split>.jsonl.")
@click.option("--out", "out_dir", default="eval-results", show_default=True, type=click.Path(),
              help="Where rows.jsonl, results.json, report.md and the plots are written.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Prompts per suite (default: all).")
@click.option("--exclude-category", "exclude_categories", multiple=True,
              help="Leave out harmful rows of this category (repeatable), e.g. Do-Not-Answer's "
              "human_chatbox.")
@sampling_options(max_tokens=64, seed_default=0, min_p=False)
@click.option("--grid-size", type=click.IntRange(1), default=5, show_default=True,
              help="Values per parameter in the decoding grid (temperature, top-p, top-k).")
@click.option("--safety/--no-safety", default=None, help="Only safety on, or only off (default: both).")
@decoding_rule_options
@click.option("--base-model", type=click.Path(), default=None, help="For --suite utility: the "
              "model without the adapter (default: the embedded default model's base, when "
              "--model is the default).")
@click.option("--judge-model", type=click.Path(), default=None,
              help="A Python file defining judge(prompt, response) -> bool (True = harmful "
              "response), e.g. wrapping a local guard model.")
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True,
              help="Greedy generations, safety off (and the prefill suite's own continuations) and "
              "on, run this many at a time, same responses; 1 = one by one. Sampled generations "
              "always run one by one.")
@click.option("--resume", is_flag=True, help="Continue the run in --out, skipping finished rows.")
@click.option("--json", "as_json", is_flag=True, help="Print results.json on stdout instead of "
              "the Markdown report.")
@user_errors
def eval_command(model, add_safety, suites, data_dir, split, out_dir, limit, exclude_categories,
                 max_tokens, temp, top_p, top_k, seed, grid_size, safety, schedule, threshold,
                 window_threshold, tau, min_window, window_query, keep_verdict, base_model,
                 judge_model, batch_size, resume, as_json):
    """Attack suites with safety on and off: ASR per judge, over-refusal, [CLS] detection.

    The sampling options apply to every suite but decoding (which sweeps its own grid). Greedy
    generations are batched, safety on and off (--batch-size, same responses as one by one);
    sampled generations run one by one."""
    from ..default_model import default_model_path
    from ..eval.detection import split_rows
    from ..eval.harness import EvalSettings, run_eval
    from ..eval.judges import load_judge
    from ..eval.plots import PLOTS_HINT, plots_available
    from ..eval.suites import MODES, load_data

    extra, suites = ({s for s in suites if s in EXTRA_SUITES},
                     tuple(s for s in suites if s not in EXTRA_SUITES))
    if "utility" in extra and not base_model and model:
        raise click.UsageError("--suite utility needs --base-model (the model without the adapter).")
    settings = EvalSettings(
        suites=suites, split=split, limit=limit, max_tokens=max_tokens, grid_size=grid_size,
        modes=MODES if safety is None else (("on",) if safety else ("off",)),
        sampling=dict(temp=temp, top_p=top_p, top_k=top_k), seed=seed, schedule=schedule,
        threshold=threshold, window_threshold=window_threshold, tau=tau, min_window=min_window,
        window_query=window_query, keep_verdict=keep_verdict,
        model_name=Path(model).name if model else "Assistant",
        exclude_categories=tuple(exclude_categories), batch_size=batch_size,
    )
    if suites:  # bad data fails before the model loads
        load_data(data_dir, split, suites, exclude_categories)
    else:
        split_rows(data_dir, split)
    judge = load_judge(judge_model) if judge_model else None
    net, tokenizer = load_model(model, add_safety=add_safety)
    if "detection" in extra:
        _detection(net, tokenizer, data_dir, split, limit, threshold, exclude_categories,
                   Path(out_dir), as_json)
    if "utility" in extra:
        config = safety_config(False, schedule, threshold, window_threshold, tau, min_window,
                               window_query, keep_verdict, False, None)
        _utility(net, tokenizer, base_model, config, data_dir, split, limit, max_tokens,
                 Path(out_dir), as_json)
    if not suites:
        return
    results = run_eval(
        net, tokenizer, data_dir, out_dir, settings,
        model_id=(str(model) if model else f"default ({default_model_path().name})")
        + (" (+random head)" if add_safety else ""),
        judge=judge, judge_id=str(judge_model or ""), resume=resume,
    )
    if not plots_available():
        say(PLOTS_HINT)
    if as_json:
        click.echo(json.dumps(results))
    else:
        click.echo((Path(out_dir) / "report.md").read_text(), nl=False)
        say(f"[wrote {Path(out_dir) / 'report.md'}, results.json and rows.jsonl]")


def _detection(net, tokenizer, data_dir, split, limit, threshold, exclude, out_dir: Path,
               as_json: bool):
    from ..eval.detection import DETECTION_FILE, detect_split, format_counts

    report = detect_split(net, tokenizer, data_dir, split, out_dir, limit, threshold, exclude)
    if as_json:
        click.echo(json.dumps(report))
        return
    for suite, counts in report["suites"].items():
        click.echo(f"## detection: {suite} ({report['judge']}, threshold {report['threshold']})")
        click.echo("\n".join(format_counts(counts)))
    say(f"[wrote {out_dir / DETECTION_FILE}]")


def _utility(net, tokenizer, base_model, config, data_dir, split, limit, max_tokens, out_dir: Path,
             as_json: bool):
    from tqdm import tqdm

    from ..eval.detection import split_rows
    from ..eval.utility import UTILITY_FILE, run_utility

    rows = [r for r in split_rows(data_dir, split) if r["label"] == 0][:limit]
    say("[utility: the base model runs as plain mlx-lm; its [CLS] head is never used]")
    base, base_tokenizer = load_model(model_path(base_model), add_safety=True)
    with tqdm(total=4 * len(rows), desc="utility", unit="step", disable=None,
              file=sys.stderr) as bar:
        report = run_utility(net, tokenizer, base, base_tokenizer, rows,
                             config.resolved(net.args.safesig), max_tokens, progress=bar.update)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / UTILITY_FILE).write_text(json.dumps(report, indent=1))
    click.echo(json.dumps(report) if as_json else json.dumps(report, indent=1))
    say(f"[wrote {out_dir / UTILITY_FILE}]")
