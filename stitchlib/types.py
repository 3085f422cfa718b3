"""Value types shared by the runtime, the engine and serving: no torch, no imports from the rest of
stitchlib, so that every module can depend on them without a cycle (runtime -> engine -> types)."""
from __future__ import annotations

from pydantic import BaseModel, Field

MAX_TOP_LOGPROBS = 20  # as OpenAI's top_logprobs


class SamplingParams(BaseModel):
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop_token_ids: list[int] = Field(default_factory=list)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description=(
        "per generated token: its log-probability and the `logprobs` most likely alternatives, from the "
        "raw logits (before temperature and top-p); None: none"))
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description=(
        "per prompt token after the first: its log-probability given the tokens before it, and the "
        "`prompt_logprobs` most likely alternatives; None: none"))


class StitchProfile(BaseModel):
    """One route's latency on some hardware: prefill seconds per prompt token, and seconds per decode
    step by batch size."""

    prefill_s_per_token: float
    decode_step_s: dict[int, float]
