"""One real local Ray + Serve application per test process, shared by every serving test module.

Starting Ray takes ~5-10 s and each palette replica profiles its stitches at start-up, so the app is
started once (a process-wide singleton, so several modules' session fixtures share it) and shut down
at session end. Palettes are the tiny synthetic pair, least-squares only (a few seconds to build).
"""
from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
API_KEY = "test-key-123"
SMALL_PROFILE = {"prompt_len": 8, "decode_steps": 3, "batch_sizes": [1, 4]}


# Ports a local Ray takes AFTER we pick ours (ray.init starts them): a free port that is one of these
# gets taken by Ray before Serve binds to it ("Failed to bind to address '127.0.0.1:52365'", seen once
# in a full run: 52365 is the dashboard agent's default).
RAY_DEFAULT_PORTS = frozenset({6379, 8076, 8077, 8265, 10001, 44217, 44227, 52365, 52366, 62365})


def free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in RAY_DEFAULT_PORTS:
            return port


@dataclass
class Served:
    base_url: str
    api_key: str
    metrics_port: int
    palettes: dict[str, Path]
    config: object = None
    extra: dict = field(default_factory=dict)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


_SERVED: Served | None = None


def make_palettes(root: Path) -> dict[str, Path]:
    from training.init_palette import init_palette

    kw = dict(n_calibration=8, max_len=32, progress=False, overwrite=True, n_validation=0)  # deploy every stitch
    return {
        "tinychat": init_palette(root / "tinychat", task="chat", **kw),
        "tinycls": init_palette(root / "tinycls", task="classify", labels=["business", "sport", "tech"], **kw),
    }


def profile_table(palettes: dict[str, Path]) -> Path:
    """The classify palette's latency table, measured once by the real `stitchserve profile` command."""
    from stitchlib.cli import main

    out = palettes["tinycls"] / "profile-cpu.json"
    if not out.is_file():
        assert main(["profile", str(palettes["tinycls"]), "--out", str(out), "--prompt-len", "8", "--decode-steps",
                     "3", "--batch-sizes", "1", "4", "--json"]) == 0
    return out


# The chat palette's stitch that the `tight` app's crafted profile table prices at the large anchor's cost
# (its served front must shadow it), and the decode-step seconds that table gives the small anchor.
SHADOWED = -2  # index among the deployed stitches, cheapest first: the last stitch before the large anchor
FRONT_BASE_S = 0.004


def front_table(palettes: dict[str, Path]) -> Path:
    """The chat palette's latency table as `stitchserve profile` writes it, its batch-1 decode steps then
    set by hand: each deployed route 10 % dearer than the one below it, except stitch SHADOWED, which
    costs exactly what the large anchor costs (the tiny pair's own steps are all ~equal and noisy)."""
    import json

    from stitchlib.cli import main
    from stitchlib.palette import read_manifest

    out = palettes["tinychat"] / "profile-front.json"
    if not out.is_file():
        assert main(["profile", str(palettes["tinychat"]), "--out", str(out), "--prompt-len", "8",
                     "--decode-steps", "2", "--batch-sizes", "1", "--json"]) == 0
        doc = json.loads(out.read_text())
        ids = [s.id for s in sorted(read_manifest(palettes["tinychat"]).deployed(), key=lambda s: s.gflops)]
        cost = {sid: FRONT_BASE_S * 1.1 ** i for i, sid in enumerate(ids)}
        cost[ids[SHADOWED]] = cost[ids[-1]]
        for sid, c in cost.items():
            doc["stitches"][sid]["decode_step_s"] = {"1": c}
        out.write_text(json.dumps(doc, indent=2))
    return out


def serve_config(palettes: dict[str, Path], port: int):
    from serving.config import ServeConfig

    dep = {"ray_actor_options": {"num_cpus": 0.5}}
    return ServeConfig(
        palettes=[
            # the served front off: the tiny pair's stitches all cost about the same, and noise would
            # shadow some at random (the `tight` app tests the front on a crafted table)
            {"path": str(palettes["tinychat"]), "profile": SMALL_PROFILE, "deployment": dep,
             "max_batch_size": 4, "max_prompt_tokens": 256, "max_inflight": 6, "max_tokens_limit": 1000,
             "min_latency_saving": None},
            # the classify replica reads a saved latency table (`stitchserve profile`) instead of measuring
            {"path": str(palettes["tinycls"]), "profile": {**SMALL_PROFILE, "table": str(profile_table(palettes))},
             "deployment": dep, "default_budget": "500k", "min_latency_saving": None},
        ],
        port=port, api_key=API_KEY, request_timeout_s=60)


def tight_config(palettes: dict[str, Path], port: int):
    """A second application: no API key, 1 s request timeout, one request per replica and a queue of one,
    so Serve's own back-pressure (503) and the ingress timeout (504) are reachable; its latency table is
    `front_table`'s, and its served front is on (the default `min_latency_saving`)."""
    from serving.config import ServeConfig

    return ServeConfig(
        app_name="tight", route_prefix="/tight", port=port, request_timeout_s=1.0,
        palettes=[{"path": str(palettes["tinychat"]), "max_batch_size": 1,
                   "profile": {**SMALL_PROFILE, "batch_sizes": [1], "table": str(front_table(palettes))},
                   "deployment": {"ray_actor_options": {"num_cpus": 0.5}, "max_ongoing_requests": 1,
                                  "max_queued_requests": 1}}])


def start_serving(root: Path) -> Served:
    global _SERVED
    if _SERVED is not None:
        return _SERVED
    import ray
    from ray import serve

    from serving.app import build_app

    palettes = make_palettes(root)
    metrics_port, http_port = free_port(), free_port()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _metrics_export_port=metrics_port,
             _system_config={"metrics_report_interval_ms": 500},
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        cfg = serve_config(palettes, http_port)
        t0 = time.time()
        serve.run(build_app(cfg), name=cfg.app_name, route_prefix="/")
        tight = tight_config(palettes, http_port)
        serve.run(build_app(tight), name=tight.app_name, route_prefix=tight.route_prefix)
    except BaseException:  # one failed start must not leave Ray up for every later module ("init twice")
        serve.shutdown()
        ray.shutdown()
        raise
    _SERVED = Served(f"http://127.0.0.1:{http_port}", API_KEY, metrics_port, palettes, cfg,
                     {"startup_s": time.time() - t0})
    return _SERVED


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    """The shared application (import this fixture into a test module)."""
    s = start_serving(tmp_path_factory.mktemp("serving"))
    yield s
    stop_serving()


@pytest.fixture(scope="session")
def http(served):
    """An httpx client with the API key."""
    import httpx

    with httpx.Client(base_url=served.base_url, headers=served.auth, timeout=60) as c:
        yield c


def stop_serving() -> None:
    global _SERVED
    if _SERVED is None:
        return
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    _SERVED = None


def scrape(text: str) -> dict[tuple[str, tuple], float]:
    """Prometheus text -> {(sample name, sorted labels): value}, via prometheus_client's parser."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(samples: dict, name: str, **labels: str) -> float:
    """Sum of every sample named `name` whose labels include `labels`."""
    return sum(v for (n, lab), v in samples.items()
               if n == name and all(dict(lab).get(k) == want for k, want in labels.items()))
