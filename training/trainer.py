"""One-stage adapt-and-stitch (ESTA section 4.2) with PST (section 4.1) on a StitchedLM.

Per optimizer step:
  1. the large anchor (teacher) trains on the labels; its argmax predictions become hard labels;
  2. one stitch, drawn by the SNIP sampler, trains on the labels and the teacher's hard labels
     (inplace distillation, weighted by `distill_weight`);
  3. the stitch's SNIP score sum|w * g| is taken over its own gradients only (the teacher's,
     accumulated first, are subtracted) and folded into the sampler's EMA;
  4. clip, AdamW, LR schedule (linear warm-up, cosine decay).
Gradient accumulation runs every teacher micro-batch first, then every stitch micro-batch, so one
snapshot of the gradients separates the two.

Two-stage ablation (`adapt_anchors_first = N`): steps 1..N train only the two anchors on the labels
(the large one as above, the small one in the stitch's place, no distillation); the stitching layers
are then calibrated on the adapted anchors and stitching starts.
"""
from __future__ import annotations

import logging
import math
import resource
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from stitchlib.anchors import load_anchor
from stitchlib.calibrate import calibrate_
from stitchlib.model import StitchedLM
from stitchlib.pst import PSTConfig, PSTLinear
from stitchlib.gate import GateResult, GateRow, select_deployment
from stitchlib.snip import Deployment, SnipSampler, snip_score, validated_deploy

from . import task_data
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import TrainConfig, TrainingError

log = logging.getLogger(__name__)


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was written at `step` (None: before training began)."""

    def __init__(self, signum: int, step: int | None, checkpoint: str | None) -> None:
        super().__init__(signum, step, checkpoint)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop checks it between steps, never in the middle of one."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, keep the last checkpoint
        self.signum = signum

    @contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        old = {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


@dataclass
class TrainResult:
    model: StitchedLM
    sampler: SnipSampler
    labels: list[str] | None
    encoded: task_data.Encoded
    total_steps: int
    history: list[dict[str, Any]]
    metrics: dict[str, dict[str, float]]
    calibration: dict[str, float]
    deployment: Deployment
    timings: dict[str, float] = field(default_factory=dict)
    resumed_from: int | None = None
    gate: GateResult | None = None  # the final deployment (None only for results built by hand)


def cosine_schedule(total: int, warmup: int, min_ratio: float):
    def f(step: int) -> float:  # step = optimizer steps taken so far
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return f


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class Trainer:
    def __init__(self, cfg: TrainConfig, stop: StopFlag | None = None) -> None:
        self.cfg = cfg
        self.stop = stop or StopFlag()
        self.device = torch.device(cfg.device)
        self.autocast_dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else None
        self.samples: dict[str, tuple[float, ...]] = {}  # chat: per-example validation quality (gate margin)

    # ---- setup ----------------------------------------------------------------------------------
    def setup(self, examples: task_data.Examples) -> None:
        cfg = self.cfg
        t0 = time.perf_counter()
        small = load_anchor(cfg.small, dtype=cfg.dtype, device=self.device, quantization=cfg.quantization,
                            progress=cfg.progress)
        large = load_anchor(cfg.large, dtype=cfg.dtype, device=self.device, quantization=cfg.quantization,
                            progress=cfg.progress)
        self.enc = task_data.encode(cfg, examples, small.tokenizer)
        pst = PSTConfig(shared_lora=cfg.shared_lora, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                        stitch_lora=cfg.stitch_lora, stitch_lora_rank=cfg.stitch_lora_rank,
                        stitch_bias=cfg.stitch_bias)
        torch.manual_seed(cfg.seed)  # PST LoRA init and classification heads
        self.model = StitchedLM(small, large, pst=pst, num_labels=len(self.enc.labels or []))
        self.model.eval()  # no dropout anywhere: training is deterministic under a seed
        if self.model.num_labels:
            # Zero heads start every route at the uniform prediction (loss ln C): a random head on an
            # LM's final hidden state (norms of tens) starts at losses of 5+ and wastes early steps.
            for head in (self.model.cls_large, self.model.cls_small):
                torch.nn.init.zeros_(head.weight)
                torch.nn.init.zeros_(head.bias)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise TrainingError("nothing to train: enable --shared-lora, --stitch-lora or --stitch-bias")
        self.total = cfg.total_steps(len(self.enc.train))
        if cfg.adapt_anchors_first >= self.total:
            raise TrainingError(f"--adapt-anchors-first {cfg.adapt_anchors_first} leaves no stitching steps "
                                f"of the {self.total} in this run")
        m = self.model
        self.large_slot, self.small_slot = m.slot["large"], m.slot["small"]
        costs = [m.cost(s).flops_per_token for s in m.stitches]
        candidates = [i for i in range(len(m.stitches)) if i != self.large_slot]  # the teacher trains every step
        warm = cfg.sampler_warmup(self.total) if cfg.sampling == "snip" else self.total + 1
        self.sampler = SnipSampler(costs, candidates=candidates, n_intervals=cfg.n_intervals, eta=cfg.eta,
                                   warmup_steps=warm, seed=cfg.seed)
        decay = [p for n, p in m.named_parameters() if p.requires_grad and "lora_" in n]
        rest = [p for n, p in m.named_parameters() if p.requires_grad and "lora_" not in n]
        # Stitch-specific biases of stitches that did not run this step must not move: no weight
        # decay on them, and `optimizer_step` shields their rows from Adam's momentum.
        self.ssb_tables = [x.ssb for x in m.pst_modules() if isinstance(x, PSTLinear) and x.ssb is not None]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                      {"params": rest, "weight_decay": 0.0}], lr=cfg.lr)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, cosine_schedule(self.total, cfg.lr_warmup(self.total), cfg.min_lr_ratio))
        self.batches = task_data.train_batches(cfg, self.enc)
        self.step = 0
        self.calibrated = False
        self.calibration: dict[str, float] = {}
        self.history: list[dict[str, Any]] = []
        self.resumed_from: int | None = None
        self.saved_step: int | None = None
        self.timings = {"setup_s": time.perf_counter() - t0}

    # ---- checkpoints ----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"config": self.cfg.identity(), "step": self.step, "calibrated": self.calibrated,
                "tensors": {k: v.detach().clone() for k, v in self.model.palette_state_dict().items()},
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "sampler": self.sampler.state_dict(), "batches": self.batches.state_dict(),
                "rng": rng_state(), "history": self.history, "calibration": self.calibration,
                "timings": self.timings}

    def save(self) -> None:
        t0 = time.perf_counter()
        save_checkpoint(self.cfg.checkpoint_path, self.state())
        self.saved_step = self.step
        log.info("checkpoint at step %d: %s (%.1f s)", self.step, self.cfg.checkpoint_path, time.perf_counter() - t0)

    def honour_stop(self) -> None:
        """Between steps: on SIGINT/SIGTERM write a checkpoint of the current state and stop."""
        if self.stop.signum is not None:
            self.save()
            raise Interrupted(self.stop.signum, self.step, str(self.cfg.checkpoint_path))

    def restore(self) -> None:
        ck = load_checkpoint(self.cfg.checkpoint_path, self.cfg)
        self.model.load_palette_state_dict(ck["tensors"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        self.sampler.load_state_dict(ck["sampler"])
        self.batches.load_state_dict(ck["batches"])
        set_rng_state(ck["rng"])
        self.step, self.calibrated = ck["step"], ck["calibrated"]
        self.history, self.calibration = ck["history"], ck["calibration"]
        self.timings.update({k: v for k, v in ck["timings"].items() if k != "setup_s"})
        self.resumed_from = self.saved_step = self.step

    # ---- the loop -------------------------------------------------------------------------------
    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)

    def calibrate(self) -> None:
        if self.cfg.calibration_from:
            self.load_calibration(self.cfg.calibration_from)
            self.check_gradients()
            return
        t0 = time.perf_counter()
        batches = task_data.calibration_batches(self.cfg, self.enc)

        def guarded():  # a signal during calibration stops before any state changes
            for ids, mask in batches:
                if self.stop.signum is not None:
                    raise Interrupted(self.stop.signum, self.saved_step,
                                      None if self.saved_step is None else str(self.cfg.checkpoint_path))
                yield ids.to(self.device), mask.to(self.device)

        self.calibration = calibrate_(self.model, guarded(), progress=self.cfg.progress, total=len(batches),
                                      weighting=self.cfg.calib_weighting)
        self.calibrated = True
        self.timings["calibration_s"] = time.perf_counter() - t0
        log.info("calibrated %d stitching layers on %d sequences in %.1f s (median residual %.3f)",
                 len(self.calibration), sum(len(b[0]) for b in batches), self.timings["calibration_s"],
                 sorted(self.calibration.values())[len(self.calibration) // 2] if self.calibration else float("nan"))
        self.check_gradients()

    def load_calibration(self, palette: str) -> None:
        """Least-squares stitching matrices of an existing palette of the same anchor pair (its
        stitching layers are frozen, so any palette of the pair carries them unchanged)."""
        from stitchlib.palette import load_palette

        m = self.model
        manifest, tensors = load_palette(palette, small_fingerprint=m.small_anchor.fingerprint,
                                         large_fingerprint=m.large_anchor.fingerprint)
        for sid, layer in m.stitching.items():
            w, b = tensors.get(f"stitching.{sid}.weight"), tensors.get(f"stitching.{sid}.bias")
            if w is None or b is None:
                raise TrainingError(f"--calibration-from {palette}: no stitching layer for {sid}")
            layer.set_affine(w, b)
        got = {s.id: s.metrics.get("calibration_residual") for s in manifest.stitches}
        self.calibration = {k: v for k, v in got.items() if v is not None}
        self.calibrated = True
        self.timings["calibration_s"] = 0.0
        log.info("stitching layers taken from %s", palette)

    def check_gradients(self) -> None:
        """LoRA must still receive gradients after the no-grad calibration pass (docs/DESIGN_NOTES.md
        section 4: 4-bit bitsandbytes on CPU repacks weights on a no-grad forward and silently cuts LoRA
        off)."""
        if not self.cfg.shared_lora:
            return
        ids = torch.tensor([self.enc.train[0]["input_ids"][:16]], device=self.device)
        self.opt.zero_grad(set_to_none=True)
        with self.autocast():
            h = self.model(ids, "large", return_hidden=True)
        h.float().pow(2).mean().backward()
        def dead(g: torch.Tensor | None) -> bool:
            return g is None or not bool(torch.isfinite(g).all()) or not bool(g.abs().sum() > 0)

        n_dead = sum(dead(m.lora_b.grad) for m in self.model.pst_large if m.lora_b is not None)
        self.opt.zero_grad(set_to_none=True)
        if n_dead:
            raise TrainingError(f"{n_dead} LoRA modules of the large anchor get no gradient after a no-grad forward "
                                f"(quantization {self.cfg.quantization}); on CPU use --quantization 8bit or none")

    def task_loss(self, out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """classify: out [B, C], labels [B]. chat: out [N, V] from `forward`, labels [B, T] (-100: no loss)."""
        if self.cfg.task == "classify":
            return F.cross_entropy(out.float(), labels)
        tgt = labels[:, 1:]  # the logits at t predict the token at t + 1
        return F.cross_entropy(out.float(), tgt[tgt != -100])

    def forward(self, batch: dict[str, torch.Tensor], stitch: str) -> torch.Tensor:
        """classify: logits [B, C]. chat: logits [N, V] of only the N positions that carry a label, in
        row-major order. The LM head (151,936 x 1,536 on the Qwen pair) then runs on the response, not
        on the prompt and padding: on chat data ~3/4 of the positions, and its forward, backward and
        [B, T, V] float logits were the largest single cost of a step (benchmarks/TRAINING.md)."""
        m = self.model
        if self.cfg.task == "classify":
            return m.classify(batch["input_ids"], stitch, batch["attention_mask"])  # [B, C]
        h = m(batch["input_ids"], stitch, batch["attention_mask"], return_hidden=True)  # [B, T, d], normed
        sel = batch["labels"][:, 1:] != -100  # [B, T-1]
        anchor = m.small_anchor if m.get(stitch).kind == "small" else m.large_anchor
        return anchor.lm_head(h[:, :-1][sel])  # [N, V]

    def hard_labels(self, out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The teacher's argmax as labels in the layout of `labels`: [B] (classify), [B, T] (chat,
        -100 wherever `labels` has no target, so the stitch is scored on the same positions)."""
        pred = out.argmax(-1)
        if self.cfg.task == "classify":
            return pred  # [B]
        hard = torch.full_like(labels, -100)
        hard[:, 1:][labels[:, 1:] != -100] = pred  # out's rows are those positions, row-major
        return hard  # [B, T]

    def optimizer_step(self) -> None:
        """AdamW step in which each stitch's bias rows behave like parameters of their own.

        An anchor layer keeps every stitch's bias in one table [n_slots, out]; the rows of stitches
        that did not run get an all-zero gradient (not None), and Adam's momentum would still move
        them and decay their moments. Those rows (and their Adam state) are put back after the step,
        as if they had had no gradient at all."""
        idle_rows = []
        for p in self.ssb_tables:
            if p.grad is None:
                continue
            idle = p.grad.abs().sum(-1) == 0  # [n_slots]
            if idle.any():
                state = {k: v[idle].clone() for k, v in self.opt.state.get(p, {}).items()
                         if torch.is_tensor(v) and v.shape == p.shape}
                idle_rows.append((p, idle, p.detach()[idle].clone(), state))
        self.opt.step()
        with torch.no_grad():
            for p, idle, rows, state in idle_rows:
                p[idle] = rows
                for k, v in state.items():
                    self.opt.state[p][k][idle] = v

    def train_step(self) -> dict[str, Any]:
        cfg, m = self.cfg, self.model
        t0 = time.perf_counter()
        anchors_stage = self.step < cfg.adapt_anchors_first
        slot = self.small_slot if anchors_stage else self.sampler.sample()
        sid = m.stitches[slot].id
        distill = cfg.distill and not anchors_stage and cfg.distill_weight > 0
        micro = [task_data.to_device(next(self.batches), self.device) for _ in range(cfg.grad_accum)]

        t_data = time.perf_counter()
        teacher_loss, hard = 0.0, []
        for b in micro:
            with self.autocast():
                out = self.forward(b, "large")
                loss = self.task_loss(out, b["labels"])
            (loss / cfg.grad_accum).backward()
            teacher_loss += loss.item() / cfg.grad_accum
            if distill:
                hard.append(self.hard_labels(out.detach(), b["labels"]))
            del out, loss

        t_teacher = time.perf_counter()
        before = [None if p.grad is None else p.grad.clone() for p in self.params]
        stitch_loss = stitch_ce = 0.0  # training objective, and its cross-entropy on the true labels
        for i, b in enumerate(micro):
            with self.autocast():
                out = self.forward(b, sid)
                ce = self.task_loss(out, b["labels"])
                loss = ce
                if distill:
                    loss = (1 - cfg.distill_weight) * ce + cfg.distill_weight * self.task_loss(out, hard[i])
            (loss / cfg.grad_accum).backward()
            stitch_loss += loss.item() / cfg.grad_accum
            stitch_ce += ce.item() / cfg.grad_accum
            del out, loss, ce
        t_stitch = time.perf_counter()
        q = snip_score(self.params, before)
        del before
        if not anchors_stage:
            self.sampler.update(slot, q)

        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for p in self.params if p.grad is not None], cfg.max_grad_norm)
        lr = self.sched.get_last_lr()[0]
        self.optimizer_step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        rec = {"step": self.step, "stitch": sid, "teacher_loss": teacher_loss, "stitch_loss": stitch_loss,
               "stitch_ce": stitch_ce, "snip": q, "lr": lr, "step_s": time.perf_counter() - t0,
               # where the step's time goes (forward + backward of each pass; the rest: SNIP score,
               # clipping and the optimizer)
               "data_s": t_data - t0, "teacher_s": t_teacher - t_data, "stitch_s": t_stitch - t_teacher}
        if not all(math.isfinite(x) for x in (teacher_loss, stitch_loss)):
            raise TrainingError(f"loss is not finite at step {self.step} (stitch {sid}); lower --lr")
        self.history.append(rec)
        return rec

    def run(self) -> TrainResult:
        from tqdm.auto import tqdm

        cfg = self.cfg
        if cfg.adapt_anchors_first == 0 and not self.calibrated:
            self.calibrate()
            self.save()
        bar = tqdm(total=self.total, initial=self.step, desc="adapting", unit="step", disable=not cfg.progress,
                   dynamic_ncols=True)
        try:
            while self.step < self.total:
                if self.step >= cfg.adapt_anchors_first and not self.calibrated:
                    self.calibrate()
                    self.save()
                self.honour_stop()
                rec = self.train_step()
                bar.update(1)
                bar.set_postfix(teacher=f"{rec['teacher_loss']:.3f}", loss=f"{rec['stitch_loss']:.3f}",
                                stitch=rec["stitch"], s_step=f"{rec['step_s']:.2f}", refresh=False)
                if not cfg.progress:
                    log.info("step %d/%d stitch %s teacher %.4f stitch %.4f snip %.4g (%.1f s)", self.step, self.total,
                             rec["stitch"], rec["teacher_loss"], rec["stitch_loss"], rec["snip"], rec["step_s"])
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < self.total:
                    self.save()
        finally:
            bar.close()
            # the steps' own times survive interruptions (they are in the checkpointed history);
            # a wall-clock span of this process would count only the last resumed segment
            self.timings["train_s"] = sum(h["step_s"] for h in self.history)
        self.honour_stop()
        t0 = time.perf_counter()
        self.metrics = {} if cfg.eval_stitches == "deployed" else self.evaluate(None)
        deployment = self.deploy()
        gate = self.gate(deployment)
        self.timings["eval_s"] = time.perf_counter() - t0
        self.timings["peak_rss_mb"] = peak_rss_mb()
        return TrainResult(model=self.model, sampler=self.sampler, labels=self.enc.labels, encoded=self.enc,
                           total_steps=self.total, history=self.history, metrics=self.metrics, deployment=deployment,
                           calibration=self.calibration, timings=self.timings, resumed_from=self.resumed_from,
                           gate=gate)

    def evaluate(self, ids: list[str] | None) -> dict[str, dict[str, float]]:
        return evaluate(self.model, self.cfg, self.enc, stitch_ids=ids, progress=self.cfg.progress,
                        before_stitch=self.honour_stop, samples_out=self.samples)

    def deploy(self) -> Deployment:
        """Top SNIP score per interval, checked on the validation split (stitchlib.snip.validated_deploy);
        every stitch evaluated on the way lands in self.metrics."""
        q = quality_metric(self.cfg.task)
        ids = lambda slots: [self.model.stitches[s].id for s in slots]  # noqa: E731

        def quality_of(slots: list[int]) -> dict[int, float]:
            self.metrics.update(self.evaluate(ids(slots)))
            return {s: self.metrics[i][q] for s, i in zip(slots, ids(slots))}

        known = {self.model.slot[i]: m[q] for i, m in self.metrics.items()}
        dep = validated_deploy(self.sampler, quality_of, floor_slot=self.small_slot,
                               always=[self.small_slot, self.large_slot], tries=self.cfg.deploy_tries, known=known)
        for s, v in dep.rejected.items():
            log.warning("not deploying %s: its validation %s %.4g is below the small anchor's %.4g "
                        "(it costs more)", self.model.stitches[s].id, q, v, dep.quality[self.small_slot])
        for iv in dep.dropped_intervals:
            log.warning("cost interval %d has no deployed stitch: the top-score stitches tried there validated "
                        "below the small anchor", iv)
        return dep

    def gate(self, dep: Deployment) -> GateResult:
        """The palette-wide deployment rule (stitchlib.gate) on top of the validated SNIP choice:
        `validated_deploy` only checks each interval's pick against the small anchor; a larger budget
        must also never buy a worse answer, so of its picks keep those strictly between the anchors
        and on the Pareto front of quality vs cost. Its rejected stitches go through the gate too,
        so every stitch evaluated for deployment carries a verdict and a reason."""
        m = self.model
        if self.cfg.deploy == "pareto":  # every evaluated stitch is a candidate, not only the SNIP picks
            res = pareto_gate(m, self.metrics, self.samples, quality_metric(self.cfg.task), self.cfg.gate_confidence)
        else:
            slots = sorted({*dep.slots, *dep.rejected})
            rows = [GateRow(m.stitches[s].id, m.cost(m.stitches[s]).gflops, dep.quality.get(s),
                            self.samples.get(m.stitches[s].id)) for s in slots]
            # chat: a stitch must win by more than gate_confidence paired standard errors on the validation
            # examples (stitchlib.gate); without per-example samples (classify, or measured before a
            # resume) the margin is 0
            res = select_deployment(rows, small_id=m.stitches[self.small_slot].id,
                                    large_id=m.stitches[self.large_slot].id, z=self.cfg.gate_confidence)
        rejected = {m.stitches[s].id for s in dep.rejected}  # validated_deploy already warned about these
        for d in res.dropped():
            if d.id not in rejected:
                log.warning("not deploying %s: %s", d.id, d.message)
        if res.anchors_inverted:
            log.warning("the large anchor validates no better than the small one (%s %.4g vs %.4g): no stitch "
                        "can lie between them", quality_metric(self.cfg.task), res.large_quality, res.small_quality)
        return res


def pareto_gate(model: StitchedLM, metrics: dict[str, dict[str, float]], samples: dict[str, tuple[float, ...]],
                quality: str, z: float) -> GateResult:
    """The gate (stitchlib.gate.select_deployment) over every measured route of `model`: what
    `--deploy pareto` and training/regate.py deploy. Unmeasured routes are dropped as not_measured."""
    rows = [GateRow(s.id, model.cost(s).gflops, metrics.get(s.id, {}).get(quality), samples.get(s.id))
            for s in model.stitches]
    small = next(s.id for s in model.stitches if s.kind == "small")
    large = next(s.id for s in model.stitches if s.kind == "large")
    return select_deployment(rows, small_id=small, large_id=large, z=z)


@torch.no_grad()
def evaluate(model: StitchedLM, cfg: TrainConfig, enc: task_data.Encoded, *, stitch_ids: list[str] | None = None,
             progress: bool = True, before_stitch=lambda: None,
             samples_out: dict[str, tuple[float, ...]] | None = None) -> dict[str, dict[str, float]]:
    """Stitches (default: every one) on the validation split. chat: token-weighted loss, perplexity,
    neg_loss (and, into `samples_out`, each route's per-example neg_loss for paired comparisons);
    classify: accuracy, loss. `before_stitch()` runs between stitches (the trainer's stop check)."""
    from tqdm.auto import tqdm

    device = torch.device(cfg.device)
    use_bf16 = cfg.dtype == "bfloat16"
    batches = [task_data.to_device(b, device) for b in task_data.eval_batches(cfg, enc)]
    out: dict[str, dict[str, float]] = {}
    todo = model.stitches if stitch_ids is None else [model.get(i) for i in stitch_ids]
    if cfg.task == "chat":  # stitchlib.quality shares the small prefix and skips the prompt's LM head
        from stitchlib.quality import route_nll

        chat = [(b["input_ids"], b["attention_mask"], b["labels"]) for b in batches]
        for i in tqdm(range(0, len(todo), 4), desc="evaluating stitches", unit="4 stitches", disable=not progress):
            before_stitch()  # stop checks between groups of 4 routes
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                res = route_nll(model, chat, [s.id for s in todo[i:i + 4]])
            for sid, r in res.items():
                out[sid] = {k: v for k, v in r.metrics().items() if k != "eval_tokens"}
                if samples_out is not None:
                    samples_out[sid] = tuple(r.samples())
                if not progress:
                    log.info("evaluated %s: %s", sid, ", ".join(f"{k} {v:.4f}" for k, v in out[sid].items()))
        return out
    for st in tqdm(todo, desc="evaluating stitches", unit="stitch", disable=not progress):
        before_stitch()
        loss_sum, n, correct = 0.0, 0, 0
        for b in batches:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                if cfg.task == "classify":
                    logits = model.classify(b["input_ids"], st.id, b["attention_mask"]).float()
                    loss_sum += float(F.cross_entropy(logits, b["labels"], reduction="sum"))
                    correct += int((logits.argmax(-1) == b["labels"]).sum())
                    n += b["labels"].numel()
                else:
                    logits = model(b["input_ids"], st.id, b["attention_mask"])
                    tgt = b["labels"][:, 1:]
                    loss_sum += float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tgt.flatten(),
                                                      ignore_index=-100, reduction="sum"))
                    n += int((tgt != -100).sum())
        loss = loss_sum / max(n, 1)
        if cfg.task == "classify":
            out[st.id] = {"accuracy": correct / max(n, 1), "loss": loss}
        else:
            out[st.id] = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "neg_loss": -loss}
        if not progress:
            log.info("evaluated %s: %s", st.id, ", ".join(f"{k} {v:.4f}" for k, v in out[st.id].items()))
    return out


def quality_metric(task: str) -> str:
    return "accuracy" if task == "classify" else "neg_loss"
