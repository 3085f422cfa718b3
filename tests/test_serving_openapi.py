"""The OpenAPI schema of the live tiny-pair app: what it documents, and schemathesis (its own CLI) run
against it: no server error and no response that disagrees with the schema (status code, content
type, headers, body), and no schema-violating request accepted.

Schemathesis's positive-data check (a schema-valid request must get a 2xx) is run too and its findings
are counted, not failed on: validity there also depends on the served state that a static schema
cannot state (the prompt's length in tokens against the context, token ids against the vocabulary,
which model and stitch ids are deployed)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import httpx
import pytest

from serving_fixtures import http, served  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(600)

# checks whose every finding is a defect; the rest of schemathesis's checks are reported, not asserted
MUST_PASS = {"ServerError", "UndefinedStatusCode", "UndefinedContentType", "MissingHeaders", "JsonSchemaError",
             "MalformedJson", "AcceptedNegativeData", "MalformedMediaType"}
MAX_EXAMPLES = 25  # per operation and phase: ~500-900 requests, ~1 min on the tiny pair


@pytest.fixture(scope="module")
def schema(served) -> dict:
    r = httpx.get(served.base_url + "/openapi.json", timeout=30)  # documentation is open without the key
    assert r.status_code == 200
    return r.json()


def test_schema_documents_bodies_headers_and_errors(schema, served):
    from serving.protocol import ChatCompletionRequest, ClassifyRequest, CompletionRequest

    comps = schema["components"]["schemas"]
    for path, model in [("/v1/chat/completions", ChatCompletionRequest), ("/v1/completions", CompletionRequest),
                        ("/v1/classify", ClassifyRequest)]:
        op = schema["paths"][path]["post"]
        ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref == f"#/components/schemas/{model.__name__}"
        own = model.model_json_schema(ref_template="#/components/schemas/{model}")
        own.pop("$defs", None)
        assert comps[model.__name__] == own  # the validating model IS the documented body
        params = {p["name"] for p in op["parameters"] if p["in"] == "header"}
        assert {"X-Compute-Budget", "X-Budget-Policy", "X-Stitch-Id", "x-request-timeout-seconds"} <= params
        ok = op["responses"]["200"]
        assert {"X-Stitch-Id", "X-Stitch-Params", "X-Stitch-GFLOPs", "X-Stitch-Latency-Ms", "X-Budget-Met"} <= set(
            ok["headers"])
        for status in ("400", "401", "404", "422", "503", "504"):
            err = op["responses"][status]["content"]["application/json"]["schema"]["$ref"]
            assert err == "#/components/schemas/ErrorResponse"
    assert "text/event-stream" in schema["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    chat = comps["ChatCompletionRequest"]["properties"]
    assert "logprobs" in chat and chat["top_logprobs"]["anyOf"][0]["maximum"] == 20
    assert "Not supported" in chat["tools"]["description"]
    assert set(schema["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    docs = httpx.get(served.base_url + "/docs", timeout=30)
    assert docs.status_code == 200 and "swagger-ui" in docs.text and "/openapi.json" in docs.text


@pytest.mark.skipif(shutil.which("st") is None and not os.environ.get("CI"), reason="schemathesis not installed")
def test_schemathesis_finds_no_server_error_and_no_mismatch(served, tmp_path, schema):
    report = tmp_path / "st.json"
    cmd = [shutil.which("st") or "st", "run", served.base_url + "/openapi.json",
           "-H", f"Authorization: Bearer {served.api_key}", "--checks", "all", "-n", str(MAX_EXAMPLES),
           "--seed", "13", "--phases", "examples,coverage,fuzzing", "--continue-on-failure",
           "--generation-deterministic", "--request-timeout", "120",
           "--report", "json", "--report-json-path", str(report)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=540, cwd=tmp_path,  # its example db
                          env={**os.environ, "SCHEMATHESIS_HOOKS": ""})
    assert report.is_file(), proc.stdout[-4000:] + proc.stderr[-2000:]
    rep = json.loads(report.read_text())
    summary = {"operations": rep["operations"]["tested"], "test_cases": rep["test_cases"]["generated"],
               "failures": {f["code"] + " " + f["title"]: f["count"] for f in rep["failures"]},
               "errors": len(rep["errors"]), "seconds": round(rep["running_time"], 1)}
    print("schemathesis:", json.dumps(summary))  # the recorded counts (pytest -s shows them)
    if out := os.environ.get("STITCHSERVE_SCHEMATHESIS_REPORT"):
        with open(out, "w") as f:
            json.dump({**summary, "schemathesis": rep["schemathesis_version"], "checks": "all",
                       "max_examples": MAX_EXAMPLES, "phases": "examples,coverage,fuzzing",
                       "failures_detail": rep["failures"]}, f, indent=1)
    assert rep["operations"]["tested"] == len([m for p in schema["paths"].values() for m in p])
    assert rep["test_cases"]["generated"] >= 200 and not rep["errors"], proc.stdout[-4000:]
    bad = [f for f in rep["failures"] if f["type"] in MUST_PASS or f["type"] not in ("RejectedPositiveData",)]
    assert not bad, (bad, proc.stdout[-6000:])
