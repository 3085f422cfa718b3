"""Fuzz the live tiny-pair app and record what was sent and what came back.

Starts the same application the serving tests use (tests/serving_fixtures.py: a chat and a classify
palette of the tiny pair, API key on), then
  1. runs schemathesis (the pinned dev dependency's CLI) over every operation of /openapi.json with
     every check, writing its JSON report and a HAR log; the HAR gives the count of requests sent
     and of responses by status, per operation;
  2. runs the hypothesis fuzzers of tests/test_fuzz_api.py (budget headers, chat / completions /
     classify bodies) with --examples examples each, through pytest against the same app.
Writes one JSON: both tools' request counts, responses by status, 5xx count, schemathesis's
findings (with one reproducing request per finding), and the health of the server afterwards.

    python benchmarks/api_fuzz.py --examples 25 --out benchmarks/results/api_fuzz_tiny.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def har_counts(har: Path) -> dict:
    doc = json.loads(har.read_text())
    by_op: dict[str, Counter] = {}
    for e in doc["log"]["entries"]:
        path = "/" + e["request"]["url"].split("/", 3)[3].split("?")[0] if e["request"]["url"].count("/") >= 3 else "/"
        op = f"{e['request']['method']} {path}"
        by_op.setdefault(op, Counter())[str(e["response"]["status"])] += 1
    total = sum(by_op.values(), Counter())
    return {"requests": sum(total.values()), "by_status": dict(sorted(total.items())),
            "by_operation": {k: dict(sorted(v.items())) for k, v in sorted(by_op.items())},
            "server_errors": sum(v for k, v in total.items() if k.startswith("5"))}


def run_schemathesis(base: str, key: str, examples: int, seed: int, work: Path) -> dict:
    report, har = work / "st.json", work / "st.har"
    cmd = [shutil.which("st") or "st", "run", base + "/openapi.json", "-H", f"Authorization: Bearer {key}",
           "--checks", "all", "-n", str(examples), "--seed", str(seed), "--phases", "examples,coverage,fuzzing",
           "--continue-on-failure", "--generation-deterministic", "--request-timeout", "120",
           "--report", "json,har", "--report-json-path", str(report), "--report-har-path", str(har)]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=work,
                          env={**os.environ, "SCHEMATHESIS_HOOKS": ""})
    rep = json.loads(report.read_text())
    (work / "st.stdout.txt").write_text(proc.stdout)
    return {"schemathesis": rep["schemathesis_version"], "operations": rep["operations"]["tested"],
            "test_cases": rep["test_cases"]["generated"], "max_examples": examples, "seed": seed,
            "phases": "examples,coverage,fuzzing", "checks": "all",
            "failures": {f["code"] + " " + f["title"]: f["count"] for f in rep["failures"]},
            "failures_detail": rep["failures"], "errors": len(rep["errors"]), "seconds": round(time.time() - t0, 1),
            **har_counts(har), "stdout_tail": proc.stdout[-6000:]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=25, help="schemathesis max examples per operation and phase")
    ap.add_argument("--hypothesis-examples", type=int, default=150, help="per hypothesis fuzzer")
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "api_fuzz_tiny.json")
    args = ap.parse_args(argv)
    import serving_fixtures as sf

    work = Path(tempfile.mkdtemp(prefix="api_fuzz_"))
    t0 = time.time()
    served = sf.start_serving(work / "palettes")
    print(f"api_fuzz: app up in {time.time() - t0:.0f}s at {served.base_url}", flush=True)
    st_res = run_schemathesis(served.base_url, served.api_key, args.examples, args.seed, work)
    print(f"api_fuzz: schemathesis {st_res['requests']} requests, by status {st_res['by_status']}", flush=True)
    with httpx.Client(base_url=served.base_url, headers=served.auth, timeout=30) as c:
        health = c.get("/health").status_code
        ready = c.get("/ready").json()
    sf.stop_serving()  # the hypothesis run starts its own (same config): one app on the machine at a time
    # the hypothesis fuzzers run in their own pytest process; it starts its own app (same config)
    hyp_report = work / "hyp.json"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(REPO / "tests" / "test_fuzz_api.py")], capture_output=True, text=True, timeout=3000,
                          cwd=REPO, env={**os.environ, "STITCHSERVE_FUZZ_REPORT": str(hyp_report),
                                         "STITCHSERVE_FUZZ_EXAMPLES": str(args.hypothesis_examples)})
    hyp = json.loads(hyp_report.read_text()) if hyp_report.is_file() else {"error": proc.stdout[-3000:]}
    hyp["pytest_passed"] = proc.returncode == 0
    hyp["pytest_tail"] = proc.stdout[-1500:]
    doc = {"when": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t0)), "app": "tests/serving_fixtures.py (tiny pair)",
           "schemathesis": st_res, "hypothesis": hyp,
           "after_schemathesis": {"health": health, "inflight": [m["inflight"] for m in ready["models"]],
                     "engine_running": [m["engine"].get("running") for m in ready["models"]]}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print(json.dumps({k: (v if k != "schemathesis" else {kk: vv for kk, vv in v.items()
                                                           if kk not in ("stdout_tail", "failures_detail")})
                      for k, v in doc.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
