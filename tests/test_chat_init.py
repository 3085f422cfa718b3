"""Chat-palette initialisation (issue 11): per-route quality measurement (stitchlib.quality), relative
least squares and the output-aware distillation step (stitchlib.calibrate), the bbcheadlines chat
set, and init_palette's calibrate-on-chat-template -> measure -> gate pipeline on the tiny pair."""
from __future__ import annotations

import json

import pytest
import torch

from stitchlib import prompts as P
from stitchlib.calibrate import calibrate_, distill_stitching_, least_squares
from stitchlib.model import lm_loss
from stitchlib.quality import chat_eval_batches, route_nll
from training import datasets as D


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    """A small chat set in the Alpaca layout, answers a few words long."""
    rows = [{"instruction": f"What is {a} plus {b}?", "output": f"{a} plus {b} is {a + b}."}
            for a in range(6) for b in range(5)]
    rows += [{"instruction": f"Spell the word {w} backwards.", "output": w[::-1]}
             for w in ("apple", "table", "cloud", "river", "stone", "green", "light", "water")]
    p = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows))
    return p


def _batch(seed=0, B=3, T=12, shared=0):
    """Random rows, the first `shared` tokens the same in every row (a chat template's header)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (B, T), generator=g)
    ids[:, :shared] = ids[:1, :shared]
    attn = torch.ones_like(ids)
    attn[1, 9:] = 0  # right padding on one row
    labels = ids.clone()
    labels[:, :5] = -100  # a prompt carries no loss
    labels[attn == 0] = -100
    return ids, attn, labels


# ---- stitchlib.quality ---------------------------------------------------------------------------
@pytest.mark.parametrize("shared", [0, 4], ids=["rows-differ", "rows-share-4-tokens"])
@pytest.mark.parametrize("ssb", [False, True], ids=["shared-small-blocks", "per-route"])
def test_route_nll_equals_the_reference_forward(tiny_model, ssb, shared):
    """Both paths (shared small blocks; per-route when small blocks carry stitch-specific biases), with
    and without a token prefix all rows share (run once, its KV reused by every row), give the loss of
    StitchedLM.forward for every route, over two batches, token-weighted."""
    m = tiny_model().eval()
    if ssb:
        with torch.no_grad():
            for p in m.pst_small:
                p.ssb.normal_(std=0.5)
    batches = [_batch(0, shared=shared), _batch(1, B=2, T=9, shared=shared)]
    res = route_nll(m, batches)
    assert set(res) == {s.id for s in m.stitches}
    with torch.no_grad():
        for s in m.stitches:
            nll = n = 0.0
            for ids, attn, labels in batches:
                k = int((labels[:, 1:] != -100).sum())
                nll += float(lm_loss(m(ids, s.id, attn), labels)) * k
                n += k
            assert res[s.id].tokens == n
            assert res[s.id].loss == pytest.approx(nll / n, rel=1e-5, abs=1e-5), s.id
            assert res[s.id].metrics()["neg_loss"] == pytest.approx(-res[s.id].loss)


def test_chat_eval_batches_label_only_the_response(tiny_pair, chat_file):
    S, _ = tiny_pair("float32")
    exs = D.load_chat(chat_file)[:5]
    batches = chat_eval_batches(S.tokenizer, exs, batch_size=2)
    assert sum(b[0].shape[0] for b in batches) == 5
    for ids, attn, labels in batches:
        for row in range(ids.shape[0]):
            lab = labels[row][attn[row].bool()]
            first = int((lab != -100).nonzero()[0])
            assert (lab[:first] == -100).all() and (lab[first:] != -100).all()  # prompt, then response


def test_shared_prefix_len_caps():
    """The shared prefix stops where rows differ, keeps a token after it in every row, never covers a
    labelled prediction, and is 0 for one row or left padding."""
    from stitchlib.model import shared_prefix_len

    ids, attn, labels = _batch(0, shared=4)
    assert shared_prefix_len(ids, attn) == 4
    assert shared_prefix_len(ids, attn, labels) == 4  # labels from position 5: hidden 4 predicts the first
    labels[:, 3] = ids[:, 3]
    assert shared_prefix_len(ids, attn, labels) == 2  # hidden 2 predicts label 3
    same = ids[:1].expand(3, -1).clone()
    assert shared_prefix_len(same, torch.ones_like(same)) == 11  # one token left per row
    assert shared_prefix_len(same, attn) == 8  # row 1 has 9 real tokens
    assert shared_prefix_len(ids[:1], attn[:1]) == 0
    left = torch.ones_like(same)
    left[0, 0] = 0
    assert shared_prefix_len(same, left) == 0


# ---- stitchlib.calibrate -------------------------------------------------------------------------
def test_relative_weighting_is_weighted_least_squares(tiny_model):
    """weighting='relative' solves min sum_t ||A x_t - y_t||^2 / mean(y_t^2): checked against the direct
    weighted solve (rows scaled by sqrt(w)) on the activations themselves."""
    m = tiny_model().eval()
    ids, attn, _ = _batch(3, B=8, T=48)  # more tokens than unknowns: one solution
    calibrate_(m, [(ids, attn)], progress=False, weighting="relative")
    st = next(s for s in m.stitches if s.kind == "stitch")
    with torch.no_grad():
        from stitchlib.model import causal_mask, positions
        mask, pos = causal_mask(attn, ids.shape[1]), positions(attn, ids.shape[1])
        h = m.S.anchor.embed(ids)
        pe = m.S.rope(h, pos)
        for i in range(st.split + 1):
            h = m.S.anchor.layers[i](h, attention_mask=mask, position_ids=pos, position_embeddings=pe)
        y = m.L.anchor.embed(ids)
        pe = m.L.rope(y, pos)
        for i in range(st.join):
            y = m.L.anchor.layers[i](y, attention_mask=mask, position_ids=pos, position_embeddings=pe)
    real = attn.bool()  # padding is left out of the fit
    x, y = h[real].double(), y[real].double()
    w = 1.0 / y.pow(2).mean(-1, keepdim=True)
    xw = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1) * w.sqrt()
    a = torch.linalg.lstsq(xw, y * w.sqrt()).solution  # [d+1, e]
    got = m.stitching[st.id]
    assert torch.allclose(got.weight.double(), a[:-1].T, atol=1e-4, rtol=1e-3)
    assert torch.allclose(got.bias.double(), a[-1], atol=1e-4, rtol=1e-3)
    # and it differs from plain least squares (the weights matter)
    w0, _ = least_squares(x, y)
    assert not torch.allclose(w0, a[:-1].T, atol=1e-3)
    with pytest.raises(ValueError, match="weighting"):
        calibrate_(m, [(ids, attn)], progress=False, weighting="bogus")


@pytest.mark.parametrize("weighting", ["none", "relative"])
def test_calibration_runs_a_shared_prefix_once_and_counts_it_per_row(tiny_model, weighting):
    """A prefix every row shares is run once and counted once per row: the same fit and residuals as
    the same rows calibrated one per batch (where there is nothing to share)."""
    from stitchlib.model import shared_prefix_len

    ids, attn, _ = _batch(5, B=6, T=40, shared=10)
    assert shared_prefix_len(ids, attn) == 8  # row 1 has 9 real tokens: one is left after the prefix
    fits = []
    for batches in ([(ids, attn)], [(ids[i:i + 1], attn[i:i + 1]) for i in range(6)]):
        m = tiny_model().eval()
        res = calibrate_(m, batches, progress=False, weighting=weighting)
        with torch.no_grad():  # each stitch's map applied to a fixed input (its weights themselves are
            x = torch.randn(32, m.d_small, generator=torch.Generator().manual_seed(0))  # ill-conditioned)
            fits.append((res, {k: v(x) for k, v in m.stitching.items()}))
    (res, got), (res1, want) = fits
    for k, y in got.items():
        torch.testing.assert_close(y, want[k], atol=1e-3 * float(want[k].abs().max()), rtol=1e-3)
        assert res[k] == pytest.approx(res1[k], rel=1e-4, abs=1e-6)


def test_distillation_lowers_kl_and_never_makes_a_stitch_worse(tiny_model):
    m = tiny_model().eval()
    ids, attn, _ = _batch(4, B=4, T=16)
    calibrate_(m, [(ids, attn)], progress=False)
    sids = [s.id for s in m.stitches if s.kind == "stitch"][:2]
    before = {i: m.stitching[i].weight.clone() for i in sids}
    frozen = [p.clone() for p in m.large_anchor.model.parameters()]
    rep = distill_stitching_(m, [(ids, attn)], sids, steps=15, lr=1e-2, progress=False)
    for i in sids:
        assert rep[i]["kl_after"] < rep[i]["kl_before"] and rep[i]["kept"]
        assert not torch.equal(before[i], m.stitching[i].weight)
    assert all(torch.equal(a, b) for a, b in zip(frozen, m.large_anchor.model.parameters()))  # anchors frozen
    # a step that cannot help (lr 0) keeps the least-squares layer as it was
    w = m.stitching[sids[0]].weight.clone()
    rep = distill_stitching_(m, [(ids, attn)], sids[:1], steps=2, lr=0.0, progress=False)
    assert not rep[sids[0]]["kept"] and torch.equal(w, m.stitching[sids[0]].weight)


# ---- data --------------------------------------------------------------------------------------
def test_bbcheadlines_is_a_real_chat_set():
    exs = D.load_chat("bbcheadlines")
    assert len(exs) == 2225
    assert exs[0].output == "Ad sales boost Time Warner profit"
    assert exs[0].input.startswith("Quarterly profits at US media giant TimeWarner jumped 76%")
    assert all(e.instruction == D.HEADLINE_INSTRUCTION and 0 < len(e.input) <= 480 for e in exs)


# ---- init_palette: chat template -> relative least squares -> measured -> gated -------------------
def test_init_palette_calibrates_on_the_chat_template_and_gates(tmp_path, tiny_model, chat_file):
    from stitchlib.gate import select_deployment
    from stitchlib.palette import gate_rows, load_palette
    from training.init_palette import chat_calibration_split, init_palette

    out = init_palette(tmp_path / "p", chat_data=[str(chat_file)], n_calibration=12, n_validation=6,
                       progress=False, dtype="float32")
    m, tensors = load_palette(out)
    assert m.quality_metric == "neg_loss" and m.training["calibration"]["template"] == "chat"
    assert m.training["validation"]["examples"] == 6
    assert all("neg_loss" in s.metrics and "loss" in s.metrics for s in m.stitches)  # every route measured
    # the deployed set is the gate's verdict on the recorded numbers, and it is monotone
    gate = select_deployment(gate_rows(m))
    assert [s.id for s in m.deployed()] == gate.deployed_ids() == m.training["gate"]["deployed"]
    dep = m.deployed()
    if gate.anchors_inverted:  # random tiny weights may rank the anchors either way: then nothing fits between
        assert [s.id for s in dep] == ["small", "large"]
    else:
        assert all(a.gflops < b.gflops and a.metrics["neg_loss"] < b.metrics["neg_loss"] for a, b in zip(dep, dep[1:]))
    assert all(s.dropped and s.dropped_reason for s in m.stitches if not s.deployed)
    # the stitching layers are exactly relative least squares on the templated calibration examples
    calib, val = chat_calibration_split([str(chat_file)], n_calibration=12, n_validation=6, seed=0)
    assert not {e.instruction for e in calib} & {e.instruction for e in val}  # held out
    model = tiny_model()
    tok = model.small_anchor.tokenizer
    recs = P.encode_chat(calib, tok, 128)
    start = tok.convert_tokens_to_ids("<|im_start|>")
    assert all(r["input_ids"][0] == start for r in recs)  # rendered with the chat template, as served
    recs = sorted(recs, key=lambda r: len(r["input_ids"]))  # init_palette batches like lengths together
    b = P.collate(recs[:8], P.pad_token_id(tok)), P.collate(recs[8:], P.pad_token_id(tok))
    calibrate_(model, [(x["input_ids"], x["attention_mask"]) for x in b], progress=False, weighting="relative")
    for sid, layer in model.stitching.items():
        assert torch.allclose(tensors[f"stitching.{sid}.weight"], layer.weight, atol=1e-5), sid


@pytest.mark.parametrize("force", [False, True], ids=["as-measured", "all-screened"])
def test_two_stage_validation_measures_survivors_on_the_whole_split(tmp_path, tiny_model, chat_file, monkeypatch,
                                                                    force):
    """n_screen < n_validation: a race over slices of n_screen held-out examples (here 4, 8, 10): every
    route on the first slice, then each slice only on the routes gate.screen keeps on all they saw;
    each route's recorded loss is exactly route_nll's over the examples it saw, and the gate decides on
    the survivors' whole-split numbers."""
    import stitchlib.gate as gate_mod
    from stitchlib.gate import GateRow, select_deployment
    from stitchlib.palette import load_palette
    from training.init_palette import chat_calibration_split, init_palette

    if force:  # a screen nothing passes: only the anchors reach the second stage
        monkeypatch.setattr(gate_mod, "SCREEN_Z", -1e9)
    out = init_palette(tmp_path / "p", chat_data=[str(chat_file)], n_calibration=12, n_validation=10, n_screen=4,
                       progress=False, dtype="float32")
    m, tensors = load_palette(out)
    v = m.training["validation"]
    assert v["examples"] == 10 and v["screen_examples"] == 4 and v["looks"] == [4, 8, 10]
    screened = set(v["screened_out"])
    if force:
        assert screened == {s.id for s in m.stitches} - {"small", "large"}
    assert {s.id for s in m.stitches if s.dropped_reason and "screened out" in s.dropped_reason} == screened
    # the numbers: rebuild the model from the palette and measure each route over what it saw
    model = tiny_model()
    model.load_palette_state_dict(tensors)
    model.eval()
    _, val = chat_calibration_split([str(chat_file)], n_calibration=12, n_validation=10, seed=0)
    tok = model.small_anchor.tokenizer
    by_n = {n: route_nll(model, chat_eval_batches(tok, val[:n])) for n in (4, 8, 10)}
    whole = by_n[10]
    if force:
        assert {s.metrics["eval_examples"] for s in m.stitches if s.id in screened} == {4.0}
    for s in m.stitches:
        n = int(s.metrics["eval_examples"])
        assert (n < 10) == (s.id in screened), s.id
        ref = by_n[n][s.id]
        assert s.metrics["eval_tokens"] == ref.tokens, s.id
        assert s.metrics["loss"] == pytest.approx(ref.loss, abs=1e-4), s.id
    survivors = [GateRow(s.id, s.gflops, -whole[s.id].loss, tuple(whole[s.id].samples()))
                 for s in m.stitches if s.id not in screened]
    assert select_deployment(survivors, z=2.0).deployed_ids() == [s.id for s in m.deployed()]


def test_a_palette_with_no_stitch_worth_its_cost_deploys_just_the_anchors(tmp_path, chat_file):
    """No stitch clears the bar (here: a min_gain none can reach): only the anchors serve, and the
    command says which stitches were dropped and why."""
    from stitchlib.cli import main
    from stitchlib.palette import read_manifest

    import io
    import contextlib

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["init-palette", "--small", "tiny-small", "--large", "tiny-large", "--out", str(tmp_path / "p"),
                   "--chat-data", str(chat_file), "--calibration", "8", "--validation", "4", "--min-gain", "1e9",
                   "--dtype", "float32"])
    text = buf.getvalue()
    assert rc == 0
    m = read_manifest(tmp_path / "p")
    assert [s.id for s in m.deployed()] == ["small", "large"]
    assert "(7 stitches, 2 deployed)" in text and "not deployed (5):" in text and "NLL" in text
    assert all(s.dropped in ("below_small", "above_large", "dominated") for s in m.stitches if not s.deployed)


def test_no_validation_deploys_every_stitch_ranked_by_size(tmp_path, chat_file):
    from stitchlib.palette import read_manifest
    from training.init_palette import init_palette
    from stitchlib.runtime import stitch_infos

    m = read_manifest(init_palette(tmp_path / "p", chat_data=[str(chat_file)], n_calibration=8, n_validation=0,
                                   progress=False))
    assert len(m.deployed()) == len(m.stitches) and m.quality_metric is None and "off" in m.training["gate"]
    infos = stitch_infos(m)
    assert [i.quality for i in infos] == [i.gflops for i in infos]


# ---- the gate's noise margin --------------------------------------------------------------------
def test_gate_requires_gains_beyond_the_paired_noise():
    """Same mean gain (+0.1 over the small anchor), once consistent across examples and once noise: with
    z=2 only the consistent one is deployed; z=0 deploys both (the old behaviour)."""
    from stitchlib.gate import GateRow, paired_se, select_deployment

    small = GateRow("small", 1.0, -3.0, (-3.0, -2.0, -4.0, -3.0))
    steady = GateRow("steady", 2.0, -2.9, (-2.9, -1.9, -3.9, -2.9))  # +0.1 on every example
    noisy = GateRow("noisy", 3.0, -2.7, (-1.7, -2.3, -4.5, -2.3))   # +0.3 on average, +1.3 .. -0.5
    large = GateRow("large", 4.0, -2.0, (-2.0, -1.0, -3.0, -2.0))
    assert paired_se(steady, small) == pytest.approx(0.0, abs=1e-12)
    d = [1.3, -0.3, -0.5, 0.7]
    mean = sum(d) / 4
    assert paired_se(noisy, steady) == pytest.approx((sum((x - mean) ** 2 for x in d) / 3 / 4) ** 0.5)
    res = select_deployment([small, steady, noisy, large], z=2.0)
    assert res.deployed_ids() == ["small", "steady", "large"]
    assert res["noisy"].reason == "below_small" and "standard errors" in res["noisy"].message
    assert select_deployment([small, steady, noisy, large], z=0.0).deployed_ids() == \
        ["small", "steady", "noisy", "large"]
    with pytest.raises(ValueError, match="z must be"):
        select_deployment([small, large], z=-1)


def test_route_nll_samples_are_paired_per_example(tiny_model):
    m = tiny_model().eval()
    res = route_nll(m, [_batch(0), _batch(1, B=2, T=9)], ["small", "large"])
    for r in res.values():
        s = r.samples()
        assert len(s) == 5 and sum(s) / len(s) == pytest.approx(-r.loss, rel=1e-9)
        assert sum(k for _, k in r.per_example) == r.tokens


def test_init_palette_with_the_distillation_step(tmp_path, chat_file):
    from stitchlib.palette import load_palette
    from training.init_palette import init_palette

    m, tensors = load_palette(init_palette(tmp_path / "p", chat_data=[str(chat_file)], n_calibration=8,
                                           n_validation=0, distill_steps=2, distill_lr=1e-2, progress=False,
                                           dtype="float32"))
    assert m.training["calibration"]["distill_steps"] == 2 and m.training["calibration"]["distill_sequences"] == 8
    for s in m.stitches:
        if s.kind == "stitch":
            # a step that did not help is not kept (the least-squares layer stays), so "after" may be higher
            assert s.metrics["distill_kl_before"] > 0 and s.metrics["distill_kl_after"] > 0
