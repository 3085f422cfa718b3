"""The prompt format of a palette: how chat and classify examples become token ids, and batches.

What a palette was fitted or trained with, and so what serving must render requests with: the
training side (`training/`) encodes its data through these functions, serving renders chat
requests with :func:`render_messages` in the format the palette's manifest records
(:func:`prompt_template`), and quality measurement and calibration batch with :func:`batched`.

* **chat** -- :class:`ChatExample` ``(instruction, input, output)``, formatted with the tokenizer's
  chat template when it has one (else the Alpaca prompt); the labels cover the response and its
  end-of-turn token only.
* **classify** -- :class:`ClassifyExample` ``(text, label)``; the tokenizer's own special tokens kept.

Reading data files, the built-in sets and splits live in ``training.datasets``.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from stitchlib.errors import DataError

log = logging.getLogger(__name__)

__all__ = [
    "IGNORE_INDEX", "ALPACA_PROMPT", "ALPACA_PROMPT_WITH_INPUT", "ChatExample", "ClassifyExample",
    "EncodedDataset", "user_message", "uses_chat_template", "prompt_template", "render_prompt",
    "render_messages", "encode_prompt", "encode_chat", "encode_classify", "pad_token_id", "collate", "batched",
]

IGNORE_INDEX = -100  # label value the cross-entropy loss skips (prompt and padding)


# --------------------------------------------------------------------------------------------------
# Examples
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatExample:
    """One instruction-following example (Alpaca fields). ``input`` is "" when absent."""

    instruction: str
    input: str
    output: str


@dataclass(frozen=True)
class ClassifyExample:
    """One text-classification example; ``label`` is the class name, not its index."""

    text: str
    label: str


# --------------------------------------------------------------------------------------------------
# Tokenising
# --------------------------------------------------------------------------------------------------

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


class EncodedDataset(list):
    """A list of encoded records (dicts of int lists) plus what encoding had to do to fit them."""

    def __init__(self, records: Sequence[dict] = (), *, n_truncated: int = 0, n_dropped: int = 0):
        super().__init__(records)
        self.n_truncated = n_truncated  # records shortened to max_len
        self.n_dropped = n_dropped      # examples with no room left for a response (chat only)


def user_message(example: ChatExample) -> str:
    """The user turn of a chat example: the instruction, then the input after a blank line."""
    return f"{example.instruction}\n\n{example.input}" if example.input else example.instruction


def uses_chat_template(tokenizer: Any, template: Literal["auto", "chat", "alpaca"] = "auto") -> bool:
    """Whether chat examples are formatted with the tokenizer's chat template (else Alpaca)."""
    if template not in ("auto", "chat", "alpaca"):
        raise ValueError(f"template must be 'auto', 'chat' or 'alpaca', got {template!r}")
    if template == "alpaca":
        return False
    has = bool(getattr(tokenizer, "chat_template", None))
    if template == "chat" and not has:
        raise ValueError("template='chat' but the tokenizer has no chat_template")
    return has


def render_prompt(tokenizer: Any, instruction: str, input: str = "", *,
                  template: Literal["auto", "chat", "alpaca"] = "auto",
                  system_prompt: str | None = None) -> str:
    """The prompt text the model is trained on (and must be served with): chat template with the
    generation prompt when the tokenizer has one, else the Alpaca template."""
    ex = ChatExample(instruction, input, "")
    if uses_chat_template(tokenizer, template):
        return tokenizer.apply_chat_template(_messages(ex, system_prompt), tokenize=False,
                                             add_generation_prompt=True)
    return _alpaca_prompt(ex)


def encode_prompt(tokenizer: Any, instruction: str, input: str = "", *,
                  template: Literal["auto", "chat", "alpaca"] = "auto",
                  system_prompt: str | None = None) -> list[int]:
    """Prompt token ids for generation, identical to the prompt part of :func:`encode_chat`."""
    text = render_prompt(tokenizer, instruction, input, template=template, system_prompt=system_prompt)
    lead = [] if uses_chat_template(tokenizer, template) else _leading_ids(tokenizer)
    return lead + list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_template(tokenizer: Any, template: Literal["auto", "chat", "alpaca"] = "auto") -> Literal["chat", "alpaca"]:
    """The template `encode_chat` / `render_prompt` resolve `template` to: what a palette records in its
    manifest (`PaletteManifest.prompt_format`) so that serving renders prompts exactly as it was trained."""
    return "chat" if uses_chat_template(tokenizer, template) else "alpaca"


def render_messages(tokenizer: Any, messages: Sequence[Mapping[str, str]], *,
                    template: Literal["chat", "alpaca"] = "chat", system_prompt: str | None = None,
                    add_generation_prompt: bool = True) -> str:
    """Serving's prompt for OpenAI-style `messages`, in the format the palette was trained with, so that
    one user turn renders to exactly the text (and, encoded without special tokens, the ids) of
    :func:`encode_prompt` for the same instruction.

    chat: the tokenizer's chat template; the palette's `system_prompt` is put first unless the client sent
    its own system message. alpaca: one user turn (after an optional system message, which the Alpaca
    preamble replaces) becomes the Alpaca prompt, preceded by the tokenizer's leading special tokens
    (BOS) as text; anything else raises ValueError (Alpaca has no multi-turn form)."""
    msgs = [dict(m) for m in messages]
    if template == "chat":
        if system_prompt is not None and not any(m.get("role") == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": system_prompt})
        return tokenizer.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, tokenize=False)
    if template != "alpaca":
        raise ValueError(f"template must be 'chat' or 'alpaca', got {template!r}")
    turns = [m for m in msgs if m.get("role") != "system"]
    if len(turns) != 1 or turns[0].get("role") != "user" or not add_generation_prompt:
        raise ValueError("this palette was trained on single-turn Alpaca prompts: send one user message "
                         "(optionally after a system message)")
    lead = tokenizer.decode(_leading_ids(tokenizer))
    return lead + _alpaca_prompt(ChatExample(str(turns[0].get("content", "")), "", ""))


def _alpaca_prompt(ex: ChatExample) -> str:
    if ex.input:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=ex.instruction, input=ex.input)
    return ALPACA_PROMPT.format(instruction=ex.instruction)


def _messages(ex: ChatExample, system_prompt: str | None) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    return msgs + [{"role": "user", "content": user_message(ex)}]


def _special_ids(tokenizer: Any) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for tid, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            ids.add(int(tid))
    return ids


def _tokenize(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    out: list[list[int]] = []
    for i in range(0, len(texts), 1024):
        chunk = texts[i:i + 1024]
        out.extend(tokenizer(chunk, add_special_tokens=False)["input_ids"] if chunk else [])
    return [list(ids) for ids in out]


def _leading_ids(tokenizer: Any) -> list[int]:
    """Ids the tokenizer puts before a text on its own (a BOS for Llama-style tokenizers)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return list(full[:start])
    return []


@dataclass(frozen=True)
class _Rendered:
    prompt: str       # everything before the response
    content_end: int  # character offset in prompt where the user content ends (-1: unknown)
    body: str         # response text the model must produce, without the end-of-turn token
    tail: str         # template text after the body; the response ends at its first special token
    fallback: bool = False  # the template's assistant turn could not be located: body + EOS


def _render(ex: ChatExample, tokenizer: Any, chat: bool, system_prompt: str | None) -> _Rendered:
    if not chat:
        prompt = _alpaca_prompt(ex)
        last = ex.input or ex.instruction
        return _Rendered(prompt, prompt.rfind(last) + len(last), ex.output, "")
    msgs = _messages(ex, system_prompt)
    prompt = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": ex.output}],
                                         tokenize=False)
    user = user_message(ex).strip()
    pos = prompt.rfind(user)
    content_end = pos + len(user) if pos >= 0 else -1
    if full.startswith(prompt):
        suffix = full[len(prompt):]
        # Templates may trim the content or put text before it (e.g. an empty think block): the body
        # runs from the generation prompt to the end of the output, the tail is what follows.
        out = ex.output.strip()
        at = suffix.find(out)
        if at >= 0:
            return _Rendered(prompt, content_end, suffix[:at + len(out)], suffix[at + len(out):])
    return _Rendered(prompt, content_end, ex.output, "", fallback=True)


def _prompt_tail_len(tokenizer: Any, prompt: str, content_end: int, n_ids: int) -> int:
    """How many trailing prompt tokens follow the user content (the assistant header): they are kept
    when a long prompt is cut. 0 when unknown (slow tokenizer or content not found)."""
    if content_end < 0 or not getattr(tokenizer, "is_fast", False):
        return 0
    enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    if len(offsets) != n_ids:
        return 0
    for i, (start, _end) in enumerate(offsets):
        if start >= content_end:
            return n_ids - i
    return 0


def encode_chat(examples: Sequence[ChatExample], tokenizer: Any, max_len: int, *,
                template: Literal["auto", "chat", "alpaca"] = "auto",
                system_prompt: str | None = None,
                min_response_tokens: int | None = None) -> EncodedDataset:
    """Tokenise chat examples into ``{"input_ids", "labels"}`` records (lists of ints, same length).

    ``labels`` equals ``input_ids`` on the response (and its end-of-turn token: the template's first
    special token after the output, else EOS) and ``-100`` on the prompt; the model shifts them (HF
    convention). Prompt and response are tokenised separately, so the prompt ids are exactly what
    :func:`render_prompt` gives at inference.

    Longer than ``max_len``: keep the whole prompt and cut the response tail when at least
    ``min_response_tokens`` (default ``max_len // 4``) response tokens fit; otherwise keep that many
    response tokens and cut the prompt's middle (its head and the assistant header after the user
    content stay). Examples left with no prompt content are dropped and counted (``n_dropped``).
    """
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2, got {max_len}")
    chat = uses_chat_template(tokenizer, template)
    eos = tokenizer.eos_token_id
    special = _special_ids(tokenizer)
    min_resp = max(1, max_len // 4) if min_response_tokens is None else max(1, min_response_tokens)

    rendered = [_render(ex, tokenizer, chat, system_prompt) for ex in examples]
    prompts = _tokenize(tokenizer, [r.prompt for r in rendered])
    bodies = _tokenize(tokenizer, [r.body for r in rendered])
    tails = _tokenize(tokenizer, [r.tail for r in rendered])
    lead = [] if chat else _leading_ids(tokenizer)  # chat templates write their own BOS

    records, n_truncated, n_dropped = [], 0, 0
    for r, p, body, tail in zip(rendered, prompts, bodies, tails):
        p = lead + p
        end = next((i for i, t in enumerate(tail) if t in special), None)
        if end is not None:
            resp = body + tail[:end + 1]
        elif eos is not None:
            resp = body + tail + [eos]
        else:
            raise ValueError("the tokenizer has no EOS token and its template no end-of-turn token")
        if len(p) + len(resp) > max_len:
            n_truncated += 1
            r_keep = min(len(resp), max(min_resp, max_len - len(p)))
            p_budget = max_len - r_keep
            if len(p) > p_budget:
                tail_len = _prompt_tail_len(tokenizer, r.prompt, r.content_end, len(p) - len(lead))
                head_len = p_budget - tail_len
                if head_len < 1:
                    n_dropped += 1
                    continue
                p = p[:head_len] + (p[len(p) - tail_len:] if tail_len else [])
            resp = resp[:r_keep]
        records.append({"input_ids": p + resp, "labels": [IGNORE_INDEX] * len(p) + resp})
    if fallbacks := sum(r.fallback for r in rendered):
        log.warning("encode_chat: for %d examples the chat template did not render the assistant "
                    "turn as prompt + output; used prompt + output + EOS", fallbacks)
    if n_dropped:
        log.warning("encode_chat: dropped %d of %d examples with no room left for a response at "
                    "max_len=%d", n_dropped, len(examples), max_len)
    return EncodedDataset(records, n_truncated=n_truncated, n_dropped=n_dropped)


def encode_classify(examples: Sequence[ClassifyExample], tokenizer: Any, labels: Sequence[str],
                    max_len: int, *, add_eos: bool = False) -> EncodedDataset:
    """Tokenise into ``{"input_ids", "label"}`` records; ``label`` is the index in ``labels``.

    The tokenizer's own special tokens (e.g. a BOS) are kept; text past ``max_len`` is cut from the
    tail. ``add_eos`` appends EOS (inside ``max_len``) so a last-token classifier reads a fixed token.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be at least 1, got {max_len}")
    index = {lab: i for i, lab in enumerate(labels)}
    budget = max_len - 1 if add_eos else max_len
    if add_eos and tokenizer.eos_token_id is None:
        raise ValueError("add_eos=True but the tokenizer has no EOS token")
    for ex in examples:
        if ex.label not in index:
            raise DataError(f"label {ex.label!r} is not in the label set {list(labels)}")
    records, n_truncated = [], 0
    for i in range(0, len(examples), 1024):
        chunk = examples[i:i + 1024]
        encoded = [list(ids) for ids in
                   tokenizer([ex.text for ex in chunk], add_special_tokens=True)["input_ids"]]
        for j, ex in enumerate(chunk):
            if len(encoded[j]) > budget:  # re-encode with HF truncation: it keeps special tokens
                n_truncated += 1
                encoded[j] = list(tokenizer(ex.text, add_special_tokens=True, truncation=True,
                                            max_length=budget)["input_ids"])
            ids = encoded[j] + ([tokenizer.eos_token_id] if add_eos else [])
            records.append({"input_ids": ids, "label": index[ex.label]})
    return EncodedDataset(records, n_truncated=n_truncated)


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, falling back to EOS (padding is masked out, so any id works)."""
    pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pid is None:
        raise ValueError("the tokenizer has neither a pad token nor an EOS token")
    return int(pid)


# --------------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------------


def collate(batch: Sequence[Mapping[str, Any]], pad_id: int, *,
            side: Literal["right", "left"] = "right") -> dict[str, torch.Tensor]:
    """Pad records to the longest one: ``input_ids`` [B, L] (``pad_id``), ``attention_mask`` [B, L]
    and ``labels``: [B, L] with -100 on padding for chat records, [B] class indices for classify."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    chat = "labels" in batch[0]
    if any(("labels" in rec) != chat for rec in batch):
        raise ValueError("cannot collate chat records (labels) with classify records (label)")
    length = max(len(rec["input_ids"]) for rec in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long) if chat else None
    for row, rec in enumerate(batch):
        n = len(rec["input_ids"])
        cols = slice(0, n) if side == "right" else slice(length - n, length)
        ids[row, cols] = torch.as_tensor(rec["input_ids"], dtype=torch.long)
        mask[row, cols] = 1
        if chat:
            labels[row, cols] = torch.as_tensor(rec["labels"], dtype=torch.long)
    if not chat:
        labels = torch.tensor([int(rec["label"]) for rec in batch], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batched(records: Sequence[Mapping[str, Any]], pad_id: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Records in their order, `batch_size` at a time, each group collated (right padding): the fixed
    batches of calibration and evaluation (training's shuffled ones are `training.datasets.Batches`)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [collate(records[i:i + batch_size], pad_id) for i in range(0, len(records), batch_size)]
