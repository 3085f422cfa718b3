"""The `stitchserve` console script as a user runs it (a real subprocess)."""
from __future__ import annotations

import json
import subprocess
import sys


def run(*args, **kw):
    return subprocess.run([sys.executable, "-m", "stitchlib.cli", *args], capture_output=True, text=True,
                          timeout=300, **kw)


def test_stitches_json_on_tiny_pair():
    r = run("stitches", "--small", "tiny-small", "--large", "tiny-large", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [x["id"] for x in rows] == ["small", "s3-l5", "s2-l4", "s2-l3", "s1-l2", "s0-l1", "large"]
    for x in rows:
        assert {"id", "split", "join", "params", "gflops", "bytes"} <= set(x)
    assert [x["params"] for x in rows] == sorted(x["params"] for x in rows)


def test_stitches_table_and_errors():
    r = run("stitches", "--small", "tiny-small", "--large", "tiny-large")
    assert r.returncode == 0 and "7 stitches" in r.stdout and "s2-l4" in r.stdout
    r = run("stitches", "--small", "tiny-large", "--large", "tiny-small")
    assert r.returncode == 2 and "swap them" in r.stderr and "Traceback" not in r.stderr
    r = run("stitches", "--small", "no-such-model", "--large", "tiny-large")
    assert r.returncode == 2 and "qwen2.5-coder-0.5b" in r.stderr
    r = run("stitches", "--small", "tiny-small", "--large", "tiny-large", "--kernel", "2")
    assert r.returncode == 2 and "equal depths" in r.stderr


def test_init_palette_and_inspect(tmp_path):
    out = tmp_path / "pal"
    r = run("init-palette", "--small", "tiny-small", "--large", "tiny-large", "--out", str(out),
            "--calibration", "8", "--validation", "0")
    assert r.returncode == 0, r.stderr
    r = run("inspect", str(out))
    assert r.returncode == 0 and "7 stitches (7 deployed)" in r.stdout
    r = run("init-palette", "--small", "tiny-small", "--large", "tiny-large", "--out", str(out))
    assert r.returncode == 2 and "already exists" in r.stderr
    # refused before any anchor is loaded or calibrated (unknown anchors would fail otherwise)
    r = run("init-palette", "--small", "no-such-small", "--large", "no-such-large", "--out", str(out))
    assert r.returncode == 2 and "already exists" in r.stderr
    r = run("inspect", str(tmp_path / "missing"))
    assert r.returncode == 2 and "not found" in r.stderr
