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

import torch
import torch.nn.functional as F
from torch import nn

from ..pst import PSTLinear, _bias_for
from ..quant import QuantLinear, QuantSlice, fused_layers
from .cache import StaticKVCache
from .runner import call_layer


def _rms(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Qwen2RMSNorm.forward."""
    dtype = x.dtype
    h = x.to(torch.float32)
    var = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(var + norm.variance_epsilon)
    return norm.weight * h.to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """One tensor of HF's apply_rotary_pos_emb (cos / sin already unsqueezed)."""
    half = x.shape[-1] // 2
    return (x * cos) + (torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin)


def _linear(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """m(x) for a PSTLinear over a QuantLinear (o_proj) or a QuantLinear, without the module-call path."""
    if type(m) is PSTLinear:
        y = _linear(m.base, x)
        if m.lora_a is not None:
            y = y + m._lora(x)
        if m.ssb is not None and m.route.slots is not None:
            y = y + _bias_for(m.ssb, m.route.slots, y)
        return y
    return m.forward(x)


def _add_ssbs_(y: torch.Tensor, parts: list[nn.Module]) -> torch.Tensor:
    """PSTLinear's stitch-specific bias of each q/k/v wrapper, added to its columns of the fused output
    (in place: the same element-wise add PSTLinear does out of place)."""
    for m in parts:
        if type(m) is PSTLinear and m.ssb is not None and m.route.slots is not None:
            piece = y[..., m.base.start:m.base.stop]
            piece.add_(_bias_for(m.ssb, m.route.slots, piece))
    return y


def fast_block(layer: nn.Module, x: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
    """`call_layer`'s contract (x: [B, T, d] -> [B, T, d], K/V written to the bound cache rows) for a
    block `supports_fast_block` accepts."""
    attn, mlp = layer.self_attn, layer.mlp
    B, T, _ = x.shape
    D = attn.head_dim
    h = _rms(layer.input_layernorm, x)
    qkv = _add_ssbs_(attn.qkv_proj.forward(h), [attn.q_proj, attn.k_proj, attn.v_proj])
    nq, nk = attn.q_proj.out_features, attn.k_proj.out_features
    q = qkv[..., :nq].view(B, T, -1, D).transpose(1, 2)
    k = qkv[..., nq:nq + nk].view(B, T, -1, D).transpose(1, 2)
    v = qkv[..., nq + nk:].view(B, T, -1, D).transpose(1, 2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    k, v = cache.update(k, v, attn.layer_idx)
    rep = attn.num_key_value_groups
    if rep > 1:  # HF's SDPA interface with a mask: one query token packs the heads, more repeat K/V
        if T == 1:
            q = q.reshape(B, q.shape[1] // rep, rep, D)
        else:
            k = k[:, :, None].expand(B, k.shape[1], rep, k.shape[2], D).reshape(B, -1, k.shape[2], D)
            v = v[:, :, None].expand(B, v.shape[1], rep, v.shape[2], D).reshape(B, -1, v.shape[2], D)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, scale=attn.scaling, is_causal=False)
    o = o.reshape(B, -1, T, D).transpose(1, 2).contiguous()
    x = x + _linear(attn.o_proj, o.reshape(B, T, -1).contiguous())
    h = _rms(layer.post_attention_layernorm, x)
    gu = mlp.gate_up_proj.forward(h)
    n = mlp.gate_proj.out_features
    return x + _linear(mlp.down_proj, mlp.act_fn(gu[..., :n]) * gu[..., n:])


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


def block_fn(layers: list[nn.Module]) -> Callable:
    """`fast_block` if every block of `layers` supports it, else the HF call."""
    return fast_block if layers and all(supports_fast_block(b) for b in layers) else call_layer
