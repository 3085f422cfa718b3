"""The stitch space (SN-Net rules) and each stitch's analytic cost.

A stitch (j, k) runs the small anchor's embeddings and blocks 0..j, a stitching layer, then the
large anchor's blocks k..end, final norm and head. Both anchors are stitches too ("small": all small
blocks + small head; "large": all of the large model). Ids are stable strings: "small", "large",
"s{j}-l{k}"; the order of `enumerate_stitches` (cheapest first) is the slot order used for
stitch-specific biases, so it must never depend on anything but the two depths and the config.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field

from .anchors import Anchor, AnchorStats

BYTES_PER_PARAM = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0}


class StitchSpaceConfig(BaseModel):
    kernel: int = Field(1, ge=1, description="window of consecutive block ids (equal depths only)")
    stride: int = Field(1, ge=1, description="how far the window slides (equal depths only)")


@dataclass(frozen=True)
class Stitch:
    id: str
    kind: Literal["small", "large", "stitch"]
    split: int | None  # last small block run (inclusive); None for the large anchor
    join: int | None  # first large block run; None for the small anchor

    @property
    def uses_small(self) -> bool:
        return self.kind != "large"

    @property
    def uses_large(self) -> bool:
        return self.kind != "small"

    def small_blocks(self, d_small: int) -> range:
        return range(0, self.split + 1) if self.uses_small else range(0)

    def large_blocks(self, d_large: int) -> range:
        return range(self.join, d_large) if self.uses_large else range(0)


def nearest_map(d_small: int, d_large: int) -> list[int]:
    """Nearest-neighbour interpolation of arange(d_small) onto d_large positions (as
    F.interpolate(mode="nearest") does): large block k corresponds to small block floor(k*dS/dL)."""
    return [(k * d_small) // d_large for k in range(d_large)]


def stitch_positions(d_small: int, d_large: int, cfg: StitchSpaceConfig | None = None) -> list[tuple[int, int]]:
    """(j, k) pairs: small output of block j feeds large block k."""
    cfg = cfg or StitchSpaceConfig()
    if d_small > d_large:
        raise ValueError(f"d_small ({d_small}) must be <= d_large ({d_large})")
    if d_small < d_large:
        if (cfg.kernel, cfg.stride) != (1, 1):
            raise ValueError("kernel/stride apply to equal depths; unequal depths use the nearest-neighbour map")
        mapped = nearest_map(d_small, d_large)
        return [(j, k) for k, j in enumerate(mapped) if j < k]
    # Equal depths: every ordered pair within each window of `kernel` consecutive ids.
    seen: list[tuple[int, int]] = []
    for start in range(0, max(1, d_small - cfg.kernel + 1), cfg.stride):
        window = range(start, min(start + cfg.kernel, d_small))
        for j in window:
            for k in window:
                if (j, k) not in seen:
                    seen.append((j, k))
    return seen


def enumerate_stitches(d_small: int, d_large: int, cfg: StitchSpaceConfig | None = None) -> list[Stitch]:
    """Small anchor, stitches from cheapest to dearest (later join = fewer large blocks), large anchor."""
    pos = sorted(stitch_positions(d_small, d_large, cfg), key=lambda jk: (-jk[1], jk[0]))
    return ([Stitch("small", "small", d_small - 1, None)]
            + [Stitch(f"s{j}-l{k}", "stitch", j, k) for j, k in pos]
            + [Stitch("large", "large", None, 0)])


class StitchCost(BaseModel):
    params: int
    bytes: int
    flops_per_token: float
    context_len: int

    @property
    def gflops(self) -> float:
        return self.flops_per_token / 1e9


def _attn_flops(s: AnchorStats, context_len: int) -> float:
    # QK^T and AV for one query token against `context_len` keys: 2 matmuls x 2 FLOPs/MAC.
    return 4.0 * s.num_heads * s.head_dim * context_len


def stitch_parts(stitch: Stitch, small: AnchorStats, large: AnchorStats) -> dict[str, int]:
    """Parameters of each weight part `stitch` runs, by a name that is the same for every stitch
    sharing that part ("small.embed", "small.block3", "small.head" (final norm + LM head),
    "stitch.s2-l5" (its stitching layer), "large.embed", "large.block7", "large.head").
    Summed: the stitch's parameter count; the union over several stitches: what a mixed batch of
    them runs once for all its rows."""
    parts: dict[str, int] = {}
    if stitch.uses_small:
        parts["small.embed"] = small.embed_params
        parts.update({f"small.block{i}": small.block_params[i] for i in stitch.small_blocks(small.num_layers)})
    if stitch.kind == "small":
        parts["small.head"] = small.norm_params + small.head_params
    if stitch.kind == "large":
        parts["large.embed"] = large.embed_params
    if stitch.kind == "stitch":
        parts[f"stitch.{stitch.id}"] = small.hidden_size * large.hidden_size + large.hidden_size
    if stitch.uses_large:
        parts.update({f"large.block{i}": large.block_params[i] for i in stitch.large_blocks(large.num_layers)})
        parts["large.head"] = large.norm_params + large.head_params
    return parts


def stitch_cost(stitch: Stitch, small: AnchorStats, large: AnchorStats, *, context_len: int = 512,
                dtype: str = "bfloat16") -> StitchCost:
    """Parameters, weight bytes and forward FLOPs per token at `context_len`, counted analytically
    (matmuls 2 FLOPs per weight, attention included; embeddings are lookups, norms negligible)."""
    params = sum(stitch_parts(stitch, small, large).values())
    flops = 0.0
    if stitch.uses_small:
        flops += sum(2.0 * small.block_linear_params[i] + _attn_flops(small, context_len)
                     for i in stitch.small_blocks(small.num_layers))
    if stitch.kind == "small":
        flops += 2.0 * small.head_params
    if stitch.kind == "stitch":
        flops += 2.0 * small.hidden_size * large.hidden_size
    if stitch.uses_large:
        flops += sum(2.0 * large.block_linear_params[i] + _attn_flops(large, context_len)
                     for i in stitch.large_blocks(large.num_layers))
        flops += 2.0 * large.head_params
    return StitchCost(params=params, bytes=int(params * BYTES_PER_PARAM[dtype]), flops_per_token=flops,
                      context_len=context_len)


def stitch_table(small: Anchor, large: Anchor, cfg: StitchSpaceConfig | None = None, *,
                 context_len: int = 512, dtype: str = "bfloat16") -> list[dict]:
    """The palette space a user sees before training: one row per stitch, cheapest first."""
    rows = []
    for s in enumerate_stitches(small.stats.num_layers, large.stats.num_layers, cfg):
        c = stitch_cost(s, small.stats, large.stats, context_len=context_len, dtype=dtype)
        rows.append({"id": s.id, "kind": s.kind, "split": s.split, "join": s.join, "params": c.params,
                     "gflops": round(c.gflops, 6), "bytes": c.bytes, "context_len": context_len})
    return rows
