"""The shared token-limit store: Redis (or Valkey, or a Redis Cluster) and two Lua scripts.

Every decision is one round trip: `lua/admit.lua` or `lua/settle.lua` by EVALSHA (sent whole
again after a `SCRIPT FLUSH` or on a new server). On a single server the admissions (and the
settlements) one process makes in one event-loop turn go in one script call, decided in
order: under load that is one call for several requests, each still atomic. Per counter key
there are two kinds of Redis keys, both on the key's hash tag so they share a cluster slot:

    tollway:{<tag>}:rate            hash: unix second -> tokens; live buckets only, 62 s TTL
    tollway:{<tag>}:q:<period id>   string counter; expires a day after its period ends

The window's clock is the server's `TIME`, so any number of gateways agree on it; quota
periods follow the gateway's clock and reach the scripts as key names and TTLs.

A single server (`redis://`, `rediss://`) is spoken to by proxy/limits/resp.py: one pipelined
connection, and about a fifth of the CPU redis-py's asyncio client took (an admission ~22 µs
against ~107). A cluster (`redis+cluster://`) goes through redis-py's `RedisCluster`, which
knows slots and failover.

Connection errors, timeouts and cluster outages raise `StoreUnavailableError`, after at most
`timeout` seconds (two tries of it on a cluster, where redis-py retries a failed call once on
a fresh connection). A restarted server is picked up by the next call, without a new limiter.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import importlib.resources
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from redis import exceptions
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from proxy.limits.base import (
    GRANT_SHARE,
    LEAVES,
    Failed,
    Limit,
    Refused,
    Reservation,
    StoreUnavailableError,
    period_bounds,
    remaining,
)
from proxy.limits.resp import ReplyError, RespClient

PREFIX = "tollway"
TIMEOUT = 0.5  # seconds to connect, and to wait for a reply
MAX_CONNECTIONS = 50  # per node on a cluster; further calls wait their turn
TAG_MAX = 128  # longer counter keys are hashed
KEEP_PERIOD_MS = 86_400_000  # a period counter outlives its period by a day
# How long a settlement's "once" key says it was applied (settle.lua): far longer than a
# replayed settlement waits for a server that answers again (proxy/limits/failover.py).
ONCE_TTL_MS = 600_000
UNAVAILABLE = (
    exceptions.ConnectionError,
    exceptions.TimeoutError,
    exceptions.ClusterError,  # CLUSTERDOWN, MASTERDOWN
    exceptions.RedisClusterException,  # no node reachable, slot not covered
    OSError,
    # redis-py's asyncio connections can fail with these instead of a ConnectionError when
    # a socket dies under them (https://github.com/redis/redis-py/issues/4287), and its
    # cluster client does the same to connections it recycles mid-handshake after an error.
    # Only the client call is inside the mapping, so no bug of ours hides here.
    AttributeError,
    TypeError,
)
# Error replies that mean the server cannot serve now, as redis-py classes them (its
# ConnectionError and ClusterError kinds): BusyLoadingError, AuthenticationError, MasterDown.
UNAVAILABLE_REPLIES = frozenset({"LOADING", "NOAUTH", "WRONGPASS", "MASTERDOWN", "CLUSTERDOWN"})
MAX_CLIENTS_REPLY = "ERR max number of clients reached"
# What Redis and Valkey answer, instead of NOAUTH, to an unauthenticated client's command of
# more than 10 arguments (a batch of admissions) before closing the connection.
UNAUTHENTICATED_REPLY = "ERR Protocol error: unauthenticated"
log = logging.getLogger("tollway")


def lua(name: str) -> str:
    """The source of one of lua/*.lua (the gateway's Redis scripts)."""
    return importlib.resources.files("proxy.limits").joinpath("lua", name).read_text("utf-8")


@dataclass(frozen=True, slots=True)
class Script:
    """One of lua/*.lua."""

    source: str
    sha: str  # its SHA-1, the name EVALSHA knows it by

    @classmethod
    def load(cls, name: str, *, clock_arg: int | None, **constants: int) -> Script:
        """`name`, behind the shared clock.lua (with the window's LEAVES from base.py) when
        it reads the time: `clock_arg` is the index of the ARGV that holds the override.
        `constants` are prepended as locals (base.py's values the script mirrors)."""
        source = lua(name)
        if clock_arg is not None:
            head = f"local LEAVES = {LEAVES}\nlocal CLOCK_ARG = {clock_arg}\n"
            source = head + lua("clock.lua") + source
        source = "".join(f"local {k} = {v}\n" for k, v in constants.items()) + source
        return cls(source, hashlib.sha1(source.encode()).hexdigest())


# ARGV[1] is the time override, then 6 values per admission (5 per settlement) of the batch.
ADMIT = Script.load("admit.lua", clock_arg=1, GRANT_SHARE=GRANT_SHARE)
SETTLE = Script.load("settle.lua", clock_arg=1, ONCE_TTL_MS=ONCE_TTL_MS)


class _Batch:
    """One script's calls gathered in one event-loop turn, to be sent as one EVALSHA."""

    __slots__ = ("args", "keys", "resent", "waiters")

    def __init__(self, override: str) -> None:
        self.keys: list[str] = []
        self.args: list[int | str] = [override]
        # per call: the future its caller awaits, or what to tell if a settle_soon fails
        self.waiters: list[asyncio.Future[Any] | Failed | None] = []
        self.resent = False


def hash_tag(key: str) -> str:
    """The counter key as it appears between `{}` in Redis keys.

    A key that is empty, contains a brace, is longer than TAG_MAX bytes or starts with `#`
    becomes `#` + its sha256, so the tag stays intact and no two counter keys share one.
    """
    raw = key.encode()
    if not key or "{" in key or "}" in key or key.startswith("#") or len(raw) > TAG_MAX:
        return "#" + hashlib.sha256(raw).hexdigest()
    return key


def rate_key(key: str) -> str:
    return f"{PREFIX}:{{{hash_tag(key)}}}:rate"


def quota_key(key: str, period: str) -> str:
    return f"{PREFIX}:{{{hash_tag(key)}}}:q:{period}"


def once_key(key: str, once: str) -> str:
    return f"{PREFIX}:{{{hash_tag(key)}}}:once:{once}"


def _ttl_ms(end: float, now: float) -> int:
    return max(1, round((end - now) * 1000)) + KEEP_PERIOD_MS


class RedisLimiter:
    """A `Limiter` on one server (a `RespClient`) or a cluster (redis-py's `RedisCluster`);
    see the module docstring.

    `clock` is a test seam: when given, its reading replaces the server's `TIME` in the
    scripts and the gateway's clock for quota periods, so tests can move time. Leave it None.
    """

    def __init__(
        self,
        client: RespClient | RedisCluster,
        *,
        max_calls: int = MAX_CONNECTIONS,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._client = client
        self._clock = clock
        self._cluster = client if isinstance(client, RedisCluster) else None
        if isinstance(client, RespClient):  # so a turn's settlements run before its admits
            client.preload(ADMIT.source, SETTLE.source)  # on a new connection too
        # redis-py's asyncio pools raise MaxConnectionsError instead of waiting when full.
        self._calls = asyncio.Semaphore(max_calls)
        # redis-py's cluster client breaks its own connections when commands run while it
        # (re)discovers the topology, which it does lazily on first use and after an error;
        # so that step runs alone, before the calls that wait for it.
        self._discover = self._cluster is not None
        self._discovering = asyncio.Lock()
        self._registered: dict[Script, Any] = {}
        if self._cluster is not None:
            self._registered = {s: self._cluster.register_script(s.source) for s in (ADMIT, SETTLE)}
        self._register = self._cluster.register_script if self._cluster is not None else None
        self._batches: dict[Script, _Batch] = {}  # this loop turn's, not yet sent
        self._settling: set[asyncio.Task[Any]] = set()  # settle_soon's calls on a cluster

    @classmethod
    def connect(
        cls, url: str, *, timeout: float = TIMEOUT, clock: Callable[[], float] | None = None
    ) -> RedisLimiter:
        """A limiter for `redis://`, `rediss://` or `redis+cluster://` (`rediss+cluster://`).

        Nothing is connected yet: the first call connects, and raises StoreUnavailableError
        if it cannot.
        """
        scheme, _, rest = url.partition("://")
        if scheme in ("redis", "rediss"):
            return cls(RespClient(url, timeout=timeout), clock=clock)
        if scheme not in ("redis+cluster", "rediss+cluster"):
            raise ValueError(f"not a Redis URL: {scheme}://…")
        # Retry on a fresh connection after a ConnectionError only: a timeout may mean the
        # script ran and its reply was lost, and running it twice would reserve twice.
        cluster = RedisCluster.from_url(
            f"{scheme.removesuffix('+cluster')}://{rest}",
            max_connections=MAX_CONNECTIONS,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 1, (exceptions.ConnectionError,)),
        )
        return cls(cluster, clock=clock)

    async def admit(self, limit: Limit, tokens: int, most: int = 0) -> Reservation | Refused:
        return (await self.admit_for(limit, tokens, most))[0]

    def admit_now(self, limit: Limit, tokens: int) -> None:
        """Never: every admission is a round trip (proxy/limits/lease.py saves most)."""
        return None

    async def admit_for(
        self, limit: Limit, tokens: int, most: int = 0
    ) -> tuple[Reservation | Refused, float]:
        """`admit`, and how long, counted from before this call, the bucket it charged stays
        the server's current second at least (0 when refused): how long a lease of it may be
        drawn on."""
        now = self._now()
        tpm, quota = limit.tokens_per_minute, limit.token_quota
        keys = [rate_key(limit.key)]
        period, end = "", now
        if quota is not None:
            period, _, end = period_bounds(limit.quota_period, now)
            keys.append(quota_key(limit.key, period))
        args = (len(keys), tokens, most, _limit_arg(tpm), _limit_arg(quota), _ttl_ms(end, now))
        reply = await self._call(ADMIT, keys, args, now)
        verdict, second, used, quota_used, retry_us, granted, left_us = reply
        left = remaining(limit, used, quota_used)
        if verdict == 1:
            return Reservation(limit, granted, second, period, self, *left), left_us / 1_000_000
        if verdict == -1:
            return Refused("quota", end - now, *left), 0.0
        return Refused("rate", retry_us / 1_000_000, *left), 0.0

    async def settle(
        self, reservation: Reservation, used: int, once: str = ""
    ) -> tuple[int | None, int | None]:
        """With `once` (an id unique to this settlement), the server applies it once however
        often it is sent: a settlement that timed out may have run (proxy/limits/failover.py
        sends it again)."""
        res = reservation
        delta = used - res.tokens
        totals = await self._settled(res.limit, delta, res.second, res.period, once)
        return remaining(res.limit, *totals)

    def settle_soon(
        self, reservation: Reservation, used: int, failed: Failed | None = None, once: str = ""
    ) -> None:
        res = reservation
        delta = used - res.tokens
        keys, args, now = self._settlement(res.limit, delta, res.second, res.period, once)
        if self._cluster is None:
            self._batch(SETTLE, keys, args, now).waiters.append(failed)
            return
        task = asyncio.ensure_future(self._call_alone(SETTLE, keys, args, now))
        self._settling.add(task)
        task.add_done_callback(functools.partial(self._settled_alone, failed))

    def _settled_alone(self, failed: Failed | None, task: asyncio.Task[Any]) -> None:
        self._settling.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            _tell(failed, exc)

    async def release(self, reservation: Reservation) -> None:
        await self.settle(reservation, 0)

    async def usage(self, limit: Limit) -> tuple[int, int]:
        return await self._settled(limit, 0, 0, "")

    async def close(self) -> None:
        if isinstance(self._client, RespClient):
            await self._client.close()
        else:
            await self._client.aclose()

    async def _settled(
        self, limit: Limit, delta: int, second: int, period: str, once: str = ""
    ) -> tuple[int, int]:
        """Run settle.lua: apply `delta`, return the window and current-period totals."""
        keys, args, now = self._settlement(limit, delta, second, period, once)
        in_window, in_period = await self._call(SETTLE, keys, args, now)
        return in_window, in_period

    def _settlement(
        self, limit: Limit, delta: int, second: int, period: str, once: str = ""
    ) -> tuple[list[str], tuple[int, ...], float]:
        """settle.lua's keys and arguments for one settlement, and the time they were read."""
        now = self._now()
        keys = [rate_key(limit.key)]
        ttl = 0
        if limit.token_quota is not None:
            current, _, end = period_bounds(limit.quota_period, now)
            keys += [quota_key(limit.key, period or current), quota_key(limit.key, current)]
            ttl = _ttl_ms(end, now)
        if once and delta:  # last: settle.lua tells it by the key count
            keys.append(once_key(limit.key, once))
        has_rate = int(limit.tokens_per_minute is not None)
        return keys, (len(keys), delta, second, has_rate, ttl), now

    def _call(
        self, script: Script, keys: list[str], args: tuple[int, ...], now: float
    ) -> Awaitable[Any]:
        """One admission or settlement: its reply, from this turn's batch on a server, or
        from a call of its own on a cluster (a batch's keys would span slots)."""
        if self._cluster is not None:
            return self._call_alone(script, keys, args, now)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._batch(script, keys, args, now).waiters.append(future)
        return future

    def _batch(self, script: Script, keys: list[str], args: tuple[int, ...], now: float) -> _Batch:
        """This turn's batch of `script` with one more call in it (its waiter is the
        caller's to append), sent when the turn's callbacks have run."""
        batch = self._batches.get(script)
        if batch is None:
            batch = self._batches[script] = _Batch(self._override(now))
            asyncio.get_running_loop().call_soon(self._send_batch, script)
        batch.keys += keys
        batch.args += args
        return batch

    async def _call_alone(
        self, script: Script, keys: list[str], args: tuple[int, ...], now: float
    ) -> Any:
        replies = await self._run_on_cluster(script, keys, (self._override(now), *args))
        return replies[0]

    def _send_batch(self, script: Script) -> None:
        self._write(script, self._batches.pop(script))

    def _write(self, script: Script, batch: _Batch) -> None:
        assert isinstance(self._client, RespClient)
        name = script.source if batch.resent else script.sha
        command = ("EVAL" if batch.resent else "EVALSHA", name, len(batch.keys))
        try:
            answered = functools.partial(self._answered, script, batch)
            self._client.send((*command, *batch.keys, *batch.args), answered)
        except StoreUnavailableError as exc:
            _fail(batch.waiters, exc)

    def _answered(self, script: Script, batch: _Batch, reply: Any) -> None:
        """Hand each caller its own reply, or the batch's error (the script sent whole
        once when the server does not have it, as after a restart or `SCRIPT FLUSH`)."""
        if not isinstance(reply, BaseException):
            for waiter, result in zip(batch.waiters, reply, strict=True):
                if isinstance(waiter, asyncio.Future) and not waiter.done():  # else cancelled
                    waiter.set_result(result)
        elif isinstance(reply, ReplyError) and reply.code == "NOSCRIPT" and not batch.resent:
            batch.resent = True
            self._write(script, batch)
        else:
            _fail(batch.waiters, _unavailable(reply))

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[int | str]) -> Any:
        """One script call (any `Script`, e.g. the shared breakers'); outage errors become
        StoreUnavailableError."""
        client = self._client
        if not isinstance(client, RespClient):
            return await self._run_on_cluster(script, keys, args)
        try:
            return await client.evalsha(script.sha, script.source, keys, args)
        except ReplyError as exc:
            raise _unavailable(exc) from exc

    async def _run_on_cluster(
        self, script: Script, keys: Sequence[str], args: Sequence[int | str]
    ) -> Any:
        async with self._calls:
            try:
                if self._discover:
                    await self._discover_cluster()
                registered = self._registered.get(script)
                if registered is None:
                    assert self._register is not None
                    registered = self._registered[script] = self._register(script.source)
                return await registered(keys, args)
            except UNAVAILABLE as exc:
                self._discover = True
                raise StoreUnavailableError(f"{type(exc).__name__}: {exc}") from exc

    async def _discover_cluster(self) -> None:
        async with self._discovering:
            if self._discover:
                assert self._cluster is not None
                await self._cluster.initialize()
                self._discover = False

    def _now(self) -> float:
        return self._clock() if self._clock else time.time()

    def _override(self, now: float) -> str:
        """The scripts' time: "" (the server's TIME) unless a test clock is set."""
        return str(round(now * 1_000_000)) if self._clock else ""


def _limit_arg(limit: int | None) -> int:
    return -1 if limit is None else limit


def _unavailable(exc: BaseException) -> BaseException:
    """An error reply that means the server cannot serve now, as StoreUnavailableError."""
    if isinstance(exc, ReplyError) and (
        exc.code in UNAVAILABLE_REPLIES or str(exc) == MAX_CLIENTS_REPLY
    ):
        return StoreUnavailableError(str(exc))
    if isinstance(exc, ReplyError) and str(exc).startswith(UNAUTHENTICATED_REPLY):
        return StoreUnavailableError(f"NOAUTH (the server said: {exc})")
    return exc


def _fail(waiters: list[asyncio.Future[Any] | Failed | None], exc: BaseException) -> None:
    """Fail every waiting caller, each with its own exception (one traceback each), and tell
    the settlements sent with settle_soon."""
    for waiter in waiters:
        if isinstance(waiter, asyncio.Future):
            if not waiter.done():
                waiter.set_exception(type(exc)(*exc.args))
        else:
            _tell(waiter, type(exc)(*exc.args))


def _tell(failed: Failed | None, exc: BaseException) -> None:
    """A settlement nobody awaits failed: tell whoever asked, else log it."""
    if failed is not None:
        failed(exc)
    else:
        log.error("token-limit settlement lost: %s: %s", type(exc).__name__, exc)
