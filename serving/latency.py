"""Latency estimates per stitch on this replica: start-up profile x online correction x current load.

Model (all times in seconds; B = max batch size, C = concurrent batches per stitch):
  * `step(s, b)`: the profiled decode-step time of stitch s at batch size b, interpolated between the
    profiled sizes, made non-decreasing in b (a smaller time at a larger batch means the smaller-batch
    figure was noise), extrapolated linearly past the largest profiled size.
  * Online correction: every observed step updates an EWMA of observed / predicted, per stitch, with a
    replica-wide EWMA as the fallback for stitches not yet used. Observed step times are pure compute
    (timed around the engine call), so load is not counted twice.
  * Load: one executor thread runs every stitch's steps in turn, so a token of stitch s waits for one
    step of every other stitch that has work: token(s) = c_s step(s, b_s) + sum_{s' busy} c_s' step(s', b_s'),
    b = min(active + 1, B). A request beyond B x C in-flight rows on its stitch waits whole rounds.
"""
from __future__ import annotations

import bisect
import math
import threading
from dataclasses import dataclass
from typing import Literal

Task = Literal["chat", "classify"]

RATIO_CLIP = (0.05, 20.0)  # a single observation moves the correction at most this far


def monotone_profile(decode_step_s: dict[int, float]) -> dict[int, float]:
    """Make step time non-decreasing in batch size by taking the suffix minimum."""
    sizes = sorted(decode_step_s)
    out: dict[int, float] = {}
    low = math.inf
    for b in reversed(sizes):
        low = min(low, decode_step_s[b])
        out[b] = low
    return dict(sorted(out.items()))


def interpolate_step(decode_step_s: dict[int, float], batch: int) -> float:
    """decode_step_s: {batch size: seconds}, monotone. -> seconds per step at `batch`."""
    sizes = sorted(decode_step_s)
    if batch <= sizes[0]:
        return decode_step_s[sizes[0]]
    if batch >= sizes[-1]:
        if len(sizes) == 1:
            return decode_step_s[sizes[0]]
        b0, b1 = sizes[-2], sizes[-1]
        slope = max(0.0, (decode_step_s[b1] - decode_step_s[b0]) / (b1 - b0))
        return decode_step_s[b1] + slope * (batch - b1)
    i = bisect.bisect_left(sizes, batch)
    if sizes[i] == batch:
        return decode_step_s[batch]
    b0, b1 = sizes[i - 1], sizes[i]
    w = (batch - b0) / (b1 - b0)
    return (1 - w) * decode_step_s[b0] + w * decode_step_s[b1]


class Ewma:
    def __init__(self, alpha: float, value: float | None = None) -> None:
        self.alpha = alpha
        self.value = value
        self.count = 0

    def update(self, x: float) -> float:
        self.value = x if self.value is None else self.alpha * x + (1 - self.alpha) * self.value
        self.count += 1
        return self.value


@dataclass(frozen=True)
class LatencyEstimate:
    token_s: float  # per output token (classify: per request)
    request_s: float  # whole request, queueing included
    prefill_s: float
    queue_s: float


class LatencyTracker:
    """Thread-safe: the engine thread records observations while the event loop asks for estimates."""

    def __init__(self, profiles: dict[str, tuple[float, dict[int, float]]], *, max_batch_size: int,
                 max_concurrent_batches: int = 1, alpha: float = 0.2, default_output_tokens: int = 16) -> None:
        if not profiles:
            raise ValueError("no stitch profiles")
        self.prefill_s_per_token = {s: float(p) for s, (p, _) in profiles.items()}
        self.decode_step_s = {s: monotone_profile(d) for s, (_, d) in profiles.items()}
        self.B = max_batch_size
        self.C = max_concurrent_batches
        self._decode_corr = {s: Ewma(alpha) for s in profiles}
        self._prefill_corr = {s: Ewma(alpha) for s in profiles}
        self._global_decode = Ewma(alpha, 1.0)
        self._global_prefill = Ewma(alpha, 1.0)
        self._out_tokens = Ewma(alpha, float(default_output_tokens))
        self.active = {s: 0 for s in profiles}
        self._lock = threading.Lock()

    # ---- load ----------------------------------------------------------------------------------
    def begin(self, stitch: str) -> None:
        with self._lock:
            self.active[stitch] += 1

    def end(self, stitch: str, output_tokens: int | None = None) -> None:
        with self._lock:
            self.active[stitch] = max(0, self.active[stitch] - 1)
            if output_tokens is not None and output_tokens > 0:
                self._out_tokens.update(float(output_tokens))

    @property
    def queue_depth(self) -> int:
        return sum(self.active.values())

    # ---- observations --------------------------------------------------------------------------
    def correction(self, stitch: str, kind: Literal["decode", "prefill"] = "decode") -> float:
        own = (self._decode_corr if kind == "decode" else self._prefill_corr)[stitch]
        glob = self._global_decode if kind == "decode" else self._global_prefill
        return own.value if own.value is not None else glob.value  # type: ignore[return-value]

    @staticmethod
    def _update(own: Ewma, glob: Ewma, ratio: float) -> None:
        if own.value is None:  # a stitch's first observation starts from the replica-wide figure
            own.value = glob.value
        own.update(ratio)
        glob.update(ratio)

    def observe_decode(self, stitch: str, batch: int, seconds: float) -> None:
        pred = interpolate_step(self.decode_step_s[stitch], batch)
        if pred <= 0 or seconds <= 0:
            return
        r = min(max(seconds / pred, RATIO_CLIP[0]), RATIO_CLIP[1])
        with self._lock:
            self._update(self._decode_corr[stitch], self._global_decode, r)

    def observe_prefill(self, stitch: str, tokens: int, seconds: float) -> None:
        pred = self.prefill_s_per_token[stitch] * tokens
        if pred <= 0 or seconds <= 0:
            return
        r = min(max(seconds / pred, RATIO_CLIP[0]), RATIO_CLIP[1])
        with self._lock:
            self._update(self._prefill_corr[stitch], self._global_prefill, r)

    # ---- estimates -----------------------------------------------------------------------------
    def step_s(self, stitch: str, batch: int) -> float:
        """Corrected decode-step time of `stitch` at `batch`, without load from other stitches."""
        return self.correction(stitch) * interpolate_step(self.decode_step_s[stitch], batch)

    def estimate(self, stitch: str, *, prompt_tokens: int, max_tokens: int = 1, task: Task = "chat",
                 batch_rows: int = 1) -> LatencyEstimate:
        """What a new request of `batch_rows` rows would see on `stitch` now."""
        with self._lock:
            active = dict(self.active)
            out_tokens = self._out_tokens.value or 1.0
        n = active[stitch]
        b = min(n + batch_rows, self.B)
        others = sum(self.step_s(s, min(k, self.B)) for s, k in active.items() if k > 0 and s != stitch)
        prefill = (self.correction(stitch, "prefill") * self.prefill_s_per_token[stitch]
                   * max(prompt_tokens, 1) * b) + others
        # whole rounds of B x C rows already ahead of us on this stitch
        rounds = max(0, math.ceil((n + batch_rows) / (self.B * self.C)) - 1)
        if task == "classify":
            per_round = prefill
            queue = rounds * per_round
            total = queue + prefill
            return LatencyEstimate(token_s=total, request_s=total, prefill_s=prefill, queue_s=queue)
        token = self.step_s(stitch, b) + others
        queue = rounds * (prefill + out_tokens * token)
        total = queue + prefill + max(max_tokens - 1, 0) * token
        return LatencyEstimate(token_s=token, request_s=total, prefill_s=prefill, queue_s=queue)
