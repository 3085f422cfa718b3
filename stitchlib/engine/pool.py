"""Engines for `PaletteRuntime`: its `generate_steps` runs on `StitchEngine`.

A runtime owns a small pool of idle engines (cache allocation and CUDA graph captures are paid once,
not per call); a call takes an idle engine big enough for it or builds one, and gives it back when
its generator is closed or exhausted. Concurrent calls get separate engines, so one call's step
never advances another call's rows. Serving that wants mixed-stitch continuous batching across
requests should hold one `StitchEngine` (see `engine_for_runtime`) and drive `add_request` /
`step` / `abort` itself.
"""
from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING

from .core import EngineConfig, StitchEngine

from ..types import SamplingParams

if TYPE_CHECKING:
    from ..runtime import PaletteRuntime

_MIN_SEQ = 256
_MIN_SLOTS = 8


def engine_for_runtime(rt: "PaletteRuntime", config: EngineConfig | None = None) -> StitchEngine:
    """A new engine over the runtime's model, serving its deployed stitches, stopping at its EOS ids.
    A `max_seq_len` given in `config` must fit the runtime's context; the default is the context at most."""
    cfg = config or EngineConfig()
    if "max_seq_len" not in cfg.model_fields_set:
        cfg = cfg.model_copy(update={"max_seq_len": min(cfg.max_seq_len, rt.max_context)})
    elif cfg.max_seq_len > rt.max_context:
        raise ValueError(f"max_seq_len {cfg.max_seq_len} is over the palette's context of {rt.max_context} positions")
    if cfg.stitches is None:
        cfg = cfg.model_copy(update={"stitches": [s.id for s in rt.stitches]})
    return StitchEngine(rt.model, cfg, eos_token_ids=frozenset(rt.eos_token_ids))


class EnginePool:
    """A runtime's idle engines (the runtime owns one: `PaletteRuntime._engines`)."""

    def __init__(self, rt: "PaletteRuntime", keep: int = 2) -> None:
        self._rt = weakref.ref(rt)
        self._idle: list[StitchEngine] = []
        self._lock = threading.Lock()
        self.keep = keep

    def acquire(self, rows: int, seq: int) -> StitchEngine:
        with self._lock:
            for e in self._idle:
                if e.cfg.max_slots >= rows and e.cfg.max_seq_len >= seq:
                    self._idle.remove(e)
                    return e
        rt = self._rt()
        slots = max(_MIN_SLOTS, rows)
        length = min(rt.max_context, max(_MIN_SEQ, 1 << (seq - 1).bit_length()))
        return engine_for_runtime(rt, EngineConfig(max_slots=slots, max_seq_len=max(length, seq)))

    def release(self, engine: StitchEngine) -> None:
        for rid in list(engine.requests):
            engine.abort(rid)
        with self._lock:
            self._idle.append(engine)
            # keep the biggest ones: they serve every smaller call
            self._idle.sort(key=lambda e: (e.cfg.max_slots * e.cfg.max_seq_len), reverse=True)
            del self._idle[self.keep:]

    def generate_steps(self, prompts: list[list[int]], stitch_id: str,
                       params: list[SamplingParams]) -> Iterator[list[int | None]]:
        """`PaletteRuntime.generate_steps` on an idle engine of this pool: one yield per step, None for
        finished rows; the engine goes back to the pool when the generator ends or is closed."""
        longest = max(len(p) + sp.max_tokens for p, sp in zip(prompts, params))
        engine = self.acquire(len(prompts), longest)
        try:
            rids = [engine.add_request(p, stitch_id, sp) for p, sp in zip(prompts, params)]
            while engine.has_unfinished():
                toks = engine.step()
                aborted = yield [toks.get(r) for r in rids]
                for i in aborted or ():  # gen.send([row, ...]): those rows stop now and free their slots
                    engine.abort(rids[i])
        finally:
            self.release(engine)
