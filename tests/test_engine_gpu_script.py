"""benchmarks/engine_gpu.py on CPU with tiny shapes: every part runs (torch.compile'd blocks
included, CUDA graphs through the eager stand-in) and records what ran; the hard deadline and
SIGTERM leave a complete result file; the pydantic stand-in carries stitchlib's engine where the
device lacks pydantic."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "engine_gpu.py"
PARTS = ["correctness", "build", "bandwidth", "latency_graphs", "batching_short", "qwen_pair", "quant", "compile",
         "latency_compiled", "batching_long", "hf"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("engine_gpu_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # overhead-bound tiny shapes: avoid OpenMP spin-waits on shared cores
    yield
    torch.set_num_threads(n)


def test_tiny_run_exercises_every_part_with_compile(bench, tmp_path, one_thread):
    res = bench.main(["--tiny", "--compile", "--device", "cpu", "--out", str(tmp_path)])
    parts = res["parts"]
    assert res["order"] == PARTS
    assert {k: p["status"] for k, p in parts.items()} == dict.fromkeys(PARTS, "ok"), \
        {k: p.get("error") for k, p in parts.items()}

    # graphs: captured, replayed, never re-captured inside timed steps, no evictions (max_graphs sized)
    assert parts["correctness"]["ok"] and parts["correctness"]["graphs"]["captures"] > 0
    for key in ("latency_graphs", "batching_short", "qwen_pair", "latency_compiled", "batching_long"):
        g = parts[key]["graphs"]
        assert g["captures"] > 0 and g["replays"] > g["captures"], key
        assert g["captures_during_timed_steps"] == 0 and g["evictions"] == 0 and not g["errors"], key

    # compile: batch 1 and every stitch checked by relative L2 + argmax; later parts use it
    c = parts["compile"]
    assert c["batch1"]["rows"] == 1 and c["mixed"]["rows"] == parts["build"]["n_stitches"]
    assert c["ok"] and c["fallback"] is None and c["later_parts_use_compiled_blocks"]
    assert c["mixed"]["rel_l2_max"] < 0.05 and c["mixed"]["argmax_agree"] >= 0.9
    assert c["compile_activity"]["frames_ok"] >= 2 and c["compile_activity"]["compile_s"] > 0
    assert parts["batching_long"]["compile_layers"] and res["engine"]["compile_layers"]
    assert "compile_activity" not in parts["latency_graphs"]  # eager blocks there

    # latency: one row per stitch in byte order, both floors present
    lat = parts["latency_graphs"]["rows"]
    assert len(lat) == parts["build"]["n_stitches"] == 6
    assert [r["decode_bytes"] for r in lat] == sorted(r["decode_bytes"] for r in lat)
    assert all(r["floor_ms"] > 0 and r["gemv_floor_ms"] > 0 for r in lat)
    assert len(parts["latency_compiled"]["rows"]) == len(parts["latency_compiled"]["stitches"]) >= 3

    # batching: every scenario has its floor including K/V reads
    for key, how in (("batching_short", "adjacent"), ("batching_short", "spread"), ("batching_long", "adjacent_long")):
        b = parts[key][how]
        assert set(b["scenarios"]) == {"mixed", "single"} | {f"queue:{s}" for s in b["stitches"]}
        assert all(s["kv_bytes"] > 0 and s["floor_s"] > 0 and s["kv_len"] % 64 == 0 for s in b["scenarios"].values())
        assert 0 < b["weights_bound_ratio"] <= 1 and b["bound_with_kv"] > 0
    assert parts["batching_long"]["adjacent_long"]["prompt_len"] > parts["batching_short"]["adjacent"]["prompt_len"]

    # the Qwen-shaped pair: every stitch at batch 1 and 8, and a mixed-budget batch of 8
    q = parts["qwen_pair"]
    assert len(q["rows"]) == 6 and all(r["batch1_ms"] > 0 and r["batch8_ms"] > 0 for r in q["rows"])
    assert len(q["mixed_budget"]["rows"]) == 8 and len(set(q["mixed_budget"]["rows"])) == 4

    # the int4 serving path on the device (here: torch's CPU int4 kernel): logits against the dequantized
    # reference, the anchors timed at batch 1 and 8
    qz = parts["quant"]
    assert qz["ok"] and qz["logits"]["finite"] and qz["logits"]["rows"] == 2 * len(q["rows"])
    assert qz["backends"].get("int4/packed", 0) > 0 and not any(k.endswith("/reference") for k in qz["backends"])
    assert [r["stitch"] for r in qz["rows"]] == ["small", "large"] and all(r["batch8_ms"] > 0 for r in qz["rows"])
    assert res["targets"]["int4_logits_match_dequantized_reference"]

    # memory arithmetic, GEMV roofline, HF baselines with both caches
    assert parts["build"]["served_param_bytes"] > parts["build"]["pair_param_bytes"]
    assert parts["bandwidth"]["stream"]["data"] == "random bf16" and parts["bandwidth"]["gemv"]["shapes"]
    assert {f"{r}_{c}_ms_per_token" for r in ("small", "large") for c in ("dynamic", "static")} <= set(parts["hf"])

    saved = json.loads((tmp_path / "engine_gpu_tiny.json").read_text())
    assert saved["targets"] == res["targets"] and "compiled_blocks_match_eager" in res["targets"]
    md = (tmp_path / "engine_gpu_tiny.md").read_text()
    assert "| compile | ok |" in md and "## Qwen2.5-Coder pair shapes" in md and "## int4 serving path" in md
    assert "[hf] ok" in (tmp_path / "engine_gpu_tiny.log").read_text()


def test_deadline_cuts_the_running_part_and_records_the_rest(bench, tmp_path, one_thread):
    res = bench.main(["--tiny", "--no-compile", "--device", "cpu", "--out", str(tmp_path), "--budget-s", "1.5"])
    status = [res["parts"][k]["status"] for k in PARTS]
    assert "cut" in status and set(status) <= {"ok", "cut", "skipped"}
    first_cut = status.index("cut")
    assert all(s != "ok" for s in status[first_cut:])  # nothing ran after the deadline
    assert all("deadline" in res["parts"][k]["reason"] for k in PARTS[first_cut:]
               if res["parts"][k]["status"] == "cut")
    saved = json.loads((tmp_path / "engine_gpu_tiny.json").read_text())
    assert [saved["parts"][k]["status"] for k in PARTS] == status


def test_time_box_and_deadline_raise_inside_the_part_only(bench):
    from engine_gpu_env import Cut, RunClock

    clock = RunClock(time.time(), budget_s=60)
    clock.install()
    try:
        with pytest.raises(Cut, match="time box"):
            with clock.box(0.05):
                while True:
                    pass
        assert clock.stopped is None  # a box ends the part, not the run
        reached = []
        with pytest.raises(Cut, match="deadline"):
            with clock.box(5):
                with clock.shielded():  # results being written: the alarm waits until they are
                    clock.end = time.time() + 0.02
                    clock._arm()
                    time.sleep(0.1)
                    reached.append("end of shielded block")
                reached.append("after it")  # the held-back alarm fires before this
        assert reached == ["end of shielded block"] and clock.stopped == "deadline"
        with pytest.raises(Cut, match="deadline"):  # nothing starts after the deadline
            with clock.box(None):
                pass
    finally:
        clock.uninstall()


def test_sigterm_writes_what_ran(tmp_path):
    """The run tool's timeout sends SIGTERM: the running part is recorded as cut, the rest as not
    started, and the JSON, Markdown and log are complete."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("STITCHSERVE_BENCH_T0", None)
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--tiny", "--no-compile", "--out", str(tmp_path)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("[batching_short] start"):
                proc.send_signal(signal.SIGTERM)
                break
        rest = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    assert proc.returncode == 1, rest
    res = json.loads((tmp_path / "engine_gpu_tiny.json").read_text())
    p = res["parts"]
    assert all(p[k]["status"] == "ok" for k in PARTS[:PARTS.index("batching_short")])
    assert p["batching_short"]["status"] == "cut" and p["batching_short"]["reason"] == "SIGTERM"
    later = PARTS[PARTS.index("batching_short") + 1:]
    assert all(p[k]["status"] in ("cut", "skipped") for k in later)
    assert all(p[k]["reason"] == "not started: SIGTERM" for k in later if p[k]["status"] == "cut")
    log = (tmp_path / "engine_gpu_tiny.log").read_text()
    assert "[batching_short] cut (SIGTERM)" in log and "| batching_short | cut |" in (
        tmp_path / "engine_gpu_tiny.md").read_text()


def test_pydantic_stand_in_runs_the_engine(tmp_path):
    """Where the device lacks pydantic, the stand-in must carry every pydantic name stitchlib's
    engine path imports: the engine decodes the reference's tokens under it."""
    code = """
import sys
sys.modules["pydantic"] = None  # import pydantic -> ImportError, as on a machine without it
sys.path.insert(0, "benchmarks")
from engine_gpu_env import ensure_pydantic
assert ensure_pydantic().startswith("stub")
import torch
from stitchlib.anchors import load_anchor
from stitchlib.engine import EngineConfig, StitchEngine
from stitchlib.engine.profile import StitchProfile
from stitchlib.model import StitchedLM
from stitchlib.runtime import SamplingParams
cfg = EngineConfig(max_slots=2, max_seq_len=32, cuda_graphs=False)
assert cfg.kv_block == 64 and cfg.batch_buckets[:2] == [1, 2]
assert cfg.model_copy(update={"max_slots": 3}).max_slots == 3 and cfg.max_slots == 2
assert cfg.model_fields_set == {"max_slots", "max_seq_len", "cuda_graphs"}  # engine_for_runtime reads it
prof = StitchProfile.model_validate(StitchProfile(prefill_s_per_token=0.1, decode_step_s={1: 0.2}).model_dump())
assert prof.decode_step_s == {1: 0.2}
torch.manual_seed(0)
model = StitchedLM(load_anchor("tiny-small", dtype="float32"), load_anchor("tiny-large", dtype="float32"))
sid = model.stitches[2].id
want = model.generate(torch.tensor([[5, 6, 7, 8]]), sid, max_new_tokens=4)[0].tolist()
e = StitchEngine(model, cfg)
e.add_request([5, 6, 7, 8], sid, SamplingParams(max_tokens=4, temperature=0.0))
got = []
while e.has_unfinished():
    got += e.step().values()
assert got == want, (got, want)
print("ok")
"""
    env = dict(os.environ, OMP_NUM_THREADS="1", STITCHSERVE_HOME=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
