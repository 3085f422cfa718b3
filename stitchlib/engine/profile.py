"""On-hardware cost table the router reads: per stitch, prefill seconds per prompt token and decode
seconds per step at each batch size, measured through the engine (static caches, CUDA graphs on GPU)
on this machine, saved as JSON with the device and versions it was measured on.

    {"meta": {"device": ..., "torch": ..., "transformers": ..., "dtype": ..., "prompt_len": 32, ...},
     "stitches": {"s5-l8": {"prefill_s_per_token": 0.0012, "decode_step_s": {"1": 0.031, "8": 0.036}}}}
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch

from ..fileio import atomic_write
from ..model import StitchedLM
from ..types import SamplingParams, StitchProfile
from .core import EngineConfig, StitchEngine


def device_info(device: torch.device | str) -> dict:
    import transformers

    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        name = f"{name} ({torch.get_num_threads()} threads)"
    return {"device": name, "device_type": device.type, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(engine: StitchEngine, fn=None) -> float:
    """Seconds of one `fn()` (default: one decode step of `engine`), the device synchronised around it."""
    _sync(engine.device)
    t0 = time.perf_counter()
    (fn or (lambda: engine.decode_burst(1)))()
    _sync(engine.device)
    return time.perf_counter() - t0


@torch.no_grad()
def interleaved_steps(engines: dict[str, StitchEngine], steps: int, on_step=lambda: None) -> dict[str, list[float]]:
    """Seconds of `steps` decode steps of each warm engine, taken in turn (one step of each per round):
    engines compared with each other see the same machine conditions, step for step."""
    out: dict[str, list[float]] = {k: [] for k in engines}
    for _ in range(steps):
        for k, e in engines.items():
            out[k].append(timed_step(e))
            on_step()
    return out


@torch.no_grad()
def profile_stitches(model: StitchedLM, stitch_ids: list[str] | None = None, *, prompt_len: int = 32,
                     decode_steps: int = 8, batch_sizes: tuple[int, ...] = (1,), vocab: int | None = None,
                     config: EngineConfig | None = None, seed: int = 0,
                     progress: bool = False) -> dict[str, StitchProfile]:
    """Prefill seconds per prompt token (at the first batch size, after a warm-up prefill) and the
    median decode-step seconds at each batch size (after one warm-up step, which also captures the
    step's CUDA graph on GPU). Random prompts, the same for every stitch: timing does not depend on
    token values.

    Interleaved: one engine per stitch (its caches sized for the profile's few positions), and every
    timed step of one stitch is followed by one of each other stitch. Routes that cost within a few
    percent of each other (a stitch one block off an anchor) are then compared under the same
    machine conditions, step for step, not seconds apart while memory bandwidth drifts: the served
    front (`stitchlib.gate.served_front`) decides on these numbers. `progress`: a bar over the timed steps."""
    from tqdm.auto import tqdm

    ids = stitch_ids or [s.id for s in model.stitches]
    warm = 1
    base = config or EngineConfig()
    # what the steps need, rounded up as the engine rounds attention spans (kv_block): the steps attend
    # over as many positions as a serving engine's would
    positions = -(-(prompt_len + warm + decode_steps + 1) // base.kv_block) * base.kv_block
    engines = {sid: StitchEngine(model, base.model_copy(update=dict(max_slots=max(batch_sizes), stitches=[sid],
                                                                      max_seq_len=positions)))
               for sid in ids}
    vocab = vocab or model.small_anchor.stats.vocab_size
    g = torch.Generator().manual_seed(seed)
    params = SamplingParams(max_tokens=warm + decode_steps + 1, temperature=0.0)

    bar = tqdm(total=len(ids) * (1 + len(batch_sizes) * (decode_steps + 2)), desc="profiling", unit="step",
               disable=not progress)
    prefill: dict[str, float] = {}
    decode: dict[str, dict[int, float]] = {sid: {} for sid in ids}
    for n, bs in enumerate(batch_sizes):
        prompts = torch.randint(0, vocab, (bs, prompt_len), generator=g).tolist()
        rids: dict[str, list[int]] = {}
        for attempt in (("warm", "timed") if n == 0 else ("timed",)):
            for sid, e in engines.items():
                rids[sid] = [e.add_request(p, sid, params) for p in prompts]
                t = timed_step(e, e.step)  # nothing running: this is exactly the prefill (and first token) of the batch
                bar.update()
                if attempt == "warm":
                    for r in rids[sid]:
                        e.abort(r)
                elif n == 0:
                    prefill[sid] = t / (bs * prompt_len)
        for e in engines.values():
            e.decode_burst(warm)
            bar.update()
        steps = interleaved_steps(engines, decode_steps, on_step=bar.update)
        for sid, e in engines.items():
            for r in rids[sid]:
                e.abort(r)
            decode[sid][bs] = statistics.median(steps[sid])
    bar.close()
    return {sid: StitchProfile(prefill_s_per_token=prefill[sid], decode_step_s=decode[sid]) for sid in ids}


def save_profile(path: str | Path, profiles: dict[str, StitchProfile], meta: dict | None = None) -> Path:
    doc = {"meta": meta or {}, "stitches": {sid: prof.model_dump() for sid, prof in profiles.items()}}
    return atomic_write(path, json.dumps(doc, indent=2))


def load_profile(path: str | Path) -> tuple[dict[str, StitchProfile], dict]:
    """-> (profiles, meta). JSON object keys are strings; batch sizes come back as ints."""
    doc = json.loads(Path(path).read_text())
    profs = {sid: StitchProfile.model_validate(v) for sid, v in doc["stitches"].items()}
    return profs, doc.get("meta", {})


# What must agree between a saved table and the runtime that wants to use it. The thread count is
# left out of the device name: a Ray replica may run with another one than the CLI that measured.
_MATCH = ("device_type", "dtype", "small_fingerprint", "large_fingerprint")


def _device_name(meta: dict) -> str:
    return str(meta.get("device", "")).rsplit(" (", 1)[0]


def table_problem(meta: dict, profiles: dict[str, StitchProfile], want: dict, stitch_ids: list[str]) -> str | None:
    """Why a saved table cannot stand for measuring here (None: it can). `want` is the meta this
    runtime would write (`PaletteRuntime.profile_meta`)."""
    for key in _MATCH:
        if meta.get(key) != want.get(key):
            return f"measured with {key} {meta.get(key)!r}, this runtime has {want.get(key)!r}"
    # Tables written before weight-only quantization existed were measured unquantized.
    if meta.get("quantize", "none") != want.get("quantize", "none"):
        return f"measured with quantize {meta.get('quantize', 'none')!r}, this runtime has {want.get('quantize')!r}"
    if _device_name(meta) != _device_name(want):
        return f"measured on {_device_name(meta)!r}, this is {_device_name(want)!r}"
    missing = [s for s in stitch_ids if s not in profiles]
    if missing:
        return f"no entry for deployed stitch(es) {', '.join(missing)}"
    return None
