"""The replica's continuous-batching loop without Ray: one StitchEngine, one thread, the tiny chat palette."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from serving.engine_client import EngineError, GenerationRow, RuntimeEngineClient
from serving.engine_thread import EngineThread
from serving.latency import LatencyTracker
from stitchlib.engine import EngineConfig

pytestmark = pytest.mark.timeout(300)

LONG = 120  # tokens: the tiny palette's greedy decode of PROMPT emits no EOS this early (checked below)


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    from training.init_palette import init_palette
    from stitchlib.runtime import PaletteRuntime

    path = init_palette(tmp_path_factory.mktemp("sched") / "chat", task="chat", n_calibration=8, max_len=32,
                        progress=False, n_validation=0)
    return PaletteRuntime.load(path, dtype="bfloat16")  # the serving dtype


def greedy(n: int):
    from stitchlib.runtime import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0.0)


def prompt(engine) -> list[int]:
    return engine.encode(engine.render_chat([{"role": "user", "content": "Say hi."}]))


async def until(pred, timeout_s: float = 10.0) -> bool:
    for _ in range(int(timeout_s / 0.01)):
        if pred():
            return True
        await asyncio.sleep(0.01)
    return pred()


async def collect(stream) -> list[int]:
    try:
        return [t async for t in stream]
    finally:
        stream.close()


def test_mixed_stitches_share_steps_and_match_alone(runtime):
    """Requests on different stitches are decoded in the same steps, and each one's greedy tokens are
    those it gets alone; every step reports its rows per stitch and what it prefilled."""
    a, b = runtime.stitches[1].id, runtime.stitches[-1].id
    steps = []

    async def main():
        eng = RuntimeEngineClient(runtime, EngineConfig(max_slots=4, max_seq_len=256))
        eng.on_step = steps.append
        ids = prompt(eng)
        try:
            alone_a = await collect(eng.stream(GenerationRow("a0", ids, greedy(LONG)), a))
            alone_b = await collect(eng.stream(GenerationRow("b0", ids, greedy(24)), b))
            assert len(alone_a) == LONG and len(alone_b) == 24  # no early EOS: the overlap below is certain
            before = eng.counters()
            steps.clear()
            long_a = eng.stream(GenerationRow("a1", ids, greedy(LONG)), a)
            first = await long_a.__anext__()  # a is running: b joins its steps
            got_b = await collect(eng.stream(GenerationRow("b1", ids, greedy(24)), b))
            rest = await collect(long_a)
            assert got_b == alone_b and [first] + rest == alone_a
            assert long_a.finish_reason == "length"
            return before, eng.counters(), len(ids)
        finally:
            await eng.shutdown()

    before, after, n_prompt = asyncio.run(main())
    assert after["max_stitches_per_step"] == 2
    assert after["mixed_steps"] - before["mixed_steps"] >= 23  # b's 24 tokens, all but its prefill step mixed
    mixed = [s for s in steps if set(s.decode_rows) == {a, b}]
    assert len(mixed) >= 23 and all(s.decode_rows == {a: 1, b: 1} and s.seconds > 0 for s in mixed)
    joined = [s for s in steps if s.prefill_tokens]
    # a's own admission (nothing running), then b's (one row of a decoding in the same step)
    assert [(s.prefill_tokens, s.decode_rows) for s in joined] == [({a: n_prompt}, {}), ({b: n_prompt}, {a: 1})]
    assert all(s.admitted == 1 for s in joined)


def test_chunked_prefill_reports_its_pieces_and_keeps_the_running_row_going(runtime):
    """With prefill_chunk the joiner's prompt is written over several steps: every one of them still
    decodes the running row (one token each), reports the chunk it prefilled, and counts the joiner as
    admitted only in the step that gives its first token. Outputs equal the unchunked ones."""
    a, b = runtime.stitches[1].id, runtime.stitches[-1].id
    steps = []

    async def main():
        eng = RuntimeEngineClient(runtime, EngineConfig(max_slots=2, max_seq_len=256, prefill_chunk=4))
        eng.on_step = steps.append
        ids = prompt(eng)
        try:
            alone_a = await collect(eng.stream(GenerationRow("a0", ids, greedy(LONG)), a))
            alone_b = await collect(eng.stream(GenerationRow("b0", ids, greedy(8)), b))
            steps.clear()
            long_a = eng.stream(GenerationRow("a1", ids, greedy(LONG)), a)
            first = await long_a.__anext__()
            got_b = await collect(eng.stream(GenerationRow("b1", ids, greedy(8)), b))
            rest = await collect(long_a)
            assert got_b == alone_b and [first] + rest == alone_a
            return len(ids)
        finally:
            await eng.shutdown()

    n = asyncio.run(main())
    pieces = [min(4, n - i) for i in range(0, n, 4)]
    a_prefill = [s for s in steps if a in s.prefill_tokens]
    b_prefill = [s for s in steps if b in s.prefill_tokens]
    assert [s.prefill_tokens[a] for s in a_prefill] == pieces
    assert [s.prefill_tokens[b] for s in b_prefill] == pieces
    assert all(s.decode_rows.get(a) == 1 for s in b_prefill)  # a decoded in every step of b's prefill
    assert [s.admitted for s in b_prefill] == [0] * (len(pieces) - 1) + [1]


def test_cancelled_stream_frees_its_slot_while_others_go_on(runtime):
    """Per-row abort: cancelling one consumer drops its row at the next step boundary; the freed slot
    goes to a waiting request at once while the other row keeps decoding, unchanged."""
    a, b, c = runtime.stitches[0].id, runtime.stitches[2].id, runtime.stitches[4].id

    async def main():
        eng = RuntimeEngineClient(runtime, EngineConfig(max_slots=2, max_seq_len=256))
        ids = prompt(eng)
        try:
            alone_b = await collect(eng.stream(GenerationRow("b0", ids, greedy(LONG)), b))
            alone_c = await collect(eng.stream(GenerationRow("c0", ids, greedy(8)), c))
            got_a: list[int] = []

            async def consume_a():
                async for t in eng.stream(GenerationRow("a", ids, greedy(LONG)), a):
                    got_a.append(t)

            task_a = asyncio.create_task(consume_a())
            stream_b = eng.stream(GenerationRow("b", ids, greedy(LONG)), b)
            got_b = [await stream_b.__anext__() for _ in range(5)]
            # both slots are taken: c waits for one
            stream_c = eng.stream(GenerationRow("c", ids, greedy(8)), c)
            assert await until(lambda: eng.occupancy()[1].get(c) == 1)
            assert sum(eng.occupancy()[0].values()) == 2
            task_a.cancel()  # a's consumer goes away (disconnect, timeout)
            with pytest.raises(asyncio.CancelledError):
                await task_a
            n_a = len(got_a)
            got_c = await collect(stream_c)  # a's slot went to c while b kept decoding
            running_b_meanwhile = eng.occupancy()[0].get(b) == 1
            got_b += await collect(stream_b)
            return alone_b, alone_c, got_b, got_c, n_a, running_b_meanwhile, eng.occupancy(), eng.counters()
        finally:
            await eng.shutdown()

    alone_b, alone_c, got_b, got_c, n_a, b_running, occ, counters = asyncio.run(main())
    assert n_a < LONG
    assert got_c == alone_c and got_b == alone_b
    assert b_running  # c finished (8 tokens) while b, with ~100 more to go, still ran
    assert occ == ({}, {}) and counters["failed_steps"] == 0


def test_calls_run_on_the_engine_thread_between_steps_and_idle_blocks(runtime):
    async def main():
        eng = RuntimeEngineClient(runtime, EngineConfig(max_slots=2, max_seq_len=256))
        ids = prompt(eng)
        try:
            stream = eng.stream(GenerationRow("x", ids, greedy(LONG)), runtime.stitches[0].id)
            await stream.__anext__()
            name = await eng._loop.call(lambda: threading.current_thread().name)
            await eng.check_health()  # answered between two steps, while the row is still decoding
            running = eng.occupancy()[0]
            stream.close()
            assert await until(lambda: eng.occupancy() == ({}, {}))
            await asyncio.sleep(0.1)  # a step that had begun before the abort ends
            idle = eng.counters()["steps"]
            await asyncio.sleep(0.3)
            return name, running, idle, eng.counters()["steps"], eng.occupancy()
        finally:
            await eng.shutdown()

    name, running, idle, later, occ = asyncio.run(main())
    assert name == "stitch-engine" and sum(running.values()) == 1
    assert later == idle and occ == ({}, {})  # nothing to do: no steps


def test_failed_step_fails_its_requests_and_the_next_engine_serves(runtime):
    """A step that raises ends every request in it with an EngineError naming the cause (no hang);
    the engine is rebuilt for the next request."""
    from stitchlib.engine.pool import engine_for_runtime

    builds = []

    def make():
        eng = engine_for_runtime(runtime, EngineConfig(max_slots=2, max_seq_len=256))
        if not builds:
            real = eng.step
            calls = {"n": 0}

            def flaky():
                calls["n"] += 1
                if calls["n"] == 3:
                    raise RuntimeError("device fell over")
                return real()

            eng.step = flaky
        builds.append(eng)
        return eng

    async def main():
        from stitchlib.runtime import SamplingParams

        loop = EngineThread(make)
        ids = list(range(5, 25))
        sid = runtime.stitches[0].id
        try:
            s1 = loop.submit("r1", ids, sid, SamplingParams(max_tokens=20, temperature=0.0))
            s2 = loop.submit("r2", ids, runtime.stitches[1].id, SamplingParams(max_tokens=20, temperature=0.0))
            errors = []
            for s in (s1, s2):
                with pytest.raises(EngineError) as e:
                    await collect(s)
                errors.append(str(e.value))
            ok = await collect(loop.submit("r3", ids, sid, SamplingParams(max_tokens=4, temperature=0.0)))
            # a request the engine refuses fails alone, with the engine's reason
            with pytest.raises(EngineError, match="max_seq_len"):
                await collect(loop.submit("r4", ids, sid, SamplingParams(max_tokens=1000)))
            return errors, ok, dict(loop.counters)
        finally:
            await loop.shutdown()

    errors, ok, counters = asyncio.run(main())
    assert all("engine step failed (RuntimeError: device fell over)" in e for e in errors)
    assert len(ok) == 4 and len(builds) == 2 and counters["failed_steps"] == 1


def test_abort_by_id_and_shutdown_end_streams_with_errors(runtime):
    async def main():
        eng = RuntimeEngineClient(runtime, EngineConfig(max_slots=2, max_seq_len=256))
        ids = prompt(eng)
        sid = runtime.stitches[0].id
        s1 = eng.stream(GenerationRow("one", ids, greedy(LONG)), sid)
        await s1.__anext__()
        eng.abort("one")  # e.g. the replica draining
        with pytest.raises(EngineError, match="aborted"):  # chunks queued before the abort may come first
            await collect(s1)
        s2 = eng.stream(GenerationRow("two", ids, greedy(LONG)), sid)
        await s2.__anext__()
        await eng.shutdown()
        with pytest.raises(EngineError, match="shut down"):
            await collect(s2)
        with pytest.raises(EngineError, match="shut down"):
            eng.stream(GenerationRow("three", ids, greedy(2)), sid)
        with pytest.raises(EngineError, match="shut down"):
            await eng.check_health()

    asyncio.run(main())


def test_prefill_share_comes_from_the_engine_steps_and_prices_tokens(runtime):
    """A row decodes while another request's prompt is prefilled in 4-token chunks: the tracker's
    prefill share is the prefill part of those steps over the window (at least the prefill-only
    steps, at most every step that prefilled), a token is priced at step / (1 - share), and once the
    window has passed the share is 0 again."""
    a, b = runtime.stitches[1].id, runtime.stitches[-1].id
    offset = [0.0]
    window = 600.0  # longer than the test: nothing leaves it until the clock is moved

    tracker = LatencyTracker({s.id: (1e-3, {1: 0.01, 4: 0.012}) for s in runtime.stitches}, max_slots=2,
                             prefill_chunk=4, prefill_window_s=window, clock=lambda: time.monotonic() + offset[0])
    steps = []

    def on_step(st):
        steps.append(st)
        tracker.observe_step(st.seconds, st.decode_rows, st.prefill_tokens)

    async def main():
        eng = RuntimeEngineClient(runtime, EngineConfig(max_slots=2, max_seq_len=256, prefill_chunk=4))
        eng.on_step = on_step
        ids = eng.encode(eng.render_chat([{"role": "user", "content": "Say hi, and then say it again."}]))
        try:
            long_a = eng.stream(GenerationRow("a", ids, greedy(60)), a)
            await long_a.__anext__()
            b_out = [t async for t in eng.stream(GenerationRow("b", ids, greedy(4)), b)]
            rest = [t async for t in long_a]
            assert b_out and rest
        finally:
            await eng.shutdown()

    asyncio.run(main())
    with_prefill = [s for s in steps if s.seconds > 0 and s.prefill_tokens]
    prefill_only = [s for s in with_prefill if not s.decode_rows]
    mixed = [s for s in with_prefill if s.decode_rows]
    assert prefill_only and mixed  # a's own prompt alone, then b's chunks beside a's decode
    u = tracker.prefill_share()
    assert sum(s.seconds for s in prefill_only) / window <= u + 1e-12
    assert u <= sum(s.seconds for s in with_prefill) / window + 1e-12
    assert u > sum(s.seconds for s in prefill_only) / window  # the chunks beside a's decode count too

    step = tracker.step_s({a: 1})
    assert tracker.estimate(a, prompt_tokens=8).token_s == pytest.approx(step / (1 - u), rel=1e-9)
    offset[0] += window + 1  # every prefill is now older than the window
    assert tracker.prefill_share() == 0
    assert tracker.estimate(a, prompt_tokens=8).token_s == pytest.approx(step, rel=1e-9)
