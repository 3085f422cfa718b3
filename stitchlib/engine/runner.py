"""The forward pass of a mixed-stitch batch over the static caches (prefill and decode alike).

Each row enters the small anchor, runs its blocks up to its own split, goes through its own
stitching layer (and stitch-specific biases), and joins the large anchor at its own block. A block
runs once for all rows that need it: the plan's group for that block (a slice of the batch when rows
are sorted by route), with `route.slots` set to those rows' PST slots so every PSTLinear adds each
row's own SSB. HF decoder layers are called as they are, with our boolean masks, the owning anchor's
rotary embeddings and the anchor's `StaticKVCache`.
"""
from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from ..model import StitchedLM, call_block
from .cache import Sel, StaticKVCache, compose
from .plan import RoutePlan


def model_lock(model: StitchedLM) -> threading.RLock:
    """The model's route lock (`RouteState.lock`): `model.route.slots` is shared state, so forwards of
    engines over the same model (e.g. concurrent `generate_steps` calls) must not interleave."""
    return model.route.lock


def call_layer(layer, x: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
    """One HF decoder block with the engine's static cache (the unit `torch.compile` wraps when
    compiling layers); the call itself is `stitchlib.model.call_block`, shared with every other path."""
    return call_block(layer, x, mask=mask, position_ids=pos, position_embeddings=(cos, sin), cache=cache)


class StitchRunner:
    def __init__(self, model: StitchedLM, small_cache: StaticKVCache | None, large_cache: StaticKVCache | None,
                 *, max_seq: int, decode_layer_fn: Callable = call_layer, prefill_layer_fn: Callable = call_layer,
                 compiled: bool = False) -> None:
        self.model = model
        self.S, self.L = model.small_anchor, model.large_anchor
        self.caches = {"small": small_cache, "large": large_cache}
        # The block call for one-token steps (compiled, or the quantized fast block) and for prefill
        # (never compiled: prompt lengths vary).
        self.decode_layer_fn, self.prefill_layer_fn = decode_layer_fn, prefill_layer_fn
        self.compiled = compiled
        self.kv_arange = torch.arange(max_seq, device=self.S.device)

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, cache_rows: Sel, plan: RoutePlan, kv_len: int,
                last: torch.Tensor | None = None) -> torch.Tensor:
        """tokens, pos: [B, T] (pos = each token's position in its row); cache_rows: the cache slots
        of the B rows; last: [B] index of the token whose logits are wanted (default T-1).
        Returns logits [B, V]. Writes K/V of every token at (its row's slot, its position)."""
        h, hl = self.hidden(tokens, pos, cache_rows, plan, kv_len)
        return self._heads(h, hl, plan, tokens.shape[0], last)

    def forward_with_rows(self, tokens: torch.Tensor, pos: torch.Tensor, cache_rows: Sel, plan: RoutePlan,
                          kv_len: int, last: torch.Tensor | None, rows: list[int]
                          ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """`forward`, plus the logits at EVERY position of the batch rows `rows`: {row: [T, V]} (prompt
        logprobs). The LM head runs on those rows' T tokens only, not on the whole batch."""
        h, hl = self.hidden(tokens, pos, cache_rows, plan, kv_len)
        out = {}
        for i in rows:
            small = self.model.stitches[plan.key[i]].kind == "small"
            anchor, x = (self.S, h) if small else (self.L, hl)
            out[i] = anchor.lm_head(anchor.norm(x[i]))  # [T, V]
        return self._heads(h, hl, plan, tokens.shape[0], last), out

    def hidden(self, tokens: torch.Tensor, pos: torch.Tensor, cache_rows: Sel, plan: RoutePlan,
               kv_len: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Every block of the batch: -> (small-anchor hidden [B, T, dS] of the rows ending there, large-anchor
        hidden [B, T, dL] of the rows ending there), before the final norm; None where no row uses that anchor."""
        B, T = tokens.shape
        mask = (self.kv_arange[:kv_len] <= pos[..., None])[:, None]  # [B, 1, T, kv_len] causal over the row
        model = self.model
        layer_fn = self.decode_layer_fn if T == 1 else self.prefill_layer_fn
        sub: dict[tuple[str, int], tuple] = {}  # (anchor, group) -> per-group inputs, built once per call

        # A compiled block specialises on storage offsets 0 and 1, so views that start later in the
        # batch (suffix rows of the large blocks) are handed over as fresh tensors instead.
        compiled = self.compiled and T == 1
        own = (lambda t: t if t.storage_offset() == 0 else t.clone()) if compiled else (lambda t: t)

        def inputs(anchor: str, g: int, pe: tuple[torch.Tensor, torch.Tensor]):
            if (anchor, g) not in sub:
                sel = plan.groups[g].sel
                full = isinstance(sel, slice) and sel.start == 0 and sel.stop == B
                sub[(anchor, g)] = (sel, full, compose(cache_rows, sel), mask if full else own(mask[sel]),
                                    pos if full else own(pos[sel]), pe[0] if full else own(pe[0][sel]),
                                    pe[1] if full else own(pe[1][sel]))
            return sub[(anchor, g)]

        def run(anchor: str, layers, cache: StaticKVCache, h: torch.Tensor, i: int, g: int, pe) -> torch.Tensor:
            sel, full, rows, m, p, cos, sin = inputs(anchor, g, pe)
            cache.bind(i, rows, p, kv_len)
            model.route.slots = plan.groups[g].slots
            y = layer_fn(layers[i], h if full else own(h[sel]), m, p, cos, sin, cache)
            if full:
                return y
            h[sel] = y
            return h

        try:
            h = self.S.embed(tokens) if plan.small_blocks else None  # [B, T, dS]
            if plan.small_blocks:
                pe = self.S.rotary(h, pos)
                for i, g in plan.small_blocks:
                    h = run("small", self.S.layers, self.caches["small"], h, i, g, pe)
            hl = None
            if plan.large_head is not None:
                hl = self.L.embed(tokens)  # [B, T, dL]; stitch rows are overwritten below
                for sid, g in plan.stitchings:
                    sel = plan.groups[g].sel
                    hl[sel] = model.stitching[sid](h[sel])
                pe = self.L.rotary(hl, pos)
                for k, g in plan.large_blocks:
                    hl = run("large", self.L.layers, self.caches["large"], hl, k, g, pe)
        finally:
            model.route.slots = None
        return h, hl

    def _heads(self, h: torch.Tensor, hl: torch.Tensor | None, plan: RoutePlan, B: int,
               last: torch.Tensor | None) -> torch.Tensor:
        """Final norm and LM head on the wanted token of every row only: [B, V]."""
        parts = [(g, x, anchor) for g, x, anchor in ((plan.small_head, h, self.S), (plan.large_head, hl, self.L))
                 if g is not None]
        out = None
        for g, x, anchor in parts:
            sel = plan.groups[g].sel
            x = x[sel]
            x = x[:, -1] if last is None else x[torch.arange(x.shape[0], device=x.device), last[sel]]
            logits = anchor.lm_head(anchor.norm(x))  # [b, V]
            if plan.groups[g].n == B:  # every row ends in this anchor
                return logits
            if out is None:
                out = logits.new_empty(B, logits.shape[-1])
            out[sel] = logits
        return out
