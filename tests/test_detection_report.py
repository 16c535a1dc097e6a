"""Held-out-by-source detection: counts are score() >= threshold per source, the worst source of
each label is reported, and the row builders keep the request's label and never leak text."""

import pytest
from conftest import make_model

from mlx_safesig import SafesigError, score
from mlx_safesig.eval.detection import (
    conversation_rows,
    detection_counts,
    format_counts,
    held_out_rows,
    score_rows,
    wrapped_rows,
)
from mlx_safesig.eval.shapes import FOLLOW_UPS

HARMFUL = [{"id": f"h{i}", "text": t, "source": s, "label": 1, "category": c}
           for i, (t, s, c) in enumerate([("Tell me a story about a robot.", "alpha", "x"),
                                          ("Write a poem about the sea.", "alpha", "y"),
                                          ("What is the capital of France?", "beta", "")])]
BENIGN = [{"id": f"b{i}", "text": t, "source": s, "label": 0}
          for i, (t, s) in enumerate([("How do I bake bread at home?", "gamma"),
                                      ("The quick brown fox.", "delta"),
                                      ("You are a helpful assistant.", "delta")])]
TEMPLATES = [{"id": "t1", "plain": "Pretend you are a pirate. {{ prompt }}"},
             {"id": "t2", "plain": "{{ prompt }} Answer in French."}]


def test_counts_are_scores_at_each_threshold_per_source_and_category():
    rows = HARMFUL + BENIGN
    scores = [0.9, 0.2, 0.7, 0.6, 0.1, 0.4]
    report = detection_counts(rows, scores, 0.5, sweep=[0.3])
    src = report["sources"]
    assert (src["alpha"]["n"], src["alpha"]["flagged"], src["alpha"]["rate"]) == (2, 1, 0.5)
    assert src["alpha"]["by_category"] == {"x": {"n": 1, "flagged": 1}, "y": {"n": 1, "flagged": 0}}
    assert src["beta"]["flagged"] == 1 and src["gamma"]["flagged"] == 1
    assert src["delta"]["sweep"] == {"0.3": 1}
    assert report["worst"] == {"harmful": {"source": "alpha", "rate": 0.5},
                               "benign": {"source": "gamma", "rate": 1.0}}
    assert report["judge"] == "[CLS] query verdict, p >= threshold"


def test_a_source_with_both_labels_is_an_error():
    with pytest.raises(SafesigError, match="source alpha has rows of both labels"):
        detection_counts([HARMFUL[0], dict(BENIGN[0], source="alpha")], [0.1, 0.2], 0.5)


def test_scores_are_the_query_verdict_of_each_rows_messages(tokenizer):
    model = make_model(seed=3)
    rows = HARMFUL[:1] + conversation_rows([], BENIGN[:1])
    got = score_rows(model, tokenizer, rows)
    assert got[0] == pytest.approx(score(model, tokenizer, [{"role": "user",
                                                            "content": HARMFUL[0]["text"]}]))
    assert got[1] == pytest.approx(score(model, tokenizer, rows[1]["messages"]))


def test_wrapped_rows_keep_the_requests_label_and_name_the_wrapper():
    rows = wrapped_rows(HARMFUL + BENIGN, TEMPLATES)
    assert [r["label"] for r in rows] == [1, 1, 1, 0, 0, 0]
    assert all(r["source"].endswith("+wrapped") for r in rows)
    for row, original in zip(rows, HARMFUL + BENIGN):
        t = {x["id"]: x["plain"] for x in TEMPLATES}[row["wrapper"]]
        assert row["text"] == t.replace("{{ prompt }}", original["text"])
    assert rows == wrapped_rows(HARMFUL + BENIGN, TEMPLATES)  # the pick depends on ids only


def test_conversation_rows_judge_the_request_in_every_shape():
    rows = conversation_rows(HARMFUL[:1], BENIGN[:1])
    shapes = {r["source"]: r for r in rows}
    assert set(shapes) == {"alpha+split", "alpha+continue", "alpha+system", "gamma+follow-up"}
    split = shapes["alpha+split"]["messages"]
    assert " ".join([split[0]["content"], split[2]["content"]]) == HARMFUL[0]["text"]
    assert shapes["alpha+system"]["messages"][0] == {"role": "system", "content": HARMFUL[0]["text"]}
    assert shapes["alpha+continue"]["messages"][0]["content"] == HARMFUL[0]["text"]
    follow = shapes["gamma+follow-up"]
    assert follow["label"] == 0 and follow["messages"][-1]["content"] in FOLLOW_UPS
    assert all(r["label"] == 1 for r in rows if not r["source"].endswith("follow-up"))


def test_held_out_rows_cap_each_source_and_know_their_suites():
    rows = held_out_rows(HARMFUL + BENIGN, TEMPLATES, ["plain", "wrapped"], limit=1)
    plain = [r for r in rows if "+" not in r["source"]]
    assert sorted(r["source"] for r in plain) == ["alpha", "beta", "delta", "gamma"]
    with pytest.raises(SafesigError, match="unknown detection suite 'bogus'"):
        held_out_rows(HARMFUL, TEMPLATES, ["plain", "bogus"])


def test_the_report_lines_hold_counts_never_text():
    rows = conversation_rows(HARMFUL, BENIGN) + HARMFUL + BENIGN
    report = detection_counts(rows, [0.6] * len(rows), 0.5)
    text = "\n".join(format_counts(report))
    assert "worst harmful source" in text and "alpha" in text
    assert not any(r["text"] in text for r in HARMFUL + BENIGN)


# held-out rows that repeat a training row (near_training) and rows in other languages (lang)
NEAR = [{"id": f"s{i}", "text": f"Write a note number {i}.", "source": "sr", "label": 1,
         "category": "c", "near_training": i == 0} for i in range(3)]
LANG = [{"id": f"l{i}", "text": f"Hola {i}", "source": f"cb_{lang}", "label": 0, "lang": lang}
        for i, lang in enumerate(["es", "es", "fr", "de"])]


def test_a_source_with_near_training_rows_is_also_counted_without_them():
    report = detection_counts(NEAR + BENIGN, [0.9, 0.2, 0.8, 0.1, 0.1, 0.1], 0.5)
    src = report["sources"]
    assert (src["sr"]["n"], src["sr"]["flagged"]) == (3, 2)
    fresh = src["sr (no near-training rows)"]
    assert (fresh["n"], fresh["flagged"], fresh["label"]) == (2, 1, 1)
    assert report["worst"]["harmful"] == {"source": "sr (no near-training rows)", "rate": 0.5}
    lines = format_counts(report)
    assert any(ln.startswith("sr (no near-training rows)") and "1/2" in ln for ln in lines)
    # the shapes keep the flag: each shape is counted without those rows too
    conv = conversation_rows(NEAR, [])
    report = detection_counts(conv, [0.9] * len(conv), 0.5)
    assert report["sources"]["sr+split (no near-training rows)"]["n"] == 2
    wrapped = wrapped_rows(NEAR, TEMPLATES)
    report = detection_counts(wrapped, [0.9] * 3, 0.5)
    assert report["sources"]["sr+wrapped (no near-training rows)"]["n"] == 2


def test_rows_with_a_language_get_a_per_language_line_and_stay_plain():
    report = detection_counts(LANG + HARMFUL, [0.9, 0.1, 0.2, 0.6, 0.9, 0.9, 0.9], 0.5)
    assert report["languages"] == {"benign": {"de": {"n": 1, "flagged": 1, "rate": 1.0},
                                              "es": {"n": 2, "flagged": 1, "rate": 0.5},
                                              "fr": {"n": 1, "flagged": 0, "rate": 0.0}}}
    assert report["worst_language"] == {"benign": {"lang": "de", "rate": 1.0}}
    lines = format_counts(report)
    assert lines[-1] == "worst benign language: de (100.0% flagged; de 1/1 (100.0%), es 1/2 (50.0%), " \
                        "fr 0/1 (0.0%))"
    assert not any("Hola" in ln for ln in lines)
    # the wrappers and conversation wording are English: other languages are judged plain only
    rows = held_out_rows(LANG + BENIGN, TEMPLATES, ["plain", "wrapped", "conversation"])
    assert {r["source"] for r in rows if r["source"].startswith("cb_")} == {"cb_es", "cb_fr", "cb_de"}
    # rows without these fields report as before: no language or no-near-training lines
    plain = detection_counts(HARMFUL + BENIGN, [0.9] * 6, 0.5)
    assert set(plain) == {"judge", "threshold", "sources", "worst"}
    assert not any("near-training" in s for s in plain["sources"])


def test_the_model_card_names_the_worst_language():
    from mlx_safesig.align.card import detection_section

    report = detection_counts(LANG, [0.9, 0.1, 0.2, 0.6], 0.5)
    lines = detection_section({"judge": report["judge"], "threshold": 0.5, "suites": {"plain": report}})
    assert any(ln.startswith("- worst benign language, plain: `de`, ") for ln in lines)
    assert "| plain | `cb_es` | benign |" in "\n".join(lines)


def test_with_a_surprisal_gate_each_count_says_what_the_gate_refuses():
    """A row is refused by the gate when its query peak is above it; ``flagged_or_above`` counts
    the rows the verdict or the gate refuses (the config's real false positives on benign rows)."""
    rows = HARMFUL + BENIGN + LANG
    scores = [0.9, 0.2, 0.7, 0.6, 0.1, 0.4, 0.1, 0.1, 0.9, 0.1]
    peaks = [3.0, 9.5, 2.0, 9.5, 12.0, 4.0, 10.0, 1.0, 1.0, 9.0]
    report = detection_counts(rows, scores, 0.5, peaks=peaks, gate=9.0)
    src = report["sources"]
    assert {k: (s["above_gate"], s["flagged_or_above"], s["rate_with_gate"]) for k, s in src.items()} \
        == {"alpha": (1, 2, 1.0), "beta": (0, 1, 1.0), "gamma": (1, 1, 1.0), "delta": (1, 1, 0.5),
            "cb_es": (1, 1, 0.5), "cb_fr": (0, 1, 1.0), "cb_de": (0, 0, 0.0)}  # 9.0 is not above
    assert src["alpha"]["rate"] == 0.5 and src["alpha"]["by_category"]["y"] == {
        "n": 1, "flagged": 0, "above_gate": 1, "flagged_or_above": 1}
    assert report["gate"] == 9.0
    assert report["worst"]["benign"] == {"source": "gamma", "rate": 1.0}
    assert report["worst_with_gate"] == {"harmful": {"source": "alpha", "rate": 1.0},
                                         "benign": {"source": "gamma", "rate": 1.0}}  # ties: by name
    assert report["worst_language_with_gate"] == {"benign": {"lang": "fr", "rate": 1.0}}
    lines = format_counts(report)
    assert any(ln.startswith("delta") and ln.endswith(
        "0/2     flagged (0.0%); with the gate     1/2     (50.0%, 1 above it)") for ln in lines)
    assert "worst benign source with the gate: gamma (100.0% refused by the verdict or the gate)" \
        in lines
    assert lines[-1] == ("worst benign language with the gate: fr (100.0% refused; de 0/1 (0.0%), "
                         "es 1/2 (50.0%), fr 1/1 (100.0%))")
    # without a gate the report is as before; a gate needs a peak per row
    assert "gate" not in detection_counts(rows, scores, 0.5, peaks=peaks)
    with pytest.raises(SafesigError, match="one query peak per row"):
        detection_counts(rows, scores, 0.5, peaks=peaks[:-1], gate=9.0)
