"""Engine interface the deployment talks to, and its implementation over `stitchlib.runtime.PaletteRuntime`.

The runtime is synchronous and CPU/GPU-bound; the engine runs every runtime call on ONE dedicated
thread per replica so that (a) the asyncio loop keeps serving HTTP while a step runs, (b) steps of
concurrent batches (different stitches) interleave step by step, which is what the latency model in
`latency.py` assumes, and (c) a runtime generator is always advanced on the thread that created it.
"""
from __future__ import annotations

import asyncio
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

__all__ = ["EngineClient", "EngineStep", "GenerationRow", "RuntimeEngine"]


@dataclass
class GenerationRow:
    request_id: str
    prompt_ids: list[int]
    params: Any  # stitchlib.runtime.SamplingParams


@dataclass
class EngineStep:
    """One decode step of a batch: the new token per row (None: finished or aborted), and timings."""

    index: int  # 0 = the step that includes prefill
    tokens: list[int | None]
    seconds: float  # compute time of this step on the engine thread
    batch_size: int  # rows still running when the step began
    prompt_tokens: int  # padded prefill tokens (step 0 only; else 0)


class EngineClient(ABC):
    """What the palette deployment needs from a model engine."""

    name: str
    task: str
    labels: list[str] | None
    max_context: int
    stitches: list[Any]  # stitchlib.runtime.StitchInfo, cheapest first
    eos_ids: set[int]

    @abstractmethod
    def generate(self, rows: list[GenerationRow], stitch_id: str) -> AsyncIterator[EngineStep]:
        """Run one batch on one stitch; one EngineStep per decode step until every row is done."""

    @abstractmethod
    async def classify(self, texts: list[str], stitch_id: str) -> tuple[list[dict[str, float]], float]:
        """-> (label -> probability per text, compute seconds)."""

    @abstractmethod
    def abort(self, request_id: str) -> None:
        """Stop producing for this request; a batch whose rows are all aborted stops computing."""

    @abstractmethod
    async def check_health(self) -> None:
        """Raise if the engine cannot serve."""

    @abstractmethod
    async def profile(self, **kw: Any) -> dict[str, Any]:
        """Measure every stitch on this hardware: stitch id -> StitchProfile (prefill s/token, step s by batch)."""

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: list[int]) -> str: ...

    @abstractmethod
    def render_chat(self, messages: list[dict[str, str]]) -> str: ...

    @abstractmethod
    async def shutdown(self) -> None: ...


class RuntimeEngine(EngineClient):
    def __init__(self, runtime: Any) -> None:
        self.rt = runtime
        self.name = runtime.name
        self.task = runtime.task
        self.labels = runtime.labels
        self.max_context = runtime.max_context
        self.stitches = list(runtime.stitches)
        self.eos_ids = {t for t in [runtime.tokenizer.eos_token_id] if isinstance(t, int)}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stitch-engine",
                                        initializer=self._init_thread)
        self._aborted: set[str] = set()
        self._lock = threading.Lock()
        self._closed = False

    @staticmethod
    def _init_thread() -> None:
        import torch

        torch.set_grad_enabled(False)

    @classmethod
    def load(cls, path: str, *, device: str = "cpu", dtype: str = "bfloat16") -> "RuntimeEngine":
        from stitchlib.runtime import PaletteRuntime

        return cls(PaletteRuntime.load(path, device=device, dtype=dtype))

    async def _run(self, fn, *args):
        if self._closed:
            raise RuntimeError("engine is shut down")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # ---- text ----------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return list(self.rt.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.rt.tokenizer.decode(ids, skip_special_tokens=True)

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        return self.rt.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    # ---- generation ----------------------------------------------------------------------------
    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborted.add(request_id)

    def _is_aborted(self, rid: str) -> bool:
        with self._lock:
            return rid in self._aborted

    def _forget(self, rids: list[str]) -> None:
        with self._lock:
            self._aborted.difference_update(rids)

    async def generate(self, rows: list[GenerationRow], stitch_id: str) -> AsyncIterator[EngineStep]:
        rids = [r.request_id for r in rows]
        prompts = [r.prompt_ids for r in rows]
        padded = max(len(p) for p in prompts) * len(prompts)
        gen: Iterator[list[int | None]] | None = None
        done = [False] * len(rows)

        def start() -> None:
            nonlocal gen
            gen = self.rt.generate_steps(prompts, stitch_id, [r.params for r in rows])

        def step() -> tuple[list[int | None] | None, float]:
            t0 = time.perf_counter()
            try:
                out = next(gen)  # type: ignore[arg-type]
            except StopIteration:
                out = None
            return out, time.perf_counter() - t0

        def close() -> None:
            if gen is not None:
                gen.close()  # runs the runtime's finally on the thread that owns it

        try:
            await self._run(start)
            index = 0
            while True:
                running = sum(1 for i, r in enumerate(rids) if not done[i] and not self._is_aborted(r))
                if running == 0:
                    return  # every row finished or aborted: stop computing
                toks, secs = await self._run(step)
                if toks is None:
                    return
                out: list[int | None] = []
                for i, t in enumerate(toks):
                    if done[i] or self._is_aborted(rids[i]):
                        done[i] = True
                        out.append(None)
                    else:
                        out.append(t)
                        if t is None:
                            done[i] = True
                yield EngineStep(index, out, secs, running, padded if index == 0 else 0)
                index += 1
        finally:
            # Never leave the runtime generator half-run: close it on its own thread, even when the
            # consumer was cancelled (shielded so cancellation does not skip the close).
            if not self._closed:
                try:
                    await asyncio.shield(self._run(close))
                except (asyncio.CancelledError, RuntimeError):
                    pass
            self._forget(rids)

    async def classify(self, texts: list[str], stitch_id: str) -> tuple[list[dict[str, float]], float]:
        def run() -> tuple[list[dict[str, float]], float]:
            t0 = time.perf_counter()
            out = self.rt.classify(texts, stitch_id)
            return out, time.perf_counter() - t0

        return await self._run(run)

    async def profile(self, **kw: Any) -> dict[str, Any]:
        return await self._run(lambda: self.rt.profile(**kw))

    async def check_health(self) -> None:
        if self._closed:
            raise RuntimeError("engine is shut down")
        # the engine thread must answer: a wedged step shows up as a failing health check
        await asyncio.wait_for(self._run(lambda: None), timeout=60)

    async def shutdown(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
