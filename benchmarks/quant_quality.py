"""Quality of the weight-only quantized palette: per deployed stitch, the response NLL on the palette's
own validation examples under bf16, int8 and int4, and the paired change against bf16.

The examples are the palette's recorded validation split (`chat_calibration_split` with the manifest's
calibration / validation sizes and seed), the first `--examples` of it (the split is round-robin over
the sources, so any prefix mixes them evenly). Each mode loads the palette as serving does
(`PaletteRuntime.load(..., quantize=mode)`: LoRA merged, then the anchors' linears quantized).

    flock /tmp/cpu.lock python benchmarks/quant_quality.py /tmp/pal_v120 --examples 40

Writes benchmarks/results/quant_quality.json.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import time

import torch

from engine_common import env_info, split_modes, write_result


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean and standard error of the per-example differences a - b."""
    d = [x - y for x, y in zip(a, b)]
    m = sum(d) / len(d)
    var = sum((x - m) ** 2 for x in d) / max(len(d) - 1, 1)
    return m, math.sqrt(var / len(d))


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("palette")
    ap.add_argument("--examples", type=int, default=40)
    ap.add_argument("--modes", nargs="+", default=["none,int8,int4"],
                    help="quantization specs: plain modes comma-joined, per-anchor ones (small=int8,large=w4a8) each "
                         "its own value")
    ap.add_argument("--group-size", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default=None)
    ap.add_argument("--name", default="quant_quality")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from stitchlib.palette import read_manifest
    from training.init_palette import chat_calibration_split
    from stitchlib.quality import chat_eval_batches, route_nll
    from stitchlib.quant import DEFAULT_GROUP_SIZE
    from stitchlib.runtime import PaletteRuntime

    t_start = time.time()
    env = env_info("cpu")
    man = read_manifest(args.palette)
    tr = man.training
    _, val = chat_calibration_split(list(tr["calibration"]["data"]), n_calibration=tr["calibration"]["sequences"],
                                    n_validation=tr["validation"]["examples"], seed=tr["seed"])
    val = val[:args.examples]
    ids = [s.id for s in man.deployed()]
    res: dict[str, dict] = {}
    for mode in split_modes(args.modes):
        t0 = time.time()
        rt = PaletteRuntime.load(args.palette, quantize=mode, group_size=args.group_size)
        t_load = time.time() - t0
        batches = chat_eval_batches(rt.tokenizer, val, batch_size=args.batch_size)
        t0 = time.time()
        out = route_nll(rt.model, batches, ids, progress=True)
        res[mode] = {"load_s": t_load, "measure_s": time.time() - t0,
                     "routes": {i: {"loss": r.loss, "tokens": r.tokens, "samples": r.samples()} for i, r in out.items()}}
        print(mode, {i: round(r.loss, 4) for i, r in out.items()}, f"load {t_load:.0f}s", flush=True)
        del rt, out
        gc.collect()
    table = {}
    base = res.get("none")
    for mode, r in res.items():
        for sid in ids:
            row = table.setdefault(sid, {"gflops": next(s.gflops for s in man.deployed() if s.id == sid)})
            row[f"{mode}_loss"] = r["routes"][sid]["loss"]
            if base and mode != "none":
                m, se = paired([-x for x in r["routes"][sid]["samples"]], [-x for x in base["routes"][sid]["samples"]])
                row[f"{mode}_delta_loss"] = r["routes"][sid]["loss"] - base["routes"][sid]["loss"]
                row[f"{mode}_delta_se"] = se
    order = {}
    for mode in res:
        losses = [table[s][f"{mode}_loss"] for s in sorted(ids, key=lambda s: table[s]["gflops"])]
        order[mode] = {"anchors_bracket_every_stitch": all(losses[-1] <= x <= losses[0] for x in losses),
                       "losses_by_cost": losses}
    doc = {"benchmark": "quant_quality", "env": env, "palette": str(args.palette), "palette_name": man.name,
           "examples": len(val), "validation_split": {"n_validation": tr["validation"]["examples"],
                                                      "n_calibration": tr["calibration"]["sequences"],
                                                      "seed": tr["seed"], "sources": tr["calibration"]["data"]},
           "group_size": args.group_size or DEFAULT_GROUP_SIZE, "head": "the same mode as the blocks", "threads": args.threads,
           "stitches": table, "order": order, "modes": res, "wall_s": time.time() - t_start}
    doc["env"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    path = write_result(args.name, doc, args.out)
    modes = [m for m in res if m != "none"]
    print("| stitch | GFLOPs | bf16 loss | " + " | ".join(f"{m} loss | {m} change (± se)" for m in modes) + " |")
    print("|---|---|---|" + "---|---|" * len(modes))
    for sid in sorted(ids, key=lambda s: table[s]["gflops"]):
        r = table[sid]
        print(f"| {sid} | {r['gflops']:.2f} | {r.get('none_loss', float('nan')):.4f} | " + " | ".join(
            f"{r[m + '_loss']:.4f} | {r.get(m + '_delta_loss', float('nan')):+.4f} ± {r.get(m + '_delta_se', float('nan')):.4f}"
            for m in modes) + " |")
    print("->", path)


if __name__ == "__main__":
    main()
