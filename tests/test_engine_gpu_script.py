"""benchmarks/engine_gpu.py's logic on CPU with tiny shapes (--tiny): every part runs, the engine
matches the reference on the device it ran on, and the result files hold every target."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "engine_gpu.py"


def test_engine_gpu_script_tiny(tmp_path):
    spec = importlib.util.spec_from_file_location("engine_gpu_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # overhead-bound tiny shapes: avoid OpenMP spin-waits on shared cores
    try:
        res = mod.main(["--tiny", "--device", "cpu", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert not res["errors"] and not res["skipped"]
    assert set(res["parts"]) == {"correctness", "memory", "bandwidth", "latency_batch1", "batching", "hf_generate"}
    assert res["parts"]["correctness"]["ok"]
    lat = res["parts"]["latency_batch1"]["rows"]
    assert len(lat) == res["parts"]["memory"]["n_stitches"] == 6
    assert [r["decode_bytes"] for r in lat] == sorted(r["decode_bytes"] for r in lat)
    bat = res["parts"]["batching"]
    assert set(bat) >= {"adjacent", "spread", "adjacent_long"}
    for b in (bat["adjacent"], bat["spread"], bat["adjacent_long"]):
        assert len(b["stitches"]) == 4 and b["tokens_per_s"]["mixed"] > 0
        assert 0 < b["weights_bound_ratio"] <= 1
    saved = json.loads((tmp_path / "engine_gpu_tiny.json").read_text())
    assert set(saved["targets"]) == set(res["targets"]) and len(res["targets"]) >= 8
    assert "## Decode step, batch 1" in (tmp_path / "engine_gpu_tiny.md").read_text()
