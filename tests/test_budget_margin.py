"""The realized budget margin of the latency model (serving/latency.py): observed / estimated ratios of
finished requests, their quantile, and what the router prices with it."""
from __future__ import annotations

import pytest

from serving.budget import parse_budget
from serving.latency import MARGIN_CLIP, MARGIN_MIN_SAMPLES, PREFILL_SHARE_CAP, LatencyTracker
from serving.stitch_router import StitchCandidate, select_stitch


def tracker() -> LatencyTracker:
    return LatencyTracker({"a": (1e-3, {1: 0.010, 4: 0.012}), "b": (2e-3, {1: 0.020, 4: 0.024})}, max_slots=4)


def test_margin_is_the_quantile_of_recent_ratios():
    t = tracker()
    assert t.margin("token", 0.9) == 1.0  # nothing seen
    for i in range(MARGIN_MIN_SAMPLES - 1):
        t.observe_request(predicted_token_s=0.01, observed_token_s=0.02)
    assert t.margin("token", 0.9) == 1.0  # too few to trust
    t = tracker()
    ratios = [1.0 + i / 99 for i in range(100)]  # 1.00 .. 2.00
    for r in ratios:
        t.observe_request(predicted_token_s=0.01, observed_token_s=0.01 * r, predicted_request_s=1.0,
                          observed_request_s=0.5)
    assert t.margin("token", 0.9) == pytest.approx(1.0 + 89 / 99, rel=1e-9)  # the 90th of 100, sorted
    assert t.margin("token", 1.0) == pytest.approx(2.0)
    assert t.margin("token", None) == 1.0  # off
    assert t.margin("request", 0.9) == MARGIN_CLIP[0]  # 0.5 observed / 1.0 estimated, at the clip
    assert t.realized_count("token") == 100 and t.realized_count("request") == 100


def test_margin_window_forgets_old_ratios():
    t = LatencyTracker({"a": (1e-3, {1: 0.01})}, max_slots=1, margin_window=32)
    for _ in range(32):
        t.observe_request(predicted_token_s=1.0, observed_token_s=5.0)
    assert t.margin("token", 0.5) == pytest.approx(5.0)
    for _ in range(32):
        t.observe_request(predicted_token_s=1.0, observed_token_s=1.5)
    assert t.margin("token", 0.99) == pytest.approx(1.5)


def test_margin_downgrades_at_admission():
    """A stitch whose bare estimate fits a 25 ms/token budget but whose realized tail does not is not
    chosen: the cheaper one that still fits with the margin is."""
    big = StitchCandidate("big", 2_000, 2.0, 0.9, 0.022, 1.0)
    small = StitchCandidate("small", 1_000, 1.0, 0.5, 0.010, 0.5)
    budget = parse_budget("25ms/token")
    assert select_stitch([big, small], budget).stitch_id == "big"
    m = 1.3  # recent requests got 30% more than estimated at the chosen quantile
    scaled = [StitchCandidate(c.id, c.params, c.gflops, c.quality, c.token_latency_s * m, c.request_latency_s * m)
              for c in (big, small)]
    d = select_stitch(scaled, budget)
    assert d.stitch_id == "small" and d.budget_met


def test_overhead_is_learned_from_first_token_excess_and_added_once():
    """Observed - estimated seconds to the first token (queue + prefill) becomes an additive term of
    the whole-request estimate: the first excess whole, then an EWMA; never per token, never below 0."""
    t = LatencyTracker({"a": (1e-3, {1: 0.010, 4: 0.012})}, max_slots=4, alpha=0.5)
    bare = t.estimate("a", prompt_tokens=100, max_tokens=11)
    assert bare.overhead_s == 0 and bare.request_s == pytest.approx(100e-3 + 10 * 0.010, rel=1e-9)
    t.observe_request(predicted_first_s=0.1, observed_first_s=0.5)  # 0.4 s beyond queue + prefill
    assert t.overhead_s == pytest.approx(0.4)
    t.observe_request(predicted_first_s=0.1, observed_first_s=0.3)  # EWMA(0.5): 0.5 * 0.2 + 0.5 * 0.4
    assert t.overhead_s == pytest.approx(0.3)
    e = t.estimate("a", prompt_tokens=100, max_tokens=11)
    assert e.overhead_s == pytest.approx(0.3)
    assert e.request_s == pytest.approx(bare.request_s + 0.3, rel=1e-9)
    assert e.token_s == bare.token_s and e.prefill_s == bare.prefill_s  # per-token budgets unchanged
    for _ in range(20):  # first tokens faster than estimated: the term goes to 0, it never subtracts
        t.observe_request(predicted_first_s=1.0, observed_first_s=0.2)
    assert t.overhead_s == 0 and t.estimate("a", prompt_tokens=100, max_tokens=11).request_s == pytest.approx(
        bare.request_s, rel=1e-9)


def test_prefill_interference_prices_tokens_by_the_share_left_for_decode():
    """Prompts prefilled in the last window delay every running row's tokens: with prefill taking u
    of the engine's time, a token costs step / (1 - u); old prefills leave the window; u is capped."""
    now = [100.0]
    t = LatencyTracker({"a": (1e-3, {1: 0.010, 4: 0.012})}, max_slots=4, prefill_window_s=10.0,
                       clock=lambda: now[0])
    idle = t.estimate("a", prompt_tokens=100, max_tokens=11)
    assert t.prefill_share() == 0 and idle.token_s == pytest.approx(0.010, rel=1e-9)
    for _ in range(5):  # a row decoding (0.010 s) beside a 500-token prefill (0.5 s), as profiled
        t.observe_step(0.51, {"a": 1}, {"a": 500})
        now[0] += 1.0
    assert t.correction("a") == pytest.approx(1.0) and t.correction("a", "prefill") == pytest.approx(1.0)
    assert t.prefill_share() == pytest.approx(2.5 / 10)  # 5 x 0.5 s of prefill in a 10 s window
    e = t.estimate("a", prompt_tokens=100, max_tokens=11)
    assert e.token_s == pytest.approx(0.010 / 0.75, rel=1e-9)
    assert e.request_s == pytest.approx(idle.request_s + 10 * (0.010 / 0.75 - 0.010), rel=1e-9)
    now[0] += 10.0  # the prefills are older than the window
    assert t.prefill_share() == 0 and t.estimate("a", prompt_tokens=100, max_tokens=11).token_s == pytest.approx(0.010)
    for _ in range(30):
        t.observe_step(0.51, {"a": 1}, {"a": 500})
    assert t.prefill_share() == PREFILL_SHARE_CAP
    assert t.estimate("a", prompt_tokens=1).token_s == pytest.approx(0.010 / (1 - PREFILL_SHARE_CAP), rel=1e-9)
