"""The stitch router (stitch selection; "router" in this project always means this, the HTTP layer is
the ingress): given each deployed stitch's static costs and its latency estimates on this replica
(under the current load), pick the best-quality stitch that fits a `Budget`. Pure functions, no Ray,
no clocks: the replica feeds it numbers, tests feed it numbers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .budget import Budget

PercentBasis = Literal["gflops", "params", "latency"]


@dataclass(frozen=True)
class StitchCandidate:
    """One deployed stitch as the router sees it at the moment of a request."""

    id: str
    params: int
    gflops: float  # forward GFLOPs per token (palette figure)
    quality: float  # higher is better (palette eval metric, or size when unknown)
    token_latency_s: float  # estimated seconds per output token now (classify: per request)
    request_latency_s: float  # estimated seconds for this whole request now


@dataclass(frozen=True)
class RouteDecision:
    stitch: StitchCandidate
    budget_met: bool
    violated: tuple[str, ...] = ()  # the budget terms the chosen stitch breaks (empty when met)

    @property
    def stitch_id(self) -> str:
        return self.stitch.id


@dataclass(frozen=True)
class NoStitchFits:
    """Error value: a strict budget that no deployed stitch meets (HTTP 422 at the ingress)."""

    budget: Budget
    cheapest: StitchCandidate
    violated: tuple[str, ...] = field(default=())

    @property
    def message(self) -> str:
        return (f"no deployed stitch meets X-Compute-Budget {self.budget.to_header()!r}; the cheapest, "
                f"{self.cheapest.id!r}, breaks: {', '.join(self.violated)}")


def _cost(c: StitchCandidate, basis: PercentBasis) -> float:
    return {"gflops": c.gflops, "params": float(c.params), "latency": c.token_latency_s}[basis]


def violations(c: StitchCandidate, budget: Budget, largest_cost: float,
               basis: PercentBasis = "gflops") -> tuple[str, ...]:
    """The budget terms that `c` breaks, as readable strings; empty when it fits."""
    out = []
    if budget.token_latency_s is not None and c.token_latency_s > budget.token_latency_s:
        out.append(f"latency {c.token_latency_s * 1e3:.3g}ms/token > {budget.token_latency_s * 1e3:.3g}ms/token")
    if budget.request_latency_s is not None and c.request_latency_s > budget.request_latency_s:
        out.append(f"request latency {c.request_latency_s:.3g}s > {budget.request_latency_s:.3g}s")
    if budget.flops_per_token is not None and c.gflops * 1e9 > budget.flops_per_token:
        out.append(f"{c.gflops:.4g}GFLOPs > {budget.flops_per_token / 1e9:.4g}GFLOPs")
    if budget.params is not None and c.params > budget.params:
        out.append(f"{c.params / 1e6:.4g}M params > {budget.params / 1e6:.4g}M")
    if budget.fraction is not None and _cost(c, basis) > budget.fraction * largest_cost * (1 + 1e-9):
        out.append(f"{_cost(c, basis) / largest_cost:.1%} of the largest stitch's {basis} > {budget.fraction:.1%}")
    return tuple(out)


def cheapest(candidates: list[StitchCandidate]) -> StitchCandidate:
    return min(candidates, key=lambda c: (c.gflops, c.params, c.token_latency_s))


def select_stitch(candidates: list[StitchCandidate], budget: Budget, *, strict: bool = False,
                  percent_basis: PercentBasis = "gflops") -> RouteDecision | NoStitchFits:
    """Best quality among the stitches that fit (ties: the cheaper one). None fits: the cheapest with
    `budget_met=False`, or a `NoStitchFits` value when `strict`."""
    if not candidates:
        raise ValueError("no stitches to route to")
    largest = max(_cost(c, percent_basis) for c in candidates)
    fitting = [c for c in candidates if not violations(c, budget, largest, percent_basis)]
    if fitting:
        best = max(fitting, key=lambda c: (c.quality, -c.gflops, -c.token_latency_s))
        return RouteDecision(best, True)
    low = cheapest(candidates)
    broken = violations(low, budget, largest, percent_basis)
    if strict:
        return NoStitchFits(budget, low, broken)
    return RouteDecision(low, False, broken)
