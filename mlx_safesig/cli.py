"""`mlx-safesig`: a thin click skin over the Python API. User errors are one sentence on stderr
and exit code 1, never a traceback."""

import functools
import json
import sys

import click

from .decoding import SCHEDULES, parse_schedule
from .model import SafesigError


def user_errors(fn):
    """Turn the library's one-sentence errors into click errors (exit 1, no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (SafesigError, FileNotFoundError) as e:
            raise click.ClickException(str(e)) from None

    return wrapper


def _say(msg: str):
    click.echo(msg, err=True)


def _model_path(model):
    """--model or the embedded default model's base (fetched and converted on first use)."""
    if model:
        return model
    from .default_model import default_base_model

    return str(default_base_model(progress=_say))


def _check_schedules(ctx, param, values):
    for v in values:
        try:
            parse_schedule(v)
        except ValueError as e:
            raise click.ClickException(f"--schedule: {e}") from None
    return values


class _Cli(click.Group):
    """Every user error, click's usage errors included, exits with 1 and one line on stderr."""

    def main(self, *args, **kwargs):
        kwargs.pop("standalone_mode", None)
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.ClickException as e:
            e.show()
            sys.exit(1)
        except click.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(1)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlx-safesig")
def main():
    """LLM safety alignment with explicit safety signals ([CLS] token + strategic decoding) on MLX."""


@main.command()
@click.option("--model", default=None, help="Model directory or hub repo (default: the embedded "
              "SmolLM2-135M-Instruct; a plain mlx-lm model gets a fresh [CLS] row and random head).")
@click.option("--schedule", "schedules", multiple=True, callback=_check_schedules,
              default=("first", "each", "annealing"), show_default=True,
              help=f"Re-check schedule to time; repeat the option for several ({', '.join(SCHEDULES)}).")
@click.option("--max-tokens", default=128, show_default=True, type=click.IntRange(1),
              help="Tokens to decode per run.")
@click.option("--prefill-tokens", default=512, show_default=True, type=click.IntRange(2),
              help="Prompt length for the prefill measurement.")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(1),
              help="Interleaved repetitions; the median is reported.")
@click.option("--batch-size", type=click.IntRange(1), default=None,
              help="Also decode this many prompts together: mlx-lm's BatchGenerator vs the "
              "safety engine.")
@click.option("--chat-turns", type=click.IntRange(1), default=None,
              help="Also time the first token of each turn of a chat this long (~100 tokens a "
              "turn), reusing the conversation cache vs prefilling the conversation again.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@user_errors
def bench(model, schedules, max_tokens, prefill_tokens, repeats, batch_size, chat_turns,
          as_json):
    """Decode and prefill speed, safety on (per schedule) vs plain mlx-lm, same process."""
    from .bench import bench as run_bench
    from .bench import format_table

    result = run_bench(_model_path(model), schedules=schedules, max_tokens=max_tokens,
                       prefill_tokens=prefill_tokens, repeats=repeats, progress=_say,
                       batch_size=batch_size, chat_turns=chat_turns)
    click.echo(json.dumps(result) if as_json else format_table(result))


def _load(model):
    from .loading import load

    return load(model)


def safety_options(fn):
    """The SafetyConfig knobs shared by generate and chat."""
    options = [
        click.option("--no-safety", is_flag=True,
                     help="Plain mlx-lm generation (no [CLS] checks, no refusal insertion)."),
        click.option("--schedule", default="annealing", show_default=True,
                     callback=lambda c, p, v: _check_schedules(c, p, [v])[0],
                     help=f"When to re-check the response: {', '.join(SCHEDULES)}."),
        click.option("--threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True),
                     default=None, help="p(malicious) at or above which a check says malicious "
                     "(default: the model's, 0.5)."),
        click.option("--window-threshold",
                     type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
                     help="The same for the checks of the generated text (default: the "
                     "model's, else --threshold)."),
        click.option("--tau", type=click.IntRange(1), default=None,
                     help="Consecutive malicious checks that insert the refusal (default: 3)."),
        click.option("--min-window", type=click.IntRange(1), default=None,
                     help="No check of the generated text before the response holds this many "
                     "tokens (default: the model's, else 1)."),
        click.option("--window-query/--no-window-query", default=None,
                     help="Let the checks of the generated text see the query span too, or not "
                     "(default: the model's, else not)."),
        click.option("--rollback", is_flag=True,
                     help="Withdraw the tokens since the flip before inserting the refusal."),
        click.option("--refusal-prefix", default=None,
                     help="Text inserted when the model is stopped (default: the model's)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def sampling_options(fn):
    options = [
        click.option("--max-tokens", "-m", type=click.IntRange(1), default=256, show_default=True,
                     help="Maximum number of tokens to generate."),
        click.option("--temp", type=click.FloatRange(0), default=0.0, show_default=True,
                     help="Sampling temperature (0 = greedy)."),
        click.option("--top-p", type=click.FloatRange(0, 1), default=1.0, show_default=True,
                     help="Nucleus sampling: keep the smallest set of tokens with this mass."),
        click.option("--top-k", type=click.IntRange(0), default=0, show_default=True,
                     help="Keep only the k most likely tokens (0 = all)."),
        click.option("--min-p", type=click.FloatRange(0, 1), default=0.0, show_default=True,
                     help="Drop tokens below min-p times the top token's probability."),
        click.option("--seed", type=int, default=None, help="Random seed for sampling."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _safety_config(no_safety, schedule, threshold, window_threshold, tau, min_window, window_query,
                   rollback, refusal_prefix):
    from .decoding import SafetyConfig

    return SafetyConfig(enabled=not no_safety, schedule=schedule, threshold=threshold,
                        window_threshold=window_threshold, tau=tau, min_window=min_window,
                        window_query=window_query, rollback=rollback,
                        refusal_prefix=refusal_prefix)


def _sampling(temp, top_p, top_k, min_p, seed):
    import mlx.core as mx

    if seed is not None:
        mx.random.seed(seed)
    return dict(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p)


class _Marks:
    """How safety events look in a terminal (colour on a TTY, plain brackets when piped)."""

    def __init__(self, stream):
        self.tty = stream.isatty()

    def __call__(self, text, colour):
        return click.style(text, fg=colour) if self.tty else text


def _event_marks(events, marks):
    out = []
    for e in events:
        if e.kind == "refusal-inserted":
            out.append(marks(f"[refusal inserted, p={e.p:.2f}]", "red"))
        elif e.kind == "retracted":
            out.append(marks(f"[retracted {len(e.text or '')} chars]", "yellow"))
    return out


@main.command()
@click.option("--model", default=None, help="Safety model directory or hub repo "
              "(default: the embedded default model).")
@click.option("--prompt", "-p", required=True, help="The user message ('-' reads stdin).")
@click.option("--system", default=None, help="A system message placed before the prompt.")
@click.option("--raw", is_flag=True, help="Use the prompt as raw text, without the chat template.")
@click.option("--prefill-response", default=None,
              help="Assistant text placed before the model's own (e.g. a prefill attack).")
@sampling_options
@safety_options
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object: the text and the safety trace.")
@user_errors
def generate(model, prompt, system, raw, prefill_response, max_tokens, temp, top_p, top_k, min_p,
             seed, as_json, **safety):
    """Generate a response with safety-aware sampling, streamed to stdout."""
    from .generate import stream_generate, without_retracted

    if prompt == "-":
        prompt = click.get_text_stream("stdin").read()
    messages = prompt if raw else ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}]
    config = _safety_config(**safety)
    sampling = _sampling(temp, top_p, top_k, min_p, seed)
    net, tokenizer = _load(model)
    marks = _Marks(click.get_text_stream("stdout"))
    text, trace, last = "", [], None
    for r in stream_generate(net, tokenizer, messages, max_tokens, safety=config,
                             prefill_response=prefill_response, **sampling):
        for e in r.safety.events:
            trace.append({"kind": e.kind, "step": e.step, "p": e.p,
                          **({"chars": len(e.text)} if e.text is not None else {})})
        text = without_retracted(text, r.safety.events) + r.text
        last = r
        if not as_json:
            shown = _event_marks(r.safety.events, marks)
            click.echo("".join(shown) + r.text, nl=False)
    if as_json:
        click.echo(json.dumps({
            "text": text, "query_p": last.safety.query_p if last else None,
            "flagged": bool(last and last.safety.flagged),
            "refusal_inserted": bool(last and last.safety.inserted),
            "finish_reason": last.finish_reason if last else None,
            "generation_tokens": last.generation_tokens if last else 0,
            "events": trace,
        }))
    else:
        click.echo()
        if last is not None:
            _say(f"[{last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s; "
                 f"query p(malicious)={_fmt(last.safety.query_p)}]")


def _fmt(p):
    return "-" if p is None else f"{p:.2f}"


@main.command()
@click.option("--model", default=None, help="Safety model directory or hub repo "
              "(default: the embedded default model).")
@click.option("--system", default=None, help="A system message for the conversation.")
@sampling_options
@safety_options
@user_errors
def chat(model, system, max_tokens, temp, top_p, top_k, min_p, seed, **safety):
    """Chat in the terminal with the safety signal shown live. /reset clears the conversation,
    /quit (or Ctrl-D) leaves; Ctrl-C stops the current reply."""
    from .generate import stream_generate, without_retracted
    from .prefill import make_prompt_cache

    config = _safety_config(**safety)
    sampling = _sampling(temp, top_p, top_k, min_p, seed)
    net, tokenizer = _load(model)
    cache = make_prompt_cache(net)  # each turn runs only what follows the previous prompt
    out = click.get_text_stream("stdout")
    marks = _Marks(out)
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    click.echo(f"[safety {'on: ' + config.schedule if config.enabled else 'off'}] "
               "Type a message; /reset clears, /quit leaves.")
    while True:
        try:
            line = input(marks(">> ", "cyan"))
        except EOFError:
            click.echo()
            return
        except KeyboardInterrupt:
            click.echo("\n(Ctrl-C stops a reply; /quit or Ctrl-D leaves)")
            continue
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return
        if line == "/reset":
            history, cache = list(start), make_prompt_cache(net)
            click.echo("[conversation cleared]")
            continue
        history.append({"role": "user", "content": line})
        reply, last = "", None
        try:
            for r in stream_generate(net, tokenizer, history, max_tokens, safety=config,
                                     prompt_cache=cache, **sampling):
                reply = without_retracted(reply, r.safety.events)
                shown = _event_marks(r.safety.events, marks)
                out.write("".join(shown) + r.text)
                out.flush()
                reply += r.text
                last = r
        except KeyboardInterrupt:
            out.write(marks(" [stopped]", "yellow"))
        out.write("\n")
        if last is not None and config.enabled:
            s = last.safety
            status = f"[safety: query p={_fmt(s.query_p)}, latest p={_fmt(s.p)}"
            status += ", refusal inserted]" if s.inserted else "]"
            out.write(marks(status, "red" if s.flagged or s.inserted else "green") + "\n")
        out.flush()
        history.append({"role": "assistant", "content": reply})


def _register_commands():
    from .convert import convert_command
    from .evaluate import eval_command
    from .fuse import fuse_command
    from .train import train_command

    for command in (convert_command, train_command, fuse_command, eval_command):
        main.add_command(command)


_register_commands()

if __name__ == "__main__":
    sys.exit(main())
