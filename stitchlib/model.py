"""StitchedLM: one weight-shared anchor pair, every stitch a route through it.

The model holds ONE copy of each anchor's modules. A stitch (j, k) is a route: small embeddings,
small blocks 0..j, stitching layer (j, k), large blocks k..end, large norm and head. HF decoder layers
are reused as they are; `AnchorAdapter` is the one place that feeds them (rotary embeddings of the
owning anchor, our boolean masks, one KV cache per anchor keyed by the layer's own `layer_idx`).

This is the reference implementation (training, evaluation, correctness). The fast serving path with
static caches and mixed-stitch batches lives in `stitchlib.engine` and is tested against this one.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .anchors import Anchor, check_pair
from .pst import PSTConfig, RouteState, StitchingLayer, inject_pst
from .sampling import make_generator, sample_next
from .space import Stitch, StitchCost, StitchSpaceConfig, enumerate_stitches, stitch_cost


class KVCache:
    """Growing per-anchor cache. HF attention calls `update(k, v, layer_idx)` and attends over what it
    returns; layers a route skips are simply never written."""

    def __init__(self) -> None:
        self.k: dict[int, torch.Tensor] = {}  # layer_idx -> [B, H_kv, T, D]
        self.v: dict[int, torch.Tensor] = {}

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx in self.k:
            k = torch.cat([self.k[layer_idx], k], dim=-2)
            v = torch.cat([self.v[layer_idx], v], dim=-2)
        self.k[layer_idx], self.v[layer_idx] = k, v
        return k, v

    def expanded(self, batch: int) -> "KVCache":
        """A new cache whose every entry is this one's single row repeated `batch` times: the KV of a
        prefix all rows share, computed once. Views, so nothing is copied until a layer appends."""
        c = KVCache()
        c.k = {i: k.expand(batch, -1, -1, -1) for i, k in self.k.items()}
        c.v = {i: v.expand(batch, -1, -1, -1) for i, v in self.v.items()}
        return c


@dataclass
class StitchCache:
    """Decoding state of one batch on one stitch: a cache per anchor plus the padding mask so far."""

    small: KVCache = field(default_factory=KVCache)
    large: KVCache = field(default_factory=KVCache)
    mask: torch.Tensor | None = None  # [B, P] 1 = real token

    def expanded(self, batch: int) -> "StitchCache":
        """This one-row cache repeated for `batch` rows (see KVCache.expanded)."""
        return StitchCache(self.small.expanded(batch), self.large.expanded(batch),
                           None if self.mask is None else self.mask.expand(batch, -1))


def causal_mask(full_mask: torch.Tensor, q_len: int) -> torch.Tensor:
    """full_mask: [B, P+T] (1 real, 0 pad) -> boolean [B, 1, T, P+T] for SDPA (True = attend).
    A query always sees itself so padded rows never become all-False (SDPA would return NaN)."""
    total = full_mask.shape[1]
    q_pos = torch.arange(total - q_len, total, device=full_mask.device)
    k_pos = torch.arange(total, device=full_mask.device)
    causal = k_pos[None, :] <= q_pos[:, None]  # [T, P+T]
    m = causal[None] & full_mask[:, None, :].bool()
    m |= (k_pos[None, :] == q_pos[:, None])[None]
    return m[:, None]


def positions(full_mask: torch.Tensor, q_len: int) -> torch.Tensor:
    """Position ids that skip left padding (as HF generate does): [B, T]."""
    return (full_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q_len:]


def shared_prefix_len(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      labels: torch.Tensor | None = None) -> int:
    """How many leading tokens every row of a right-padded batch shares: a chat template's system
    header is ~a quarter of a short chat example, and a prefix all rows share needs computing once,
    not once per row (`KVCache.expanded`). Capped so that every row keeps at least one token after it
    and, with `labels` (HF style: position t predicts labels[t + 1]), so that no labelled prediction
    comes from inside it. 0 for a single row, left padding, or nothing shared."""
    B, T = input_ids.shape
    if B < 2 or T < 2:
        return 0
    real = attention_mask.bool()
    same = (input_ids == input_ids[:1]).all(0) & real.all(0)  # [T]
    n = T if bool(same.all()) else int((~same).nonzero()[0])
    n = min(n, int(real.sum(1).min()) - 1)
    if labels is not None:
        lab = (labels[:, 1:] != -100).any(0).nonzero()  # hidden positions that predict a label
        if len(lab):
            n = min(n, int(lab[0]))
    return max(n, 0)


def call_block(layer: nn.Module, h: torch.Tensor, *, mask: torch.Tensor, position_ids: torch.Tensor,
               position_embeddings: tuple[torch.Tensor, torch.Tensor], cache: Any = None) -> torch.Tensor:
    """The one place an HF decoder layer is called (reference forward, calibration, quality, engine).
    transformers' decoder-layer signature moves between releases (docs/DESIGN_NOTES.md section 4):
    a change is made here once. h: [B, T, d] -> [B, T, d]; cache: an HF Cache or None (no cache)."""
    return layer(h, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                 use_cache=cache is not None, position_embeddings=position_embeddings)


class AnchorAdapter:
    """Runs a range of one anchor's HF decoder blocks. Owns that anchor's rotary embeddings."""

    def __init__(self, anchor: Anchor) -> None:
        self.anchor = anchor

    def rope(self, h: torch.Tensor, position_ids: torch.Tensor):
        return self.anchor.rotary(h, position_ids)  # (cos, sin), each [B, T, head_dim]

    def blocks(self, h: torch.Tensor, blocks: range, *, mask: torch.Tensor, position_ids: torch.Tensor,
               cache: KVCache | None = None, position_embeddings=None) -> Iterator[tuple[int, torch.Tensor]]:
        """(i, output of block i) for each block in turn: for callers that keep intermediate states
        (calibration, quality measurement). `position_embeddings`: reuse (cos, sin) already computed."""
        pe = position_embeddings if position_embeddings is not None else self.rope(h, position_ids)
        for i in blocks:
            h = call_block(self.anchor.layers[i], h, mask=mask, position_ids=position_ids, position_embeddings=pe,
                           cache=cache)
            yield i, h

    def run(self, h: torch.Tensor, blocks: range, *, mask: torch.Tensor, position_ids: torch.Tensor,
            cache: KVCache | None) -> torch.Tensor:
        if len(blocks) == 0:
            return h
        for _, h in self.blocks(h, blocks, mask=mask, position_ids=position_ids, cache=cache):
            pass
        return h


class StitchedLM(nn.Module):
    def __init__(self, small: Anchor, large: Anchor, *, space: StitchSpaceConfig | None = None,
                 pst: PSTConfig | None = None, num_labels: int = 0, context_len: int = 512) -> None:
        super().__init__()
        check_pair(small, large)
        self.small_anchor, self.large_anchor = small, large
        self.small, self.large = small.model, large.model  # registered: .to()/.parameters() see them
        self.S, self.L = AnchorAdapter(small), AnchorAdapter(large)
        self.space_cfg = space or StitchSpaceConfig()
        self.pst_cfg = pst or PSTConfig()
        self.context_len = context_len
        self.d_small, self.d_large = small.stats.hidden_size, large.stats.hidden_size
        self.stitches: list[Stitch] = enumerate_stitches(small.stats.num_layers, large.stats.num_layers,
                                                         self.space_cfg)
        self.slot = {s.id: i for i, s in enumerate(self.stitches)}
        self.route = RouteState()

        rank = (self.pst_cfg.stitch_lora_rank or max(1, self.d_small // 4)) if self.pst_cfg.stitch_lora else None
        self.stitching = nn.ModuleDict({
            s.id: StitchingLayer(self.d_small, self.d_large, lora_rank=rank, lora_alpha=self.pst_cfg.lora_alpha
                                 * (rank or 1) / self.pst_cfg.lora_rank, stitch_bias=self.pst_cfg.stitch_bias)
            for s in self.stitches if s.kind == "stitch"})
        n = len(self.stitches)
        self.pst_small = inject_pst(small.layers, self.route, n, self.pst_cfg)
        self.pst_large = inject_pst(large.layers, self.route, n, self.pst_cfg)
        self.num_labels = num_labels
        if num_labels:
            # Classification heads on the final hidden state at the last real token: one for routes
            # ending in the large anchor (shared by every stitch), one for the small anchor.
            self.cls_large = nn.Linear(self.d_large, num_labels)
            self.cls_small = nn.Linear(self.d_small, num_labels)
        self.stitching.to(small.device)
        for m in [*self.pst_small, *self.pst_large]:
            for name, p in m.named_parameters(recurse=False):
                p.data = p.data.to(small.device)
        if num_labels:
            self.cls_large.to(large.device)
            self.cls_small.to(small.device)

    # ---- stitch bookkeeping -------------------------------------------------------------------
    def get(self, stitch: str | Stitch) -> Stitch:
        sid = stitch.id if isinstance(stitch, Stitch) else stitch
        try:
            return self.stitches[self.slot[sid]]
        except KeyError:
            raise KeyError(f"unknown stitch {sid!r}; known: {', '.join(self.slot)}") from None

    def cost(self, stitch: str | Stitch, *, dtype: str = "bfloat16") -> StitchCost:
        return stitch_cost(self.get(stitch), self.small_anchor.stats, self.large_anchor.stats,
                           context_len=self.context_len, dtype=dtype)

    def new_cache(self) -> StitchCache:
        return StitchCache()

    # ---- forward ------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, stitch: str | Stitch, attention_mask: torch.Tensor | None = None,
                cache: StitchCache | None = None, *, return_hidden: bool = False) -> torch.Tensor:
        """input_ids: [B, T] -> logits [B, T, V] (or final normed hidden [B, T, d] with return_hidden)."""
        st = self.get(stitch)
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.long, device=input_ids.device)
        full = attention_mask if cache is None or cache.mask is None else torch.cat([cache.mask, attention_mask], 1)
        if cache is not None:
            cache.mask = full
        mask, pos = causal_mask(full, T), positions(full, T)
        self.route.slots = self.slot[st.id]
        try:
            if st.uses_small:
                h = self.S.anchor.embed(input_ids)  # [B, T, dS]
                h = self.S.run(h, st.small_blocks(0), mask=mask, position_ids=pos,
                               cache=cache.small if cache else None)
                if st.kind == "small":
                    h = self.S.anchor.norm(h)
                    return h if return_hidden else self.S.anchor.lm_head(h)
                h = self.stitching[st.id](h)  # [B, T, dL]
            else:
                h = self.L.anchor.embed(input_ids)
            h = self.L.run(h, st.large_blocks(self.large_anchor.stats.num_layers), mask=mask, position_ids=pos,
                           cache=cache.large if cache else None)
            h = self.L.anchor.norm(h)
            return h if return_hidden else self.L.anchor.lm_head(h)
        finally:
            self.route.slots = None

    def classify(self, input_ids: torch.Tensor, stitch: str | Stitch,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """-> class logits [B, C] from the final hidden state at each row's last real token."""
        if not self.num_labels:
            raise RuntimeError("this StitchedLM has no classification head (num_labels=0)")
        st = self.get(stitch)
        h = self(input_ids, st, attention_mask, return_hidden=True)  # [B, T, d]
        T = input_ids.shape[1]
        if attention_mask is None:
            last = torch.full((input_ids.shape[0],), T - 1, device=h.device)
        else:  # index of the last 1 works for left and right padding alike
            last = T - 1 - attention_mask.flip(-1).long().argmax(-1)
        h_last = h[torch.arange(h.shape[0], device=h.device), last]
        head = self.cls_small if st.kind == "small" else self.cls_large
        return head(h_last.to(head.weight.dtype))

    # ---- decoding (reference) -----------------------------------------------------------------
    @torch.no_grad()
    def stream(self, input_ids: torch.Tensor, stitch: str | Stitch, attention_mask: torch.Tensor | None = None, *,
               max_new_tokens: int = 16, temperature: float | torch.Tensor = 0.0,
               top_p: float | torch.Tensor = 1.0, seeds: list[int | None] | None = None) -> Iterator[torch.Tensor]:
        """Yield the next token of every row ([B]) per step; prefill then one-token decode steps."""
        B = input_ids.shape[0]
        dev = input_ids.device
        temp = torch.as_tensor(temperature, dtype=torch.float32, device=dev).expand(B)
        tp = torch.as_tensor(top_p, dtype=torch.float32, device=dev).expand(B)
        gens = [make_generator(s, dev) for s in (seeds or [None] * B)]
        cache = self.new_cache()
        logits = self(input_ids, stitch, attention_mask, cache)[:, -1]
        for step in range(max_new_tokens):
            tok = sample_next(logits, temp, tp, gens)
            yield tok
            if step + 1 < max_new_tokens:
                logits = self(tok[:, None], stitch, torch.ones(B, 1, dtype=torch.long, device=dev), cache)[:, -1]

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, stitch: str | Stitch, attention_mask: torch.Tensor | None = None,
                 **kw) -> torch.Tensor:
        """-> new tokens [B, max_new_tokens] (no early stop: callers cut at EOS)."""
        return torch.stack(list(self.stream(input_ids, stitch, attention_mask, **kw)), dim=1)

    # ---- parameters ---------------------------------------------------------------------------
    def pst_modules(self) -> list[nn.Module]:
        return [*self.pst_small, *self.pst_large, *self.stitching.values()]

    def palette_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything a palette stores: trainable tensors plus the calibrated stitching matrices."""
        sd = {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}
        for sid, layer in self.stitching.items():
            sd[f"stitching.{sid}.weight"] = layer.weight.detach()
            sd[f"stitching.{sid}.bias"] = layer.bias.detach()
        return sd

    @torch.no_grad()
    def load_palette_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        own = dict(self.named_parameters())
        expected = set(self.palette_state_dict())
        missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
        if missing or unexpected:
            raise KeyError(f"palette tensors do not match this model: missing {missing[:5]}"
                           f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                           f"{'...' if len(unexpected) > 5 else ''}")
        for name, t in sd.items():
            p = own[name]
            if p.shape != t.shape:
                raise KeyError(f"palette tensor {name} has shape {tuple(t.shape)}, model expects {tuple(p.shape)}")
            p.copy_(t.to(p.dtype))

    @torch.no_grad()
    def merge_lora_(self) -> None:
        """Merge shared LoRA into the anchor weights and stitching LoRA into each stitching matrix."""
        for m in self.pst_modules():
            m.merge_lora_()

    @torch.no_grad()
    def drop_zero_ssbs_(self) -> int:
        """For serving: drop every stitch-specific bias table that is all zeros (a palette whose PST was
        never trained, e.g. least-squares only, stores them so). Adding one changes no value (x + 0 == x),
        but costs an index_select and an add per attention projection, block and step: ~1.7 ms of a
        ~30 ms batch-1 step of the Qwen pair (benchmarks/QUANT.md 3.6). Returns how many were dropped.
        Not for training or saving: the tables are the palette's parameters."""
        n = 0
        for m in self.pst_modules():
            if m.ssb is not None and not bool(m.ssb.any()):
                m.ssb = None
                n += 1
        return n

    def pst_to_(self, dtype: torch.dtype) -> None:
        """Cast PST tensors (kept fp32 for training) to the serving dtype."""
        for m in self.pst_modules():
            for _, p in m.named_parameters(recurse=False):
                p.data = p.data.to(dtype)

    def trainable_report(self) -> dict[str, int]:
        """Trainable parameters of PST (counting only SSB rows some route actually uses) against
        fully fine-tuning every stitch path (both anchors + every stitching layer)."""
        dS_layers, dL_layers = self.small_anchor.stats.num_layers, self.large_anchor.stats.num_layers
        shared = sum(m.lora_a.numel() + m.lora_b.numel() for m in [*self.pst_small, *self.pst_large]
                     if m.lora_a is not None)
        stitch_lora = sum(m.lora_a.numel() + m.lora_b.numel() for m in self.stitching.values() if m.lora_a is not None)
        ssb = 0
        if self.pst_cfg.stitch_bias:
            per_small = sum(m.out_features for m in self.pst_small) // max(1, dS_layers)
            per_large = sum(m.out_features for m in self.pst_large) // max(1, dL_layers)
            for s in self.stitches:
                ssb += per_small * len(s.small_blocks(dS_layers)) + per_large * len(s.large_blocks(dL_layers))
                ssb += self.d_large if s.kind == "stitch" else 0
        heads = sum(p.numel() for n, p in self.named_parameters() if n.startswith("cls_"))
        full = (self.small_anchor.stats.total_params + self.large_anchor.stats.total_params
                + sum(m.weight.numel() + m.bias.numel() for m in self.stitching.values()))
        return {"shared_lora": shared, "stitch_lora": stitch_lora, "stitch_bias": ssb, "heads": heads,
                "pst_total": shared + stitch_lora + ssb + heads, "full_finetune": full + heads}


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy; labels [B, T] with -100 on positions that carry no loss."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
