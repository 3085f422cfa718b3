"""`stitchserve serve`: run the application on this machine or an existing Ray cluster.

    stitchserve serve --palette palettes/chat --palette palettes/cls --port 8000
    stitchserve serve --config deploy/serve_cpu.yaml          # the `args` of a Serve config file
    stitchserve serve --palette palettes/chat --check         # validate and print the config, exit

Registered through the `stitchserve.commands` entry point (`serve = "serving.cli:register_cli"`).
Exit codes: 0 after a clean shutdown (SIGINT / SIGTERM), 2 for an invalid configuration, 1 when the
application fails to start.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from stitchlib.types import QUANTIZE_METAVAR, quantize_arg

log = logging.getLogger(__name__)


def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="serve palettes over HTTP (OpenAI-compatible, budget-routed)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("what to serve")
    src.add_argument("--palette", action="append", default=[], metavar="DIR",
                     help="palette directory; repeat for several palettes (each its own deployment)")
    src.add_argument("--config", type=Path, help="YAML: a ServeConfig, or a Ray Serve config file (its args)")
    src.add_argument("--app", help="application name to read from a Ray Serve config file")
    http = p.add_argument_group("HTTP")
    http.add_argument("--host", help="bind address (default 127.0.0.1)")
    http.add_argument("--port", type=int, help="port (default 8000)")
    http.add_argument("--api-key", help="require this Bearer key on every route (or env STITCHSERVE_API_KEY)")
    http.add_argument("--request-timeout", type=float, help="per-request timeout in seconds")
    rt = p.add_argument_group("palette deployments (applied to every --palette)")
    rt.add_argument("--replicas", type=int, help="replicas per palette (min replicas with --max-replicas)")
    rt.add_argument("--max-replicas", type=int, help="enable autoscaling up to this many replicas")
    rt.add_argument("--target-ongoing-requests", type=float, default=None, help="autoscaling target per replica")
    rt.add_argument("--num-cpus", type=float, help="CPUs per replica")
    rt.add_argument("--num-gpus", type=float, help="GPUs per replica")
    rt.add_argument("--device", help="cpu | cuda (default cpu)")
    rt.add_argument("--dtype", choices=["bfloat16", "float16", "float32"])
    rt.add_argument("--quantize", type=quantize_arg, metavar=QUANTIZE_METAVAR,
                    help="quantized anchors, one mode or one per anchor (default none; benchmarks/QUANT.md)")
    rt.add_argument("--default-budget", help="X-Compute-Budget applied when a request sends none")
    rt.add_argument("--max-batch-size", type=int)
    ray_g = p.add_argument_group("Ray")
    ray_g.add_argument("--address", help="Ray cluster address ('auto' for a running cluster); default: start one")
    ray_g.add_argument("--ray-num-cpus", type=int, help="CPUs for a locally started Ray")
    p.add_argument("--check", action="store_true", help="validate and print the configuration, then exit")
    p.set_defaults(func=run_serve)
    return p


def config_from_args(args: argparse.Namespace):
    """CLI flags over an optional YAML file -> validated `ServeConfig` (raises ServeConfigError)."""
    from .config import ServeConfig, ServeConfigError

    if args.config is not None:
        base: dict[str, Any] = ServeConfig.from_yaml(args.config, app=args.app).model_dump(mode="json")
        if base.get("api_key"):  # model_dump masks secrets
            base["api_key"] = ServeConfig.from_yaml(args.config, app=args.app).api_key.get_secret_value()
    else:
        base = {}
    if args.palette:
        common = {k: v for k, v in (base.get("palettes") or [{}])[0].items() if k not in ("path", "name", "task")}
        base["palettes"] = [{**common, "path": d} for d in args.palette]
    if not base.get("palettes"):
        raise ServeConfigError("nothing to serve: give --palette DIR (repeatable) or --config FILE")
    for key, val in (("host", args.host), ("port", args.port), ("api_key", args.api_key),
                     ("request_timeout_s", args.request_timeout)):
        if val is not None:
            base[key] = val
    for pal in base["palettes"]:
        for key, val in (("device", args.device), ("dtype", args.dtype), ("quantize", args.quantize),
                         ("default_budget", args.default_budget),
                         ("max_batch_size", args.max_batch_size)):
            if val is not None:
                pal[key] = val
        dep = pal.setdefault("deployment", {})
        if args.max_replicas is not None:
            auto = dict(dep.get("autoscaling_config") or {})
            auto.update(min_replicas=args.replicas if args.replicas is not None else auto.get("min_replicas", 1),
                        max_replicas=args.max_replicas)
            if args.target_ongoing_requests is not None:
                auto["target_ongoing_requests"] = args.target_ongoing_requests
            dep["autoscaling_config"] = auto
        elif args.replicas is not None:
            dep["num_replicas"] = args.replicas
            dep["autoscaling_config"] = None
        opts = dict(dep.get("ray_actor_options") or {"num_cpus": 1})
        if args.num_cpus is not None:
            opts["num_cpus"] = args.num_cpus
        if args.num_gpus is not None:
            opts["num_gpus"] = args.num_gpus
        dep["ray_actor_options"] = opts
    return ServeConfig.validate_dict(base, where="command line").resolved()


def run_serve(args: argparse.Namespace) -> int:
    from .config import ServeConfigError

    try:
        cfg = config_from_args(args)
    except ServeConfigError as e:
        print(f"stitchserve serve: {e}", file=sys.stderr)
        return 2
    if args.check:
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
        return 0

    import ray
    from ray import serve

    from .app import build_app

    stop = threading.Event()

    def _on_signal(signum, _frame) -> None:
        log.info("signal %d: shutting down gracefully", signum)
        stop.set()

    prev: dict = {}
    started_ray = False
    try:
        if not ray.is_initialized():
            init: dict[str, Any] = {"address": args.address} if args.address else {"num_cpus": args.ray_num_cpus}
            ray.init(**init)
            started_ray = True
        # after ray.init, whose core worker installs its own SIGTERM handler (prints a trace, exits hard)
        prev = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        serve.run(build_app(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=False)
        print(f"stitchserve: serving {', '.join(p.name for p in cfg.palettes)} at "
              f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}/v1  (Ctrl-C to stop)", flush=True)
        while not stop.wait(1.0):
            pass
    except ServeConfigError as e:
        print(f"stitchserve serve: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        print(f"stitchserve serve: failed to start: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        # Serve drains each replica (graceful_shutdown_timeout_s) before it stops.
        try:
            if serve.context._get_global_client(raise_if_no_controller_running=False) is not None:
                serve.delete(cfg.app_name, _blocking=True)
                if started_ray:
                    serve.shutdown()
        except Exception:
            log.exception("shutdown")
        if started_ray:
            ray.shutdown()
        for s, h in prev.items():
            signal.signal(s, h)
    return 0
