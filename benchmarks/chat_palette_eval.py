"""Per-stitch quality of a chat palette on chat sets it never calibrated on, deployed or not (issue 11).

    python benchmarks/chat_palette_eval.py PALETTE [--n 40] [--name quickstart]

Test examples come from the palette's own chat sources (pydocs, bbcheadlines) minus every example its
calibration and validation used (rebuilt from the manifest: sources, sizes, seed), so the numbers are
on data the palette never saw. Every route is measured (stitchlib.quality.route_nll), the deployed
ones are checked against the promise (between the anchors, NLL falling as GFLOPs grow) and the result
goes to results/chat_palette_<name>.json and .png.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from stitchlib import data as D
from stitchlib.palette import chat_calibration_split
from stitchlib.quality import chat_eval_batches, route_nll
from stitchlib.runtime import PaletteRuntime

RESULTS = Path(__file__).parent / "results"


def held_out(manifest, n: int) -> dict[str, list]:
    t = manifest.training
    cal, val = t["calibration"], t.get("validation", {})
    sources = cal["data"]
    calib, valx = chat_calibration_split(sources, n_calibration=cal["sequences"], n_validation=val.get("examples", 0),
                                         seed=cal["seed"])
    seen = {(e.instruction, e.input, e.output) for e in calib + valx}
    out = {}
    for src in sources:
        pool = [e for e in D.load_chat(src) if (e.instruction, e.input, e.output) not in seen]
        out[src] = random.Random(f"chat-palette-eval:{src}").sample(pool, n)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("palette")
    ap.add_argument("--n", type=int, default=40, help="test examples per source")
    ap.add_argument("--name", default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rt = PaletteRuntime.load(args.palette, dtype="bfloat16")
    m, model = rt.manifest, rt.model
    tok = model.small_anchor.tokenizer
    sets = held_out(m, args.n)
    rows = {s.id: s for s in m.stitches}
    result = {"palette": str(args.palette), "training": m.training, "sets": {}, "stitches": {}}
    for src, exs in sets.items():
        res = route_nll(model, chat_eval_batches(tok, exs, batch_size=8), progress=True)
        result["sets"][src] = {"examples": len(exs), "nll": {i: r.loss for i, r in res.items()}}
    for s in m.stitches:
        result["stitches"][s.id] = {"gflops": s.gflops, "deployed": s.deployed, "dropped": s.dropped,
                                    "val_nll": -s.metrics["neg_loss"] if "neg_loss" in s.metrics else None}
    checks = {}
    for src, r in result["sets"].items():
        nll = r["nll"]
        dep = [s.id for s in sorted(m.deployed(), key=lambda s: s.gflops)]
        inner = [i for i in dep if i not in ("small", "large")]
        between = [i for i in inner if nll["large"] < nll[i] < nll["small"]]
        falling = all(nll[a] > nll[b] for a, b in zip(dep, dep[1:]))
        checks[src] = {"deployed_stitches": len(inner), "between_anchors": len(between), "nll_falls_with_gflops": falling,
                       "deployed_nll": {i: round(nll[i], 4) for i in dep},
                       "any_stitch_between": sum(nll["large"] < x < nll["small"] for i, x in nll.items()
                                                 if i not in ("small", "large"))}
        print(src, json.dumps(checks[src]))
    result["checks"] = checks
    name = args.name or Path(args.palette).name
    out = RESULTS / f"chat_palette_{name}.json"
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"), name)
    print("wrote", out)


def plot(result: dict, path: Path, name: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st = result["stitches"]
    sets = list(result["sets"])
    fig, axes = plt.subplots(1, len(sets) + 1, figsize=(5.5 * (len(sets) + 1), 4.5))
    series = [("validation (gate)", {i: r["val_nll"] for i, r in st.items()})] + \
             [(f"test: {k}", result["sets"][k]["nll"]) for k in sets]
    for ax, (title, nll) in zip(axes, series):
        ids = sorted((i for i in nll if nll[i] is not None), key=lambda i: st[i]["gflops"])
        ax.plot([st[i]["gflops"] for i in ids], [nll[i] for i in ids], "-", color="0.8", lw=1)
        for i in ids:
            dep = st[i]["deployed"]
            ax.scatter(st[i]["gflops"], nll[i], c="C0" if dep else "0.6", s=30 if dep else 12, zorder=3,
                       marker="o" if dep else "x")
        for a, ls in (("small", "--"), ("large", ":")):
            if nll.get(a) is not None:
                ax.axhline(nll[a], color="k", ls=ls, lw=1)
        ax.set_title(title)
        ax.set_xlabel("GFLOPs / token")
    axes[0].set_ylabel("response NLL (lower is better)")
    fig.suptitle(f"{name}: deployed (blue) vs dropped (x); dashed = small anchor, dotted = large")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
