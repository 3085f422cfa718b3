"""Fast stitched decoding: static KV caches, mixed-stitch continuous batching, CUDA graphs, profiling.

    engine = StitchEngine(model, EngineConfig(max_slots=8, max_seq_len=1024), eos_token_ids={eos})
    rid = engine.add_request(prompt_ids, "s5-l8", SamplingParams(max_tokens=64))
    while engine.has_unfinished():
        out = engine.step()                              # a StepOutput, {rid: token} as a mapping:
        for rid, tok in out.items(): ...                 # one token per active request
        out.finished                                     # {rid: "stop" | "length"} of this step (also
                                                         # decoded, prefilled, logprobs, prompt_logprobs)
    engine.abort(rid)

See benchmarks/ENGINE.md for the design, numbers and the GPU benchmark.
"""
from .cache import StaticKVCache
from .core import EngineConfig, Request, StepOutput, StitchEngine
from .plan import RoutePlan, build_plan
from .runner import StitchRunner

__all__ = ["EngineConfig", "Request", "RoutePlan", "StaticKVCache", "StepOutput", "StitchEngine", "StitchRunner", "build_plan"]
