"""The engine thread: ONE `stitchlib.engine.StitchEngine` per replica, driven by ONE thread (continuous
batching across requests).

Requests on any stitch join the engine between steps and leave it when they finish or are aborted;
one engine step decodes every running row whatever its stitch (a decoder block runs once for all
rows that need it). The thread owns the engine (it is single-threaded) and loops:

    drain the inbox (calls, aborts, adds) -> engine.step() -> post the tokens to their requests

Everything else reaches it through that inbox, from the asyncio side:
  * `submit()` queues a request and returns its `GenerationStream` (an async iterator of token ids);
    the thread posts each step's tokens with ONE `loop.call_soon_threadsafe` per event loop.
  * closing a stream (stop string, disconnect, timeout: the consumer is cancelled) queues an abort:
    the row leaves the engine at the next step boundary and its slot is free for the next admission,
    while the other rows go on.
  * `call(fn)` runs any other work on the thread between two steps (classification, profiling, the
    health check), so the model is only ever touched by this thread.
  * with nothing to do the thread blocks on a condition variable: an idle replica uses no CPU.

A step that raises fails every request in the engine with an `EngineError` naming the cause (never a
hang) and the engine is rebuilt for the next request. A step that does not return (a wedged kernel,
a deadlock, a swapped-out machine) is caught by the watchdog when `step_timeout_s` is set: past it,
every request in the engine fails at once with `EngineStuck` (clients get a clean 503 instead of
waiting out their timeout), new requests and calls are refused with `EngineStuck`, and the health
check fails (so Serve replaces a replica whose step never returns); if the step does return, its
output is dropped with the engine (rebuilt for the next request) and the loop serves again. Per step the thread reports a `StepStats` (its
seconds, the rows it decoded per stitch, the prompt tokens it prefilled per stitch) to `on_step`,
called on the event loop before that step's tokens are handed out, for the latency model.
"""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from stitchlib.types import SamplingParams

if TYPE_CHECKING:
    from stitchlib.engine import StepOutput, StitchEngine
    from stitchlib.sampling import TokenLogprob

log = logging.getLogger("ray.serve")

__all__ = ["EngineError", "EngineThread", "EngineStuck", "GenerationStream", "StepStats"]


class EngineError(RuntimeError):
    """A generation could not be completed by the engine; the message says why."""


class EngineStuck(EngineError):
    """An engine step ran past the watchdog's `step_timeout_s`: retryable (HTTP 503), not the request's fault."""


@dataclass(frozen=True)
class StepStats:
    """One engine step (seconds == 0: no step, only the load changed, e.g. after an abort)."""

    seconds: float  # compute time of the step on the engine thread
    decode_rows: dict[str, int]  # stitch -> rows decoded (the rows in slots when the step began)
    prefill_tokens: dict[str, int]  # stitch -> padded prompt tokens prefilled in it (whole prompts or chunks)
    admitted: int  # requests that got their first token in this step
    finished: int  # requests that hit a stop token or max_tokens in this step
    running: dict[str, int] = field(default_factory=dict)  # stitch -> rows in the engine after the step
    waiting: dict[str, int] = field(default_factory=dict)  # stitch -> requests waiting for a slot after it


@dataclass
class _Seq:
    """One generation request, shared by the event loop (queue) and the engine thread (rid)."""

    request_id: str
    stitch: str
    prompt: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    rid: int | None = None  # engine request id (engine thread)
    closed: bool = False  # the consumer is gone (event loop); the thread skips or aborts it
    done: bool = False  # finished, failed or closed (event loop)
    started: float | None = None  # perf_counter at the start of the step that admitted it


class GenerationStream:
    """The tokens of one request as the engine produces them: `async for tok in stream`.

    Ends after the token that finished the request (`finish_reason` is then "stop" or "length");
    raises `EngineError` if the engine failed or aborted it. Cancelling the consumer while it waits,
    or calling `close()`, aborts the request in the engine at the next step boundary."""

    def __init__(self, owner: "EngineThread", seq: _Seq) -> None:
        self._owner = owner
        self._seq = seq
        self.finish_reason: str | None = None
        self._error: BaseException | None = None
        # when the request's SamplingParams asked for them (stitchlib.sampling.TokenLogprob):
        self.logprobs: list[TokenLogprob] = []  # one per token yielded so far
        self.prompt_logprobs: list[TokenLogprob | None] | None = None  # set with the first token

    @property
    def request_id(self) -> str:
        return self._seq.request_id

    @property
    def started(self) -> float | None:
        """perf_counter when the request got its engine slot (None while it waits)."""
        return self._seq.started

    def __aiter__(self) -> "GenerationStream":
        return self

    async def __anext__(self) -> int:
        if self.finish_reason is not None:
            raise StopAsyncIteration
        if self._error is not None:
            raise self._error
        if self._seq.closed and self._seq.queue.empty():
            raise EngineError(f"request {self.request_id} was closed")
        try:
            item = await self._seq.queue.get()
        except asyncio.CancelledError:
            self.close()
            raise
        if isinstance(item, BaseException):
            self._error = item
            raise item
        tok, finish, lp, prompt_lp = item
        if finish is not None:
            self.finish_reason = finish
        if lp is not None:
            self.logprobs.append(lp)
        if prompt_lp is not None:
            self.prompt_logprobs = prompt_lp
        return tok

    def close(self) -> None:
        """Abort the request if it is still in the engine (idempotent; call from the event loop)."""
        self._owner._close(self._seq)


class EngineThread:
    """The engine thread and its inbox. See the module docstring.

    make_engine: builds the engine on the thread (lazily, at the first request, and again after a
    failed step). It must offer StitchEngine's `add_request`, `step`, `abort`, `has_unfinished`,
    `rows`, `waiting`, `prefilling` and `requests`; `step` returns a `stitchlib.engine.StepOutput`."""

    def __init__(self, make_engine: Callable[[], StitchEngine], *, on_step: Callable[[StepStats], None] | None = None,
                 thread_init: Callable[[], None] | None = None, name: str = "stitch-engine",
                 step_timeout_s: float | None = None) -> None:
        self._make_engine = make_engine
        self.on_step = on_step
        self._thread_init = thread_init
        self._cv = threading.Condition()
        self._adds: list[_Seq] = []
        self._aborts: list[_Seq] = []
        self._calls: list[tuple[cf.Future, Callable[..., Any], tuple]] = []
        self._closed = False
        self._engine: StitchEngine | None = None
        self._by_rid: dict[int, _Seq] = {}  # engine thread only
        self._by_request: dict[str, _Seq] = {}  # event loop only
        # Published by the engine thread (whole-object assignments): what the engine holds now, and
        # counters of the steps it ran (mixed = decoding rows of more than one stitch).
        self.running: dict[str, int] = {}
        self.waiting: dict[str, int] = {}
        self.counters = {"steps": 0, "mixed_steps": 0, "max_stitches_per_step": 0, "max_rows_per_step": 0,
                         "failed_steps": 0, "stuck_steps": 0}
        # Watchdog state. `_step_lock` orders a step's end against the watchdog's verdict: either the
        # step returned first (the watchdog sees no step) or the watchdog failed it first (the engine
        # thread sees `_stuck` when the step returns and drops its output).
        self.step_timeout_s = step_timeout_s
        self._step_lock = threading.Lock()
        self._step_t0: float | None = None  # perf_counter at the start of the running step (engine thread)
        self._stuck: str | None = None  # why the loop is wedged (set by the watchdog, cleared by the thread)
        self._stall_s = 0.0  # fault injection: the next step first sleeps this long (see `inject_stall`)
        self._unstall = threading.Event()  # wakes an injected stall at shutdown
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        if step_timeout_s is not None:
            threading.Thread(target=self._watchdog, name=name + "-watchdog", daemon=True).start()

    # ---- event-loop side -----------------------------------------------------------------------
    def submit(self, request_id: str, prompt_ids: list[int], stitch_id: str,
               params: SamplingParams) -> GenerationStream:
        """Queue a request; it joins the engine at the next step boundary."""
        if request_id in self._by_request:
            raise ValueError(f"request id {request_id!r} is already in flight")
        seq = _Seq(request_id, stitch_id, list(prompt_ids), params, asyncio.get_running_loop(), asyncio.Queue())
        with self._cv:
            if self._closed:
                raise EngineError("the engine is shut down")
            if self._stuck is not None:
                raise EngineStuck(self._stuck)
            self._by_request[request_id] = seq
            self._adds.append(seq)
            self._cv.notify()
        return GenerationStream(self, seq)

    def abort(self, request_id: str) -> bool:
        """Abort a request from outside its consumer: its stream raises EngineError. -> whether it was live."""
        seq = self._by_request.get(request_id)
        if seq is None:
            return False
        self._close(seq)
        seq.queue.put_nowait(EngineError(f"request {request_id} was aborted"))
        return True

    def _close(self, seq: _Seq) -> None:
        if seq.done:
            return
        seq.done = seq.closed = True
        self._by_request.pop(seq.request_id, None)
        with self._cv:
            self._aborts.append(seq)
            self._cv.notify()

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn(*args) on the engine thread between two steps. Cancelling the await before it runs skips it."""
        fut: cf.Future = cf.Future()
        with self._cv:
            if self._closed:
                raise EngineError("the engine is shut down")
            if self._stuck is not None:
                raise EngineStuck(self._stuck)
            self._calls.append((fut, fn, args))
            self._cv.notify()
        return await asyncio.wrap_future(fut)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closed

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def stuck(self) -> str | None:
        """Why the loop is wedged (a step past `step_timeout_s` has not returned), else None."""
        return self._stuck

    def inject_stall(self, seconds: float) -> None:
        """FAULT INJECTION, for tests: the next engine step first sleeps `seconds` on the engine thread
        (inside the step, as a wedged kernel would). Shutdown wakes it."""
        self._stall_s = float(seconds)

    async def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop after the current step: pending calls and every request fail with EngineError."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._unstall.set()
        await asyncio.to_thread(self._thread.join, timeout_s)

    # ---- watchdog thread -----------------------------------------------------------------------
    def _watchdog(self) -> None:
        limit = float(self.step_timeout_s)  # type: ignore[arg-type]
        while not self._closed:
            time.sleep(min(0.25, limit / 4))
            with self._step_lock:
                t0 = self._step_t0
                if t0 is None or self._stuck is not None or time.perf_counter() - t0 <= limit:
                    continue
                self._stuck = (f"an engine step has run for over {limit:g}s (step_timeout_s); the requests in it "
                               f"were failed")
                # The engine thread is inside eng.step(): it touches neither _by_rid nor the inbox now.
                seqs = list(self._by_rid.values())
            log.error("engine watchdog: %s", self._stuck)
            err = EngineStuck(self._stuck)
            with self._cv:
                adds, calls = self._adds, self._calls
                self._adds, self._calls = [], []
            for fut, _, _ in calls:
                if fut.set_running_or_notify_cancel():
                    fut.set_exception(err)
            self.counters = {**self.counters, "stuck_steps": self.counters["stuck_steps"] + 1}
            self.running, self.waiting = {}, {}  # nobody is served by those rows any more
            self._post_errors(seqs + [s for s in adds if not s.closed], err)

    def _deliver(self, items: list[tuple[_Seq, Any, str | None]], stats: StepStats | None, t0: float) -> None:
        """On the event loop: the step's observation first, then each request's token (or error)."""
        if stats is not None and self.on_step is not None:
            try:
                self.on_step(stats)
            except Exception:  # observers must never break delivery
                log.exception("step observer failed")
        for seq, item, finish in items:
            if seq.started is None:
                seq.started = t0
            if seq.done:  # closed by its consumer meanwhile
                continue
            if isinstance(item, BaseException):
                seq.queue.put_nowait(item)
            else:  # item: (token, its logprob or None, the prompt logprobs or None)
                seq.queue.put_nowait((item[0], finish, item[1], item[2]))
            if finish is not None or isinstance(item, BaseException):
                seq.done = True
                self._by_request.pop(seq.request_id, None)

    # ---- engine-thread side --------------------------------------------------------------------
    def _busy(self) -> bool:
        return self._engine is not None and self._engine.has_unfinished()

    def _run(self) -> None:
        if self._thread_init is not None:
            self._thread_init()
        while True:
            with self._cv:
                while not (self._adds or self._aborts or self._calls or self._closed or self._busy()):
                    self._cv.wait()
                adds, aborts, calls = self._adds, self._aborts, self._calls
                self._adds, self._aborts, self._calls = [], [], []
                closed = self._closed
            if closed:
                self._stop(adds, calls)
                return
            try:
                for fut, fn, args in calls:
                    if fut.set_running_or_notify_cancel():
                        try:
                            fut.set_result(fn(*args))
                        except BaseException as e:  # handed to the caller
                            fut.set_exception(e)
                changed = self._apply(aborts, adds)
                if self._busy():
                    self._step()
                elif changed:
                    self._post_load(aborts + adds)
            except Exception as e:  # a bug in this loop: fail what is in flight, keep serving
                log.exception("engine loop error")
                self._fail_all(EngineError(f"engine loop error: {type(e).__name__}: {e}"), adds)

    def _apply(self, aborts: list[_Seq], adds: list[_Seq]) -> bool:
        """Aborts first (their slots are free for this step's admissions), then the new requests."""
        changed = False
        for seq in aborts:
            if seq.rid is not None and self._by_rid.pop(seq.rid, None) is not None:
                self._engine.abort(seq.rid)
                changed = True
        fresh = [s for s in adds if not s.closed]
        if fresh and self._engine is None:
            try:
                self._engine = self._make_engine()
            except Exception as e:
                log.exception("building the engine failed")
                self._post_errors(fresh, EngineError(f"cannot build the engine: {type(e).__name__}: {e}"))
                return changed
        for seq in fresh:
            try:
                seq.rid = self._engine.add_request(seq.prompt, seq.stitch, seq.params)
            except Exception as e:  # this request only (e.g. prompt + max_tokens over the slot length)
                self._post_errors([seq], EngineError(f"the engine refused the request: {e}"))
                continue
            self._by_rid[seq.rid] = seq
            changed = True
        self._publish_load()
        return changed

    def _publish_load(self) -> None:
        eng = self._engine
        if eng is None:
            self.running, self.waiting = {}, {}
            return
        self.running = dict(Counter(r.stitch.id for r in eng.rows))
        self.waiting = dict(Counter(r.stitch.id for r in eng.waiting))

    def _step(self) -> None:
        eng = self._engine
        first = {r.rid for r in eng.waiting} | {r.rid for r in eng.prefilling}
        t0 = time.perf_counter()
        with self._step_lock:
            self._step_t0 = t0
        try:
            if self._stall_s > 0:  # fault injection (inject_stall): a step that hangs
                stall, self._stall_s = self._stall_s, 0.0
                self._unstall.wait(stall)
            out: StepOutput = eng.step()
        except Exception as e:
            with self._step_lock:
                self._step_t0 = None
                stuck = self._stuck
            if stuck is not None:  # already failed by the watchdog
                self._recover(stuck)
                return
            log.exception("engine step failed")
            self.counters = {**self.counters, "failed_steps": self.counters["failed_steps"] + 1}
            self._fail_all(EngineError(f"the engine step failed ({type(e).__name__}: {e}); the requests in it "
                                       f"were dropped"))
            return
        with self._step_lock:
            self._step_t0 = None
            stuck = self._stuck
        if stuck is not None:  # the watchdog failed this step's requests while it ran: drop its output
            self._recover(stuck)
            return
        seconds = time.perf_counter() - t0
        finished, decode = out.finished, out.decoded
        admitted = sum(rid in first for rid in out.tokens)
        self._publish_load()
        stats = StepStats(seconds, decode, out.prefilled, admitted, len(finished), self.running, self.waiting)
        c = self.counters
        self.counters = {**c, "steps": c["steps"] + 1, "mixed_steps": c["mixed_steps"] + (len(decode) > 1),
                         "max_stitches_per_step": max(c["max_stitches_per_step"], len(decode)),
                         "max_rows_per_step": max(c["max_rows_per_step"], sum(decode.values()))}
        groups: dict[asyncio.AbstractEventLoop, list] = {}
        lps, prompt_lps = out.logprobs, out.prompt_logprobs
        for rid, tok in out.tokens.items():
            seq = self._by_rid[rid]
            fin = finished.get(rid)
            if fin is not None:
                del self._by_rid[rid]
            groups.setdefault(seq.loop, []).append((seq, (tok, lps.get(rid), prompt_lps.get(rid)), fin))
        if not groups and self._by_rid:  # a step that only prefilled chunks: its stats still count
            groups[next(iter(self._by_rid.values())).loop] = []
        self._post(groups, stats, t0)

    def _post(self, groups: dict[asyncio.AbstractEventLoop, list], stats: StepStats | None, t0: float) -> None:
        for i, (loop, items) in enumerate(groups.items()):
            try:
                loop.call_soon_threadsafe(self._deliver, items, stats if i == 0 else None, t0)
            except RuntimeError:  # that event loop is closed: nobody is waiting for these
                pass

    def _post_errors(self, seqs: list[_Seq], err: EngineError) -> None:
        groups: dict[asyncio.AbstractEventLoop, list] = {}
        for seq in seqs:
            groups.setdefault(seq.loop, []).append((seq, err, None))
        self._post(groups, None, time.perf_counter())

    def _post_load(self, seqs: list[_Seq]) -> None:
        """No step followed a change (e.g. the last running row was aborted): report the new load."""
        if self.on_step is None or not seqs:
            return
        stats = StepStats(0.0, {}, {}, 0, 0, self.running, self.waiting)
        try:
            seqs[0].loop.call_soon_threadsafe(self._deliver, [], stats, time.perf_counter())
        except RuntimeError:
            pass

    def _recover(self, why: str) -> None:
        """A step the watchdog gave up on returned: drop the engine and its rows (their requests were
        already failed), then take requests again."""
        log.warning("engine step returned after the watchdog failed it; rebuilding the engine")
        self._fail_all(EngineStuck(why))
        with self._step_lock:
            self._stuck = None

    def _fail_all(self, err: EngineError, extra: list[_Seq] = ()) -> None:
        """Fail every request in the engine (and `extra`), and drop the engine: the next request gets a new one."""
        seqs = list(self._by_rid.values()) + [s for s in extra if s.rid is None]
        self._by_rid.clear()
        self._engine = None
        self._publish_load()
        self._post_errors(seqs, err)

    def _stop(self, adds: list[_Seq], calls: list) -> None:
        err = EngineError("the engine is shut down")
        for fut, _, _ in calls:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(err)
        if self._engine is not None:
            for rid in list(self._by_rid):
                try:
                    self._engine.abort(rid)
                except Exception:
                    pass
        self._fail_all(err, adds)
