"""Value types shared by the runtime, the engine and serving (sampling parameters, a stitch's latency
profile, the engine's config): no torch, no imports from the rest of
stitchlib, so that every module can depend on them without a cycle (runtime -> engine -> types)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_TOP_LOGPROBS = 20  # as OpenAI's top_logprobs
# torch.compile modes that capture their own CUDA graphs (copying inputs every call): DecodeGraphs
# captures the whole step instead, so compiled blocks must not
CUDAGRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")
# How the anchors' linears are held for serving (stitchlib.quant): float, int8 / int4 weight-only, or
# int4 / int8 weights with int8-rounded activations (integer dot products: w4a8, w8a8). Here,
# torch-free, for the CLIs.
QuantMode = Literal["none", "int8", "int4", "w4a8", "w8a8"]
QUANT_MODES: tuple[str, ...] = ("none", "int8", "int4", "w4a8", "w8a8")


def parse_quantize(spec: str) -> tuple[str, str]:
    """A quantization spec -> (small anchor's mode, large anchor's mode). The spec is one mode for both
    anchors ("w4a8") or one per anchor ("small=int8,large=w4a8"): the 0.5B anchor loses more to int4
    than the 1.5B one (benchmarks/QUANT.md section 2), so a pair may hold them differently."""
    def mode(m: str) -> str:
        if m not in QUANT_MODES:
            raise ValueError(f"unknown quantization {m!r}; choose one of {', '.join(QUANT_MODES)}, "
                             "or one per anchor: small=MODE,large=MODE")
        return m

    spec = str(spec).strip()
    if "=" not in spec:
        return mode(spec), mode(spec)
    parts = dict(p.strip().split("=", 1) if "=" in p else (p.strip(), "") for p in spec.split(","))
    if set(parts) != {"small", "large"} or len(spec.split(",")) != 2:
        raise ValueError(f"quantization {spec!r}: per anchor it reads small=MODE,large=MODE")
    return mode(parts["small"].strip()), mode(parts["large"].strip())


def canonical_quantize(spec: str) -> str:
    """The spec's one spelling (what profile tables record and compare): "w4a8" when both anchors
    agree, else "small=int8,large=w4a8"."""
    small, large = parse_quantize(spec)
    return small if small == large else f"small={small},large={large}"


def quantize_suffix(spec: str) -> str:
    """File-name form of a canonical spec ("" for none): profile-cpu-<this>.json."""
    spec = canonical_quantize(spec)
    return "" if spec == "none" else "-" + spec.replace("=", "-").replace(",", "-")


QUANTIZE_METAVAR = "{" + ",".join(QUANT_MODES) + "} | small=MODE,large=MODE"


def quantize_arg(value: str) -> str:
    """argparse `type=` for --quantize."""
    import argparse

    try:
        return canonical_quantize(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class SamplingParams(BaseModel):
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop_token_ids: list[int] = Field(default_factory=list)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description=(
        "per generated token: its log-probability and the `logprobs` most likely alternatives, from the "
        "raw logits (before temperature and top-p); None: none"))
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description=(
        "per prompt token after the first: its log-probability given the tokens before it, and the "
        "`prompt_logprobs` most likely alternatives; None: none"))


class StitchProfile(BaseModel):
    """One route's latency on some hardware: prefill seconds per prompt token, and seconds per decode
    step by batch size."""

    prefill_s_per_token: float
    decode_step_s: dict[int, float]


class EngineConfig(BaseModel):
    """Every option of `stitchlib.engine.StitchEngine`. Unknown keys and impossible values are errors
    (serving exposes this model as the `engine` section of a palette's YAML)."""

    model_config = ConfigDict(extra="forbid")

    max_slots: int = Field(8, ge=1, description="requests decoded concurrently (KV cache rows)")
    max_seq_len: int = Field(1024, ge=2, description="positions per request: prompt + generated tokens")
    kv_block: int = Field(64, ge=1, description="attention spans the longest row rounded up to a multiple of this "
                                                "(fewer distinct shapes for CUDA graphs, less scanning than max_seq_len)")
    prefill_tokens: int = Field(4096, ge=1, description="padded tokens per prefill call; joiners beyond it are "
                                                        "prefilled in further calls of the same step")
    prefill_chunk: int | None = Field(None, ge=1, description="prompt tokens prefilled per step (chunked prefill: a "
                                                              "longer prompt is written over several steps while "
                                                              "the running rows keep decoding); None: whole prompts "
                                                              "in the step that admits them")
    stitches: list[str] | None = Field(None, min_length=1, description="stitches this engine serves (sizes the "
                                                                       "caches); None: all")
    cuda_graphs: bool | None = Field(None, description="capture decode steps in CUDA graphs (None: on for CUDA)")
    compile_layers: bool = Field(False, description="torch.compile the decoder-block call (one compiled graph "
                                                    "per anchor and shape, shared by every block)")
    compile_mode: str | None = Field(None, description="torch.compile mode for compile_layers: None, 'default' or "
                                                       "'max-autotune-no-cudagraphs' (no mode that captures CUDA "
                                                       "graphs itself)")
    max_graphs: int = Field(32, ge=1, description="captured decode graphs kept (LRU)")
    batch_buckets: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 128], min_length=1,
                                     description="decode batches are padded up to the next bucket (capped at "
                                                 "max_slots) so one captured graph serves several batch sizes; "
                                                 "increasing, each >= 1")
    pad_to_bucket: bool | None = Field(None, description="pad decode batches to a bucket (None: when using CUDA graphs)")
    fast_blocks: bool = Field(True, description="call quantized anchors' blocks through stitchlib.engine.blocks "
                                                "(fused q/k/v and gate/up, the same numbers as the HF call) where "
                                                "every block supports it; false: the HF call")

    @field_validator("batch_buckets")
    @classmethod
    def _buckets(cls, v: list[int]) -> list[int]:
        if v[0] < 1 or any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError(f"batch_buckets must be increasing batch sizes >= 1, got {v}")
        return v

    @model_validator(mode="after")
    def _compile(self) -> "EngineConfig":
        if self.compile_mode in CUDAGRAPH_COMPILE_MODES:
            raise ValueError(f"compile_mode {self.compile_mode!r} captures its own CUDA graphs (copying inputs "
                             f"every call); use None, 'default' or 'max-autotune-no-cudagraphs' (cuda_graphs "
                             f"captures the whole decode step)")
        if self.compile_mode is not None and not self.compile_layers:
            raise ValueError(f"compile_mode {self.compile_mode!r} is set but compile_layers is off: set "
                             f"compile_layers: true, or drop compile_mode")
        return self
