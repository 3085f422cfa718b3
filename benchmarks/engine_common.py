"""Shared helpers of the engine benchmarks (engine_cpu_*.py, engine_gpu.py): environment record,
memory bandwidth, per-stitch weight bytes, timing with medians, result files.

Only torch + transformers + stitchlib: the GPU machine has nothing else.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"


def env_info(device: torch.device | str) -> dict:
    from stitchlib.engine.profile import device_info

    info = device_info(device)
    info["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    try:
        info["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                     text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git"] = None
    if hasattr(os, "getloadavg"):
        info["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    info["cpu_count"] = os.cpu_count()
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def median(xs) -> float:
    return float(statistics.median(xs))


def device_seconds(fn, device: torch.device, repeats: int) -> float:
    """Fastest of `repeats` runs of fn: CUDA events on a GPU (device time, no host launch gaps),
    perf_counter on CPU."""
    fn()  # warm-up
    if device.type != "cuda":
        return min(timed(fn, device) for _ in range(repeats))
    best = float("inf")
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        best = min(best, a.elapsed_time(b) / 1e3)
    return best


@torch.no_grad()
def read_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 5) -> dict:
    """Bytes/s of streaming memory: a bf16 reduction (reads N bytes) and a copy (reads N, writes N),
    over random data (constant data can be served faster than real weights). The floor uses the
    larger figure, i.e. the stricter target."""
    g = torch.Generator(device=device).manual_seed(0)
    src = torch.randn(nbytes // 2, dtype=torch.bfloat16, device=device, generator=g)
    dst = torch.empty_like(src)
    t_sum = device_seconds(lambda: src.sum(dtype=torch.float32), device, repeats)
    t_copy = device_seconds(lambda: dst.copy_(src), device, repeats)
    del src, dst
    read = nbytes / t_sum
    copy = 2 * nbytes / t_copy
    return {"bytes": nbytes, "data": "random bf16", "timer": "cuda events" if device.type == "cuda" else "perf_counter",
            "read_GBps": read / 1e9, "copy_GBps": copy / 1e9, "used_GBps": max(read, copy) / 1e9}


def decode_bytes(model, stitch_id: str, bytes_per_param: float) -> int:
    """Weight bytes one decode step reads: the stitch's parameters minus its embedding table (a
    decode step reads one row of it)."""
    st = model.get(stitch_id)
    cost = model.cost(stitch_id)
    emb = (model.small_anchor if st.uses_small else model.large_anchor).stats.embed_params
    return int((cost.params - emb) * bytes_per_param)


def param_bytes(module: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in module.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


def prepare_for_serving(model, dtype: torch.dtype) -> None:
    """What PaletteRuntime does after loading a palette: merge LoRA, cast PST tensors, eval."""
    model.merge_lora_()
    model.pst_to_(dtype)
    model.eval()


def load_serving_pair(small: str, large: str, dtype: str = "bfloat16"):
    """The anchor pair as a StitchedLM in the state PaletteRuntime serves it (PST at its init)."""
    from stitchlib.anchors import load_anchor
    from stitchlib.model import StitchedLM

    model = StitchedLM(load_anchor(small, dtype=dtype, progress=False), load_anchor(large, dtype=dtype, progress=False))
    prepare_for_serving(model, getattr(torch, dtype))
    return model


def add_cpu_pair_args(ap) -> None:
    """The anchor pair and thread count every CPU engine benchmark takes."""
    ap.add_argument("--small", default="qwen2.5-coder-0.5b")
    ap.add_argument("--large", default="qwen2.5-coder-1.5b")
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads; 1 by default: on 2 cores shared with other jobs, 2 OpenMP threads "
                         "spin-wait and run 5-10x slower")


def start_cpu_run(args) -> tuple[float, dict, "object"]:
    """Set the thread count, record the environment, load the pair. -> (start time, env, model)."""
    torch.set_num_threads(args.threads)
    t0 = time.time()
    env = env_info("cpu")
    return t0, env, load_serving_pair(args.small, args.large)


def write_result(name: str, data: dict, out_dir: str | Path | None = None) -> Path:
    d = Path(out_dir) if out_dir else RESULTS
    d.mkdir(parents=True, exist_ok=True)
    p = d / f"{name}.json"
    p.write_text(json.dumps(data, indent=2))
    return p


def is_strictly_increasing(xs: list[float]) -> tuple[bool, list[int]]:
    bad = [i for i in range(1, len(xs)) if not xs[i] > xs[i - 1]]
    return not bad, bad


# ---- measurements shared by the CPU and GPU scripts -------------------------------------------------
@torch.no_grad()
def stitch_latency(model, stitch_ids, *, prompt: list[int], steps: int, rounds: int, config_kw: dict,
                   burst: bool = False) -> dict[str, float]:
    """Median decode-step seconds of one request per stitch (batch 1). burst=True times
    `decode_burst(steps)` (no host read per step: device-bound) instead of individual synced steps."""
    from stitchlib.engine import EngineConfig, StitchEngine
    from stitchlib.runtime import SamplingParams

    engine = StitchEngine(model, EngineConfig(**{"max_slots": 1, "max_seq_len": len(prompt) + steps + 8,
                                                 **config_kw}))
    dev = engine.device
    per: dict[str, list[float]] = {s: [] for s in stitch_ids}
    for _ in range(rounds):  # rounds interleave stitches so load drift hits all of them alike
        for sid in stitch_ids:
            rid = engine.add_request(prompt, sid, SamplingParams(max_tokens=steps + 4, temperature=0.0))
            engine.step()  # prefill
            engine.decode_burst(1)  # warm-up: graph capture / compile on first use
            if burst:
                per[sid].append(timed(lambda: engine.decode_burst(steps), dev) / steps)
            else:
                per[sid] += [timed(lambda: engine.decode_burst(1), dev) for _ in range(steps)]
            engine.abort(rid)
    return per


def pick_stitches(model, n: int, how: str) -> list[str]:
    """n stitches by decode bytes: 'adjacent' = n consecutive around the median stitch, 'spread' =
    evenly spaced over the whole palette (anchors included)."""
    order = sorted((s.id for s in model.stitches), key=lambda sid: decode_bytes(model, sid, 2))
    if how == "adjacent":
        inner = [sid for sid in order if model.get(sid).kind == "stitch"]
        start = max(0, len(inner) // 2 - n // 2)
        return inner[start:start + n]
    idx = sorted({round(i * (len(order) - 1) / (n - 1)) for i in range(n)})
    return [order[i] for i in idx]


def union_bytes(model, stitch_ids, bytes_per_param: float) -> int:
    """Weight bytes a mixed step over these stitches reads: each block and head once, every
    stitching layer present (what a batch of them costs, whatever the row count)."""
    S, L = model.small_anchor.stats, model.large_anchor.stats
    sts = [model.get(s) for s in stitch_ids]
    small = {i for s in sts for i in s.small_blocks(S.num_layers)}
    large = {i for s in sts for i in s.large_blocks(L.num_layers)}
    p = sum(S.block_params[i] for i in small) + sum(L.block_params[i] for i in large)
    if any(s.kind == "small" for s in sts):
        p += S.norm_params + S.head_params
    if any(s.uses_large for s in sts):
        p += L.norm_params + L.head_params
    p += sum(S.hidden_size * L.hidden_size + L.hidden_size for s in sts if s.kind == "stitch")
    return int(p * bytes_per_param)


@torch.no_grad()
def batch_scenarios(model, stitch_ids: list[str], *, streams: int, prompt_len: int, steps: int,
                    config_kw: dict, interleave: bool = False, seed: int = 0, make_engine=None,
                    on_scenario=None) -> dict:
    """Tokens/s of `streams` concurrent decode streams (a) spread evenly over `stitch_ids` in ONE mixed
    batch, (b) all on the one stitch whose decode bytes are closest to their mean, (c) the same
    streams as separate per-stitch batch queues served round-robin (one step of each queue yields
    `streams` tokens; its time is the sum of the queues' step times).

    interleave=True keeps every scenario's engine resident and alternates their timed steps, so
    load drift on a shared machine hits all scenarios alike (costs the memory of all their caches);
    otherwise scenarios run one after another and free their caches.

    make_engine(model, **config) builds each engine (default: StitchEngine(model, EngineConfig(...)));
    on_scenario(name, step_seconds, engine) is called after each scenario's timed steps (not
    interleaved), e.g. to save partial results and the engine's graph counts."""
    import gc

    from stitchlib.engine import EngineConfig, StitchEngine
    from stitchlib.runtime import SamplingParams

    bpp = 2
    mean_b = sum(decode_bytes(model, s, bpp) for s in stitch_ids) / len(stitch_ids)
    ref = min((s.id for s in model.stitches), key=lambda sid: abs(decode_bytes(model, sid, bpp) - mean_b))
    vocab = model.small_anchor.stats.vocab_size
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, vocab, (streams, prompt_len), generator=g).tolist()
    params = SamplingParams(max_tokens=steps + 4, temperature=0.0)
    per = streams // len(stitch_ids)
    plans = {"mixed": [stitch_ids[i % len(stitch_ids)] for i in range(streams)], "single": [ref] * streams}
    plans.update({f"queue:{sid}": [sid] * per for sid in stitch_ids})

    if make_engine is None:
        def make_engine(m, **cfg):
            return StitchEngine(m, EngineConfig(**cfg))

    def start(assign: list[str]) -> StitchEngine:
        served = sorted(set(assign), key=model.slot.get)  # caches only for the layers these stitches run
        e = make_engine(model, **{"max_slots": len(assign), "max_seq_len": prompt_len + steps + 8,
                                  "stitches": served, **config_kw})
        for p, sid in zip(prompts, assign):
            e.add_request(p, sid, params)
        e.step()  # prefill all
        e.decode_burst(1)  # warm-up / graph capture
        return e

    times: dict[str, list[float]] = {k: [] for k in plans}
    if interleave:
        engines = {k: start(a) for k, a in plans.items()}
        dev = next(iter(engines.values())).device
        for _ in range(steps):
            for k, e in engines.items():
                times[k].append(timed(lambda: e.decode_burst(1), dev))
        del engines
    else:
        for k, a in plans.items():
            e = start(a)
            times[k] = [timed(lambda: e.decode_burst(1), e.device) for _ in range(steps)]
            if on_scenario is not None:
                on_scenario(k, times[k], e)
            del e
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    t = {k: median(v) for k, v in times.items()}
    t_queues = {sid: t[f"queue:{sid}"] for sid in stitch_ids}
    t_round = sum(t_queues.values())
    tok_mixed, tok_single, tok_queues = streams / t["mixed"], streams / t["single"], per * len(stitch_ids) / t_round
    ub = union_bytes(model, stitch_ids, bpp)
    return {
        "stitches": stitch_ids, "streams": streams, "per_stitch": per, "mean_size_stitch": ref,
        "mean_decode_bytes": mean_b, "ref_decode_bytes": decode_bytes(model, ref, bpp), "union_decode_bytes": ub,
        "weights_bound_ratio": decode_bytes(model, ref, bpp) / ub, "interleaved": interleave, "timed_steps": steps,
        "step_s": {"mixed": t["mixed"], "single_mean_stitch": t["single"], "queues": t_queues, "queues_round": t_round},
        "tokens_per_s": {"mixed": tok_mixed, "single_mean_stitch": tok_single, "separate_queues": tok_queues},
        "mixed_vs_single": tok_mixed / tok_single, "mixed_vs_queues": tok_mixed / tok_queues,
    }


@torch.no_grad()
def hf_generate_step_times(hf_model, ids: torch.Tensor, steps: int, **generate_kw) -> list[float]:
    """Seconds between consecutive new tokens inside one HF `generate()` call (greedy): a logits
    processor stamps the time at every step, so each interval is one full generate iteration
    (forward, cache update, processors, stopping checks). No differencing of noisy totals."""
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps: list[float] = []
    dev = ids.device

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            sync(dev)
            stamps.append(time.perf_counter())
            return scores

    hf_model.generate(ids, max_new_tokens=steps + 1, min_new_tokens=steps + 1, do_sample=False, pad_token_id=0,
                      logits_processor=LogitsProcessorList([Stamp()]), **generate_kw)
    return [b - a for a, b in zip(stamps, stamps[1:])]


def split_modes(values: str | list[str]) -> list[str]:
    """--modes values -> quantization specs: plain modes may be comma-joined ("none,int8,w4a8"), a
    per-anchor spec ("small=int8,large=w4a8") is one value of its own."""
    out = []
    for v in [values] if isinstance(values, str) else values:
        out += [v] if "=" in v else [m for m in v.split(",") if m]
    return out
