"""The engine's own call of a quantized decoder block: HF's Qwen2 / Llama block, op for op, over the
fused q/k/v and gate/up layers `stitchlib.quant` builds (one kernel call each instead of three and two).

Why: a decode step of the 1.5B anchor at int4 calls ~200 small kernels; the HF call path (decoder layer,
attention and MLP modules, four PSTLinear wrappers and seven linears per block, the attention-function
lookup) adds Python time on top of each, and three / two separate kernel calls read the activation
and start the thread pool three / two times (benchmarks/QUANT.md section 4 measures the difference).

Same numbers: the ops, their order and dtypes are HF's (`Qwen2DecoderLayer`, `Qwen2Attention` with the
SDPA interface, `Qwen2RMSNorm`, `Qwen2MLP`) and the fused kernels give each output column exactly what
the separate layer gives, so a step's logits equal the HF path's bit for bit (tests/test_quant.py). The
stitch-specific biases of q/k/v/o are added as PSTLinear adds them, per row of the route. A block that
is not of that shape (no fused layers, a sliding window, another attention implementation) keeps the
HF call: `block_fn` says which. Pure torch ops, no host reads: the same call runs on a GPU and inside
a CUDA graph.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..pst import PSTLinear, _bias_for
from ..quant import QuantLinear, QuantSlice, fused_layers
from .cache import StaticKVCache
from .runner import call_layer


def _rms(weight: torch.Tensor, eps: float, x: torch.Tensor) -> torch.Tensor:
    """Qwen2RMSNorm.forward."""
    dtype = x.dtype
    h = x.to(torch.float32)
    var = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(var + eps)
    return weight * h.to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """One tensor of HF's apply_rotary_pos_emb (cos / sin already unsqueezed)."""
    half = x.shape[-1] // 2
    return (x * cos) + (torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin)


class BlockParts(NamedTuple):
    """What `fast_block` reads of one decoder block. Looked up from the modules on every call when the
    block call is compiled (dynamo traces the lookups away); an eager engine looks them up once per
    block (`FastBlocks`): ~1,400 nn.Module attribute lookups per decode step of the 1.5B anchor."""

    ln1: torch.Tensor  # input_layernorm.weight
    eps1: float
    qkv: Callable  # the fused q/k/v QuantLinear's forward
    qkv_ssbs: tuple  # (ssb table, first column, end column) of q / k / v wrappers that have one
    route: object  # the model's RouteState (slots of the rows in this call)
    nq: int
    nk: int
    head_dim: int
    rep: int  # num_key_value_groups
    scaling: float
    o: Callable  # o_proj's QuantLinear forward (its PSTLinear wrapper's SSB below)
    o_ssb: torch.Tensor | None
    ln2: torch.Tensor
    eps2: float
    gate_up: Callable
    n: int  # gate_proj.out_features
    act: Callable
    down: Callable


def block_parts(layer: nn.Module) -> BlockParts:
    """`BlockParts` of a block `supports_fast_block` accepts."""
    attn, mlp = layer.self_attn, layer.mlp
    qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
    ssbs = tuple((m.ssb, m.base.start, m.base.stop) for m in qkv if type(m) is PSTLinear and m.ssb is not None)
    o = attn.o_proj
    o_ssb = o.ssb if type(o) is PSTLinear else None
    route = next((m.route for m in [*qkv, o] if type(m) is PSTLinear), None)
    return BlockParts(layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon, attn.qkv_proj.forward,
                      ssbs, route,
                      attn.q_proj.out_features, attn.k_proj.out_features, attn.head_dim,
                      attn.num_key_value_groups, attn.scaling,
                      (o.base if type(o) is PSTLinear else o).forward, o_ssb,
                      layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon,
                      mlp.gate_up_proj.forward, mlp.gate_proj.out_features, mlp.act_fn, mlp.down_proj.forward)


def fast_block(layer: nn.Module, x: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
    """`call_layer`'s contract (x: [B, T, d] -> [B, T, d], K/V written to the bound cache rows) for a
    block `supports_fast_block` accepts. Which cache layer: the one bound (`cache.bind`)."""
    return run_block(block_parts(layer), x, mask, cos, sin, cache)


def run_block(bp: BlockParts, x: torch.Tensor, mask: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              cache: StaticKVCache) -> torch.Tensor:
    """HF's Qwen2DecoderLayer forward, op for op, over the block's fused layers."""
    B, T, _ = x.shape
    D = bp.head_dim
    slots = bp.route.slots if bp.route is not None else None
    h = _rms(bp.ln1, bp.eps1, x)
    qkv = bp.qkv(h)
    if slots is not None:  # each wrapper's SSB on its columns, in place (PSTLinear's element-wise add)
        for table, a, b in bp.qkv_ssbs:
            piece = qkv[..., a:b]
            piece.add_(_bias_for(table, slots, piece))
    q = qkv[..., :bp.nq].view(B, T, -1, D).transpose(1, 2)
    k = qkv[..., bp.nq:bp.nq + bp.nk].view(B, T, -1, D).transpose(1, 2)
    v = qkv[..., bp.nq + bp.nk:].view(B, T, -1, D).transpose(1, 2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    k, v = cache.update(k, v, cache.layer)
    rep = bp.rep
    if rep > 1:  # HF's SDPA interface with a mask: one query token packs the heads, more repeat K/V
        if T == 1:
            q = q.reshape(B, q.shape[1] // rep, rep, D)
        else:
            k = k[:, :, None].expand(B, k.shape[1], rep, k.shape[2], D).reshape(B, -1, k.shape[2], D)
            v = v[:, :, None].expand(B, v.shape[1], rep, v.shape[2], D).reshape(B, -1, v.shape[2], D)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, scale=bp.scaling, is_causal=False)
    o = bp.o(o.reshape(B, -1, T, D).transpose(1, 2).contiguous().reshape(B, T, -1).contiguous())
    if bp.o_ssb is not None and slots is not None:
        o = o + _bias_for(bp.o_ssb, slots, o)
    x = x + o
    h = _rms(bp.ln2, bp.eps2, x)
    gu = bp.gate_up(h)
    return x + bp.down(bp.act(gu[..., :bp.n]) * gu[..., bp.n:])


class FastBlocks:
    """The eager engine's block call: `fast_block` with every block's parts looked up once, at engine
    construction (the modules do not change under a running engine)."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.parts = {id(b): block_parts(b) for b in layers}

    def __call__(self, layer: nn.Module, x: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
        return run_block(self.parts[id(layer)], x, mask, cos, sin, cache)


def supports_fast_block(layer: nn.Module) -> bool:
    """A Qwen2-shaped block (the HF classes `fast_block` follows) with fused q/k/v and gate/up layers and
    no LoRA left unmerged."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is None or mlp is None or set(fused_layers(layer)) != {"qkv_proj", "gate_up_proj"}:
        return False
    if type(layer).__name__ != "Qwen2DecoderLayer":  # another family may order its ops differently
        return False
    if getattr(attn, "sliding_window", None) is not None or attn.config._attn_implementation != "sdpa":
        return False
    qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
    if [type(m.base if type(m) is PSTLinear else m) for m in qkv] != [QuantSlice] * 3:
        return False
    if any(type(m) is PSTLinear and m.lora_a is not None for m in [*qkv, attn.o_proj]):
        return False
    o = attn.o_proj.base if type(attn.o_proj) is PSTLinear else attn.o_proj
    return (isinstance(o, QuantLinear) and isinstance(mlp.down_proj, QuantLinear)
            and type(mlp.gate_proj) is QuantSlice and type(mlp.up_proj) is QuantSlice)


def fast_blocks_supported(layers: list[nn.Module]) -> bool:
    return bool(layers) and all(supports_fast_block(b) for b in layers)


def block_fn(layers: list[nn.Module], *, compiled: bool = False) -> Callable:
    """The block call for `layers`: the fast block if every block supports it, else the HF call.
    Eager: `FastBlocks(layers)`; for torch.compile: `fast_block` (a plain function, which dynamo traces
    once per anchor and shape for every block, where a per-block lookup table would specialise)."""
    if not fast_blocks_supported(layers):
        return call_layer
    return fast_block if compiled else FastBlocks(layers)
