"""Next-token selection: greedy, temperature and top-p (nucleus), per row, reproducible under a seed.

Rows of one batch may carry different temperatures / top-p values and their own generators, so a
request's output depends only on its own seed, never on who it was batched with.
"""
from __future__ import annotations

import torch


def top_p_filter(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """probs: [B, V], top_p: [B] -> probs with the tail outside the nucleus zeroed (not renormalised).
    The most probable token is always kept."""
    sorted_p, idx = probs.sort(dim=-1, descending=True)
    cum = sorted_p.cumsum(-1)
    drop = (cum - sorted_p) > top_p.unsqueeze(-1)  # mass before this token already exceeds top_p
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(-1, idx, sorted_p)


def sample_next(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                generators: list[torch.Generator | None] | None = None) -> torch.Tensor:
    """logits: [B, V]; temperature, top_p: [B] -> token ids [B]. temperature 0 means greedy."""
    logits = logits.float()
    greedy = logits.argmax(-1)
    if bool((temperature <= 0).all()):
        return greedy
    t = temperature.clamp(min=1e-5).unsqueeze(-1)
    probs = top_p_filter(torch.softmax(logits / t, dim=-1), top_p)
    # Exponential race (argmax p / E, E ~ Exp(1)) == sampling from p, without a host sync.
    noise = torch.empty_like(probs)
    gens = generators or [None] * probs.shape[0]
    for i, g in enumerate(gens):
        noise[i].exponential_(1.0, generator=g)
    sampled = (probs / noise).argmax(-1)
    return torch.where(temperature <= 0, greedy, sampled)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g
