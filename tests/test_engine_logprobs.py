"""Logprobs from the StitchEngine against a direct forward of the stitched model (tiny pair, float32):
every stitch, one mixed-stitch batch, chunked prefill, sampled and greedy rows."""
from __future__ import annotations

import pytest
import torch

from conftest import randomize_pst
from stitchlib.engine import EngineConfig, StitchEngine
from stitchlib.runtime import SamplingParams
from stitchlib.sampling import token_logprobs

ATOL = 1e-4  # float32: engine (static cache, batched, chunked) vs one unbatched forward


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    from stitchlib.anchors import load_anchor
    from stitchlib.model import StitchedLM

    torch.manual_seed(0)
    m = StitchedLM(load_anchor("tiny-small", dtype="float32"), load_anchor("tiny-large", dtype="float32"))
    randomize_pst(m)  # every route differs
    return m


def _prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 259, (t,), generator=g).tolist() for t in (5, 11, 3, 9)]


def _run(engine, jobs):
    """-> per job: (tokens, their TokenLogprobs, prompt TokenLogprobs or None)."""
    rid_of = {engine.add_request(p, sid, sp): i for i, (p, sid, sp) in enumerate(jobs)}
    out = [([], [], None) for _ in jobs]
    while engine.has_unfinished():
        toks = engine.step()
        for rid, tok in toks.items():
            i = rid_of[rid]
            out[i][0].append(tok)
            if rid in toks.logprobs:
                out[i][1].append(toks.logprobs[rid])
        for rid, plp in toks.prompt_logprobs.items():
            out[rid_of[rid]] = (*out[rid_of[rid]][:2], plp)
    return out


def _reference(model, ids, sid) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]), sid).float(), -1)[0]  # [T, V]


@pytest.mark.parametrize("chunk", [None, 4])
def test_logprobs_match_direct_forward_every_stitch_mixed_batch(model, chunk):
    prompts = _prompts()
    jobs = []
    for k, s in enumerate(model.stitches):  # both anchors and every stitch, all in one engine
        for j, p in enumerate(prompts[:2] if k % 2 else prompts[2:]):
            temp = 0.0 if j == 0 else 0.9  # logprobs are of the raw logits whatever the temperature
            jobs.append((p, s.id, SamplingParams(max_tokens=5, temperature=temp, seed=k, logprobs=3,
                                                 prompt_logprobs=2)))
    engine = StitchEngine(model, EngineConfig(max_slots=len(jobs), max_seq_len=48, kv_block=8, prefill_chunk=chunk))
    out = _run(engine, jobs)
    for (p, sid, sp), (toks, lps, plp) in zip(jobs, out):
        ref = _reference(model, p + toks, sid)
        assert len(lps) == len(toks) == sp.max_tokens or toks[-1] in engine.eos
        for j, lp in enumerate(lps):
            row = ref[len(p) - 1 + j]
            assert lp.token == toks[j]
            assert lp.logprob == pytest.approx(row[toks[j]].item(), abs=ATOL)
            want_v, want_i = row.topk(3)
            assert [t for t, _ in lp.top] == want_i.tolist(), sid
            assert [v for _, v in lp.top] == pytest.approx(want_v.tolist(), abs=ATOL)
            if sp.temperature == 0:  # greedy: the token is the top-1, to the bit
                assert lp.top[0] == (lp.token, lp.logprob)
        assert plp is not None and len(plp) == len(p) and plp[0] is None
        for j in range(1, len(p)):
            assert plp[j].token == p[j] and len(plp[j].top) == 2
            assert plp[j].logprob == pytest.approx(ref[j - 1, p[j]].item(), abs=ATOL)
            assert plp[j].top[0][1] == pytest.approx(ref[j - 1].max().item(), abs=ATOL)


def test_rows_without_logprobs_get_none_and_same_tokens(model):
    p = _prompts()[1]
    sid = model.stitches[2].id
    engine = StitchEngine(model, EngineConfig(max_slots=2, max_seq_len=48, kv_block=8))
    plain, scored = _run(engine, [(p, sid, SamplingParams(max_tokens=4, temperature=0.0)),
                                  (p, sid, SamplingParams(max_tokens=4, temperature=0.0, logprobs=0))])
    assert plain[0] == scored[0] and plain[1] == [] and plain[2] is None
    assert [lp.top for lp in scored[1]] == [()] * 4 and scored[2] is None


def test_token_logprobs_unit():
    logits = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]])
    out = token_logprobs(logits, torch.tensor([2, 1]), [2, 0])
    lsm = torch.log_softmax(logits, -1)
    assert out[0].logprob == pytest.approx(lsm[0, 2].item()) and out[0].top[0] == (2, out[0].logprob)
    assert [t for t, _ in out[0].top] == [2, 1] and out[1].top == ()
    assert out[1].logprob == pytest.approx(lsm[1, 1].item())
