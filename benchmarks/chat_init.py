"""Why least-squares stitches of the real pair answer worse than the small anchor, and which
stitching-layer initialisation fixes it (issue 11, items 1-2).

    python benchmarks/chat_init.py [--variants docs,chat,chat-rel,...] [--n-eval 40]

Every variant calibrates all 27 stitching layers of Qwen2.5-Coder 0.5B -> 1.5B (bf16, as served) and
measures every route's response-token NLL on three chat sets none of them calibrated on:
  val   pydocs examples held out from calibration (what the deployment gate sees),
  test  other held-out pydocs examples (never used for any choice),
  news  bbcheadlines: "write a headline for this story" -> the real headline (not docstrings).
Prompts are rendered with the chat template, as serving renders them. Results go to
results/chat_init_real.json after every variant (a stopped run keeps what finished), with a
diagnosis section (activation scales at the joins, output scale of the stitched states), and a plot.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from stitchlib import prompts as P
from stitchlib.anchors import load_anchor
from stitchlib.calibrate import calibrate_, token_batches
from stitchlib.model import StitchedLM, causal_mask, positions
from stitchlib.quality import chat_eval_batches, route_nll
from training import datasets as D
from training.pydocs import default_calibration_texts

RESULTS = Path(__file__).parent / "results"
SMALL, LARGE = "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"

# name -> (calibration text source, sequences, max_len, weighting, skip_first)
VARIANTS = {
    "docs": ("docs", 100, 128, "none", False),          # init-palette's old default: raw docstrings
    "chat": ("chat", 100, 128, "none", False),          # the same budget, chat-templated like serving
    "chat-rel": ("chat", 100, 128, "relative", False),  # + per-token relative (after-norm) weighting
    "chat-nosink": ("chat", 100, 128, "none", True),    # plain LS without position 0
    "chat-rel-4x": ("chat", 400, 128, "relative", False),  # 4x the tokens
    "docs-rel": ("docs", 100, 128, "relative", False),  # weighting alone, on the old text
    "mix-rel": ("mix", 100, 128, "relative", False),    # half pydocs, half bbcheadlines (other examples)
    "mix-rel-4x": ("mix", 400, 128, "relative", False),
}


def splits(seed: int = 0, n_eval: int = 40):
    ex = D.load_chat("pydocs")
    rest, test = D.split(ex, val_size=n_eval, seed=seed + 1, source="pydocs")
    calib, val = D.split(rest, val_size=n_eval, seed=seed, source="pydocs")
    news = D.load_chat("bbcheadlines")
    news_calib, news_test = D.split(news, val_size=n_eval, seed=seed, source="bbcheadlines")
    return (calib, news_calib), val, test, news_test


def calibration_batches(tok, calib, source: str, n: int, max_len: int):
    if source == "docs":
        texts = default_calibration_texts(n)
        return list(token_batches(tok, texts, batch_size=8, max_len=max_len))
    import random
    docs, news = calib
    if source == "mix":
        rng = random.Random(f"calib:{n}")
        exs = [docs[i] for i in rng.sample(range(len(docs)), n - n // 2)]
        exs += [news[i] for i in rng.sample(range(len(news)), n // 2)]
        rng.shuffle(exs)
    else:
        exs = [docs[i] for i in random.Random(f"calib:{n}").sample(range(len(docs)), min(n, len(docs)))]
    recs = P.encode_chat(exs, tok, max_len)
    return [(b["input_ids"], b["attention_mask"]) for b in P.batched(recs, P.pad_token_id(tok), 8)]


@torch.no_grad()
def join_scales(model: StitchedLM, batch) -> dict:
    """Diagnosis: how uneven the large model's hidden states are at each join (per-token norms: the
    sink position and the rest), and what the stitched states look like against them."""
    ids, attn, _ = batch
    T = ids.shape[1]
    mask, pos = causal_mask(attn, T), positions(attn, T)
    real = attn.bool()
    L, S = model.L, model.S
    large_in = {0: L.anchor.embed(ids)}  # input of large block i = output of block i - 1
    for i, h in L.blocks(large_in[0], range(model.large_anchor.stats.num_layers - 1), mask=mask, position_ids=pos):
        large_in[i + 1] = h
    small_out = dict(S.blocks(S.anchor.embed(ids), range(model.small_anchor.stats.num_layers), mask=mask,
                              position_ids=pos))
    rows = {}
    for st in model.stitches:
        if st.kind != "stitch":
            continue
        y = large_in[st.join].float()  # [B, T, dL]
        yh = model.stitching[st.id](small_out[st.split]).float()
        norms = y.norm(dim=-1)  # [B, T]
        first, rest = norms[:, 0], norms[:, 1:][real[:, 1:]]
        err = (yh - y).norm(dim=-1) / norms.clamp_min(1e-6)
        rows[st.id] = {
            "sink_norm_over_median": float(first.median() / rest.median()),
            "top_channel_share": float((y[real].abs().amax(0).topk(4).values.sum()) / y[real].abs().amax(0).sum()),
            "stitched_norm_ratio_sink": float((yh.norm(dim=-1)[:, 0] / first).median()),
            "stitched_norm_ratio_rest": float((yh.norm(dim=-1)[:, 1:][real[:, 1:]] / rest).median()),
            "rel_err_sink": float(err[:, 0].median()),
            "rel_err_rest": float(err[:, 1:][real[:, 1:]].median()),
            "cos_rest": float(torch.nn.functional.cosine_similarity(yh, y, dim=-1)[:, 1:][real[:, 1:]].mean()),
        }
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--n-eval", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "chat_init_real.json"))
    ap.add_argument("--table", action="store_true", help="print the recorded results as markdown and exit")
    ap.add_argument("--distill-base", default=None, help="a variant to start from, then distill some stitches")
    ap.add_argument("--distill-stitches", default="s23-l27,s20-l24,s16-l19,s12-l15,s9-l11,s6-l8")
    ap.add_argument("--distill-steps", type=int, default=30)
    ap.add_argument("--distill-seqs", type=int, default=32)
    ap.add_argument("--distill-lr", type=float, default=1e-3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out_path = Path(args.out)
    result = json.loads(out_path.read_text()) if out_path.exists() else {"variants": {}}
    if args.table:
        print(tables(result))
        return
    S = load_anchor(SMALL, dtype="bfloat16", progress=False)
    L = load_anchor(LARGE, dtype="bfloat16", progress=False)
    model = StitchedLM(S, L).eval()
    tok = S.tokenizer
    calib, val, test, news = splits(n_eval=args.n_eval)
    sets = {name: chat_eval_batches(tok, exs, max_len=160, batch_size=8)
            for name, exs in (("val", val), ("test", test), ("news", news))}
    result["eval_sets"] = {k: {"examples": args.n_eval, "response_tokens":
                               int(sum(int((b[2][:, 1:] != -100).sum()) for b in v))} for k, v in sets.items()}
    anchors_done = "anchors" in result
    if not anchors_done:
        t = time.time()
        result["anchors"] = {k: {i: r.loss for i, r in route_nll(model, v, ["small", "large"]).items()}
                             for k, v in sets.items()}
        print("anchors", result["anchors"], f"{time.time() - t:.0f}s", flush=True)
    if args.distill_base:
        distill(args, model, tok, calib, sets, result, out_path)
        return
    for name in args.variants.split(","):
        source, n, max_len, weighting, skip_first = VARIANTS[name]
        t0 = time.time()
        batches = calibration_batches(tok, calib, source, n, max_len)
        ntok = int(sum(int(b[1].sum()) for b in batches))
        resid = calibrate_(model, batches, progress=False, weighting=weighting, skip_first=skip_first)
        t_cal = time.time() - t0
        row = {"calibration": {"source": source, "sequences": n, "tokens": ntok, "weighting": weighting,
                               "skip_first": skip_first, "seconds": round(t_cal, 1)},
               "residual": resid, "nll": {}}
        for k, v in sets.items():
            ids = [s.id for s in model.stitches if s.kind == "stitch"]
            row["nll"][k] = {i: r.loss for i, r in route_nll(model, v, ids).items()}
        row["eval_seconds"] = round(time.time() - t0 - t_cal, 1)
        row["diagnosis"] = join_scales(model, sets["test"][0])
        result["variants"][name] = row
        a = result["anchors"]["test"]
        between = [i for i, x in row["nll"]["test"].items() if x < a["small"]]
        print(f"{name}: calib {t_cal:.0f}s ({ntok} tokens), eval {row['eval_seconds']:.0f}s; test: "
              f"{len(between)} stitches better than small ({a['small']:.3f}): "
              + " ".join(f"{i}={x:.2f}" for i, x in row["nll"]["test"].items()), flush=True)
        out_path.write_text(json.dumps(result, indent=1))
    plot(result, out_path.with_suffix(".png"), model)


def distill(args, model: StitchedLM, tok, calib, sets, result: dict, out_path: Path) -> None:
    """Start from a least-squares variant, then train the chosen stitching layers alone against the large
    anchor's next-token distribution (stitchlib.calibrate.distill_stitching_) and measure them again."""
    from stitchlib.calibrate import distill_stitching_

    source, n, max_len, weighting, skip_first = VARIANTS[args.distill_base]
    calibrate_(model, calibration_batches(tok, calib, source, n, max_len), progress=False, weighting=weighting,
               skip_first=skip_first)
    ids = args.distill_stitches.split(",")
    data = calibration_batches(tok, (calib[0][::-1], calib[1][::-1]), "mix" if source == "mix" else "chat",
                               args.distill_seqs, max_len)  # other examples than least squares saw
    data = [(i[j:j + 4], a[j:j + 4]) for i, a in data for j in range(0, i.shape[0], 4)]
    t0 = time.time()
    rep = distill_stitching_(model, data, ids, steps=args.distill_steps, lr=args.distill_lr, progress=True)
    t_d = time.time() - t0
    epochs = args.distill_steps * 4 / max(1, args.distill_seqs)
    name = f"{args.distill_base}+distill{args.distill_steps}x4/{args.distill_seqs}seqs@{args.distill_lr:g}"
    row = {"base": args.distill_base, "distill": {"steps": args.distill_steps, "sequences": args.distill_seqs,
                                                  "epochs": round(epochs, 2),
                                                  "lr": args.distill_lr, "seconds": round(t_d, 1), "kl": rep},
           "nll": {k: {i: r.loss for i, r in route_nll(model, v, ids).items()} for k, v in sets.items()}}
    result.setdefault("distilled", {})[name] = row
    out_path.write_text(json.dumps(result, indent=1))
    print(name, f"{t_d:.0f}s", json.dumps(row["nll"]), json.dumps(rep), flush=True)


def tables(result: dict) -> str:
    """Markdown: per-stitch NLL of every variant on every set, and a summary line per variant."""
    lines = []
    a = result["anchors"]
    for k in ("val", "test", "news"):
        rows = {n: r["nll"][k] for n, r in result["variants"].items()}
        rows.update({n: r["nll"][k] for n, r in result.get("distilled", {}).items()})
        ids = list(next(iter(result["variants"].values()))["nll"][k])
        lines.append(f"\n**{k}** (small {a[k]['small']:.3f}, large {a[k]['large']:.3f}; bold: between the anchors)\n")
        lines.append("| variant | " + " | ".join(ids) + " |")
        lines.append("|---" * (len(ids) + 1) + "|")
        for n, r in rows.items():
            cells = []
            for i in ids:
                x = r.get(i)
                cells.append("" if x is None else (f"**{x:.2f}**" if a[k]["large"] < x < a[k]["small"] else f"{x:.2f}"))
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines.append("\n| variant | calib tokens | calib s | " + " | ".join(
        f"{k}: better than small" for k in ("val", "test", "news")) + " |")
    lines.append("|---|---|---|---|---|---|")
    for n, r in result["variants"].items():
        c = r["calibration"]
        cnt = [sum(x < a[k]["small"] for x in r["nll"][k].values()) for k in ("val", "test", "news")]
        lines.append(f"| {n} | {c['tokens']} | {c['seconds']} | " + " | ".join(f"{x}/27" for x in cnt) + " |")
    return "\n".join(lines)


def plot(result: dict, path: Path, model: StitchedLM) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gf = {s.id: model.cost(s).gflops for s in model.stitches}
    fig, axes = plt.subplots(1, 3, figsize=(17, 5), sharey=False)
    for ax, k in zip(axes, ("val", "test", "news")):
        a = result["anchors"][k]
        for name, row in result["variants"].items():
            xs = sorted(row["nll"][k], key=gf.get)
            ax.plot([gf[i] for i in xs], [row["nll"][k][i] for i in xs], "o-", ms=3, label=name)
        ax.axhline(a["small"], color="k", ls="--", lw=1)
        ax.axhline(a["large"], color="k", ls=":", lw=1)
        ax.scatter([gf["small"], gf["large"]], [a["small"], a["large"]], c="k", zorder=5, label="anchors")
        ax.set_title(f"{k}: response NLL per route")
        ax.set_xlabel("GFLOPs / token")
        ax.set_ylim(min(a["large"], 2) - 0.2, max(a["small"] * 2.5, 4))
    axes[0].set_ylabel("NLL (lower is better)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print("wrote", path)


if __name__ == "__main__":
    main()
