"""CPU, real Qwen2.5-Coder pair (bf16): concurrent decode streams spread over several stitches in ONE
mixed batch, against the same number of streams on the one stitch of the mean size, and against
serving each stitch as its own batch queue (round-robin).

    python benchmarks/engine_cpu_mixed.py                 # 32 streams over 8 stitches, ~5 min
    python benchmarks/engine_cpu_mixed.py --streams 16 --stitches 4

Two choices of stitches: 'adjacent' (8 consecutive around the middle: the mixed step reads little
more than the mean stitch) and 'spread' (evenly over the palette: the mixed step must read nearly
the whole pair, so in a weight-bound regime it cannot match one mean-size stitch; the JSON records
that bound as weights_bound_ratio = mean-size stitch bytes / union bytes).
"""
from __future__ import annotations

import argparse
import os
import time

from engine_common import add_cpu_pair_args, start_cpu_run, batch_scenarios, pick_stitches, write_result



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cpu_pair_args(ap)
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--stitches", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6, help="timed decode steps per scenario (median); the scenarios' "
                                                          "steps alternate so load drift hits all alike")
    ap.add_argument("--selection", choices=["adjacent", "spread", "both"], default="both")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    t0, env, model = start_cpu_run(args)
    sels = ["adjacent", "spread"] if args.selection == "both" else [args.selection]
    res = {"benchmark": "engine_cpu_mixed", "env": env, "anchors": [args.small, args.large], "dtype": "bfloat16",
           "threads": args.threads, "prompt_len": args.prompt_len, "timed_steps": args.steps, "scenarios": {}}
    for how in sels:
        ids = pick_stitches(model, args.stitches, how)
        r = batch_scenarios(model, ids, streams=args.streams, prompt_len=args.prompt_len, steps=args.steps,
                            config_kw={}, interleave=True)
        res["scenarios"][how] = r
        tps = r["tokens_per_s"]
        print(f"{how}: {ids}\n  tokens/s mixed {tps['mixed']:.1f} | one mean-size stitch ({r['mean_size_stitch']}) "
              f"{tps['single_mean_stitch']:.1f} | separate queues {tps['separate_queues']:.1f} | mixed/single "
              f"{r['mixed_vs_single']:.2f} (weights bound {r['weights_bound_ratio']:.2f}) | mixed/queues "
              f"{r['mixed_vs_queues']:.2f}", flush=True)
    res["wall_s"] = time.time() - t0
    res["env"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print("->", write_result("engine_cpu_mixed", res, args.out))


if __name__ == "__main__":
    main()
