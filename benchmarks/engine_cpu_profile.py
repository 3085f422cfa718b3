"""CPU, real Qwen2.5-Coder pair (bf16): the router's cost table — every stitch's prefill seconds per
prompt token and decode-step seconds per batch bucket, measured through the engine
(`stitchlib.engine.profile.profile_stitches`, the same code `PaletteRuntime.profile` runs), saved
in the JSON format the router loads (`stitchlib.engine.profile.load_profile`).

    python benchmarks/engine_cpu_profile.py                       # every stitch, buckets 1 4 8, ~6 min
    python benchmarks/engine_cpu_profile.py --stitches small s12-l14 large --batch-sizes 1 2 4 8 16

Writes benchmarks/results/engine_profile_cpu_qwen.json.
"""
from __future__ import annotations

import argparse
import os
import time

from engine_common import add_cpu_pair_args, start_cpu_run, RESULTS



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cpu_pair_args(ap)
    ap.add_argument("--stitches", nargs="*", default=None, help="default: all")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--decode-steps", type=int, default=4)
    ap.add_argument("--out", default=str(RESULTS / "engine_profile_cpu_qwen.json"))
    args = ap.parse_args()
    from stitchlib.engine.profile import profile_stitches, save_profile

    t0, env, model = start_cpu_run(args)
    ids = args.stitches or [s.id for s in model.stitches]
    profs = profile_stitches(model, ids, prompt_len=args.prompt_len, decode_steps=args.decode_steps,
                             batch_sizes=tuple(args.batch_sizes))
    env["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    meta = {**env, "anchors": [args.small, args.large], "dtype": "bfloat16", "threads": args.threads,
            "prompt_len": args.prompt_len, "decode_steps": args.decode_steps, "batch_sizes": args.batch_sizes,
            "wall_s": time.time() - t0, "note": "2 CPU cores shared with other jobs: expect noise"}
    path = save_profile(args.out, profs, meta)
    print("| stitch | prefill ms/token | " + " | ".join(f"decode ms @{b}" for b in args.batch_sizes) + " |")
    print("|---|---|" + "---|" * len(args.batch_sizes))
    for sid, p in profs.items():
        print(f"| {sid} | {p.prefill_s_per_token * 1e3:.2f} | "
              + " | ".join(f"{p.decode_step_s[b] * 1e3:.0f}" for b in args.batch_sizes) + " |")
    print(f"wall {time.time() - t0:.0f}s -> {path}")


if __name__ == "__main__":
    main()
