"""`mlx-safesig eval`: attack suites, held-out detection per source, utility, adaptive attacks."""

import json
from pathlib import Path

import click

from .base import (
    decoding_rule_options,
    load_model,
    main,
    model_option,
    model_path,
    options,
    safety_config,
    sampling_options,
    say,
    user_errors,
)

# not generation attacks: run apart, not part of "all"
EXTRA_SUITES = ("detection", "utility", "adaptive")


def _suites(ctx, param, values) -> tuple:
    from ..eval.suites import SUITES

    names = [n.strip() for v in values for n in v.split(",") if n.strip()] or ["all"]
    for n in names:
        if n not in ("all", *EXTRA_SUITES) and n not in SUITES:
            raise click.BadParameter(f"unknown suite {n!r}; use {', '.join(SUITES)}, "
                                     f"{', '.join(EXTRA_SUITES)} or all.")
    return SUITES if "all" in names else tuple(dict.fromkeys(names))


def _budgets(ctx, param, value) -> tuple:
    try:
        budgets = sorted({int(v) for v in value.split(",") if v.strip()})
    except ValueError:
        budgets = []
    if not budgets or budgets[0] < 1:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of positive step counts.")
    return tuple(budgets)


def _names(choices):
    def check(ctx, param, value) -> tuple:
        names = tuple(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
        bad = [n for n in names if n not in choices]
        if bad or not names:
            raise click.BadParameter(f"unknown {param.name[:-1]} {(bad or [value])[0]!r}; use "
                                     f"{', '.join(choices)} (comma-separated).")
        return names

    return check


adaptive_options = options(
    click.option("--attack", "attacks", default="gcg", show_default=True,
                 callback=_names(("gcg", "random")), help="For --suite adaptive: the suffix "
                 "attacks, comma-separated: gcg (gradient-guided token swaps, Zou et al. 2023), "
                 "random (random search, Andriushchenko et al. 2024)."),
    click.option("--objective", "objectives", default="verdict,windows", show_default=True,
                 callback=_names(("verdict", "windows")), help="For --suite adaptive: what the "
                 "attack lowers, comma-separated: verdict (the query verdict's log p(malicious)) "
                 "or windows (that plus the window checks of the first --response-tokens tokens)."),
    click.option("--steps", "step_budgets", default="10,25,100", show_default=True,
                 callback=_budgets, help="For --suite adaptive: step budgets at which success is "
                 "reported, comma-separated; the attack runs up to the largest."),
    click.option("--suffix-len", type=click.IntRange(1, 64), default=12, show_default=True,
                 help="For --suite adaptive: suffix tokens appended to the request."),
    click.option("--time-budget", type=click.FloatRange(0, min_open=True), default=None,
                 help="For --suite adaptive: seconds per attacked request (default: no limit; a "
                 "limit makes reruns depend on the machine's speed)."),
    click.option("--universal-requests", type=click.IntRange(0), default=0, show_default=True,
                 help="For --suite adaptive: also optimise one suffix over this many attacked "
                 "requests and report its transfer to the others (0 = off)."),
    click.option("--response-tokens", type=click.IntRange(1), default=16, show_default=True,
                 help="For --suite adaptive: response tokens the windows objective covers and the "
                 "success check generates with safety on."),
    click.option("--loss-floor", type=click.FloatRange(0, 1, max_open=True), default=0.05,
                 show_default=True, help="For --suite adaptive: each check's p(malicious) below "
                 "this earns the attacker nothing more, so one check pushed ever lower cannot "
                 "outweigh one that holds; 0 = no floor (the loss of runs made before it)."),
)


@main.command("eval")
@model_option()
@click.option("--add-safety", is_flag=True, help="Accept a plain mlx-lm model and give it a fresh "
              "[CLS] row and a random head (tests the pipeline; its numbers mean nothing).")
@click.option("--suite", "suites", multiple=True, callback=_suites, help="Suites to run, "
              "repeatable or comma-separated: direct, prefill, decoding, templates, conversation "
              "(multi-turn attacks), benign, all (default: all), and detection (the query verdict "
              "per source, plain, in conversations and inside wrappers: the held-out ones on "
              "--split heldout, else the dev wrappers kept out of training) and utility "
              "(reference-answer NLL and loop rate, safety on vs --base-model) and adaptive "
              "(white-box suffix attacks on the [CLS] verdict per held-out source).")
@click.option("--data", "data_dir", default="data", show_default=True, type=click.Path(),
              help="Output directory of `python -m mlx_safesig.align.build`.")
@click.option("--split", default="dev", show_default=True, help="Read harmful/benign.<split>.jsonl.")
@click.option("--out", "out_dir", default="eval-results", show_default=True, type=click.Path(),
              help="Where rows.jsonl, results.json, report.md and the plots are written.")
@click.option("--limit", type=click.IntRange(1), default=None,
              help="Prompts per suite; for detection, utility and adaptive, per source "
              "(default: all).")
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
@adaptive_options
@click.option("--resume", is_flag=True, help="Continue the run in --out, skipping finished rows "
              "(for detection: reusing the verdicts the same model already computed there).")
@click.option("--json", "as_json", is_flag=True, help="Print results.json on stdout instead of "
              "the Markdown report.")
@user_errors
def eval_command(model, add_safety, suites, data_dir, split, out_dir, limit, exclude_categories,
                 max_tokens, temp, top_p, top_k, seed, grid_size, safety, schedule, threshold,
                 window_threshold, tau, min_window, window_query, keep_verdict, surprisal_gate,
                 surprisal_window, smooth_copies, smooth_rate, base_model, judge_model,
                 batch_size, attacks, objectives, step_budgets, suffix_len, time_budget,
                 universal_requests, response_tokens, loss_floor, resume, as_json):
    """Attack suites with safety on and off: ASR per judge, over-refusal, [CLS] detection.

    The sampling options apply to every suite but decoding (which sweeps its own grid). Greedy
    generations are batched, safety on and off (--batch-size, same responses as one by one);
    sampled generations run one by one. With --surprisal-gate the adaptive suite's attacker
    knows the gate: swaps stay among fluent tokens, and a success must pass it; the detection
    suite also counts the rows the gate refuses (what it costs the benign ones)."""
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
        window_query=window_query, keep_verdict=keep_verdict, surprisal_gate=surprisal_gate,
        surprisal_window=surprisal_window, smooth_copies=smooth_copies, smooth_rate=smooth_rate,
        model_name=Path(model).name if model else "Assistant",
        exclude_categories=tuple(exclude_categories), batch_size=batch_size,
    )
    if suites:  # bad data fails before the model loads
        load_data(data_dir, split, suites, exclude_categories)
    else:
        split_rows(data_dir, split)
    if "adaptive" in extra:
        adaptive = _adaptive_plan(data_dir, split, limit, exclude_categories, attacks, objectives,
                                  step_budgets, suffix_len, time_budget, response_tokens,
                                  loss_floor)
    judge = load_judge(judge_model) if judge_model else None
    net, tokenizer = load_model(model, add_safety=add_safety)
    config = safety_config(schedule=schedule, threshold=threshold, window_threshold=window_threshold,
                           tau=tau, min_window=min_window, window_query=window_query,
                           keep_verdict=keep_verdict, surprisal_gate=surprisal_gate,
                           surprisal_window=surprisal_window, smooth_copies=smooth_copies,
                           smooth_rate=smooth_rate)
    if "detection" in extra:
        _detection(net, tokenizer, data_dir, split, limit, threshold, exclude_categories,
                   Path(out_dir), resume, as_json, config.resolved(net.args.safesig))
    if "adaptive" in extra:
        _adaptive(net, tokenizer, adaptive, config, step_budgets, seed, universal_requests,
                  resume, str(model) if model else f"default ({default_model_path().name})",
                  split, limit, Path(out_dir), as_json)
    if "utility" in extra:
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
               resume: bool, as_json: bool, config):
    from ..eval.detection import DETECTION_FILE, detect_split, format_counts

    report = detect_split(net, tokenizer, data_dir, split, out_dir, limit, threshold, exclude,
                          resume=resume, log=say, gate=config.surprisal_gate,
                          window=config.surprisal_window,
                          smooth=(config.smooth_copies, config.smooth_rate)
                          if config.smooth_copies else None)
    if as_json:
        click.echo(json.dumps(report))
        return
    gate = (f", surprisal gate {report['gate']['gate']} over {report['gate']['window']} tokens"
            if "gate" in report else "")
    for suite, counts in report["suites"].items():
        click.echo(f"## detection: {suite} ({report['judge']}, threshold {report['threshold']}{gate})")
        click.echo("\n".join(format_counts(counts)))
    say(f"[wrote {out_dir / DETECTION_FILE}]")


def _utility(net, tokenizer, base_model, config, data_dir, split, limit, max_tokens, out_dir: Path,
             as_json: bool):
    from ..eval.detection import sample_per_source, split_rows
    from ..eval.utility import UTILITY_FILE, reference_rows, run_utility
    from ..progress import progress_bar

    benign = [r for r in split_rows(data_dir, split) if r["label"] == 0]
    rows = sample_per_source(benign, limit, "utility")
    references = sample_per_source(reference_rows(benign), limit, "utility-reference")
    say("[utility: the base model runs as plain mlx-lm; its [CLS] head is never used]")
    base, base_tokenizer = load_model(model_path(base_model), add_safety=True)
    with progress_bar(2 * len(references) + 2 * len(rows), "utility", "step") as bar:
        report = run_utility(net, tokenizer, base, base_tokenizer, rows,
                             config.resolved(net.args.safesig), max_tokens, progress=bar.update,
                             references=references)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / UTILITY_FILE).write_text(json.dumps(report, indent=1))
    click.echo(json.dumps(report) if as_json else json.dumps(report, indent=1))
    say(f"[wrote {out_dir / UTILITY_FILE}]")


def _adaptive_plan(data_dir, split, limit, exclude, attacks, objectives, budgets, suffix_len,
                   time_budget, response_tokens, loss_floor=0.05):
    """The rows and the attack runs, checked before the model loads."""
    from ..eval.adaptive import AttackSettings
    from ..eval.adaptive_suite import adaptive_rows

    harmful, benign = adaptive_rows(data_dir, split, limit, exclude)
    runs = [AttackSettings(attack=a, objective=o, suffix_len=suffix_len, steps=budgets[-1],
                           time_budget=time_budget, n_response=response_tokens,
                           loss_floor=loss_floor or None)
            for a in attacks for o in objectives]
    return harmful, benign, runs


def _adaptive(net, tokenizer, plan, config, budgets, seed, universal, resume, model_id, split,
              limit, out_dir: Path, as_json: bool):
    from ..eval.adaptive_suite import ADAPTIVE_FILE, ROWS_FILE, format_adaptive, run_adaptive
    from ..progress import progress_bar

    harmful, benign, runs = plan
    config = config.resolved(net.args.safesig)
    gated = config.surprisal_gate is not None  # the attacker knows it (``run_adaptive``)
    total = len(harmful) + len(benign) * (1 + gated) + (
        len(harmful) + (universal > 0)) * budgets[-1] * len(runs)
    with progress_bar(total, "adaptive", "step") as bar:
        report = run_adaptive(net, tokenizer, harmful, benign, config, runs, budgets, out_dir,
                              seed=seed or 0, universal=universal, resume=resume,
                              fingerprint={"model": model_id, "split": split, "limit": limit},
                              progress=bar.update)
    if as_json:
        click.echo(json.dumps(report))
        return
    click.echo("\n".join(format_adaptive(report)))
    say(f"[wrote {out_dir / ADAPTIVE_FILE} and {ROWS_FILE}]")
