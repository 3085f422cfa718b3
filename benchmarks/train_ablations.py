"""Claim (2): ESTA's ablations at equal training budget (same steps, batch, data, seed, evaluation):

  ssb        baseline (train_pareto.py's palette): LoRA + stitching-layer LoRA + stitch-specific biases
  no_ssb     no stitch-specific biases, shared LoRA rank raised to match the trainable parameters
  uniform    SN-Net's uniform stitch sampling (SNIP scores still tracked, so deployment is the same rule)
  two_stage  adapt the two anchors first (a third of the steps), then calibrate and stitch

Metric: mean validation accuracy (and loss) of the deployed stitches (top score per cost interval;
anchors excluded). Each variant evaluates only its deployed stitches (the baseline evaluates all).

    python benchmarks/train_ablations.py [--pair real|tiny] [--variants no_ssb,uniform,two_stage]

Each variant is one resumable run; rerunning the script reuses finished ones. Writes
benchmarks/results/train_ablations_<pair>.json and .png.
"""
from __future__ import annotations

import argparse
import math
import statistics

from train_common import PAIRS, RESULTS, RUNS, machine, run_adapt, scale, train_seconds, write_json


def matched_rank(trainable: dict, rank: int) -> int:
    """Shared-LoRA rank whose parameter count covers shared LoRA + SSB at `rank` (rounded up)."""
    per_rank = trainable["shared_lora"] / rank
    return math.ceil((trainable["shared_lora"] + trainable["stitch_bias"]) / per_rank)


def deployed(rep: dict) -> list[dict]:
    return [r for r in rep["stitches"] if r["deployed"] and r["kind"] == "stitch"]


def plot(variants: dict[str, dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    marks = {"ssb": "o-", "no_ssb": "s--", "uniform": "^-.", "two_stage": "v:"}
    for name, rep in variants.items():
        rows = [r for r in rep["stitches"] if r["deployed"]]
        ax.plot([r["gflops"] for r in rows], [r["metrics"]["accuracy"] for r in rows], marks.get(name, "o-"),
                label=f"{name} (deployed mean {rep['summary']['mean_deployed_stitches']:.3f})")
    ax.set_xlabel("GFLOPs per token")
    ax.set_ylabel("validation accuracy (deployed stitches + anchors)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pair", choices=PAIRS, default="real")
    ap.add_argument("--variants", default="no_ssb,uniform,two_stage")
    args = ap.parse_args()
    (small, large), fields = scale(args.pair)
    base = run_adapt("baseline", args.pair)
    rank = base["config"]["lora_rank"]
    r2 = matched_rank(base["trainable"], rank)
    alpha = base["config"]["lora_alpha"] * r2 / rank  # same LoRA scaling alpha / r
    # The one-stage variants start from the baseline's least-squares stitching layers (frozen, so the
    # baseline palette carries them unchanged): same init, and no repeated calibration.
    ls = str(RUNS / f"{args.pair}-baseline")
    specs = {
        "no_ssb": dict(stitch_bias=False, lora_rank=r2, lora_alpha=alpha, eval_stitches="deployed",
                       calibration_from=ls),
        "uniform": dict(sampling="uniform", eval_stitches="deployed", calibration_from=ls),
        "two_stage": dict(adapt_anchors_first=fields["steps"] // 3, eval_stitches="deployed"),
    }
    runs = {"ssb": base}
    for name in args.variants.split(","):
        runs[name] = run_adapt(name, args.pair, **specs[name])

    table = {}
    for name, rep in runs.items():
        dep = deployed(rep)
        table[name] = {
            "deployed": [r["id"] for r in dep],
            "mean_accuracy_deployed": statistics.fmean(r["metrics"]["accuracy"] for r in dep),
            "mean_loss_deployed": statistics.fmean(r["metrics"]["loss"] for r in dep),
            "small": rep["summary"]["small"], "large": rep["summary"]["large"],
            "trainable_pst_total": rep["trainable"]["pst_total"],
            "trainable_shared_lora_plus_ssb": rep["trainable"]["shared_lora"] + rep["trainable"]["stitch_bias"],
            "lora_rank": rep["config"]["lora_rank"], "train_s": train_seconds(rep),
            "times_sampled": {r["id"]: r["times_sampled"] for r in rep["stitches"] if r["kind"] != "large"},
        }
    n_eval = fields["eval_size"]
    result = {
        "claim": "SSB > plain LoRA at equal params; SNIP > uniform sampling; one-stage > adapt-then-stitch",
        "pair": [small, large], "scale": fields, "machine": machine(), "eval_examples": n_eval,
        "accuracy_resolution": 1 / n_eval, "variants": table,
        "deltas_vs_baseline": {k: {"accuracy": table["ssb"]["mean_accuracy_deployed"] - v["mean_accuracy_deployed"],
                                   "loss": v["mean_loss_deployed"] - table["ssb"]["mean_loss_deployed"]}
                               for k, v in table.items() if k != "ssb"},
        "note": "positive deltas favour the ESTA choice (baseline); one validation example is "
                f"{100 / n_eval:.1f} accuracy points",
    }
    write_json(f"train_ablations_{args.pair}.json", result)
    plot(runs, RESULTS / f"train_ablations_{args.pair}.png")
    for k, v in table.items():
        print(f"{k:<10} deployed mean acc {v['mean_accuracy_deployed']:.3f} loss {v['mean_loss_deployed']:.3f} "
              f"(rank {v['lora_rank']}, shared+ssb {v['trainable_shared_lora_plus_ssb']:,})")


if __name__ == "__main__":
    main()
