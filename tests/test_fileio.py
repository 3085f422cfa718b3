"""stitchlib.fileio: cache root, streamed file hash, atomic writes (standard library only)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

from stitchlib import fileio


def test_cache_root_env_and_default(monkeypatch, tmp_path):
    monkeypatch.setenv("STITCHSERVE_HOME", str(tmp_path / "x"))
    assert fileio.cache_root() == tmp_path / "x"
    monkeypatch.setenv("STITCHSERVE_HOME", "")  # empty counts as unset
    monkeypatch.setenv("HOME", str(tmp_path))
    assert fileio.cache_root() == tmp_path / ".cache" / "stitchserve"
    monkeypatch.setenv("STITCHSERVE_HOME", "~/elsewhere")
    assert fileio.cache_root() == tmp_path / "elsewhere"


def test_sha256_file_streams_in_chunks(monkeypatch, tmp_path):
    data = bytes(range(256)) * 41 + b"tail"
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    monkeypatch.setattr(fileio, "CHUNK_BYTES", 1000)  # many chunks, the last one short
    reads = []
    real_open = open

    def counting_open(*a, **k):
        fh = real_open(*a, **k)
        read = fh.read

        def counted(n=-1):
            reads.append(n)
            return read(n)

        fh.read = counted
        return fh

    monkeypatch.setattr("builtins.open", counting_open)
    assert fileio.sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert set(reads) == {1000} and len(reads) == len(data) // 1000 + 2  # never one whole-file read
    monkeypatch.undo()
    assert fileio.sha256_file(str(path), progress=True) == hashlib.sha256(data).hexdigest()
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert fileio.sha256_file(empty) == hashlib.sha256(b"").hexdigest()


def test_atomic_write_text_and_bytes(tmp_path):
    out = fileio.atomic_write(tmp_path / "a" / "b" / "t.json", "naïve ✓\n")
    assert out == tmp_path / "a" / "b" / "t.json"
    assert out.read_bytes() == "naïve ✓\n".encode()  # UTF-8 whatever the locale
    fileio.atomic_write(out, b"\x00\x01")
    assert out.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in out.parent.iterdir()) == ["t.json"]  # no temporary left


def test_atomic_open_failure_keeps_old_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="midway"):
        with fileio.atomic_open(path, "wb") as fh:
            fh.write(b"new, half written")
            raise RuntimeError("killed midway")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
    with pytest.raises(ValueError, match="mode"):
        with fileio.atomic_open(path, "a"):
            pass


def test_atomic_write_permissions_follow_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = fileio.atomic_write(tmp_path / "shared.json", "{}")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644  # readable by the team's other tools, like open(...)


def test_atomic_dir_replaces_whole_directories(tmp_path):
    out = tmp_path / "cache" / "pal"
    old = os.umask(0o022)
    try:
        with fileio.atomic_dir(out) as tmp:
            assert tmp.parent == out.parent and not out.exists()  # nothing visible until the block ends
            (tmp / "a.bin").write_bytes(b"one")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0o700: other processes read it
    assert [p.name for p in out.iterdir()] == ["a.bin"]
    with fileio.atomic_dir(out) as tmp:  # an existing directory is replaced whole, old files gone
        (tmp / "b.bin").write_bytes(b"two")
    assert [p.name for p in out.iterdir()] == ["b.bin"]
    with pytest.raises(RuntimeError, match="midway"):
        with fileio.atomic_dir(out) as tmp:
            (tmp / "c.bin").write_bytes(b"half")
            raise RuntimeError("killed midway")
    assert [p.name for p in out.iterdir()] == ["b.bin"] and (out / "b.bin").read_bytes() == b"two"
    assert [p.name for p in out.parent.iterdir()] == ["pal"]  # no temporary or old directory left


def test_fileio_imports_only_the_standard_library():
    """Leaf module: usable before transformers is pinned (device scripts) and without torch."""
    code = (
        "import sys; import stitchlib.fileio; "
        "bad = [m for m in ('torch', 'pydantic', 'transformers', 'tqdm', 'numpy') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
