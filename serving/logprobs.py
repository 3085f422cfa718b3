"""Logprobs in OpenAI's shapes, from the engine's `stitchlib.sampling.TokenLogprob` values.

The replica turns each scored token into a plain `entry` dict (token text, bytes, logprob, the top
alternatives, its character offset in the choice's text) that crosses Ray; the ingress turns lists of
entries into the chat shape (`choices[].logprobs.content`) or the legacy completions shape (`tokens`,
`token_logprobs`, `top_logprobs`, `text_offset`), for whole responses and stream chunks alike.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any

from .protocol import ChatCompletionTokenLogprob, ChoiceLogprobs, CompletionLogprobs, TopLogprob


@lru_cache(maxsize=1)
def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet (used by Qwen, LLaMA-3, the tiny pair): printable char -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes_fn(tokenizer: Any) -> Callable[[int], bytes]:
    """id -> the token's own bytes. Byte-level BPE pieces map back through the byte alphabet (a token
    may be part of a UTF-8 character); other pieces (special tokens, SentencePiece) via decode."""
    table = _byte_level_table()
    memo: dict[int, bytes] = {}

    def token_bytes(tid: int) -> bytes:
        b = memo.get(tid)
        if b is None:
            piece = tokenizer.convert_ids_to_tokens(int(tid))
            if isinstance(piece, str) and piece and all(ch in table for ch in piece) \
                    and int(tid) not in tokenizer.all_special_ids:
                b = bytes(table[ch] for ch in piece)
            else:
                b = tokenizer.decode([int(tid)]).encode()
            memo[tid] = b
        return b

    return token_bytes


def token_text(b: bytes) -> str:
    """OpenAI's `token`: the text, or 'bytes:\\xNN...' when the bytes are not whole UTF-8."""
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{x:02x}" for x in b)


def make_entry(token_bytes: Callable[[int], bytes], lp: Any | None, tid: int, offset: int) -> dict[str, Any]:
    """One token of a choice's text as it crosses to the ingress. `lp` is its TokenLogprob, None for a
    token without one (the first prompt token)."""
    b = token_bytes(tid)
    top = None
    if lp is not None:
        top = [[token_text(token_bytes(t)), v, list(token_bytes(t))] for t, v in lp.top]
    return {"token": token_text(b), "bytes": list(b), "logprob": None if lp is None else lp.logprob, "top": top,
            "offset": offset}


def chat_logprobs(entries: list[dict[str, Any]]) -> ChoiceLogprobs:
    return ChoiceLogprobs(content=[
        ChatCompletionTokenLogprob(token=e["token"], logprob=e["logprob"], bytes=e["bytes"],
                                   top_logprobs=[TopLogprob(token=t, logprob=v, bytes=b) for t, v, b in e["top"] or []])
        for e in entries])


def completion_logprobs(entries: list[dict[str, Any]]) -> CompletionLogprobs:
    """Legacy shape: `top_logprobs` is one {token: logprob} dict per token (None for the first prompt
    token); two alternatives with the same text keep the likelier one, as a dict must."""
    tops = []
    for e in entries:
        if e["top"] is None:
            tops.append(None)
            continue
        d: dict[str, float] = {}
        for t, v, _ in e["top"]:
            d.setdefault(t, v)
        tops.append(d)
    return CompletionLogprobs(tokens=[e["token"] for e in entries], token_logprobs=[e["logprob"] for e in entries],
                              top_logprobs=tops, text_offset=[e["offset"] for e in entries])
