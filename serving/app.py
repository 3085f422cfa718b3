"""The HTTP layer (the ingress: FastAPI routes) and `build_app(config)`, the builder that returns the Serve
application.

Thin on purpose: each route hands the raw request to `OpenAIServing` and maps the value it gets back
(a body, an SSE stream, or a `ServingError`) to an HTTP response. The API key and the body-size limit
are applied to every route by one middleware (the API documentation, /docs and /openapi.json, is open).
`serving.openapi` documents the raw-body routes with the pydantic models that validate them.

    serve run deploy/serve_cpu.yaml          # import_path: serving.app:build_app, args: ServeConfig
    stitchserve serve --palette DIR ...      # the same builder from the CLI
"""

import hmac
import logging
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from ray import serve
from ray.serve.deployment import Application

from . import openapi as doc
from .api_serving import OpenAIServing, PaletteRef, Served, ServingError
from .config import ServeConfig
from .replica import PaletteReplica
from .metrics import RayServeStatLogger, scrape_relay
from .protocol import (ChatCompletionRequest, ChatCompletionResponse, ClassifyRequest, ClassifyResponse,
                       CompletionRequest, CompletionResponse, DetokenizeRequest, DetokenizeResponse, ModelList,
                       StitchList, TokenizeRequest, TokenizeResponse, TokenizerInfo)

log = logging.getLogger("ray.serve")

INGRESS_NAME = "StitchServeIngress"

fastapi_app = FastAPI(
    title="stitchserve", version="0.1.0",
    description="Budget-routed stitched LMs, OpenAI-compatible. Send `X-Compute-Budget` to choose how much "
                "compute a request may use; the `X-Stitch-*` response headers say which stitch served it.")


class HealthStatus(BaseModel):
    status: str


class ReadyStatus(BaseModel):
    status: str = Field(description="ready | not ready")
    models: list[dict] = Field(description="per palette deployment: ready, replica, in-flight requests, engine")


def _error_response(err: ServingError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _to_response(out: Served | ServingError) -> Response:
    if isinstance(out, ServingError):
        return _error_response(out)
    if out.stream is not None:
        return StreamingResponse(out.stream, media_type="text/event-stream",
                                 headers={**out.headers, "Cache-Control": "no-cache"})
    assert out.body is not None
    return JSONResponse(out.body.model_dump(mode="json"), headers=out.headers)


# Set per process by the ingress replica's constructor (one ingress per process).
_GUARD: dict[str, Any] = {"api_key": None, "max_request_bytes": None}


class GuardMiddleware:
    """API key (Bearer or X-API-Key) and body-size limit, for every route. Plain ASGI rather than
    `BaseHTTPMiddleware`, which would sit between SSE streams and client-disconnect cancellation."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "").removeprefix(scope.get("root_path", ""))
        if path in doc.DOC_PATHS:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        err = self.check(headers)
        if err is not None:
            return await _error_response(err)(scope, receive, send)
        return await self.app(scope, receive, send)

    @staticmethod
    def check(headers: dict[str, str]) -> ServingError | None:
        key = _GUARD.get("api_key")
        if key:
            auth = headers.get("authorization", "")
            given = auth[7:].strip() if auth.lower().startswith("bearer ") else headers.get("x-api-key", "")
            if not hmac.compare_digest(given.encode(), key.encode()):
                return ServingError(401, "missing or invalid API key (Authorization: Bearer <key>)",
                                    type="authentication_error", headers={"WWW-Authenticate": "Bearer"})
        limit = _GUARD.get("max_request_bytes")
        length = headers.get("content-length", "")
        if limit and length.isdigit() and int(length) > limit:
            return ServingError(413, f"request body over {limit} bytes")
        return None


fastapi_app.add_middleware(GuardMiddleware)
doc.install(fastapi_app)
_GET_ERRORS = doc.errors(401, 503)


def _served(out: Any) -> Response:
    return _error_response(out) if isinstance(out, ServingError) else JSONResponse(out.model_dump(mode="json"))


@serve.ingress(fastapi_app)
class StitchServeIngress:
    def __init__(self, config: dict[str, Any], handles: dict[str, Any], api_key: str | None = None) -> None:
        self.cfg = ServeConfig.validate_dict(config)
        palettes = {p.name: PaletteRef(p, handles[p.name]) for p in self.cfg.palettes}
        self.serving = OpenAIServing(self.cfg, palettes, RayServeStatLogger())
        # Serve pickles this class by value, so its globals here would be copies: reach the module's
        # real _GUARD (the one the middleware reads) through the import system.
        import serving.app as this_module

        this_module._GUARD.update(api_key=api_key or self.cfg.effective_api_key(),
                                  max_request_bytes=self.cfg.max_request_bytes)

    @fastapi_app.post("/v1/chat/completions", openapi_extra=doc.body(ChatCompletionRequest),
                      responses=doc.served(ChatCompletionResponse, stream=True), summary="Chat completion")
    async def chat_completions(self, request: Request) -> Response:
        return _to_response(await self.serving.generate(await request.body(), request.headers, chat=True))

    @fastapi_app.post("/v1/completions", openapi_extra=doc.body(CompletionRequest),
                      responses=doc.served(CompletionResponse, stream=True), summary="Text completion")
    async def completions(self, request: Request) -> Response:
        return _to_response(await self.serving.generate(await request.body(), request.headers, chat=False))

    @fastapi_app.post("/v1/classify", openapi_extra=doc.body(ClassifyRequest),
                      responses=doc.served(ClassifyResponse, stream=False), summary="Classify texts")
    async def classify(self, request: Request) -> Response:
        return _to_response(await self.serving.classify(await request.body(), request.headers))

    @fastapi_app.get("/v1/models", responses={200: {"model": ModelList}, **_GET_ERRORS})
    async def models(self) -> Response:
        return _served(await self.serving.models())

    @fastapi_app.get("/v1/stitches", responses={200: {"model": StitchList}, **doc.errors(401, 404, 503)},
                     summary="Deployed stitches with their measured latency on the replica that answers")
    async def stitches(self, model: str | None = Query(None, description="one model's stitches")) -> Response:
        return _served(await self.serving.stitches(model))

    # vLLM's tokenizer endpoints (lm-evaluation-harness's remote tokenizer uses them)
    @fastapi_app.post("/tokenize", openapi_extra=doc.body(TokenizeRequest, budget_headers=False),
                      responses={200: {"model": TokenizeResponse}, **doc.errors(400, 401, 404, 413, 500, 503)})
    async def tokenize(self, request: Request) -> Response:
        return _to_response(await self.serving.tokenize(await request.body()))

    @fastapi_app.post("/detokenize", openapi_extra=doc.body(DetokenizeRequest, budget_headers=False),
                      responses={200: {"model": DetokenizeResponse}, **doc.errors(400, 401, 404, 413, 500, 503)})
    async def detokenize(self, request: Request) -> Response:
        return _to_response(await self.serving.detokenize(await request.body()))

    @fastapi_app.get("/tokenizer_info", responses={200: {"model": TokenizerInfo}, **doc.errors(400, 401, 404, 500, 503)})
    async def tokenizer_info(self, model: str | None = Query(None, description="needed when several chat "
                                                                                 "models are served")) -> Response:
        return _to_response(await self.serving.tokenizer_info(model))

    @fastapi_app.get("/health", responses={200: {"model": HealthStatus}, 401: doc.errors(401)[401]})
    async def health(self) -> Response:
        return JSONResponse({"status": "ok"})

    @fastapi_app.get("/ready", responses={200: {"model": ReadyStatus}, 503: {"model": ReadyStatus, "description": (
        "not ready"), "headers": {"Retry-After": {"schema": {"type": "string"}}}}, 401: doc.errors(401)[401]})
    async def ready(self) -> Response:
        ok, body = await self.serving.ready()
        return JSONResponse(body, status_code=200 if ok else 503, headers={} if ok else {"Retry-After": "5"})

    @fastapi_app.get("/metrics", responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                                                  "description": "Prometheus text: the stitchserve_* metrics"},
                                            **doc.errors(401, 404)})
    async def metrics(self) -> Response:
        if not self.cfg.relay_metrics:
            return _error_response(ServingError(404, "metrics relay is off; scrape Ray's metrics export port"))
        return PlainTextResponse(await scrape_relay(), media_type="text/plain; version=0.0.4; charset=utf-8")


def _default_max_ongoing(p) -> int:
    """Chat: the engine's slots plus as many requests waiting inside the replica, so a slot that frees
    is refilled at the next engine step rather than after a round trip through Serve's queue.
    Classify: one full batch per stitch, so each stitch's `@serve.batch` can fill (docs/DESIGN_NOTES.md section 4)."""
    if p.task != "classify":
        return 2 * p.max_batch_size
    try:
        from stitchlib.palette import read_manifest

        n = len(read_manifest(p.path).deployed())
    except Exception:
        n = 4
    return p.max_batch_size * max(n, 1)


def build_app(args: dict[str, Any] | ServeConfig) -> Application:
    """Application builder: `ServeConfig` (or its dict, e.g. the `args` of a Serve config file) -> app.

    One deployment per palette (`Palette-<name>`) and the FastAPI ingress (`StitchServeIngress`); the
    deployment names are what a Serve config file's `deployments:` section overrides."""
    cfg = ServeConfig.validate_dict(args, where="build_app args").resolved()
    handles = {}
    for p in cfg.palettes:
        dep = serve.deployment(PaletteReplica).options(
            name=p.deployment_name, **p.deployment.to_options(default_max_ongoing=_default_max_ongoing(p)))
        handles[p.name] = dep.bind(p.model_dump(mode="json"))
    ingress = serve.deployment(StitchServeIngress).options(
        name=INGRESS_NAME, **cfg.ingress.to_options(default_max_ongoing=256))
    return ingress.bind(cfg.model_dump(mode="json"), handles, cfg.effective_api_key())
