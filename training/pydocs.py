"""pydocs: an offline instruction set built from the docstrings and signatures of the running
Python's standard library (``load_chat("pydocs")``), and the plain docstring texts that calibrate
classify palettes (:func:`default_calibration_texts`).

No instruction set ships in any package installable here (docs/DESIGN_NOTES.md section 2); the
standard library's documentation is real instruction/answer text that every machine has.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import logging
import os
import re
import sys
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from stitchlib.errors import DataError
from stitchlib.fileio import atomic_open, cache_root
from stitchlib.prompts import ChatExample
from training.datafiles import chat_row, read_records

log = logging.getLogger(__name__)

__all__ = ["PYDOCS_MODULES", "PYDOCS_VERSION", "build_pydocs", "default_calibration_texts", "pydocs_cache_path"]

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
            return [chat_row(path, line, row) for line, row in read_records(path)]
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
                 "from training.pydocs import _collect_doc_entries, _pydocs_examples; "
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
# Plain docstring texts: calibration of classify palettes (no chat template)
# --------------------------------------------------------------------------------------------------


def default_calibration_texts(n: int = 100) -> list[str]:
    """Deterministic real text available offline: docstrings of stable standard-library objects."""
    mods = ["json", "re", "collections", "itertools", "functools", "os.path", "pathlib", "textwrap",
            "string", "math", "statistics", "datetime", "heapq", "bisect", "random", "argparse",
            "logging", "csv", "shutil", "difflib", "fractions", "decimal", "enum", "dataclasses",
            "contextlib", "operator", "copy", "pprint", "unittest"]
    texts: list[str] = []
    for name in mods:
        mod = importlib.import_module(name)
        for attr in sorted(dir(mod)):
            if attr.startswith("_"):
                continue
            doc = inspect.getdoc(getattr(mod, attr, None))
            if doc and len(doc) > 200:
                texts.append(f"{name}.{attr}: {doc[:1200]}")
    seen, out = set(), []
    for t in texts:  # the same object re-exported by two modules appears once
        if t.split(":", 1)[1] not in seen:
            seen.add(t.split(":", 1)[1])
            out.append(t)
    return out[:n]
