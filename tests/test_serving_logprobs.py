"""Logprobs, echo, token-id prompts, the X-Stitch-Id override, unsupported fields and the tokenizer
endpoints, over real local Ray Serve and real HTTP (the shared tiny-pair app of serving_fixtures).

Logprobs are checked against a direct forward of the stitched model: the same palette loaded in this
process in the serving dtype (bfloat16), `StitchedLM.forward` on the whole sequence, log-softmax."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from serving_fixtures import API_KEY, http, served  # noqa: F401 (fixtures)

from stitchlib.prompts import encode_prompt

pytestmark = pytest.mark.timeout(300)

CHAT = "tinychat"
# bfloat16 engine (static cache, batched, other kernels) vs one bfloat16 forward: logits carry ~3
# significant digits, so log-probabilities of a few nats agree to a few hundredths.
ATOL = 0.06


@pytest.fixture(scope="module")
def rt(served):
    from stitchlib.runtime import PaletteRuntime

    torch.set_num_threads(1)
    return PaletteRuntime.load(served.palettes[CHAT], dtype="bfloat16")


@pytest.fixture(scope="module")
def ids_of_bytes(rt):
    """token bytes -> id over the whole vocabulary (the tiny tokenizer is byte-level: one id per bytes)."""
    from serving.logprobs import token_bytes_fn

    tb = token_bytes_fn(rt.tokenizer)
    out = {}
    for i in range(len(rt.tokenizer)):
        out.setdefault(tb(i), i)
    return out


def reference(rt, ids: list[int], sid: str) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(rt.model(torch.tensor([ids]), sid).float(), -1)[0]  # [T, V]


def stitch_ids(http) -> list[str]:
    return [s["id"] for s in http.get("/v1/stitches", params={"model": CHAT}).json()["data"]]


PROMPT_IDS = [72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100]  # byte-level "Hello, world"


def check_top(top: dict[str, float] | list, row: torch.Tensor, k: int) -> None:
    """The reported alternatives: k of them, values as the reference gives them, most likely first."""
    vals = list(top.values()) if isinstance(top, dict) else [t["logprob"] for t in top]
    assert len(vals) == k and vals == sorted(vals, reverse=True)
    assert vals == pytest.approx(row.topk(k).values.tolist(), abs=ATOL)


def completion_echo(http, sid: str, max_tokens=4, temperature=0.0, k=2) -> httpx.Response:
    body = {"model": CHAT, "prompt": [PROMPT_IDS], "max_tokens": max_tokens, "temperature": temperature,
            "seed": 5, "logprobs": k, "echo": True}
    return http.post("/v1/completions", json=body, headers={"X-Stitch-Id": sid})


def test_completion_echo_logprobs_every_stitch_concurrently(http, rt, ids_of_bytes):
    """lm-evaluation-harness's request (token-id prompt, echo, logprobs) on every stitch at once, so the
    replica's engine decodes them in mixed-stitch steps; each matches a direct forward of its stitch."""
    sids = stitch_ids(http)
    before = http.get("/ready").json()["models"][0]["engine"]
    with ThreadPoolExecutor(4) as pool:  # the replica admits 6 in flight (serving_fixtures), 4 per engine step
        resps = list(pool.map(lambda a: completion_echo(http, *a), [(s, 6, t) for s in sids for t in (0.0, 1.0)]))
    after = http.get("/ready").json()["models"][0]["engine"]
    prompt_text = rt.tokenizer.decode(PROMPT_IDS)
    for (sid, temp), r in zip([(s, t) for s in sids for t in (0.0, 1.0)], resps):
        assert r.status_code == 200, r.text
        assert r.headers["x-stitch-id"] == sid and r.json()["stitch"]["id"] == sid
        body = r.json()
        choice, usage = body["choices"][0], body["usage"]
        lp = choice["logprobs"]
        n_out = usage["completion_tokens"]
        assert usage["prompt_tokens"] == len(PROMPT_IDS)
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(PROMPT_IDS) + n_out
        assert choice["text"].startswith(prompt_text)
        out_ids = [ids_of_bytes[bytes(t, "utf-8")] if not t.startswith("bytes:") else
                   ids_of_bytes[bytes.fromhex(t[6:].replace("\\x", ""))] for t in lp["tokens"][len(PROMPT_IDS):]]
        ref = reference(rt, PROMPT_IDS + out_ids, sid)
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        for j in range(1, len(PROMPT_IDS) + n_out):
            tok = (PROMPT_IDS + out_ids)[j]
            assert lp["token_logprobs"][j] == pytest.approx(ref[j - 1, tok].item(), abs=ATOL), (sid, j)
            check_top(lp["top_logprobs"][j], ref[j - 1], 2)
            if temp == 0 and j >= len(PROMPT_IDS):  # greedy output: the token is its own top-1, exactly
                assert max(lp["top_logprobs"][j].values()) == lp["token_logprobs"][j]
        text = choice["text"]  # offsets point at each token's text
        for tok, off in zip(lp["tokens"], lp["text_offset"]):
            if not tok.startswith("bytes:") and tok not in ("<|im_end|>", "<|endoftext|>"):
                assert text[off:off + len(tok)] == tok
    assert after["steps"] > before["steps"]
    assert after["mixed_steps"] > before["mixed_steps"]  # the stitches shared engine steps


def test_completion_logprobs_stream_equals_plain(http):
    sid = stitch_ids(http)[1]
    body = {"model": CHAT, "prompt": "The cat", "max_tokens": 8, "temperature": 0, "logprobs": 1}
    plain = http.post("/v1/completions", json=body, headers={"X-Stitch-Id": sid}).json()["choices"][0]
    chunks = []
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}, headers={"X-Stitch-Id": sid}) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    got = [c["choices"][0]["logprobs"] for c in chunks if c["choices"] and c["choices"][0].get("logprobs")]
    merged = {k: sum((g[k] for g in got), []) for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    assert merged == plain["logprobs"]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == plain["text"]
    assert len(plain["logprobs"]["tokens"]) == 8 or plain["finish_reason"] == "stop"


def test_chat_logprobs_sdk_plain_and_stream(served, http, rt, ids_of_bytes):
    client = openai.OpenAI(base_url=served.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    sid = stitch_ids(http)[-2]
    msgs = [{"role": "user", "content": "Say hi."}]
    kw = dict(model=CHAT, messages=msgs, max_tokens=8, temperature=0.7, seed=11, logprobs=True, top_logprobs=3,
              extra_headers={"X-Stitch-Id": sid})
    c = client.chat.completions.create(**kw)
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens
    prompt = rt.tokenizer(rt.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False),
                          add_special_tokens=False)["input_ids"]
    out_ids = [ids_of_bytes[bytes(t.bytes)] for t in content]
    ref = reference(rt, prompt + out_ids, sid)
    for j, t in enumerate(content):
        row = ref[len(prompt) - 1 + j]
        assert t.logprob == pytest.approx(row[out_ids[j]].item(), abs=ATOL)
        check_top([x.model_dump() for x in t.top_logprobs], row, 3)
        assert all(x.bytes == list(x.token.encode()) for x in t.top_logprobs if not x.token.startswith("bytes:"))
    stream = client.chat.completions.create(stream=True, **kw)
    streamed = [t for ch in stream if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]  # same seed
    # without logprobs: null, as before
    assert client.chat.completions.create(model=CHAT, messages=msgs, max_tokens=2).choices[0].logprobs is None


def test_unsupported_fields_are_refused_by_name(http):
    chat = {"model": CHAT, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    r = http.post("/v1/chat/completions", json={**chat, "tools": [{"type": "function", "function": {"name": "f"}}],
                                                 "response_format": {"type": "json_object"}, "n": 2,
                                                 "logit_bias": {"5": 1.0}, "presence_penalty": 0.5})
    assert r.status_code == 400
    err = r.json()["error"]
    for name in ("tools", "response_format", "n ", "logit_bias", "presence_penalty"):
        assert name in err["message"], name
    assert err["param"] == "n" and err["type"] == "invalid_request_error"
    r = http.post("/v1/completions", json={"model": CHAT, "prompt": "a", "best_of": 3, "suffix": "z"})
    assert r.status_code == 400 and "best_of" in r.text and "suffix" in r.text
    # the neutral values of those fields are what we do: accepted
    ok = http.post("/v1/chat/completions", json={**chat, "n": 1, "tools": [], "tool_choice": "none",
                                                  "response_format": {"type": "text"}, "presence_penalty": 0,
                                                  "frequency_penalty": 0.0, "logit_bias": {}})
    assert ok.status_code == 200, ok.text
    r = http.post("/v1/chat/completions", json={**chat, "logprobs": True, "top_logprobs": 21})
    assert r.status_code == 400 and "top_logprobs" in r.json()["error"]["message"]


def test_stitch_override_header(http):
    sids = stitch_ids(http)
    chat = {"model": CHAT, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    r = http.post("/v1/chat/completions", json=chat, headers={"X-Stitch-Id": "s99-l99"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "X-Stitch-Id"
    assert all(s in r.json()["error"]["message"] for s in sids)
    # pinned to the largest stitch under a budget it breaks: served and said so, or 422 when strict
    r = http.post("/v1/chat/completions", json=chat, headers={"X-Stitch-Id": sids[-1], "X-Compute-Budget": "1k"})
    assert r.status_code == 200 and r.headers["x-stitch-id"] == sids[-1] and r.headers["x-budget-met"] == "false"
    r = http.post("/v1/chat/completions", json=chat, headers={"X-Stitch-Id": sids[-1], "X-Compute-Budget": "1k",
                                                              "X-Budget-Policy": "strict"})
    assert r.status_code == 422
    cls = http.post("/v1/classify", json={"input": "a goal"}, headers={"X-Stitch-Id": "small"})
    assert cls.status_code == 200 and cls.headers["x-stitch-id"] == "small"


def test_tokenizer_endpoints(http, rt):
    text = "Hello, wörld"
    r = http.post("/tokenize", json={"prompt": text})
    assert r.status_code == 200
    want = rt.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert r.json()["tokens"] == want and r.json()["count"] == len(want) and r.json()["max_model_len"] > 0
    assert http.post("/detokenize", json={"tokens": want}).json() == {"prompt": text}
    info = http.get("/tokenizer_info").json()
    assert info["eos_token"] == "<|im_end|>" and info["model"] == CHAT and "im_start" in info["chat_template"]
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"] == rt.tokenizer(rt.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False),
        add_special_tokens=False)["input_ids"]
    # the palette's recorded prompt format is what training encodes (stitchlib.prompts.encode_prompt)
    assert rt.manifest.prompt_format.template == "chat"
    assert chat["tokens"] == encode_prompt(rt.tokenizer, "hi")
    assert http.post("/detokenize", json={"tokens": [10 ** 9]}).status_code == 400
    assert http.post("/tokenize", json={"prompt": "a", "messages": [{"role": "user", "content": "b"}]}).status_code == 400
    lone = b'{"prompt": "a\\ud800b"}'  # a lone surrogate: valid JSON, not text a tokenizer takes -> 400, not 500
    for path, body in [("/tokenize", lone), ("/v1/classify", b'{"input": "a\\ud800"}'),
                       ("/v1/completions", b'{"model": "tinychat", "prompt": "a\\ud800", "max_tokens": 1}')]:
        r = http.post(path, content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and "cannot" in r.json()["error"]["message"], (path, r.text)
    bad = http.post("/v1/completions", json={"model": CHAT, "prompt": [1, 10 ** 9], "max_tokens": 1})
    assert bad.status_code == 400 and "token ids" in bad.json()["error"]["message"]
