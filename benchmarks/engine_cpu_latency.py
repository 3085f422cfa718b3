"""CPU, real Qwen2.5-Coder pair (0.5B + 1.5B, bf16): per-stitch decode latency at batch 1 through
the engine, against the time to read each stitch's weights once, HF `generate()` of each anchor and
the reference `StitchedLM.stream`; plus resident weight memory of the pair and every stitch.

    python benchmarks/engine_cpu_latency.py            # ~6 min on 2 shared cores
    python benchmarks/engine_cpu_latency.py --compile  # also torch.compile'd blocks (a few stitches)

Writes benchmarks/results/engine_cpu_latency.json and prints a markdown table. Stitching layers keep
their identity initialisation: timing does not depend on weight values.
"""
from __future__ import annotations

import argparse
import os
import resource
import time

from bench_stats import spearman
from engine_common import (add_cpu_pair_args, decode_bytes, env_info, hf_generate_step_times, is_strictly_increasing, median,
                           param_bytes, prepare_for_serving, read_bandwidth, stitch_latency, write_result)

import torch



@torch.no_grad()
def reference_s(model, ids, sid, steps) -> list[float]:
    """Per-step seconds of the reference decoder (StitchedLM.stream: growing cat-cache)."""
    stream = model.stream(ids, sid, max_new_tokens=steps + 2)
    next(stream)
    next(stream)
    ts = []
    for _ in range(steps):
        t0 = time.perf_counter()
        next(stream)
        ts.append(time.perf_counter() - t0)
    stream.close()
    return ts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cpu_pair_args(ap)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3, help="timed decode steps per stitch per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd blocks on 3 stitches "
                                                           "(alternating with eager blocks)")
    ap.add_argument("--out", default=None, help="result directory (default benchmarks/results)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from stitchlib.anchors import load_anchor
    from stitchlib.model import StitchedLM

    t_start = time.time()
    env = env_info("cpu")
    S = load_anchor(args.small, dtype="bfloat16", progress=False)
    L = load_anchor(args.large, dtype="bfloat16", progress=False)
    pair = param_bytes(S.model) + param_bytes(L.model)
    model = StitchedLM(S, L)
    prepare_for_serving(model, torch.bfloat16)
    total = param_bytes(model)
    bw = read_bandwidth(torch.device("cpu"), 1 << 30, repeats=3)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, S.stats.vocab_size, (args.prompt_len,), generator=g).tolist()
    ids = torch.tensor([prompt])

    order = sorted((s.id for s in model.stitches), key=lambda sid: decode_bytes(model, sid, 2))
    mid = order[len(order) // 2]
    samples: dict[str, list[float]] = {sid: [] for sid in order}
    hf_s: dict[str, list[float]] = {"small": [], "large": []}
    ref_s: dict[str, list[float]] = {"small": [], mid: [], "large": []}
    S.model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
    L.model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
    # Rounds interleave every measurement (engine sweep, HF generate, reference) so load from other
    # jobs on the shared cores hits all of them alike; min and median are both reported.
    for _ in range(args.rounds):
        for sid, v in stitch_latency(model, order, prompt=prompt, steps=args.steps, rounds=1, config_kw={}).items():
            samples[sid] += v
        for role, anchor in (("small", S), ("large", L)):
            hf_s[role] += hf_generate_step_times(anchor.model, ids, args.steps)
        for sid in ref_s:
            ref_s[sid] += reference_s(model, ids, sid, args.steps)
    lat = {sid: median(v) for sid, v in samples.items()}
    rows = []
    for sid in order:
        b = decode_bytes(model, sid, 2)
        floor_ms = b / (bw["used_GBps"] * 1e9) * 1e3
        rows.append({"stitch": sid, "decode_bytes": b, "params": model.cost(sid).params,
                     "engine_ms": lat[sid] * 1e3, "engine_min_ms": min(samples[sid]) * 1e3, "floor_ms": floor_ms,
                     "x_floor": lat[sid] * 1e3 / floor_ms, "x_floor_min": min(samples[sid]) * 1e3 / floor_ms})
    inc, bad = is_strictly_increasing([r["engine_ms"] for r in rows])
    inc_min, bad_min = is_strictly_increasing([r["engine_min_ms"] for r in rows])
    hf = {k: {"median_ms": median(v) * 1e3, "min_ms": min(v) * 1e3} for k, v in hf_s.items()}
    ref = {k: {"median_ms": median(v) * 1e3, "min_ms": min(v) * 1e3} for k, v in ref_s.items()}

    compiled = None
    if args.compile:
        t0 = time.time()
        eager_c, comp_c = {k: [] for k in ref_s}, {k: [] for k in ref_s}
        for _ in range(2):  # alternate eager and compiled blocks on the same stitches
            for k, v in stitch_latency(model, list(ref_s), prompt=prompt, steps=args.steps, rounds=1,
                                       config_kw={}).items():
                eager_c[k] += v
            for k, v in stitch_latency(model, list(ref_s), prompt=prompt, steps=args.steps, rounds=1,
                                       config_kw={"compile_layers": True}).items():
                comp_c[k] += v
        compiled = {"eager": {k: {"median_ms": median(v) * 1e3, "min_ms": min(v) * 1e3} for k, v in eager_c.items()},
                    "compiled": {k: {"median_ms": median(v) * 1e3, "min_ms": min(v) * 1e3} for k, v in comp_c.items()},
                    "wall_s": time.time() - t0}

    res = {
        "benchmark": "engine_cpu_latency", "env": env, "anchors": [args.small, args.large], "dtype": "bfloat16",
        "threads": args.threads, "prompt_len": args.prompt_len, "timed_steps": args.steps, "rounds": args.rounds,
        "bandwidth": bw,
        "memory": {"pair_bytes": pair, "pair_plus_every_stitch_bytes": total, "ratio": total / pair,
                   "n_stitches": len(model.stitches), "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024},
        "stitches": rows,
        "latency_strictly_increasing_with_bytes": inc, "violations_at": [rows[i]["stitch"] for i in bad],
        "min_latency_strictly_increasing_with_bytes": inc_min, "min_violations_at": [rows[i]["stitch"] for i in bad_min],
        "spearman_latency_vs_bytes": spearman([r["decode_bytes"] for r in rows], [r["engine_ms"] for r in rows]),
        "spearman_min_latency_vs_bytes": spearman([r["decode_bytes"] for r in rows], [r["engine_min_ms"] for r in rows]),
        "hf_generate_ms_per_token": hf,
        "reference_stream_ms_per_step": ref,
        "engine_vs_hf_median": {k: lat[k] * 1e3 / hf[k]["median_ms"] for k in hf},
        "engine_vs_hf_min": {k: min(samples[k]) * 1e3 / hf[k]["min_ms"] for k in hf},
        "compiled_blocks": compiled,
        "wall_s": time.time() - t_start,
    }
    res["env"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    path = write_result("engine_cpu_latency", res, args.out)
    print("| stitch | decode MB | engine ms (median) | engine ms (min) | floor ms | x floor (median) | x floor (min) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stitch']} | {r['decode_bytes'] / 1e6:.0f} | {r['engine_ms']:.1f} | {r['engine_min_ms']:.1f} | "
              f"{r['floor_ms']:.1f} | {r['x_floor']:.2f} | {r['x_floor_min']:.2f} |")
    print(f"HF generate ms/token: {hf}; reference stream ms/step: {ref}; compiled: {compiled}")
    print(f"strictly increasing (min): {inc_min} (violations {res['min_violations_at']}), spearman (min) "
          f"{res['spearman_min_latency_vs_bytes']:.3f}")
    print(f"strictly increasing: {inc} (violations {res['violations_at']}), spearman "
          f"{res['spearman_latency_vs_bytes']:.3f}; memory ratio {res['memory']['ratio']:.4f}; "
          f"bandwidth {bw['used_GBps']:.1f} GB/s; wall {res['wall_s']:.0f}s -> {path}")


if __name__ == "__main__":
    main()
