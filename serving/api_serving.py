"""Serving logic inside the ingress, between the HTTP layer (`app.py`) and the palette replicas (`replica.py`).

Parses and validates OpenAI-style requests and the budget headers, picks the palette deployment, calls
it through its Serve handle, and assembles OpenAI-style responses or SSE streams. Every failure is a
`ServingError` value; only `app.py` turns values into HTTP responses.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from .budget import Budget, BudgetError, try_parse_budget
from .config import PaletteDeploymentConfig, ServeConfig
from .items import (ClassifyInput, ClassifyOutput, DeltaItem, FinalItem, GenerateInput, ReplicaReady, RouteItem,
                    ServingError)
from .logprobs import chat_logprobs, completion_logprobs
from .metrics import NO_STITCH, ResponseStats, StatLogger
from .protocol import (
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatResponseMessage,
    ClassifyRequest,
    ClassifyResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    DeltaMessage,
    DetokenizeRequest,
    ErrorInfo,
    ErrorResponse,
    ModelList,
    StitchCard,
    StitchList,
    TokenizeRequest,
    UsageInfo,
    random_id,
)

log = logging.getLogger("ray.serve")

BUDGET_HEADER = "x-compute-budget"
POLICY_HEADER = "x-budget-policy"
TIMEOUT_HEADER = "x-request-timeout-seconds"
STITCH_HEADER = "x-stitch-id"  # evaluation override: serve on this deployed stitch
POLICIES = {"strict": True, "best-effort": False, "best_effort": False}


@dataclass
class Served:
    """A successful answer: headers plus either a body model or an SSE stream."""

    headers: dict[str, str]
    body: BaseModel | None = None
    stream: AsyncIterator[str] | None = None


@dataclass
class PaletteRef:
    config: PaletteDeploymentConfig
    handle: Any  # ray.serve.handle.DeploymentHandle

    @property
    def name(self) -> str:
        return self.config.name  # type: ignore[return-value]


def stitch_headers(card: StitchCard) -> dict[str, str]:
    # (Serve's proxy sets X-Request-Id itself; the body's `id` is ours.)
    return {"X-Stitch-Id": card.id, "X-Stitch-Params": str(card.params), "X-Stitch-GFLOPs": f"{card.gflops:.6g}",
            "X-Stitch-Latency-Ms": f"{card.latency_ms:.3f}", "X-Budget-Met": "true" if card.budget_met else "false"}


def _cancelled_types() -> tuple[type[BaseException], ...]:
    """What a cancelled request looks like from inside the ingress: asyncio's CancelledError, or, when
    Serve cancelled the downstream call first (it propagates a parent's cancellation), Serve's own."""
    from ray.exceptions import TaskCancelledError
    from ray.serve.exceptions import RequestCancelledError

    return asyncio.CancelledError, RequestCancelledError, TaskCancelledError


def _replica_lost_types() -> tuple[type[BaseException], ...]:
    """What a replica that died under a request (killed, crashed, its node gone) looks like here."""
    from ray.exceptions import RayActorError, WorkerCrashedError

    return RayActorError, WorkerCrashedError


REPLICA_LOST = "the model replica serving this request stopped (Serve is replacing it); retry"


def _lost(model: str, stitch: str = NO_STITCH) -> "ServingError":
    return ServingError(503, REPLICA_LOST, type="unavailable", headers={"Retry-After": "5"}, model=model,
                        stitch=stitch)


def _retrieve(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: no "exception was never retrieved" noise


async def _await_before(awaitable: Any, deadline: float) -> Any:
    """Await a Serve response until `deadline` (monotonic clock), else asyncio.TimeoutError.

    Not `asyncio.wait_for` / `asyncio.timeout`: both cancel the pending await, and Serve's responses
    (e.g. `DeploymentResponseGenerator.__anext__`) do not give up on cancellation, so they would wait
    for the result anyway (the whole generation for a plain request). Here the caller gets control back
    at the deadline and cancels the request through Serve (`.cancel()`), which reaches the replica."""
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({task}, timeout=max(deadline - time.monotonic(), 0.0))
    except BaseException:
        task.add_done_callback(_retrieve)
        raise
    if not done:
        task.add_done_callback(_retrieve)
        raise asyncio.TimeoutError
    return task.result()


async def _next_before(gen: Any, deadline: float) -> Any:
    """The next item of a replica's response stream, None at its end (see `_await_before`)."""
    try:
        return await _await_before(gen.__anext__(), deadline)
    except StopAsyncIteration:
        return None


def sse(obj: BaseModel | dict[str, Any]) -> str:
    data = obj.model_dump_json(exclude_none=True) if isinstance(obj, BaseModel) else json.dumps(obj)
    return f"data: {data}\n\n"


def _validation_message(e: ValidationError) -> tuple[str, str | None]:
    errs = e.errors()
    parts = []
    for err in errs:
        loc = ".".join(str(p) for p in err["loc"] if not isinstance(p, int) or len(err["loc"]) > 1)
        parts.append(f"{loc or 'body'}: {err['msg'].removeprefix('Value error, ')}")
    param = ".".join(str(p) for p in errs[0]["loc"]) if errs and errs[0]["loc"] else None
    return "invalid request: " + "; ".join(parts), param


class OpenAIServing:
    def __init__(self, config: ServeConfig, palettes: dict[str, PaletteRef], metrics: StatLogger) -> None:
        self.cfg = config
        self.palettes = palettes
        self.metrics = metrics

    # ---- request parsing ----------------------------------------------------------------------------
    @staticmethod
    def parse_body(raw: bytes, model_cls: type[BaseModel]) -> BaseModel | ServingError:
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return ServingError(400, f"malformed JSON body: {e}")
        if not isinstance(data, dict):
            return ServingError(400, "the JSON body must be an object")
        refused = getattr(model_cls, "unsupported", lambda _: None)(data)
        if refused is not None:
            return ServingError(400, refused[0], param=refused[1])
        try:
            return model_cls.model_validate(data)
        except ValidationError as e:
            msg, param = _validation_message(e)
            return ServingError(400, msg, param=param)

    @staticmethod
    def parse_budget_headers(headers: Mapping[str, str],
                             body_budget: str | None) -> tuple[Budget | None, bool] | ServingError:
        """-> (the budget, parsed here once for the replica; None when absent, strict policy)."""
        text = headers.get(BUDGET_HEADER)
        if text is None:
            text = body_budget
        parsed = None
        if text is not None and text.strip():
            parsed = try_parse_budget(text)
            if isinstance(parsed, BudgetError):
                return ServingError(400, str(parsed), type="invalid_budget", param="X-Compute-Budget")
        policy = headers.get(POLICY_HEADER, "best-effort").strip().lower()
        if policy not in POLICIES:
            return ServingError(400, f"X-Budget-Policy must be 'strict' or 'best-effort', got {policy!r}",
                                param="X-Budget-Policy")
        return parsed, POLICIES[policy]

    def timeout_s(self, headers: Mapping[str, str]) -> float | ServingError:
        t = self.cfg.request_timeout_s
        raw = headers.get(TIMEOUT_HEADER)
        if raw is not None:
            try:
                asked = float(raw)
            except ValueError:
                asked = math.nan
            if not math.isfinite(asked) or asked <= 0:
                return ServingError(400, f"{TIMEOUT_HEADER} must be a positive number of seconds, got {raw!r}",
                                    param=TIMEOUT_HEADER)
            t = min(t, asked)
        return t

    def palette(self, model: str | None, task: str) -> PaletteRef | ServingError:
        if model is None:
            of_task = [p for p in self.palettes.values() if p.config.task == task]
            if len(of_task) == 1:
                return of_task[0]
            return ServingError(400, f"'model' is required: serving {sorted(self.palettes)}", param="model")
        ref = self.palettes.get(model)
        if ref is None:
            return ServingError(404, f"the model {model!r} does not exist; serving {sorted(self.palettes)}",
                                type="model_not_found", param="model")
        if ref.config.task != task:
            other = "/v1/classify" if ref.config.task == "classify" else "/v1/chat/completions or /v1/completions"
            return ServingError(400, f"model {model!r} is a {ref.config.task} model; use {other}", param="model",
                                model=model)
        return ref

    def record(self, model: str, stitch: str, status: int | str, budget_met: bool | None = None) -> None:
        try:
            self.metrics.record_response(ResponseStats(model or "none", stitch, status, budget_met))
        except Exception:  # metrics must never fail a request
            log.exception("recording response metrics failed")

    def fail(self, err: ServingError) -> ServingError:
        self.record(err.model, err.stitch, err.status)
        return err

    # ---- generation ---------------------------------------------------------------------------------
    def admit(self, raw: bytes, headers: Mapping[str, str], model_cls: type, task: str) -> tuple | ServingError:
        """Body, palette, budget and timeout of a request -> (req, palette ref, (budget, strict, X-Stitch-Id),
        timeout s),
        or the first error (recorded in the metrics, with the model once it is known)."""
        req = self.parse_body(raw, model_cls)
        if isinstance(req, ServingError):
            return self.fail(req)
        ref = self.palette(req.model, task)
        if isinstance(ref, ServingError):
            return self.fail(ref)
        budget = self.parse_budget_headers(headers, req.compute_budget)
        timeout = budget if isinstance(budget, ServingError) else self.timeout_s(headers)
        if isinstance(timeout, ServingError):  # the budget's error, else the timeout header's
            timeout.model = ref.name
            return self.fail(timeout)
        pin = headers.get(STITCH_HEADER, "").strip() or None
        return req, ref, (*budget, pin), timeout

    async def generate(self, raw: bytes, headers: Mapping[str, str], *, chat: bool) -> Served | ServingError:
        admitted = self.admit(raw, headers, ChatCompletionRequest if chat else CompletionRequest, "chat")
        if isinstance(admitted, ServingError):
            return admitted
        req, ref, budget, timeout = admitted
        deadline = time.monotonic() + timeout
        rid = random_id("chatcmpl" if chat else "cmpl")
        prompt = None if chat else req.prompt
        inp = GenerateInput(
            request_id=rid,
            messages=[{"role": m.role, "content": m.text()} for m in req.messages] if chat else None,
            prompt=prompt if isinstance(prompt, str) else None,
            prompt_ids=prompt if isinstance(prompt, list) else None,
            max_tokens=req.requested_max_tokens(),
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            seed=req.seed, stop=req.stop or [], budget=budget[0], strict=budget[1], stitch=budget[2],
            stream=req.stream, logprobs=req.top_k_logprobs() if chat else req.logprobs,
            echo=False if chat else req.echo)
        gen = ref.handle.options(stream=True).generate.remote(inp)
        first = await self._first(gen, deadline, ref.name)
        if isinstance(first, ServingError):
            return self.fail(first.model_copy(update={"model": ref.name}))
        card = first.stitch
        hdrs = stitch_headers(card)
        prompt_tokens = first.prompt_tokens
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return Served(hdrs, stream=self._stream(gen, card, ref.name, rid, chat, prompt_tokens, include_usage,
                                                    deadline, inp.logprobs is not None))
        text: list[str] = []
        entries: list[dict[str, Any]] = []
        final: FinalItem | None = None
        try:
            while (item := await _next_before(gen, deadline)) is not None:
                if isinstance(item, DeltaItem):
                    text.append(item.text)
                    entries += item.logprobs or ()
                elif isinstance(item, FinalItem):
                    final = item
                elif isinstance(item, ServingError):  # the replica's engine failed this request mid-way
                    return self.fail(item.model_copy(update={"model": ref.name, "stitch": card.id}))
        except asyncio.TimeoutError:
            gen.cancel()
            return self.fail(ServingError(504, f"request timed out after {timeout:g}s", type="timeout",
                                          model=ref.name, stitch=card.id))
        except _cancelled_types():
            gen.cancel()
            self.record(ref.name, card.id, 499, card.budget_met)
            raise
        except _replica_lost_types() as e:  # the replica died mid-way: retryable, its details stay in the log
            log.warning("replica lost during generation %s: %s", rid, e)
            return self.fail(_lost(ref.name, card.id))
        except Exception as e:
            log.exception("generation failed")
            return self.fail(ServingError(500, f"generation failed: {e}", type="internal_error", model=ref.name,
                                          stitch=card.id))
        assert final is not None
        usage = final.usage
        want_lp = inp.logprobs is not None
        if chat:
            body: BaseModel = ChatCompletionResponse(
                id=rid, model=ref.name, usage=usage, stitch=card,
                choices=[ChatCompletionChoice(message=ChatResponseMessage(content="".join(text)),
                                              logprobs=chat_logprobs(entries) if want_lp else None,
                                              finish_reason=final.finish_reason)])
        else:
            body = CompletionResponse(id=rid, model=ref.name, usage=usage, stitch=card,
                                      choices=[CompletionChoice(text="".join(text),
                                                                logprobs=completion_logprobs(entries) if want_lp else None,
                                                                finish_reason=final.finish_reason)])
        self.record(ref.name, card.id, 200, card.budget_met)
        return Served(hdrs, body=body)

    async def _first(self, gen: Any, deadline: float, model: str) -> RouteItem | ServingError:
        """The replica's first item (route or error value), mapping Serve's own failures to values."""
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        try:
            first = await _next_before(gen, deadline)
            if first is None:
                return ServingError(500, "the model replica returned nothing", type="internal_error", model=model)
            return first
        except BackPressureError:
            return ServingError(503, "the queue is full; retry later", type="queue_full",
                                headers={"Retry-After": "1"}, model=model)
        except DeploymentUnavailableError as e:
            return ServingError(503, f"model {model!r} is unavailable: {e}", type="unavailable",
                                headers={"Retry-After": "5"}, model=model)
        except asyncio.TimeoutError:
            gen.cancel()
            return ServingError(504, "request timed out before generation started", type="timeout", model=model)
        except _cancelled_types():
            gen.cancel()
            self.record(model, NO_STITCH, 499)
            raise
        except _replica_lost_types() as e:
            log.warning("replica lost before routing: %s", e)
            return _lost(model)
        except Exception as e:  # a replica that failed: a JSON error, not a bare 500 page
            log.exception("palette replica failed")
            return ServingError(500, f"the model replica failed: {type(e).__name__}: {e}", type="internal_error",
                                model=model)

    async def _stream(self, gen: Any, card: StitchCard, model: str, rid: str, chat: bool, prompt_tokens: int,
                      include_usage: bool, deadline: float, want_lp: bool = False) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(text: str | None, finish: str | None = None, *, role: bool = False,
                  stitch: StitchCard | None = None, usage: UsageInfo | None = None, empty: bool = False,
                  entries: list[dict[str, Any]] | None = None) -> str:
            lp = entries if want_lp and entries is not None else None
            if chat:
                choices = [] if empty else [ChatCompletionStreamChoice(
                    delta=DeltaMessage(role="assistant" if role else None, content=text), finish_reason=finish,
                    logprobs=None if lp is None else chat_logprobs(lp))]
                return sse(ChatCompletionStreamResponse(id=rid, created=created, model=model, choices=choices,
                                                        usage=usage, stitch=stitch))
            choices_c = [] if empty else [CompletionChoice(text=text or "", finish_reason=finish,
                                                           logprobs=None if lp is None else completion_logprobs(lp))]
            return sse(CompletionStreamResponse(id=rid, created=created, model=model, choices=choices_c,
                                                usage=usage, stitch=stitch))

        status: int | str = 200
        finished = False
        try:
            if chat:
                yield chunk("", role=True, stitch=card)
            first_delta = not chat
            while (item := await _next_before(gen, deadline)) is not None:
                if isinstance(item, DeltaItem):
                    yield chunk(item.text, stitch=card if first_delta else None, entries=item.logprobs)
                    first_delta = False
                elif isinstance(item, FinalItem):
                    yield chunk(None if chat else "", item.finish_reason, stitch=card)
                    if include_usage:
                        yield chunk(None, usage=item.usage, empty=True)
                elif isinstance(item, ServingError):  # the replica's engine failed this request mid-way
                    status = item.status
                    yield sse(ErrorResponse(error=ErrorInfo(message=item.message, type=item.type, code=item.status)))
                    finished = True
                    return
            finished = True
            yield "data: [DONE]\n\n"
        except asyncio.TimeoutError:
            status = 504
            yield sse(ErrorResponse(error=ErrorInfo(message="request timed out", type="timeout", code=504)))
        except _cancelled_types():  # the client went away: stop the generation, free its slot
            status = 499
            raise
        except _replica_lost_types() as e:  # the replica died mid-stream: the error event says retry
            log.warning("replica lost during stream %s: %s", rid, e)
            status = 503
            yield sse(ErrorResponse(error=ErrorInfo(message=REPLICA_LOST, type="unavailable", code=503)))
        except Exception as e:
            log.exception("streaming generation failed")
            status = 500
            yield sse(ErrorResponse(error=ErrorInfo(message=f"generation failed: {e}", type="internal_error",
                                                    code=500)))
        finally:
            if not finished:
                gen.cancel()
            self.record(model, card.id, status, card.budget_met)

    # ---- classification -----------------------------------------------------------------------------
    async def classify(self, raw: bytes, headers: Mapping[str, str]) -> Served | ServingError:
        admitted = self.admit(raw, headers, ClassifyRequest, "classify")
        if isinstance(admitted, ServingError):
            return admitted
        req, ref, budget, timeout = admitted
        from ray.serve.exceptions import BackPressureError

        rid = random_id("cls")
        inp = ClassifyInput(request_id=rid, texts=req.input, budget=budget[0], strict=budget[1], stitch=budget[2])
        resp = ref.handle.classify.remote(inp)
        try:
            out = await _await_before(resp, time.monotonic() + timeout)
        except BackPressureError:
            return self.fail(ServingError(503, "the queue is full; retry later", type="queue_full",
                                          headers={"Retry-After": "1"}, model=ref.name))
        except asyncio.TimeoutError:
            resp.cancel()
            return self.fail(ServingError(504, f"request timed out after {timeout:g}s", type="timeout",
                                          model=ref.name))
        except _cancelled_types():
            resp.cancel()
            self.record(ref.name, NO_STITCH, 499)
            raise
        except _replica_lost_types() as e:
            log.warning("replica lost during classification %s: %s", rid, e)
            return self.fail(_lost(ref.name))
        except Exception as e:
            log.exception("palette replica failed")
            return self.fail(ServingError(500, f"the model replica failed: {type(e).__name__}: {e}",
                                          type="internal_error", model=ref.name))
        if isinstance(out, ServingError):
            return self.fail(out.model_copy(update={"model": ref.name}))
        assert isinstance(out, ClassifyOutput)
        card = out.stitch
        body = ClassifyResponse(id=rid, model=ref.name, stitch=card, data=out.results,
                                usage=UsageInfo(prompt_tokens=out.prompt_tokens, total_tokens=out.prompt_tokens))
        self.record(ref.name, card.id, 200, card.budget_met)
        return Served(stitch_headers(card), body=body)

    # ---- tokenizer (vLLM's /tokenize, /detokenize, /tokenizer_info) ---------------------------------
    async def _tokenizer_call(self, model: str | None, method: str, *args: Any) -> tuple[str, Any] | ServingError:
        # a named model of either task (a classify palette has a tokenizer too); unnamed: the one chat model
        named = self.palettes.get(model) if model is not None else None
        ref = named if named is not None else self.palette(model, "chat")
        if isinstance(ref, ServingError):
            return ref
        try:
            out = await _await_before(getattr(ref.handle, method).remote(*args), time.monotonic() + 30)
        except asyncio.TimeoutError:
            return ServingError(503, "model replicas did not answer", type="unavailable", headers={"Retry-After": "5"})
        except _replica_lost_types() as e:
            log.warning("replica lost during %s: %s", method, e)
            return _lost(ref.name)
        except Exception as e:  # a replica that failed: a JSON error, not a bare 500 page
            log.exception("palette replica failed")
            return ServingError(500, f"the model replica failed: {type(e).__name__}: {e}", type="internal_error")
        if isinstance(out, ServingError):
            return out.model_copy(update={"model": ref.name})
        return ref.name, out

    async def tokenize(self, raw: bytes) -> Served | ServingError:
        req = self.parse_body(raw, TokenizeRequest)
        if isinstance(req, ServingError):
            return req
        messages = None if req.messages is None else [{"role": m.role, "content": m.text()} for m in req.messages]
        out = await self._tokenizer_call(req.model, "tokenize", req.prompt, messages, req.add_special_tokens,
                                         req.add_generation_prompt)
        return out if isinstance(out, ServingError) else Served({}, body=out[1])

    async def detokenize(self, raw: bytes) -> Served | ServingError:
        req = self.parse_body(raw, DetokenizeRequest)
        if isinstance(req, ServingError):
            return req
        out = await self._tokenizer_call(req.model, "detokenize", req.tokens)
        return out if isinstance(out, ServingError) else Served({}, body=out[1])

    async def tokenizer_info(self, model: str | None) -> Served | ServingError:
        out = await self._tokenizer_call(model, "tokenizer_info")
        return out if isinstance(out, ServingError) else Served({}, body=out[1])

    # ---- introspection ------------------------------------------------------------------------------
    async def models(self) -> ModelList | ServingError:
        try:
            infos = await _await_before(asyncio.gather(*(p.handle.info.remote() for p in self.palettes.values())),
                                        time.monotonic() + 30)
        except asyncio.TimeoutError:
            return ServingError(503, "model replicas did not answer", type="unavailable", headers={"Retry-After": "5"})
        except _replica_lost_types():
            return ServingError(503, "a model replica stopped while answering (Serve is replacing it); retry",
                                type="unavailable", headers={"Retry-After": "5"})
        return ModelList(data=list(infos))

    async def stitches(self, model: str | None) -> StitchList | ServingError:
        refs = list(self.palettes.values())
        if model is not None:
            if model not in self.palettes:
                return ServingError(404, f"the model {model!r} does not exist; serving {sorted(self.palettes)}",
                                    type="model_not_found", param="model")
            refs = [self.palettes[model]]
        try:
            lists = await _await_before(asyncio.gather(*(p.handle.stitches.remote() for p in refs)),
                                        time.monotonic() + 30)
        except asyncio.TimeoutError:
            return ServingError(503, "model replicas did not answer", type="unavailable", headers={"Retry-After": "5"})
        except _replica_lost_types():
            return ServingError(503, "a model replica stopped while answering (Serve is replacing it); retry",
                                type="unavailable", headers={"Retry-After": "5"})
        return StitchList(data=[s for lst in lists for s in lst])

    async def ready(self, timeout_s: float = 5.0) -> tuple[bool, dict[str, Any]]:
        async def one(p: PaletteRef) -> ReplicaReady:
            try:
                return await _await_before(p.handle.ready.remote(), time.monotonic() + timeout_s)
            except Exception as e:
                return ReplicaReady(model=p.name, ready=False, error=f"{type(e).__name__}: {e}")

        states = await asyncio.gather(*(one(p) for p in self.palettes.values()))
        ok = all(s.ready for s in states)
        return ok, {"status": "ready" if ok else "not ready",
                    "models": [s.model_dump(mode="json", exclude_unset=True) for s in states]}
