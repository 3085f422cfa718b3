"""GPU benchmark of the stitched decode engine: ONE command, one H100/H200, under 10 minutes, needing
only torch + transformers (+ this repository).

    python benchmarks/engine_gpu.py                 # writes into $OUT (or --out, or benchmarks/results)
    python benchmarks/engine_gpu.py --tiny          # the same logic on tiny shapes (CPU is fine), ~30 s

What it does, in order (each part is time-boxed; results are written after every part):
  0. correctness on the device: tiny fp32 pair with random PST, engine (CUDA graphs) greedy tokens ==
     reference StitchedLM tokens for every stitch alone and in one mixed batch;
  1. builds LLaMA-7B-shape (32 layers, hidden 4096) and 13B-shape (40 layers, hidden 5120) anchors with
     random bf16 weights on the device (LlamaConfig), the StitchedLM over them (39 stitches + 2
     anchors, LoRA merged, PST in bf16) and records resident memory: pair + every stitch vs the pair;
     1b. torch.compile'd blocks vs eager blocks: one decode step's logits on the real shapes (mixed
     batch of every stitch, and batch 1); on failure the rest runs with eager blocks + CUDA graphs;
  2. measures memory bandwidth (bf16 reduction and copy, the larger counts);
  3. per-stitch decode step at batch 1 (device-bound bursts and host-synced steps) against the time
     to read the stitch's weights once; checks latency strictly increases with stitch bytes;
  4. 32 streams over 8 stitches in one mixed batch vs 32 on the stitch of the mean size vs the 8
     stitches as separate batch queues ('adjacent' and 'spread' stitch choices, 128-token prompts;
     'adjacent' again with long prompts: 1536 tokens on a >100 GB GPU, else 1024);
  5. HF generate() of each anchor at batch 1 (dynamic cache; --hf-static adds cache_implementation=
     "static", which compiles and takes minutes).
Targets checked are listed under "targets" in the JSON.

Setup on the GPU machine: the repository is the working directory. The project pins transformers
5.23.0; the machine has 5.17. If `.whl/transformers-5.23.0-py3-none-any.whl` was carried (the
`.whl/` folder is git-ignored: `pip download transformers==5.23.0 --no-deps -d .whl`, then
`carry=[".whl"]`), the script installs it into /tmp and re-runs itself with it, provided it imports
with the machine's other packages; otherwise it runs on the installed version. The engine only uses
the decoder-layer API (position_embeddings, cache.update(k, v, layer_idx)), and part 0 checks the
engine against the reference decoder on whatever version runs. stitchlib uses pydantic; if the
machine lacks it, a minimal stand-in for the three names stitchlib uses is installed (no validation).
"""
from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import sys
import time
import traceback
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


# ---- environment ------------------------------------------------------------------------------------
PINNED_TRANSFORMERS = "5.23.0"


def use_pinned_transformers(wheel_dir: Path) -> str:
    """If the installed transformers is not the pinned one and its wheel was carried (in `.whl/`),
    install it into a private directory and re-run this script with it first on the path. It is
    used only if it imports cleanly with the machine's other packages; otherwise the installed
    version is kept (the correctness part checks the layer API the engine relies on)."""
    import importlib.metadata
    import subprocess

    have = importlib.metadata.version("transformers")
    if have == PINNED_TRANSFORMERS or os.environ.get("STITCHSERVE_PINNED_TF") == "1":
        return f"{have} (installed)" if os.environ.get("STITCHSERVE_PINNED_TF") != "1" else f"{have} (carried wheel)"
    wheels = sorted(wheel_dir.glob(f"transformers-{PINNED_TRANSFORMERS}-*.whl"))
    if not wheels:
        return f"{have} (installed; no carried {PINNED_TRANSFORMERS} wheel in {wheel_dir})"
    target = Path("/tmp/stitchserve-transformers")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               STITCHSERVE_PINNED_TF="1")
    try:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--upgrade",
                        "--target", str(target), str(wheels[-1])], check=True, capture_output=True, timeout=180)
        subprocess.run([sys.executable, "-c", "import transformers.models.llama.modeling_llama"], env=env, check=True,
                       capture_output=True, timeout=180)
    except (subprocess.SubprocessError, OSError) as e:
        return f"{have} (installed; carried {PINNED_TRANSFORMERS} unusable here: {type(e).__name__})"
    os.execve(sys.executable, [sys.executable, *sys.argv], env)  # does not return


def ensure_pydantic() -> str:
    """stitchlib's config classes use pydantic (BaseModel, Field, ValidationError). Install a minimal
    stand-in when the package is missing: defaults, model_copy/model_dump/model_validate, no checks."""
    try:
        import pydantic
        return pydantic.VERSION
    except ImportError:
        pass
    import copy as _copy

    mod = types.ModuleType("pydantic")

    class ValidationError(ValueError):
        def errors(self):
            return [{"loc": (), "msg": str(self)}]

    class FieldInfo:
        def __init__(self, default=..., default_factory=None):
            self.default, self.default_factory = default, default_factory

    def Field(default=..., *, default_factory=None, **_):
        return FieldInfo(default, default_factory)

    class BaseModel:
        __stub_fields__: dict = {}

        def __init_subclass__(cls, **kw):
            super().__init_subclass__(**kw)
            fields = {}
            for base in reversed(cls.__mro__[1:]):
                fields.update(getattr(base, "__stub_fields__", {}))
            for name in inspect.get_annotations(cls):
                if name.startswith("_") or name == "model_config":
                    continue
                v = cls.__dict__.get(name, ...)
                fields[name] = v if isinstance(v, FieldInfo) else FieldInfo(v)
            cls.__stub_fields__ = fields

        def __init__(self, **data):
            for name, f in self.__stub_fields__.items():
                if name in data:
                    val = data.pop(name)
                elif f.default_factory is not None:
                    val = f.default_factory()
                elif f.default is not ...:
                    val = _copy.copy(f.default)
                else:
                    raise ValidationError(f"{type(self).__name__}.{name}: field required")
                object.__setattr__(self, name, val)
            if data:
                raise ValidationError(f"{type(self).__name__}: unexpected fields {sorted(data)}")

        def model_copy(self, update=None, deep=False):
            new = _copy.deepcopy(self) if deep else _copy.copy(self)
            for k, v in (update or {}).items():
                object.__setattr__(new, k, v)
            return new

        def model_dump(self, **_):
            def dump(v):
                if isinstance(v, BaseModel):
                    return v.model_dump()
                if isinstance(v, dict):
                    return {k: dump(x) for k, x in v.items()}
                if isinstance(v, (list, tuple)):
                    return type(v)(dump(x) for x in v)
                return v
            return {k: dump(getattr(self, k)) for k in self.__stub_fields__}

        def model_dump_json(self, indent=None, **_):
            return json.dumps(self.model_dump(), indent=indent, default=str)

        @classmethod
        def model_validate(cls, obj):
            return obj if isinstance(obj, cls) else cls(**obj)

        def __eq__(self, other):
            return type(self) is type(other) and self.model_dump() == other.model_dump()

        def __repr__(self):
            return f"{type(self).__name__}({', '.join(f'{k}={getattr(self, k)!r}' for k in self.__stub_fields__)})"

    mod.BaseModel, mod.Field, mod.ValidationError, mod.VERSION = BaseModel, Field, ValidationError, "stub"
    sys.modules["pydantic"] = mod
    return "stub (pydantic not installed)"


def layer_api() -> dict:
    import transformers
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    params = inspect.signature(LlamaDecoderLayer.forward).parameters
    return {"transformers": transformers.__version__, "pinned": "5.23.0",
            "has_position_embeddings": "position_embeddings" in params,
            "has_cache_position": "cache_position" in params}


# ---- model construction -------------------------------------------------------------------------------
SHAPES = {
    # name: (hidden, layers, heads, kv_heads, ffn, vocab)
    "llama-7b-shape": (4096, 32, 32, 32, 11008, 32000),
    "llama-13b-shape": (5120, 40, 40, 40, 13824, 32000),
    "tiny-a": (64, 4, 4, 2, 128, 512),
    "tiny-b": (96, 5, 4, 2, 192, 512),
}


def build_anchor(name: str, device: torch.device, dtype: torch.dtype, tokenizer, seed: int):
    """A LLaMA-layout anchor with random weights, built directly on the device in `dtype`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from stitchlib.anchors import Anchor, compute_stats

    d, n, h, kv, ffn, vocab = SHAPES[name]
    cfg = LlamaConfig(hidden_size=d, num_hidden_layers=n, num_attention_heads=h, num_key_value_heads=kv,
                      intermediate_size=ffn, vocab_size=vocab, max_position_embeddings=4096,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = "sdpa"
    prev = torch.get_default_dtype()
    torch.manual_seed(seed)
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    model = model.to(device=device, dtype=dtype).requires_grad_(False).eval()
    return Anchor(name=name, source=f"random:{name}", model=model, tokenizer=tokenizer, stats=compute_stats(model),
                  fingerprint=f"random-{name}-{seed}")


def build_stitched(small: str, large: str, device: torch.device, dtype: torch.dtype, *, random_pst: bool = False):
    from engine_common import prepare_for_serving

    from stitchlib.model import StitchedLM
    from stitchlib.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()  # only its identity is checked (one tokenizer shared by the pair)
    S = build_anchor(small, device, dtype, tok, seed=0)
    L = build_anchor(large, device, dtype, tok, seed=1)
    torch.manual_seed(2)
    model = StitchedLM(S, L)
    if random_pst:
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for _, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_((torch.randn(p.shape, generator=g) * 0.05).to(p.device, p.dtype))
    else:
        prepare_for_serving(model, dtype)
    return model


# ---- parts ---------------------------------------------------------------------------------------------
def part_correctness(device: torch.device, engine_kw: dict) -> dict:
    """Engine (with this machine's graphs / compile settings) against the reference decoder, fp32."""
    from stitchlib.engine import EngineConfig, StitchEngine
    from stitchlib.runtime import SamplingParams

    model = build_stitched("tiny-a", "tiny-b", device, torch.float32, random_pst=True)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 512, (t,), generator=g).tolist() for t in (7, 12)]
    n = 6
    ref = {(s.id, i): model.generate(torch.tensor([p], device=device), s.id, max_new_tokens=n)[0].tolist()
           for s in model.stitches for i, p in enumerate(prompts)}
    engine = StitchEngine(model, EngineConfig(**{"max_slots": len(ref), "max_seq_len": 64, **engine_kw}))
    params = SamplingParams(max_tokens=n, temperature=0.0)
    alone_bad = []
    for (sid, i), want in ref.items():
        engine.add_request(prompts[i], sid, params)
        got = []
        while engine.has_unfinished():
            got += engine.step().values()
        if got != want:
            alone_bad.append(sid)
    rid_of = {engine.add_request(prompts[i], sid, params): (sid, i) for (sid, i) in ref}
    out = {r: [] for r in rid_of}
    while engine.has_unfinished():
        for r, t in engine.step().items():
            out[r].append(t)
    mixed_bad = [rid_of[r][0] for r, toks in out.items() if toks != ref[rid_of[r]]]
    graphs = engine.graphs.captures if engine.graphs is not None else 0
    return {"stitches": len(model.stitches), "alone_mismatch": alone_bad, "mixed_mismatch": mixed_bad,
            "ok": not alone_bad and not mixed_bad, "graph_captures": graphs, "graph_error": engine.graph_error}


@torch.no_grad()
def part_compile_check(model, device, engine_kw: dict) -> dict:
    """Compiled blocks against eager blocks on the real shapes: one decode step's logits for a
    mixed batch with one row per stitch, and for a single row (batch 1 is compiled separately).
    bf16 on random weights: compared by max |diff| relative to the logits' spread."""
    from stitchlib.engine import EngineConfig, StitchEngine
    from stitchlib.runtime import SamplingParams

    g = torch.Generator().manual_seed(0)
    vocab = model.small_anchor.stats.vocab_size
    ids = [s.id for s in model.stitches]
    out = {}
    for name, rows in (("mixed", ids), ("batch1", [ids[len(ids) // 2]])):
        prompts = torch.randint(3, vocab, (len(rows), 16), generator=g).tolist()
        logits = {}
        for mode in ("eager", "compiled"):
            kw = {**engine_kw, "cuda_graphs": False, "compile_layers": mode == "compiled"}
            e = StitchEngine(model, EngineConfig(**{"max_slots": len(rows), "max_seq_len": 64, **kw}))
            for p, sid in zip(prompts, rows):
                e.add_request(p, sid, SamplingParams(max_tokens=4, temperature=0.0))
            e.step()  # eager prefill (identical in both)
            n = e.num_running
            plan = e._plan(tuple(r.key for r in e.rows))
            logits[mode] = e.runner.forward(e.tokens[:n, None], e.lengths[:n, None], slice(0, n), plan,
                                            e._kv_len(max(r.length for r in e.rows) + 1)).float()
            del e
        diff = (logits["eager"] - logits["compiled"]).abs().max().item()
        spread = logits["eager"].std().item()
        out[name] = {"rows": len(rows), "max_abs_diff": diff, "logit_std": spread, "rel": diff / spread}
    out["ok"] = all(v["rel"] < 0.1 for v in out.values() if isinstance(v, dict))
    return out


def part_latency(model, bw, *, prompt_len, steps, rounds, engine_kw, device) -> dict:
    from engine_common import decode_bytes, is_strictly_increasing, median, stitch_latency

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, model.small_anchor.stats.vocab_size, (prompt_len,), generator=g).tolist()
    order = sorted((s.id for s in model.stitches), key=lambda sid: decode_bytes(model, sid, 2))
    burst = {k: median(v) for k, v in stitch_latency(model, order, prompt=prompt, steps=steps, rounds=rounds,
                                                         config_kw=engine_kw, burst=True).items()}
    synced = {k: median(v) for k, v in stitch_latency(model, order, prompt=prompt, steps=steps, rounds=1,
                                                          config_kw=engine_kw).items()}
    rows = []
    for sid in order:
        b = decode_bytes(model, sid, 2)
        floor = b / (bw["used_GBps"] * 1e9)
        rows.append({"stitch": sid, "decode_bytes": b, "floor_ms": floor * 1e3, "burst_ms": burst[sid] * 1e3,
                     "synced_ms": synced[sid] * 1e3, "x_floor_burst": burst[sid] / floor,
                     "x_floor_synced": synced[sid] / floor})
    inc_b, bad_b = is_strictly_increasing([r["burst_ms"] for r in rows])
    inc_s, bad_s = is_strictly_increasing([r["synced_ms"] for r in rows])
    return {"prompt_len": prompt_len, "timed_steps": steps, "rounds": rounds, "rows": rows,
            "max_x_floor_burst": max(r["x_floor_burst"] for r in rows),
            "max_x_floor_synced": max(r["x_floor_synced"] for r in rows),
            "strictly_increasing_burst": inc_b, "violations_burst": [rows[i]["stitch"] for i in bad_b],
            "strictly_increasing_synced": inc_s, "violations_synced": [rows[i]["stitch"] for i in bad_s]}


def part_batching(model, *, streams, n_stitches, prompt_len, long_prompt_len, steps, engine_kw) -> dict:
    """Short context for both stitch choices, and the adjacent choice at a long context, where every
    row's own K/V reads (the same in all three scenarios) weigh against the union's extra weights."""
    from engine_common import batch_scenarios, pick_stitches

    out = {}
    for how, plen in (("adjacent", prompt_len), ("spread", prompt_len), ("adjacent_long", long_prompt_len)):
        ids = pick_stitches(model, n_stitches, how.removesuffix("_long"))
        out[how] = batch_scenarios(model, ids, streams=streams, prompt_len=plen, steps=steps, config_kw=engine_kw)
        out[how]["prompt_len"] = plen
    return out


@torch.no_grad()
def part_hf(model, device, *, prompt_len, steps, static: bool) -> dict:
    """ms per token of HF generate() at batch 1, from per-step timestamps inside generate."""
    from engine_common import hf_generate_step_times, median

    out = {}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.small_anchor.stats.vocab_size, (1, prompt_len), generator=g).to(device)
    for role, anchor in (("small", model.small_anchor), ("large", model.large_anchor)):
        for impl in (["dynamic", "static"] if static else ["dynamic"]):
            kw = {"cache_implementation": "static"} if impl == "static" else {}
            hf_generate_step_times(anchor.model, ids, 3, **kw)  # warm-up (compiles for static)
            out[f"{role}_{impl}_ms_per_token"] = median(hf_generate_step_times(anchor.model, ids, steps, **kw)) * 1e3
    return out


# ---- driver ------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="result directory (default $OUT, else benchmarks/results)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes: check the script's logic anywhere, fast")
    ap.add_argument("--device", default=None, help="default cuda when available, else cpu")
    ap.add_argument("--no-compile", action="store_true", help="CUDA graphs over eager blocks only")
    ap.add_argument("--compile", action="store_true", help="compile blocks even without CUDA (to test --tiny)")
    ap.add_argument("--hf-static", action="store_true", help="also HF generate with the static cache (slow)")
    ap.add_argument("--budget-s", type=float, default=540.0, help="skip remaining parts past this wall time")
    ap.add_argument("--long-prompt", type=int, default=None,
                    help="prompt length of the long-context batching run (default 1536 on >100 GB GPUs, else 1024)")
    ap.add_argument("--wheels", default=str(Path(__file__).resolve().parents[1] / ".whl"),
                    help="where a carried transformers wheel is looked for")
    args = ap.parse_args(argv)
    t0 = time.time()
    tf_note = use_pinned_transformers(Path(args.wheels)) if argv is None else "in-process call: as installed"
    pyd = ensure_pydantic()
    from engine_common import env_info, param_bytes, read_bandwidth

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and not args.tiny:
        raise SystemExit("no CUDA device: run with --tiny to check the logic on CPU")
    out_dir = Path(args.out or os.environ.get("OUT") or Path(__file__).resolve().parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "engine_gpu_tiny" if args.tiny else "engine_gpu"
    use_graphs = device.type == "cuda"
    engine_kw = {"cuda_graphs": use_graphs, "compile_layers": (use_graphs or args.compile) and not args.no_compile,
                 "kv_block": 32 if args.tiny else 256}
    res: dict = {"benchmark": name, "env": env_info(device), "pydantic": pyd, "transformers_source": tf_note,
                 "layer_api": layer_api(),
                 "engine": engine_kw, "parts": {}, "errors": {}, "skipped": []}
    if device.type == "cuda":
        res["env"]["cuda"] = torch.version.cuda
        res["env"]["gpu_memory_GB"] = torch.cuda.get_device_properties(device).total_memory / 1e9

    def save() -> None:
        res["wall_s"] = time.time() - t0
        (out_dir / f"{name}.json").write_text(json.dumps(res, indent=2, default=str))

    def run_part(key: str, fn, fallback_kw: dict | None = None):
        if time.time() - t0 > args.budget_s:
            res["skipped"].append(key)
            return None
        t = time.time()
        try:
            val = fn()
        except Exception as e:  # a failed part must not lose the others' results
            res["errors"][key] = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"
            print(f"[{key}] failed: {type(e).__name__}: {e}", flush=True)
            val = None
        if isinstance(val, dict):
            val["part_s"] = time.time() - t
            res["parts"][key] = val
        save()
        print(f"[{key}] done in {time.time() - t:.0f}s (total {time.time() - t0:.0f}s)", flush=True)
        return val

    # 0. exact tokens against the reference on this device: CUDA graphs, mixed batches, SSB routing
    #    (compiled blocks are checked on the real shapes in 1b: compiling tiny shapes too costs minutes)
    corr = run_part("correctness", lambda: part_correctness(device, {**engine_kw, "compile_layers": False}))

    # 1. model + memory
    small, large = ("tiny-a", "tiny-b") if args.tiny else ("llama-7b-shape", "llama-13b-shape")
    t = time.time()
    model = build_stitched(small, large, device, torch.bfloat16)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    pair = param_bytes(model.small_anchor.model) + param_bytes(model.large_anchor.model)
    total = param_bytes(model)
    mem = {"anchors": [small, large], "n_stitches": len(model.stitches), "pair_bytes": pair,
           "pair_plus_every_stitch_param_bytes": total, "ratio_params": total / pair, "build_s": time.time() - t}
    if device.type == "cuda":
        alloc = torch.cuda.memory_allocated(device)
        mem.update(allocated_bytes=alloc, ratio_allocated=alloc / pair)
    res["parts"]["memory"] = mem
    save()
    print(f"[memory] {mem}", flush=True)

    # 1b. compiled blocks == eager blocks on the real shapes (else: eager blocks + CUDA graphs)
    if engine_kw["compile_layers"]:
        chk = run_part("compile_check", lambda: part_compile_check(model, device, engine_kw))
        if chk is None or not chk.get("ok"):
            res["errors"]["compile_fallback"] = "compiled blocks failed the check: measuring eager blocks + graphs"
            engine_kw["compile_layers"] = False
            res["engine"] = dict(engine_kw)

    # 2. bandwidth
    bw = run_part("bandwidth", lambda: read_bandwidth(device, (64 << 20) if args.tiny else (4 << 30)))

    # 3. per-stitch latency, batch 1
    prompt_len, steps = (24, 4) if args.tiny else (128, 24)
    lat = run_part("latency_batch1", lambda: part_latency(model, bw, prompt_len=prompt_len, steps=steps,
                                                          rounds=1 if args.tiny else 2, engine_kw=engine_kw,
                                                          device=device))
    # 4. mixed batches
    streams, n_st = (8, 4) if args.tiny else (32, 8)
    long_len = args.long_prompt or (96 if args.tiny else 1536 if res["env"].get("gpu_memory_GB", 0) > 100 else 1024)
    bat = run_part("batching", lambda: part_batching(model, streams=streams, n_stitches=n_st,
                                                     prompt_len=prompt_len, long_prompt_len=long_len,
                                                     steps=4 if args.tiny else 16, engine_kw=engine_kw))
    # 5. HF generate baselines
    hf = run_part("hf_generate", lambda: part_hf(model, device, prompt_len=prompt_len, steps=4 if args.tiny else 16,
                                                 static=args.hf_static))

    targets = {}
    if lat:
        targets["batch1_every_stitch_le_1.25x_floor"] = lat["max_x_floor_burst"] <= 1.25
        targets["batch1_latency_strictly_increasing_with_bytes"] = lat["strictly_increasing_burst"]
    if bat:
        a, al = bat["adjacent"], bat["adjacent_long"]
        targets["mixed_32_over_8_ge_0.9x_single_mean_stitch_short_context"] = a["mixed_vs_single"] >= 0.9
        targets["mixed_32_over_8_ge_0.9x_single_mean_stitch_long_context"] = al["mixed_vs_single"] >= 0.9
        targets["mixed_beats_separate_queues"] = a["mixed_vs_queues"] > 1.0 and al["mixed_vs_queues"] > 1.0
    targets["memory_pair_plus_stitches_le_1.05x_pair"] = mem.get("ratio_allocated", mem["ratio_params"]) <= 1.05
    if corr is not None:
        targets["engine_equals_reference_on_device"] = bool(corr.get("ok"))
    if "compile_check" in res["parts"]:
        targets["compiled_blocks_match_eager"] = bool(res["parts"]["compile_check"].get("ok"))
    if hf and lat:
        rows = {r["stitch"]: r for r in lat["rows"]}
        targets["beats_hf_generate_small"] = rows["small"]["synced_ms"] < hf["small_dynamic_ms_per_token"]
        targets["beats_hf_generate_large"] = rows["large"]["synced_ms"] < hf["large_dynamic_ms_per_token"]
    res["targets"] = targets
    save()
    (out_dir / f"{name}.md").write_text(render_markdown(res))
    print(json.dumps(targets, indent=2), f"\nwall {time.time() - t0:.0f}s -> {out_dir / (name + '.json')}", flush=True)
    return res


def render_markdown(res: dict) -> str:
    env = res["env"]
    lines = [f"# {res['benchmark']}", "",
             f"{env.get('device')} | torch {env.get('torch')} | transformers {env.get('transformers')} | "
             f"engine {res['engine']} | {env.get('date')}", "", "## Targets", ""]
    lines += [f"- {k}: {'PASS' if v else 'FAIL'}" for k, v in res.get("targets", {}).items()]
    p = res["parts"]
    if "memory" in p:
        m = p["memory"]
        lines += ["", f"Memory: pair {m['pair_bytes'] / 1e9:.2f} GB, pair + every stitch "
                  f"{m['pair_plus_every_stitch_param_bytes'] / 1e9:.2f} GB (x{m['ratio_params']:.3f} by parameters"
                  + (f", x{m['ratio_allocated']:.3f} allocated" if "ratio_allocated" in m else "") + ")"]
    if "bandwidth" in p:
        lines += [f"Bandwidth: read {p['bandwidth']['read_GBps']:.0f} GB/s, copy {p['bandwidth']['copy_GBps']:.0f} GB/s"]
    if "latency_batch1" in p:
        lines += ["", "## Decode step, batch 1", "", "| stitch | MB read | floor ms | burst ms | x floor | synced ms |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['stitch']} | {r['decode_bytes'] / 1e6:.0f} | {r['floor_ms']:.2f} | {r['burst_ms']:.2f} | "
                  f"{r['x_floor_burst']:.2f} | {r['synced_ms']:.2f} |" for r in p["latency_batch1"]["rows"]]
    if "batching" in p:
        lines += ["", "## Concurrent streams", "", "| choice | prompt | stitches | mixed tok/s | one mean-size stitch tok/s | "
                  "separate queues tok/s | mixed/single | weights bound | mixed/queues |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for how, b in p["batching"].items():
            if how == "part_s":
                continue
            t = b["tokens_per_s"]
            lines.append(f"| {how} | {b['prompt_len']} | {', '.join(b['stitches'])} | {t['mixed']:.1f} | "
                         f"{t['single_mean_stitch']:.1f} "
                         f"({b['mean_size_stitch']}) | {t['separate_queues']:.1f} | {b['mixed_vs_single']:.2f} | "
                         f"{b['weights_bound_ratio']:.2f} | {b['mixed_vs_queues']:.2f} |")
    if "hf_generate" in p:
        lines += ["", "HF generate (batch 1): " + ", ".join(f"{k} {v:.2f}" for k, v in p["hf_generate"].items()
                                                             if k != "part_s")]
    if res.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {k}: {v.splitlines()[0]}" for k, v in res["errors"].items()]
    if res.get("skipped"):
        lines += ["", f"Skipped (time budget): {res['skipped']}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
