"""CPU probe: does one int4 kernel call over [q; k; v] (or [gate; up]) beat three (two) separate calls,
and how does the int4 kernel's time grow with the rows (the batch-8 question of benchmarks/QUANT.md)?

Shapes of one Qwen2.5-Coder-1.5B block, `aten._weight_int4pack_mm_for_cpu`, group 32, bf16 activations,
random codes; weights rotated over copies of at least 300 MB so none is hot in the 32 MB L3; best of 5.
~2.5 min at 2 threads:

    flock /tmp/cpu.lock nice -n 5 python benchmarks/quant_fused_probe.py --threads 2

Writes benchmarks/results/quant_fused_probe.json (ms per call of each shape set).
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from engine_common import env_info, write_result

H, I, KV = 1536, 8960, 256  # hidden, intermediate, k/v width of the 1.5B
OP = torch.ops.aten._weight_int4pack_mm_for_cpu.default


def _weight(n: int, k: int, group: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 8)
    return packed, torch.randn(k // group, n, 2, dtype=torch.bfloat16) * 0.01


def ms_per_unit(shapes: list[tuple[int, int]], rows: int, repeats: int = 5, min_bytes: float = 300e6) -> float:
    """Best mean ms of calling the kernel once per (out, in) shape in `shapes` (one 'unit')."""
    unit = sum(n * k // 2 for n, k in shapes)
    copies = [[_weight(n, k) for n, k in shapes] for _ in range(max(1, int(min_bytes // unit)))]
    x = {k: torch.randn(rows, k, dtype=torch.bfloat16) for _, k in shapes}

    def run() -> None:
        for c in copies:
            for (_, k), (p, sz) in zip(shapes, c):
                OP(x[k], p, 32, sz)

    run()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        best = min(best, (time.perf_counter() - t0) / len(copies))
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    env = env_info("cpu")
    sets = {"q,k,v separate": [(H, H), (KV, H), (KV, H)], "qkv fused": [(H + 2 * KV, H)],
            "gate,up separate": [(I, H), (I, H)], "gate_up fused": [(2 * I, H)], "o": [(H, H)], "down": [(H, I)]}
    res = {name: {rows: ms_per_unit(shapes, rows) for rows in (1, 8)} for name, shapes in sets.items()}
    rows_scaling = {rows: ms_per_unit([(I, H)], rows) for rows in (1, 2, 4, 8, 16)}
    out = {"benchmark": "quant_fused_probe", "env": env, "threads": args.threads, "ms_per_call": res,
           "gate_proj_ms_by_rows": rows_scaling, "wall_s": time.time() - t0}
    out["env"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    path = write_result("quant_fused_probe", out, args.out)
    for name, v in res.items():
        print(f"{name:18s} rows 1: {v[1]:.3f} ms   rows 8: {v[8]:.3f} ms")
    print("gate_proj by rows:", {r: round(v, 3) for r, v in rows_scaling.items()})
    print(f"-> {path}")


if __name__ == "__main__":
    main()
