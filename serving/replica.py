"""The palette replica (one Serve deployment per palette): one replica = one anchor pair with one palette
merged.

At start-up it loads the runtime, profiles every deployed stitch on this replica's hardware and builds
a `LatencyTracker`; per request it tokenizes, checks limits, routes by budget (`stitch_router.select_stitch`
over the tracker's load-aware estimates), then streams from the replica's ONE engine
(`engine_client.RuntimeEngineClient`, over the
`engine_thread`): generation is continuously batched across requests and stitches (one engine
step decodes every running row, requests join and leave between steps), and every step's timing feeds
the tracker. Classification is one forward per batch: it keeps a `@serve.batch` queue per stitch, and
its batches run on the engine thread between steps.

Everything the replica answers is a pydantic item (`items.py`): route / delta / final items, a
classification, a protocol model, or a `ServingError` value (the HTTP layer maps it to a status).
Budgets arrive parsed. `build_app` in `app.py` turns this plain class into a Serve deployment.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from ray import serve

from stitchlib.gate import FrontDecision, front_of
from stitchlib.types import SamplingParams

from .budget import Budget, parse_budget
from .config import PaletteDeploymentConfig
from .engine_client import EngineClient, EngineError, EngineStuck, GenerationRow, RuntimeEngineClient, StepStats
from .items import (ClassifyInput, ClassifyOutput, DeltaItem, FinalItem, GenerateInput, GenerateItem, ReplicaReady,
                    RouteItem, ServingError)
from .latency import LatencyTracker
from .logprobs import make_entry
from .metrics import (EngineStepStats, RayServeStatLogger, RequestStats, SchedulerStats, StatLogger,
                      StitchLatencyStats)
from .protocol import (ClassifyResult, DetokenizeResponse, ModelCard, StitchCard, StitchStatus, TokenizeResponse,
                       TokenizerInfo, UsageInfo)
from .stitch_router import NoStitchFits, RouteDecision, StitchCandidate, select_stitch

log = logging.getLogger("ray.serve")


class IncrementalDetokenizer:
    """Token ids in, text deltas out; stop strings cut the text and end the row.

    Holds back the last `len(longest stop) - 1` characters until they cannot start a stop string,
    and never emits a trailing U+FFFD (a multi-byte character split across tokens)."""

    def __init__(self, decode, stops: list[str]) -> None:
        self._decode = decode
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self.decoded_len = 0  # characters of decode(ids), a trailing U+FFFD included: the next token's offset
        self.emitted = 0
        self.stopped = False

    def push(self, tok: int) -> str:
        self.ids.append(tok)
        text = self._decode(self.ids)
        self.decoded_len = len(text)
        if text.endswith("\ufffd"):
            return ""
        self.text = text
        if self.stops:
            start = max(0, self.emitted - self.hold)
            hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                self.text = text[:min(hits)]
                self.stopped = True
                return self._emit(len(self.text))
        return self._emit(len(text) - self.hold)

    def flush(self) -> str:
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        delta = self.text[self.emitted:upto]
        self.emitted = upto
        return delta


@dataclass
class _Row:
    """One generation request inside this replica."""

    request_id: str
    stitch: str
    admitted: float = field(default_factory=time.perf_counter)


@dataclass
class _ClsRow:
    request_id: str
    stitch: str
    text: str
    tokens: int


class PaletteReplica:
    """Plain class; `app.build_app` wraps it with `serve.deployment(...).options(name=...)`."""

    async def __init__(self, config: dict[str, Any], stat_logger: StatLogger | None = None) -> None:
        self.cfg = PaletteDeploymentConfig.model_validate(config)
        t0 = time.perf_counter()
        self.engine: EngineClient = RuntimeEngineClient.load(str(self.cfg.path), device=self.cfg.device,
                                                             dtype=self.cfg.dtype, quantize=self.cfg.quantize,
                                                             engine=self.cfg.engine_config,
                                                             step_timeout_s=self.cfg.step_timeout_s)
        self.model = self.cfg.name or self.engine.name
        self.task = self.engine.task
        self.stitch_info = {s.id: s for s in self.engine.stitches}
        prof = self.cfg.profile
        profiles = self.engine.load_profile_table(str(prof.table)) if prof.table else None
        self.profile_source = str(prof.table) if isinstance(profiles, dict) else "measured at start-up"
        if isinstance(profiles, str):
            log.warning("%s; measuring instead", profiles)
        if not isinstance(profiles, dict):
            profiles = await self.engine.profile(prompt_len=prof.prompt_len, decode_steps=prof.decode_steps,
                                                 batch_sizes=tuple(prof.batch_sizes))
        self.profiles = profiles
        self.front = self._served_front()
        if self.task == "chat":
            await self._warm_up()
        self.tracker = LatencyTracker(
            {sid: (p.prefill_s_per_token, p.decode_step_s) for sid, p in profiles.items()},
            max_slots=self.cfg.max_batch_size, parts=self.engine.stitch_parts, alpha=self.cfg.ewma_alpha,
            default_output_tokens=self.cfg.default_max_tokens, prefill_chunk=self.cfg.prefill_chunk)
        self.metrics = stat_logger or RayServeStatLogger()
        self.default_budget = parse_budget(self.cfg.default_budget) if self.cfg.default_budget else Budget()
        # one classification batch at a time: they all run on the one engine thread anyway
        batch = dict(max_batch_size=self.cfg.max_batch_size, batch_wait_timeout_s=self.cfg.batch_wait_timeout_s,
                     max_concurrent_batches=1)
        self._cls_batchers = {sid: serve.batch(**batch)(self._make_cls_batch(sid)) for sid in self.stitch_info}
        self._live: dict[str, _Row | _ClsRow] = {}
        self._route_margins = (1.0, 1.0)  # set by every _route (synchronously, before the route item)
        self._draining = False
        try:
            self.replica = serve.get_replica_context().replica_tag
        except Exception:  # outside Serve (never in production)
            self.replica = None
        for sid in self.stitch_info:
            self._record_latency(sid)
        self._record_scheduler()
        self.engine.on_step = self._on_step  # after the warm-up: its steps must not land on the EWMA
        log.info("palette %s (%s): %d stitches ready in %.1fs (latency profile: %s)", self.model, self.task,
                 len(profiles), time.perf_counter() - t0, self.profile_source)

    def _served_front(self) -> dict[str, FrontDecision]:
        """Which deployed stitches budgets are routed to, priced by this replica's own profile over every
        batch size it measured (`stitchlib.gate.served_front`, `served_cost`); every one when
        `min_latency_saving` is null."""
        stitches = self.engine.stitches
        off = "min_latency_saving is null" if self.cfg.min_latency_saving is None else None
        if off is None:
            try:
                front = front_of(stitches, self.profiles, min_saving=self.cfg.min_latency_saving)
            except ValueError as e:  # a hand-edited table: serve every stitch rather than fail start-up
                off = str(e)
                log.warning("palette %s: served front off: %s", self.model, off)
        if off is not None:
            return {s.id: FrontDecision(s.id, s.quality, float("nan"), True, None,
                                        f"served front off ({off}): every deployed stitch is routed") for s in stitches}
        for d in front.values():
            if not d.routed:
                log.warning("palette %s: budgets skip stitch %s: %s", self.model, d.id, d.message)
        return front

    async def _warm_up(self) -> None:
        """One short generation before taking traffic: the engine is built (caches, graphs) on first
        use, which should not land on the first request or on the EWMA."""
        row = GenerationRow("warm-up", self.engine.encode("warm up")[:8] or [0],
                            SamplingParams(max_tokens=2, temperature=0.0))
        stream = self.engine.stream(row, self.engine.stitches[0].id)
        try:
            async for _ in stream:
                pass
        finally:
            stream.close()

    # ---- metrics helpers -------------------------------------------------------------------------
    def _record_latency(self, sid: str) -> None:
        p = self.profiles[sid]
        b1 = p.decode_step_s[min(p.decode_step_s)]
        est = self.tracker.estimate(sid, prompt_tokens=1, task=self.task)
        self.metrics.record_latency(StitchLatencyStats(self.model, sid, p.prefill_s_per_token, b1, est.token_s,
                                                       routed=self.front[sid].routed))

    def _record_scheduler(self) -> None:
        """Running rows and waiting requests per stitch: as the engine reported them after its last
        step, plus classification rows (they wait for their batch)."""
        in_engine, queued = self.engine.occupancy()
        running = {sid: in_engine.get(sid, 0) for sid in self.stitch_info}
        waiting = {sid: queued.get(sid, 0) for sid in self.stitch_info}
        for r in self._live.values():
            if isinstance(r, _ClsRow):
                waiting[r.stitch] += 1
        self.metrics.record_scheduler(SchedulerStats(self.model, running, waiting))

    def _on_step(self, st: StepStats) -> None:
        """After every engine step, on the event loop, before that step's tokens are handed out."""
        if st.seconds > 0:
            self.tracker.observe_step(st.seconds, st.decode_rows, st.prefill_tokens)
            if st.decode_rows:
                self.metrics.record_step(EngineStepStats(self.model, sum(st.decode_rows.values()),
                                                         len(st.decode_rows), st.seconds))
        if st.admitted or st.finished or st.seconds == 0:
            self._record_scheduler()

    # ---- routing ----------------------------------------------------------------------------------
    def _margins(self) -> tuple[float, float]:
        """(per-token, whole-request) realized margins the router prices latency with (1, 1 when off)."""
        q = self.cfg.budget_quantile if self.task == "chat" else None
        return self.tracker.margin("token", q), self.tracker.margin("request", q)

    def _candidates(self, *, prompt_tokens: int, max_tokens: int, rows: int,
                    margins: tuple[float, float] = (1.0, 1.0), pin: str | None = None) -> list[StitchCandidate]:
        """The routed stitches (the served front), or with `pin` every deployed one."""
        out = []
        for s in self.engine.stitches:
            if pin is None and not self.front[s.id].routed:
                continue
            est = self.tracker.estimate(s.id, prompt_tokens=prompt_tokens, max_tokens=max_tokens,
                                        task=self.task, batch_rows=rows)
            out.append(StitchCandidate(s.id, s.params, s.gflops, s.quality, est.token_s * margins[0],
                                       est.request_s * margins[1]))
        return out

    def _route(self, budget: Budget | None, strict: bool, *, prompt_tokens: int, max_tokens: int,
               rows: int = 1, pin: str | None = None) -> tuple[RouteDecision, Budget] | ServingError:
        """Best stitch for the budget (None: the palette's default, parsed once at start-up); with `pin`
        (X-Stitch-Id) that stitch, still checked against the budget (X-Budget-Met, or 422 under a
        strict policy)."""
        if budget is None:
            budget = self.default_budget
        self._route_margins = margins = self._margins()
        cands = self._candidates(prompt_tokens=prompt_tokens, max_tokens=max_tokens, rows=rows, margins=margins,
                                 pin=pin)
        if pin is not None:
            cands = [c for c in cands if c.id == pin]
            if not cands:
                return ServingError(404, f"X-Stitch-Id {pin!r} is not a deployed stitch of model {self.model!r}; "
                                        f"deployed: {', '.join(self.stitch_info)}", type="stitch_not_found",
                                   param="X-Stitch-Id")
        decision = select_stitch(cands, budget, strict=strict, percent_basis=self.cfg.percent_basis)
        if isinstance(decision, NoStitchFits):
            return ServingError(422, decision.message, type="budget_not_met", param="X-Compute-Budget",
                               headers={"X-Budget-Met": "false"})
        return decision, budget

    def _card(self, d: RouteDecision, budget: Budget) -> StitchCard:
        s = self.stitch_info[d.stitch_id]
        return StitchCard(id=s.id, split=s.split, join=s.join, params=s.params, gflops=s.gflops, quality=s.quality,
                          latency_ms=d.stitch.token_latency_s * 1e3,
                          request_latency_ms=d.stitch.request_latency_s * 1e3,
                          budget=budget.to_header() or None, budget_met=d.budget_met, violated=list(d.violated),
                          replica=self.replica)

    def _admit(self) -> ServingError | None:
        if self._draining:
            return ServingError(503, "replica is shutting down", type="unavailable",
                               headers={"Retry-After": str(self.cfg.retry_after_s)})
        if len(self._live) >= self.cfg.max_inflight:
            return ServingError(503, f"queue full ({self.cfg.max_inflight} requests in flight on this replica)",
                               type="queue_full", headers={"Retry-After": str(self.cfg.retry_after_s)})
        return None

    @property
    def prompt_limit(self) -> int:
        return min(self.cfg.max_prompt_tokens or self.engine.max_context, self.engine.max_seq_len - 1)

    # ---- generation -------------------------------------------------------------------------------
    async def generate(self, inp: GenerateInput) -> AsyncIterator[GenerateItem]:
        """Stream: one `RouteItem` (or one `ServingError`), then `DeltaItem`s, then one `FinalItem` (or a
        `ServingError` when the engine fails the request)."""
        req = GenerateInput.model_validate(inp)
        t_arrival = time.perf_counter()
        text = req.prompt
        try:
            if req.messages is not None:
                text = self.engine.render_chat(req.messages)
            ids = list(req.prompt_ids) if req.prompt_ids is not None else self.engine.encode(text or "")
        except Exception as e:  # a template the messages do not fit
            yield ServingError(400, f"cannot build the prompt: {e}", param="messages")
            return
        if not ids:
            yield ServingError(400, "the prompt is empty", param="prompt")
            return
        if any(not 0 <= t < self.engine.vocab_size for t in ids):
            yield ServingError(400, f"prompt token ids must lie in [0, {self.engine.vocab_size})", param="prompt")
            return
        if len(ids) > self.prompt_limit:
            yield ServingError(400, f"the prompt has {len(ids)} tokens, over this model's limit of "
                                   f"{self.prompt_limit}", type="context_length_exceeded", param="messages")
            return
        room = self.engine.max_seq_len - len(ids)
        if req.max_tokens is not None:
            if req.max_tokens > self.cfg.max_tokens_limit:
                yield ServingError(400, f"max_tokens {req.max_tokens} is over the limit of "
                                       f"{self.cfg.max_tokens_limit}", param="max_tokens")
                return
            if req.max_tokens > room:
                yield ServingError(400, f"prompt ({len(ids)} tokens) + max_tokens ({req.max_tokens}) exceeds the "
                                       f"context of {self.engine.max_seq_len}",
                                  type="context_length_exceeded", param="max_tokens")
                return
            max_tokens = req.max_tokens
        else:
            max_tokens = min(self.cfg.default_max_tokens, room)
        if (err := self._admit()) is not None:
            yield err
            return
        routed = self._route(req.budget, req.strict, prompt_tokens=len(ids), max_tokens=max_tokens, pin=req.stitch)
        if isinstance(routed, ServingError):
            yield routed
            return
        decision, budget = routed
        sid = decision.stitch_id
        card = self._card(decision, budget)
        # the bare estimates (without the realized margin): what the margin's ratios compare against
        m_tok, m_req = self._route_margins
        est_token_s, est_request_s = decision.stitch.token_latency_s / m_tok, decision.stitch.request_latency_s / m_req
        # its queue + prefill: what the tracker's per-request overhead term learns the first token's excess over
        est_first_s = est_request_s - max(max_tokens - 1, 0) * est_token_s - self.tracker.overhead_s
        yield RouteItem(stitch=card, prompt_tokens=len(ids))

        want_lp = req.logprobs is not None
        params = SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                                seed=req.seed, logprobs=req.logprobs,
                                prompt_logprobs=req.logprobs if req.echo else None)
        row = _Row(req.request_id, sid)
        self._live[row.request_id] = row
        self.tracker.begin(sid)
        fault = self.cfg.fault_injection
        if fault is not None and fault.stall_marker in (text or ""):  # chaos tests only (off by default)
            log.warning("fault injection: the next engine step hangs for %gs", fault.stall_s)
            self.engine.inject_stall(fault.stall_s)
        try:
            stream = self.engine.stream(GenerationRow(req.request_id, ids, params), sid)
        except EngineError as e:
            self._live.pop(row.request_id, None)
            self.tracker.end(sid)
            yield ServingError(503, f"cannot generate now: {e}", type="unavailable",
                              headers={"Retry-After": str(self.cfg.retry_after_s)})
            return
        self._record_scheduler()
        detok = IncrementalDetokenizer(self.engine.decode, req.stop)
        n_out, t_first, t_prev = 0, None, None
        itl: list[float] = []
        finish = None
        # Deltas are coalesced: every item crossing Ray to the ingress costs CPU on the replica, so a
        # stream sends the first delta at once and then at most one per stream_interval_s; a plain
        # request sends its text in one piece. With logprobs, a delta carries the entries of the
        # tokens produced since the last one (every output token has one, text or not).
        pending: list[str] = []
        entries: list[dict[str, Any]] = []
        base = 0  # where the output starts in the choice's text (after the echoed prompt)

        def delta_item() -> DeltaItem:
            item = DeltaItem(text="".join(pending), logprobs=list(entries) if want_lp else None)
            pending.clear()
            entries.clear()
            return item

        sent_any, last_sent = False, 0.0
        try:
            async for tok in stream:
                now = time.perf_counter()
                if t_first is None:
                    t_first = now
                    if req.echo:  # the prompt leads the choice's text (and its logprobs arrive with token 1)
                        prompt_text = text if text is not None else self.engine.decode(ids)
                        pending.append(prompt_text)
                        if want_lp:
                            entries.extend(self._prompt_entries(ids, stream.prompt_logprobs))
                        base = len(prompt_text)
                else:
                    itl.append(now - t_prev)
                t_prev = now
                n_out += 1
                offset = base + detok.decoded_len
                delta = detok.push(tok)
                if want_lp:
                    entries.append(make_entry(self.engine.token_bytes, stream.logprobs[-1], tok, offset))
                if delta:
                    pending.append(delta)
                if detok.stopped:
                    finish = "stop"
                    break
                if pending and req.stream and (not sent_any or now - last_sent >= self.cfg.stream_interval_s):
                    yield delta_item()
                    sent_any, last_sent = True, now
            if finish is None:
                finish = "length" if stream.finish_reason == "length" else "stop"
            pending.append(detok.flush())
            if "".join(pending) or entries:
                yield delta_item()
            if t_first is not None and n_out >= 1 and finish is not None:
                self.tracker.observe_request(
                    predicted_token_s=est_token_s if n_out >= 2 else None,
                    observed_token_s=(t_prev - t_first) / (n_out - 1) if n_out >= 2 else None,
                    predicted_request_s=est_request_s, observed_request_s=t_prev - t_arrival,
                    predicted_first_s=est_first_s, observed_first_s=t_first - t_arrival)
            yield FinalItem(finish_reason=finish, usage=UsageInfo(prompt_tokens=len(ids), completion_tokens=n_out,
                                                                   total_tokens=len(ids) + n_out))
        except EngineStuck as e:  # the watchdog gave up on a step: not this request's fault, retry
            log.warning("generation %s failed: %s", req.request_id, e)
            yield ServingError(503, f"generation failed: {e}", type="unavailable",
                              headers={"Retry-After": str(self.cfg.retry_after_s)})
        except EngineError as e:  # the engine failed or aborted this request: an error value, not a hang
            log.warning("generation %s failed: %s", req.request_id, e)
            yield ServingError(500, f"generation failed: {e}", type="internal_error")
        finally:
            # stop string, disconnect or timeout: the row leaves the engine at the next step boundary
            stream.close()
            self._live.pop(row.request_id, None)
            self.tracker.end(sid, n_out)
            self._record_scheduler()
            self._record_latency(sid)
            self.metrics.record_request(RequestStats(
                self.model, sid, len(ids), n_out, time.perf_counter() - t_arrival,
                queue_s=(stream.started - row.admitted) if stream.started else None,
                ttft_s=(t_first - t_arrival) if t_first else None, itl_s=itl))

    def _prompt_entries(self, ids: list[int], lps: list[Any] | None) -> list[dict[str, Any]]:
        """Echoed prompt tokens as logprob entries (the first has no logprob), with their text offsets."""
        lps = lps or [None] * len(ids)
        return [make_entry(self.engine.token_bytes, lp, t, len(self.engine.decode(ids[:j])))
                for j, (t, lp) in enumerate(zip(ids, lps))]

    # ---- classification ---------------------------------------------------------------------------
    def _make_cls_batch(self, sid: str):
        async def cls_batch(rows: list[_ClsRow]) -> list[dict[str, float]]:
            probs, secs = await self.engine.classify([r.text for r in rows], sid)
            self.tracker.observe_prefill(sid, max(r.tokens for r in rows) * len(rows), secs)
            return probs

        cls_batch.__name__ = f"classify_{sid}"
        return cls_batch

    async def classify(self, inp: ClassifyInput) -> ClassifyOutput | ServingError:
        req = ClassifyInput.model_validate(inp)
        t_arrival = time.perf_counter()
        if self.task != "classify":
            return ServingError(400, f"model {self.model!r} is a {self.task} model; use /v1/chat/completions",
                               param="model")
        try:
            lens = [len(self.engine.encode(t)) for t in req.texts]
        except Exception as e:  # text the tokenizer cannot take (e.g. lone surrogates)
            return ServingError(400, f"cannot tokenize the input: {type(e).__name__}: {e}", param="input")
        too_long = [i for i, n in enumerate(lens) if n > self.prompt_limit]
        if too_long:
            return ServingError(400, f"input {too_long[0]} has {lens[too_long[0]]} tokens, over this model's limit "
                                    f"of {self.prompt_limit}", type="context_length_exceeded", param="input")
        if (err := self._admit()) is not None:
            return err
        routed = self._route(req.budget, req.strict, prompt_tokens=max(lens), max_tokens=1, rows=len(req.texts),
                             pin=req.stitch)
        if isinstance(routed, ServingError):
            return routed
        decision, budget = routed
        sid = decision.stitch_id
        rows = [_ClsRow(f"{req.request_id}-{i}", sid, t, n) for i, (t, n) in enumerate(zip(req.texts, lens))]
        for r in rows:
            self._live[r.request_id] = r
            self.tracker.begin(sid)
        self._record_scheduler()
        try:
            probs = await asyncio.gather(*(self._cls_batchers[sid](r) for r in rows))
        finally:
            for r in rows:
                self._live.pop(r.request_id, None)
                self.tracker.end(sid)
            self._record_scheduler()
            self._record_latency(sid)
        e2e = time.perf_counter() - t_arrival
        self.metrics.record_request(RequestStats(self.model, sid, sum(lens), 0, e2e))
        results = [ClassifyResult(index=i, label=max(p, key=p.get), probs=p) for i, p in enumerate(probs)]
        return ClassifyOutput(stitch=self._card(decision, budget), results=results, prompt_tokens=sum(lens))

    # ---- introspection ----------------------------------------------------------------------------
    # ---- tokenizer ---------------------------------------------------------------------------------
    async def tokenize(self, prompt: str | None, messages: list[dict[str, str]] | None,
                       add_special_tokens: bool = False,
                       add_generation_prompt: bool = True) -> TokenizeResponse | ServingError:
        try:
            if messages is not None:
                prompt = self.engine.render_chat(messages, add_generation_prompt=add_generation_prompt)
            ids = self.engine.encode(prompt or "", add_special_tokens=add_special_tokens)
        except Exception as e:  # text the tokenizer cannot take (e.g. lone surrogates), a template misfit
            return ServingError(400, f"cannot tokenize: {type(e).__name__}: {e}",
                               param="messages" if messages is not None else "prompt")
        return TokenizeResponse(count=len(ids), max_model_len=self.engine.max_seq_len, tokens=ids)

    async def detokenize(self, tokens: list[int]) -> DetokenizeResponse | ServingError:
        if any(not 0 <= t < self.engine.vocab_size for t in tokens):
            return ServingError(400, f"token ids must lie in [0, {self.engine.vocab_size})", param="tokens")
        return DetokenizeResponse(prompt=self.engine.decode(tokens))

    async def tokenizer_info(self) -> TokenizerInfo:
        return TokenizerInfo(model=self.model, **self.engine.tokenizer_info())

    async def info(self) -> ModelCard:
        return ModelCard(id=self.model, task=self.task, labels=self.engine.labels,
                         max_context=self.engine.max_context, stitches=len(self.stitch_info))

    async def stitches(self) -> list[StitchStatus]:
        out = []
        for s in self.engine.stitches:
            p = self.profiles[s.id]
            est = self.tracker.estimate(s.id, prompt_tokens=1, task=self.task)
            out.append(StitchStatus(
                model=self.model, id=s.id, split=s.split, join=s.join, params=s.params, gflops=s.gflops,
                bytes=s.bytes, quality=s.quality, metrics=s.metrics, prefill_s_per_token=p.prefill_s_per_token,
                decode_step_s=p.decode_step_s, correction=self.tracker.correction(s.id),
                latency_ms=est.token_s * 1e3, prefill_share=self.tracker.prefill_share(),
                active_requests=self.tracker.active[s.id], routed=self.front[s.id].routed,
                shadowed_by=self.front[s.id].shadowed_by, route_note=self.front[s.id].message,
                replica=self.replica))
        return out

    async def ready(self) -> ReplicaReady:
        running, waiting = self.engine.occupancy()
        return ReplicaReady(model=self.model, ready=not self._draining and self.engine.stuck is None,
                            replica=self.replica, pid=os.getpid(), inflight=len(self._live),
                            latency_profile=self.profile_source,
                            budget_margins=dict(zip(("token", "request"), self._margins()),
                                                samples=self.tracker.realized_count("token")),
                            engine={"slots": self.cfg.max_batch_size, "running": sum(running.values()),
                                    "waiting": sum(waiting.values()), **self.engine.counters()})

    async def check_health(self) -> None:
        """Serve's periodic health check: the engine thread must answer."""
        await self.engine.check_health()

    async def __del__(self) -> None:
        # Serve has already drained ongoing requests (graceful_shutdown_timeout_s); refuse new ones and
        # abort whatever is left (their streams end with an error value), then stop the engine thread.
        self._draining = True
        for rid in list(self._live):
            self.engine.abort(rid)
        await self.engine.shutdown()
