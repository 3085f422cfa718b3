"""Route plans: which rows of a mixed-stitch batch run which block.

Rows are kept sorted by stitch slot (the palette order: small anchor, stitches from the latest join
to the earliest, large anchor). With unequal depths a stitch's split never grows along that order
and its join never grows either, so the rows that need small block i are a prefix of the batch and
the rows that need large block k a suffix: every selection is a contiguous slice (a view). Other
spaces (equal depths with kernel > 1) may give scattered rows; those become index tensors.

A plan depends only on the tuple of row slots, so it is built once per batch composition and reused
every step (and by the CUDA graph captured for it).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..space import Stitch
from .cache import Sel


@dataclass
class RowGroup:
    """A set of batch rows that run some block together, and the PST slot(s) they route through."""

    sel: Sel
    slots: torch.Tensor  # [n] PST slot of every row (a tensor even when uniform: no int to specialise on)
    n: int


@dataclass
class RoutePlan:
    key: tuple[int, ...]  # stitch slot of every row, in row order
    groups: list[RowGroup] = field(default_factory=list)
    small_blocks: list[tuple[int, int]] = field(default_factory=list)  # (small block, group)
    stitchings: list[tuple[str, int]] = field(default_factory=list)  # (stitch id, group)
    large_blocks: list[tuple[int, int]] = field(default_factory=list)  # (large block, group)
    small_head: int | None = None  # rows on the small anchor
    large_head: int | None = None  # rows ending in the large anchor

    @property
    def n(self) -> int:
        return len(self.key)


def _select(rows: list[int], device: torch.device) -> Sel:
    if rows == list(range(rows[0], rows[-1] + 1)):
        return slice(rows[0], rows[-1] + 1)
    return torch.tensor(rows, dtype=torch.long, device=device)


def build_plan(key: tuple[int, ...], stitches: list[Stitch], d_small: int, d_large: int,
               device: torch.device) -> RoutePlan:
    """key: the stitch slot of every row (indices into `stitches`)."""
    plan = RoutePlan(key=key)
    memo: dict[tuple[int, ...], int] = {}
    row_st = [stitches[s] for s in key]

    def group(rows: list[int]) -> int | None:
        if not rows:
            return None
        t = tuple(rows)
        if t not in memo:
            sl = torch.tensor([key[r] for r in rows], dtype=torch.long, device=device)
            memo[t] = len(plan.groups)
            plan.groups.append(RowGroup(sel=_select(rows, device), slots=sl, n=len(rows)))
        return memo[t]

    splits = [st.split for st in row_st if st.uses_small]
    for i in range(max(splits) + 1 if splits else 0):
        g = group([r for r, st in enumerate(row_st) if st.uses_small and st.split >= i])
        plan.small_blocks.append((i, g))
    for sid in dict.fromkeys(st.id for st in row_st if st.kind == "stitch"):
        plan.stitchings.append((sid, group([r for r, st in enumerate(row_st) if st.id == sid])))
    joins = [st.join for st in row_st if st.uses_large]
    for k in range(min(joins) if joins else d_large, d_large):
        plan.large_blocks.append((k, group([r for r, st in enumerate(row_st) if st.uses_large and st.join <= k])))
    plan.small_head = group([r for r, st in enumerate(row_st) if st.kind == "small"])
    plan.large_head = group([r for r, st in enumerate(row_st) if st.uses_large])
    return plan
