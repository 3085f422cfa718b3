"""Reading data files: a JSON array or JSONL file as records, each with its 1-based line number,
and the checks on a row's fields.

Every problem with the data raises :class:`~stitchlib.errors.DataError` with one message naming
the file and line. Used by training.datasets (user files) and training.pydocs (its cache).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stitchlib.errors import DataError
from stitchlib.prompts import ChatExample

__all__ = ["read_records", "object_row", "string_field", "chat_row"]

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


def read_records(path: Path) -> list[tuple[int, Any]]:
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


def string_field(path: Path, line: int, row: Mapping[str, Any], key: str, *, optional: bool = False) -> str:
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


def object_row(path: Path, line: int, row: Any, fields: str) -> Mapping[str, Any]:
    if not isinstance(row, dict):
        raise DataError(f"{path}:{line}: expected a JSON object with {fields}, got {_json_type(row)}")
    return row


def chat_row(path: Path, line: int, row: Any) -> ChatExample:
    row = object_row(path, line, row, "'instruction' and 'output'")
    return ChatExample(
        instruction=string_field(path, line, row, "instruction"),
        input=string_field(path, line, row, "input", optional=True),
        output=string_field(path, line, row, "output"),
    )
