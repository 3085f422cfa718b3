"""Where a chat PST training step spends its time, and what the LM-head-on-the-response change saves (issue 11).

    python benchmarks/train_step_profile.py [--pair real|tiny] [--steps 4] [--threads 1]

`adapt --task chat` runs, per step, one pass of the large anchor (the teacher: forward, backward into
the shared LoRA) and one of the sampled stitch, then SNIP scoring and AdamW. Here the real trainer
(training.trainer.Trainer, the run's own data, config and calibration path, calib-size 8) takes the
same `--steps` steps twice from the same state and the same batches:

- `labelled` (what adapt does now): the LM head runs only on the positions that carry a label
  (the response), `Trainer.forward`;
- `full_logits` (before): the head runs on every position, [B, T, V] float logits, `lm_loss`.

The stitches are fixed (the cheapest, a middle and the dearest one, cycled) so both variants time the
same work. Records per-phase seconds (data, teacher pass, stitch pass, rest = SNIP + clip + AdamW),
the loss of each step in both variants (they must agree) and the response share of the positions.
Writes results/train_step_profile_<pair>.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stitchlib.model import lm_loss  # noqa: E402
from training.config import make_config  # noqa: E402
from training.task_data import load_examples  # noqa: E402
from training.trainer import Trainer  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PAIRS = {"real": ("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"), "tiny": ("tiny-small", "tiny-large")}


class FullLogits(Trainer):
    """The step as it was: logits at every position, then the shifted, masked cross entropy."""

    def forward(self, batch, stitch):
        return self.model(batch["input_ids"], stitch, batch["attention_mask"])  # [B, T, V]

    def task_loss(self, out, labels):
        return lm_loss(out, labels)

    def hard_labels(self, out, labels):
        hard = torch.full_like(labels, -100)
        hard[:, 1:] = out.argmax(-1)[:, :-1]
        return hard.masked_fill(labels == -100, -100)


def run(cls, cfg, examples, stitches: list[str] | None, steps: int) -> dict:
    t = cls(cfg)
    t.setup(examples)
    t.calibrate()
    if stitches is None:  # the cheapest, a middle and the dearest stitch
        ids = [s.id for s in t.model.stitches if s.kind == "stitch"]
        stitches = [ids[0], ids[len(ids) // 2], ids[-1]]
    slots = [t.model.slot[s] for s in stitches]
    it = iter(range(steps))
    t.sampler.sample = lambda: slots[next(it) % len(slots)]  # fixed stitches: both variants time the same work
    recs = [t.train_step() for _ in range(steps)]
    share = [float((b["labels"][:, 1:] != -100).sum() / b["attention_mask"][:, 1:].numel())
             for b in (next(t.batches) for _ in range(4))]
    return {"steps": [{k: r[k] for k in ("stitch", "teacher_loss", "stitch_loss", "step_s", "data_s", "teacher_s",
                                          "stitch_s")} for r in recs],
            "response_share_of_positions": statistics.mean(share), "stitch_ids": stitches}


def summary(rows: list[dict]) -> dict:
    keep = rows[1:] if len(rows) > 1 else rows  # the first step warms allocators and caches
    out = {k: statistics.mean(r[k] for r in keep) for k in ("step_s", "data_s", "teacher_s", "stitch_s")}
    out["rest_s"] = out["step_s"] - out["data_s"] - out["teacher_s"] - out["stitch_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pair", choices=list(PAIRS), default="real")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    small, large = PAIRS[args.pair]
    data = "pydocs,bbcheadlines"
    cfg = make_config(small=small, large=large, task="chat", data=data, out=str(Path("/tmp/train_step_profile")),
                      seq_len=128, batch_size=4, steps=args.steps, lr=3e-4, calib_size=8, eval_size=100,
                      max_train_examples=1200, progress=False)
    examples = load_examples(cfg)
    res, stitches = {}, None
    for name, cls in (("labelled", Trainer), ("full_logits", FullLogits)):
        res[name] = run(cls, cfg, examples, stitches, args.steps)
        stitches = res[name]["stitch_ids"]
        res[name]["mean"] = summary(res[name]["steps"])
        m = res[name]["mean"]
        print(f"{name:<12} step {m['step_s']:.2f} s = data {m['data_s']:.2f} + teacher {m['teacher_s']:.2f} + "
              f"stitch {m['stitch_s']:.2f} + rest {m['rest_s']:.2f}", flush=True)
    a, b = res["labelled"]["steps"], res["full_logits"]["steps"]
    res["max_loss_difference"] = max(max(abs(x["teacher_loss"] - y["teacher_loss"]),
                                         abs(x["stitch_loss"] - y["stitch_loss"])) for x, y in zip(a, b))
    res["speedup"] = res["full_logits"]["mean"]["step_s"] / res["labelled"]["mean"]["step_s"]
    res.update(pair=[small, large], stitches=stitches, threads=args.threads, seq_len=128, batch_size=4,
               load_average=list(__import__("os").getloadavg()))
    out = RESULTS / f"train_step_profile_{args.pair}.json"
    out.write_text(json.dumps(res, indent=1))
    print(f"speedup {res['speedup']:.2f}x, max loss difference {res['max_loss_difference']:.2e}; wrote {out}")


if __name__ == "__main__":
    main()
