"""PaletteRuntime: a palette ready to serve — the anchor pair loaded once, shared LoRA merged into it,
stitching layers and stitch-specific biases per stitch — with batch generation, classification and
on-hardware latency profiling. This is the whole surface the serving layer uses.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from pydantic import Field

from .anchors import load_anchor, resolve_dtype
from .engine.pool import EnginePool
from .engine.profile import device_info, load_profile, profile_stitches, table_problem
from .errors import PaletteError
from .model import StitchedLM
from .palette import PaletteManifest, StitchEntry, load_palette, read_manifest
from .quant import DEFAULT_GROUP_SIZE, quantize_model_
from .types import MAX_TOP_LOGPROBS, SamplingParams, StitchProfile, canonical_quantize

__all__ = ["MAX_TOP_LOGPROBS", "PaletteRuntime", "SamplingParams", "StitchInfo", "StitchProfile", "stitch_infos"]

log = logging.getLogger(__name__)


class StitchInfo(StitchEntry):
    """A deployed stitch as serving sees it: the manifest row plus a comparable quality figure."""

    quality: float = Field(description="higher is better; the palette's quality metric, or size when unknown")


def stitch_infos(manifest: PaletteManifest) -> list[StitchInfo]:
    """Deployed stitches, cheapest first, each with a comparable quality figure."""
    dep = manifest.deployed()
    qm = manifest.quality_metric
    have = qm is not None and all(qm in s.metrics for s in dep)
    out = [StitchInfo(**s.model_dump(), quality=s.metrics[qm] if have else s.gflops) for s in dep]
    return sorted(out, key=lambda s: s.gflops)


class PaletteRuntime:
    def __init__(self, manifest: PaletteManifest, model: StitchedLM, device: torch.device,
                 quantize: str = "none") -> None:
        self.manifest = manifest
        self.quantize = quantize  # weight-only quantization of the anchors (stitchlib.quant)
        self.model = model
        self.device = device
        self.name = manifest.name
        self.task = manifest.task
        self.labels = manifest.labels
        self.tokenizer = model.small_anchor.tokenizer
        self.max_context = int(min(model.small_anchor.config.max_position_embeddings,
                                   model.large_anchor.config.max_position_embeddings))
        self.stitches = stitch_infos(manifest)
        self.eos_token_ids = {t for t in [self.tokenizer.eos_token_id, model.large_anchor.config.eos_token_id]
                     if isinstance(t, int)}
        self._engines = EnginePool(self)  # idle engines of `generate_steps`: caches allocated once

    @classmethod
    def load(cls, palette_dir: str | Path, *, device: str = "cpu", dtype: str = "bfloat16",
             quantize: str = "none", group_size: int | None = None, progress: bool = False) -> "PaletteRuntime":
        """quantize: "none" | "int8" | "int4" | "w4a8", or one per anchor ("small=int8,large=w4a8"): the
        anchors' decoder-block linears held as int8 / int4 (group-wise, `group_size`) codes, the LM heads
        too, AFTER the LoRA merge; stitching layers and stitch-specific biases stay exact
        (stitchlib/quant.py). Recorded in its canonical spelling (`canonical_quantize`)."""
        try:
            quantize = canonical_quantize(quantize)
        except ValueError as e:
            raise PaletteError(str(e)) from None
        manifest = read_manifest(palette_dir)
        dev = torch.device(device)
        S = load_anchor(manifest.small.source, dtype=dtype, device=dev, progress=progress)
        L = load_anchor(manifest.large.source, dtype=dtype, device=dev, progress=progress)
        manifest, tensors = load_palette(palette_dir, small_fingerprint=S.fingerprint,
                                         large_fingerprint=L.fingerprint)
        model = StitchedLM(S, L, space=manifest.space, pst=manifest.pst,
                           num_labels=len(manifest.labels or []) if manifest.task == "classify" else 0,
                           context_len=manifest.context_len)
        try:
            model.load_palette_state_dict(tensors)
        except KeyError as e:
            raise PaletteError(f"{palette_dir}: {e.args[0]}") from None
        unknown = {s.id for s in manifest.stitches} - set(model.slot)
        if unknown:
            raise PaletteError(f"{palette_dir}: manifest names stitches this anchor pair does not have: "
                               f"{sorted(unknown)}")
        model.merge_lora_()
        dropped = model.drop_zero_ssbs_()
        if dropped:
            log.info("%s: %d all-zero stitch-specific bias tables dropped (untrained PST: they add nothing)",
                     manifest.name, dropped)
        model.pst_to_(resolve_dtype(dtype))
        model.to(dev).eval()
        if quantize != "none":  # on the device: the packed int4 layouts differ between CPU and CUDA
            summary = quantize_model_(model, quantize, group_size=group_size or DEFAULT_GROUP_SIZE,
                                      progress=progress)
            log.info("quantized %s to %s: %s", manifest.name, quantize,
                     {k: f"{v['bytes_before'] / 1e6:.0f} -> {v['bytes_after'] / 1e6:.0f} MB" for k, v in summary.items()})
        return cls(manifest, model, dev, quantize)

    def stitch(self, stitch_id: str) -> StitchInfo:
        for s in self.stitches:
            if s.id == stitch_id:
                return s
        raise KeyError(f"stitch {stitch_id!r} is not deployed in palette {self.name!r}")

    # ---- generation ---------------------------------------------------------------------------
    def generate_steps(self, prompts: list[list[int]], stitch_id: str,
                       params: list[SamplingParams]) -> Iterator[list[int | None]]:
        """One yield per decode step: each row's new token, or None once that row has finished.

        `gen.send([i, ...])` instead of `next(gen)` aborts rows i, ... first: they yield None from then
        on and their cache slots are freed while the other rows go on. `gen.close()` stops everything."""
        self.stitch(stitch_id)
        if len(prompts) != len(params):
            raise ValueError("one SamplingParams per prompt")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt")
        longest = max(len(p) + sp.max_tokens for p, sp in zip(prompts, params))
        if longest > self.max_context:
            raise ValueError(f"prompt + max_tokens = {longest} exceeds the context of {self.max_context}")
        # Static-cache engine: mixed-stitch continuous batching, CUDA graphs on GPU (stitchlib.engine).
        yield from self._engines.generate_steps(prompts, stitch_id, params)

    # ---- classification -----------------------------------------------------------------------
    @torch.no_grad()
    def classify(self, texts: list[str], stitch_id: str) -> list[dict[str, float]]:
        if self.task != "classify":
            raise ValueError(f"palette {self.name!r} is a {self.task} palette, not classify")
        self.stitch(stitch_id)
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                             max_length=min(self.max_context, self.manifest.context_len), padding_side="left")
        logits = self.model.classify(enc["input_ids"].to(self.device), stitch_id,
                                     enc["attention_mask"].to(self.device))
        probs = torch.softmax(logits.float(), -1).cpu()
        return [{lab: float(p) for lab, p in zip(self.labels, row)} for row in probs]

    # ---- profiling ----------------------------------------------------------------------------
    @torch.no_grad()
    def profile(self, stitch_ids: list[str] | None = None, *, prompt_len: int = 32, decode_steps: int = 8,
                batch_sizes: tuple[int, ...] = (1,), progress: bool = False) -> dict[str, StitchProfile]:
        """Measure on this hardware: prefill seconds per prompt token and seconds per decode step
        at each batch size (median of `decode_steps` steps, after one warm-up; the stitches' steps
        interleaved)."""
        vocab = min(len(self.tokenizer), self.model.small_anchor.stats.vocab_size)
        return profile_stitches(self.model, stitch_ids or [s.id for s in self.stitches], prompt_len=prompt_len,
                                decode_steps=decode_steps, batch_sizes=tuple(batch_sizes), vocab=vocab,
                                progress=progress)

    def profile_meta(self) -> dict:
        """What a saved profile table records about where it was measured (and is checked against)."""
        return {**device_info(self.device), "dtype": str(self.model.small_anchor.dtype).removeprefix("torch."),
                "quantize": self.quantize, "palette": self.name, "small_fingerprint": self.model.small_anchor.fingerprint,
                "large_fingerprint": self.model.large_anchor.fingerprint}

    def load_profile_table(self, path: str | Path) -> dict[str, StitchProfile] | str:
        """A table written by `stitchserve profile` for this palette on this kind of hardware, or why
        it cannot be used (unreadable, another device/dtype/anchor pair, a deployed stitch missing)."""
        try:
            profiles, meta = load_profile(path)
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"cannot read profile table {path}: {type(e).__name__}: {e}"
        problem = table_problem(meta, profiles, self.profile_meta(), [s.id for s in self.stitches])
        if problem:
            return f"profile table {path}: {problem}"
        return {s.id: profiles[s.id] for s in self.stitches}
