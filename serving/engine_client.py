"""The engine client: the interface the palette replica (`replica.py`) talks to, and its implementation
over `stitchlib.runtime.PaletteRuntime`.

`RuntimeEngineClient` serves generation by mixed-stitch continuous batching on ONE
`stitchlib.engine.StitchEngine` per replica, driven by one thread (`engine_thread.EngineThread`): requests
on different stitches share each decode step, join between steps and leave (finished or aborted)
without disturbing the others. Classification, profiling and the health check run on the same
thread between steps, so the model is only ever touched by that thread and the asyncio loop keeps
serving HTTP while a step runs.
"""
from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stitchlib.engine import StitchEngine
from stitchlib.engine.pool import engine_for_runtime
from stitchlib.prompts import render_messages
from stitchlib.runtime import PaletteRuntime, StitchInfo
from stitchlib.types import EngineConfig, SamplingParams, StitchProfile

from .engine_thread import EngineError, EngineStuck, EngineThread, GenerationStream, StepStats
from .logprobs import token_bytes_fn

__all__ = ["EngineClient", "EngineError", "EngineStuck", "GenerationRow", "GenerationStream", "RuntimeEngineClient",
           "StepStats", "decode_parts"]


@dataclass
class GenerationRow:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


class EngineClient(ABC):
    """What the palette replica needs from the engine (the client side of the engine thread)."""

    name: str
    task: str
    labels: list[str] | None
    max_context: int  # the model's context
    max_seq_len: int  # positions one generation request may use here (prompt + output)
    max_slots: int  # rows decoded together
    vocab_size: int  # token ids the model accepts (its embedding rows; may exceed the tokenizer's)
    stitches: list[StitchInfo]  # cheapest first
    stitch_parts: dict[str, dict[str, int]]  # stitch -> weight part -> parameters a decode step reads
    eos_ids: set[int]
    on_step: Callable[[StepStats], None] | None  # called on the event loop after every engine step

    @abstractmethod
    def stream(self, row: GenerationRow, stitch_id: str) -> GenerationStream:
        """Start generating `row` on `stitch_id`: its tokens, one per engine step, until it finishes.
        Closing the stream (or cancelling its consumer) aborts the row at the next step boundary."""

    @abstractmethod
    def abort(self, request_id: str) -> None:
        """Stop producing for this request now (its stream raises EngineError); no-op when it is gone."""

    @abstractmethod
    def occupancy(self) -> tuple[dict[str, int], dict[str, int]]:
        """(running rows, requests waiting for a slot) per stitch, as the engine last reported."""

    @abstractmethod
    def counters(self) -> dict[str, int]:
        """Engine step counters: steps, mixed_steps (more than one stitch decoded), max_stitches_per_step, ..."""

    @abstractmethod
    async def classify(self, texts: list[str], stitch_id: str) -> tuple[list[dict[str, float]], float]:
        """-> (label -> probability per text, compute seconds)."""

    @abstractmethod
    async def check_health(self) -> None:
        """Raise if the engine cannot serve."""

    @abstractmethod
    async def profile(self, **kw: Any) -> dict[str, StitchProfile]:
        """Measure every stitch on this hardware: stitch id -> StitchProfile (prefill s/token, step s by batch)."""

    @abstractmethod
    def load_profile_table(self, path: str) -> dict[str, StitchProfile] | str:
        """A saved table (`stitchserve profile`) for this palette and hardware, or why it does not fit."""

    @abstractmethod
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: list[int]) -> str: ...

    @abstractmethod
    def token_bytes(self, token_id: int) -> bytes:
        """The token's own bytes (part of a UTF-8 character, possibly), for logprobs."""

    @abstractmethod
    def tokenizer_info(self) -> dict[str, Any]:
        """eos/bos/pad tokens, chat template, class: what a remote tokenizer client needs."""

    @abstractmethod
    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str: ...

    @abstractmethod
    async def shutdown(self) -> None: ...

    @property
    def stuck(self) -> str | None:
        """Why the engine is wedged (the watchdog gave up on a step that has not returned), else None."""
        return None

    def inject_stall(self, seconds: float) -> None:
        """FAULT INJECTION, for tests (`fault_injection` in the palette config): the next engine step
        hangs for `seconds` before it runs. Engines without a step loop cannot do it."""
        raise NotImplementedError


def decode_parts(model: Any, stitch_id: str) -> dict[str, int]:
    """The weight parts one decode step of `stitch_id` reads (`stitchlib.space.stitch_parts` without the
    embeddings: a step looks up one embedding row per token, it does not read the table)."""
    from stitchlib.space import stitch_parts

    parts = stitch_parts(model.get(stitch_id), model.small_anchor.stats, model.large_anchor.stats)
    return {k: v for k, v in parts.items() if not k.endswith(".embed")}


def _init_thread() -> None:
    import torch

    torch.set_grad_enabled(False)


class RuntimeEngineClient(EngineClient):
    """engine: the resolved engine config (`PaletteDeploymentConfig.engine_config`); default: 8 slots of
    the whole context."""

    def __init__(self, runtime: PaletteRuntime, engine: EngineConfig | None = None, *,
                 step_timeout_s: float | None = None) -> None:
        self.rt = runtime
        self.name = runtime.name
        self.task = runtime.task
        self.labels = runtime.labels
        self.max_context = runtime.max_context
        self.engine_cfg = engine or EngineConfig(max_seq_len=runtime.max_context)
        if self.engine_cfg.max_seq_len > runtime.max_context:
            raise ValueError(f"engine max_seq_len ({self.engine_cfg.max_seq_len}) is over the palette's context "
                             f"of {runtime.max_context} positions")
        self.max_seq_len = self.engine_cfg.max_seq_len
        self.max_slots = self.engine_cfg.max_slots
        self.vocab_size = min(runtime.model.small_anchor.stats.vocab_size, runtime.model.large_anchor.stats.vocab_size)
        self.stitches = list(runtime.stitches)
        self.stitch_parts = {s.id: decode_parts(runtime.model, s.id) for s in self.stitches}
        self.eos_ids = set(runtime.eos_token_ids)
        self._token_bytes = token_bytes_fn(runtime.tokenizer)
        self._loop = EngineThread(self._build, thread_init=_init_thread, step_timeout_s=step_timeout_s)

    @classmethod
    def load(cls, path: str, *, device: str = "cpu", dtype: str = "bfloat16", quantize: str = "none",
             engine: Callable[[int], EngineConfig] | None = None,
             step_timeout_s: float | None = None) -> "RuntimeEngineClient":
        """engine: the palette's context -> the engine config (e.g. `PaletteDeploymentConfig.engine_config`)."""
        rt = PaletteRuntime.load(path, device=device, dtype=dtype, quantize=quantize)
        return cls(rt, engine(rt.max_context) if engine is not None else None, step_timeout_s=step_timeout_s)

    def _build(self) -> StitchEngine:
        """On the engine thread, at the first generation: caches for max_slots x max_seq_len positions."""
        return engine_for_runtime(self.rt, self.engine_cfg)

    @property
    def on_step(self) -> Callable[[StepStats], None] | None:  # type: ignore[override]
        return self._loop.on_step

    @on_step.setter
    def on_step(self, fn: Callable[[StepStats], None] | None) -> None:
        self._loop.on_step = fn

    # ---- text ----------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self.rt.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.rt.tokenizer.decode(ids, skip_special_tokens=True)

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        # exactly as the palette was fitted/trained (its manifest's prompt format); palettes that predate
        # the record get the tokenizer's chat template, as before
        fmt = self.rt.manifest.prompt_format
        return render_messages(self.rt.tokenizer, messages, add_generation_prompt=add_generation_prompt,
                               template=fmt.template if fmt else "chat",
                               system_prompt=fmt.system_prompt if fmt else None)

    def token_bytes(self, token_id: int) -> bytes:
        return self._token_bytes(token_id)

    def tokenizer_info(self) -> dict[str, Any]:
        tok = self.rt.tokenizer
        template = tok.chat_template if isinstance(tok.chat_template, str) else None
        return {"tokenizer_class": type(tok).__name__, "eos_token": tok.eos_token, "bos_token": tok.bos_token,
                "pad_token": tok.pad_token, "chat_template": template, "model_max_length": self.max_context}

    # ---- generation ----------------------------------------------------------------------------
    def stream(self, row: GenerationRow, stitch_id: str) -> GenerationStream:
        return self._loop.submit(row.request_id, row.prompt_ids, stitch_id, row.params)

    def abort(self, request_id: str) -> None:
        self._loop.abort(request_id)

    def occupancy(self) -> tuple[dict[str, int], dict[str, int]]:
        return dict(self._loop.running), dict(self._loop.waiting)

    def counters(self) -> dict[str, int]:
        return dict(self._loop.counters)

    # ---- everything else, between steps ---------------------------------------------------------
    async def classify(self, texts: list[str], stitch_id: str) -> tuple[list[dict[str, float]], float]:
        def run() -> tuple[list[dict[str, float]], float]:
            t0 = time.perf_counter()
            out = self.rt.classify(texts, stitch_id)
            return out, time.perf_counter() - t0

        return await self._loop.call(run)

    async def profile(self, **kw: Any) -> dict[str, StitchProfile]:
        return await self._loop.call(lambda: self.rt.profile(**kw))

    def load_profile_table(self, path: str) -> dict[str, StitchProfile] | str:
        return self.rt.load_profile_table(path)

    @property
    def stuck(self) -> str | None:
        return self._loop.stuck

    def inject_stall(self, seconds: float) -> None:
        self._loop.inject_stall(seconds)

    async def check_health(self) -> None:
        if not self._loop.alive:
            raise EngineError("the engine is shut down" if self._loop.closed else "the engine thread died")
        if self._loop.stuck is not None:  # the watchdog gave up on a step: let Serve replace this replica
            raise EngineStuck(self._loop.stuck)
        # the engine thread must answer between two steps: a wedged step fails the health check
        await asyncio.wait_for(self._loop.call(lambda: None), timeout=60)

    async def shutdown(self) -> None:
        await self._loop.shutdown()
