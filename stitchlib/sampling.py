"""Next-token selection: greedy, temperature and top-p (nucleus), per row, reproducible under a seed.

`token_logprobs` reports what a row's logits gave each token (OpenAI's `logprobs`).

Rows of one batch may carry different temperatures / top-p values and their own generators, so a
request's output depends only on its own seed, never on who it was batched with.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def top_p_filter(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """probs: [B, V], top_p: [B] -> probs with the tail outside the nucleus zeroed (not renormalised).
    The most probable token is always kept."""
    sorted_p, idx = probs.sort(dim=-1, descending=True)
    cum = sorted_p.cumsum(-1)
    drop = (cum - sorted_p) > top_p.unsqueeze(-1)  # mass before this token already exceeds top_p
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(-1, idx, sorted_p)


def draw(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
         generators: list[torch.Generator | None] | None = None) -> torch.Tensor:
    """The one sampler (reference generation and the serving engine both draw here): logits [N, V];
    temperature (> 0), top_p: [N]; one generator per row (None: torch's default) -> token ids [N].
    Exponential race (argmax p / E, E ~ Exp(1)) == sampling from p, without a host sync; each row
    draws V exponentials from its own generator, so a row's draw never depends on its batch companions."""
    t = temperature.float().clamp(min=1e-5).unsqueeze(-1)
    probs = top_p_filter(torch.softmax(logits.float() / t, dim=-1), top_p.float())
    noise = torch.empty_like(probs)
    for i, g in enumerate(generators or [None] * probs.shape[0]):
        noise[i].exponential_(1.0, generator=g)
    return (probs / noise).argmax(-1)


def sample_next(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                generators: list[torch.Generator | None] | None = None) -> torch.Tensor:
    """logits: [B, V]; temperature, top_p: [B] -> token ids [B]. temperature 0 means greedy."""
    greedy = logits.float().argmax(-1)
    if bool((temperature <= 0).all()):
        return greedy
    return torch.where(temperature <= 0, greedy, draw(logits, temperature, top_p, generators))


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability under the model (natural log, raw logits: before temperature and
    top-p, as OpenAI reports them) and the `k` most likely tokens at that position, most likely first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: list[int]) -> list[TokenLogprob]:
    """logits: [N, V]; tokens: [N] (the token taken at each position); k: top alternatives per row.

    One host transfer for all rows. The chosen token's value and the top values come from the same
    float32 log-softmax, so a greedy token's logprob equals its top-1 value exactly (harnesses test that)."""
    lp = torch.log_softmax(logits.float(), dim=-1)  # [N, V]
    chosen = lp.gather(-1, tokens.view(-1, 1).to(lp.device)).view(-1).tolist()
    kmax = max(k, default=0)
    if kmax:
        top_v, top_i = lp.topk(min(kmax, lp.shape[-1]), dim=-1)
        top_v, top_i = top_v.tolist(), top_i.tolist()
    toks = tokens.view(-1).tolist()
    return [TokenLogprob(t, c, tuple(zip(top_i[r][:k[r]], top_v[r][:k[r]])) if k[r] else ())
            for r, (t, c) in enumerate(zip(toks, chosen))]
