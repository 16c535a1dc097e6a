"""`mlx-safesig convert | bench | generate | chat | train | fuse`: thin skins over the library."""

import json
import re
import sys

import click

from ..convert.pipeline import DTYPES
from ..decoding import SCHEDULES
from ..terminal import Reply, keys_held_back
from .base import (
    SEED,
    OldNamesOption,
    adapter_option,
    check_schedule,
    fmt,
    load_model,
    main,
    model_option,
    model_path,
    quantize_options,
    safety_config,
    safety_options,
    sampling_kwargs,
    sampling_options,
    say,
    user_errors,
)


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

    With -q a GGUF keeps its own Q4_0/Q4_1/Q8_0 quantization; a k-quant GGUF (Q4_K_M, ...) is
    dequantized, then quantized by MLX."""
    from ..convert import convert as run_convert

    run_convert(hf_path, mlx_path, quantize=quantize, q_bits=int(q_bits), dtype=dtype,
                add_safety=add_safety, head_key=head_key, verify=verify)



@main.command()
@click.option("--model", default=None, help="Model directory or hub repo (default: the embedded "
              "SmolLM2-135M-Instruct; a plain mlx-lm model gets a fresh [CLS] row and random head).")
@click.option("--schedule", "schedules", multiple=True, callback=check_schedule,
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
              "turn), reusing the conversation cache vs prefilling the conversation again, and "
              "plain mlx-lm reusing its own cache.")
@click.option("--server", "servers", is_flag=True,
              help="Also time mlx_lm.server against `mlx-safesig server` (last --schedule) on "
              "the same model, each on a free loopback port, with --concurrency clients.")
@click.option("--keep-verdict", type=click.Choice(["always", "flagged"]), default=None,
              help="For --chat-turns: when answers attend to the query verdict's [CLS] (default: "
              "the model's); with flagged a benign turn's reply stays in the reused cache.")
@click.option("--concurrency", type=click.IntRange(1), default=8, show_default=True,
              help="Concurrent clients with --server (two requests each).")
@click.option("--surprisal-gate", is_flag=True, help="Also time the last --schedule with the "
              "surprisal gate on (one no query reaches: same tokens, the cost of computing it).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@user_errors
def bench(model, schedules, max_tokens, prefill_tokens, repeats, batch_size, chat_turns,
          servers, keep_verdict, concurrency, surprisal_gate, as_json):
    """Decode and prefill speed, safety on (per schedule) vs plain mlx-lm, same process."""
    from ..bench import bench as run_bench
    from ..bench import format_table

    result = run_bench(model_path(model), schedules=schedules, max_tokens=max_tokens,
                       prefill_tokens=prefill_tokens, repeats=repeats, progress=say,
                       batch_size=batch_size, chat_turns=chat_turns,
                       server_concurrency=concurrency if servers else None,
                       keep_verdict=keep_verdict, surprisal_gate=surprisal_gate)
    click.echo(json.dumps(result) if as_json else format_table(result))



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
    from ..generate import stream_generate

    if prompt == "-":
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise click.ClickException("the prompt is empty: there is no text for the model to judge.")
    messages = prompt if ignore_chat_template else (
        [{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": prompt}]
    config = safety_config(**safety)
    sampling = sampling_kwargs(temp, top_p, top_k, min_p, seed)
    net, tokenizer = load_model(model, adapter_path=adapter_path)
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
        say(f"[{speed}; query p(malicious)={fmt(last.safety.query_p)}]")


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
    from ..generate import stream_generate
    from ..prefill import make_prompt_cache

    config = safety_config(**safety)
    sampling = sampling_kwargs(temp, top_p, top_k, min_p, seed)
    net, tokenizer = load_model(model, adapter_path=adapter_path)
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
            status = f"[safety: query p={fmt(s.query_p)}, latest p={fmt(s.p)}"
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
@click.option("--num-layers", default=16, show_default=True,
              help="LoRA on the last N blocks (-1: all; 0: none, only the [CLS] row and head train).")
@click.option("--fine-tune-type", type=click.Choice(["lora", "full"]), default="lora",
              show_default=True, help="lora, or full: every weight of the last --num-layers blocks "
              "trains (larger adapters, more memory).")
@click.option("--probes", default=4, show_default=True,
              help="Window-supervision probes per benign response / continuation (0: off).")
@click.option("--probe-schedule", default="annealing", show_default=True, callback=check_schedule,
              help="Place the probes where this generation schedule checks (each, annealing, "
              "periodic:N): annealing puts most in an answer's first tokens.")
@click.option("--min-window", type=click.IntRange(1), default=None,
              help="No window probe before a response holds this many tokens, as generation with "
              "the same min_window checks (written to the adapter's decoding defaults; default: "
              "the model's, else 1).")
@click.option("--window-query/--no-window-query", default=False, show_default=True,
              help="Experimental: window probes see the query span too (written to the adapter's "
              "decoding defaults, so generation checks alike).")
@click.option("--adv-epsilon", type=click.FloatRange(0), default=0.0, show_default=True,
              help="Adversarial training of the query verdict: each step perturbs the query "
              "tokens' embeddings against the row's label within this many x their mean norm "
              "(0: off; about 2.3x the time per step).")
@click.option("--adv-steps", type=click.IntRange(1), default=1, show_default=True,
              help="Gradient steps of that perturbation (each one more forward and backward).")
@click.option("--query-noise", type=click.FloatRange(0, 1, max_open=True), default=0.0,
              show_default=True, help="Replace each query token of a training row, with this "
              "probability, by a random printable token (noise for --smooth-copies decoding, "
              "whose --smooth-rate it should match; 0: off).")
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
    from ..train import TrainConfig, train_from_dir

    config = TrainConfig(oversample=not no_oversample, **settings)
    train_from_dir(model_path, data_dir, adapter_path, config, add_safety=add_safety, resume=resume)


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
    from ..fuse import fuse as run_fuse

    run_fuse(model_path, adapter_path, save_path, int(q_bits) if quantize else None)
    say(f"wrote {save_path}")
