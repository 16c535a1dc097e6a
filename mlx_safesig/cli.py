"""`mlx-safesig`: the command line, a thin click skin over the Python API (the only module that
imports click). The model's text goes to stdout; safety markers, progress and speed to stderr.
User errors are one sentence on stderr and exit code 1, never a traceback; Ctrl-C exits 130."""

import functools
import json
import re
import sys
from pathlib import Path

import click

from .convert.pipeline import DTYPES
from .decoding import SCHEDULES, parse_schedule
from .model import SafesigError
from .model_dir import NoSafetyParts
from .terminal import Reply, keys_held_back

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


def _say(msg: str):
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


def _check_schedule(ctx, param, value):
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
    click.option("--schedule", default="annealing", show_default=True, callback=_check_schedule,
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


@main.command()
@click.option("--hf-path", required=True, help="Source: an HF or mlx-lm model folder, a hub repo "
              "id (owner/name), or a llama-family .gguf file (or a folder holding one).")
@click.option("--mlx-path", required=True, type=click.Path(), help="Output folder (must not exist).")
@quantize_options
@click.option("--dtype", type=click.Choice(list(DTYPES)), default=None,
              help="Float type of the output (default: keep the source's; GGUF: float32).")
@click.option("--add-safety", is_flag=True,
              help="Give a plain model a fresh [CLS] row and safety head, ready for training.")
@click.option("--head-key", default=None, help="Name of the safety head's tensors if not "
              "cls_head, safety_head, classifier or score (e.g. my_head for my_head.weight).")
@click.option("--verify", is_flag=True, help="Compare logits (and score) with a PyTorch "
              "reference afterwards (needs torch and transformers).")
@user_errors
def convert(hf_path, mlx_path, quantize, q_bits, dtype, add_safety, head_key, verify):
    """Convert a PyTorch / Hugging Face or GGUF checkpoint into an mlx-safesig model folder.

    With -q a GGUF keeps its own quantization."""
    from .convert import convert as run_convert

    run_convert(hf_path, mlx_path, quantize=quantize, q_bits=int(q_bits), dtype=dtype,
                add_safety=add_safety, head_key=head_key, verify=verify)


def _model_path(model):
    """--model or the embedded default model's base (fetched and converted on first use)."""
    if model:
        return model
    from .default_model import default_base_model

    return str(default_base_model(progress=_say))


@main.command()
@click.option("--model", default=None, help="Model directory or hub repo (default: the embedded "
              "SmolLM2-135M-Instruct; a plain mlx-lm model gets a fresh [CLS] row and random head).")
@click.option("--schedule", "schedules", multiple=True, callback=_check_schedule,
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


def _load(model, **kwargs):
    from .loading import load

    return load(model, **kwargs)


def _safety_config(no_safety, schedule, threshold, window_threshold, tau, min_window, window_query,
                   keep_verdict, rollback, refusal_prefix):
    from .decoding import SafetyConfig

    return SafetyConfig(enabled=not no_safety, schedule=schedule, threshold=threshold,
                        window_threshold=window_threshold, tau=tau, min_window=min_window,
                        window_query=window_query, keep_verdict=keep_verdict, rollback=rollback,
                        refusal_prefix=refusal_prefix)


def _sampling(temp, top_p, top_k, min_p, seed):
    import mlx.core as mx

    if seed is not None:
        mx.random.seed(seed)
    return dict(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p)


def _fmt(p):
    return "-" if p is None else f"{p:.2f}"


@main.command()
@model_option()
@adapter_option()
@click.option("--prompt", "-p", required=True, help="The user message ('-' reads stdin).")
@click.option("--system-prompt", "--system", "system_prompt", cls=OldNamesOption, old=("--system",),
              default=None, help="A system message placed before the prompt.")
@click.option("--ignore-chat-template", "--raw", "ignore_chat_template", cls=OldNamesOption,
              old=("--raw",), is_flag=True, help="Use the prompt as raw text, without the chat "
              "template.")
@click.option("--prefill-response", default=None,
              help="Assistant text placed before the model's own (e.g. a prefill attack).")
@sampling_options(max_tokens=256)
@safety_options
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object: the text and the safety trace.")
@user_errors
def generate(model, adapter_path, prompt, system_prompt, ignore_chat_template, prefill_response,
             max_tokens, temp, top_p, top_k, min_p, seed, as_json, **safety):
    """Generate a response with safety-aware sampling, streamed to stdout."""
    from .generate import stream_generate

    if prompt == "-":
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise click.ClickException("the prompt is empty: there is no text for the model to judge.")
    messages = prompt if ignore_chat_template else (
        [{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": prompt}]
    config = _safety_config(**safety)
    sampling = _sampling(temp, top_p, top_k, min_p, seed)
    net, tokenizer = _load(model, adapter_path=adapter_path)
    reply = Reply(hold=config.rollback, show=not as_json)
    for r in stream_generate(net, tokenizer, messages, max_tokens, safety=config,
                             prefill_response=prefill_response, **sampling):
        reply.add(r)
    last = reply.last
    if as_json:
        click.echo(json.dumps({
            "text": reply.text, "query_p": last.safety.query_p if last else None,
            "flagged": bool(last and last.safety.flagged),
            "refusal_inserted": bool(last and last.safety.inserted),
            "finish_reason": last.finish_reason if last else None,
            "generation_tokens": last.generation_tokens if last else 0,
            "events": reply.trace,
        }))
        return
    reply.finish()
    if last is not None:
        n = last.generation_tokens
        # a rate needs two tokens: the clock starts at the first one
        speed = f"{n} tokens, {last.generation_tps:.1f} tok/s" if n > 1 else f"{n} token"
        _say(f"[{speed}; query p(malicious)={_fmt(last.safety.query_p)}]")


CHAT_HELP = ("/help shows this, /reset clears the conversation, /quit (or Ctrl-D) leaves; "
             "Ctrl-C stops the current reply.")
COMMAND = re.compile(r"/\w+")


@main.command()
@model_option()
@adapter_option()
@click.option("--system-prompt", "--system", "system_prompt", cls=OldNamesOption, old=("--system",),
              default=None, help="A system message for the conversation.")
@sampling_options(max_tokens=256)
@safety_options
@user_errors
def chat(model, adapter_path, system_prompt, max_tokens, temp, top_p, top_k, min_p, seed, **safety):
    """Chat in the terminal. Each reply is followed by its safety signal (the query verdict and
    the latest check); an inserted refusal is marked where it happens. /help shows this, /reset
    clears the conversation, /quit (or Ctrl-D) leaves; Ctrl-C stops the current reply."""
    from .generate import stream_generate
    from .prefill import make_prompt_cache

    config = _safety_config(**safety)
    sampling = _sampling(temp, top_p, top_k, min_p, seed)
    net, tokenizer = _load(model, adapter_path=adapter_path)
    cache = make_prompt_cache(net)  # each turn runs only what follows the previous prompt
    stdin = sys.stdin
    start = [{"role": "system", "content": system_prompt}] if system_prompt else []
    history = list(start)
    click.echo(f"[safety {'on: ' + config.schedule if config.enabled else 'off'}] "
               "Type a message; /help lists the commands.")
    while True:
        try:
            line = input(">> ")
        except EOFError:
            click.echo()
            return
        except KeyboardInterrupt:
            click.echo("\n(Ctrl-C stops a reply; /quit or Ctrl-D leaves)")
            continue
        line = line.strip()
        if not line:
            continue
        if COMMAND.fullmatch(line):
            if line in ("/quit", "/exit"):
                return
            if line == "/reset":
                history, cache = list(start), make_prompt_cache(net)
                click.echo("[conversation cleared]")
            elif line == "/help":
                click.echo(CHAT_HELP)
            else:
                click.echo(f"unknown command {line}; /help lists the commands.")
            continue
        history.append({"role": "user", "content": line})
        reply = Reply(hold=config.rollback)
        try:
            with keys_held_back(stdin):
                for r in stream_generate(net, tokenizer, history, max_tokens, safety=config,
                                         prompt_cache=cache, **sampling):
                    reply.add(r)
        except KeyboardInterrupt:
            reply.mark(" [stopped]", "yellow")
            reply.finish()
            history.pop()  # a stopped turn is not part of the conversation
            continue
        reply.finish()
        if reply.last is not None and config.enabled:
            s = reply.last.safety
            status = f"[safety: query p={_fmt(s.query_p)}, latest p={_fmt(s.p)}"
            status += ", refusal inserted]" if s.inserted else "]"
            reply.mark(status + "\n", "red" if s.flagged or s.inserted else "green")
        history.append({"role": "assistant", "content": reply.text})


@main.command()
@click.option("--model", "model_path", required=True, help="Safety model directory (from "
              "`convert`), or a plain mlx-lm model with --add-safety.")
@click.option("--data", "data_dir", required=True, type=click.Path(),
              help="Directory with train.jsonl (and optionally valid.jsonl).")
@adapter_option(default="adapters", show_default=True,
                help="Where adapters, checkpoints and the training state are written.")
@click.option("--add-safety", is_flag=True, help="Start from a plain model: a fresh [CLS] row and head.")
@click.option("--iters", default=200, show_default=True, type=click.IntRange(1), help="Training steps.")
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(1),
              help="Examples per step (per process under mlx.launch).")
@click.option("--learning-rate", default=1e-4, show_default=True, help="Peak AdamW learning rate.")
@click.option("--safety-learning-rate", type=float, default=None,
              help="Learning rate of the [CLS] row and head (default: 10 x --learning-rate).")
@click.option("--warmup", default=0, show_default=True, help="Linear warmup steps, then cosine decay.")
@click.option("--weight-decay", default=0.01, show_default=True, help="AdamW weight decay.")
@click.option("--lambda", "lam", default=0.1, show_default=True,
              help="Weight of the [CLS] BCE terms in the joint loss (paper: 0.1 or 0.01).")
@click.option("--lora-rank", default=8, show_default=True, help="LoRA rank.")
@click.option("--lora-scale", default=20.0, show_default=True, help="LoRA scale (mlx-lm's).")
@click.option("--lora-dropout", default=0.0, show_default=True, help="LoRA dropout.")
@click.option("--num-layers", default=16, show_default=True, help="LoRA on the last N blocks (-1: all).")
@click.option("--probes", default=4, show_default=True,
              help="Window-supervision probes per benign response / continuation (0: off).")
@click.option("--probe-schedule", default="annealing", show_default=True, callback=_check_schedule,
              help="Place the probes where this generation schedule checks (each, annealing, "
              "periodic:N): annealing puts most in an answer's first tokens.")
@click.option("--min-window", type=click.IntRange(1), default=None,
              help="No window probe before a response holds this many tokens, as generation with "
              "the same min_window checks (written to the adapter's decoding defaults; default: "
              "the model's, else 1).")
@click.option("--window-query/--no-window-query", default=False, show_default=True,
              help="Experimental: window probes see the query span too (written to the adapter's "
              "decoding defaults, so generation checks alike).")
@click.option("--no-oversample", is_flag=True, help="Do not oversample the minority label.")
@click.option("--max-seq-length", default=2048, show_default=True,
              help="Longest training row in tokens; longer examples are an error.")
@click.option("--grad-checkpoint", is_flag=True, help="Recompute activations in the backward "
              "pass (less memory, ~30% slower).")
@click.option("--steps-per-report", default=10, show_default=True, type=click.IntRange(1),
              help="Steps between progress lines.")
@click.option("--steps-per-eval", default=100, show_default=True, type=click.IntRange(1),
              help="Steps between validations.")
@click.option("--val-batches", default=25, show_default=True,
              help="Validation batches (-1: all of valid.jsonl).")
@click.option("--save-every", default=100, show_default=True, type=click.IntRange(1),
              help="Steps between checkpoints.")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint and optimizer state.")
@click.option("--seed", default=0, show_default=True, type=SEED, help="LoRA init and data order seed.")
@user_errors
def train(model_path, data_dir, adapter_path, add_safety, resume, no_oversample, **settings):
    """LoRA fine-tuning with the explicit safety signal (joint LM + [CLS] loss)."""
    import mlx.core as mx

    from .data import load_dataset
    from .train import Batcher, TrainConfig
    from .train import train as run_train

    config = TrainConfig(oversample=not no_oversample, **settings)
    model, tokenizer = _load(model_path, add_safety=add_safety)
    batcher = Batcher(model, tokenizer, config, mx.distributed.init())
    train_set, valid_set = load_dataset(
        data_dir, tokenizer, config.max_seq_length, lambda ex: len(batcher.probes(ex))
    )
    run_train(model, tokenizer, train_set, valid_set, config, adapter_path, resume=resume)


@main.command()
@click.option("--model", "model_path", required=True,
              help="The base model the adapters were trained on.")
@adapter_option(default="adapters", show_default=True,
                help="Adapter directory written by `mlx-safesig train`.")
@click.option("--save-path", default="fused_model", show_default=True, type=click.Path(),
              help="Output model directory (must not exist).")
@quantize_options
@user_errors
def fuse(model_path, adapter_path, save_path, quantize, q_bits):
    """Merge trained adapters into a standalone safety model directory."""
    from .fuse import fuse as run_fuse

    run_fuse(model_path, adapter_path, save_path, int(q_bits) if quantize else None)
    _say(f"wrote {save_path}")


def _suites(ctx, param, values) -> tuple:
    from .eval.suites import SUITES

    names = [n.strip() for v in values for n in v.split(",") if n.strip()] or ["all"]
    for n in names:
        if n not in ("all", "detection") and n not in SUITES:
            raise click.BadParameter(f"unknown suite {n!r}; use {', '.join(SUITES)}, detection "
                                     "or all.")
    return SUITES if "all" in names else tuple(dict.fromkeys(names))


@main.command("eval")
@model_option()
@click.option("--add-safety", is_flag=True, help="Accept a plain mlx-lm model and give it a fresh "
              "[CLS] row and a random head (tests the pipeline; its numbers mean nothing).")
@click.option("--suite", "suites", multiple=True, callback=_suites, help="Suites to run, "
              "repeatable or comma-separated: direct, prefill, decoding, templates, benign, all "
              "(default: all), and detection (the query verdict per source, plain and in "
              "conversations; on --split heldout also inside the held-out wrappers).")
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
                 window_threshold, tau, min_window, window_query, keep_verdict, judge_model,
                 batch_size, resume,
                 as_json):
    """Attack suites with safety on and off: ASR per judge, over-refusal, [CLS] detection.

    The sampling options apply to every suite but decoding (which sweeps its own grid). Greedy
    generations are batched, safety on and off (--batch-size, same responses as one by one);
    sampled generations run one by one."""
    from .default_model import default_model_path
    from .eval.harness import EvalSettings, run_eval
    from .eval.judges import load_judge
    from .eval.plots import PLOTS_HINT, plots_available
    from .eval.suites import MODES, load_data

    detection, suites = "detection" in suites, tuple(s for s in suites if s != "detection")
    settings = EvalSettings(
        suites=suites, split=split, limit=limit, max_tokens=max_tokens, grid_size=grid_size,
        modes=MODES if safety is None else (("on",) if safety else ("off",)),
        sampling=dict(temp=temp, top_p=top_p, top_k=top_k), seed=seed, schedule=schedule,
        threshold=threshold, window_threshold=window_threshold, tau=tau, min_window=min_window,
        window_query=window_query, keep_verdict=keep_verdict,
        model_name=Path(model).name if model else "Assistant",
        exclude_categories=tuple(exclude_categories), batch_size=batch_size,
    )
    load_data(data_dir, split, suites or ("direct", "benign"), exclude_categories)  # before loading
    judge = load_judge(judge_model) if judge_model else None
    net, tokenizer = _load(model, add_safety=add_safety)
    if detection:
        _detection(net, tokenizer, data_dir, split, limit, threshold, Path(out_dir), as_json)
    if not suites:
        return
    results = run_eval(
        net, tokenizer, data_dir, out_dir, settings,
        model_id=(str(model) if model else f"default ({default_model_path().name})")
        + (" (+random head)" if add_safety else ""),
        judge=judge, judge_id=str(judge_model or ""), resume=resume,
    )
    if not plots_available():
        _say(PLOTS_HINT)
    if as_json:
        click.echo(json.dumps(results))
    else:
        click.echo((Path(out_dir) / "report.md").read_text(), nl=False)
        _say(f"[wrote {Path(out_dir) / 'report.md'}, results.json and rows.jsonl]")


def _detection(net, tokenizer, data_dir, split, limit, threshold, out_dir: Path, as_json: bool):
    from tqdm import tqdm

    from .eval.detection import DETECTION_FILE, format_counts, planned_rows, run_detection

    with tqdm(total=planned_rows(data_dir, split, limit), desc="verdicts", unit="row",
              disable=None, file=sys.stderr) as bar:
        report = run_detection(net, tokenizer, data_dir, split, limit, threshold,
                               sweep=(0.3, 0.7, 0.9), progress=bar.update)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / DETECTION_FILE).write_text(json.dumps(report, indent=1))
    if as_json:
        click.echo(json.dumps(report))
        return
    for suite, counts in report["suites"].items():
        click.echo(f"## detection: {suite} ({report['judge']}, threshold {report['threshold']})")
        click.echo("\n".join(format_counts(counts)))
    _say(f"[wrote {out_dir / DETECTION_FILE}]")


if __name__ == "__main__":
    sys.exit(main())
