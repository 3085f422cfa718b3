"""OpenAI-compatible request/response models (field order as OpenAI's), plus stitchserve's extensions
in marked blocks. Unknown request fields are ignored (OpenAI SDKs send more than we use); fields we
accept but cannot honour are validated here so the router can answer 400.
"""
from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_STRINGS = 4  # as OpenAI


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ---- errors -----------------------------------------------------------------------------------
class ErrorInfo(OpenAIBaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | None = None


class ErrorResponse(OpenAIBaseModel):
    error: ErrorInfo


# ---- shared pieces ----------------------------------------------------------------------------
class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False


class StitchCard(OpenAIBaseModel):
    """Extension: which stitch served a request, what it costs, and the latency estimate routing used."""

    id: str
    split: int | None = None
    join: int | None = None
    params: int
    gflops: float = Field(description="forward GFLOPs per token (palette figure)")
    quality: float = Field(description="the palette's quality figure, higher is better")
    latency_ms: float = Field(description="estimated ms per output token on this replica (classify: per request)")
    request_latency_ms: float = Field(description="estimated ms for the whole request on this replica")
    budget: str | None = Field(None, description="the budget routed against, canonical form")
    budget_met: bool = True
    violated: list[str] = Field(default_factory=list, description="budget terms the stitch breaks")
    replica: str | None = None


class _SamplingFields(OpenAIBaseModel):
    """The sampling parameters chat and completions share, with OpenAI's ranges."""

    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    # --- stitchserve extensions ---------------------------------------------------------------
    compute_budget: str | None = Field(
        None, description="X-Compute-Budget in the body; the header wins when both are given")

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else list(v)
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops or None


# ---- chat completions --------------------------------------------------------------------------
class TextContentPart(OpenAIBaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIBaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    model: str
    max_completion_tokens: int | None = Field(None, ge=1)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class ChatResponseMessage(OpenAIBaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionChoice(OpenAIBaseModel):
    index: int = 0
    message: ChatResponseMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: random_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    # --- stitchserve extensions ---------------------------------------------------------------
    stitch: StitchCard


class DeltaMessage(OpenAIBaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatCompletionStreamChoice(OpenAIBaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionStreamResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None
    # --- stitchserve extensions ---------------------------------------------------------------
    stitch: StitchCard | None = Field(None, description="on the first and the last chunk")


# ---- completions -------------------------------------------------------------------------------
class CompletionRequest(_SamplingFields):
    model: str
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str:
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("exactly one prompt per request is supported")
            v = v[0]
        if not v:
            raise ValueError("prompt must not be empty")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> None:
        if v:
            raise ValueError("suffix is not supported")
        return None

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


class CompletionChoice(OpenAIBaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: random_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo
    # --- stitchserve extensions ---------------------------------------------------------------
    stitch: StitchCard


class CompletionStreamResponse(OpenAIBaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    # --- stitchserve extensions ---------------------------------------------------------------
    stitch: StitchCard | None = None


# ---- classify (stitchserve extension, shaped like OpenAI's embeddings/moderations) -------------
class ClassifyRequest(OpenAIBaseModel):
    input: str | list[str]
    model: str | None = Field(None, description="may be omitted when one classify palette is served")
    compute_budget: str | None = Field(None, description="X-Compute-Budget in the body; the header wins")

    @field_validator("input")
    @classmethod
    def _inputs(cls, v: str | list[str]) -> list[str]:
        texts = [v] if isinstance(v, str) else list(v)
        if not texts:
            raise ValueError("input must not be empty")
        if any(not t for t in texts):
            raise ValueError("input texts must not be empty")
        return texts


class ClassifyResult(OpenAIBaseModel):
    index: int
    label: str
    probs: dict[str, float]


class ClassifyResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: random_id("cls"))
    object: Literal["list"] = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[ClassifyResult]
    usage: UsageInfo
    stitch: StitchCard


# ---- models / stitches --------------------------------------------------------------------------
class ModelCard(OpenAIBaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "stitchserve"
    # --- stitchserve extensions ---------------------------------------------------------------
    task: Literal["chat", "classify"]
    labels: list[str] | None = None
    max_context: int
    stitches: int


class ModelList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class StitchStatus(OpenAIBaseModel):
    """One deployed stitch as `GET /v1/stitches` reports it, measured on the replica that answered."""

    model: str
    id: str
    split: int | None
    join: int | None
    params: int
    gflops: float
    bytes: int
    quality: float
    metrics: dict[str, float]
    prefill_s_per_token: float = Field(description="profiled at start-up on this replica")
    decode_step_s: dict[int, float] = Field(description="profiled seconds per decode step by batch size")
    correction: float = Field(description="EWMA of observed / profiled step time")
    latency_ms: float = Field(description="current per-token estimate at batch 1 with the current load")
    active_requests: int
    replica: str | None = None


class StitchList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[StitchStatus]


# ---- replica-internal messages (ingress <-> palette deployment) ---------------------------------
class GenerateInput(BaseModel):
    """What the ingress sends a palette replica for one chat/completion request."""

    request_id: str
    messages: list[dict[str, str]] | None = None  # chat: rendered with the palette's chat template
    prompt: str | None = None  # completions: raw text
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    budget: str | None = None  # header text; the replica parses (it was validated at the ingress)
    strict: bool = False
    stream: bool = True  # False: the replica sends the text in one piece (one Ray item, not one per token)

    @model_validator(mode="after")
    def _one_source(self) -> "GenerateInput":
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("exactly one of messages / prompt")
        return self


class ClassifyInput(BaseModel):
    request_id: str
    texts: list[str]
    budget: str | None = None
    strict: bool = False

