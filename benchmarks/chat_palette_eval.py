"""Per-stitch quality of chat palettes on chat examples none of them calibrated, trained or validated
on, deployed routes or not (issue 11).

    python benchmarks/chat_palette_eval.py PALETTE [PALETTE ...] [--n 40] [--name NAME ...]

Test examples come from the palettes' chat sources (pydocs, bbcheadlines) minus every example any of
them saw: an `init-palette` palette's calibration and validation (rebuilt from its manifest: sources,
sizes, seed), an `adapt` palette's training and validation split (rebuilt from its recorded
TrainConfig). Several palettes are measured on the SAME test examples, so their numbers compare. Every
route is measured (stitchlib.quality.route_nll), the deployed ones are checked against the promise
(between the anchors, NLL falling as GFLOPs grow); one result per palette goes to
results/chat_palette_<name>.json and .png, and with several palettes results/chat_palette_compare.png.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from pathlib import Path

import torch

from stitchlib.palette import read_manifest
from stitchlib.quality import chat_eval_batches, route_nll
from stitchlib.runtime import PaletteRuntime
from training import datasets as D
from training.init_palette import chat_calibration_split

RESULTS = Path(__file__).parent / "results"


def training_record(path: str) -> dict:
    """What a palette directory's manifest says of its training, or an `adapt` checkpoint's config
    (to exclude a run still in progress from the test set)."""
    if Path(path).is_dir():
        return read_manifest(path).training
    return {"config": torch.load(path, map_location="cpu", weights_only=False)["config"]}


def seen_examples(t: dict) -> tuple[list[str], set]:
    """(chat sources, every example the palette saw), from an init-palette or adapt training record."""
    if "config" in t:  # adapt: its own train/validation split (training.task_data)
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from training.config import TrainConfig
        from training.task_data import load_examples

        cfg = TrainConfig.model_validate(t["config"])
        ex = load_examples(cfg)
        sources = [x.strip() for x in cfg.data.split(",") if x.strip()]
        seen = ex.train + ex.val
    else:
        cal, val = t["calibration"], t.get("validation", {})
        sources = list(cal["data"])
        calib, valx = chat_calibration_split(sources, n_calibration=cal["sequences"],
                                             n_validation=val.get("examples", 0), seed=cal["seed"])
        seen = calib + valx
    return sources, {(e.instruction, e.input, e.output) for e in seen}


def held_out(trainings: list[dict], n: int) -> dict[str, list]:
    """`n` test examples per source that no palette in `trainings` saw (the same for all of them)."""
    sources, seen = [], set()
    for t in trainings:
        src, s = seen_examples(t)
        sources += [x for x in src if x not in sources]
        seen |= s
    out = {}
    for src in sources:
        pool = [e for e in D.load_chat(src) if (e.instruction, e.input, e.output) not in seen]
        out[src] = random.Random(f"chat-palette-eval:{src}").sample(pool, n)
    return out


def measure(path: str, sets: dict[str, list]) -> dict[str, dict]:
    """Every route's response NLL on each test set."""
    rt = PaletteRuntime.load(path, dtype="bfloat16")
    tok = rt.model.small_anchor.tokenizer
    out = {}
    for src, exs in sets.items():
        res = route_nll(rt.model, chat_eval_batches(tok, exs, batch_size=8), progress=True)
        out[src] = {"examples": len(exs), "nll": {i: r.loss for i, r in res.items()}}
    return out


def judge(path: str, sets_nll: dict[str, dict]) -> dict:
    """The palette's current deployment (its manifest) checked against the promise on the measured sets."""
    m = read_manifest(path)
    result = {"palette": str(path), "training": m.training, "sets": sets_nll, "stitches": {}}
    for s in m.stitches:  # validation NLL: what the gate decided on
        val = -s.metrics["neg_loss"] if "neg_loss" in s.metrics else s.metrics.get("loss")
        result["stitches"][s.id] = {"gflops": s.gflops, "deployed": s.deployed, "dropped": s.dropped, "val_nll": val}
    checks = {}
    dep = [s.id for s in sorted(m.deployed(), key=lambda s: s.gflops)]
    for src, r in sets_nll.items():
        nll = r["nll"]
        inner = [i for i in dep if i not in ("small", "large")]
        between = [i for i in inner if nll["large"] < nll[i] < nll["small"]]
        falling = all(nll[a] > nll[b] for a, b in zip(dep, dep[1:]))
        checks[src] = {"deployed_stitches": len(inner), "between_anchors": len(between), "nll_falls_with_gflops": falling,
                       "deployed_nll": {i: round(nll[i], 4) for i in dep},
                       "any_stitch_between": sum(nll["large"] < x < nll["small"] for i, x in nll.items()
                                                 if i not in ("small", "large"))}
        print(Path(path).name, src, json.dumps(checks[src]))
    result["checks"] = checks
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("palettes", nargs="+")
    ap.add_argument("--n", type=int, default=40, help="test examples per source")
    ap.add_argument("--name", nargs="*", default=None, help="one result name per palette (default: directory name)")
    ap.add_argument("--exclude", nargs="*", default=[],
                    help="more palettes (or adapt checkpoints of runs in progress) whose examples the test set avoids")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    names = args.name or [Path(p).name for p in args.palettes]
    if len(names) != len(args.palettes):
        ap.error("--name needs one name per palette")
    torch.set_num_threads(args.threads)
    sets = held_out([training_record(p) for p in args.palettes + args.exclude], args.n)
    # a palette already measured on exactly these examples (same manifest) is not measured again
    test_sha = hashlib.sha256(json.dumps({k: [[e.instruction, e.input, e.output] for e in v]
                                          for k, v in sets.items()}).encode()).hexdigest()
    results = {}
    for path, name in zip(args.palettes, names):
        out = RESULTS / f"chat_palette_{name}.json"
        # the same weights measured on the same examples are not measured again; the deployment is
        # always judged from the manifest as it is now (training/regate.py rewrites only the manifest)
        weights = hashlib.sha256(json.dumps(read_manifest(path).model_dump(mode="json")["files"],
                                            sort_keys=True).encode()).hexdigest()
        old = json.loads(out.read_text()) if out.is_file() else {}
        if old.get("test_sha256") == test_sha and old.get("weights_sha256") == weights:
            print("reusing the measurements of", out)
            sets_nll = old["sets"]
        else:
            sets_nll = measure(path, sets)
        result = judge(path, sets_nll)
        result.update(test_sha256=test_sha, weights_sha256=weights, compared_with=[n for n in names if n != name])
        out.write_text(json.dumps(result, indent=1))
        plot(result, out.with_suffix(".png"), name)
        print("wrote", out)
        results[name] = result
    if len(results) > 1:
        plot_compare(results, RESULTS / "chat_palette_compare.png")


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


def plot_compare(results: dict[str, dict], path: Path) -> None:
    """One panel per test set: every palette's routes (deployed filled, dropped faint), anchors dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(next(iter(results.values()))["sets"])
    fig, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 4.8), squeeze=False)
    for ax, src in zip(axes[0], sets):
        for k, (name, r) in enumerate(results.items()):
            st, nll = r["stitches"], r["sets"][src]["nll"]
            ids = sorted(nll, key=lambda i: st[i]["gflops"])
            dep = [i for i in ids if st[i]["deployed"]]
            ax.plot([st[i]["gflops"] for i in ids], [nll[i] for i in ids], "x", color=f"C{k}", alpha=0.35, ms=4)
            ax.plot([st[i]["gflops"] for i in dep], [nll[i] for i in dep], "o-", color=f"C{k}", label=f"{name} (deployed)")
        ax.set_title(f"held-out {src} ({r['sets'][src]['examples']} examples)")
        ax.set_xlabel("GFLOPs / token")
        ax.set_ylabel("response NLL (lower is better)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
