"""What every `mlx-safesig` command shares: the click group, option decorators, user-error
handling and small helpers."""

import functools
import sys

import click

from ..decoding import SCHEDULES, parse_schedule
from ..model import SafesigError
from ..model_dir import NoSafetyParts

DEFAULT_HELP = "(default: the embedded SmolLM2-135M-Instruct safety model)"
SEED = click.IntRange(0, 2**64 - 1)
PROBABILITY = click.FloatRange(0, 1, min_open=True, max_open=True)


def _no_safety_message(path) -> str:
    ctx = click.get_current_context(silent=True)
    if ctx is not None and any(p.name == "add_safety" for p in ctx.command.params):
        return f"{path} has no safety parts; pass --add-safety to start from a fresh [CLS] row and head."
    return (f"{path} has no safety parts; pass --adapter-path with adapters trained for it "
            "(`mlx-safesig train --add-safety`).")


def user_errors(fn):
    """Turn the library's one-sentence errors (and file errors) into click errors: exit 1, one
    line on stderr, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except NoSafetyParts as e:
            raise click.ClickException(_no_safety_message(e.path)) from None
        except SafesigError as e:
            raise click.ClickException(str(e).splitlines()[0]) from None
        except OSError as e:  # disk full, permissions, a missing file
            raise click.ClickException(f"{e.filename or 'output'}: {e.strerror or e}.") from None

    return wrapper


def say(msg: str):
    click.echo(msg, err=True)


class CliGroup(click.Group):
    """Every user error, click's usage errors included, exits with 1 and one line on stderr;
    Ctrl-C exits with 130, as a shell expects of an interrupted program."""

    def main(self, *args, **kwargs):
        kwargs.pop("standalone_mode", None)
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.ClickException as e:
            e.show()
            sys.exit(1)
        except click.Abort as e:
            click.echo("Aborted.", err=True)
            sys.exit(130 if isinstance(e.__context__, KeyboardInterrupt) else 1)


class OldNamesOption(click.Option):
    """An option whose earlier spellings (``old``) still work but are left out of --help."""

    def __init__(self, *args, old=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.old = set(old)

    def get_help_record(self, ctx):
        opts = self.opts
        self.opts = [o for o in opts if o not in self.old]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = opts


def options(*decorators):
    """Several click options as one decorator, in the order given."""

    def apply(fn):
        for decorator in reversed(decorators):
            fn = decorator(fn)
        return fn

    return apply


def check_schedule(ctx, param, value):
    for v in value if isinstance(value, tuple) else [value]:
        try:
            parse_schedule(v)
        except ValueError as e:
            raise click.BadParameter(str(e)) from None
    return value


def model_option(help_text="Safety model directory or hub repo " + DEFAULT_HELP + "."):
    """``--model``, None when not given (the command's default model)."""
    return click.option("--model", default=None, help=help_text)


def adapter_option(**kwargs):
    """``--adapter-path``: adapters written by ``train``; ``kwargs`` override the defaults."""
    return click.option("--adapter-path", type=click.Path(), **{
        "default": None, "help": "Adapters written by `mlx-safesig train`, applied on top of "
        "--model (which may then be a plain mlx-lm model).", **kwargs})


decoding_rule_options = options(
    click.option("--schedule", default="annealing", show_default=True, callback=check_schedule,
                 help=f"When to re-check the response: {', '.join(SCHEDULES)}."),
    click.option("--threshold", type=PROBABILITY, default=None, help="p(malicious) at or above "
                 "which a check says malicious (default: the model's, 0.5)."),
    click.option("--window-threshold", type=PROBABILITY, default=None, help="The same for the "
                 "checks of the generated text (default: the model's, else --threshold)."),
    click.option("--tau", type=click.IntRange(1), default=None, help="Consecutive malicious "
                 "checks of the generated text that insert the refusal (default: the model's, 3)."),
    click.option("--min-window", type=click.IntRange(1), default=None, help="No check of the "
                 "generated text before the response holds this many tokens (default: the "
                 "model's, else 1)."),
    click.option("--window-query/--no-window-query", default=None, help="Let the checks of the "
                 "generated text see the query span too, or not (default: the model's, else not)."),
    click.option("--keep-verdict", type=click.Choice(["always", "flagged"]), default=None,
                 help="When the response attends to the query verdict's [CLS]: always (the "
                 "paper) or only when it is flagged (default: the model's, else always)."),
    click.option("--surprisal-gate", type=click.FloatRange(0, min_open=True), default=None,
                 help="Refuse at once when the query's highest mean surprisal (nats per token, "
                 "the model's own) over --surprisal-window query tokens is above this, whatever "
                 "the verdict: optimised adversarial suffixes are text no one writes (default: "
                 "the model's, else off; 9 is measured in MODEL_CARD.md)."),
    click.option("--surprisal-window", type=click.IntRange(1), default=None,
                 help="Query tokens per window of --surprisal-gate (default: the model's, else 8)."),
    click.option("--smooth-copies", type=click.IntRange(0), default=None,
                 help="Judge the query by the mean verdict of this many copies of the prompt with "
                 "random tokens swapped in (randomized smoothing against optimised suffixes; costs "
                 "that many extra prefills; default: the model's, else 0 = off)."),
    click.option("--smooth-rate", type=click.FloatRange(0, 1, min_open=True, max_open=True),
                 default=None, help="Chance each query token of a --smooth-copies copy is "
                 "replaced (default: the model's, else 0.1)."),
)

safety_options = options(
    click.option("--no-safety", is_flag=True,
                 help="Plain mlx-lm generation (no [CLS] checks, no refusal insertion)."),
    decoding_rule_options,
    click.option("--rollback", is_flag=True, help="Withdraw the tokens since the flip before "
                 "inserting the refusal (the reply is then shown once it is final)."),
    click.option("--refusal-prefix", default=None,
                 help="Text inserted when the model is stopped (default: the model's)."),
)


def sampling_options(max_tokens: int, seed_default=None, min_p: bool = True):
    """``-m/--max-tokens``, ``--temp``, ``--top-p``, ``--top-k`` (``--min-p``) and ``--seed``."""
    return options(
        click.option("--max-tokens", "-m", type=click.IntRange(1), default=max_tokens,
                     show_default=True, help="Maximum number of tokens to generate."),
        click.option("--temp", type=click.FloatRange(0), default=0.0, show_default=True,
                     help="Sampling temperature (0 = greedy)."),
        click.option("--top-p", type=click.FloatRange(0, 1), default=1.0, show_default=True,
                     help="Nucleus sampling: keep the smallest set of tokens with this mass."),
        click.option("--top-k", type=click.IntRange(0), default=0, show_default=True,
                     help="Keep only the k most likely tokens (0 = all)."),
        *([click.option("--min-p", type=click.FloatRange(0, 1), default=0.0, show_default=True,
                        help="Drop tokens below min-p times the top token's probability.")]
          if min_p else []),
        click.option("--seed", type=SEED, default=seed_default, show_default=seed_default is not None,
                     help="Random seed for sampling (0 .. 2^64-1)."),
    )


quantize_options = options(
    click.option("-q", "--quantize", is_flag=True, help="Quantize the language model's matrices "
                 "(never the head, the [CLS] row or norms)."),
    click.option("--q-bits", type=click.Choice(["4", "8"]), default="4", show_default=True,
                 help="Bits per weight with -q (group size 64)."),
)


@click.group(cls=CliGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlx-safesig")
def main():
    """LLM safety alignment with explicit safety signals ([CLS] token + strategic decoding) on MLX."""


def model_path(model):
    """--model or the embedded default model's base (fetched and converted on first use)."""
    if model:
        return model
    from ..default_model import default_base_model

    return str(default_base_model(progress=say))


def load_model(model, **kwargs):
    from ..loading import load

    return load(model, **kwargs)


def safety_config(no_safety=False, rollback=False, refusal_prefix=None, **rules):
    """The ``SafetyConfig`` of the safety options (``rules``: ``decoding_rule_options``' values,
    named as the config's fields)."""
    from ..decoding import SafetyConfig

    return SafetyConfig(enabled=not no_safety, rollback=rollback, refusal_prefix=refusal_prefix,
                        **rules)


def sampling_kwargs(temp, top_p, top_k, min_p, seed):
    import mlx.core as mx

    if seed is not None:
        mx.random.seed(seed)
    return dict(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p)


def fmt(p):
    return "-" if p is None else f"{p:.2f}"
