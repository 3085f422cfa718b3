"""OpenAI-compatible request/response models (field order as OpenAI's), plus stitchserve's extensions
in marked blocks. These models validate every request body AND are the OpenAPI schema (`app.py`).

Unknown request fields are ignored (OpenAI SDKs and harnesses send more than we use). OpenAI fields we
do not implement (tools, response_format json, n > 1, penalties, ...) are declared with the only values
we honour, so the schema says what is accepted, and a request that uses them is refused with one 400
naming every such field: never a silent 200 that ignored them.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, WithJsonSchema, field_validator, model_validator

MAX_STOP_STRINGS = 4  # as OpenAI
MAX_LOGPROBS = 20  # top alternatives per token (OpenAI: 20 for chat; vLLM's default limit for both)


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


class RequestModel(OpenAIBaseModel):
    """A request body: JSON types as the schema says them ("5" is not an integer, 1 is not a boolean)."""

    model_config = ConfigDict(extra="ignore", strict=True)


def _one_of(*schemas: dict[str, Any]) -> WithJsonSchema:
    return WithJsonSchema({"anyOf": list(schemas)})


_TEXT = {"type": "string", "minLength": 1}
_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}


# ---- errors -----------------------------------------------------------------------------------
class ErrorInfo(OpenAIBaseModel):
    message: str = Field(description="what is wrong, and what is accepted")
    type: str = Field(description="invalid_request_error, invalid_budget, budget_not_met, model_not_found, "
                                  "context_length_exceeded, authentication_error, queue_full, unavailable, "
                                  "timeout, internal_error")
    param: str | None = Field(None, description="the body field or header at fault")
    code: int | None = Field(None, description="the HTTP status")


class ErrorResponse(OpenAIBaseModel):
    """Every non-2xx answer (and an error event inside an SSE stream)."""

    error: ErrorInfo


# ---- fields we do not implement ---------------------------------------------------------------
def _unset(v: Any) -> bool:
    return v is None or v == 0 or v == [] or v == {} or v == ""


_NOT_SUPPORTED = "Not supported by stitchserve: any other value is refused with 400."


# ---- shared pieces ----------------------------------------------------------------------------
class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class StreamOptions(RequestModel):
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


class _SamplingFields(RequestModel):
    """The sampling parameters chat and completions share, with OpenAI's ranges."""

    UNSUPPORTED: ClassVar[dict[str, tuple[Callable[[Any], bool], str]]] = {
        "n": (lambda v: v in (None, 1), "n > 1: one choice per request, only n=1"),
        "frequency_penalty": (_unset, "penalties"),
        "presence_penalty": (_unset, "penalties"),
        "logit_bias": (_unset, "logit_bias"),
    }

    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1, description="only 1. " + _NOT_SUPPORTED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # non-empty strings, at most MAX_STOP_STRINGS of them (schemathesis found [""] schema-valid but refused)
    stop: Annotated[str | list[str] | None, WithJsonSchema({"anyOf": [
        _TEXT, {"type": "array", "items": _TEXT, "maxItems": MAX_STOP_STRINGS}, {"type": "null"}]})] = None
    # what a torch generator takes: a seed outside it made the engine refuse the request (a 500)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    frequency_penalty: float | None = Field(None, ge=0, le=0, description="only 0. " + _NOT_SUPPORTED)
    presence_penalty: float | None = Field(None, ge=0, le=0, description="only 0. " + _NOT_SUPPORTED)
    logit_bias: dict[str, float] | None = Field(None, max_length=0, description="only empty. " + _NOT_SUPPORTED)
    user: str | None = None
    # --- stitchserve extensions ---------------------------------------------------------------
    compute_budget: str | None = Field(
        None, description="X-Compute-Budget in the body; the header wins when both are given")

    @classmethod
    def unsupported(cls, data: dict[str, Any]) -> tuple[str, str] | None:
        """(message, first field) naming every field of a raw body that asks for something we do not
        implement; None when there is none. Checked before validation, so one 400 names them all."""
        used = [(name, why) for name, (ok, why) in cls.UNSUPPORTED.items() if name in data and not ok(data[name])]
        if not used:
            return None
        return ("unsupported request fields: " + "; ".join(f"{n} ({why})" for n, why in used) +
                ". stitchserve does not implement them: remove them from the request", used[0][0])

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
class TextContentPart(RequestModel):
    type: Literal["text"]
    text: str


class ChatMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ResponseFormatText(RequestModel):
    type: Literal["text"]


class ChatCompletionRequest(_SamplingFields):
    UNSUPPORTED: ClassVar[dict[str, tuple[Callable[[Any], bool], str]]] = {
        **_SamplingFields.UNSUPPORTED,
        "tools": (_unset, "tool calling"),
        "tool_choice": (lambda v: v in (None, "none"), "tool calling"),
        "functions": (_unset, "function calling"),
        "function_call": (lambda v: v in (None, "none"), "function calling"),
        "response_format": (lambda v: v is None or v == {"type": "text"}, "structured output: only {'type': 'text'}"),
        "audio": (lambda v: v is None, "audio output"),
        "modalities": (lambda v: v is None or (isinstance(v, list) and all(m == "text" for m in v)),
                       "modalities other than text"),
        "prediction": (lambda v: v is None, "predicted outputs"),
        "web_search_options": (lambda v: v is None, "web search"),
        "reasoning_effort": (lambda v: v is None, "reasoning models"),
    }

    messages: list[ChatMessage] = Field(min_length=1)
    model: str
    logprobs: bool = Field(False, description="return the log-probability of each output token (from the "
                                              "logits before temperature and top-p)")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="with logprobs: the most likely "
                                                                            "tokens at each position, with theirs")
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[dict[str, Any]] | None = Field(None, max_length=0, description="only empty. " + _NOT_SUPPORTED)
    tool_choice: Literal["none"] | None = Field(None, description="only 'none'. " + _NOT_SUPPORTED)
    functions: list[dict[str, Any]] | None = Field(None, max_length=0, description="only empty. " + _NOT_SUPPORTED)
    function_call: Literal["none"] | None = Field(None, description="only 'none'. " + _NOT_SUPPORTED)
    response_format: ResponseFormatText | None = Field(None, description="only {'type': 'text'}. " + _NOT_SUPPORTED)
    audio: None = Field(None, description=_NOT_SUPPORTED)
    modalities: list[Literal["text"]] | None = Field(None, description="only ['text']. " + _NOT_SUPPORTED)
    prediction: None = Field(None, description=_NOT_SUPPORTED)
    web_search_options: None = Field(None, description=_NOT_SUPPORTED)
    reasoning_effort: None = Field(None, description=_NOT_SUPPORTED)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def top_k_logprobs(self) -> int | None:
        """Alternatives per output token when logprobs are requested, else None."""
        return (self.top_logprobs or 0) if self.logprobs else None


class ChatResponseMessage(OpenAIBaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(OpenAIBaseModel):
    token: str = Field(description="the token's text ('bytes:\\xNN...' when it is not whole UTF-8)")
    logprob: float
    bytes: list[int] | None = Field(description="the token's UTF-8 bytes")


class ChatCompletionTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(description="the top_logprobs most likely tokens, most likely first")


class ChoiceLogprobs(OpenAIBaseModel):
    content: list[ChatCompletionTokenLogprob] | None
    refusal: list[ChatCompletionTokenLogprob] | None = None


class ChatCompletionChoice(OpenAIBaseModel):
    index: int = 0
    message: ChatResponseMessage
    logprobs: ChoiceLogprobs | None = None
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
    logprobs: ChoiceLogprobs | None = None
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
TokenIds = list[int]  # a prompt given as token ids (lm-evaluation-harness sends these)


class CompletionRequest(_SamplingFields):
    UNSUPPORTED: ClassVar[dict[str, tuple[Callable[[Any], bool], str]]] = {
        **_SamplingFields.UNSUPPORTED,
        "best_of": (lambda v: v in (None, 1), "best_of > 1"),
        "suffix": (_unset, "suffix (insertion)"),
    }

    model: str
    prompt: Annotated[str | list[str] | TokenIds | list[TokenIds], _one_of(
        _TEXT, {"type": "array", "items": _TEXT, "minItems": 1, "maxItems": 1}, _IDS,
        {"type": "array", "items": _IDS, "minItems": 1, "maxItems": 1})] = Field(
        description="one prompt: text, or token ids (as a one-element list of either, too)")
    best_of: int | None = Field(None, ge=1, le=1, description="only 1. " + _NOT_SUPPORTED)
    echo: bool = Field(False, description="return the prompt before the completion (with its logprobs when "
                                          "logprobs is set; the first prompt token has none)")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="return each token's log-probability "
                                 "and the `logprobs` most likely tokens at its position (logits before temperature)")
    suffix: str | None = Field(None, max_length=0, description="only empty. " + _NOT_SUPPORTED)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list) -> str | TokenIds:
        if isinstance(v, list) and v and isinstance(v[0], (str, list)):
            if len(v) != 1:
                raise ValueError("exactly one prompt per request is supported")
            v = v[0]
        if not v:
            raise ValueError("prompt must not be empty")
        return v

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


class CompletionLogprobs(OpenAIBaseModel):
    """OpenAI's legacy completions logprobs: one entry per token of `text` (with echo, the prompt's first;
    the first prompt token has no logprob and no alternatives)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int] = Field(description="each token's first character in `text`")


class CompletionChoice(OpenAIBaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
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
class ClassifyRequest(RequestModel):
    input: Annotated[str | list[str], _one_of(_TEXT, {"type": "array", "items": _TEXT, "minItems": 1})]
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
    prefill_share: float = Field(description="share of the replica's recent engine time spent prefilling prompts "
                                             "(the last minute); tokens are priced at step / (1 - share)")
    active_requests: int
    routed: bool = Field(True, description="budgets are routed here (false: shadowed on the served front: not "
                                           "measurably cheaper than a better route; X-Stitch-Id still reaches it)")
    shadowed_by: str | None = Field(None, description="the better, no costlier route budgets go to instead")
    route_note: str | None = Field(None, description="why it is routed or shadowed, with the measured numbers")
    replica: str | None = None


class StitchList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[StitchStatus]


# ---- tokenizer endpoints (vLLM's shapes: lm-evaluation-harness's remote tokenizer uses them) -------
class TokenizeRequest(RequestModel):
    model: str | None = Field(None, description="may be omitted when one chat palette is served")
    prompt: str | None = Field(None, description="text to tokenize (or messages)")
    messages: list[ChatMessage] | None = Field(None, min_length=1, description="rendered with the chat template "
                                                                               "first")
    add_special_tokens: bool = False
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_source(self) -> "TokenizeRequest":
        if self.prompt is not None and self.messages is not None:
            raise ValueError("give prompt or messages, not both")
        return self


class TokenizeResponse(OpenAIBaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(RequestModel):
    model: str | None = Field(None, description="may be omitted when one chat palette is served")
    tokens: list[NonNegativeInt] = Field(description="token ids")


class DetokenizeResponse(OpenAIBaseModel):
    prompt: str


class TokenizerInfo(OpenAIBaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    tokenizer_class: str
    eos_token: str | None
    bos_token: str | None
    pad_token: str | None
    chat_template: str | None
    model_max_length: int

