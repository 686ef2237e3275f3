"""The workflow store on both backends: a real SQLite file and a real PostgreSQL server.

Each `opener` test runs on both. What they show: an Idempotency-Key finds the
first instance; claims are exclusive, fenced and freed when their owner is
gone; fan-outs settle to delivered or dead; dead letters redrive; retention
purges only what nobody needs; the shipping cursor persists.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from sidecar.workflows import model
from sidecar.workflows.backends import open_store
from sidecar.workflows.model import Delivery, Fanout, FanoutDef, Request, Saga, SagaDef, StepDef
from sidecar.workflows.sqlite import StoreBusy
from sidecar.workflows.store import KeyReused, LostClaim, SqlStore, new_id

LEASE = 30.0
NOW = 1_700_000_000.0
Opener = Callable[[], Awaitable[SqlStore]]


@pytest.fixture
async def opener(store_url: str) -> AsyncIterator[Opener]:
    url = store_url
    opened: list[SqlStore] = []

    async def open_one() -> SqlStore:
        store = await open_store(url)
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        await store.close()


@pytest.fixture
async def pg_stores(pg_database: str) -> AsyncIterator[list[SqlStore]]:
    """Two replicas' stores on one PostgreSQL database."""
    stores = [await open_store(pg_database), await open_store(pg_database)]
    yield stores
    for store in stores:
        await store.close()


def saga(name: str = "encounter") -> Saga:
    definition = SagaDef(name, (StepDef("verify", Request("a", "POST", "/v")),))
    return Saga(id=new_id(), definition=definition, steps=[model.StepState("verify")],
                next_at=NOW)


def fanout(*targets: str) -> tuple[Fanout, list[Delivery]]:
    out = Fanout(id=new_id(), definition=FanoutDef(targets, "POST", "/events", {"k": 1}))
    return out, [Delivery(id=new_id(), fanout=out.id, target=t) for t in targets]


async def released(store: SqlStore, count: int) -> list[Saga]:
    """`count` sagas, made by `store` and handed back, all due at NOW."""
    made = [saga() for _ in range(count)]
    for one in made:
        await store.create_saga(one, key=None, now=NOW, lease=LEASE)
        await store.save_saga(one, now=NOW, release=True)
    return made


async def test_an_idempotency_key_finds_the_first_instance(opener: Opener) -> None:
    store = await opener()
    first = saga()
    assert await store.create_saga(first, key="k1", now=NOW, lease=LEASE) == (first.id, True)
    again = saga()
    assert await store.create_saga(again, key="k1", now=NOW, lease=LEASE) == (first.id, False)
    assert await store.saga(again.id) is None
    with pytest.raises(KeyReused):
        await store.create_saga(saga("other"), key="k1", now=NOW, lease=LEASE)
    loaded = await store.saga(first.id)
    assert loaded is not None and loaded.definition == first.definition
    assert await store.fanout(first.id) is None  # a saga's id is no fan-out's


async def test_claims_are_exclusive_fenced_and_released(opener: Opener) -> None:
    store = await opener()
    made = saga()
    await store.create_saga(made, key=None, now=NOW, lease=LEASE)
    # Made claimed by its creator: nobody takes it while the lease runs.
    assert await store.claim_sagas(now=NOW + 1, lease=LEASE, limit=10) == []
    made.steps[0].attempts = 1
    await store.save_saga(made, now=NOW + 1)
    # Handed back until later: due only at next_at.
    made.next_at = NOW + 100
    await store.save_saga(made, now=NOW + 2, release=True)
    assert await store.claim_sagas(now=NOW + 50, lease=LEASE, limit=10) == []
    claimed = await store.claim_sagas(now=NOW + 100, lease=LEASE, limit=10)
    assert [s.id for s in claimed] == [made.id] and claimed[0].steps[0].attempts == 1
    # Past its lease another owner may take it, and the old owner's writes are refused.
    mine, store.owner = store.owner, "sidecar-wf-another"
    assert [s.id for s in await store.claim_sagas(now=NOW + 131, lease=LEASE, limit=10)] == [
        made.id]
    store.owner = mine
    with pytest.raises(LostClaim):
        await store.save_saga(made, now=NOW + 132)


async def test_two_replicas_claiming_at_once_never_share_a_row(
        pg_stores: list[SqlStore]) -> None:
    made = await released(pg_stores[0], 40)
    taken: list[list[str]] = [[], []]

    async def drain(index: int) -> None:
        for _ in range(40):
            batch = await pg_stores[index].claim_sagas(now=NOW + 1, lease=LEASE, limit=3)
            taken[index] += [s.id for s in batch]
            if not batch:
                return

    await asyncio.gather(drain(0), drain(1))
    assert not set(taken[0]) & set(taken[1])
    assert sorted(taken[0] + taken[1]) == sorted(s.id for s in made)


async def test_claims_of_a_replica_that_is_gone_are_free_at_once(
        pg_database: str, pg_stores: list[SqlStore]) -> None:
    live, other = pg_stores
    gone = await open_store(pg_database)
    await gone.create_saga(saga(), key=None, now=NOW, lease=LEASE)
    await live.create_saga(saga(), key=None, now=NOW, lease=LEASE)
    await gone.close()  # its sessions end, as a killed process's would
    found: list[Saga] = []
    ends = time.monotonic() + 10
    while not found and time.monotonic() < ends:  # the backends exit a moment later
        found = await other.claim_sagas(now=NOW + 1, lease=LEASE, limit=10)
        await asyncio.sleep(0.05)
    # Well within the lease: the dead one's saga only; the live one keeps its own.
    assert len(found) == 1
    assert await other.claim_sagas(now=NOW + 1, lease=LEASE, limit=10) == []


async def test_a_second_process_on_one_sqlite_file_is_refused(tmp_path: Path) -> None:
    first = await open_store(f"sqlite://{tmp_path}/wf.db")
    try:
        with pytest.raises(StoreBusy):
            await open_store(f"sqlite://{tmp_path}/wf.db")
        await first.create_saga(saga(), key=None, now=NOW, lease=LEASE)
    finally:
        await first.close()
    # The next process frees what the last one held, at once.
    second = await open_store(f"sqlite://{tmp_path}/wf.db")
    try:
        assert len(await second.claim_sagas(now=NOW + 1, lease=LEASE, limit=10)) == 1
    finally:
        await second.close()


async def test_a_fanout_settles_and_its_dead_letters_redrive(opener: Opener) -> None:
    store = await opener()
    out, deliveries = fanout("a", "b")
    await store.create_fanout(out, deliveries, key="f1", now=NOW, lease=LEASE)
    first, second = deliveries
    first.status, first.attempts = model.DELIVERED, 1
    await store.save_delivery(first, now=NOW + 1)
    second.status, second.attempts, second.last_reason = model.DEAD, 7, "status_503"
    await store.save_delivery(second, now=NOW + 2)
    stored = await store.fanout(out.id)
    assert stored is not None
    assert stored[0].state == model.DEAD
    assert {d.target: d.status for d in stored[1]} == {"a": "delivered", "b": "dead"}
    letters = await store.dead_letters()
    assert [d.dead_letter() for d in letters] == [{
        "id": second.id, "fanout": out.id, "target": "b", "attempts": 7,
        "last_reason": "status_503"}]
    assert await store.redrive(first.id, now=NOW + 3) is None  # delivered: no dead letter
    again = await store.redrive(second.id, now=NOW + 3)
    assert again is not None and again.status == model.PENDING and again.attempts == 7
    assert await store.dead_letters() == []
    stored = await store.fanout(out.id)
    assert stored is not None and stored[0].state == model.RUNNING
    claimed = await store.claim_deliveries(now=NOW + 4, lease=LEASE, limit=10)
    assert [d.id for d in claimed] == [second.id]
    claimed[0].status = model.DELIVERED
    await store.save_delivery(claimed[0], now=NOW + 5)
    stored = await store.fanout(out.id)
    assert stored is not None and stored[0].state == model.DELIVERED


async def test_retention_purges_only_what_nobody_needs(opener: Opener) -> None:
    store = await opener()
    states = {}
    for state in (model.COMPLETED, model.COMPENSATED, model.FAILED, model.RUNNING):
        made = saga()
        await store.create_saga(made, key=None, now=NOW, lease=LEASE)
        made.state = state
        await store.save_saga(made, now=NOW + 10)
        states[state] = made.id
    out, deliveries = fanout("a")
    await store.create_fanout(out, deliveries, key=None, now=NOW, lease=LEASE)
    deliveries[0].status = model.DELIVERED
    await store.save_delivery(deliveries[0], now=NOW + 10)
    assert await store.purge(before=NOW + 5) == 0  # not old enough
    assert await store.purge(before=NOW + 20) == 3
    assert await store.saga(states[model.COMPLETED]) is None
    assert await store.saga(states[model.COMPENSATED]) is None
    assert await store.fanout(out.id) is None
    # A failed saga waits for a person; a running one is not finished.
    assert await store.saga(states[model.FAILED]) is not None
    assert await store.saga(states[model.RUNNING]) is not None
    counts = await store.counts()
    assert counts.by_state == {"saga": {"failed": 1, "running": 1}}
    assert counts.oldest_running == (states[model.RUNNING], NOW)


async def test_the_cursor_is_kept(opener: Opener) -> None:
    store = await opener()
    assert await store.cursor("audit") is None
    await store.set_cursor("audit", "12:abc")
    await store.set_cursor("audit", "40:def")
    assert await store.cursor("audit") == "40:def"
