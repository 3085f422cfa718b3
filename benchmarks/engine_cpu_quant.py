"""CPU, real Qwen2.5-Coder pair, one run: decode speed of every deployed stitch of a palette and the
anchors under bf16 / int8 / int4 weights and w4a8 (stitchlib.quant) through the engine, next to llama.cpp on
the same GGUF files and HF `generate()`, with the weight-read floor of each.

Interleaved rounds (every method once per round) so load from other jobs hits all alike:
  - batch 1: ms per decode step of one request, per stitch and mode, the stitches of a mode timed step
    by step in turn (one warm engine each); llama.cpp per anchor (one token
    per `eval`, its own KV cache); HF generate per anchor (bf16, the same merged weights);
  - batch 8: tokens/s of 8 requests on one stitch, per stitch and mode.
Before the rounds, each mode's served front (what a replica routes budgets to): serving's start-up
profile (its default batch sizes and steps) and `stitchlib.gate.front_of` at the default margin; the target "every routed stitch
between its anchors" is checked on the rounds' numbers (hatched bars in the plot: shadowed stitches).
Floor = bytes one decode step reads (every weight on the route except the embedding table, from the
modules' actual storage; llama.cpp: the GGUF tensors, token_embd only if the head reads it) divided by
the measured read bandwidth at the same thread count.

    flock /tmp/cpu.lock python benchmarks/engine_cpu_quant.py /tmp/pal_v120 --threads 2   # ~10 min

llama.cpp is optional (pip install 'stitchserve[bench-llamacpp]', builds from source, ~5 min on
2 cores); without it those rows are skipped with a message. Writes
benchmarks/results/engine_cpu_quant.json and .png, and prints markdown tables.
"""
from __future__ import annotations

import argparse
import gc
import os
import resource
import time
from pathlib import Path

import torch

from engine_common import env_info, hf_generate_step_times, median, read_bandwidth, split_modes, timed, write_result

GGUF_DIR = Path("~/.cache/stitchserve/gguf").expanduser()


# ---- bytes a decode step reads ----------------------------------------------------------------
def _storage_bytes(module: torch.nn.Module, seen: set[int]) -> int:
    """Parameters and buffers of `module`, each storage once, without the stitch-specific bias tables
    (a step reads one row of each)."""
    total = 0
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if name.endswith("ssb") or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def route_bytes(model, sid: str) -> int:
    """Weight bytes one decode step of `sid` reads: its blocks, stitching layer, final norm and head
    (a tied bf16 head reads the whole embedding table; the embedding lookup reads one row)."""
    st = model.get(sid)
    S, L = model.small_anchor, model.large_anchor
    seen: set[int] = set()
    mods = [S.layers[i] for i in st.small_blocks(S.stats.num_layers)]
    if st.kind == "stitch":
        mods.append(model.stitching[sid])
    mods += [L.layers[i] for i in st.large_blocks(L.stats.num_layers)]
    end = S if st.kind == "small" else L
    mods += [end.norm, end.lm_head]
    return sum(_storage_bytes(m, seen) for m in mods)


def gguf_decode_bytes(path: Path) -> int:
    import gguf

    r = gguf.GGUFReader(str(path))
    names = {t.name: int(t.n_bytes) for t in r.tensors}
    total = sum(names.values())
    return total if "output.weight" not in names else total - names.get("token_embd.weight", 0)


# ---- llama.cpp ----------------------------------------------------------------------------------
def llama_cpp_runner(path: Path, threads: int, prompt: list[int]):
    """-> callable(steps) giving per-token seconds of single-token `eval` calls after the prompt."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=256, n_batch=64, n_threads=threads, n_threads_batch=threads,
                verbose=False)

    def run(steps: int) -> list[float]:
        llm.reset()
        llm.eval(prompt)
        tok = prompt[-1]
        out = []
        for _ in range(steps):
            t0 = time.perf_counter()
            llm.eval([tok])
            out.append(time.perf_counter() - t0)
        return out

    run(1)  # warm-up
    return run


# ---- our engine ---------------------------------------------------------------------------------
def warm_engine(model, sid: str, prompts: list[list[int]], steps: int, **config_kw):
    """An engine with len(prompts) requests on one stitch, past prefill and one warm-up decode step
    (fast_blocks=False: quantized blocks through the HF call, as before stitchlib.engine.blocks)."""
    from stitchlib.engine import EngineConfig, StitchEngine
    from stitchlib.runtime import SamplingParams

    n = len(prompts)
    e = StitchEngine(model, EngineConfig(max_slots=n, max_seq_len=len(prompts[0]) + steps + 8, stitches=[sid],
                                         **config_kw))
    for p in prompts:
        e.add_request(p, sid, SamplingParams(max_tokens=steps + 4, temperature=0.0))
    e.step()
    e.decode_burst(1)
    return e


@torch.no_grad()
def engine_steps(model, sid: str, prompts: list[list[int]], steps: int, **config_kw) -> list[float]:
    """Seconds per decode step of len(prompts) requests on one stitch (after prefill and one warm-up)."""
    e = warm_engine(model, sid, prompts, steps, **config_kw)
    out = [timed(lambda: e.decode_burst(1), e.device) for _ in range(steps)]
    del e
    return out


@torch.no_grad()
def engine_steps_by_stitch(model, sids: list[str], prompts: list[list[int]], steps: int,
                           **config_kw) -> dict[str, list[float]]:
    """`engine_steps` for every stitch at once, interleaved step by step: one warm engine per stitch,
    then each round of steps times one step of each in turn. Routes that cost within ~1 % of each other
    (s0-l1 and the large anchor) are then measured under the same conditions, step for step, instead of
    a few seconds apart."""
    from stitchlib.engine.profile import interleaved_steps

    engines = {sid: warm_engine(model, sid, prompts, steps, **config_kw) for sid in sids}
    out = interleaved_steps(engines, steps)
    del engines
    return out


@torch.no_grad()
def step_profile(model, sid: str, prompts: list[list[int]], steps: int = 4, **config_kw) -> dict:
    """Where one decode step's time goes (torch.profiler, CPU): self time per op category, and the
    rest of the wall time (Python, module dispatch, the engine's bookkeeping) as `outside ops`."""
    from torch.profiler import ProfilerActivity, profile

    n = len(prompts)
    e = warm_engine(model, sid, prompts, steps, **config_kw)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            e.decode_burst(1)
        wall = (time.perf_counter() - t0) / steps
    cats: dict[str, float] = {}
    ops: dict[str, float] = {}

    def cat(name: str) -> str:
        if "int4pack" in name or "int8pack" in name or "w4a8_mm" in name or name in ("aten::mm", "aten::addmm",
                                                                                      "aten::bmm"):
            return "matmul"
        if "scaled_dot_product" in name or "_flash_attention" in name or name == "aten::_softmax":
            return "attention"
        if name in ("aten::copy_", "aten::to", "aten::_to_copy", "aten::clone", "aten::contiguous", "aten::index_put_",
                    "aten::index", "aten::slice_scatter", "aten::index_select", "aten::cat", "aten::stack"):
            return "copies / indexing"
        if any(k in name for k in ("exponential", "argmax", "topk", "sort", "multinomial", "max", "div_", "cumsum")):
            return "sampling"
        return "other ops (norms, rotary, activations, adds)"

    for ev in prof.key_averages():
        s = ev.self_cpu_time_total / 1e6 / steps
        ops[ev.key] = s
        cats[cat(ev.key)] = cats.get(cat(ev.key), 0.0) + s
    in_ops = sum(cats.values())
    cats["outside ops (Python, dispatch, engine bookkeeping)"] = max(wall - in_ops, 0.0)
    top = dict(sorted(ops.items(), key=lambda kv: -kv[1])[:12])
    del e
    return {"wall_ms": wall * 1e3, "categories_ms": {k: v * 1e3 for k, v in cats.items()},
            "top_ops_ms": {k: v * 1e3 for k, v in top.items()}, "steps": steps, "batch": n}


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b1 = res["batch1"]
    sids = res["stitches"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(14, 5))
    width = 0.8 / (len(res["modes"]) + 2)
    for k, mode in enumerate(res["modes"]):
        xs = [i + k * width for i in range(len(sids))]
        bars = ax.bar(xs, [b1[mode][s]["median_ms"] for s in sids], width, label=f"engine {mode}")
        for bar_, s in zip(bars, sids):
            if s in res["targets"][mode].get("shadowed", {}):
                bar_.set_hatch("//")
        ax.scatter(xs, [b1[mode][s]["floor_ms"] for s in sids], marker="_", color="k", s=120, zorder=3)
    k = len(res["modes"])
    for name, key in (("llama.cpp Q4_K_M", "llama_cpp"), ("HF generate bf16", "hf_generate")):
        d = res.get(key) or {}
        xs = [sids.index(a) + k * width for a in ("small", "large") if a in d]
        if xs:
            ax.bar(xs, [d[a]["median_ms"] for a in ("small", "large") if a in d], width, label=name)
        k += 1
    ax.set_xticks([i + 0.4 for i in range(len(sids))], sids)
    ax.set_ylabel("ms per token, batch 1 (median; ticks: weight-read floor)")
    ax.set_title(f"decode, {res['threads']} threads")
    ax.legend(fontsize=8)
    for k, mode in enumerate(res["modes"]):
        xs = [i + k * width for i in range(len(sids))]
        bx.bar(xs, [res["batch8"][mode][s]["tokens_per_s"] for s in sids], width, label=f"{mode} batch 8")
        bx.scatter(xs, [1e3 / b1[mode][s]["median_ms"] for s in sids], marker="_", color="k", s=120, zorder=3)
    bx.set_xticks([i + 0.4 for i in range(len(sids))], sids)
    bx.set_ylabel("tokens/s (bars: batch 8; ticks: batch 1)")
    bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("palette")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=["none,int8,int4,w4a8"],
                    help="quantization specs: none,int8,int4,w4a8 (comma-joined) and/or per-anchor ones, each its "
                         "own value (small=int8,large=w4a8)")
    ap.add_argument("--group-size", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4, help="timed decode steps per measurement per round")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--gguf-dir", type=Path, default=GGUF_DIR)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--profile", action="store_true", help="also a torch.profiler breakdown of one decode step")
    ap.add_argument("--compile", default="", help="modes also timed with torch.compile'd blocks (e.g. int4), as "
                                                  "'<mode>+compile'; the first use compiles (minutes on CPU)")
    ap.add_argument("--hf-blocks", default="", help="quantized modes also timed with their blocks through the HF "
                                                     "call instead of stitchlib.engine.blocks (the path before "
                                                     "it), as '<mode>+hf-blocks'")
    ap.add_argument("--out", default=None)
    ap.add_argument("--name", default="engine_cpu_quant")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from tqdm import tqdm

    from serving.config import ProfileConfig
    from stitchlib.gate import MIN_SAVING, front_of
    from stitchlib.runtime import PaletteRuntime

    t_start = time.time()
    env = env_info("cpu")
    bw = read_bandwidth(torch.device("cpu"), 1 << 30, repeats=3)
    base_modes = split_modes(args.modes)
    compiled = [m for m in args.compile.split(",") if m]
    hf_blocks = [m for m in args.hf_blocks.split(",") if m]
    modes = base_modes + [f"{m}+compile" for m in compiled] + [f"{m}+hf-blocks" for m in hf_blocks]
    rts, load_s = {}, {}
    for mode in base_modes:
        t0 = time.time()
        rts[mode] = PaletteRuntime.load(args.palette, quantize=mode, group_size=args.group_size)
        load_s[mode] = time.time() - t0
    for m in compiled:
        rts[f"{m}+compile"] = rts[m]
    for m in hf_blocks:
        rts[f"{m}+hf-blocks"] = rts[m]
    kw = {m: ({"compile_layers": True} if m.endswith("+compile") else
              {"fast_blocks": False} if m.endswith("+hf-blocks") else {}) for m in modes}
    compile_s: dict[str, float | str] = {}
    for m in list(modes):
        if kw[m]:  # compile outside the timed rounds: one warm-up per stitch kind and batch size
            t0 = time.time()
            try:
                for sid in ("small", rts[m].stitches[1].id, "large"):
                    engine_steps(rts[m].model, sid, [[1] * args.prompt_len], 1, **kw[m])
                    engine_steps(rts[m].model, sid, [[1] * args.prompt_len] * args.batch, 1, **kw[m])
                compile_s[m] = time.time() - t0
            except Exception as e:  # noqa: BLE001 - a failed compile drops that variant, not the run
                compile_s[m] = f"failed after {time.time() - t0:.0f}s: {type(e).__name__}: {str(e)[:300]}"
                modes.remove(m)
                print(m, compile_s[m], flush=True)
    rt0 = rts[modes[0]]
    sids = [s.id for s in rt0.stitches]  # deployed, cheapest first
    # The served front per mode, decided as a replica decides it: its start-up profile (serving's
    # defaults, stitches interleaved), then stitchlib.gate.front_of at the default margin. The
    # timed rounds below are separate measurements that check the routed stitches' order.
    pc = ProfileConfig()
    front, startup = {}, {}
    for mode in base_modes:
        prof = rts[mode].profile(prompt_len=pc.prompt_len, decode_steps=pc.decode_steps,
                                 batch_sizes=tuple(pc.batch_sizes))
        startup[mode] = {sid: {b: t * 1e3 for b, t in p.decode_step_s.items()} for sid, p in prof.items()}
        front[mode] = front_of(rts[mode].stitches, prof)
    for m in modes:
        front.setdefault(m, front[m.split("+")[0]])
    vocab = rt0.model.small_anchor.stats.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, min(vocab, len(rt0.tokenizer)), (args.batch, args.prompt_len), generator=g).tolist()
    ids = torch.tensor([prompts[0]])

    llama, llama_note = {}, None
    try:
        import llama_cpp  # noqa: F401
        for role, anchor in (("small", rt0.model.small_anchor), ("large", rt0.model.large_anchor)):
            path = args.gguf_dir / f"{anchor.name}.gguf"
            if not path.is_file():
                llama_note = f"no GGUF file {path}"
                continue
            llama[role] = (path, llama_cpp_runner(path, args.threads, prompts[0]))
    except ImportError:
        llama_note = ("llama-cpp-python is not installed: llama.cpp rows skipped "
                      "(pip install 'stitchserve[bench-llamacpp]')")
        print(llama_note, flush=True)
    hf = {} if args.no_hf else {"small": rt0.model.small_anchor.model, "large": rt0.model.large_anchor.model}
    if hf and modes[0] != "none":
        hf, hf_note = {}, "HF generate needs the bf16 runtime first in --modes"
    else:
        hf_note = "bf16, the palette's merged anchor weights (PST wrappers inert outside a route)"
    for m in hf.values():
        m.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up

    b1 = {m: {s: [] for s in sids} for m in modes}
    b8 = {m: {s: [] for s in sids} for m in modes}
    ll = {r: [] for r in llama}
    hfs = {r: [] for r in hf}
    todo = args.rounds * (len(modes) * len(sids) * 2 + len(llama) + len(hf))
    with tqdm(total=todo, desc="interleaved rounds", unit="measurement") as bar:
        for _ in range(args.rounds):
            for mode in modes:
                for sid, t in engine_steps_by_stitch(rts[mode].model, sids, prompts[:1], args.steps,
                                                     **kw[mode]).items():
                    b1[mode][sid] += t
                bar.update(len(sids))
            for role, (_, run) in llama.items():
                ll[role] += run(args.steps)
                bar.update(1)
            for role, m in hf.items():
                hfs[role] += hf_generate_step_times(m, ids, args.steps)
                bar.update(1)
            for mode in modes:
                for sid, t in engine_steps_by_stitch(rts[mode].model, sids, prompts, args.steps, **kw[mode]).items():
                    b8[mode][sid] += t
                bar.update(len(sids))
    gb = bw["used_GBps"] * 1e9
    res_b1, res_b8 = {}, {}
    for mode in modes:
        res_b1[mode], res_b8[mode] = {}, {}
        for sid in sids:
            nbytes = route_bytes(rts[mode].model, sid)
            med, mn = median(b1[mode][sid]), min(b1[mode][sid])
            res_b1[mode][sid] = {"median_ms": med * 1e3, "min_ms": mn * 1e3, "decode_bytes": nbytes,
                                 "floor_ms": nbytes / gb * 1e3, "x_floor": med * gb / nbytes}
            s8 = median(b8[mode][sid])
            res_b8[mode][sid] = {"step_ms": s8 * 1e3, "tokens_per_s": args.batch / s8,
                                 "x_batch1_tokens_per_s": args.batch / s8 * med}
    res_ll = {}
    for role, (path, _) in llama.items():
        nbytes = gguf_decode_bytes(path)
        med = median(ll[role])
        res_ll[role] = {"gguf": str(path), "median_ms": med * 1e3, "min_ms": min(ll[role]) * 1e3,
                        "decode_bytes": nbytes, "floor_ms": nbytes / gb * 1e3, "x_floor": med * gb / nbytes}
    res_hf = {r: {"median_ms": median(v) * 1e3, "min_ms": min(v) * 1e3} for r, v in hfs.items()}

    targets = {}
    for mode in modes:
        t = res_b1[mode]
        lo, hi = t["small"]["median_ms"], t["large"]["median_ms"]
        routed = [s for s in sids if front[mode][s].routed]
        targets[mode] = {
            "every_stitch_between_its_anchors": all(lo <= t[s]["median_ms"] <= hi for s in sids),
            # the done-when's check for what budgets are served: the stitches the served front routes
            "routed": routed,
            "shadowed": {s: front[mode][s].shadowed_by for s in sids if not front[mode][s].routed},
            "every_routed_stitch_between_its_anchors": all(lo <= t[s]["median_ms"] <= hi for s in routed),
            "batch8_at_least_4x_batch1": {s: res_b8[mode][s]["x_batch1_tokens_per_s"] >= 4 for s in sids},
        }
        if res_ll:
            targets[mode]["vs_llama_cpp"] = {r: t[r]["median_ms"] / res_ll[r]["median_ms"] for r in res_ll}
            targets[mode]["anchors_within_1.5x_llama_cpp"] = all(v <= 1.5 for v in targets[mode]["vs_llama_cpp"].values())

    prof = None
    if args.profile:
        prof = {}
        for mode in [m for m in ("none", "int4+hf-blocks", "int4", "int4+compile", "w4a8") if m in modes]:
            for sid in ("small", "large"):
                for n in (1, args.batch):
                    prof[f"{mode} {sid} batch {n}"] = step_profile(rts[mode].model, sid, prompts[:n], **kw[mode])
    res = {"benchmark": "engine_cpu_quant", "env": env, "palette": str(args.palette), "threads": args.threads,
           "modes": modes, "group_size": args.group_size, "stitches": sids, "prompt_len": args.prompt_len,
           "rounds": args.rounds, "timed_steps": args.steps, "batch": args.batch, "bandwidth": bw,
           "load_s": load_s, "compile_s": compile_s, "batch1": res_b1, "batch8": res_b8, "llama_cpp": res_ll, "llama_cpp_note": llama_note,
           "hf_generate": res_hf, "hf_generate_note": hf_note, "targets": targets, "step_profile": prof,
           "served_front": {"min_saving": MIN_SAVING, "profile": pc.model_dump(), "startup_decode_ms": startup,
                            "decisions": {m: {s: front[m][s].message for s in sids} for m in base_modes}},
           "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "wall_s": time.time() - t_start}
    res["env"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    path = write_result(args.name, res, args.out)
    png = path.with_suffix(".png")
    plot(res, png)
    print(f"\nbandwidth {bw['used_GBps']:.1f} GB/s at {args.threads} threads; load s {load_s}")
    print("| stitch | " + " | ".join(f"{m} ms (floor)" for m in modes) + " | llama.cpp ms (floor) | HF generate ms |")
    print("|---|" + "---|" * (len(modes) + 2))
    for sid in sids:
        cells = [f"{res_b1[m][sid]['median_ms']:.1f} ({res_b1[m][sid]['floor_ms']:.1f})" for m in modes]
        lc = f"{res_ll[sid]['median_ms']:.1f} ({res_ll[sid]['floor_ms']:.1f})" if sid in res_ll else "-"
        hc = f"{res_hf[sid]['median_ms']:.1f}" if sid in res_hf else "-"
        print(f"| {sid} | " + " | ".join(cells) + f" | {lc} | {hc} |")
    print("\nbatch 8 tokens/s (x batch-1 tokens/s)")
    for sid in sids:
        print(f"| {sid} | " + " | ".join(f"{res_b8[m][sid]['tokens_per_s']:.1f} ({res_b8[m][sid]['x_batch1_tokens_per_s']:.2f}x)"
                                          for m in modes) + " |")
    print("targets:", targets)
    if prof:
        for k, v in prof.items():
            print(k, f"wall {v['wall_ms']:.1f} ms", {c: round(x, 1) for c, x in v["categories_ms"].items()})
    print(f"wall {res['wall_s']:.0f}s -> {path}, {png}")
    gc.collect()


if __name__ == "__main__":
    main()
