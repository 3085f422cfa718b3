"""Stitch space rules, analytic costs, sampling and the SNIP sampler."""
from __future__ import annotations

import collections
import json

import pytest
import torch

from stitchlib.sampling import make_generator, sample_next, top_p_filter
from stitchlib.snip import SnipSampler, cost_intervals, snip_score, validated_deploy
from stitchlib.space import StitchSpaceConfig, enumerate_stitches, nearest_map, stitch_positions


def test_unequal_depths_follow_nearest_neighbour_rule():
    # SN-Net: 32/40 layers (LLaMA-7B/13B) -> 39 positions, plus the two anchors
    assert len(stitch_positions(32, 40)) == 39
    assert len(enumerate_stitches(32, 40)) == 41
    # the real Qwen pair: 24/28 -> 27 stitches + 2 anchors
    assert len(stitch_positions(24, 28)) == 27
    m = nearest_map(24, 28)
    assert m == [(k * 24) // 28 for k in range(28)]
    for j, k in stitch_positions(24, 28):
        assert m[k] == j and j < k


def test_equal_depths_kernel_and_stride():
    # SN-Net ViT: 12 blocks, kernel 2 stride 1 -> 34 positions per pair (71 stitches over Ti-S-B)
    pos = stitch_positions(12, 12, StitchSpaceConfig(kernel=2, stride=1))
    assert len(pos) == 34 and len(set(pos)) == 34
    assert (0, 1) in pos and (1, 0) in pos and (11, 11) in pos and (0, 2) not in pos
    assert stitch_positions(12, 12) == [(i, i) for i in range(12)]
    assert len(stitch_positions(12, 12, StitchSpaceConfig(kernel=2, stride=2))) == 24
    with pytest.raises(ValueError):
        stitch_positions(24, 28, StitchSpaceConfig(kernel=2))
    with pytest.raises(ValueError):
        stitch_positions(28, 24)


def test_ids_are_stable_and_cheapest_first():
    ids = [s.id for s in enumerate_stitches(4, 6)]
    assert ids == ["small", "s3-l5", "s2-l4", "s2-l3", "s1-l2", "s0-l1", "large"]


def test_costs_match_the_models(tiny_model):
    model = tiny_model()
    S, L = model.small_anchor, model.large_anchor
    hf_small = sum(p.numel() for p in S.model.parameters() if not p.requires_grad)
    hf_large = sum(p.numel() for p in L.model.parameters() if not p.requires_grad)
    assert model.cost("small").params == hf_small
    assert model.cost("large").params == hf_large
    # a stitch: small embed + blocks 0..2, stitching layer, large blocks 4..5 + norm + head
    c = model.cost("s2-l4")
    expect = (S.stats.embed_params + sum(S.stats.block_params[:3]) + 64 * 128 + 128
              + sum(L.stats.block_params[4:]) + L.stats.norm_params + L.stats.head_params)
    assert c.params == expect and c.bytes == 2 * expect
    # FLOPs by hand for the small anchor at context 512: 2 per matmul weight + attention 4*H*D*ctx
    per_block = [2 * n + 4 * 4 * 16 * 512 for n in S.stats.block_linear_params]
    assert model.cost("small").flops_per_token == pytest.approx(sum(per_block) + 2 * 259 * 64)
    costs = [model.cost(s).flops_per_token for s in model.stitches]
    assert costs == sorted(costs)  # enumerate order is cheapest first for this pair


def test_top_p_keeps_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = top_p_filter(probs, torch.tensor([0.7]))
    torch.testing.assert_close(kept, torch.tensor([[0.5, 0.3, 0.0, 0.0]]))
    torch.testing.assert_close(top_p_filter(probs, torch.tensor([0.01])), torch.tensor([[0.5, 0.0, 0.0, 0.0]]))


def test_sampling_is_seeded_and_per_row():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    temp, tp = torch.tensor([1.0, 0.0, 0.7]), torch.tensor([0.9, 1.0, 1.0])
    a = sample_next(logits, temp, tp, [make_generator(7), make_generator(8), make_generator(9)])
    b = sample_next(logits, temp, tp, [make_generator(7), make_generator(8), make_generator(9)])
    assert torch.equal(a, b)
    assert a[1] == logits[1].argmax()  # temperature 0 is greedy
    # a row's sample depends only on its own seed
    c = sample_next(logits[:1], temp[:1], tp[:1], [make_generator(7)])
    assert c[0] == a[0]
    # the empirical distribution follows softmax
    draws = collections.Counter(int(sample_next(logits[:1], torch.tensor([1.0]), torch.tensor([1.0]),
                                                [make_generator(s)])[0]) for s in range(3000))
    p = torch.softmax(logits[0], -1)
    top = int(p.argmax())
    assert draws[top] / 3000 == pytest.approx(float(p[top]), abs=0.03)


def test_cost_intervals():
    assert cost_intervals([0, 1, 2, 3, 4, 5, 6], 3) == [0, 0, 1, 1, 2, 2, 2]
    assert cost_intervals([5, 5], 4) == [0, 0]


def test_sampler_respects_intervals_and_concentrates_on_high_scores():
    costs = [float(c) for c in range(12)]  # 12 stitches, 3 intervals of 4
    s = SnipSampler(costs, n_intervals=3, warmup_steps=0, seed=0)
    for slot in range(12):
        s.update(slot, 1.0)
    s.update(5, 10.0)  # one clear favourite in the middle interval
    draws = collections.Counter(s.sample() for _ in range(6000))
    per_interval = collections.Counter(s.interval[c] for c in draws.elements())
    for k in range(3):
        assert per_interval[k] / 6000 == pytest.approx(1 / 3, abs=0.03)  # interval picked uniformly
    assert draws[5] == max(draws[c] for c in range(4, 8))
    assert draws[5] / per_interval[1] > 0.6  # the favourite dominates its interval
    # first interval: equal scores -> uniform within it
    for c in range(4):
        assert draws[c] / per_interval[0] == pytest.approx(0.25, abs=0.05)
    # ties break toward the cheaper stitch: interval 0 -> 0, interval 1 -> 5, interval 2 -> 8
    assert s.deploy(always=[0, 11]) == [0, 5, 8, 11]


def test_sampler_warmup_is_uniform_and_ema():
    s = SnipSampler([0.0, 1.0, 2.0, 3.0], n_intervals=2, warmup_steps=400, eta=0.9, seed=1)
    draws = collections.Counter(s.sample() for _ in range(400))
    assert all(draws[c] / 400 == pytest.approx(0.25, abs=0.07) for c in range(4))
    s.update(2, 10.0)
    s.update(2, 0.0)
    assert s.scores[2] == pytest.approx(9.0)  # 0.9 * 10 + 0.1 * 0


def test_sampler_is_deterministic_and_resumable():
    def run(n, state=None):
        s = SnipSampler([float(c) for c in range(8)], n_intervals=4, warmup_steps=5, seed=3)
        if state:
            s.load_state_dict(json.loads(json.dumps(state)))  # state survives a JSON checkpoint
        out = []
        for _ in range(n):
            c = s.sample()
            s.update(c, float(c % 3))
            out.append(c)
        return out, s.state_dict()

    full, _ = run(40)
    first, st = run(15)
    rest, _ = run(25, st)
    assert first + rest == full


def test_sampler_candidates_and_deploy_choose_top_score_per_interval():
    costs = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    s = SnipSampler(costs, candidates=[1, 2, 3, 4], n_intervals=2, warmup_steps=0, seed=0)
    assert set(s.sample() for _ in range(200)) <= {1, 2, 3, 4}
    for slot, q in {1: 1.0, 2: 3.0, 3: 5.0, 4: 2.0}.items():
        s.update(slot, q)
    assert s.deploy(always=[0, 5]) == [0, 2, 3, 5]


def test_snip_score_counts_only_this_backward():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    (w * torch.tensor([3.0, 4.0])).sum().backward()
    before = [w.grad.clone()]
    assert snip_score([w]) == pytest.approx(3 + 8)
    (w * torch.tensor([1.0, 1.0])).sum().backward()  # grads accumulate
    assert snip_score([w], before) == pytest.approx(1 + 2)


def test_validated_deploy_replaces_top_scores_that_validate_below_the_small_anchor():
    # slot 0: small anchor (candidate, interval 0); 1-6: stitches; 7: large anchor (not a candidate)
    costs = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    s = SnipSampler(costs, candidates=[0, 1, 2, 3, 4, 5, 6], n_intervals=3, warmup_steps=0, seed=0)
    assert s.interval == [0, 0, 0, 1, 1, 2, 2, 2]
    for slot, q in {0: 1.0, 1: 2.0, 2: 9.0, 3: 8.0, 4: 7.0, 5: 5.0, 6: 6.0}.items():
        s.update(slot, q)
    acc = {0: 0.60, 1: 0.70, 2: 0.20, 3: 0.25, 4: 0.24, 5: 0.90, 6: 0.95, 7: 0.98}
    asked: list[list[int]] = []

    def quality_of(slots):
        asked.append(list(slots))
        return {x: acc[x] for x in slots}

    assert s.deploy(always=[0, 7]) == [0, 2, 3, 6, 7]  # ESTA: broken 2 and 3 carry their intervals' top scores
    dep = validated_deploy(s, quality_of, floor_slot=0, always=[0, 7], tries=3)
    # interval 0: 2 (0.20) -> 1 (0.70); interval 1: 3 and then 4 fail, none left -> no route; 2: 6 is fine
    assert dep.slots == [0, 1, 6, 7]
    assert dep.rejected == {2: 0.20, 3: 0.25, 4: 0.24}
    assert dep.dropped_intervals == [1]
    assert sorted(x for a in asked for x in a) == [0, 1, 2, 3, 4, 6, 7]  # each slot evaluated once, 5 never

    # tries=1 gives an interval up after its first failure; tries=0 is ESTA unchecked
    one = validated_deploy(s, lambda xs: {x: acc[x] for x in xs}, floor_slot=0, always=[0, 7], tries=1)
    assert one.slots == [0, 6, 7] and one.dropped_intervals == [0, 1]
    off = validated_deploy(s, lambda xs: {x: acc[x] for x in xs}, floor_slot=0, always=[0, 7], tries=0)
    assert off.slots == [0, 2, 3, 6, 7] and off.rejected == {}
    # results measured before (eval_stitches=all) are not measured again
    pre = validated_deploy(s, lambda xs: pytest.fail(f"evaluated {xs} again"), floor_slot=0, always=[0, 7],
                           known=acc)
    assert pre.slots == dep.slots
