"""Metrics in vLLM's style: plain stats dataclasses -> one logger -> Prometheus.

Names carry the `stitchserve_` prefix and units (`_seconds`, `_tokens`); labels are the fixed set
(model, stitch) plus `status` on the request counter; the engine-step histograms (one step serves every
stitch) carry `model` only. Inside Serve replicas the logger writes through
`ray.serve.metrics` (plain prometheus_client registries do not survive pickling into replicas); Ray's
metrics agent exports them on each node's metrics export port as `ray_stitchserve_*`, and the ingress
relays them on `/metrics` under their own names (see `relay_metrics`).
"""
from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Iterable

log = logging.getLogger(__name__)

PREFIX = "stitchserve_"
NO_STITCH = "none"  # label value when a request was rejected before routing
LABELS = ("model", "stitch")

# Ray adds these to every series; relayed metrics keep only what tells series apart.
_DROP_LABELS = {"Component", "SessionName", "Version", "WorkerId", "otel_scope_name", "otel_scope_schema_url",
                "otel_scope_version", "JobId"}


def build_buckets(mantissas: Iterable[float] = (1, 2, 5), lo_exp: int = -4, hi_exp: int = 2) -> list[float]:
    """1-2-5 buckets from 10**lo_exp to 5 * 10**hi_exp (seconds): [0.0001, 0.0002, 0.0005, ..., 500]."""
    return [round(m * 10.0 ** e, 12) for e in range(lo_exp, hi_exp + 1) for m in mantissas]


LATENCY_BUCKETS = build_buckets()
TOKEN_LATENCY_BUCKETS = build_buckets(lo_exp=-4, hi_exp=1)
STEP_ROW_BUCKETS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128]  # rows or stitches per engine step


# ---- stats -------------------------------------------------------------------------------------
@dataclass
class RequestStats:
    """One finished request as the replica saw it."""

    model: str
    stitch: str
    prompt_tokens: int
    generation_tokens: int
    e2e_s: float
    queue_s: float | None = None  # admitted -> first engine step
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)


@dataclass
class ResponseStats:
    """One HTTP response as the ingress saw it."""

    model: str
    stitch: str
    status: int | str  # HTTP status, or "499" when the client went away
    budget_met: bool | None = None  # None: not routed


@dataclass
class SchedulerStats:
    model: str
    running: dict[str, int]  # stitch -> rows in engine batches
    waiting: dict[str, int]  # stitch -> admitted, not yet in a batch


@dataclass
class EngineStepStats:
    """One step of a replica's engine (mixed-stitch continuous batching): engine-wide, no stitch label."""

    model: str
    rows: int  # rows decoded together
    stitches: int  # distinct stitches among them
    seconds: float


@dataclass
class StitchLatencyStats:
    model: str
    stitch: str
    prefill_s_per_token: float
    decode_step_s: float  # profiled, batch 1
    estimated_token_s: float  # current estimate (profile x EWMA correction x load)
    routed: bool = True  # on the served front: budgets are routed here (stitchlib.gate.served_front)


# ---- loggers -----------------------------------------------------------------------------------
class StatLogger(ABC):
    @abstractmethod
    def record_request(self, s: RequestStats) -> None: ...

    @abstractmethod
    def record_response(self, s: ResponseStats) -> None: ...

    @abstractmethod
    def record_scheduler(self, s: SchedulerStats) -> None: ...

    @abstractmethod
    def record_latency(self, s: StitchLatencyStats) -> None: ...

    @abstractmethod
    def record_step(self, s: EngineStepStats) -> None: ...


class RayServeStatLogger(StatLogger):
    """Writes through `ray.serve.metrics` (Serve adds deployment/replica/application tags itself)."""

    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Gauge, Histogram

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(PREFIX + name, description=doc, tag_keys=LABELS + extra)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(PREFIX + name, description=doc, tag_keys=LABELS)

        def hist(name: str, doc: str, buckets: list[float]) -> Histogram:
            return Histogram(PREFIX + name, description=doc, boundaries=buckets, tag_keys=LABELS)

        self.requests = counter("requests_total", "HTTP responses by status code.", ("status",))
        self.budget_met = counter("budget_met_total", "Routed requests whose compute budget was met.")
        self.budget_missed = counter("budget_missed_total",
                                     "Routed requests served by the cheapest stitch because none met the budget.")
        self.prompt_tokens = counter("prompt_tokens_total", "Prefill tokens processed.")
        self.generation_tokens = counter("generation_tokens_total", "Tokens generated.")
        self.ttft = hist("time_to_first_token_seconds", "Time to first token.", TOKEN_LATENCY_BUCKETS)
        self.itl = hist("inter_token_latency_seconds", "Time between consecutive output tokens.",
                        TOKEN_LATENCY_BUCKETS)
        self.e2e = hist("e2e_request_latency_seconds", "End-to-end request latency in the replica.",
                        LATENCY_BUCKETS)
        self.queue_time = hist("request_queue_time_seconds", "Time from admission to the first engine step.",
                               LATENCY_BUCKETS)
        self.running = gauge("num_requests_running", "Requests in engine batches.")
        self.queue_depth = gauge("queue_depth", "Requests admitted and waiting for a batch.")
        self.prefill = gauge("profiled_prefill_seconds_per_token", "Start-up profile: prefill seconds per token.")
        self.decode = gauge("profiled_decode_step_seconds", "Start-up profile: seconds per decode step, batch 1.")
        self.estimate = gauge("estimated_token_latency_seconds",
                              "Current per-token latency estimate (profile x EWMA correction x load).")
        self.routed = gauge("stitch_routed", "1 when budgets are routed to the stitch, 0 when the served front "
                                             "skips it (not min_latency_saving cheaper than a better route).")
        # engine-wide (one engine step serves every stitch): model label only
        self.step_rows = Histogram(PREFIX + "engine_step_rows", description="Rows decoded together in one engine "
                                   "step, whatever their stitches.", boundaries=STEP_ROW_BUCKETS, tag_keys=("model",))
        self.step_stitches = Histogram(PREFIX + "engine_step_stitches", description="Distinct stitches decoded "
                                       "together in one engine step.", boundaries=STEP_ROW_BUCKETS,
                                       tag_keys=("model",))
        self.step_time = Histogram(PREFIX + "engine_step_seconds", description="Compute time of one engine step "
                                   "(decode of the running rows plus prefill of those it admitted).",
                                   boundaries=TOKEN_LATENCY_BUCKETS, tag_keys=("model",))

    @staticmethod
    def _tags(model: str, stitch: str) -> dict[str, str]:
        return {"model": model, "stitch": stitch or NO_STITCH}

    def record_request(self, s: RequestStats) -> None:
        t = self._tags(s.model, s.stitch)
        if s.prompt_tokens:
            self.prompt_tokens.inc(s.prompt_tokens, tags=t)
        if s.generation_tokens:
            self.generation_tokens.inc(s.generation_tokens, tags=t)
        if s.ttft_s is not None:
            self.ttft.observe(s.ttft_s, tags=t)
        for x in s.itl_s:
            self.itl.observe(x, tags=t)
        self.e2e.observe(s.e2e_s, tags=t)
        if s.queue_s is not None:
            self.queue_time.observe(s.queue_s, tags=t)

    def record_response(self, s: ResponseStats) -> None:
        t = self._tags(s.model, s.stitch)
        self.requests.inc(tags={**t, "status": str(s.status)})
        if s.budget_met is True:
            self.budget_met.inc(tags=t)
        elif s.budget_met is False:
            self.budget_missed.inc(tags=t)

    def record_scheduler(self, s: SchedulerStats) -> None:
        for stitch in set(s.running) | set(s.waiting):
            t = self._tags(s.model, stitch)
            self.running.set(s.running.get(stitch, 0), tags=t)
            self.queue_depth.set(s.waiting.get(stitch, 0), tags=t)

    def record_latency(self, s: StitchLatencyStats) -> None:
        t = self._tags(s.model, s.stitch)
        self.prefill.set(s.prefill_s_per_token, tags=t)
        self.decode.set(s.decode_step_s, tags=t)
        self.estimate.set(s.estimated_token_s, tags=t)
        self.routed.set(1.0 if s.routed else 0.0, tags=t)

    def record_step(self, s: EngineStepStats) -> None:
        t = {"model": s.model}
        self.step_rows.observe(s.rows, tags=t)
        self.step_stitches.observe(s.stitches, tags=t)
        self.step_time.observe(s.seconds, tags=t)


# ---- relay: Ray's export port -> /metrics ---------------------------------------------------------
def relay_families(texts: Iterable[str]) -> list:
    """Parse Prometheus text from Ray metrics agents, keep `ray_stitchserve_*` families, rename them to
    `stitchserve_*`, drop Ray's bookkeeping labels, and merge same-named families across nodes."""
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client.samples import Sample

    merged: dict[str, object] = {}
    ray_prefix = "ray_" + PREFIX
    for text in texts:
        for fam in text_string_to_metric_families(text):
            if not fam.name.startswith(ray_prefix):
                continue
            name = fam.name[len("ray_"):]
            out = merged.get(name)
            if out is None:
                out = type(fam)(name, fam.documentation, fam.type, fam.unit)
                merged[name] = out
            for smp in fam.samples:
                labels = {k: v for k, v in smp.labels.items() if k not in _DROP_LABELS}
                out.samples.append(Sample(smp.name[len("ray_"):], labels, smp.value, smp.timestamp, smp.exemplar))
    return list(merged.values())


def render_families(families: list) -> bytes:
    from prometheus_client import CollectorRegistry, generate_latest

    class _Static:
        def collect(self):
            return iter(families)

    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Static())
    return generate_latest(reg)


def metrics_export_urls() -> list[str]:
    """Every alive Ray node's metrics agent (needs a connected Ray worker or driver)."""
    import ray

    urls = []
    for n in ray.nodes():
        port = n.get("MetricsExportPort")
        if n.get("Alive") and port:
            urls.append(f"http://{n['NodeManagerAddress']}:{port}/metrics")
    return urls


async def scrape_relay(timeout_s: float = 5.0) -> bytes:
    import httpx

    urls = await asyncio.to_thread(metrics_export_urls)  # ray.nodes() is a blocking GCS call
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        async def one(url: str) -> str:
            try:
                r = await client.get(url)
                r.raise_for_status()
                return r.text
            except httpx.HTTPError as e:
                log.warning("metrics scrape of %s failed: %s", url, e)
                return ""

        texts = await asyncio.gather(*(one(u) for u in urls))
    return render_families(relay_families(texts))
