"""proxy/limits/resp.py against real servers (tests/redisproc.py): pipelining on one
connection, the URL's AUTH and SELECT, NOSCRIPT recovery, error replies, timeouts and every
way a connection can go away.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
import redis
import uvloop

from proxy.limits import Limit, StoreUnavailableError
from proxy.limits.redis import RedisLimiter
from proxy.limits.resp import TIMEOUT, ReplyError, RespClient
from tests.redisproc import GUARD, RedisProc, free_ports, run

pytestmark = pytest.mark.redis

SCRIPT = "return {ARGV[1], #KEYS}"
PASSWORD = "s3cret"


def _sha(script: str) -> str:
    return hashlib.sha1(script.encode()).hexdigest()


# -- pipelining


def test_concurrent_commands_share_one_connection_in_order(server: RedisProc) -> None:
    """1,000 INCRs at once: each gets its own reply, in the order they were issued."""

    async def main() -> None:
        client = RespClient(server.url)
        try:
            await client.execute("DEL", "counter")
            first = await client.execute("CLIENT", "ID")
            results = await asyncio.gather(
                *(client.execute("INCR", "counter") for _ in range(1000))
            )
            assert results == list(range(1, 1001))
            assert await client.execute("CLIENT", "ID") == first  # no second connection
        finally:
            await client.close()

    run(main())


def test_commands_do_not_wait_for_earlier_replies(server: RedisProc) -> None:
    """While a blocking BLPOP holds the connection, the 999 INCRs behind it have all reached
    the server already: they were written without waiting for its reply."""
    incr = b"*2\r\n$4\r\nINCR\r\n$8\r\npipeline\r\n"

    async def main() -> None:
        client = RespClient(server.url, timeout=5)
        try:
            await client.execute("DEL", "pipeline", "queue")
            client_id = await client.execute("CLIENT", "ID")
            blocked = asyncio.ensure_future(client.execute("BLPOP", "queue", 5))
            behind = [asyncio.ensure_future(client.execute("INCR", "pipeline")) for _ in range(999)]
            await asyncio.sleep(0.2)
            with server.client() as inspect:
                info = inspect.execute_command("CLIENT", "LIST", "ID", client_id).decode()
                received = int(info.split("tot-net-in=")[1].split()[0])
                assert "cmd=blpop" in info
                assert received > 999 * len(incr)
                assert inspect.get("pipeline") is None  # none has run yet
                inspect.lpush("queue", "go")
            assert await blocked == [b"queue", b"go"]
            assert await asyncio.gather(*behind) == list(range(1, 1000))
        finally:
            await client.close()

    run(main())


def test_a_cancelled_caller_leaves_the_replies_in_step(server: RedisProc) -> None:
    async def main() -> None:
        client = RespClient(server.url)
        try:
            await client.execute("MSET", "a", "1", "b", "2")
            first = asyncio.ensure_future(client.execute("GET", "a"))
            second = asyncio.ensure_future(client.execute("GET", "b"))
            await asyncio.sleep(0)  # both sent, neither answered
            first.cancel()
            assert await second == b"2"
            assert await client.execute("GET", "a") == b"1"
        finally:
            await client.close()

    run(main())


# -- replies


def test_error_replies_raise_and_keep_the_connection(server: RedisProc) -> None:
    async def main() -> None:
        client = RespClient(server.url)
        try:
            await client.execute("SET", "text", "x")
            await client.execute("DEL", "n")
            client_id = await client.execute("CLIENT", "ID")
            replies = await asyncio.gather(
                client.execute("PING"),
                client.execute("LPUSH", "text", "y"),
                client.execute("INCR", "n"),
                return_exceptions=True,
            )
            assert replies[0] == b"PONG"
            assert isinstance(replies[1], ReplyError)
            assert replies[1].code == "WRONGTYPE"
            assert replies[2] == 1
            with pytest.raises(ReplyError, match=r"^ERR unknown command"):
                await client.execute("NO-SUCH-COMMAND")
            assert await client.execute("CLIENT", "ID") == client_id
        finally:
            await client.close()

    run(main())


def test_send_calls_back_with_the_reply_or_the_error_in_order(server: RedisProc) -> None:
    """`send` (what the limiter's batches use): no future, the callback hears each reply, or
    the error in its place, as it is read; the futures of `execute` stay in step with it."""
    heard: list[Any] = []

    async def main() -> None:
        client = RespClient(server.url)
        try:
            await client.execute("SET", "text", "x")
            client.send(("PING",), heard.append)
            client.send(("LPUSH", "text", "y"), heard.append)
            between = client.execute("ECHO", "between")
            client.send(("ECHO", "last"), heard.append)
            assert await between == b"between"
            while len(heard) < 3:
                await asyncio.sleep(0)
            assert heard[0] == b"PONG"
            assert isinstance(heard[1], ReplyError) and heard[1].code == "WRONGTYPE"
            assert heard[2] == b"last"
        finally:
            await client.close()
        with pytest.raises(StoreUnavailableError):
            client.send(("PING",), heard.append)  # closed: refused at once
        dead = RespClient(f"redis://127.0.0.1:{free_ports(1)[0]}")
        dead.send(("PING",), heard.append)
        while len(heard) < 4:
            await asyncio.sleep(0.01)
        assert isinstance(heard[3], StoreUnavailableError)
        await dead.close()

    run(main())


class _CountedWrites:
    """A transport that counts its writes (uvloop's cannot be patched)."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        self.transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


def test_send_all_writes_its_commands_at_once_and_calls_back_in_order(server: RedisProc) -> None:
    """`send_all` (the cache's MULTI/EXEC): one write for all its commands, not one each,
    and the callback hears every reply in turn."""
    heard: list[Any] = []

    async def main() -> None:
        client = RespClient(server.url)
        try:
            await client.execute("DEL", "n")
            conn = client._conn
            assert conn is not None
            counted = conn._transport = _CountedWrites(conn._transport)
            client.send_all((("MULTI",), ("INCR", "n"), ("INCR", "n"), ("EXEC",)), heard.append)
            assert len(counted.writes) == 1 and counted.writes[0].count(b"INCR") == 2
            while len(heard) < 4:
                await asyncio.sleep(0)
            assert heard == [b"OK", b"QUEUED", b"QUEUED", [1, 2]]
        finally:
            await client.close()

    run(main())


def test_reply_types(server: RedisProc) -> None:
    async def main() -> None:
        client = RespClient(server.url)
        try:
            await client.execute("DEL", "missing", "h")
            assert await client.execute("SET", "k", "ü") == b"OK"
            assert await client.execute("GET", "k") == "ü".encode()
            assert await client.execute("GET", "missing") is None
            assert await client.execute("HSET", "h", "f", -5) == 1
            assert await client.execute("HGETALL", "h") == [b"f", b"-5"]
            assert await client.execute("EXISTS", "missing") == 0
        finally:
            await client.close()

    run(main())


def test_scripts_run_by_sha_and_survive_script_flush(server: RedisProc) -> None:
    sha = _sha(SCRIPT)

    async def main() -> None:
        client = RespClient(server.url)
        try:
            with server.client() as admin:
                admin.script_flush()
                admin.config_resetstat()
            assert await client.evalsha(sha, SCRIPT, ["k1", "k2"], [7]) == [b"7", 2]  # loads it
            assert await client.evalsha(sha, SCRIPT, ["k1"], ["x"]) == [b"x", 1]  # by sha
            with server.client() as admin:
                admin.script_flush()
            assert await client.evalsha(sha, SCRIPT, [], [""]) == [b"", 0]  # reloaded
            with server.client() as admin:
                assert admin.script_exists(sha) == [True]
                stats = admin.info("commandstats")
            assert stats["cmdstat_evalsha"]["calls"] == 3
            assert stats["cmdstat_eval"]["calls"] == 2
            with pytest.raises(ReplyError, match="attempt to compare"):
                await client.evalsha(_sha("return 1 < {}"), "return 1 < {}", [], [])
        finally:
            await client.close()

    run(main())


# -- connecting


@pytest.fixture
def locked_server(own_server: RedisProc) -> Iterator[RedisProc]:
    """A server with a password on the default user and a user `alice` with her own."""
    with own_server.client() as admin:
        admin.acl_setuser(
            "alice", enabled=True, passwords=["+p@ss:word"], keys="*", commands=["+@all"]
        )
        admin.config_set("requirepass", PASSWORD)
    yield own_server
    with redis.Redis(port=own_server.port, password=PASSWORD) as admin:
        admin.config_set("requirepass", "")


def test_auth_and_select_from_the_url(locked_server: RedisProc) -> None:
    port = locked_server.port

    async def main() -> None:
        client = RespClient(f"redis://:{PASSWORD}@127.0.0.1:{port}/3")
        alice = RespClient(f"redis://alice:p%40ss%3Aword@127.0.0.1:{port}/2")
        try:
            await asyncio.gather(
                client.execute("SET", "where", "3"), alice.execute("SET", "where", "2")
            )
            assert await alice.execute("ACL", "WHOAMI") == b"alice"
            assert await client.execute("ACL", "WHOAMI") == b"default"
        finally:
            await client.close()
            await alice.close()

    run(main())
    for db in (0, 2, 3):
        with redis.Redis(port=port, password=PASSWORD, db=db) as check:
            assert check.get("where") == (None if db == 0 else str(db).encode())


def test_wrong_or_missing_password(locked_server: RedisProc) -> None:
    url = f"redis://:wrong@127.0.0.1:{locked_server.port}"

    async def main() -> None:
        client = RespClient(url)
        try:
            start = time.monotonic()
            with pytest.raises(StoreUnavailableError, match="WRONGPASS"):
                await client.execute("PING")
            assert time.monotonic() - start < TIMEOUT
        finally:
            await client.close()
        without = RespClient(locked_server.url)
        try:
            with pytest.raises(ReplyError) as caught:
                await without.execute("PING")
            assert caught.value.code == "NOAUTH"
        finally:
            await without.close()
        limiter = RedisLimiter.connect(locked_server.url)  # NOAUTH: an outage to the limiter
        try:
            with pytest.raises(StoreUnavailableError, match="NOAUTH"):
                await limiter.admit(Limit("team-a", 100, None), 1)
        finally:
            await limiter.close()

    run(main())


def test_rediss_speaks_tls(server: RedisProc) -> None:
    """This server has no TLS: the handshake never completes, so it was attempted."""

    async def main() -> None:
        client = RespClient(f"rediss://127.0.0.1:{server.port}")
        try:
            with pytest.raises(StoreUnavailableError):
                await client.execute("PING")
        finally:
            await client.close()

    run(main())


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://127.0.0.1:6379", "not a redis"),
        ("redis://", "not a redis"),
        ("redis://127.0.0.1:6379/zero", "database number"),
        ("redis://127.0.0.1:6379/0?ssl_cert_reqs=none", "no query"),
    ],
)
def test_bad_urls(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RespClient(url)


def test_closed_client_refuses(server: RedisProc) -> None:
    async def main() -> None:
        client = RespClient(server.url)
        assert await client.execute("PING") == b"PONG"
        await client.close()
        with pytest.raises(StoreUnavailableError, match="closed"):
            await client.execute("PING")

    run(main())


# -- outages


def test_hung_server_fails_everything_pending_after_the_timeout(own_server: RedisProc) -> None:
    async def main() -> None:
        client = RespClient(own_server.url)
        try:
            client_id = await client.execute("CLIENT", "ID")
            own_server.pause()
            try:
                start = time.monotonic()
                early = asyncio.gather(
                    *(client.execute("INCR", "n") for _ in range(200)), return_exceptions=True
                )
                await asyncio.sleep(0.3)
                late_start = time.monotonic()
                with pytest.raises(StoreUnavailableError, match="no reply within"):
                    await client.execute("PING")
                late = time.monotonic() - late_start
                failures = await early
                elapsed = time.monotonic() - start
            finally:
                own_server.resume()
            assert all(isinstance(f, StoreUnavailableError) for f in failures)
            assert TIMEOUT - 0.05 <= elapsed < 2 * TIMEOUT
            assert late < TIMEOUT - 0.1  # failed with the oldest, before its own deadline
            assert await client.execute("PING") == b"PONG"  # a new connection
            assert await client.execute("CLIENT", "ID") != client_id
        finally:
            await client.close()

    run(main())


@pytest.mark.parametrize("runner", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_a_stalled_event_loop_is_not_a_hung_server(
    server: RedisProc, runner: Callable[[Coroutine[Any, Any, None]], None]
) -> None:
    """The loop blocks past the timeout before the commands are even written: they are
    sent and answered after it, not failed (uvloop runs due timers before it polls)."""

    async def main() -> None:
        client = RespClient(server.url)
        try:
            pending = [asyncio.ensure_future(client.execute("ECHO", str(i))) for i in range(10)]
            await asyncio.sleep(0)
            time.sleep(TIMEOUT + 0.2)  # a long synchronous step
            assert await asyncio.gather(*pending) == [str(i).encode() for i in range(10)]
        finally:
            await client.close()

    runner(asyncio.wait_for(main(), GUARD))


def test_server_killed_then_restarted(own_server: RedisProc) -> None:
    async def main() -> None:
        client = RespClient(own_server.url)
        try:
            await client.execute("SET", "k", "v")
            own_server.kill()
            for _ in range(2):
                start = time.monotonic()
                with pytest.raises(StoreUnavailableError):
                    await client.execute("GET", "k")
                assert time.monotonic() - start < TIMEOUT
            own_server.start()  # same port, empty
            assert await client.execute("GET", "k") is None
            assert await client.execute("SET", "k", "w") == b"OK"
        finally:
            await client.close()

    run(main())


def test_nothing_listening() -> None:
    (port,) = free_ports(1)

    async def main() -> None:
        client = RespClient(f"redis://127.0.0.1:{port}")
        try:
            with pytest.raises(StoreUnavailableError, match="cannot connect"):
                await client.execute("PING")
        finally:
            await client.close()

    run(main())


def test_server_closes_the_connection_mid_use(server: RedisProc) -> None:
    """CLIENT KILL while a command blocks and another waits behind it: both fail at once,
    long before the timeout, and the next command reconnects."""

    async def main() -> None:
        client = RespClient(server.url, timeout=5)
        try:
            client_id = await client.execute("CLIENT", "ID")
            blocked = asyncio.ensure_future(client.execute("BLPOP", "never", 4))
            behind = asyncio.ensure_future(client.execute("PING"))
            await asyncio.sleep(0.1)
            start = time.monotonic()
            with server.client() as admin:
                assert admin.client_kill_filter(_id=client_id) == 1
            for future in (blocked, behind):
                with pytest.raises(StoreUnavailableError, match="connection lost"):
                    await future
            assert time.monotonic() - start < 1
            assert await client.execute("PING") == b"PONG"
            assert await client.execute("CLIENT", "ID") != client_id
        finally:
            await client.close()

    run(main())


def test_commands_queue_while_the_socket_is_full(own_server: RedisProc) -> None:
    """64 MiB to a hung server fills the socket and pauses writing; the commands wait and
    all go out, in order, once the server reads again."""
    value = b"v" * (1 << 20)

    async def main() -> None:
        client = RespClient(own_server.url, timeout=10)
        try:
            await client.execute("PING")
            own_server.pause()
            try:
                sets = asyncio.gather(*(client.execute("SET", f"big{i}", value) for i in range(64)))
                await asyncio.sleep(0.3)
                conn = client._conn
                assert conn is not None and conn._write_paused  # the case under test arose
                queued = asyncio.gather(*(client.execute("INCR", "after") for _ in range(100)))
                await asyncio.sleep(0.1)
            finally:
                own_server.resume()
            assert await sets == [b"OK"] * 64
            assert await queued == list(range(1, 101))
            assert await client.execute("STRLEN", "big63") == len(value)
        finally:
            await client.close()

    run(main())
