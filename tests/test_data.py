"""training.datasets / training.pydocs (loading, splitting, resumable batches, built-in sets, bad
input) and stitchlib.prompts (tokenising, collating)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from stitchlib import prompts as P
from stitchlib.errors import DataError
from stitchlib.prompts import (IGNORE_INDEX, ChatExample, ClassifyExample, batched, collate, encode_chat,
                               encode_classify, encode_prompt, pad_token_id, render_prompt)
from training import pydocs
from training.datasets import Batches, load_chat, load_classify, split
from training.pydocs import build_pydocs

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\\n' }}{% endif %}")


def make_tokenizer(*, chat_template: bool = True, bos: bool = False):
    """Byte-level BPE without merges (one token per byte) plus ChatML specials; optionally a
    post-processor that prepends BOS like Llama tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + (["<s>"] if bos else [])
    tok.add_special_tokens(specials)
    if bos:
        bos_id = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                 pad_token="<|endoftext|>", bos_token="<s>" if bos else None)
    if chat_template:
        hf.chat_template = CHATML
    return hf


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def alpaca_tok():
    return make_tokenizer(chat_template=False)


def _tiny_or_own(kind: str):
    if kind == "own":
        return make_tokenizer()
    tiny = pytest.importorskip("stitchlib.tiny")
    return tiny.build_tiny_tokenizer()


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


CHAT_ROWS = [
    {"instruction": "Say hi.", "input": "", "output": "Hi!"},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Name a colour.", "output": "Blue", "extra": 1},
    {"instruction": "Unicode \u2028 é", "input": None, "output": "ok ✓"},
]


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def test_load_chat_json_and_jsonl_round_trip(tmp_path):
    arr = tmp_path / "chat.json"
    arr.write_text(json.dumps(CHAT_ROWS, indent=2, ensure_ascii=False), encoding="utf-8")
    jl = write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS)
    expected = [ChatExample("Say hi.", "", "Hi!"), ChatExample("Add the numbers.", "2 and 3", "5"),
                ChatExample("Name a colour.", "", "Blue"), ChatExample("Unicode \u2028 é", "", "ok ✓")]
    assert load_chat(arr) == expected
    assert load_chat(str(jl)) == expected


def test_load_classify_round_trip_and_label_order(tmp_path):
    rows = [{"text": f"t{i}", "label": lab} for i, lab in enumerate("bcabca")]
    path = write_jsonl(tmp_path / "cls.jsonl", rows)
    examples, labels = load_classify(path)
    assert labels == ["a", "b", "c"]
    assert examples[0] == ClassifyExample("t0", "b") and len(examples) == 6
    _, given = load_classify(path, labels=["c", "b", "a", "d"])
    assert given == ["c", "b", "a", "d"]  # a given label set keeps its order (class indices)


def test_bbcnews_is_the_real_set():
    examples, labels = load_classify("bbcnews")
    assert len(examples) == 2225
    assert labels == ["business", "entertainment", "politics", "sports", "tech"]
    assert Counter(e.label for e in examples) == {
        "business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401}
    assert examples[0].text.startswith("Ad sales boost Time Warner profit")
    assert all(e.text.strip() for e in examples)
    assert any("£" in e.text for e in examples if e.label == "sports")  # the cp1252 article decodes


# --------------------------------------------------------------------------------------------------
# pydocs
# --------------------------------------------------------------------------------------------------


def _digest(examples) -> str:
    return hashlib.sha256(json.dumps([asdict(e) for e in examples]).encode()).hexdigest()


def test_pydocs_deterministic_large_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("STITCHSERVE_HOME", str(tmp_path))
    first = build_pydocs(use_cache=False)
    second = build_pydocs(use_cache=False)
    assert first == second
    assert len(first) >= 5000
    assert len({e.instruction for e in first}) == len(first)  # no duplicate questions
    assert all(e.instruction.strip() and e.output.strip() for e in first)
    assert sum(bool(e.input) for e in first) >= 500  # the summarise template uses the input field
    assert len(max(first, key=lambda e: len(e.output)).output) <= 1200
    by_instr = {e.instruction: e for e in first}
    sig = next(e for i, e in by_instr.items() if "`json.dumps`" in i and e.output.startswith("json."))
    assert sig.output.startswith("json.dumps(obj, *, skipkeys=False")
    assert any("`json.dumps`" in i and "JSON formatted" in e.output for i, e in by_instr.items())
    assert " at 0x" not in json.dumps([asdict(e) for e in first])

    # The cache: written under $STITCHSERVE_HOME/data, keyed by Python version, read back equal.
    assert not pydocs.pydocs_cache_path().exists()
    cached = load_chat("pydocs")
    path = pydocs.pydocs_cache_path()
    assert path.parent == tmp_path / "data" and f"{sys.version_info[0]}.{sys.version_info[1]}" in path.name
    assert path.exists() and cached == first and load_chat("pydocs") == first


def test_pydocs_same_in_a_fresh_process(tmp_path):
    """A fresh interpreter (different hash seed, cwd and HOME, no torch/transformers imported) must
    build exactly what this process builds: no set order, address or monkeypatch leaks in."""
    code = ("import hashlib, json; from dataclasses import asdict; from training.pydocs import "
            "build_pydocs; ex = build_pydocs(use_cache=False); print(hashlib.sha256(json.dumps("
            "[asdict(e) for e in ex]).encode()).hexdigest())")
    env = dict(os.environ, PYTHONHASHSEED="12345", HOME=str(tmp_path),
               PYTHONPATH=str(Path(pydocs.__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, check=True)
    assert out.stdout.strip() == _digest(build_pydocs(use_cache=False))


# --------------------------------------------------------------------------------------------------
# Tokenising
# --------------------------------------------------------------------------------------------------


def _parts(rec):
    prompt = [t for t, lab in zip(rec["input_ids"], rec["labels"]) if lab == IGNORE_INDEX]
    resp = [lab for lab in rec["labels"] if lab != IGNORE_INDEX]
    n = len(prompt)
    assert rec["input_ids"][n:] == resp and all(lab == IGNORE_INDEX for lab in rec["labels"][:n])
    return prompt, resp


@pytest.mark.parametrize("kind", ["own", "tiny"])
def test_chat_template_labels_cover_response_and_end_token(kind):
    tokenizer = _tiny_or_own(kind)
    examples = [ChatExample("Say hi.", "", "Hi there!"), ChatExample("Add.", "2 and 3", "It is 5.")]
    enc = encode_chat(examples, tokenizer, max_len=512)
    assert len(enc) == 2 and enc.n_truncated == 0 and enc.n_dropped == 0
    for ex, rec in zip(examples, enc):
        prompt, resp = _parts(rec)
        assert tokenizer.decode(resp) == ex.output + "<|im_end|>"
        assert resp[-1] == tokenizer.eos_token_id
        text = tokenizer.decode(prompt)
        assert text == render_prompt(tokenizer, ex.instruction, ex.input)
        assert prompt == encode_prompt(tokenizer, ex.instruction, ex.input)
        assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n")
    assert "Add.\n\n2 and 3<|im_end|>" in tokenizer.decode(enc[1]["input_ids"])


def test_system_prompt_goes_into_the_template(tok):
    rec = encode_chat([ChatExample("Q", "", "A")], tok, 256, system_prompt="Be brief.")[0]
    assert tok.decode(rec["input_ids"]).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


def test_alpaca_template_without_chat_template(alpaca_tok):
    examples = [ChatExample("Say hi.", "", "Hi!"), ChatExample("Add.", "2 and 3", "5")]
    enc = encode_chat(examples, alpaca_tok, max_len=512)
    p0, r0 = _parts(enc[0])
    assert alpaca_tok.decode(p0) == P.ALPACA_PROMPT.format(instruction="Say hi.")
    assert alpaca_tok.decode(r0) == "Hi!<|im_end|>"
    p1, _ = _parts(enc[1])
    assert alpaca_tok.decode(p1).endswith("### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n")
    # template="alpaca" forces it even when a chat template exists
    tok = make_tokenizer()
    forced = encode_chat(examples[:1], tok, 512, template="alpaca")[0]
    assert forced["input_ids"] == enc[0]["input_ids"]


def test_alpaca_prompt_gets_exactly_one_bos():
    tok = make_tokenizer(chat_template=False, bos=True)
    rec = encode_chat([ChatExample("Say hi.", "", "Hi!")], tok, 512)[0]
    assert rec["input_ids"][0] == tok.bos_token_id
    assert _parts(rec)[0] == encode_prompt(tok, "Say hi.")
    assert rec["input_ids"].count(tok.bos_token_id) == 1
    _, resp = _parts(rec)
    assert tok.decode(resp) == "Hi!<|im_end|>"


def test_chat_truncation_long_response_keeps_prompt(tok):
    ex = ChatExample("Write a lot.", "", "x" * 500)
    enc = encode_chat([ex], tok, max_len=128)
    rec = enc[0]
    prompt, resp = _parts(rec)
    assert len(rec["input_ids"]) == 128 and enc.n_truncated == 1
    assert tok.decode(prompt) == render_prompt(tok, ex.instruction)
    assert tok.decode(resp) == "x" * (128 - len(prompt))


def test_chat_truncation_long_prompt_keeps_head_header_and_response_start(tok):
    ex = ChatExample("Summarise this: " + "word " * 100 + "THE END", "",
                     "A short answer that is long enough to cut.")
    enc = encode_chat([ex], tok, max_len=128)
    rec = enc[0]
    prompt, resp = _parts(rec)
    assert len(rec["input_ids"]) == 128 and enc.n_truncated == 1 and enc.n_dropped == 0
    assert len(resp) == 32  # min_response_tokens defaults to max_len // 4
    assert tok.decode(resp) == ex.output[:32]
    text = tok.decode(prompt)
    assert text.startswith("<|im_start|>user\nSummarise this: word")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")  # header kept after the cut
    assert "THE END" not in text and len(prompt) == 96


def test_chat_examples_without_room_are_dropped_and_counted(tok):
    examples = [ChatExample("Q" * 50, "", "A" * 50), ChatExample("q", "", "a")]
    enc = encode_chat(examples, tok, max_len=24, min_response_tokens=20)
    assert enc.n_dropped == 1 and len(enc) == 1
    assert tok.decode(_parts(enc[0])[1]) == "a<|im_end|>"


def test_encode_classify_truncates_tail(tok):
    examples = [ClassifyExample("hello world", "b"), ClassifyExample("a" * 100, "a")]
    enc = encode_classify(examples, tok, ["a", "b"], max_len=16)
    assert [r["label"] for r in enc] == [1, 0]
    assert tok.decode(enc[0]["input_ids"]) == "hello world"
    assert enc[1]["input_ids"] == tok("a" * 16)["input_ids"] and enc.n_truncated == 1
    with_eos = encode_classify(examples, tok, ["a", "b"], max_len=16, add_eos=True)
    assert len(with_eos[1]["input_ids"]) == 16 and with_eos[1]["input_ids"][-1] == tok.eos_token_id
    bos_tok = make_tokenizer(bos=True)
    cut = encode_classify(examples, bos_tok, ["a", "b"], max_len=16)[1]["input_ids"]
    assert len(cut) == 16 and cut[0] == bos_tok.bos_token_id and cut.count(bos_tok.bos_token_id) == 1
    with pytest.raises(DataError, match="'b' is not in the label set"):
        encode_classify(examples, tok, ["a", "c"], max_len=16)


def test_collate_pads_and_masks(tok):
    recs = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}]
    pad = pad_token_id(tok)
    right = collate(recs, pad)
    assert right["input_ids"].tolist() == [[1, 2, 3], [4, pad, pad]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    left = collate(recs, pad, side="left")
    assert left["input_ids"].tolist() == [[1, 2, 3], [pad, pad, 4]]
    assert left["labels"].tolist() == [[-100, 2, 3], [-100, -100, 4]]
    cls = collate([{"input_ids": [1, 2], "label": 1}, {"input_ids": [3], "label": 0}], pad)
    assert cls["labels"].tolist() == [1, 0] and cls["input_ids"].dtype == torch.long
    with pytest.raises(ValueError):
        collate([recs[0], {"input_ids": [1], "label": 0}], pad)
    # fixed batches in record order, the last one short, each padded to its own longest record
    five = [{"input_ids": [7] * n, "labels": [7] * n} for n in (2, 1, 3, 1, 4)]
    groups = batched(five, pad, 2)
    assert [g["input_ids"].shape for g in groups] == [(2, 2), (2, 3), (1, 4)]
    assert [g["attention_mask"].sum().item() for g in groups] == [3, 4, 4]
    with pytest.raises(ValueError, match="batch_size"):
        batched(five, pad, 0)


# --------------------------------------------------------------------------------------------------
# Splitting
# --------------------------------------------------------------------------------------------------


def test_split_deterministic_disjoint_and_order_free():
    examples = [ChatExample(f"q{i}", "", f"a{i}") for i in range(1000)]
    train, val = split(examples, val_fraction=0.1, seed=3)
    assert (train, val) == split(examples, val_fraction=0.1, seed=3)
    assert len(val) == 100 and len(train) == 900 and not set(train) & set(val)
    assert set(train) | set(val) == set(examples)
    assert split(list(reversed(examples)), val_fraction=0.1, seed=3)[1] == list(reversed(val))
    assert set(split(examples, val_fraction=0.1, seed=4)[1]) != set(val)
    assert len(split(examples, val_size=37, seed=3)[1]) == 37


def test_split_stratified_by_label_and_duplicates_stay_together():
    examples = ([ClassifyExample(f"a{i}", "a") for i in range(300)]
                + [ClassifyExample(f"b{i}", "b") for i in range(100)]
                + [ClassifyExample("dup", "b")] * 4)
    train, val = split(examples, val_fraction=0.25, seed=0)
    counts = Counter(e.label for e in val)
    assert counts == {"a": 75, "b": 26}  # 404 * 0.25 = 101 split 300:104
    assert ("dup" in {e.text for e in train}) != ("dup" in {e.text for e in val})
    unstratified = split(examples, val_fraction=0.25, seed=0, stratify_by=None)[1]
    assert len(unstratified) == 101


def test_bbcnews_split_is_stratified():
    examples, labels = load_classify("bbcnews")
    train, val = split(examples, val_fraction=0.2, seed=0)
    assert len(val) == 445
    full = Counter(e.label for e in examples)
    got = Counter(e.label for e in val)
    assert all(abs(got[lab] - 0.2 * full[lab]) <= 1 for lab in labels)
    # the BBC set has exact duplicate articles: none may appear on both sides
    assert not {(e.text, e.label) for e in train} & {(e.text, e.label) for e in val}


# --------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------


def _records(n=23):
    return [{"input_ids": list(range(1, 2 + i % 5)), "labels": list(range(1, 2 + i % 5)),
             "i": i} for i in range(n)]


def _ids(batches, k):
    return [next(batches)["input_ids"].tolist() for _ in range(k)]


@pytest.mark.parametrize("drop_last", [False, True])
def test_batches_resume_matches_uninterrupted(drop_last):
    recs = _records()
    full = Batches(recs, 4, pad_id=0, seed=7, drop_last=drop_last)
    reference = _ids(full, 20)  # crosses three epoch boundaries
    for cut in (0, 3, 5, 6, 13):
        run = Batches(recs, 4, pad_id=0, seed=7, drop_last=drop_last)
        head = _ids(run, cut)
        state = json.loads(json.dumps(run.state_dict()))  # survives a checkpoint file
        resumed = Batches(recs, 4, pad_id=0, seed=7, drop_last=drop_last)
        resumed.load_state_dict(state)
        assert head + _ids(resumed, 20 - cut) == reference


def test_batches_epochs_cover_everything_and_reshuffle():
    recs = _records()
    b = Batches(recs, 5, pad_id=0, seed=1, collate_fn=lambda batch: [r["i"] for r in batch])
    assert len(b) == 5
    epoch0 = [i for _ in range(5) for i in next(b)]
    epoch1 = [i for _ in range(5) for i in next(b)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(23)) and epoch0 != epoch1
    assert b.epoch == 1 and b.position == 5
    limited = Batches(recs, 10, pad_id=0, max_epochs=2)
    assert len(list(limited)) == 6


def test_batches_refuse_foreign_state():
    b = Batches(_records(), 4, pad_id=0, seed=7)
    with pytest.raises(DataError, match="seed"):
        Batches(_records(), 4, pad_id=0, seed=8).load_state_dict(b.state_dict())
    with pytest.raises(DataError, match="num_records"):
        Batches(_records(22), 4, pad_id=0, seed=7).load_state_dict(b.state_dict())


# --------------------------------------------------------------------------------------------------
# Bad input: one DataError naming the file (and line)
# --------------------------------------------------------------------------------------------------

BAD_CHAT = [
    ("bad.jsonl", ['{"instruction": "a", "output": "b"}', '{"instruction": "a", "output": }'],
     ":2: malformed JSON"),
    ("bad.json", '[\n {"instruction": "a", "output": "b"},\n {"instruction": "a" "output": "b"}\n]',
     ":3: malformed JSON"),
    ("bad.json", '[\n {"instruction": "a", "output": "b"}\n] extra', ":3: malformed JSON"),
    ("empty.jsonl", ["", "  "], "empty"),
    ("noinstr.jsonl", ['{"instruction": "a", "output": "b"}', '{"output": "b"}'],
     ":2: row is missing required field 'instruction'"),
    ("noout.json", '[{"instruction": "a", "output": "b"},\n\n {"instruction": "a"}]',
     ":3: row is missing required field 'output'"),
    ("nonstr.jsonl", ['{"instruction": "a", "output": 5}'], ":1: field 'output' must be a string"),
    ("nonstr_in.jsonl", ['{"instruction": "a", "input": ["x"], "output": "b"}'],
     ":1: field 'input' must be a string, got array"),
    ("blank.jsonl", ['{"instruction": "  ", "output": "b"}'], ":1: field 'instruction' is empty"),
    ("notobj.jsonl", ['["instruction", "output"]'], ":1: expected a JSON object"),
]


@pytest.mark.parametrize("name,content,expected", BAD_CHAT, ids=[c[0] + c[2] for c in BAD_CHAT])
def test_bad_chat_files(tmp_path, name, content, expected):
    path = tmp_path / name
    if isinstance(content, list):
        write_jsonl(path, content)
    else:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_chat(path)
    msg = str(err.value)
    assert msg.startswith(str(path)) and expected in msg


BAD_CLASSIFY = [
    ("notext.jsonl", ['{"text": "a", "label": "x"}', '{"label": "x"}'],
     None, ":2: row is missing required field 'text'"),
    ("nolabel.jsonl", ['{"text": "a"}'], None, ":1: row is missing required field 'label'"),
    ("intlabel.jsonl", ['{"text": "a", "label": 3}'], None, ":1: field 'label' must be a string"),
    ("oneclass.jsonl", ['{"text": "a", "label": "x"}', '{"text": "b", "label": "x"}'],
     None, "at least 2 distinct labels"),
    ("unknown.jsonl", ['{"text": "a", "label": "x"}', '{"text": "b", "label": "z"}'],
     ["x", "y"], ":2: label 'z' is not in the given label set"),
    ("malformed.jsonl", ['{"text": "a", "label": "x"', ""], None, ":1: malformed JSON"),
    ("empty.jsonl", [], None, "empty"),
]


@pytest.mark.parametrize("name,content,labels,expected", BAD_CLASSIFY,
                         ids=[c[0] for c in BAD_CLASSIFY])
def test_bad_classify_files(tmp_path, name, content, labels, expected):
    path = write_jsonl(tmp_path / name, content)
    with pytest.raises(DataError) as err:
        load_classify(path, labels=labels)
    msg = str(err.value)
    assert msg.startswith(str(path)) and expected in msg


def test_missing_file_and_unknown_builtin(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=r"nope\.jsonl: no such data file"):
        load_chat(missing)
    with pytest.raises(DataError, match=r"nope\.jsonl: no such data file"):
        load_classify(str(missing))
    with pytest.raises(DataError) as err:
        load_chat("alpaca")
    assert "alpaca" in str(err.value) and "bbcnews" in str(err.value) and "pydocs" in str(err.value)
    with pytest.raises(DataError, match="'bbcnews' is a classify data set"):
        load_chat("bbcnews")
    with pytest.raises(DataError, match="is a directory"):
        load_chat(tmp_path)


def test_non_utf8_file_names_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "a", "label": "x"}\n{"text": "\xa3", "label": "y"}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: not valid UTF-8"):
        load_classify(path)


def test_split_errors_name_the_source():
    examples = [ChatExample("q", "", "a"), ChatExample("r", "", "b")]
    with pytest.raises(DataError, match=r"^train\.jsonl: .*empty train set"):
        split(examples, val_size=2, source="train.jsonl")
    with pytest.raises(DataError, match="empty train set"):
        split(examples, val_fraction=1.0)
    with pytest.raises(DataError, match="val_fraction"):
        split(examples, val_fraction=-0.5)
    with pytest.raises(DataError, match="empty"):
        split([], source="x.jsonl")


# --------------------------------------------------------------------------------------------------
# Serving's prompt: the palette's recorded format, rendered as training rendered it
# --------------------------------------------------------------------------------------------------


def test_render_messages_matches_training_prompts(tok):
    """One user turn renders to exactly training's prompt (text and ids), with or without a system
    prompt; the palette's system prompt yields to the client's own system message."""
    user = [{"role": "user", "content": "Say hi."}]
    assert P.render_messages(tok, user) == render_prompt(tok, "Say hi.")
    with_sys = P.render_messages(tok, user, system_prompt="Be brief.")
    assert with_sys == render_prompt(tok, "Say hi.", system_prompt="Be brief.")
    rec = encode_chat([ChatExample("Say hi.", "", "Hi!")], tok, 256, system_prompt="Be brief.")[0]
    assert tok(with_sys, add_special_tokens=False)["input_ids"] == _parts(rec)[0]
    own = [{"role": "system", "content": "Be long."}] + user
    assert P.render_messages(tok, own, system_prompt="Be brief.") == render_prompt(tok, "Say hi.",
                                                                                   system_prompt="Be long.")
    assert P.prompt_template(tok) == "chat" and P.prompt_template(tok, "alpaca") == "alpaca"


def test_render_messages_alpaca_gives_training_ids_and_refuses_multi_turn():
    bos_tok = make_tokenizer(chat_template=False, bos=True)
    assert P.prompt_template(bos_tok) == "alpaca"
    text = P.render_messages(bos_tok, [{"role": "system", "content": "ignored"}, {"role": "user", "content": "Say hi."}],
                             template="alpaca")
    rec = encode_chat([ChatExample("Say hi.", "", "Hi!")], bos_tok, 512)[0]
    ids = bos_tok(text, add_special_tokens=False)["input_ids"]
    assert ids == _parts(rec)[0] == encode_prompt(bos_tok, "Say hi.") and ids.count(bos_tok.bos_token_id) == 1
    for bad in ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                 {"role": "user", "content": "c"}], [{"role": "assistant", "content": "b"}]):
        with pytest.raises(ValueError, match="single-turn Alpaca"):
            P.render_messages(bos_tok, bad, template="alpaca")
    with pytest.raises(ValueError, match="template"):
        P.render_messages(bos_tok, [{"role": "user", "content": "a"}], template="vicuna")
