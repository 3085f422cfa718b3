"""The `X-Compute-Budget` header: grammar, parser and the typed `Budget` it produces.

Grammar (docs/DESIGN_NOTES.md section 3), case-insensitive, spaces allowed anywhere between tokens:

    budget   := term ("," term)*                 every term must hold
    term     := number unit
    number   := digits ["." digits] | "." digits  (no sign, no exponent; must be > 0)
    unit     := "ms" | "ms/token" | "s/token"     latency per output token (classify: per request)
              | "s" | "s/request" | "ms/request"  latency of the whole request
              | "kflops" | "mflops" | "gflops" | "tflops"  (also "...flop") forward FLOPs per token
              | "k" | "m" | "b"                   parameters (thousand, million, billion)
              | "%"                               share (0, 100] of the largest stitch's cost

Two terms of one kind keep the tighter one. Parsing returns errors as values (`BudgetError`); only
the HTTP layer turns them into a 400.
"""
from __future__ import annotations

import math
import re

from pydantic import BaseModel, ConfigDict, Field

from stitchlib.errors import BudgetError

__all__ = ["GRAMMAR", "Budget", "BudgetError", "parse_budget", "try_parse_budget"]

GRAMMAR = (
    "X-Compute-Budget is one or more comma-separated terms, all of which must hold: "
    "'<n>ms' or '<n>ms/token' (decode latency per output token; per request for classify), "
    "'<n>s' (whole-request latency), '<n>MFLOPs' / '<n>GFLOPs' / '<n>TFLOPs' (forward FLOPs per token), "
    "'<n>M' / '<n>B' (parameters), '<n>%' (share of the largest stitch's cost); "
    "case-insensitive, spaces allowed, e.g. '25ms/token, 1.1B' or '40%'"
)

MAX_HEADER_CHARS = 256  # a budget is a handful of terms; anything longer is not one

_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_TERM = re.compile(rf"^(?P<num>{_NUMBER})(?P<unit>[a-z%/]*)$")

# unit -> (field, multiplier into the field's unit)
_UNITS: dict[str, tuple[str, float]] = {
    "ms": ("token_latency_s", 1e-3),
    "ms/token": ("token_latency_s", 1e-3),
    "ms/tok": ("token_latency_s", 1e-3),
    "s/token": ("token_latency_s", 1.0),
    "s/tok": ("token_latency_s", 1.0),
    "s": ("request_latency_s", 1.0),
    "s/request": ("request_latency_s", 1.0),
    "s/req": ("request_latency_s", 1.0),
    "ms/request": ("request_latency_s", 1e-3),
    "ms/req": ("request_latency_s", 1e-3),
    "k": ("params", 1e3),
    "m": ("params", 1e6),
    "b": ("params", 1e9),
    "%": ("fraction", 1e-2),
}
for _p, _m in (("k", 1e3), ("m", 1e6), ("g", 1e9), ("t", 1e12)):
    _UNITS[f"{_p}flops"] = ("flops_per_token", _m)
    _UNITS[f"{_p}flop"] = ("flops_per_token", _m)


class Budget(BaseModel):
    """A parsed compute budget. Every field is an upper bound; None means unconstrained."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    token_latency_s: float | None = Field(None, gt=0, description="seconds per output token (classify: per request)")
    request_latency_s: float | None = Field(None, gt=0, description="seconds for the whole request")
    flops_per_token: float | None = Field(None, gt=0, description="forward FLOPs per token")
    params: float | None = Field(None, gt=0, description="parameter count")
    fraction: float | None = Field(None, gt=0, le=1, description="share of the largest stitch's cost")

    @property
    def unbounded(self) -> bool:
        return all(v is None for v in self.model_dump().values())

    def to_header(self) -> str:
        """Canonical header text; `parse_budget(b.to_header()) == b` to 12 significant digits."""
        terms = []
        if self.token_latency_s is not None:
            terms.append(f"{self.token_latency_s * 1e3:.12g}ms/token")
        if self.request_latency_s is not None:
            terms.append(f"{self.request_latency_s:.12g}s")
        if self.flops_per_token is not None:
            terms.append(f"{self.flops_per_token / 1e9:.12g}GFLOPs")
        if self.params is not None:
            terms.append(f"{self.params / 1e6:.12g}M")
        if self.fraction is not None:
            terms.append(f"{self.fraction * 100:.12g}%")
        return ", ".join(terms)

    def merged(self, other: "Budget") -> "Budget":
        """Both budgets must hold: the tighter bound per field."""
        out = {}
        for k, a in self.model_dump().items():
            b = getattr(other, k)
            out[k] = b if a is None else a if b is None else min(a, b)
        return Budget(**out)


def _error(msg: str) -> BudgetError:
    return BudgetError(f"{msg}. {GRAMMAR}")


def try_parse_budget(text: str) -> Budget | BudgetError:
    """Parse a header value; a malformed one comes back as a `BudgetError` value naming the grammar."""
    if len(text) > MAX_HEADER_CHARS:
        return _error(f"X-Compute-Budget is longer than {MAX_HEADER_CHARS} characters")
    fields: dict[str, float] = {}
    raw_terms = text.split(",")
    if not text.strip():
        return _error("X-Compute-Budget is empty")
    for raw in raw_terms:
        term = "".join(raw.split()).lower()  # spaces allowed anywhere: "25 ms / token"
        if not term:
            return _error(f"empty term in X-Compute-Budget {text!r}")
        m = _TERM.match(term)
        if m is None:
            return _error(f"cannot read term {raw.strip()!r} of X-Compute-Budget")
        unit = m.group("unit")
        if unit not in _UNITS:
            return _error(f"unknown unit {unit or '(none)'!r} in term {raw.strip()!r} of X-Compute-Budget")
        field, mult = _UNITS[unit]
        value = float(m.group("num")) * mult
        if not math.isfinite(value) or value <= 0:
            return _error(f"term {raw.strip()!r} of X-Compute-Budget must be a positive finite number")
        if field == "fraction" and value > 1:
            return _error(f"term {raw.strip()!r} of X-Compute-Budget must be a share in (0, 100]%")
        fields[field] = min(value, fields.get(field, math.inf))
    return Budget(**fields)


def parse_budget(text: str) -> Budget:
    """Like `try_parse_budget`, raising the `BudgetError`."""
    out = try_parse_budget(text)
    if isinstance(out, BudgetError):
        raise out
    return out
