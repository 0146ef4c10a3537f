"""The sentinel configs shipped in docker-compose.sentinel.yml and deploy/redis-sentinel/, run
for real with local redis-server and redis-sentinel processes on free ports in place of the
containers and pods."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from cli.stack import ManagedProcess, RedisServer, free_port, wait_for_port, wait_until
from tests.test_deploy_files import (
    SENTINEL_MASTER,
    SENTINEL_PORT,
    compose_with_sentinels,
    interpolate,
    run_with_stubs,
    sentinel_config,
    sentinel_directives,
    sentinel_resource,
    sentinel_services,
    started_script,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not (shutil.which("redis-server") and shutil.which("redis-sentinel")),
        reason="redis-server and redis-sentinel are not installed (Debian: redis-sentinel)",
    ),
]

CONFIG_IN_CONTAINER = "/data/sentinel.conf"


@dataclass
class ComposeSentinel:
    """One compose sentinel service's start script, run on this host."""

    name: str
    config: Path
    port: int
    process: ManagedProcess

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2, decode_responses=True)


def local_script(script: str, config: Path, sentinel_port: int, primary_port: int) -> str:
    """The compose script with the container's names and ports made this host's."""
    script = interpolate(script).replace(CONFIG_IN_CONTAINER, str(config))
    script, ports = re.subn(rf"^port {SENTINEL_PORT}$", f"port {sentinel_port}", script, flags=re.M)
    script, hosts = re.subn(r" redis 6379 ", f" 127.0.0.1 {primary_port} ", script)
    assert (ports, hosts) == (1, 1), "the script's config has changed shape: adapt this test"
    return script


def start(sentinel: ComposeSentinel, script: str, log: Path) -> None:
    """Run the script as compose would, with the service's environment."""
    environment = compose_with_sentinels()["services"][sentinel.name].get("environment", {})
    env = {"PATH": "/usr/bin:/bin", **environment, "SENTINEL_HOSTNAME": "127.0.0.1"}
    sentinel.process = ManagedProcess(sentinel.name, ["sh", "-c", script], env=env, log_path=log)
    sentinel.process.start()
    wait_for_port(sentinel.port, process=sentinel.process.process)


@pytest.fixture
def primary_and_replica(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer]]:
    primary = RedisServer(tmp_path / "primary", log_path=tmp_path / "primary.log")
    replica = RedisServer(tmp_path / "replica", log_path=tmp_path / "replica.log")
    try:
        primary.start()
        replica.replica_of = primary.port
        replica.start()
        yield primary, replica
    finally:
        replica.stop()
        primary.stop()


def test_the_compose_sentinels_watch_the_primary_and_reach_quorum(
    primary_and_replica: tuple[RedisServer, RedisServer], tmp_path: Path
) -> None:
    primary, _ = primary_and_replica
    services = sentinel_services(compose_with_sentinels())
    ((master, *_),) = sentinel_directives(sentinel_config(next(iter(services.values()))), "monitor")
    scripts: dict[str, str] = {}
    sentinels: list[ComposeSentinel] = []
    try:
        for name, service_ in services.items():
            config = tmp_path / name / "sentinel.conf"
            config.parent.mkdir()
            sentinel = ComposeSentinel(name, config, free_port(), ManagedProcess(name, []))
            scripts[name] = local_script(
                service_["command"][-1], config, sentinel.port, primary.port
            )
            start(sentinel, scripts[name], tmp_path / f"{name}.log")
            sentinels.append(sentinel)

        def watching(sentinel: ComposeSentinel) -> bool:
            """It names the primary master and knows the replica and both peers."""
            client = sentinel.client()
            try:
                state = client.sentinel_master(master)
                address = client.sentinel_get_master_addr_by_name(master)
            except redis.RedisError:
                return False
            finally:
                client.close()
            return (
                int(address[1]) == primary.port
                and int(state["num-slaves"]) == 1
                and int(state["num-other-sentinels"]) == 2
            )

        wait_until(lambda: all(map(watching, sentinels)), timeout_s=15, what="three sentinels")
        for sentinel in sentinels:
            # The service's own healthcheck, on this sentinel's port.
            check = services[sentinel.name]["healthcheck"]["test"][1]
            check = check.replace(f"-p {SENTINEL_PORT}", f"-p {sentinel.port}")
            assert subprocess.run(["sh", "-c", check], timeout=10).returncode == 0, sentinel.name

        # A restarted sentinel keeps the config it rewrote (its id, what it learnt).
        first = sentinels[0]
        learnt = first.config.read_text()
        assert "sentinel myid" in learnt and "sentinel known-sentinel" in learnt
        first.process.stop()
        start(first, scripts[first.name], tmp_path / f"{first.name}.log")
        myid = re.search(r"^sentinel myid (\w+)$", learnt, re.M)
        assert myid and f"sentinel myid {myid.group(1)}" in first.config.read_text()
        wait_until(lambda: watching(first), timeout_s=10, what="the restarted sentinel")
    finally:
        for sentinel in sentinels:
            sentinel.process.stop()


def test_the_manifest_sentinel_config_is_one_redis_sentinel_runs(
    primary_and_replica: tuple[RedisServer, RedisServer], tmp_path: Path
) -> None:
    primary, _ = primary_and_replica
    script = started_script(sentinel_resource("StatefulSet", "redis-sentinel"))
    data = tmp_path / "data"
    data.mkdir()
    # What a first pod writes (no peer answering), with the pod's names made this host's.
    run_with_stubs(
        script.replace("/data", str(data)),
        tmp_path,
        hostname="redis-sentinel-0",
        sentinels_say="down",
    )
    config = data / "sentinel.conf"
    port = free_port()
    written = config.read_text()
    local, changes = re.subn(
        r"^(port) \d+$|^(sentinel announce-ip) \S+$|^(sentinel monitor \S+) \S+ \d+",
        lambda m: {
            "port": f"port {port}",
            "sentinel announce-ip": "sentinel announce-ip 127.0.0.1",
        }.get(m.group(1) or m.group(2), f"{m.group(3)} 127.0.0.1 {primary.port}"),
        written,
        flags=re.M,
    )
    assert changes == 3, written
    config.write_text(local)
    sentinel = ManagedProcess(
        "sentinel", ["redis-sentinel", str(config)], log_path=tmp_path / "sentinel.log"
    )
    try:
        sentinel.start()
        wait_for_port(port, process=sentinel.process)
        client = redis.Redis(port=port, socket_timeout=2, decode_responses=True)
        try:

            def watching() -> bool:
                state = client.sentinel_master(SENTINEL_MASTER)
                return int(state["port"]) == primary.port and int(state["num-slaves"]) == 1

            wait_until(watching, timeout_s=10, what="the sentinel seeing the primary's replica")
        finally:
            client.close()
    finally:
        sentinel.stop()
