"""Decide a trained palette's deployment again, on its own validation split, over every stitch.

    python training/regate.py PALETTE [--confidence 2.0] [--threads 2]

`adapt` deploys, by default, ESTA's choice: each cost interval's top SNIP score, checked against the
small anchor, then the gate. When a run evaluated every stitch, the measured quality can do better:
`--deploy pareto` gates every evaluated stitch (between the anchors, on the quality-vs-cost front, each
step beyond the paired noise). This applies that rule to a palette already written: its validation
split is rebuilt from the recorded TrainConfig (the examples it never trained on), every route is
measured again with per-example samples (the manifest keeps only means, and the gate's noise margin
needs the samples), and the manifest is rewritten with the new verdicts and numbers. Tensors are
untouched. Runs no training.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # `python training/regate.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stitchlib.errors import PaletteError  # noqa: E402
from stitchlib.fileio import atomic_write  # noqa: E402
from stitchlib.palette import apply_gate, read_manifest  # noqa: E402
from stitchlib.runtime import PaletteRuntime  # noqa: E402
from training import task_data  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.trainer import evaluate, pareto_gate, quality_metric  # noqa: E402


def regate(palette: str | Path, *, z: float = 2.0, progress: bool = True) -> dict:
    """Re-measure every route of `palette` on its validation split and rewrite its manifest with the
    Pareto gate's verdicts. Returns the new `training["gate"]` record."""
    m = read_manifest(palette)
    if "config" not in m.training:
        raise PaletteError(f"{palette}: not written by adapt (no training config): init-palette palettes are "
                           "gated when they are built")
    cfg = TrainConfig.model_validate({**m.training["config"], "deploy": "pareto", "eval_stitches": "all",
                                      "progress": progress})
    t0 = time.time()
    rt = PaletteRuntime.load(palette, dtype=cfg.dtype)
    model = rt.model.eval()
    enc = task_data.encode(cfg, task_data.load_examples(cfg), model.small_anchor.tokenizer)
    samples: dict[str, tuple[float, ...]] = {}
    metrics = evaluate(model, cfg, enc, progress=progress, samples_out=samples)
    q = quality_metric(cfg.task)
    gate = pareto_gate(model, metrics, samples, q, z)
    rows = [s.model_copy(update={"metrics": {**s.metrics, **metrics.get(s.id, {})}}) for s in m.stitches]
    training = {**m.training, "config": cfg.model_dump(mode="json"),
                "gate": {"rule": "pareto (training/regate.py)", "confidence_z": z, "deployed": gate.deployed_ids(),
                         "anchors_inverted": gate.anchors_inverted, "val_examples": len(enc.val),
                         "seconds": round(time.time() - t0, 1)}}
    new = apply_gate(m.model_copy(update={"stitches": rows, "training": training}), gate)
    atomic_write(Path(palette) / "manifest.json", new.model_dump_json(indent=2))
    read_manifest(palette)  # what was written loads
    return training["gate"] | {"dropped": {d.id: d.reason for d in gate.dropped()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("palette")
    ap.add_argument("--confidence", type=float, default=2.0,
                    help="a deployed stitch must beat the small anchor and every cheaper deployed route by more "
                         "than this many paired standard errors (chat)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        rec = regate(args.palette, z=args.confidence, progress=not args.no_progress)
    except PaletteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(rec, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
