"""Which deployment rule, on one least-squares palette's own validation split (issue 11).

    python benchmarks/chat_gate_rules.py PALETTE [--name default] [--measured FILE]

`init-palette` measures every route on its held-out validation split and deploys by
`stitchlib.gate.select_deployment`: a walk by cost that keeps a stitch when it beats the small anchor
and the best cheaper deployed route by more than z paired standard errors (the greedy front). This
script asks what other rules would have deployed from the SAME per-example numbers:

- greedy front at z = 2 (the default), 1.5, 1;
- the longest chain: the most stitches such that each beats the previous one (and the first beats the
  small anchor) by z standard errors, whichever they are;
- the largest area: the chain that maximises the quality gained over the small anchor integrated over
  cost (what a client whose budget is uniform in GFLOPs gets on average).

The validation split is rebuilt from the manifest (sources, sizes, seed) and the routes that survived
the screen are measured again on all of it with per-example samples (the manifest keeps means only);
`--measured` reuses such a measurement; `--test` (a results/chat_palette_<name>.json of
`chat_palette_eval.py`, same palette) checks each rule's deployed set on held-out data. Writes
results/chat_gate_rules_<name>.json.
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

from stitchlib.gate import GateRow, paired_se, select_deployment
from stitchlib.palette import read_manifest
from training.init_palette import chat_calibration_split

RESULTS = Path(__file__).parent / "results"


def measure(palette: str) -> dict:
    """Per-example response NLL of the routes the palette's screen kept, on its whole validation split."""
    from stitchlib.quality import chat_eval_batches, route_nll
    from stitchlib.runtime import PaletteRuntime

    t = read_manifest(palette).training
    cal, val = t["calibration"], t["validation"]
    _, examples = chat_calibration_split(list(cal["data"]), n_calibration=cal["sequences"],
                                         n_validation=val["examples"], seed=cal["seed"])
    rt = PaletteRuntime.load(palette)
    model = rt.model.eval()
    ids = [s.id for s in model.stitches if s.id not in set(val.get("screened_out", []))]
    t0 = time.time()
    with torch.no_grad():
        res = route_nll(model, chat_eval_batches(model.small_anchor.tokenizer, examples), ids, progress=True)
    return {"palette": str(palette), "examples": len(examples), "seconds": round(time.time() - t0, 1),
            "routes": {i: {"gflops": model.cost(model.get(i)).gflops, "nll": r.loss, "samples": list(r.samples())}
                       for i, r in res.items()}}


def chains(rows: dict[str, GateRow], z: float) -> list[tuple[list[str], float]]:
    """Every chain of stitches valid at z (each step beyond z paired SEs, strictly between the anchors),
    with its area: sum over deployed steps of (quality - small's) x (cost until the next deployed route)."""
    S, L = rows["small"], rows["large"]
    cand = sorted((r for r in rows.values() if r.id not in ("small", "large")
                   and S.quality + z * paired_se(r, S) < r.quality < L.quality), key=lambda r: r.cost)
    out = []
    for k in range(1, len(cand) + 1):
        for comb in itertools.combinations(cand, k):
            if all(b.quality > a.quality + z * paired_se(b, a) for a, b in zip(comb, comb[1:])):
                pts = [S, *comb, L]
                area = sum((p.quality - S.quality) * (n.cost - p.cost) for p, n in zip(pts, pts[1:]))
                out.append(([c.id for c in comb], area))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("palette")
    ap.add_argument("--name", default="default")
    ap.add_argument("--measured", help="a JSON this script (or its measurement) wrote before: skip measuring")
    ap.add_argument("--test", help="results/chat_palette_<name>.json of the same palette: held-out check of each rule")
    args = ap.parse_args(argv)
    test = json.loads(Path(args.test).read_text())["sets"] if args.test else {}
    m = json.loads(Path(args.measured).read_text()) if args.measured else measure(args.palette)
    m = m.get("measured", m)
    rows = {i: GateRow(i, r["gflops"], -r.get("nll", r.get("loss")), tuple(r["samples"])) for i, r in m["routes"].items()}
    S = rows["small"]
    table = [{"id": r.id, "gflops": round(r.cost, 3), "nll": round(-r.quality, 4),
              "z_vs_small": round((r.quality - S.quality) / paired_se(r, S), 2) if r.id != "small" else None}
             for r in sorted(rows.values(), key=lambda r: r.cost)]
    rules = {}
    for z in (2.0, 1.5, 1.0):
        cs = chains(rows, z)
        area = dict((tuple(c), a) for c, a in cs)
        greedy = select_deployment(list(rows.values()), z=z).deployed_ids()[1:-1]
        longest = max(cs, key=lambda t: (len(t[0]), t[1]))
        widest = max(cs, key=lambda t: (t[1], len(t[0])))
        rules[f"z{z:g}"] = {"greedy": {"deployed": greedy, "area": area.get(tuple(greedy))},
                            "longest": {"deployed": longest[0], "area": longest[1]},
                            "largest_area": {"deployed": widest[0], "area": widest[1]}}
        for k, v in rules[f"z{z:g}"].items():
            route = ["small", *v["deployed"], "large"]
            for src, st in test.items():  # held out: NLL along the deployed routes, and whether it falls
                nll = [st["nll"][i] for i in route]
                v.setdefault("test", {})[src] = {"nll": [round(x, 4) for x in nll],
                                                 "falls": all(b < a for a, b in zip(nll, nll[1:]))}
            held = "  ".join(f"{s}: {'falls' if t['falls'] else 'NOT monotone'}" for s, t in v.get("test", {}).items())
            print(f"z={z:g} {k:13s} area {v['area']:.4f}  {', '.join(v['deployed']):40s} {held}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"chat_gate_rules_{args.name}.json"
    out.write_text(json.dumps({"palette": args.palette, "examples": m["examples"], "test": args.test, "routes": table, "rules": rules,
                               "measured": m}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
