"""Runtime subscriptions (proxy/subscriptions.py): one contract suite over every store (memory,
the workers' shared file, Redis, a 3-node Redis Cluster), the registry that overlays them on
the config file's, and the key index the request path reads (proxy/auth.py).

In-process against real servers (tests/redisproc.py); the gateway processes that use all this
are tests/test_admin.py's."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import msgspec
import pytest

from proxy import auth
from proxy import config as config_module
from proxy.auth import ApiGuard, KeyRing
from proxy.config import Subscription, hash_key
from proxy.limits.base import StoreUnavailableError
from proxy.subscriptions import (
    ALL_ACCESS_NAME,
    DIGESTS,
    RECORDS,
    ConflictError,
    FileStore,
    KeyTakenError,
    MemoryStore,
    NotFoundError,
    RedisStore,
    StaleError,
    Store,
    Subscriptions,
)
from tests.redisproc import Cluster, RedisProc, run

CONFIG = config_module.loads("""
gateway: {admin-key: admin-key-0123456789abcdef}
backends: [{id: b, url: "http://127.0.0.1:9"}]
apis:
  - {id: chat, path: /openai, backend: b, products: [starter]}
  - {id: raw, path: /raw, type: passthrough, backend: b}
products: [{id: starter}]
subscriptions:
  - {id: team-a, scope: all-apis, primary-key: team-a-key-0123456789}
""")
NO_ALL_ACCESS = msgspec.structs.replace(
    CONFIG, gateway=msgspec.structs.replace(CONFIG.gateway, all_access=False)
)
KEY = "runtime-key-0123456789abcdef"
KEY2 = "runtime-key-2-0123456789abcdef"


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def record(id: str, *keys: str, state: Literal["active", "suspended"] = "active") -> bytes:
    second = hash_key(keys[1]) if len(keys) > 1 else ""
    sub = Subscription(id=id, primary_key=hash_key(keys[0]), secondary_key=second, state=state)
    return msgspec.json.encode(sub)


# --- every store: one contract ----------------------------------------------------------------

STORES = ["memory", "file", "redis", "cluster"]
Opener = Callable[[], Store]


@pytest.fixture(params=STORES)
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens stores of one kind, all on the same (emptied) data; memory: one shared object."""
    kind = request.param
    if kind == "memory":
        memory = MemoryStore()
        yield lambda: memory
    elif kind == "file":
        yield lambda: FileStore(tmp_path, poll=0.02)
    elif kind == "redis":
        server: RedisProc = request.getfixturevalue("server")
        with server.client() as client:
            client.flushall()
        yield lambda: RedisStore(server.url)
    else:
        cluster: Cluster = request.getfixturevalue("cluster")
        cluster.flush()
        yield lambda: RedisStore(cluster.url)


@asynccontextmanager
async def opened(opener: Opener) -> AsyncIterator[Store]:
    store = opener()
    try:
        yield store
    finally:
        await store.close()


def test_put_load_get_owner(opener: Opener) -> None:
    async def main() -> None:
        async with opened(opener) as store:
            assert await store.load() == {}
            raw = record("a", KEY, KEY2)
            await store.put("a", None, raw, (), (digest(KEY), digest(KEY2)))
            assert await store.load() == {"a": raw}
            assert await store.get("a") == raw and await store.get("b") is None
            assert await store.owner(digest(KEY2)) == ("a", raw)
            assert await store.owner(digest("nobody-has-this-key")) is None

    run(main())


def test_put_is_a_compare_and_set(opener: Opener) -> None:
    async def main() -> None:
        async with opened(opener) as store:
            first, second = record("a", KEY), record("a", KEY, state="suspended")
            await store.put("a", None, first, (), (digest(KEY),))
            with pytest.raises(StaleError):  # "none there" no longer holds
                await store.put("a", None, second, (), (digest(KEY),))
            with pytest.raises(StaleError):  # nor does a record that was never there
                await store.put("a", second, first, (), (digest(KEY),))
            await store.put("a", first, second, (), (digest(KEY),))
            assert await store.get("a") == second

    run(main())


def test_a_key_belongs_to_one_subscription(opener: Opener) -> None:
    async def main() -> None:
        async with opened(opener) as store:
            await store.put("a", None, record("a", KEY), (), (digest(KEY),))
            with pytest.raises(KeyTakenError):
                await store.put("b", None, record("b", KEY), (), (digest(KEY),))
            assert await store.get("b") is None

    run(main())


def test_a_new_key_replaces_the_old_one_and_removal_frees_it(opener: Opener) -> None:
    async def main() -> None:
        async with opened(opener) as store:
            old, new = record("a", KEY), record("a", KEY2)
            await store.put("a", None, old, (), (digest(KEY),))
            await store.put("a", old, new, (digest(KEY),), (digest(KEY2),))
            assert await store.owner(digest(KEY)) is None
            assert await store.owner(digest(KEY2)) == ("a", new)
            await store.put("a", new, None, (digest(KEY2),), ())
            assert await store.load() == {} and await store.owner(digest(KEY2)) is None
            await store.put("b", None, record("b", KEY2), (), (digest(KEY2),))  # free again

    run(main())


def test_another_store_object_sees_the_writes(opener: Opener) -> None:
    """What makes the store shared: a second client (another process's) reads the same."""

    async def main() -> None:
        async with opened(opener) as one, opened(opener) as two:
            raw = record("a", KEY)
            await one.put("a", None, raw, (), (digest(KEY),))
            assert await two.owner(digest(KEY)) == ("a", raw)
            with pytest.raises(StaleError):
                await two.put("a", None, raw, (), (digest(KEY),))

    run(main())


# --- the registry ---------------------------------------------------------------------------


def test_records_keep_digests_only_but_the_all_access_keys(opener: Opener) -> None:
    async def main() -> None:
        async with opened(opener) as store:
            subs = Subscriptions(store)
            await subs.start(CONFIG)
            try:
                await subs.create(CONFIG, Subscription(id="x", scope="api:chat",
                                                       primary_key=KEY, secondary_key=KEY2))  # fmt: skip
                raw = b"".join((await store.load()).values())
            finally:
                await subs.close()
        assert KEY.encode() not in raw and KEY2.encode() not in raw
        assert hash_key(KEY).encode() in raw
        master = subs.stored["master"]
        assert master.display_name == ALL_ACCESS_NAME and master.scope == "all-apis"
        assert master.primary_key.encode() in raw  # kept in the clear, for the console
        assert not master.primary_key.startswith("sha256:") and len(master.primary_key) >= 43

    run(main())


def test_one_all_access_subscription_however_many_processes_start_at_once(
    opener: Opener,
) -> None:
    async def main() -> None:
        registries = [Subscriptions(opener()) for _ in range(6)]
        await asyncio.gather(*(r.start(CONFIG) for r in registries))
        try:
            keys = {r.stored["master"].primary_key for r in registries}
            assert len(keys) == 1
        finally:
            await asyncio.gather(*(r.close() for r in registries))

    run(main())


def test_a_stored_record_overrides_the_file_until_removed() -> None:
    async def main() -> None:
        subs = Subscriptions(MemoryStore())
        await subs.start(CONFIG)
        suspend = lambda s: msgspec.structs.replace(s, state="suspended")  # noqa: E731
        changed = await subs.update(CONFIG, "team-a", suspend)
        assert changed.state == "suspended" and changed.primary_key == hash_key(
            "team-a-key-0123456789"
        )
        in_force = {s.id: s for s in subs.effective(CONFIG)}
        assert in_force["team-a"].state == "suspended" and subs.source(CONFIG, "team-a") == "store"
        await subs.delete(CONFIG, "team-a")
        assert subs.find(CONFIG, "team-a") == CONFIG.subscription("team-a")
        with pytest.raises(ConflictError, match="config file"):
            await subs.delete(CONFIG, "team-a")
        with pytest.raises(ConflictError, match="all-access"):
            await subs.delete(CONFIG, "master")
        with pytest.raises(NotFoundError):
            await subs.update(CONFIG, "nobody", suspend)
        await subs.close()

    run(main())


def test_all_access_false_hides_the_built_in_subscription() -> None:
    async def main() -> None:
        subs = Subscriptions(MemoryStore())
        await subs.start(CONFIG)  # another process, with all-access on, made one
        assert "master" in {s.id for s in subs.effective(CONFIG)}
        assert "master" not in {s.id for s in subs.effective(NO_ALL_ACCESS)}
        assert subs.find(NO_ALL_ACCESS, "master") is None
        with pytest.raises(NotFoundError):
            await subs.delete(NO_ALL_ACCESS, "master")
        fresh = Subscriptions(MemoryStore())
        await fresh.start(NO_ALL_ACCESS)
        assert fresh.stored == {}  # none is made
        await subs.close()
        await fresh.close()

    run(main())


def test_keys_in_use_are_refused() -> None:
    async def main() -> None:
        subs = Subscriptions(MemoryStore())
        await subs.start(CONFIG)
        for key in ("team-a-key-0123456789", "admin-key-0123456789abcdef"):
            with pytest.raises(ConflictError, match="primary-key: the key is already in use"):
                await subs.create(CONFIG, Subscription(id="y", primary_key=key))
        await subs.create(CONFIG, Subscription(id="y", primary_key=KEY))
        with pytest.raises(ConflictError, match="already exists"):
            await subs.create(CONFIG, Subscription(id="y", primary_key=KEY2))
        await subs.close()

    run(main())


@pytest.mark.parametrize("kind", ["file", "redis", "cluster"])
def test_a_write_reaches_the_other_processes_at_once(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Two registries on one shared store (two gateway processes): a creation, a suspension
    and a removal on one are in force on the other within milliseconds (pub/sub; the file's
    poll); and a key the other has not heard of yet is found by its digest on first use."""
    opener = _shared_opener(kind, request, tmp_path)

    async def main() -> None:
        a, b = Subscriptions(opener()), Subscriptions(opener())
        await a.start(CONFIG)
        await b.start(CONFIG)
        try:
            await a.create(CONFIG, Subscription(id="x", primary_key=KEY))
            assert await _within(lambda: "x" in b.stored, 1.0) < (0.3 if kind == "file" else 0.1)
            await a.update(CONFIG, "x", lambda s: msgspec.structs.replace(s, state="suspended"))
            assert await _within(lambda: b.stored["x"].state == "suspended", 1.0) < 0.3
            await a.delete(CONFIG, "x")
            assert await _within(lambda: "x" not in b.stored, 1.0) < 0.3
            # A process that is not listening (yet): the digest lookup finds the key.
            c = Subscriptions(opener())
            await c.refresh()
            await a.create(CONFIG, Subscription(id="z", primary_key=KEY2))
            assert await c.resolve(digest(KEY2)) is True and "z" in c.stored
            assert await c.resolve(digest(KEY2)) is False  # nothing new the second time
            assert await c.resolve(digest("nobody-has-this-key-0123")) is False
            await c.close()
        finally:
            await a.close()
            await b.close()

    run(main())


def _shared_opener(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Opener:
    if kind == "file":
        return lambda: FileStore(tmp_path, poll=0.02)
    proc: RedisProc | Cluster = request.getfixturevalue("server" if kind == "redis" else "cluster")
    if isinstance(proc, Cluster):
        proc.flush()
    else:
        with proc.client() as client:
            client.flushall()
    return lambda: RedisStore(proc.url)


async def _within(condition: Callable[[], bool], limit: float) -> float:
    """Seconds until `condition` held (fails past `limit`)."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < limit, "not seen in time"
        await asyncio.sleep(0.001)
    return time.monotonic() - start


def test_redis_keeps_it_all_on_one_hash_tag(cluster: Cluster) -> None:
    from redis.crc import key_slot

    assert key_slot(RECORDS.encode()) == key_slot(DIGESTS.encode())
    assert "{subs}" in RECORDS


def test_a_store_outage_keeps_the_known_subscriptions(own_server: RedisProc) -> None:
    """Hung (SIGSTOP) then dead (SIGKILL): what is known stays in force, an unknown key is
    refused without waiting, writes raise; when it answers again, writes work, no restart."""

    async def main() -> None:
        changes: list[int] = []
        subs = Subscriptions(RedisStore(own_server.url, timeout=0.2), lambda: changes.append(1))
        await subs.start(CONFIG)
        try:
            await subs.create(CONFIG, Subscription(id="x", primary_key=KEY))
            known = dict(subs.stored)
            for outage, back in ((own_server.pause, own_server.resume),
                                 (own_server.kill, own_server.start)):  # fmt: skip
                outage()
                await subs.refresh()
                assert subs.available is False and subs.stored == known
                with pytest.raises(StoreUnavailableError):
                    await subs.create(CONFIG, Subscription(id="y", primary_key=KEY2))
                t = time.monotonic()
                assert await subs.resolve(digest(KEY2)) is False
                assert time.monotonic() - t < 0.05  # not asked while it is away
                back()
                await subs.refresh()
                assert subs.available is True
                # (a write that timed out against the hung server may still have run when it
                # resumed, as it read its socket: so another id and key here)
                fresh = f"z-{outage.__name__}"
                await subs.create(CONFIG, Subscription(id=fresh, primary_key=fresh * 4))
                assert fresh in subs.stored
                known = dict(subs.stored)
            # The killed server came back empty: the all-access subscription is made anew.
            await subs._changed(None)
            assert "master" in subs.stored
        finally:
            await subs.close()

    run(main())


# --- the key index the request path reads -----------------------------------------------------


def test_a_new_set_is_swapped_in_whole_and_grants_are_not_computed_per_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[Any] = []
    original = auth._grants

    def counted(*args: Any) -> dict[str, Any]:
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(auth, "_grants", counted)
    ring = KeyRing(CONFIG.subscriptions)
    guard = ApiGuard(CONFIG, CONFIG.api("chat"), ring)
    scope = {"headers": [(b"api-key", KEY.encode())], "query_string": b""}
    with pytest.raises(auth.SubscriptionKeyInvalidError):
        guard.identify(scope)
    sub = Subscription(id="x", scope="product:starter", primary_key=hash_key(KEY))
    ring.replace((*CONFIG.subscriptions, sub))
    guard.refresh()
    calls.clear()
    for _ in range(100):
        identity = guard.identify(scope)
    assert identity.subscription is sub and identity.product == CONFIG.product("starter")
    assert calls == []
    raw_guard = ApiGuard(CONFIG, CONFIG.api("raw"), ring)  # out of the product's scope
    with pytest.raises(auth.SubscriptionKeyInvalidError):
        raw_guard.identify(scope)


def test_an_unknown_key_is_asked_about_once_then_refused() -> None:
    asked: list[bytes] = []

    async def resolve(d: bytes) -> bool:
        asked.append(d)
        return False

    ring = KeyRing(CONFIG.subscriptions, resolve)
    guard = ApiGuard(CONFIG, CONFIG.api("chat"), ring)
    scope = {"headers": [(b"api-key", KEY.encode())], "query_string": b""}
    with pytest.raises(auth.UnknownKeyError) as miss:
        guard.identify(scope)
    assert KEY not in repr(miss.value.__dict__)  # the digest travels, never the key

    async def main() -> None:
        with pytest.raises(auth.SubscriptionKeyInvalidError):
            await guard.recheck(scope, miss.value)

    run(main())
    assert asked == [digest(KEY)]


def test_a_flood_of_made_up_keys_asks_the_store_once_per_key(
    server: RedisProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Made-up keys cost one store lookup each per UNKNOWN_TTL, not one per request; any change
    of the records forgets them (a key just made elsewhere must not stay refused)."""
    asked: list[bytes] = []
    made_up, made = "flood-made-up-key-0123456789", "flood-made-key-0123456789"

    async def main() -> None:
        store = RedisStore(server.url)
        owner = store.owner

        async def counting(d: bytes) -> Any:
            asked.append(d)
            return await owner(d)

        monkeypatch.setattr(store, "owner", counting)
        a, b = Subscriptions(RedisStore(server.url)), Subscriptions(store)
        await a.start(CONFIG)
        await b.start(CONFIG)
        try:
            for _ in range(50):
                assert await b.resolve(digest(made_up)) is False
            assert asked == [digest(made_up)]
            await a.create(CONFIG, Subscription(id="flood", primary_key=made))
            await _within(lambda: "flood" in b.stored, 1.0)
            assert await b.resolve(digest(made_up)) is False
            assert asked == [digest(made_up)] * 2  # asked again after the change
        finally:
            await a.close()
            await b.close()

    run(main())


def test_a_call_cancelled_while_waiting_its_turn_leaves_no_coroutine_behind(
    server: RedisProc,
) -> None:
    """A store call waits for the one before it; cancelled meanwhile (a close, a shutdown),
    its redis-py coroutine was made but never awaited, and the garbage collector said so
    ("coroutine 'Redis.execute_command' was never awaited", which failed a CI run). It is
    closed instead."""
    import gc
    import warnings

    async def main() -> None:
        store = RedisStore(server.url)
        try:
            await store._calls.acquire()  # another call under way
            waiting = asyncio.ensure_future(store.get("someone"))
            await asyncio.sleep(0.01)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            store._calls.release()
            assert await store.get("someone") is None  # the store still works
        finally:
            await store.close()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(main())
        gc.collect()
    assert not [w for w in caught if "never awaited" in str(w.message)]
