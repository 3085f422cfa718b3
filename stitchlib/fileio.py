"""Files on disk: the cache root, streamed SHA-256 of a file, and atomic writes.

Standard library only (no torch, no pydantic), so that every layer (library, serving, training,
benchmarks, the device-side benchmark scripts) can use the same three helpers.

- :func:`cache_root`: ``$STITCHSERVE_HOME`` if set and not empty, else ``~/.cache/stitchserve``.
- :func:`sha256_file`: hex SHA-256 of a file, read in chunks (GB-sized GGUF files never sit in memory).
- :func:`atomic_open` / :func:`atomic_write`: write to a temporary file next to the destination,
  flush and ``fsync`` it, then ``os.replace`` it into place; on any error the temporary file is
  removed and the destination is left as it was. A reader therefore sees the old file or the whole
  new one, never a truncated one, even if the writer is killed midway.
- :func:`atomic_dir`: the same for a directory (a converted anchor, a palette): fill a temporary
  sibling directory, then rename it into place; an old directory is renamed aside first and removed
  after the new one is in place.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

CHUNK_BYTES = 8 * 1024 * 1024


def cache_root() -> Path:
    """``$STITCHSERVE_HOME`` if set (and not empty), else ``~/.cache/stitchserve``."""
    env = os.environ.get("STITCHSERVE_HOME")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "stitchserve"


def sha256_file(path: str | Path, *, progress: bool = False) -> str:
    """Hex SHA-256 of the file at ``path``, streamed in :data:`CHUNK_BYTES` chunks.

    ``progress=True`` shows a tqdm byte bar (tqdm is imported only then: this module needs nothing
    outside the standard library otherwise).
    """
    path = Path(path)
    h = hashlib.sha256()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=f"sha256 {path.name}")
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(CHUNK_BYTES):
                h.update(chunk)
                if bar is not None:
                    bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    return h.hexdigest()


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", *, encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path`` for writing; on a clean exit it replaces ``path``.

    ``mode`` is ``"w"`` (text, UTF-8 unless ``encoding`` says otherwise) or ``"wb"``. The parent
    directory is created. The temporary file gets the usual permissions (``0o666`` less the umask),
    like a file opened with ``open(path, "w")``. If the block raises, the temporary file is deleted,
    ``path`` is untouched and the exception propagates.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode must be 'w' or 'wb', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        if mode == "w":
            fh = os.fdopen(fd, "w", encoding=encoding or "utf-8")
        else:
            fh = os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    try:
        with fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, data: str | bytes, *, encoding: str | None = None) -> Path:
    """Write ``data`` (text or bytes) to ``path`` atomically (see :func:`atomic_open`); return ``path``."""
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w", encoding=encoding) as fh:
        fh.write(data)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """A temporary directory next to ``path`` to fill; on a clean exit it takes ``path``'s place.

    The temporary directory is ``0o755`` (``mkdtemp`` makes it private; caches and palettes are read
    by other processes and users). An existing ``path`` is renamed aside, the new directory renamed
    in, then the old one removed: readers see the old directory or the whole new one (for the
    instant between the two renames, none). If the block raises, the temporary directory is
    removed, ``path`` is untouched and the exception propagates.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        tmp.chmod(0o755)
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}.{secrets.token_hex(4)}")
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)  # put the old one back rather than leave nothing
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


__all__ = ["CHUNK_BYTES", "atomic_dir", "atomic_open", "atomic_write", "cache_root", "sha256_file"]
