"""Static (preallocated) KV cache of one anchor, addressed by cache slot and explicit position.

Every decoder layer some deployed stitch runs gets two buffers `[slots, H_kv, max_seq, D]`, allocated
once (zeroed: a masked key still enters SDPA's dot products, and garbage NaN would poison the row).
A cache slot is a batch row of the engine. HF attention calls `update(k, v, layer_idx)` and attends
over whatever it returns; before each block call the engine `bind`s which slots the block's rows
live in, the position each new token is written at, and how many positions to hand back
(`kv_len`: the longest row rounded up, so attention does not scan the whole buffer). Valid lengths
are the caller's mask's job, not the cache's.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

# Rows of a batch: a contiguous slice (a view, no copy) or a LongTensor of indices (gather/scatter).
Sel = slice | torch.Tensor


def compose(outer: Sel, inner: Sel) -> Sel:
    """Rows `inner` of the batch whose rows are `outer` of the cache -> cache rows."""
    if isinstance(outer, slice):
        if isinstance(inner, slice):
            return slice(outer.start + inner.start, outer.start + inner.stop)
        return inner + outer.start
    return outer[inner]


def sel_len(sel: Sel) -> int:
    return sel.stop - sel.start if isinstance(sel, slice) else int(sel.numel())


class StaticKVCache:
    """One anchor's K/V buffers; implements the `update(k, v, layer_idx)` protocol HF attention uses."""

    def __init__(self, layers: Iterable[int], *, n_layers: int, slots: int, kv_heads: int, head_dim: int,
                 max_seq: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (slots, kv_heads, max_seq, head_dim)
        used = set(layers)
        self.k: list[torch.Tensor | None] = [torch.zeros(shape, dtype=dtype, device=device) if i in used else None
                                             for i in range(n_layers)]
        self.v: list[torch.Tensor | None] = [torch.zeros(shape, dtype=dtype, device=device) if i in used else None
                                             for i in range(n_layers)]
        self.slots, self.max_seq = slots, max_seq
        self._arange = torch.arange(slots, device=device)
        # binding of the current block call
        self.rows: Sel = slice(0, 0)
        self.pos: torch.Tensor | None = None  # [b, T] position of every new token
        self.kv_len = max_seq
        self.layer = -1
        self.kb: torch.Tensor | None = None  # the bound layer's buffers
        self.vb: torch.Tensor | None = None

    @property
    def layers(self) -> list[int]:
        return [i for i, k in enumerate(self.k) if k is not None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.k, *self.v] if t is not None)

    def bind(self, layer: int, rows: Sel, pos: torch.Tensor, kv_len: int) -> None:
        if self.k[layer] is None:
            raise RuntimeError(f"layer {layer} has no cache: no stitch this engine serves runs it")
        self.layer, self.kb, self.vb = layer, self.k[layer], self.v[layer]
        self.rows, self.pos, self.kv_len = rows, pos, kv_len

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args, **kwargs):
        """k, v: [b, H_kv, T, D] for the bound rows -> (K, V) [b, H_kv, kv_len, D] of those rows.
        The buffers come from `bind`, not from `layer_idx`: an int read here would make
        torch.compile specialise (and recompile) the block call once per layer."""
        kb, vb = self.kb, self.vb
        rows, pos = self.rows, self.pos
        # Index the whole buffer (never a view of it) when writing: under torch.compile a mutated
        # view of a graph input may be written back whole, a plain index_put stays in place.
        r = self._arange[rows, None] if isinstance(rows, slice) else rows[:, None]  # [b, 1] absolute slots
        # Advanced indices around a slice put (b, T) first: the value is [b, T, H_kv, D].
        kb[r, :, pos] = k.transpose(1, 2)
        vb[r, :, pos] = v.transpose(1, 2)
        # A slice of rows reads a view (no copy); an index tensor gathers.
        return kb[rows, :, : self.kv_len], vb[rows, :, : self.kv_len]

    @torch.no_grad()
    def move_row(self, src: int, dst: int, layers: Iterable[int], length: int) -> None:
        """Copy the first `length` positions of slot `src` into slot `dst` for the given layers."""
        if length <= 0 or src == dst:
            return
        for i in layers:
            self.k[i][dst, :, :length] = self.k[i][src, :, :length]
            self.v[i][dst, :, :length] = self.v[i][src, :, :length]
