"""Private server processes for the tests: one redis-server, a cluster, a Sentinel set.

Every server listens on a free loopback port and is stopped by the pid this module
started, never by port or name: the port may belong to someone else's server if ours
never managed to bind it. Start failures raise `ServerError`; the fixtures turn that
into a skip, or a failure under ``STAMPEDE_GUARD_REQUIRE_REDIS=1``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import pytest
import redis

URL_ENV = "STAMPEDE_GUARD_REDIS_URL"
REQUIRE_ENV = "STAMPEDE_GUARD_REQUIRE_REDIS"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
CLUSTER_TIMEOUT = 20.0  # seconds for a cluster or a failover to settle


class ServerError(RuntimeError):
    """A server could not be started or did not reach the expected state."""


def unavailable(reason: str) -> NoReturn:
    """Skip the test, or fail it when the environment says Redis is required."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} (and {REQUIRE_ENV}=1 requires Redis)", pytrace=False)
    pytest.skip(reason)


def binary(name: str) -> str:
    """Return the path of executable *name*, or skip/fail the test if it is missing."""
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} is not on PATH (Debian: apt install redis-server)")
    return path


# A cluster node also listens on its port + 10000, so redis-server refuses ports above this.
HIGHEST_NODE_PORT = 55535


def free_port() -> int:
    """Return a loopback port that was free a moment ago (one a cluster node may use)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port <= HIGHEST_NODE_PORT:
            return port
    msg = f"the system gave no free port at or below {HIGHEST_NODE_PORT}"
    raise ServerError(msg)


def answers_ping(url: str) -> bool:
    """Return whether a server answers PING at *url*."""
    client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def server_pid(port: int) -> int | None:
    """Return the pid of the server answering on *port*, or None if none answers."""
    client = redis.Redis(port=port, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        pid = client.info("server").get("process_id")
    except redis.RedisError:
        return None
    finally:
        client.close()
    return pid if isinstance(pid, int) else None


@dataclass(slots=True)
class Server:
    """A server process this session started, and the port it answers on."""

    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, **kwargs: object) -> redis.Redis:
        """Return a raw client (bytes replies) for this server alone."""
        return redis.Redis(port=self.port, socket_timeout=5, **kwargs)  # type: ignore[arg-type]

    def stop(self) -> None:
        """Stop the server by signalling the pid we started (SIGTERM, then SIGKILL)."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=STOP_TIMEOUT)

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crashed host would vanish."""
        self.proc.kill()
        self.proc.wait(timeout=STOP_TIMEOUT)


def start(
    executable: str, workdir: Path, *args: str, config: str | None = None
) -> Server:
    """Start *executable* on a free port with *args*; wait until it answers as itself.

    With *config*, the text is written to a file that the server is started with
    (Sentinel needs a file it can rewrite). Raises ServerError if it does not come up.
    """
    reason, log = "", workdir / "server.log"
    # Another process may grab the port between our probe and the server's bind: retry.
    for _ in range(3):
        port = free_port()
        home = workdir / str(port)
        home.mkdir(parents=True, exist_ok=True)
        log = home / "server.log"
        command = [executable]
        if config is not None:
            conf = home / "server.conf"
            conf.write_text(config)
            command.append(str(conf))
        command += ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(home)]
        command += args
        with log.open("wb") as out:
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        server = Server(proc, port, log)
        deadline = time.monotonic() + START_TIMEOUT
        while proc.poll() is None and time.monotonic() < deadline:
            # Check the pid, not just PING: another server may have taken the port.
            if server_pid(port) == proc.pid:
                return server
            time.sleep(0.05)
        code = proc.poll()
        reason = (
            f"exited with code {code}"
            if code is not None
            else f"did not answer within {START_TIMEOUT}s"
        )
        server.stop()
        if code is None:
            break  # a server that hangs is no port race: retrying would only hang again
    tail = log.read_text(errors="replace")[-500:]
    msg = f"{Path(executable).name} {reason}; its log ends: {tail}"
    raise ServerError(msg)


DATA_OPTIONS = (
    "--save",
    "",
    "--appendonly",
    "no",
    "--enable-debug-command",
    "local",
    "--repl-diskless-sync-delay",
    "0",  # a replica syncs at once instead of waiting 5 s for others to join
)


def start_data_server(executable: str, workdir: Path, *args: str) -> Server:
    """Start a redis-server (or valkey-server) without persistence."""
    return start(executable, workdir, *DATA_OPTIONS, *args)


def wait_for(what: str, check: object, timeout: float = CLUSTER_TIMEOUT) -> None:
    """Call *check* until it returns true; raise ServerError after *timeout* seconds."""
    assert callable(check)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.RedisError, OSError):
            if check():
                return
        time.sleep(0.05)
    msg = f"{what} did not happen within {timeout}s"
    raise ServerError(msg)


@dataclass(slots=True)
class Cluster:
    """A Redis Cluster of private servers: masters first, then replicas."""

    masters: list[Server]
    replicas: list[Server] = field(default_factory=list)

    @property
    def servers(self) -> list[Server]:
        return self.masters + self.replicas

    @property
    def url(self) -> str:
        return self.masters[0].url.removesuffix("/0")

    def node_id(self, server: Server) -> str:
        with server.client() as client:
            return str(client.execute_command("CLUSTER MYID").decode())

    def state_ok(self, servers: list[Server] | None = None) -> bool:
        """Return whether every live node says the cluster is ok and agrees on slots."""
        for server in servers or self.servers:
            if server.proc.poll() is not None:
                continue
            with server.client() as client:
                info = client.cluster("INFO")
                if info.get("cluster_state") != "ok":
                    return False
                if int(info.get("cluster_slots_ok", 0)) != 16384:
                    return False
        return True

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


def start_cluster(workdir: Path, *, masters: int = 3, replicas: int = 0) -> Cluster:
    """Start a loopback cluster of *masters*, the first *replicas* of them replicated.

    The nodes time each other out after 1 s, so a killed master's replica takes over
    within a few seconds.
    """
    server_bin, cli = binary("redis-server"), binary("redis-cli")
    options = (
        "--cluster-enabled",
        "yes",
        "--cluster-node-timeout",
        "1000",
        "--cluster-replica-validity-factor",
        "0",  # any replica may take over, however stale: a test cluster
    )
    cluster = Cluster([])
    try:
        for _ in range(masters + replicas):
            home = workdir / f"node{len(cluster.servers)}"
            extra = ("--cluster-config-file", str(home / "nodes.conf"))
            server = start_data_server(server_bin, home, *options, *extra)
            if len(cluster.masters) < masters:
                cluster.masters.append(server)
            else:
                cluster.replicas.append(server)
        _create(cli, cluster.masters)
        wait_for("cluster_state:ok", lambda: cluster.state_ok(cluster.masters))
        for replica, master in zip(cluster.replicas, cluster.masters, strict=False):
            _replicate(cluster, replica, master)
        wait_for("cluster_state:ok", cluster.state_ok)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _create(cli: str, masters: list[Server]) -> None:
    """Make *masters* a cluster sharing all 16384 slots (``redis-cli --cluster create``)."""
    nodes = [f"127.0.0.1:{server.port}" for server in masters]
    created = subprocess.run(
        [cli, "--cluster", "create", *nodes, "--cluster-replicas", "0"],
        input=b"yes\n",
        capture_output=True,
        timeout=CLUSTER_TIMEOUT,
        check=False,
    )
    if created.returncode != 0:
        msg = f"redis-cli --cluster create failed: {created.stdout[-500:]!r}"
        raise ServerError(msg)


def _replicate(cluster: Cluster, replica: Server, master: Server) -> None:
    """Make *replica* join the cluster as a replica of *master*, and wait for its sync."""
    with replica.client() as client:
        client.execute_command("CLUSTER MEET", "127.0.0.1", master.port)
    master_id = cluster.node_id(master)
    wait_for("the replica to meet its master", lambda: _knows(replica, master_id))
    with replica.client() as client:
        client.execute_command("CLUSTER REPLICATE", master_id)
    wait_for("the replica to sync", lambda: _synced(replica))


def _knows(server: Server, node_id: str) -> bool:
    with server.client() as client:
        nodes = client.cluster("NODES")
        return any(node.get("node_id") == node_id for node in nodes.values())


def _synced(replica: Server) -> bool:
    with replica.client() as client:
        info = client.info("replication")
        return bool(info.get("master_link_status") == "up")


@contextlib.contextmanager
def started(servers: Iterator[Server] | list[Server]) -> Iterator[list[Server]]:
    """Yield *servers*, stopping each of them afterwards."""
    kept = list(servers)
    try:
        yield kept
    finally:
        for server in kept:
            server.stop()


@dataclass(slots=True)
class SentinelSet:
    """A master, its replica and one sentinel watching them as *service*."""

    master: Server
    replica: Server
    sentinel: Server
    service: str

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.sentinel.port}"

    def stop(self) -> None:
        for server in (self.sentinel, self.replica, self.master):
            server.stop()


def start_sentinels(workdir: Path, service: str) -> SentinelSet:
    """Start a master, a replica and a sentinel that fails over 0.5 s after a death.

    Returns once the replica is in sync and the sentinel knows it (a failover asked
    for earlier is refused: NOGOODSLAVE); skips (or fails) if a server cannot start.
    """
    server = binary("redis-server")
    started: list[Server] = []
    try:
        master = start_data_server(server, workdir / "master")
        started.append(master)
        replica = start_data_server(
            server, workdir / "replica", "--replicaof", "127.0.0.1", str(master.port)
        )
        started.append(replica)
        wait_for("the replica's sync", lambda: replica_linked(replica))
        config = (
            f"sentinel monitor {service} 127.0.0.1 {master.port} 1\n"
            f"sentinel down-after-milliseconds {service} 500\n"
            f"sentinel failover-timeout {service} 5000\n"
        )
        sentinel = start(server, workdir / "sentinel", "--sentinel", config=config)
        started.append(sentinel)
        watching = SentinelSet(master, replica, sentinel, service)
        wait_for("the sentinel to see the replica", lambda: _sees_replica(watching))
    except (OSError, ServerError) as exc:
        for process in started:
            process.stop()
        unavailable(f"could not start a Sentinel set: {exc}")
    return watching


def replica_linked(replica: Server) -> bool:
    """Whether *replica*'s link to its master is up."""
    with replica.client() as client:
        return bool(client.info("replication").get("master_link_status") == "up")


def _sees_replica(watching: SentinelSet) -> bool:
    with watching.sentinel.client() as client:
        replicas = client.execute_command("SENTINEL REPLICAS", watching.service)
    return len(replicas) == 1
