"""Anchors: pretrained decoder LMs with the LLaMA layout (embeddings, decoder layers, final norm,
LM head, rotary embeddings) loaded from a name, an HF directory or a GGUF file.

An `Anchor` keeps the HF `*ForCausalLM` module itself (so the HF reference is always one call away)
plus what stitching needs to know about it: sizes, per-block parameter counts and an identity
fingerprint of its weights that palettes are checked against.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from .errors import AnchorError
from .hub import BUILTIN_ANCHORS, pull, resolve_gguf
from .tiny import build_tiny_model, build_tiny_tokenizer

log = logging.getLogger(__name__)

Quantization = Literal["none", "8bit", "4bit"]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
TINY_NAMES = ("tiny-small", "tiny-large")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise AnchorError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}") from None


@dataclass(frozen=True)
class AnchorStats:
    """Counted once from the float weights, before any quantization changes numel/element sizes."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    embed_params: int
    block_params: tuple[int, ...]  # every parameter of each decoder block
    block_linear_params: tuple[int, ...]  # matmul weights only (these cost 2 FLOPs per token each)
    norm_params: int
    head_params: int

    @property
    def total_params(self) -> int:
        return self.embed_params + sum(self.block_params) + self.norm_params + self.head_params


@dataclass
class Anchor:
    name: str
    source: str
    model: nn.Module  # the HF *ForCausalLM
    tokenizer: object
    stats: AnchorStats
    fingerprint: str
    quantization: Quantization = "none"
    extra: dict = field(default_factory=dict)

    # LLaMA-layout accessors: the only place that knows HF's attribute names.
    @property
    def config(self):
        return self.model.config

    @property
    def embed(self) -> nn.Embedding:
        return self.model.model.embed_tokens

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    @property
    def norm(self) -> nn.Module:
        return self.model.model.norm

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.lm_head

    @property
    def rotary(self) -> nn.Module:
        return self.model.model.rotary_emb

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def describe(self) -> dict:
        s = self.stats
        return {"name": self.name, "source": self.source, "fingerprint": self.fingerprint,
                "architecture": type(self.model).__name__, "num_layers": s.num_layers,
                "hidden_size": s.hidden_size, "head_dim": s.head_dim, "params": s.total_params}


def _check_layout(model: nn.Module, src: str) -> None:
    inner = getattr(model, "model", None)
    missing = [a for a in ("embed_tokens", "layers", "norm", "rotary_emb") if not hasattr(inner, a)]
    if not hasattr(model, "lm_head"):
        missing.append("lm_head")
    if not missing:
        attn = getattr(inner.layers[0], "self_attn", None)
        missing += [f"self_attn.{p}" for p in ATTN_PROJ if not hasattr(attn, p)]
    if missing:
        raise AnchorError(
            f"{src}: {type(model).__name__} does not have the LLaMA decoder layout "
            f"(missing {', '.join(missing)}); supported: Llama, Qwen2 and other LLaMA-layout decoders")


def compute_stats(model: nn.Module) -> AnchorStats:
    cfg = model.config
    inner = model.model

    def n(mod: nn.Module) -> int:
        return sum(p.numel() for p in mod.parameters())

    def linear_numel(block: nn.Module) -> int:
        return sum(m.weight.numel() for m in block.modules() if isinstance(m, nn.Linear))

    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return AnchorStats(
        num_layers=len(inner.layers), hidden_size=cfg.hidden_size,
        num_heads=cfg.num_attention_heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        head_dim=head_dim, vocab_size=inner.embed_tokens.weight.shape[0],
        embed_params=n(inner.embed_tokens),
        block_params=tuple(n(b) for b in inner.layers),
        block_linear_params=tuple(linear_numel(b) for b in inner.layers),
        norm_params=n(inner.norm), head_params=model.lm_head.weight.numel(),
    )


@torch.no_grad()
def fingerprint(model: nn.Module, samples_per_tensor: int = 4096) -> str:
    """Identity of the weights: names, shapes and a strided sample of every tensor, rounded to
    bfloat16 so the same checkpoint loaded as fp32 or bf16 gets the same fingerprint. Cheap enough
    for start-up (no full pass over GBs of weights), strong enough to tell checkpoints apart."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // samples_per_tensor)
        sample = flat[::step][:samples_per_tensor].to(torch.bfloat16).view(torch.int16).cpu().numpy()
        h.update(f"{name}:{tuple(t.shape)}:".encode())
        h.update(sample.tobytes())
    return h.hexdigest()[:32]


def tokenizer_identity(tok) -> str:
    vocab = sorted(tok.get_vocab().items())
    specials = sorted(str(t) for t in tok.all_special_tokens)
    return hashlib.sha256(repr((vocab, specials)).encode()).hexdigest()[:16]


def _resolve_dir(src: str, progress: bool) -> Path:
    p = Path(src).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise AnchorError(f"GGUF file not found: {p}")
        return resolve_gguf(p, progress=progress)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise AnchorError(f"{p} is a directory but holds no config.json (not a Hugging Face model)")
        return p
    if src in BUILTIN_ANCHORS:
        return pull(src, progress=progress)
    known = ", ".join([*TINY_NAMES, *BUILTIN_ANCHORS])
    raise AnchorError(f"cannot load anchor {src!r}: not a directory, not a .gguf file and not a "
                      f"built-in name ({known})")


def load_anchor(src: str, *, dtype: str | torch.dtype = "bfloat16", device: str | torch.device = "cpu",
                quantization: Quantization = "none", progress: bool = True) -> Anchor:
    """Load an anchor from a built-in name, an HF directory or a GGUF file."""
    dtype = resolve_dtype(dtype)
    if src in TINY_NAMES:
        model, tok = build_tiny_model(src, dtype=torch.float32), build_tiny_tokenizer()
        name = src
    else:
        path = _resolve_dir(src, progress)
        from transformers import AutoModelForCausalLM, AutoTokenizer
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
            tok = AutoTokenizer.from_pretrained(path)
        except Exception as e:  # transformers raises many types; give one clear line
            raise AnchorError(f"cannot load anchor from {path}: {type(e).__name__}: {e}") from e
        name = src if not Path(src).exists() else Path(src).name
    _check_layout(model, src)
    model.requires_grad_(False).eval()
    stats = compute_stats(model)
    fp = fingerprint(model)
    model = model.to(device=device, dtype=dtype)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    anchor = Anchor(name=name, source=str(src), model=model, tokenizer=tok, stats=stats, fingerprint=fp)
    if quantization != "none":
        quantize_anchor(anchor, quantization)
    log.info("loaded anchor %s: %d layers, hidden %d, %.1fM params, fingerprint %s",
             name, stats.num_layers, stats.hidden_size, stats.total_params / 1e6, fp)
    return anchor


def check_pair(small: Anchor, large: Anchor) -> None:
    """Refuse pairs that cannot be stitched small-head-to-large-tail."""
    ts, tl = tokenizer_identity(small.tokenizer), tokenizer_identity(large.tokenizer)
    if ts != tl:
        raise AnchorError(
            f"anchors {small.name!r} and {large.name!r} have different tokenizers "
            f"({len(small.tokenizer)} vs {len(large.tokenizer)} tokens, identity {ts} vs {tl}); "
            "stitched models need one shared tokenizer (pick two models of the same family)")
    if small.stats.vocab_size != large.stats.vocab_size:
        raise AnchorError(f"anchors {small.name!r} and {large.name!r} have different embedding sizes "
                          f"({small.stats.vocab_size} vs {large.stats.vocab_size})")
    if small.stats.total_params > large.stats.total_params:
        raise AnchorError(f"the small anchor {small.name!r} ({small.stats.total_params / 1e6:.1f}M) is larger "
                          f"than the large anchor {large.name!r} ({large.stats.total_params / 1e6:.1f}M): swap them")
    if small.stats.num_layers > large.stats.num_layers:
        raise AnchorError(f"the small anchor {small.name!r} is deeper ({small.stats.num_layers} layers) than "
                          f"the large one ({large.stats.num_layers}); SN-Net stitches need d_small <= d_large")


def quantize_anchor(anchor: Anchor, mode: Quantization) -> None:
    """Swap the decoder blocks' frozen nn.Linear weights for bitsandbytes 8-bit or 4-bit ones.
    Embeddings, norms and the LM head stay in float. Call before PST injection (PST wraps whatever
    linear it finds). See docs/DESIGN_NOTES.md section 4: on CPU prefer 8-bit (the 4-bit repack bug silently kills LoRA
    gradients after a no-grad forward)."""
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise AnchorError("quantization needs bitsandbytes: pip install 'stitchserve[quant]'") from e
    device = anchor.device
    for block in anchor.layers:
        for parent in list(block.modules()):
            for cname, child in list(parent.named_children()):
                if type(child) is not nn.Linear:
                    continue
                w = child.weight.data.float().cpu()
                if mode == "8bit":
                    q = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                            has_fp16_weights=False, threshold=6.0)
                    q.weight = bnb.nn.Int8Params(w.to(torch.float16), requires_grad=False, has_fp16_weights=False)
                elif mode == "4bit":
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=anchor.dtype, quant_type="nf4")
                    q.weight = bnb.nn.Params4bit(w.to(anchor.dtype), requires_grad=False, quant_type="nf4")
                else:
                    raise AnchorError(f"unknown quantization {mode!r}; choose none, 8bit or 4bit")
                if child.bias is not None:
                    q.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
                setattr(parent, cname, q.to(device))
    anchor.quantization = mode
