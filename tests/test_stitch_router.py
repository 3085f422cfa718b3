"""Pure routing: stitch selection by budget, and the load-aware latency model it is fed."""
import pytest
from hypothesis import given
from hypothesis import strategies as st

from serving.budget import Budget, parse_budget
from serving.latency import LatencyTracker, interpolate_step, monotone_profile
from serving.stitch_router import NoStitchFits, RouteDecision, StitchCandidate, select_stitch, violations

# A palette shaped like the tiny pair: cost grows with quality, latency roughly with cost.
PALETTE = [
    StitchCandidate("small", 181_696, 0.00085, 0.50, 0.002, 0.10),
    StitchCandidate("s3-l5", 354_624, 0.00146, 0.60, 0.003, 0.15),
    StitchCandidate("s2-l3", 613_440, 0.00237, 0.70, 0.004, 0.20),
    StitchCandidate("s0-l1", 835_136, 0.00307, 0.80, 0.005, 0.25),
    StitchCandidate("large", 954_240, 0.00341, 0.90, 0.006, 0.30),
]


def route(text: str, **kw) -> RouteDecision | NoStitchFits:
    return select_stitch(PALETTE, parse_budget(text) if text else Budget(), **kw)


@pytest.mark.parametrize("budget, stitch", [
    ("", "large"),
    ("1B", "large"),
    ("900k", "s0-l1"),
    ("0.7M", "s2-l3"),
    ("0.002GFLOPs", "s3-l5"),
    ("1MFLOPs", "small"),
    ("45%", "s3-l5"),  # 0.00146 / 0.00341 = 42.8 %
    ("100%", "large"),
    ("4.5ms", "s2-l3"),
    ("5ms/token, 0.7M", "s2-l3"),
    ("0.16s", "s3-l5"),
    ("5ms, 0.16s", "s3-l5"),
])
def test_budget_picks_best_fitting_stitch(budget, stitch):
    d = route(budget)
    assert isinstance(d, RouteDecision)
    assert (d.stitch_id, d.budget_met, d.violated) == (stitch, True, ())


def test_nothing_fits_serves_cheapest_and_says_so():
    d = route("1ms, 100k")
    assert isinstance(d, RouteDecision)
    assert d.stitch_id == "small" and not d.budget_met
    assert len(d.violated) == 2 and "ms/token" in d.violated[0] and "params" in d.violated[1]


def test_nothing_fits_strict_is_an_error_value():
    d = route("1ms", strict=True)
    assert isinstance(d, NoStitchFits)
    assert d.cheapest.id == "small" and "1ms/token" in d.message
    assert isinstance(route("10ms", strict=True), RouteDecision)  # strict only matters when nothing fits


def test_percent_basis():
    # by params: 40 % of 954k = 382k -> s3-l5; by latency: 40 % of 6 ms = 2.4 ms -> small
    assert route("40%", percent_basis="params").stitch_id == "s3-l5"
    assert route("40%", percent_basis="latency").stitch_id == "small"


def test_ties_in_quality_prefer_the_cheaper():
    a = StitchCandidate("a", 10, 2.0, 1.0, 0.01, 0.1)
    b = StitchCandidate("b", 10, 1.0, 1.0, 0.01, 0.1)
    assert select_stitch([a, b], Budget()).stitch_id == "b"


def test_quality_not_size_decides():
    # a palette whose eval says a mid stitch beats the large anchor
    cands = [PALETTE[0], StitchCandidate("mid", 600_000, 0.002, 0.95, 0.004, 0.2), PALETTE[-1]]
    assert select_stitch(cands, Budget()).stitch_id == "mid"


candidates = st.lists(
    st.builds(StitchCandidate, id=st.text(min_size=1, max_size=4), params=st.integers(1, 10**9),
              gflops=st.floats(1e-6, 1e3), quality=st.floats(-1, 1), token_latency_s=st.floats(1e-5, 1),
              request_latency_s=st.floats(1e-4, 10)), min_size=1, max_size=8)
budget_terms = st.builds(Budget, token_latency_s=st.none() | st.floats(1e-5, 1),
                         params=st.none() | st.floats(1, 1e9), fraction=st.none() | st.floats(0.01, 1))


@given(candidates, budget_terms, st.sampled_from(["gflops", "params", "latency"]))
def test_choice_is_optimal_among_fitting(cands, budget, basis):
    d = select_stitch(cands, budget, percent_basis=basis)
    largest = max({"gflops": c.gflops, "params": c.params, "latency": c.token_latency_s}[basis] for c in cands)
    fitting = [c for c in cands if not violations(c, budget, largest, basis)]
    assert isinstance(d, RouteDecision)
    if fitting:
        assert d.budget_met and d.stitch in fitting
        assert d.stitch.quality == max(c.quality for c in fitting)
    else:
        assert not d.budget_met and d.stitch.gflops == min(c.gflops for c in cands)
        assert d.violated


# ---- latency model -------------------------------------------------------------------------------
def test_profile_is_made_monotone_and_interpolated():
    prof = monotone_profile({1: 0.29, 2: 0.22, 4: 0.16, 8: 0.30})  # noisy small-batch figures
    assert prof == {1: 0.16, 2: 0.16, 4: 0.16, 8: 0.30}
    assert interpolate_step(prof, 6) == pytest.approx(0.23)
    assert interpolate_step(prof, 16) == pytest.approx(0.30 + 8 * (0.14 / 4))  # linear past the last size
    assert interpolate_step({1: 0.01}, 32) == 0.01


# Weight parts shaped like a stitch space: "b" is a large stitch, "a" a cheaper one that shares
# b's first blocks (p0, p1) and adds nothing of its own, "c" is disjoint from both.
PARTS = {"a": {"p0": 2.0, "p1": 2.0}, "b": {"p0": 2.0, "p1": 2.0, "p2": 4.0}, "c": {"p3": 4.0}}
PROFILES = {"a": (0.001, {1: 0.010, 4: 0.016}), "b": (0.002, {1: 0.020, 4: 0.032}), "c": (0.001, {1: 0.010, 4: 0.016})}


def tracker(**kw) -> LatencyTracker:
    return LatencyTracker(PROFILES, max_slots=4, parts=PARTS, alpha=0.5, **kw)


def test_idle_estimate_is_the_profile():
    t = tracker()
    e = t.estimate("a", prompt_tokens=10, max_tokens=5)
    assert e.token_s == pytest.approx(0.010, rel=1e-9)
    assert e.prefill_s == pytest.approx(0.010, rel=1e-9)
    assert e.request_s == pytest.approx(0.010 + 4 * 0.010, rel=1e-9)
    assert e.queue_s == 0


def test_ewma_follows_observed_step_times():
    t = tracker()
    for _ in range(20):
        t.observe_decode("a", 1, 0.020)  # this replica runs 2x slower than profiled
    assert t.estimate("a", prompt_tokens=1).token_s == pytest.approx(0.020, rel=1e-3)
    # an unobserved stitch inherits the replica-wide correction
    assert t.estimate("b", prompt_tokens=1).token_s == pytest.approx(0.040, rel=1e-3)
    t.observe_prefill("a", 100, 0.05)  # 0.5 ms/token observed vs 1 ms profiled
    assert t.correction("a", "prefill") == pytest.approx(0.5 * 0.5 + 0.5 * 1.0, rel=1e-9)


def test_same_stitch_load_moves_along_the_batch_profile():
    t = tracker()
    idle = t.estimate("a", prompt_tokens=1).token_s
    t.begin("a")
    t.begin("a")  # a step of 3 rows with us
    same = t.estimate("a", prompt_tokens=1).token_s
    assert same == pytest.approx(0.010 + (0.016 - 0.010) * 2 / 3, rel=1e-9)
    t.end("a"), t.end("a")
    assert t.estimate("a", prompt_tokens=1).token_s == pytest.approx(idle, rel=1e-9)


def test_mixed_step_reads_the_union_of_the_blocks():
    t = tracker()
    t.begin("b")
    # a joins b's rows: b's parts already cover a's, so the step is b's at batch 2
    e = t.estimate("a", prompt_tokens=10)
    assert e.token_s == pytest.approx(0.020 + (0.032 - 0.020) / 3, rel=1e-9)
    # ...and its first token comes from the step that prefills it while decoding b's row
    assert e.prefill_s == pytest.approx(0.001 * 10 + 0.020, rel=1e-9)
    assert t.estimate("b", prompt_tokens=1).token_s == pytest.approx(e.token_s, rel=1e-9)  # one step for all
    t.end("b")
    t.begin("c")
    # c shares nothing with a: reference c (equal size, tie broken by name), union 8 of c's 4 bytes
    assert t.estimate("a", prompt_tokens=1).token_s == pytest.approx(2 * (0.010 + 0.006 / 3), rel=1e-9)
    t.begin("b")
    # b, c and a: reference b (the largest), union p0..p3 = 12 of b's 8
    assert t.estimate("a", prompt_tokens=1).token_s == pytest.approx(1.5 * (0.020 + 0.012 * 2 / 3), rel=1e-9)


def test_chunked_prefill_spans_several_steps_of_the_running_rows():
    t = tracker(prefill_chunk=4)
    t.begin("b")
    e = t.estimate("a", prompt_tokens=10)  # ceil(10 / 4) = 3 steps, each also decoding b's row
    assert e.prefill_s == pytest.approx(0.001 * 10 + 3 * 0.020, rel=1e-9)
    assert tracker(prefill_chunk=16).estimate("a", prompt_tokens=10).prefill_s == pytest.approx(0.010, rel=1e-9)


def test_mixed_observations_correct_every_stitch_in_the_step():
    t = tracker()
    pred = 0.020 + (0.032 - 0.020) / 3  # a + b at batch 2, reference b
    for _ in range(30):
        t.observe_step(3 * pred, {"a": 1, "b": 1})
    assert t.correction("a") == pytest.approx(3.0, rel=1e-6)
    assert t.correction("b") == pytest.approx(3.0, rel=1e-6)
    assert t.correction("c") == pytest.approx(3.0, rel=1e-6)  # via the replica-wide figure
    # a step that decodes and prefills: the observed/expected factor scales both parts
    t2 = tracker()
    t2.observe_step(2 * (0.010 + 0.001 * 20), {"a": 1}, {"b": 10})
    assert t2.correction("a") == pytest.approx(0.5 * 2 + 0.5 * 1, rel=1e-9)
    assert t2.correction("b", "prefill") == pytest.approx(0.5 * 2 + 0.5 * 1, rel=1e-9)
    t2.observe_step(0.0, {"a": 1})  # no time, no observation
    assert t2.correction("a") == pytest.approx(1.5, rel=1e-9)


def test_rows_beyond_the_slots_wait_for_a_slot():
    t = tracker(default_output_tokens=10)
    for _ in range(4):
        t.begin("a")
    e = t.estimate("a", prompt_tokens=1, max_tokens=10)
    step = 0.016  # the step stays at the 4 slots
    assert e.token_s == pytest.approx(step, rel=1e-9)
    # one row ahead of the slots: a slot frees every 10 / 4 steps
    assert e.queue_s == pytest.approx(1 * 10 / 4 * step, rel=1e-9)
    assert e.prefill_s == pytest.approx(0.001 + step, rel=1e-9)
    assert e.request_s == pytest.approx(e.queue_s + e.prefill_s + 9 * step, rel=1e-9)


def test_classify_estimate_is_per_request():
    t = tracker()
    e = t.estimate("b", prompt_tokens=50, task="classify", batch_rows=2)
    assert e.token_s == e.request_s == pytest.approx(0.002 * 50 * 2, rel=1e-9)
    t.begin("a")  # another stitch's batch runs first on the one engine thread
    e2 = t.estimate("b", prompt_tokens=50, task="classify", batch_rows=2)
    assert e2.request_s == pytest.approx(0.002 * 50 * 2 + 0.001 * 50 * 1, rel=1e-9)


def test_without_parts_stitches_share_nothing():
    t = LatencyTracker({k: PROFILES[k] for k in "ab"}, max_slots=4)
    t.begin("b")
    assert t.estimate("a", prompt_tokens=1).token_s == pytest.approx(2 * (0.020 + 0.012 / 3), rel=1e-9)
