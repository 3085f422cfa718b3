"""Replica items (serving/items.py): what crosses Ray between the ingress and a palette replica."""
import pickle

import pytest
from pydantic import ValidationError

from serving.budget import parse_budget
from serving.items import (ClassifyInput, ClassifyOutput, DeltaItem, FinalItem, GenerateInput, ReplicaReady, RouteItem,
                           ServingError, generate_item)
from serving.protocol import ClassifyResult, StitchCard, UsageInfo

CARD = StitchCard(id="s1-l2", split=1, join=2, params=1234, gflops=0.5, quality=-2.5, latency_ms=3.25,
                  request_latency_ms=40.0, budget="25ms/token", budget_met=False, violated=["latency 30ms > 25ms"],
                  replica="r1")
STREAM = [
    RouteItem(stitch=CARD, prompt_tokens=7),
    DeltaItem(text="Hel"),
    DeltaItem(text="lo", logprobs=[{"token": "lo", "logprob": -0.5, "bytes": [108, 111], "top_logprobs": [],
                                    "text_offset": 3}]),
    FinalItem(finish_reason="length", usage=UsageInfo(prompt_tokens=7, completion_tokens=2, total_tokens=9)),
    ServingError(503, "generation failed: the engine is shut down", type="unavailable",
                 headers={"Retry-After": "1"}),
]


@pytest.mark.parametrize("item", STREAM, ids=lambda i: i.kind)
def test_generation_items_round_trip(item):
    """Every item survives Ray's pickling and its JSON, and reads back as its own type from the union."""
    assert pickle.loads(pickle.dumps(item)) == item
    back = generate_item.validate_json(item.model_dump_json())
    assert type(back) is type(item) and back == item
    assert generate_item.validate_python(item.model_dump()) == item


def test_error_item_is_the_one_error_type():
    """The replica's error item is the ingress's error value; its HTTP body is OpenAI's error object."""
    err = ServingError(422, "no deployed stitch meets X-Compute-Budget '1ms/token'", type="budget_not_met",
                       param="X-Compute-Budget", headers={"X-Budget-Met": "false"})
    assert err.kind == "error" and err.model == "" and err.stitch == "none"  # metric labels, set by the ingress
    assert err.body() == {"error": {"message": "no deployed stitch meets X-Compute-Budget '1ms/token'",
                                    "type": "budget_not_met", "param": "X-Compute-Budget", "code": 422}}
    labelled = err.model_copy(update={"model": "tinychat", "stitch": "s1-l2"})
    assert (labelled.model, labelled.stitch, labelled.status) == ("tinychat", "s1-l2", 422)
    assert ServingError(status=400, message="x") == ServingError(400, "x")
    with pytest.raises(ValidationError, match="less than or equal to 599"):
        ServingError(200 * 3 + 1, "not an error status")
    with pytest.raises(ValidationError, match="greater than or equal to 400"):
        ServingError(200, "not an error status")


def test_items_refuse_what_they_do_not_define():
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        DeltaItem(text="x", txt="y")
    with pytest.raises(ValidationError, match="finish_reason"):
        FinalItem(finish_reason="abort", usage=UsageInfo())
    with pytest.raises(ValidationError, match="union_tag_invalid|does not match any of the expected tags"):
        generate_item.validate_python({"kind": "classify"})


def test_inputs_carry_the_parsed_budget():
    """The ingress parses X-Compute-Budget once; the replica receives the Budget (never its text)."""
    b = parse_budget("25ms/token, 1.1B")
    gen = GenerateInput(request_id="chatcmpl-1", messages=[{"role": "user", "content": "hi"}], budget=b, strict=True,
                        max_tokens=8, stop=["\n"], logprobs=2)
    assert pickle.loads(pickle.dumps(gen)) == gen and GenerateInput.model_validate_json(gen.model_dump_json()) == gen
    assert gen.budget == b and gen.budget.params == pytest.approx(1.1e9)
    assert GenerateInput.model_validate(gen) is gen  # the replica takes the model as it comes
    with pytest.raises(ValidationError, match="exactly one of messages / prompt / prompt_ids"):
        GenerateInput(request_id="r", prompt="a", prompt_ids=[1])
    with pytest.raises(ValidationError, match="budget"):
        GenerateInput(request_id="r", prompt="a", budget="25ms")  # text is not a budget: parse it first
    cls = ClassifyInput(request_id="cls-1", texts=["a", "b"], budget=parse_budget("40%"))
    assert pickle.loads(pickle.dumps(cls)) == cls and cls.budget.fraction == pytest.approx(0.4)


def test_classify_and_ready_items():
    out = ClassifyOutput(stitch=CARD, results=[ClassifyResult(index=0, label="sport", probs={"sport": 0.9,
                                                                                            "tech": 0.1})],
                         prompt_tokens=5)
    assert ClassifyOutput.model_validate_json(out.model_dump_json()) == out
    ready = ReplicaReady(model="tinychat", ready=True, replica="r1", pid=42, inflight=0, latency_profile="measured",
                         budget_margins={"token": 1.0, "request": 1.25, "samples": 20},
                         engine={"slots": 4, "running": 0, "waiting": 0})
    body = ready.model_dump(mode="json", exclude_unset=True)
    assert body["budget_margins"] == {"token": 1.0, "request": 1.25, "samples": 20}
    assert isinstance(body["budget_margins"]["samples"], int)
    # a replica that did not answer: only what the ingress knows
    assert ReplicaReady(model="m", ready=False, error="TimeoutError: ").model_dump(mode="json", exclude_unset=True) == {
        "model": "m", "ready": False, "error": "TimeoutError: "}
