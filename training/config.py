"""TrainConfig: the one typed configuration of an adaptation run.

The CLI builds it (every flag is a field, `--lora-rank` <-> `lora_rank`, defaults live here only),
the trainer reads it, and the palette manifest stores it under `training`. Derived values (the
number of optimizer steps, warm-up lengths) depend on the data size, so they are computed by
methods that take it, never written back into the config.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from stitchlib.errors import StitchError


class TrainingError(StitchError):
    """A training run cannot start or continue (bad options, checkpoint mismatch, dead gradients)."""


# Fields that change how a run executes but not what it computes: they may differ on --resume and
# stay out of the checkpoint's identity.
RUNTIME_FIELDS = frozenset({"resume", "overwrite", "progress", "checkpoint_every", "checkpoint_dir",
                            "keep_checkpoint", "deploy_tries", "deploy"})  # deploy*: chosen after training


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # ---- what to adapt, on what, into where -------------------------------------------------
    small: str = Field("qwen2.5-coder-0.5b", description="small anchor: built-in name, HF directory or .gguf file")
    large: str = Field("qwen2.5-coder-1.5b", description="large anchor (the teacher): same kinds of source")
    task: Literal["chat", "classify"] = Field("chat", description="chat: next-token loss on the response; "
                                              "classify: a class head on the last real token")
    data: str = Field(..., description="a .json/.jsonl file, or a built-in set (chat: pydocs, bbcheadlines; "
                                       "classify: bbcnews); chat takes several, comma-separated, mixed evenly")
    out: str = Field(..., description="palette directory to write (must not exist unless --overwrite)")
    name: str | None = Field(None, description="palette name (default: the --out directory's name)")

    # ---- data ---------------------------------------------------------------------------------
    seq_len: int = Field(256, ge=8, le=32768, description="tokens per training sequence (longer ones are cut)")
    eval_size: int = Field(100, ge=1, description="validation examples held out and used to evaluate every stitch")
    max_train_examples: int | None = Field(None, ge=1, description="use a seeded random subset of the "
                                           "training split (benchmarks on a small budget)")
    calib_size: int = Field(100, ge=1, description="training sequences for the least-squares calibration")
    gate_confidence: float = Field(2.0, ge=0, description="chat: a deployed stitch must beat the small anchor and "
                                   "every cheaper deployed route by more than this many standard errors of the "
                                   "paired per-example difference on the validation split (0: any gain)")
    calib_weighting: Literal["relative", "none"] = Field(
        "relative", description="least-squares token weighting: relative = error relative to each token's own "
                                "scale (what the large block reads after its norm; benchmarks/CHAT_INIT.md), "
                                "none = plain least squares")
    calibration_from: str | None = Field(None, description="take the least-squares stitching layers from this "
                                         "palette (same anchors; e.g. `stitchserve init-palette` output) instead "
                                         "of calibrating")

    # ---- schedule -----------------------------------------------------------------------------
    steps: int | None = Field(None, ge=1, description="optimizer steps (default: from --epochs)")
    epochs: float | None = Field(None, gt=0, description="passes over the training split (default 1 when "
                                 "--steps is not given)")
    batch_size: int = Field(4, ge=1, description="sequences per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(2e-4, gt=0, le=1.0, description="peak AdamW learning rate")
    warmup_steps: int | None = Field(None, ge=0, description="linear LR warm-up steps (default 5% of steps), "
                                     "then cosine decay")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final LR as a fraction of --lr")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay, applied to LoRA matrices only")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping (0 = off)")

    # ---- PST ----------------------------------------------------------------------------------
    lora_rank: int = Field(16, ge=1, description="rank of the shared LoRA on q/k/v/o of both anchors")
    lora_alpha: float = Field(32.0, gt=0, description="LoRA alpha (scaling alpha/rank)")
    shared_lora: bool = Field(True, description="stitch-agnostic LoRA on the anchors' attention")
    stitch_lora: bool = Field(True, description="LoRA on every stitching layer")
    stitch_lora_rank: int | None = Field(None, ge=1, description="stitching-layer LoRA rank (default d_small // 4)")
    stitch_bias: bool = Field(True, description="stitch-specific bias terms (SSB)")

    # ---- sampling and distillation ------------------------------------------------------------
    sampling: Literal["snip", "uniform"] = Field("snip", description="snip: importance sampling per cost "
                                                 "interval; uniform: SN-Net's (scores still tracked)")
    eta: float = Field(0.9, ge=0, lt=1, description="EMA momentum of the SNIP scores")
    n_intervals: int = Field(6, ge=1, description="cost intervals; one deployed stitch each")
    deploy_tries: int = Field(3, ge=0, description="a deployed stitch that validates below the small anchor "
                              "is replaced by the next SNIP score of its interval, up to this many per "
                              "interval (then the interval gets no route); 0: top score unchecked, as ESTA")
    deploy: Literal["snip", "pareto"] = Field("snip", description="snip: ESTA's rule, each cost interval's top "
                                              "SNIP score (checked against the small anchor), then the gate; "
                                              "pareto: the gate over every evaluated stitch (needs --eval-stitches "
                                              "all), so every stitch between the anchors and on the measured "
                                              "quality-vs-cost front is deployed")
    snip_warmup_steps: int | None = Field(None, ge=0, description="uniform-sampling steps before SNIP "
                                          "sampling starts (default 20% of the stitching steps)")
    distill: bool = Field(True, description="inplace distillation: the stitch also learns the large "
                          "anchor's hard labels")
    distill_weight: float = Field(0.5, ge=0, le=1, description="weight of the teacher-label loss "
                                  "(1 - weight on the true labels)")
    adapt_anchors_first: int = Field(0, ge=0, description="two-stage ablation: this many steps adapt only "
                                     "the two anchors, then stitching layers are calibrated and stitches trained")

    # ---- system -------------------------------------------------------------------------------
    quantization: Literal["none", "8bit", "4bit"] = Field("none", description="frozen anchor weights "
                                                          "(bitsandbytes; 8bit on CPU, see docs/DESIGN_NOTES.md)")
    dtype: Literal["bfloat16", "float32"] = Field("bfloat16", description="anchor dtype and autocast dtype "
                                                  "(PST tensors are always float32)")
    device: str = Field("cpu", description="torch device")
    seed: int = Field(0, ge=0, description="seeds the PST init, data order, split and sampler")
    eval_batch_size: int = Field(8, ge=1, description="batch size of the final evaluation")
    eval_stitches: Literal["all", "deployed"] = Field("all", description="evaluate every stitch (Pareto plot, "
                                                      "interval analysis) or only the deployed ones (cheaper)")
    checkpoint_every: int = Field(50, ge=0, description="steps between checkpoints (0: only on SIGINT/SIGTERM)")
    checkpoint_dir: str | None = Field(None, description="default: <out>.ckpt next to the palette")
    keep_checkpoint: bool = Field(False, description="keep the checkpoint after the palette is written")
    resume: bool = Field(False, description="continue from the checkpoint of an interrupted run")
    overwrite: bool = Field(False, description="replace an existing palette / discard an old checkpoint")
    progress: bool = Field(True, description="progress bars on stderr")

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give --steps or --epochs, not both")
        if self.quantization != "none" and self.dtype == "float32":
            raise ValueError("quantized anchors compute in bfloat16: use --dtype bfloat16 with --quantization")
        if self.calibration_from and self.adapt_anchors_first:
            raise ValueError("--adapt-anchors-first calibrates on the adapted anchors; it cannot take "
                             "--calibration-from")
        if self.deploy == "pareto" and self.eval_stitches != "all":
            raise ValueError("--deploy pareto chooses among every evaluated stitch: it needs --eval-stitches all")
        if self.resume and self.overwrite:
            raise ValueError("--resume continues a run and --overwrite starts over: give one of them")
        return self

    # ---- derived values -----------------------------------------------------------------------
    @property
    def out_path(self) -> Path:
        return Path(self.out).expanduser()

    @property
    def checkpoint_path(self) -> Path:
        d = Path(self.checkpoint_dir).expanduser() if self.checkpoint_dir else \
            self.out_path.with_name(self.out_path.name + ".ckpt")
        return d / "last.pt"

    @property
    def palette_name(self) -> str:
        return self.name or self.out_path.name

    def total_steps(self, n_train: int) -> int:
        if self.steps is not None:
            return self.steps
        per_step = self.batch_size * self.grad_accum
        return max(1, math.ceil((self.epochs or 1.0) * n_train / per_step))

    def lr_warmup(self, total: int) -> int:
        return self.warmup_steps if self.warmup_steps is not None else max(1, round(0.05 * total))

    def sampler_warmup(self, total: int) -> int:
        stitching = total - self.adapt_anchors_first
        return self.snip_warmup_steps if self.snip_warmup_steps is not None else max(1, round(0.2 * stitching))

    def identity(self) -> dict[str, Any]:
        """What a checkpoint must agree on to be resumed by this config."""
        return {k: v for k, v in self.model_dump().items() if k not in RUNTIME_FIELDS}


def make_config(**fields: Any) -> TrainConfig:
    """TrainConfig from CLI-style fields; a validation failure becomes one TrainingError line that
    names the flag."""
    try:
        return TrainConfig(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(x) for x in err["loc"]]
        msg = err["msg"].removeprefix("Value error, ")
        if loc:
            flag = "--" + loc[0].replace("_", "-")
            got = err.get("input")
            raise TrainingError(f"{flag}: {msg} (got {got!r})") from None
        raise TrainingError(msg) from None
