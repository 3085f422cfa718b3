"""The decode-graph path of StitchEngine without CUDA: `DecodeGraphs` with an eager stand-in for the
CUDA capture (a 'graph' that re-runs the step into the same output tensor, as a replay writes the
captured logits buffer). What is exercised is everything around the capture: keys per (composition
padded to a bucket, kv_len), the LRU and its counts, replays reading the persistent input buffers,
the fallback after a failed capture, and `graph_stats()`. Tiny pair, float32, CPU."""
from __future__ import annotations

import pytest
import torch

from conftest import randomize_pst
from stitchlib.engine import EngineConfig, StitchEngine
from stitchlib.engine.graphs import DecodeGraphs, eager_capture
from stitchlib.runtime import SamplingParams


def failing_capture(step):
    raise RuntimeError("operation not permitted when stream is capturing")


def graph_engine(model, capture, **cfg) -> StitchEngine:
    """An engine whose decode steps go through DecodeGraphs (padded to buckets, as on a GPU)."""
    cfg = {"max_slots": 8, "max_seq_len": 64, "kv_block": 16, "pad_to_bucket": True, "cuda_graphs": False, **cfg}
    e = StitchEngine(model, EngineConfig(**cfg))
    e.graphs = DecodeGraphs(e.runner, e.tokens, e.lengths, max_graphs=e.cfg.max_graphs, capture=capture)
    return e


def run_all(engine, jobs) -> dict[int, list[int]]:
    rid_of = {engine.add_request(p, sid, SamplingParams(max_tokens=n, temperature=0.0)): i
              for i, (p, sid, n) in enumerate(jobs)}
    out = {i: [] for i in range(len(jobs))}
    while engine.has_unfinished():
        for rid, tok in engine.step().items():
            out[rid_of[rid]].append(tok)
    return out


@pytest.fixture(scope="module")
def model():
    from stitchlib.anchors import load_anchor
    from stitchlib.model import StitchedLM

    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes: avoid OpenMP spin-waits on shared cores
    torch.manual_seed(0)
    m = StitchedLM(load_anchor("tiny-small", dtype="float32"), load_anchor("tiny-large", dtype="float32"))
    randomize_pst(m)
    yield m
    torch.set_num_threads(n)


def _jobs(model):
    g = torch.Generator().manual_seed(0)
    ids = [s.id for s in model.stitches]
    # different lengths and max_tokens: rows leave at different steps, so compositions change
    return [(torch.randint(3, 259, (5 + i,), generator=g).tolist(), ids[i % len(ids)], 3 + i % 4)
            for i in range(7)]


def test_replayed_steps_give_the_eager_tokens_and_are_counted(model):
    jobs = _jobs(model)
    want = run_all(StitchEngine(model, EngineConfig(max_slots=8, max_seq_len=64, kv_block=16, cuda_graphs=False)),
                   jobs)
    e = graph_engine(model, eager_capture, max_graphs=64)
    assert run_all(e, jobs) == want
    st = e.graph_stats()
    assert st["active"] and st["error"] is None
    # every decode step is a replay; one capture per distinct (padded composition, kv_len)
    # all rows are admitted (and get their first token) in step 1; then one replay per decode step
    assert st["replays"] == max(n for *_, n in jobs) - 1
    assert st["captures"] == len(e.graphs.graphs) == st["resident"] and st["evictions"] == 0
    assert 0 < st["captures"] <= st["replays"] and st["failed_captures"] == 0


def test_a_repeated_composition_replays_without_capturing(model):
    e = graph_engine(model, eager_capture)
    prompt, sid = [5, 6, 7, 8], model.stitches[2].id
    for _ in range(3):
        run_all(e, [(prompt, sid, 4)])
    st = e.graph_stats()
    # batch 1 on one stitch, kv_len 16 throughout: one graph, replayed 3 times per request
    assert st["captures"] == 1 and st["replays"] == 9


def test_batch_sizes_of_one_bucket_share_a_graph(model):
    """3 and 4 rows of one stitch pad to bucket 4: the same plan key, so one capture."""
    e = graph_engine(model, eager_capture)
    sid = model.stitches[3].id
    run_all(e, [([5, 6, 7], sid, 2)] * 3)
    run_all(e, [([5, 6, 7], sid, 2)] * 4)
    assert e.graph_stats()["captures"] == 1


def test_lru_below_the_composition_count_evicts_and_recaptures(model):
    """max_graphs below the number of compositions in a round: every round recaptures (what a
    benchmark must avoid by sizing max_graphs above its stitch count)."""
    ids = [s.id for s in model.stitches]
    small_lru = graph_engine(model, eager_capture, max_graphs=2)
    big_lru = graph_engine(model, eager_capture, max_graphs=len(ids) + 1)
    for e in (small_lru, big_lru):
        for _ in range(2):
            for sid in ids:
                run_all(e, [([5, 6, 7], sid, 3)])
    assert big_lru.graph_stats()["captures"] == len(ids) and big_lru.graph_stats()["evictions"] == 0
    s = small_lru.graph_stats()
    assert s["captures"] == 2 * len(ids) and s["evictions"] == 2 * len(ids) - 2 and s["resident"] == 2


def test_failed_capture_is_recorded_and_decoding_continues_eagerly(model):
    jobs = _jobs(model)[:3]
    want = run_all(StitchEngine(model, EngineConfig(max_slots=8, max_seq_len=64, kv_block=16, cuda_graphs=False)),
                   jobs)
    e = graph_engine(model, failing_capture)
    assert run_all(e, jobs) == want
    st = e.graph_stats()
    assert not st["active"] and "stream is capturing" in st["error"]
    assert st["failed_captures"] == 1 and st["captures"] == 0 and st["replays"] == 0  # no retry per step


def test_engine_without_graphs_reports_inactive(model):
    e = StitchEngine(model, EngineConfig(max_slots=2, max_seq_len=32, cuda_graphs=False))
    assert e.graph_stats() == {"active": False, "error": None}
