"""Trainable parameters of PST against fully fine-tuning every stitch path, for an anchor pair.

    python benchmarks/pst_params.py [--small qwen2.5-coder-0.5b --large qwen2.5-coder-1.5b]

Writes benchmarks/results/pst_params_<small>_<large>.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from stitchlib.anchors import load_anchor
from stitchlib.model import StitchedLM
from stitchlib.pst import PSTConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", default="qwen2.5-coder-0.5b")
    ap.add_argument("--large", default="qwen2.5-coder-1.5b")
    ap.add_argument("--lora-rank", type=int, default=16)
    args = ap.parse_args()
    rows = {}
    for name, cfg in {"pst (lora + stitch lora + ssb)": PSTConfig(lora_rank=args.lora_rank),
                      "lora + stitch lora, no ssb": PSTConfig(lora_rank=args.lora_rank, stitch_bias=False),
                      "ssb only": PSTConfig(shared_lora=False, stitch_lora=False)}.items():
        model = StitchedLM(load_anchor(args.small), load_anchor(args.large), pst=cfg)
        rows[name] = model.trainable_report()
        rows[name]["n_stitches"] = len(model.stitches)
        del model
    out = Path(__file__).parent / "results" / f"pst_params_{args.small}_{args.large}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    for k, v in rows.items():
        print(f"{k:<32} trainable {v['pst_total']:>12,} ({100 * v['pst_total'] / v['full_finetune']:.2f}% of "
              f"full fine-tuning {v['full_finetune']:,})  shared LoRA {v['shared_lora']:,}  "
              f"stitch LoRA {v['stitch_lora']:,}  SSB {v['stitch_bias']:,}")


if __name__ == "__main__":
    main()
