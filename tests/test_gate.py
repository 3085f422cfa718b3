"""The deployment gate (stitchlib.gate): a stitch is deployed only strictly between the anchors and
on the Pareto front of quality vs cost; the verdict round-trips through the manifest and shows in
`stitchserve inspect`. Also: CLI output never crashes on optional fields being None."""
from __future__ import annotations

import json
import random

import pytest

from stitchlib.gate import DROP_REASONS, GateRow, select_deployment

S, L = GateRow("small", 1.0, 2.0), GateRow("large", 10.0, 4.0)


def verdict(rows, **kw):
    res = select_deployment(rows, small_id="small", large_id="large", **kw)
    return res, {d.id: (d.deployed, d.reason) for d in res.decisions}


# ---- the gate, on hand-made rows -------------------------------------------------------------------
def test_each_drop_reason_with_its_sentence():
    rows = [L, GateRow("dom", 5.0, 2.5), GateRow("ok1", 3.0, 2.6), GateRow("low", 2.0, 1.0),
            GateRow("high", 4.0, 4.5), GateRow("unm", 6.0, None), GateRow("ok2", 8.0, 3.5), S]
    res, v = verdict(rows)
    assert v == {"small": (True, None), "low": (False, "below_small"), "ok1": (True, None),
                 "high": (False, "above_large"), "dom": (False, "dominated"), "unm": (False, "not_measured"),
                 "ok2": (True, None), "large": (True, None)}
    assert res.deployed_ids() == ["small", "ok1", "ok2", "large"]  # cheapest first
    assert [d.id for d in res.decisions] == ["small", "low", "ok1", "high", "dom", "unm", "ok2", "large"]
    assert res["dom"].dominated_by == "ok1" and "ok1" in res["dom"].message and "2.6" in res["dom"].message
    assert "small anchor's 2" in res["low"].message
    assert "not between the anchors" in res["high"].message and "large anchor's 4" in res["high"].message
    assert "not measured" in res["unm"].message
    assert {d.reason for d in res.dropped()} <= set(DROP_REASONS)
    assert not res.anchors_inverted


def test_screen_drops_only_routes_clearly_below_the_small_anchor():
    """First validation stage: a stitch below the small anchor by more than z paired standard errors is
    dropped (below_small, saying it was screened); one below it within the noise, one above, unmeasured
    rows and both anchors go on to the second stage; the drops join the gate's verdict through `prior`."""
    from stitchlib.gate import screen

    small = GateRow("small", 1.0, -3.0, (-3.0, -2.0, -4.0, -3.0))
    far = GateRow("far", 2.0, -3.5, (-3.4, -2.6, -4.4, -3.6))      # -0.5, SE 0.071: screened
    near = GateRow("near", 3.0, -3.05, (-2.5, -2.6, -4.5, -3.6))   # -0.05, SE 0.32: kept
    good = GateRow("good", 4.0, -2.5, (-2.5, -1.5, -3.5, -2.5))    # +0.5: kept
    unm = GateRow("unm", 5.0, None)
    large = GateRow("large", 6.0, -2.0, (-2.0, -1.0, -3.0, -2.0))
    keep, dropped = screen([large, good, near, far, small, unm], z=1.0)
    assert keep == ["small", "near", "good", "unm", "large"]  # cost order
    assert [(d.id, d.reason, d.deployed) for d in dropped] == [("far", "below_small", False)]
    assert "first 4 validation examples" in dropped[0].message and "screened out" in dropped[0].message
    # z=0: anything below the small anchor goes; a huge z keeps everything
    assert screen([small, far, near, good, large], z=0.0)[0] == ["small", "good", "large"]
    assert screen([small, far, near, good, large], z=1e6)[0] == ["small", "far", "near", "good", "large"]
    res = select_deployment([small, near, good, large], z=2.0, prior=dropped)
    assert [d.id for d in res.decisions] == ["small", "far", "near", "good", "large"]
    assert res["far"].message == dropped[0].message and res.deployed_ids() == ["small", "good", "large"]
    with pytest.raises(ValueError, match="prior"):
        select_deployment([small, near, good, large], prior=[res["near"]])  # not a route the walk left out
    with pytest.raises(ValueError, match="anchor"):
        screen([far, near, large])


def test_ties_are_dropped_never_deployed():
    rows = [S, L, GateRow("eq_small", 2.0, 2.0), GateRow("a", 3.0, 3.0), GateRow("eq_a", 4.0, 3.0),
            GateRow("eq_large", 5.0, 4.0), GateRow("twin_worse", 6.0, 3.2), GateRow("twin_better", 6.0, 3.4)]
    res, v = verdict(rows)
    assert v["eq_small"] == (False, "below_small")
    assert v["eq_large"] == (False, "above_large")
    assert v["eq_a"] == (False, "dominated") and res["eq_a"].dominated_by == "a"
    # equal cost: the better twin is deployed, the worse one is dominated by it (it costs no less)
    assert v["twin_better"] == (True, None)
    assert v["twin_worse"] == (False, "dominated") and res["twin_worse"].dominated_by == "twin_better"


def test_min_gain_demands_a_margin_over_every_cheaper_route():
    rows = [S, L, GateRow("a", 2.0, 2.05), GateRow("b", 3.0, 2.3), GateRow("c", 4.0, 2.35), GateRow("d", 5.0, 2.5)]
    _, v0 = verdict(rows)
    assert [k for k, (dep, _) in v0.items() if dep] == ["small", "a", "b", "c", "d", "large"]
    res, v = verdict(rows, min_gain=0.1)
    assert v["a"] == (False, "dominated") and res["a"].dominated_by == "small"  # 2.05 <= 2.0 + 0.1
    assert v["b"] == (True, None)
    assert v["c"] == (False, "dominated") and res["c"].dominated_by == "b"
    assert v["d"] == (True, None)  # 2.5 > 2.3 + 0.1: measured against the best deployed, not the last seen
    assert "min_gain 0.1" in res["c"].message
    with pytest.raises(ValueError, match="min_gain"):
        select_deployment(rows, min_gain=-0.1)


def test_anchors_are_always_kept_even_when_nothing_fits_between_them():
    bad = [GateRow("x", 2.0, 1.0), GateRow("y", 3.0, None)]
    res, v = verdict([S, L, *bad])
    assert res.deployed_ids() == ["small", "large"]
    inverted = [GateRow("small", 1.0, 3.0), GateRow("large", 10.0, 2.0), GateRow("z", 5.0, 2.5)]
    res, v = verdict(inverted)
    assert res.deployed_ids() == ["small", "large"] and res.anchors_inverted
    assert v["z"] == (False, "below_small")


def test_anchor_problems_raise():
    with pytest.raises(ValueError, match="large anchor 'large' is not among"):
        select_deployment([S, GateRow("a", 2.0, 3.0)])
    with pytest.raises(ValueError, match="small anchor 'small' has no measured quality"):
        select_deployment([GateRow("small", 1.0, None), L])
    with pytest.raises(ValueError, match="unique"):
        select_deployment([S, L, GateRow("a", 2.0, 3.0), GateRow("a", 3.0, 3.1)])
    # custom anchor ids
    res = select_deployment([GateRow("S", 1, 0.1), GateRow("L", 9, 0.9), GateRow("m", 5, 0.5)], small_id="S",
                            large_id="L")
    assert res.deployed_ids() == ["S", "m", "L"]


@pytest.mark.parametrize("seed", range(20))
def test_deployment_is_monotone_and_order_independent(seed):
    """Whatever the rows: deployed quality strictly increases with cost, every deployed stitch lies
    strictly between the anchors, and every dominated stitch names a cheaper-or-equal deployed route
    that is at least as good. Shuffling the input changes nothing."""
    r = random.Random(seed)
    rows = [GateRow("small", 1.0, 0.0), GateRow("large", 10.0, 1.0)]
    rows += [GateRow(f"s{i}", round(r.uniform(1.0, 10.0), 1), None if r.random() < 0.1 else r.uniform(-0.3, 1.3))
             for i in range(25)]
    gain = r.choice([0.0, 0.02])
    res = select_deployment(rows, min_gain=gain)
    dep = [d for d in res.decisions if d.deployed]
    assert dep[0].id == "small" and dep[-1].id == "large"
    assert all(a.cost <= b.cost and a.quality < b.quality for a, b in zip(dep, dep[1:]))
    assert all(0.0 < d.quality < 1.0 for d in dep[1:-1])
    for d in res.dropped():
        if d.reason == "dominated":
            by = res[d.dominated_by]
            assert by.deployed and by.cost <= d.cost and by.quality + gain >= d.quality
    shuffled = rows[:]
    r.shuffle(shuffled)
    assert select_deployment(shuffled, min_gain=gain).decisions == res.decisions


# ---- the manifest ------------------------------------------------------------------------------------
def _gated_manifest(model):
    from stitchlib.palette import apply_gate, build_manifest, gate_rows

    # neg_loss by hand: small -3, large -1; s3-l5 below small, s2-l4 between, s2-l3 dominated by it,
    # s1-l2 above large, s0-l1 not measured
    q = {"small": -3.0, "s3-l5": -3.5, "s2-l4": -2.0, "s2-l3": -2.2, "s1-l2": -0.5, "large": -1.0}
    m = build_manifest(model, name="gated", task="chat", quality_metric="neg_loss",
                       metrics={k: {"neg_loss": v, "loss": -v} for k, v in q.items()})
    res = select_deployment(gate_rows(m))
    return apply_gate(m, res), res


def test_gate_round_trips_through_the_manifest(tiny_model, tmp_path):
    from stitchlib.palette import apply_gate, read_manifest, save_palette

    model = tiny_model()
    m, res = _gated_manifest(model)
    assert [s.id for s in m.deployed()] == ["small", "s2-l4", "large"]
    by = {s.id: s for s in m.stitches}
    assert (by["s3-l5"].dropped, by["s2-l3"].dropped, by["s1-l2"].dropped, by["s0-l1"].dropped) == \
        ("below_small", "dominated", "above_large", "not_measured")
    assert "s2-l4" in by["s2-l3"].dropped_reason and by["s2-l4"].dropped is None
    out = save_palette(tmp_path / "p", m, model.palette_state_dict())
    m2 = read_manifest(out)
    assert m2.model_dump(exclude={"files"}) == m.model_dump(exclude={"files"})
    # rows the gate did not see: unchanged, or marked with the caller's reason
    partial = res.__class__([d for d in res.decisions if d.id != "s0-l1"], "small", "large", -3.0, -1.0)
    fresh = _gated_manifest(model)[0].model_copy()
    assert {s.id: s.deployed for s in apply_gate(fresh, partial).stitches}["s0-l1"] is False  # as it was
    marked = apply_gate(fresh, partial, unlisted=("not_selected", "not picked"))
    assert next(s for s in marked.stitches if s.id == "s0-l1").dropped == "not_selected"


def test_manifests_written_before_the_gate_still_load(tiny_model, tmp_path):
    from stitchlib.palette import FORMAT_VERSION, build_manifest, read_manifest, save_palette

    model = tiny_model()
    out = save_palette(tmp_path / "old", build_manifest(model, name="old", task="chat"), model.palette_state_dict())
    raw = json.loads((out / "manifest.json").read_text())
    for row in raw["stitches"]:
        del row["dropped"], row["dropped_reason"]
    (out / "manifest.json").write_text(json.dumps(raw))
    m = read_manifest(out)
    assert m.format_version == FORMAT_VERSION == 1
    assert all(s.dropped is None and s.dropped_reason is None for s in m.stitches)


# ---- CLI output: dropped stitches shown, optional fields never crash -----------------------------------
def test_inspect_shows_quality_and_why_stitches_were_dropped(tiny_model, tmp_path, capsys):
    from stitchlib.cli import main
    from stitchlib.palette import save_palette

    model = tiny_model()
    m, _ = _gated_manifest(model)
    out = save_palette(tmp_path / "p", m, model.palette_state_dict())
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "7 stitches (3 deployed)" in text and "quality metric: neg_loss (higher is better)" in text
    head, section = text.split("not deployed (4):")
    table = {ln[2:].split()[0]: ln for ln in head.splitlines() if ln[:1] in ("*", " ")}
    # mark, id, GFLOPs, quality (neg_loss), score, metrics
    assert table["s2-l4"].startswith("*") and table["s2-l4"][2:].split()[2] == "-2"  # quality next to cost
    assert table["s0-l1"][2:].split()[1:4] == [f"{m.stitches[5].gflops:.3f}", "-", "-"]  # cost known, quality not
    assert not table["s2-l3"].startswith("*")
    for sid, code in (("s3-l5", "below_small"), ("s2-l3", "dominated"), ("s1-l2", "above_large"),
                      ("s0-l1", "not_measured")):
        line = next(ln for ln in section.splitlines() if ln.split()[:1] == [sid])
        assert code in line
    assert "costs no more" in section


def test_inspect_survives_missing_optional_fields(tiny_model, tmp_path, capsys):
    """No quality metric, no metrics, no scores, not deployed without a reason (old manifests)."""
    from stitchlib.cli import main
    from stitchlib.palette import build_manifest, save_palette

    model = tiny_model()
    m = build_manifest(model, name="bare", task="chat", deployed={"small", "large"})
    out = save_palette(tmp_path / "bare", m, model.palette_state_dict())
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "quality metric: none recorded" in text and "no reason recorded" in text
    m2 = build_manifest(model, name="half", task="chat", quality_metric="neg_loss",
                        metrics={"small": {"neg_loss": -1.0}}, scores={"s2-l3": 0.5})
    assert main(["inspect", str(save_palette(tmp_path / "half", m2, model.palette_state_dict()))]) == 0


def test_init_palette_command_lists_dropped_stitches(tiny_model, tmp_path, capsys, monkeypatch):
    """The init-palette command reports what the written palette deploys (whatever init_palette gated)."""
    import training.init_palette as I
    from stitchlib.cli import main
    from stitchlib.palette import save_palette

    model = tiny_model()

    def fake_init(out, **kw):
        return save_palette(out, _gated_manifest(model)[0], model.palette_state_dict())

    monkeypatch.setattr(I, "init_palette", fake_init)
    assert main(["init-palette", "--small", "tiny-small", "--large", "tiny-large", "--out",
                 str(tmp_path / "p")]) == 0
    text = capsys.readouterr().out
    assert "(7 stitches, 3 deployed)" in text and "not deployed (4):" in text and "above_large" in text


def test_quickstart_formatting_tolerates_missing_figures():
    from serving.quickstart import _budgets, _fmt

    assert _fmt(None, ".1f") == "-" and _fmt("12.5", ".1f") == "12.5" and _fmt(1234, ",.0f") == "1,234"
    full = [{"latency_ms": 20.0, "gflops": 1.0}, {"latency_ms": 40.0, "gflops": 2.0}]
    assert _budgets(full) == [None, "40%", "1GFLOPs", "40ms/token", "10ms/token"]
    assert _budgets([{"latency_ms": None, "gflops": None}]) == [None, "40%"]
    # a budget printed from a stitch's own figure is rounded up, so that stitch still fits it
    real = [{"latency_ms": 91.13, "gflops": 1.031963}, {"latency_ms": 209.94, "gflops": 2.5612},
            {"latency_ms": 293.54, "gflops": 3.175}]
    assert _budgets(real)[2:4] == ["2.562GFLOPs", "210ms/token"]


# ---- the served front: deployed routes priced again by measured latency ------------------------------
def test_served_front_shadows_routes_not_measurably_cheaper_than_a_better_one():
    """Best quality first: a route is routed only when it costs at least min_saving less than the cheapest
    better routed route; the anchors always are. Numbers: s0-l1 vs large under int4-width weights
    (34.81 vs 34.74 ms, benchmarks/QUANT.md 3.4) is shadowed; s6-l7 2 ms under is not."""
    from stitchlib.gate import ServedRoute, served_front

    routes = [ServedRoute("small", -1.3, 0.0198), ServedRoute("s7-l9", -1.2, 0.0301),
              ServedRoute("s6-l7", -1.1, 0.0326), ServedRoute("s0-l1", -1.0, 0.03481),
              ServedRoute("large", -0.9, 0.03474)]
    d = {x.id: x for x in served_front(routes, small_id="small", large_id="large")}
    assert [x.id for x in served_front(routes, small_id="small", large_id="large")] == [r.id for r in routes]
    assert {k: (v.routed, v.shadowed_by) for k, v in d.items()} == {
        "small": (True, None), "s7-l9": (True, None), "s6-l7": (True, None), "s0-l1": (False, "large"),
        "large": (True, None)}
    assert "34.81 ms" in d["s0-l1"].message and "not 2% under large's 34.74 ms" in d["s0-l1"].message
    # s6-l7 is 6.2 % under large: a 7 % margin shadows it too, and then s7-l9 is measured against large
    d7 = {x.id: x for x in served_front(routes, small_id="small", large_id="large", min_saving=0.07)}
    assert (d7["s6-l7"].routed, d7["s6-l7"].shadowed_by, d7["s7-l9"].routed) == (False, "large", True)
    # 0: only a route that costs more than a better one is shadowed (s0-l1 by 0.07 ms)
    d0 = {x.id: x.routed for x in served_front(routes, small_id="small", large_id="large", min_saving=0.0)}
    assert d0 == {"small": True, "s7-l9": True, "s6-l7": True, "s0-l1": False, "large": True}


def test_served_front_measures_against_the_cheapest_better_route_and_keeps_anchors():
    """A route under a shadowed one is compared with the routed route above it, not the shadowed one;
    the small anchor stays routed even when a better route costs no more."""
    from stitchlib.gate import ServedRoute, served_front

    routes = [ServedRoute("small", 1.0, 0.010), ServedRoute("a", 2.0, 0.0099), ServedRoute("b", 3.0, 0.0187),
              ServedRoute("c", 4.0, 0.019), ServedRoute("large", 5.0, 0.030)]
    d = {x.id: (x.routed, x.shadowed_by) for x in served_front(routes, small_id="small", large_id="large")}
    # c is routed (37 % under large); b is 1.6 % under c: shadowed by c; a is far under c: routed
    assert d == {"small": (True, None), "a": (True, None), "b": (False, "c"), "c": (True, None),
                 "large": (True, None)}


@pytest.mark.parametrize("routes, kw, needle", [
    ([("small", 1.0, 0.01)], {}, "anchor 'large' is not among"),
    ([("small", 1.0, 0.01), ("large", 2.0, 0.0)], {}, "finite positive cost"),
    ([("small", 1.0, 0.01), ("large", float("nan"), 0.02)], {}, "finite quality"),
    ([("small", 1.0, 0.01), ("small", 1.0, 0.01), ("large", 2.0, 0.02)], {}, "unique"),
    ([("small", 1.0, 0.01), ("large", 2.0, 0.02)], {"min_saving": 1.0}, "min_saving must lie in [0, 1)"),
])
def test_served_front_refuses_bad_input(routes, kw, needle):
    from stitchlib.gate import ServedRoute, served_front

    with pytest.raises(ValueError) as e:
        served_front([ServedRoute(*r) for r in routes], small_id="small", large_id="large", **kw)
    assert needle in str(e.value)


def test_served_cost_is_the_geometric_mean_over_the_profiled_batch_sizes():
    """Two routes' cost ratio is the geometric mean of their ratios at each batch size: a route 4 % dearer
    at batch 1 and equal at batch 8 is 2 % dearer (to first order) overall."""
    from stitchlib.gate import served_cost

    assert served_cost({1: 0.01, 4: 0.04, 8: 0.5}, [1, 4]) == pytest.approx(0.02, rel=1e-12)
    a, b = {1: 0.0104, 8: 0.02}, {1: 0.01, 8: 0.02}
    assert served_cost(a, [1, 8]) / served_cost(b, [1, 8]) == pytest.approx(1.04 ** 0.5, rel=1e-12)
    assert served_cost(a, [8, 1, 1]) == served_cost(a, [1, 8])
    with pytest.raises(ValueError, match=r"batch size\(s\) \[4\]"):
        served_cost(a, [1, 4])
    with pytest.raises(ValueError, match="no batch sizes"):
        served_cost(a, [])


def test_front_of_prices_a_palette_over_its_common_batch_sizes():
    """What replica, `stitchserve profile` and the benchmark call: anchors found by kind, every stitch
    priced over the batch sizes all were profiled at (a size only some have is left out)."""
    from types import SimpleNamespace as NS

    from stitchlib.gate import front_of
    from stitchlib.types import StitchProfile

    st = [NS(id="small", kind="small", quality=1.0), NS(id="mid", kind="stitch", quality=2.0),
          NS(id="near", kind="stitch", quality=3.0), NS(id="large", kind="large", quality=4.0)]
    # batch 1 alone would route "near" (5 % under large); over 1 and 8 it saves 0.36 %: skipped
    prof = {"small": {1: 0.01, 8: 0.02}, "mid": {1: 0.02, 8: 0.03}, "near": {1: 0.0285, 8: 0.0418},
            "large": {1: 0.03, 8: 0.04, 4: 0.5}}
    profiles = {k: StitchProfile(prefill_s_per_token=0.001, decode_step_s=v) for k, v in prof.items()}
    d = front_of(st, profiles)
    assert {k: (v.routed, v.shadowed_by) for k, v in d.items()} == {
        "small": (True, None), "mid": (True, None), "near": (False, "large"), "large": (True, None)}
    assert d["large"].cost_s == pytest.approx((0.03 * 0.04) ** 0.5, rel=1e-12)  # batch 4 left out
    assert front_of(st, profiles, min_saving=0.0)["near"].routed  # any saving counts at 0
    assert front_of(st, {**profiles, "near": StitchProfile(prefill_s_per_token=0.001, decode_step_s={1: 0.0285, 8: 0.0422})},
                    min_saving=0.0)["near"].shadowed_by == "large"  # 1.001x large
    profiles["mid"] = StitchProfile(prefill_s_per_token=0.001, decode_step_s={2: 0.02})
    with pytest.raises(ValueError, match="no batch size was profiled for every stitch"):
        front_of(st, profiles)
