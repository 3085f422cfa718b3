"""X-Compute-Budget grammar: examples from docs/DESIGN_NOTES.md section 3 plus property-based tests (hypothesis)."""
import math

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from serving.budget import GRAMMAR, Budget, BudgetError, parse_budget, try_parse_budget


@pytest.mark.parametrize("text, expected", [
    ("25ms", Budget(token_latency_s=0.025)),
    ("25ms/token", Budget(token_latency_s=0.025)),
    ("25 MS / Token", Budget(token_latency_s=0.025)),
    ("0.5s/token", Budget(token_latency_s=0.5)),
    ("2s", Budget(request_latency_s=2.0)),
    ("1500ms/request", Budget(request_latency_s=1.5)),
    ("3.2GFLOPs", Budget(flops_per_token=3.2e9)),
    ("3.2gflop", Budget(flops_per_token=3.2e9)),
    ("800MFLOPs", Budget(flops_per_token=8e8)),
    ("1.5TFLOPs", Budget(flops_per_token=1.5e12)),
    ("1.1B", Budget(params=1.1e9)),
    ("800M", Budget(params=8e8)),
    ("500k", Budget(params=5e5)),
    ("40%", Budget(fraction=0.4)),
    ("100%", Budget(fraction=1.0)),
    (".5%", Budget(fraction=0.005)),
    ("25ms, 1.1B", Budget(token_latency_s=0.025, params=1.1e9)),
    (" 2 s ,3.2 GFLOPs , 40 % ", Budget(request_latency_s=2.0, flops_per_token=3.2e9, fraction=0.4)),
    ("30ms, 20ms", Budget(token_latency_s=0.02)),  # the tighter of two terms of one kind
])
def test_examples(text, expected):
    got = parse_budget(text)
    for k, v in expected.model_dump().items():
        g = getattr(got, k)
        assert (g is None) == (v is None), k
        if v is not None:
            assert g == pytest.approx(v, rel=1e-12), k


@pytest.mark.parametrize("text", [
    "", " ", ",", "25", "ms", "25 parsecs", "-5ms", "0ms", "0%", "101%", "25ms,", ",25ms", "25ms,,1B",
    "1e3ms", "25ms 1B", "inf ms", "nan%", "1.2.3B", "25ms;1B", "x" * 300, "25µs",
])
def test_malformed_names_the_grammar(text):
    err = try_parse_budget(text)
    assert isinstance(err, BudgetError)
    assert GRAMMAR in str(err)
    with pytest.raises(BudgetError):
        parse_budget(text)


def test_unbounded_and_to_header():
    assert Budget().unbounded
    assert Budget().to_header() == ""
    b = parse_budget("25ms, 2s, 3.2GFLOPs, 1.1B, 40%")
    assert not b.unbounded
    assert b.to_header() == "25ms/token, 2s, 3.2GFLOPs, 1100M, 40%"


# ---- properties ---------------------------------------------------------------------------------
pos = st.floats(min_value=1e-3, max_value=1e6, allow_nan=False, allow_infinity=False)
frac = st.floats(min_value=1e-3, max_value=1.0, allow_nan=False)
budgets = st.builds(Budget, token_latency_s=st.none() | pos, request_latency_s=st.none() | pos,
                    flops_per_token=st.none() | pos.map(lambda x: x * 1e9), params=st.none() | pos.map(lambda x: x * 1e6),
                    fraction=st.none() | frac)


def _close(a: Budget, b: Budget) -> bool:
    for k, v in a.model_dump().items():
        w = getattr(b, k)
        if (v is None) != (w is None) or (v is not None and not math.isclose(v, w, rel_tol=1e-9)):
            return False
    return True


@given(budgets)
def test_roundtrip_canonical_form(b):
    assume(not b.unbounded)
    assert _close(parse_budget(b.to_header()), b)


def _spaced(draw, s: str) -> str:
    """Insert random spaces and flip case: the grammar ignores both."""
    out = []
    for ch in s:
        if draw(st.booleans()):
            out.append(" " * draw(st.integers(0, 2)))
        out.append(ch.upper() if draw(st.booleans()) else ch.lower())
    return "".join(out)


TERM_UNITS = [("ms", "token_latency_s", 1e-3), ("ms/token", "token_latency_s", 1e-3), ("s", "request_latency_s", 1),
              ("GFLOPs", "flops_per_token", 1e9), ("MFLOPs", "flops_per_token", 1e6), ("TFLOPs", "flops_per_token", 1e12),
              ("B", "params", 1e9), ("M", "params", 1e6), ("%", "fraction", 1e-2)]


@st.composite
def terms(draw):
    unit, fld, mult = draw(st.sampled_from(TERM_UNITS))
    hi = 100 if unit == "%" else 10**6
    whole = draw(st.integers(1, hi - 1 if unit == "%" else hi))
    dec = draw(st.integers(0, 99))
    num = f"{whole}.{dec:02d}"
    return _spaced(draw, f"{num}{unit}"), fld, float(num) * mult


@given(st.lists(terms(), min_size=1, max_size=5))
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_terms_in_any_case_spacing_and_order_all_hold(ts):
    got = parse_budget(",".join(t for t, _, _ in ts))
    expected: dict[str, float] = {}
    for _, fld, val in ts:
        expected[fld] = min(val, expected.get(fld, math.inf))
    for fld, val in expected.items():
        assert getattr(got, fld) == pytest.approx(val, rel=1e-9)
    for fld in set(Budget.model_fields) - set(expected):
        assert getattr(got, fld) is None
    # order does not matter
    assert _close(parse_budget(",".join(t for t, _, _ in reversed(ts))), got)


@given(st.text(max_size=80))
def test_any_text_parses_or_is_a_budget_error(text):
    out = try_parse_budget(text)
    assert isinstance(out, (Budget, BudgetError))
    if isinstance(out, BudgetError):
        assert "X-Compute-Budget" in str(out)


@given(budgets, budgets)
def test_merge_is_the_tighter_bound(a, b):
    m = a.merged(b)
    for k in Budget.model_fields:
        x, y, z = getattr(a, k), getattr(b, k), getattr(m, k)
        if x is None or y is None:
            assert z == (y if x is None else x)
        else:
            assert z == min(x, y)
