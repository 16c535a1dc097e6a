"""Training end to end on a tiny model: a synthetic two-class task is learnt, adapters reload and fuse
to the same model, --resume continues exactly, and 2-process data parallel equals one big batch."""

import json
import random
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_model, make_tokenizer, write_model_dir

from mlx_safesig import SafetyConfig, generate, load, score
from mlx_safesig.adapters import ADAPTER_CONFIG, load_adapters
from mlx_safesig.cli import main
from mlx_safesig.data import tokenize_example
from mlx_safesig.fuse import fuse
from mlx_safesig.train import TrainConfig, train

# Class = which word list the topic comes from; frames, pairs and responses vary.
BAD = ["zax", "quz", "jix", "vozz", "xeq", "zuj", "qiv", "juzz"]
GOOD = ["bread", "poem", "sea", "home", "water", "story", "salt", "dog"]
FRAMES = ["How do I make {}?", "Tell me about {}.", "Explain {} to me.", "What is {}?",
          "Give steps for {}."]
REFUSAL = "Sorry, I can't fulfill your request because it could cause harm."


def synthetic(n, seed):
    rng = random.Random(seed)
    records = []
    for i in range(n):
        bad = i % 2 == 1
        topic = " ".join(rng.sample(BAD if bad else GOOD, 2))
        query = rng.choice(FRAMES).format(topic)
        if bad:
            records.append({"prompt": query, "response": REFUSAL, "label": 1,
                            "continuation": f"Sure, here is {topic}: take the {topic} and "
                                            f"{rng.choice(BAD)} it."})
        else:
            records.append({"prompt": query, "label": 0, "response": f"Sure, {topic} is simple: "
                            f"start with {rng.choice(GOOD)} and go slowly."})
    return records


def write_data(folder: Path, train_records, valid_records=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train_records))
    if valid_records:
        (folder / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in valid_records))
    return folder


def f1(model, tokenizer, records):
    pred = [score(model, tokenizer, [{"role": "user", "content": r["prompt"]}]) >= 0.5
            for r in records]
    tp = sum(p and r["label"] for p, r in zip(pred, records))
    fp = sum(p and not r["label"] for p, r in zip(pred, records))
    fn = sum((not p) and r["label"] for p, r in zip(pred, records))
    return 2 * tp / max(2 * tp + fp + fn, 1)


QUICK = dict(batch_size=8, learning_rate=1e-3, num_layers=-1, steps_per_report=10,
             steps_per_eval=1000, save_every=1000)
PROMPTS = [[{"role": "user", "content": "What is zax quz?"}],
           [{"role": "user", "content": "Tell me about sea salt."}]]


def outputs(model, tokenizer):
    scores = [score(model, tokenizer, p) for p in PROMPTS]
    texts = [generate(model, tokenizer, p, max_tokens=12, safety=SafetyConfig(schedule="each"))
             for p in PROMPTS]
    return scores, texts


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny base model directory, trained on the synthetic task."""
    root = tmp_path_factory.mktemp("train")
    tokenizer = make_tokenizer()
    base = write_model_dir(root / "base", make_model(), tokenizer)
    model, tokenizer = load(base)
    records = synthetic(64, seed=0)
    examples = [tokenize_example(tokenizer, r) for r in records]
    history = train(model, tokenizer, examples, None, TrainConfig(iters=50, **QUICK),
                    root / "adapters", log=lambda _: None)
    return base, root / "adapters", model, tokenizer, history


def test_synthetic_task_reaches_f1_095_on_held_out_data(trained):
    _, _, model, tokenizer, history = trained
    assert f1(model, tokenizer, synthetic(40, seed=1)) >= 0.95
    assert history[-1]["lm_loss"] < history[0]["lm_loss"]


def test_adapters_are_two_files_and_mlx_lm_loads_the_lora_part(trained):
    import mlx_lm

    base, adapters, *_ = trained
    weights = mx.load(str(adapters / "adapters.safetensors"))
    assert weights and all(".lora_" in k for k in weights)
    assert set(mx.load(str(adapters / "safety_adapter.safetensors"))) == {
        "cls_embed", "cls_head.weight", "cls_head.bias"}
    mlx_lm.load(str(base), adapter_path=str(adapters))  # does not choke


def test_reloaded_adapters_give_identical_scores_and_generations(trained):
    base, adapters, model, tokenizer, _ = trained
    reloaded, _ = load(base)
    load_adapters(reloaded, adapters)
    assert outputs(reloaded, tokenizer) == outputs(model, tokenizer)


@pytest.mark.parametrize("quantize", [False, True])
def test_fused_model_gives_the_same_scores_and_generations(trained, tmp_path, quantize):
    base, adapters, model, tokenizer, _ = trained
    fused_path = fuse(base, adapters, tmp_path / "fused", q_bits=8 if quantize else None)
    fused, _ = load(fused_path)
    scores, texts = outputs(fused, tokenizer)
    expected_scores, expected_texts = outputs(model, tokenizer)
    if quantize:  # matrices quantized, head and [CLS] row float
        assert fused.cls_head.weight.dtype == mx.float32 and fused.cls_embed.dtype == mx.float32
        np.testing.assert_allclose(scores, expected_scores, atol=0.05)
    else:
        np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
        assert texts == expected_texts


def test_resume_continues_exactly(tmp_path, tokenizer):
    examples = [tokenize_example(tokenizer, r) for r in synthetic(16, seed=3)]
    config = dict(QUICK, batch_size=4, steps_per_report=1, save_every=3)
    straight = train(make_model(), tokenizer, examples, None, TrainConfig(iters=6, **config),
                     tmp_path / "a", log=lambda _: None)

    class Interrupted(Exception):
        pass

    def crash_after_checkpoint(message):
        if "saved" in message:
            raise Interrupted

    with pytest.raises(Interrupted):
        train(make_model(), tokenizer, examples, None, TrainConfig(iters=6, **config),
              tmp_path / "b", log=crash_after_checkpoint)
    resumed = train(make_model(), tokenizer, examples, None, TrainConfig(iters=6, **config),
                    tmp_path / "b", resume=True, log=lambda _: None)
    assert [h["step"] for h in resumed] == [4, 5, 6]
    np.testing.assert_allclose([h["loss"] for h in resumed], [h["loss"] for h in straight[3:]],
                               rtol=1e-4)


WORKER = """
import json, sys
sys.path.insert(0, {tests!r})
from conftest import make_model, make_tokenizer
from mlx_safesig.data import tokenize_example
from mlx_safesig.train import TrainConfig, train
from test_train import QUICK, synthetic

tokenizer = make_tokenizer()
examples = [tokenize_example(tokenizer, r) for r in synthetic(16, seed=5)]
config = TrainConfig(iters=4, **dict(QUICK, batch_size=int(sys.argv[2]), steps_per_report=1))
history = train(make_model(), tokenizer, examples, None, config, sys.argv[1] + "/adapters",
                log=lambda _: None)
import mlx.core as mx
if mx.distributed.init().rank() == 0:
    json.dump([h["loss"] for h in history], open(sys.argv[1] + "/losses.json", "w"))
"""


def test_two_processes_match_one_process_with_twice_the_batch(tmp_path, tokenizer):
    # mlx.launch comes with mlx: next to this interpreter in a venv, else on PATH
    launcher = Path(sys.executable).with_name("mlx.launch")
    launcher = str(launcher) if launcher.exists() else shutil.which("mlx.launch")
    assert launcher, "mlx.launch (installed with mlx) not found"
    examples = [tokenize_example(tokenizer, r) for r in synthetic(16, seed=5)]
    config = TrainConfig(iters=4, **dict(QUICK, batch_size=8, steps_per_report=1))
    one = [h["loss"] for h in train(make_model(), tokenizer, examples, None, config,
                                    tmp_path / "one", log=lambda _: None)]
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(Path(__file__).parent)))
    (tmp_path / "two").mkdir()
    launched = subprocess.run(
        [launcher, "--backend", "ring", "-n", "2", "--starting-port", str(free_port()),
         "--env", "OPENBLAS_NUM_THREADS=1", sys.executable, str(script), str(tmp_path / "two"), "4"],
        capture_output=True, text=True, timeout=180, cwd=tmp_path,
    )
    assert launched.returncode == 0, launched.stderr[-2000:]
    two = json.loads((tmp_path / "two" / "losses.json").read_text())
    assert len(one) == len(two) == 4
    np.testing.assert_allclose(two, one, atol=1e-4)


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_train_command_writes_adapters_and_reports_on_stderr(tmp_path, tokenizer):
    base = write_model_dir(tmp_path / "base", make_model(), tokenizer)
    data = write_data(tmp_path / "data", synthetic(16, 0), synthetic(8, 1))
    result = CliRunner().invoke(main, [
        "train", "--model", str(base), "--data", str(data), "--adapter-path", str(tmp_path / "ad"),
        "--iters", "2", "--batch-size", "4", "--steps-per-report", "1", "--num-layers", "1",
    ])
    assert result.exit_code == 0, result.output
    assert "tok/s" in result.stderr and "F1" in result.stderr and result.stdout == ""
    assert (tmp_path / "ad" / "adapters.safetensors").is_file()
    fused = CliRunner().invoke(main, [
        "fuse", "--model", str(base), "--adapter-path", str(tmp_path / "ad"),
        "--save-path", str(tmp_path / "fused")])
    assert fused.exit_code == 0, fused.output
    load(tmp_path / "fused")


@pytest.mark.parametrize("flags, expected", [
    (["--window-query"], True), (["--window-query", "--no-window-query"], None), ([], None)])
def test_train_command_window_query_flag_reaches_the_adapters_decoding_defaults(
        tmp_path, tokenizer, flags, expected):
    """--window-query is written to the adapter's decoding defaults; the last of
    --window-query / --no-window-query wins."""
    import json

    base = write_model_dir(tmp_path / "base", make_model(), tokenizer)
    data = write_data(tmp_path / "data", synthetic(8, 0), synthetic(4, 1))
    result = CliRunner().invoke(main, [
        "train", "--model", str(base), "--data", str(data), "--adapter-path", str(tmp_path / "ad"),
        "--iters", "1", "--batch-size", "4", "--num-layers", "1", *flags])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config.get("safesig", {}).get("window_query") is expected
    assert config["safesig_training"]["window_query"] is bool(expected)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tokenizer):
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from mlx_safesig.train import Batcher, joint_loss, prepare_model

    examples = [tokenize_example(tokenizer, r) for r in synthetic(4, seed=2)]
    results = []
    for checkpoint in (False, True):
        model = make_model()
        config = TrainConfig(num_layers=-1)
        mx.random.seed(0)
        prepare_model(model, config)
        batch, _ = Batcher(model, tokenizer, config, mx.distributed.init())(examples, range(4))
        loss_fn = partial(joint_loss, lam=0.1, checkpoint=checkpoint)
        (loss, _), grad = nn.value_and_grad(model, loss_fn)(model, batch)
        results.append((loss.item(), dict(tree_flatten(grad))))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    for name, g in results[0][1].items():
        np.testing.assert_allclose(np.array(g), np.array(results[1][1][name]), atol=1e-5)


def test_validation_threshold_sweep_matches_the_main_report(tokenizer):
    from mlx_safesig.train import Batcher, evaluate

    model = make_model()
    examples = [tokenize_example(tokenizer, r) for r in synthetic(6, seed=4)]
    batcher = Batcher(model, tokenizer, TrainConfig(), mx.distributed.init())
    report = evaluate(model, examples, batcher, 3, sweep=[0.5, 1e-9, 1.0 - 1e-9])
    at_half = report["sweep"][0.5]
    assert at_half["query"]["recall"] == pytest.approx(report["recall"])
    assert at_half["probe"]["recall"] == pytest.approx(report["probe_recall"])
    assert at_half["probe"]["false_positive_rate"] == pytest.approx(
        report["probe_false_positive_rate"])
    low, high = report["sweep"][1e-9], report["sweep"][1.0 - 1e-9]
    assert low["probe"] == {"recall": 1.0, "false_positive_rate": 1.0}  # everything flagged
    assert high["probe"] == {"recall": 0.0, "false_positive_rate": 0.0}  # nothing flagged


def test_adapter_config_decoding_defaults_reach_the_model_and_the_fused_config(trained, tmp_path):
    from mlx_safesig.model import SafesigError

    base, adapters, _, _, _ = trained
    tuned = tmp_path / "tuned"
    shutil.copytree(adapters, tuned)
    config = json.loads((tuned / ADAPTER_CONFIG).read_text())
    (tuned / ADAPTER_CONFIG).write_text(json.dumps(
        {**config, "safesig": {"window_threshold": 0.8, "keep_verdict": "flagged"}}))
    model, _ = load(base, adapter_path=tuned)
    assert model.args.safesig["window_threshold"] == 0.8
    assert SafetyConfig().resolved(model.args.safesig).keep_verdict == "flagged"
    fused = json.loads((fuse(base, tuned, tmp_path / "fused") / "config.json").read_text())
    assert fused["safesig"]["window_threshold"] == 0.8
    assert fused["safesig"]["keep_verdict"] == "flagged"
    assert fused["safesig"]["threshold"] == 0.5

    # trained with --min-window: written as a decoding default, so generation checks alike
    from mlx_safesig.adapters import save_adapters

    save_adapters(trained[2], tmp_path / "mw", TrainConfig(min_window=8, window_query=True),
                  config["num_layers"])
    safesig = load(base, adapter_path=tmp_path / "mw")[0].args.safesig
    assert safesig["min_window"] == 8 and safesig["window_query"] is True
    assert "safesig" not in json.loads((adapters / ADAPTER_CONFIG).read_text())

    (tuned / ADAPTER_CONFIG).write_text(json.dumps({**config, "safesig": {"windw": 0.8}}))
    with pytest.raises(SafesigError, match="unknown safesig setting 'windw'"):
        load(base, adapter_path=tuned)


def test_num_layers_zero_trains_only_the_cls_row_and_head(tmp_path, tokenizer):
    """--num-layers 0: no LoRA at all (mlx-lm's ``layers[-0:]`` would put it on every block);
    the adapters reload and fuse to a model whose blocks are the base's, bit for bit."""
    from mlx.utils import tree_flatten

    from mlx_safesig.adapters import SAFETY_KEYS, add_lora
    from mlx_safesig.model import SafesigError
    from mlx_safesig.train import prepare_model

    model = make_model()
    assert prepare_model(model, TrainConfig(num_layers=0)) == 0
    assert set(dict(tree_flatten(model.trainable_parameters()))) == set(SAFETY_KEYS)
    for bad in (-2, len(make_model().layers) + 1):
        with pytest.raises(SafesigError, match="--num-layers must be -1 .all., 0 .none. or up to"):
            add_lora(make_model(), bad, {"rank": 2, "scale": 1.0, "dropout": 0.0})

    base = write_model_dir(tmp_path / "base", make_model(), tokenizer)
    data = write_data(tmp_path / "data", synthetic(8, 0), synthetic(4, 1))
    result = CliRunner().invoke(main, [
        "train", "--model", str(base), "--data", str(data), "--adapter-path", str(tmp_path / "ad"),
        "--iters", "2", "--batch-size", "4", "--num-layers", "0"])
    assert result.exit_code == 0, result.output
    assert "on 0 layers" in result.stderr
    cls_and_head = sum(v.size for k, v in tree_flatten(model.trainable_parameters()))
    assert f"({cls_and_head:,} trainable parameters)" in result.stderr
    assert mx.load(str(tmp_path / "ad" / "adapters.safetensors")) == {}
    fused, _ = load(fuse(base, tmp_path / "ad", tmp_path / "fused"))
    plain, _ = load(base)
    blocks = dict(tree_flatten([layer.parameters() for layer in plain.layers]))
    fused_blocks = tree_flatten([layer.parameters() for layer in fused.layers])
    assert len(fused_blocks) == len(blocks) > 0
    for name, w in fused_blocks:
        assert mx.array_equal(w, blocks[name]).item(), name
    bad = CliRunner().invoke(main, [
        "train", "--model", str(base), "--data", str(data), "--adapter-path", str(tmp_path / "b"),
        "--iters", "1", "--num-layers", "-3"])
    assert bad.exit_code != 0 and "Traceback" not in bad.output
    assert "--num-layers must be -1 (all), 0 (none) or up to" in bad.output


def test_full_fine_tune_trains_whole_blocks_and_fuses_to_what_it_trained(tmp_path, tokenizer):
    """--fine-tune-type full: the last --num-layers blocks train whole (no LoRA), the others and
    the embeddings stay the base's; the adapters reload and fuse to the trained weights exactly."""
    from mlx.utils import tree_flatten

    from mlx_safesig.adapters import SAFETY_KEYS
    from mlx_safesig.train import prepare_model

    model = make_model()
    n = len(model.layers)
    assert prepare_model(model, TrainConfig(num_layers=1, fine_tune_type="full")) == 1
    last = {f"layers.{n - 1}.{k}" for k, _ in tree_flatten(model.layers[-1].parameters())}
    trainable = set(dict(tree_flatten(model.trainable_parameters())))
    assert trainable == {f"model.{k}" for k in last} | set(SAFETY_KEYS)

    base = write_model_dir(tmp_path / "base", make_model(), tokenizer)
    data = write_data(tmp_path / "data", synthetic(8, 0), synthetic(4, 1))
    result = CliRunner().invoke(main, [
        "train", "--model", str(base), "--data", str(data), "--adapter-path", str(tmp_path / "ad"),
        "--iters", "2", "--batch-size", "4", "--num-layers", "1", "--fine-tune-type", "full"])
    assert result.exit_code == 0, result.output
    assert "full fine-tune of 1 layers" in result.stderr
    saved = mx.load(str(tmp_path / "ad" / "adapters.safetensors"))
    assert set(saved) == {f"model.{k}" for k in last}
    config = json.loads((tmp_path / "ad" / ADAPTER_CONFIG).read_text())
    assert config["fine_tune_type"] == "full" and config["num_layers"] == 1

    plain, _ = load(base, lazy=True)  # lazy: projections unfused, names as trained
    fused, _ = load(fuse(base, tmp_path / "ad", tmp_path / "fused"), lazy=True)
    before = dict(tree_flatten(plain.parameters()))
    after = dict(tree_flatten(fused.parameters()))
    assert set(before) == set(after)
    changed = {k for k in before if not mx.array_equal(before[k], after[k]).item()}
    assert changed and changed <= set(saved) | set(SAFETY_KEYS)
    for name in saved:
        assert mx.array_equal(after[name], saved[name]).item(), name
    from mlx_safesig.model import SafesigError

    (tmp_path / "ad" / ADAPTER_CONFIG).write_text(json.dumps({**config, "fine_tune_type": "dora"}))
    with pytest.raises(SafesigError, match=r"fine_tune_type 'dora' is not supported .lora, full.\.$"):
        load(base, adapter_path=tmp_path / "ad")
