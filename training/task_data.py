"""The run's data, through `training.datasets` and `stitchlib.prompts`: load and validate rows (before any model is loaded, so a
bad file fails fast), split deterministically, tokenise with the anchors' shared tokenizer, and hand
out resumable batches."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from stitchlib import prompts as P
from stitchlib.errors import DataError

from . import datasets as D
from .config import TrainConfig


@dataclass
class Examples:
    train: list
    val: list
    labels: list[str] | None  # classify only; index = class id


@dataclass
class Encoded:
    train: list[dict[str, Any]]  # {"input_ids", "labels"} (chat) or {"input_ids", "label"} (classify)
    val: list[dict[str, Any]]
    labels: list[str] | None
    pad_id: int
    n_truncated: int


def load_examples(cfg: TrainConfig) -> Examples:
    """Rows of `cfg.data` split into train / validation (`eval_size` held out)."""
    if cfg.task == "classify":
        rows, labels = D.load_classify(cfg.data)
    else:  # several chat sources: each split on its own, so every one is represented in validation
        sources = [x.strip() for x in cfg.data.split(",") if x.strip()]
        if len(sources) > 1:
            return _mixed_chat(cfg, sources)
        rows, labels = D.load_chat(cfg.data), None
    if len(rows) < 2:
        raise DataError(f"{cfg.data}: {len(rows)} example(s); need at least 2 (train and validation)")
    val_size = min(cfg.eval_size, len(rows) - 1)
    train, val = D.split(rows, val_size=val_size, seed=cfg.seed, source=cfg.data)
    if cfg.max_train_examples is not None and cfg.max_train_examples < len(train):
        keep = sorted(random.Random(f"stitchserve-subset:{cfg.seed}").sample(range(len(train)),
                                                                             cfg.max_train_examples))
        train = [train[i] for i in keep]
    return Examples(train=train, val=val, labels=labels)


def _mixed_chat(cfg: TrainConfig, sources: list[str]) -> Examples:
    """Chat sources mixed evenly: validation takes eval_size // n from each, training interleaves the
    sources' rows (each capped at the smallest source's train size, so no source dominates)."""
    parts = []
    for i, src in enumerate(sources):
        rows = D.load_chat(src)
        want = cfg.eval_size // len(sources) + (1 if i < cfg.eval_size % len(sources) else 0)
        parts.append(D.split(rows, val_size=min(want, len(rows) - 1), seed=cfg.seed, source=src))
    n = min(len(tr) for tr, _ in parts)
    train = [tr[j] for j in range(n) for tr, _ in parts]  # interleaved: a b a b ...
    val = [v for _, va in parts for v in va]
    if cfg.max_train_examples is not None and cfg.max_train_examples < len(train):
        keep = sorted(random.Random(f"stitchserve-subset:{cfg.seed}").sample(range(len(train)),
                                                                             cfg.max_train_examples))
        train = [train[i] for i in keep]
    return Examples(train=train, val=val, labels=None)


def encode(cfg: TrainConfig, ex: Examples, tokenizer) -> Encoded:
    if cfg.task == "classify":
        # No EOS appended: PaletteRuntime.classify tokenizes the bare text and reads its last token,
        # so training must show the head exactly that token.
        enc = lambda rows: P.encode_classify(rows, tokenizer, ex.labels, cfg.seq_len)  # noqa: E731
    else:
        enc = lambda rows: P.encode_chat(rows, tokenizer, cfg.seq_len)  # noqa: E731
    train, val = enc(ex.train), enc(ex.val)
    for part, recs in (("training", train), ("validation", val)):
        if not recs:
            raise DataError(f"{cfg.data}: no {part} example fits --seq-len {cfg.seq_len}")
    return Encoded(train=list(train), val=list(val), labels=ex.labels, pad_id=P.pad_token_id(tokenizer),
                   n_truncated=train.n_truncated + val.n_truncated)


def train_batches(cfg: TrainConfig, enc: Encoded) -> D.Batches:
    """Endless seeded batches; `state_dict()` goes into checkpoints."""
    return D.Batches(enc.train, cfg.batch_size, pad_id=enc.pad_id, seed=cfg.seed, shuffle=True)


def eval_batches(cfg: TrainConfig, enc: Encoded) -> D.Batches:
    return D.Batches(enc.val, cfg.eval_batch_size, pad_id=enc.pad_id, shuffle=False, max_epochs=1)


def calibration_batches(cfg: TrainConfig, enc: Encoded, batch_size: int = 8):
    """(input_ids, attention_mask) of `calib_size` training sequences in a seeded order."""
    n = min(cfg.calib_size, len(enc.train))
    idx = random.Random(f"stitchserve-calib:{cfg.seed}").sample(range(len(enc.train)), n)
    recs = [enc.train[i] for i in idx]
    return [(b["input_ids"], b["attention_mask"]) for b in P.batched(recs, enc.pad_id, batch_size)]


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}
