"""Shared fixtures: the tiny synthetic pair (fresh per test: StitchedLM injects PST into the anchors'
layers in place, so two models must never share one anchor object)."""
from __future__ import annotations

import os

import pytest
import torch

# Keep the two CI cores for the test process itself; tests must not depend on thread counts.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def tiny_pair():
    from stitchlib.anchors import load_anchor

    def make(dtype: str = "float32"):
        return load_anchor("tiny-small", dtype=dtype), load_anchor("tiny-large", dtype=dtype)

    return make


@pytest.fixture
def tiny_model(tiny_pair):
    from stitchlib.model import StitchedLM

    def make(dtype: str = "float32", **kw):
        torch.manual_seed(0)
        return StitchedLM(*tiny_pair(dtype), **kw)

    return make


def randomize_pst(model, scale=0.05, seed=1):
    """Non-zero shared LoRA, stitching LoRA and stitch-specific biases (every trainable tensor, seeded):
    every route then differs, so a test cannot pass by comparing identical paths."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny shapes are overhead-bound: one intra-op thread avoids OpenMP spin-waiting on a shared
    2-core machine (7x faster here). Results do not depend on it. Use with
    `pytestmark = pytest.mark.usefixtures("one_thread")` or `@pytest.fixture(autouse=True)` wrappers."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Never let a test write into the user's real cache."""
    if "STITCHSERVE_HOME" not in os.environ or os.environ.get("STITCHSERVE_TEST_KEEP_HOME") != "1":
        monkeypatch.setenv("STITCHSERVE_HOME", str(tmp_path_factory.getbasetemp() / "stitchserve-home"))
