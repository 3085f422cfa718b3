"""After training: which stitches to deploy, how the SNIP choice compares with evaluation, the
report.json and the Pareto plot that go into the palette."""
from __future__ import annotations

import io
import json
import statistics
from typing import Any

from stitchlib.model import StitchedLM
from stitchlib.snip import SnipSampler


def interval_analysis(model: StitchedLM, sampler: SnipSampler, metrics: dict[str, dict[str, float]],
                      quality: str) -> list[dict[str, Any]]:
    """Per cost interval: the top-score stitch (what ESTA deploys without evaluating) against the
    best-evaluated one. Paper claim (5.3): they mostly coincide."""
    rows = []
    if any(s.id not in metrics for s in model.stitches):
        return rows  # only the deployed stitches were evaluated: nothing to compare against
    for group in sampler.groups():
        ids = [model.stitches[s].id for s in group]
        scored = [s for s in group if sampler.scores[s] is not None]
        top = model.stitches[max(scored, key=lambda s: (sampler.scores[s], -sampler.costs[s]))].id if scored else None
        best = max(ids, key=lambda i: metrics[i][quality])
        ranked = sorted(ids, key=lambda i: -metrics[i][quality])
        rows.append({"interval": sampler.interval[group[0]], "stitches": ids, "top_score": top, "best_eval": best,
                     "match": top == best, "top_score_rank": ranked.index(top) + 1 if top else None,
                     "top_score_metric": metrics[top][quality] if top else None,
                     "best_metric": metrics[best][quality]})
    return rows


def summarize(rows: list[dict[str, Any]], metrics: dict[str, dict[str, float]], deployed: list[str],
              quality: str) -> dict[str, Any]:
    stitches = [r["id"] for r in rows if r["kind"] == "stitch" and r["id"] in metrics]
    dep_stitches = [i for i in deployed if i in stitches]
    mean = lambda ids: statistics.fmean(metrics[i][quality] for i in ids) if ids else None  # noqa: E731
    return {"quality_metric": quality,
            "mean_all_stitches": mean(stitches) if len(stitches) == sum(r["kind"] == "stitch" for r in rows) else None,
            "mean_deployed_stitches": mean(dep_stitches),
            "mean_deployed_incl_anchors": mean(deployed),
            "small": metrics["small"][quality], "large": metrics["large"][quality]}


def pareto_png(rows: list[dict[str, Any]], quality: str, title: str) -> bytes:
    """Quality vs GFLOPs/token: every stitch, deployed ones highlighted, anchors as squares."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["metrics"]]  # evaluated ones
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    xs = [r["gflops"] for r in rows]
    ys = [r["metrics"][quality] for r in rows]
    ax.plot(xs, ys, "-", color="0.75", lw=1, zorder=1)
    st = [r for r in rows if r["kind"] == "stitch"]
    ax.scatter([r["gflops"] for r in st], [r["metrics"][quality] for r in st], s=18, color="0.45",
               label="stitch", zorder=2)
    dep = [r for r in st if r["deployed"]]
    ax.scatter([r["gflops"] for r in dep], [r["metrics"][quality] for r in dep], s=90, marker="*",
               color="tab:red", label="deployed (validated SNIP pick on the Pareto front)", zorder=3)
    rej = [r for r in st if r.get("rejected") or r.get("dropped") not in (None, "not_selected")]
    if rej:
        ax.scatter([r["gflops"] for r in rej], [r["metrics"][quality] for r in rej], s=70, marker="x",
                   color="tab:orange", label="SNIP pick not deployed (validation or gate)", zorder=3)
    for r in rows:
        if r["kind"] != "stitch":
            ax.scatter([r["gflops"]], [r["metrics"][quality]], s=60, marker="s", color="tab:blue", zorder=3,
                       label="anchor" if r["kind"] == "small" else None)
            ax.annotate(r["id"], (r["gflops"], r["metrics"][quality]), textcoords="offset points", xytext=(5, -10),
                        fontsize=8)
    for r in dep:
        ax.annotate(r["id"], (r["gflops"], r["metrics"][quality]), textcoords="offset points", xytext=(4, 4),
                    fontsize=7, color="tab:red")
    ax.set_xlabel("GFLOPs per token")
    ax.set_ylabel(quality)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def report_json(report: dict[str, Any]) -> bytes:
    return json.dumps(report, indent=2, default=str).encode()
