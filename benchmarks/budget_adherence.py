"""Budget adherence under load: how often a request that asked for `N ms/token` or `N s` got it.

Starts Ray + Serve here with one chat palette (loopback only), then drives it open loop (Poisson
arrivals) at several request rates, from idle to past saturation, with a mix of latency budgets
(per output token and whole request), prompt lengths, output lengths, streaming and plain requests.
Every request records its budget, the stitch the router chose, the router's predicted latency
(`X-Stitch-Latency-Ms`, the body's `stitch.request_latency_ms`) and what the client observed.

Feasibility needs an oracle the router does not see: a share of the requests at every rate are
*probes* pinned to the fastest stitch (`X-Stitch-Id`, no budget). A budget is *feasible at a rate*
when the fastest stitch, at the latency the probes got at that rate (their 0.9-quantiles, i.e. it
met such a budget in 9 probes of 10; --feasible-quantile), meets it: per token `budget >= probe
inter-token latency`; whole request `budget >= probe TTFT (same prompt length) + (output tokens - 1)
x probe inter-token latency`. Met: observed inter-token latency (first to last
token over tokens - 1) or observed end-to-end seconds within the budget.

Per rate: requests, feasible, met_feasible_share, X-Budget-Met false share, p50/p99 prediction error
(observed / predicted - 1), throughput, `saturated` (completions fell behind arrivals: the rate's
requests completed at under 85% of the rate they were sent at, or over 1% were refused),
`promised_kept_share` (of the budgeted requests served with X-Budget-Met: true, feasible or not, the
share that met their budget) and `miss_sources`: the feasible misses by whether the router had
priced them to fit, and for streamed ones how much of the excess came at the first token and how
much after it.

Budgets are drawn around the stitches' idle estimates; `--budget-basis` takes those from a recorded
run, so that runs compared with each other draw the same budgets (with the same seed the same
requests at the same times) whatever profile their replica measured at start-up.

    # under the shared CPU lock: the real pair, ~12 min
    flock /tmp/cpu.lock python benchmarks/budget_adherence.py --palette /tmp/pal_v120 \
        --rates 0.15,0.3,0.45 --seconds 200 --drain 25 --prompt-words 12,40,120 \
        --token-budget-factor 0.9,3 --request-budget-factor 1,6 \
        --budget-basis benchmarks/results/budget_adherence_basis.json --label before
    python benchmarks/budget_adherence.py --tiny --rates 1,4 --seconds 15 --out /tmp/ba_tiny   # smoke run
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.loadgen import check_loopback, pct  # noqa: E402

HARD_MAX_TIME_S = 1500
WORDS = ("stitch budget latency token palette anchor layer route model serve request stream engine batch "
         "profile replica decode prefill quality cost").split()


@dataclass
class Req:
    rate: float
    i: int
    t_send: float  # seconds since the rate began
    kind: str  # "token" | "request" | "probe"
    budget_value: float | None  # seconds (per token, or whole request)
    budget: str | None  # the header sent
    prompt_tokens_target: int
    max_tokens: int
    stream: bool
    status: int = 0
    stitch: str | None = None
    budget_met_header: bool | None = None
    predicted_token_s: float | None = None
    predicted_request_s: float | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    tokens: int = 0
    prompt_tokens: int = 0
    observed_token_s: float | None = None
    error: str | None = None
    feasible: bool | None = None
    met: bool | None = None


def prompt_text(n_words: int, rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


async def one_request(c: httpx.AsyncClient, model: str, r: Req, text: str, fastest: str, timeout_s: float) -> None:
    headers = {"x-request-timeout-seconds": f"{timeout_s:g}"}
    if r.budget:
        headers["X-Compute-Budget"] = r.budget
    if r.kind == "probe":
        headers["X-Stitch-Id"] = fastest
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": r.max_tokens,
            "temperature": 0, "stream": r.stream}
    if r.stream:
        body["stream_options"] = {"include_usage": True}
    t0 = time.monotonic()
    try:
        if not r.stream:
            resp = await c.post("/v1/chat/completions", json=body, headers=headers)
            r.e2e_s = time.monotonic() - t0
            r.status = resp.status_code
            if resp.status_code == 200:
                js = resp.json()
                r.stitch, card = js["stitch"]["id"], js["stitch"]
                r.tokens, r.prompt_tokens = js["usage"]["completion_tokens"], js["usage"]["prompt_tokens"]
                r.predicted_token_s = card["latency_ms"] / 1e3
                r.predicted_request_s = card["request_latency_ms"] / 1e3
                r.budget_met_header = resp.headers.get("x-budget-met") == "true"
            else:
                r.error = resp.text[:200]
            return
        t_first = t_last = None
        async with c.stream("POST", "/v1/chat/completions", json=body, headers=headers) as resp:
            r.status = resp.status_code
            if resp.status_code != 200:
                r.error = (await resp.aread()).decode()[:200]
                r.e2e_s = time.monotonic() - t0
                return
            r.budget_met_header = resp.headers.get("x-budget-met") == "true"
            r.stitch = resp.headers.get("x-stitch-id")
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                now = time.monotonic()
                if "error" in ev:
                    r.error = ev["error"].get("message", "")[:200]
                    r.status = ev["error"].get("code", 500)
                    continue
                if ev.get("stitch"):
                    r.predicted_token_s = ev["stitch"]["latency_ms"] / 1e3
                    r.predicted_request_s = ev["stitch"]["request_latency_ms"] / 1e3
                for ch in ev.get("choices", []):
                    if ch.get("delta", {}).get("content"):
                        t_first = t_first or now
                        t_last = now
                    if ch.get("finish_reason"):
                        t_last = now
                if ev.get("usage"):
                    r.tokens, r.prompt_tokens = ev["usage"]["completion_tokens"], ev["usage"]["prompt_tokens"]
        r.e2e_s = time.monotonic() - t0
        if t_first is not None:
            r.ttft_s = t_first - t0
            if r.tokens >= 2 and t_last is not None:
                r.observed_token_s = (t_last - t_first) / (r.tokens - 1)
    except httpx.HTTPError as e:
        r.status, r.error = -1, repr(e)[:200]
        r.e2e_s = time.monotonic() - t0


async def run_rate(base: str, model: str, rate: float, seconds: float, rng: random.Random, mix: dict,
                   fastest: str, timeout_s: float, drain_s: float, progress) -> tuple[list[Req], float, float]:
    """Poisson arrivals at `rate` for `seconds`, then wait for the stragglers. -> (requests, window, drained at)."""
    reqs: list[Req] = []
    tasks = []
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=base, timeout=timeout_s + 30, limits=limits) as c:
        t0 = time.monotonic()
        t = rng.expovariate(rate)
        i = 0
        while t < seconds:
            await asyncio.sleep(max(0.0, t0 + t - time.monotonic()))
            r, text = make_request(rate, i, t, rng, mix)
            reqs.append(r)
            tasks.append(asyncio.create_task(one_request(c, model, r, text, fastest, timeout_s)))
            progress.update(1)
            i += 1
            t += rng.expovariate(rate)
        await asyncio.sleep(max(0.0, t0 + seconds - time.monotonic()))
        if tasks:
            await asyncio.wait(tasks, timeout=drain_s)
        for tk in tasks:
            tk.cancel()
        drained = time.monotonic() - t0
    return reqs, seconds, drained


def make_request(rate: float, i: int, t: float, rng: random.Random, mix: dict) -> tuple[Req, str]:
    words = rng.choice(mix["prompt_words"])
    max_tokens = rng.choice(mix["max_tokens"])
    u = rng.random()
    if u < mix["probe_share"]:
        kind, value, header, stream = "probe", None, None, True
    elif u < mix["probe_share"] + (1 - mix["probe_share"]) / 2:
        kind, stream = "token", True
        lo, hi = mix["token_budget_range_s"]
        value = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        header = f"{value * 1e3:.1f}ms/token"
        value = float(f"{value * 1e3:.1f}") / 1e3
    else:
        kind, stream = "request", rng.random() < 0.5
        base = mix["idle_request_s"](words, max_tokens, rng)
        lo, hi = mix["request_budget_factor"]
        value = round(base * math.exp(rng.uniform(math.log(lo), math.log(hi))), 3)
        header = f"{value:g}s"
    return Req(rate, i, t, kind, value, header, words, max_tokens, stream), prompt_text(words, rng)


def quantile(xs: list[float], q: float) -> float:
    """Linear-interpolated q-quantile (q=0.5: the median)."""
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (pos - lo) * (xs[hi] - xs[lo])


def judge(reqs: list[Req], fastest: str, q: float = 0.9) -> dict:
    """Feasible / met per request (see the module docstring), and the rate's oracle figures: the
    probes' q-quantiles (q=0.9: the fastest stitch met such a budget in 9 of 10 probes at this rate)."""
    probes = [r for r in reqs if r.kind == "probe" and r.status == 200 and r.stitch == fastest]
    itl = [r.observed_token_s for r in probes if r.observed_token_s is not None]
    itl_fast = quantile(itl, q) if itl else None
    ttft_by_len: dict[int, list[float]] = {}
    for r in probes:
        if r.ttft_s is not None:
            ttft_by_len.setdefault(r.prompt_tokens_target, []).append(r.ttft_s)
    all_ttft = [x for v in ttft_by_len.values() for x in v]
    for r in reqs:
        if r.kind == "probe" or itl_fast is None:
            continue
        if r.kind == "token":
            r.feasible = r.budget_value >= itl_fast
            r.met = r.status == 200 and r.observed_token_s is not None and r.observed_token_s <= r.budget_value
        else:
            ttft = ttft_by_len.get(r.prompt_tokens_target) or all_ttft
            n = r.tokens if r.status == 200 and r.tokens else r.max_tokens
            r.feasible = r.budget_value >= quantile(ttft, q) + max(n - 1, 0) * itl_fast
            r.met = r.status == 200 and r.e2e_s is not None and r.e2e_s <= r.budget_value
    return {"feasible_quantile": q, "probe_itl_s": itl_fast,
            "probe_ttft_s": {str(k): quantile(v, q) for k, v in ttft_by_len.items()}, "probes": len(probes)}


def rejudge(path: Path, q: float) -> dict:
    """Recompute every rate's figures from a saved run's requests with another feasibility quantile."""
    doc = json.loads(path.read_text())
    fields = set(Req.__dataclass_fields__)
    reqs = [Req(**{k: v for k, v in r.items() if k in fields}) for r in doc["requests"]]
    rows = []
    for old in doc["rates"]:
        rs = [r for r in reqs if r.rate == old["offered_rps"]]
        rows.append(summarize(old["offered_rps"], rs, old["window_s"], old["drained_after_s"],
                              judge(rs, doc["meta"]["fastest"], q)))
    doc["rates"], doc["requests"] = rows, [asdict(r) for r in reqs]
    doc["meta"]["feasible_quantile"] = q
    return doc


def miss_sources(reqs: list[Req]) -> dict:
    """Where the feasible budgets that were missed went wrong, from the per-request records.

    `flagged`: the router already priced every stitch over the budget (X-Budget-Met: false) and served
    its best effort; `priced_to_fit`: it predicted the chosen stitch would meet it and it did not. For
    streamed misses, the excess over the estimate splits into the first token (observed TTFT minus
    the estimate's queue + prefill, i.e. request estimate - (tokens - 1) x per-token estimate) and
    the tokens after it ((tokens - 1) x (observed - estimated inter-token latency))."""
    out: dict = {"flagged": 0, "priced_to_fit": 0, "failed": 0, "by_kind": {}, "streamed": []}
    for r in reqs:
        if not r.feasible or r.met:
            continue
        out["by_kind"][r.kind] = out["by_kind"].get(r.kind, 0) + 1
        if r.status != 200:
            out["failed"] += 1
            continue
        out["flagged" if r.budget_met_header is False else "priced_to_fit"] += 1
        if r.stream and r.ttft_s is not None and r.predicted_request_s and r.predicted_token_s and r.tokens >= 2:
            first_pred = r.predicted_request_s - (r.max_tokens - 1) * r.predicted_token_s
            out["streamed"].append({
                "kind": r.kind, "stitch": r.stitch, "flagged": r.budget_met_header is False,
                "budget_s": r.budget_value, "prompt_tokens": r.prompt_tokens, "tokens": r.tokens,
                "first_token_excess_s": round(r.ttft_s - first_pred, 3),
                "later_tokens_excess_s": round((r.tokens - 1) * ((r.observed_token_s or 0) - r.predicted_token_s), 3),
                "request_excess_s": round((r.e2e_s or 0) - r.predicted_request_s, 3)})
    return out


def summarize(rate: float, reqs: list[Req], window: float, drained: float, oracle: dict) -> dict:
    budgeted = [r for r in reqs if r.kind != "probe"]
    ok = [r for r in reqs if r.status == 200]
    feas = [r for r in budgeted if r.feasible]
    refused = [r for r in reqs if r.status in (503, 429)]
    done_at = [r.t_send + (r.e2e_s or 0) for r in ok]
    span = (max(done_at) - min(r.t_send for r in reqs)) if ok else window
    completed_rps = len(ok) / max(span, 1e-9)
    sent_rps = len(reqs) / window
    err_tok = [r.observed_token_s / r.predicted_token_s - 1 for r in budgeted
               if r.kind == "token" and r.observed_token_s and r.predicted_token_s]
    err_req = [r.e2e_s / r.predicted_request_s - 1 for r in budgeted
               if r.kind == "request" and r.status == 200 and r.e2e_s and r.predicted_request_s]
    routed = [r for r in budgeted if r.status == 200 and r.budget_met_header is not None]
    # the router's word: of the budgeted requests it served with X-Budget-Met: true, feasible or not, the
    # share that met their budget (a false one tells the client up front; a true one that misses is a
    # promise broken)
    promised = [r for r in routed if r.budget_met_header and r.met is not None]
    met_feasible = [r for r in feas if r.met]
    feas_tok = [r for r in feas if r.kind == "token"]
    feas_req = [r for r in feas if r.kind == "request"]
    return {
        "offered_rps": rate, "sent_rps": round(sent_rps, 4), "completed_rps": round(completed_rps, 4),
        "saturated": bool(completed_rps < 0.85 * sent_rps or len(refused) > 0.01 * max(len(reqs), 1)),
        "requests": len(reqs), "budgeted": len(budgeted), "ok": len(ok), "refused": len(refused),
        "errors": sum(r.status not in (200, 503, 429) for r in reqs),
        "feasible": len(feas), "met_feasible": len(met_feasible),
        "met_feasible_share": (len(met_feasible) / len(feas)) if feas else None,
        "met_feasible_share_token": (sum(r.met for r in feas_tok) / len(feas_tok)) if feas_tok else None,
        "met_feasible_share_request": (sum(r.met for r in feas_req) / len(feas_req)) if feas_req else None,
        "feasible_token": len(feas_tok), "feasible_request": len(feas_req),
        "budget_met_false_share": (sum(not r.budget_met_header for r in routed) / len(routed)) if routed else None,
        "met_share_all": (sum(bool(r.met) for r in budgeted) / len(budgeted)) if budgeted else None,
        "promised": len(promised), "promised_kept": sum(bool(r.met) for r in promised),
        "promised_kept_share": (sum(bool(r.met) for r in promised) / len(promised)) if promised else None,
        "pred_err_token_p50": pct(err_tok, 0.5), "pred_err_token_p99": pct(err_tok, 0.99),
        "pred_err_request_p50": pct(err_req, 0.5), "pred_err_request_p99": pct(err_req, 0.99),
        "throughput_tokens_s": round(sum(r.tokens for r in ok) / max(span, 1e-9), 3),
        "window_s": window, "drained_after_s": round(drained, 2),
        "stitches": {s: sum(r.stitch == s for r in ok) for s in sorted({r.stitch for r in ok if r.stitch})},
        "miss_sources": miss_sources(reqs),
        **{f"oracle_{k}": v for k, v in oracle.items()},
    }


def start_app(palette: Path, port: int, args) -> str:
    import ray
    from ray import serve

    from serving.app import build_app
    from serving.config import ServeConfig

    pal = {"path": str(palette), "name": "chat", "task": "chat", "max_batch_size": args.max_batch_size,
           "prefill_chunk": args.prefill_chunk, "max_prompt_tokens": 1024, "max_tokens_limit": 256,
           "max_inflight": 256, "profile": {"prompt_len": 32, "decode_steps": args.profile_steps,
                                            "batch_sizes": sorted({1, 2, args.max_batch_size})},
           "deployment": {"ray_actor_options": {"num_cpus": args.replica_cpus}, "max_queued_requests": -1,
                          "max_ongoing_requests": 512}}
    if args.budget_quantile is not None:
        pal["budget_quantile"] = args.budget_quantile
    cfg = ServeConfig(palettes=[pal], port=port, request_timeout_s=args.timeout, relay_metrics=False)
    ray.init(num_cpus=max(2, args.replica_cpus + 1), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name="budgets", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def idle_request_model(stitches: list[dict], rng_words_to_tokens: float):
    """Idle whole-request seconds on a random deployed stitch, from its profile: the base the
    whole-request budgets are drawn around (some below any stitch, most between the stitches)."""
    def f(words: int, max_tokens: int, rng: random.Random) -> float:
        s = rng.choice(stitches)
        step = min(s["decode_step_s"].values())
        return s["prefill_s_per_token"] * words * rng_words_to_tokens + max_tokens * step
    return f


def plot(doc: dict, out: Path, others: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for d, style in [(doc, "-o")] + [(o, "--s") for o in others]:
        rs = d["rates"]
        x = [r["offered_rps"] for r in rs]
        lab = d["meta"].get("label") or "run"
        a1.plot(x, [r["met_feasible_share"] if r["met_feasible_share"] is not None else float("nan") for r in rs],
                style, label=f"{lab}: met / feasible")
        a1.plot(x, [r["budget_met_false_share"] if r["budget_met_false_share"] is not None else float("nan")
                    for r in rs], style, alpha=0.5, label=f"{lab}: X-Budget-Met false share")
        a1.plot(x, [r.get("promised_kept_share") if r.get("promised_kept_share") is not None else float("nan")
                    for r in rs], style, alpha=0.8, lw=0.8, label=f"{lab}: X-Budget-Met true, kept")
        for r in rs:
            if r["saturated"]:
                a1.axvspan(r["offered_rps"] * 0.97, r["offered_rps"] * 1.03, color="red", alpha=0.08)
        a2.plot(x, [r["pred_err_token_p50"] for r in rs], style, label=f"{lab}: ms/token p50")
        a2.plot(x, [r["pred_err_token_p99"] for r in rs], style, alpha=0.5, label=f"{lab}: ms/token p99")
        a2.plot(x, [r["pred_err_request_p50"] for r in rs], style, color="C3", label=f"{lab}: request p50")
        a2.plot(x, [r["pred_err_request_p99"] for r in rs], style, color="C3", alpha=0.5,
                label=f"{lab}: request p99")
    a1.axhline(0.99, color="k", lw=0.8, ls=":")
    a1.set_ylabel("share")
    a1.set_ylim(-0.02, 1.02)
    a1.set_title(f"budget adherence vs load ({doc['meta']['palette_name']}; red: saturated)")
    a1.legend(fontsize=7, loc="lower left")
    a2.axhline(0, color="k", lw=0.8)
    a2.set_ylabel("observed / predicted - 1")
    a2.set_xlabel("offered load (requests/s, Poisson)")
    a2.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--palette", type=Path, help="chat palette directory (the real pair's)")
    ap.add_argument("--tiny", action="store_true", help="smoke run on a freshly built tiny-pair palette")
    ap.add_argument("--rates", default="0.05,0.15,0.3,0.5,0.8", help="offered requests/s, comma-separated")
    ap.add_argument("--seconds", type=float, default=90.0, help="arrival window per rate")
    ap.add_argument("--drain", type=float, default=120.0, help="max seconds to wait for a rate's stragglers")
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--max-batch-size", type=int, default=4)
    ap.add_argument("--prefill-chunk", type=int, default=128)
    ap.add_argument("--profile-steps", type=int, default=4)
    ap.add_argument("--replica-cpus", type=int, default=2)
    ap.add_argument("--prompt-words", default="12,60,180")
    ap.add_argument("--max-tokens", default="8,16,32")
    ap.add_argument("--probe-share", type=float, default=0.15)
    ap.add_argument("--token-budget-factor", default="0.7,1.6",
                    help="per-token budgets: log-uniform from LO x the fastest to HI x the slowest stitch's idle estimate")
    ap.add_argument("--request-budget-factor", default="0.8,3",
                    help="whole-request budgets: a random stitch's idle estimate x log-uniform [LO, HI]")
    ap.add_argument("--budget-basis", type=Path,
                    help="draw budgets from the start-up profile recorded in this result JSON instead of this "
                         "run's own (a profile taken beside other work shifts every budget; two runs compared "
                         "should draw the same ones)")
    ap.add_argument("--budget-quantile", type=float, default=None,
                    help="serve with this budget_quantile (admission margin from realized latency); default: "
                         "the config's default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--port", type=int, default=18431)
    ap.add_argument("--label", default=None, help="name of this run in the plot (e.g. before / after)")
    ap.add_argument("--compare", type=Path, action="append", default=[], help="other result JSONs to plot too")
    ap.add_argument("--feasible-quantile", type=float, default=0.9,
                    help="a budget is feasible when the fastest stitch's probes met it at this quantile")
    ap.add_argument("--rejudge", type=Path, help="recompute a saved run (JSON) with --feasible-quantile; "
                                                 "writes --out (.json, .png), serves nothing")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "budget_adherence")
    args = ap.parse_args(argv)
    if args.rejudge is not None:
        doc = rejudge(args.rejudge, args.feasible_quantile)
        args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
        plot(doc, args.out.with_suffix(".png"), [json.loads(p.read_text()) for p in args.compare])
        return 0
    rates = [float(x) for x in args.rates.split(",")]
    if len(rates) * (args.seconds + args.drain) > HARD_MAX_TIME_S:
        raise SystemExit(f"bound: at most {HARD_MAX_TIME_S} s of load")
    if args.tiny:
        from training.init_palette import init_palette

        args.palette = Path("/tmp") / f"budget_adherence_tiny_{os.getuid()}"
        if not (args.palette / "manifest.json").exists():
            init_palette(args.palette, task="chat", n_calibration=8, max_len=32, progress=False, overwrite=True,
                         n_validation=0)
    if args.palette is None:
        raise SystemExit("--palette DIR or --tiny")
    t_start = time.time()
    load0 = os.getloadavg()
    base = start_app(args.palette, args.port, args)
    check_loopback(base)
    from tqdm import tqdm

    stitches = sorted(httpx.get(base + "/v1/stitches", timeout=60).json()["data"], key=lambda s: s["gflops"])
    # the cheapest stitch (the router's own fallback), not the least start-up estimate: a profile
    # taken on a busy machine can rank the anchors wrongly (it did once: large "faster" than small)
    fastest = stitches[0]["id"]
    tok = httpx.post(base + "/tokenize", json={"prompt": prompt_text(100, random.Random(1))}, timeout=60).json()
    words_to_tokens = tok["count"] / 100
    basis = json.loads(args.budget_basis.read_text())["meta"]["stitches_at_start"] if args.budget_basis else stitches
    lat = [s["latency_ms"] / 1e3 for s in basis]
    tf = [float(x) for x in args.token_budget_factor.split(",")]
    mix = {"prompt_words": [int(x) for x in args.prompt_words.split(",")],
           "max_tokens": [int(x) for x in args.max_tokens.split(",")], "probe_share": args.probe_share,
           "token_budget_range_s": (tf[0] * min(lat), tf[1] * max(lat)),
           "request_budget_factor": [float(x) for x in args.request_budget_factor.split(",")],
           "budget_basis": str(args.budget_basis) if args.budget_basis else "this run's start-up profile",
           "idle_request_s": idle_request_model(basis, words_to_tokens)}
    rng = random.Random(args.seed)
    all_reqs: list[Req] = []
    rows = []
    expected = int(sum(r * args.seconds for r in rates))
    with tqdm(total=expected, desc="requests sent", unit="req") as bar:
        for rate in rates:
            # a short idle gap: the previous rate's load must not leak into this one's EWMA start
            time.sleep(2)
            reqs, window, drained = asyncio.run(run_rate(base, "chat", rate, args.seconds, rng, mix, fastest,
                                                         args.timeout, args.drain, bar))
            oracle = judge(reqs, fastest, args.feasible_quantile)
            rows.append(summarize(rate, reqs, window, drained, oracle))
            all_reqs += reqs
            r = rows[-1]
            tqdm.write(f"rate {rate:g}/s: {r['requests']} sent, {r['ok']} ok, feasible {r['feasible']}, "
                       f"met/feasible {r['met_feasible_share']}, Met:false {r['budget_met_false_share']}, "
                       f"saturated {r['saturated']}, completed {r['completed_rps']}/s, "
                       f"pred err tok p50/p99 {r['pred_err_token_p50']}/{r['pred_err_token_p99']}")
    stitches_now = httpx.get(base + "/v1/stitches", timeout=60).json()["data"]
    from ray import serve

    serve.shutdown()
    import ray

    ray.shutdown()
    from stitchlib.palette import read_manifest

    doc = {
        "meta": {"label": args.label, "when": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t_start)),
                 "wall_s": round(time.time() - t_start, 1), "machine": f"{os.cpu_count()} CPUs",
                 "loadavg_before": [round(x, 2) for x in load0],
                 "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                 "palette": str(args.palette), "palette_name": read_manifest(args.palette).name,
                 "max_batch_size": args.max_batch_size, "prefill_chunk": args.prefill_chunk,
                 "replica_cpus": args.replica_cpus, "budget_quantile": args.budget_quantile,
                 "seconds_per_rate": args.seconds, "seed": args.seed, "fastest": fastest,
                 "mix": {k: v for k, v in mix.items() if k != "idle_request_s"},
                 "stitches_at_start": [{k: s[k] for k in ("id", "gflops", "latency_ms", "prefill_s_per_token",
                                                          "decode_step_s")} for s in stitches],
                 "corrections_at_end": {s["id"]: s["correction"] for s in stitches_now}},
        "rates": rows,
        "requests": [asdict(r) for r in all_reqs],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    others = [json.loads(p.read_text()) for p in args.compare]
    plot(doc, args.out.with_suffix(".png"), others)
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
