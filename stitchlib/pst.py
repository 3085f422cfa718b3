"""PST: parameter-efficient stitch fine-tuning (ESTA section 4.1).

Three trainable parts, each switchable for the ablations:
  (a) stitch-agnostic LoRA shared by all stitches on q/k/v/o of both anchors,
  (b) LoRA on every stitching layer (rank d_small // 4 by default),
  (c) stitch-specific biases (SSB): per stitch, a bias vector added to the output of each attention
      linear it traverses and to its stitching layer:  y = W x + b + b_s.
Frozen: every anchor weight and the least-squares stitching matrices. After training LoRA merges
into weights (`merge_lora_`); SSBs cannot merge into shared weights and stay per-stitch vectors,
selected at run time by the current route's slot ids.
"""
from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import nn


class PSTConfig(BaseModel):
    shared_lora: bool = Field(True, description="stitch-agnostic LoRA on q/k/v/o of both anchors")
    lora_rank: int = Field(16, ge=1)
    lora_alpha: float = Field(32.0, gt=0)
    stitch_lora: bool = Field(True, description="LoRA on every stitching layer")
    stitch_lora_rank: int | None = Field(None, ge=1, description="default d_small // 4")
    stitch_bias: bool = Field(True, description="stitch-specific biases (SSB)")
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


class RouteState:
    """Which stitch slot(s) the current forward runs, shared by every PST module of one model.
    `slots` is an int (whole batch on one stitch) or a LongTensor [B] (one slot per row). `lock`
    guards it: forwards of several engines over the same model (concurrent `generate_steps` calls)
    must not interleave, since each sets `slots` before its forward."""

    def __init__(self) -> None:
        self.slots: int | torch.Tensor | None = None
        self.lock = threading.RLock()


def _bias_for(table: torch.Tensor, slots, like: torch.Tensor) -> torch.Tensor:
    # table: [n_slots, out]; result broadcasts against like: [B, T, out]
    if isinstance(slots, int):
        return table[slots].to(like.dtype)
    return table.index_select(0, slots).to(like.dtype).unsqueeze(-2)  # [B, 1, out]


class LoRAMixin:
    """LoRA update x -> (x A^T) B^T * alpha/r, A Gaussian-ish, B zero (update starts at 0)."""

    def _init_lora(self, in_f: int, out_f: int, rank: int, alpha: float) -> None:
        self.lora_a = nn.Parameter(torch.empty(rank, in_f))  # [r, in]
        self.lora_b = nn.Parameter(torch.zeros(out_f, rank))  # [out, r]
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scaling = alpha / rank

    def _lora(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype)) * self.scaling

    def lora_delta(self) -> torch.Tensor:
        """The dense weight update B A * scaling, in float32: [out, in]."""
        return (self.lora_b.float() @ self.lora_a.float()) * self.scaling


class PSTLinear(LoRAMixin, nn.Module):
    """Wraps a frozen linear (float or bitsandbytes) of an anchor's attention."""

    def __init__(self, base: nn.Module, route: RouteState, n_slots: int, *, lora_rank: int | None,
                 lora_alpha: float, stitch_bias: bool) -> None:
        super().__init__()
        self.base = base
        self.route = route
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_a = self.lora_b = None
        if lora_rank:
            self._init_lora(self.in_features, self.out_features, lora_rank, lora_alpha)
        self.ssb = nn.Parameter(torch.zeros(n_slots, self.out_features)) if stitch_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, in]
        y = self.base(x)
        if self.lora_a is not None:
            y = y + self._lora(x)
        if self.ssb is not None and self.route.slots is not None:
            y = y + _bias_for(self.ssb, self.route.slots, y)
        return y

    @torch.no_grad()
    def merge_lora_(self) -> None:
        if self.lora_a is None:
            return
        if type(self.base) is not nn.Linear:
            raise TypeError("LoRA merge needs float base weights; load the anchors unquantized, merge, "
                            "then quantize")
        w = self.base.weight
        w.copy_((w.float() + self.lora_delta()).to(w.dtype))
        self.lora_a = self.lora_b = None


class StitchingLayer(LoRAMixin, nn.Module):
    """Linear(d_small, d_large) with bias, frozen after least-squares init, plus its own LoRA and its
    stitch-specific bias (one stitch per stitching layer, so the SSB is a single vector)."""

    def __init__(self, d_small: int, d_large: int, *, lora_rank: int | None, lora_alpha: float,
                 stitch_bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d_large, d_small), requires_grad=False)  # [dL, dS]
        self.bias = nn.Parameter(torch.zeros(d_large), requires_grad=False)
        with torch.no_grad():  # identity-like start until calibrated
            n = min(d_small, d_large)
            self.weight[:n, :n] = torch.eye(n)
        self.lora_a = self.lora_b = None
        if lora_rank:
            self._init_lora(d_small, d_large, lora_rank, lora_alpha)
        self.ssb = nn.Parameter(torch.zeros(d_large)) if stitch_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, dS] -> [B, T, dL]
        y = F.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))
        if self.lora_a is not None:
            y = y + self._lora(x)
        if self.ssb is not None:
            y = y + self.ssb.to(y.dtype)
        return y

    @torch.no_grad()
    def set_affine(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        self.weight.copy_(weight.to(self.weight.dtype))
        self.bias.copy_(bias.to(self.bias.dtype))

    @torch.no_grad()
    def merge_lora_(self) -> None:
        if self.lora_a is None:
            return
        self.weight.copy_((self.weight.float() + self.lora_delta()).to(self.weight.dtype))
        self.lora_a = self.lora_b = None


def inject_pst(layers: nn.ModuleList, route: RouteState, n_slots: int, cfg: PSTConfig) -> list[PSTLinear]:
    """Replace the target attention projections of every block by PSTLinear wrappers (in place)."""
    wrapped = []
    if not (cfg.shared_lora or cfg.stitch_bias):
        return wrapped
    for block in layers:
        attn = block.self_attn
        for name in cfg.targets:
            base = getattr(attn, name)
            m = PSTLinear(base, route, n_slots, lora_rank=cfg.lora_rank if cfg.shared_lora else None,
                          lora_alpha=cfg.lora_alpha, stitch_bias=cfg.stitch_bias)
            setattr(attn, name, m)
            wrapped.append(m)
    return wrapped
