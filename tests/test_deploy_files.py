"""Static checks of Dockerfile, docker-compose.yml and deploy/: no Docker or cluster needed.

The deployed processes must run exactly the commands the test suite starts; settings they name
must be ones the gateway reads, with values it accepts; Kubernetes manifests must match the API
schema; and no secret may be written into any of these files.
"""

from __future__ import annotations

import copy
import importlib
import re
import shutil
import subprocess
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from kubernetes_validate import utils as kubernetes_validate

import service
from cli.stack import api_argv, beat_argv, worker_argv
from core.metrics import COUNTER_HELP, GAUGE_HELP, LABELLED_COUNTER_HELP
from core.settings import Settings, SettingsError, load_settings, sentinel_broker_url
from core.wakeups import JOBS_QUEUE, WEBHOOKS_QUEUE
from emulator.__main__ import build_config

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE_FILE = ROOT / "docker-compose.yml"
SENTINEL_OVERRIDE = ROOT / "docker-compose.sentinel.yml"
DEPLOY = ROOT / "deploy"
SETTINGS_SOURCE = ROOT / "core" / "settings.py"
SENTINEL_MANIFEST = DEPLOY / "redis-sentinel" / "redis-sentinel.yaml"
KEDA_SCHEMA = ROOT / "tests" / "schemas" / "keda.sh_scaledobjects.v1alpha1.yaml"

API_COMMAND = ["gunicorn", "-c", "python:service.gunicorn_conf", "service:create_app()"]
WORKER_COMMAND = [
    "celery",
    "-A",
    "workers",
    "worker",
    "-Q",
    "jobs,webhooks",
    "-l",
    "INFO",
    "--without-gossip",
    "--without-mingle",
]
BEAT_COMMAND = ["celery", "-A", "workers", "beat", "-l", "INFO", "-s", "/tmp/celerybeat-schedule"]
EMULATOR_COMMAND_BEFORE_TOKEN = ["python", "-m", "emulator", "--host", "0.0.0.0", "--port", "8100"]
WORKER_PING = "celery -A workers inspect ping -d celery@$HOSTNAME"
API_PORT = 8000

GATEWAY_SERVICES = ("api", "worker", "beat")
NAMESPACE = "inpaint-gateway"
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|PRIVATE", re.IGNORECASE)
INTERPOLATION = re.compile(r"\$\{(?P<name>\w+)(?::?-(?P<default>[^}]*))?\}")


# --- helpers -------------------------------------------------------------------------------


def read_yaml_documents(path: Path) -> list[dict[str, Any]]:
    """Every non-empty document of a YAML file."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def compose() -> dict[str, Any]:
    """docker-compose.yml as compose sees it before interpolation (YAML merge keys resolved)."""
    loaded = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(loaded, dict)
    return loaded


def compose_with_sentinels() -> dict[str, Any]:
    """docker-compose.yml with docker-compose.sentinel.yml over it, before interpolation."""
    override = yaml.safe_load(SENTINEL_OVERRIDE.read_text())
    merged: dict[str, Any] = compose_merge(compose(), override)
    return merged


def compose_merge(base: Any, override: Any) -> Any:
    """`override` over `base` as compose merges the keys these files use (service, environment,
    depends_on, volumes: mapping by mapping, key by key); any other value is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        return base | {k: compose_merge(base.get(k), v) for k, v in override.items()}
    return override


def sentinel_services(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run redis-sentinel."""
    return {
        name: service_
        for name, service_ in document["services"].items()
        if "redis-sentinel" in " ".join(service_.get("command") or [])
    }


def sentinel_config(service_: dict[str, Any]) -> list[str]:
    """The config lines a compose sentinel writes on its first start, its variables filled in
    from the service's environment."""
    script = interpolate(service_["command"][-1])
    body = re.search(r"<<EOF\n(.*?)\nEOF\n", script, re.DOTALL)
    assert body, "the sentinel writes its config with a heredoc"
    env = service_.get("environment", {})
    return re.sub(r"\$(\w+)", lambda m: env[m.group(1)], body.group(1)).splitlines()


def sentinel_directives(lines: list[str], directive: str) -> list[list[str]]:
    """The arguments of each `sentinel <directive> …` line."""
    return [line.split()[2:] for line in lines if line.split()[:2] == ["sentinel", directive]]


def interpolate(value: str) -> str:
    """What compose makes of `value` when none of the variables it names is set."""
    unescaped = value.replace("$$", "\0")
    resolved = INTERPOLATION.sub(lambda m: m.group("default") or "", unescaped)
    return resolved.replace("\0", "$")


def settings_names() -> set[str]:
    """Every environment variable core/settings.py reads."""
    # env.str("NAME", …) and the like, and helpers handed the env: _allowed_networks(env, "NAME").
    pattern = r'(?:env\.\w+\(|\(env,)\s*"([A-Z][A-Z0-9_]*)"'
    return set(re.findall(pattern, SETTINGS_SOURCE.read_text()))


def isolated_settings_env(monkeypatch: pytest.MonkeyPatch, values: dict[str, str]) -> None:
    """Make the process environment hold exactly `values` for every gateway setting."""
    for name in settings_names():
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(f"{name}_FILE", raising=False)
    for name, value in values.items():
        monkeypatch.setenv(name, value)


def duration_s(text: str | int) -> float:
    """Seconds in a compose duration such as `60s`, `1m30s` or `1h`."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 0.000001}
    if isinstance(text, int):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


def manifest_files() -> list[Path]:
    return sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])


def manifests() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in manifest_files():
        for doc in read_yaml_documents(path):
            yield path, doc


def resource(kind: str, name: str) -> dict[str, Any]:
    found = [
        doc for _, doc in manifests() if doc["kind"] == kind and doc["metadata"]["name"] == name
    ]
    assert len(found) == 1, f"expected exactly one {kind}/{name} under deploy/, found {len(found)}"
    return found[0]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def only_container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = pod_spec(workload)["containers"]
    assert len(containers) == 1, workload["metadata"]["name"]
    container: dict[str, Any] = containers[0]
    return container


def argv(container: dict[str, Any]) -> list[str]:
    """The process a container runs (the image has no ENTRYPOINT, see the Dockerfile test)."""
    return [*container.get("command", []), *container.get("args", [])]


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels selectors are checked here"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "Dockerfile ends inside a continued line"
    return [(word.upper(), rest.strip()) for word, _, rest in (s.partition(" ") for s in logical)]


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def image_uid() -> int:
    users = [args for word, args in final_stage() if word == "USER"]
    assert users, "the runtime stage must switch to a non-root USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit(), "USER must be numeric so Kubernetes' runAsNonRoot can verify it"
    return int(uid)


# --- the commands themselves match the code ------------------------------------------------


def test_commands_name_real_entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    assert callable(service.create_app)
    monkeypatch.delenv("API_BIND", raising=False)
    conf = importlib.reload(importlib.import_module("service.gunicorn_conf"))
    assert conf.bind == f"0.0.0.0:{API_PORT}"
    queues = WORKER_COMMAND[WORKER_COMMAND.index("-Q") + 1]
    assert set(queues.split(",")) == {JOBS_QUEUE, WEBHOOKS_QUEUE}
    emulator = build_config([*EMULATOR_COMMAND_BEFORE_TOKEN[3:], "--token", "t"], {})
    assert (emulator.host, emulator.port, emulator.token) == ("0.0.0.0", 8100, "t")


# --- docker-compose.yml --------------------------------------------------------------------


def test_compose_services_run_the_suite_commands() -> None:
    services = compose()["services"]
    assert set(services) == {"redis", "emulator", *GATEWAY_SERVICES}
    assert services["api"]["command"] == API_COMMAND
    assert services["worker"]["command"] == WORKER_COMMAND
    assert services["beat"]["command"] == BEAT_COMMAND
    emulator = services["emulator"]["command"]
    assert emulator[:-2] == EMULATOR_COMMAND_BEFORE_TOKEN and emulator[-2] == "--token"
    for name in ("emulator", *GATEWAY_SERVICES):
        assert services[name]["build"] in (".", {"context": "."}), name
        assert "entrypoint" not in services[name], name


def test_compose_redis_is_durable_and_checked() -> None:
    document = compose()
    redis = document["services"]["redis"]
    command = " ".join(redis["command"])
    assert redis["image"].startswith("redis:7")
    assert "--appendonly yes" in command
    assert "--appendfsync everysec" in command
    volume, _, target = redis["volumes"][0].partition(":")
    assert target == "/data" and volume in document["volumes"], "AOF needs a named volume on /data"
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    for name in GATEWAY_SERVICES:
        service_ = document["services"][name]
        assert service_["depends_on"]["redis"]["condition"] == "service_healthy", name
        assert service_["restart"] == "unless-stopped", name


# The longest a worker's task holds its thread at the defaults: a look's three calls (/result,
# /status, /result) at RUNCOMFY_TIMEOUT_S each, or a webhook attempt (WEBHOOK_TIMEOUT_S; in a
# task of its own, beside the steps), and slack.
LONGEST_STEP_S = max(3 * Settings.runcomfy_timeout_s, Settings.webhook_timeout_s) + 5


def test_compose_worker_can_finish_warm_shutdown_and_beat_is_single() -> None:
    services = compose()["services"]
    assert duration_s(services["worker"]["stop_grace_period"]) >= LONGEST_STEP_S + 10
    gunicorn_conf = importlib.import_module("service.gunicorn_conf")
    assert duration_s(services["api"]["stop_grace_period"]) > gunicorn_conf.graceful_timeout
    assert services["worker"].get("stop_signal", "SIGTERM") == "SIGTERM"
    assert WORKER_PING.replace("$", "$$") in " ".join(services["worker"]["healthcheck"]["test"])
    beat = services["beat"]
    assert beat.get("deploy", {}).get("replicas", 1) == 1
    assert beat.get("scale", 1) == 1


def test_compose_api_publishes_its_port() -> None:
    ports = compose()["services"]["api"]["ports"]
    assert any(interpolate(str(p)).endswith(f":{API_PORT}") for p in ports)


def test_compose_upstream_defaults_to_the_emulator_and_is_overridable() -> None:
    services = compose()["services"]
    emulator_token = services["emulator"]["command"][-1]
    for name in GATEWAY_SERVICES:
        env = services[name]["environment"]
        assert env["RUNCOMFY_BASE_URL"] == "${RUNCOMFY_BASE_URL:-http://emulator:8100}", name
        token = env["RUNCOMFY_API_TOKEN"]
        assert INTERPOLATION.fullmatch(token) and token.startswith("${RUNCOMFY_API_TOKEN"), name
        # Out of the box the gateway presents the token the emulator accepts.
        assert interpolate(token) == interpolate(emulator_token), name
        allowed = env.get("WEBHOOK_ALLOWED_NETWORKS")
        assert allowed is None or interpolate(allowed) == "", (
            "must be empty unless the operator sets it"
        )


@pytest.mark.parametrize("document", [compose, compose_with_sentinels], ids=["base", "sentinel"])
def test_compose_holds_no_literal_secret(document: Callable[[], dict[str, Any]]) -> None:
    for name, service_ in document()["services"].items():
        env = service_.get("environment") or {}
        items = env.items() if isinstance(env, dict) else (e.partition("=")[::2] for e in env)
        for key, value in items:
            if SECRET_NAME.search(key) and value not in (None, ""):
                assert INTERPOLATION.fullmatch(str(value)), f"{name}: {key} is a literal"
                # Only a value meant for the local emulator may serve as the default.
                default = interpolate(str(value))
                assert default in ("", "emulator-local-token"), f"{name}: {key} default {default!r}"
    assert "whsec_" not in COMPOSE_FILE.read_text() + SENTINEL_OVERRIDE.read_text()


def test_compose_settings_are_known_and_load(monkeypatch: pytest.MonkeyPatch) -> None:
    known = settings_names()
    for name in GATEWAY_SERVICES:
        env: dict[str, str | None] = compose()["services"][name]["environment"]
        unknown = set(env) - known
        assert not unknown, f"{name}: the gateway reads no {sorted(unknown)}"
        values = {k: interpolate(v) for k, v in env.items() if v is not None}
        isolated_settings_env(monkeypatch, values)
        settings = load_settings()
        assert settings.runcomfy_base_url == "http://emulator:8100"
        assert settings.redis_url == "redis://redis:6379/0"


def compose_binary() -> list[str] | None:
    """`docker-compose` (v1, Debian's package) or the `docker compose` plugin, if installed."""
    if found := shutil.which("docker-compose"):
        return [found]
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    ):
        return [docker, "compose"]
    return None


def run_compose(
    binary: list[str], *args: str, home: Path, files: tuple[Path, ...] = (COMPOSE_FILE,)
) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home)}
    return subprocess.run(
        [*binary, *(f"-f{path}" for path in files), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_compose_file_is_valid_for_docker_compose(tmp_path: Path) -> None:
    binary = compose_binary()
    if binary is None:
        pytest.skip(
            "no docker-compose binary (apt-get install --no-install-recommends docker-compose); "
            "the YAML checks above still ran"
        )
    quiet = run_compose(binary, "config", "-q", home=tmp_path)
    assert quiet.returncode == 0, quiet.stderr
    rendered = run_compose(binary, "config", home=tmp_path)
    assert rendered.returncode == 0, rendered.stderr
    services = yaml.safe_load(rendered.stdout)["services"]
    assert services["worker"]["command"] == WORKER_COMMAND
    assert services["api"]["environment"]["RUNCOMFY_BASE_URL"] == "http://emulator:8100"
    assert services["api"]["environment"]["RUNCOMFY_API_TOKEN"] == "emulator-local-token"


# --- docker-compose.sentinel.yml -----------------------------------------------------------

SENTINEL_PORT = 26379


def test_sentinel_override_is_valid_for_docker_compose(tmp_path: Path) -> None:
    binary = compose_binary()
    if binary is None:
        pytest.skip(
            "no docker-compose binary (apt-get install --no-install-recommends docker-compose); "
            "the YAML checks of the override still ran"
        )
    files = (COMPOSE_FILE, SENTINEL_OVERRIDE)
    quiet = run_compose(binary, "config", "-q", home=tmp_path, files=files)
    assert quiet.returncode == 0, quiet.stderr
    rendered = run_compose(binary, "config", home=tmp_path, files=files)
    assert rendered.returncode == 0, rendered.stderr
    services = yaml.safe_load(rendered.stdout)["services"]
    assert len(sentinel_services({"services": services})) == 3
    assert services["worker"]["command"] == WORKER_COMMAND  # the base file's, kept
    for name in GATEWAY_SERVICES:
        env = services[name]["environment"]
        assert env["REDIS_SENTINEL_MASTER"] and env["REDIS_SENTINELS"], name
        assert env["CELERY_BROKER_URL"].startswith("sentinel://"), name
        assert env["RUNCOMFY_BASE_URL"] == "http://emulator:8100", name  # the base file's, kept


def test_sentinel_override_points_the_gateway_at_the_sentinels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    document = compose_with_sentinels()
    sentinels = sentinel_services(document)
    known = settings_names()
    for name in GATEWAY_SERVICES:
        service_ = document["services"][name]
        env: dict[str, str | None] = service_["environment"]
        assert not set(env) - known, f"{name}: the gateway reads no {sorted(set(env) - known)}"
        values = {k: interpolate(v) for k, v in env.items() if v is not None}
        isolated_settings_env(monkeypatch, values)
        settings = load_settings()
        sentinel = settings.redis_sentinel
        assert sentinel is not None, name
        assert sorted(sentinel.addresses) == [(s, SENTINEL_PORT) for s in sorted(sentinels)], name
        for config in map(sentinel_config, sentinels.values()):
            (monitor,) = sentinel_directives(config, "monitor")
            assert monitor[0] == sentinel.master, f"{name}: the sentinels watch {monitor[0]}"
        # The broker follows the master through the sentinels: what the gateway derives itself
        # when CELERY_BROKER_URL is not set, not the base file's redis://redis (the first primary).
        assert settings.celery_broker_url == sentinel_broker_url(settings.redis_url, sentinel)
        monkeypatch.delenv("CELERY_BROKER_URL")
        assert load_settings().celery_broker_url == settings.celery_broker_url, name
        for needed in ("redis", *sentinels):
            assert service_["depends_on"][needed]["condition"] == "service_healthy", name


def test_sentinel_override_runs_three_sentinels_with_quorum_2() -> None:
    document = compose_with_sentinels()
    sentinels = sentinel_services(document)
    assert len(sentinels) == 3
    for name, service_ in sentinels.items():
        config = sentinel_config(service_)
        assert f"port {SENTINEL_PORT}" in config, name
        assert sentinel_directives(config, "resolve-hostnames") == [["yes"]], name
        assert sentinel_directives(config, "announce-hostnames") == [["yes"]], name
        # Announced by its service name, the one REDIS_SENTINELS and its peers use.
        assert sentinel_directives(config, "announce-ip") == [[name]], name
        ((master, host, port, quorum),) = sentinel_directives(config, "monitor")
        assert (host, port, quorum) == ("redis", "6379", "2"), name
        ((_, down_after_ms),) = sentinel_directives(config, "down-after-milliseconds")
        ((_, failover_timeout_ms),) = sentinel_directives(config, "failover-timeout")
        assert 1000 <= int(down_after_ms) <= 30000, name
        assert int(failover_timeout_ms) > 2 * int(down_after_ms), name
        assert service_["image"].startswith("redis:7"), name
        assert service_["depends_on"]["redis"]["condition"] == "service_healthy", name
        assert service_["restart"] == "unless-stopped", name
        check = " ".join(service_["healthcheck"]["test"])
        assert f"-p {SENTINEL_PORT}" in check and master in check, name


def test_sentinel_override_replica_replicates_the_primary() -> None:
    document = compose_with_sentinels()
    services = document["services"]
    replicas = {
        name: s for name, s in services.items() if "--replicaof" in (s.get("command") or [])
    }
    assert list(replicas) == ["redis-replica"]
    for name, service_ in (("redis", services["redis"]), *replicas.items()):
        command = service_["command"]
        text = " ".join(command)
        assert "--appendonly yes" in text and "--appendfsync everysec" in text, name
        # Known to the sentinels by its service name, whichever role it has.
        assert command[command.index("--replica-announce-ip") + 1] == name
        assert service_["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"], name
        assert service_["restart"] == "unless-stopped", name
        volume, _, target = service_["volumes"][0].partition(":")
        assert target == "/data" and volume in document["volumes"], name
    replica = services["redis-replica"]
    command = replica["command"]
    at = command.index("--replicaof")
    assert command[at + 1 : at + 3] == ["redis", "6379"]
    assert replica["depends_on"]["redis"]["condition"] == "service_healthy"
    assert replica["volumes"] != services["redis"]["volumes"], "each its own data"


# --- deploy/ (Kubernetes) ------------------------------------------------------------------

SCHEMA_VERSIONS = sorted(
    {kubernetes_validate.all_versions()[0], kubernetes_validate.latest_version()}
)


def is_keda(doc: dict[str, Any]) -> bool:
    """A KEDA resource: a custom resource, not in the Kubernetes schema."""
    return str(doc["apiVersion"]).startswith("keda.sh/")


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
def test_manifest_matches_kubernetes_schema(path: Path, version: str) -> None:
    documents = read_yaml_documents(path)
    assert documents, f"{path} holds no resource"
    for doc in documents:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{path}: {doc['kind']}"
        if is_keda(doc):
            continue  # test_keda_resources_match_the_keda_schema
        kubernetes_validate.validate(doc, version, strict=True)


def test_schema_validation_rejects_a_broken_manifest() -> None:
    broken = copy.deepcopy(resource("Deployment", "api"))
    container = only_container(broken)
    container["livenessprobe"] = container.pop("livenessProbe")  # a typo, silently ignored by YAML
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)


def strict(schema: Any) -> Any:
    """`schema` refusing unknown fields wherever it lists the known ones.

    A custom resource's schema leaves extra fields allowed (the API server prunes them, so a
    misspelt field is dropped without a word); `kubectl apply` validates strictly, as here.
    """
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    tightened = {key: strict(value) for key, value in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema:
        tightened["additionalProperties"] = False
    return tightened


def keda_validator() -> jsonschema.Draft7Validator:
    schema = strict(yaml.safe_load(KEDA_SCHEMA.read_text()))
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(
        schema, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER
    )


def keda_problems(doc: dict[str, Any]) -> list[str]:
    """Why KEDA's API would refuse `doc`: its schema, then the rules its admission webhook adds."""
    problems = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in keda_validator().iter_errors(doc)
    ]
    if problems:
        return problems
    spec = doc["spec"]
    if (doc["apiVersion"], doc["kind"]) != ("keda.sh/v1alpha1", "ScaledObject"):
        problems.append(f"not a keda.sh/v1alpha1 ScaledObject: {doc['apiVersion']} {doc['kind']}")
    low, high = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
    if not 0 <= low <= high:
        problems.append(f"minReplicaCount {low} and maxReplicaCount {high}")
    names = [t["name"] for t in spec["triggers"] if "name" in t]
    if len(names) != len(set(names)):
        problems.append(f"trigger names repeat: {names}")
    if "fallback" in spec:
        # KEDA's webhook up to 2.16 (the schema's era) refuses a fallback unless every
        # trigger says metricType AverageValue (2.14 refused one left unset) and none is cpu or
        # memory; later versions accept more, so the strictest rule keeps the file good in all.
        for trigger in spec["triggers"]:
            if trigger["type"] in ("cpu", "memory"):
                problems.append(f"fallback with a {trigger['type']} trigger")
            elif trigger.get("metricType") != "AverageValue":
                problems.append(f"fallback with metricType {trigger.get('metricType')!r}")
    return problems


def test_keda_resources_match_the_keda_schema() -> None:
    keda = [(path, doc) for path, doc in manifests() if is_keda(doc)]
    assert [doc["kind"] for _, doc in keda] == ["ScaledObject"]
    for path, doc in keda:
        assert keda_problems(doc) == [], path


@pytest.mark.parametrize(
    "breakage",
    [
        "misspelt field",
        "no triggers",
        "replicas as text",
        "fallback on a Value metric",
        "fallback on cpu",
        "min above max",
    ],
)
def test_keda_validation_rejects_a_broken_scaledobject(breakage: str) -> None:
    broken = copy.deepcopy(resource("ScaledObject", "worker"))
    spec = broken["spec"]
    if breakage == "misspelt field":
        spec["minReplicas"] = spec.pop("minReplicaCount")  # the HPA's word, not KEDA's
    elif breakage == "no triggers":
        del spec["triggers"]
    elif breakage == "replicas as text":
        spec["maxReplicaCount"] = "10"
    elif breakage == "fallback on a Value metric":
        spec["triggers"][0]["metricType"] = "Value"
    elif breakage == "fallback on cpu":
        spec["triggers"].append(
            {"type": "cpu", "metricType": "Utilization", "metadata": {"value": "70"}}
        )
    elif breakage == "min above max":
        spec["minReplicaCount"] = spec["maxReplicaCount"] + 1
    assert keda_problems(broken), breakage


def test_deployments_run_the_suite_commands() -> None:
    assert argv(only_container(resource("Deployment", "api"))) == API_COMMAND
    assert argv(only_container(resource("Deployment", "worker"))) == WORKER_COMMAND
    assert argv(only_container(resource("Deployment", "beat"))) == BEAT_COMMAND
    images = {only_container(resource("Deployment", n))["image"] for n in GATEWAY_SERVICES}
    assert len(images) == 1, f"api, worker and beat must run one image, not {images}"


def test_api_deployment_probes_and_replicas() -> None:
    api = resource("Deployment", "api")
    assert "replicas" not in api["spec"], "the HPA owns the count (deploy/api-hpa.yaml)"
    container = only_container(api)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        http = container[probe]["httpGet"]
        assert http["path"] == path
        assert ports.get(http["port"], http["port"]) == API_PORT
    service_ = resource("Service", "api")
    assert selects(
        {"matchLabels": service_["spec"]["selector"]}, api["spec"]["template"]["metadata"]["labels"]
    )
    assert all(p["targetPort"] in (API_PORT, *ports) for p in service_["spec"]["ports"])


def test_worker_deployment_shuts_down_warm_and_is_probed() -> None:
    worker = resource("Deployment", "worker")
    assert pod_spec(worker)["terminationGracePeriodSeconds"] >= LONGEST_STEP_S + 10
    probe = only_container(worker)["livenessProbe"]
    command = probe["exec"]["command"]
    assert command[:2] == ["sh", "-c"], "$HOSTNAME needs a shell to expand"
    assert command[2].startswith(WORKER_PING)
    timeout = re.search(r"--timeout (\d+)", command[2])
    assert timeout and probe["timeoutSeconds"] > int(timeout.group(1))
    assert probe["periodSeconds"] >= 30 and probe["failureThreshold"] >= 2


def test_beat_deployment_is_single() -> None:
    beat = resource("Deployment", "beat")
    assert beat["spec"]["replicas"] == 1
    assert beat["spec"]["strategy"]["type"] == "Recreate"
    scalers = [doc for _, doc in manifests() if doc["kind"] in SCALER_KINDS]
    assert scalers, "the check below must look at something"
    assert all(s["spec"]["scaleTargetRef"]["name"] != "beat" for s in scalers)


SCALER_KINDS = ("HorizontalPodAutoscaler", "ScaledObject")

# Every metric the gateway's /metrics exports (a counter gets `_total`).
EXPORTED_METRICS = {
    *(f"inpaint_gateway_{name}_total" for name in (*COUNTER_HELP, *LABELLED_COUNTER_HELP)),
    *(f"inpaint_gateway_{name}" for name in GAUGE_HELP),
}


def scale_target(scaler: dict[str, Any]) -> dict[str, Any]:
    """The Deployment a HorizontalPodAutoscaler or ScaledObject scales."""
    ref = scaler["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"]) == ("apps/v1", "Deployment"), ref
    return resource("Deployment", ref["name"])


def test_each_scaled_deployment_has_one_scaler_and_no_replica_count() -> None:
    scalers = [doc for _, doc in manifests() if doc["kind"] in SCALER_KINDS]
    targets = sorted(scale_target(s)["metadata"]["name"] for s in scalers)
    assert targets == ["api", "worker"], "two scalers on one Deployment fight over its count"
    for name in targets:
        # A `replicas` in the Deployment would reset the scaled count on every `kubectl apply`.
        assert "replicas" not in resource("Deployment", name)["spec"], name


def test_api_hpa_scales_on_cpu_against_the_request() -> None:
    hpa = resource("HorizontalPodAutoscaler", "api")
    spec = hpa["spec"]
    container = only_container(scale_target(hpa))
    assert container["resources"]["requests"]["cpu"], "Utilization is a share of the CPU request"
    (metric,) = spec["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    assert 50 <= metric["resource"]["target"]["averageUtilization"] <= 90
    api_budget = resource("PodDisruptionBudget", "api")["spec"]["minAvailable"]
    assert spec["minReplicas"] > api_budget, "a drain must be able to move an API pod"
    assert spec["maxReplicas"] > spec["minReplicas"]
    assert spec["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 120
    assert spec["behavior"]["scaleUp"]["stabilizationWindowSeconds"] == 0


def test_worker_scaledobject_scales_on_due_work_with_a_fallback() -> None:
    scaled = resource("ScaledObject", "worker")
    spec = scaled["spec"]
    assert scale_target(scaled)["metadata"]["name"] == "worker"
    worker_budget = resource("PodDisruptionBudget", "worker")["spec"]["maxUnavailable"]
    assert spec["minReplicaCount"] > worker_budget, "a drain must leave a worker consuming"
    assert spec["minReplicaCount"] <= spec["fallback"]["replicas"] <= spec["maxReplicaCount"]
    assert spec["fallback"]["failureThreshold"] >= 2
    assert spec["cooldownPeriod"] > 0 and spec["pollingInterval"] > 0
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 120
    triggers = {t["name"]: t for t in spec["triggers"]}
    assert {t["type"] for t in triggers.values()} == {"prometheus"}
    for name, trigger in triggers.items():
        metadata = trigger["metadata"]
        named = set(re.findall(r"inpaint_gateway_\w+", metadata["query"]))
        assert named and named <= EXPORTED_METRICS, (
            f"{name}: /metrics has no {named - EXPORTED_METRICS}"
        )
        # Every API replica exports the same global figures: summing them would multiply them.
        assert "sum(" not in metadata["query"], name
        # No answer must mean the fallback, not "no work": with the default (true) a missing
        # metric reads as 0 and the workers would shrink to the minimum.
        assert metadata["ignoreNullValues"] == "false", name
        assert float(metadata["threshold"]) > 0, name
    due = set(re.findall(r"inpaint_gateway_\w+", triggers["due-work"]["metadata"]["query"]))
    assert due == {"inpaint_gateway_jobs_steps_overdue", "inpaint_gateway_webhooks_overdue"}
    # Fewer than one dispatch batch waiting per worker: a full batch waiting is a worker behind.
    assert float(triggers["due-work"]["metadata"]["threshold"]) < Settings.dispatch_batch_size


def test_disruption_budgets_cover_api_and_worker_only() -> None:
    budgets = [doc for _, doc in manifests() if doc["kind"] == "PodDisruptionBudget"]
    for name in ("api", "worker", "beat"):
        labels = resource("Deployment", name)["spec"]["template"]["metadata"]["labels"]
        covering = [b for b in budgets if selects(b["spec"]["selector"], labels)]
        assert len(covering) == (0 if name == "beat" else 1), name


def test_gateway_pods_are_locked_down() -> None:
    uid = image_uid()
    for name in GATEWAY_SERVICES:
        spec = pod_spec(resource("Deployment", name))
        container = only_container(resource("Deployment", name))
        pod_security = spec["securityContext"]
        assert pod_security["runAsNonRoot"] is True, name
        assert pod_security["runAsUser"] == uid, f"{name}: runAsUser differs from the image's USER"
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True, name
        assert security["allowPrivilegeEscalation"] is False, name
        assert security["capabilities"]["drop"] == ["ALL"], name
        empty_dirs = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts.get("/tmp") in empty_dirs, f"{name}: /tmp must be writable"
        assert {"requests", "limits"} <= set(container["resources"]), name


def test_manifests_hold_no_literal_secret() -> None:
    secrets = [(path, doc) for path, doc in manifests() if doc["kind"] == "Secret"]
    assert [path.relative_to(DEPLOY).parts[0] for path, _ in secrets] == ["templates"], (
        "a Secret lives only in deploy/templates/, so `kubectl apply -f deploy/` never applies it"
    )
    _, template = secrets[0]
    assert set(template["stringData"]) == {"RUNCOMFY_API_TOKEN"}
    assert all("REPLACE" in v for v in template["stringData"].values())
    for path, doc in manifests():
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        for container in spec.get("containers", []):
            for var in container.get("env", []):
                if SECRET_NAME.search(var["name"]):
                    assert "value" not in var, f"{path}: {var['name']} is a literal"
        if doc["kind"] == "ConfigMap":
            for key, value in doc["data"].items():
                assert not SECRET_NAME.search(key) or key.endswith("_FILE"), f"{path}: {key}"
                assert "whsec_" not in value


def test_configmap_settings_are_known_and_load(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    data: dict[str, str] = resource("ConfigMap", "inpaint-gateway-config")["data"]
    known = settings_names()
    unknown = {k for k in data if k not in known and k.removesuffix("_FILE") not in known}
    assert not unknown, f"the gateway reads no {sorted(unknown)}"
    secret_name = resource_secret_name()
    mount_dirs = set()
    for name in GATEWAY_SERVICES:
        deployment = resource("Deployment", name)
        container = only_container(deployment)
        assert container["envFrom"] == [{"configMapRef": {"name": "inpaint-gateway-config"}}]
        by_volume = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
        for mount in container["volumeMounts"]:
            if by_volume[mount["name"]].get("secret", {}).get("secretName") == secret_name:
                mount_dirs.add(mount["mountPath"])
    token_file = Path(data["RUNCOMFY_API_TOKEN_FILE"])
    assert mount_dirs == {str(token_file.parent)}, "every pod mounts the Secret where the file is"
    local_token = tmp_path / token_file.name
    local_token.write_text("a-token\n")
    isolated_settings_env(monkeypatch, data | {"RUNCOMFY_API_TOKEN_FILE": str(local_token)})
    settings = load_settings()
    assert settings.runcomfy_api_token == "a-token"
    redis_host = re.match(r"redis://([^:/]+)", settings.redis_url)
    assert redis_host and resource("Service", redis_host.group(1))
    monkeypatch.delenv("RUNCOMFY_API_TOKEN_FILE")
    with pytest.raises(SettingsError):
        load_settings()  # proves the token really comes from the file


def resource_secret_name() -> str:
    secrets = [doc for _, doc in manifests() if doc["kind"] == "Secret"]
    name: str = secrets[0]["metadata"]["name"]
    return name


def test_redis_statefulset_is_durable() -> None:
    redis = resource("StatefulSet", "redis")
    assert redis["spec"]["replicas"] == 1
    container = only_container(redis)
    command = " ".join(argv(container))
    assert "--appendonly yes" in command and "--appendfsync everysec" in command
    claims = {c["metadata"]["name"] for c in redis["spec"]["volumeClaimTemplates"]}
    data_mounts = [m for m in container["volumeMounts"] if m["mountPath"] == "/data"]
    assert data_mounts and data_mounts[0]["name"] in claims, "/data must be on a PersistentVolume"
    assert redis["spec"]["serviceName"] == resource("Service", "redis")["metadata"]["name"]


# --- deploy/redis-sentinel/ (Redis with failover, instead of redis.yaml) -------------------

SENTINEL_MASTER = "gateway-store"


def sentinel_resource(kind: str, name: str) -> dict[str, Any]:
    found = [
        doc
        for doc in read_yaml_documents(SENTINEL_MANIFEST)
        if doc["kind"] == kind and doc["metadata"]["name"] == name
    ]
    assert len(found) == 1, f"expected exactly one {kind}/{name} in {SENTINEL_MANIFEST.name}"
    return found[0]


def started_script(workload: dict[str, Any]) -> str:
    """The ConfigMap script a workload's container runs (`sh /scripts/NAME`)."""
    container = only_container(workload)
    shell, script_path = argv(container)
    assert shell == "sh", "the scripts are mounted without an exec bit"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    for volume in pod_spec(workload)["volumes"]:
        if "configMap" in volume and script_path.startswith(mounts[volume["name"]] + "/"):
            data: dict[str, str] = sentinel_resource("ConfigMap", volume["configMap"]["name"])[
                "data"
            ]
            return data[script_path.rpartition("/")[2]]
    raise AssertionError(f"{script_path} is not from a ConfigMap")


STUBS = {
    # The pod's name, as Kubernetes sets the hostname.
    "hostname": 'echo "$FAKE_HOSTNAME"',
    # A sentinel's answer to get-master-addr-by-name: down (no answer), nil, or host and port.
    "redis-cli": (
        'echo "$*" >> "$FAKE_CALLS"\n'
        '[ "$FAKE_MASTER" = down ] && exit 1\n'
        '[ -z "$FAKE_MASTER" ] && { echo; exit 0; }\n'
        'printf "%s\\n6379\\n" "$FAKE_MASTER"'
    ),
    "getent": "exit 0",
    "redis-server": 'echo "redis-server $*"',
    "redis-sentinel": 'echo "redis-sentinel $*"',
}


def run_with_stubs(
    script: str, tmp_path: Path, *, hostname: str, sentinels_say: str
) -> tuple[str, list[str]]:
    """Run a start script with the programs it calls stubbed: what it execs, and what it asked."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in STUBS.items():
        stub = bin_dir / name
        stub.write_text(f"#!/bin/sh\n{body}\n")
        stub.chmod(0o755)
    calls = tmp_path / "calls"
    calls.write_text("")
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "FAKE_HOSTNAME": hostname,
        "FAKE_MASTER": sentinels_say,
        "FAKE_CALLS": str(calls),
    }
    done = subprocess.run(
        ["sh", "-c", script], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1], calls.read_text().splitlines()


def test_sentinel_manifest_redis_is_durable_and_headless() -> None:
    redis = sentinel_resource("StatefulSet", "redis-ha")
    assert redis["spec"]["replicas"] == 2
    script = started_script(redis)
    assert "--appendonly yes" in script and "--appendfsync everysec" in script
    assert "--maxmemory-policy noeviction" in script
    container = only_container(redis)
    claims = {c["metadata"]["name"] for c in redis["spec"]["volumeClaimTemplates"]}
    data_mounts = [m for m in container["volumeMounts"] if m["mountPath"] == "/data"]
    assert data_mounts and data_mounts[0]["name"] in claims, "/data must be on a PersistentVolume"
    assert "--dir /data" in script
    for workload in (redis, sentinel_resource("StatefulSet", "redis-sentinel")):
        service_ = sentinel_resource("Service", workload["spec"]["serviceName"])
        assert service_["spec"]["clusterIP"] == "None", "pods are reached by their own names"
        # A sentinel must resolve a pod that is still loading its AOF, or a peer not yet ready.
        assert service_["spec"]["publishNotReadyAddresses"] is True
        assert selects(
            {"matchLabels": service_["spec"]["selector"]},
            workload["spec"]["template"]["metadata"]["labels"],
        )


@pytest.mark.parametrize(
    ("pod", "sentinels_say", "replicates"),
    [
        ("redis-ha-0", "down", None),  # first start: pod 0 is the primary
        ("redis-ha-1", "down", "redis-ha-0.redis-ha"),
        ("redis-ha-1", "", "redis-ha-0.redis-ha"),  # sentinels up, master not known yet
        ("redis-ha-0", "redis-ha-0.redis-ha", None),  # restarted before any failover
        # The old primary restarted after a failover: a replica of the promoted one, never a
        # second primary.
        ("redis-ha-0", "redis-ha-1.redis-ha", "redis-ha-1.redis-ha"),
        ("redis-ha-1", "redis-ha-1.redis-ha", None),
    ],
)
def test_sentinel_manifest_redis_starts_as_the_sentinels_say(
    tmp_path: Path, pod: str, sentinels_say: str, replicates: str | None
) -> None:
    redis = sentinel_resource("StatefulSet", "redis-ha")
    assert int(pod.rpartition("-")[2]) < redis["spec"]["replicas"]
    started, asked = run_with_stubs(
        started_script(redis), tmp_path, hostname=pod, sentinels_say=sentinels_say
    )
    argv_ = started.split()
    assert argv_[0] == "redis-server"
    announced = argv_[argv_.index("--replica-announce-ip") + 1]
    assert announced == f"{pod}.{redis['spec']['serviceName']}"
    if replicates is None:
        assert "--replicaof" not in argv_
    else:
        assert argv_[argv_.index("--replicaof") + 1 :] == [replicates, "6379"]
    sentinels = sentinel_resource("StatefulSet", "redis-sentinel")
    service_name = sentinels["spec"]["serviceName"]
    every_sentinel = {
        f"redis-sentinel-{n}.{service_name}" for n in range(sentinels["spec"]["replicas"])
    }
    hosts = {call.split()[call.split().index("-h") + 1] for call in asked}
    assert hosts <= every_sentinel and hosts, asked
    if sentinels_say == "down":
        assert hosts == every_sentinel, "asks each sentinel before deciding alone"
    assert all(f"get-master-addr-by-name {SENTINEL_MASTER}" in call for call in asked)


@pytest.mark.parametrize(
    ("peers_say", "monitors"),
    [("down", "redis-ha-0.redis-ha"), ("redis-ha-1.redis-ha", "redis-ha-1.redis-ha")],
)
def test_sentinel_manifest_sentinels_write_their_config_once(
    tmp_path: Path, peers_say: str, monitors: str
) -> None:
    sentinels = sentinel_resource("StatefulSet", "redis-sentinel")
    assert sentinels["spec"]["replicas"] == 3
    script = started_script(sentinels)
    config_dir = re.search(r"^conf=(/\S+)/sentinel\.conf$", script, re.M)
    assert config_dir, "the script names its config file"
    # The config sits on a writable volume: sentinel rewrites it as it learns.
    container = only_container(sentinels)
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(sentinels)["volumes"]}
    assert "emptyDir" in volumes[mounts[config_dir.group(1)]]
    local = tmp_path / "data"
    local.mkdir()
    script = script.replace(config_dir.group(1) + "/", f"{local}/")
    pod = "redis-sentinel-1"
    started, asked = run_with_stubs(script, tmp_path, hostname=pod, sentinels_say=peers_say)
    config = (local / "sentinel.conf").read_text().splitlines()
    assert started == f"redis-sentinel {local}/sentinel.conf"
    assert sentinel_directives(config, "monitor") == [[SENTINEL_MASTER, monitors, "6379", "2"]]
    assert sentinel_directives(config, "resolve-hostnames") == [["yes"]]
    assert sentinel_directives(config, "announce-hostnames") == [["yes"]]
    assert sentinel_directives(config, "announce-ip") == [[f"{pod}.redis-sentinel"]]
    assert f"port {SENTINEL_PORT}" in config
    assert not any(f"{pod}." in call for call in asked), "a sentinel does not ask itself"
    # Written only when absent: a restarted container keeps what it learnt.
    (local / "sentinel.conf").write_text("learnt\n")
    run_with_stubs(script, tmp_path, hostname=pod, sentinels_say="down")
    assert (local / "sentinel.conf").read_text() == "learnt\n"


def test_sentinel_manifest_sentinels_keep_a_quorum_through_a_drain() -> None:
    sentinels = sentinel_resource("StatefulSet", "redis-sentinel")
    budgets = [
        d for d in read_yaml_documents(SENTINEL_MANIFEST) if d["kind"] == "PodDisruptionBudget"
    ]
    labels = sentinels["spec"]["template"]["metadata"]["labels"]
    (budget,) = [b for b in budgets if selects(b["spec"]["selector"], labels)]
    quorum = 2
    assert sentinels["spec"]["replicas"] - budget["spec"]["maxUnavailable"] >= quorum


def test_sentinel_manifest_pods_are_locked_down() -> None:
    for name in ("redis-ha", "redis-sentinel"):
        workload = sentinel_resource("StatefulSet", name)
        spec = pod_spec(workload)
        assert spec["automountServiceAccountToken"] is False, name
        pod_security = spec["securityContext"]
        assert pod_security["runAsNonRoot"] is True and pod_security["runAsUser"] != 0, name
        assert pod_security["seccompProfile"]["type"] == "RuntimeDefault", name
        container = only_container(workload)
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True, name
        assert security["allowPrivilegeEscalation"] is False, name
        assert security["capabilities"]["drop"] == ["ALL"], name
        assert {"requests", "limits"} <= set(container["resources"]), name
        assert "readinessProbe" in container and "livenessProbe" in container, name


def configmap_sentinel_note() -> dict[str, str]:
    """The settings configmap.yaml's comment says to uncomment when using deploy/redis-sentinel/
    (and it says to delete CELERY_BROKER_URL)."""
    text = (DEPLOY / "configmap.yaml").read_text()
    note = re.search(r"^  # With deploy/redis-sentinel/.*?(?=^  [A-Z])", text, re.M | re.DOTALL)
    assert note, "configmap.yaml says what to set with deploy/redis-sentinel/"
    assert "delete CELERY_BROKER_URL" in " ".join(note.group(0).replace("#", " ").split())
    return dict(re.findall(r"^  # (REDIS_\w+): (\S+)$", note.group(0), re.M))


def test_configmap_note_points_the_gateway_at_the_manifest_sentinels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    note = configmap_sentinel_note()
    assert {"REDIS_SENTINELS", "REDIS_SENTINEL_MASTER"} <= set(note)
    data: dict[str, str] = resource("ConfigMap", "inpaint-gateway-config")["data"]
    # As the note says: CELERY_BROKER_URL deleted, so the broker follows the sentinels too.
    # RUNCOMFY_API_TOKEN_FILE is a pod's path: the token is given here instead.
    dropped = ("CELERY_BROKER_URL", "RUNCOMFY_API_TOKEN_FILE")
    values = {k: v for k, v in data.items() if k not in dropped} | note
    isolated_settings_env(monkeypatch, values | {"RUNCOMFY_API_TOKEN": "a-token"})
    settings = load_settings()
    sentinel = settings.redis_sentinel
    assert sentinel is not None and sentinel.master == SENTINEL_MASTER
    assert settings.celery_broker_url == sentinel_broker_url(settings.redis_url, sentinel)
    sentinels = sentinel_resource("StatefulSet", "redis-sentinel")
    pods = {
        f"redis-sentinel-{n}.{sentinels['spec']['serviceName']}"
        for n in range(sentinels["spec"]["replicas"])
    }
    (port,) = only_container(sentinels)["ports"]
    assert set(sentinel.addresses) == {(pod, port["containerPort"]) for pod in pods}


def test_deploy_readme_names_every_manifest() -> None:
    readme = (DEPLOY / "README.md").read_text()
    for path in manifest_files():
        assert str(path.relative_to(DEPLOY)) in readme, path


# --- Dockerfile and .dockerignore ----------------------------------------------------------


def test_dockerfile_runs_the_api_by_default_as_non_root() -> None:
    instructions = dockerfile_instructions()
    args = dict(a.partition("=")[::2] for word, a in instructions if word == "ARG" and "=" in a)
    bases = [
        re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], a.split()[0])
        for word, a in instructions
        if word == "FROM"
    ]
    assert bases and all(re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", b) for b in bases), bases
    assert not any(word == "ENTRYPOINT" for word, _ in instructions), (
        "compose's `command` replaces CMD but Kubernetes' `command` replaces ENTRYPOINT: "
        "with no ENTRYPOINT both mean the same argv"
    )
    cmds = [a for word, a in final_stage() if word == "CMD"]
    assert cmds and yaml.safe_load(cmds[-1]) == API_COMMAND, "CMD must be the exec-form API command"
    assert image_uid() != 0
    assert f"EXPOSE {API_PORT}" in [f"{w} {a}" for w, a in final_stage()]


def test_dockerfile_bakes_in_no_secret_and_no_dev_dependencies() -> None:
    for word, args in dockerfile_instructions():
        if word in ("ARG", "ENV"):
            names = re.findall(r"(?:^|\s)(\w+)=", args) or [args.split("=")[0]]
            assert not any(SECRET_NAME.search(n) for n in names), f"{word} {args}"
        if word == "RUN" and "pip install" in args:
            assert "[dev]" not in args and ".[" not in args, args
        if word in ("COPY", "ADD"):
            assert ".env" not in args.split(), args
    assert any(
        word == "RUN" and re.search(r"pip install \.(\s|$)", a)
        for word, a in dockerfile_instructions()
    )


def test_dockerignore_keeps_local_state_out_and_sources_in() -> None:
    ignored = {
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".run", ".git", ".pytest_cache", ".mypy_cache", ".ruff_cache"} <= ignored
    assert {".env", "**/__pycache__"} <= ignored
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {
        p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    assert not ignored & (packages | {"pyproject.toml", "*", "**"}), "pip install . needs them"


def test_make_run_the_tests_and_the_bench_start_the_deployed_commands() -> None:
    # cli/stack.py builds every launcher's commands; they are the deployed ones plus only
    # what a local run sets itself (a bind address, a concurrency, a node name).
    def deployed_form(argv: list[str], *local_options: str) -> list[str]:
        words = [Path(argv[0]).name, *argv[1:]]
        for option in local_options:
            at = words.index(option)
            del words[at : at + 2]
        return words

    assert deployed_form(api_argv("127.0.0.1:1"), "-b") == API_COMMAND
    assert sorted(deployed_form(worker_argv(concurrency=2), "-c")) == sorted(WORKER_COMMAND)
    beat = deployed_form(beat_argv(Path("/tmp/celerybeat-schedule")))
    assert sorted(beat) == sorted(BEAT_COMMAND)
