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
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@user_errors
def bench(model, schedules, max_tokens, prefill_tokens, repeats, as_json):
    """Decode and prefill speed, safety on (per schedule) vs plain mlx-lm, same process."""
    from .bench import bench as run_bench
    from .bench import format_table

    result = run_bench(_model_path(model), schedules=schedules, max_tokens=max_tokens,
                       prefill_tokens=prefill_tokens, repeats=repeats, progress=_say)
    click.echo(json.dumps(result) if as_json else format_table(result))


def _register_convert():
    from .convert import convert_command

    main.add_command(convert_command)


_register_convert()

if __name__ == "__main__":
    sys.exit(main())
