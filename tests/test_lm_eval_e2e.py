"""The real lm-evaluation-harness (`lm-eval run --model local-completions`, its own process) against the
live tiny-pair app: a tiny local multiple-choice task, one run pinned by X-Stitch-Id and one by an
X-Compute-Budget header. The harness's per-choice loglikelihoods must equal a direct forward of the
pinned stitch, and the server's metrics must show every request served by that stitch."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

from serving_fixtures import http, scrape, served, total  # noqa: F401 (fixtures)

pytest.importorskip("lm_eval", reason="lm-eval is an optional dependency (pip install -e '.[eval]')")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from lm_eval_common import run_lm_eval, write_task  # noqa: E402

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

CHAT = "tinychat"
ATOL = 0.06  # per token, bfloat16 server vs bfloat16 direct forward (as test_serving_logprobs)
ITEMS = [{"text": "the cat sat on the", "label": 0}, {"text": "one two three", "label": 1},
         {"text": "red green", "label": 0}]
CHOICES = ["mat", "four", "blue"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("task"), "tiny_mc", ITEMS, CHOICES, text_field="text",
                      prefix="Q:", answer="A:")


@pytest.fixture(scope="module")
def model(served):
    from stitchlib.runtime import PaletteRuntime

    return PaletteRuntime.load(served.palettes[CHAT], dtype="bfloat16")


def loglik(rt, sid: str, context: str, continuation: str) -> tuple[float, bool, int]:
    """What the harness computes, from one forward of the stitch over context + continuation."""
    tok = rt.tokenizer
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx):]
    with torch.no_grad():
        lp = torch.log_softmax(rt.model(torch.tensor([whole]), sid).float(), -1)[0]
    rows = lp[len(ctx) - 1: len(whole) - 1]
    return float(sum(rows[i, t] for i, t in enumerate(cont))), bool(all(rows[i].argmax() == t for i, t in enumerate(cont))), len(cont)


def requests_on(http, sid: str) -> float:
    return total(scrape(http.get("/metrics").text), "stitchserve_requests_total", model=CHAT, stitch=sid, status="200")


@pytest.mark.parametrize("pin", ["stitch", "budget"])
def test_lm_eval_harness_through_the_api(served, http, task, model, tmp_path, pin):
    stitches = sorted(http.get("/v1/stitches", params={"model": CHAT}).json()["data"], key=lambda s: s["gflops"])
    if pin == "stitch":
        sid = stitches[len(stitches) // 2]["id"]
        headers = {"X-Stitch-Id": sid}
    else:  # the cheapest stitch is the only one within its own GFLOPs
        sid = stitches[0]["id"]
        headers = {"X-Compute-Budget": f"{stitches[0]['gflops'] * 1e3 * 1.0001:.6f}MFLOPs",
                   "X-Budget-Policy": "strict"}
    before = requests_on(http, sid)
    out = run_lm_eval(served.base_url, CHAT, task, "tiny_mc", out_dir=tmp_path, headers=headers,
                      api_key=served.api_key, max_length=256)
    assert out["n"] == len(ITEMS)
    n_requests = len(ITEMS) * len(CHOICES)
    lo = hi = 0  # correct items by the reference; a near-tie under bfloat16 may go either way
    for s in out["samples"]:
        assert len(s["resps"]) == len(CHOICES)
        refs = []
        # the log's form: arguments {"gen_args_i": {"arg_0": context, "arg_1": continuation}}, resps
        # [[["<loglik>", "<is_greedy>"]], ...] (stringified), target "<index>"
        for args, resp in zip(s["arguments"].values(), s["resps"]):
            got_ll = float(resp[0][0])
            ref_ll, _, n_tok = loglik(model, sid, args["arg_0"], args["arg_1"])
            assert got_ll == pytest.approx(ref_ll, abs=ATOL * n_tok), (sid, args)
            refs.append((ref_ll, n_tok))
        target = int(s["target"])
        best = max(range(len(refs)), key=lambda i: refs[i][0])
        tied = any(i != best and refs[best][0] - refs[i][0] < ATOL * (refs[best][1] + refs[i][1])
                   for i in range(len(refs)))
        lo += best == target and not tied
        hi += best == target or (tied and refs[target][0] >= refs[best][0] - ATOL * 10)
    assert lo / len(ITEMS) <= out["acc"] <= hi / len(ITEMS)
    t0 = time.time()
    while requests_on(http, sid) - before < n_requests and time.time() - t0 < 20:
        time.sleep(0.5)
    assert requests_on(http, sid) - before == n_requests  # every harness request ran on the pinned stitch
