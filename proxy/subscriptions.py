"""Subscriptions kept at run time: made, suspended, resumed and re-keyed through the admin API
(proxy/admin.py), kept in the subscription store, in effect in every gateway process at once.

A stored record is a `config.Subscription` (the config's own schema, kebab-case JSON). One with
the id of a config-file subscription overrides it, so suspension and new keys work on file
subscriptions too; removing the record reverts to the file. Keys are stored only as
`sha256:<hex>`, except those of the built-in all-access subscription (`gateway.all-access`, id
`master`), kept in the clear so that every process shares them and the console can read them.

Each process holds every record in memory (`Subscriptions.stored`) and the request path never
reads the store; what keeps the copies in step depends on the store:

- Redis (`redis://`, `rediss://`, `redis+cluster://`), on one hash tag (one cluster slot):

      tollway:{subs}            hash: id -> JSON record
      tollway:{subs}:digests    hash: hex digest of each stored key -> id
      tollway:{subs}:changed    channel: the id of every record written

  A write is one Lua script (compare-and-set on the record; the digest index kept in step; a
  key another subscription holds refused), then a PUBLISH. Every process fetches the record a
  message names, reloads them all on (re)subscribing and every `RESYNC` seconds, and looks a
  key it does not know up by digest before refusing it (`resolve`): a subscription made on
  one process works on another on the very next request.
- memory: a dict in the process. With `tollway serve --workers N`, a JSON file in the
  directory the server made (`TOLLWAY_SUBSCRIPTIONS_DIR`), rewritten under an flock and
  swapped in by rename, re-read when it changed (checked every `FILE_POLL` seconds, and on an
  unknown key).

While the store is down the last records known stay in effect (one log line when it goes,
one when it is back), unknown keys are refused without asking, and writes raise
`StoreUnavailableError` (the admin API's 503). Nothing here ever logs a key.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import msgspec
from redis import exceptions
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from proxy.config import ALL_ACCESS_ID, Config, Subscription, hash_key, key_digest, new_key
from proxy.limits.base import StoreUnavailableError
from proxy.limits.redis import PREFIX, TIMEOUT, UNAVAILABLE, lua

__all__ = [
    "ALL_ACCESS_NAME", "ENV", "ConflictError", "FileStore", "MemoryStore", "NotFoundError",
    "RedisStore", "Store", "StoreUnavailableError", "Subscriptions", "open_store",
]  # fmt: skip

log = logging.getLogger("tollway")

ENV = "TOLLWAY_SUBSCRIPTIONS_DIR"  # set by `tollway serve --workers N` (N > 1)
ALL_ACCESS_NAME = "Built-in all-access subscription"
RECORDS = f"{PREFIX}:{{subs}}"
DIGESTS = f"{RECORDS}:digests"
CHANNEL = f"{RECORDS}:changed"
RESYNC = 5.0  # seconds between full reloads (the safety net under pub/sub)
FILE_POLL = 0.25  # seconds between looks at the shared file
RECONNECT = 0.5  # seconds before subscribing again after the store went away
LISTEN = 1.0  # seconds a wait for a message lasts (then it is made again)
RETRIES = 5  # compare-and-set attempts of one write racing others
UNKNOWN_TTL = 1.0  # seconds a key the store did not know is refused without asking again
UNKNOWN_MAX = 10_000  # such keys remembered (forgotten all at once when full, or on a change)

T = TypeVar("T")
# Told of a change: a record's id, or None for "reload them all".
Changed = Callable[[str | None], Awaitable[None]]

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Subscription)
_file_decoder = msgspec.json.Decoder(dict[str, msgspec.Raw])


class NotFoundError(Exception):
    """No such subscription (the message is safe to show)."""


class ConflictError(Exception):
    """A write that contradicts what is there (the message is safe to show)."""


class StaleError(Exception):
    """The record changed since it was read (compare-and-set lost); read it again."""


class KeyTakenError(Exception):
    """A key of the record is another subscription's."""


# --- stores --------------------------------------------------------------------------------


class Store(Protocol):
    """Where stored records live: raw JSON by id, and which id holds each key digest."""

    shared: bool  # other processes write to it too (then it is watched and resynced)

    async def load(self) -> dict[str, bytes]:
        """Every record."""
        ...

    async def get(self, id: str) -> bytes | None: ...

    async def owner(self, digest: bytes) -> tuple[str, bytes] | None:
        """The id and record holding a key with this SHA-256 digest."""
        ...

    async def put(
        self,
        id: str,
        expected: bytes | None,
        record: bytes | None,
        drop: Sequence[bytes],
        add: Sequence[bytes],
    ) -> None:
        """Replace the record `expected` (None: there is none) by `record` (None: remove it),
        dropping the digests `drop` and adding `add`. Raises StaleError when the record is no
        longer `expected`, KeyTakenError when a digest of `add` is another id's."""
        ...

    async def watch(self, changed: Changed) -> None:
        """Run until cancelled, telling `changed` what other processes wrote."""
        ...

    async def close(self) -> None: ...


def _apply(
    records: dict[str, bytes],
    owners: dict[bytes, str],
    id: str,
    expected: bytes | None,
    record: bytes | None,
    drop: Sequence[bytes],
    add: Sequence[bytes],
) -> None:
    """`Store.put` on plain dicts (the Redis script does the same)."""
    if records.get(id) != expected:
        raise StaleError
    if any(owners.get(digest, id) != id for digest in add):
        raise KeyTakenError
    for digest in drop:
        if owners.get(digest) == id:
            del owners[digest]
    if record is None:
        records.pop(id, None)
    else:
        records[id] = record
    owners.update(dict.fromkeys(add, id))


class MemoryStore:
    """The records of one process (`store: memory`, one worker)."""

    shared = False

    def __init__(self) -> None:
        self._records: dict[str, bytes] = {}
        self._owners: dict[bytes, str] = {}

    async def load(self) -> dict[str, bytes]:
        return dict(self._records)

    async def get(self, id: str) -> bytes | None:
        return self._records.get(id)

    async def owner(self, digest: bytes) -> tuple[str, bytes] | None:
        id = self._owners.get(digest)
        return None if id is None else (id, self._records[id])

    async def put(
        self,
        id: str,
        expected: bytes | None,
        record: bytes | None,
        drop: Sequence[bytes],
        add: Sequence[bytes],
    ) -> None:
        _apply(self._records, self._owners, id, expected, record, drop, add)

    async def watch(self, changed: Changed) -> None:
        return  # nobody else writes

    async def close(self) -> None:
        return


Signature = tuple[int, int, int]  # a file's inode, mtime (ns) and size


def file_signature(path: str | os.PathLike[str]) -> Signature | None:
    """What tells a changed file: its inode, mtime and size; None while it does not exist."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class FileStore(MemoryStore):
    """The memory store shared by the workers of one `tollway serve`: a JSON object of
    records in `directory`, rewritten whole under an flock and swapped in by rename (so a
    reader sees the old file or the new one), re-read when its signature changes. Reads are
    MemoryStore's, on the records last read from the file."""

    shared = True

    def __init__(self, directory: str | os.PathLike[str], poll: float = FILE_POLL) -> None:
        super().__init__()
        self._path = Path(directory) / "subscriptions.json"
        self._lock = Path(directory) / "subscriptions.lock"
        self._poll = poll
        self._seen: Signature | None = None
        self._serial = asyncio.Lock()  # one read or write at a time, taken in their order

    async def load(self) -> dict[str, bytes]:
        await self._sync()
        return await super().load()

    async def get(self, id: str) -> bytes | None:
        await self._sync()
        return await super().get(id)

    async def owner(self, digest: bytes) -> tuple[str, bytes] | None:
        await self._sync()
        return await super().owner(digest)

    async def put(
        self,
        id: str,
        expected: bytes | None,
        record: bytes | None,
        drop: Sequence[bytes],
        add: Sequence[bytes],
    ) -> None:
        async with self._serial:
            self._take(*await self._io(self._put, id, expected, record, add))

    async def watch(self, changed: Changed) -> None:
        while True:
            await asyncio.sleep(self._poll)
            if self._signature() != self._seen:
                await changed(None)

    async def _sync(self) -> None:
        async with self._serial:
            if self._signature() != self._seen:
                self._take(*await self._io(self._read))

    def _take(self, records: dict[str, bytes], seen: Signature | None) -> None:
        self._records, self._owners, self._seen = records, _owners(records), seen

    async def _io(self, work: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.to_thread(work, *args)
        except (OSError, msgspec.DecodeError) as exc:
            raise StoreUnavailableError(f"{self._path}: {exc}") from exc

    def _signature(self) -> Signature | None:
        return file_signature(self._path)

    def _read(self) -> tuple[dict[str, bytes], Signature | None]:
        try:
            with open(self._path, "rb") as file:
                st = os.fstat(file.fileno())
                data = file.read()
        except FileNotFoundError:
            return {}, None
        records = {id: bytes(raw) for id, raw in _file_decoder.decode(data).items()}
        return records, (st.st_ino, st.st_mtime_ns, st.st_size)

    def _put(
        self, id: str, expected: bytes | None, record: bytes | None, add: Sequence[bytes]
    ) -> tuple[dict[str, bytes], Signature | None]:
        with open(self._lock, "ab") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            records, _ = self._read()
            _apply(records, _owners(records), id, expected, record, (), add)
            body = b",".join(_encoder.encode(k) + b":" + v for k, v in records.items())
            temporary = self._path.with_name(f".subscriptions.{os.getpid()}.tmp")
            temporary.write_bytes(b"{" + body + b"}")
            os.replace(temporary, self._path)
            return records, self._signature()


def _owners(records: dict[str, bytes]) -> dict[bytes, str]:
    owners: dict[bytes, str] = {}
    for id, raw in records.items():
        sub = _decode(id, raw)
        if sub is not None:
            owners.update(dict.fromkeys(sub.key_digests, id))
    return owners


PUT = lua("subscription_put.lua")  # both scripts: KEYS = records, digests
OWNER = lua("subscription_owner.lua")


class RedisStore:
    """Records in Redis or a Redis Cluster (see the module docstring), through redis-py's
    asyncio clients, off the request path. Calls go one at a time (they are rare; and
    redis-py's cluster client breaks its own connections when calls run while it discovers
    the topology, see proxy/limits/redis.py)."""

    shared = True

    def __init__(self, url: str, timeout: float = TIMEOUT) -> None:
        scheme, _, rest = url.partition("://")
        # Never retried blindly: a write whose reply was lost would run twice. Cluster calls
        # get one retry on a fresh connection after a refused one, as the limiter's do.
        self._client: Redis | RedisCluster
        if scheme.endswith("+cluster"):
            self._client = RedisCluster.from_url(
                f"{scheme.removesuffix('+cluster')}://{rest}",
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                retry=Retry(NoBackoff(), 1, (exceptions.ConnectionError,)),
            )
        else:
            self._client = Redis.from_url(
                url, socket_timeout=timeout, socket_connect_timeout=timeout,
                retry=Retry(NoBackoff(), 0),
            )  # fmt: skip
        self._put = self._client.register_script(PUT)
        self._owner = self._client.register_script(OWNER)
        self._calls = asyncio.Lock()

    async def load(self) -> dict[str, bytes]:
        raw: dict[bytes, bytes] = await self._call(self._client.hgetall(RECORDS))
        return {id.decode(): record for id, record in raw.items()}

    async def get(self, id: str) -> bytes | None:
        record: bytes | None = await self._call(self._client.hget(RECORDS, id))
        return record

    async def owner(self, digest: bytes) -> tuple[str, bytes] | None:
        found = await self._call(self._owner(keys=[RECORDS, DIGESTS], args=[digest.hex()]))
        return None if not found else (found[0].decode(), found[1])

    async def put(
        self,
        id: str,
        expected: bytes | None,
        record: bytes | None,
        drop: Sequence[bytes],
        add: Sequence[bytes],
    ) -> None:
        args: list[str | bytes | int] = [id, expected or b"", record or b"", len(drop)]
        args += [digest.hex() for digest in (*drop, *add)]
        done = await self._call(self._put(keys=[RECORDS, DIGESTS], args=args))
        if done == 0:
            raise StaleError
        if done == -1:
            raise KeyTakenError
        try:  # the write stands; the others pick it up on their next resync at the latest
            await self._call(self._client.publish(CHANNEL, id))
        except StoreUnavailableError as exc:
            log.warning("tollway: subscription %r stored but not announced: %s", id, exc)

    async def watch(self, changed: Changed) -> None:
        while True:
            pubsub = self._client.pubsub()
            try:
                await pubsub.subscribe(CHANNEL)
                _honour_cancel()
                await changed(None)  # what was written while nobody listened
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True,
                                                       timeout=LISTEN)  # fmt: skip
                    _honour_cancel()
                    if message is not None and message["type"] == "message":
                        await changed(message["data"].decode())
            except UNAVAILABLE:
                pass  # the resync loop reports the outage; subscribe again shortly
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(RECONNECT)

    async def close(self) -> None:
        await self._client.aclose()

    async def _call(self, work: Awaitable[Any]) -> Any:
        try:
            await self._calls.acquire()
        except BaseException:  # cancelled while another call ran (a close, a shutdown)
            if isinstance(work, Coroutine):  # never started: closed here, not left to the
                work.close()  # garbage collector's "coroutine ... was never awaited"
            raise
        try:
            result = await work
        except UNAVAILABLE as exc:
            raise StoreUnavailableError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            self._calls.release()
            _honour_cancel()
        return result


def _honour_cancel() -> None:
    """Raise the cancellation redis-py swallowed: its asyncio clients can lose one that
    arrives while they connect (the task stays "cancelling"; seen with redis-py 8.1 on
    Python 3.11), which would leave a watcher running after close()."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def open_store(config: Config, environ: dict[str, str] | os._Environ[str] = os.environ) -> Store:
    """The subscription store of `config`: its Redis, or memory (shared through a file by
    the workers of one `tollway serve --workers N`)."""
    if config.gateway.store != "memory":
        return RedisStore(config.gateway.store)
    if directory := environ.get(ENV, ""):
        return FileStore(directory)
    return MemoryStore()


# --- the registry --------------------------------------------------------------------------


class Subscriptions:
    """The stored subscriptions as this process knows them, and the writes to them.

    `on_change` is called (synchronously) whenever `stored` changed, so the gateway can
    rebuild its key index; `effective(config)` is the set in force under a config."""

    def __init__(
        self, store: Store, on_change: Callable[[], None] = lambda: None, *, resync: float = RESYNC
    ) -> None:
        self.store = store
        self.stored: dict[str, Subscription] = {}
        self.available = True
        self._raw: dict[str, bytes] = {}
        self._on_change = on_change
        self._resync = resync
        self._all_access = False
        self._tasks: set[asyncio.Task[None]] = set()
        # digest -> until when (monotonic) a key the store did not know is refused unasked:
        # a flood of made-up keys costs one store lookup each per UNKNOWN_TTL, not per request
        self._unknown: dict[bytes, float] = {}

    @property
    def shared(self) -> bool:
        """Whether other processes write to the store (then unknown keys are looked up)."""
        return self.store.shared

    async def start(self, config: Config) -> None:
        """Load the records, make the all-access subscription if it is due, and (for a
        shared store) follow what other processes write."""
        await self.refresh()
        await self.ensure_all_access(config)
        if self.store.shared:
            self._spawn(self.store.watch(self._changed))
            self._spawn(self._resync_loop())

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.store.close()

    def effective(self, config: Config) -> tuple[Subscription, ...]:
        """The subscriptions in force under `config`: its file's, each overridden by a
        stored record of the same id, then the other stored ones."""
        stored = self._visible(config)
        files = config.subscriptions
        ids = {sub.id for sub in files}
        return (*(stored.get(sub.id, sub) for sub in files),
                *(sub for id, sub in stored.items() if id not in ids))  # fmt: skip

    def find(self, config: Config, id: str) -> Subscription | None:
        stored = self._visible(config).get(id)
        if stored is not None:
            return stored
        with contextlib.suppress(KeyError):
            return config.subscription(id)
        return None

    def source(self, config: Config, id: str) -> Literal["config", "store", "built-in"]:
        """Where a subscription comes from: built-in, store or config."""
        if id == ALL_ACCESS_ID and config.gateway.all_access:
            return "built-in"
        return "store" if id in self.stored else "config"

    # --- following the store ---

    async def refresh(self) -> None:
        """Reload every record (kept as they were while the store is down)."""
        try:
            raw = await self.store.load()
        except StoreUnavailableError as exc:
            self._down(exc)
            return
        self._up()
        if raw == self._raw:
            return
        decoded = {id: self.stored.get(id) if self._raw.get(id) == record else _decode(id, record)
                   for id, record in raw.items()}  # fmt: skip
        self._raw = raw
        self.stored = {id: sub for id, sub in decoded.items() if sub is not None}
        self._notify()

    async def resolve(self, digest: bytes) -> bool:
        """Look up a key this process does not know (the store may have it from another
        process); True when that changed the subscriptions in force here."""
        if not self.available:
            return False  # refused without waiting on a store that is away
        now = time.monotonic()
        if self._unknown.get(digest, 0.0) > now:
            return False
        try:
            found = await self.store.owner(digest)
        except StoreUnavailableError as exc:
            self._down(exc)
            return False
        if found is None:
            if len(self._unknown) >= UNKNOWN_MAX:
                self._unknown.clear()
            self._unknown[digest] = now + UNKNOWN_TTL
            return False
        return self._take(*found)

    def _notify(self) -> None:
        """The stored records changed: forget the keys found unknown, tell the gateway."""
        self._unknown.clear()
        self._on_change()

    async def ensure_all_access(self, config: Config) -> None:
        """Make the built-in all-access subscription if `config` wants one and the store has
        none (once across processes: the write is a compare-and-set on "none")."""
        self._all_access = config.gateway.all_access
        if self._all_access and ALL_ACCESS_ID not in self.stored:
            await self._make_all_access()

    async def _make_all_access(self) -> None:
        sub = Subscription(id=ALL_ACCESS_ID, display_name=ALL_ACCESS_NAME, scope="all-apis",
                           primary_key=new_key(), secondary_key=new_key())  # fmt: skip
        try:
            await self._write(ALL_ACCESS_ID, None, sub)
        except StaleError:  # another process made it first
            await self._changed(ALL_ACCESS_ID)
        except StoreUnavailableError:
            pass  # made by a resync once the store is back

    async def _changed(self, id: str | None) -> None:
        """What the watcher and the resync loop report; never raises for an outage."""
        if id is None:
            await self.refresh()
            # Still none: a store that lost its data (a Redis without persistence, restarted)
            if self.available and self._all_access and ALL_ACCESS_ID not in self.stored:
                await self._make_all_access()
            return
        try:
            record = await self.store.get(id)
        except StoreUnavailableError as exc:
            self._down(exc)
            return
        self._take(id, record)

    async def _resync_loop(self) -> None:
        while True:
            await asyncio.sleep(self._resync)
            try:
                await self._changed(None)
            except Exception:  # never let the safety net die
                log.exception("tollway: subscription resync failed")

    def _take(self, id: str, record: bytes | None) -> bool:
        """One record as the store has it now (None: gone); True if that changed anything."""
        if self._raw.get(id) == record:
            return False
        sub = None if record is None else _decode(id, record)
        if record is None or sub is None:
            self._raw.pop(id, None)
            self.stored.pop(id, None)
        else:
            self._raw[id] = record
            self.stored[id] = sub
        self._notify()
        return True

    # --- writes ---

    async def create(self, config: Config, sub: Subscription) -> Subscription:
        """Store a new subscription; its keys are stored as digests."""
        if sub.id == ALL_ACCESS_ID:
            raise ConflictError(f"id: {sub.id!r} is the built-in all-access subscription's")
        if self.find(config, sub.id) is not None:
            raise ConflictError(f"id: a subscription {sub.id!r} already exists")
        self._check_keys(config, sub)
        try:
            await self._write(sub.id, None, sub)
        except StaleError:
            raise ConflictError(f"id: a subscription {sub.id!r} already exists") from None
        return self.stored[sub.id]

    async def update(
        self, config: Config, id: str, change: Callable[[Subscription], Subscription]
    ) -> Subscription:
        """Store `change(current)` for subscription `id` (a file subscription gets an
        overriding record); retried on a concurrent write."""
        for _ in range(RETRIES):
            current = self.find(config, id)
            if current is None:
                raise NotFoundError(f"No subscription {id!r}.")
            new = change(current)
            self._check_keys(config, new)
            try:
                await self._write(id, self._raw.get(id), new)
            except StaleError:
                await self._changed(id)
                continue
            return self.stored[id]
        raise ConflictError(f"subscription {id!r} is being changed concurrently; try again")

    async def delete(self, config: Config, id: str) -> None:
        """Remove the stored record `id` (a file subscription reverts to the file)."""
        if id == ALL_ACCESS_ID:
            if not config.gateway.all_access:
                raise NotFoundError(f"No subscription {id!r}.")
            raise ConflictError(
                "the built-in all-access subscription stays while gateway.all-access is true "
                "(suspend it, or regenerate its keys, instead)"
            )
        for _ in range(RETRIES):
            expected = self._raw.get(id)
            if expected is None:
                if any(sub.id == id for sub in config.subscriptions):
                    raise ConflictError(f"subscription {id!r} is in the config file; edit it there")
                raise NotFoundError(f"No subscription {id!r}.")
            try:
                await self._write(id, expected, None)
                return
            except StaleError:
                await self._changed(id)
        raise ConflictError(f"subscription {id!r} is being changed concurrently; try again")

    async def _write(self, id: str, expected: bytes | None, sub: Subscription | None) -> None:
        """Store `sub` (None: remove) over `expected`, and take it in here at once."""
        old = None if expected is None else _decode(id, expected)
        stored = None if sub is None else _storable(sub)
        add = () if stored is None else stored.key_digests
        drop = [d for d in (old.key_digests if old else ()) if d not in add]
        record = None if stored is None else _encoder.encode(stored)
        try:
            await self.store.put(id, expected, record, drop, add)
        except KeyTakenError:
            raise ConflictError("a key of this subscription is another subscription's") from None
        except StoreUnavailableError as exc:
            self._down(exc)
            raise
        self._up()
        self._take(id, record)

    def _check_keys(self, config: Config, sub: Subscription) -> None:
        taken: set[bytes] = set()
        if config.gateway.admin_key:
            taken.add(key_digest(config.gateway.admin_key))
        for other in self.effective(config):
            if other.id != sub.id:
                taken.update(other.key_digests)
        for field, key in (("primary-key", sub.primary_key), ("secondary-key", sub.secondary_key)):
            if key and key_digest(key) in taken:
                raise ConflictError(f"{field}: the key is already in use")

    def _visible(self, config: Config) -> dict[str, Subscription]:
        if config.gateway.all_access or ALL_ACCESS_ID not in self.stored:
            return self.stored
        return {id: sub for id, sub in self.stored.items() if id != ALL_ACCESS_ID}

    def _down(self, exc: BaseException) -> None:
        if self.available:
            self.available = False
            log.error("tollway: subscription store unavailable (%s); the subscriptions known "
                      "stay in effect, admin writes are refused until it returns", exc)  # fmt: skip

    def _up(self) -> None:
        if not self.available:
            self.available = True
            log.warning("tollway: subscription store is back")

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _storable(sub: Subscription) -> Subscription:
    """`sub` as stored: keys as digests, but for the all-access subscription's."""
    if sub.id == ALL_ACCESS_ID:
        return sub
    primary, secondary = (hash_key(k) if k else "" for k in (sub.primary_key, sub.secondary_key))
    return msgspec.structs.replace(sub, primary_key=primary, secondary_key=secondary)


def _decode(id: str, record: bytes) -> Subscription | None:
    try:
        sub = _decoder.decode(record)
    except msgspec.DecodeError as exc:
        log.error("tollway: stored subscription %r is unreadable, ignored: %s", id, exc)
        return None
    if sub.id != id:
        log.error("tollway: stored subscription %r holds id %r, ignored", id, sub.id)
        return None
    return sub
