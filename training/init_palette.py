"""`stitchserve init-palette`: a least-squares-only palette of an anchor pair, measured and gated.

The starting point before `stitchserve adapt`: stitching layers fitted by least squares on chat data,
every route's response NLL measured on held-out examples, and only the stitches that earn their cost
deployed. It lives in training/ because it reads data sets (training.datasets: the built-in chat sets,
files, splits); stitchlib keeps what it is built from: the palette format (stitchlib.palette), the
calibration maths (stitchlib.calibrate), quality measurement (stitchlib.quality) and the gate
(stitchlib.gate). Its subcommand is in training.commands.
"""
from __future__ import annotations

import itertools
import logging
import random
import time
from pathlib import Path
from typing import Any, Literal

import torch

from stitchlib import gate as G
from stitchlib.anchors import load_anchor
from stitchlib.calibrate import calibrate_, distill_stitching_, token_batches
from stitchlib.errors import PaletteError
from stitchlib.gate import GateRow, paired_se, screen, select_deployment
from stitchlib.model import StitchedLM
from stitchlib.palette import apply_gate, build_manifest, save_palette
from stitchlib.prompts import batched, encode_chat, pad_token_id
from stitchlib.quality import RouteNLL, chat_eval_batches, route_nll
from training import datasets as D
from training.pydocs import default_calibration_texts

log = logging.getLogger(__name__)


DEFAULT_CHAT_DATA = ("pydocs", "bbcheadlines")


def chat_calibration_split(sources: tuple[str, ...] | list[str], *, n_calibration: int, n_validation: int,
                           seed: int = 0):
    """Chat examples for a least-squares palette: `n_calibration` to fit the stitching layers and
    `n_validation` held out to measure every route, drawn evenly from each source; no example is in
    both. Deterministic in the seed (training.datasets.split ranks examples by a hash of their content)."""
    if not sources:
        raise PaletteError("a chat palette needs at least one calibration data source")
    calib, held_by_source = [], []
    for i, src in enumerate(sources):
        exs = D.load_chat(src)
        want_val = n_validation // len(sources) + (1 if i < n_validation % len(sources) else 0)
        if want_val >= len(exs):
            raise PaletteError(f"{src}: {len(exs)} examples cannot hold out {want_val} for validation")
        pool, held = D.split(exs, val_size=want_val, seed=seed, source=src) if want_val else (exs, [])
        want = n_calibration // len(sources) + (1 if i < n_calibration % len(sources) else 0)
        rng = random.Random(f"stitchserve-calibration:{seed}:{src}")
        calib += [pool[j] for j in sorted(rng.sample(range(len(pool)), min(want, len(pool))))]
        held_by_source.append(held)
    random.Random(f"stitchserve-calibration:{seed}").shuffle(calib)
    # round-robin over the sources, so that any first slice (the screening stage) mixes them evenly
    val = [ex for group in itertools.zip_longest(*held_by_source) for ex in group if ex is not None]
    return calib, val


def init_palette(out_dir: str | Path, *, small: str = "tiny-small", large: str = "tiny-large",
                 task: Literal["chat", "classify"] = "chat", labels: list[str] | None = None, seed: int = 0,
                 calibration_texts: list[str] | None = None, n_calibration: int = 400, max_len: int = 128,
                 dtype: str = "bfloat16", overwrite: bool = False, progress: bool = True,
                 chat_data: tuple[str, ...] | list[str] = DEFAULT_CHAT_DATA, weighting: str = "relative",
                 n_validation: int = 120, n_screen: int = 24, min_gain: float = 0.0, confidence: float = 2.0,
                 distill_steps: int = 0, distill_lr: float = 5e-4) -> Path:
    """A least-squares-only palette (PST untrained: LoRA and SSB zero, classification heads
    seeded-random), gated by measured quality. The starting point before `stitchserve adapt`.

    chat: the stitching layers are fitted on `n_calibration` examples of `chat_data` rendered with the
    chat template, exactly as serving renders prompts, with relative (after-norm) weighting
    (stitchlib.calibrate; benchmarks/CHAT_INIT.md measures why both matter). Then every route's
    response NLL is measured on `n_validation` examples held out from calibration, and only stitches
    between the anchors and on the quality-vs-cost front, each by more than `confidence` standard
    errors of its paired difference on those examples, are deployed (stitchlib.gate); the manifest
    records each one's quality (`neg_loss`, the router's ranking) and why the others were dropped.
    The measurement is a race, so that a split large enough to tell neighbouring stitches apart stays
    affordable: every route on the first `n_screen` examples, then slice after slice of `n_screen`
    more, each only on the routes not clearly worse than the small anchor on all they have seen so far
    (stitchlib.gate.screen; `n_screen=0`: all routes on all examples). `n_validation=0` skips the measurement: every stitch is deployed and serving ranks them by size
    (the tests' synthetic pair, whose random weights have no quality to measure).
    classify: fitted on `calibration_texts` (default: standard-library docstrings); its heads are
    untrained, so there is no quality to gate on and every stitch is deployed.
    distill_steps > 0 adds the output-aware step (stitchlib.calibrate.distill_stitching_) to every
    stitch: that many steps of 4 calibration sequences each, one pass over fresh data (more passes
    overfit; benchmarks/CHAT_INIT.md). It costs a forward and backward of each stitch's large tail per
    step (~27 min for 24 steps on the Qwen pair, 2 CPU cores), so it is off by default."""

    if task == "classify" and (not labels or len(labels) < 2):
        raise PaletteError("a classify palette needs at least two labels")
    if n_validation < 0 or n_calibration < 1:
        raise PaletteError("n_calibration must be >= 1 and n_validation >= 0")
    if Path(out_dir).exists() and not overwrite:  # before minutes of calibration, not after (save_palette)
        raise PaletteError(f"{out_dir} already exists (pass overwrite to replace it)")
    S = load_anchor(small, dtype=dtype, progress=progress)
    L = load_anchor(large, dtype=dtype, progress=progress)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = StitchedLM(S, L, num_labels=len(labels) if task == "classify" else 0)
    tok = S.tokenizer
    bs = 8
    val_examples: list = []
    if task == "chat" and calibration_texts is None:
        calib, val_examples = chat_calibration_split(list(chat_data), n_calibration=n_calibration,
                                                     n_validation=n_validation, seed=seed)
        # by length: the fit is a sum over tokens, so order is free, and like lengths together leave
        # ~1% padding instead of ~44% (the forward passes are most of calibration's time)
        recs = sorted(encode_chat(calib, tok, max_len), key=lambda r: len(r["input_ids"]))
        batches = [(b["input_ids"], b["attention_mask"]) for b in batched(recs, pad_token_id(tok), bs)]
        calibration = {"data": list(chat_data), "template": "chat", "sequences": len(recs)}
    else:
        texts = calibration_texts or default_calibration_texts(n_calibration)
        batches = list(token_batches(tok, texts, batch_size=bs, max_len=max_len))
        calibration = {"data": "texts" if calibration_texts else "stdlib-docstrings", "template": "none",
                       "sequences": len(texts)}
    calibration.update(tokens=int(sum(int(a.sum()) for _, a in batches)), max_len=max_len, weighting=weighting,
                       seed=seed)
    residual = calibrate_(model, batches, progress=progress, total=len(batches), weighting=weighting)
    metrics = {sid: {"calibration_residual": r} for sid, r in residual.items()}
    if distill_steps > 0:
        quads = [(i[j:j + 4], a[j:j + 4]) for i, a in batches for j in range(0, i.shape[0], 4)][:distill_steps]
        kl = distill_stitching_(model, quads, [s.id for s in model.stitches if s.kind == "stitch"],
                                steps=distill_steps, lr=distill_lr, progress=progress)
        for sid, k in kl.items():
            metrics[sid].update(distill_kl_before=k["kl_before"], distill_kl_after=k["kl_after"])
        calibration.update(distill_steps=distill_steps, distill_lr=distill_lr, distill_sequences=4 * len(quads))
    training: dict[str, Any] = {"kind": "least-squares-only", "calibration": calibration,
                                "calibration_sequences": calibration["sequences"], "max_len": max_len, "seed": seed}
    quality_metric = None
    if val_examples:
        def rows(res: dict) -> list[GateRow]:  # route results -> gate input, with per-example samples
            return [GateRow(i, model.cost(model.get(i)).gflops, -r.loss, tuple(r.samples())) for i, r in res.items()]

        t0 = time.time()
        # Sequential looks (a race): every route on the first `n_screen` examples, then each further
        # slice of `n_screen` only on the routes not clearly worse than the small anchor so far
        # (gate.screen on everything each survivor has seen); deployment is decided on the whole split.
        n1 = n_screen if 0 < n_screen < len(val_examples) else len(val_examples)
        looks = [*range(n1, len(val_examples), n1), len(val_examples)]
        measured: dict[str, RouteNLL] = {}
        seen: dict[str, int] = {}  # examples each route was measured on
        small_at: dict[int, GateRow] = {}  # the small anchor's row after each look (screened routes' SE)
        keep, screened, response_tokens, lo = [s.id for s in model.stitches], [], 0, 0
        for k, hi in enumerate(looks):
            batches = chat_eval_batches(tok, val_examples[lo:hi], batch_size=bs)
            response_tokens += sum(int((b[2][:, 1:] != -100).sum()) for b in batches)
            if progress and len(looks) > 1:
                log.info("validation look %d/%d: %d routes on examples %d-%d", k + 1, len(looks), len(keep), lo, hi)
            for i, r in route_nll(model, batches, keep, progress=progress).items():
                measured[i], seen[i] = (measured[i] + r if i in measured else r), hi
            small_at[hi] = rows({"small": measured["small"]})[0]
            if hi < len(val_examples):
                keep, drops = screen(rows({i: measured[i] for i in keep}), z=G.SCREEN_Z)
                screened += drops
            lo = hi
        gate_input = rows({i: measured[i] for i in keep})
        for row in rows(measured):
            metrics.setdefault(row.id, {}).update(measured[row.id].metrics(), eval_examples=float(seen[row.id]))
            if row.id != "small":  # how noisy its difference to the small anchor is, on the examples it saw
                metrics[row.id]["neg_loss_se_vs_small"] = paired_se(row, small_at[seen[row.id]])
        quality_metric = "neg_loss"
        training["validation"] = {"data": list(chat_data), "examples": len(val_examples), "screen_examples": n1,
                                  "looks": looks, "screened_out": [d.id for d in screened],
                                  "response_tokens": response_tokens,
                                  "metric": quality_metric, "seconds": round(time.time() - t0, 1)}
    else:
        training["gate"] = {"off": "no validation measurement (n_validation=0)" if task == "chat" else
                            "classification heads are untrained: no quality to measure"}
    name = Path(out_dir).name
    manifest = build_manifest(model, name=name, task=task, labels=labels, metrics=metrics,
                              quality_metric=quality_metric, training=training)
    if quality_metric:
        gate = select_deployment(gate_input, min_gain=min_gain, z=confidence, prior=screened)
        manifest = apply_gate(manifest, gate)
        training["gate"] = {"min_gain": min_gain, "confidence_z": confidence, "deployed": gate.deployed_ids(),
                            "anchors_inverted": gate.anchors_inverted}
        manifest = manifest.model_copy(update={"training": training})
        for d in gate.dropped():
            log.info("not deploying %s: %s", d.id, d.message)
    return save_palette(out_dir, manifest, model.palette_state_dict(), overwrite=overwrite)
