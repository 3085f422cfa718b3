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

import json
import logging
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field, ValidationError

from .errors import PaletteError
from .fileio import atomic_dir, sha256_file
from .gate import GateResult, GateRow
from .prompts import prompt_template
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
    chat request the same way (stitchlib.prompts.render_messages). A palette served with another format
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
    Alpaca, no system prompt (what stitchlib.prompts.encode_chat does by default)."""
    if task == "chat" and prompt_format is None:
        prompt_format = PromptFormat(template=prompt_template(model.small_anchor.tokenizer))
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
