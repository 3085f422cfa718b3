"""training/adapt_llama.py on the tiny pair: end to end for both tasks, determinism, resume after a
real SIGTERM / SIGINT, and one clear line for each kind of bad input."""
from __future__ import annotations

import collections
import json
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "training" / "adapt_llama.py"
TINY = ["--small", "tiny-small", "--large", "tiny-large"]

TOPICS = {"sport": ["goal", "match", "team", "score", "coach", "league"],
          "tech": ["chip", "code", "data", "robot", "phone", "cloud"],
          "food": ["bread", "soup", "salad", "cake", "rice", "spice"]}
FILLER = ["the", "a", "big", "new", "old", "today", "and", "with"]


def write_classify(path: Path, n: int = 96, seed: int = 0) -> Path:
    r = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            lab = r.choice(sorted(TOPICS))
            words = [r.choice(TOPICS[lab]) for _ in range(5)] + [r.choice(FILLER) for _ in range(5)]
            r.shuffle(words)
            f.write(json.dumps({"text": " ".join(words), "label": lab}) + "\n")
    return path


def write_chat(path: Path, n: int = 96, seed: int = 0) -> Path:
    r = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = r.randint(0, 40), r.randint(0, 40)
        rows.append({"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a} plus {b} is {a + b}."})
    path.write_text(json.dumps(rows))  # a JSON array (the other format: JSONL above)
    return path


def config(tmp: Path, data: Path, task: str, **kw):
    from training.config import make_config

    fields = dict(small="tiny-small", large="tiny-large", task=task, data=str(data), out=str(tmp / "palette"),
                  steps=24, batch_size=4, seq_len=48, eval_size=16, calib_size=16, lr=3e-3, dtype="float32",
                  checkpoint_every=0, progress=False, seed=0)
    fields.update(kw)
    return make_config(**fields)


def palette_tensors(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:3]}"


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices on 2 shared, busy cores: one thread is ~6x faster than two (no oversubscription),
    and in-process and subprocess runs then share one reduction order, so palettes compare bit for bit."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def mean(xs):
    return sum(xs) / len(xs)


# ---- units ---------------------------------------------------------------------------------------
def test_cli_flags_mirror_the_config(capsys):
    import argparse

    from training.adapt_llama import add_arguments
    from training.config import TrainConfig, make_config

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--data", "d.jsonl", "--out", "o", "--no-stitch-bias", "--lora-rank", "8",
                         "--sampling", "uniform"])
    cfg = make_config(**vars(args))
    assert cfg == TrainConfig(data="d.jsonl", out="o", stitch_bias=False, lora_rank=8, sampling="uniform")
    # every field is a flag, and unset flags fall back to the config's own defaults
    assert cfg.lr == TrainConfig.model_fields["lr"].default and cfg.eta == 0.9
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--steps", "--epochs", "--grad-accum", "--seq-len", "--warmup-steps", "--lora-alpha",
                 "--stitch-lora-rank", "--stitch-bias", "--eta", "--n-intervals", "--snip-warmup-steps",
                 "--distill", "--quantization", "--adapt-anchors-first", "--resume", "--overwrite", "--eval-size"):
        assert flag in help_text


def test_schedule_warms_up_then_decays_to_min():
    from training.trainer import cosine_schedule

    f = cosine_schedule(total=100, warmup=10, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.1)
    assert all(f(i) >= f(i + 1) for i in range(10, 100))


def test_teacher_hard_labels_are_shifted_onto_response_positions(tmp_path):
    from training.trainer import Trainer

    t = Trainer(config(tmp_path, tmp_path / "unused", "chat"))
    logits = torch.zeros(1, 4, 6)
    logits[0, torch.arange(4), torch.tensor([5, 4, 3, 2])] = 1.0  # position t predicts 5-t
    labels = torch.tensor([[-100, -100, 7, 7]])
    # the trainer's logits are those of the labelled positions only: t = 1, 2 predict labels[2], labels[3]
    sel = labels[:, 1:] != -100
    assert t.hard_labels(logits[:, :-1][sel], labels).tolist() == [[-100, -100, 4, 3]]


def test_chat_loss_on_labelled_positions_equals_the_full_forward(tmp_path, tiny_model):
    """The trainer runs the LM head only where a label is: same loss and same gradients as the full
    [B, T, V] forward with lm_loss, for the small anchor, a stitch and the large anchor."""
    from stitchlib.model import lm_loss
    from training.trainer import Trainer

    from conftest import randomize_pst

    t = Trainer(config(tmp_path, tmp_path / "unused", "chat"))
    t.model = m = tiny_model()
    randomize_pst(m)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (3, 10), generator=g)
    attn = torch.ones_like(ids)
    attn[2, 7:] = 0
    labels = ids.clone()
    labels[:, :4] = -100
    labels[attn == 0] = -100
    b = {"input_ids": ids, "attention_mask": attn, "labels": labels}
    for sid in ("small", m.stitches[len(m.stitches) // 2].id, "large"):
        params = [p for p in m.parameters() if p.requires_grad]
        ref = lm_loss(m(ids, sid, attn), labels)
        ref_g = torch.autograd.grad(ref, params, allow_unused=True)
        got = t.task_loss(t.forward(b, sid), labels)
        got_g = torch.autograd.grad(got, params, allow_unused=True)
        assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=1e-5), sid
        for x, y in zip(got_g, ref_g):
            assert (x is None) == (y is None)
            if x is not None:
                torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def test_lora_gets_gradients_after_an_eval_pass_with_8bit_anchors(tmp_path):
    """docs/DESIGN_NOTES.md section 4: a no-grad forward through quantized frozen weights must not cut LoRA off."""
    pytest.importorskip("bitsandbytes")
    from training.task_data import load_examples
    from training.trainer import Trainer, evaluate

    cfg = config(tmp_path, write_classify(tmp_path / "d.jsonl", n=40), "classify", quantization="8bit",
                 dtype="bfloat16", steps=2, eval_size=8)
    t = Trainer(cfg)
    t.setup(load_examples(cfg))
    t.calibrate()  # includes the trainer's own post-calibration gradient probe
    evaluate(t.model, cfg, t.enc, progress=False)  # no-grad forward through every stitch
    t.train_step()  # leaves grads set to None again; run one more backward by hand to inspect them
    b = next(t.batches)
    with t.autocast():
        t.task_loss(t.forward(b, "s2-l3"), b["labels"]).backward()
    mods = [m for m in [*t.model.pst_small[:4], *t.model.pst_large[-4:]]]
    assert mods and all(m.lora_b.grad is not None and m.lora_b.grad.abs().sum() > 0 for m in mods)


# ---- end to end, in process -----------------------------------------------------------------------
@pytest.mark.slow
def test_classify_end_to_end(tmp_path):
    from stitchlib.palette import load_palette
    from stitchlib.runtime import PaletteRuntime
    from training.adapt_llama import adapt

    cfg = config(tmp_path, write_classify(tmp_path / "d.jsonl"), "classify", steps=30)
    res = adapt(cfg)
    hist = res.report["history"]
    assert mean([h["teacher_loss"] for h in hist[-8:]]) < 0.7 * mean([h["teacher_loss"] for h in hist[:8]])

    m, tensors = load_palette(cfg.out_path)
    assert m.task == "classify" and m.labels == ["food", "sport", "tech"] and m.quality_metric == "accuracy"
    assert all("accuracy" in s.metrics and "loss" in s.metrics for s in m.stitches)  # every stitch evaluated
    dep = [s.id for s in m.deployed()]
    assert "small" in dep and "large" in dep and len(dep) <= cfg.n_intervals + 2
    assert m.training["config"]["lr"] == cfg.lr and m.training["total_steps"] == 30
    assert m.training["trainable"]["pst_total"] < m.training["trainable"]["full_finetune"] / 5
    assert (cfg.out_path / "report.json").is_file()
    assert (cfg.out_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not cfg.checkpoint_path.parent.exists()  # cleaned up after success
    small = next(s for s in m.stitches if s.id == "small").metrics["accuracy"]
    assert all(s.metrics["accuracy"] >= small for s in m.deployed())  # deployment was validated
    rej = [r["id"] for r in res.report["stitches"] if r["rejected"]]
    assert res.report["summary"]["rejected_top_score"] == rej and not set(rej) & set(dep)
    assert all(s.dropped and s.dropped_reason for s in m.stitches if not s.deployed)  # each says why
    # every route learned the keyword task (3 balanced-ish classes: chance is ~1/3, untrained loss ~ln 3)
    assert m.stitches[-1].metrics["accuracy"] > 0.6
    assert mean([s.metrics["accuracy"] for s in m.stitches]) > 0.5
    assert mean([s.metrics["loss"] for s in m.stitches]) < 1.0

    rt = PaletteRuntime.load(cfg.out_path, dtype="float32")
    probs = rt.classify(["goal match team score coach", "bread soup cake rice spice"], "large")
    assert [max(p, key=p.get) for p in probs] == ["sport", "food"]


def test_deployment_is_checked_against_the_small_anchor(tmp_path):
    """Only what deployment needs is evaluated (eval_stitches=deployed); no deployed stitch validates
    below the small anchor; a top-score stitch that does is replaced, and an interval whose tries all
    fail gets no route."""
    from training.task_data import load_examples
    from training.trainer import Trainer

    cfg = config(tmp_path, write_classify(tmp_path / "d.jsonl"), "classify", steps=8, eval_stitches="deployed")
    trainer = Trainer(cfg)
    trainer.setup(load_examples(cfg))
    res = trainer.run()
    m, dep, ids = res.model, res.deployment, lambda slots: {res.model.stitches[s].id for s in slots}
    floor = res.metrics["small"]["accuracy"]
    assert {"small", "large"} <= ids(dep.slots)
    assert set(res.metrics) == ids(dep.slots) | ids(dep.rejected)
    assert all(res.metrics[i]["accuracy"] >= floor for i in ids(dep.slots))

    # a floor no stitch reaches: each interval tries its top deploy_tries scores, evaluates them, gives up
    trainer.metrics["small"]["accuracy"] = 1.5
    hard = trainer.deploy()
    assert hard.slots == [m.slot["small"], m.slot["large"]]
    iv = res.sampler.interval
    # (the small anchor's own interval is left out: where it has the top score, nothing there is tried)
    scored = [s for s in res.sampler.candidates if res.sampler.scores[s] is not None and iv[s] != iv[m.slot["small"]]]
    per_interval = collections.Counter(iv[s] for s in scored)
    tried = collections.Counter(iv[s] for s in hard.rejected if iv[s] != iv[m.slot["small"]])
    assert tried == {k: min(n, cfg.deploy_tries) for k, n in per_interval.items()}
    assert set(per_interval) <= set(hard.dropped_intervals)
    assert set(hard.rejected) <= {m.slot[i] for i in trainer.metrics}  # rejected ones were really evaluated


@pytest.mark.parametrize("task,eval_stitches", [("chat", "all"), ("classify", "deployed")])
def test_cli_when_no_stitch_is_deployed(tmp_path, monkeypatch, capsys, task, eval_stitches):
    """Issue 15: a palette whose every stitch is rejected is written, the command exits 0 and says
    plainly that only the anchors serve and why each evaluated stitch was not deployed. The anchors'
    validation quality is forced out of every stitch's reach (a floor no stitch can meet)."""
    import training.trainer as T
    from stitchlib.palette import read_manifest
    from training.adapt_llama import main

    real, q = T.evaluate, T.quality_metric(task)

    def unreachable_anchors(*a, **kw):
        out = real(*a, **kw)
        for sid, v in (("small", 1e3), ("large", 2e3)):
            if sid in out:
                out[sid][q] = v
        return out

    monkeypatch.setattr(T, "evaluate", unreachable_anchors)
    data = write_chat(tmp_path / "d.json", n=40) if task == "chat" else write_classify(tmp_path / "d.jsonl", n=40)
    rc = main([*TINY, "--task", task, "--data", str(data), "--out", str(tmp_path / "p"), "--steps", "3",
               "--batch-size", "4", "--seq-len", "48", "--eval-size", "8", "--calib-size", "16", "--dtype", "float32",
               "--checkpoint-every", "0", "--no-progress", "--eval-stitches", eval_stitches])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "(7 stitches, 2 deployed" in out and "no stitch deployed: only the two anchors serve" in out
    assert f"{q} (higher is better): small 1000, large 2000" in out
    m = read_manifest(tmp_path / "p")
    assert [s.id for s in m.deployed()] == ["small", "large"]
    dropped = {s.id: s.dropped for s in m.stitches if s.kind == "stitch"}
    assert all(dropped.values())  # every stitch says why
    gated = [sid for sid, code in dropped.items() if code == "below_small"]
    assert gated, dropped  # the evaluated picks fell below the small anchor, and the summary names each
    for sid in gated:
        assert any(ln.split()[:2] == [sid, "below_small"] for ln in out.splitlines())
    summary = json.loads((tmp_path / "p" / "report.json").read_text())["summary"]
    assert summary["mean_deployed_stitches"] is None and summary["deployed"] == ["small", "large"]
    assert {d["id"] for d in summary["dropped_by_gate"]} == set(gated)


def test_chat_gate_uses_the_paired_noise_margin(tmp_path, capsys):
    """Chat evaluation hands each route's per-example losses to the gate: with a margin no stitch can
    clear (--gate-confidence 1e6) every evaluated pick is dropped, and its reason names the standard
    errors (which appear only when per-example samples reached stitchlib.gate)."""
    from stitchlib.palette import read_manifest
    from training.adapt_llama import main

    data = write_chat(tmp_path / "d.json", n=40)
    rc = main([*TINY, "--task", "chat", "--data", str(data), "--out", str(tmp_path / "p"), "--steps", "2",
               "--batch-size", "4", "--seq-len", "48", "--eval-size", "8", "--calib-size", "16", "--dtype", "float32",
               "--checkpoint-every", "0", "--no-progress", "--gate-confidence", "1e6"])
    assert rc == 0, capsys.readouterr().out
    m = read_manifest(tmp_path / "p")
    assert [s.id for s in m.deployed()] == ["small", "large"]
    gated = [s for s in m.stitches if s.dropped in ("below_small", "dominated")]
    assert gated and all("standard errors" in s.dropped_reason for s in gated), [s.dropped_reason for s in gated]


@pytest.mark.slow
def test_chat_end_to_end_and_two_stage_ablation(tmp_path):
    from stitchlib.runtime import PaletteRuntime
    from training.adapt_llama import adapt

    data = write_chat(tmp_path / "d.json")
    cfg = config(tmp_path, data, "chat", steps=30)
    res = adapt(cfg)
    hist = res.report["history"]
    assert mean([h["teacher_loss"] for h in hist[-8:]]) < 0.8 * mean([h["teacher_loss"] for h in hist[:8]])
    assert mean([h["stitch_ce"] for h in hist[-8:]]) < mean([h["stitch_ce"] for h in hist[:8]])
    rt = PaletteRuntime.load(cfg.out_path, dtype="float32")
    assert rt.manifest.quality_metric == "neg_loss"
    assert all(s.metrics["neg_loss"] == pytest.approx(-s.metrics["loss"]) for s in rt.manifest.stitches)
    from stitchlib.runtime import SamplingParams

    ids = rt.tokenizer("Add 3 and 4.")["input_ids"]
    dep = rt.manifest.deployed()[1].id
    steps = list(rt.generate_steps([ids], dep, [SamplingParams(max_tokens=4, temperature=0.0)]))
    assert 1 <= len(steps) <= 4  # a deployed stitch of the palette serves
    # interval analysis: one row per non-empty interval, each naming the top-score and best stitch
    assert all({"top_score", "best_eval", "match"} <= set(r) for r in res.report["intervals"])

    cfg2 = config(tmp_path, data, "chat", steps=12, adapt_anchors_first=5, out=str(tmp_path / "two-stage"))
    res2 = adapt(cfg2)
    stitched = [h["stitch"] for h in res2.report["history"]]
    assert stitched[:5] == ["small"] * 5
    assert res2.manifest.training["kind"] == "adapt-then-stitch"


# ---- subprocess runs: determinism across processes and resume after a real signal ---------------------
def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"  # as _one_thread: the same reduction order as in-process runs
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _cli(tmp: Path, data: Path, out: str, *extra: str) -> list[str]:
    return [sys.executable, str(SCRIPT), *TINY, "--task", "chat", "--data", str(data), "--out", str(tmp / out),
            "--steps", "24", "--batch-size", "4", "--seq-len", "48", "--eval-size", "16", "--calib-size", "16",
            "--lr", "3e-3", "--dtype", "float32", "--checkpoint-every", "4", "--no-progress", "--seed", "0", *extra]


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clean")
    data = write_chat(tmp / "d.json")
    p = subprocess.run(_cli(tmp, data, "palette"), env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    return tmp, data, palette_tensors(tmp / "palette")


@pytest.mark.slow
def test_same_seed_same_palette_across_processes(clean_run, tmp_path):
    """An in-process run with the same options reproduces the subprocess palette bit for bit."""
    from training.adapt_llama import adapt

    _, data, reference = clean_run
    cfg = config(tmp_path, data, "chat", steps=24, checkpoint_every=4)
    adapt(cfg)
    assert_same_tensors(palette_tensors(cfg.out_path), reference)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_resume_after_kill_gives_the_uninterrupted_palette(clean_run, tmp_path, sig):
    _, data, reference = clean_run
    cmd = _cli(tmp_path, data, "palette", "-v")
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    seen = threading.Event()

    def pump():
        for line in proc.stderr:
            lines.append(line)
            if "checkpoint at step 8" in line:
                seen.set()

    threading.Thread(target=pump, daemon=True).start()
    assert seen.wait(300), "".join(lines)
    proc.send_signal(sig)  # mid-run, after an interval checkpoint
    rc = proc.wait(120)
    assert rc == 128 + sig, "".join(lines)
    assert "rerun the same command with --resume" in lines[-1]
    assert not (tmp_path / "palette").exists() and (tmp_path / "palette.ckpt" / "last.pt").is_file()

    again = subprocess.run(_cli(tmp_path, data, "palette"), env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "--resume" in again.stderr  # refuses to silently start over
    resumed = subprocess.run(_cli(tmp_path, data, "palette", "--resume"), env=_env(), capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_tensors(palette_tensors(tmp_path / "palette"), reference)
    manifest = json.loads((tmp_path / "palette" / "manifest.json").read_text())
    assert 8 <= manifest["training"]["resumed_from_step"] < 24
    assert not (tmp_path / "palette.ckpt").exists()


# ---- bad input: one line on stderr, non-zero exit, nothing written -----------------------------------
def _bad_cases(tmp: Path) -> list[tuple[str, list[str], str]]:
    good = write_classify(tmp / "good.jsonl", n=20)
    (tmp / "malformed.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": \n')
    (tmp / "empty.jsonl").write_text("")
    (tmp / "nolabel.jsonl").write_text('{"text": "a b", "label": "x"}\n{"text": "c d"}\n')
    (tmp / "exists").mkdir()
    (tmp / "exists" / "keep.txt").write_text("mine")
    cls = ["--task", "classify"]
    return [
        ("missing data file", [*cls, "--data", str(tmp / "nope.jsonl")], "no such data file"),
        ("malformed data", [*cls, "--data", str(tmp / "malformed.jsonl")], "malformed JSON"),
        ("empty data", [*cls, "--data", str(tmp / "empty.jsonl")], "empty"),
        ("label missing in a row", [*cls, "--data", str(tmp / "nolabel.jsonl")], "missing required field 'label'"),
        ("palette exists", [*cls, "--data", str(good), "--out", str(tmp / "exists")], "--overwrite"),
        ("anchors swapped", [*cls, "--data", str(good), "--small", "tiny-large", "--large", "tiny-small"], "swap"),
        ("unknown anchor", [*cls, "--data", str(good), "--small", "no-such-model"], "cannot load anchor"),
        ("lr out of range", [*cls, "--data", str(good), "--lr", "-1"], "--lr"),
        ("eta out of range", [*cls, "--data", str(good), "--eta", "1.5"], "--eta"),
        ("bad choice", [*cls, "--data", str(good), "--sampling", "greedy"], "invalid choice"),
        ("not a number", [*cls, "--data", str(good), "--steps", "many"], "--steps"),
        ("wrong built-in for task", ["--task", "chat", "--data", "bbcnews"], "classify data set"),
        ("resume without checkpoint", [*cls, "--data", str(good), "--resume"], "no checkpoint"),
    ]


@pytest.mark.slow
def test_bad_input_gives_one_line_and_writes_nothing(tmp_path):
    cases = _bad_cases(tmp_path)
    procs = []
    for name, args, _ in cases:
        out = [] if "--out" in args else ["--out", str(tmp_path / f"out-{len(procs)}")]
        cmd = [sys.executable, str(SCRIPT), *TINY, "--steps", "2", "--no-progress", *out, *args]
        procs.append(subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        if len(procs) % 3 == 0:  # a few at a time: 2 shared cores
            procs[-3].wait()
    for (name, args, needle), p in zip(cases, procs):
        stdout, stderr = p.communicate(timeout=300)
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        assert p.returncode != 0, name
        assert len(lines) == 1, f"{name}: {stderr!r}"
        assert "error" in lines[0] and needle in lines[0], f"{name}: {lines[0]}"
    assert sorted(x.name for x in tmp_path.iterdir() if not x.name.endswith(".jsonl")) == ["exists"]
    assert [x.name for x in (tmp_path / "exists").iterdir()] == ["keep.txt"]


@pytest.mark.slow
def test_stitchserve_adapt_subcommand(tmp_path):
    """The console script finds `adapt` through the entry point and reports errors in one line."""
    pytest.importorskip("stitchlib.cli")
    cmd = [sys.executable, "-m", "stitchlib.cli", "adapt", *TINY, "--task", "classify", "--data",
           str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "p")]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "no such data file" in lines[0], p.stderr
    h = subprocess.run([sys.executable, "-m", "stitchlib.cli", "adapt", "--help"], env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert h.returncode == 0 and "--adapt-anchors-first" in h.stdout


def test_bias_rows_of_stitches_that_did_not_run_stay_put(tmp_path):
    """Per-stitch biases share one table per layer; Adam must not move the rows of idle stitches."""
    from training.task_data import load_examples
    from training.trainer import Trainer

    cfg = config(tmp_path, write_classify(tmp_path / "d.jsonl", n=40), "classify", steps=6, eval_size=8)
    t = Trainer(cfg)
    t.setup(load_examples(cfg))
    t.calibrate()
    table = t.model.pst_large[-1].ssb  # last large block: every route but the small anchor runs it
    t.train_step()  # zero-initialised heads pass no gradient into the body on the first step
    for _ in range(4):
        before = table.detach().clone()
        sid = t.train_step()["stitch"]
        moved = {t.model.stitches[i].id for i in range(len(before)) if not torch.equal(before[i], table[i])}
        expected = {"large"} | ({sid} if sid != "small" else set())
        assert moved == expected


def test_snip_score_counts_only_the_sampled_stitch_gradients(tmp_path):
    """The teacher's gradients, accumulated first in the same step, are not part of the stitch's score."""
    from stitchlib.snip import snip_score
    from training.task_data import load_examples
    from training.trainer import Trainer

    cfg = config(tmp_path, write_classify(tmp_path / "d.jsonl", n=40), "classify", steps=6, eval_size=8,
                 grad_accum=2, distill=False)
    t = Trainer(cfg)
    t.setup(load_examples(cfg))
    t.calibrate()
    t.train_step()  # heads leave zero, so gradients reach the body
    weights = {k: v.clone() for k, v in t.model.palette_state_dict().items()}
    data_state = t.batches.state_dict()
    rec = t.train_step()

    t.model.load_palette_state_dict(weights)  # replay the step's stitch half alone
    t.batches.load_state_dict(data_state)
    t.opt.zero_grad(set_to_none=True)
    for _ in range(cfg.grad_accum):
        b = next(t.batches)
        with t.autocast():
            (t.task_loss(t.forward(b, rec["stitch"]), b["labels"]) / cfg.grad_accum).backward()
    alone = snip_score(t.params)
    assert rec["snip"] == pytest.approx(alone, rel=1e-4)
    assert rec["snip"] > 0


def test_calibration_from_an_init_palette(tmp_path):
    """--calibration-from reuses the least-squares stitching layers of another palette of the pair."""
    from training.init_palette import init_palette
    from training.adapt_llama import adapt

    init = init_palette(tmp_path / "ls", task="classify", labels=["food", "sport", "tech"], n_calibration=16,
                        dtype="float32", progress=False)
    cfg = config(tmp_path, write_classify(tmp_path / "d.jsonl", n=40), "classify", steps=3, eval_size=8,
                 calibration_from=str(init))
    res = adapt(cfg)
    ls, trained = palette_tensors(init), palette_tensors(cfg.out_path)
    for k in (k for k in ls if k.startswith("stitching.") and k.endswith(("weight", "bias")) and ".lora" not in k):
        assert torch.equal(ls[k], trained[k]), k
    assert res.manifest.training["timings"]["calibration_s"] == 0.0
    assert "calibration_residual" in res.manifest.stitches[1].metrics


def test_pareto_deployment_and_regate(tmp_path):
    """`--deploy pareto` gates every evaluated stitch, not only the SNIP picks; training/regate.py applies
    the same rule to a palette already written: it re-measures every route on the palette's own
    validation split (the same numbers the run recorded) and rewrites the manifest with the verdicts."""
    from stitchlib.gate import GateRow, select_deployment
    from stitchlib.palette import read_manifest
    from training.adapt_llama import main
    from training.config import TrainingError, make_config
    from training.regate import regate

    data = write_chat(tmp_path / "d.json", n=40)
    common = [*TINY, "--task", "chat", "--data", str(data), "--steps", "3", "--batch-size", "4", "--seq-len", "48",
              "--eval-size", "8", "--calib-size", "16", "--dtype", "float32", "--checkpoint-every", "0",
              "--no-progress", "--gate-confidence", "0"]
    assert main([*common, "--out", str(tmp_path / "snip")]) == 0
    assert main([*common, "--out", str(tmp_path / "pareto"), "--deploy", "pareto"]) == 0
    snip, pareto = read_manifest(tmp_path / "snip"), read_manifest(tmp_path / "pareto")
    # same run (same seed), so the same numbers; pareto deploys by the gate over all of them
    expect = select_deployment([GateRow(s.id, s.gflops, s.metrics["neg_loss"]) for s in snip.stitches])
    assert [s.id for s in pareto.deployed()] == expect.deployed_ids()
    assert all(s.dropped for s in pareto.stitches if not s.deployed)
    rec = regate(tmp_path / "snip", z=0.0, progress=False)
    again = read_manifest(tmp_path / "snip")
    assert rec["deployed"] == [s.id for s in again.deployed()] == expect.deployed_ids()
    for old, new in zip(snip.stitches, again.stitches):
        assert new.metrics["neg_loss"] == pytest.approx(old.metrics["neg_loss"], abs=1e-5), old.id
    assert again.training["config"]["deploy"] == "pareto" and again.training["gate"]["val_examples"] == 8
    with pytest.raises(TrainingError, match="eval-stitches all"):
        make_config(small="tiny-small", large="tiny-large", data=str(data), out=str(tmp_path / "x"),
                    deploy="pareto", eval_stitches="deployed")
