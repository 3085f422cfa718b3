"""Serving configuration: pydantic models, loadable from YAML, validated with one clear line per problem.

`ServeConfig` is the whole application (ingress + one deployment per palette); it is also the `args`
block of a Ray Serve config file (`deploy/*.yaml`), so `serve run` / `serve deploy` and
`stitchserve serve` validate the same way. Nested Ray options (`autoscaling_config`,
`ray_actor_options`) are checked against Serve's own schema, and keys Serve would silently ignore
(e.g. `target_num_ongoing_requests_per_replica`, docs/DESIGN_NOTES.md section 4) are rejected.

A palette's `engine` section is `stitchlib.engine.EngineConfig` itself, so every engine option (CUDA
graphs, compiled blocks, buckets, prefill sizes, ...) is reachable from YAML; the options serving
already names at the palette's top level (`max_batch_size`, `max_seq_len`, `prefill_chunk`) are set
there only. `PaletteDeploymentConfig.engine_config(max_context)` resolves the one engine config a replica
runs with. Nothing is clamped silently: a value that cannot hold is a validation error.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_serializer, field_validator,
                      model_validator)

from stitchlib.gate import MIN_SAVING
from stitchlib.types import EngineConfig, canonical_quantize

from .budget import BudgetError, try_parse_budget
from .stitch_router import PercentBasis

API_KEY_ENV = "STITCHSERVE_API_KEY"
DEFAULT_SLOT_POSITIONS = 4096  # engine slot length when neither max_seq_len nor max_prompt_tokens is set
# engine options a palette sets at its top level (serving's names), and the engine's own name for each
ENGINE_KEYS_AT_TOP = {"max_slots": "set max_batch_size (the palette's key) instead",
                      "max_seq_len": "set max_seq_len at the palette's top level instead",
                      "prefill_chunk": "set prefill_chunk at the palette's top level instead",
                      "stitches": "the engine serves the palette's deployed stitches; remove the key"}


class ServeConfigError(ValueError):
    """A serving configuration is missing, unreadable or invalid. The message lists every problem."""


def _format_validation_error(e: ValidationError, where: str) -> str:
    lines = [f"invalid serving configuration ({where}):"]
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def _nested_errors(e: ValidationError) -> str:
    """Errors of a nested Serve schema, each with its field name."""
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'value'}: {err['msg'].removeprefix('Value error, ')}"
                     for err in e.errors())


def _check_keys(d: dict[str, Any], allowed: set[str], what: str, hints: dict[str, str] | None = None) -> None:
    unknown = sorted(set(d) - allowed)
    if unknown:
        hint = "".join(f" ('{k}': use '{hints[k]}')" for k in unknown if hints and k in hints)
        raise ValueError(f"unknown {what} key(s) {unknown}{hint}; allowed: {sorted(allowed)}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DeploymentOptions(_Strict):
    """Ray Serve deployment options for one deployment (passed to `Deployment.options`)."""

    num_replicas: int | None = Field(1, ge=1, description="fixed replica count; ignored with autoscaling_config")
    autoscaling_config: dict[str, Any] | None = Field(
        None, description="Ray Serve AutoscalingConfig: min_replicas, max_replicas, target_ongoing_requests, ...")
    max_ongoing_requests: int | None = Field(
        None, ge=1, description="per replica; default for chat 2 x max_batch_size (the engine's slots plus as "
                                "many requests waiting to take a slot the step it frees), for classify "
                                "max_batch_size x stitches (every stitch's batch can fill)")
    max_queued_requests: int = Field(64, ge=-1, description="handle-side queue; beyond it 503 (-1: unbounded)")
    ray_actor_options: dict[str, Any] = Field(default_factory=lambda: {"num_cpus": 1})
    graceful_shutdown_wait_loop_s: float = Field(1.0, gt=0)
    graceful_shutdown_timeout_s: float = Field(20.0, gt=0)
    health_check_period_s: float = Field(10.0, gt=0)
    health_check_timeout_s: float = Field(30.0, gt=0)

    @field_validator("autoscaling_config")
    @classmethod
    def _autoscaling(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is None:
            return None
        from ray.serve.config import AutoscalingConfig

        _check_keys(v, set(AutoscalingConfig.model_fields), "autoscaling_config",
                    {"target_num_ongoing_requests_per_replica": "target_ongoing_requests"})
        try:
            AutoscalingConfig(**v)
        except ValidationError as e:
            raise ValueError(_nested_errors(e)) from None
        return v

    @field_validator("ray_actor_options")
    @classmethod
    def _actor_options(cls, v: dict[str, Any]) -> dict[str, Any]:
        from ray.serve.schema import RayActorOptionsSchema

        _check_keys(v, set(RayActorOptionsSchema.model_fields), "ray_actor_options",
                    {"num_cpu": "num_cpus", "num_gpu": "num_gpus"})
        try:
            RayActorOptionsSchema(**v)
        except ValidationError as e:
            raise ValueError(_nested_errors(e)) from None
        return v

    def to_options(self, *, default_max_ongoing: int) -> dict[str, Any]:
        opts: dict[str, Any] = dict(
            max_ongoing_requests=self.max_ongoing_requests or default_max_ongoing,
            max_queued_requests=self.max_queued_requests,
            ray_actor_options=dict(self.ray_actor_options),
            graceful_shutdown_wait_loop_s=self.graceful_shutdown_wait_loop_s,
            graceful_shutdown_timeout_s=self.graceful_shutdown_timeout_s,
            health_check_period_s=self.health_check_period_s,
            health_check_timeout_s=self.health_check_timeout_s,
        )
        if self.autoscaling_config is not None:
            opts["autoscaling_config"] = dict(self.autoscaling_config)
        else:
            opts["num_replicas"] = self.num_replicas
        return opts


class ProfileConfig(_Strict):
    """Start-up latency profile of every deployed stitch on the replica's own hardware."""

    prompt_len: int = Field(32, ge=1)
    decode_steps: int = Field(16, ge=1, description="timed decode steps per stitch and batch size (median); the "
                              "stitches' steps are taken in turn. 16: the served front's 2 % margin sits 3 standard "
                              "deviations of a pairwise ratio from the closest real savings (benchmarks/QUANT.md 3.6)")
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 2, 4, 8], min_length=1)
    table: Path | None = Field(None, description="a saved table from `stitchserve profile` to use instead of "
                                                 "measuring at start-up; a table for another device, dtype or "
                                                 "anchor pair, or one missing a deployed stitch, is ignored "
                                                 "with a warning and the replica measures")

    @field_validator("batch_sizes")
    @classmethod
    def _sizes(cls, v: list[int]) -> list[int]:
        if any(b < 1 for b in v):
            raise ValueError("batch sizes must be >= 1")
        return sorted(set(v))


class FaultInjection(_Strict):
    """TESTING ONLY (chaos tests): faults a replica injects into itself on request. Off unless set."""

    stall_marker: str = Field(min_length=8, description="a generation request whose prompt text contains this "
                                                        "string makes the next engine step hang")
    stall_s: float = Field(gt=0, description="how long that step hangs (as a wedged kernel would)")


class PaletteDeploymentConfig(_Strict):
    """One palette, served by its own deployment; each replica holds one anchor pair with it merged."""

    path: Path = Field(description="palette directory (manifest.json + safetensors)")
    name: str | None = Field(None, description="model id in the API; default: the palette manifest's name")
    task: Literal["chat", "classify"] | None = Field(None, description="default: from the manifest")
    device: str = "cpu"
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    quantize: str = Field("none", description="anchors' linears held as weight-only int8 / int4 codes, or int4 "
                          "codes multiplied with int8-rounded activations (w4a8), after the LoRA merge: one of "
                          "none, int8, int4, w4a8, or one per anchor (small=int8,large=w4a8); stitching layers and "
                          "stitch-specific biases stay exact (benchmarks/QUANT.md)")
    # routing
    default_budget: str | None = Field(None, description="X-Compute-Budget applied when a request has none")
    percent_basis: PercentBasis = Field("gflops", description="what a '<n>%' budget is a share of")
    min_latency_saving: float | None = Field(MIN_SAVING, ge=0, lt=1, description=(
        "served front: budgets are routed to a stitch only when its profiled decode step (geometric mean over "
        "the profiled batch sizes, in the served dtype and quantization, on this replica) is at least this "
        "share cheaper than every better "
        "deployed route's; a stitch that is not is shadowed by that route (listed in /v1/stitches with "
        "routed: false, still reachable with X-Stitch-Id). null: every deployed stitch is routed "
        "(stitchlib.gate.served_front)"))
    # batching
    max_batch_size: int = Field(8, ge=1, description="generation: rows decoded together in one engine step, "
                                                     "whatever their stitches (the engine's KV-cache slots; "
                                                     "more requests wait for a slot); classification: rows per "
                                                     "batch of one stitch")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="classification only: how long a batch waits to "
                                                                "fill (a generation request joins the running "
                                                                "batch at the next engine step)")
    max_seq_len: int | None = Field(None, ge=2, description="positions per engine slot (prompt + output tokens); "
                                                            "default max_prompt_tokens + max_tokens_limit, or "
                                                            f"{DEFAULT_SLOT_POSITIONS} when max_prompt_tokens is unset "
                                                            "(the cache is preallocated: max_batch_size x max_seq_len "
                                                            "positions; a 32k context would be ~11 GB on the Qwen "
                                                            "pair); never more than the context")
    prefill_chunk: int | None = Field(512, ge=1, description="generation: prompt tokens prefilled per engine step "
                                                             "(chunked prefill): a long prompt is written over several "
                                                             "steps while the running requests keep getting tokens, "
                                                             "so it delays each of their tokens by one chunk's prefill "
                                                             "instead of its whole prompt's; null: whole prompts in "
                                                             "the step that admits them (best time to first token "
                                                             "when prompts are short)")
    stream_interval_s: float = Field(0.02, ge=0, description="streamed deltas are coalesced to at most one per "
                                                             "interval (the first is sent at once): each item "
                                                             "crossing Ray costs about a millisecond of CPU")
    # limits
    max_prompt_tokens: int | None = Field(None, ge=1, description="default: the palette's context")
    default_max_tokens: int = Field(64, ge=1)
    max_tokens_limit: int = Field(1024, ge=1)
    max_inflight: int = Field(64, ge=1, description="admitted requests per replica; beyond it 503")
    retry_after_s: int = Field(1, ge=0)
    step_timeout_s: float | None = Field(60.0, gt=0, description="engine watchdog: a step running longer fails "
                                                                  "the requests in it at once (503), refuses new "
                                                                  "ones and fails the health check until it "
                                                                  "returns (Serve replaces a replica whose step "
                                                                  "never does); null: no watchdog")
    fault_injection: FaultInjection | None = Field(None, description="TESTING ONLY: self-inflicted faults for "
                                                                     "chaos tests; leave unset")
    # latency model
    profile: ProfileConfig = Field(default_factory=ProfileConfig)
    ewma_alpha: float = Field(0.2, gt=0, le=1)
    budget_quantile: float | None = Field(None, gt=0, le=1, description="latency budgets are checked against "
                                                                         "estimate x this quantile of recent "
                                                                         "observed/estimated ratios (finished "
                                                                         "requests), so requests are downgraded "
                                                                         "when admitted instead of served late; "
                                                                         "null: the bare estimate")
    engine: EngineConfig = Field(default_factory=EngineConfig, description=(
        "every other option of the stitchlib engine (stitchlib.engine.EngineConfig): cuda_graphs, compile_layers, "
        "compile_mode, max_graphs, batch_buckets, pad_to_bucket, kv_block, prefill_tokens, fast_blocks. Its max_slots, "
        "max_seq_len and prefill_chunk are this palette's max_batch_size, max_seq_len and prefill_chunk, and it "
        "serves the palette's deployed stitches"))
    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions)

    @model_validator(mode="before")
    @classmethod
    def _removed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "max_concurrent_batches" in data:
            raise ValueError("max_concurrent_batches was removed: generation is continuously batched (up to "
                             "max_batch_size rows of any stitches per engine step) and classification batches "
                             "run one at a time on the engine thread; delete the key")
        engine = data.get("engine") if isinstance(data, dict) else None
        if isinstance(engine, dict):  # one key per option: the palette's own name where it has one
            twice = [k for k in ENGINE_KEYS_AT_TOP if k in engine]
            if twice:
                raise ValueError("; ".join(f"engine.{k}: {ENGINE_KEYS_AT_TOP[k]}" for k in twice))
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "PaletteDeploymentConfig":
        """Values that cannot all hold: refused here rather than one of them quietly lowered."""
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(f"default_max_tokens ({self.default_max_tokens}) is over max_tokens_limit "
                             f"({self.max_tokens_limit})")
        if self.max_seq_len is not None and self.max_prompt_tokens is not None \
                and self.max_prompt_tokens >= self.max_seq_len:
            raise ValueError(f"max_prompt_tokens ({self.max_prompt_tokens}) leaves no room for output in an engine "
                             f"slot of max_seq_len ({self.max_seq_len}) positions")
        if self.engine.cuda_graphs and not self.device.startswith("cuda"):
            raise ValueError(f"engine.cuda_graphs needs a CUDA device; device is {self.device!r}")
        return self

    @field_serializer("engine")
    def _engine_as_given(self, v: EngineConfig) -> dict[str, Any]:
        # the options given, as in the YAML: a dump validates again (the replica receives one) without
        # naming the keys the palette sets at its top level
        return v.model_dump(mode="json", exclude_unset=True)

    def engine_config(self, max_context: int) -> EngineConfig:
        """The one engine config a replica of this palette runs with, for a palette whose anchors hold
        `max_context` positions. A slot length given as `max_seq_len` must fit that context; the
        derived default (`slot_positions`) is the context at most."""
        if self.max_seq_len is not None and self.max_seq_len > max_context:
            raise ServeConfigError(f"palette {str(self.path)!r}: max_seq_len ({self.max_seq_len}) is over the "
                                   f"palette's context of {max_context} positions")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens >= max_context:
            raise ServeConfigError(f"palette {str(self.path)!r}: max_prompt_tokens ({self.max_prompt_tokens}) "
                                   f"leaves no room for output in the palette's context of {max_context} positions")
        return EngineConfig.model_validate({
            **self.engine.model_dump(exclude_unset=True), "max_slots": self.max_batch_size,
            "max_seq_len": min(self.slot_positions, max_context), "prefill_chunk": self.prefill_chunk})

    @property
    def slot_positions(self) -> int:
        """What a generation engine slot holds (capped at the palette's context by the engine); see `max_seq_len`."""
        if self.max_seq_len is not None:
            return self.max_seq_len
        if self.max_prompt_tokens is not None:
            return self.max_prompt_tokens + self.max_tokens_limit
        return DEFAULT_SLOT_POSITIONS

    @field_validator("quantize")
    @classmethod
    def _quantize(cls, v: str) -> str:
        return canonical_quantize(v)  # ValueError: the spec's own message

    @field_validator("default_budget")
    @classmethod
    def _budget(cls, v: str | None) -> str | None:
        if v is None:
            return None
        parsed = try_parse_budget(v)
        if isinstance(parsed, BudgetError):
            raise ValueError(str(parsed))
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and (not v or "/" in v or v.strip() != v):
            raise ValueError(f"model name {v!r} must be non-empty, without '/' or surrounding spaces")
        return v

    def resolved(self) -> "PaletteDeploymentConfig":
        """Fill `name` and `task` from the palette manifest (cheap: JSON only, no weights)."""
        if self.name is not None and self.task is not None:
            return self
        from stitchlib.errors import PaletteError
        from stitchlib.palette import read_manifest

        try:
            m = read_manifest(self.path)
        except PaletteError as e:
            raise ServeConfigError(f"palette {str(self.path)!r}: {e} (or give both 'name' and 'task')") from None
        return self.model_copy(update={"name": self.name or m.name, "task": self.task or m.task})

    @property
    def deployment_name(self) -> str:
        return f"Palette-{self.name}"


def _ingress_defaults() -> DeploymentOptions:
    return DeploymentOptions(num_replicas=1, max_ongoing_requests=256, max_queued_requests=-1,
                             ray_actor_options={"num_cpus": 0.1})


class ServeConfig(_Strict):
    """The whole application: one FastAPI ingress routing to one deployment per palette."""

    palettes: list[PaletteDeploymentConfig] = Field(min_length=1)
    app_name: str = "stitchserve"
    route_prefix: str = "/"
    host: str = Field("127.0.0.1", description="HTTP bind address of Serve's proxy (CLI only)")
    port: int = Field(8000, ge=1, le=65535)
    api_key: SecretStr | None = Field(None, description=f"Bearer key for every route; or env {API_KEY_ENV}")
    request_timeout_s: float = Field(120.0, gt=0, description="per request; clients may ask for less with "
                                                               "header x-request-timeout-seconds")
    max_request_bytes: int = Field(1 << 20, ge=1024)
    relay_metrics: bool = Field(True, description="serve Ray's exported stitchserve_* metrics on /metrics")
    ingress: DeploymentOptions = Field(default_factory=_ingress_defaults)

    @model_validator(mode="after")
    def _unique_names(self) -> "ServeConfig":
        names = [p.name for p in self.palettes if p.name is not None]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"palette names must be unique; repeated: {dup}")
        if not self.route_prefix.startswith("/"):
            raise ValueError("route_prefix must start with '/'")
        return self

    def effective_api_key(self) -> str | None:
        if self.api_key is not None and self.api_key.get_secret_value():
            return self.api_key.get_secret_value()
        return os.environ.get(API_KEY_ENV) or None

    def resolved(self) -> "ServeConfig":
        """Names and tasks from the manifests; relative palette paths made absolute against the current
        directory (the builder's process: replicas run elsewhere, in other working directories)."""
        pals = [p.model_copy(update={"path": p.path if p.path.is_absolute() else (Path.cwd() / p.path)}).resolved()
                for p in self.palettes]
        names = [p.name for p in pals]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ServeConfigError(f"palette names must be unique; repeated: {dup} (set 'name' per palette)")
        return self.model_copy(update={"palettes": pals})

    # ---- loading ---------------------------------------------------------------------------------
    @classmethod
    def validate_dict(cls, data: Any, where: str = "config") -> "ServeConfig":
        if isinstance(data, ServeConfig):
            return data
        if not isinstance(data, dict):
            raise ServeConfigError(f"invalid serving configuration ({where}): expected a mapping, "
                                   f"got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ServeConfigError(_format_validation_error(e, where)) from None

    @classmethod
    def from_yaml(cls, path: str | Path, *, app: str | None = None) -> "ServeConfig":
        """Read a stitchserve YAML, or the `args` of one application in a Ray Serve config file.
        Relative palette paths stay relative to the current directory, as with `serve run`."""
        p = Path(path)
        try:
            data = yaml.safe_load(p.read_text())
        except FileNotFoundError:
            raise ServeConfigError(f"config file {str(p)!r} does not exist") from None
        except yaml.YAMLError as e:
            raise ServeConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if isinstance(data, dict) and "applications" in data:  # a Ray Serve config file
            apps = data.get("applications") or []
            chosen = [a for a in apps if app is None or a.get("name") == app]
            if not chosen:
                raise ServeConfigError(f"{str(p)!r}: no application {app!r} in 'applications'")
            data = chosen[0].get("args") or {}
        return cls.validate_dict(data, where=str(p))
