"""Serving configuration, the deploy/ files and the `stitchserve serve` command."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from serving.budget import GRAMMAR
from serving.config import DEFAULT_SLOT_POSITIONS, DeploymentOptions, ServeConfig, ServeConfigError
from serving_fixtures import REPO, free_port, make_palettes

DEPLOY = REPO / "deploy"


@pytest.fixture(scope="module")
def palettes(tmp_path_factory):
    return make_palettes(tmp_path_factory.mktemp("cfg-palettes"))


def test_minimal_config_resolves_from_the_manifest(palettes):
    cfg = ServeConfig(palettes=[{"path": str(palettes["tinychat"])}, {"path": str(palettes["tinycls"])}]).resolved()
    assert [(p.name, p.task, p.deployment_name) for p in cfg.palettes] == [
        ("tinychat", "chat", "Palette-tinychat"), ("tinycls", "classify", "Palette-tinycls")]


def test_relative_paths_become_absolute(palettes, monkeypatch):
    monkeypatch.chdir(palettes["tinychat"].parent)
    cfg = ServeConfig(palettes=[{"path": "tinychat"}]).resolved()
    assert cfg.palettes[0].path == palettes["tinychat"]


@pytest.mark.parametrize("palette, needle", [
    ({"path": "x", "default_budget": "fast"}, GRAMMAR),
    ({"path": "x", "max_batch_size": 0}, "max_batch_size: Input should be greater than or equal to 1"),
    ({"path": "x", "colour": "red"}, "colour: Extra inputs are not permitted"),
    ({"path": "x", "deployment": {"autoscaling_config": {"target_num_ongoing_requests_per_replica": 2}}},
     "use 'target_ongoing_requests'"),
    ({"path": "x", "deployment": {"autoscaling_config": {"min_replicas": 3, "max_replicas": 1}}},
     "max_replicas (1) must be greater than or equal to min_replicas (3)"),
    ({"path": "x", "deployment": {"ray_actor_options": {"num_cpu": 1}}}, "use 'num_cpus'"),
    ({"path": "x", "deployment": {"ray_actor_options": {"num_cpus": -1}}}, "greater than or equal to 0"),
    ({"path": "x", "percent_basis": "watts"}, "percent_basis"),
    ({"path": "x", "max_concurrent_batches": 2}, "palettes.0: max_concurrent_batches was removed"),
    ({"path": "x", "max_seq_len": 1}, "max_seq_len: Input should be greater than or equal to 2"),
    ({"path": "x", "min_latency_saving": 1.0}, "min_latency_saving: Input should be less than 1"),
    ({"path": "x", "min_latency_saving": -0.1}, "min_latency_saving: Input should be greater than or equal to 0"),
])
def test_invalid_palette_config_is_one_clear_line(palette, needle):
    with pytest.raises(ServeConfigError) as e:
        ServeConfig.validate_dict({"palettes": [palette]})
    assert needle in str(e.value)
    assert str(e.value).startswith("invalid serving configuration (config):")


def test_config_level_errors(palettes):
    with pytest.raises(ServeConfigError, match="palettes: List should have at least 1 item"):
        ServeConfig.validate_dict({"palettes": []})
    with pytest.raises(ServeConfigError, match="unique"):
        ServeConfig.validate_dict({"palettes": [{"path": "a", "name": "m"}, {"path": "b", "name": "m"}]})
    with pytest.raises(ServeConfigError, match="expected a mapping"):
        ServeConfig.validate_dict(["palettes"])
    with pytest.raises(ServeConfigError, match="not found"):
        ServeConfig(palettes=[{"path": "/nonexistent/palette"}]).resolved()
    with pytest.raises(ServeConfigError, match="repeated"):  # the same manifest twice
        ServeConfig(palettes=[{"path": str(palettes["tinychat"])}, {"path": str(palettes["tinychat"])}]).resolved()


def test_api_key_from_env(monkeypatch):
    monkeypatch.setenv("STITCHSERVE_API_KEY", "from-env")
    assert ServeConfig(palettes=[{"path": "a"}]).effective_api_key() == "from-env"
    assert ServeConfig(palettes=[{"path": "a"}], api_key="inline").effective_api_key() == "inline"
    assert "inline" not in ServeConfig(palettes=[{"path": "a"}], api_key="inline").model_dump_json()


def test_deployment_options():
    fixed = DeploymentOptions(num_replicas=2).to_options(default_max_ongoing=16)
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed and fixed["max_ongoing_requests"] == 16
    auto = DeploymentOptions(autoscaling_config={"min_replicas": 1, "max_replicas": 3,
                                                 "target_ongoing_requests": 2}).to_options(default_max_ongoing=8)
    assert "num_replicas" not in auto and auto["autoscaling_config"]["target_ongoing_requests"] == 2


def test_engine_slots_and_default_max_ongoing(palettes):
    from serving.app import _default_max_ongoing

    chat, cls = ServeConfig(palettes=[{"path": str(palettes["tinychat"]), "max_batch_size": 4},
                                      {"path": str(palettes["tinycls"]), "max_batch_size": 4}]).resolved().palettes
    assert _default_max_ongoing(chat) == 2 * 4  # the slots + as many waiting for one
    assert _default_max_ongoing(cls) == 4 * 7  # a full batch per stitch (the tiny pair deploys 7)
    assert chat.slot_positions == DEFAULT_SLOT_POSITIONS  # no prompt limit: a preallocation that fits in memory
    assert chat.model_copy(update={"max_prompt_tokens": 100}).slot_positions == 100 + chat.max_tokens_limit
    assert chat.model_copy(update={"max_prompt_tokens": 100, "max_seq_len": 128}).slot_positions == 128


@pytest.mark.parametrize("palette, needle", [
    ({"engine": {"max_slots": 4}}, "engine.max_slots: set max_batch_size (the palette's key) instead"),
    ({"engine": {"max_seq_len": 64}}, "engine.max_seq_len: set max_seq_len at the palette's top level instead"),
    ({"engine": {"prefill_chunk": 64}}, "engine.prefill_chunk: set prefill_chunk at the palette's top level"),
    ({"engine": {"stitches": ["small"]}}, "engine.stitches: the engine serves the palette's deployed stitches"),
    ({"engine": {"cuda_graph": True}}, "palettes.0.engine.cuda_graph: Extra inputs are not permitted"),
    ({"engine": {"cuda_graphs": True}}, "engine.cuda_graphs needs a CUDA device; device is 'cpu'"),
    ({"engine": {"compile_layers": True, "compile_mode": "reduce-overhead"}},
     "palettes.0.engine: compile_mode 'reduce-overhead' captures its own CUDA graphs"),
    ({"engine": {"compile_mode": "default"}}, "compile_mode 'default' is set but compile_layers is off"),
    ({"engine": {"batch_buckets": [4, 2]}}, "palettes.0.engine.batch_buckets: batch_buckets must be increasing"),
    ({"engine": {"batch_buckets": [0, 2]}}, "batch sizes >= 1, got [0, 2]"),
    ({"engine": {"kv_block": 0}}, "palettes.0.engine.kv_block: Input should be greater than or equal to 1"),
    ({"default_max_tokens": 300, "max_tokens_limit": 200}, "default_max_tokens (300) is over max_tokens_limit (200)"),
    ({"max_prompt_tokens": 128, "max_seq_len": 128}, "max_prompt_tokens (128) leaves no room for output in an engine "
                                                     "slot of max_seq_len (128) positions"),
])
def test_impossible_engine_values_are_refused_not_clamped(palette, needle):
    """One key per engine option, and values that cannot hold are validation errors naming the key."""
    with pytest.raises(ServeConfigError) as e:
        ServeConfig.validate_dict({"palettes": [{"path": "x", **palette}]})
    assert needle in str(e.value), str(e.value)


def test_engine_config_resolves_once_against_the_context():
    """`engine_config(context)` is the one engine config a replica runs with: the palette's own keys,
    the nested engine options, and the context; a slot length given over the context is an error
    (the derived default is the context at most)."""
    from serving.config import PaletteDeploymentConfig

    p = PaletteDeploymentConfig(path="x", max_batch_size=3, prefill_chunk=None, max_prompt_tokens=100,
                                max_tokens_limit=200, engine={"kv_block": 16, "max_graphs": 4, "compile_layers": True})
    e = p.engine_config(1024)
    assert (e.max_slots, e.max_seq_len, e.prefill_chunk, e.stitches) == (3, 300, None, None)
    assert (e.kv_block, e.max_graphs, e.compile_layers, e.prefill_tokens) == (16, 4, True, 4096)
    assert p.engine_config(256).max_seq_len == 256  # derived (max_prompt_tokens + max_tokens_limit): capped
    assert PaletteDeploymentConfig(path="x").engine_config(1024).max_seq_len == 1024
    with pytest.raises(ServeConfigError, match=r"max_seq_len \(2048\) is over the palette's context of 1024"):
        PaletteDeploymentConfig(path="x", max_seq_len=2048).engine_config(1024)
    with pytest.raises(ServeConfigError, match=r"max_prompt_tokens \(100\) leaves no room for output in the "
                                               r"palette's context of 100"):
        p.engine_config(100)
    # what the replica receives (a JSON dump) validates to the same config; the dump names only the
    # engine options that were given
    dumped = p.model_dump(mode="json")
    assert dumped["engine"] == {"kv_block": 16, "max_graphs": 4, "compile_layers": True}
    assert PaletteDeploymentConfig.model_validate(dumped).engine_config(1024) == e


def test_yaml_reaches_every_engine_option(palettes, tmp_path):
    """An engine option written in the YAML serve config is what the replica's engine is built with."""
    from serving.engine_client import RuntimeEngineClient
    from stitchlib.types import EngineConfig

    f = tmp_path / "serve.yaml"
    f.write_text(yaml.safe_dump({"palettes": [{
        "path": str(palettes["tinychat"]), "max_batch_size": 3, "max_seq_len": 200, "prefill_chunk": 16,
        "engine": {"kv_block": 8, "prefill_tokens": 64, "max_graphs": 2, "batch_buckets": [1, 3],
                   "pad_to_bucket": True, "cuda_graphs": False, "fast_blocks": False}}]}))
    pal = ServeConfig.from_yaml(f).resolved().palettes[0]
    client = RuntimeEngineClient.load(str(pal.path), engine=pal.engine_config)
    built = client._build()  # what the engine thread builds at the first request
    want = EngineConfig(max_slots=3, max_seq_len=200, prefill_chunk=16, kv_block=8, prefill_tokens=64, max_graphs=2,
                        batch_buckets=[1, 3], pad_to_bucket=True, cuda_graphs=False, fast_blocks=False,
                        stitches=[s.id for s in client.stitches])
    assert built.cfg == want and built.pad and built.graphs is None
    assert (client.max_slots, client.max_seq_len) == (3, 200)
    assert EngineConfig.model_fields.keys() - {"max_slots", "max_seq_len", "prefill_chunk", "stitches"} <= \
        set(yaml.safe_load(f.read_text())["palettes"][0]["engine"]) | {"compile_layers", "compile_mode"}


def test_yaml_errors(tmp_path):
    with pytest.raises(ServeConfigError, match="does not exist"):
        ServeConfig.from_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("palettes: [\n")
    with pytest.raises(ServeConfigError, match="not valid YAML"):
        ServeConfig.from_yaml(bad)
    plain = tmp_path / "plain.yaml"
    plain.write_text("palettes:\n  - {path: p, name: m, task: chat, max_batch_size: -3}\n")
    with pytest.raises(ServeConfigError, match=r"plain.yaml\):\n  palettes.0.max_batch_size"):
        ServeConfig.from_yaml(plain)


# ---- deploy/ ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["serve_cpu.yaml", "serve_gpu.yaml", "serve_local_tiny.yaml"])
def test_serve_config_files_validate(name):
    from ray.serve.schema import ServeDeploySchema

    doc = yaml.safe_load((DEPLOY / name).read_text())
    ServeDeploySchema.model_validate(doc)  # what `serve run` / `serve deploy` check
    app = doc["applications"][0]
    assert app["import_path"] == "serving.app:build_app"
    cfg = ServeConfig.from_yaml(DEPLOY / name)  # what the builder checks
    for p in cfg.palettes:
        assert p.name and p.task  # deployment names do not depend on reading a manifest
        auto = p.deployment.autoscaling_config
        assert auto and auto["max_replicas"] > auto["min_replicas"] and auto["target_ongoing_requests"] > 0
    if name == "serve_gpu.yaml":
        assert all(p.device == "cuda" and p.deployment.ray_actor_options["num_gpus"] > 0 for p in cfg.palettes)


def test_rayservice_embeds_the_cpu_config():
    from ray.serve.schema import ServeDeploySchema

    docs = list(yaml.safe_load_all((DEPLOY / "rayservice.yaml").read_text()))
    rs = docs[0]
    assert rs["apiVersion"] == "ray.io/v1" and rs["kind"] == "RayService"
    serve_cfg = yaml.safe_load(rs["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_cfg)
    args = ServeConfig.validate_dict(serve_cfg["applications"][0]["args"])
    cpu = ServeConfig.from_yaml(DEPLOY / "serve_cpu.yaml")
    assert [p.name for p in args.palettes] == [p.name for p in cpu.palettes]
    assert rs["spec"]["rayClusterConfig"]["rayVersion"] == "2.60.0"
    groups = {g["groupName"]: g for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    gpu_limits = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu_limits["nvidia.com/gpu"] == "1"


def test_dockerfile_installs_the_serve_extra():
    text = (DEPLOY / "Dockerfile").read_text()
    assert "FROM python:3.11" in text and ".[serve]" in text and "TORCH_INDEX" in text
    assert "/-/healthz" in text


# ---- CLI -------------------------------------------------------------------------------------------------
def cli(*argv: str) -> int:
    from stitchlib.cli import main

    return main(list(argv))


def test_cli_check_prints_the_resolved_config(palettes, capsys):
    rc = cli("serve", "--palette", str(palettes["tinychat"]), "--palette", str(palettes["tinycls"]),
             "--replicas", "1", "--max-replicas", "3", "--target-ongoing-requests", "4", "--num-cpus", "0.5",
             "--default-budget", "40%", "--port", "8123", "--check")
    assert rc == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["port"] == 8123 and [p["name"] for p in cfg["palettes"]] == ["tinychat", "tinycls"]
    for p in cfg["palettes"]:
        assert p["default_budget"] == "40%"
        assert p["deployment"]["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3,
                                                         "target_ongoing_requests": 4.0}
        assert p["deployment"]["ray_actor_options"] == {"num_cpus": 0.5}


def test_cli_config_file_and_overrides(palettes, tmp_path, capsys):
    f = tmp_path / "serve.yaml"
    f.write_text(yaml.safe_dump({"applications": [{"name": "stitchserve", "import_path": "serving.app:build_app",
                                                   "args": {"palettes": [{"path": str(palettes["tinychat"]),
                                                                          "max_batch_size": 2}]}}]}))
    assert cli("serve", "--config", str(f), "--replicas", "2", "--check") == 0
    cfg = json.loads(capsys.readouterr().out)
    p = cfg["palettes"][0]
    assert p["max_batch_size"] == 2 and p["deployment"]["num_replicas"] == 2
    assert p["deployment"]["autoscaling_config"] is None


@pytest.mark.parametrize("argv, needle", [
    ([], "nothing to serve"),
    (["--palette", "/nonexistent"], "not found"),
    (["--palette", "{chat}", "--default-budget", "soonish"], GRAMMAR),
    (["--palette", "{chat}", "--max-replicas", "0"], "max_replicas"),
])
def test_cli_errors_exit_2(palettes, capsys, argv, needle):
    argv = [a.replace("{chat}", str(palettes["tinychat"])) for a in argv]
    assert cli("serve", *argv, "--check") == 2
    assert needle in capsys.readouterr().err


@pytest.mark.slow
def test_cli_serves_and_shuts_down_gracefully(palettes, tmp_path):
    """`stitchserve serve` for real: answers, then SIGTERM lets the in-flight request finish, exit 0."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ""}
    proc = subprocess.Popen([sys.executable, "-m", "stitchlib.cli", "serve", "--palette", str(palettes["tinychat"]),
                             "--port", str(port), "--ray-num-cpus", "2", "--num-cpus", "0.5"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        t0 = time.time()
        while time.time() - t0 < 120:
            try:
                if httpx.get(base + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            time.sleep(1)
        else:
            pytest.fail("stitchserve serve did not become ready")
        body = {"model": "tinychat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 400}
        with httpx.Client(base_url=base, timeout=60) as c:
            import concurrent.futures as cf

            with cf.ThreadPoolExecutor(1) as pool:
                fut = pool.submit(c.post, "/v1/chat/completions", json=body)
                time.sleep(0.3)
                proc.send_signal(signal.SIGTERM)
                r = fut.result()
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        assert proc.wait(timeout=90) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = proc.stdout.read()
    assert "serving tinychat at" in out
