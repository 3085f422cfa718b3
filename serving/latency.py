"""Latency estimates per stitch on this replica: start-up profile x online correction x current load.

The replica decodes with mixed-stitch continuous batching (`serving/engine_thread.py`): ONE engine step
decodes every running row, whatever its stitch, and a decoder block runs once for all rows that
need it. Model (all times in seconds; M = engine slots, i.e. rows decoded together):

  * `step(s, b)`: the profiled decode-step time of stitch s alone at batch size b, interpolated
    between the profiled sizes, made non-decreasing in b (a smaller time at a larger batch means the
    smaller-batch figure was noise), extrapolated linearly past the largest profiled size.
  * A step decoding rows R = {stitch: rows} reads the UNION of the weight parts of R's stitches once
    (decode is bandwidth bound: its time follows the bytes it reads), so

        step(R) = c_ref x step(ref, |R|) x size(union of R's parts) / size(ref)

    with ref the stitch of R with the most weight (its profile covers most of the union, so it needs
    the smallest extrapolation; on a single-stitch step this is exactly c_s x step(s, b)).
    `parts[s]` names each weight part s runs (`stitchlib.space.stitch_parts`: blocks, stitching
    layer, head) with its size; parts with the same name are shared. Without parts every stitch is
    one part of its own: nothing is shared and a mixed step costs the sum of its stitches.
  * Online correction c_s: every observed step updates an EWMA of observed / predicted for each
    stitch in it (decode and prefill separately), with a replica-wide EWMA as the fallback for
    stitches not yet used. A step that both decodes and admits (prefills) requests is split by the
    corrected predictions of its two parts, scaled by the same observed/predicted factor. Observed
    times are pure compute (timed around the engine call), so load is not counted twice.
  * Load: a new request on stitch s joins the rows in flight (`active`, per stitch): every token it
    gets costs one step of R = active + {s: 1}, with |R| capped at M. Rows beyond M wait for a slot;
    a slot frees about every out_tokens / M steps (M rows each needing ~out_tokens tokens), so
    waiting for k slots takes ~k x out_tokens / M steps. Its first token comes after its prefill
    plus one decode step of the rows already running per step the prefill spans: one step, or
    ceil(prompt / prefill_chunk) steps with chunked prefill.
  * Prefill interference: every prompt admitted while a request decodes is prefilled in a step that
    also decodes the running rows, so each of its prefill seconds delays every running row's next
    token by as much. The tracker keeps the prefill seconds of the last `prefill_window_s` seconds of
    steps (the prefill part of each step, split as for the corrections): u = their share of the
    window. Decode then gets 1 - u of the engine's time, so a token costs step / (1 - u), u capped at
    PREFILL_SHARE_CAP. (Mean arrivals: the realized margin covers their tail.)
  * Per-request overhead: what a request's first token costs beyond the queue and prefill priced
    above (the wait for the engine step in progress when it arrives, the Ray hop into the replica,
    tokenizing, a prefill the 32-token start-up profile misprices). Each finished generation records
    observed - estimated seconds to its first token, and every estimate adds their EWMA (never below
    0) once: to the whole-request latency, not per token.
  * Realized margin (optional, `budget_quantile`): the terms above price a request at the moment it
    is admitted; what it then gets also depends on what arrives after it (rows that join its steps,
    prompts prefilled between its tokens). Each finished generation records observed / predicted
    for its per-token and its whole-request latency; `margin(kind, q)` is the q-quantile of the
    recent ratios (1 until enough are seen), and the router compares `estimate x margin` with a
    latency budget, so a request is downgraded (or refused under `strict`) when it is admitted rather
    than served late. The estimates themselves stay unscaled, so the ratios measure the model.
  * Classification runs one batch (`@serve.batch`, up to M rows of one stitch) at a time on the same
    engine thread: a request waits for the other stitches' busy batches and for whole batches of its
    own stitch ahead of it.
"""
from __future__ import annotations

import bisect
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

Task = Literal["chat", "classify"]

RATIO_CLIP = (0.05, 20.0)  # a single observation moves the correction at most this far
MARGIN_CLIP = (0.5, 10.0)  # the realized margin never prices a stitch below half or above 10x its estimate
MARGIN_MIN_SAMPLES = 20  # ratios needed before the margin departs from 1
PREFILL_SHARE_CAP = 0.8  # prefill interference never prices a token above 5x its decode step
OVERHEAD_CAP_S = 30.0  # one request's first-token excess moves the overhead EWMA at most this far


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
    overhead_s: float = 0.0  # learned first-token cost beyond queue + prefill (in request_s)


def _clip(ratio: float) -> float:
    return min(max(ratio, RATIO_CLIP[0]), RATIO_CLIP[1])


class LatencyTracker:
    """Thread-safe: observations and estimates may come from different threads."""

    def __init__(self, profiles: dict[str, tuple[float, dict[int, float]]], *, max_slots: int,
                 parts: Mapping[str, Mapping[str, float]] | None = None, alpha: float = 0.2,
                 default_output_tokens: int = 16, prefill_chunk: int | None = None,
                 margin_window: int = 256, prefill_window_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not profiles:
            raise ValueError("no stitch profiles")
        self.prefill_s_per_token = {s: float(p) for s, (p, _) in profiles.items()}
        self.decode_step_s = {s: monotone_profile(d) for s, (_, d) in profiles.items()}
        self.M = max_slots
        self.prefill_chunk = prefill_chunk
        self.parts = {s: dict(parts[s]) if parts is not None else {s: 1.0} for s in profiles}
        self.size = {s: float(sum(p.values())) for s, p in self.parts.items()}
        if any(v <= 0 for v in self.size.values()):
            raise ValueError("every stitch needs weight parts of positive size")
        self._decode_corr = {s: Ewma(alpha) for s in profiles}
        self._prefill_corr = {s: Ewma(alpha) for s in profiles}
        self._global_decode = Ewma(alpha, 1.0)
        self._global_prefill = Ewma(alpha, 1.0)
        self._out_tokens = Ewma(alpha, float(default_output_tokens))
        self._prefill_log: deque[tuple[float, float]] = deque()  # (when, prefill seconds) of recent steps
        self.prefill_window_s = prefill_window_s
        self._clock = clock
        self._overhead = Ewma(alpha)  # the first request's excess is taken whole, like the corrections
        self.active = {s: 0 for s in profiles}
        self._realized: dict[str, deque[float]] = {"token": deque(maxlen=margin_window),
                                                   "request": deque(maxlen=margin_window)}
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

    # ---- the mixed-step model ------------------------------------------------------------------
    def union_size(self, stitches: list[str]) -> float:
        """Size of the union of the stitches' weight parts (a shared part counts once)."""
        union: dict[str, float] = {}
        for s in stitches:
            union.update(self.parts[s])
        return float(sum(union.values()))

    def _reference(self, stitches: list[str]) -> str:
        return max(stitches, key=lambda s: (self.size[s], self.decode_step_s[s][min(self.decode_step_s[s])], s))

    def predict_step(self, rows: Mapping[str, int]) -> tuple[float, str]:
        """Uncorrected seconds of one decode step of `rows` (stitch -> rows), and its reference stitch."""
        present = [s for s, k in rows.items() if k > 0]
        if not present:
            raise ValueError("a step needs at least one row")
        ref = self._reference(present)
        n = min(sum(rows[s] for s in present), self.M)  # rows beyond the slots wait, they do not decode
        return interpolate_step(self.decode_step_s[ref], n) * self.union_size(present) / self.size[ref], ref

    def step_s(self, rows: Mapping[str, int]) -> float:
        """Corrected seconds of one decode step of `rows` (stitch -> rows); 0 for no rows."""
        if not any(k > 0 for k in rows.values()):
            return 0.0
        pred, ref = self.predict_step(rows)
        return self.correction(ref) * pred

    # ---- observations --------------------------------------------------------------------------
    def correction(self, stitch: str, kind: Literal["decode", "prefill"] = "decode") -> float:
        own = (self._decode_corr if kind == "decode" else self._prefill_corr)[stitch]
        glob = self._global_decode if kind == "decode" else self._global_prefill
        return own.value if own.value is not None else glob.value  # type: ignore[return-value]

    @staticmethod
    def _update(owns: list[Ewma], glob: Ewma, ratio: float) -> None:
        for own in owns:
            if own.value is None:  # a stitch's first observation starts from the replica-wide figure
                own.value = glob.value
            own.update(ratio)
        glob.update(ratio)

    def observe_step(self, seconds: float, decode_rows: Mapping[str, int],
                     prefill_tokens: Mapping[str, int] | None = None) -> None:
        """One engine step: `decode_rows` (stitch -> rows decoded) and `prefill_tokens` (stitch ->
        padded prompt tokens of the requests it admitted) took `seconds` together."""
        decode = {s: k for s, k in decode_rows.items() if k > 0}
        prefill = {s: t for s, t in (prefill_tokens or {}).items() if t > 0}
        if seconds <= 0 or not (decode or prefill):
            return
        with self._lock:
            pred_d, ref = self.predict_step(decode) if decode else (0.0, None)
            pred_p = {s: self.prefill_s_per_token[s] * t for s, t in prefill.items()}
            c_d = self.correction(ref) if ref is not None else 1.0
            c_p = {s: self.correction(s, "prefill") for s in prefill}
            expected = c_d * pred_d + sum(c_p[s] * pred_p[s] for s in prefill)
            if expected <= 0:
                return
            # How far off this step was; every part is scaled by it (for a step with one part this is
            # plain observed / profiled).
            k = seconds / expected
            if prefill:
                self._prefill_log.append((self._clock(), k * sum(c_p[s] * pred_p[s] for s in prefill)))
            if decode:
                self._update([self._decode_corr[s] for s in decode], self._global_decode, _clip(c_d * k))
            for s in prefill:
                self._update([self._prefill_corr[s]], self._global_prefill, _clip(c_p[s] * k))

    def prefill_share(self) -> float:
        """Share of the last `prefill_window_s` seconds the engine spent prefilling (capped)."""
        with self._lock:
            return self._prefill_share()

    def _prefill_share(self) -> float:
        start = self._clock() - self.prefill_window_s
        while self._prefill_log and self._prefill_log[0][0] < start:
            self._prefill_log.popleft()
        return min(sum(x for _, x in self._prefill_log) / self.prefill_window_s, PREFILL_SHARE_CAP)

    def observe_decode(self, stitch: str, batch: int, seconds: float) -> None:
        self.observe_step(seconds, {stitch: batch})

    def observe_prefill(self, stitch: str, tokens: int, seconds: float) -> None:
        self.observe_step(seconds, {}, {stitch: tokens})

    # ---- realized margin -----------------------------------------------------------------------
    def observe_request(self, *, predicted_token_s: float | None = None, observed_token_s: float | None = None,
                        predicted_request_s: float | None = None, observed_request_s: float | None = None,
                        predicted_first_s: float | None = None, observed_first_s: float | None = None) -> None:
        """A finished generation: what it was estimated at admission (unscaled) and what it got.
        `predicted_first_s`: the estimate's queue + prefill (without the overhead term);
        `observed_first_s`: seconds from admission to its first token."""
        with self._lock:
            if predicted_first_s is not None and observed_first_s is not None and math.isfinite(observed_first_s):
                self._overhead.update(min(max(observed_first_s - predicted_first_s, -OVERHEAD_CAP_S), OVERHEAD_CAP_S))
            for kind, pred, obs in (("token", predicted_token_s, observed_token_s),
                                    ("request", predicted_request_s, observed_request_s)):
                if pred is not None and obs is not None and pred > 0 and obs >= 0 and math.isfinite(obs / pred):
                    self._realized[kind].append(obs / pred)

    def margin(self, kind: Literal["token", "request"], quantile: float | None) -> float:
        """q-quantile of recent observed / predicted ratios (1 when off or with too few samples)."""
        if quantile is None:
            return 1.0
        with self._lock:
            xs = sorted(self._realized[kind])
        if len(xs) < MARGIN_MIN_SAMPLES:
            return 1.0
        q = xs[min(len(xs) - 1, int(math.ceil(quantile * len(xs))) - 1)]
        return min(max(q, MARGIN_CLIP[0]), MARGIN_CLIP[1])

    @property
    def overhead_s(self) -> float:
        """Learned per-request overhead (seconds, >= 0) every whole-request estimate includes once."""
        return max(0.0, self._overhead.value or 0.0)

    def realized_count(self, kind: Literal["token", "request"]) -> int:
        with self._lock:
            return len(self._realized[kind])

    # ---- estimates -----------------------------------------------------------------------------
    def estimate(self, stitch: str, *, prompt_tokens: int, max_tokens: int = 1, task: Task = "chat",
                 batch_rows: int = 1) -> LatencyEstimate:
        """What a new request of `batch_rows` rows would see on `stitch` now."""
        with self._lock:
            active = dict(self.active)
            out_tokens = self._out_tokens.value or 1.0
            overhead = max(0.0, self._overhead.value or 0.0)
            interference = 1.0 / (1.0 - self._prefill_share())
        prompt = max(prompt_tokens, 1)
        if task == "classify":
            def batch_s(s: str, rows: int) -> float:
                return self.correction(s, "prefill") * self.prefill_s_per_token[s] * prompt * min(rows, self.M)

            n = active[stitch]
            own = batch_s(stitch, n + batch_rows)
            others = sum(batch_s(s, k) for s, k in active.items() if k > 0 and s != stitch)
            rounds = max(0, math.ceil((n + batch_rows) / self.M) - 1)  # whole batches of ours ahead
            total = (rounds + 1) * (own + others)
            return LatencyEstimate(token_s=total, request_s=total, prefill_s=own + others,
                                   queue_s=rounds * (own + others))
        running = {s: k for s, k in active.items() if k > 0}
        joined = dict(running)
        joined[stitch] = joined.get(stitch, 0) + batch_rows
        n = sum(joined.values())
        token = self.step_s(joined) * interference
        ahead = max(0, n - self.M)  # rows (ours last) beyond the slots: each waits for a slot to free
        queue = ahead * out_tokens / self.M * token
        # every step the prefill spans also decodes the running rows
        spans = math.ceil(prompt * batch_rows / self.prefill_chunk) if self.prefill_chunk else 1
        prefill = (self.correction(stitch, "prefill") * self.prefill_s_per_token[stitch] * prompt * batch_rows
                   + spans * self.step_s(running))
        total = queue + prefill + overhead + max(max_tokens - 1, 0) * token
        return LatencyEstimate(token_s=token, request_s=total, prefill_s=prefill, queue_s=queue, overhead_s=overhead)
