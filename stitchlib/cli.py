"""`stitchserve` console script.

stitchlib's own subcommands live here; `init-palette` and `adapt` (training), `serve` and `quickstart`
(serving) are contributed by those packages through the `stitchserve.commands` entry-point group, so
stitchlib never imports them.
Errors of stitchlib's kinds become one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from importlib.metadata import entry_points
from pathlib import Path

from .errors import StitchError
from .types import QUANTIZE_METAVAR, quantize_arg, quantize_suffix


def _cmd_stitches(args: argparse.Namespace) -> int:
    from .anchors import check_pair, load_anchor
    from .space import StitchSpaceConfig, stitch_table

    small = load_anchor(args.small, dtype=args.dtype)
    large = load_anchor(args.large, dtype=args.dtype)
    check_pair(small, large)
    try:
        cfg = StitchSpaceConfig(kernel=args.kernel, stride=args.stride)
        rows = stitch_table(small, large, cfg, context_len=args.context, dtype=args.dtype)
    except ValueError as e:
        raise StitchError(str(e)) from None
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{small.name} ({small.stats.num_layers} layers, d={small.stats.hidden_size}) -> "
          f"{large.name} ({large.stats.num_layers} layers, d={large.stats.hidden_size}): "
          f"{len(rows)} stitches, GFLOPs per token at context {args.context}")
    print(f"{'id':<10} {'split':>5} {'join':>5} {'params':>14} {'GFLOPs':>9} {'bytes':>15}")
    for r in rows:
        split = "-" if r["split"] is None else r["split"]
        join = "-" if r["join"] is None else r["join"]
        print(f"{r['id']:<10} {split:>5} {join:>5} {r['params']:>14,} {r['gflops']:>9.4g} {r['bytes']:>15,}")
    return 0


def _cmd_pull(args: argparse.Namespace) -> int:
    from .hub import pull

    for name in args.names:
        path = pull(name, force=args.force)
        print(f"{name}: {path}")
    return 0


def num_cell(x: float | None, spec: str = ".4g") -> str:
    """An optional number for a table: '-' where it is missing (unscored, unmeasured)."""
    return "-" if x is None else format(x, spec)


def not_deployed_lines(m) -> list[str]:
    """One line per stitch the palette does not deploy, with the recorded reason (stitchlib.gate)."""
    rows = [s for s in m.stitches if not s.deployed]
    if not rows:
        return []
    out = [f"not deployed ({len(rows)}):"]
    for s in rows:
        why = s.dropped_reason or "no reason recorded"
        out.append(f"  {s.id:<10} {s.dropped or '-':<13} {why}")
    return out


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .palette import load_palette

    m, tensors = load_palette(args.palette)
    added = sum(t.numel() * t.element_size() for t in tensors.values())
    if args.json:
        print(m.model_dump_json(indent=2))
        return 0
    qm = m.quality_metric
    print(f"palette {m.name}: task {m.task}, anchors {m.small.name} -> {m.large.name}, "
          f"{len(m.stitches)} stitches ({len(m.deployed())} deployed), {added / 1e6:.1f} MB of tensors")
    print(f"quality metric: {qm} (higher is better)" if qm else
          "quality metric: none recorded (serving ranks deployed stitches by size)")
    # '*' marks deployed stitches; quality is the palette's metric, '-' where it was not measured
    print(f"  {'id':<10} {'GFLOPs':>9} {qm or 'quality':>10} {'score':>10}  metrics")
    for s in m.stitches:
        mark = "*" if s.deployed else " "
        metrics = ", ".join(f"{k}={num_cell(v)}" for k, v in (s.metrics or {}).items())
        quality = num_cell(s.metrics.get(qm)) if qm and s.metrics else "-"
        print(f"{mark} {s.id:<10} {num_cell(s.gflops, '9.3f')} {quality:>10} {num_cell(s.score):>10}  {metrics}")
    for line in not_deployed_lines(m):
        print(line)
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    import torch

    from .engine.profile import save_profile
    from .gate import MIN_SAVING, front_of
    from .runtime import PaletteRuntime

    if args.threads:
        torch.set_num_threads(args.threads)
    rt = PaletteRuntime.load(args.palette, device=args.device, dtype=args.dtype, quantize=args.quantize,
                             progress=not args.json)
    profiles = rt.profile(prompt_len=args.prompt_len, decode_steps=args.decode_steps,
                          batch_sizes=tuple(sorted(set(args.batch_sizes))), progress=not args.json)
    meta = {**rt.profile_meta(), "prompt_len": args.prompt_len, "decode_steps": args.decode_steps,
            "batch_sizes": sorted(set(args.batch_sizes))}
    suffix = quantize_suffix(args.quantize)
    out = save_profile(args.out or Path(args.palette) / f"profile-{meta['device_type']}{suffix}.json", profiles, meta)
    if args.json:
        print(out.read_text())
        return 0
    sizes = sorted(set(args.batch_sizes))
    # what a replica serving this table routes budgets to (serving's min_latency_saving, default)
    front = front_of(rt.stitches, profiles)
    print(f"{'stitch':<10} {'prefill ms/tok':>14} " + " ".join(f"{'step@' + str(b) + ' ms':>11}" for b in sizes)
          + f"  budgets ({MIN_SAVING:.0%} served front)")

    def ms(seconds: float | None) -> float | None:  # a batch size may be missing from a profile
        return None if seconds is None else seconds * 1e3

    for sid, p in profiles.items():
        d = front[sid]
        print(f"{sid:<10} {num_cell(ms(p.prefill_s_per_token), '14.3f'):>14} "
              + " ".join(f"{num_cell(ms(p.decode_step_s.get(b)), '11.2f'):>11}" for b in sizes)
              + ("  routed" if d.routed else f"  skipped: {d.shadowed_by} answers better for under {MIN_SAVING:.0%} more"))
    print(f"wrote {out} ({meta.get('device') or 'unknown device'}); serve it with  profile: {{table: {out}}}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stitchserve", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("stitches", help="print the stitch space of an anchor pair with each stitch's cost")
    s.add_argument("--small", default="qwen2.5-coder-0.5b", help="small anchor (name, HF dir or .gguf)")
    s.add_argument("--large", default="qwen2.5-coder-1.5b", help="large anchor (name, HF dir or .gguf)")
    s.add_argument("--kernel", type=int, default=1, help="window size (equal depths only)")
    s.add_argument("--stride", type=int, default=1, help="window stride (equal depths only)")
    s.add_argument("--context", type=int, default=512, help="context length the FLOPs are counted at")
    s.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    s.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    s.set_defaults(func=_cmd_stitches)

    s = sub.add_parser("pull", help="fetch, verify and convert built-in anchors into the local cache")
    s.add_argument("names", nargs="*", default=["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"])
    s.add_argument("--force", action="store_true", help="fetch again even if cached")
    s.set_defaults(func=_cmd_pull)

    s = sub.add_parser("inspect", help="validate a palette and print its stitch table")
    s.add_argument("palette")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_inspect)

    s = sub.add_parser("profile", help="measure every deployed stitch's prefill and decode-step time on this "
                                       "hardware and save the table serving reads (profile.table)")
    s.add_argument("palette")
    s.add_argument("--out", help="table to write (default: PALETTE/profile-<device type>[-<quantize>].json)")
    s.add_argument("--device", default="cpu")
    s.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    s.add_argument("--quantize", default="none", type=quantize_arg, metavar=QUANTIZE_METAVAR,
                   help="quantized anchors, as serving loads them (benchmarks/QUANT.md)")
    s.add_argument("--prompt-len", type=int, default=32)
    s.add_argument("--decode-steps", type=int, default=16)
    s.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    s.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's default)")
    s.add_argument("--json", action="store_true", help="print the table as JSON, no progress")
    s.set_defaults(func=_cmd_profile)

    for ep in sorted(entry_points(group="stitchserve.commands"), key=lambda e: e.name):
        try:
            register = ep.load()
        except ImportError as e:  # an extra that is not installed: say how to get it
            s = sub.add_parser(ep.name, help=f"(unavailable: {e.name or e} is not installed)")
            s.set_defaults(func=lambda a, e=e, n=ep.name: _missing(n, e))
            continue
        register(sub)
    return p


def _missing(name: str, e: ImportError) -> int:
    print(f"stitchserve {name}: needs {e.name or e}; install with pip install 'stitchserve[all]'", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except StitchError as e:
        print(f"stitchserve {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stitchserve {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
