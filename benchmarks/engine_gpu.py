"""GPU benchmark of the stitched decode engine: ONE command on one H100/H200 with a hard deadline,
needing only torch + transformers (+ this repository), that records what really ran.

    PYTHONUNBUFFERED=1 python benchmarks/engine_gpu.py     # writes into $OUT (or --out, or benchmarks/results)
    python benchmarks/engine_gpu.py --tiny                 # every part on tiny shapes (CPU is fine), compile included

Parts, in order of risk (each in its own time box; `--parts` selects some for a rerun):
  correctness       tiny fp32 pair, random PST: engine tokens (CUDA graphs on) == reference decoder, every
                    stitch alone and all in one mixed batch; fails when graphs are on and nothing was captured
  build             LLaMA-7B-shape + 13B-shape anchors (random bf16 on the device), the StitchedLM over them
                    (39 stitches + 2 anchors, LoRA merged, PST bf16); allocated bytes at every step of the build
                    next to the parameter arithmetic
  bandwidth         streaming bandwidth on random data (CUDA events) and a GEMV roofline: every linear shape of
                    both anchors' blocks, the stitching layer and the LM heads at batch 1, weights rotated past L2
  latency_graphs    every stitch at batch 1, eager blocks + CUDA graphs, ONE engine for every stitch and both
                    passes (device-bound bursts, host-synced steps), vs the bandwidth and GEMV floors
  batching_short    32 streams over 8 stitches in one mixed batch vs all on the mean-size stitch vs 8 separate
                    queues ('adjacent' and 'spread'), 128-token prompts; floors include every row's K/V reads
  qwen_pair         the served pair's shapes (Qwen2.5-Coder 0.5B -> 1.5B, random weights): every stitch at batch
                    1 and 8, and a mixed-budget batch of 8 rows over the quickstart's deployed stitches
  quant             int4 serving on the device (torch's packed int4 kernel): the Qwen-shaped pair quantized as
                    serving does, every stitch's logits vs the dequantized reference, anchors at batch 1 / 8
  compile           torch.compile'd blocks vs eager blocks, one decode step's logits: batch 1 first, then every
                    stitch in one batch; relative L2 + argmax agreement; later parts fall back to eager blocks
                    only on NaN/inf or a gross error; compile counts, seconds and recompiles recorded
  latency_compiled  compiled blocks + CUDA graphs at batch 1 on 5 stitches (smallest .. largest)
  batching_long     the 'adjacent' streams at a long context (1536 tokens on a >100 GB GPU, else 1024)
  hf                HF generate() on PLAIN anchors (fresh LlamaForCausalLM, no PST wrapping) at batch 1,
                    dynamic cache for both anchors, then static cache (transformers compiles it)

Every part records what ran: status (ok / failed / cut / skipped, with the reason), its seconds, the
CUDA-graph counts of every engine it used (captures, replays, evictions, failed captures with the
error, captures during timed steps) and torch.compile counts (frames, graphs, recompiles and their
reasons, compile seconds). Results (JSON + Markdown) are rewritten after every stitch and scenario,
stdout/stderr are teed into engine_gpu.log beside them, and the deadline (`--budget-s`, from process
start) is enforced by SIGALRM inside the running part; SIGTERM also writes what there is.

Setup on the GPU machine: see engine_gpu_env.py (carried transformers wheel in `.whl/`, pydantic
stand-in). The engine only uses the decoder-layer API (position_embeddings, cache.update(k, v,
layer_idx)); the correctness part checks it on whatever version runs.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine_gpu_env import (Cut, RunClock, ensure_pydantic, process_start, tee_output,  # noqa: E402
                            use_pinned_transformers)

from stitchlib.fileio import atomic_write  # noqa: E402 - standard library only: safe before the pinning

DEFAULT_BUDGET_S = 420  # 7 min from process start: the command runs under timeout_s=480, and of a
# session's 15 device minutes (start-up included) ~4-5 remain for a warm rerun of a few parts.
SEQ_ALIGN = 64  # cache lengths (hence attention spans) are multiples of this: no odd shapes to compile

# name: (architecture, hidden, layers, heads, kv_heads, ffn, vocab)
SHAPES = {
    "llama-7b-shape": ("llama", 4096, 32, 32, 32, 11008, 32000),
    "llama-13b-shape": ("llama", 5120, 40, 40, 40, 13824, 32000),
    "qwen2.5-coder-0.5b-shape": ("qwen2", 896, 24, 14, 2, 4864, 151936),
    "qwen2.5-coder-1.5b-shape": ("qwen2", 1536, 28, 12, 2, 8960, 151936),
    "tiny-a": ("llama", 64, 4, 4, 2, 128, 512),
    "tiny-b": ("llama", 96, 5, 4, 2, 192, 512),
    "tiny-qwen-a": ("qwen2", 64, 4, 4, 2, 128, 512),
    "tiny-qwen-b": ("qwen2", 128, 5, 4, 2, 256, 512),
}
# What `stitchserve quickstart` deploys on the real pair (README): the mixed-budget batch's stitches.
QUICKSTART_STITCHES = ["small", "s1-l2", "s0-l1", "large"]


@dataclass
class Sizes:
    """Everything that differs between the GPU run and --tiny."""

    pair: tuple[str, str]
    qwen: tuple[str, str]
    prompt_len: int
    long_prompt_len: int
    steps: int  # timed decode steps per measurement
    rounds: int  # latency rounds over all stitches (the first also captures)
    streams: int
    n_batch_stitches: int
    bandwidth_bytes: int
    gemv_reps: int
    boxes: dict[str, float | None] = field(default_factory=dict)  # part -> time box (None: deadline only)


GPU = Sizes(pair=("llama-7b-shape", "llama-13b-shape"), qwen=("qwen2.5-coder-0.5b-shape", "qwen2.5-coder-1.5b-shape"),
            prompt_len=128, long_prompt_len=1536, steps=16, rounds=2, streams=32, n_batch_stitches=8,
            bandwidth_bytes=4 << 30, gemv_reps=20,
            boxes={"correctness": 60, "build": 90, "bandwidth": 30, "latency_graphs": 75, "batching_short": 60,
                   "qwen_pair": 60, "quant": 45, "compile": 150, "latency_compiled": 45, "batching_long": 60, "hf": 90})
TINY = Sizes(pair=("tiny-a", "tiny-b"), qwen=("tiny-qwen-a", "tiny-qwen-b"), prompt_len=24, long_prompt_len=96,
             steps=4, rounds=1, streams=8, n_batch_stitches=4, bandwidth_bytes=64 << 20, gemv_reps=3)


def align(n: int, a: int = SEQ_ALIGN) -> int:
    return -(-n // a) * a


# ---- model construction -------------------------------------------------------------------------------
def build_anchor(name: str, device: torch.device, dtype: torch.dtype, tokenizer, seed: int):
    """An anchor of shape `name` with random weights, built directly on the device in `dtype`."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from stitchlib.anchors import Anchor, compute_stats

    arch, d, n, h, kv, ffn, vocab = SHAPES[name]
    Config, Model = (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    cfg = Config(hidden_size=d, num_hidden_layers=n, num_attention_heads=h, num_key_value_heads=kv,
                 intermediate_size=ffn, vocab_size=vocab, max_position_embeddings=4096,
                 tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = "sdpa"
    prev = torch.get_default_dtype()
    torch.manual_seed(seed)
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = Model(cfg)
    finally:
        torch.set_default_dtype(prev)
    model = model.to(device=device, dtype=dtype).requires_grad_(False).eval()
    return Anchor(name=name, source=f"random:{name}", model=model, tokenizer=tokenizer, stats=compute_stats(model),
                  fingerprint=f"random-{name}-{seed}")


def build_stitched(small: str, large: str, device: torch.device, dtype: torch.dtype, *, random_pst: bool = False,
                   memory: dict | None = None):
    """The StitchedLM over two random anchors; `memory` (if given) receives allocated bytes after each
    stage of the build and the parameter arithmetic next to them."""
    from engine_common import param_bytes, prepare_for_serving

    from stitchlib.model import StitchedLM
    from stitchlib.tiny import build_tiny_tokenizer

    def allocated() -> int | None:
        if device.type != "cuda":
            return None  # no allocator statistics on CPU: only the arithmetic below
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device)

    a0 = allocated()
    tok = build_tiny_tokenizer()  # only its identity is checked (one tokenizer shared by the pair)
    S = build_anchor(small, device, dtype, tok, seed=0)
    L = build_anchor(large, device, dtype, tok, seed=1)
    a_pair = allocated()
    pair = param_bytes(S.model) + param_bytes(L.model)
    torch.manual_seed(2)
    model = StitchedLM(S, L)
    a_wrapped = allocated()
    if random_pst:
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for _, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_((torch.randn(p.shape, generator=g) * 0.05).to(p.device, p.dtype))
    else:
        prepare_for_serving(model, dtype)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    a_served = allocated()
    if memory is not None:
        stitching = sum(p.numel() * p.element_size() for p in model.stitching.parameters())
        total = param_bytes(model)
        memory.update(
            anchors=[small, large], n_stitches=len(model.stitches), pair_param_bytes=pair,
            stitching_param_bytes=stitching, pst_and_other_param_bytes=total - pair - stitching,
            served_param_bytes=total, ratio_params=total / pair,
            allocated_bytes={"pair": None if a0 is None else a_pair - a0,
                             "after_stitched_lm": None if a0 is None else a_wrapped - a0,
                             "served": None if a0 is None else a_served - a0},
            ratio_allocated=None if a0 is None else (a_served - a0) / (a_pair - a0))
    return model


# ---- what ran: graph and compile counts --------------------------------------------------------------
_seen_compiles: set[int] = set()


def compile_counters() -> dict:
    """torch.compile activity so far in this process (dynamo's global counters)."""
    from torch._dynamo.utils import compilation_time_metrics, counters

    return {"frames": counters["frames"]["total"], "frames_ok": counters["frames"]["ok"],
            "graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
            "compile_s": sum(compilation_time_metrics.get("_compile.compile_inner", []))}


def new_recompile_reasons() -> list[str]:
    """Reasons of recompiles not reported before (dynamo keeps the last ~64 compilation records)."""
    from torch._dynamo.utils import get_compilation_metrics

    out = []
    for m in get_compilation_metrics():
        if id(m) in _seen_compiles:
            continue
        _seen_compiles.add(id(m))
        if getattr(m, "recompile_reason", None):
            # one line per cached entry that failed its guards: the first line alone names one entry only
            out.append(" | ".join(str(m.recompile_reason).splitlines())[:600])
    return out


GRAPH_COUNTS = ("captures", "replays", "evictions", "failed_captures", "capture_s")


class PartRun:
    """One part's record: engines it builds are counted (graph stats), compile activity is the
    difference of dynamo's counters since the part began; `save()` writes everything so far."""

    def __init__(self, ctx: "Ctx", rec: dict) -> None:
        self.ctx, self.rec = ctx, rec
        self.engines: list = []  # live engines of this part
        self.done = Counter()  # graph counts of engines already released
        self.errors: list[str] = []
        self.n_engines = 0
        self.timed_captures = 0
        self.compile0 = compile_counters()
        self.recompiles: list[str] = []

    def engine(self, model, **cfg):
        """An engine with the run's settings (compile, graphs), `max_graphs` above every composition
        this benchmark makes, and (without CUDA) the eager stand-in for graph capture."""
        from stitchlib.engine import EngineConfig, StitchEngine
        from stitchlib.engine.graphs import DecodeGraphs, eager_capture

        kw = {**self.ctx.engine_kw, "max_graphs": 2 * len(model.stitches) + 16, **cfg}
        kw.setdefault("kv_block", kw["max_seq_len"])  # one attention span per engine: one graph per composition
        stand_in = kw.get("cuda_graphs") and self.ctx.device.type != "cuda"
        if stand_in:
            kw.update(cuda_graphs=False, pad_to_bucket=True)
        e = StitchEngine(model, EngineConfig(**kw))
        if stand_in:
            e.graphs = DecodeGraphs(e.runner, e.tokens, e.lengths, max_graphs=e.cfg.max_graphs, capture=eager_capture)
        self.engines.append(e)
        self.n_engines += 1
        return e

    def release(self, e) -> None:
        self._fold(e.graph_stats())
        self.engines.remove(e)

    def _fold(self, st: dict) -> None:
        self.done.update({k: st.get(k, 0) for k in GRAPH_COUNTS})
        if st.get("error") and st["error"] not in self.errors:
            self.errors.append(st["error"])

    def graph_summary(self) -> dict:
        total = Counter(self.done)
        errors = list(self.errors)
        for e in self.engines:
            st = e.graph_stats()
            total.update({k: st.get(k, 0) for k in GRAPH_COUNTS})
            if st.get("error") and st["error"] not in errors:
                errors.append(st["error"])
        return {"engines": self.n_engines, **{k: total.get(k, 0) for k in GRAPH_COUNTS},
                "captures_during_timed_steps": self.timed_captures, "errors": errors}

    def save(self) -> None:
        if self.n_engines:
            self.rec["graphs"] = self.graph_summary()
        now = compile_counters()
        self.recompiles += new_recompile_reasons()
        delta = {k: now[k] - self.compile0[k] for k in now}
        if delta["frames"] or self.recompiles:
            self.rec["compile_activity"] = {**delta, "recompiles": len(self.recompiles),
                                            "recompile_reasons": self.recompiles[:20]}
        self.ctx.save()


@dataclass
class Ctx:
    args: argparse.Namespace
    sizes: Sizes
    device: torch.device
    engine_kw: dict
    res: dict
    save: Callable[[], None]
    model: object = None  # the 7B/13B-shape StitchedLM (from `build`)
    bw: dict | None = None
    gemv: dict | None = None


def timed_decode(run: PartRun, e, steps: int, *, burst: bool) -> list[float]:
    """Seconds per decode step of `e`'s running rows: one burst of `steps` without host reads (device-
    bound), or `steps` individually synced steps. Captures during it are counted (should be none)."""
    from engine_common import timed

    before = e.graph_stats().get("captures", 0)
    if burst:
        out = [timed(lambda: e.decode_burst(steps), e.device) / steps]
    else:
        out = [timed(lambda: e.decode_burst(1), e.device) for _ in range(steps)]
    run.timed_captures += e.graph_stats().get("captures", 0) - before
    return out


def random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=g).tolist()


# ---- floors ---------------------------------------------------------------------------------------------
def block_linear_shapes(anchor) -> dict[str, tuple[int, int]]:
    """(out, in) of every linear in one decoder block, from the config (the same for every block)."""
    c = anchor.model.config
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    d, f = c.hidden_size, c.intermediate_size
    return {"q": (q, d), "k": (kv, d), "v": (kv, d), "o": (d, q), "gate": (f, d), "up": (f, d), "down": (d, f)}


@torch.no_grad()
def gemv_seconds(out_f: int, in_f: int, device: torch.device, reps: int, rotate_bytes: int = 512 << 20) -> float:
    """Device seconds of y = x @ W.T at batch 1 (bf16), cycling over enough copies of W that none is
    still in L2 when it is read again (H100/H200 L2: 50-60 MB)."""
    from engine_common import device_seconds

    w_bytes = out_f * in_f * 2
    copies = max(2, -(-rotate_bytes // w_bytes)) if device.type == "cuda" else 1
    g = torch.Generator(device=device).manual_seed(0)
    ws = [torch.randn(out_f, in_f, dtype=torch.bfloat16, device=device, generator=g) for _ in range(copies)]
    x = torch.randn(1, in_f, dtype=torch.bfloat16, device=device, generator=g)

    def sweep() -> None:
        for w in ws:
            torch.nn.functional.linear(x, w)

    t = device_seconds(sweep, device, reps) / copies
    del ws
    return t


def gemv_roofline(model, device: torch.device, reps: int) -> dict:
    """Measured GEMV time of every weight a decode step multiplies, by shape; per block and head."""
    S, L = model.small_anchor, model.large_anchor
    out = {"shapes": {}, "block_s": {}, "head_s": {}}
    for role, a in (("small", S), ("large", L)):
        shapes = {**block_linear_shapes(a), "lm_head": tuple(a.model.lm_head.weight.shape)}
        for name, (o, i) in shapes.items():
            key = f"{o}x{i}"
            if key not in out["shapes"]:
                t = gemv_seconds(o, i, device, reps)
                out["shapes"][key] = {"s": t, "GBps": o * i * 2 / t / 1e9}
        out["block_s"][role] = sum(out["shapes"][f"{o}x{i}"]["s"] for n, (o, i) in shapes.items() if n != "lm_head")
        o, i = shapes["lm_head"]
        out["head_s"][role] = out["shapes"][f"{o}x{i}"]["s"]
    dS, dL = S.stats.hidden_size, L.stats.hidden_size
    out["stitching_s"] = gemv_seconds(dL, dS, device, reps)
    return out


def gemv_floor_s(model, sid: str, gemv: dict) -> float:
    """Time of the GEMVs stitch `sid`'s decode step runs, from the measured roofline."""
    st = model.get(sid)
    S, L = model.small_anchor.stats, model.large_anchor.stats
    t = len(st.small_blocks(S.num_layers)) * gemv["block_s"]["small"] if st.uses_small else 0.0
    if st.uses_large:
        t += len(st.large_blocks(L.num_layers)) * gemv["block_s"]["large"] + gemv["head_s"]["large"]
    else:
        t += gemv["head_s"]["small"]
    return t + (gemv["stitching_s"] if st.kind == "stitch" else 0.0)


def kv_read_bytes(model, row_stitches: list[str], kv_len: int, bytes_per_el: int = 2) -> int:
    """K and V bytes one decode step reads: every row, every layer it runs, `kv_len` positions."""
    S, L = model.small_anchor.stats, model.large_anchor.stats
    per_layer = {a: 2 * st.num_kv_heads * st.head_dim * kv_len * bytes_per_el for a, st in (("s", S), ("l", L))}
    total = 0
    for sid in row_stitches:
        st = model.get(sid)
        if st.uses_small:
            total += len(st.small_blocks(S.num_layers)) * per_layer["s"]
        if st.uses_large:
            total += len(st.large_blocks(L.num_layers)) * per_layer["l"]
    return total


# ---- parts ---------------------------------------------------------------------------------------------
def part_correctness(run: PartRun, ctx: Ctx) -> None:
    """Engine (graphs as configured, eager blocks) against the reference decoder, fp32."""
    from stitchlib.runtime import SamplingParams

    model = build_stitched("tiny-a", "tiny-b", ctx.device, torch.float32, random_pst=True)
    prompts = random_prompts(2, 12, 512)
    prompts[0] = prompts[0][:7]
    n = 6
    ref = {(s.id, i): model.generate(torch.tensor([p], device=ctx.device), s.id, max_new_tokens=n)[0].tolist()
           for s in model.stitches for i, p in enumerate(prompts)}
    engine = run.engine(model, max_slots=len(ref), max_seq_len=64, compile_layers=False)
    params = SamplingParams(max_tokens=n, temperature=0.0)
    rec = run.rec
    rec.update(stitches=len(model.stitches), alone_mismatch=[], mixed_mismatch=[])
    for (sid, i), want in ref.items():
        engine.add_request(prompts[i], sid, params)
        got = []
        while engine.has_unfinished():
            got += engine.step().values()
        if got != want:
            rec["alone_mismatch"].append(sid)
        run.save()
    rid_of = {engine.add_request(prompts[i], sid, params): (sid, i) for (sid, i) in ref}
    out = {r: [] for r in rid_of}
    while engine.has_unfinished():
        for r, t in engine.step().items():
            out[r].append(t)
    rec["mixed_mismatch"] = [rid_of[r][0] for r, toks in out.items() if toks != ref[rid_of[r]]]
    g = engine.graph_stats()
    graphs_on = bool(ctx.engine_kw.get("cuda_graphs"))
    rec["graphs_expected"] = graphs_on
    rec["ok"] = not rec["alone_mismatch"] and not rec["mixed_mismatch"] and (
        not graphs_on or (g["active"] and g["captures"] > 0 and g["replays"] > 0))
    if graphs_on and not rec["ok"] and not (rec["alone_mismatch"] or rec["mixed_mismatch"]):
        rec["why_not_ok"] = f"graphs on but {g['captures']} captured / {g['replays']} replayed: {g['error']}"


def part_build(run: PartRun, ctx: Ctx) -> None:
    small, large = ctx.sizes.pair
    t = time.time()
    ctx.model = build_stitched(small, large, ctx.device, torch.bfloat16, memory=run.rec)
    run.rec["build_s"] = time.time() - t


def part_bandwidth(run: PartRun, ctx: Ctx) -> None:
    from engine_common import read_bandwidth

    ctx.bw = run.rec["stream"] = read_bandwidth(ctx.device, ctx.sizes.bandwidth_bytes)
    run.save()
    ctx.gemv = run.rec["gemv"] = gemv_roofline(ctx.model, ctx.device, ctx.sizes.gemv_reps)


def latency_sweep(run: PartRun, ctx: Ctx, model, stitch_ids: list[str], rows: list[dict], **engine_cfg) -> None:
    """Batch-1 decode step of every stitch on ONE engine: per round and stitch a prefill, one warm-up
    step (captures its graph in round 1), a timed burst, then `steps` host-synced steps. A row is
    appended (and saved) per stitch; round 2 updates it."""
    from engine_common import decode_bytes, median
    from stitchlib.runtime import SamplingParams

    z = ctx.sizes
    prompt = random_prompts(1, z.prompt_len, model.small_anchor.stats.vocab_size)[0]
    # 2 slots for 1 request: a 1-slot cache makes dynamo specialise the compiled block on it (0/1
    # specialisation of the cache's slot count) and compile every block shape again (seen on CPU).
    e = run.engine(model, max_slots=2, max_seq_len=align(z.prompt_len + 2 + 2 * z.steps), **engine_cfg)
    by_id = {}
    for _ in range(z.rounds):
        for sid in stitch_ids:
            rid = e.add_request(prompt, sid, SamplingParams(max_tokens=2 + 2 * z.steps, temperature=0.0))
            e.step()  # prefill (eager)
            e.decode_burst(1)  # warm-up: capture (and compile) on first use
            burst = timed_decode(run, e, z.steps, burst=True)[0]
            synced = median(timed_decode(run, e, z.steps, burst=False))
            e.abort(rid)
            if sid not in by_id:
                b = decode_bytes(model, sid, 2)
                floor = b / (ctx.bw["used_GBps"] * 1e9) if ctx.bw else None
                gemv = gemv_floor_s(model, sid, ctx.gemv) if ctx.gemv else None
                by_id[sid] = {"stitch": sid, "decode_bytes": b, "floor_ms": floor and floor * 1e3,
                              "gemv_floor_ms": gemv and gemv * 1e3, "burst_ms_rounds": [], "synced_ms_rounds": []}
                rows.append(by_id[sid])
            r = by_id[sid]
            r["burst_ms_rounds"].append(burst * 1e3)
            r["synced_ms_rounds"].append(synced * 1e3)
            r["burst_ms"], r["synced_ms"] = min(r["burst_ms_rounds"]), min(r["synced_ms_rounds"])
            if r["floor_ms"]:
                r["x_floor_burst"] = r["burst_ms"] / r["floor_ms"]
            if r["gemv_floor_ms"]:
                r["x_gemv_floor_burst"] = r["burst_ms"] / r["gemv_floor_ms"]
            run.save()
    run.release(e)


def part_latency_graphs(run: PartRun, ctx: Ctx) -> None:
    from engine_common import decode_bytes, is_strictly_increasing

    model = ctx.model
    order = sorted((s.id for s in model.stitches), key=lambda sid: decode_bytes(model, sid, 2))
    rows = run.rec["rows"] = []
    run.rec.update(prompt_len=ctx.sizes.prompt_len, timed_steps=ctx.sizes.steps, rounds=ctx.sizes.rounds,
                   compile_layers=False)
    latency_sweep(run, ctx, model, order, rows, compile_layers=False)
    inc, bad = is_strictly_increasing([r["burst_ms"] for r in rows])
    run.rec.update(strictly_increasing_burst=inc, violations_burst=[rows[i]["stitch"] for i in bad])
    if ctx.bw:
        run.rec["max_x_floor_burst"] = max(r["x_floor_burst"] for r in rows)


def batching(run: PartRun, ctx: Ctx, choices: list[tuple[str, int]]) -> None:
    """Mixed batch vs one mean-size stitch vs separate queues, per stitch choice and prompt length;
    each scenario saved as it finishes, with its floor (union/stitch weights + every row's K/V)."""
    from engine_common import batch_scenarios, decode_bytes, pick_stitches, union_bytes

    model, z = ctx.model, ctx.sizes
    bw = ctx.bw["used_GBps"] * 1e9 if ctx.bw else None
    steps = max(4, z.steps // 2)
    for how, plen in choices:
        ids = pick_stitches(model, z.n_batch_stitches, how.removesuffix("_long"))
        rec = run.rec[how] = {"prompt_len": plen, "stitches": ids, "scenarios": {}}
        max_seq = align(plen + steps + 8)

        def on_scenario(name, times, e, rec=rec):
            from engine_common import median

            rows = [r.stitch.id for r in e.rows]
            kv_len = e._kv_len(max(r.length for r in e.rows))
            w = union_bytes(model, sorted(set(rows), key=model.slot.get), 2) if name == "mixed" else \
                decode_bytes(model, rows[0], 2)
            kv = kv_read_bytes(model, rows, kv_len)
            sc = {"rows": len(rows), "kv_len": kv_len, "step_s": median(times), "weight_bytes": w, "kv_bytes": kv}
            if bw:
                sc["floor_s"] = (w + kv) / bw
                sc["x_floor"] = sc["step_s"] / sc["floor_s"]
            rec["scenarios"][name] = sc
            run.release(e)  # its caches are freed when batch_scenarios drops it
            run.save()

        summary = batch_scenarios(model, ids, streams=z.streams, prompt_len=plen, steps=steps,
                                  config_kw={"max_seq_len": max_seq, "kv_block": max_seq},
                                  make_engine=lambda m, **cfg: run.engine(m, **cfg), on_scenario=on_scenario)
        sc = rec["scenarios"]
        mixed_b = sc["mixed"]["weight_bytes"] + sc["mixed"]["kv_bytes"]
        single_b = sc["single"]["weight_bytes"] + sc["single"]["kv_bytes"]
        rec.update(summary, bound_with_kv=single_b / mixed_b)
        run.save()


def part_batching_short(run: PartRun, ctx: Ctx) -> None:
    batching(run, ctx, [("adjacent", ctx.sizes.prompt_len), ("spread", ctx.sizes.prompt_len)])


def part_batching_long(run: PartRun, ctx: Ctx) -> None:
    run.rec["compile_layers"] = ctx.engine_kw["compile_layers"]
    batching(run, ctx, [("adjacent_long", ctx.args.long_prompt or ctx.sizes.long_prompt_len)])


def part_qwen_pair(run: PartRun, ctx: Ctx) -> None:
    """The served pair's shapes: per-stitch decode at batch 1 and 8 on one engine, then a
    mixed-budget batch of 8 rows over the quickstart's deployed stitches."""
    from engine_common import decode_bytes, median, pick_stitches, union_bytes
    from stitchlib.runtime import SamplingParams

    z = ctx.sizes
    model = build_stitched(*z.qwen, ctx.device, torch.bfloat16)
    try:
        ids = sorted((s.id for s in model.stitches), key=lambda sid: decode_bytes(model, sid, 2))
        prompts = random_prompts(8, z.prompt_len, model.small_anchor.stats.vocab_size)
        e = run.engine(model, max_slots=8, max_seq_len=align(z.prompt_len + 2 + z.steps), compile_layers=False)
        params = SamplingParams(max_tokens=2 + z.steps, temperature=0.0)
        bw = ctx.bw["used_GBps"] * 1e9 if ctx.bw else None
        rows = run.rec["rows"] = []

        def measure(assign: list[str]) -> float:
            rids = [e.add_request(p, sid, params) for p, sid in zip(prompts, assign)]
            e.step()  # prefill
            e.decode_burst(1)  # capture
            t = median(timed_decode(run, e, z.steps, burst=False))
            for r in rids:
                e.abort(r)
            return t

        run.rec["anchors"] = list(z.qwen)
        for sid in ids:
            r = {"stitch": sid, "decode_bytes": decode_bytes(model, sid, 2),
                 "batch1_ms": measure([sid]) * 1e3, "batch8_ms": measure([sid] * 8) * 1e3}
            if bw:
                r["floor_ms"] = r["decode_bytes"] / bw * 1e3
            rows.append(r)
            run.save()
        mix = (QUICKSTART_STITCHES if all(s in model.slot for s in QUICKSTART_STITCHES)
               else pick_stitches(model, 4, "spread"))
        assign = sorted([mix[i % len(mix)] for i in range(8)], key=model.slot.get)
        t = measure(assign) * 1e3
        by = {r["stitch"]: r for r in rows}
        run.rec["mixed_budget"] = {
            "stitches": mix, "rows": assign, "step_ms": t, "union_decode_bytes": union_bytes(model, mix, 2),
            "largest_stitch_batch8_ms": max(by[s]["batch8_ms"] for s in mix),
            "mean_batch8_ms_of_its_stitches": sum(by[s]["batch8_ms"] for s in mix) / len(mix)}
        run.release(e)
    finally:
        del model
        gc.collect()
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()


@torch.no_grad()
def part_quant(run: PartRun, ctx: Ctx) -> None:
    """The quantized serving path on this device (int4: torch's `_weight_int4pack_mm` on CUDA, its CPU
    kernel with --tiny): the Qwen-shaped pair held as int4 codes after `quantize_model_`, every stitch's
    next-token logits against the same codes held as dequantized bf16 weights (`fake_quantize_`), and
    the engine's decode at batch 1 and 8 on the anchors (graphs as configured)."""
    from collections import Counter

    from engine_common import median
    from stitchlib.quant import QuantLinear, fake_quantize_, quantize_model_
    from stitchlib.runtime import SamplingParams

    z = ctx.sizes
    model = build_stitched(*z.qwen, ctx.device, torch.bfloat16)
    ref = build_stitched(*z.qwen, ctx.device, torch.bfloat16)  # same seeds: the same weights
    try:
        t = time.time()
        quantize_model_(model, "int4")
        fake_quantize_(ref, "int4")
        rec = run.rec
        rec["quantize_s"] = time.time() - t
        rec["backends"] = dict(Counter(f"{m.mode}/{m.backend}" for m in model.modules() if isinstance(m, QuantLinear)))
        ids = torch.tensor(random_prompts(2, z.prompt_len, model.small_anchor.stats.vocab_size), device=ctx.device)
        got = torch.cat([model(ids, s.id)[:, -1] for s in model.stitches]).float()
        want = torch.cat([ref(ids, s.id)[:, -1] for s in model.stitches]).float()
        rec["logits"] = compare_logits(want, got)
        run.save()
        del ref
        prompts = random_prompts(8, z.prompt_len, model.small_anchor.stats.vocab_size)
        e = run.engine(model, max_slots=8, max_seq_len=align(z.prompt_len + 2 + z.steps), compile_layers=False)
        params = SamplingParams(max_tokens=2 + z.steps, temperature=0.0)
        rows = rec["rows"] = []
        for sid in ("small", "large"):
            r = {"stitch": sid}
            for n in (1, 8):
                rids = [e.add_request(p, sid, params) for p in prompts[:n]]
                e.step()
                e.decode_burst(1)
                r[f"batch{n}_ms"] = median(timed_decode(run, e, z.steps, burst=False)) * 1e3
                for x in rids:
                    e.abort(x)
            rows.append(r)
            run.save()
        run.release(e)
        rec["ok"] = rec["logits"]["argmax_agree"] >= 0.9 and rec["logits"]["rel_l2_max"] < 0.05
    finally:
        del model
        gc.collect()
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()


@torch.no_grad()
def compare_logits(eager: torch.Tensor, compiled: torch.Tensor) -> dict:
    """Relative L2 per row and argmax agreement: bf16 over ~70 blocks drifts by ~1e-2 in L2 without
    changing most argmaxes; a max-abs test on random-weight logits fails correct compiles."""
    e, c = eager.float(), compiled.float()
    rel = ((c - e).norm(dim=-1) / e.norm(dim=-1).clamp(min=1e-12)).tolist()
    return {"rows": len(rel), "finite": bool(torch.isfinite(c).all()), "rel_l2_max": max(rel),
            "rel_l2_mean": sum(rel) / len(rel), "argmax_agree": float((e.argmax(-1) == c.argmax(-1)).float().mean())}


COMPILE_OK = {"rel_l2_max": 0.05, "argmax_agree": 0.9}  # reported as `ok`
COMPILE_GROSS_REL_L2 = 0.5  # beyond this (or NaN/inf) later parts fall back to eager blocks


@torch.no_grad()  # as in StitchEngine.step: a grad-mode compile would be recompiled for serving
def part_compile(run: PartRun, ctx: Ctx) -> None:
    """Compiled vs eager blocks on one engine: the same decode step's logits with each block call
    (both write identical K/V at the same position), batch 1 first (its own compiled graph), then one
    row per stitch. The first compiled call's seconds include compiling."""
    from stitchlib.engine.runner import call_layer
    from stitchlib.runtime import SamplingParams

    from engine_common import sync

    model = ctx.model
    ids = [s.id for s in model.stitches]
    run.rec["criterion"] = {"ok": COMPILE_OK, "fall_back_if": f"non-finite or rel_l2_max > {COMPILE_GROSS_REL_L2}"}
    run.rec["fallback"] = None
    e = run.engine(model, max_slots=len(ids), max_seq_len=align(ctx.sizes.prompt_len + 8), cuda_graphs=False,
                   compile_layers=True)
    compiled_fn = e.runner.decode_layer_fn
    prompts = random_prompts(len(ids), ctx.sizes.prompt_len, model.small_anchor.stats.vocab_size)
    for name, rows in (("batch1", [ids[len(ids) // 2]]), ("mixed", ids)):
        rids = [e.add_request(p, sid, SamplingParams(max_tokens=4, temperature=0.0)) for p, sid in zip(prompts, rows)]
        e.step()  # eager prefill
        n = e.num_running
        plan = e._plan(tuple(r.key for r in e.rows))
        kv_len = e._kv_len(max(r.length for r in e.rows) + 1)

        def step(fn):
            e.runner.decode_layer_fn = fn
            t = time.time()
            out = e.runner.forward(e.tokens[:n, None], e.lengths[:n, None], slice(0, n), plan, kv_len)
            sync(e.device)
            return out, time.time() - t

        eager, _ = step(call_layer)
        compiled, first_s = step(compiled_fn)
        _, again_s = step(compiled_fn)
        cmp = compare_logits(eager, compiled)
        cmp.update(first_call_s=first_s, second_call_s=again_s,
                   ok=cmp["finite"] and cmp["rel_l2_max"] <= COMPILE_OK["rel_l2_max"]
                   and cmp["argmax_agree"] >= COMPILE_OK["argmax_agree"])
        run.rec[name] = cmp
        for r in rids:
            e.abort(r)
        if not cmp["finite"] or cmp["rel_l2_max"] > COMPILE_GROSS_REL_L2:
            run.rec["fallback"] = f"{name}: finite={cmp['finite']} rel_l2_max={cmp['rel_l2_max']:.3g}"
        run.save()
        if run.rec["fallback"]:
            break
    e.runner.decode_layer_fn = compiled_fn
    run.release(e)
    run.rec["ok"] = all(run.rec[k]["ok"] for k in ("batch1", "mixed") if k in run.rec) and "mixed" in run.rec


def part_latency_compiled(run: PartRun, ctx: Ctx) -> None:
    from engine_common import decode_bytes

    model = ctx.model
    order = sorted((s.id for s in model.stitches), key=lambda sid: decode_bytes(model, sid, 2))
    pick = sorted({order[round(i * (len(order) - 1) / 4)] for i in range(5)}, key=order.index)
    rows = run.rec["rows"] = []
    run.rec.update(stitches=pick, compile_layers=True)
    latency_sweep(run, ctx, model, pick, rows, compile_layers=True)


@torch.no_grad()
def part_hf(run: PartRun, ctx: Ctx) -> None:
    """ms per token of HF generate() at batch 1 on PLAIN anchors (fresh HF models, no PST wrapping),
    from per-step timestamps inside generate. Dynamic cache for both first (cheap), then static."""
    from engine_common import hf_generate_step_times, median
    from stitchlib.tiny import build_tiny_tokenizer

    ctx.model = None  # the last part: free the stitched pair for the plain anchors
    torch._dynamo.reset()  # compiled block graphs may hold references into the stitched pair
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    tok = build_tiny_tokenizer()
    plain = {role: build_anchor(name, ctx.device, torch.bfloat16, tok, seed=i).model
             for i, (role, name) in enumerate(zip(("small", "large"), ctx.sizes.pair))}
    vocab = plain["small"].config.vocab_size
    ids = torch.tensor(random_prompts(1, ctx.sizes.prompt_len, vocab), device=ctx.device)
    for impl in ("dynamic", "static"):
        kw = {"cache_implementation": "static"} if impl == "static" else {}
        for role, m in plain.items():
            t = time.time()
            # warm-up with the timed call's length: a static cache sized differently would recompile
            hf_generate_step_times(m, ids, ctx.sizes.steps, **kw)
            warm = time.time() - t
            run.rec[f"{role}_{impl}_ms_per_token"] = median(hf_generate_step_times(m, ids, ctx.sizes.steps, **kw)) * 1e3
            run.rec[f"{role}_{impl}_warmup_s"] = warm
            run.save()


PARTS = [  # (key, function, needs the 7B/13B model, minimum seconds left to start it on a GPU)
    ("correctness", part_correctness, False, 15),
    ("build", part_build, False, 30),
    ("bandwidth", part_bandwidth, True, 10),
    ("latency_graphs", part_latency_graphs, True, 30),
    ("batching_short", part_batching_short, True, 30),
    ("qwen_pair", part_qwen_pair, False, 30),
    ("quant", part_quant, False, 30),
    ("compile", part_compile, True, 60),
    ("latency_compiled", part_latency_compiled, True, 20),
    ("batching_long", part_batching_long, True, 30),
    ("hf", part_hf, False, 20),
]


# ---- driver ------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="result directory (default $OUT, else benchmarks/results)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes: every part, anywhere, fast")
    ap.add_argument("--device", default=None, help="default cuda when available, else cpu")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="run the compile parts and use compiled blocks after a passing check (--no-compile: "
                         "eager blocks + CUDA graphs only)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help=f"hard deadline from process start (default {DEFAULT_BUDGET_S}; --tiny: 900)")
    ap.add_argument("--parts", default=None, help="comma-separated subset of parts (build is added when needed)")
    ap.add_argument("--long-prompt", type=int, default=None, help="prompt length of batching_long "
                    "(default 1536 on a >100 GB GPU, else 1024)")
    ap.add_argument("--wheels", default=str(Path(__file__).resolve().parents[1] / ".whl"),
                    help="where a carried transformers wheel is looked for")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    t0 = process_start() if argv is None else time.time()  # in-process calls (tests) start now
    args = parse_args(argv)
    budget = args.budget_s if args.budget_s is not None else (900.0 if args.tiny else DEFAULT_BUDGET_S)
    out_dir = Path(args.out or os.environ.get("OUT") or Path(__file__).resolve().parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "engine_gpu_tiny" if args.tiny else "engine_gpu"
    with tee_output(out_dir / f"{name}.log", hang_dump_after_s=budget + 20 - (time.time() - t0)):
        print(f"[setup] {name}: budget {budget:.0f}s from process start, {time.time() - t0:.1f}s gone", flush=True)
        tf_note = (use_pinned_transformers(Path(args.wheels), timeout_s=max(10.0, min(90.0, budget / 5)))
                   if argv is None else "in-process call: as installed")
        clock = RunClock(t0, budget)
        clock.install()
        try:
            return run_parts(args, clock, out_dir, name, tf_note)
        finally:
            clock.uninstall()


def run_parts(args, clock: RunClock, out_dir: Path, name: str, tf_note: str) -> dict:
    pyd = ensure_pydantic()
    from engine_common import env_info

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and not args.tiny:
        raise SystemExit("no CUDA device: run with --tiny to check the logic on CPU")
    sizes = TINY if args.tiny else GPU
    engine_kw = {"cuda_graphs": True, "compile_layers": False}  # compile_layers: on after a passing check
    res: dict = {"benchmark": name, "env": env_info(device), "pydantic": pyd, "transformers_source": tf_note,
                 "layer_api": layer_api(), "budget_s": clock.end - clock.t0, "engine": dict(engine_kw),
                 "graph_capture": "cuda" if device.type == "cuda" else "eager stand-in (no CUDA)",
                 "parts": {}, "order": [k for k, *_ in PARTS]}
    if device.type == "cuda":
        res["env"]["cuda"] = torch.version.cuda
        res["env"]["gpu_memory_GB"] = torch.cuda.get_device_properties(device).total_memory / 1e9
    if not args.long_prompt and not args.tiny and res["env"].get("gpu_memory_GB", 0) <= 100:
        args.long_prompt = 1024  # 32 streams x 1536 tokens of 13B-shape K/V do not fit next to the pair

    def save() -> None:
        with clock.shielded():
            res["wall_s"] = clock.elapsed()
            res["engine"] = dict(engine_kw)
            res["targets"] = targets(res)
            # atomic: a kill mid-write never leaves a truncated result file
            atomic_write(out_dir / f"{name}.json", json.dumps(res, indent=2, default=str))
            atomic_write(out_dir / f"{name}.md", render_markdown(res))

    ctx = Ctx(args=args, sizes=sizes, device=device, engine_kw=engine_kw, res=res, save=save)
    wanted = set(args.parts.split(",")) if args.parts else {k for k, *_ in PARTS}
    if wanted - {k for k, *_ in PARTS}:
        raise SystemExit(f"unknown parts {sorted(wanted - {k for k, *_ in PARTS})}; parts: {res['order']}")
    if not args.compile:
        wanted -= {"compile", "latency_compiled"}
    if any(needs for k, _, needs, _ in PARTS if k in wanted):
        wanted.add("build")
    for key, fn, needs_model, min_s in PARTS:
        rec = res["parts"][key] = {}
        if key not in wanted:
            rec.update(status="skipped", reason="not selected (--parts / --no-compile)")
            continue
        if clock.stopped:
            rec.update(status="cut", reason=f"not started: {clock.stopped}")
            continue
        if needs_model and ctx.model is None:
            rec.update(status="skipped", reason="needs the model from `build`, which did not complete")
            continue
        if key == "latency_compiled" and not engine_kw["compile_layers"]:
            rec.update(status="skipped", reason="compiled blocks not in use (compile check failed or did not run)")
            continue
        if not args.tiny and clock.left() < min_s:
            rec.update(status="cut", reason=f"not started: {clock.left():.0f}s left, needs >= {min_s}s")
            save()
            continue
        box = sizes.boxes.get(key)
        print(f"[{key}] start at {clock.elapsed():.0f}s (box {box}s, {clock.left():.0f}s left)", flush=True)
        run = PartRun(ctx, rec)
        t = time.time()
        rec["status"] = "running"
        try:
            with clock.box(box):
                fn(run, ctx)
            rec["status"] = "ok"
        except Cut as c:
            rec.update(status="cut", reason=c.reason)
        except Exception as e:  # a failed part must not lose the others' results
            rec.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=8))
        rec["part_s"] = time.time() - t
        if key == "compile":
            use = rec.get("status") == "ok" and "mixed" in rec and not rec.get("fallback")
            engine_kw["compile_layers"] = use
            rec["later_parts_use_compiled_blocks"] = use
        run.save()  # outside the box: a signal now only marks the clock stopped
        print(f"[{key}] {rec['status']}{' (' + rec['reason'] + ')' if 'reason' in rec else ''}"
              f"{': ' + rec['error'] if 'error' in rec else ''} in {rec['part_s']:.0f}s "
              f"(total {clock.elapsed():.0f}s)", flush=True)
    save()
    print(json.dumps(res["targets"], indent=2), f"\nwall {clock.elapsed():.0f}s -> {out_dir / (name + '.json')}",
          flush=True)
    return res


def layer_api() -> dict:
    import inspect

    import transformers
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    params = inspect.signature(LlamaDecoderLayer.forward).parameters
    return {"transformers": transformers.__version__, "pinned": "5.23.0",
            "has_position_embeddings": "position_embeddings" in params,
            "has_cache_position": "cache_position" in params}


def targets(res: dict) -> dict:
    """Pass/fail of every target whose part ran; absent when its part did not finish."""
    p = {k: v for k, v in res["parts"].items() if v.get("status") == "ok"}
    t = {}
    if "correctness" in p:
        t["engine_equals_reference_on_device_with_graphs_captured"] = bool(p["correctness"].get("ok"))
    if "build" in p:
        m = p["build"]
        t["memory_pair_plus_stitches_le_1.05x_pair"] = (m["ratio_allocated"] or m["ratio_params"]) <= 1.05
    if "latency_graphs" in p and "max_x_floor_burst" in p["latency_graphs"]:
        lat = p["latency_graphs"]
        t["graphs_batch1_every_stitch_le_1.25x_floor"] = lat["max_x_floor_burst"] <= 1.25
        t["batch1_latency_strictly_increasing_with_bytes"] = lat["strictly_increasing_burst"]
    if "latency_compiled" in p and p["latency_compiled"]["rows"] and "x_floor_burst" in p["latency_compiled"]["rows"][0]:
        t["compiled_batch1_le_1.25x_floor"] = max(r["x_floor_burst"] for r in p["latency_compiled"]["rows"]) <= 1.25
    for key, how in (("batching_short", "adjacent"), ("batching_long", "adjacent_long")):
        if key in p:
            b = p[key][how]
            t[f"mixed_ge_0.9x_single_mean_stitch_{how}"] = b["mixed_vs_single"] >= 0.9
            t[f"mixed_beats_separate_queues_{how}"] = b["mixed_vs_queues"] > 1.0
    if "quant" in p and "logits" in p["quant"]:
        t["int4_logits_match_dequantized_reference"] = bool(p["quant"].get("ok"))
    if "compile" in p:
        t["compiled_blocks_match_eager"] = bool(p["compile"].get("ok"))
    if "hf" in p and "latency_graphs" in p:
        rows = {r["stitch"]: r for r in p["latency_graphs"]["rows"]}
        for role in ("small", "large"):
            for impl in ("dynamic", "static"):
                hf = p["hf"].get(f"{role}_{impl}_ms_per_token")
                if hf is not None and role in rows:
                    t[f"beats_hf_generate_{role}_{impl}"] = rows[role]["synced_ms"] < hf
    return t


def render_markdown(res: dict) -> str:
    env = res["env"]
    lines = [f"# {res['benchmark']}", "",
             f"{env.get('device')} | torch {env.get('torch')} | transformers {env.get('transformers')} "
             f"[{res.get('transformers_source')}] | graphs: {res.get('graph_capture')} | {env.get('date')} | "
             f"wall {res.get('wall_s', 0):.0f}s of {res.get('budget_s', 0):.0f}s", "", "## Parts", "",
             "| part | status | s | graphs captured / replayed / failed | compile frames / recompiles / s | note |",
             "|---|---|---|---|---|---|"]
    for key in res["order"]:
        r = res["parts"].get(key, {})
        g, c = r.get("graphs", {}), r.get("compile_activity", {})
        note = r.get("reason") or r.get("error", "").split("\n")[0] or "; ".join(g.get("errors", []))
        lines.append(f"| {key} | {r.get('status', '-')} | {r.get('part_s', 0):.0f} | "
                     f"{g.get('captures', '-')} / {g.get('replays', '-')} / {g.get('failed_captures', '-')} | "
                     f"{c.get('frames', '-')} / {c.get('recompiles', '-')} / {c.get('compile_s', 0):.0f} | {note[:120]} |")
    lines += ["", "## Targets", ""] + [f"- {k}: {'PASS' if v else 'FAIL'}" for k, v in res.get("targets", {}).items()]
    p = res["parts"]
    m = p.get("build", {})
    if "pair_param_bytes" in m:
        alloc = m["allocated_bytes"]["served"]
        lines += ["", f"Memory: pair {m['pair_param_bytes'] / 1e9:.2f} GB of parameters, served (every stitch) "
                  f"{m['served_param_bytes'] / 1e9:.2f} GB (x{m['ratio_params']:.3f})"
                  + (f"; allocated {alloc / 1e9:.2f} GB (x{m['ratio_allocated']:.3f})" if alloc else "")]
    bw = p.get("bandwidth", {})
    if "stream" in bw:
        lines += [f"Bandwidth (random data): read {bw['stream']['read_GBps']:.0f} GB/s, "
                  f"copy {bw['stream']['copy_GBps']:.0f} GB/s"]
    if "gemv" in bw:
        lines += ["GEMV at batch 1: " + ", ".join(f"{k} {v['GBps']:.0f} GB/s" for k, v in bw["gemv"]["shapes"].items())]
    for key in ("latency_graphs", "latency_compiled"):
        if p.get(key, {}).get("rows"):
            lines += ["", f"## Decode step, batch 1 ({key})", "",
                      "| stitch | MB read | floor ms | GEMV floor ms | burst ms | x floor | synced ms |", "|---|---|---|---|---|---|---|"]
            for r in p[key]["rows"]:
                lines.append(f"| {r['stitch']} | {r['decode_bytes'] / 1e6:.0f} | {_f(r.get('floor_ms'))} | "
                             f"{_f(r.get('gemv_floor_ms'))} | {_f(r['burst_ms'])} | {_f(r.get('x_floor_burst'))} | "
                             f"{_f(r['synced_ms'])} |")
    for key in ("batching_short", "batching_long"):
        for how, b in p.get(key, {}).items():
            if not isinstance(b, dict) or "scenarios" not in b:
                continue
            lines += ["", f"## {how}: {b['prompt_len']}-token prompts, {', '.join(b['stitches'])}", "",
                      "| scenario | rows | kv_len | step ms | floor ms (weights + K/V) | x floor |", "|---|---|---|---|---|---|"]
            for n, s in b["scenarios"].items():
                lines.append(f"| {n} | {s['rows']} | {s['kv_len']} | {s['step_s'] * 1e3:.2f} | "
                             f"{_f(s.get('floor_s') and s['floor_s'] * 1e3)} | {_f(s.get('x_floor'))} |")
            if "mixed_vs_single" in b:
                lines.append(f"\nmixed/single {b['mixed_vs_single']:.2f} (weights bound {b['weights_bound_ratio']:.2f}, "
                             f"with K/V {b['bound_with_kv']:.2f}); mixed/queues {b['mixed_vs_queues']:.2f}")
    q = p.get("qwen_pair", {})
    if q.get("rows"):
        lines += ["", "## Qwen2.5-Coder pair shapes", "", "| stitch | MB read | batch 1 ms | batch 8 ms |", "|---|---|---|---|"]
        lines += [f"| {r['stitch']} | {r['decode_bytes'] / 1e6:.0f} | {r['batch1_ms']:.2f} | {r['batch8_ms']:.2f} |"
                  for r in q["rows"]]
        if "mixed_budget" in q:
            mb = q["mixed_budget"]
            lines.append(f"\nmixed-budget batch of 8 over {', '.join(mb['stitches'])}: {mb['step_ms']:.2f} ms/step "
                         f"(largest of them at batch 8: {mb['largest_stitch_batch8_ms']:.2f})")
    qz = p.get("quant", {})
    if qz.get("logits"):
        lg = qz["logits"]
        lines += ["", "## int4 serving path", "",
                  f"backends {qz['backends']}; logits vs dequantized reference: rel L2 max {lg['rel_l2_max']:.3g}, "
                  f"argmax agree {lg['argmax_agree']:.3f}"]
        lines += [f"- {r['stitch']}: batch 1 {r.get('batch1_ms', float('nan')):.2f} ms, batch 8 "
                  f"{r.get('batch8_ms', float('nan')):.2f} ms" for r in qz.get("rows", [])]
    for name in ("batch1", "mixed"):
        c = p.get("compile", {}).get(name)
        if c:
            lines.append(f"Compile check {name}: rel L2 max {c['rel_l2_max']:.3g}, argmax agree {c['argmax_agree']:.3f}, "
                         f"first call {c['first_call_s']:.1f}s")
    hf = {k: v for k, v in p.get("hf", {}).items() if k.endswith("_ms_per_token")}
    if hf:
        lines += ["", "HF generate on plain anchors (batch 1): " + ", ".join(f"{k} {v:.2f}" for k, v in hf.items())]
    return "\n".join(lines) + "\n"


def _f(x) -> str:
    return "-" if x is None else f"{x:.2f}"


if __name__ == "__main__":
    res = main()
    sys.exit(0 if all(p.get("status") in ("ok", "skipped") for p in res["parts"].values()) else 1)
