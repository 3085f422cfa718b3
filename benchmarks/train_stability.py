"""Stability of longer training on the real pair, and what validated deployment changes.

    python benchmarks/train_stability.py            # ~45 min on 2 CPU cores (reuses a finished run)

The main recipe (lr 1e-3, 120 steps) collapses at 360 steps (results/train_pareto_real_360steps_partial.json).
This runs 240 steps at lr 3e-4 (SNIP warm-up 60, deployed routes evaluated), then replays deployment on
the finished palette with `stitchlib.snip.validated_deploy` (a top-score stitch that validates below the
small anchor is replaced by its interval's next score): runs trained before `--deploy-tries` existed
deployed the raw top score. The same replay runs on the uniform-sampling ablation (train_ablations.py).
Writes results/train_stability_real.{json,png}.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from train_common import RESULTS, RUNS, machine, run_adapt, scale, train_seconds, write_json

NAME = "lr3e-4_240steps"
OVERRIDES = dict(steps=240, lr=3e-4, snip_warmup_steps=60, eval_stitches="deployed",
                 calibration_from=str(RUNS / "real-baseline"))


def loss_by(history: list[dict[str, Any]], k: int = 20) -> list[dict[str, Any]]:
    out = []
    for a in range(0, len(history), k):
        seg = history[a:a + k]
        st = [h["stitch_loss"] for h in seg]
        out.append({"steps": f"{a + 1}-{a + len(seg)}", "teacher_loss_mean": statistics.fmean(h["teacher_loss"]
                                                                                            for h in seg),
                    "stitch_loss_mean": statistics.fmean(st), "stitch_loss_median": statistics.median(st)})
    return out


def replay_validated_deployment(out: Path, report: dict[str, Any]) -> dict[str, Any]:
    """Deployment as `adapt` now chooses it, on the saved palette; only stitches it needs are evaluated."""
    from stitchlib.runtime import PaletteRuntime
    from stitchlib.snip import SnipSampler, validated_deploy
    from training import task_data
    from training.config import TrainConfig
    from training.trainer import evaluate, quality_metric

    cfg = TrainConfig(**{**report["config"], "progress": False, "resume": False})
    q = quality_metric(cfg.task)
    rt = PaletteRuntime.load(out, dtype=cfg.dtype)
    model = rt.model
    enc = task_data.encode(cfg, task_data.load_examples(cfg), rt.tokenizer)
    ids = [s.id for s in model.stitches]
    rows = {r["id"]: r for r in report["stitches"]}
    sampler = SnipSampler([model.cost(s).flops_per_token for s in model.stitches], n_intervals=cfg.n_intervals,
                          candidates=[i for i in range(len(ids)) if ids[i] != "large"])
    sampler.scores = [rows[i]["score"] for i in ids]
    assert [sampler.interval[model.slot[i]] for i in ids] == [rows[i]["interval"] for i in ids]
    known = {model.slot[i]: r["metrics"][q] for i, r in rows.items() if r["metrics"]}
    new: dict[str, dict[str, float]] = {}

    def quality_of(slots: list[int]) -> dict[int, float]:
        new.update(evaluate(model, cfg, enc, stitch_ids=[ids[s] for s in slots], progress=True))
        return {s: new[ids[s]][q] for s in slots}

    dep = validated_deploy(sampler, quality_of, floor_slot=model.slot["small"], always=[model.slot["small"],
                           model.slot["large"]], tries=cfg.deploy_tries, known=known)
    stitches = [ids[s] for s in dep.slots if ids[s] not in ("small", "large")]
    return {"deployed": {ids[s]: dep.quality[s] for s in dep.slots},
            "rejected": {ids[s]: v for s, v in dep.rejected.items()},
            "intervals_without_route": dep.dropped_intervals, "newly_evaluated": new,
            "mean_deployed_stitches": statistics.fmean(dep.quality[model.slot[i]] for i in stitches)}


def plot(series: dict[str, list[dict[str, Any]]], bars: dict[str, list[tuple[int, str, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=110)
    for label, rows in series.items():
        xs = [int(r["steps"].split("-")[1]) for r in rows]
        a.plot(xs, [r["stitch_loss_mean"] for r in rows], marker="o", ms=3, label=label)
    a.axhline(1.609, color="0.6", ls=":", lw=1, label="ln 5 (chance)")
    a.set_xlabel("optimizer step")
    a.set_ylabel("sampled stitch's training loss (mean per 20 steps)")
    a.set_title("stitch loss during training", fontsize=10)
    a.grid(alpha=0.3)
    a.legend(fontsize=8)
    width = 0.8 / len(bars)
    n = 1 + max(iv for dep in bars.values() for iv, _, _ in dep)
    for k, (label, dep) in enumerate(bars.items()):
        b.bar([iv + k * width for iv, _, _ in dep], [v for _, _, v in dep], width, label=label)
        for iv, sid, v in dep:
            b.annotate(sid, (iv + k * width, v), rotation=90, fontsize=6, ha="center", va="bottom",
                       xytext=(0, 2), textcoords="offset points")
    b.set_xticks([i + 0.4 - width / 2 for i in range(n)], [f"interval {i}" for i in range(n)], fontsize=8)
    b.set_ylabel("validation accuracy of the deployed stitch")
    b.set_ylim(0, 1.15)
    b.set_title("deployed stitch per cost interval", fontsize=10)
    b.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    print(f"wrote {path}")


def deployed_by_interval(report_rows: list[dict[str, Any]], accuracy: dict[str, float]) -> list[tuple[int, str, float]]:
    """(interval, stitch, accuracy) of the deployed stitches (anchors left out)."""
    return [(r["interval"], r["id"], accuracy[r["id"]]) for r in report_rows
            if r["kind"] == "stitch" and r["id"] in accuracy]


def main() -> None:
    (small, large), fields = scale("real")
    fields.update(OVERRIDES)
    rep = run_adapt(NAME, "real", **OVERRIDES)
    out = RUNS / f"real-{NAME}"
    replay = replay_validated_deployment(out, rep)
    base = json.loads((RUNS / "real-baseline" / "report.json").read_text())
    long = json.loads((RESULTS / "train_pareto_real_360steps_partial.json").read_text())
    acc = lambda r: r["metrics"]["accuracy"]  # noqa: E731
    as_run = {r["id"]: acc(r) for r in rep["stitches"] if r["deployed"]}
    result = {
        "claim": "a lower learning rate makes a 2x longer run stable; validated deployment keeps broken "
                 "top-score stitches out",
        "pair": [small, large], "scale": fields, "machine": machine(),
        "run": {"deployed_top_score_unchecked": as_run, "summary": rep["summary"],
                "timings": {**rep["timings"], "train_s": train_seconds(rep)},
                "stitches": [{k: r[k] for k in ("id", "interval", "score", "times_sampled", "deployed", "metrics")}
                             for r in rep["stitches"]],
                "loss_by_20_steps": loss_by(rep["history"])},
        "validated_deployment": replay,
        "compare": {"120 steps lr 1e-3 (main run)": {k: base["summary"][k] for k in ("mean_deployed_stitches",
                                                                                      "small", "large")},
                    "360 steps lr 1e-3": "collapsed: every evaluated route at chance (see the partial JSON)",
                    "240 steps lr 3e-4, top score unchecked": rep["summary"]["mean_deployed_stitches"],
                    "240 steps lr 3e-4, validated": replay["mean_deployed_stitches"]},
    }
    # the uniform-sampling ablation (train_ablations.py) deployed a broken top score too
    uni = json.loads((RUNS / "real-uniform" / "report.json").read_text())
    result["uniform_ablation_validated"] = {
        "top_score_unchecked": {r["id"]: acc(r) for r in uni["stitches"] if r["deployed"] and r["kind"] == "stitch"},
        "mean_top_score_unchecked": uni["summary"]["mean_deployed_stitches"],
        **replay_validated_deployment(RUNS / "real-uniform", uni)}
    write_json("train_stability_real.json", result)
    series = {"lr 1e-3, 120 steps": loss_by(base["history"]), "lr 1e-3, 360 steps": long["loss_by_20_steps"],
              "lr 3e-4, 240 steps": result["run"]["loss_by_20_steps"]}
    base_dep = {r["id"]: acc(r) for r in base["stitches"] if r["deployed"]}
    bars = {"lr 1e-3, 120 steps": deployed_by_interval(base["stitches"], base_dep),
            "lr 3e-4, 240 steps, top score": deployed_by_interval(rep["stitches"], as_run),
            "lr 3e-4, 240 steps, validated": deployed_by_interval(rep["stitches"], replay["deployed"])}
    plot(series, bars, RESULTS / "train_stability_real.png")
    c = result["compare"]
    print(f"deployed stitches mean: 120@1e-3 {c['120 steps lr 1e-3 (main run)']['mean_deployed_stitches']:.3f}, "
          f"240@3e-4 top score {c['240 steps lr 3e-4, top score unchecked']:.3f}, "
          f"validated {c['240 steps lr 3e-4, validated']:.3f}; rejected {replay['rejected']}")


if __name__ == "__main__":
    main()
