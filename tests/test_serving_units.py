"""Serving pieces without Ray: protocol models, incremental detokenizer with stop strings, metrics relay."""
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from serving.api_serving import OpenAIServing, ServingError
from serving.budget import GRAMMAR, parse_budget
from serving.items import GenerateInput
from serving.replica import IncrementalDetokenizer
from serving.metrics import build_buckets, relay_families, render_families
from serving.protocol import ChatCompletionRequest, ClassifyRequest, CompletionRequest


# ---- protocol ------------------------------------------------------------------------------------------
def test_chat_request_accepts_openai_shapes():
    r = ChatCompletionRequest.model_validate({
        "model": "m", "messages": [{"role": "system", "content": "be brief"},
                                   {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                {"type": "text", "text": "b"}]}],
        "max_completion_tokens": 5, "stop": "x", "stream_options": {"include_usage": True},
        "frequency_penalty": 0, "logit_bias": {}})  # unknown fields are ignored, as OpenAI SDKs send them
    assert r.messages[1].text() == "ab" and r.requested_max_tokens() == 5 and r.stop == ["x"]


@pytest.mark.parametrize("patch, needle", [
    ({"n": 2}, "less than or equal to 1"), ({"stop": ["a", "b", "c", "d", "e"]}, "at most 4"), ({"stop": [""]}, "empty"),
    ({"temperature": -1}, "greater than or equal"), ({"top_p": 0}, "greater than"), ({"messages": []}, "at least 1"),
    ({"max_tokens": 0}, "greater than or equal"), ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
])
def test_chat_request_rejects(patch, needle):
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], **patch}
    with pytest.raises(ValidationError, match=needle):
        ChatCompletionRequest.model_validate(body)


def test_unsupported_fields_named_before_validation():
    """The ingress asks `unsupported()` first, so one 400 names every field we do not implement; the
    pydantic constraints say the same in the schema (only the neutral value validates)."""
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 3, "tools": [{"type": "function"}],
            "response_format": {"type": "json_schema"}, "tool_choice": "auto", "audio": {"voice": "x"}}
    msg, first = ChatCompletionRequest.unsupported(body)
    assert first == "n" and all(f in msg for f in ("n (", "tools", "response_format", "tool_choice", "audio"))
    neutral = {**body, "n": 1, "tools": [], "response_format": {"type": "text"}, "tool_choice": "none", "audio": None}
    assert ChatCompletionRequest.unsupported(neutral) is None
    ChatCompletionRequest.model_validate(neutral)
    assert CompletionRequest.unsupported({"best_of": 2, "suffix": "x"})[1] == "best_of"
    assert CompletionRequest(model="m", prompt=[[1, 2]]).prompt == [1, 2]
    assert CompletionRequest(model="m", prompt=[3, 4]).prompt == [3, 4]


def test_completion_and_classify_requests():
    assert CompletionRequest(model="m", prompt=["one"]).prompt == "one"
    with pytest.raises(ValidationError, match="one prompt"):
        CompletionRequest(model="m", prompt=["a", "b"])
    assert ClassifyRequest(input="x").input == ["x"]
    with pytest.raises(ValidationError, match="empty"):
        ClassifyRequest(input=["a", ""])
    with pytest.raises(ValidationError, match="exactly one"):
        GenerateInput(request_id="r")


def test_parse_body_errors_are_values():
    assert OpenAIServing.parse_body(b"{", ChatCompletionRequest).message.startswith("malformed JSON")
    err = OpenAIServing.parse_body(b'{"model": "m"}', ChatCompletionRequest)
    assert isinstance(err, ServingError) and err.status == 400 and "messages" in err.message


def test_budget_headers_are_checked_at_the_ingress():
    parse = OpenAIServing.parse_budget_headers
    # parsed here, once: the replica gets the Budget and never parses it again
    assert parse({"x-compute-budget": "25ms, 1B"}, None) == (parse_budget("25ms, 1B"), False)
    assert parse({"x-budget-policy": "Strict"}, "40%") == (parse_budget("40%"), True)  # body extension when no header
    assert parse({"x-compute-budget": "40%"}, "1B") == (parse_budget("40%"), False)  # the header wins
    assert parse({}, None) == (None, False)
    assert parse({"x-compute-budget": "  "}, None) == (None, False)  # blank: the palette's default
    err = parse({"x-compute-budget": "soon"}, None)
    assert isinstance(err, ServingError) and err.status == 400 and GRAMMAR in err.message
    assert parse({"x-budget-policy": "lenient"}, None).status == 400


# ---- detokenizer -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    from stitchlib.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer()


def run(tok, text: str, stops: list[str]) -> tuple[list[str], bool]:
    d = IncrementalDetokenizer(lambda ids: tok.decode(ids, skip_special_tokens=True), stops)
    deltas = []
    for t in tok(text, add_special_tokens=False)["input_ids"]:
        deltas.append(d.push(t))
        if d.stopped:
            break
    deltas.append(d.flush())
    return [x for x in deltas if x], d.stopped


def test_detokenizer_streams_everything_without_stops(tok):
    deltas, stopped = run(tok, "héllo wörld ✓", [])
    assert "".join(deltas) == "héllo wörld ✓" and not stopped
    assert all("\ufffd" not in x for x in deltas)  # multi-byte characters are never split


def test_detokenizer_cuts_at_the_first_stop_across_tokens(tok):
    deltas, stopped = run(tok, "one two. three", [". t", "zzz"])
    assert "".join(deltas) == "one two" and stopped
    # nothing that could still become a stop string is emitted early
    deltas, _ = run(tok, "abcab", ["abx"])
    assert "".join(deltas) == "abcab"


def test_detokenizer_stop_at_start(tok):
    deltas, stopped = run(tok, "STOP here", ["STOP"])
    assert deltas == [] and stopped


# ---- metrics -----------------------------------------------------------------------------------------
RAY_TEXT = """# HELP ray_stitchserve_requests_total HTTP responses by status code.
# TYPE ray_stitchserve_requests_total counter
ray_stitchserve_requests_total{{Component="core_worker",NodeAddress="{node}",SessionName="s",Version="2.60.0",WorkerId="w{node}",application="stitchserve",deployment="StitchServeIngress",model="m",replica="r{node}",status="200",stitch="large"}} 3.0
# HELP ray_stitchserve_time_to_first_token_seconds Time to first token.
# TYPE ray_stitchserve_time_to_first_token_seconds histogram
ray_stitchserve_time_to_first_token_seconds_bucket{{NodeAddress="{node}",le="0.1",model="m",stitch="large"}} 1.0
ray_stitchserve_time_to_first_token_seconds_bucket{{NodeAddress="{node}",le="+Inf",model="m",stitch="large"}} 2.0
ray_stitchserve_time_to_first_token_seconds_count{{NodeAddress="{node}",model="m",stitch="large"}} 2.0
ray_stitchserve_time_to_first_token_seconds_sum{{NodeAddress="{node}",model="m",stitch="large"}} 0.3
# HELP ray_serve_num_http_requests_total Ray's own.
# TYPE ray_serve_num_http_requests_total counter
ray_serve_num_http_requests_total{{route="/"}} 9.0
"""


def test_relay_renames_filters_and_merges_nodes():
    fams = relay_families([RAY_TEXT.format(node="10.0.0.1"), RAY_TEXT.format(node="10.0.0.2")])
    assert sorted(f.name for f in fams) == ["stitchserve_requests", "stitchserve_time_to_first_token_seconds"]
    text = render_families(fams).decode()
    parsed = {f.name: f for f in text_string_to_metric_families(text)}
    assert set(parsed) == {"stitchserve_requests", "stitchserve_time_to_first_token_seconds"}
    req = parsed["stitchserve_requests"]
    assert req.type == "counter" and len(req.samples) == 2
    assert sum(s.value for s in req.samples) == 6.0
    assert all(set(s.labels) == {"NodeAddress", "application", "deployment", "model", "replica", "status", "stitch"}
               for s in req.samples)
    ttft = parsed["stitchserve_time_to_first_token_seconds"]
    assert ttft.type == "histogram"
    assert sum(s.value for s in ttft.samples if s.name.endswith("_count")) == 4.0
    assert "ray_" not in text


def test_buckets_are_1_2_5_in_seconds():
    b = build_buckets(lo_exp=-3, hi_exp=0)
    assert b == [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0]


# ---- load generator bounds -----------------------------------------------------------------------------
def test_loadgen_is_loopback_only_and_bounded():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import loadgen

    loadgen.check_loopback("http://127.0.0.1:8000")
    loadgen.check_loopback("http://localhost:8000")
    for url in ["http://10.0.0.5:8000", "https://example.com"]:
        with pytest.raises(SystemExit, match="loopback only"):
            loadgen.check_loopback(url)
    assert [(p.concurrency, p.seconds) for p in loadgen.parse_phases("1:10, 8:45,0:5")] == [(1, 10), (8, 45), (0, 5)]
    for bad in ["8", "x:1", "1000:5", "2:0"]:
        with pytest.raises(SystemExit):
            loadgen.parse_phases(bad)
    with pytest.raises(SystemExit, match="bounds"):
        loadgen.main(["--max-requests", str(loadgen.HARD_MAX_REQUESTS + 1)])
    run = loadgen.Run("http://127.0.0.1:1", "m", "Palette-m", [loadgen.Phase(1, 10), loadgen.Phase(4, 10),
                                                               loadgen.Phase(0, 10)])
    run.samples = [loadgen.Sample(t, 0, 0, running, starting) for t, running, starting in
                   [(0, 1, 0), (12, 1, 1), (15, 2, 0), (21, 2, 0), (25, 1, 0)]]
    run.requests = [loadgen.RequestRecord(1, 0.5, 200, 0), loadgen.RequestRecord(11, 1.5, 200, 1),
                    loadgen.RequestRecord(12, 0.1, 503, 1)]
    s = loadgen.summarize(run)
    assert (s["replicas_start"], s["replicas_peak"], s["replicas_end"]) == (1, 2, 1)
    assert s["scale_up_decided_after_load_s"] == 2 and s["scale_up_after_load_s"] == 5
    assert s["scale_down_after_load_s"] == 5
    assert s["phases"][1]["ok"] == 1 and s["phases"][1]["errors"] == 1
