"""LoRA fine-tuning of the explicit safety signal (SPEC §5): the joint loss, window supervision,
checkpoints, data parallel.

One training row holds a query, its response, an optional continuation and the window probes, in
one forward (slot = index in the row, pos = RoPE position; n prompt tokens, R response tokens)::

    slot 0            [CLS]                 pos 0        sees the query span and itself
    slots 1 .. n      the prompt            pos 1 .. n   causal, never sees [CLS]
    slots n+1 ..      the response          pos n+1 ..   causal, sees [CLS] and the prompt
    then              the continuation      pos n+1 ..   like a response, but not the response
    then              window probes         pos 0        each sees its window and itself

This is the SFT mask of SPEC §3 (``attention.sft_mask``) plus two branches that generation sees
one at a time: the continuation is a second response to the same prompt (same positions, it never
sees the first), and a probe is the transient ``[CLS]`` of ``generate.probe``: its window is
chosen by ``SafetyMonitor.window`` (rule 2: the latest r2 tokens, special tokens skipped), its
position is the model's ``probe_position`` (0, or "current": the slot generation appends it at)
and nobody attends to it. So every ``[CLS]`` row sees exactly what it sees at inference.

Loss: ``L = L_lm + lambda * (BCE_query + BCE_probes)``: LM cross-entropy on response tokens only,
those after the row's ``prefill`` (mean per token), BCE on the query ``[CLS]`` (mean per
example) and on the probes (mean per probe; windows of benign responses are labelled 0, windows
of a continuation get its label).
Every mean is taken over the *global* batch, so N processes with batch B give the gradients of
one process with batch N * B.
"""

import sys
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from .adapters import (
    SAFETY_KEYS,
    add_lora,
    load_adapter_weights,
    load_checkpoint,
    lora_parameters,
    save_adapters,
    save_checkpoint,
)
from .adversarial import mean_embedding_norm, perturbation
from .attention import cls_row, sft_mask
from .data import Example, balanced_order, load_dataset, special_token_ids
from .decoding import SafetyConfig, SafetyMonitor, scheduled
from .loading import load
from .metrics import confusion, f1_report, rates
from .model import Model, SafesigError
from .smoothing import noised_ids, printable_tokens

PAD_TO = 8  # row padding: small, the [CLS] and probe rows already lengthen a row


@dataclass
class TrainConfig:
    """Training settings (CLI options of ``mlx-safesig train``)."""

    iters: int = 200
    batch_size: int = 4
    learning_rate: float = 1e-4
    safety_learning_rate: Optional[float] = None  # [CLS] row and head; None: 10 x learning_rate
    warmup: int = 0
    weight_decay: float = 0.01
    lam: float = 0.1  # weight of the [CLS] BCE terms
    lora_rank: int = 8
    lora_scale: float = 20.0
    lora_dropout: float = 0.0
    num_layers: int = 16  # LoRA on the last N blocks; -1: all
    fine_tune_type: str = "lora"  # "full": every weight of those blocks trains, no LoRA
    probes: int = 4  # window probes per response/continuation branch; 0: no window supervision
    probe_schedule: str = "annealing"  # where in a branch the probes go: as this schedule probes
    min_window: Optional[int] = None  # no probe before this many tokens; None: the model's (1)
    window_query: bool = False  # window probes see the query span too (experimental)
    adv_epsilon: float = 0.0  # query embeddings perturbed within this x mean token norm; 0: off
    adv_steps: int = 1  # gradient steps of that perturbation (adversarial.py)
    query_noise: float = 0.0  # query tokens replaced at random at this rate (smoothing.noised_ids)
    oversample: bool = True
    max_seq_length: int = 2048
    grad_checkpoint: bool = False
    steps_per_report: int = 10
    steps_per_eval: int = 100
    val_batches: int = 25  # -1: the whole validation set
    save_every: int = 100
    seed: int = 0


# -- Rows: the layout above, built on the host ----------------------------------------------------


@dataclass
class Probe:
    branch_start: int  # slot of the branch's first token
    t: int  # branch index the probe follows
    window: List[int]  # branch indices it sees
    label: int
    query: bool = False  # it sees the query span too (window_query)


@dataclass
class Row:
    ids: np.ndarray  # [l]
    positions: np.ndarray  # [l]
    mask: np.ndarray  # [l, l] bool
    lm_slots: np.ndarray  # slots whose logits predict ...
    lm_targets: np.ndarray  # ... these tokens
    cls_slots: np.ndarray  # query [CLS] first, then probes
    query_slots: np.ndarray  # the query tokens the query [CLS] reads
    cls_labels: np.ndarray
    n_tokens: int  # sequence tokens (no [CLS] rows)


def probe_ends(length: int, k: int, schedule: str = "annealing", min_window: int = 1) -> List[int]:
    """``k`` branch indices where generation under ``schedule`` probes a branch of ``length``
    tokens, spread evenly over those probe indices (all of them if there are at most ``k``).

    Under ``annealing`` generation probes every one of the first 31 tokens and ever more sparsely
    after, so training windows are placed the same way: a window at the start of an answer is the
    one generation checks most often (spreading the probes evenly over the tokens instead left the
    first tokens of long answers, where benign answers were being flagged, almost unsupervised).
    ``each`` spreads them evenly over the tokens; ``first`` (no probes during generation) falls
    back to ``each``: window supervision still helps the query verdict's robustness. Like
    generation, no probe before the branch holds ``min_window`` tokens."""
    if schedule == "first":
        schedule = "each"
    slots = [t for t in range(min_window - 1, length) if scheduled(schedule, t)]
    m = len(slots)
    if m <= k:
        return slots
    return [slots[(2 * j + 1) * m // (2 * k)] for j in range(k)]


def plan_probes(ex: Example, k: int, monitor: SafetyMonitor, special: set,
                schedule: str = "annealing") -> List[Probe]:
    """Window probes for one example: over the response of a benign example (label 0) and over the
    continuation (its label); windows as generation's rule 2 picks them, where ``schedule``
    probes (``probe_ends``)."""
    if k <= 0:
        return []
    n = 1 + len(ex.prompt)
    branches = []
    if ex.label == 0:
        branches.append((n, ex.response, 0))
    if ex.continuation:
        branches.append((n + len(ex.response), ex.continuation, ex.continuation_label))
    probes = []
    for start, tokens, label in branches:
        flags = [t in special for t in tokens]
        for t in probe_ends(len(tokens), k, schedule, monitor.config.min_window):
            include_query, window = monitor.window(t, flags)
            if window:
                probes.append(Probe(start, t, window, label, include_query))
    return probes


def window_monitor(model: Model, min_window: Optional[int] = None,
                   window_query: bool = False) -> SafetyMonitor:
    """A monitor in rule 2 (query verdict benign, no flip): the windows probes see most.
    ``min_window`` None and ``window_query`` False: the model's."""
    config = SafetyConfig(min_window=min_window, window_query=window_query or None)
    monitor = SafetyMonitor(config.resolved(model.args.safesig))
    monitor.query_malicious = False
    return monitor


def layout(ex: Example, probes: Sequence[Probe], cls_id: int, probe_position) -> Row:
    """One training row (see the module docstring)."""
    n, R, C = len(ex.prompt), len(ex.response), len(ex.continuation)
    r0 = 1 + n
    c0 = r0 + R
    p0 = c0 + C
    length = p0 + len(probes)
    ids = np.array([cls_id, *ex.prompt, *ex.response, *ex.continuation, *[cls_id] * len(probes)],
                   dtype=np.int32)
    positions = np.arange(length, dtype=np.int32)
    positions[c0:p0] = np.arange(r0, r0 + C)
    mask = np.zeros((length, length), dtype=bool)
    query = [1 + i for i in ex.query_slots]
    mask[:c0, :c0] = np.array(sft_mask(c0, query, r0))
    mask[c0:p0, :r0] = mask[r0, :r0]  # a continuation token sees what the first response token does
    mask[c0:p0, c0:p0] = np.tril(np.ones((C, C), dtype=bool))
    for j, p in enumerate(probes):
        slot = p0 + j
        cls_row(mask[slot], slot, [p.branch_start + i for i in p.window] + (query if p.query else []))
        positions[slot] = r0 + p.t + 1 if probe_position == "current" else probe_position
    return Row(
        ids=ids, positions=positions, mask=mask,
        lm_slots=np.arange(n + ex.lm_start, n + R, dtype=np.int32),
        lm_targets=np.array(ex.response[ex.lm_start:], dtype=np.int32),
        cls_slots=np.array([0, *range(p0, length)], dtype=np.int32),
        cls_labels=np.array([ex.label, *[p.label for p in probes]], dtype=np.float32),
        query_slots=np.array(query, dtype=np.int32),
        n_tokens=ex.n_tokens,
    )


def _ceil(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def collate(rows: Sequence[Row], totals: Dict[str, float], world: int = 1) -> Dict[str, mx.array]:
    """Pad rows into a batch. ``totals``: counts over the global batch (``lm`` response tokens,
    ``query`` examples, ``probe`` probes) that turn sums into global means; multiplied by
    ``world`` because the gradient all-reduce averages over processes.

    Returns ids / positions [B, L], mask [B, 1, L, L], ``query_tokens`` [B, L] (1 at the query
    tokens the query ``[CLS]`` reads), and flat gathers: ``lm_index`` [N] into
    B * L with ``lm_target`` and weights ``lm_weight``; ``cls_index`` [M] with ``cls_label``,
    ``query_weight`` and ``probe_weight``. Padding rows see only themselves, padding gathers
    weigh 0."""
    B = len(rows)
    L = _ceil(max(len(r.ids) for r in rows), PAD_TO)
    ids = np.zeros((B, L), np.int32)
    positions = np.zeros((B, L), np.int32)
    mask = np.broadcast_to(np.eye(L, dtype=bool), (B, L, L)).copy()
    query_tokens = np.zeros((B, L), np.float32)
    lm_index, lm_target, cls_index, cls_label, is_query = [], [], [], [], []
    for b, r in enumerate(rows):
        n = len(r.ids)
        ids[b, :n], positions[b, :n], mask[b, :n, :n] = r.ids, r.positions, r.mask
        query_tokens[b, r.query_slots] = 1.0
        lm_index.append(b * L + r.lm_slots)
        lm_target.append(r.lm_targets)
        cls_index.append(b * L + r.cls_slots)
        cls_label.append(r.cls_labels)
        is_query.append(np.arange(len(r.cls_slots)) == 0)

    def padded(parts, dtype, size):
        flat = np.concatenate(parts).astype(dtype)
        return np.pad(flat, (0, size - flat.size))

    N = _ceil(sum(len(x) for x in lm_index), PAD_TO)
    M = _ceil(sum(len(x) for x in cls_index), 8)
    n_lm = sum(len(x) for x in lm_index)
    is_query = padded(is_query, bool, M)
    is_probe = np.arange(M) < sum(len(x) for x in cls_index)
    is_probe &= ~is_query
    scale = float(world)
    return {
        "ids": mx.array(ids), "positions": mx.array(positions), "mask": mx.array(mask[:, None]),
        "query_tokens": mx.array(query_tokens),
        "lm_index": mx.array(padded(lm_index, np.int32, N)),
        "lm_target": mx.array(padded(lm_target, np.int32, N)),
        "lm_weight": mx.array((np.arange(N) < n_lm) * scale / totals["lm"], dtype=mx.float32),
        "cls_index": mx.array(padded(cls_index, np.int32, M)),
        "cls_label": mx.array(padded(cls_label, np.float32, M)),
        "query_weight": mx.array(is_query * scale / totals["query"], dtype=mx.float32),
        "probe_weight": mx.array(is_probe * scale / max(totals["probe"], 1), dtype=mx.float32),
    }


# -- The loss -------------------------------------------------------------------------------------


def head_loss(z: mx.array, labels: mx.array) -> mx.array:
    """Per-row BCE of the safety head's logits ``z`` [M, 1 or 2] against 0/1 ``labels`` [M]."""
    if z.shape[-1] == 1:
        return nn.losses.binary_cross_entropy(z[:, 0], labels, with_logits=True, reduction="none")
    return nn.losses.cross_entropy(z, labels.astype(mx.int32), reduction="none")


def forward(model: Model, batch: dict, checkpoint: bool = False) -> mx.array:
    """Final-norm hidden states [B, L, D] of a collated batch (per-layer gradient checkpointing
    if ``checkpoint``); a batch's ``delta`` [B, L, D] (``adversarial.perturbation``) is added to
    its query tokens' embeddings."""
    ids, mask, positions = batch["ids"], batch["mask"], batch["positions"]
    h = model.embed(ids)
    if "delta" in batch:
        h = h + batch["delta"] * batch["query_tokens"][..., None]
    if not checkpoint:
        return model.hidden(ids, mask=mask, positions=positions, input_embeddings=h)
    for layer in model.layers:

        def block(params, h, layer=layer):
            layer.update(params)
            return layer(h, mask, None, positions)

        h = mx.checkpoint(block)(layer.trainable_parameters(), h)
    return model.model.norm(h)


def cls_bce(model: Model, batch: dict, h: mx.array) -> mx.array:
    """BCE [M] of every ``[CLS]`` slot of a batch, from its flat hidden states ``h`` [B * L, D]."""
    z = model.cls_head(h[batch["cls_index"]].astype(model.cls_head.weight.dtype))
    return head_loss(z.astype(mx.float32), batch["cls_label"])


def query_loss(model: Model, batch: dict, checkpoint: bool = False) -> mx.array:
    """The query ``[CLS]`` BCE of a batch, as ``joint_loss`` weighs it."""
    h = forward(model, batch, checkpoint)
    return (cls_bce(model, batch, h.reshape(-1, h.shape[-1])) * batch["query_weight"]).sum()


def joint_loss(model: Model, batch: dict, lam: float, checkpoint: bool = False):
    """``L_lm + lam * (BCE_query + BCE_probes)`` and its three parts (global means, see
    ``collate``)."""
    h = forward(model, batch, checkpoint)
    h = h.reshape(-1, h.shape[-1])
    logits = model.logits(h[batch["lm_index"]]).astype(mx.float32)
    lm = (nn.losses.cross_entropy(logits, batch["lm_target"]) * batch["lm_weight"]).sum()
    bce = cls_bce(model, batch, h)
    query = (bce * batch["query_weight"]).sum()
    probe = (bce * batch["probe_weight"]).sum()
    return lm + lam * (query + probe), (lm, query, probe)


# -- Model preparation, training state ------------------------------------------------------------


def prepare_model(model: Model, config: TrainConfig) -> int:
    """Freeze the model, put LoRA on the last ``num_layers`` blocks (``add_lora``; 0: none) or,
    with ``fine_tune_type="full"``, unfreeze those blocks whole (as mlx-lm's full fine-tuning
    does: embeddings and the final norm stay frozen); make the ``[CLS]`` row and the head fully
    trainable. Returns the number of trained blocks."""
    model.freeze()
    n = add_lora(model, config.num_layers, lora_parameters(config), config.fine_tune_type)
    if config.fine_tune_type == "full":
        for block in model.layers[len(model.layers) - n:]:
            block.unfreeze()
    model.unfreeze(keys=["cls_embed"], recurse=False)
    model.cls_head.unfreeze()
    return n


# -- Batches and evaluation -----------------------------------------------------------------------


def batch_order(order: Sequence[int], examples: Sequence[Example], size: int, seed: int
                ) -> Iterator[List[int]]:
    """Endless global batches: examples sorted by length, cut into batches of ``size``, batches
    shuffled each epoch (as mlx-lm does: little padding, random order)."""
    order = sorted(order, key=lambda i: examples[i].n_tokens)
    batches = [order[i : i + size] for i in range(0, len(order) - size + 1, size)]
    if not batches:
        raise SafesigError(
            f"the training set has {len(order)} examples, fewer than one batch of {size}."
        )
    epoch = 0
    while True:
        for j in np.random.RandomState(seed + epoch).permutation(len(batches)):
            yield batches[j]
        epoch += 1


class Batcher:
    """Turns global batches of example indices into this process's collated share."""

    def __init__(self, model: Model, tokenizer, config: TrainConfig, world):
        self.model, self.config, self.world = model, config, world
        self.monitor = window_monitor(model, config.min_window, config.window_query)
        self.special = special_token_ids(tokenizer)
        self.probe_position = model.args.safesig["probe_position"]

    def probes(self, ex: Example) -> List[Probe]:
        return plan_probes(ex, self.config.probes, self.monitor, self.special,
                           self.config.probe_schedule)

    def __call__(self, examples: Sequence[Example], indices: Sequence[int]):
        """-> (batch arrays of this rank's rows, global sequence tokens)."""
        chosen = [examples[i] for i in indices]
        rows = [layout(ex, self.probes(ex), self.model.cls_token_id, self.probe_position)
                for ex in chosen]
        totals = {
            "lm": sum(len(r.lm_slots) for r in rows),
            "query": len(rows),
            "probe": sum(len(r.cls_slots) - 1 for r in rows),
        }
        size, rank = self.world.size(), self.world.rank()
        mine = rows[rank::size]
        return collate(mine, totals, size), sum(r.n_tokens for r in rows)


def evaluate(model: Model, examples: Sequence[Example], batcher: Batcher, batch_size: int,
             num_batches: int = -1, sweep: Sequence[float] = ()) -> dict:
    """Validation: LM loss per response token, the query ``[CLS]`` accuracy / precision / recall /
    F1 at the model's threshold, and the window probes' accuracy, recall (harmful windows flagged)
    and false-positive rate (benign windows flagged), summed over all processes. ``sweep``: more
    thresholds, reported in ``report["sweep"]`` (query and probe recall / false-positive rate)."""
    threshold = model.args.safesig["threshold"]
    swept = mx.zeros((len(sweep), 8))
    size = batch_size * batcher.world.size()
    starts = range(0, len(examples), size)
    if num_batches >= 0:
        starts = list(starts)[:num_batches]
    totals = mx.zeros((10,))  # lm sum, lm count, query tp fp fn tn, probe tp fp fn tn
    for s in starts:
        indices = list(range(s, min(s + size, len(examples))))
        if len(indices) < batcher.world.size():
            break
        batch, _ = batcher(examples, indices)
        h = model.hidden(batch["ids"], mask=batch["mask"], positions=batch["positions"])
        h = h.reshape(-1, h.shape[-1])
        logits = model.logits(h[batch["lm_index"]]).astype(mx.float32)
        lm_on = batch["lm_weight"] > 0
        ce = nn.losses.cross_entropy(logits, batch["lm_target"]) * lm_on
        prob = model.safety_prob(h[batch["cls_index"]])
        pred = prob >= threshold
        label = batch["cls_label"] > 0.5
        q = batch["query_weight"] > 0
        p = batch["probe_weight"] > 0
        totals = totals + mx.stack([
            ce.sum(), lm_on.sum(),
            *confusion(q, pred, label), *confusion(p, pred, label),
        ]).astype(mx.float32)
        if sweep:
            swept = swept + mx.stack([
                mx.stack([*confusion(q, prob >= t, label), *confusion(p, prob >= t, label)])
                for t in sweep]).astype(mx.float32)
        mx.eval(totals, swept)
    totals = mx.distributed.all_sum(totals, stream=mx.cpu).tolist()
    report = {"lm_loss": totals[0] / max(totals[1], 1), **f1_report(*totals[2:6])}
    tp, fp, fn, tn = totals[6:10]
    probe = rates(tp, fp, fn, tn)
    report["probe_accuracy"] = (tp + tn) / (tp + fp + fn + tn) if tp + fp + fn + tn else None
    report["probe_recall"] = probe["recall"]
    report["probe_false_positive_rate"] = probe["false_positive_rate"]
    report["probes"] = int(tp + fp + fn + tn)
    if sweep:
        swept = mx.distributed.all_sum(swept, stream=mx.cpu).tolist()
        report["sweep"] = {t: {"query": rates(*row[:4]), "probe": rates(*row[4:])}
                           for t, row in zip(sweep, swept)}
    return report


# -- The loop -------------------------------------------------------------------------------------


def _schedule(peak: float, config: TrainConfig):
    decay = optim.cosine_decay(peak, max(config.iters - config.warmup, 1), 0.0)
    if not config.warmup:
        return decay
    warm = optim.linear_schedule(0.0, peak, config.warmup)
    return optim.join_schedules([warm, decay], [config.warmup])


def make_optimizer(config: TrainConfig) -> optim.MultiOptimizer:
    """AdamW with warmup + cosine decay; the ``[CLS]`` row and the head, new and trained from
    scratch, get their own (by default 10x higher) learning rate."""
    safety_lr = config.safety_learning_rate or 10 * config.learning_rate
    return optim.MultiOptimizer(
        [optim.AdamW(_schedule(safety_lr, config), weight_decay=config.weight_decay),
         optim.AdamW(_schedule(config.learning_rate, config), weight_decay=config.weight_decay)],
        [lambda path, _: path in SAFETY_KEYS],
    )


def make_step(model: Model, optimizer, config: TrainConfig, world, pool: Optional[mx.array] = None):
    """The compiled training step ``step(batch) -> [loss, lm, query bce, probe bce]`` (updates
    ``model`` and ``optimizer``; gradients averaged over ``world``) and the state to evaluate.
    ``pool``: the tokens ``query_noise`` draws from."""
    loss_and_grad = nn.value_and_grad(
        model, partial(joint_loss, lam=config.lam, checkpoint=config.grad_checkpoint)
    )
    state = [model.state, optimizer.state, mx.random.state]
    radius = config.adv_epsilon * mean_embedding_norm(model) if config.adv_epsilon else 0.0

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch):
        if config.query_noise:
            batch = dict(batch, ids=noised_ids(batch["ids"], batch["query_tokens"], pool,
                                               config.query_noise))
        if radius:
            attacked = partial(query_loss, model, checkpoint=config.grad_checkpoint)
            batch = dict(batch, delta=perturbation(model, batch, radius, config.adv_steps, attacked))
        (loss, parts), grad = loss_and_grad(model, batch)
        if world.size() > 1:
            grad = nn.average_gradients(grad)
        optimizer.update(model, grad)
        return mx.stack([loss, *parts])

    return step, state


def _log(message: str):
    print(message, file=sys.stderr, flush=True)


def train(
    model: Model,
    tokenizer,
    train_set: Sequence[Example],
    valid_set: Optional[Sequence[Example]],
    config: TrainConfig,
    adapter_path,
    resume: bool = False,
    log=_log,
    init_from=None,
) -> List[dict]:
    """Train ``model`` in place (LoRA + ``[CLS]`` row + head) and save adapters to ``adapter_path``.

    Under ``mlx.launch`` every process runs this with the same data; each takes its share of
    every global batch (``batch_size`` per process) and gradients are averaged. Returns the
    reported history: one dict per report / validation (rank 0 logs; all ranks return it).
    ``init_from``: a folder of saved adapters to start from (a new optimizer and schedule: a
    continued training, e.g. ``align``'s hardening rounds); ``resume`` takes precedence."""
    world = mx.distributed.init()
    rank = world.rank()
    say = log if rank == 0 else (lambda _: None)
    adapter_path = Path(adapter_path)
    mx.random.seed(config.seed)  # same LoRA init on every process
    num_layers = prepare_model(model, config)
    optimizer = make_optimizer(config)
    start = load_checkpoint(adapter_path, model, optimizer) if resume else 0
    if init_from is not None and not resume:
        load_adapter_weights(model, Path(init_from))
    batcher = Batcher(model, tokenizer, config, world)
    order = balanced_order(train_set) if config.oversample else list(range(len(train_set)))
    batches = batch_order(order, train_set, config.batch_size * world.size(), config.seed)
    for _ in range(start):  # resume: the same batches follow
        next(batches)

    pool = mx.array(printable_tokens(model, tokenizer)) if config.query_noise else None
    step, state = make_step(model, optimizer, config, world, pool)

    history = []
    sums, tokens, seconds, steps = mx.zeros((4,)), 0, 0.0, 0

    def validate(it):
        if valid_set is None:
            return
        model.eval()
        report = evaluate(model, valid_set, batcher, config.batch_size, config.val_batches)
        model.train()
        history.append({"step": it, "kind": "valid", **report})
        probe = report["probe_accuracy"]
        say(f"step {it}: valid lm {report['lm_loss']:.3f}, [CLS] acc {report['accuracy']:.3f} "
            f"P {report['precision']:.3f} R {report['recall']:.3f} F1 {report['f1']:.3f}"
            + (f", probes acc {probe:.3f}" if probe is not None else ""))

    model.train()
    how = f"LoRA rank {config.lora_rank} on" if config.fine_tune_type == "lora" else "full fine-tune of"
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    say(f"training {config.iters} steps from step {start}: {len(train_set)} examples, "
        f"batch {config.batch_size} x {world.size()} process(es), {how} {num_layers} layers "
        f"({trainable:,} trainable parameters), lambda {config.lam}, "
        f"{config.probes} probes per branch ({config.probe_schedule})"
        + (f", query embeddings attacked within {config.adv_epsilon} x their mean norm "
           f"({config.adv_steps} step(s))" if config.adv_epsilon else "")
        + (f", query tokens replaced at rate {config.query_noise}" if config.query_noise else ""))
    for it in range(start + 1, config.iters + 1):
        tic = time.perf_counter()
        batch, n_tokens = batcher(train_set, next(batches))
        sums = sums + step(batch)
        mx.eval(state, sums)
        seconds += time.perf_counter() - tic
        tokens += n_tokens
        steps += 1
        if it % config.steps_per_report == 0 or it == config.iters:
            loss, lm, query, probe = (mx.distributed.all_sum(sums, stream=mx.cpu) /
                                      (steps * world.size())).tolist()
            entry = {"step": it, "kind": "train", "loss": loss, "lm_loss": lm,
                     "query_bce": query, "probe_bce": probe, "tokens_per_second": tokens / seconds,
                     "peak_memory_gb": mx.get_peak_memory() / 1e9,
                     "learning_rate": optimizer.optimizers[1].learning_rate.item()}
            history.append(entry)
            say(f"step {it}/{config.iters}: loss {loss:.3f} (lm {lm:.3f}, query bce {query:.3f}, "
                f"probe bce {probe:.3f}), lr {entry['learning_rate']:.2e}, "
                f"{entry['tokens_per_second']:.0f} tok/s, peak {entry['peak_memory_gb']:.2f} GB")
            sums, tokens, seconds, steps = mx.zeros((4,)), 0, 0.0, 0
        if it % config.steps_per_eval == 0 and it != config.iters:
            validate(it)
        if it % config.save_every == 0 and it != config.iters and rank == 0:
            save_adapters(model, adapter_path, config, num_layers)
            save_adapters(model, adapter_path, config, num_layers, prefix=f"{it:07d}_")
            save_checkpoint(adapter_path, optimizer, it)
            say(f"step {it}: saved adapters to {adapter_path}")
    validate(config.iters)
    if rank == 0:
        save_adapters(model, adapter_path, config, num_layers)
        save_checkpoint(adapter_path, optimizer, config.iters)
        say(f"saved adapters to {adapter_path}")
    return history


def train_from_dir(model_path, data_dir, adapter_path, config: TrainConfig, add_safety: bool = False,
                   resume: bool = False, log=_log, drop_long: bool = False,
                   init_from=None) -> List[dict]:
    """``mlx-safesig train``: load ``model_path`` (``add_safety``: a fresh ``[CLS]`` row and head),
    read ``data_dir``'s train.jsonl (and valid.jsonl) and ``train``; ``drop_long``: rows over
    ``max_seq_length`` are left out and counted per source (else an error)."""
    model, tokenizer = load(model_path, add_safety=add_safety)
    batcher, dropped = Batcher(model, tokenizer, config, mx.distributed.init()), []
    train_set, valid_set = load_dataset(data_dir, tokenizer, config.max_seq_length, lambda ex: len(
        batcher.probes(ex)), dropped if drop_long else None)
    if dropped:
        log(f"left out {len(dropped)} rows longer than --max-seq-length {config.max_seq_length}: "
            + ", ".join(f"{s} {n}" for s, n in sorted(Counter(dropped).items())))
    return train(model, tokenizer, train_set, valid_set, config, adapter_path, resume=resume, log=log,
                 init_from=init_from)
