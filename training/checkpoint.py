"""Checkpoints: everything needed to continue a run bit-for-bit, written atomically.

One file, `<ckpt dir>/last.pt`: the palette tensors (trainable PST tensors and the calibrated
stitching matrices), optimizer, LR scheduler, SNIP sampler, data iterator position, RNG states and
the run's history. Written to a temp file in the same directory and renamed over the old one, so a
kill during the write leaves the previous checkpoint intact.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stitchlib.fileio import atomic_open

from .config import TrainConfig, TrainingError

FORMAT = 1


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with atomic_open(path, "wb") as f:
        torch.save({"format": FORMAT, **state}, f)


def load_checkpoint(path: Path, cfg: TrainConfig) -> dict[str, Any]:
    if not path.is_file():
        raise TrainingError(f"--resume: no checkpoint at {path} (nothing to resume; drop --resume)")
    try:
        # Our own file (optimizer and RNG states are not plain tensors): full unpickling is intended.
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise TrainingError(f"--resume: cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise TrainingError(f"--resume: {path} is not a stitchserve checkpoint of format {FORMAT}")
    mine, theirs = cfg.identity(), ckpt["config"]
    diff = [k for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
    if diff:
        detail = ", ".join(f"{k}: checkpoint {theirs.get(k)!r} vs now {mine.get(k)!r}" for k in diff[:4])
        raise TrainingError(f"--resume: checkpoint {path} was made with other options ({detail}); "
                            "rerun with the same options, or start over with --overwrite")
    return ckpt
