"""Quality-gated, Pareto deployment: which stitches of a palette earn their cost.

The product's promise is "a larger budget never buys a worse answer". The router serves, for each
budget, the best-quality deployed route that fits; so the deployed set, ordered by cost, must have
strictly increasing quality. A stitch is deployed only when its quality, measured on a held-out
validation split, lies strictly between the two anchors' and no cheaper deployed route is at least
as good (plus `min_gain`): the Pareto front of quality vs cost, anchored at both ends.

Pure and torch-free: `init_palette` (least-squares palettes) and `adapt` (trained palettes) feed it
their measured rows, and `stitchlib.palette.apply_gate` records its verdict in the manifest.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

# Why a stitch is not deployed (machine-readable; kept in the manifest's `dropped` field).
DropReason = Literal["not_measured", "below_small", "above_large", "dominated"]
DROP_REASONS: tuple[str, ...] = ("not_measured", "below_small", "above_large", "dominated")


@dataclass(frozen=True)
class GateRow:
    """One route of the palette. cost: GFLOPs per token (any monotone cost figure works);
    quality: higher is better, None when the route was not measured."""

    id: str
    cost: float
    quality: float | None
    # per-example quality on the validation split (mean == quality), same examples in the same order
    # for every row: lets the gate ask whether a difference is larger than its noise (`z`)
    samples: tuple[float, ...] | None = None


def paired_se(a: GateRow, b: GateRow) -> float:
    """Standard error of quality(a) - quality(b) from their per-example differences (0 without samples)."""
    if not a.samples or not b.samples or len(a.samples) != len(b.samples) or len(a.samples) < 2:
        return 0.0
    d = [x - y for x, y in zip(a.samples, b.samples)]
    mean = sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / (len(d) - 1)
    return math.sqrt(var / len(d))


@dataclass(frozen=True)
class GateDecision:
    id: str
    cost: float
    quality: float | None
    deployed: bool
    reason: DropReason | None  # None when deployed
    message: str  # one sentence a user can read
    dominated_by: str | None = None  # the cheaper deployed route, for reason "dominated"


@dataclass(frozen=True)
class GateResult:
    decisions: list[GateDecision]  # every candidate, in the order of the walk (cost ascending)
    small_id: str
    large_id: str
    small_quality: float
    large_quality: float
    min_gain: float = 0.0
    z: float = 0.0
    by_id: dict[str, GateDecision] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_id", {d.id: d for d in self.decisions})

    def __getitem__(self, stitch_id: str) -> GateDecision:
        return self.by_id[stitch_id]

    def deployed_ids(self) -> list[str]:
        """Deployed routes, cheapest first (anchors included)."""
        return [d.id for d in self.decisions if d.deployed]

    def dropped(self) -> list[GateDecision]:
        return [d for d in self.decisions if not d.deployed]

    @property
    def anchors_inverted(self) -> bool:
        """The large anchor measured no better than the small one: no stitch can lie between them,
        and the two anchors alone break "more budget, better answer" (the gate keeps them anyway)."""
        return self.large_quality <= self.small_quality


def _q(x: float) -> str:
    return f"{x:.4g}"


# Screening drops a route whose mean is below the small anchor's by more than this many standard
# errors on the first slice of the validation split: a stitch that far behind after a few dozen
# examples has a few percent chance of later beating the small anchor by the deployment margin
# (2 standard errors on the whole split), and dropping a route never breaks the promise, it only
# loses a candidate. See `screen`.
SCREEN_Z = 1.0


def screen(candidates: Sequence[GateRow], *, small_id: str = "small", large_id: str = "large",
           z: float = SCREEN_Z) -> tuple[list[str], list[GateDecision]]:
    """First stage of a two-stage validation: which routes are worth measuring on the rest of the split.

    `candidates` were measured on a first slice of the validation examples (per-example `samples`).
    Returns (ids to keep measuring: both anchors and every stitch not clearly worse than the small
    anchor, cost order; decisions for the rest: `below_small`, noting the screen). The survivors go
    on to `select_deployment` with their samples over the whole split, which alone decides deployment;
    the screened ones join its result through `prior`. Measuring only the survivors is what makes a
    larger validation split affordable: on the Qwen pair ~2/3 of least-squares stitches are far below
    the small anchor and cost most of the measuring time (benchmarks/CHAT_INIT.md)."""
    rows = {r.id: r for r in candidates}
    for aid in (small_id, large_id):
        if aid not in rows or rows[aid].quality is None:
            raise ValueError(f"screening needs the anchor {aid!r} measured")
    small = rows[small_id]
    qs = float(small.quality)
    keep, dropped = [], []
    for r in sorted(candidates, key=lambda r: (r.cost, r.id)):
        if r.id in (small_id, large_id) or r.quality is None or not math.isfinite(r.quality):
            keep.append(r.id)  # anchors always; unmeasured rows are the gate's to report
            continue
        m = z * paired_se(r, small)
        if r.quality < qs - m:
            n = len(r.samples or ())
            dropped.append(GateDecision(
                r.id, r.cost, r.quality, False, "below_small",
                f"quality {_q(r.quality)} on the first {n} validation examples is below the small anchor's "
                f"{_q(qs)} by more than {_q(m)} ({_q(z)} standard errors of the paired difference): screened "
                "out before the rest of the split (it costs more for no better answer)"))
        else:
            keep.append(r.id)
    return keep, dropped


def select_deployment(candidates: Sequence[GateRow], *, small_id: str = "small", large_id: str = "large",
                      min_gain: float = 0.0, z: float = 0.0,
                      prior: Sequence[GateDecision] = ()) -> GateResult:
    """Gate and Pareto-select `candidates` (every route to consider, both anchors included).

    Walk the stitches by cost ascending, starting from the small anchor as the best route so far:
      - not measured: dropped (`not_measured`); an unmeasured route cannot promise anything;
      - quality <= the small anchor's: dropped (`below_small`); it costs more for no better answer;
      - quality >= the large anchor's: dropped (`above_large`); it would make the large anchor a
        worse buy than a cheaper route, so it cannot sit between the anchors (usually a noisy
        validation split or an undertrained large anchor: the stitch is suspicious, not a win);
      - quality <= best so far + min_gain: dropped (`dominated`, naming that cheaper route);
      - else deployed, and it becomes the best so far.
    With per-example `samples` and z > 0, "above" means above by more than z standard errors of the
    paired difference (on the same validation examples): a stitch must beat the small anchor, and the
    best cheaper deployed route, by more than the validation split's noise. A 40-example split moves a
    stitch's mean NLL by a few hundredths, as much as least-squares stitches differ from the small
    anchor, so without it the gate would deploy noise (benchmarks/CHAT_INIT.md).
    Both anchors are always deployed: they bound every budget and serving needs them.
    Ties in cost are walked best quality first, so of two equally cheap routes the worse one is
    dominated by the other. `prior`: decisions already taken on routes not among `candidates` (the
    routes `screen` dropped); they join the result in cost order and never count as deployed.
    Raises ValueError when an anchor is missing or unmeasured.
    """
    if not (min_gain >= 0 and math.isfinite(min_gain)):
        raise ValueError(f"min_gain must be a finite number >= 0, got {min_gain}")
    if not (z >= 0 and math.isfinite(z)):
        raise ValueError(f"z must be a finite number >= 0, got {z}")
    rows = {r.id: r for r in candidates}
    if len(rows) != len(candidates):
        raise ValueError("candidate ids must be unique")
    for role, aid in (("small", small_id), ("large", large_id)):
        if aid not in rows:
            raise ValueError(f"the {role} anchor {aid!r} is not among the candidates")
        q = rows[aid].quality
        if q is None or not math.isfinite(q):
            raise ValueError(f"the {role} anchor {aid!r} has no measured quality: the gate needs both anchors' "
                             "quality to place a stitch between them")
    small = rows[small_id]
    qs, ql = float(small.quality), float(rows[large_id].quality)  # checked above

    def measured(r: GateRow) -> bool:
        return r.quality is not None and math.isfinite(r.quality)

    # The small anchor opens the walk whatever its cost (it is the floor every stitch must beat);
    # unmeasured rows sort last within their cost so they never shadow a measured equal-cost one.
    rest = sorted((r for r in candidates if r.id != small_id),
                  key=lambda r: (r.cost, 0 if measured(r) else 1, -r.quality if measured(r) else 0.0, r.id))
    decisions = [GateDecision(small.id, small.cost, qs, True, None, "small anchor: always deployed")]
    best_id, best_q, best_cost = small.id, qs, small.cost  # the best deployed route so far

    def margin(r: GateRow, other: str) -> tuple[float, str]:
        """How far above `other` r must be to count as better, and its wording ('' when 0)."""
        m = z * paired_se(r, rows[other])
        return m, (f" by more than {_q(m)} ({_q(z)} standard errors of the paired difference)" if m else "")

    for r in rest:
        if r.id == large_id:
            decisions.append(GateDecision(r.id, r.cost, ql, True, None, "large anchor: always deployed"))
            if ql > best_q:
                best_id, best_q, best_cost = r.id, ql, r.cost
            continue
        if not measured(r):
            decisions.append(GateDecision(r.id, r.cost, None, False, "not_measured",
                                          "not measured on the validation split, so its quality is unknown"))
            continue
        q = float(r.quality)
        m_small, why_small = margin(r, small_id)
        if q <= qs + m_small:
            decisions.append(GateDecision(r.id, r.cost, q, False, "below_small",
                                          f"quality {_q(q)} is not above the small anchor's {_q(qs)}{why_small} "
                                          "(it costs more for no better answer)"))
        elif q >= ql:
            decisions.append(GateDecision(r.id, r.cost, q, False, "above_large",
                                          f"quality {_q(q)} is not below the large anchor's {_q(ql)}, so it is not "
                                          "between the anchors (suspicious: a noisy validation split or an "
                                          "undertrained large anchor)"))
        elif q <= best_q + min_gain + (m_best := margin(r, best_id))[0]:
            gain = f" + min_gain {_q(min_gain)}" if min_gain else ""
            decisions.append(GateDecision(r.id, r.cost, q, False, "dominated",
                                          f"quality {_q(q)} is not above {best_id}'s {_q(best_q)}{gain}{m_best[1]}, and "
                                          f"{best_id} costs no more ({_q(best_cost)} vs {_q(r.cost)} GFLOPs)",
                                          dominated_by=best_id))
        else:
            decisions.append(GateDecision(r.id, r.cost, q, True, None,
                                          f"quality {_q(q)} is between the anchors' ({_q(qs)} .. {_q(ql)}) and "
                                          "above every cheaper deployed route"))
            best_id, best_q, best_cost = r.id, q, r.cost
    if prior:
        clash = {d.id for d in prior} & set(rows)
        if clash or any(d.deployed for d in prior):
            raise ValueError(f"prior decisions must be drops of routes not among the candidates: {sorted(clash)}")
        decisions = sorted(decisions + list(prior), key=lambda d: (d.cost, d.id not in (small_id, large_id)))
    return GateResult(decisions, small_id, large_id, qs, ql, min_gain, z)


# ---- the served front: the same promise priced in the served mode's measured latency -------------------
@dataclass(frozen=True)
class ServedRoute:
    """A deployed route as a replica measured it. quality: the figure the router maximises (higher is
    better); cost_s: measured seconds per decode step in the served mode (dtype, quantization, device) on
    this machine (`served_cost`: over the profiled batch sizes)."""

    id: str
    quality: float
    cost_s: float


@dataclass(frozen=True)
class FrontDecision:
    id: str
    quality: float
    cost_s: float
    routed: bool
    shadowed_by: str | None  # the better route that costs no more than (1 - min_saving) less, when not routed
    message: str


# Default `min_saving`: a route is budget-routed only when it measures at least this share cheaper than
# every better route. On the Qwen pair under the quickstart's weights the closest real savings are s0-l1
# vs the large anchor (about none) and s7-l9 vs s6-l7 (-4 to -5 %). In 12 start-up profiles of 16
# interleaved steps their ratios spread by ~0.6 % (standard deviation; 8 steps: 0.8-1.7 %), so 2 % is
# 3-4 of them from either; one profile of the 12, disturbed, had them at -7 and -12 % (benchmarks/QUANT.md
# 3.6). Erring towards routing matters more: a stitch wrongly skipped sends its budgets to a cheaper route.
MIN_SAVING = 0.02


def served_cost(decode_step_s: Mapping[int, float], batch_sizes: Iterable[int]) -> float:
    """The cost `served_front` compares: the geometric mean of a route's profiled seconds per decode step
    over `batch_sizes` (those every route was profiled at). Each batch size is a measurement of its own,
    so the ratio of two routes' costs is the geometric mean of their ratios at every batch size: with
    four sizes about half the noise of batch 1 alone (benchmarks/QUANT.md 3.7), and a route is judged
    at the loads the profile covers."""
    sizes = sorted(set(batch_sizes))
    if not sizes:
        raise ValueError("no batch sizes to price a route at")
    missing = [b for b in sizes if b not in decode_step_s]
    if missing:
        raise ValueError(f"no profiled decode step at batch size(s) {missing}")
    return math.exp(sum(math.log(decode_step_s[b]) for b in sizes) / len(sizes))


def served_front(routes: Sequence[ServedRoute], *, small_id: str, large_id: str,
                 min_saving: float = MIN_SAVING) -> list[FrontDecision]:
    """Which deployed routes budgets are routed to, given what each costs in the served mode.

    The palette's gate (`select_deployment`) priced routes in FLOPs when the palette was built; the
    served mode prices them again. Under int4-width weights a stitch that saves one block of FLOPs
    may read as many bytes as the larger route above it, and then a request routed there pays the larger
    route's time for a worse answer. So, best quality first: the large anchor is routed; every other
    route is routed only when it is cheaper than the cheapest better routed route by at least
    `min_saving` of that route's cost, else it is shadowed by that route (still served when pinned
    by X-Stitch-Id). The small anchor is always routed: it is the floor every budget falls back on.
    Equal quality: the cheaper first. Returns one decision per route, in the order given."""
    if not (0 <= min_saving < 1 and math.isfinite(min_saving)):
        raise ValueError(f"min_saving must lie in [0, 1), got {min_saving}")
    ids = [r.id for r in routes]
    if len(set(ids)) != len(ids):
        raise ValueError("route ids must be unique")
    for aid in (small_id, large_id):
        if aid not in ids:
            raise ValueError(f"the anchor {aid!r} is not among the routes")
    bad = [r.id for r in routes if not (math.isfinite(r.cost_s) and r.cost_s > 0 and math.isfinite(r.quality))]
    if bad:
        raise ValueError(f"routes without a finite positive cost and a finite quality: {', '.join(bad)}")
    out: dict[str, FrontDecision] = {}
    ceiling: ServedRoute | None = None  # the cheapest routed route better than the ones still to walk
    order = sorted(routes, key=lambda r: (r.id != large_id, -r.quality, r.cost_s, r.id))
    for r in order:
        ms = f"{r.cost_s * 1e3:.4g} ms"
        if r.id in (small_id, large_id):
            out[r.id] = FrontDecision(r.id, r.quality, r.cost_s, True, None,
                                      f"{'small' if r.id == small_id else 'large'} anchor ({ms}): always routed")
        elif ceiling is not None and r.cost_s > (1 - min_saving) * ceiling.cost_s:
            out[r.id] = FrontDecision(
                r.id, r.quality, r.cost_s, False, ceiling.id,
                f"measures {ms} per decode step, not {min_saving:.0%} under {ceiling.id}'s "
                f"{ceiling.cost_s * 1e3:.4g} ms, which answers better: budgets go to {ceiling.id} or a cheaper "
                "route instead (X-Stitch-Id still reaches it)")
            continue
        else:
            out[r.id] = FrontDecision(r.id, r.quality, r.cost_s, True, None,
                                      f"{ms} per decode step: cheaper than every better route by at least "
                                      f"{min_saving:.0%}")
        if ceiling is None or r.cost_s < ceiling.cost_s:
            ceiling = r
    return [out[i] for i in ids]


def front_of(stitches: Sequence, profiles: Mapping, *, min_saving: float = MIN_SAVING) -> dict[str, FrontDecision]:
    """`served_front` of a palette's deployed stitches (objects with `id`, `kind` and `quality`, e.g.
    `stitchlib.runtime.StitchInfo`) from their profile (`StitchProfile`s by id), priced by `served_cost`
    over the batch sizes every stitch was profiled at: what a replica, `stitchserve profile` and the
    benchmarks decide. Raises ValueError when no batch size is common to every stitch."""
    sizes = set.intersection(*(set(profiles[s.id].decode_step_s) for s in stitches)) if stitches else set()
    if not sizes:
        raise ValueError("no batch size was profiled for every stitch")
    routes = [ServedRoute(s.id, s.quality, served_cost(profiles[s.id].decode_step_s, sizes)) for s in stitches]
    small = next(s.id for s in stitches if s.kind == "small")
    large = next(s.id for s in stitches if s.kind == "large")
    return {d.id: d for d in served_front(routes, small_id=small, large_id=large, min_saving=min_saving)}
