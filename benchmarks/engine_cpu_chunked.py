"""CPU, real Qwen2.5-Coder pair (bf16): what a long prompt joining running streams costs them, with
and without chunked prefill (`EngineConfig.prefill_chunk`, serving's `prefill_chunk`).

    python benchmarks/engine_cpu_chunked.py                          # ~5 min
    python benchmarks/engine_cpu_chunked.py --prompt-len 1024 --chunks none 128

Scenario: `--streams` requests decode on a mid-size stitch; then one request with a `--prompt-len`
token prompt joins on the large anchor. For each chunk setting (a fresh engine each), every step is
timed: the running streams' inter-token latency (ITL) before, during and after the joiner's
prefill, and the joiner's time to first token (TTFT). Writes results/engine_cpu_chunked.{json,png}.
"""
from __future__ import annotations

import argparse
import os
import time

from engine_common import add_cpu_pair_args, start_cpu_run, median, write_result

import torch


def run_one(model, chunk: int | None, *, streams: int, stitch: str, joiner: str, prompt_len: int,
            before: int, after: int, seed: int = 0) -> dict:
    from stitchlib.engine import EngineConfig, StepOutput, StitchEngine
    from stitchlib.runtime import SamplingParams

    vocab = model.small_anchor.stats.vocab_size
    g = torch.Generator().manual_seed(seed)
    short = torch.randint(0, vocab, (streams, 16), generator=g).tolist()
    long = torch.randint(0, vocab, (prompt_len,), generator=g).tolist()
    n_steps = before + after + prompt_len // (chunk or prompt_len) + 4
    cfg = EngineConfig(max_slots=streams + 1, max_seq_len=prompt_len + n_steps + 32, stitches=[stitch, joiner],
                       prefill_chunk=chunk)
    engine = StitchEngine(model, cfg)
    params = SamplingParams(max_tokens=n_steps + 8, temperature=0.0)
    for p in short:
        engine.add_request(p, stitch, params)
    while engine.waiting or engine.prefilling:  # prefill the streams (in chunks, with chunking)
        engine.step()
    engine.step()  # warm-up decode
    steps: list[dict] = []

    def step(phase: str) -> StepOutput:
        t0 = time.perf_counter()
        out = engine.step()
        steps.append({"phase": phase, "s": time.perf_counter() - t0, "prefill_tokens": sum(out.prefilled.values())})
        return out

    for _ in range(before):
        step("before")
    rid = engine.add_request(long, joiner, SamplingParams(max_tokens=after + 2, temperature=0.0))
    t_join = time.perf_counter()
    while rid not in step("join"):
        pass
    ttft = time.perf_counter() - t_join
    for _ in range(after):
        step("after")
    itl = {ph: [s["s"] for s in steps if s["phase"] == ph] for ph in ("before", "join", "after")}
    return {"prefill_chunk": chunk, "ttft_s": ttft, "join_steps": len(itl["join"]),
            "itl_before_median_s": median(itl["before"]), "itl_during_join_max_s": max(itl["join"]),
            "itl_during_join_median_s": median(itl["join"]), "itl_after_median_s": median(itl["after"]),
            "steps": steps}


def plot(res: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in res["runs"]:
        ts = [s["s"] for s in r["steps"]]
        label = f"chunk {r['prefill_chunk'] or 'off (whole prompt)'}: TTFT {r['ttft_s']:.1f} s, max ITL " \
                f"{r['itl_during_join_max_s']:.1f} s"
        ax.plot(range(1, len(ts) + 1), ts, marker="o", ms=3, label=label)
    ax.axvline(res["before"] + 0.5, color="grey", ls=":", lw=1)
    ax.text(res["before"] + 0.6, ax.get_ylim()[1] * 0.95, "long prompt joins", fontsize=8, va="top")
    ax.set_xlabel("engine step")
    ax.set_ylabel("step time = running streams' inter-token latency (s)")
    ax.set_title(f"{res['streams']} streams on {res['stitch']}; a {res['prompt_len']}-token prompt joins on "
                 f"{res['joiner']}\n(real Qwen2.5-Coder pair, CPU bf16, 1 thread)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cpu_pair_args(ap)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--stitch", default="s12-l15", help="the running streams' stitch")
    ap.add_argument("--joiner", default="large", help="the long prompt's stitch")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--chunks", nargs="+", default=["none", "256", "64"], help="prefill_chunk settings ('none': off)")
    ap.add_argument("--before", type=int, default=3, help="timed steps before the join")
    ap.add_argument("--after", type=int, default=3, help="timed steps after the joiner's first token")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    t0, env, model = start_cpu_run(args)
    res = {"benchmark": "engine_cpu_chunked", "env": env, "anchors": [args.small, args.large], "dtype": "bfloat16",
           "threads": args.threads, "streams": args.streams, "stitch": args.stitch, "joiner": args.joiner,
           "prompt_len": args.prompt_len, "before": args.before, "after": args.after, "runs": []}
    for c in args.chunks:
        chunk = None if c == "none" else int(c)
        r = run_one(model, chunk, streams=args.streams, stitch=args.stitch, joiner=args.joiner,
                    prompt_len=args.prompt_len, before=args.before, after=args.after)
        res["runs"].append(r)
        print(f"chunk {c}: TTFT {r['ttft_s']:.2f} s over {r['join_steps']} steps | streams' ITL before "
              f"{r['itl_before_median_s']:.3f} s, during join max {r['itl_during_join_max_s']:.3f} s "
              f"(median {r['itl_during_join_median_s']:.3f}), after {r['itl_after_median_s']:.3f} s", flush=True)
    res["wall_s"] = time.time() - t0
    res["env"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    path = write_result("engine_cpu_chunked", res, args.out)
    plot(res, path.with_suffix(".png"))
    print("->", path, path.with_suffix(".png"))


if __name__ == "__main__":
    main()
