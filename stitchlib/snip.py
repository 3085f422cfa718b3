"""SNIP importance scores and the task-specific stitch sampler (ESTA section 4.2).

When stitch n is trained, Q_n = sum |w * dL/dw| over the trainable tensors its route touched (the
cheap way: over what already has gradients from that step). Scores are smoothed with an EMA
q_n <- eta q_n + (1 - eta) Q_n. After a uniform warm-up, sampling picks a cost interval uniformly
and then a stitch inside it from softmax(standardised q). Deployment takes the top-score stitch of
every interval plus both anchors; `validated_deploy` then checks that choice on a validation split.
Everything is seeded and its state round-trips for resume.
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch


def snip_score(params: Iterable[torch.Tensor], grads_before: Sequence[torch.Tensor | None] | None = None) -> float:
    """sum |w * g| over `params`; `grads_before` (same order) subtracts gradients accumulated
    earlier in the step so only this backward pass counts."""
    total = 0.0
    for i, p in enumerate(params):
        if p.grad is None:
            continue
        g = p.grad
        if grads_before is not None and grads_before[i] is not None:
            g = g - grads_before[i]
        total += float((p.detach().float() * g.float()).abs().sum())
    return total


def cost_intervals(costs: Sequence[float], n_intervals: int) -> list[int]:
    """Interval index (0..n-1) of each cost, dividing [min, max] into n equal-width intervals."""
    lo, hi = min(costs), max(costs)
    if hi <= lo:
        return [0] * len(costs)
    width = (hi - lo) / n_intervals
    return [min(n_intervals - 1, int((c - lo) / width)) for c in costs]


class SnipSampler:
    def __init__(self, costs: Sequence[float], *, candidates: Sequence[int] | None = None, n_intervals: int = 6,
                 eta: float = 0.9, warmup_steps: int = 100, temperature: float = 1.0, seed: int = 0) -> None:
        """costs: one resource figure (FLOPs or params) per stitch slot; candidates: the slots that
        may be sampled (default all)."""
        if not 0 <= eta < 1:
            raise ValueError(f"eta must be in [0, 1), got {eta}")
        if n_intervals < 1:
            raise ValueError(f"n_intervals must be >= 1, got {n_intervals}")
        self.costs = list(costs)
        self.candidates = list(candidates if candidates is not None else range(len(costs)))
        if not self.candidates:
            raise ValueError("no candidate stitches to sample")
        self.n_intervals = n_intervals
        self.eta, self.warmup_steps, self.temperature = eta, warmup_steps, temperature
        self.interval = cost_intervals(self.costs, n_intervals)
        self.scores: list[float | None] = [None] * len(self.costs)  # None: never measured
        self.counts = [0] * len(self.costs)
        self.step = 0
        self.rng = random.Random(seed)

    def groups(self) -> list[list[int]]:
        """Non-empty intervals, each the candidate slots whose cost falls in it."""
        by: dict[int, list[int]] = {}
        for c in self.candidates:
            by.setdefault(self.interval[c], []).append(c)
        return [by[k] for k in sorted(by)]

    def probabilities(self, group: list[int]) -> list[float]:
        known = [self.scores[c] for c in group if self.scores[c] is not None]
        if not known:
            return [1.0 / len(group)] * len(group)
        # Unmeasured stitches get the best known score so they still get explored.
        q = [self.scores[c] if self.scores[c] is not None else max(known) for c in group]
        mu = sum(q) / len(q)
        sd = math.sqrt(sum((x - mu) ** 2 for x in q) / len(q))
        z = [(x - mu) / (sd + 1e-12) / self.temperature if sd > 0 else 0.0 for x in q]
        m = max(z)
        e = [math.exp(v - m) for v in z]
        return [v / sum(e) for v in e]

    def sample(self) -> int:
        """Next stitch slot to train."""
        if self.step < self.warmup_steps:
            choice = self.rng.choice(self.candidates)
        else:
            group = self.rng.choice(self.groups())
            choice = self.rng.choices(group, weights=self.probabilities(group))[0]
        self.step += 1
        self.counts[choice] += 1
        return choice

    def update(self, slot: int, q: float) -> None:
        """EMA of the SNIP score; the first measurement initialises it (no bias toward zero)."""
        prev = self.scores[slot]
        self.scores[slot] = q if prev is None else self.eta * prev + (1 - self.eta) * q

    def deploy(self, always: Iterable[int] = (), exclude: Iterable[int] = ()) -> list[int]:
        """Top-score stitch of every interval (leaving out `exclude`), plus `always` (the anchors),
        sorted by cost."""
        chosen, skip = set(always), set(exclude)
        for group in self.groups():
            scored = [c for c in group if self.scores[c] is not None and c not in skip]
            if scored:
                chosen.add(max(scored, key=lambda c: (self.scores[c], -self.costs[c])))
        return sorted(chosen, key=lambda c: self.costs[c])

    def state_dict(self) -> dict:
        return {"scores": list(self.scores), "counts": list(self.counts), "step": self.step,
                "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.scores = list(state["scores"])
        self.counts = list(state["counts"])
        self.step = int(state["step"])
        rng = state["rng"]
        # JSON round trips turn the tuple state into lists; random wants tuples back
        self.rng.setstate((rng[0], tuple(rng[1]), rng[2]) if isinstance(rng, list) else rng)


@dataclass
class Deployment:
    slots: list[int]  # deployed, sorted by cost
    quality: dict[int, float]  # every slot evaluated along the way
    rejected: dict[int, float] = field(default_factory=dict)  # top-score stitches that validated below the floor
    dropped_intervals: list[int] = field(default_factory=list)  # intervals left without a route


def validated_deploy(sampler: SnipSampler, quality_of: Callable[[list[int]], dict[int, float]], *, floor_slot: int,
                     always: Sequence[int], tries: int = 3,
                     known: dict[int, float] | None = None) -> Deployment:
    """ESTA deploys the top SNIP score per interval without evaluating it. A score measures how much
    the loss would move, not how good the stitch is, so a stitch that is broken (chance accuracy,
    large gradients) can carry the top score of its interval. The deployed routes are evaluated
    anyway, so check them: a stitch whose validation quality (higher is better) is below that of
    `floor_slot` (the small anchor: cheaper than every stitch, so a stitch below it is never worth
    its route) is replaced by the next score in its interval, up to `tries` stitches per interval;
    an interval whose tries all fail gets no route (its budgets fall to a cheaper route).
    `quality_of(slots)` evaluates slots not seen yet; `known` are results already measured.
    tries=0 turns the check off (ESTA as published)."""
    quality = dict(known or {})

    def measure(slots: Iterable[int]) -> None:
        todo = [s for s in dict.fromkeys(slots) if s not in quality]
        if todo:
            quality.update(quality_of(todo))

    excluded: set[int] = set()
    rejected: dict[int, float] = {}
    failed: dict[int, int] = {}  # interval -> stitches rejected there
    while True:
        slots = sampler.deploy(always=always, exclude=excluded)
        measure([floor_slot, *slots])
        floor = quality[floor_slot]
        bad = [s for s in slots if s not in always and quality[s] < floor]
        if tries == 0 or not bad:
            served = {sampler.interval[s] for s in slots if s not in always}
            return Deployment(slots, quality, rejected, sorted(set(failed) - served))
        for s in bad:
            excluded.add(s)
            rejected[s] = quality[s]
            iv = sampler.interval[s]
            failed[iv] = failed.get(iv, 0) + 1
            if failed[iv] >= tries:  # give the interval up
                excluded.update(c for c in sampler.candidates if sampler.interval[c] == iv)
