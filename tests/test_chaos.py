"""Chaos on the live tiny-pair app, real Ray Serve and real HTTP: a replica process killed while it
streams, and an engine step that never returns (the watchdog path, through the test-only
`fault_injection` config).

What must hold each time: every client gets either its full answer or a clean error (an HTTP error
with OpenAI's error body, or an SSE error event) well within the request timeout, never a hang; Serve
brings a replica back and later requests are served; nothing leaks: the replica reports no request in
flight and no engine row, and the relayed Prometheus gauges of the model sum to zero.

The faults hit their own application (`chaos`, model `chaoschat`, one replica) on the session's Ray,
so the other serving tests never see them.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import pytest

from serving_fixtures import SMALL_PROFILE, scrape, served, total  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.timeout(600), pytest.mark.chaos]

MODEL = "chaoschat"
PREFIX = "/chaos"
MARKER = "<<stall-the-engine-step>>"
REQUEST_TIMEOUT_S = 20.0
STEP_TIMEOUT_S = 5.0
HI = [{"role": "user", "content": "Say hi."}]
RECORD: dict = {}  # what each fault did; written to $STITCHSERVE_CHAOS_REPORT when set


def record(name: str, **kw) -> None:
    RECORD[name] = kw
    if out := os.environ.get("STITCHSERVE_CHAOS_REPORT"):
        with open(out, "w") as f:
            json.dump(RECORD, f, indent=1, default=str)


@pytest.fixture(scope="module")
def chaos(served):
    """The chaos application: its own palette deployment with a 5 s step watchdog (a fresh engine's first step takes
    about a second on a loaded 2-core machine: a tighter one would fail healthy steps), a stall injector,
    and health checks every second (so Serve notices a wedged replica in seconds, not a minute)."""
    from ray import serve

    from serving.app import build_app
    from serving.config import ServeConfig

    cfg = ServeConfig(
        app_name="chaos", route_prefix=PREFIX, port=int(served.base_url.rsplit(":", 1)[1]),
        request_timeout_s=REQUEST_TIMEOUT_S,
        palettes=[{"path": str(served.palettes["tinychat"]), "name": MODEL, "profile": SMALL_PROFILE,
                   "max_batch_size": 4, "max_prompt_tokens": 256, "max_tokens_limit": 1000,
                   "step_timeout_s": STEP_TIMEOUT_S, "fault_injection": {"stall_marker": MARKER, "stall_s": 600},
                   "deployment": {"ray_actor_options": {"num_cpus": 0.5}, "health_check_period_s": 1.0,
                                  "health_check_timeout_s": 10.0, "graceful_shutdown_timeout_s": 2.0,
                                  "graceful_shutdown_wait_loop_s": 0.5}}])
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix=PREFIX)
    yield served.base_url + PREFIX
    serve.delete(cfg.app_name)


def ready(base: str) -> dict | None:
    """The chaos model's /ready entry (None while no replica answers)."""
    try:
        m = httpx.get(base + "/ready", timeout=10).json()["models"][0]
    except (httpx.HTTPError, ValueError, KeyError):
        return None
    return m if m.get("ready") else None


def wait_for(pred, timeout: float, every: float = 0.2):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if v := pred():
            return v
        time.sleep(every)
    return pred()


def gauges(served) -> tuple[float, float]:
    """(stitchserve_num_requests_running, stitchserve_queue_depth) of the chaos model, summed over
    every series the relay exports (a dead replica's series included, if Ray kept it)."""
    r = httpx.get(served.base_url + "/metrics", headers=served.auth, timeout=30)
    m = scrape(r.text)
    return (total(m, "stitchserve_num_requests_running", model=MODEL),
            total(m, "stitchserve_queue_depth", model=MODEL))


def statuses(served) -> dict[str, float]:
    m = scrape(httpx.get(served.base_url + "/metrics", headers=served.auth, timeout=30).text)
    out: dict[str, float] = {}
    for (name, labels), v in m.items():
        lab = dict(labels)
        if name == "stitchserve_requests_total" and lab.get("model") == MODEL:
            out[lab["status"]] = out.get(lab["status"], 0) + v
    return out


async def stream_one(c: httpx.AsyncClient, max_tokens: int, started: asyncio.Event | None = None,
                     content: str = "Say hi.") -> dict:
    """One streaming chat request -> what the client saw: status, tokens of text, finish, error event."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    out = {"status": None, "deltas": 0, "finish": None, "error": None, "done": False, "usage": None}
    try:
        async with c.stream("POST", "/v1/chat/completions", json=body) as r:
            out["status"] = r.status_code
            if r.status_code != 200:
                out["error"] = json.loads(await r.aread())["error"]
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    out["done"] = True
                    continue
                ev = json.loads(line[6:])
                if "error" in ev:
                    out["error"] = ev["error"]
                    continue
                for ch in ev["choices"]:
                    if ch["delta"].get("content"):
                        out["deltas"] += 1
                        if started is not None:
                            started.set()
                    out["finish"] = ch.get("finish_reason") or out["finish"]
                if ev.get("usage"):
                    out["usage"] = ev["usage"]
    except httpx.HTTPError as e:  # the connection itself failed: also a clean end, not a hang
        out["error"] = {"transport": type(e).__name__}
    return out


async def open_streams(c: httpx.AsyncClient, n: int, max_tokens: int) -> list[asyncio.Task]:
    """n streaming requests, returned once each has its first token (decoding, holding a slot)."""
    started = [asyncio.Event() for _ in range(n)]
    tasks = [asyncio.create_task(stream_one(c, max_tokens, ev)) for ev in started]
    await all_streaming(tasks, started)
    return tasks


async def all_streaming(tasks: list[asyncio.Task], started: list[asyncio.Event], timeout: float = 30) -> None:
    """Until every stream has its first token; a stream that ends first fails the test at once."""
    waits = [asyncio.ensure_future(e.wait()) for e in started]
    done, _ = await asyncio.wait(waits + list(tasks), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    while not all(e.is_set() for e in started):
        ended = [t for t in tasks if t.done()]
        assert not ended, [t.result() for t in ended]
        done, _ = await asyncio.wait([w for w in waits if not w.done()] + list(tasks), timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        assert done, "streams did not start"
    for w in waits:
        w.cancel()


def check_outcome(res: dict, max_tokens: int) -> str:
    """Either the full answer or a clean error; -> 'full' | 'error'."""
    if res["done"] and res["error"] is None:
        assert res["finish"] in ("length", "stop") and res["usage"]["completion_tokens"] <= max_tokens, res
        return "full"
    assert res["error"] is not None and not res["done"], res
    if "transport" not in res["error"]:
        assert res["error"]["code"] in (500, 503) and res["error"]["message"], res
    return "error"


def no_leaks(served, base: str) -> dict:
    m = wait_for(lambda: (lambda x: x if x and x["inflight"] == 0 and x["engine"]["running"] == 0
                          and x["engine"]["waiting"] == 0 else None)(ready(base)), timeout=20)
    assert m, ready(base)
    assert wait_for(lambda: gauges(served) == (0.0, 0.0), timeout=20), gauges(served)
    return m


def served_after(base: str, n: int = 3) -> list[int]:
    codes = []
    for _ in range(n):
        r = httpx.post(base + "/v1/chat/completions", timeout=REQUEST_TIMEOUT_S + 5,
                       json={"model": MODEL, "messages": HI, "max_tokens": 8, "temperature": 0})
        codes.append(r.status_code)
        if r.status_code == 200:
            assert r.json()["usage"]["completion_tokens"] <= 8
    return codes


def test_replica_killed_mid_stream(served, chaos):
    """SIGKILL the replica's process while 3 clients stream: each ends cleanly within the timeout;
    Serve starts a new replica that serves; no slot, in-flight request or gauge is left behind."""
    first = wait_for(lambda: ready(chaos), timeout=60)
    assert first, "the chaos app never became ready"
    pid = first["pid"]
    s0 = statuses(served)
    max_tokens = 900  # greedy on the tiny pair: no early EOS, seconds of decoding

    async def main():
        async with httpx.AsyncClient(base_url=chaos, timeout=REQUEST_TIMEOUT_S + 10) as c:
            tasks = await open_streams(c, 3, max_tokens)
            t_kill = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=REQUEST_TIMEOUT_S + 5)
            return results, time.monotonic() - t_kill

    results, ended_after = asyncio.run(main())
    kinds = [check_outcome(r, max_tokens) for r in results]
    print(f"kill: outcomes {kinds}, all ended {ended_after:.2f}s after the kill; {results}")
    assert "error" in kinds  # 900 tokens cannot all have been sent before the kill
    assert ended_after < REQUEST_TIMEOUT_S
    t_back = time.monotonic()
    back = wait_for(lambda: (lambda m: m if m and m["pid"] != pid else None)(ready(chaos)), timeout=90)
    assert back, "Serve did not bring the replica back"
    back_after = time.monotonic() - t_back + ended_after
    assert served_after(chaos) == [200, 200, 200]
    no_leaks(served, chaos)
    # every request is counted once: the streams that broke under their error status (or 200 when
    # finished), the three later ones as 200
    def delta() -> dict:
        return {k: v - s0.get(k, 0) for k, v in statuses(served).items() if v - s0.get(k, 0)}

    # metrics reach the scrape a report interval or more after the response (seen: the later 200s
    # missing from a scrape taken at once, in a full run), so wait for all six to be counted
    ds = wait_for(lambda: (lambda d: d if sum(d.values()) >= 6 else None)(delta()), timeout=30) or delta()
    assert sum(ds.values()) == 6 and ds.get("200", 0) >= 3, ds
    record("replica_killed", streams=len(results), outcomes=kinds, errors=[r["error"] for r in results],
           ended_after_kill_s=round(ended_after, 3), replica_back_after_s=round(back_after, 1),
           served_after=[200, 200, 200], statuses_counted=ds, gauges_after=gauges(served))


def test_stuck_step_watchdog(served, chaos):
    """A step that never returns: past step_timeout_s (5 s) every request in it fails with a clean 503
    (streams: an SSE error event), new requests get 503 at once, the health check fails and Serve
    replaces the replica, which serves; nothing leaks."""
    first = wait_for(lambda: ready(chaos), timeout=90)
    assert first, "the chaos app never became ready"
    pid = first["pid"]
    max_tokens = 900

    async def main():
        async with httpx.AsyncClient(base_url=chaos, timeout=REQUEST_TIMEOUT_S + 10) as c:
            tasks = await open_streams(c, 2, max_tokens)
            t0 = time.monotonic()
            stall = await c.post("/v1/chat/completions", json={
                "model": MODEL, "messages": [{"role": "user", "content": MARKER}], "max_tokens": 8})
            results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=REQUEST_TIMEOUT_S + 5)
            t_end = time.monotonic() - t0
            during = await c.post("/v1/chat/completions", json={"model": MODEL, "messages": HI, "max_tokens": 4})
            return stall, results, t_end, during

    stall, results, t_end, during = asyncio.run(main())
    print(f"stuck: stall request {stall.status_code}, streams {results}, ended {t_end:.2f}s after the stall, "
          f"then {during.status_code}")
    assert stall.status_code == 503 and stall.headers.get("retry-after"), stall.text
    assert "step_timeout_s" in stall.json()["error"]["message"]
    for r in results:
        assert check_outcome(r, max_tokens) == "error" and r["error"]["code"] == 503, r
    assert t_end < STEP_TIMEOUT_S + 5  # the watchdog's verdict, not the 20 s request timeout
    # while the step hangs the replica refuses; when Serve is already replacing it the request waits
    # for the new replica (200) or for its timeout (504): a clean answer either way
    assert during.status_code in (503, 200, 504), during.text
    t_back = time.monotonic()
    back = wait_for(lambda: (lambda m: m if m and m["pid"] != pid else None)(ready(chaos)), timeout=90)
    assert back, "Serve did not replace the wedged replica"
    assert served_after(chaos) == [200, 200, 200]
    no_leaks(served, chaos)
    record("step_stuck", step_timeout_s=STEP_TIMEOUT_S, stall_request=stall.status_code,
           streams=[r["error"]["code"] for r in results], ended_after_stall_s=round(t_end, 3),
           request_while_stuck=during.status_code, replica_replaced_after_s=round(time.monotonic() - t_back + t_end, 1),
           served_after=[200, 200, 200], gauges_after=gauges(served))
