"""Benchmark LoRA training: `mlx-safesig train` (joint loss, window probes on) against mlx-lm's own
trainer (`mlx_lm.lora`'s `train`), same process, same model, LoRA rank / layers, batch and length.

    python examples/bench_train.py [--model DIR] [--batch-size 2] [--seq-len 128] [--steps 10] [--json]

Every example is exactly --seq-len sequence tokens: a prompt, then a response (and, for half of
them, a continuation) -- mlx-lm gets the same tokens as prompt + response with the prompt masked.
Ours adds the query [CLS] row and up to 2 x --probes window-probe rows per example on top.
Throughput = sequence tokens / second of training steps (the compiling warm-up steps excluded);
the two trainers alternate step by step, so load from other processes hits both alike. Peak
memory is measured per trainer over its warm-up steps (model + training, minus what was already
allocated before it was built). Tokens
per CPU second (process time) is printed too: on a shared machine it is the steadier number.
"""
# ruff: noqa: I001  (import order: mlx_safesig before mlx)

import argparse
import json
import sys
import time
from functools import partial

import mlx_safesig  # noqa: F401  (preloads OpenBLAS on Linux: must come before mlx)
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx_safesig import load
from mlx_safesig.data import Example, balanced_order, tokenize_example
from mlx_safesig.train import (
    Batcher,
    TrainConfig,
    batch_order,
    make_optimizer,
    make_step,
    prepare_model,
)

MODEL = "/work/models/smollm2-135m-mlx"
WORDS = "the sea salt bread story water home dog poem river stone light window garden".split()


def make_examples(tokenizer, n: int, seq_len: int, prompt_words: int = 12):
    """``n`` examples of exactly ``seq_len`` tokens; odd ones malicious with a continuation."""
    examples = []
    for i in range(n):
        words = [WORDS[(i * 7 + j) % len(WORDS)] for j in range(4 * seq_len)]
        record = {"prompt": " ".join(words[:prompt_words]) + "?",
                  "response": " ".join(words[prompt_words:]), "label": i % 2}
        ex = tokenize_example(tokenizer, record)
        room = seq_len - len(ex.prompt)
        if ex.label:  # a refusal-length response, the rest is a continuation for the probes
            cut = room // 3
            ex = Example(ex.prompt, ex.query_slots, ex.response[:cut], 1, ex.response[cut:room], 1)
        else:
            ex = Example(ex.prompt, ex.query_slots, ex.response[:room], 0, [], 0)
        assert ex.n_tokens == seq_len
        examples.append(ex)
    return examples


def ours_trainer(args, examples):
    """A step function of `mlx-safesig train` (the one its loop runs) over endless batches."""
    model, tokenizer = load(args.model, add_safety=True)
    world = mx.distributed.init()
    config = TrainConfig(batch_size=args.batch_size, lora_rank=args.lora_rank,
                         num_layers=args.num_layers, probes=args.probes, iters=1000)
    mx.random.seed(0)
    prepare_model(model, config)
    step, state = make_step(model, make_optimizer(config), config, world)
    batcher = Batcher(model, tokenizer, config, world)
    batches = batch_order(balanced_order(examples), examples, args.batch_size, seed=0)

    def run():
        batch, tokens = batcher(examples, next(batches))
        mx.eval(state, step(batch))
        return tokens

    return run


def mlx_lm_trainer(args, examples):
    """mlx-lm's LoRA training step, built as `mlx_lm.tuner.trainer.train` builds it (its loss,
    its batching, its compiled step; gradient accumulation 1, one process)."""
    import mlx_lm
    from mlx_lm.tuner.trainer import default_loss, iterate_batches
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = mlx_lm.load(args.model)
    mx.random.seed(0)
    model.freeze()
    linear_to_lora_layers(model, args.num_layers,
                          {"rank": args.lora_rank, "scale": 20.0, "dropout": 0.0})
    optimizer = optim.AdamW(learning_rate=1e-4)
    loss_value_and_grad = nn.value_and_grad(model, default_loss)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch):
        (lvalue, toks), grad = loss_value_and_grad(model, *batch)
        optimizer.update(model, grad)
        return lvalue, toks

    # mask_prompt: (tokens, prompt length), the LM loss on the response only, as ours
    data = [(ex.prompt + ex.response + ex.continuation, len(ex.prompt)) for ex in examples]
    batches = iterate_batches(data, args.batch_size, 4 * args.seq_len, loop=True, seed=0)
    model.train()

    def run():
        batch = next(batches)
        mx.eval(state, step(batch))
        return int((batch[1][:, 1]).sum())

    return run


def measure(args, examples) -> list:
    """Both trainers step by step, interleaved, so load on the machine hits both alike."""
    runs = {}
    for name, make in (("mlx-lm", mlx_lm_trainer), ("safesig", ours_trainer)):
        before = mx.get_active_memory()  # the other trainer's model stays loaded: not counted
        mx.reset_peak_memory()
        runs[name] = {"step": make(args, examples), "tokens": 0, "seconds": 0.0, "cpu": 0.0}
        for _ in range(args.warmup_steps):  # compile; untimed
            runs[name]["step"]()
        runs[name]["peak_memory_gb"] = (mx.get_peak_memory() - before) / 1e9
    for i in range(args.steps):
        for name, r in runs.items():
            tic, cpu = time.perf_counter(), time.process_time()
            r["tokens"] += r["step"]()
            r["seconds"] += time.perf_counter() - tic
            r["cpu"] += time.process_time() - cpu
        print(f"step {i + 1}/{args.steps}: " + ", ".join(
            f"{n} {r['tokens'] / r['seconds']:.1f} tok/s" for n, r in runs.items()),
            file=sys.stderr, flush=True)
    return [{"name": n, "tok_s": r["tokens"] / r["seconds"], "tok_per_cpu_s": r["tokens"] / r["cpu"],
             "peak_memory_gb": r["peak_memory_gb"]} for n, r in runs.items()]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=MODEL, help="plain mlx-lm model directory (fp32)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--num-layers", type=int, default=16)
    p.add_argument("--probes", type=int, default=4, help="window probes per branch (ours)")
    p.add_argument("--steps", type=int, default=10, help="timed steps of each trainer")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed first steps (compile)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = p.parse_args()
    _, tokenizer = load(args.model, add_safety=True)
    examples = make_examples(tokenizer, 16 * args.batch_size, args.seq_len)
    runs = measure(args, examples)
    by_name = {r["name"]: r for r in runs}
    ours, theirs = by_name["safesig"], by_name["mlx-lm"]
    summary = {"runs": runs, "ratio": ours["tok_s"] / theirs["tok_s"],
               "cpu_ratio": ours["tok_per_cpu_s"] / theirs["tok_per_cpu_s"],
               "settings": {k: v for k, v in vars(args).items() if k != "json"}}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"safesig / mlx-lm training tokens/s: {summary['ratio']:.3f} (wall), "
              f"{summary['cpu_ratio']:.3f} (per CPU second); peak memory "
              f"{ours['peak_memory_gb']:.2f} vs {theirs['peak_memory_gb']:.2f} GB")


if __name__ == "__main__":
    main()
