"""Bounded soak: minutes of mixed traffic on loopback, watching for anything that grows.

Starts Ray + Serve here with the tiny pair (or a palette given with --palette), then runs closed-loop
clients for --minutes: chat and completions, streaming and plain, budgets that route to every stitch,
and random disconnects (a stream dropped after a few chunks, a plain request abandoned by a short
client timeout). Every --every seconds it samples the resident memory (RSS) of every Serve replica
process and of the proxy, the engine's slots in use and requests in flight (`/ready`), and the open
TCP connections to the HTTP port. Afterwards it waits for the server to go idle and judges growth:
RSS slope over the second half of the run (MB/min) and its change from the end of warm-up to the end;
engine rows, in-flight requests and connections back to zero once the load stops.

    flock /tmp/cpu.lock python benchmarks/soak.py --minutes 4 --out benchmarks/results/soak_tiny
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.loadgen import check_loopback  # noqa: E402

HARD_MAX_MINUTES = 15


def start(palette: Path | None, port: int, max_batch_size: int) -> tuple[str, str]:
    import ray
    from ray import serve

    from serving.app import build_app
    from serving.config import ServeConfig

    if palette is None:
        from training.init_palette import init_palette

        palette = Path("/tmp") / f"soak_tiny_{os.getuid()}"
        if not (palette / "manifest.json").exists():
            init_palette(palette, task="chat", n_calibration=8, max_len=32, progress=False, overwrite=True,
                         n_validation=0)
    cfg = ServeConfig(palettes=[{"path": str(palette), "name": "soak", "task": "chat",
                                 "max_batch_size": max_batch_size, "max_prompt_tokens": 256,
                                 "max_tokens_limit": 512, "max_inflight": 64,
                                 "profile": {"prompt_len": 8, "decode_steps": 3, "batch_sizes": [1, 4]},
                                 "deployment": {"ray_actor_options": {"num_cpus": 1}}}],
                      port=port, request_timeout_s=60, relay_metrics=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name=APP, route_prefix="/")
    return f"http://127.0.0.1:{port}", "soak"


APP = "soak"


def ours(name: str) -> bool:
    """A sampled process of this run: the app's replicas and the proxy on our port (other Ray sessions
    on the machine have replicas and proxies too)."""
    return name.startswith(f"ServeReplica:{APP}:") or name.startswith("proxy")


def serve_processes(port: int) -> dict[str, psutil.Process]:
    """This app's replica processes and the proxy process listening on `port`."""
    out = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if cmd.startswith(f"ray::ServeReplica:{APP}:"):
            out[cmd.split()[0].removeprefix("ray::").split(".")[0] + f"#{p.pid}"] = p
    for c in psutil.net_connections(kind="tcp"):
        if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid:
            out[f"proxy#{c.pid}"] = psutil.Process(c.pid)
    return out


def connections(port: int) -> int:
    n = 0
    for c in psutil.net_connections(kind="tcp"):
        if c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED:
            n += 1
    return n


async def client_loop(base: str, model: str, stitches: list[dict], stop: asyncio.Event, rng: random.Random,
                      tally: dict) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=60) as c:
        while not stop.is_set():
            s = rng.choice(stitches)
            headers = {"X-Compute-Budget": f"{s['params'] / 1e3 + 1:.0f}k"}  # routes to this stitch
            chat = rng.random() < 0.7
            stream = rng.random() < 0.5
            drop = rng.random() < 0.25
            n = rng.choice([4, 16, 64, 200])
            body = ({"model": model, "messages": [{"role": "user", "content": "soak " * rng.randint(1, 30)}]}
                    if chat else {"model": model, "prompt": "soak " * rng.randint(1, 30)})
            body.update(max_tokens=n, temperature=rng.choice([0, 0.8]), stream=stream)
            path = "/v1/chat/completions" if chat else "/v1/completions"
            kind = ("stream" if stream else "plain") + ("-drop" if drop else "")
            try:
                if stream:
                    async with c.stream("POST", path, json=body, headers=headers) as r:
                        k = 0
                        async for line in r.aiter_lines():
                            k += line.startswith("data: ")
                            if drop and k >= rng.randint(1, 4):
                                break  # the client goes away mid-stream
                        status = r.status_code
                else:
                    timeout = rng.uniform(0.02, 0.3) if drop else 60
                    r = await c.post(path, json=body, headers=headers, timeout=timeout)
                    status = r.status_code
            except httpx.TimeoutException:
                status = "abandoned"
            except httpx.HTTPError as e:
                status = type(e).__name__
            key = f"{kind}:{status}"
            tally[key] = tally.get(key, 0) + 1


async def sampler(base: str, port: int, t0: float, stop: asyncio.Event, samples: list, every: float,
                  load_on: dict) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=30) as c:
        while True:
            procs = serve_processes(port)
            rss = {}
            for name, p in procs.items():
                try:
                    rss[name] = p.memory_info().rss / 2**20
                except psutil.Error:
                    pass
            try:
                m = (await c.get("/ready")).json()["models"][0]
                eng = {"inflight": m["inflight"], "running": m["engine"]["running"], "waiting": m["engine"]["waiting"],
                       "steps": m["engine"]["steps"]}
            except (httpx.HTTPError, ValueError, KeyError):
                eng = {}
            samples.append({"t": round(time.monotonic() - t0, 2), "load": load_on["on"], "rss_mb": rss,
                            "connections": connections(port), **eng})
            if stop.is_set():
                return
            try:
                await asyncio.wait_for(stop.wait(), every)
            except asyncio.TimeoutError:
                pass


def slope_mb_per_min(ts: list[float], ys: list[float]) -> float:
    if len(ts) < 3:
        return 0.0
    mt, my = statistics.fmean(ts), statistics.fmean(ys)
    den = sum((t - mt) ** 2 for t in ts)
    return 60 * sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / den if den else 0.0


def canonical(samples: list[dict]) -> list[dict]:
    """One series per process: Ray renames a worker's title while it runs a call ('...Palette-x.method')."""
    return [{**s, "rss_mb": {k.split("#")[0].split(".")[0] + "#" + k.split("#")[-1]: v
                             for k, v in s["rss_mb"].items() if ours(k)}} for s in samples]


def analyse(samples: list[dict], warmup_s: float, load_end: float) -> dict:
    names = sorted({n for s in samples for n in s["rss_mb"] if ours(n)})
    per = {}
    for n in names:
        pts = [(s["t"], s["rss_mb"][n]) for s in samples if n in s["rss_mb"] and s["load"]]
        after = [p for p in pts if p[0] >= warmup_s]
        if len(after) < 4:
            continue
        half = [p for p in after if p[0] >= (warmup_s + load_end) / 2]
        # growth that has stopped (an allocator settling on the shapes it has seen) vs one that goes on
        # to the end (a leak): since when RSS has stayed within 1 MB of its final value
        below = [i for i, (_, y) in enumerate(pts) if y < pts[-1][1] - 1.0]
        flat_since = pts[below[-1] + 1][0] if below else pts[0][0]
        quarter = [p for p in pts if p[0] >= pts[-1][0] - (pts[-1][0] - warmup_s) / 4]
        per[n] = {"rss_first_mb": round(pts[0][1], 1), "rss_start_mb": round(after[0][1], 1),
                  "rss_end_mb": round(pts[-1][1], 1), "within_1mb_of_end_since_s": round(flat_since, 1),
                  "change_last_quarter_mb": round(quarter[-1][1] - quarter[0][1], 1),
                  "rss_max_mb": round(max(y for _, y in pts), 1),
                  "change_after_warmup_pct": round(100 * (pts[-1][1] / after[0][1] - 1), 2),
                  "slope_second_half_mb_per_min": round(slope_mb_per_min([t for t, _ in half], [y for _, y in half]), 3)}
    idle = [s for s in samples if not s["load"]]
    end = idle[-1] if idle else samples[-1]
    first = samples[0]
    return {"processes": per,
            "at_start": {k: first.get(k) for k in ("inflight", "running", "waiting", "connections")},
            "idle_at_end": {k: end.get(k) for k in ("inflight", "running", "waiting", "connections")},
            "peak_connections": max(s["connections"] for s in samples),
            "peak_running": max(s.get("running", 0) for s in samples)}


def plot(samples: list[dict], out: Path, load_end: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    names = sorted({n for s in samples for n in s["rss_mb"] if ours(n)})
    for n in names:
        pts = [(s["t"], s["rss_mb"][n]) for s in samples if n in s["rss_mb"]]
        a1.plot([p[0] for p in pts], [p[1] for p in pts], label=n.split("#")[0], lw=1.2)
    a1.set_ylabel("RSS (MiB)")
    a1.legend(fontsize=7, loc="center right")
    a1.axvline(load_end, color="k", ls=":", lw=0.8)
    a1.set_title("soak: resident memory of the Serve processes")
    ts = [s["t"] for s in samples]
    a2.plot(ts, [s.get("running", float("nan")) for s in samples], label="engine rows (slots in use)")
    a2.plot(ts, [s.get("inflight", float("nan")) for s in samples], label="requests in flight (replica)", alpha=0.7)
    a2.plot(ts, [s["connections"] for s in samples], label="open connections to the HTTP port", alpha=0.7)
    a2.axvline(load_end, color="k", ls=":", lw=0.8)
    a2.set_xlabel("seconds (dotted: load stops)")
    a2.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--palette", type=Path, help="chat palette (default: a tiny-pair palette built here)")
    ap.add_argument("--minutes", type=float, default=4.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--every", type=float, default=2.0)
    ap.add_argument("--warmup", type=float, default=30.0, help="seconds before RSS growth is judged")
    ap.add_argument("--max-batch-size", type=int, default=4)
    ap.add_argument("--port", type=int, default=18555)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "soak_tiny")
    ap.add_argument("--reanalyse", type=Path, help="recompute the verdict and plot of a saved run (JSON)")
    args = ap.parse_args(argv)
    if args.reanalyse is not None:
        doc = json.loads(args.reanalyse.read_text())
        load_end = max(s["t"] for s in doc["samples"] if s["load"])
        doc["samples"] = canonical(doc["samples"])
        doc["result"] = analyse(doc["samples"], doc["meta"].get("warmup_s", args.warmup), load_end)
        args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
        plot(doc["samples"], args.out.with_suffix(".png"), load_end)
        print(json.dumps(doc["result"], indent=1))
        return 0
    if args.minutes > HARD_MAX_MINUTES:
        raise SystemExit(f"bound: at most {HARD_MAX_MINUTES} minutes")
    load0 = os.getloadavg()
    base, model = start(args.palette, args.port, args.max_batch_size)
    check_loopback(base)
    stitches = httpx.get(base + "/v1/stitches", timeout=60).json()["data"]
    samples: list[dict] = []
    tally: dict[str, int] = {}

    async def run() -> float:
        from tqdm import tqdm

        t0 = time.monotonic()
        stop_load, stop_sampling = asyncio.Event(), asyncio.Event()
        load_on = {"on": True}
        samp = asyncio.create_task(sampler(base, args.port, t0, stop_sampling, samples, args.every, load_on))
        rng = random.Random(args.seed)
        clients = [asyncio.create_task(client_loop(base, model, stitches, stop_load, random.Random(rng.random()),
                                                   tally)) for _ in range(args.clients)]
        with tqdm(total=int(args.minutes * 60), desc="soak", unit="s") as bar:
            while time.monotonic() - t0 < args.minutes * 60:
                await asyncio.sleep(1)
                bar.update(1)
                bar.set_postfix(requests=sum(tally.values()))
        stop_load.set()
        await asyncio.wait(clients, timeout=90)
        load_end = time.monotonic() - t0
        load_on["on"] = False
        await asyncio.sleep(15)  # idle: aborted rows leave, connections close
        stop_sampling.set()
        await samp
        return load_end

    load_end = asyncio.run(run())
    from ray import serve

    serve.shutdown()
    import ray

    ray.shutdown()
    res = analyse(samples, args.warmup, load_end)
    doc = {"meta": {"when": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "minutes": args.minutes,
                    "warmup_s": args.warmup,
                    "clients": args.clients, "palette": str(args.palette or "tiny pair (built here)"),
                    "loadavg_before": [round(x, 2) for x in load0],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()], "machine": f"{os.cpu_count()} CPUs"},
           "requests": sum(tally.values()), "outcomes": dict(sorted(tally.items())), "result": res,
           "samples": samples}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    plot(samples, args.out.with_suffix(".png"), load_end)
    print(json.dumps({k: v for k, v in doc.items() if k != "samples"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
