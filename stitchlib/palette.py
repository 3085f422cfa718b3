"""Palette files: a directory with `manifest.json` and safetensors files of the trained tensors.

    manifest.json         format version, anchors (+ weight fingerprints), task and labels, the full
                          stitch table (cost, score, deployed, metrics), PST/space/training configs,
                          and every tensor file's size and SHA-256
    adapters.safetensors  shared LoRA, stitch-specific biases, classification heads
    stitching.safetensors stitching-layer matrices, biases and their LoRA

Writing is atomic (a temp directory renamed into place), so a crash never leaves half a palette.
Loading checks the format version, checksums, tensor names/shapes and the anchors' fingerprints
and raises `PaletteError` with one clear sentence for each failure.
"""
from __future__ import annotations

import itertools
import json
import logging
import random
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field, ValidationError

from . import data as D
from . import gate as G
from .anchors import load_anchor
from .calibrate import calibrate_, default_calibration_texts, distill_stitching_, token_batches
from .errors import PaletteError
from .fileio import atomic_dir, sha256_file
from .gate import GateResult, GateRow, paired_se, screen, select_deployment
from .model import StitchedLM
from .quality import RouteNLL, chat_eval_batches, route_nll
from .pst import PSTConfig
from .space import StitchSpaceConfig

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class AnchorRef(BaseModel):
    name: str
    source: str = Field(description="what stitchlib.load_anchor is given to load it again")
    fingerprint: str
    architecture: str
    num_layers: int
    hidden_size: int
    head_dim: int
    params: int


class StitchEntry(BaseModel):
    id: str
    kind: Literal["small", "large", "stitch"]
    split: int | None
    join: int | None
    params: int
    bytes: int
    gflops: float
    score: float | None = None
    deployed: bool = False
    metrics: dict[str, float] = Field(default_factory=dict)
    # Why a stitch is not deployed; both None when deployed or when no reason was recorded (manifests
    # written before the deployment gate). Optional with defaults, so format_version stays 1.
    dropped: str | None = Field(None, description="reason code: a stitchlib.gate.DropReason, or "
                                                  "'not_selected' (adapt: not its interval's SNIP choice)")
    dropped_reason: str | None = Field(None, description="the reason as one sentence")


class FileEntry(BaseModel):
    sha256: str
    bytes: int
    tensors: int


class PromptFormat(BaseModel):
    """How chat prompts were rendered when the palette was fitted or trained; serving renders every
    chat request the same way (stitchlib.data.render_messages). A palette served with another format
    than it learnt on answers worse (benchmarks/CHAT_INIT.md, section 1: the main cause of bad stitches)."""

    template: Literal["chat", "alpaca"] = Field(description="the tokenizer's chat template, or the Alpaca prompt")
    system_prompt: str | None = Field(None, description="system message put first when the client sends none "
                                                        "(None: the template's own default, if any)")


class PaletteManifest(BaseModel):
    format_version: int
    name: str
    created: str = Field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    small: AnchorRef
    large: AnchorRef
    task: Literal["chat", "classify"]
    labels: list[str] | None = None
    context_len: int = 512
    quality_metric: str | None = Field(None, description="metrics key ranking stitches, higher is better")
    # None in palettes written before it was recorded (and in classify palettes): chat requests are
    # then rendered with the tokenizer's chat template, as they always were
    prompt_format: PromptFormat | None = None
    pst: PSTConfig = Field(default_factory=PSTConfig)
    space: StitchSpaceConfig = Field(default_factory=StitchSpaceConfig)
    stitches: list[StitchEntry]
    training: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, FileEntry] = Field(default_factory=dict)

    def deployed(self) -> list[StitchEntry]:
        return [s for s in self.stitches if s.deployed]


def split_tensors(sd: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    files: dict[str, dict[str, torch.Tensor]] = {"adapters.safetensors": {}, "stitching.safetensors": {}}
    for k, v in sd.items():
        files["stitching.safetensors" if k.startswith("stitching.") else "adapters.safetensors"][k] = \
            v.detach().contiguous().cpu()
    return {f: t for f, t in files.items() if t}


def save_palette(out_dir: str | Path, manifest: PaletteManifest, tensors: dict[str, torch.Tensor], *,
                 overwrite: bool = False, extra_files: dict[str, bytes] | None = None) -> Path:
    """Write atomically: everything goes to a sibling temp dir, which is renamed into place last."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise PaletteError(f"{out} already exists (pass overwrite to replace it)")
    with atomic_dir(out) as tmp:
        files = {}
        for fname, ts in split_tensors(tensors).items():
            save_file(ts, str(tmp / fname), metadata={"format": "stitchserve-palette"})
            files[fname] = FileEntry(sha256=sha256_file(tmp / fname), bytes=(tmp / fname).stat().st_size,
                                     tensors=len(ts))
        for fname, data in (extra_files or {}).items():
            (tmp / fname).write_bytes(data)
        m = manifest.model_copy(update={"files": files, "format_version": FORMAT_VERSION})
        (tmp / MANIFEST).write_text(m.model_dump_json(indent=2))
        for f in tmp.iterdir():
            f.chmod(0o644)
    return out


def read_manifest(palette_dir: str | Path) -> PaletteManifest:
    d = Path(palette_dir)
    if not d.is_dir():
        raise PaletteError(f"palette directory not found: {d}")
    mp = d / MANIFEST
    if not mp.is_file():
        raise PaletteError(f"{d} is not a palette: no {MANIFEST}")
    try:
        raw = json.loads(mp.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PaletteError(f"{mp}: corrupt manifest (not JSON: {e})") from None
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if version != FORMAT_VERSION:
        raise PaletteError(f"{mp}: unsupported palette format_version {version!r} "
                           f"(this stitchserve reads version {FORMAT_VERSION})")
    try:
        return PaletteManifest.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise PaletteError(f"{mp}: invalid manifest at {where}: {first['msg']}") from None


def load_palette(palette_dir: str | Path, *, small_fingerprint: str | None = None,
                 large_fingerprint: str | None = None) -> tuple[PaletteManifest, dict[str, torch.Tensor]]:
    """Validated manifest and tensors. Fingerprints, when given, must match the manifest's anchors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(palette_dir)
    m = read_manifest(d)
    for role, fp, ref in (("small", small_fingerprint, m.small), ("large", large_fingerprint, m.large)):
        if fp is not None and fp != ref.fingerprint:
            raise PaletteError(f"palette {d} was trained on {role} anchor {ref.name!r} (fingerprint "
                               f"{ref.fingerprint}) but the loaded {role} anchor has fingerprint {fp}: "
                               "different weights, refusing to combine them")
    tensors: dict[str, torch.Tensor] = {}
    for fname, entry in m.files.items():
        p = d / fname
        if not p.is_file():
            raise PaletteError(f"palette {d} is missing {fname}")
        size = p.stat().st_size
        if size != entry.bytes:
            raise PaletteError(f"{p}: truncated or altered ({size} bytes, manifest says {entry.bytes})")
        if sha256_file(p) != entry.sha256:
            raise PaletteError(f"{p}: checksum mismatch (file corrupt or altered)")
        try:
            ts = load_file(str(p))
        except (SafetensorError, OSError, ValueError) as e:
            raise PaletteError(f"{p}: unreadable safetensors file ({e})") from None
        if len(ts) != entry.tensors:
            raise PaletteError(f"{p}: holds {len(ts)} tensors, manifest says {entry.tensors}")
        tensors.update(ts)
    added = sum(t.numel() * t.element_size() for t in tensors.values())
    log.info("palette %s: %d stitches (%d deployed), %d tensors, %.1f MB added to the anchor pair",
             m.name, len(m.stitches), len(m.deployed()), len(tensors), added / 1e6)
    return m, tensors


def gate_rows(manifest: PaletteManifest, metric: str | None = None) -> list[GateRow]:
    """The manifest's stitches as gate input: cost in GFLOPs per token, quality from `metric`
    (default: the palette's quality_metric; None where a row lacks it)."""
    metric = metric or manifest.quality_metric
    return [GateRow(s.id, s.gflops, s.metrics.get(metric) if metric else None) for s in manifest.stitches]


def apply_gate(manifest: PaletteManifest, result: GateResult, *,
               unlisted: tuple[str, str] | None = None) -> PaletteManifest:
    """A copy of `manifest` whose rows follow the gate's verdict (stitchlib.gate.select_deployment):
    deployed flags, and the reason code and sentence of every dropped stitch. Rows the gate did not
    see are left as they are, or, with `unlisted=(code, sentence)`, marked not deployed for that reason."""
    rows = []
    for s in manifest.stitches:
        d = result.by_id.get(s.id)
        if d is not None:
            s = s.model_copy(update={"deployed": d.deployed, "dropped": d.reason,
                                     "dropped_reason": None if d.deployed else d.message})
        elif unlisted is not None:
            s = s.model_copy(update={"deployed": False, "dropped": unlisted[0], "dropped_reason": unlisted[1]})
        rows.append(s)
    return manifest.model_copy(update={"stitches": rows})


def anchor_ref(anchor) -> AnchorRef:
    return AnchorRef(**anchor.describe())


def build_manifest(model, *, name: str, task: Literal["chat", "classify"], labels: list[str] | None = None,
                   scores: dict[str, float] | None = None, deployed: set[str] | None = None,
                   metrics: dict[str, dict[str, float]] | None = None, quality_metric: str | None = None,
                   training: dict[str, Any] | None = None,
                   prompt_format: PromptFormat | None = None) -> PaletteManifest:
    """Manifest of a StitchedLM's palette. `deployed` defaults to every stitch. `prompt_format` (chat):
    how the palette's chat data was rendered; default: the tokenizer's chat template if it has one, else
    Alpaca, no system prompt (what stitchlib.data.encode_chat does by default)."""
    if task == "chat" and prompt_format is None:
        prompt_format = PromptFormat(template=D.prompt_template(model.small_anchor.tokenizer))
    scores, metrics = scores or {}, metrics or {}
    rows = []
    for s in model.stitches:
        c = model.cost(s)
        rows.append(StitchEntry(id=s.id, kind=s.kind, split=s.split, join=s.join, params=c.params, bytes=c.bytes,
                                gflops=round(c.gflops, 6), score=scores.get(s.id),
                                deployed=(deployed is None or s.id in deployed), metrics=metrics.get(s.id, {})))
    return PaletteManifest(format_version=FORMAT_VERSION, name=name, small=anchor_ref(model.small_anchor),
                           large=anchor_ref(model.large_anchor), task=task, labels=labels,
                           context_len=model.context_len, quality_metric=quality_metric,
                           prompt_format=prompt_format if task == "chat" else None, pst=model.pst_cfg,
                           space=model.space_cfg, stitches=rows, training=training or {})


DEFAULT_CHAT_DATA = ("pydocs", "bbcheadlines")


def chat_calibration_split(sources: tuple[str, ...] | list[str], *, n_calibration: int, n_validation: int,
                           seed: int = 0):
    """Chat examples for a least-squares palette: `n_calibration` to fit the stitching layers and
    `n_validation` held out to measure every route, drawn evenly from each source; no example is in
    both. Deterministic in the seed (stitchlib.data.split ranks examples by a hash of their content)."""
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
        recs = sorted(D.encode_chat(calib, tok, max_len), key=lambda r: len(r["input_ids"]))
        batches = [(b["input_ids"], b["attention_mask"]) for b in D.batched(recs, D.pad_token_id(tok), bs)]
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
