"""Shared pieces of the training benchmarks (benchmarks/train_*.py): the run scale, running
training/adapt_llama.py as a subprocess that survives interruption (a rerun resumes from its
checkpoint), and reading its report back.

Scale. The CPU here runs bfloat16 matmuls at ~0.1 TFLOP/s under the other engineers' load (an AMD EPYC
with AVX512-BF16 and no AMX: 0.08-0.3 TFLOP/s measured, docs/DESIGN_NOTES.md section 2),
so one fwd+bwd of the 1.5B anchor on 128 tokens takes tens of seconds. Runs on the real pair are
therefore small: 48-token BBC News openings (headline + first sentence), batch 4, 120 steps (one
stitch each, plus the teacher), 100 validation articles.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # `python benchmarks/x.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stitchlib.fileio import cache_root  # noqa: E402  (torch-free)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# run directories live under the cache root ($STITCHSERVE_HOME or ~/.cache/stitchserve), like anchors
RUNS = Path(os.environ.get("STITCHSERVE_BENCH_RUNS") or cache_root() / "bench-runs")
REAL = ("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")
TINY = ("tiny-small", "tiny-large")

# One budget for every compared run (ablations are at equal training budget).
REAL_SCALE: dict[str, Any] = dict(task="classify", data="bbcnews", seq_len=48, batch_size=4, grad_accum=1,
                                  steps=120, lr=1e-3, eval_size=100, eval_batch_size=20, calib_size=64,
                                  n_intervals=6, snip_warmup_steps=30, checkpoint_every=20, seed=0)
# The first, shorter series (run while the machine was ~6x oversubscribed): 80 training examples.
REAL40_SCALE: dict[str, Any] = dict(task="classify", data="bbcnews", seq_len=48, batch_size=2, grad_accum=1,
                                    steps=40, lr=1e-3, eval_size=40, eval_batch_size=8, calib_size=48,
                                    n_intervals=6, snip_warmup_steps=10, checkpoint_every=5, seed=0)
PAIRS = ("real", "real40", "tiny")
TINY_SCALE: dict[str, Any] = dict(task="classify", data="bbcnews", seq_len=64, batch_size=4, grad_accum=1,
                                  steps=150, lr=2e-3, eval_size=100, eval_batch_size=25, calib_size=64,
                                  n_intervals=6, snip_warmup_steps=30, checkpoint_every=25, seed=0,
                                  dtype="float32")


def real_pair_available() -> bool:
    from stitchlib.hub import anchor_dir, is_complete

    return all(is_complete(anchor_dir(n)) for n in REAL)


def scale(pair: str) -> tuple[tuple[str, str], dict[str, Any]]:
    """Anchor names and run options of a benchmark scale: real (main), real40 (short), tiny (exercise)."""
    if pair in ("real", "real40"):
        if not real_pair_available():
            raise SystemExit("the real Qwen pair is not in the cache (stitchserve pull); use --pair tiny")
        return REAL, dict(REAL_SCALE if pair == "real" else REAL40_SCALE)
    return TINY, dict(TINY_SCALE)


def flags(fields: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for k, v in fields.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else "--no-" + k.replace("_", "-"))
        else:
            out += [flag, str(v)]
    return out


def run_adapt(name: str, pair: str, **overrides: Any) -> dict[str, Any]:
    """Train (or reuse) palette `name` and return its report.json. Idempotent: a finished palette is
    reused, an interrupted one resumes from its checkpoint."""
    (small, large), fields = scale(pair)
    fields.update(overrides)
    out = RUNS / f"{pair}-{name}"
    report = out / "report.json"
    if report.is_file():
        print(f"[{name}] reusing {out}", flush=True)
        return json.loads(report.read_text())
    RUNS.mkdir(parents=True, exist_ok=True)
    resume = (out.parent / f"{out.name}.ckpt" / "last.pt").is_file()
    cmd = [sys.executable, str(ROOT / "training" / "adapt_llama.py"), "--small", small, "--large", large,
           "--out", str(out), *flags(fields), "--no-progress", "-v", *(["--resume"] if resume else [])]
    log = RUNS / f"{pair}-{name}.log"
    print(f"[{name}] {'resuming' if resume else 'training'}: log {log}", flush=True)
    t0 = time.time()
    with log.open("a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if rc != 0:
        raise SystemExit(f"[{name}] adapt failed with exit code {rc}; see {log}")
    print(f"[{name}] done in {(time.time() - t0) / 60:.1f} min", flush=True)
    return json.loads(report.read_text())


def train_seconds(report: dict[str, Any]) -> float | None:
    """Pure step time of a run, summed over its checkpointed history (reports written before the
    trainer did this counted only the last resumed segment)."""
    hist = report.get("history") or []
    return sum(h["step_s"] for h in hist) if hist else report["timings"].get("train_s")


def machine() -> dict[str, Any]:
    import platform

    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load_avg_at_write": os.getloadavg()}


def write_json(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    p = RESULTS / name
    p.write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(f"wrote {p}")
    return p
