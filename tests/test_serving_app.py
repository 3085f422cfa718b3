"""End to end over real local Ray Serve and real HTTP: OpenAI SDK, httpx, Prometheus text parser.

One application (a chat and a classify palette of the tiny pair) is started once for the session.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import time

import httpx
import openai
import pytest

from serving.budget import GRAMMAR
from serving_fixtures import API_KEY, http, scrape, served, total  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(300)

CHAT = "tinychat"
CLS = "tinycls"
HI = [{"role": "user", "content": "Say hi."}]


@pytest.fixture(scope="session")
def client(served):
    return openai.OpenAI(base_url=served.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def stitches(http):
    """Deployed chat stitches as the server reports them, cheapest first."""
    data = http.get("/v1/stitches", params={"model": CHAT}).json()["data"]
    return sorted(data, key=lambda s: s["gflops"])


def metrics(http) -> dict:
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return scrape(r.text)


def wait_for(pred, timeout=15.0, every=0.25):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = pred()
        if v:
            return v
        time.sleep(every)
    return pred()


# ---- basics ----------------------------------------------------------------------------------------
def test_classify_replica_uses_the_saved_profile_table(served, http):
    """`profile.table` replaces start-up measuring: the router's figures are the table's, bit for bit."""
    from stitchlib.engine.profile import load_profile

    path = served.config.palettes[1].profile.table
    table, meta = load_profile(path)
    assert meta["palette"] and meta["device_type"] == "cpu" and meta["dtype"] == "bfloat16"
    models = {m["model"]: m for m in http.get("/ready").json()["models"]}
    assert models[CLS]["latency_profile"] == str(path)
    assert models[CHAT]["latency_profile"] == "measured at start-up"
    for s in http.get("/v1/stitches", params={"model": CLS}).json()["data"]:
        assert s["prefill_s_per_token"] == table[s["id"]].prefill_s_per_token
        assert {int(b): v for b, v in s["decode_step_s"].items()} == table[s["id"]].decode_step_s


def test_health_ready_models(http):
    assert http.get("/health").json() == {"status": "ok"}
    r = http.get("/ready")
    assert r.status_code == 200 and r.json()["status"] == "ready"
    models = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert set(models) == {CHAT, CLS}
    assert models[CHAT]["task"] == "chat" and models[CLS]["labels"] == ["business", "sport", "tech"]


def test_stitches_report_profiled_latency(stitches, http):
    assert [s["id"] for s in stitches][0] == "small" and stitches[-1]["id"] == "large"
    for s in stitches:
        assert s["params"] > 0 and s["gflops"] > 0 and s["quality"] > 0
        assert s["prefill_s_per_token"] > 0 and s["latency_ms"] > 0 and s["replica"]
        assert set(s["decode_step_s"]) == {"1", "4"} and all(v > 0 for v in s["decode_step_s"].values())
    both = http.get("/v1/stitches").json()["data"]
    assert {s["model"] for s in both} == {CHAT, CLS}
    assert http.get("/v1/stitches", params={"model": "nope"}).status_code == 404


def test_api_key_on_every_route(served):
    with httpx.Client(base_url=served.base_url, timeout=30) as anon:
        for method, path in [("GET", "/health"), ("GET", "/ready"), ("GET", "/v1/models"), ("GET", "/v1/stitches"),
                             ("GET", "/metrics"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
                             ("POST", "/v1/classify")]:
            r = anon.request(method, path, json={})
            assert r.status_code == 401, path
            assert r.json()["error"]["type"] == "authentication_error"
        assert anon.get("/health", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert anon.get("/health", headers={"X-API-Key": API_KEY}).status_code == 200
    bad = openai.OpenAI(base_url=served.base_url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


# ---- OpenAI SDK ------------------------------------------------------------------------------------
STITCH_HEADERS = ["x-stitch-id", "x-stitch-params", "x-stitch-gflops", "x-stitch-latency-ms", "x-budget-met"]


def test_chat_plain_sdk(client, stitches):
    raw = client.chat.completions.with_raw_response.create(model=CHAT, messages=HI, max_tokens=6, temperature=0)
    c = raw.parse()
    for h in STITCH_HEADERS:
        assert h in raw.headers
    assert raw.headers["x-stitch-id"] == stitches[-1]["id"]  # no budget: best quality (= largest here)
    assert raw.headers["x-budget-met"] == "true"
    assert int(raw.headers["x-stitch-params"]) == stitches[-1]["params"]
    assert float(raw.headers["x-stitch-latency-ms"]) > 0
    assert c.object == "chat.completion" and c.model == CHAT
    assert c.choices[0].message.role == "assistant" and isinstance(c.choices[0].message.content, str)
    assert c.choices[0].finish_reason in ("stop", "length")
    assert c.usage.prompt_tokens > 0 and 1 <= c.usage.completion_tokens <= 6
    assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
    stitch = c.model_extra["stitch"]
    assert stitch["id"] == raw.headers["x-stitch-id"] and stitch["budget_met"] is True
    assert stitch["latency_ms"] == pytest.approx(float(raw.headers["x-stitch-latency-ms"]), abs=1e-3)


def test_chat_streaming_sdk_matches_plain(client):
    kw = dict(model=CHAT, messages=HI, max_tokens=12, temperature=0, extra_headers={"X-Compute-Budget": "700k"})
    plain = client.chat.completions.create(**kw)
    with client.chat.completions.with_streaming_response.create(
            stream=True, stream_options={"include_usage": True}, **kw) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        sid = resp.headers["x-stitch-id"]
        chunks = list(resp.parse())
    assert sid == plain.model_extra["stitch"]["id"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].model_extra["stitch"]["id"] == sid
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == plain.choices[0].message.content  # greedy: same tokens either way
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_completions_plain_and_stream_sdk(client):
    c = client.completions.create(model=CHAT, prompt="The cat", max_tokens=5, temperature=0)
    assert c.object == "text_completion" and c.usage.completion_tokens <= 5
    stream = client.completions.create(model=CHAT, prompt="The cat", max_tokens=5, temperature=0, stream=True)
    text = "".join(ch.choices[0].text for ch in stream if ch.choices)
    assert text == c.choices[0].text


def test_seed_and_sampling_params(client):
    kw = dict(model=CHAT, messages=HI, max_tokens=16, temperature=1.0, top_p=0.9)
    a = client.chat.completions.create(seed=7, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=7, **kw).choices[0].message.content
    outs = {client.chat.completions.create(seed=s, **kw).choices[0].message.content for s in range(8, 12)}
    assert a == b
    assert len(outs | {a}) > 1


def test_stop_strings_cut_the_text(client):
    kw = dict(model=CHAT, messages=HI, max_tokens=24, temperature=0)
    full = client.chat.completions.create(**kw).choices[0].message.content
    printable = [i for i in range(4, len(full) - 2) if full[i:i + 2].isprintable() and full[i:i + 2].strip()]
    if not printable:
        pytest.skip(f"greedy text has no printable pair to stop on: {full!r}")
    stop = full[printable[0]:printable[0] + 2]
    got = client.chat.completions.create(stop=[stop, "never-there"], **kw)
    assert got.choices[0].message.content == full[:full.find(stop)]
    assert got.choices[0].finish_reason == "stop"
    assert got.usage.completion_tokens < 24


# ---- budget routing ----------------------------------------------------------------------------------
def _route(http, budget: str | None, policy: str | None = None, model=CHAT) -> httpx.Response:
    headers = {}
    if budget is not None:
        headers["X-Compute-Budget"] = budget
    if policy is not None:
        headers["X-Budget-Policy"] = policy
    body = {"model": model, "messages": HI, "max_tokens": 2} if model == CHAT else {"input": "the match"}
    return http.post("/v1/chat/completions" if model == CHAT else "/v1/classify", json=body, headers=headers)


def test_budgets_pick_different_stitches(http, stitches):
    by_params = sorted(stitches, key=lambda s: s["params"])
    largest = stitches[-1]

    def best_under(pred):
        ok = [s for s in stitches if pred(s)]
        return max(ok, key=lambda s: s["quality"])["id"]

    cases = {
        None: largest["id"],
        f"{by_params[1]['params'] / 1e3 + 1:.0f}k": best_under(lambda s: s["params"] <= by_params[1]["params"] + 1e3),
        f"{stitches[2]['gflops'] * 1e3:.6f}MFLOPs": best_under(lambda s: s["gflops"] <= stitches[2]["gflops"] * 1.000001),
        "50%": best_under(lambda s: s["gflops"] <= 0.5 * largest["gflops"]),
        "10s/token, 1B": largest["id"],
    }
    chosen = {}
    for budget, want in cases.items():
        r = _route(http, budget)
        assert r.status_code == 200, r.text
        assert (budget, r.headers["x-stitch-id"], r.headers["x-budget-met"]) == (budget, want, "true")
        assert r.json()["stitch"]["id"] == want
        chosen[budget] = want
    assert len(set(chosen.values())) >= 3  # the budgets really separate stitches


def test_nothing_fits_cheapest_or_422(http, stitches):
    r = _route(http, "1k")
    assert r.status_code == 200
    assert r.headers["x-stitch-id"] == stitches[0]["id"] and r.headers["x-budget-met"] == "false"
    assert r.json()["stitch"]["budget_met"] is False and r.json()["stitch"]["violated"]
    r = _route(http, "0.00001ms")  # a latency no stitch can meet
    assert r.headers["x-budget-met"] == "false" and r.headers["x-stitch-id"] == stitches[0]["id"]
    r = _route(http, "1k", policy="strict")
    assert r.status_code == 422 and r.json()["error"]["type"] == "budget_not_met"
    assert r.headers["x-budget-met"] == "false" and GRAMMAR not in r.json()["error"]["message"]
    assert _route(http, "1B", policy="strict").status_code == 200


def test_latency_budget_uses_measured_estimates(http, stitches):
    # A budget between the cheapest and the priciest current estimate must route below the largest
    # stitch and report an estimate within the budget.
    lat = sorted(s["latency_ms"] for s in http.get("/v1/stitches", params={"model": CHAT}).json()["data"])
    budget_ms = lat[0] * 1.05
    r = _route(http, f"{budget_ms:.4f}ms")
    assert r.status_code == 200
    if r.headers["x-budget-met"] == "true":
        assert float(r.headers["x-stitch-latency-ms"]) <= budget_ms + 1e-6
    else:  # load from the previous tests moved every estimate above the budget: cheapest, said so
        assert r.headers["x-stitch-id"] == stitches[0]["id"]


# ---- classify ---------------------------------------------------------------------------------------
def test_classify(http):
    r = http.post("/v1/classify", json={"input": "Shares rose sharply today"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == CLS and len(body["data"]) == 1
    d = body["data"][0]
    assert d["label"] in ["business", "sport", "tech"] and d["label"] == max(d["probs"], key=d["probs"].get)
    assert sum(d["probs"].values()) == pytest.approx(1.0, abs=1e-4)
    for h in STITCH_HEADERS:
        assert h in r.headers
    many = http.post("/v1/classify", json={"model": CLS, "input": ["a", "the match ended 2-1", "new chip"]}).json()
    assert [x["index"] for x in many["data"]] == [0, 1, 2] and many["usage"]["prompt_tokens"] > 0


def test_classify_default_budget_and_header(http):
    cls_stitches = sorted(http.get("/v1/stitches", params={"model": CLS}).json()["data"], key=lambda s: s["params"])
    under_500k = max((s for s in cls_stitches if s["params"] <= 500_000), key=lambda s: s["quality"])["id"]
    assert _route(http, None, model=CLS).headers["x-stitch-id"] == under_500k  # configured default "500k"
    assert _route(http, "2B", model=CLS).headers["x-stitch-id"] == cls_stitches[-1]["id"]


# ---- errors ------------------------------------------------------------------------------------------
def test_clear_4xx(http):
    def post(path, body, **headers):
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return http.post(path, content=data, headers={"Content-Type": "application/json", **headers})

    chat = {"model": CHAT, "messages": HI, "max_tokens": 2}
    cases = [
        (post("/v1/chat/completions", b"{not json"), 400, "malformed JSON"),
        (post("/v1/chat/completions", b"[1, 2]"), 400, "object"),
        (post("/v1/chat/completions", {"model": CHAT}), 400, "messages"),
        (post("/v1/chat/completions", {**chat, "temperature": 5}), 400, "temperature"),
        (post("/v1/chat/completions", {**chat, "n": 2}), 400, "n=1"),
        (post("/v1/chat/completions", chat, **{"X-Compute-Budget": "fast please"}), 400, GRAMMAR),
        (post("/v1/chat/completions", chat, **{"X-Budget-Policy": "maybe"}), 400, "X-Budget-Policy"),
        (post("/v1/chat/completions", chat, **{"x-request-timeout-seconds": "soon"}), 400, "timeout"),
        (post("/v1/chat/completions", {**chat, "model": "gpt-9"}), 404, "does not exist"),
        (post("/v1/chat/completions", {**chat, "model": CLS}), 400, "classify model"),
        (post("/v1/classify", {"model": CHAT, "input": "x"}), 400, "chat model"),
        (post("/v1/classify", {"input": []}), 400, "input"),
        (post("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": "x" * 400}]}), 400,
         "over this model's limit of 256"),
        (post("/v1/chat/completions", {**chat, "max_tokens": 5000}), 400, "max_tokens"),
        (post("/v1/completions", {"model": CHAT, "prompt": ["a", "b"]}), 400, "one prompt"),
    ]
    for r, status, needle in cases:
        assert r.status_code == status, (needle, r.text)
        err = r.json()["error"]
        assert needle in err["message"], (needle, err)
        assert err["code"] == status
    r = post("/v1/chat/completions", {**chat, "model": "gpt-9"})
    assert r.json()["error"]["type"] == "model_not_found"


def _cancelled_and_tokens(http, m0, sid, statuses=("499",), labels=None):
    """(requests that ended as one of `statuses`, tokens generated on `sid`) since the scrape `m0`;
    requests are counted under the stitch labels `labels` (default: sid only)."""
    m = metrics(http)
    cancelled = sum(total(m, "stitchserve_requests_total", stitch=lab, status=st) -
                    total(m0, "stitchserve_requests_total", stitch=lab, status=st)
                    for st in statuses for lab in (labels or (sid,)))
    toks = total(m, "stitchserve_generation_tokens_total", stitch=sid) - \
        total(m0, "stitchserve_generation_tokens_total", stitch=sid)
    return (cancelled, toks) if cancelled >= 1 else None


def _status_deltas(http, m0, sid) -> dict:
    """For failure messages: every requests_total / generation_tokens change on `sid` (or "none") since `m0`."""
    m = metrics(http)
    keys = {(n, lab) for (n, lab) in m if n in ("stitchserve_requests_total", "stitchserve_generation_tokens_total")
            and dict(lab).get("stitch") in (sid, "none")}
    return {(n, dict(lab).get("stitch"), dict(lab).get("status")): m[(n, lab)] - m0.get((n, lab), 0)
            for n, lab in keys if m[(n, lab)] != m0.get((n, lab), 0)}


def _engine(http) -> dict:
    """The chat replica's engine as `/ready` reports it: slots, running, waiting, step counters."""
    return http.get("/ready").json()["models"][0]["engine"]


def test_request_timeout_cancels(http, stitches):
    # Ray's proxy owns x-request-timeout-seconds (docs/DESIGN_NOTES.md section 4): it answers 408, cancels the request
    # down the chain; the ingress applies the same header (and its configured timeout, 504) itself.
    sid = stitches[3]["id"]
    # The timeout is a third of what 900 tokens take at this replica's measured per-token latency (and
    # at most 0.3 s), so the request cannot finish first however fast the replica is; greedy, because
    # the tiny pair's greedy decode of HI emits no EOS within 900 tokens on any stitch.
    now = {s["id"]: s for s in http.get("/v1/stitches", params={"model": CHAT}).json()["data"]}
    timeout = min(0.3, 900 * now[sid]["latency_ms"] / 1e3 / 3)
    m0 = metrics(http)
    r = http.post("/v1/chat/completions", json={"model": CHAT, "messages": HI, "max_tokens": 900, "temperature": 0},
                  headers={"x-request-timeout-seconds": f"{timeout:.4f}",
                           "X-Compute-Budget": f"{stitches[3]['params'] / 1e3 + 1:.0f}k"})
    assert r.status_code in (408, 504), (r.status_code, r.text)
    # the timed-out generation was cancelled: the replica drains back to idle, well short of 900 tokens
    assert wait_for(lambda: http.get("/ready").json()["models"][0]["inflight"] == 0, timeout=10)
    # Whichever timer fired first (Ray's 408 cancels the ingress: 499; the ingress's own: 504), and
    # whether it fired before the replica routed the request (a slow replica: counted under stitch
    # "none") or during generation (under the stitch).
    res = wait_for(lambda: _cancelled_and_tokens(http, m0, sid, ("499", "504"), labels=(sid, "none")), timeout=15)
    assert res is not None and res[0] == 1 and res[1] < 900, (timeout, res, _status_deltas(http, m0, sid))
    assert wait_for(lambda: _engine(http)["running"] == 0, timeout=10)


def test_queue_full_503_with_retry_after(served, http):
    body = {"model": CHAT, "messages": HI, "max_tokens": 300, "temperature": 0}

    async def main():
        async with httpx.AsyncClient(base_url=served.base_url, headers=served.auth, timeout=120) as c:
            return await asyncio.gather(*(c.post("/v1/chat/completions", json=body) for _ in range(14)))

    rs = asyncio.run(main())
    codes = sorted(r.status_code for r in rs)
    assert 200 in codes and 503 in codes, codes
    assert set(codes) <= {200, 503}
    full = [r for r in rs if r.status_code == 503]
    assert all(r.headers.get("retry-after") for r in full)
    assert full[0].json()["error"]["type"] == "queue_full"
    assert sum(c == 200 for c in codes) <= 6 + 1  # max_inflight (+1: one may finish and free a slot)


def test_backpressure_503_and_ingress_timeout_504(served):
    """The `tight` app: max_ongoing_requests=1 + max_queued_requests=1 per replica, 1 s request timeout."""
    base = served.base_url + "/tight"
    body = {"model": CHAT, "messages": HI, "max_tokens": 100, "temperature": 0}

    async def flood():
        async with httpx.AsyncClient(base_url=base, timeout=60) as c:
            return await asyncio.gather(*(c.post("/v1/chat/completions", json=body) for _ in range(8)))

    rs = asyncio.run(flood())
    codes = [r.status_code for r in rs]
    assert set(codes) <= {200, 503, 504}, codes
    full = [r for r in rs if r.status_code == 503]
    assert full, codes
    assert all(r.headers.get("retry-after") and r.json()["error"]["type"] == "queue_full" for r in full)
    assert httpx.get(base + "/health").status_code == 200  # no API key on this app
    time.sleep(2)  # let the survivors drain
    r = httpx.post(base + "/v1/chat/completions", json={**body, "max_tokens": 900}, timeout=60)
    assert r.status_code == 504, r.text
    assert r.json()["error"]["type"] == "timeout" and "1s" in r.json()["error"]["message"]


def test_served_front_skips_a_stitch_no_cheaper_than_a_better_one(served):
    """The `tight` app's table prices one stitch at exactly the large anchor's decode step: budgets never
    go to it (a request there would pay the large anchor's time for a worse answer), /v1/stitches says
    why, and X-Stitch-Id still reaches it. The main app (front off) routes the same budget to it."""
    from serving_fixtures import FRONT_BASE_S, SHADOWED

    base = served.base_url + "/tight"
    data = sorted(httpx.get(base + "/v1/stitches").json()["data"], key=lambda s: s["gflops"])
    shadowed, large, below = data[SHADOWED], data[-1], data[SHADOWED - 1]
    assert [s["id"] for s in data if not s["routed"]] == [shadowed["id"]]
    assert shadowed["shadowed_by"] == "large" == large["id"]
    assert "not 2% under large's" in shadowed["route_note"] and "X-Stitch-Id still reaches it" in shadowed["route_note"]
    assert shadowed["decode_step_s"]["1"] == large["decode_step_s"]["1"]
    assert data[0]["decode_step_s"]["1"] == pytest.approx(FRONT_BASE_S, rel=1e-12)
    assert all(s["routed"] and s["shadowed_by"] is None for s in data if s["id"] != shadowed["id"])
    body = {"model": CHAT, "messages": HI, "max_tokens": 2, "temperature": 0}
    between = f"{(shadowed['gflops'] + large['gflops']) / 2 * 1e3:.6f}MFLOPs"  # fits the shadowed stitch, not large

    def post(url, **headers):
        r = httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=60)
        assert r.status_code == 200, r.text
        return r.headers["x-stitch-id"], r.headers["x-budget-met"]

    assert post(base, **{"X-Compute-Budget": between}) == (below["id"], "true")
    assert post(base, **{"X-Stitch-Id": shadowed["id"]})[0] == shadowed["id"]
    assert post(base)[0] == "large"
    assert post(served.base_url, Authorization=f"Bearer {API_KEY}", **{"X-Compute-Budget": between}) == \
        (shadowed["id"], "true")
    # and Prometheus says so: stitchserve_stitch_routed is 0 for it on the tight app only
    def routed_gauge() -> dict:
        m = scrape(httpx.get(served.base_url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text)
        return {(dict(lab)["application"], dict(lab)["stitch"]): v for (n, lab), v in m.items()
                if n == "stitchserve_stitch_routed" and dict(lab).get("model") == CHAT}

    g = wait_for(lambda: (lambda d: d if ("tight", shadowed["id"]) in d and ("stitchserve", "large") in d else None)(
        routed_gauge()), timeout=20)
    assert g and g[("tight", shadowed["id"])] == 0 and g[("tight", "large")] == 1
    assert all(v == 1 for (app, sid), v in g.items() if (app, sid) != ("tight", shadowed["id"]))


# ---- batching, disconnects, metrics -----------------------------------------------------------------
def _budget(stitch: dict) -> str:
    """A parameter budget that routes to exactly this stitch (the best one within it)."""
    return f"{stitch['params'] / 1e3 + 1:.0f}k"


def _open_stream(served, stitch: dict, max_tokens: int):
    """A streaming greedy request on `stitch`; returns (client, stream context, line iterator) once its
    first token has arrived (the ingress's role chunk comes first, then the first delta): it is decoding."""
    c = httpx.Client(base_url=served.base_url, headers={**served.auth, "X-Compute-Budget": _budget(stitch)},
                     timeout=60)
    ctx = c.stream("POST", "/v1/chat/completions",
                   json={"model": CHAT, "messages": HI, "max_tokens": max_tokens, "stream": True, "temperature": 0})
    resp = ctx.__enter__()
    assert resp.headers["x-stitch-id"] == stitch["id"]
    lines = resp.iter_lines()
    first = list(itertools.islice((ln for ln in lines if ln.startswith("data: ")), 2))
    assert len(first) == 2, first
    return c, ctx, lines


def _close_stream(c, ctx) -> None:
    """Leave the stream: the connection closes, the client went away (idempotent)."""
    ctx.__exit__(None, None, None)
    c.close()


def _stream_text(lines) -> str:
    text = []
    for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            text += [x["delta"].get("content") or "" for x in json.loads(line[6:])["choices"]]
    return "".join(text)


def test_different_stitches_share_engine_steps_and_greedy_output(served, http, client, stitches):
    """One engine step decodes rows of different stitches: a request on one stitch, sent while a long
    request on another is decoding, runs in the same steps (engine counters and the step histogram
    show it), and its greedy text is exactly the text it gets alone."""
    long_s, short_s = stitches[1], stitches[4]
    kw = dict(model=CHAT, messages=HI, max_tokens=24, temperature=0,
              extra_headers={"X-Compute-Budget": _budget(short_s)})
    alone = client.chat.completions.create(**kw)
    assert alone.model_extra["stitch"]["id"] == short_s["id"] and alone.usage.completion_tokens == 24
    e0, m0 = _engine(http), metrics(http)
    c, ctx, _ = _open_stream(served, long_s, 900)  # greedy, no early EOS: decoding for 900 steps
    try:
        together = client.chat.completions.create(**kw)
        e1 = _engine(http)
    finally:
        _close_stream(c, ctx)
    assert together.model_extra["stitch"]["id"] == short_s["id"]
    assert together.choices[0].message.content == alone.choices[0].message.content
    assert together.usage.completion_tokens == 24
    # every step of the short request but its prefill also decoded the long one
    assert e1["mixed_steps"] - e0["mixed_steps"] >= 23, (e0, e1)
    assert e1["max_stitches_per_step"] >= 2

    def mixed_steps_in_histogram(ms) -> float:
        name = "stitchserve_engine_step_stitches"
        return total(ms, name + "_count", model=CHAT) - total(ms, name + "_bucket", model=CHAT, le="1.0")
    assert wait_for(lambda: mixed_steps_in_histogram(metrics(http)) - mixed_steps_in_histogram(m0) >= 23, timeout=20)


def test_disconnect_frees_the_slot_while_another_request_finishes(served, http, stitches):
    """Per-row abort: a client that disconnects mid-stream leaves the engine at the next step boundary
    (its slot is free at once), while a request on another stitch decoding in the same steps goes on
    and finishes with the text it gets alone."""
    a, b = stitches[2], stitches[5]
    m0 = metrics(http)
    solo = http.post("/v1/chat/completions", headers={"X-Compute-Budget": _budget(b)},
                     json={"model": CHAT, "messages": HI, "max_tokens": 400, "temperature": 0})
    assert solo.status_code == 200 and solo.headers["x-stitch-id"] == b["id"]
    ca, ctx_a, _ = _open_stream(served, a, 950)  # greedy, no early EOS
    cb, ctx_b, lines_b = _open_stream(served, b, 400)
    try:
        assert _engine(http)["running"] == 2  # both are decoding (each got its first token)
        _close_stream(ca, ctx_a)  # a's client goes away
        t_close = time.time()
        # a's row leaves while b still has hundreds of tokens to go
        assert wait_for(lambda: _engine(http)["running"] == 1, timeout=10, every=0.02), _engine(http)
        freed_after = time.time() - t_close
        rest_b = _stream_text(lines_b)
    finally:
        _close_stream(ca, ctx_a)
        _close_stream(cb, ctx_b)
    # _open_stream read b's first delta; everything after it matches b's text alone
    full_b = solo.json()["choices"][0]["message"]["content"]
    assert rest_b and full_b.endswith(rest_b) and len(rest_b) < len(full_b)
    assert wait_for(lambda: http.get("/ready").json()["models"][0]["inflight"] == 0, timeout=10)
    res = wait_for(lambda: (lambda x: x if x and x[1] > 0 else None)(_cancelled_and_tokens(http, m0, a["id"])),
                   timeout=15)
    assert res is not None, ("the disconnect was not recorded", _status_deltas(http, m0, a["id"]))
    cancelled, toks = res
    print(f"disconnect: slot freed after {freed_after:.2f}s, {toks:.0f} tokens generated of 950")
    assert cancelled == 1
    assert toks < 950, f"generation ran on after the disconnect ({toks} tokens)"
    # b answered 200 twice (alone, then next to a) and a never did
    ok_b = wait_for(lambda: total(metrics(http), "stitchserve_requests_total", stitch=b["id"], status="200")
                    - total(m0, "stitchserve_requests_total", stitch=b["id"], status="200") == 2, timeout=15)
    assert ok_b, _status_deltas(http, m0, b["id"])


def test_metrics_show_what_was_sent(http, stitches):
    sid = stitches[1]["id"]
    budget = f"{stitches[1]['params'] / 1e3 + 1:.0f}k"
    m0 = metrics(http)
    for _ in range(3):
        assert _route(http, budget).status_code == 200
    assert _route(http, "1k").headers["x-budget-met"] == "false"  # cheapest, missed
    assert _route(http, "bogus").status_code == 400
    want = {
        ("stitchserve_requests_total", sid, "200"): 3,
        ("stitchserve_budget_met_total", sid, None): 3,
        ("stitchserve_budget_missed_total", stitches[0]["id"], None): 1,
        ("stitchserve_requests_total", "none", "400"): 1,
        ("stitchserve_time_to_first_token_seconds_count", sid, None): 3,
        ("stitchserve_e2e_request_latency_seconds_count", sid, None): 3,
        ("stitchserve_inter_token_latency_seconds_count", sid, None): 3,  # max_tokens=2: one gap each
        ("stitchserve_generation_tokens_total", sid, None): 6,
    }

    def deltas():
        m = metrics(http)
        out = {}
        for (name, stitch, status) in want:
            lab = {"stitch": stitch, **({"status": status} if status else {})}
            out[(name, stitch, status)] = total(m, name, **lab) - total(m0, name, **lab)
        return out

    assert wait_for(lambda: deltas() == want, timeout=20), deltas()
    m = metrics(http)
    names = {n for n, _ in m}
    for n in ["stitchserve_prompt_tokens_total", "stitchserve_queue_depth", "stitchserve_num_requests_running",
              "stitchserve_profiled_prefill_seconds_per_token", "stitchserve_profiled_decode_step_seconds",
              "stitchserve_estimated_token_latency_seconds", "stitchserve_request_queue_time_seconds_bucket",
              "stitchserve_engine_step_rows_bucket", "stitchserve_engine_step_seconds_bucket"]:
        assert n in names, n
    assert all(n.startswith("stitchserve_") for n in names)
    assert total(m, "stitchserve_profiled_decode_step_seconds", model=CHAT, stitch=sid) > 0
    ttft = [v for (n, lab), v in m.items() if n == "stitchserve_time_to_first_token_seconds_bucket"
            and dict(lab).get("stitch") == sid and dict(lab).get("le") == "+Inf"]
    assert ttft and sum(ttft) >= 3


def test_ray_export_port_has_raw_metrics(served):
    fam = scrape(httpx.get(f"http://127.0.0.1:{served.metrics_port}/metrics", timeout=10).text)
    assert any(n.startswith("ray_stitchserve_requests_total") for n, _ in fam)


def test_observed_steps_correct_the_profile(http, stitches):
    """After traffic, each stitch's estimate is its start-up profile times the EWMA of observed/profiled."""
    sid = stitches[1]["id"]
    budget = f"{stitches[1]['params'] / 1e3 + 1:.0f}k"
    for _ in range(2):
        assert _route(http, budget).headers["x-stitch-id"] == sid
    assert wait_for(lambda: http.get("/ready").json()["models"][0]["inflight"] == 0, timeout=10)
    now = {s["id"]: s for s in http.get("/v1/stitches", params={"model": CHAT}).json()["data"]}
    s = now[sid]
    assert s["correction"] != 1.0  # observed step times moved it
    assert s["decode_step_s"] == stitches[1]["decode_step_s"]  # the profile itself is kept
    # idle: no rows in flight, one row: the profile at batch 1 (made monotone: the least of the profiled
    # figures, as a larger batch never takes less time) times the correction, over the share of the
    # last minute's engine time left to decode by prefills, read in one consistent snapshot
    # (observations are applied on the replica's event loop before a step's tokens go out)
    step1 = min(s["decode_step_s"].values())
    assert s["active_requests"] == 0
    assert 0 < s["prefill_share"] < 1  # the prompts just served were prefilled in the last minute
    assert s["latency_ms"] == pytest.approx(s["correction"] * step1 * 1e3 / (1 - s["prefill_share"]), rel=1e-9)
