"""Where the soak's replica memory goes: the engine alone, in process, with and without oneDNN's
primitive cache.

`benchmarks/soak.py` saw the tiny-pair replica's RSS grow in widening steps and then stay flat
(BUDGETS.md section 4). A per-request leak would track requests; a cache filling per shape seen
would level off once the shapes are covered. This drives one `StitchEngine` on the tiny pair with the
soak's kind of traffic (random stitches, prompts of 2-200 tokens, 1-40 output tokens, greedy and
sampled, up to 8 rows) for --requests requests and samples RSS every 250, once as torch ships
(oneDNN keeps up to 1,024 compiled primitives, one per op and shape) and once in a child process with
ONEDNN_PRIMITIVE_CACHE_CAPACITY=0. If the second stays flat, the growth is that bounded cache.

    python benchmarks/soak_engine_memory.py --requests 3000 --out benchmarks/results/soak_engine_memory
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SETTINGS = {"default": None, "onednn_cache_off": "0"}  # ONEDNN_PRIMITIVE_CACHE_CAPACITY


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def drive(n_requests: int, every: int, seed: int) -> list[dict]:
    """One engine, `n_requests` requests; RSS every `every` admitted requests and at the end."""
    from stitchlib.engine.pool import engine_for_runtime
    from stitchlib.runtime import PaletteRuntime
    from stitchlib.types import EngineConfig, SamplingParams
    from training.init_palette import init_palette

    with tempfile.TemporaryDirectory() as d:
        rt = PaletteRuntime.load(init_palette(f"{d}/pal", n_calibration=8, n_validation=0, progress=False))
    eng = engine_for_runtime(rt, EngineConfig(max_slots=8))
    ids = [s.id for s in rt.stitches]
    rng = random.Random(seed)
    steps, t0, samples = 0, time.time(), []

    def sample(i: int) -> None:
        samples.append({"requests": i, "steps": steps, "seconds": round(time.time() - t0, 1), "rss_mb": round(rss_mb(), 1)})
        print(samples[-1], flush=True)

    for i in range(n_requests):
        while eng.free_slots() == 0 or eng.num_waiting > 4:
            eng.step()
            steps += 1
        if i % every == 0:
            sample(i)
        prompt = [rng.randint(5, 250) for _ in range(rng.randint(2, 200))]
        eng.add_request(prompt, rng.choice(ids), SamplingParams(max_tokens=rng.randint(1, 40),
                                                                temperature=rng.choice([0.0, 0.8]), seed=i))
    while eng.has_unfinished():
        eng.step()
        steps += 1
    sample(n_requests)
    return samples


def summarize(samples: list[dict]) -> dict:
    """RSS after the first `every` requests (start-up and first shapes), at the end, and the change
    over each half of the rest."""
    first, mid, last = samples[1], samples[len(samples) // 2], samples[-1]
    return {"rss_after_first_sample_mb": first["rss_mb"], "rss_end_mb": last["rss_mb"],
            "growth_first_half_mb": round(mid["rss_mb"] - first["rss_mb"], 1),
            "growth_second_half_mb": round(last["rss_mb"] - mid["rss_mb"], 1),
            "seconds": last["seconds"], "steps": last["steps"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--every", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/soak_engine_memory"))
    ap.add_argument("--child", choices=list(SETTINGS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(drive(args.requests, args.every, args.seed)), flush=True)
        return 0
    runs = {}
    for name, cap in SETTINGS.items():  # a fresh process each: oneDNN reads the variable once
        env = dict(os.environ)
        env.pop("ONEDNN_PRIMITIVE_CACHE_CAPACITY", None)
        if cap is not None:
            env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = cap
        print(f"== {name}", flush=True)
        out = subprocess.run([sys.executable, __file__, "--child", name, "--requests", str(args.requests),
                              "--every", str(args.every), "--seed", str(args.seed)],
                             env=env, capture_output=True, text=True, check=True).stdout
        samples = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
        runs[name] = {"onednn_primitive_cache_capacity": cap or "default (1024)", "samples": samples,
                      **summarize(samples)}
        print(json.dumps({k: v for k, v in runs[name].items() if k != "samples"}), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = {"requests": args.requests, "seed": args.seed, "pair": "tiny", "max_slots": 8,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in runs.items():
        ax.plot([s["requests"] for s in r["samples"]], [s["rss_mb"] for s in r["samples"]], marker="o",
                label=f"{name} (oneDNN cache {r['onednn_primitive_cache_capacity']})")
    ax.set_xlabel("requests admitted")
    ax.set_ylabel("engine process RSS (MB)")
    ax.set_title("Tiny-pair engine, soak traffic, in process")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out + ".png", dpi=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
