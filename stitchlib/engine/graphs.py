"""Making the decode step cheap to launch: CUDA graphs per batch shape, optional compiled blocks.

A decode step of a given batch composition (the plan: every row's stitch, padded to a batch-size
bucket by the engine) and attention span (`kv_len`, bucketed) has static shapes, so it is captured
once in a CUDA graph and replayed every step after; the inputs (last tokens and positions) are read
from the engine's persistent device buffers, and the cache binding is baked into the graph. A new
composition captures a new graph; graphs are kept in an LRU.

`compile_layer_fn` compiles the one function that calls an HF decoder block. Every block shares the
code (the cache binds each block's buffers, so no per-layer int is traced), and shapes are dynamic
(rows, attention span, hidden size), so dynamo compiles it a couple of times (batch 1 is
specialised) and reuses it for every block of both anchors; inductor fuses the norms, rotary and
elementwise glue that otherwise cost one kernel each. It is compiled without cudagraphs (`mode="max-autotune-no-cudagraphs"` or default): the
whole step is captured by `DecodeGraphs` instead, which keeps weights and caches as they are.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..types import CUDAGRAPH_COMPILE_MODES
from .plan import RoutePlan
from .runner import StitchRunner, call_layer

log = logging.getLogger(__name__)


_compiled: dict[tuple[str | None, Callable], Callable] = {}


def compile_layer_fn(mode: str | None = None, fn: Callable = call_layer) -> Callable:
    """The compiled block call `fn` (the HF call, or the quantized fast block) for `mode`, one per
    process: every engine shares its compiled graphs (a second torch.compile wrapper would compile
    everything again)."""
    if (mode, fn) in _compiled:
        return _compiled[(mode, fn)]
    if mode in CUDAGRAPH_COMPILE_MODES:  # EngineConfig refuses them; a direct caller gets the same answer
        raise ValueError(f"compile mode {mode!r} captures its own CUDA graphs (copying inputs every call); "
                         "use None, 'default' or 'max-autotune-no-cudagraphs': DecodeGraphs captures the step")
    import torch._dynamo

    # Expected: ~4-8 graphs (per anchor: batch 1 and dynamic rows, storage offset 0 or not); the
    # default limit of 8 would silently fall back to eager past that, so leave headroom.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    _compiled[(mode, fn)] = torch.compile(fn, mode=mode, dynamic=True, fullgraph=False)
    return _compiled[(mode, fn)]


@dataclass
class _Graph:
    replay: Callable[[], None]  # re-runs the captured step: writes `logits`
    logits: torch.Tensor  # [n, V], written by every replay
    plan: RoutePlan  # keeps the plan's index tensors alive: the graph reads their addresses


# capture(step) -> (replay, output): run `step` once the way the replays will run it and return a
# callable that repeats it, writing the same output tensor. `cuda_capture` is the real one; tests
# on a machine without CUDA pass an eager stand-in to exercise everything around it.
Capture = Callable[[Callable[[], torch.Tensor]], tuple[Callable[[], None], torch.Tensor]]


def eager_capture(step: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
    """Stand-in for `cuda_capture` where there is no CUDA (tests, `engine_gpu.py --tiny` on CPU): the
    'replay' re-runs the step eagerly into the same output tensor, as a graph replay rewrites its
    captured output, so everything around the capture runs as it would on a GPU."""
    out = step()

    def replay() -> None:
        out.copy_(step())

    return replay, out


def cuda_capture(step: Callable[[], torch.Tensor], pool) -> tuple[Callable[[], None], torch.Tensor]:
    # Warm-up on a side stream (first calls of compiled code compile and autotune there, which
    # must not happen under capture). It writes the same K/V the replay writes: idempotent.
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = step()
    return graph.replay, out


class DecodeGraphs:
    """One CUDA graph per (plan, kv_len), replayed on the engine's persistent input buffers.
    Counts what it did (`stats()`), so a benchmark can record captures, replays and evictions."""

    def __init__(self, runner: StitchRunner, tokens: torch.Tensor, lengths: torch.Tensor, *,
                 max_graphs: int = 32, capture: Capture | None = None) -> None:
        self.runner, self.tokens, self.lengths = runner, tokens, lengths
        self.max_graphs = max_graphs
        if capture is None:
            pool = torch.cuda.graph_pool_handle()  # one memory pool shared by every graph of this engine
            capture = lambda step: cuda_capture(step, pool)  # noqa: E731
        self.capture = capture
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.captures = self.replays = self.evictions = self.failed_captures = 0
        self.capture_s = 0.0  # host seconds spent capturing (warm-up run included)

    def stats(self) -> dict:
        return {"captures": self.captures, "replays": self.replays, "evictions": self.evictions,
                "failed_captures": self.failed_captures, "capture_s": self.capture_s, "resident": len(self.graphs)}

    def _step(self, plan: RoutePlan, kv_len: int) -> torch.Tensor:
        n = plan.n
        return self.runner.forward(self.tokens[:n, None], self.lengths[:n, None], slice(0, n), plan, kv_len)

    def run(self, plan: RoutePlan, kv_len: int) -> torch.Tensor:
        key = (plan.key, kv_len)
        g = self.graphs.get(key)
        if g is None:
            g = self._capture(plan, kv_len)
            self.graphs[key] = g
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
                self.evictions += 1
        else:
            self.graphs.move_to_end(key)
        g.replay()
        self.replays += 1
        return g.logits

    def _capture(self, plan: RoutePlan, kv_len: int) -> _Graph:
        t = time.perf_counter()
        try:
            replay, logits = self.capture(lambda: self._step(plan, kv_len))
        except Exception:  # not BaseException: a benchmark's time-box interrupt is no failed capture
            self.failed_captures += 1
            raise
        finally:
            self.capture_s += time.perf_counter() - t
        self.captures += 1
        log.debug("captured decode graph %d: %d rows, kv_len %d", self.captures, plan.n, kv_len)
        return _Graph(replay, logits, plan)
