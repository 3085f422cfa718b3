"""Hypothesis against the live tiny-pair app through a real HTTP client: generated budget headers
(the X-Compute-Budget grammar of serving/budget.py, its near misses and arbitrary text) and generated
request bodies (every field of the chat, completions and classify bodies with in- and out-of-range
values, wrong types, unknown fields, streaming or not).

What must hold: no 5xx, no hang (every answer within the client timeout, every stream ends), the
status agrees with what the request is (a budget the grammar accepts is served, one it refuses is a
400 `invalid_budget`), and the server is healthy after: /health answers, no request in flight, no
engine row left. The counts of requests and of answers by status are printed (and written to
$STITCHSERVE_FUZZ_REPORT when set; benchmarks/api_fuzz.py records them).
"""
from __future__ import annotations

import json
import os
import time
from collections import Counter

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.budget import Budget, BudgetError, try_parse_budget
from serving_fixtures import http, served  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.timeout(600), pytest.mark.fuzz]

CHAT, CLS = "tinychat", "tinycls"
CLIENT_TIMEOUT_S = 60.0  # a hang is an answer slower than this (the app's request timeout is 60 s)
EXAMPLES = int(os.environ.get("STITCHSERVE_FUZZ_EXAMPLES", "25"))  # per test; the benchmark raises it
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.filter_too_much, HealthCheck.data_too_large])


class Tally:
    """Requests sent and answers by status, per fuzz target."""

    def __init__(self) -> None:
        self.by_target: dict[str, Counter] = {}
        self.slowest_s = 0.0

    def add(self, target: str, status: int | str, seconds: float) -> None:
        self.by_target.setdefault(target, Counter())[str(status)] += 1
        self.slowest_s = max(self.slowest_s, seconds)

    def summary(self) -> dict:
        return {"requests": sum(sum(c.values()) for c in self.by_target.values()),
                "by_target": {k: dict(sorted(c.items())) for k, c in self.by_target.items()},
                "by_status": dict(sorted(sum(self.by_target.values(), Counter()).items())),
                "slowest_answer_s": round(self.slowest_s, 3)}


TALLY = Tally()


# ---- strategies ------------------------------------------------------------------------------------
UNITS = ["ms", "ms/token", "ms/tok", "s/token", "s", "s/request", "ms/request", "k", "m", "b", "%", "gflops",
         "mflops", "tflops", "kflop", "GFLOPs", "MS", "S/Token"]
NEAR_UNITS = ["", "sec", "msec", "flops", "x", "ms/", "/token", "%%", "gb", "µs", "mss"]
number = st.one_of(st.integers(0, 10**6).map(str),
                   st.floats(0, 1e6, allow_nan=False, allow_infinity=False).map(lambda x: f"{x:.4g}"),
                   st.sampled_from(["0", "0.0", ".5", "5.", "1e3", "-5", "+5", "nan", "inf", "1.2.3", "", "00012",
                                    "9" * 400]))
term = st.builds(lambda sp1, n, sp2, u: f"{sp1}{n}{sp2}{u}", st.sampled_from(["", " ", "  "]), number,
                 st.sampled_from(["", " ", "\t"]), st.one_of(st.sampled_from(UNITS), st.sampled_from(NEAR_UNITS)))
grammar_like = st.lists(term, min_size=1, max_size=4).map(lambda ts: ",".join(ts))
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
                      max_size=300)
budget_header = st.one_of(grammar_like, header_text, st.just(""), st.just(" , "))
policy = st.one_of(st.none(), st.sampled_from(["strict", "best-effort", "best_effort", "STRICT", "lenient", ""]))

json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
                        st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
json_any = st.recursive(json_scalar, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                             st.dictionaries(st.text(max_size=8), inner,
                                                                             max_size=3)), max_leaves=8)
role = st.one_of(st.sampled_from(["system", "developer", "user", "assistant", "tool"]), st.text(max_size=8))
content = st.one_of(st.text(max_size=40), st.none(),
                    st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]),
                                                    "text": st.text(max_size=20)}), max_size=2), json_any)
message = st.one_of(st.fixed_dictionaries({"role": role, "content": content}), json_any)


def maybe(strategy):
    """A field left out (None here means: not sent) or sent with a generated value."""
    return st.one_of(st.none(), strategy)


def small_ints(lo: int = -5, hi: int = 40):
    return st.one_of(st.integers(lo, hi), st.sampled_from([0, 10**9, -(10**9), 2**63, 2**64, -(2**63) - 1]), json_scalar)


def body_from(fields: dict) -> st.SearchStrategy:
    """A dict with a generated subset of `fields` (None values are dropped) and maybe unknown keys."""
    return st.builds(lambda d, extra: {**{k: v for k, v in d.items() if v is not None}, **extra},
                     st.fixed_dictionaries({k: maybe(v) for k, v in fields.items()}),
                     st.dictionaries(st.sampled_from(["foo", "tools", "n", "best_of", "suffix", "logit_bias",
                                                      "response_format", "echo", "functions", "audio"]),
                                     json_any, max_size=2))


SAMPLING = {"max_tokens": small_ints(), "temperature": st.one_of(st.floats(-1, 3, allow_nan=False), json_scalar),
            "top_p": st.one_of(st.floats(-0.5, 1.5, allow_nan=False), json_scalar), "seed": small_ints(),
            "stop": st.one_of(st.text(max_size=4), st.lists(st.text(max_size=4), max_size=6), json_scalar),
            "stream": st.one_of(st.booleans(), json_scalar),
            "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), json_any),
            "compute_budget": st.one_of(grammar_like, st.text(max_size=10)), "user": st.text(max_size=5)}
# Bodies the server must serve (200), with every optional field in range: half of each fuzzer's
# examples, so the fuzz reaches generation, streaming, stop strings and logprobs, not only validation.
VALID_SAMPLING = {"max_tokens": st.integers(1, 8), "temperature": st.floats(0, 2), "top_p": st.floats(0.05, 1),
                  "seed": st.integers(-(2**63), 2**64 - 1), "stream": st.booleans(),
                  "stop": st.lists(st.text(min_size=1, max_size=3), max_size=4),
                  "user": st.text(max_size=5)}
valid_chat = st.builds(lambda opt, msgs: {"model": CHAT, "messages": msgs, **{k: v for k, v in opt.items() if v is not None}},
                       st.fixed_dictionaries({**{k: maybe(v) for k, v in VALID_SAMPLING.items()},
                                              "logprobs": maybe(st.booleans()), "top_logprobs": maybe(st.integers(0, 5))}),
                       st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                                       "content": st.text(max_size=30)}), min_size=1, max_size=3))
valid_completion = st.builds(lambda opt, prompt: {"model": CHAT, "prompt": prompt,
                                                  **{k: v for k, v in opt.items() if v is not None}},
                             st.fixed_dictionaries({**{k: maybe(v) for k, v in VALID_SAMPLING.items()},
                                                    "logprobs": maybe(st.integers(0, 5)), "echo": maybe(st.booleans())}),
                             st.one_of(st.text(min_size=1, max_size=40), st.lists(st.integers(1, 50), min_size=1,
                                                                                  max_size=20)))
chat_body = st.one_of(valid_chat, body_from({"model": st.one_of(st.just(CHAT), st.just(CLS), st.text(max_size=10)),
                       "messages": st.one_of(st.lists(message, max_size=3), json_any),
                       "logprobs": st.one_of(st.booleans(), json_scalar), "top_logprobs": small_ints(-2, 25),
                       "max_completion_tokens": small_ints(), **SAMPLING}))
completion_body = st.one_of(valid_completion, body_from({"model": st.one_of(st.just(CHAT), st.text(max_size=10)),
                             "prompt": st.one_of(st.text(max_size=60), st.lists(st.integers(-5, 70000), max_size=30),
                                                 st.lists(st.text(max_size=5), max_size=2), json_any),
                             "logprobs": small_ints(-2, 25), "echo": st.one_of(st.booleans(), json_scalar),
                             **SAMPLING}))
classify_body = body_from({"model": st.one_of(st.just(CLS), st.just(CHAT), st.text(max_size=10)),
                           "input": st.one_of(st.text(max_size=60), st.lists(st.text(max_size=30), max_size=5),
                                              json_any),
                           "compute_budget": st.one_of(grammar_like, st.text(max_size=10))})


# ---- the fuzz runs -----------------------------------------------------------------------------------
def send(c: httpx.Client, target: str, path: str, body: dict, headers: dict | None = None
         ) -> tuple[int, list[dict], httpx.Headers, float]:
    """POST and read the whole answer (every SSE event when it streams). -> (status, JSON items, headers, s)."""
    t0 = time.monotonic()
    raw = json.dumps(body).encode()
    with c.stream("POST", path, content=raw, headers={"Content-Type": "application/json", **(headers or {})}) as r:
        text = r.read().decode()
    dt = time.monotonic() - t0
    TALLY.add(target, r.status_code, dt)
    assert r.status_code < 500, (target, r.status_code, body, headers, text[:500])
    assert dt < CLIENT_TIMEOUT_S
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        events = [ln[6:] for ln in text.splitlines() if ln.startswith("data: ")]
        assert events and events[-1] == "[DONE]" or any('"error"' in e for e in events), (body, text[-500:])
        items = [json.loads(e) for e in events if e != "[DONE]"]
        assert not any("error" in it and it["error"].get("code", 0) >= 500 for it in items), (body, text[-500:])
        return r.status_code, items, r.headers, dt
    return r.status_code, [json.loads(text)], r.headers, dt


@pytest.fixture(scope="module")
def client(served):
    with httpx.Client(base_url=served.base_url, headers=served.auth, timeout=CLIENT_TIMEOUT_S) as c:
        yield c


@SETTINGS
@given(header=budget_header, pol=policy, chat=st.booleans())
def test_fuzz_budget_headers(client, header, pol, chat):
    """Whatever the header says: a budget the grammar reads is served (200, or 422 when strict and
    nothing fits), anything else is one 400 `invalid_budget`."""
    # HTTP has no leading or trailing blanks in a header value (h11 refuses to send them; proxies strip
    # them); the rest goes as latin-1 bytes, as a client may send it
    header = header.strip(" \t")
    headers: dict[str, bytes] = {"X-Compute-Budget": header.encode("latin-1")}
    if pol is not None:
        pol = pol.strip(" \t")
        headers["X-Budget-Policy"] = pol.encode("latin-1")
    if chat:
        path, body = "/v1/chat/completions", {"model": CHAT, "messages": [{"role": "user", "content": "hi"}],
                                              "max_tokens": 1}
    else:
        path, body = "/v1/classify", {"model": CLS, "input": ["a headline"]}
    status, items, hdrs, _ = send(client, "budget_header", path, body, headers)
    parsed = try_parse_budget(header) if header.strip() else Budget()
    bad_policy = pol is not None and pol.strip().lower() not in ("strict", "best-effort", "best_effort")
    if isinstance(parsed, BudgetError):
        assert status == 400 and items[0]["error"]["type"] == "invalid_budget", (header, status, items)
    elif bad_policy:
        assert status == 400 and items[0]["error"]["param"] == "X-Budget-Policy", (pol, status, items)
    else:
        assert status in (200, 422), (header, pol, status, items)
        if status == 422:
            assert pol.strip().lower() == "strict" and hdrs["x-budget-met"] == "false"
        else:
            assert hdrs["x-budget-met"] in ("true", "false")


@SETTINGS
@given(body=chat_body, header=st.one_of(st.none(), grammar_like))
def test_fuzz_chat_bodies(client, body, header):
    headers = {"X-Compute-Budget": header.strip(" \t").encode("latin-1")} if header is not None else {}  # see above
    status, items, _, _ = send(client, "chat_body", "/v1/chat/completions", body, headers)
    if status == 200 and not (isinstance(body.get("stream"), bool) and body["stream"]):
        assert items[0]["object"] == "chat.completion" and items[0]["model"] == CHAT
    elif status != 200:
        assert items[0]["error"]["code"] == status and items[0]["error"]["message"]


@SETTINGS
@given(body=completion_body)
def test_fuzz_completion_bodies(client, body):
    status, items, _, _ = send(client, "completion_body", "/v1/completions", body)
    if status != 200:
        assert items[0]["error"]["code"] == status and items[0]["error"]["message"]


@SETTINGS
@given(body=classify_body)
def test_fuzz_classify_bodies(client, body):
    status, items, _, _ = send(client, "classify_body", "/v1/classify", body)
    if status == 200:
        assert all(abs(sum(d["probs"].values()) - 1) < 1e-3 for d in items[0]["data"])
    else:
        assert items[0]["error"]["code"] == status and items[0]["error"]["message"]


def test_server_healthy_after_fuzzing(served, client):
    """Runs last in this module: nothing in flight, no engine row left, the server still answers."""
    assert client.get("/health").status_code == 200

    def idle():
        models = client.get("/ready").json()["models"]
        return all(m["inflight"] == 0 and m["engine"]["running"] == 0 and m["engine"]["waiting"] == 0
                   for m in models)

    for _ in range(100):
        if idle():
            break
        time.sleep(0.2)
    assert idle(), client.get("/ready").json()
    r = client.post("/v1/chat/completions", json={"model": CHAT, "messages": [{"role": "user", "content": "hi"}],
                                                  "max_tokens": 2})
    assert r.status_code == 200
    summary = TALLY.summary()
    print("fuzz:", json.dumps(summary))
    assert summary["requests"] >= 4 * min(EXAMPLES, 10)
    assert not any(s.startswith("5") for s in summary["by_status"])
    if out := os.environ.get("STITCHSERVE_FUZZ_REPORT"):
        with open(out, "w") as f:
            json.dump({**summary, "examples_per_test": EXAMPLES}, f, indent=1)
