"""Replica items: everything that crosses Ray between the ingress (`api_serving.py`) and a palette replica
(`replica.py`), as pydantic models (Ray pickles them; no dict on either side).

    ingress -> replica:  GenerateInput, ClassifyInput (the budget already parsed: the replica never
                         parses a budget a request sent)
    replica -> ingress:  generation streams one `RouteItem` (or one `ServingError`), then `DeltaItem`s,
                         then one `FinalItem` (or a `ServingError` when the engine failed the request
                         mid-way); classification answers one `ClassifyOutput` or a `ServingError`;
                         the tokenizer calls answer their protocol model or a `ServingError`.

`ServingError` is the one error type of the serving layers: the replica sends it as an item, the
ingress returns it as a value, and only the HTTP layer (`app.py`) turns it into a status code.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

from .budget import Budget
from .metrics import NO_STITCH
from .protocol import ClassifyResult, ErrorInfo, ErrorResponse, StitchCard, UsageInfo

__all__ = ["ClassifyInput", "ClassifyOutput", "DeltaItem", "FinalItem", "GenerateInput", "GenerateItem",
           "ReplicaReady", "RouteItem", "ServingError", "generate_item"]


class _Item(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- ingress -> replica ------------------------------------------------------------------------
class GenerateInput(_Item):
    """One chat/completion request, as the ingress hands it to a palette replica."""

    request_id: str
    messages: list[dict[str, str]] | None = None  # chat: rendered in the palette's recorded prompt format
    prompt: str | None = None  # completions: raw text
    prompt_ids: list[int] | None = None  # completions: token ids, used as they are
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    budget: Budget | None = Field(None, description="parsed at the ingress; None: the palette's default_budget")
    strict: bool = False
    stitch: str | None = None  # X-Stitch-Id: serve on this stitch (the budget is still checked against it)
    stream: bool = True  # False: the replica sends the text in one piece (one Ray item, not one per token)
    logprobs: int | None = None  # per output token: its logprob and this many alternatives (None: off)
    echo: bool = False  # the prompt text comes first, with its logprobs when `logprobs` is set

    @model_validator(mode="after")
    def _one_source(self) -> "GenerateInput":
        if sum(x is not None for x in (self.messages, self.prompt, self.prompt_ids)) != 1:
            raise ValueError("exactly one of messages / prompt / prompt_ids")
        return self


class ClassifyInput(_Item):
    request_id: str
    texts: list[str]
    budget: Budget | None = Field(None, description="parsed at the ingress; None: the palette's default_budget")
    strict: bool = False
    stitch: str | None = None


# ---- replica -> ingress ------------------------------------------------------------------------
class ServingError(BaseModel):
    """The one error value of the serving layers (replica item, ingress value, HTTP answer)."""

    kind: Literal["error"] = "error"
    status: int = Field(ge=400, le=599, description="the HTTP status it becomes")
    message: str
    type: str = Field("invalid_request_error", description="ErrorInfo.type: invalid_budget, queue_full, ...")
    param: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    # labels for the ingress's response metrics
    model: str = ""
    stitch: str = NO_STITCH

    def __init__(self, status: int, message: str, **kw: Any) -> None:
        # positional status and message, as every call site writes them: ServingError(404, "...", type=...)
        super().__init__(status=status, message=message, **kw)

    def info(self) -> ErrorInfo:
        return ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.status)

    def body(self) -> dict[str, Any]:
        """The JSON body of the HTTP answer (also an SSE error event)."""
        return ErrorResponse(error=self.info()).model_dump()


class RouteItem(_Item):
    """First item of a generation: the stitch chosen (or pinned) for it."""

    kind: Literal["route"] = "route"
    stitch: StitchCard
    prompt_tokens: int = Field(ge=1)


class DeltaItem(_Item):
    """Text produced since the previous delta (coalesced: see `stream_interval_s`)."""

    kind: Literal["delta"] = "delta"
    text: str
    logprobs: list[dict[str, Any]] | None = Field(None, description="one entry per token produced since the last "
                                                                    "delta (`logprobs.make_entry`), when asked")


class FinalItem(_Item):
    kind: Literal["final"] = "final"
    finish_reason: Literal["stop", "length"]
    usage: UsageInfo


GenerateItem = Annotated[RouteItem | DeltaItem | FinalItem | ServingError, Field(discriminator="kind")]
generate_item: TypeAdapter[GenerateItem] = TypeAdapter(GenerateItem)  # e.g. an item back from its JSON


class ClassifyOutput(_Item):
    kind: Literal["classify"] = "classify"
    stitch: StitchCard
    results: list[ClassifyResult]
    prompt_tokens: int = Field(ge=1)


class ReplicaReady(_Item):
    """One palette's part of `GET /ready`: a replica's answer, or (set by the ingress) why none came."""

    model: str
    ready: bool
    replica: str | None = None
    pid: int | None = None
    inflight: int | None = None
    latency_profile: str | None = None
    budget_margins: dict[str, float | int] | None = Field(None, description="token / request realized margins "
                                                                              "and the samples behind them")
    engine: dict[str, int] | None = Field(None, description="slots, running, waiting and the step counters")
    error: str | None = None
