"""The OpenAPI description of the HTTP API (`/openapi.json`, `/docs`).

The routes read raw bodies (so that every validation failure is our 400 with OpenAI's error shape, not
FastAPI's 422), so FastAPI cannot see their bodies: this module documents them with the SAME pydantic
models that validate them, plus the request headers (`X-Compute-Budget`, `X-Budget-Policy`,
`X-Stitch-Id`, `x-request-timeout-seconds`), the `X-Stitch-*` response headers, the SSE alternative of
the streaming endpoints, the error shape of every non-2xx status and the API-key schemes.
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from .budget import GRAMMAR, MAX_HEADER_CHARS
from .protocol import ErrorResponse

DOC_PATHS = ("/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc")  # open without the API key

_REQUEST_MODELS: dict[str, type[BaseModel]] = {}  # component name -> request model documented by `body()`

_STR = {"type": "string"}

BUDGET_PARAMS: list[dict[str, Any]] = [
    {"name": "X-Compute-Budget", "in": "header", "required": False,
     "schema": {"type": "string", "maxLength": MAX_HEADER_CHARS},
     "description": GRAMMAR + ". Absent: the deployment's default budget. Malformed: 400 (type invalid_budget)."},
    {"name": "X-Budget-Policy", "in": "header", "required": False,
     "schema": {"type": "string", "enum": ["best-effort", "best_effort", "strict"]},
     "description": "best-effort (default): when no stitch fits, serve the cheapest and say so with "
                    "X-Budget-Met: false. strict: answer 422 (type budget_not_met) instead."},
    {"name": "X-Stitch-Id", "in": "header", "required": False, "schema": {"type": "string", "maxLength": 64},
     "description": "Evaluation override: serve on this deployed stitch (ids: GET /v1/stitches) instead of "
                    "routing; the budget is still checked against it (X-Budget-Met; 422 under strict). "
                    "A stitch that is not deployed: 404 (type stitch_not_found)."},
    {"name": "x-request-timeout-seconds", "in": "header", "required": False, "schema": {"type": "string"},
     "description": "Per-request timeout in seconds (positive number, at most the server's limit); past it: 504."},
]

STITCH_HEADERS: dict[str, dict[str, Any]] = {
    "X-Stitch-Id": {"description": "the stitch that served the request", "required": True, "schema": _STR},
    "X-Stitch-Params": {"description": "its parameters", "required": True, "schema": _STR},
    "X-Stitch-GFLOPs": {"description": "its forward GFLOPs per token", "required": True, "schema": _STR},
    "X-Stitch-Latency-Ms": {"description": "the latency estimate routing used (ms per output token; classify: "
                                           "per request)", "required": True, "schema": _STR},
    "X-Budget-Met": {"description": "true, or false when no stitch fitted the budget and the cheapest served",
                     "required": True, "schema": {"type": "string", "enum": ["true", "false"]}},
}

_ERRORS = {
    400: "invalid request: malformed body, a field out of range, an unsupported field (named), a malformed budget",
    401: "missing or invalid API key",
    404: "unknown model, or an X-Stitch-Id that is not deployed",
    413: "request body too large",
    422: "strict budget that no deployed stitch meets (type budget_not_met)",
    500: "the model replica failed",
    503: "queue full or replica unavailable (Retry-After)",
    504: "request timed out",
}


def _error(status: int, text: str) -> dict[str, Any]:
    out: dict[str, Any] = {"description": text, "model": ErrorResponse}
    if status == 422:
        out["headers"] = {"X-Budget-Met": {"description": "false", "schema": _STR}}
    if status in (401,):
        out["headers"] = {"WWW-Authenticate": {"description": "Bearer", "schema": _STR}}
    if status == 503:
        out["headers"] = {"Retry-After": {"description": "seconds", "schema": _STR}}
    return out


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: _error(s, _ERRORS[s]) for s in statuses}


def body(model: type[BaseModel], *, budget_headers: bool = True) -> dict[str, Any]:
    """`openapi_extra` for a route that reads its raw body: the body is `model`, plus the budget headers."""
    _REQUEST_MODELS[model.__name__] = model
    extra: dict[str, Any] = {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}
    if budget_headers:
        extra["parameters"] = BUDGET_PARAMS
    return extra


def served(model: type[BaseModel], *, stream: bool, headers: bool = True) -> dict[int | str, dict[str, Any]]:
    """The 200 answer of a generation/classify route (+ its SSE form) and every error status."""
    ok: dict[str, Any] = {"model": model, "description": "the answer; the X-Stitch-* headers say what served it"}
    if headers:
        ok["headers"] = STITCH_HEADERS
    if stream:
        ok["content"] = {"text/event-stream": {"schema": {"type": "string"}, "description": (
            "with stream: true, server-sent events: `data: <chunk JSON>` per chunk (the first and last carry "
            "`stitch`), then `data: [DONE]`; a failure mid-stream is one `data: <ErrorResponse JSON>` event")}}
    return {200: ok, **errors(400, 401, 404, 413, 422, 500, 503, 504)}


def install(app: FastAPI) -> None:
    """Replace `app.openapi` with one that adds the request models and the API-key schemes."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        comps = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, model in _REQUEST_MODELS.items():
            js = model.model_json_schema(ref_template="#/components/schemas/{model}", mode="validation")
            for dname, d in js.pop("$defs", {}).items():
                comps.setdefault(dname, d)
            comps[name] = js
        schema["components"]["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer", "description": "when the server has an API key"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "the same key"},
        }
        schema["security"] = [{"bearer": []}, {"apiKey": []}, {}]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
