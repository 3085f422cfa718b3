"""Small statistics shared by the benchmark scripts (no numpy/scipy needed for these)."""
from __future__ import annotations

import statistics


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman rank correlation (ties broken by position: the inputs here are measured floats)."""
    def ranks(v: list[float]) -> list[float]:
        r = [0.0] * len(v)
        for pos, i in enumerate(sorted(range(len(v)), key=lambda i: v[i])):
            r[i] = float(pos)
        return r

    rx, ry = ranks(x), ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    return cov / (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
