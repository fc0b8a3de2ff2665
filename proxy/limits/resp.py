"""A lean RESP2 client for the token-limit store: one pipelined connection on an asyncio
Protocol, replies parsed by hiredis (in C).

Why not redis-py: a token-limit decision is a script call on every request, and redis-py's
asyncio client costs ~55 µs of CPU per PING on this hardware (64 concurrent callers); this
one ~5 (~15 measured, of which ~10 are the benchmark's own tasks). It does only what the
store needs: send a command, get its reply.

One connection per client carries every command. A command is packed once
(`hiredis.pack_command`) and written in the event-loop turn that issued it, together with
the other commands of that turn (one write for them all, not one system call each), without
waiting for earlier replies; replies arrive in order and are matched to the waiting futures
first in, first out. The connection is made on first use, with AUTH and SELECT from the URL
pipelined ahead of the first commands.

Failures are `StoreUnavailableError`: connection refused, reset or closed by the server, and
a command not answered within `timeout`. A timeout leaves the server owing replies the
matching can no longer place, so the connection is dropped and everything still waiting on
it fails; the next command opens a new one. Error replies (WRONGTYPE, NOSCRIPT, ...) raise
`ReplyError` for that command only; the connection stays.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis

from proxy.limits.base import StoreUnavailableError

TIMEOUT = 0.5  # seconds for a reply (the first command's includes connecting)
_MORE = object()  # hiredis.Reader.gets(): no whole reply buffered yet
_SLACK = 0.001  # a timer may fire this early (libuv keeps milliseconds)
_GRACE = 0.01  # seconds an overdue command waits for one more look (see _check_timeout)

Arg = str | bytes | int
# Told a reply (or the ReplyError or StoreUnavailableError in its place) as soon as it is read.
Callback = Callable[[Any], None]
# (what waits: a future, a callback, or None for a handshake command; its deadline)
_Waiter = tuple[asyncio.Future[Any] | Callback | None, float]


class ReplyError(Exception):
    """An error reply, e.g. "WRONGTYPE Operation against a key holding the wrong kind of
    value": that command failed, the connection is fine."""

    @property
    def code(self) -> str:
        """The error's first word: "ERR", "WRONGTYPE", "NOSCRIPT", ..."""
        return str(self).partition(" ")[0]


class RespClient:
    """Commands to one Redis-protocol server at `url` (`redis://` or `rediss://`, with an
    optional `user:password@` and `/db`); see the module docstring.

    Nothing is connected until the first command, so it can be made outside an event loop.
    """

    def __init__(self, url: str, *, timeout: float = TIMEOUT) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss") or not parts.hostname:
            raise ValueError(f"not a redis:// or rediss:// URL with a host: {parts.scheme}://…")
        if parts.query or parts.fragment:
            raise ValueError("no query or fragment in a Redis URL (only user:password@ and /db)")
        self.url = url
        self.host = parts.hostname
        self.port = parts.port or 6379
        self.timeout = timeout
        self._ssl = ssl.create_default_context() if parts.scheme == "rediss" else None
        self._hello = _handshake(parts.username, parts.password, parts.path)
        self._preload: list[bytes] = []
        self._conn: _Connection | None = None
        self._closed = False

    async def execute(self, *args: Arg) -> Any:
        """Send one command (`"SET", "key", 1`) and return its reply: bytes, int, None or a
        list of those. Raises ReplyError for an error reply, StoreUnavailableError when the
        server does not answer."""
        return await self._send(_pack(args))

    async def evalsha(self, sha: str, script: str, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        """Run a Lua script by its SHA-1; sent whole (EVAL, which caches it again) when the
        server does not have it, as after a restart or `SCRIPT FLUSH`."""
        command = ("EVALSHA", sha, len(keys), *keys, *args)
        try:
            return await self._send(_pack(command))
        except ReplyError as exc:
            if exc.code != "NOSCRIPT":
                raise
        command = ("EVAL", script, len(keys), *keys, *args)
        return await self._send(_pack(command))

    def preload(self, *scripts: str) -> None:
        """Load these Lua scripts (`SCRIPT LOAD`) on every new connection before its first
        command. A server that restarted has lost them, and an EVALSHA that meets NOSCRIPT
        is sent again whole after the commands written behind it: the calls of one turn
        would run out of the order they were sent in. A refusal (an ACL without SCRIPT) is
        ignored: EVALSHA then falls back to EVAL as before."""
        self._preload += [_pack(("SCRIPT", "LOAD", script)) for script in scripts]

    def send(self, command: Sequence[Arg], callback: Callback) -> None:
        """Write one command now (not at the end of the loop turn: for a caller that has
        already gathered a turn's work into it); `callback` is called with its reply, or the
        error in its place, from the loop's read of it (no task or future in between). Raises
        StoreUnavailableError at once when the client is closed."""
        conn = self._connection()
        conn.queue(_pack(tuple(command)), callback, soon=False)
        conn.flush()

    def send_all(self, commands: Sequence[Sequence[Arg]], callback: Callback) -> None:
        """`send` for several commands, written back to back in one write (one system call,
        not one each: ~25 µs apiece here); `callback` is called with each reply in turn."""
        conn = self._connection()
        for command in commands:
            conn.queue(_pack(tuple(command)), callback, soon=False)
        conn.flush()

    async def close(self) -> None:
        """Drop the connection, failing what waits on it; later commands raise."""
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.fail("client closed")
            await asyncio.sleep(0)  # let the transport's connection_lost run

    def _send(self, payload: bytes) -> asyncio.Future[Any]:
        return self._connection().send(payload)

    def _connection(self) -> _Connection:
        """The connection in use, or a new one when there is none or it failed."""
        conn = self._conn
        if conn is None or conn.closed:
            conn = self._open()
        return conn

    def _open(self) -> _Connection:
        if self._closed:
            raise StoreUnavailableError("the Redis client is closed")
        conn = self._conn = _Connection(asyncio.get_running_loop(), self.timeout)
        for payload in self._hello:
            conn.send_handshake(payload)
        for payload in self._preload:
            conn.queue(payload, _ignore)
        conn.start(self.host, self.port, self._ssl)
        return conn


def pairs(flat: list[Any]) -> dict[Any, Any]:
    """A RESP2 map sent as a flat array `[name, value, name, value, ...]` (HGETALL, XINFO,
    FT.INFO, a search hit's fields, a stream entry's) as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _ignore(reply: Any) -> None:
    """The reply to a preloaded script (its SHA-1, or a refusal that changes nothing)."""


def _handshake(user: str | None, password: str | None, path: str) -> list[bytes]:
    """AUTH and SELECT for the URL's credentials and database, packed."""
    commands: list[tuple[Arg, ...]] = []
    if password is not None or user:
        secret = unquote(password or "")
        commands.append(("AUTH", unquote(user), secret) if user else ("AUTH", secret))
    db = path.strip("/")
    if db:
        if not db.isdigit():
            raise ValueError(f"a Redis URL's path is a database number, not {db!r}")
        if int(db):
            commands.append(("SELECT", db))
    return [_pack(command) for command in commands]


def _pack(command: tuple[Arg, ...]) -> bytes:
    """The command as a RESP array of bulk strings (ints in decimal, str in UTF-8)."""
    packed: bytes = hiredis.pack_command(command)  # type: ignore[arg-type]  # stub: a 1-tuple
    return packed


class _Connection(asyncio.Protocol):
    """One connection: commands out in batches, replies in to the futures in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.loop = loop
        self.timeout = timeout
        self.closed = False
        self._transport: asyncio.Transport | None = None
        self._task: asyncio.Task[None] | None = None
        self._reader = hiredis.Reader(replyError=ReplyError, notEnoughData=_MORE)
        self._waiting: collections.deque[_Waiter] = collections.deque()
        self._out: list[bytes] = []  # packed commands not yet written
        self._write_paused = False
        self._timer: asyncio.TimerHandle | None = None
        self._overdue: _Waiter | None = None  # the oldest command, once seen past its deadline

    def start(self, host: str, port: int, context: ssl.SSLContext | None) -> None:
        self._task = self.loop.create_task(self._connect(host, port, context))

    async def _connect(self, host: str, port: int, context: ssl.SSLContext | None) -> None:
        try:
            await self.loop.create_connection(
                lambda: self, host, port, ssl=context, server_hostname=host if context else None
            )
        except OSError as exc:  # refused, unreachable, TLS failure; a timeout cancels us
            self._task = None  # done: fail() must not cancel it
            self.fail(f"cannot connect to {host}:{port}: {exc}")

    def send(self, payload: bytes) -> asyncio.Future[Any]:
        """Queue one packed command; the future gets its reply."""
        future = self.loop.create_future()
        self.queue(payload, future)
        return future

    def send_handshake(self, payload: bytes) -> None:
        """Queue AUTH or SELECT: an error reply drops the connection."""
        self.queue(payload, None)

    def queue(
        self, payload: bytes, waiter: asyncio.Future[Any] | Callback | None, soon: bool = True
    ) -> None:
        """Queue one packed command for this turn's write; `waiter` gets its reply. `soon`
        False: the caller flushes itself (no write is scheduled for the turn's end)."""
        loop = self.loop
        deadline = loop.time() + self.timeout
        self._waiting.append((waiter, deadline))
        out = self._out
        if soon and not out and self._transport is not None and not self._write_paused:
            loop.call_soon(self.flush)
        out.append(payload)
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._check_timeout)

    def fail(self, reason: str) -> None:
        """Drop the connection: every command still waiting fails with StoreUnavailableError."""
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._transport is not None:
            self._transport.abort()
        self._out.clear()
        waiting = self._waiting
        while waiting:
            waiter, _ = waiting.popleft()
            if isinstance(waiter, asyncio.Future):
                if not waiter.done():
                    waiter.set_exception(StoreUnavailableError(reason))  # one each: tracebacks
            elif waiter is not None:
                waiter(StoreUnavailableError(reason))

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tcp: asyncio.Transport = transport  # type: ignore[assignment]
        self._transport = tcp
        if self.closed:  # timed out while connecting
            tcp.abort()
        else:
            self.flush()

    def data_received(self, data: bytes) -> None:
        reader, waiting = self._reader, self._waiting
        reader.feed(data)
        try:
            reply = reader.gets()
            while reply is not _MORE:
                if not waiting:
                    self.fail("a reply to no command")
                    return
                waiter, _ = waiting.popleft()
                if waiter is None:
                    if isinstance(reply, ReplyError):
                        self.fail(f"connection handshake: {reply}")
                        return
                elif not isinstance(waiter, asyncio.Future):
                    try:
                        waiter(reply)
                    except Exception as exc:  # a bug: fail loudly, never read out of step
                        self.fail(f"a reply's callback failed: {exc!r}")
                        raise
                elif waiter.done():
                    pass  # its caller was cancelled
                elif isinstance(reply, ReplyError):
                    waiter.set_exception(reply)
                else:
                    waiter.set_result(reply)
                reply = reader.gets()
        except hiredis.ProtocolError as exc:
            self.fail(f"protocol error: {exc}")

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(f"connection lost: {exc or 'closed by the server'}")

    def pause_writing(self) -> None:
        self._write_paused = True  # commands queue in _out, bounded by the callers waiting

    def resume_writing(self) -> None:
        self._write_paused = False
        self.flush()

    # -- writes and timeouts

    def flush(self) -> None:
        """Write the queued commands (now, when called directly: the turn's scheduled flush
        then finds none)."""
        out, transport = self._out, self._transport
        if out and transport is not None and not self.closed and not self._write_paused:
            transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def _check_timeout(self) -> None:
        """Due at the oldest command's deadline, or earlier: re-arm, or fail everything.

        An overdue command gets one more look after a short grace, in which the loop polls:
        when it is this process that stalled (a long synchronous step), the command may
        only just have been written, or its reply be sitting unread.
        """
        self._timer = None
        if self.closed or not self._waiting:
            return
        oldest = self._waiting[0]
        now = self.loop.time()
        if oldest[1] > now + _SLACK:
            self._timer = self.loop.call_at(oldest[1], self._check_timeout)
        elif oldest is not self._overdue:
            self._overdue = oldest
            self._timer = self.loop.call_at(now + _GRACE, self._check_timeout)
        else:
            self.fail(f"no reply within {self.timeout} s")
