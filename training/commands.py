"""The `stitchserve` subcommands that training contributes (`stitchserve.commands` entry points in
pyproject.toml; `adapt` registers itself from training.adapt_llama).

Every `stitchserve` call builds the whole parser, so this module imports no torch: a command's
implementation is imported when that command runs.
"""
from __future__ import annotations

import argparse

from stitchlib.cli import not_deployed_lines, num_cell


def register_init_palette(subparsers) -> None:
    s = subparsers.add_parser("init-palette", help="write a least-squares-only palette (no training)")
    s.add_argument("--small", default="qwen2.5-coder-0.5b")
    s.add_argument("--large", default="qwen2.5-coder-1.5b")
    s.add_argument("--task", choices=["chat", "classify"], default="chat")
    s.add_argument("--labels", help="comma-separated labels (classify)")
    s.add_argument("--out", required=True, help="palette directory to create")
    s.add_argument("--calibration", type=int, default=400,
                   help="chat examples fitting the stitching layers (more is better: 100 -> 400 measured in benchmarks/CHAT_INIT.md)")
    s.add_argument("--validation", type=int, default=120,
                   help="held-out chat examples measuring the routes; only stitches between the anchors and on "
                        "the quality-vs-cost front are deployed (0: no measurement, deploy all, rank by size)")
    s.add_argument("--screen", type=int, default=24,
                   help="the first this many validation examples measure every route; only routes not clearly "
                        "worse than the small anchor are measured on the rest (0: every route on every example)")
    s.add_argument("--chat-data", default="pydocs,bbcheadlines",
                   help="comma-separated chat sources (built-in names or .json/.jsonl files) for calibration and "
                        "validation, drawn evenly")
    s.add_argument("--weighting", choices=["relative", "none"], default="relative",
                   help="least-squares token weighting: relative = each token's error relative to its own scale "
                        "(what the large block reads after its norm); none = plain least squares")
    s.add_argument("--min-gain", type=float, default=0.0,
                   help="a stitch must beat every cheaper deployed route by more than this (quality units)")
    s.add_argument("--distill-steps", type=int, default=0,
                   help="after least squares, train each stitching layer alone this many steps (4 sequences "
                        "each) against the large anchor's next-token distribution: better stitches, ~1 min per "
                        "stitch per 24 steps on 2 CPU cores (0: off)")
    s.add_argument("--confidence", type=float, default=2.0,
                   help="... and by more than this many standard errors of the paired difference on the "
                        "validation examples (0: any measured gain counts, noise included)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=run_init_palette)


def run_init_palette(args: argparse.Namespace) -> int:
    # torch and the anchors' code load only when the command runs
    from stitchlib.palette import read_manifest
    from training import init_palette as I

    labels = [x.strip() for x in args.labels.split(",")] if args.labels else None
    data = [x.strip() for x in args.chat_data.split(",") if x.strip()]
    out = I.init_palette(args.out, small=args.small, large=args.large, task=args.task, labels=labels,
                         seed=args.seed, n_calibration=args.calibration, dtype=args.dtype, overwrite=args.overwrite,
                         chat_data=data, weighting=args.weighting, n_validation=args.validation, n_screen=args.screen,
                         min_gain=args.min_gain, confidence=args.confidence, distill_steps=args.distill_steps)
    m = read_manifest(out)
    print(f"wrote least-squares-only palette {out} ({len(m.stitches)} stitches, {len(m.deployed())} deployed)")
    val = m.training.get("validation")
    if val and m.quality_metric == "neg_loss":
        print(f"deployed, by cost (response NLL on {val['examples']} held-out chat examples; lower is better):")
        for st in m.deployed():
            print(f"  {st.id:<10} {st.gflops:>8.3f} GFLOPs  NLL {num_cell(-st.metrics['neg_loss'] if 'neg_loss' in st.metrics else None)}")
    for line in not_deployed_lines(m):
        print(line)
    return 0
