"""The engine watchdog without Ray: the tiny chat palette's real engine loop, a step made to hang
through the loop's fault-injection hook (`inject_stall`, what the `fault_injection` config drives)."""
from __future__ import annotations

import asyncio
import time

import pytest

from serving.engine_thread import EngineThread, EngineStuck

pytestmark = [pytest.mark.timeout(120), pytest.mark.chaos]


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    from training.init_palette import init_palette
    from stitchlib.runtime import PaletteRuntime

    path = init_palette(tmp_path_factory.mktemp("wd") / "chat", task="chat", n_calibration=8, max_len=32,
                        progress=False, n_validation=0)
    return PaletteRuntime.load(path, dtype="bfloat16")


def test_stuck_step_fails_its_requests_refuses_new_ones_and_recovers(runtime):
    """Past step_timeout_s the requests in the hung step end with EngineStuck at once (not when the
    step returns), new requests and calls are refused while it hangs, and once it returns the loop
    drops that engine and serves again with a fresh one."""
    from stitchlib.engine import EngineConfig
    from stitchlib.engine.pool import engine_for_runtime
    from stitchlib.runtime import SamplingParams

    builds = []

    def make():
        builds.append(engine_for_runtime(runtime, EngineConfig(max_slots=2, max_seq_len=256)))
        return builds[-1]

    timeout_s, stall_s = 0.5, 3.0
    sid = runtime.stitches[0].id
    ids = list(range(5, 25))

    async def main():
        loop = EngineThread(make, step_timeout_s=timeout_s)
        try:
            warm = [t async for t in loop.submit("w", ids, sid, SamplingParams(max_tokens=2, temperature=0.0))]
            assert len(warm) == 2  # the engine is built and stepping
            streams = [loop.submit(f"r{i}", ids, sid, SamplingParams(max_tokens=200, temperature=0.0))
                       for i in range(2)]
            for s in streams:
                await s.__anext__()  # both are decoding
            t0 = time.monotonic()
            loop.inject_stall(stall_s)
            errors = []
            for s in streams:
                with pytest.raises(EngineStuck) as e:
                    async for _ in s:
                        pass
                errors.append(str(e.value))
            failed_after = time.monotonic() - t0
            assert loop.stuck is not None
            with pytest.raises(EngineStuck):
                loop.submit("during", ids, sid, SamplingParams(max_tokens=2))
            with pytest.raises(EngineStuck):
                await loop.call(lambda: None)
            running_while_stuck = dict(loop.running)
            for _ in range(int((stall_s + 5) / 0.05)):  # the step returns after stall_s
                if loop.stuck is None:
                    break
                await asyncio.sleep(0.05)
            recovered_after = time.monotonic() - t0
            after = [t async for t in loop.submit("after", ids, sid, SamplingParams(max_tokens=4, temperature=0.0))]
            return errors, failed_after, recovered_after, running_while_stuck, after, dict(loop.counters)
        finally:
            await loop.shutdown()

    errors, failed_after, recovered_after, running_while_stuck, after, counters = asyncio.run(main())
    assert all("step_timeout_s" in e for e in errors), errors
    # the watchdog's verdict (timeout + its poll period), far from the stall's end
    assert failed_after < stall_s - 1.0, failed_after
    assert running_while_stuck == {}
    assert recovered_after >= stall_s - 0.5
    assert len(after) == 4 and len(builds) == 2  # a fresh engine served the next request
    assert counters["stuck_steps"] == 1 and counters["failed_steps"] == 0
