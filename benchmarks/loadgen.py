"""Bounded load generator for stitchserve: shows replicas scaling up under load and back down.

Loopback only (127.0.0.1 / localhost / ::1), a hard cap on requests and on wall time. Runs phases of
closed-loop concurrency ("C:seconds"), samples the palette deployment's replica count from Serve while
it runs, and writes `<out>.json` (every sample and request), `<out>.md` (per-phase table) and
`<out>.png` (replicas and latency over time).

    # start Ray + the app from a Serve config file on this machine, then drive it
    python benchmarks/loadgen.py --start-local --config deploy/serve_local_tiny.yaml \
        --phases 1:10,8:45,0:35 --out benchmarks/results/serving_autoscale

    # drive an app that is already running locally (replica counts via Ray, if reachable)
    python benchmarks/loadgen.py --url http://127.0.0.1:8000 --model tiny-chat --ray-address auto
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
HARD_MAX_REQUESTS = 20_000
HARD_MAX_TIME_S = 900


@dataclass
class Phase:
    concurrency: int
    seconds: float


@dataclass
class RequestRecord:
    t: float  # send time, seconds since the run started
    latency_s: float
    status: int
    phase: int
    stitch: str | None = None
    replica: str | None = None
    tokens: int = 0


@dataclass
class Sample:
    t: float
    concurrency: int
    inflight: int
    running: int  # RUNNING replicas of the palette deployment
    starting: int = 0  # STARTING replicas: the autoscaler has decided, the replica is loading/profiling


@dataclass
class Run:
    url: str
    model: str
    deployment: str | None
    phases: list[Phase]
    samples: list[Sample] = field(default_factory=list)
    requests: list[RequestRecord] = field(default_factory=list)
    started: float = 0.0
    notes: dict = field(default_factory=dict)


def parse_phases(text: str) -> list[Phase]:
    out = []
    for part in text.split(","):
        c, _, s = part.strip().partition(":")
        try:
            phase = Phase(int(c), float(s))
        except ValueError:
            raise SystemExit(f"--phases: {part!r} is not CONCURRENCY:SECONDS") from None
        if phase.concurrency < 0 or phase.concurrency > 256 or phase.seconds <= 0:
            raise SystemExit(f"--phases: {part!r} out of range (0..256 workers, > 0 s)")
        out.append(phase)
    return out


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname
    if host not in LOOPBACK:
        raise SystemExit(f"refusing to send load to {host!r}: loopback only ({sorted(LOOPBACK)})")


# ---- Serve side ----------------------------------------------------------------------------------
def replica_counts(app: str, deployment: str) -> tuple[int, int]:
    """(running, starting) replicas of one deployment, from Serve's controller."""
    from ray import serve

    st = serve.status().applications[app].deployments[deployment]
    states = {str(k).split(".")[-1]: v for k, v in st.replica_states.items()}
    return states.get("RUNNING", 0), states.get("STARTING", 0)


def start_local(config: Path, num_cpus: int, port: int | None) -> tuple[str, str, str, str]:
    """Start Ray + Serve here and run the app from a Serve config file. -> (url, app, model, deployment)."""
    import yaml

    # autoscaling metrics are pushed every 10 s by default; a short demo wants them every 0.5 s
    os.environ.setdefault("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")
    os.environ.setdefault("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")
    import ray
    from ray import serve

    from serving.app import build_app
    from serving.config import ServeConfig

    doc = yaml.safe_load(config.read_text())
    app_doc = doc["applications"][0]
    cfg = ServeConfig.from_yaml(config)
    for p in cfg.palettes:
        if not (p.path / "manifest.json").exists():
            from training.init_palette import init_palette

            print(f"loadgen: building tiny palette {p.path}", flush=True)
            init_palette(p.path, task=p.task or "chat", progress=False, n_validation=0)
    http = dict(doc.get("http_options") or {})
    if port is not None:
        http["port"] = port
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    serve.start(http_options={"host": http.get("host", "127.0.0.1"), "port": http.get("port", 8000)})
    serve.run(build_app(cfg), name=app_doc["name"], route_prefix=app_doc.get("route_prefix", "/"))
    pal = cfg.resolved().palettes[0]
    return (f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}", app_doc["name"], pal.name,
            pal.deployment_name)


# ---- load ------------------------------------------------------------------------------------------
async def drive(run: Run, *, app: str | None, max_requests: int, max_time: float, max_tokens: int,
                budget: str | None, api_key: str | None, sample_every: float = 0.5) -> None:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    if budget:
        headers["X-Compute-Budget"] = budget
    body = {"model": run.model, "messages": [{"role": "user", "content": "Tell me about stitching."}],
            "max_tokens": max_tokens, "temperature": 0}
    sent = 0
    inflight = 0
    concurrency = 0
    deadline = time.monotonic() + max_time
    t0 = time.monotonic()
    run.started = time.time()
    stop_all = asyncio.Event()

    async def sampler() -> None:
        while not stop_all.is_set():
            running, starting = 0, 0
            if app and run.deployment:
                try:
                    running, starting = await asyncio.to_thread(replica_counts, app, run.deployment)
                except Exception as e:  # keep sampling; note the first failure
                    run.notes.setdefault("sampler_error", repr(e))
            run.samples.append(Sample(time.monotonic() - t0, concurrency, inflight, running, starting))
            try:
                await asyncio.wait_for(stop_all.wait(), sample_every)
            except asyncio.TimeoutError:
                pass

    async def worker(client: httpx.AsyncClient, phase_idx: int, phase_end: float) -> None:
        nonlocal sent, inflight
        while time.monotonic() < min(phase_end, deadline) and sent < max_requests:
            sent += 1
            inflight += 1
            ts = time.monotonic()
            rec = RequestRecord(ts - t0, 0.0, 0, phase_idx)
            try:
                r = await client.post("/v1/chat/completions", json=body, headers=headers)
                rec.status = r.status_code
                if r.status_code == 200:
                    js = r.json()
                    rec.stitch, rec.replica = js["stitch"]["id"], js["stitch"].get("replica")
                    rec.tokens = js["usage"]["completion_tokens"]
                elif r.status_code == 503:
                    await asyncio.sleep(float(r.headers.get("retry-after", "1")))
            except httpx.HTTPError as e:
                rec.status = -1
                run.notes.setdefault("first_client_error", repr(e))
            finally:
                inflight -= 1
            rec.latency_s = time.monotonic() - ts
            run.requests.append(rec)

    samp = asyncio.create_task(sampler())
    limits = httpx.Limits(max_connections=300, max_keepalive_connections=300)
    async with httpx.AsyncClient(base_url=run.url, timeout=120, limits=limits) as client:
        for i, ph in enumerate(run.phases):
            if time.monotonic() >= deadline or sent >= max_requests:
                run.notes["stopped_early"] = f"bound reached before phase {i}"
                break
            concurrency = ph.concurrency
            end = time.monotonic() + ph.seconds
            tasks = [asyncio.create_task(worker(client, i, end)) for _ in range(ph.concurrency)]
            await asyncio.sleep(max(0.0, min(end, deadline) - time.monotonic()))
            if tasks:  # let in-flight requests of this phase finish (bounded by the deadline)
                await asyncio.wait(tasks, timeout=max(0.1, deadline - time.monotonic()))
                for t in tasks:
                    t.cancel()
    concurrency = 0
    stop_all.set()
    await samp


# ---- report ------------------------------------------------------------------------------------------
def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def summarize(run: Run) -> dict:
    phases = []
    t = 0.0
    for i, ph in enumerate(run.phases):
        reqs = [r for r in run.requests if r.phase == i]
        ok = [r.latency_s for r in reqs if r.status == 200]
        smp = [s for s in run.samples if t <= s.t < t + ph.seconds]
        phases.append({
            "phase": i, "concurrency": ph.concurrency, "start_s": t, "seconds": ph.seconds, "requests": len(reqs),
            "ok": len(ok), "errors": sum(r.status != 200 for r in reqs),
            "throughput_rps": len(ok) / ph.seconds,
            "latency_p50_s": pct(ok, 0.5), "latency_p95_s": pct(ok, 0.95),
            "replicas_min": min((s.running for s in smp), default=None),
            "replicas_max": max((s.running for s in smp), default=None),
            "replicas_end": smp[-1].running if smp else None,
        })
        t += ph.seconds
    load_start = next((p["start_s"] for p in phases if p["concurrency"] > 1), None)
    load_end = next((p["start_s"] + p["seconds"] for p in reversed(phases) if p["concurrency"] > 1), None)
    base = run.samples[0].running if run.samples else None
    peak = max((s.running for s in run.samples), default=None)
    up = next((s.t for s in run.samples if base is not None and s.running > base), None)
    decided = next((s.t for s in run.samples if base is not None and s.running + s.starting > base), None)
    down = None
    if load_end is not None and peak is not None:
        after = [s for s in run.samples if s.t >= load_end]
        down = next((s.t for s in after if s.running <= (base or 1)), None)
    return {
        "phases": phases, "requests": len(run.requests),
        "ok": sum(r.status == 200 for r in run.requests),
        "replicas_start": base, "replicas_peak": peak, "replicas_end": run.samples[-1].running if run.samples else None,
        "scale_up_decided_after_load_s": None if decided is None or load_start is None else decided - load_start,
        "scale_up_after_load_s": None if up is None or load_start is None else up - load_start,
        "scale_down_after_load_s": None if down is None or load_end is None else down - load_end,
        "replicas_serving": sorted({r.replica for r in run.requests if r.replica}),
        "stitches": sorted({r.stitch for r in run.requests if r.stitch}),
    }


def write_outputs(run: Run, summary: dict, out: Path, meta: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"meta": meta, "summary": summary, "phases": [asdict(p) for p in run.phases],
           "samples": [asdict(s) for s in run.samples], "requests": [asdict(r) for r in run.requests],
           "notes": run.notes}
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1))

    def f(x, fmt="{:.3f}"):
        return "-" if x is None else fmt.format(x)

    lines = [
        "# stitchserve autoscaling run", "",
        f"- when: {meta['when']}; machine: {meta['machine']}; 1-min load average {meta['loadavg_before']} before, "
        f"{meta['loadavg_after']} after",
        f"- app: `{meta['config']}`, model `{run.model}`, deployment `{run.deployment}`",
        f"- autoscaling_config: `{json.dumps(meta.get('autoscaling'))}`",
        f"- bounds: {meta['max_requests']} requests, {meta['max_time_s']} s; loopback {run.url}",
        f"- requests: {summary['requests']} sent, {summary['ok']} OK; max_tokens {meta['max_tokens']}",
        f"- replicas: {summary['replicas_start']} at start -> peak {summary['replicas_peak']} -> "
        f"{summary['replicas_end']} at end; the autoscaler added a replica "
        f"{f(summary['scale_up_decided_after_load_s'], '{:.1f}')} s after load began, it was serving after "
        f"{f(summary['scale_up_after_load_s'], '{:.1f}')} s (replica start-up = load + profile of every stitch); "
        f"back to the minimum {f(summary['scale_down_after_load_s'], '{:.1f}')} s after load ended",
        f"- distinct replicas that served requests: {len(summary['replicas_serving'])}; stitches: {summary['stitches']}",
        "", "| phase | concurrency | seconds | requests | OK | errors | req/s | p50 latency (s) | p95 latency (s) "
            "| replicas min | replicas max | replicas at end |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in summary["phases"]:
        lines.append(f"| {p['phase']} | {p['concurrency']} | {p['seconds']:g} | {p['requests']} | {p['ok']} | "
                     f"{p['errors']} | {p['throughput_rps']:.2f} | {f(p['latency_p50_s'])} | {f(p['latency_p95_s'])} | "
                     f"{f(p['replicas_min'], '{}')} | {f(p['replicas_max'], '{}')} | {f(p['replicas_end'], '{}')} |")
    lines += ["", f"![replicas and latency over time]({out.with_suffix('.png').name})", ""]
    if meta.get("comment"):
        lines += [meta["comment"], ""]
    out.with_suffix(".md").write_text("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    ts = [s.t for s in run.samples]
    ax1.step(ts, [s.running for s in run.samples], where="post", label="running replicas", lw=2)
    ax1.step(ts, [s.running + s.starting for s in run.samples], where="post", label="running + starting", ls=":",
             lw=1.5)
    ax1.step(ts, [s.concurrency for s in run.samples], where="post", label="client concurrency", alpha=0.6)
    ax1.plot(ts, [s.inflight for s in run.samples], label="in flight", alpha=0.5, lw=1)
    ax1.set_ylabel("count")
    ax1.legend(loc="upper right", fontsize=8)
    ax1.set_title(f"stitchserve autoscaling ({run.model})")
    ok = [r for r in run.requests if r.status == 200]
    ax2.scatter([r.t + r.latency_s for r in ok], [r.latency_s for r in ok], s=4, alpha=0.35, label="request latency")
    if ok:  # rolling median over 2 s windows
        end = max(r.t + r.latency_s for r in ok)
        xs, ys = [], []
        w = 0.0
        while w < end:
            lat = [r.latency_s for r in ok if w <= r.t + r.latency_s < w + 2]
            if lat:
                xs.append(w + 1)
                ys.append(statistics.median(lat))
            w += 2
        ax2.plot(xs, ys, color="C3", lw=2, label="median (2 s windows)")
    ax2.set_xlabel("seconds since start")
    ax2.set_ylabel("latency (s)")
    ax2.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="loopback base URL of the app")
    ap.add_argument("--model", help="model id (default: the first palette of --config)")
    ap.add_argument("--start-local", action="store_true", help="start Ray + the app from --config here first")
    ap.add_argument("--config", type=Path, default=REPO / "deploy" / "serve_local_tiny.yaml")
    ap.add_argument("--port", type=int, help="override the config's HTTP port (with --start-local)")
    ap.add_argument("--num-cpus", type=int, default=4, help="Ray CPUs with --start-local")
    ap.add_argument("--ray-address", help="connect to this Ray cluster to sample replica counts (e.g. auto)")
    ap.add_argument("--app", default="stitchserve")
    ap.add_argument("--deployment", help="deployment to sample (default Palette-<model>)")
    ap.add_argument("--phases", default="1:10,8:45,0:35", help="CONCURRENCY:SECONDS,... (closed loop)")
    ap.add_argument("--max-requests", type=int, default=3000)
    ap.add_argument("--max-time", type=float, default=240.0, help="seconds, all phases together")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--budget", help="X-Compute-Budget to send")
    ap.add_argument("--api-key", default=os.environ.get("STITCHSERVE_API_KEY"))
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "serving_autoscale")
    ap.add_argument("--comment", help="a line appended to the markdown report")
    args = ap.parse_args(argv)

    if args.max_requests > HARD_MAX_REQUESTS or args.max_time > HARD_MAX_TIME_S:
        raise SystemExit(f"bounds: at most {HARD_MAX_REQUESTS} requests and {HARD_MAX_TIME_S} s")
    phases = parse_phases(args.phases)
    autoscaling = None
    if args.start_local:
        url, app, model, deployment = start_local(args.config, args.num_cpus, args.port)
        from serving.config import ServeConfig

        autoscaling = ServeConfig.from_yaml(args.config).palettes[0].deployment.autoscaling_config
    else:
        url, app, model = args.url, args.app, args.model
        deployment = args.deployment or (f"Palette-{model}" if model else None)
        if args.ray_address:
            import ray

            ray.init(address=args.ray_address, log_to_driver=False)
        else:
            app = None  # no replica counts without Ray
    check_loopback(url)
    model = args.model or model
    if not model:
        raise SystemExit("--model is required without --start-local")
    run = Run(url, model, args.deployment or deployment, phases)
    meta = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": f"{os.cpu_count()} CPUs",
            "loadavg_before": round(os.getloadavg()[0], 2),
            "config": str(args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config),
            "autoscaling": autoscaling, "max_requests": args.max_requests, "max_time_s": args.max_time,
            "max_tokens": args.max_tokens, "budget": args.budget, "comment": args.comment}
    print(f"loadgen: {url} model {model}, phases {args.phases}", flush=True)
    asyncio.run(drive(run, app=app, max_requests=args.max_requests, max_time=args.max_time,
                      max_tokens=args.max_tokens, budget=args.budget, api_key=args.api_key))
    meta["loadavg_after"] = round(os.getloadavg()[0], 2)  # 1-minute load: other jobs share the machine
    summary = summarize(run)
    write_outputs(run, summary, args.out, meta)
    print(json.dumps({k: v for k, v in summary.items() if k != "phases"}, indent=1))
    for p in summary["phases"]:
        print(p)
    if args.start_local:
        from ray import serve

        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
