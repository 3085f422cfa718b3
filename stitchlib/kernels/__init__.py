"""Native kernels torch does not have, built on this machine on first use.

`w4a8.cpp`: int4 (`w4a8`) and int8 (`w8a8`) weights x dynamically quantized int8 activations with
integer dot products (AVX512-VNNI), two quantization modes of stitchlib.quant. Torch's own int4 CPU kernel is
arithmetic-bound past 4 rows (benchmarks/QUANT.md 4b); this one reads each weight once for up to 8 rows.

Built with torch's C++ extension tooling (g++ and ninja) into `cache_root()/kernels/<hash>`: the hash
covers the source, the flags, torch's version and this CPU's instruction sets, so a cache shared between
machines never hands one CPU another's binary. Built once per machine (~10-20 s on 2 cores), then loaded
in ~0.1 s; concurrent builders (replicas starting together) wait on the build directory's lock.
Where it cannot be built (no compiler, no ninja) `w4a8_kernel()` says why and the caller takes the
pure-torch path with the same arithmetic.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import sys
from pathlib import Path

import torch

from ..fileio import cache_root

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("w4a8.cpp")
# -fopenmp: at::parallel_for splits over torch's threads; -ffp-contract=off: no fused multiply-adds, so the
# float operations are those of the pure-torch reference, bit for bit
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def build_dir() -> Path:
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(CFLAGS), torch.__version__, platform.machine(),
                                    _cpu_flags()]).encode()).hexdigest()[:16]
    return cache_root() / "kernels" / f"w4a8-{key}"


def _ninja_on_path() -> None:
    """torch's tooling runs `ninja` from PATH; the `ninja` package (a dependency) installs it next to
    this Python, which is not on PATH when Python was started by its full path: add that directory."""
    if shutil.which("ninja"):
        return
    dirs = [str(Path(sys.executable).parent)]
    try:
        import ninja

        dirs.insert(0, ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    for d in dirs:
        if shutil.which("ninja", path=d):
            os.environ["PATH"] = d + os.pathsep + os.environ.get("PATH", "")
            log.info("ninja found in %s (added to PATH)", d)
            return


@functools.lru_cache(maxsize=1)
def w4a8_kernel() -> tuple[object | None, str]:
    """(torch.ops.stitchserve_w4a8.w4a8_mm, "") once built and loaded, else (None, why). Once per process:
    the op namespace can be registered only once."""
    _ninja_on_path()
    try:
        from torch.utils.cpp_extension import load, verify_ninja_availability

        verify_ninja_availability()
    except Exception as e:  # noqa: BLE001 - any reason is a reason to take the pure-torch path
        return None, f"cannot build C++ extensions here ({e})"
    out = build_dir()
    out.mkdir(parents=True, exist_ok=True)
    if not any(out.glob("*.so")):
        log.info("building the w4a8 kernel into %s (once per machine, ~10-20 s)", out)
    try:
        load(name="stitchserve_w4a8", sources=[str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
             build_directory=str(out), is_python_module=False, verbose=False)
    except Exception as e:  # noqa: BLE001
        return None, f"building {SOURCE.name} failed: {str(e).strip().splitlines()[-1] if str(e).strip() else e!r}"
    ops = torch.ops.stitchserve_w4a8
    _register_fakes()
    if not ops.vectorized():
        log.warning("the w4a8 kernel was built without AVX512-VNNI (this CPU or compiler lacks it): "
                    "its scalar loops are correct but slow")
    return ops.w4a8_mm.default, ""


def _register_fakes() -> None:
    """Shape-only implementations, so torch.compile (EngineConfig.compile_layers) traces through the
    ops as opaque calls instead of failing on them: [M, K] -> [M, 16 * blocks] in x's dtype."""
    def out(x: torch.Tensor, qweight: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], qweight.shape[0] * 16)

    torch.library.register_fake("stitchserve_w4a8::w4a8_mm")(lambda x, qweight, sz, group_size: out(x, qweight))
    torch.library.register_fake("stitchserve_w4a8::w8a8_mm")(
        lambda x, qweight, wsum, scales, group_size: out(x, qweight))


def w8a8_kernel() -> tuple[object | None, str]:
    """The same extension's int8-weight op, torch.ops.stitchserve_w4a8.w8a8_mm (or None, why)."""
    op, why = w4a8_kernel()
    return (torch.ops.stitchserve_w4a8.w8a8_mm.default, "") if op is not None else (None, why)
