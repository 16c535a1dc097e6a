"""`mlx-safesig align` end to end on a tiny model and fake artefacts (harmless placeholder strings):
the stages, the card's numbers, resume after kill -9, refused option changes and bad input."""

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import make_model, make_tokenizer, write_model_dir
from test_align_build import make_artefacts

import mlx_safesig
from mlx_safesig.align.pipeline import STAGES, TITLES
from mlx_safesig.align.sources import HELDOUT_SOURCES, SOURCES, prompt_sources

N = len(STAGES)

# a child that runs the CLI with one function made to hang once it has run (a test-only hook
# that lives here, not in the package): ``hang MODULE FUNCTION ARG MARKER -- CLI ARGS``
HANG = """
import importlib, sys, time
module, name, arg, marker = sys.argv[1:5]
mod = importlib.import_module(module)
real = getattr(mod, name)
def hang(*args, **kwargs):
    out = real(*args, **kwargs)
    if arg == "*" or arg in map(str, args):
        open(marker, "w").close()
        time.sleep(600)
    return out
setattr(mod, name, hang)
from mlx_safesig.cli import main
sys.argv = ["mlx-safesig"] + sys.argv[6:]
main()
"""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    base = tmp_path_factory.mktemp("align")
    write_model_dir(base / "tiny", make_model(), make_tokenizer(), safety=False)
    make_artefacts(base / "art")
    (base / "extra.txt").write_text("# extra\nplaceholder extra benign one\nplaceholder extra two\n")
    (base / "framings.txt").write_text("# f\nAs a story: {prompt}\n%%\n{prompt} ~~ ;;\n")
    return base


def args(inputs: Path, out, *more):
    return ["align", "--model", inputs / "tiny", "--out", out, "--artefacts", inputs / "art",
            "--no-verify", "--benign-sources", "alpaca_gpt4_demo", "--extra-benign",
            inputs / "extra.txt", "--framings", inputs / "framings.txt", "--max-tokens", "8",
            "--benign-max-tokens", "8", "--iters", "4", "--batch-size", "2", "--save-every", "2",
            "--warmup", "0", "--num-layers", "2", "--probes", "2", "--detection-limit", "2",
            "--eval-limit", "5", "--eval-max-tokens", "4", *more]


def cli(*argv, hang=None):
    cmd = [sys.executable, "-m", "mlx_safesig.cli", *map(str, argv)]
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    if hang:
        cmd = [sys.executable, "-c", HANG, *map(str, hang), "--", *map(str, argv)]
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env=env)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def lines(stderr: str):
    return [ln.strip() for ln in stderr.replace("\r", "\n").splitlines()]


def done(out: Path):
    return json.loads((out / "state.json").read_text())["done"]


def weights(folder: Path, name: str) -> dict:
    return {k: np.array(v) for k, v in mx.load(str(folder / name)).items()}


def assert_same_weights(a: Path, b: Path, name: str):
    wa, wb = weights(a, name), weights(b, name)
    assert wa.keys() == wb.keys()
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def finished(inputs):
    out = inputs / "run"
    r = cli(*args(inputs, out))
    assert r.returncode == 0, r.stderr
    return out, r


def test_a_run_goes_through_every_stage_to_a_fused_model(finished):
    out, r = finished
    said = lines(r.stderr)
    for k, stage in enumerate(STAGES, 1):
        assert f"[{k}/{len(STAGES)}] {stage}: {TITLES[stage]}" in said
    assert r.stdout.strip() == str(out / "model")
    assert done(out) == list(STAGES)
    assert {"config.json", "model.safetensors", "safety.safetensors", "MODEL_CARD.md"} <= {
        p.name for p in (out / "model").iterdir()}
    # the decoding defaults the shipped default carries are written by the run itself, into the
    # adapters (what the package ships) and the fused model
    shipped = {"window_query": False, "keep_verdict": "flagged"}
    assert json.loads((out / "adapters" / "adapter_config.json").read_text())["safesig"] == shipped
    assert shipped.items() <= json.loads((out / "model" / "config.json").read_text())["safesig"].items()
    default = Path(mlx_safesig.__file__).parent / "default_adapter" / "adapter_config.json"
    assert json.loads(default.read_text())["safesig"] == shipped


def pct(count, n):
    return f"{count}/{n} ({100 * count / n:.1f}%)"


def test_the_card_names_sources_licenses_and_the_eval_results_numbers(finished):
    out, _ = finished
    card = (out / "model" / "MODEL_CARD.md").read_text()
    detection = json.loads((out / "eval" / "detection.json").read_text())
    results = json.loads((out / "eval" / "generation" / "results.json").read_text())
    assert f"Judge: {detection['judge']}, threshold 0.5" in card
    for suite, counts in detection["suites"].items():
        for src, s in counts["sources"].items():
            kind = "harmful" if s["label"] else "benign"
            assert f"| {suite} | `{src}` | {kind} | {pct(s['flagged'], s['n'])} |" in card
    assert "`mlx-safesig eval --suite direct,prefill,conversation --split heldout`" in card
    for suite in ("direct", "prefill", "conversation"):
        attacks = results["suites"][suite]["attacks"]
        per_source = [a for a in attacks if " / " in a]
        assert per_source  # the five held-out requests come from both harmful held-out sources
        for attack in per_source + ["direct" if suite == "direct" else "any"]:
            cell = attacks[attack]["on"]["kw-prefix+inserted"]
            name = f"`{attack.split(' / ')[1]}`" if " / " in attack else "all sources"
            off = attacks[attack]["off"]["kw-prefix+inserted"]
            assert (f"| {suite} | {name} | `kw-prefix+inserted` | {pct(off['count'], off['n'])} | "
                    f"{pct(cell['count'], cell['n'])} |") in card
    # trained-on sources with their licenses, the held-out ones named
    assert "| `alpaca_gpt4_demo` | benign | 2 | 1 | CC-BY-NC-4.0 (non-commercial) |" in card
    assert f"| `advbench` | harmful | 2 | 2 | {SOURCES['advbench'].license} |" in card
    assert all(f"`{s}` ({SOURCES[s].license})" in card for s in HELDOUT_SOURCES)
    assert "worst harmful source, plain: " in card and "## Intended use" in card
    assert "## Limits" in card and "sha256 NOT verified" in card
    assert "placeholder" not in card.casefold()  # counts only, never prompt text


def test_a_rerun_of_a_finished_run_skips_every_stage(finished, inputs):
    out, _ = finished
    before = (out / "model" / "model.safetensors").stat().st_mtime_ns
    r = cli(*args(inputs, out))
    assert r.returncode == 0, r.stderr
    said = lines(r.stderr)
    n = len(STAGES)
    assert [f"[{k}/{n}] {s}: done, skipped" for k, s in enumerate(STAGES, 1)] == said[:n]
    assert (out / "model" / "model.safetensors").stat().st_mtime_ns == before


def test_kill_9_during_training_and_a_rerun_continue_to_the_same_model(finished, inputs):
    out, marker = inputs / "killed", inputs / "killed.marker"
    child = cli(*args(inputs, out), hang=("mlx_safesig.train", "save_checkpoint", "2", marker))
    deadline = time.time() + 120
    while not marker.exists():
        assert child.poll() is None and time.time() < deadline, child.stderr and child.stderr.read()
        time.sleep(0.1)
    child.send_signal(signal.SIGKILL)  # after the step-2 checkpoint, training still running
    child.wait()
    assert done(out) == ["data", "rows"]
    r = cli(*args(inputs, out))
    assert r.returncode == 0, r.stderr
    said = lines(r.stderr)
    assert f"[1/{len(STAGES)}] data: done, skipped" in said
    assert f"[2/{len(STAGES)}] rows: done, skipped" in said
    assert f"resuming from the last checkpoint in {out / 'adapters'}" in said
    assert any(s.startswith("training 4 steps from step 2:") for s in said)
    reference = finished[0]
    for name in ("adapters.safetensors", "safety_adapter.safetensors"):
        assert_same_weights(out / "adapters", reference / "adapters", name)
    assert_same_weights(out / "model", reference / "model", "model.safetensors")
    assert (out / "model" / "MODEL_CARD.md").read_text() == (
        reference / "model" / "MODEL_CARD.md").read_text()


def test_an_eval_stage_killed_after_detection_keeps_it(finished, inputs):
    out = inputs / "eval-killed"
    shutil.copytree(finished[0], out)
    shutil.rmtree(out / "eval" / "generation")
    (out / "model" / "MODEL_CARD.md").unlink()
    state = json.loads((out / "state.json").read_text())
    state["done"] = state["done"][: state["done"].index("eval")]
    (out / "state.json").write_text(json.dumps(state))
    before = (out / "eval" / "detection.json").read_text()
    r = cli(*args(inputs, out))
    assert r.returncode == 0, r.stderr
    assert f"held-out detection: done ({out / 'eval' / 'detection.json'}), kept" in lines(r.stderr)
    assert (out / "eval" / "detection.json").read_text() == before
    assert (out / "eval" / "generation" / "results.json").is_file() and done(out) == list(STAGES)


def test_a_changed_option_is_refused_until_its_stage_is_restarted(finished, inputs):
    out = inputs / "changed"
    shutil.copytree(finished[0], out)
    state = (out / "state.json").read_text()
    r = cli(*args(inputs, out, "--lambda", "0.5"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"Error: --lambda is 0.5 but {out} was made with 0.3; use a new --out, or --restart-from "
        "train to redo train and the stages after it.")
    assert (out / "state.json").read_text() == state
    r = cli(*args(inputs, out, "--lambda", "0.5", "--max-tokens", "6", "--restart-from", "train"))
    assert r.returncode == 1  # restarting train does not make a rows option free
    assert r.stderr.strip().splitlines()[-1].startswith("Error: --max-tokens is 6 but ")
    r = cli(*args(inputs, out, "--lambda", "0.5", "--restart-from", "train"))
    assert r.returncode == 0, r.stderr
    said = lines(r.stderr)
    assert said[:3] == [f"[1/{N}] data: done, skipped", f"[2/{N}] rows: done, skipped",
                        f"[3/{N}] train: {TITLES['train']}"]
    assert json.loads((out / "state.json").read_text())["options"]["train"]["--lambda"] == 0.5
    assert "`--lambda 0.5`" in (out / "model" / "MODEL_CARD.md").read_text()


def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(finished, inputs):
    out = inputs / "full"
    shutil.copytree(finished[0], out)
    (out / "rows" / ".train.jsonl.tmp").symlink_to("/dev/full")  # every write: ENOSPC
    r = cli(*args(inputs, out, "--restart-from", "rows"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"Error: no space left on device while writing {out / 'rows'}")
    assert not (out / "rows" / "train.jsonl").exists()
    assert not (out / "rows" / ".train.jsonl.tmp").exists()
    assert not (out / "model").exists() and done(out) == ["data"]


@pytest.fixture(scope="module")
def no_template(inputs):
    tok = make_tokenizer()
    tok.chat_template = None
    return write_model_dir(inputs / "plain-lm", make_model(), tok, safety=False)


@pytest.mark.parametrize("change, message", [
    ({"--artefacts": "{empty}"}, "artefact pyrit-1.1.0-py3-none-any.whl not found in {empty}"),
    ({"--model": "{no_template}"}, "{no_template} has no chat template (tokenizer.chat_template is "
     "empty); align trains chat rows, so it needs an instruct model with a template."),
    ({"--benign-sources": "alpaca_gpt4_demo,senator_search"},
     "--benign-sources: senator_search is a held-out source (HELDOUT.md); it is never trained on."),
    ({"--benign-sources": "alpaca_gpt4_demo,nq_open"}, "--benign-sources: nq_open is an optional "
     "source; name it in --add-sources too, so the data stage builds it."),
    ({"--extra-benign": "{inputs}/missing.txt"}, "--extra-benign: no such file: {inputs}/missing.txt"),
])
def test_bad_input_is_one_line_exit_1_and_writes_nothing(inputs, no_template, tmp_path, change,
                                                         message):
    (tmp_path / "empty").mkdir()
    names = {"empty": tmp_path / "empty", "no_template": no_template, "inputs": inputs}
    argv = [str(a) for a in args(inputs, tmp_path / "out")]
    for option, value in change.items():
        argv[argv.index(option) + 1] = value.format(**names)
    r = cli(*argv)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == "Error: " + message.format(**names)
    assert not (tmp_path / "out").exists()


def test_train_sh_spells_out_aligns_defaults():
    """The script that rebuilds the default adapter is one align line whose options are align's
    defaults (the current recipe), so either can be read for the other."""
    import shlex

    from mlx_safesig.align.pipeline import Recipe

    root = Path(__file__).resolve().parent.parent
    text = (root / "examples" / "default_adapter" / "train.sh").read_text()
    line = text[text.index("\nmlx-safesig align") + 1:].replace("\\\n", " ").split('"$@"')[0]
    words = shlex.split(line)[4:]  # after: mlx-safesig align --out "$OUT"
    default, given = Recipe(), {}
    while words:
        option = words.pop(0)
        given[option] = True if option == "--give-refusal-prefix" else words.pop(0)
    assert len(given) == 21
    for option, value in given.items():
        field = {"--lambda": "lam"}.get(option, option[2:].replace("-", "_"))
        want = getattr(default, field)
        if field in ("extra_benign", "framings"):
            assert root / value == Path(want)
        else:
            assert type(want)(value) == want, option


def test_wrapped_shares_reach_the_rows_stage_and_are_recorded_with_it(tmp_path):
    from mlx_safesig.align.pipeline import Recipe, recorded_options, rows_options

    recipe = Recipe(wrapped_harmful=0.25, wrapped_benign=0.05)
    opts = rows_options(recipe, tmp_path)
    assert (opts.wrapped_harmful, opts.wrapped_benign) == (0.25, 0.05)
    assert opts.wrappers == tmp_path / "data" / "train_wrappers.jsonl"
    rows = recorded_options(recipe)["rows"]
    assert (rows["--wrapped-harmful"], rows["--wrapped-benign"]) == (0.25, 0.05)


def test_adversarial_training_options_reach_training_and_are_recorded_with_it(tmp_path):
    from mlx_safesig.align.pipeline import Recipe, Run, recorded_options

    recipe = Recipe(adv_epsilon=0.1, adv_steps=2)
    config = Run(recipe, tmp_path, tmp_path, log=lambda _: None).train_config()
    assert (config.adv_epsilon, config.adv_steps) == (0.1, 2)
    assert Run(recipe, tmp_path, tmp_path, log=lambda _: None).train_config(iters=5).adv_epsilon == 0.1
    train = recorded_options(recipe)["train"]
    assert (train["--adv-epsilon"], train["--adv-steps"]) == (0.1, 2)
    assert recorded_options(Recipe())["train"]["--adv-epsilon"] == 0.0  # off by default


def test_stop_after_ends_the_run_after_that_stage_and_the_same_command_goes_on(inputs, finished):
    out = inputs / "stopped"
    r = cli(*args(inputs, out, "--stop-after", "data"))
    assert r.returncode == 0, r.stderr
    assert done(out) == ["data"] and r.stdout.strip() == str(out)
    assert lines(r.stderr)[-1] == ("stopped after data (--stop-after); the same command without "
                                   "it goes on")
    r = cli(*args(inputs, out, "--stop-after", "data"))  # already there: nothing more runs
    assert r.returncode == 0 and done(out) == ["data"], r.stderr
    r = cli(*args(inputs, out, "--stop-after", "rows", "--answers-from", finished[0]))
    assert r.returncode == 0, r.stderr
    said = lines(r.stderr)
    assert f"[1/{len(STAGES)}] data: done, skipped" in said and done(out) == ["data", "rows"]
    assert not (out / "adapters").exists() and not (out / "model").exists()
    r = cli(*args(inputs, out, "--stop-after", "nosuch"))
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == (
        "Error: Invalid value for '--stop-after': 'nosuch' is not one of 'data', 'rows', 'train', "
        "'harden', 'fuse', 'eval', 'card'.")


# -- leave-one-source-out --------------------------------------------------------------------


@pytest.fixture(scope="module")
def left_out(finished, inputs):
    """A run that trains without advbench and the extra prompts, reusing the finished run's
    cached base-model answers."""
    out = inputs / "loso" / "advbench"
    r = cli(*args(inputs, out, "--leave-out", "advbench,edgy_extra", "--answers-from", finished[0],
                  "--detection-limit", "50"))  # every row of what it left out
    assert r.returncode == 0, r.stderr
    return out, r


def read_rows(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_a_leave_out_run_trains_without_the_source_and_scores_all_its_rows(left_out, finished):
    from mlx_safesig import load, score

    out, r = left_out
    said = lines(r.stderr)
    assert "left out of training: advbench, edgy_extra" in said
    assert not any(s.startswith("generated ") for s in said)  # the answers came from --answers-from
    trained = {str(row["source"]).rsplit(":", 1)[-1] for name in ("train.jsonl", "valid.jsonl")
               for row in read_rows(out / "rows" / name)}
    assert trained and not trained & {"advbench", "edgy_extra"}
    assert "alpaca_gpt4_demo" in trained  # the rest is still trained on
    report = json.loads((out / "eval" / "left-out.json").read_text())
    assert report["left_out"] == ["advbench", "edgy_extra"]
    plain = report["suites"]["plain"]["sources"]
    advbench = [row for row in read_rows(out / "data" / "harmful.jsonl") if row["source"] == "advbench"]
    assert plain["advbench"]["n"] == len(advbench) and {row["split"] for row in advbench} > {"train"}
    assert plain["edgy_extra"]["n"] == 2 and plain["edgy_extra"]["label"] == 0
    assert set(report["suites"]) == {"plain", "conversation"}
    assert not (out / "eval" / "detection.json").exists()  # no held-out evaluation in such a run
    model, tok = load(str(out / "model"))
    flagged = sum(score(model, tok, [{"role": "user", "content": row["text"]}]) >= 0.5
                  for row in advbench)
    assert plain["advbench"]["flagged"] == flagged
    card = (out / "model" / "MODEL_CARD.md").read_text()
    assert "leave-one-source-out study model, trained without `advbench`, `edgy_extra`" in card
    assert (f"| `advbench` | harmful | plain | {pct(flagged, len(advbench))} |") in card
    assert "the held-out sources were not evaluated" in card and "placeholder" not in card.casefold()
    assert "threshold 0.5; up to 50 rows per source and suite (by a hash of the id) of" in card


def test_the_loso_table_names_each_left_out_source_and_the_worst_of_each_label(left_out, inputs):
    out, _ = left_out
    r = cli("align", "--loso-table", inputs / "loso")
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "eval" / "left-out.json").read_text())
    s = report["suites"]["plain"]["sources"]["advbench"]
    assert f"| advbench | `advbench` | harmful | plain | {pct(s['flagged'], s['n'])} |" in r.stdout
    assert (f"- worst left-out harmful source (plain rows): `advbench` (run advbench), "
            f"{pct(s['flagged'], s['n'])} flagged") in r.stdout
    assert "- worst left-out benign source (plain rows): `edgy_extra` (run advbench)" in r.stdout
    assert "is tested on up to 50 rows per source and suite (by a hash of the id) of what" in r.stdout
    r = cli("align", "--loso-table", inputs / "run")
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith(
        f"Error: {inputs / 'run'} holds no leave-one-source-out run")


@pytest.mark.parametrize("value, message", [
    ("harmbench", "--leave-out: harmbench is a held-out source (HELDOUT.md): it is never trained "
     "on, so there is nothing to leave out."),
    ("nosuch", "--leave-out: unknown source 'nosuch'; choose from "),
    (",".join(prompt_sources(1, "train")),
     "--leave-out leaves out every harmful training source; leave out fewer."),
])
def test_a_bad_leave_out_is_one_line_and_writes_nothing(inputs, tmp_path, value, message):
    r = cli(*args(inputs, tmp_path / "out", "--leave-out", value))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("Error: " + message)
    assert not (tmp_path / "out").exists()


def test_a_run_made_before_an_option_existed_resumes_with_its_default(finished, inputs):
    out = inputs / "older"
    shutil.copytree(finished[0], out)
    state = json.loads((out / "state.json").read_text())
    del state["options"]["rows"]["--leave-out"]
    (out / "state.json").write_text(json.dumps(state))
    r = cli(*args(inputs, out))
    assert r.returncode == 0, r.stderr
    assert lines(r.stderr)[:N] == [f"[{k}/{N}] {s}: done, skipped" for k, s in enumerate(STAGES, 1)]
    r = cli(*args(inputs, out, "--leave-out", "advbench"))
    assert r.returncode == 1 and "--leave-out is 'advbench' but" in r.stderr


def test_translate_is_a_data_option_and_a_bad_one_writes_nothing(finished, inputs, tmp_path):
    out = inputs / "translated"
    shutil.copytree(finished[0], out)
    data = json.loads((out / "state.json").read_text())["options"]["data"]
    assert data["--translate"] == "" and data["--translate-share"] == 0.15
    r = cli(*args(inputs, out, "--translate-share", "0.5"))  # no language: the share shapes nothing
    assert r.returncode == 0 and f"[1/{N}] data: done, skipped" in lines(r.stderr), r.stderr
    r = cli(*args(inputs, out, "--translate", "es"))
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == (
        f"Error: --translate is 'es' but {out} was made with ''; use a new --out, or "
        "--restart-from data to redo data and the stages after it.")
    r = cli(*args(inputs, tmp_path / "out", "--translate", "de"))
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith(
        "Error: --translate de: Apertium has no English->German pair")
    empty = tmp_path / "empty"
    empty.mkdir()
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", PATH=str(empty))
    r = subprocess.run([sys.executable, "-m", "mlx_safesig.cli",
                        *map(str, args(inputs, tmp_path / "out", "--translate", "es"))],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith(
        "Error: --translate es needs Apertium's eng-spa mode: apt-get install apertium-eng-spa")
    assert not (tmp_path / "out").exists()


# -- adversarial hardening ---------------------------------------------------------------------

HARDEN = ("--harden-rounds", "2", "--harden-requests", "2", "--harden-steps", "3",
          "--harden-iters", "2")


@pytest.fixture(scope="module")
def hardened(finished, inputs):
    """The finished run, redone from its harden stage with two rounds; its head's bias raised
    so that the tiny model's verdict flags the requests (and GCG has something to attack)."""
    out = inputs / "hardened"
    shutil.copytree(finished[0], out)
    safety = out / "adapters" / "safety_adapter.safetensors"
    w = mx.load(str(safety))
    mx.save_safetensors(str(safety), dict(w, **{"cls_head.bias": w["cls_head.bias"] + 4.0}))
    r = cli(*args(inputs, out, *HARDEN, "--restart-from", "harden"))
    assert r.returncode == 0, r.stderr
    return out, r


def test_hardening_attacks_training_requests_and_trains_on_their_suffixes(hardened, inputs):
    from mlx_safesig import load, score
    from mlx_safesig.align.harden import REPLAY, plain

    out, r = hardened
    said = lines(r.stderr)
    assert f"[4/{N}] harden: {TITLES['harden']}" in said
    train = read_rows(out / "rows" / "train.jsonl")
    rounds = [read_rows(out / "harden" / f"round-{k}" / "attacks.jsonl") for k in (1, 2)]
    assert [len(a) for a in rounds] == [2, 2]
    for k, attacks in enumerate(rounds, 1):
        assert f"round {k}: attacked 2/2 training requests, " in " ".join(said)
        for a in attacks:
            row = train[a["index"]]
            assert row["label"] == 1 and plain(row)  # training rows only, plain harmful ones
            assert 0 < a["steps_run"] <= 3 and len(a["suffix_ids"]) == 12
            assert (a["steps_to_success"] is None) == (a["p"] >= 0.5)
    # a round-1 suffix gives the p it recorded against the train stage's adapters
    model, tok = load(str(inputs / "tiny"), adapter_path=str(out / "adapters"))
    a = rounds[0][0]
    messages = [dict(train[a["index"]]["messages"][0])]
    messages[0]["content"] += a["suffix"]
    assert abs(score(model, tok, messages) - a["p"]) < 1e-4
    # round 2 trains on both rounds' suffixed rows (labelled by the request) and replayed rows
    rows = read_rows(out / "harden" / "round-2" / "rows" / "train.jsonl")
    adversarial = [x for x in rows if str(x["source"]).endswith(":adversarial")]
    suffixes = {a["suffix"] for attacks in rounds for a in attacks}
    harmful = [x for x in adversarial if x["label"] == 1]
    assert len(harmful) == 4
    assert all(any(x["messages"][0]["content"].endswith(s) for s in suffixes) for x in adversarial)
    assert {x["messages"][0]["content"] for x in harmful} == {
        train[a["index"]]["messages"][0]["content"] + a["suffix"] for attacks in rounds for a in attacks}
    assert len(rows) - len(adversarial) == min(REPLAY * len(adversarial), len(train))
    assert "(lm " in " ".join(said) and any(s.startswith("training 2 steps from step 0:") for s in said)
    card = (out / "model" / "MODEL_CARD.md").read_text()
    for k, attacks in enumerate(rounds, 1):
        broken = [a["steps_to_success"] for a in attacks if a["steps_to_success"] is not None]
        median = f"{statistics.median(broken):g}" if broken else "-"
        assert f"| {k} | 2 | {len(broken)} | {median} |" in card
    assert "--harden-rounds 2" in card


def test_the_fused_model_is_the_last_rounds_and_a_killed_round_resumes(hardened, inputs, tmp_path):
    from mlx_safesig.fuse import fuse

    out, _ = hardened
    fuse(inputs / "tiny", out / "harden" / "round-2" / "adapters", tmp_path / "fused")
    assert_same_weights(out / "model", tmp_path / "fused", "safety.safetensors")
    fused, mine = weights(out / "model", "model.safetensors"), weights(tmp_path / "fused",
                                                                       "model.safetensors")
    assert all(np.allclose(fused[k], mine[k], atol=1e-6) for k in fused)  # BLAS threads: 1 ulp
    trained = weights(out / "adapters", "adapters.safetensors")
    hardened = weights(out / "harden" / "round-2" / "adapters", "adapters.safetensors")
    assert any(not np.allclose(trained[k], hardened[k]) for k in trained)
    # as if killed inside round 2's attacks: its adapters and last attack gone, harden not done
    again = inputs / "hardened-again"
    shutil.copytree(out, again)
    shutil.rmtree(again / "harden" / "round-2" / "adapters")
    shutil.rmtree(again / "harden" / "round-2" / "rows")
    for later in ("model", "eval"):
        shutil.rmtree(again / later)
    attacks = again / "harden" / "round-2" / "attacks.jsonl"
    attacks.write_text("".join(attacks.read_text().splitlines(keepends=True)[:1]))
    state = json.loads((again / "state.json").read_text())
    state["done"] = ["data", "rows", "train"]
    (again / "state.json").write_text(json.dumps(state))
    r = cli(*args(inputs, again, *HARDEN))
    assert r.returncode == 0, r.stderr
    said = " ".join(lines(r.stderr))
    assert "round 1: attacked" not in said and "round 2: attacked 2/2 training requests" in said
    for name in ("adapters.safetensors", "safety_adapter.safetensors"):
        assert_same_weights(again / "harden" / "round-2" / "adapters",
                            out / "harden" / "round-2" / "adapters", name)


def test_bad_harden_options_are_one_line_and_write_nothing(inputs, tmp_path):
    r = cli(*args(inputs, tmp_path / "x", "--harden-rounds", "-1"))
    assert r.returncode == 1 and not (tmp_path / "x").exists()
    assert "Invalid value for '--harden-rounds': -1 is not in the range x>=0." in r.stderr


@pytest.mark.parametrize("option,value,message", [
    ("--adv-epsilon", "-0.1", "Invalid value for '--adv-epsilon': -0.1 is not in the range x>=0."),
    ("--adv-steps", "0", "Invalid value for '--adv-steps': 0 is not in the range x>=1."),
])
def test_bad_adversarial_options_are_one_line_and_write_nothing(inputs, tmp_path, option, value,
                                                                message):
    r = cli(*args(inputs, tmp_path / "x", option, value))
    assert r.returncode == 1 and not (tmp_path / "x").exists()
    assert message in r.stderr
