"""Per-stitch quality on held-out chat data: response-token NLL of every route, fast enough to gate a
whole palette on a CPU.

A palette's promise is "more budget, better answer", so every stitch is measured before it is
deployed (`stitchlib.gate`). Measuring 29 routes one full forward at a time costs 29 passes; here one
batch costs one pass of each anchor plus, per stitch, only its large tail:

- with no stitch-specific biases on the small blocks (an untrained or LoRA-only palette), every
  stitch with split j starts from the same small hidden state, so the small anchor runs once and its
  block outputs are kept;
- the LM head (151,936 x 1,536 on the Qwen pair, a third of a 0.5B model's weights) runs only on the
  positions that carry a label (the response), not on the prompt;
- the tokens every row of a batch shares (the chat template's system header: 24 of a ~97-token chat
  example on the Qwen pair) run once per route on one row, and the rows attend to their KV.

With trained small-block SSBs the prefix differs per stitch and each route runs whole (same numbers,
slower). Both paths give exactly what `StitchedLM.forward` gives (tested).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .model import KVCache, StitchedLM, causal_mask, positions, shared_prefix_len
from .prompts import batched, encode_chat, pad_token_id

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # input_ids [B, T], attention_mask [B, T], labels [B, T]


@dataclass
class RouteNLL:
    """Token-summed negative log-likelihood of one route; `loss` is the per-token mean. `per_example`
    keeps each example's (nll sum, tokens), in batch order, for paired comparisons between routes."""

    nll: float = 0.0
    tokens: int = 0
    per_example: list[tuple[float, int]] = field(default_factory=list)

    @property
    def loss(self) -> float:
        return self.nll / max(self.tokens, 1)

    def samples(self) -> list[float]:
        """Per-example quality on the neg_loss scale: mean(samples) == -loss exactly (each example's
        NLL sum scaled by examples/tokens), so the paired differences of two routes' samples give the
        standard error of the difference of their token-weighted losses."""
        n = len(self.per_example)
        return [-nll * n / max(self.tokens, 1) for nll, _ in self.per_example]

    def __add__(self, other: "RouteNLL") -> "RouteNLL":
        """The same route over two sets of examples (this one's first): a second validation stage."""
        return RouteNLL(self.nll + other.nll, self.tokens + other.tokens, self.per_example + other.per_example)

    def metrics(self) -> dict[str, float]:
        return {"loss": self.loss, "neg_loss": -self.loss, "perplexity": math.exp(min(self.loss, 50.0)),
                "eval_tokens": float(self.tokens)}


def _small_prefix_shared(model: StitchedLM) -> bool:
    """True when no stitch has its own bias on a small block, so all routes share the small prefix."""
    return all(m.ssb is None or not bool(m.ssb.detach().abs().amax() > 0) for m in model.pst_small)


def _row_nll(logits: torch.Tensor, tgt: torch.Tensor, rows: torch.Tensor, B: int) -> torch.Tensor:
    """logits [N, V], tgt [N], rows [N] (batch row of each position) -> NLL summed per row [B]."""
    per_tok = F.cross_entropy(logits.float(), tgt, reduction="none")
    return torch.zeros(B, dtype=torch.float64).index_add_(0, rows.cpu(), per_tok.double().cpu())


def _head_nll(model: StitchedLM, h: torch.Tensor, anchor: str, sel: torch.Tensor, tgt: torch.Tensor,
              rows: torch.Tensor) -> torch.Tensor:
    """h: [B, T, d] last hidden (before the final norm); sel: [B, T-1] positions with a label."""
    a = model.small_anchor if anchor == "small" else model.large_anchor
    hs = a.norm(h[:, :-1][sel])  # [N, d]
    return _row_nll(a.lm_head(hs), tgt, rows, h.shape[0])


@torch.no_grad()
def route_nll(model: StitchedLM, batches: Iterable[Batch], stitch_ids: Sequence[str] | None = None, *,
              progress: bool = False) -> dict[str, RouteNLL]:
    """Response NLL of every route in `stitch_ids` (default: all) over `batches`. Labels use -100 on
    positions without a target (prompt, padding), HF style: position t predicts labels[t + 1]."""
    from tqdm.auto import tqdm

    todo = [model.get(i) for i in (stitch_ids or [s.id for s in model.stitches])]
    out = {s.id: RouteNLL() for s in todo}
    shared = _small_prefix_shared(model)
    splits = {s.split for s in todo if s.kind == "stitch"}
    S, L = model.S, model.L
    dS, dL = model.small_anchor.stats.num_layers, model.large_anchor.stats.num_layers
    batches = list(batches)
    bar = tqdm(total=len(batches) * len(todo), desc="measuring stitch quality", unit="route", disable=not progress)
    try:
        for ids, attn, labels in batches:
            B, T = ids.shape
            # Tokens every row shares (the chat template's header) run once per route, on one row, and
            # the rest of the batch attends to their KV; only the rest is computed per row.
            P = shared_prefix_len(ids, attn, labels)
            sel = labels[:, P + 1:] != -100  # [B, T-P-1] suffix positions with a label (none before P)
            if not bool(sel.any()):
                bar.update(len(todo))
                continue
            tgt = labels[:, P + 1:][sel]
            rows = sel.nonzero()[:, 0]  # [N] batch row of each labelled position
            row_tokens = sel.sum(1).tolist()
            mask, pos = causal_mask(attn, T - P), positions(attn, T - P)  # suffix queries, all keys
            pmask, ppos = causal_mask(attn[:1, :P], P), positions(attn[:1, :P], P)
            small_out: dict[int, torch.Tensor] = {}  # suffix output of small block i
            small_pre: dict[int, torch.Tensor] = {}  # prefix output of small block i (one row)
            if shared and (splits or any(s.kind == "small" for s in todo)):
                model.route.slots = None
                last = dS - 1 if any(s.kind == "small" for s in todo) else max(splits)
                keep = splits | {dS - 1}
                pre_kv = KVCache() if P else None
                if P:
                    h = S.anchor.embed(ids[:1, :P])
                    for i, h in S.blocks(h, range(last + 1), mask=pmask, position_ids=ppos, cache=pre_kv):
                        if i in keep:
                            small_pre[i] = h
                h = S.anchor.embed(ids[:, P:])  # [B, T-P, dS]
                for i, h in S.blocks(h, range(last + 1), mask=mask, position_ids=pos,
                                     cache=pre_kv.expanded(B) if P else None):
                    if i in keep:
                        small_out[i] = h
            for st in todo:
                model.route.slots = model.slot[st.id]
                if not shared or st.kind == "large":
                    cache = None
                    if P:
                        cache = model.new_cache()
                        model(ids[:1, :P], st, attn[:1, :P], cache, return_hidden=True)
                        cache = cache.expanded(B)
                    h = model(ids[:, P:], st, attn[:, P:], cache, return_hidden=True)  # already normed
                    a = model.small_anchor if st.kind == "small" else model.large_anchor
                    nll = _row_nll(a.lm_head(h[:, :-1][sel]), tgt, rows, B)
                elif st.kind == "small":
                    nll = _head_nll(model, small_out[dS - 1], "small", sel, tgt, rows)
                else:
                    blocks = st.large_blocks(dL)
                    pre_kv = KVCache() if P else None
                    if P:
                        L.run(model.stitching[st.id](small_pre[st.split]), blocks, mask=pmask, position_ids=ppos,
                              cache=pre_kv)
                    h = model.stitching[st.id](small_out[st.split])  # [B, T-P, dL]
                    h = L.run(h, blocks, mask=mask, position_ids=pos, cache=pre_kv.expanded(B) if P else None)
                    nll = _head_nll(model, h, "large", sel, tgt, rows)
                r = out[st.id]
                r.nll += float(nll.sum())
                r.tokens += sum(row_tokens)
                r.per_example += [(float(x), k) for x, k in zip(nll.tolist(), row_tokens) if k]
                bar.update(1)
    finally:
        model.route.slots = None
        bar.close()
    return out


def chat_eval_batches(tokenizer, examples, *, max_len: int = 160, batch_size: int = 8,
                      device: str | torch.device = "cpu") -> list[Batch]:
    """Chat examples rendered exactly as training and serving render them (the tokenizer's chat
    template), labels on the response only, right-padded batches sorted by length (less padding)."""
    recs = sorted(encode_chat(examples, tokenizer, max_len), key=lambda r: len(r["input_ids"]))
    return [(b["input_ids"].to(device), b["attention_mask"].to(device), b["labels"].to(device))
            for b in batched(recs, pad_token_id(tokenizer), batch_size)]
