"""Least-squares initialisation of stitching layers (SN-Net / ESTA section 4.1).

For stitch (j, k): X1 = small's output of block j, X2 = large's input of block k (its embeddings
when k = 0), every real token flattened. With a ones column appended, A = pinv([X1, 1]) @ X2; the
first d_small rows are the weight (transposed), the last row the bias.

Activations are never stored: we stream the normal equations G_j = X^T X (shared by every stitch
with split j) and C_jk = X^T Y in float64, then A = pinv(G_j) @ C_jk, which is the same
minimum-norm solution as pinv(X) @ Y (pinv(X^T X) X^T = pinv(X)). Each batch's products are
computed in float32 (10x faster on CPU than float64; ~1e3 tokens per sum keeps the rounding at
~1e-6 relative) and accumulated, and solved, in float64.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch

from .model import KVCache, StitchedLM, causal_mask, positions, shared_prefix_len


Weighting = Literal["none", "relative"]


def fit_affine(gram: torch.Tensor, cross: torch.Tensor, rcond: float = 1e-10) -> tuple[torch.Tensor, torch.Tensor]:
    """gram: [d+1, d+1], cross: [d+1, e] (float64) -> weight [e, d], bias [e]."""
    a = torch.linalg.pinv(gram, rtol=rcond, hermitian=True) @ cross  # [d+1, e]
    return a[:-1].T.contiguous(), a[-1].contiguous()


def least_squares(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Direct form for small problems and tests: x [N, d], y [N, e] -> weight [e, d], bias [e]."""
    x1 = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64, device=x.device)], 1)
    return fit_affine(x1.T @ x1, x1.T @ y.double())


@torch.no_grad()
def calibrate_(model: StitchedLM, batches: Iterable[tuple[torch.Tensor, ...]], *,
               progress: bool = True, total: int | None = None, weighting: Weighting = "none",
               skip_first: bool = False) -> dict[str, float]:
    """Fit every stitching layer of `model` in place from (input_ids [B, T], attention_mask [B, T], ...)
    batches. Returns each stitch's relative residual ||XA - Y|| / ||Y|| on the calibration tokens
    (weighted like the fit).

    weighting="relative" weights token t by 1 / mean(y_t^2): the large block after the join reads
    RMSNorm(y), so what matters is each token's error relative to its own scale. Plain least squares
    instead spends its fit on the few tokens whose hidden state is hundreds of times larger than the
    rest (the attention-sink position and delimiter tokens carry the large model's massive
    activations), leaving the ordinary tokens the answer is made of poorly fitted. The Gram matrix then
    depends on the join, so it is kept per stitch rather than per split.
    skip_first leaves position 0 (the sink) out of the fit entirely (a diagnostic variant)."""
    from tqdm.auto import tqdm

    if weighting not in ("none", "relative"):
        raise ValueError(f"weighting must be 'none' or 'relative', got {weighting!r}")
    stitches = [s for s in model.stitches if s.kind == "stitch"]
    splits = sorted({s.split for s in stitches})
    joins = sorted({s.join for s in stitches})
    dS = model.d_small
    per_stitch = weighting != "none"
    gram = {key: torch.zeros(dS + 1, dS + 1, dtype=torch.float64)
            for key in ([s.id for s in stitches] if per_stitch else splits)}
    cross = {s.id: torch.zeros(dS + 1, model.d_large, dtype=torch.float64) for s in stitches}
    yy = {s.id: 0.0 for s in stitches}
    keep_x, keep_y = set(splits), set(joins)
    n_tokens = 0
    S, L = model.S, model.L

    def activations(ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, real: torch.Tensor,
                    kv: tuple[KVCache, KVCache] | None) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Small outputs at every split ([N, dS+1] with the ones column) and large inputs at every join
        ([N, dL]) of the real tokens of `ids`, float32; kv: the caches to attend over and extend."""
        model.route.slots = None
        xs: dict[int, torch.Tensor] = {}
        h = S.anchor.embed(ids)
        for i, h in S.blocks(h, range(max(splits) + 1), mask=mask, position_ids=pos, cache=kv[0] if kv else None):
            if i in keep_x:
                x = h.reshape(-1, dS)[real].float()
                xs[i] = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], 1)
        ys: dict[int, torch.Tensor] = {}
        h = L.anchor.embed(ids)
        if 0 in keep_y:  # large's input of block i is the output of block i - 1
            ys[0] = h.reshape(-1, model.d_large)[real].float()
        for i, h in L.blocks(h, range(max(joins)), mask=mask, position_ids=pos, cache=kv[1] if kv else None):
            if i + 1 in keep_y:
                ys[i + 1] = h.reshape(-1, model.d_large)[real].float()
        return xs, ys

    def accumulate(xs: dict[int, torch.Tensor], ys: dict[int, torch.Tensor], times: int) -> None:
        """Add these tokens' normal equations, each token counted `times` times."""
        if per_stitch:
            weights = {k: times / ys[k].pow(2).mean(-1, keepdim=True).clamp_min(1e-12) for k in joins}  # [N, 1]
            for s in stitches:
                xw = xs[s.split] * weights[s.join]
                gram[s.id] += (xw.T @ xs[s.split]).double().cpu()
                cross[s.id] += (xw.T @ ys[s.join]).double().cpu()
                yy[s.id] += float((ys[s.join].double() ** 2 * weights[s.join].double()).sum())
        else:
            for j in splits:
                gram[j] += times * (xs[j].T @ xs[j]).double().cpu()
            for s in stitches:
                cross[s.id] += times * (xs[s.split].T @ ys[s.join]).double().cpu()
                yy[s.id] += times * float((ys[s.join].double() ** 2).sum())

    for batch in tqdm(batches, total=total, desc="calibrating stitching layers", disable=not progress,
                      unit="batch"):
        ids, attn = batch[0], batch[1]
        B, T = ids.shape
        # Tokens every row shares (the chat template's header, ~a quarter of a short chat example) are
        # run once on one row and counted B times; the rest of the batch attends to their KV.
        P = shared_prefix_len(ids, attn)
        kv = None
        if P:
            kv = (KVCache(), KVCache())
            pmask, ppos = causal_mask(attn[:1, :P], P), positions(attn[:1, :P], P)
            preal = ppos[0] > 0 if skip_first else torch.ones(P, dtype=torch.bool, device=ids.device)
            accumulate(*activations(ids[:1, :P], pmask, ppos, preal, kv), times=B)
            n_tokens += B * int(preal.sum())
            kv = (kv[0].expanded(B), kv[1].expanded(B))
        mask, pos = causal_mask(attn, T - P), positions(attn, T - P)
        real = attn[:, P:].bool()
        if skip_first:
            real = real & (pos > 0)
        real = real.reshape(-1)
        accumulate(*activations(ids[:, P:], mask, pos, real, kv), times=1)
        n_tokens += int(real.sum())
    if n_tokens == 0:
        raise ValueError("calibration saw no real tokens")
    residual = {}
    for s in stitches:
        g = gram[s.id if per_stitch else s.split]
        w, b = fit_affine(g, cross[s.id])
        model.stitching[s.id].set_affine(w, b)
        a = torch.cat([w.T, b[None]], 0)  # [dS+1, dL]
        # ||XA - Y||^2 = tr(A^T G A) - 2 tr(A^T C) + ||Y||^2, all from the streamed statistics
        err = float((a * (g @ a)).sum() - 2 * (a * cross[s.id]).sum() + yy[s.id])
        residual[s.id] = (max(err, 0.0) / max(yy[s.id], 1e-30)) ** 0.5
    return residual


def token_batches(tokenizer, texts: list[str], *, batch_size: int = 8, max_len: int = 128,
                  device: str | torch.device = "cpu"):
    """Right-padded (input_ids, attention_mask) batches of `texts`, in order."""
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                        max_length=max_len, padding_side="right")
        yield enc["input_ids"].to(device), enc["attention_mask"].to(device)


def distill_stitching_(model: StitchedLM, batches: list[tuple[torch.Tensor, torch.Tensor]], stitch_ids: list[str],
                       *, steps: int = 20, lr: float = 1e-3, top_k: int = 64, progress: bool = True,
                       ) -> dict[str, dict[str, float]]:
    """Output-aware refinement of least-squares stitching layers: train each stitching layer ALONE
    (weight and bias; anchors frozen) to match the large anchor's next-token distribution over every
    real token of `batches`, KL(large || stitch) on the teacher's top-k tokens.

    Least squares matches the large model's hidden state at the join, token by token, in a metric that
    ignores what the rest of the large model does with the error; this step measures the error where it
    matters, at the output. It costs a forward and a backward of the stitch's large tail per step, so
    it is meant for a handful of candidate stitches, not the whole palette. Returns each stitch's KL
    before and after (on the same batches). Teacher targets are computed once and kept sparse."""
    from tqdm.auto import tqdm

    S, L = model.S, model.L
    dL = model.large_anchor.stats.num_layers
    stitches = [model.get(i) for i in stitch_ids]
    splits = {s.split for s in stitches}
    prepared = []
    with torch.no_grad():
        model.route.slots = None
        for ids, attn in batches:
            T = ids.shape[1]
            mask, pos = causal_mask(attn, T), positions(attn, T)
            real = attn.bool()
            h = S.anchor.embed(ids)
            pe = S.rope(h, pos)
            xs = {}
            for i, h in S.blocks(h, range(max(splits) + 1), mask=mask, position_ids=pos, position_embeddings=pe):
                if i in splits:
                    xs[i] = h
            t = model(ids, "large", attn, return_hidden=True)[real]  # [N, dL], normed
            logp = torch.log_softmax(model.large_anchor.lm_head(t).float(), -1)
            top = logp.topk(top_k, dim=-1)
            p = top.values.exp()
            prepared.append((mask, pos, real, xs, top.indices, p / p.sum(-1, keepdim=True)))

    def kl(st, w, b, item) -> torch.Tensor:
        mask, pos, real, xs, idx, p = item
        h = torch.nn.functional.linear(xs[st.split].float(), w, b).to(xs[st.split].dtype)
        h = L.run(h, st.large_blocks(dL), mask=mask, position_ids=pos, cache=None)
        logq = torch.log_softmax(model.large_anchor.lm_head(model.large_anchor.norm(h[real])).float(), -1)
        return (p * (p.clamp_min(1e-12).log() - logq.gather(-1, idx))).sum(-1).mean()

    report = {}
    bar = tqdm(total=len(stitches) * steps, desc="distilling stitching layers", unit="step", disable=not progress)
    for st in stitches:
        layer = model.stitching[st.id]
        w = layer.weight.detach().float().clone().requires_grad_(True)
        b = layer.bias.detach().float().clone().requires_grad_(True)
        with torch.no_grad():
            before = sum(float(kl(st, w, b, it)) for it in prepared) / len(prepared)
        opt = torch.optim.Adam([w, b], lr=lr)
        for step in range(steps):
            loss = kl(st, w, b, prepared[step % len(prepared)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update(1)
        with torch.no_grad():
            after = sum(float(kl(st, w, b, it)) for it in prepared) / len(prepared)
        if after < before:  # never leave a stitch worse than least squares did
            layer.set_affine(w.detach(), b.detach())
        report[st.id] = {"kl_before": before, "kl_after": after, "kept": after < before}
    bar.close()
    return report
