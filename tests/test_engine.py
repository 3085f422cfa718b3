"""StitchEngine against the reference StitchedLM: exact greedy tokens per stitch, mixed-stitch
batches, continuous batching (join/leave), slot reuse, seeded sampling, plans, cache protocol,
profile table. Tiny pair, float32, CPU."""
from __future__ import annotations

import random

import pytest
import torch

from conftest import randomize_pst
from stitchlib.engine import EngineConfig, StaticKVCache, StitchEngine, build_plan
from stitchlib.engine.profile import load_profile, profile_stitches, save_profile
from stitchlib.runtime import SamplingParams
from stitchlib.space import StitchSpaceConfig

N_NEW = 6
N_REF = 12  # reference tokens computed once per (model, prompt, stitch); tests use prefixes


def _prompts(n=4, seed=0, vocab=259):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (t,), generator=g).tolist() for t in (5, 11, 3, 8, 14, 6)[:n]]


PROMPTS = _prompts(6)


def _greedy(n=N_NEW, **kw):
    return SamplingParams(max_tokens=n, temperature=0.0, **kw)


class Reference:
    """Greedy tokens of each prompt alone (batch 1, no padding) through the reference decoder,
    memoised: greedy prefixes do not depend on how many tokens are generated."""

    def __init__(self, model):
        self.model, self.memo = model, {}

    def __call__(self, prompt: list[int], sid: str, n: int = N_NEW) -> list[int]:
        key = (tuple(prompt), sid)
        if key not in self.memo:
            self.memo[key] = self.model.generate(torch.tensor([prompt]), sid, max_new_tokens=N_REF)[0].tolist()
        return self.memo[key][:n]


def _run(engine, jobs):
    """jobs: [(prompt, stitch, params)] all queued up front -> {index: tokens}."""
    rid_of = {engine.add_request(p, sid, sp): i for i, (p, sid, sp) in enumerate(jobs)}
    out = {i: [] for i in range(len(jobs))}
    while engine.has_unfinished():
        for rid, tok in engine.step().items():
            out[rid_of[rid]].append(tok)
    return out


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here on one intra-op thread (conftest.one_thread)."""


@pytest.fixture(scope="module")
def pst_model():
    """One tiny pair with random PST for the whole module (engines never modify the model)."""
    from stitchlib.anchors import load_anchor
    from stitchlib.model import StitchedLM

    torch.manual_seed(0)
    model = StitchedLM(load_anchor("tiny-small", dtype="float32"), load_anchor("tiny-large", dtype="float32"))
    randomize_pst(model)
    return model


@pytest.fixture(scope="module")
def ref(pst_model):
    return Reference(pst_model)


def test_every_stitch_matches_reference_greedy_ls_init(tiny_model):
    model = tiny_model()  # PST zero: LoRA/SSB inert, identity-initialised stitching layers
    reference = Reference(model)
    engine = StitchEngine(model, EngineConfig(max_slots=2, max_seq_len=48, kv_block=8))
    for s in model.stitches:
        out = _run(engine, [(p, s.id, _greedy()) for p in PROMPTS[:2]])
        assert [out[0], out[1]] == [reference(PROMPTS[0], s.id), reference(PROMPTS[1], s.id)], s.id
    assert engine.num_running == 0 and engine.free_slots() == 2


def test_every_stitch_matches_reference_greedy_random_pst(pst_model, ref):
    """Random shared LoRA + SSB + stitching LoRA: rows must get their own stitch's biases."""
    engine = StitchEngine(pst_model, EngineConfig(max_slots=2, max_seq_len=48, kv_block=8))
    for s in pst_model.stitches:
        out = _run(engine, [(p, s.id, _greedy()) for p in PROMPTS[:2]])
        assert [out[0], out[1]] == [ref(PROMPTS[0], s.id), ref(PROMPTS[1], s.id)], s.id


def test_mixed_stitch_batch_equals_each_row_alone(pst_model, ref):
    ids = [s.id for s in pst_model.stitches]  # 7 stitches: both anchors and every stitch
    jobs = [(p, sid, _greedy()) for sid in ids for p in PROMPTS[:2]]
    random.Random(0).shuffle(jobs)  # arrival order must not matter: rows are sorted by route inside
    engine = StitchEngine(pst_model, EngineConfig(max_slots=len(jobs), max_seq_len=48, kv_block=8))
    out = _run(engine, jobs)
    for i, (p, sid, _) in enumerate(jobs):
        assert out[i] == ref(p, sid), sid


def test_scattered_routes_use_index_rows(tiny_pair):
    """Equal depths with kernel 2: splits are not monotone in the palette order, so some blocks'
    rows are not a contiguous slice and the gather/scatter path runs."""
    from stitchlib.anchors import load_anchor
    from stitchlib.model import StitchedLM

    torch.manual_seed(0)
    model = StitchedLM(load_anchor("tiny-small", dtype="float32"), load_anchor("tiny-small", dtype="float32"),
                       space=StitchSpaceConfig(kernel=2, stride=1))
    randomize_pst(model)
    key = tuple(range(len(model.stitches)))
    plan = build_plan(key, model.stitches, 4, 4, torch.device("cpu"))
    assert any(isinstance(g.sel, torch.Tensor) for g in plan.groups)
    reference = Reference(model)
    ids = [s.id for s in model.stitches]
    engine = StitchEngine(model, EngineConfig(max_slots=len(ids), max_seq_len=32, kv_block=8))
    out = _run(engine, [(PROMPTS[0], sid, _greedy(4)) for sid in ids])
    for i, sid in enumerate(ids):
        assert out[i] == reference(PROMPTS[0], sid, 4), sid


def test_sorted_rows_give_contiguous_slices(tiny_model):
    model = tiny_model()
    key = (0, 0, 1, 3, 3, 5, 6, 6)
    plan = build_plan(key, model.stitches, 4, 6, torch.device("cpu"))
    assert all(isinstance(g.sel, slice) for g in plan.groups)
    # a block runs once, on exactly the rows that need it
    assert [(i, plan.groups[g].sel) for i, g in plan.small_blocks] == [
        (0, slice(0, 6)), (1, slice(0, 5)), (2, slice(0, 5)), (3, slice(0, 3))]
    assert [(k, plan.groups[g].sel) for k, g in plan.large_blocks] == [
        (0, slice(6, 8)), (1, slice(5, 8)), (2, slice(5, 8)), (3, slice(3, 8)), (4, slice(3, 8)), (5, slice(2, 8))]
    assert plan.groups[plan.small_head].sel == slice(0, 2) and plan.groups[plan.large_head].sel == slice(2, 8)


@pytest.mark.parametrize("pad", [False, True], ids=["exact", "padded-to-bucket"])
def test_join_and_leave_mid_batch_do_not_disturb_others(pst_model, ref, pad):
    """pad: decode batches padded to 4 rows with free slots (what CUDA graphs use on GPU)."""
    engine = StitchEngine(pst_model, EngineConfig(max_slots=4, max_seq_len=48, kv_block=8, pad_to_bucket=pad,
                                                  batch_buckets=[4]))
    a = engine.add_request(PROMPTS[0], "s2-l3", _greedy(N_REF))
    b = engine.add_request(PROMPTS[1], "large", _greedy(N_REF))
    got = {a: [], b: []}
    joined = {}
    for step in range(N_REF):
        if step in (2, 5, 7):  # newcomers on other stitches land before, between and after a and b
            k = (2, 5, 7).index(step)
            sid = ["small", "s0-l1", "s3-l5"][k]
            rid = engine.add_request(PROMPTS[2 + k], sid, _greedy(3))
            joined[rid], got[rid] = (PROMPTS[2 + k], sid), []
        if step == 9:
            assert engine.abort(b)  # leaves mid-decode; a keeps going
        for rid, tok in engine.step().items():
            got[rid].append(tok)
    assert not engine.has_unfinished()
    assert got[a] == ref(PROMPTS[0], "s2-l3", N_REF)
    assert got[b] == ref(PROMPTS[1], "large", 9)
    for rid, (p, sid) in joined.items():
        assert got[rid] == ref(p, sid, 3), sid


@pytest.mark.parametrize("pad", [False, True], ids=["exact", "padded-to-bucket"])
def test_slots_are_reused_without_leaks(pst_model, ref, pad):
    ids = [s.id for s in pst_model.stitches]
    engine = StitchEngine(pst_model, EngineConfig(max_slots=4, max_seq_len=32, kv_block=8, pad_to_bucket=pad))
    jobs = [(PROMPTS[i % 3], ids[(i * 5) % 7], _greedy(1 + i % 3)) for i in range(24)]
    out = _run(engine, jobs)
    for i, (p, sid, sp) in enumerate(jobs):
        assert out[i] == ref(p, sid, sp.max_tokens), (i, sid)
    assert engine.num_running == engine.num_waiting == 0 and not engine.requests
    assert engine.free_slots() == 4


def test_stop_tokens_and_finish_reasons(pst_model, ref):
    want = ref(PROMPTS[0], "s1-l2")
    stop = want[2]
    engine = StitchEngine(pst_model, EngineConfig(max_slots=2, max_seq_len=32), eos_token_ids={stop})
    rid = engine.add_request(PROMPTS[0], "s1-l2", _greedy())
    toks, reasons = [], {}
    while engine.has_unfinished():
        out = engine.step()
        toks += out.values()
        reasons.update(out.finished)
    assert toks == want[: want.index(stop) + 1] and reasons == {rid: "stop"}
    engine = StitchEngine(pst_model, EngineConfig(max_slots=2, max_seq_len=32))
    rid = engine.add_request(PROMPTS[0], "s1-l2", _greedy(2, stop_token_ids=[want[5]]))
    assert engine.step().finished == {}
    assert engine.step().finished == {rid: "length"}


LONG = _prompts(1, seed=5)[0] * 3  # 15 tokens: several chunks


@pytest.mark.parametrize("chunk", [1, 4, 7])
@pytest.mark.parametrize("pad", [False, True], ids=["exact", "padded-to-bucket"])
def test_chunked_prefill_gives_every_row_what_it_gets_unchunked(pst_model, ref, chunk, pad):
    """Prompts written over several steps (junk decode rows for the prefilling ones, pieces of
    different prompts batched with different start positions) change no row's tokens, greedy or
    seeded, and free every slot."""
    ids = [s.id for s in pst_model.stitches]
    hot = SamplingParams(max_tokens=N_NEW, temperature=1.1, top_p=0.9, seed=5)
    jobs = [(p, ids[(i * 3) % 7], _greedy()) for i, p in enumerate([*PROMPTS, LONG])] + [(LONG, "s2-l4", hot)]
    cfg = dict(max_slots=4, max_seq_len=32, kv_block=8, pad_to_bucket=pad, batch_buckets=[4])
    want = _run(StitchEngine(pst_model, EngineConfig(**cfg)), jobs)
    engine = StitchEngine(pst_model, EngineConfig(**cfg, prefill_chunk=chunk))
    got = _run(engine, jobs)
    assert got == want
    for i, (p, sid, sp) in enumerate(jobs[:-1]):
        assert got[i] == ref(p, sid), (i, sid)
    assert engine.free_slots() == 4 and not engine.prefilling and not engine.requests


def test_chunked_prefill_keeps_running_rows_decoding(pst_model, ref):
    """A long prompt joining running rows costs them one chunk per step, not a stall: every step
    still gives each running row its token, and the joiner's first token comes after
    ceil(len / chunk) steps. Aborting a prompt mid-prefill frees its slot."""
    engine = StitchEngine(pst_model, EngineConfig(max_slots=3, max_seq_len=40, kv_block=8, prefill_chunk=4))
    a = engine.add_request(PROMPTS[2], "s2-l3", _greedy(N_REF))  # 3 tokens: one chunk
    assert set(engine.step()) == {a}
    b = engine.add_request(LONG, "large", _greedy(3))  # 15 tokens: 4 chunks
    got, steps = {a: [ref(PROMPTS[2], "s2-l3", 1)[0]], b: []}, []
    while b not in got or not got[b]:
        out = engine.step()
        steps.append((set(out), out.prefilled, out.decoded))
        for rid, tok in out.items():
            got[rid].append(tok)
    assert [s[0] for s in steps] == [{a}, {a}, {a}, {a, b}]
    assert [s[1] for s in steps] == [{"large": 4}] * 3 + [{"large": 3}]
    assert steps[0][2] == {"s2-l3": 1} and steps[1][2] == {"s2-l3": 1, "large": 1}  # b's row runs, discarded
    c = engine.add_request(LONG, "small", _greedy(2))
    for rid, tok in engine.step().items():
        got[rid].append(tok)
    assert len(engine.prefilling) == 1 and engine.abort(c) and not engine.prefilling
    assert engine.num_running == 2
    while engine.has_unfinished():
        for rid, tok in engine.step().items():
            got[rid].append(tok)
    assert got[a] == ref(PROMPTS[2], "s2-l3", N_REF) and got[b] == ref(LONG, "large", 3)
    assert engine.free_slots() == 3
    with pytest.raises(ValueError, match="prefilled"):
        engine.add_request(LONG, "small", _greedy(2))
        engine.step()
        engine.decode_burst(1)


def test_seeded_sampling_reproducible_and_independent_of_companions(pst_model):
    hot = SamplingParams(max_tokens=N_NEW, temperature=1.3, top_p=0.9, seed=123)

    def alone(sp):
        engine = StitchEngine(pst_model, EngineConfig(max_slots=4, max_seq_len=48))
        return _run(engine, [(PROMPTS[0], "s2-l4", sp)])[0]

    first = alone(hot)
    assert first == alone(hot)
    engine = StitchEngine(pst_model, EngineConfig(max_slots=4, max_seq_len=48))
    companions = [(PROMPTS[1], "large", SamplingParams(max_tokens=3, temperature=0.7, seed=9)),
                  (PROMPTS[0], "s2-l4", hot), (PROMPTS[2], "small", _greedy(5)),
                  (PROMPTS[3], "s2-l4", SamplingParams(max_tokens=N_NEW, temperature=1.0))]
    assert _run(engine, companions)[1] == first
    assert alone(hot.model_copy(update={"seed": 124})) != first


def test_seeded_sampling_matches_reference_sampler(tiny_model):
    """Same exponential-race maths and draw order as stitchlib.sampling: same tokens as the reference."""
    model = tiny_model()
    p = PROMPTS[0]
    ref = model.generate(torch.tensor([p]), "s2-l3", max_new_tokens=N_NEW, temperature=0.8, top_p=0.95,
                         seeds=[7])[0].tolist()
    engine = StitchEngine(model, EngineConfig(max_slots=1, max_seq_len=32))
    got = _run(engine, [(p, "s2-l3", SamplingParams(max_tokens=N_NEW, temperature=0.8, top_p=0.95, seed=7))])[0]
    assert got == ref


def test_requests_queue_when_slots_are_full_and_validation(pst_model):
    engine = StitchEngine(pst_model, EngineConfig(max_slots=1, max_seq_len=16, stitches=["small", "s2-l3"]))
    a = engine.add_request([1, 2, 3], "small", _greedy(2))
    b = engine.add_request([4, 5], "s2-l3", _greedy(2))
    assert set(engine.step()) == {a} and engine.num_waiting == 1
    out = engine.step()
    assert set(out) == {a, b}  # a's last token frees the slot; b is prefilled in the same step
    assert out == {a: out[a], b: out[b]} and out.tokens == dict(out)  # a StepOutput reads as {rid: token}
    assert out.finished == {a: "length"} and engine.num_running == 1
    assert engine.abort(b) and not engine.abort(b) and not engine.has_unfinished()
    with pytest.raises(KeyError, match="not served"):
        engine.add_request([1], "large")
    with pytest.raises(ValueError, match="exceeds"):
        engine.add_request([1] * 10, "small", _greedy(7))
    with pytest.raises(ValueError, match="empty prompt"):
        engine.add_request([], "small")
    # caches cover only the layers the served stitches run
    assert engine.caches["small"].layers == [0, 1, 2, 3] and engine.caches["large"].layers == [3, 4, 5]


def test_static_cache_update_protocol():
    cache = StaticKVCache([0, 2], n_layers=3, slots=4, kv_heads=2, head_dim=3, max_seq=8,
                          dtype=torch.float32, device=torch.device("cpu"))
    k = torch.arange(2 * 2 * 1 * 3, dtype=torch.float32).reshape(2, 2, 1, 3)
    pos = torch.tensor([[5], [1]])
    cache.bind(2, slice(1, 3), pos, kv_len=8)
    ko, vo = cache.update(k, -k, layer_idx=2)  # layer_idx is ignored: the binding chose layer 2
    assert ko.shape == (2, 2, 8, 3)
    torch.testing.assert_close(cache.k[2][1, :, 5], k[0, :, 0])
    torch.testing.assert_close(cache.k[2][2, :, 1], k[1, :, 0])
    torch.testing.assert_close(cache.v[2][2, :, 1], -k[1, :, 0])
    assert cache.k[0].abs().sum() == 0 and cache.k[2][0].abs().sum() == 0 and cache.k[2][3].abs().sum() == 0
    assert ko.data_ptr() == cache.k[2][1].data_ptr()  # contiguous rows: a view, no copy
    cache.bind(2, torch.tensor([3, 0]), pos, kv_len=6)
    ko, _ = cache.update(k, k, layer_idx=0)
    assert ko.shape == (2, 2, 6, 3)
    torch.testing.assert_close(cache.k[2][3, :, 5], k[0, :, 0])
    cache.move_row(3, 1, [2], length=6)
    torch.testing.assert_close(cache.k[2][1, :, :6], cache.k[2][3, :, :6])
    with pytest.raises(RuntimeError, match="no cache"):
        cache.bind(1, slice(0, 1), pos, 8)


def test_profile_table_round_trip(pst_model, tmp_path):
    profs = profile_stitches(pst_model, ["small", "s2-l3", "large"], prompt_len=6, decode_steps=3, batch_sizes=(1, 3))
    assert set(profs) == {"small", "s2-l3", "large"}
    for p in profs.values():
        assert p.prefill_s_per_token > 0 and set(p.decode_step_s) == {1, 3} and min(p.decode_step_s.values()) > 0
    path = save_profile(tmp_path / "profile.json", profs, {"device": "cpu"})
    back, meta = load_profile(path)
    assert back == profs and meta == {"device": "cpu"}


def test_profile_interleaves_the_stitches_steps(pst_model, monkeypatch):
    """The profile times one decode step of each stitch in turn (one engine each, caches sized for the
    profile's positions), so stitches that cost about the same are compared under the same conditions."""
    from stitchlib.engine import profile as prof_mod

    order, built = [], []
    real_burst, real_init = StitchEngine.decode_burst, StitchEngine.__init__

    def burst(self, steps):
        order.append(self.cfg.stitches[0])
        return real_burst(self, steps)

    def init(self, model, config=None, **kw):
        built.append(config)
        real_init(self, model, config, **kw)

    monkeypatch.setattr(StitchEngine, "decode_burst", burst)
    monkeypatch.setattr(StitchEngine, "__init__", init)
    prof_mod.profile_stitches(pst_model, ["small", "s2-l3", "large"], prompt_len=6, decode_steps=3, batch_sizes=(1, 2))
    assert [c.stitches for c in built] == [["small"], ["s2-l3"], ["large"]]
    assert {c.max_seq_len for c in built} == {64} and {c.max_slots for c in built} == {2}  # 6+1+3+1 -> kv_block
    # per batch size: one warm-up step of each, then 3 rounds of one timed step each
    assert order == (["small", "s2-l3", "large"] * 4) * 2


def test_runtime_accepts_only_a_profile_table_measured_for_it(tmp_path):
    """`stitchserve profile` writes the table; the runtime takes it only for its own device type, device,
    dtype, anchor pair and deployed stitches, and says why otherwise (an error value, not an exception)."""
    import json

    from stitchlib.cli import main
    from training.init_palette import init_palette
    from stitchlib.runtime import PaletteRuntime

    pal = init_palette(tmp_path / "pal", n_calibration=4, progress=False, dtype="float32", n_validation=0)
    table = tmp_path / "t.json"
    assert main(["profile", str(pal), "--out", str(table), "--dtype", "float32", "--prompt-len", "6",
                 "--decode-steps", "2", "--batch-sizes", "1", "2", "--json"]) == 0
    rt = PaletteRuntime.load(pal, dtype="float32")
    # a least-squares palette's stitch-specific biases are all zero: serving drops them (no value changes)
    assert all(m.ssb is None for m in rt.model.pst_modules()) and rt.model.pst_modules()
    got = rt.load_profile_table(table)
    assert isinstance(got, dict) and list(got) == [s.id for s in rt.stitches]
    assert all(set(p.decode_step_s) == {1, 2} and p.prefill_s_per_token > 0 for p in got.values())

    doc = json.loads(table.read_text())

    def variant(name, edit):
        d = json.loads(json.dumps(doc))
        edit(d)
        (tmp_path / name).write_text(json.dumps(d))
        return rt.load_profile_table(tmp_path / name)

    assert "dtype 'bfloat16'" in variant("dt.json", lambda d: d["meta"].update(dtype="bfloat16"))
    assert "device_type 'cuda'" in variant("dev.json", lambda d: d["meta"].update(device_type="cuda"))
    assert "measured on 'Other CPU'" in variant("cpu.json", lambda d: d["meta"].update(device="Other CPU (2 threads)"))
    assert "small_fingerprint" in variant("fp.json", lambda d: d["meta"].update(small_fingerprint="0" * 32))
    assert "no entry for deployed stitch(es) large" in variant("miss.json", lambda d: d["stitches"].pop("large"))
    # another thread count on the same CPU is the same device
    assert isinstance(variant("thr.json", lambda d: d["meta"].update(device=d["meta"]["device"].rsplit(" (", 1)[0]
                                                                        + " (7 threads)")), dict)
    (tmp_path / "bad.json").write_text("{not json")
    assert rt.load_profile_table(tmp_path / "bad.json").startswith("cannot read profile table")
    assert rt.load_profile_table(tmp_path / "absent.json").startswith("cannot read profile table")


def test_runtime_generate_steps_runs_on_engine_and_close_frees_it(tmp_path):
    from training.init_palette import init_palette
    from stitchlib.runtime import PaletteRuntime

    p = init_palette(tmp_path / "pal", n_calibration=4, progress=False, dtype="float32", n_validation=0)
    rt = PaletteRuntime.load(p, dtype="float32")
    ids = [5, 6, 7, 8]
    gen = rt.generate_steps([ids, ids[:2]], "s1-l2", [_greedy(6), _greedy(6)])
    first = next(gen)
    assert all(t is not None for t in first)
    gen.close()  # stops work: the engine's rows are released and it goes back to the pool
    (engine,) = rt._engines._idle
    assert not engine.requests and engine.num_running == 0
    steps = list(rt.generate_steps([ids], "s1-l2", [_greedy(6)]))
    assert rt._engines._idle == [engine]  # reused, not rebuilt
    ref = rt.model.generate(torch.tensor([ids]), "s1-l2", max_new_tokens=6)[0].tolist()
    assert [s[0] for s in steps] == ref
    # two calls in flight at once get separate engines: interleaving them changes nothing
    g1 = rt.generate_steps([ids], "s1-l2", [_greedy(6)])
    g2 = rt.generate_steps([ids[:3]], "large", [_greedy(6)])
    both = [(next(g1)[0], next(g2)[0]) for _ in range(6)]
    assert [a for a, _ in both] == ref
    assert [b for _, b in both] == rt.model.generate(torch.tensor([ids[:3]]), "large", max_new_tokens=6)[0].tolist()


def test_runtime_generate_steps_aborts_one_row_and_frees_its_slot(tmp_path):
    """gen.send([i]) stops row i at once (None from then on, slot freed); the other rows' tokens
    are exactly what they would have been."""
    from training.init_palette import init_palette
    from stitchlib.runtime import PaletteRuntime

    rt = PaletteRuntime.load(init_palette(tmp_path / "pal", n_calibration=4, progress=False, dtype="float32", n_validation=0),
                             dtype="float32")
    a, b = [5, 6, 7, 8], [9, 10, 11]
    alone = [s[0] for s in rt.generate_steps([a], "s2-l4", [_greedy(8)])]
    gen = rt.generate_steps([a, b], "s2-l4", [_greedy(8), _greedy(8)])
    steps = [next(gen), next(gen)]
    steps.append(gen.send([1]))  # abort row 1 before the third step
    steps += list(gen)
    assert all(s[1] is None for s in steps[2:]) and all(s[1] is not None for s in steps[:2])
    assert [s[0] for s in steps] == alone
    assert all(not e.requests for e in rt._engines._idle)
