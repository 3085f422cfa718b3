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

import torch

from .model import StitchedLM, causal_mask, positions


def fit_affine(gram: torch.Tensor, cross: torch.Tensor, rcond: float = 1e-10) -> tuple[torch.Tensor, torch.Tensor]:
    """gram: [d+1, d+1], cross: [d+1, e] (float64) -> weight [e, d], bias [e]."""
    a = torch.linalg.pinv(gram, rtol=rcond, hermitian=True) @ cross  # [d+1, e]
    return a[:-1].T.contiguous(), a[-1].contiguous()


def least_squares(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Direct form for small problems and tests: x [N, d], y [N, e] -> weight [e, d], bias [e]."""
    x1 = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64, device=x.device)], 1)
    return fit_affine(x1.T @ x1, x1.T @ y.double())


@torch.no_grad()
def calibrate_(model: StitchedLM, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
               progress: bool = True, total: int | None = None) -> dict[str, float]:
    """Fit every stitching layer of `model` in place from (input_ids [B, T], attention_mask [B, T])
    batches. Returns each stitch's relative residual ||XA - Y|| / ||Y|| on the calibration tokens."""
    from tqdm.auto import tqdm

    stitches = [s for s in model.stitches if s.kind == "stitch"]
    splits = sorted({s.split for s in stitches})
    joins = sorted({s.join for s in stitches})
    dS = model.d_small
    gram = {j: torch.zeros(dS + 1, dS + 1, dtype=torch.float64) for j in splits}
    cross = {s.id: torch.zeros(dS + 1, model.d_large, dtype=torch.float64) for s in stitches}
    yy = {s.id: 0.0 for s in stitches}
    keep_x, keep_y = set(splits), set(joins)
    n_tokens = 0
    S, L = model.S, model.L
    for ids, attn in tqdm(batches, total=total, desc="calibrating stitching layers", disable=not progress,
                          unit="batch"):
        mask, pos = causal_mask(attn, ids.shape[1]), positions(attn, ids.shape[1])
        real = attn.bool().reshape(-1)
        model.route.slots = None
        xs: dict[int, torch.Tensor] = {}
        h = S.anchor.embed(ids)
        pe = S.rope(h, pos)
        for i in range(max(splits) + 1):
            h = S.anchor.layers[i](h, attention_mask=mask, position_ids=pos, position_embeddings=pe)
            if i in keep_x:
                x = h.reshape(-1, dS)[real].float()
                xs[i] = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], 1)
        ys: dict[int, torch.Tensor] = {}
        h = L.anchor.embed(ids)
        pe = L.rope(h, pos)
        for i in range(max(joins) + 1):
            if i in keep_y:  # large's input of block i
                ys[i] = h.reshape(-1, model.d_large)[real].float()
            if i < max(joins):
                h = L.anchor.layers[i](h, attention_mask=mask, position_ids=pos, position_embeddings=pe)
        for j in splits:
            gram[j] += (xs[j].T @ xs[j]).double().cpu()
        for s in stitches:
            cross[s.id] += (xs[s.split].T @ ys[s.join]).double().cpu()
            yy[s.id] += float((ys[s.join].double() ** 2).sum())
        n_tokens += int(real.sum())
    if n_tokens == 0:
        raise ValueError("calibration saw no real tokens")
    residual = {}
    for s in stitches:
        w, b = fit_affine(gram[s.split], cross[s.id])
        model.stitching[s.id].set_affine(w, b)
        a = torch.cat([w.T, b[None]], 0)  # [dS+1, dL]
        # ||XA - Y||^2 = tr(A^T G A) - 2 tr(A^T C) + ||Y||^2, all from the streamed statistics
        err = float((a * (gram[s.split] @ a)).sum() - 2 * (a * cross[s.id]).sum() + yy[s.id])
        residual[s.id] = (max(err, 0.0) / max(yy[s.id], 1e-30)) ** 0.5
    return residual


def token_batches(tokenizer, texts: list[str], *, batch_size: int = 8, max_len: int = 128,
                  device: str | torch.device = "cpu"):
    """Right-padded (input_ids, attention_mask) batches of `texts`, in order."""
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                        max_length=max_len, padding_side="right")
        yield enc["input_ids"].to(device), enc["attention_mask"].to(device)


def default_calibration_texts(n: int = 100) -> list[str]:
    """Deterministic real text available offline: docstrings of stable standard-library objects."""
    import inspect
    import importlib

    mods = ["json", "re", "collections", "itertools", "functools", "os.path", "pathlib", "textwrap",
            "string", "math", "statistics", "datetime", "heapq", "bisect", "random", "argparse",
            "logging", "csv", "shutil", "difflib", "fractions", "decimal", "enum", "dataclasses",
            "contextlib", "operator", "copy", "pprint", "unittest"]
    texts: list[str] = []
    for name in mods:
        mod = importlib.import_module(name)
        for attr in sorted(dir(mod)):
            if attr.startswith("_"):
                continue
            doc = inspect.getdoc(getattr(mod, attr, None))
            if doc and len(doc) > 200:
                texts.append(f"{name}.{attr}: {doc[:1200]}")
    seen, out = set(), []
    for t in texts:  # the same object re-exported by two modules appears once
        if t.split(":", 1)[1] not in seen:
            seen.add(t.split(":", 1)[1])
            out.append(t)
    return out[:n]
