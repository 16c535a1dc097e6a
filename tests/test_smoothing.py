"""Randomized smoothing of the query verdict (``SafetyConfig.smooth_copies``, ``smoothing.py``):
the copies change only query tokens and are a function of the prompt, the smoothed verdict is
the mean of each copy's own verdict (one chunk or several), generation starts from it (one row,
a batch, the CLI), and detection and the evaluation read the same number."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_model, write_model_dir

from mlx_safesig import SafeBatchGenerator, SafetyConfig, stream_generate
from mlx_safesig import prefill as prefill_module
from mlx_safesig import smoothing as smoothing_module
from mlx_safesig.cli import main
from mlx_safesig.decoding import config_fingerprint
from mlx_safesig.generate import _verdict_input, score, smoothed_scores
from mlx_safesig.prefill import prefill_with_verdict
from mlx_safesig.prompt import prepare_prompt, wrap_tokenizer
from mlx_safesig.smoothing import Smoother, perturbed_copies, printable_tokens, smoothed_verdict

CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Tell me a story about a robot and a cat"}]


def test_copies_change_only_query_tokens_and_depend_on_the_prompt_alone(tokenizer):
    model = make_model()
    prepared = prepare_prompt(wrap_tokenizer(tokenizer), CHAT)
    ids, slots = prepared.ids, prepared.query_slots
    pool = printable_tokens(model, tokenizer)
    a = perturbed_copies(ids, slots, pool, 16, 0.3)
    assert a.shape == (16, len(ids))
    others = [i for i in range(len(ids)) if i not in set(slots)]
    assert (a[:, others] == np.array(ids)[others]).all()  # template and system untouched
    changed = a[:, slots] != np.array(ids)[slots]
    assert 0.15 < changed.mean() < 0.45  # about the rate
    assert set(a[:, slots][changed].tolist()) <= set(pool.tolist())
    assert (perturbed_copies(ids, slots, pool, 16, 0.3) == a).all()  # same prompt, same draw
    moved = perturbed_copies(ids[:-1] + [ids[-1] + 1], slots, pool, 16, 0.3)
    assert not (moved[:, slots] == a[:, slots]).all()  # another prompt, another draw


@pytest.mark.parametrize("step", [2048, 6])
def test_the_smoothed_verdict_is_the_mean_of_each_copys_own_verdict(tokenizer, monkeypatch, step):
    model = make_model()
    ids, slots = _verdict_input(model, wrap_tokenizer(tokenizer), CHAT)
    pool = printable_tokens(model, tokenizer)
    want = [prefill_with_verdict(model, row.tolist(), model.make_cache(), slots)[1].item()
            for row in perturbed_copies(ids, slots, pool, 5, 0.2)]
    monkeypatch.setattr(prefill_module, "PREFILL_STEP", step)
    monkeypatch.setattr(smoothing_module, "PREFILL_STEP", step)
    mean, ps = smoothed_verdict(model, ids, slots, pool, 5, 0.2)
    np.testing.assert_allclose(ps, want, atol=1e-5)
    assert mean == pytest.approx(np.mean(want), abs=1e-6)
    assert len(set(np.round(want, 5))) > 1  # the copies do differ
    with pytest.raises(Exception, match="at least one copy"):
        smoothed_verdict(model, ids, slots, pool, 0, 0.2)


def events(model, tokenizer, messages, **safety):
    results = list(stream_generate(model, tokenizer, messages, 6,
                                   safety=SafetyConfig(schedule="each", **safety)))
    return [r.token for r in results], [e for r in results for e in r.safety.events]


def test_generation_starts_from_the_smoothed_verdict(tokenizer):
    model = make_model(head_bias=0.0)
    plain = score(model, tokenizer, CHAT)
    smooth = smoothed_scores(model, tokenizer, [CHAT], 8, 0.3)[0]
    assert abs(smooth - plain) > 1e-4
    _, ev = events(model, tokenizer, CHAT, smooth_copies=8, smooth_rate=0.3, threshold=0.999)
    assert ev[0].kind == "probe" and ev[0].p == pytest.approx(smooth, abs=1e-5)
    # a threshold between the two verdicts: only the one generation starts from decides
    lo, hi = sorted([plain, smooth])
    cut = (lo + hi) / 2
    quiet = dict(threshold=cut, window_threshold=0.999)  # only the query verdict can insert
    _, ev = events(model, tokenizer, CHAT, smooth_copies=8, smooth_rate=0.3, **quiet)
    assert ("refusal-inserted" in [e.kind for e in ev]) == (smooth >= cut)
    _, ev_plain = events(model, tokenizer, CHAT, **quiet)
    assert ("refusal-inserted" in [e.kind for e in ev_plain]) == (plain >= cut)
    assert events(model, tokenizer, CHAT, smooth_copies=0, threshold=0.999) == events(
        model, tokenizer, CHAT, threshold=0.999)  # 0 copies: off


def test_a_batch_smooths_each_row_as_alone(tokenizer):
    model = make_model()
    chats = [CHAT, [{"role": "user", "content": "Write a poem about the sea"}]]
    safety = SafetyConfig(schedule="each", threshold=0.999, smooth_copies=4)
    engine = SafeBatchGenerator(model, tokenizer, safety)
    uids = engine.insert(chats, 5)
    first = {}
    while engine.rows or engine.joining:
        for s in engine.next():
            first.setdefault(s.uid, s.safety.query_p)
    want = smoothed_scores(model, tokenizer, chats, 4, 0.1)
    assert [first[u] for u in uids] == pytest.approx(want, abs=1e-5)


def test_config_defaults_validation_and_fingerprint():
    model = make_model()
    assert SafetyConfig().resolved({}).smooth_copies == 0
    model.args.safesig.update(smooth_copies=6, smooth_rate=0.2)
    resolved = SafetyConfig().resolved(model.args.safesig)
    assert (resolved.smooth_copies, resolved.smooth_rate) == (6, 0.2)
    assert config_fingerprint(resolved)["smooth_copies"] == 6
    assert "smooth_copies" not in config_fingerprint(SafetyConfig().resolved({}))
    with pytest.raises(ValueError, match="smooth_copies must be 0 or more"):
        SafetyConfig(smooth_copies=-1)
    with pytest.raises(ValueError, match="smooth_rate must be between 0 and 1"):
        SafetyConfig(smooth_rate=1.0)


def test_the_smoother_keeps_its_pool_and_the_cache_keeps_smoothed_apart(tokenizer):
    model = make_model()
    smoother = Smoother(model, tokenizer)
    assert smoother.pool is smoother.pool
    cache = {}
    got = smoothed_scores(model, tokenizer, [CHAT], 4, 0.1, cache=cache, smoother=smoother)
    assert list(cache) and all(k.endswith("|smooth4@0.1") for k in cache)
    cache[next(iter(cache))] = 0.123
    assert smoothed_scores(model, tokenizer, [CHAT], 4, 0.1, cache=cache) == [0.123]
    assert got[0] != 0.123


def test_the_cli_carries_smoothing(tokenizer, tmp_path):
    model = make_model()
    path = write_model_dir(tmp_path / "m", model, tokenizer)
    messages = [{"role": "user", "content": "Tell me a story"}]
    want = smoothed_scores(model, tokenizer, [messages], 3, 0.5)[0]
    r = CliRunner().invoke(main, ["generate", "--model", str(path), "-p", "Tell me a story",
                                  "-m", "2", "--threshold", "0.999", "--smooth-copies", "3",
                                  "--smooth-rate", "0.5", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["events"][0]["p"] == pytest.approx(want, abs=1e-4)
    r = CliRunner().invoke(main, ["generate", "--model", str(path), "-p", "x",
                                  "--smooth-rate", "1.5"])
    assert r.exit_code == 1 and "--smooth-rate" in r.output and "Traceback" not in r.output


def attackable_smoothed(tokenizer):
    from test_adaptive import attackable

    return attackable(tokenizer)


def test_an_attack_on_the_smoothed_verdict_reports_the_p_generation_starts_from(tokenizer):
    from test_adaptive import MESSAGES, SMALL

    from mlx_safesig.eval.adaptive import Attack, AttackSettings, allowed_tokens
    from mlx_safesig.eval.adaptive_suite import query_p

    net = attackable_smoothed(tokenizer)
    cfg = SafetyConfig(smooth_copies=4, smooth_rate=0.2).resolved(net.args.safesig)
    attack = Attack(net, tokenizer, cfg, AttackSettings(objective="verdict", **SMALL),
                    [MESSAGES], allowed_tokens(net, tokenizer), seed=0)
    res = attack.run()
    assert res.trace[-1] < res.trace[0]  # the smoothed loss went down
    suffixed = attack.targets[0].prompt.with_suffix(res.suffix)
    want = smoothed_scores(net, tokenizer, [suffixed], 4, 0.2)[0]
    assert res.ps[0] == pytest.approx(want, abs=1e-4)
    assert query_p(net, tokenizer, suffixed, cfg) == pytest.approx(want, abs=1e-6)
    _, ev = events(net, tokenizer, suffixed, smooth_copies=4, smooth_rate=0.2)
    assert ev[0].p == pytest.approx(res.ps[0], abs=1e-4)  # what generation starts from
    assert score(net, tokenizer, suffixed) != pytest.approx(res.ps[0], abs=1e-3)  # not the plain


def test_the_smoothed_gradient_is_the_expected_loss_gradient(tokenizer):
    """On the one-hot of the current suffix, the gradient's row entries predict the smoothed loss
    change of a swap to first order: checked against finite differences in embedding space."""
    import mlx.core as mx
    from test_adaptive import MESSAGES

    from mlx_safesig.eval.adaptive import SuffixPrompt, allowed_tokens, initial_suffix, layout
    from mlx_safesig.eval.adaptive_smooth import smoothed_gradient, smoothed_losses

    net = attackable_smoothed(tokenizer)
    allowed = allowed_tokens(net, tokenizer)
    init = initial_suffix(tokenizer, allowed, 4)
    target = SuffixPrompt(tokenizer, MESSAGES, init)
    lay = layout(net, target, init, cut=min(target.slots))
    g = np.array(smoothed_gradient(net, lay, 4, target.slots, allowed, 3, 0.2).astype(mx.float32))
    assert g.shape == (4, net.model.embed_tokens.weight.shape[0]) and np.isfinite(g).all()
    loss, p, _ = smoothed_losses(net, lay, np.array([init]), target.slots, allowed, 3, 0.2)
    assert loss[0] == pytest.approx(np.log(max(p[0], 1e-30)), abs=1e-6)
    # the swap the gradient likes most lowers the loss more often than the one it likes least
    order = np.argsort(g[:, allowed], axis=1)
    best = np.array([init] * 4)
    worst = np.array([init] * 4)
    for i in range(4):
        best[i, i], worst[i, i] = allowed[order[i, 0]], allowed[order[i, -1]]
    lb, _, _ = smoothed_losses(net, lay, best, target.slots, allowed, 3, 0.2)
    lw, _, _ = smoothed_losses(net, lay, worst, target.slots, allowed, 3, 0.2)
    assert (lb < lw).sum() >= 3


def test_the_suite_refuses_smoothing_with_the_windows_objective(tokenizer, tmp_path):
    from test_adaptive import BENIGN, HARMFUL

    from mlx_safesig.eval.adaptive import AttackSettings
    from mlx_safesig.eval.adaptive_suite import run_adaptive

    net = make_model()
    cfg = SafetyConfig(smooth_copies=2).resolved(net.args.safesig)
    with pytest.raises(Exception, match="verdict objective"):
        run_adaptive(net, tokenizer, HARMFUL, BENIGN, cfg,
                     [AttackSettings(objective="windows", steps=2)], [2], tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_the_suite_attacks_and_judges_the_smoothed_verdict(tokenizer, tmp_path):
    from test_adaptive import BENIGN, HARMFUL

    from mlx_safesig.eval.adaptive import AttackSettings
    from mlx_safesig.eval.adaptive_suite import ROWS_FILE, query_p, run_adaptive, suffixed_messages
    from mlx_safesig.eval.detection import row_messages

    net = attackable_smoothed(tokenizer)
    cfg = SafetyConfig(smooth_copies=3, schedule="first").resolved(net.args.safesig)
    report = run_adaptive(net, tokenizer, HARMFUL[:1], BENIGN, cfg,
                          [AttackSettings(steps=6, batch=16, suffix_len=6, n_response=2)], [6],
                          tmp_path)
    assert "mean over 3 copies" in report["judge"]
    rows = [json.loads(x) for x in (tmp_path / ROWS_FILE).read_text().splitlines()[1:]]
    verdicts = {r["id"]: r["p"] for r in rows if r["kind"] == "verdict"}
    assert verdicts["h0"] == pytest.approx(query_p(net, tokenizer, row_messages(HARMFUL[0]), cfg))
    attack = next(r for r in rows if r["kind"] == "attack")
    suffixed = suffixed_messages(row_messages(HARMFUL[0]), attack["suffix"])
    assert attack["p"] == pytest.approx(query_p(net, tokenizer, suffixed, cfg), abs=1e-4)
    assert (attack["steps_to_success"] is not None) == (attack["p"] < 0.5)


def test_the_study_counts_plain_and_smoothed_verdicts(tokenizer, tmp_path):
    """``examples/smoothing_study.py``: the counts are those of ``score`` and ``smoothed_scores``
    on the split's rows and on an adaptive run's broken suffixes; no row text is printed."""
    from conftest import load_example, write_jsonl

    from mlx_safesig import load

    study = load_example("smoothing_study")
    model = make_model()
    path = write_model_dir(tmp_path / "m", model, tokenizer)
    data = tmp_path / "data"
    data.mkdir()
    texts = ["Tell me a story about a robot", "Write a poem about the sea",
             "What is the capital of France", "How do I bake bread at home"]
    write_jsonl(data / "harmful.dev.jsonl", [{"id": f"h{i}", "text": t, "source": "x_es" if i % 2
                                              else "y"} for i, t in enumerate(texts)])
    write_jsonl(data / "benign.dev.jsonl", [{"id": "b0", "text": "Tell me a story", "source": "z"}])
    run = tmp_path / "run"
    run.mkdir()
    write_jsonl(run / "adaptive.rows.jsonl", [
        {"fingerprint": {}},
        {"kind": "attack", "id": "h0", "suffix": " sea cat", "steps_to_success": 3},
        {"kind": "attack", "id": "h1", "suffix": " robot", "steps_to_success": None}])
    net, tok = load(str(path))
    chats = {t: [{"role": "user", "content": t}] for t in texts + ["Tell me a story"]}
    plain = {t: score(net, tok, m) for t, m in chats.items()}
    smooth = {t: s for t, s in zip(chats, smoothed_scores(net, tok, list(chats.values()), 3, 0.3))}
    ordered = sorted(smooth.values())
    threshold = (ordered[1] + ordered[2]) / 2
    cfg = json.loads((path / "config.json").read_text())
    cfg.setdefault("safesig", {})["threshold"] = threshold
    (path / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "study.json"
    study.main(["--model", str(path), "--data", str(data), "--run", str(run), "--suites",
                "plain", "--copies", "3", "--rate", "0.3", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["threshold"] == pytest.approx(threshold)
    assert report["suffixes"]["broken"] == 1
    with_suffix = [{"role": "user", "content": texts[0] + " sea cat"}]
    assert report["suffixes"]["p_with_suffix"]["smoothed"] == [
        pytest.approx(smoothed_scores(net, tok, [with_suffix], 3, 0.3)[0], abs=1e-4)]
    groups = report["detection"]["plain"]["groups"]
    english = [texts[0], texts[2]]
    assert groups["harmful en"] == {"n": 2, "plain": sum(plain[t] >= threshold for t in english),
                                    "smoothed": sum(smooth[t] >= threshold for t in english)}
    assert groups["harmful es/fr"]["n"] == 2 and groups["benign en"]["n"] == 1
