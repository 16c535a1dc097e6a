"""The strategic-decoding state machine (SPEC §3-4), table-driven with scripted probe verdicts."""

import pytest

from mlx_safesig.decoding import SafetyConfig, SafetyMonitor, annealing_interval, scheduled

CFG = dict(threshold=0.5, tau=3, r1=4, r2=3, r3=2, schedule="each")


def run(script, p0=0.1, n_prefill=0, **cfg):
    """Feed p0 then one scripted probe per response index; return (insert index, rollback, kinds)."""
    monitor = SafetyMonitor(SafetyConfig(**{**CFG, **cfg}), n_prefill=n_prefill)
    d = monitor.start(p0)
    kinds = [e.kind for e in d.events]
    if d.insert:
        return "query", None, kinds
    for t, p in enumerate(script):
        d = monitor.observe(t, p)
        kinds += [e.kind for e in d.events if e.kind != "probe"]
        if d.insert:
            return t, d.rollback_to, kinds
    return None, None, kinds


@pytest.mark.parametrize(
    "script, tau, expected",
    [
        ([0.1, 0.9, 0.9, 0.9, 0.1], 3, 3),  # tau consecutive malicious probes insert
        ([0.9, 0.9, 0.1, 0.9, 0.9, 0.9], 3, 5),  # a benign verdict resets the count
        ([0.1, 0.9], 1, 1),  # tau = 1 inserts on the first malicious probe
        ([0.9, 0.9, 0.1, 0.9], 3, None),  # never three in a row
    ],
)
def test_tau_consecutive_malicious_probes_insert(script, tau, expected):
    assert run(script, tau=tau)[0] == expected


def test_threshold_edge_counts_as_malicious():
    assert run([0.5, 0.5, 0.5])[0] == 2
    assert run([0.4999, 0.4999, 0.4999, 0.4999])[0] is None


def test_query_verdict_malicious_inserts_at_once():
    assert run([0.0] * 5, p0=0.7)[0] == "query"
    assert run([0.0] * 5, p0=0.5)[0] == "query"
    assert run([0.0] * 5, p0=0.49)[0] is None


def test_at_most_one_insertion():
    monitor = SafetyMonitor(SafetyConfig(**CFG))
    monitor.start(0.1)
    inserts = [monitor.observe(t, 0.99).insert for t in range(10)]
    assert inserts == [False, False, True] + [False] * 7


def test_flip_and_clear_events():
    _, _, kinds = run([0.9, 0.2, 0.9, 0.9, 0.9])
    assert kinds == ["probe", "flip", "flip-cleared", "flip", "refusal-inserted"]


def test_rollback_returns_to_the_flip_step():
    assert run([0.1, 0.1, 0.9, 0.9, 0.9], rollback=True)[:2] == (4, 2)
    assert run([0.1, 0.1, 0.9, 0.9, 0.9], rollback=False)[:2] == (4, None)


def test_rollback_never_withdraws_prefilled_text():
    assert run([0.9, 0.9, 0.9], rollback=True, n_prefill=2)[:2] == (2, 2)


def windows(script, p0=0.1, special=None, **cfg):
    monitor = SafetyMonitor(SafetyConfig(**{**CFG, **cfg}))
    monitor.start(p0)
    special = special or [False] * len(script)
    out = []
    for t, p in enumerate(script):
        out.append(monitor.window(t, special))
        monitor.observe(t, p)
    return out


def test_rule2_window_is_latest_r2_tokens():
    w = windows([0.1] * 5)
    assert w == [(False, [0]), (False, [0, 1]), (False, [0, 1, 2]), (False, [1, 2, 3]),
                 (False, [2, 3, 4])]


def test_rule3_window_spans_flip_minus_r2_to_flip_plus_r3():
    # flip at t=3 (r2=3, r3=2): windows [1..3], then grow to 5 and stay
    w = windows([0.1, 0.1, 0.1, 0.9, 0.9, 0.1, 0.1, 0.1], tau=5)
    assert w[3] == (False, [1, 2, 3])
    assert w[4] == (False, [1, 2, 3, 4])
    assert w[5] == (False, [1, 2, 3, 4, 5])
    assert w[6] == (False, [4, 5, 6])  # flip cleared at t=5: back to rule 2


def test_rule1_window_is_query_plus_first_r1_tokens():
    monitor = SafetyMonitor(SafetyConfig(**CFG))
    monitor.start(0.9)
    assert monitor.window(2, [False] * 3) == (True, [0, 1, 2])
    assert monitor.window(9, [False] * 10) == (True, [0, 1, 2, 3])


def test_rule4_skips_special_tokens():
    special = [False, True, False, False, True]
    assert windows([0.1] * 5, special=special)[4] == (False, [2, 3])


def test_schedules():
    assert [scheduled("each", t) for t in range(3)] == [True] * 3
    assert [scheduled("first", t) for t in range(3)] == [False] * 3
    assert [t for t in range(12) if scheduled("periodic:4", t)] == [3, 7, 11]
    assert [annealing_interval(t) for t in (0, 30, 31, 94, 95, 222, 223, 478, 479, 5000)] == [
        1, 1, 2, 2, 4, 4, 8, 8, 16, 16]
    probed = sum(scheduled("annealing", t) for t in range(256))
    assert probed == 31 + 32 + 32 + 4  # dense first, then every 2nd, 4th, 8th


def test_rule3_probes_every_step_whatever_the_schedule():
    monitor = SafetyMonitor(SafetyConfig(**{**CFG, "schedule": "periodic:8"}))
    monitor.start(0.1)
    assert not monitor.wants_probe(0)
    monitor.observe(7, 0.9)
    assert monitor.wants_probe(8)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(schedule="sometimes"), "unknown schedule 'sometimes'"),
        (dict(schedule="periodic:0"), "unknown schedule"),
        (dict(threshold=1.5), "threshold must be between 0 and 1"),
        (dict(tau=0), "tau must be a positive integer"),
        (dict(window_threshold=1.0), "window_threshold must be between 0 and 1"),
        (dict(min_window=0), "min_window must be a positive integer"),
    ],
)
def test_bad_config_is_one_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SafetyConfig(**kwargs)


def test_window_threshold_judges_the_generated_text_and_threshold_the_query():
    # query 0.6 >= threshold 0.5: inserted at once whatever the window threshold
    assert run([0.0] * 5, p0=0.6, window_threshold=0.9)[0] == "query"
    # windows at 0.8 < window threshold 0.9: never; at 0.9: tau probes insert
    assert run([0.8] * 6, window_threshold=0.9)[0] is None
    assert run([0.8, 0.9, 0.9, 0.9], window_threshold=0.9)[0] == 3
    # unset: the windows use the threshold
    assert run([0.5] * 3)[0] == 2


def test_window_threshold_comes_from_the_model_else_the_threshold():
    assert SafetyConfig().resolved({"threshold": 0.4}).window_threshold == 0.4
    assert SafetyConfig().resolved({"threshold": 0.4, "window_threshold": 0.8}).window_threshold \
        == 0.8
    assert SafetyConfig(window_threshold=0.6).resolved(
        {"threshold": 0.4, "window_threshold": 0.8}).window_threshold == 0.6


def test_min_window_holds_the_checks_of_the_generated_text_back():
    def probed(n_prefill=0, **cfg):
        monitor = SafetyMonitor(SafetyConfig(**{**CFG, **cfg}).resolved({}), n_prefill=n_prefill)
        monitor.start(0.1)
        return [t for t in range(12) if monitor.wants_probe(t)]

    assert probed() == list(range(12))  # unset: from the first token (the paper)
    assert probed(min_window=5) == list(range(4, 12))  # the first check sees 5 tokens
    assert probed(min_window=5, schedule="periodic:2") == [5, 7, 9, 11]
    # a flip (rule 3) is followed at every index whatever the schedule
    monitor = SafetyMonitor(SafetyConfig(**{**CFG, "min_window": 5}).resolved({}))
    monitor.start(0.1)
    monitor.observe(4, 0.9)
    assert monitor.wants_probe(5)


def test_min_window_comes_from_the_model_else_one():
    assert SafetyConfig().resolved({"threshold": 0.5}).min_window == 1
    assert SafetyConfig().resolved({"threshold": 0.5, "min_window": 8}).min_window == 8
    assert SafetyConfig(min_window=3).resolved({"threshold": 0.5, "min_window": 8}).min_window == 3


def test_window_query_lets_the_checks_of_the_generated_text_see_the_query():
    special = [False] * 20
    for window_query, expected in ((None, False), (False, False), (True, True)):
        monitor = SafetyMonitor(SafetyConfig(**CFG, window_query=window_query).resolved({}))
        monitor.start(0.1)
        assert monitor.window(5, special) == (expected, [3, 4, 5])  # rule 2
        monitor.observe(5, 0.9)
        assert monitor.window(6, special) == (expected, [3, 4, 5, 6])  # rule 3
    assert SafetyConfig().resolved({"threshold": 0.5, "window_query": True}).window_query is True


def test_schedules_count_generated_tokens_and_a_prefill_gets_its_own_probe():
    monitor = SafetyMonitor(SafetyConfig(**{**CFG, "schedule": "periodic:4"}), n_prefill=40)
    monitor.start(0.1)
    assert monitor.wants_prefill_probe()
    assert [t for t in range(60) if monitor.wants_probe(t)] == [43, 47, 51, 55, 59]
    annealing = SafetyMonitor(SafetyConfig(**{**CFG, "schedule": "annealing"}), n_prefill=500)
    annealing.start(0.1)
    assert sum(annealing.wants_probe(500 + g) for g in range(64)) == \
        sum(scheduled("annealing", g) for g in range(64)) == 47


def test_no_probe_is_wanted_after_the_insertion():
    monitor = SafetyMonitor(SafetyConfig(**CFG), n_prefill=3)
    monitor.start(0.9)  # inserted at once
    assert not monitor.wants_prefill_probe()
    assert not any(monitor.wants_probe(t) for t in range(20))
    monitor = SafetyMonitor(SafetyConfig(**CFG))
    monitor.start(0.1)
    for t in range(3):
        monitor.observe(t, 0.9)
    assert monitor.inserted and not any(monitor.wants_probe(t) for t in range(3, 20))
