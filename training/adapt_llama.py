"""`stitchserve adapt` / `python training/adapt_llama.py`: one-stage PST + SNIP adaptation of an
anchor pair into a palette.

    python training/adapt_llama.py --small tiny-small --large tiny-large --task classify \\
        --data bbcnews --out palettes/bbc --steps 200

Pipeline: check the options and the output paths -> load and split the data -> load and pair the
anchors -> least-squares calibration of every stitching layer -> the training loop
(training/trainer.py) -> evaluate every stitch on the validation split -> deploy the top-SNIP-score
stitch of each cost interval plus both anchors, replacing one that validates below the small anchor
by its interval's next score (--deploy-tries) -> gate those picks (stitchlib.gate: keep only stitches
strictly between the anchors and on the Pareto front of quality vs cost) -> write the palette
atomically with report.json and pareto.png inside; the manifest says why each stitch is not
deployed. Bad input stops before anything is written, with one line on stderr.
SIGINT/SIGTERM checkpoint and stop; the same command with --resume continues to the same palette.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import signal
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stitchlib.errors import PaletteError, StitchError

from training.config import TrainConfig, TrainingError, make_config

log = logging.getLogger("training.adapt")


# Stitches the gate never saw: SNIP deployment considers one stitch per cost interval.
NOT_SELECTED = ("not_selected", "not its cost interval's validated top SNIP score (adapt deploys at most one "
                                "stitch per interval)")


@dataclass
class AdaptResult:
    palette: Path
    manifest: Any  # stitchlib.palette.PaletteManifest
    report: dict[str, Any]


def preflight(cfg: TrainConfig) -> None:
    """Refuse before loading anything: an existing palette, a stale or missing checkpoint."""
    out, ckpt = cfg.out_path, cfg.checkpoint_path
    if out.exists() and not cfg.overwrite:
        raise PaletteError(f"{out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise PaletteError(f"{out} exists and is not a directory")
    if ckpt.exists() and not (cfg.resume or cfg.overwrite):
        raise TrainingError(f"an interrupted run left a checkpoint at {ckpt}; pass --resume to continue it "
                            "or --overwrite to start over")
    if cfg.resume and not ckpt.is_file():
        raise TrainingError(f"--resume: no checkpoint at {ckpt}")
    if ckpt.parent.resolve() == out.resolve():
        raise TrainingError("--checkpoint-dir must not be the palette directory")


def adapt(cfg: TrainConfig, stop=None) -> AdaptResult:
    from stitchlib.palette import apply_gate, build_manifest, save_palette

    from training.task_data import load_examples

    preflight(cfg)
    examples = load_examples(cfg)  # bad data fails here, before the heavy imports and the anchors
    from training import report as R
    from training.trainer import Trainer, quality_metric

    trainer = Trainer(cfg, stop)
    trainer.setup(examples)
    if cfg.resume:
        trainer.restore()
        log.info("resuming at step %d of %d", trainer.step, trainer.total)
    elif cfg.checkpoint_path.exists():  # --overwrite: the old run's checkpoint is void
        cfg.checkpoint_path.unlink()
    res = trainer.run()

    model, sampler, metrics = res.model, res.sampler, res.metrics
    quality = quality_metric(cfg.task)
    gate = res.gate
    deployed = set(gate.deployed_ids())
    rejected = {model.stitches[s].id for s in res.deployment.rejected}
    dropped = {d.id: d for d in gate.dropped()}
    scores = {model.stitches[s].id: q for s, q in enumerate(sampler.scores) if q is not None}
    rows = []
    for slot, s in enumerate(model.stitches):
        c = model.cost(s)
        why = dropped[s.id].reason if s.id in dropped else None if s.id in deployed else NOT_SELECTED[0]
        rows.append({"id": s.id, "kind": s.kind, "split": s.split, "join": s.join, "gflops": c.gflops,
                     "params": c.params, "interval": sampler.interval[slot], "score": scores.get(s.id),
                     "times_sampled": sampler.counts[slot], "deployed": s.id in deployed,
                     "rejected": s.id in rejected,
                     "dropped": why,
                     "calibration_residual": res.calibration.get(s.id), "metrics": metrics.get(s.id, {})})
    intervals = R.interval_analysis(model, sampler, metrics, quality)
    summary = R.summarize(rows, metrics, sorted(deployed, key=lambda i: model.slot[i]), quality)
    summary["top_score_is_best_eval"] = f"{sum(r['match'] for r in intervals)}/{len(intervals)}" if intervals else None
    summary["rejected_top_score"] = sorted(rejected, key=lambda i: model.slot[i])
    summary["deployed"] = sorted(deployed, key=lambda i: model.slot[i])
    summary["dropped_by_gate"] = [{"id": d.id, "reason": d.reason, "why": d.message} for d in gate.dropped()]
    summary["not_selected"] = [r["id"] for r in rows if r["dropped"] == NOT_SELECTED[0]]
    summary["anchors_inverted"] = gate.anchors_inverted
    # intervals whose tries all failed validation, plus those whose validated pick the gate dropped
    served = {sampler.interval[model.slot[i]] for i in deployed if model.get(i).kind == "stitch"}
    gated = {sampler.interval[model.slot[i]] for i in dropped if model.slot[i] in res.deployment.slots}
    summary["intervals_without_route"] = sorted(set(res.deployment.dropped_intervals) | (gated - served))
    trainable = model.trainable_report()
    training = {
        "kind": "pst-snip" if cfg.adapt_anchors_first == 0 else "adapt-then-stitch",
        "config": cfg.model_dump(mode="json"),
        "total_steps": res.total_steps, "lr_warmup_steps": cfg.lr_warmup(res.total_steps),
        "sampler_warmup_steps": sampler.warmup_steps if cfg.sampling == "snip" else None,
        "train_examples": len(res.encoded.train), "val_examples": len(res.encoded.val),
        "truncated_examples": res.encoded.n_truncated, "resumed_from_step": res.resumed_from,
        "trainable": trainable, "summary": summary, "timings": res.timings,
    }
    report = {"palette": cfg.palette_name, "task": cfg.task, "small": cfg.small, "large": cfg.large,
              "summary": summary, "intervals": intervals, "stitches": rows, "trainable": trainable,
              "timings": res.timings, "config": cfg.model_dump(mode="json"), "history": res.history}
    title = (f"{cfg.palette_name}: {cfg.small} -> {cfg.large}, {cfg.task}, {res.total_steps} steps, "
             f"{cfg.sampling}{'' if cfg.stitch_bias else ', no SSB'}")
    extra = {"report.json": R.report_json(report), "pareto.png": R.pareto_png(rows, quality, title)}
    carried = {sid: {**metrics.get(sid, {}), **({"calibration_residual": r} if (r := res.calibration.get(sid))
                                                is not None else {})} for sid in model.slot}
    manifest = build_manifest(model, name=cfg.palette_name, task=cfg.task, labels=res.labels, scores=scores,
                              deployed=deployed, metrics=carried, quality_metric=quality, training=training)
    manifest = apply_gate(manifest, gate, unlisted=NOT_SELECTED)
    out = save_palette(cfg.out_path, manifest, model.palette_state_dict(), overwrite=cfg.overwrite,
                       extra_files=extra)
    if not cfg.keep_checkpoint:
        if cfg.checkpoint_dir:  # the user's directory: remove only our file
            cfg.checkpoint_path.unlink(missing_ok=True)
        else:
            shutil.rmtree(cfg.checkpoint_path.parent, ignore_errors=True)
    return AdaptResult(palette=out, manifest=manifest, report=report)


# ---- CLI ----------------------------------------------------------------------------------------
REQUIRED = ("data", "out")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field; defaults and help come from the config, so they never drift.
    Unset flags are left out of the namespace (SUPPRESS) and the config's defaults apply."""
    for name, f in TrainConfig.model_fields.items():
        ann = f.annotation
        args = typing.get_args(ann)
        if typing.get_origin(ann) in (typing.Union, types.UnionType):  # X | None
            ann = next(a for a in args if a is not type(None))
            args = typing.get_args(ann)
        help_ = (f.description or "").replace("%", "%%")
        kw: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS}
        if name in REQUIRED:
            kw["required"] = True
        elif f.default not in (None, False):
            help_ += f" (default: {f.default})"
        if ann is bool:  # on-by-default switches get a --no- form; off-by-default ones are plain flags
            kw["action"] = argparse.BooleanOptionalAction if f.default else "store_true"
        elif typing.get_origin(ann) is typing.Literal:
            kw["choices"] = list(args)
        else:
            kw["type"] = ann
            kw["metavar"] = {int: "N", float: "X", str: "PATH" if name in ("out", "checkpoint_dir", "calibration_from")
                             else "SRC" if name in ("small", "large", "data") else "STR"}[ann]
        p.add_argument(_flag(name), help=help_, **kw)


def _one_line_errors(p: argparse.ArgumentParser) -> None:
    def error(message: str):
        print(f"{p.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)
    p.error = error  # argparse would print the whole usage block first


def run(args: argparse.Namespace) -> int:
    from training.trainer import Interrupted, StopFlag

    cfg = make_config(**{k: v for k, v in vars(args).items() if k in TrainConfig.model_fields})
    with StopFlag().installed() as stop:
        try:
            res = adapt(cfg, stop)
        except Interrupted as e:
            name = signal.Signals(e.signum).name
            where = (f"checkpoint at step {e.step}: {e.checkpoint}; rerun the same command with --resume"
                     if e.checkpoint else "no checkpoint was written yet")
            print(f"adapt: interrupted by {name}; {where}", file=sys.stderr)
            return 128 + e.signum
    for line in summary_lines(res):
        print(line)
    return 0  # the palette was written, whatever was deployed


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def summary_lines(res: AdaptResult) -> list[str]:
    """What a user needs after a run, for every outcome: which stitches were deployed, which were
    not and why (validation, the gate, SNIP selection), intervals left without a route."""
    s, m = res.report["summary"], res.manifest
    qm = s.get("quality_metric") or m.quality_metric or "quality"
    dep = m.deployed()
    n_stitches = sum(st.kind == "stitch" for st in dep)
    match = s.get("top_score_is_best_eval")
    out = [f"wrote palette {res.palette} ({len(m.stitches)} stitches, {len(dep)} deployed"
           + (f", top score = best evaluated in {match} intervals)" if match else ")"),
           f"  {qm} (higher is better): small {_num(s.get('small'))}, large {_num(s.get('large'))}, "
           + (f"deployed stitches mean {_num(s.get('mean_deployed_stitches'))}" if n_stitches else
              "no stitch deployed: only the two anchors serve (every budget gets the small or the large anchor)")]
    if s.get("anchors_inverted"):
        out.append("  warning: the large anchor validates no better than the small one, so no stitch can lie "
                   "between them; train longer or check the validation split")
    out.append("  deployed:")
    for st in dep:
        out.append(f"    {st.id:<10} {st.gflops:9.4f} GFLOPs  {qm} {_num(st.metrics.get(qm))}")
    gated = [st for st in m.stitches if not st.deployed and st.dropped and st.dropped != NOT_SELECTED[0]]
    if gated:
        out.append("  not deployed (evaluated for deployment):")
        for st in gated:
            out.append(f"    {st.id:<10} {st.dropped:<13} {st.dropped_reason or ''}")
    others = s.get("not_selected") or []
    if others:
        out.append(f"  not selected (not their interval's validated top SNIP score): {', '.join(others)}")
    if s.get("intervals_without_route"):
        out.append(f"  cost intervals without a deployed stitch: {s['intervals_without_route']} "
                   "(their budgets get the next cheaper route)")
    return out


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("adapt", help="adapt an anchor pair into a palette (PST + SNIP, one stage)",
                              description=__doc__.split("\n\n")[0])
    add_arguments(p)
    _one_line_errors(p)
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="adapt_llama.py", description=__doc__.split("\n\n")[0])
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    add_arguments(p)
    _one_line_errors(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except StitchError as e:
        print(f"adapt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C: the last checkpoint stays
        print("adapt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
