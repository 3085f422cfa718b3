"""Weight-only quantized linears for serving: int8 per output channel, int4 group-wise.

Decode on a CPU is bound by the bytes of weights read per token, so serving holds the anchors'
decoder-block linears (and the LM head) as int8 or int4 codes and multiplies with torch's own packed
kernels, picked by measurement (benchmarks/QUANT.md):

- int8: `torch._weight_int8pack_mm(x, q [N, K] int8, scales [N])`, symmetric per output channel.
- int4: `aten._weight_int4pack_mm_for_cpu` (CPU) / `aten._weight_int4pack_mm` (CUDA, sm80+), asymmetric
  per group of `group_size` input columns; codes q in [0, 15], dequantized w = (q - 8) * scale + zero
  (the layout of those kernels' `qScaleAndZeros` [K / group_size, N, 2]).

- w8a8: the int8 codes, the activations rounded as in w4a8, the same kernel file (`w8a8_reference`).
- w4a8: the int4 codes, multiplied with the activations quantized per call to int8 per row and group
  (`round(x * 127 / amax)`), as integer dot products (`stitchlib/kernels/w4a8.cpp`, AVX512-VNNI, built
  on first use). Not weight-only: the activation rounding is part of the arithmetic (`w4a8_reference`
  is that arithmetic in pure torch). Why: torch's int4 kernel is arithmetic-bound past 4 rows, this one
  reads each weight once for up to 8 rows (benchmarks/QUANT.md section 4c).

Where a kernel is missing (int8 on CUDA, an odd shape, an unsupported dtype) the layer keeps the codes
as they are and dequantizes per call in pure torch (`backend = "reference"`), with one log line saying
so. The same pure-torch dequantization (`dequantize`) is the reference the tests hold the kernels to.

Fused projections: q/k/v of a block are quantized as one [q; k; v] matrix and gate/up as one
[gate; up] (each output row is quantized on its own, so the codes are those of the separate layers and
the kernels give the same numbers bit for bit): the engine's decode block (`stitchlib.engine.blocks`)
calls one kernel for each instead of three and two. The HF modules keep working on the same storage:
q_proj / k_proj / v_proj (gate_proj / up_proj) become `QuantSlice`s, column ranges of the fused
output, which is computed once per input.

Quantize AFTER the LoRA merge (`StitchedLM.merge_lora_`): a merged weight is a plain nn.Linear and the
merge needs float weights. Stitching layers and stitch-specific biases (PSTLinear.ssb) stay exact:
only the frozen shared weights under them are swapped.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .kernels import w4a8_kernel, w8a8_kernel
from .pst import PSTLinear
from .types import QUANT_MODES, QuantMode, parse_quantize

log = logging.getLogger(__name__)

INT4_CODES = ("int4", "w4a8")  # the modes holding int4 group-wise codes
INT8_CODES = ("int8", "w8a8")  # ... int8 per-channel codes
ACT_MODES = ("w4a8", "w8a8")  # ... whose activations are rounded to int8 too (not weight-only)
DEFAULT_GROUP_SIZE = 32  # llama.cpp's block size; 64 / 128 read 5-8 % fewer bytes but decode no faster here
                         # (benchmarks/QUANT.md, kernel table), and finer groups lose less quality
INT4_GROUP_SIZES = (32, 64, 128, 256)
_INNER_K_TILES = 8  # CUDA tinygemm layout; the CPU packing ignores it
# From this many rows on (prefill), int8 dequantizes the weight and runs the dense GEMM: the packed
# kernel is a GEMV design, ~2.5x slower than bf16 at 1024 rows, while dequantize + GEMM costs ~bf16's
# time (benchmarks/QUANT.md). int4's packed layout cannot be dequantized cheaply; it stays on its kernel.
DENSE_ROWS = 64


# The kernels as OpOverloads, bound once (a packet lookup per call costs more than a small GEMV here).
_INT8_MM = torch.ops.aten._weight_int8pack_mm.default
_INT4_MM_CPU = torch.ops.aten._weight_int4pack_mm_for_cpu.default
_INT4_MM_CUDA = torch.ops.aten._weight_int4pack_mm.default


_WARNED: set[tuple[str, str, str]] = set()
# The native ops once loaded (stitchlib.kernels), bound as OpOverloads: a plain lookup per call, which
# torch.compile also traces (the loader itself touches the file system).
_NATIVE: dict[str, object] = {}


def check_mode(mode: str) -> QuantMode:
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization {mode!r}; choose one of {', '.join(QUANT_MODES)}")
    return mode  # type: ignore[return-value]


@dataclass
class QuantizedWeight:
    """Codes and scales of one [N, K] weight, kernel-independent (the reference's input).

    int8 / w8a8: codes int8 [N, K], scales [N], zeros None (w8a8: group_size = the activations' group).
    int4 / w4a8: codes uint8 [N, K] in 0..15, scales / zeros [N, K // group_size]."""

    mode: QuantMode
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    group_size: int | None


@torch.no_grad()
def quantize_weight(w: torch.Tensor, mode: QuantMode, *, group_size: int = DEFAULT_GROUP_SIZE,
                    scale_dtype: torch.dtype = torch.bfloat16) -> QuantizedWeight:
    """w: [N, K] float. Scales (and zeros) are rounded to `scale_dtype` first and the codes are
    computed against the rounded values, so the kernels (which read them in that dtype) and the
    reference dequantize the same numbers."""
    w = w.detach().float()
    N, K = w.shape
    if mode in INT8_CODES:
        scale = (w.abs().amax(1) / 127).clamp(min=1e-8).to(scale_dtype)  # [N]
        q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
        return QuantizedWeight(mode, q, scale, None, group_size if mode == "w8a8" else None)
    if mode in INT4_CODES:
        if K % group_size:
            raise ValueError(f"int4 group size {group_size} does not divide the input size {K}")
        g = w.view(N, K // group_size, group_size)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo).clamp(min=1e-6) / 15).to(scale_dtype)
        zero = (lo + 8 * scale.float()).to(scale_dtype)  # the value code 8 stands for
        s, z = scale.float()[..., None], zero.float()[..., None]
        q = torch.round((g - (z - 8 * s)) / s).clamp(0, 15).to(torch.uint8).view(N, K)
        return QuantizedWeight(mode, q, scale, zero, group_size)
    raise ValueError(f"cannot quantize to {mode!r}")


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The pure-torch reference: [N, K] weight in `dtype` (computed in float32)."""
    if qw.mode in INT8_CODES:
        return (qw.codes.float() * qw.scales.float()[:, None]).to(dtype)
    N, K = qw.codes.shape
    gs = qw.group_size
    q = qw.codes.view(N, K // gs, gs).float()
    w = (q - 8) * qw.scales.float()[..., None] + qw.zeros.float()[..., None]
    return w.view(N, K).to(dtype)


def quantize_activations(x2: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w4a8's activation rounding, as the kernel does it: x2 [M, K] -> (codes [M, K/g, g] float holding
    integers in -127..127, scales sa [M, K/g], float sums [M, K/g]); x ~= sa * codes per group."""
    M, K = x2.shape
    xf = x2.float().view(M, K // group_size, group_size)
    amax = xf.abs().amax(-1, keepdim=True)
    # 127 / amax as a true division, as the kernel computes it (`scalar / tensor` is reciprocal x scalar,
    # one ulp off sometimes, and a code at a rounding tie then differs)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0).div_(amax), torch.zeros_like(amax))
    asum = xf[..., 0].clone()
    for k in range(1, group_size):  # one input at a time, the kernel's order
        asum += xf[..., k]
    return torch.round(xf * inv).clamp_(-127, 127), (amax / 127)[..., 0], asum


_REF_ROWS, _REF_COLS = 64, 4096  # the pure-torch path's tile: [64, 4096, K/g] float32 at most at a time


def _int_group_dots(qa: torch.Tensor, codes: torch.Tensor, gs: int) -> torch.Tensor:
    """sum_k codes[n, g, k] * qa[m, g, k] per group, exact: qa [M, K/g, g], codes [N, K] -> [M, N, K/g].
    Every product and partial sum is an integer under 2^24 (|q| <= 127, |qa| <= 127, g <= 256 ... w4a8's
    codes <= 15), so float32 holds them exactly whatever the summation order; float64 on a GPU, where
    float32 matmuls may run in TF32."""
    N, K = codes.shape
    dt = torch.float32 if qa.device.type == "cpu" else torch.float64
    c = codes.view(N, K // gs, gs).permute(1, 2, 0).to(dt)  # [K/g, g, N]
    return torch.bmm(qa.transpose(0, 1).to(dt), c).permute(1, 2, 0).float()


def _act_reference(x2: torch.Tensor, qw: QuantizedWeight, terms) -> torch.Tensor:
    """The activation-rounding kernels' arithmetic in pure torch, float32 [M, N], bit for bit, in tiles
    of rows and output channels (memory bounded). terms(idot [m, n, K/g], sa, asum, cols) -> the groups'
    float terms [m, n, K/g] (and a second set or None), added one group at a time in order, as the
    kernels add them; the caller applies what comes after the sum."""
    gs = qw.group_size
    M, N = x2.shape[0], qw.codes.shape[0]
    out = torch.empty(M, N, device=x2.device)
    for m0 in range(0, M, _REF_ROWS):
        qa, sa, asum = quantize_activations(x2[m0:m0 + _REF_ROWS], gs)
        for n0 in range(0, N, _REF_COLS):
            cols = slice(n0, n0 + _REF_COLS)
            t, u = terms(_int_group_dots(qa, qw.codes[cols], gs), sa, asum, cols)
            acc = torch.zeros(t.shape[:2], device=x2.device)
            for g in range(t.shape[-1]):
                acc = acc + t[..., g]
                if u is not None:
                    acc = acc + u[..., g]
            out[m0:m0 + _REF_ROWS, cols] = acc
    return out


def w4a8_reference(x2: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """The w4a8 kernel's arithmetic, float32 [M, N]: per group g, sum(q * qa) * (s * sa) +
    (z - 8 s) * sum(x), every float operation rounded on its own (no fused multiply-add)."""
    s, z = qw.scales.float(), qw.zeros.float()

    def terms(idot, sa, asum, cols):
        return idot * (s[cols][None] * sa[:, None]), (z[cols] - 8 * s[cols])[None] * asum[:, None]

    return _act_reference(x2, qw, terms)


def w8a8_reference(x2: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """The w8a8 kernel's arithmetic, float32 [M, N]: per group g, sum(q * qa) * sa, then times the
    channel's scale."""
    return _act_reference(x2, qw, lambda idot, sa, asum, cols: (idot * sa[:, None], None)) * qw.scales.float()


def pack_w8a8(qw: QuantizedWeight, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The w8a8 kernel's layouts: codes -> int8 [N/16, K/4, 64] (byte c*4+t of vector (b, j) =
    code[16b+c, 4j+t]), their sums per channel and group -> int16 [N/16, K/g, 16], scales -> [N]."""
    N, K = qw.codes.shape
    packed = qw.codes.view(N // 16, 16, K // 4, 4).permute(0, 2, 1, 3).reshape(N // 16, K // 4, 64).contiguous()
    wsum = qw.codes.view(N, K // qw.group_size, qw.group_size).sum(-1, dtype=torch.int32)  # |sum| <= 127 g
    wsum = wsum.view(N // 16, 16, -1).permute(0, 2, 1).to(torch.int16).contiguous()
    return packed, wsum, qw.scales.to(dtype).contiguous()


def pack_w4a8(qw: QuantizedWeight, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The w4a8 kernel's layouts (stitchlib/kernels/w4a8.cpp): codes -> uint8 [N/16, K/8, 64] (byte
    c*4+t of vector (b, j): code[16b+c, 8j+t] low nibble, code[16b+c, 8j+4+t] high nibble), scales and
    zeros -> [N/16, K/g, 2, 16] in `dtype`."""
    N, K = qw.codes.shape
    c = qw.codes.view(N // 16, 16, K // 8, 2, 4).permute(0, 2, 1, 4, 3)  # [b, j, c, t, half]
    packed = (c[..., 0] | (c[..., 1] << 4)).reshape(N // 16, K // 8, 64).contiguous()
    s, z = (t.view(N // 16, 16, K // qw.group_size).permute(0, 2, 1) for t in (qw.scales, qw.zeros))
    return packed, torch.stack([s, z], 2).to(dtype).contiguous()


def unpack_w4a8(packed: torch.Tensor) -> torch.Tensor:
    """pack_w4a8's codes back: [N/16, K/8, 64] -> [N, K] uint8."""
    nb, k8, _ = packed.shape
    c = torch.stack([packed & 15, packed >> 4], -1).view(nb, k8, 16, 4, 2)  # [b, j, c, t, half]
    return c.permute(0, 2, 1, 4, 3).reshape(nb * 16, k8 * 8)


def _pack_int4_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] uint8 in 0..15 -> [N, K / 2] uint8, even column in the high nibble (tinygemm's input)."""
    return (codes[:, ::2] << 4 | codes[:, 1::2]).contiguous()


class QuantLinear(nn.Module):
    """A frozen weight-only quantized nn.Linear (bias kept exact, in the compute dtype)."""

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, *, compute_dtype: torch.dtype,
                 device: torch.device | str = "cpu", name: str = "", reference: bool = False) -> None:
        super().__init__()
        self.mode, self.group_size = qw.mode, qw.group_size
        self.out_features, self.in_features = qw.codes.shape
        self.compute_dtype = compute_dtype
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(device, compute_dtype),
                                                           requires_grad=False)
        dev = torch.device(device)
        self.backend, why = ("reference", "asked for") if reference else self._pick_backend(dev, compute_dtype)
        if self.backend == "reference":  # a missing kernel is worth a warning (it is slow), once per reason
            warn = not reference and (self.mode, dev.type, why) not in _WARNED
            _WARNED.add((self.mode, dev.type, why))
            (log.warning if warn else log.info)(
                "%s: %s %sx%s on %s runs the pure-torch path (%s)%s", name or "QuantLinear", self.mode,
                self.out_features, self.in_features, dev.type, why, " (and so may other layers)" if warn else "")
        codes = qw.codes.to(dev)
        if self.mode == "w8a8" and self.backend != "reference":
            packed, wsum, scales = pack_w8a8(qw, compute_dtype)
            self.register_buffer("qweight", packed.to(dev))  # [N/16, K/4, 64] int8
            self.register_buffer("wsum", wsum.to(dev))  # [N/16, K/g, 16] int16
            self.register_buffer("scales", scales.to(dev))  # [N]
        elif self.mode in INT8_CODES:
            self.register_buffer("qweight", codes.contiguous())  # [N, K] int8
            self.register_buffer("scales", qw.scales.to(dev, compute_dtype).contiguous())  # [N]
        elif self.backend == "reference":
            self.register_buffer("qweight", _pack_int4_nibbles(codes))  # [N, K/2] uint8
            self.register_buffer("scales", qw.scales.to(dev, compute_dtype))  # [N, K/g]
            self.register_buffer("zeros", qw.zeros.to(dev, compute_dtype))
        elif self.mode == "w4a8":
            packed, sz = pack_w4a8(qw, compute_dtype)
            self.register_buffer("qweight", packed.to(dev))  # [N/16, K/8, 64] uint8
            self.register_buffer("scale_zeros", sz.to(dev))  # [N/16, K/g, 2, 16]
        else:
            if dev.type == "cuda":
                packed = torch.ops.aten._convert_weight_to_int4pack(_pack_int4_nibbles(codes), _INNER_K_TILES)
            else:
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), _INNER_K_TILES)
            self.register_buffer("qweight", packed)
            # [K/g, N, 2]: (scale, zero) per group and output channel
            sz = torch.stack([qw.scales.t(), qw.zeros.t()], -1).to(dev, compute_dtype).contiguous()
            self.register_buffer("scale_zeros", sz)

    def _pick_backend(self, dev: torch.device, dtype: torch.dtype) -> tuple[str, str]:
        """'packed' where torch has the kernel for this device, dtype and shape, else 'reference'."""
        if self.mode == "int8":
            if dev.type == "cpu":
                return "packed", ""
            return "reference", "torch has no int8 weight-only kernel for this device"
        if self.mode in ACT_MODES:
            if dev.type != "cpu":
                return "reference", f"the {self.mode} kernel is a CPU kernel"
            if dtype not in (torch.bfloat16, torch.float32):
                return "reference", f"the {self.mode} kernel takes float32 or bfloat16, not {dtype}"
            if self.out_features % 16 or self.group_size % 8 or self.in_features % self.group_size:
                return "reference", f"shape not a multiple of the {self.mode} kernel's tile"
            op, why = (w4a8_kernel if self.mode == "w4a8" else w8a8_kernel)()
            if op is None:
                return "reference", why
            _NATIVE[self.mode] = op
            return "packed", ""
        if dev.type == "cpu":
            if dtype not in (torch.bfloat16, torch.float16, torch.float32):
                return "reference", f"dtype {dtype}"
            return "packed", ""
        if dev.type == "cuda":
            if dtype != torch.bfloat16:
                return "reference", f"the CUDA int4 kernel takes bfloat16 activations, not {dtype}"
            if torch.cuda.get_device_capability(dev) < (8, 0):
                return "reference", "the CUDA int4 kernel needs compute capability 8.0+"
            if self.in_features % (_INNER_K_TILES * 16) or self.out_features % 8:
                return "reference", "shape not a multiple of the CUDA int4 tile"
            return "packed", ""
        return "reference", f"no int4 kernel for device type {dev.type}"

    @classmethod
    def from_linear(cls, lin: nn.Linear, mode: QuantMode, *, group_size: int = DEFAULT_GROUP_SIZE,
                    name: str = "", reference: bool = False) -> "QuantLinear":
        dtype = lin.weight.dtype
        qw = quantize_weight(lin.weight, mode, group_size=group_size, scale_dtype=dtype)
        return cls(qw, lin.bias, compute_dtype=dtype, device=lin.weight.device, name=name, reference=reference)

    def dequantized_weight(self) -> torch.Tensor:
        """[N, K] float32 as this layer computes with (the packed int4 layout is read back through the
        kernel itself: x = identity rows)."""
        if self.mode == "w8a8" and self.backend != "reference":
            nb, k4, _ = self.qweight.shape
            codes = self.qweight.view(nb, k4, 16, 4).permute(0, 2, 1, 3).reshape(nb * 16, k4 * 4)
            return codes.float() * self.scales.float()[:, None]
        if self.mode in INT8_CODES:
            return self.qweight.float() * self.scales.float()[:, None]
        if self.backend == "reference":
            return self._ref_weight(torch.float32)
        if self.mode == "w4a8":
            sz = self.scale_zeros.permute(0, 3, 1, 2).reshape(self.out_features, -1, 2)  # [N, K/g, 2]
            return dequantize(QuantizedWeight("w4a8", unpack_w4a8(self.qweight), sz[..., 0], sz[..., 1],
                                              self.group_size))
        eye = torch.eye(self.in_features, dtype=self.compute_dtype, device=self.qweight.device)
        return self._matmul(eye).float().t().contiguous()

    def _ref_codes(self) -> QuantizedWeight:  # the reference backend's codes
        if self.mode in INT8_CODES:
            return QuantizedWeight(self.mode, self.qweight, self.scales, None, self.group_size)
        hi, lo = self.qweight >> 4, self.qweight & 15
        codes = torch.stack([hi, lo], -1).view(self.out_features, self.in_features)
        return QuantizedWeight(self.mode, codes, self.scales, self.zeros, self.group_size)

    def _ref_weight(self, dtype: torch.dtype) -> torch.Tensor:
        if self.mode in INT8_CODES:
            return (self.qweight.float() * self.scales.float()[:, None]).to(dtype)
        return dequantize(self._ref_codes(), dtype)

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:  # x2: [M, K] compute dtype -> [M, N]
        if self.backend == "reference":
            if self.mode in ACT_MODES:
                ref = w4a8_reference if self.mode == "w4a8" else w8a8_reference
                return ref(x2, self._ref_codes()).to(x2.dtype)
            return F.linear(x2, self._ref_weight(x2.dtype))
        if self.mode == "w4a8":
            return _NATIVE["w4a8"](x2, self.qweight, self.scale_zeros, self.group_size)
        if self.mode == "w8a8":
            return _NATIVE["w8a8"](x2, self.qweight, self.wsum, self.scales, self.group_size)
        if self.mode == "int8":
            if x2.shape[0] >= DENSE_ROWS:
                return F.linear(x2, self.qweight.to(x2.dtype) * self.scales[:, None])
            return _INT8_MM(x2, self.qweight, self.scales)
        op = _INT4_MM_CUDA if x2.device.type == "cuda" else _INT4_MM_CPU
        return op(x2, self.qweight, self.group_size, self.scale_zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., K] -> [..., N]
        # ~200 calls per decode step of the large anchor: keep the Python here short
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != self.compute_dtype:
            x2 = x2.to(self.compute_dtype)
        y = self._matmul(x2.contiguous())
        if self.bias is not None:
            y = y.add_(self.bias)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def extra_repr(self) -> str:
        gs = f", group_size={self.group_size}" if self.group_size else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}{gs}, "
                f"backend={self.backend}, bias={self.bias is not None}")

    def weight_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())


class _FusedOutput:
    """The fused layer's output for the latest input, shared by the QuantSlices over it: the first slice
    computes it, the others read it (same input object, unchanged since), the last drops it."""

    def __init__(self, linear: QuantLinear, parts: int) -> None:
        self.linear, self.parts = linear, parts
        self._x: torch.Tensor | None = None
        self._y: torch.Tensor | None = None
        self._version, self._left = -1, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._left > 0 and x is self._x and x._version == self._version:
            y = self._y
        else:
            y = self.linear(x)
            self._x, self._y, self._version, self._left = x, y, x._version, self.parts
        self._left -= 1
        if self._left == 0:
            self._x = self._y = None  # hold no activations between block calls
        return y


class QuantSlice(nn.Module):
    """Output columns [start, stop) of a fused QuantLinear: what an HF projection module becomes once its
    rows are quantized together with its siblings'. The fused layer is registered on the parent module
    (e.g. `self_attn.qkv_proj`), not here, so its storage is counted and moved once."""

    def __init__(self, shared: _FusedOutput, start: int, stop: int) -> None:
        super().__init__()
        self._shared = shared
        self.start, self.stop = start, stop
        self.in_features, self.out_features = shared.linear.in_features, stop - start

    @property
    def fused(self) -> QuantLinear:
        return self._shared.linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._shared(x)[..., self.start:self.stop]

    def extra_repr(self) -> str:
        return f"columns {self.start}:{self.stop} of a fused {self.fused.mode} layer"


# (parent attribute for the fused layer, the sibling projections fused into it, the module holding them)
FUSED_GROUPS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("self_attn", "qkv_proj", ("q_proj", "k_proj", "v_proj")),
    ("mlp", "gate_up_proj", ("gate_proj", "up_proj")),
)


def _base(m: nn.Module | None) -> nn.Module | None:
    return m.base if isinstance(m, PSTLinear) else m  # the frozen linear under a PST wrapper


def _fusable(parent: nn.Module, names: tuple[str, ...]) -> list[nn.Linear] | None:
    """The plain nn.Linears under `names` if they can be quantized as one matrix (same input size and
    dtype, all with or all without a bias), else None."""
    lins = [_base(getattr(parent, n, None)) for n in names]
    if not all(type(lin) is nn.Linear for lin in lins):
        return None
    if len({(lin.in_features, lin.weight.dtype, lin.weight.device, lin.bias is None) for lin in lins}) != 1:
        return None
    return lins


def fused_layers(block: nn.Module) -> dict[str, QuantLinear]:
    """{"qkv_proj": ..., "gate_up_proj": ...} of a quantized decoder block (those it has)."""
    out = {}
    for holder, attr, _ in FUSED_GROUPS:
        m = getattr(getattr(block, holder, None), attr, None)
        if isinstance(m, QuantLinear):
            out[attr] = m
    return out


def _head_mode(mode: QuantMode, head_mode: QuantMode | None) -> QuantMode | None:
    """The LM head's mode (None: kept in float). It is read once per decode step, a quarter of the
    small anchor's bytes: at int8 the head alone took a third of an int4 step (benchmarks/QUANT.md)."""
    if head_mode is None:
        return mode
    return None if check_mode(head_mode) == "none" else head_mode


def _layer_mode(mode: QuantMode, lin: nn.Linear, group_size: int) -> QuantMode:
    """int4, w4a8 and w8a8 need whole groups along the input and an output size divisible by 16 (torch's
    CPU int4 packing, the native kernels' 16-channel blocks); a layer without them is held as int8."""
    if mode in (*INT4_CODES, "w8a8") and (lin.in_features % group_size or lin.out_features % 16):
        return "int8"
    return mode


def _targets(anchor, head: bool) -> list[tuple[nn.Module, str, nn.Linear, str]]:
    """(parent, attribute, linear, dotted name) of every plain nn.Linear in the decoder blocks (inside
    PSTLinear wrappers too: their `base`), and the LM head if `head`."""
    out = []
    for bi, block in enumerate(anchor.layers):
        for pname, parent in block.named_modules():
            for cname, child in parent.named_children():
                if type(child) is nn.Linear:
                    out.append((parent, cname, child, f"{anchor.name}.layers.{bi}.{pname}.{cname}".replace("..", ".")))
    if head and type(anchor.lm_head) is nn.Linear:
        out.append((anchor.model, "lm_head", anchor.lm_head, f"{anchor.name}.lm_head"))
    return out


@torch.no_grad()
def _fuse_block_(block: nn.Module, mode: QuantMode, group_size: int, name: str) -> list[nn.Linear]:
    """Quantize each FUSED_GROUPS set of `block` as one matrix (see the module docstring); the HF
    modules become QuantSlices of it. -> the linears fused (the rest is left to the caller)."""
    done = []
    for holder, attr, names in FUSED_GROUPS:
        parent = getattr(block, holder, None)
        lins = _fusable(parent, names) if parent is not None else None
        if not lins:
            continue
        w = torch.cat([lin.weight for lin in lins])
        cat = nn.Linear(w.shape[1], w.shape[0], bias=lins[0].bias is not None, device=w.device, dtype=w.dtype)
        cat.requires_grad_(False).weight.copy_(w)
        if lins[0].bias is not None:
            cat.bias.copy_(torch.cat([lin.bias for lin in lins]))
        m = _layer_mode(mode, cat, group_size)
        if any(_layer_mode(mode, lin, group_size) != m for lin in lins):
            continue  # the separate layers would be held in another mode: keep them separate
        fused = QuantLinear.from_linear(cat, m, group_size=group_size, name=f"{name}.{holder}.{attr}")
        setattr(parent, attr, fused)
        shared = _FusedOutput(fused, len(names))
        start = 0
        for n, lin in zip(names, lins):
            piece = QuantSlice(shared, start, start + lin.out_features)
            start += lin.out_features
            wrapper = getattr(parent, n)
            if isinstance(wrapper, PSTLinear):
                wrapper.base = piece
            else:
                setattr(parent, n, piece)
            done.append(lin)
    return done


def quantize_anchor_linears_(anchor, mode: QuantMode, *, group_size: int = DEFAULT_GROUP_SIZE,
                             head_mode: QuantMode | None = None, progress: bool = False, fuse: bool = True) -> dict:
    """Swap an anchor's decoder-block linears for QuantLinear(mode) and its LM head for
    QuantLinear(head_mode) (None: the same mode; "none": keep it in float). A tied head keeps the embedding table as it is
    (a step reads one row of it). A layer whose input size the int4 group size does not divide
    or whose output size is not a multiple of 16 falls back to int8. `fuse`: q/k/v and gate/up of each
    block quantized as one matrix each (`_fuse_block_`; same codes, one kernel call).
    -> summary {layers, fused, bytes_before, bytes_after, int8_fallbacks}."""
    check_mode(mode)
    if mode == "none":
        return {"layers": 0, "fused": 0, "bytes_before": 0, "bytes_after": 0, "int8_fallbacks": []}
    head_mode = _head_mode(mode, head_mode)
    items = _targets(anchor, head=head_mode is not None)
    before = sum(lin.weight.numel() * lin.weight.element_size() for _, _, lin, _ in items)
    fused: set[int] = set()  # ids of the nn.Linears quantized as part of a fused matrix
    after = 0
    if fuse:
        for bi, block in enumerate(anchor.layers):
            fused.update(map(id, _fuse_block_(block, mode, group_size, f"{anchor.name}.layers.{bi}")))
            after += sum(f.weight_bytes() for f in fused_layers(block).values())
    fallbacks = []
    rest = [it for it in items if id(it[2]) not in fused]
    it = tqdm(rest, desc=f"quantize {anchor.name} ({mode})", unit="linear") if progress else rest
    for parent, attr, lin, name in it:
        m = head_mode if attr == "lm_head" and parent is anchor.model else mode
        if _layer_mode(m, lin, group_size) != m:
            fallbacks.append(name)
            m = "int8"
        q = QuantLinear.from_linear(lin, m, group_size=group_size, name=name)
        after += q.weight_bytes()
        if attr == "lm_head" and parent is anchor.model:
            # HF ties lm_head.weight to embed_tokens.weight; the embedding keeps its own Parameter.
            parent.lm_head = q
            if getattr(parent.config, "tie_word_embeddings", False):
                parent.config.tie_word_embeddings = False  # nothing re-ties it to a module without .weight
        else:
            setattr(parent, attr, q)
    if fallbacks:
        log.warning("%s: %d linears held as int8 (int4 needs input %% group size %d == 0, output %% 16 == 0): %s",
                    anchor.name, len(fallbacks), group_size, fallbacks[:4])
    anchor.quantization = mode
    return {"layers": len(items), "fused": len(fused), "bytes_before": before, "bytes_after": after,
            "int8_fallbacks": fallbacks}


@torch.no_grad()
def quantize_model_(model, mode: str, *, group_size: int = DEFAULT_GROUP_SIZE,
                    head_mode: QuantMode | None = None, progress: bool = False, fuse: bool = True) -> dict:
    """Quantize both anchors of a StitchedLM for serving (after `merge_lora_`). `mode`: one mode for
    both anchors or one per anchor ("small=int8,large=w4a8", stitchlib.types.parse_quantize).
    Stitching layers and stitch-specific biases are untouched. -> {"small": summary, "large": summary}."""
    modes = dict(zip(("small", "large"), parse_quantize(mode)))
    unmerged = [m for m in [*model.pst_small, *model.pst_large] if m.lora_a is not None]
    if unmerged:
        raise ValueError("merge LoRA (model.merge_lora_()) before quantizing: the merge needs float weights")
    return {role: quantize_anchor_linears_(a, modes[role], group_size=group_size, head_mode=head_mode,
                                           progress=progress, fuse=fuse)
            for role, a in (("small", model.small_anchor), ("large", model.large_anchor))}


@torch.no_grad()
def fake_quantize_(model, mode: str, *, group_size: int = DEFAULT_GROUP_SIZE,
                   head_mode: QuantMode | None = None) -> None:
    """The reference model: every linear `quantize_model_` would swap keeps its nn.Linear but holds
    the pure-torch dequantized weight instead (same codes, same scales). w4a8, whose activations are
    rounded too, becomes a QuantLinear on the pure-torch path (`w4a8_reference`), one per HF linear."""
    for anchor, amode in zip((model.small_anchor, model.large_anchor), parse_quantize(mode)):
        if amode == "none":
            continue
        ahead = _head_mode(amode, head_mode)
        for parent, attr, lin, name in _targets(anchor, head=ahead is not None):
            m = _layer_mode(ahead if attr == "lm_head" and parent is anchor.model else amode, lin, group_size)
            if m in ACT_MODES:
                setattr(parent, attr, QuantLinear.from_linear(lin, m, group_size=group_size, name=name, reference=True))
                if attr == "lm_head" and parent is anchor.model:
                    parent.config.tie_word_embeddings = False
                continue
            qw = quantize_weight(lin.weight, m, group_size=group_size, scale_dtype=lin.weight.dtype)
            w = dequantize(qw, lin.weight.dtype)
            if attr == "lm_head" and parent is anchor.model:
                new = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                device=w.device, dtype=w.dtype).requires_grad_(False)
                new.weight.copy_(w)
                if lin.bias is not None:
                    new.bias.copy_(lin.bias)
                parent.lm_head = new  # untie: the embedding keeps the exact table, as in quantize_model_
                parent.config.tie_word_embeddings = False
            else:
                lin.weight.copy_(w)
