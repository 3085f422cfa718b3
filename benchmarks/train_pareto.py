"""Claims (1) and (3): accuracy vs GFLOPs of EVERY stitch after one-stage PST + SNIP adaptation
(do the stitches interpolate between the anchors, as in ESTA Tables 2/3?), and in how many cost
intervals the top-SNIP-score stitch (deployed without evaluation) is also the best-evaluated one.

    python benchmarks/train_pareto.py [--pair real|tiny]

Trains the baseline palette (PST: shared LoRA + stitching-layer LoRA + stitch-specific biases, SNIP
sampling, inplace distillation, one stage) on BBC News at the scale in train_common.py, evaluates
every stitch, and writes benchmarks/results/train_pareto_<pair>.json and .png. The palette is
reused by train_ablations.py as its baseline.
"""
from __future__ import annotations

import argparse
import math
import statistics

from bench_stats import spearman
from train_common import PAIRS, RESULTS, RUNS, machine, run_adapt, scale, train_seconds, write_json


def plot(report: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["stitches"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for ax, key, label in ((axes[0], "accuracy", "validation accuracy"), (axes[1], "loss", "validation loss")):
        xs = [r["gflops"] for r in rows]
        ys = [r["metrics"][key] for r in rows]
        ax.plot(xs, ys, "-", color="0.8", lw=1)
        st = [r for r in rows if r["kind"] == "stitch"]
        ax.scatter([r["gflops"] for r in st], [r["metrics"][key] for r in st], s=16, color="0.4", label="stitch")
        dep = [r for r in st if r["deployed"]]
        ax.scatter([r["gflops"] for r in dep], [r["metrics"][key] for r in dep], s=90, marker="*", color="tab:red",
                   label="deployed (top SNIP score in its interval)")
        an = [r for r in rows if r["kind"] != "stitch"]
        ax.scatter([r["gflops"] for r in an], [r["metrics"][key] for r in an], s=60, marker="s", color="tab:blue",
                   label="anchors")
        ax.set_xlabel("GFLOPs per token (context 512)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best", framealpha=0.6)
    c = report["config"]
    fig.suptitle(f"{c['small']} -> {c['large']} on {c['data']}: {c['steps']} steps x {c['batch_size']} x "
                 f"{c['seq_len']} tokens, eval {report['summary'].get('n_eval', c['eval_size'])} examples",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def monotone_share(values: list[float]) -> float:
    """Share of cost-adjacent stitch pairs whose metric does not drop by more than 1 example's worth."""
    ok = sum(b >= a - 1e-9 for a, b in zip(values, values[1:]))
    return ok / max(1, len(values) - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pair", choices=PAIRS, default="real")
    ap.add_argument("--steps", type=int, help="a longer (or shorter) run than the shared budget; "
                    "results get a _<steps>steps suffix and are not the ablations' baseline")
    args = ap.parse_args()
    (small, large), fields = scale(args.pair)
    suffix = ""
    if args.steps and args.steps != fields["steps"]:
        suffix = f"_{args.steps}steps"
        fields.update(steps=args.steps, snip_warmup_steps=args.steps // 4)
        rep = run_adapt(f"baseline{suffix}", args.pair, steps=args.steps, snip_warmup_steps=args.steps // 4,
                        calibration_from=str(RUNS / f"{args.pair}-baseline"))
    else:
        rep = run_adapt("baseline", args.pair)
    rows = rep["stitches"]
    acc = {r["id"]: r["metrics"]["accuracy"] for r in rows}
    inside = [r for r in rows if r["kind"] == "stitch"]
    lo, hi = acc["small"], acc["large"]
    between = sum(min(lo, hi) - 0.05 <= acc[r["id"]] <= max(lo, hi) + 0.05 for r in inside)
    intervals = rep["intervals"]
    result = {
        "claim": "stitches interpolate between the anchors (ESTA Table 3); top-score stitch = best evaluated",
        "pair": [small, large], "scale": fields, "machine": machine(),
        "stitches": [{k: r[k] for k in ("id", "kind", "split", "join", "gflops", "params", "score", "times_sampled",
                                        "deployed", "metrics")} for r in rows],
        "anchors": {"small": rep["stitches"][0]["metrics"], "large": rep["stitches"][-1]["metrics"]},
        "stitch_accuracy": {"min": min(acc[r["id"]] for r in inside), "max": max(acc[r["id"]] for r in inside),
                            "mean": statistics.fmean(acc[r["id"]] for r in inside)},
        "stitches_within_anchor_range_pm5pts": f"{between}/{len(inside)}",
        "cost_ordered_nondecreasing_accuracy_share": monotone_share([acc[r["id"]] for r in rows]),
        "smoothness": smoothness([acc[r["id"]] for r in rows], fields["eval_size"]),
        "spearman_gflops_vs_loss": spearman([r["gflops"] for r in rows], [r["metrics"]["loss"] for r in rows]),
        "intervals": intervals,
        "top_score_is_best_eval": f"{sum(i['match'] for i in intervals)}/{len(intervals)}",
        "top_score_rank_in_interval": [i["top_score_rank"] for i in intervals],
        "summary": rep["summary"], "trainable": rep["trainable"],
        "timings": {**rep["timings"], "train_s": train_seconds(rep)},
    }
    write_json(f"train_pareto_{args.pair}{suffix}.json", result)
    plot(rep, RESULTS / f"train_pareto_{args.pair}{suffix}.png")
    print(f"accuracy small {lo:.3f} large {hi:.3f}; stitches {result['stitch_accuracy']}; "
          f"top score = best eval in {result['top_score_is_best_eval']} intervals")


def smoothness(values: list[float], n_eval: int) -> dict[str, float]:
    """Steps between cost-adjacent routes vs what evaluation noise alone gives: two routes of the same
    true accuracy p, each scored on n examples, differ by E|d| = sqrt(2 p(1-p) / n) * sqrt(2 / pi).
    A curve whose mean step is near that figure is as smooth as n examples can show."""
    steps = [abs(b - a) for a, b in zip(values, values[1:])]
    p = statistics.fmean(values)
    noise = math.sqrt(2 * p * (1 - p) / n_eval) * math.sqrt(2 / math.pi)
    return {"mean_abs_step": statistics.fmean(steps), "max_abs_step": max(steps),
            "expected_abs_step_from_eval_noise": noise, "steps_over_3x_noise": sum(d > 3 * noise for d in steps)}

if __name__ == "__main__":
    main()
