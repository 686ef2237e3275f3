"""The engine: runs sagas and deliveries to the end, across crashes and replicas.

Write-ahead: every transition is committed to the store before the call it
leads to, so after a crash an action not known to have completed is sent
again, with the same `Idempotency-Key`, and the app deduplicates it. (A
step's success is committed together with the transition that follows it,
the next step's write-ahead or the saga's end, since no call comes between.) The
engine claims what it runs (see `store.py`); a poll every `POLL` seconds
picks up work that is due, work of a replica that died, and what this
process itself was running before a restart.

A saga step succeeds on 2xx. A 4xx other than 408, 425 and 429 fails the
saga at once; other failures are tried again, a short backoff apart, until
the service's `retry.attempts` are spent (the stack's own attempts count),
then the saga compensates: completed steps in reverse order, each
compensation tried until it succeeds, first a short backoff apart, then
`workflows.redelivery` apart for up to `give_up_after`, when the saga is
`failed` and a person must act (a log line and a metric say so). A
fan-out delivery is paced the same way, and ends delivered or a dead letter.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from sidecar.clock import Clock
from sidecar.config.settings import Backoff, Workflows
from sidecar.resilience.retry import backoff_delay
from sidecar.stack import Handler
from sidecar.tasks import TaskGroup
from sidecar.telemetry.metrics import Metrics
from sidecar.telemetry.tracing import Tracing
from sidecar.workflows import calls, crash, templating
from sidecar.workflows.model import (
    COMPENSATED,
    COMPENSATING,
    COMPLETED,
    DEAD,
    DELIVERED,
    DONE,
    FAILED,
    FANOUT,
    FANOUT_STATES,
    PENDING,
    RUNNING,
    SAGA,
    SAGA_STATES,
    STEP_COMPENSATED,
    STEP_FAILED,
    Delivery,
    Fanout,
    FanoutDef,
    Request,
    Saga,
    SagaDef,
    StepState,
)
from sidecar.workflows.store import LostClaim, SqlStore, new_id

log = logging.getLogger("sidecar.workflows")
T = TypeVar("T")

POLL = 0.5  # seconds between looks for due or abandoned work
RECOUNT = 10  # polls between two counts of the dead letters (the gauge)
MIN_LEASE = 30.0  # seconds a claim lasts unless renewed; see `lease_for`
MAX_RUNNING = 64  # sagas and deliveries run at once by one process
STORE_RETRY = 1.0  # seconds before a transition the store refused is tried again
MAX_WAIT = 60.0  # longest `?wait=` honoured
TEMPLATE_MISSING = "template_value_missing"
_CACHED_FANOUTS = 1024


def lease_for(longest_timeout: float) -> float:
    """A claim outlives any one call (a call's `timeout` bounds it) three times over."""
    return max(MIN_LEASE, 3 * longest_timeout)


def redelivery_delay(backoff: Backoff, rounds: int, rng: random.Random) -> float:
    """Exponential from `base`, capped at `max`, the upper half jittered."""
    ceiling = min(backoff.max, backoff.base * 2.0 ** min(rounds - 1, 62))
    return ceiling * (0.5 + rng.random() / 2)


@dataclass(frozen=True, slots=True)
class Submitted:
    id: str
    created: bool  # False: an earlier instance with the same Idempotency-Key


class Engine:
    """Runs the workflows of one sidecar process; `handler` is the outbound stack."""

    def __init__(self, *, store: SqlStore, handler: Handler, settings: Workflows, service: str,
                 tracing: Tracing, clock: Clock, lease: float = MIN_LEASE,
                 metrics: Metrics | None = None, rng: random.Random | None = None) -> None:
        self.store = store
        self.settings = settings
        self.dead_letters = 0
        self._handler = handler
        self._service = service
        self._tracing = tracing
        self._clock = clock
        self._lease = lease
        self._metrics = metrics
        self._rng = rng or random.Random()
        self._tasks = TaskGroup()
        self._runners = TaskGroup()
        self._running: set[str] = set()
        self._ended: dict[str, list[asyncio.Event]] = {}
        self._fanouts: dict[str, tuple[FanoutDef, str | None]] = {}
        self._wake = asyncio.Event()
        self._closing = False

    # ---- lifecycle

    async def start(self) -> None:
        self._tasks.start("workflows-poll", self._poll())
        self._tasks.start("workflows-renew", self._renew())
        self._tasks.start("workflows-purge", self._purge())

    async def close(self) -> None:
        """Stop: what is in flight resumes from the store after a restart (or elsewhere)."""
        self._closing = True
        await self._tasks.close()
        await self._runners.close()
        try:
            await self.store.release_all()
        except Exception as exc:  # the leases run out instead
            log.warning("workflow claims not released", extra={"error": type(exc).__name__})
        await self.store.close()

    # ---- submitting and reading

    async def submit_saga(self, definition: SagaDef, *, key: str | None,
                          trace: str | None) -> Submitted:
        now = self._clock.time()
        saga = Saga(id=new_id(), definition=definition,
                    steps=[StepState(step.name) for step in definition.steps], trace=trace,
                    created=now, next_at=now)
        id, created = await self.store.create_saga(saga, key=key, now=now, lease=self._lease)
        if created:
            self._start_saga(saga)
        return Submitted(id, created)

    async def submit_fanout(self, definition: FanoutDef, *, key: str | None,
                            trace: str | None) -> Submitted:
        now = self._clock.time()
        fanout = Fanout(id=new_id(), definition=definition, trace=trace, created=now)
        deliveries = [Delivery(id=new_id(), fanout=fanout.id, target=target, next_at=now)
                      for target in definition.targets]
        id, created = await self.store.create_fanout(fanout, deliveries, key=key, now=now,
                                                     lease=self._lease)
        if created:
            self._fanouts[fanout.id] = (definition, trace)
            for delivery in deliveries:
                self._start_delivery(delivery)
        return Submitted(id, created)

    async def redrive(self, id: str) -> Delivery | None:
        delivery = await self.store.redrive(id, now=self._clock.time())
        if delivery is not None:
            self.dead_letters = (await self.store.counts()).dead_letters
            self._wake.set()
        return delivery

    async def wait(self, id: str, seconds: float) -> Saga | None:
        """The saga once it has ended, or as it stands after `seconds` (at most MAX_WAIT)."""
        loop = asyncio.get_running_loop()
        ends = loop.time() + min(seconds, MAX_WAIT)
        ended = asyncio.Event()
        self._ended.setdefault(id, []).append(ended)
        try:
            while True:
                saga = await self.store.saga(id)
                left = ends - loop.time()
                if saga is None or saga.finished or left <= 0:
                    return saga
                # Woken when this process ends it; polled in case a replica does.
                try:
                    await asyncio.wait_for(ended.wait(), min(left, POLL))
                except TimeoutError:
                    pass
        finally:
            waiting = self._ended.get(id, [])
            waiting.remove(ended)
            if not waiting:
                self._ended.pop(id, None)

    async def state(self) -> dict[str, Any]:
        """For /admin/workflows: instances by state, dead letters, the oldest still running."""
        counts = await self.store.counts()
        oldest = None
        if counts.oldest_running is not None:
            id, created = counts.oldest_running
            oldest = {"id": id, "age_s": round(max(0.0, self._clock.time() - created), 3)}
        return {
            "sagas": {state: counts.by_state.get(SAGA, {}).get(state, 0) for state in SAGA_STATES},
            "fanouts": {state: counts.by_state.get(FANOUT, {}).get(state, 0)
                        for state in FANOUT_STATES},
            "dead_letters": counts.dead_letters,
            "oldest_running": oldest,
            "running_here": len(self._running),
        }

    # ---- background loops

    async def _poll(self) -> None:
        polls = 0
        while True:
            try:
                await self._claim()
                if polls % RECOUNT == 0:
                    self.dead_letters = (await self.store.counts()).dead_letters
                polls += 1
            except Exception as exc:
                log.error("workflow store unreachable; will retry",
                          extra={"error": type(exc).__name__})
            try:
                await asyncio.wait_for(self._wake.wait(), POLL)
            except TimeoutError:
                pass
            self._wake.clear()

    async def _claim(self) -> None:
        now = self._clock.time()
        free = MAX_RUNNING - len(self._running)
        if free > 0:
            for saga in await self.store.claim_sagas(now=now, lease=self._lease, limit=free):
                self._start_saga(saga)
        free = MAX_RUNNING - len(self._running)
        if free > 0:
            claimed = await self.store.claim_deliveries(now=now, lease=self._lease, limit=free)
            for delivery in claimed:
                self._start_delivery(delivery)

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self._lease / 3)
            try:
                await self.store.renew(now=self._clock.time(), lease=self._lease)
            except Exception as exc:
                log.error("workflow claims not renewed", extra={"error": type(exc).__name__})

    async def _purge(self) -> None:
        retention = self.settings.retention
        every = min(max(retention / 4, 0.5), 3600.0)
        while True:
            try:
                removed = await self.store.purge(before=self._clock.time() - retention)
                if removed:
                    log.info("finished workflows purged", extra={"count": removed})
            except Exception as exc:
                log.error("workflow purge failed", extra={"error": type(exc).__name__})
            await asyncio.sleep(every)

    # ---- sagas

    def _start(self, id: str, task: str, run: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run `run()` for `id` unless it runs here already (or the engine is stopping)."""
        if id in self._running or self._closing:
            return
        self._running.add(id)
        self._runners.start(f"{task} {id}", run())

    def _start_saga(self, saga: Saga) -> None:
        self._start(saga.id, "saga", functools.partial(self._run_saga, saga))

    async def _run_saga(self, saga: Saga) -> None:
        try:
            while not saga.finished and not self._closing:
                try:
                    step = self._act if saga.state == RUNNING else self._compensate
                    if await step(saga):
                        return  # handed back until `next_at`
                except LostClaim:
                    log.warning("saga taken over by another replica", extra={"workflow": saga.id})
                    return
                except Exception as exc:
                    log.error("saga transition failed; will retry",
                              extra={"workflow": saga.id, "error": type(exc).__name__})
                    saga = await self._reread(functools.partial(self.store.saga, saga.id), saga)
            if saga.finished:
                self._ending(saga.id)
        finally:
            self._running.discard(saga.id)

    async def _reread(self, read: Callable[[], Awaitable[T | None]], current: T) -> T:
        """What the store holds now, after a transition it may not have taken
        (tried again every STORE_RETRY until the store answers)."""
        while True:
            await self._clock.sleep(STORE_RETRY)
            try:
                stored = await read()
            except Exception:
                continue
            return stored if stored is not None else current

    async def _act(self, saga: Saga) -> bool:
        """Run the next pending action, or complete the saga."""
        index = next((i for i, step in enumerate(saga.steps) if step.status == PENDING), None)
        if index is None:
            saga.state = COMPLETED
            await self._save(saga)
            return False
        step, state = saga.definition.steps[index], saga.steps[index]
        try:
            request = templating.render(step.action, _values(saga))
        except templating.MissingValue:
            return await self._fail_step(saga, state, TEMPLATE_MISSING)
        state.attempts += 1
        await self._save(saga)  # write-ahead: this attempt is known before it is sent
        crash.reach(f"before-action:{step.name}")
        result = await self._send(saga, step.name, request, phase="action")
        crash.reach(f"after-action:{step.name}")
        state.attempts += max(result.attempts - 1, 0)
        if result.ok:
            state.status = DONE
            state.last_reason = None
            state.values = templating.extract(result.body, _wanted(saga, step.name))
            # Committed with the next transition, which comes before any other call
            # (the next step's write-ahead, or the end): one commit saved per step.
            self._count_step("done")
            return False
        state.last_reason = result.why
        if result.permanent or state.attempts >= result.retry.attempts:
            return await self._fail_step(saga, state, result.why)
        self._count_step("retried")
        await self._clock.sleep(backoff_delay(result.retry.backoff, state.attempts - 1, self._rng))
        return False

    async def _fail_step(self, saga: Saga, state: StepState, why: str) -> bool:
        state.status = STEP_FAILED
        state.last_reason = why
        saga.state = COMPENSATING
        await self._save(saga)
        self._count_step("failed")
        return False

    async def _compensate(self, saga: Saga) -> bool:
        """Undo the last completed step that has a compensation, or end compensated."""
        index = next((i for i in reversed(range(len(saga.steps)))
                      if saga.steps[i].status == DONE
                      and saga.definition.steps[i].compensation is not None), None)
        if index is None:
            saga.state = COMPENSATED
            await self._save(saga)
            return False
        step, state = saga.definition.steps[index], saga.steps[index]
        assert step.compensation is not None
        try:
            request = templating.render(step.compensation, _values(saga))
        except templating.MissingValue:
            return await self._needs_person(saga, state, TEMPLATE_MISSING)
        state.compensation_attempts += 1
        await self._save(saga)  # write-ahead
        crash.reach(f"before-compensation:{step.name}")
        result = await self._send(saga, step.name, request, phase="compensation")
        crash.reach(f"after-compensation:{step.name}")
        state.compensation_attempts += max(result.attempts - 1, 0)
        if result.ok:
            state.status = STEP_COMPENSATED
            state.failing_since = None
            self._count_step("compensated")  # committed with the next transition
            return False
        state.last_reason = result.why
        now = self._clock.time()
        state.failing_since = state.failing_since or now
        if result.permanent or now - state.failing_since >= self.settings.give_up_after:
            return await self._needs_person(saga, state, result.why)
        self._count_step("retried")
        if state.rounds == 0 and state.compensation_attempts < result.retry.attempts:
            delay = backoff_delay(result.retry.backoff, state.compensation_attempts - 1, self._rng)
            await self._clock.sleep(delay)
            return False
        state.rounds += 1
        saga.next_at = now + redelivery_delay(self.settings.redelivery, state.rounds, self._rng)
        await self._save(saga, release=True)
        return True

    async def _needs_person(self, saga: Saga, state: StepState, why: str) -> bool:
        state.last_reason = why
        saga.state = FAILED
        await self._save(saga)
        self._count_step("compensation_failed")
        log.error("saga failed: a compensation did not succeed; a person must act",
                  extra={"workflow": saga.id, "step": state.name, "reason": why})
        return False

    async def _send(self, saga: Saga, step: str, request: Request, *, phase: str
                    ) -> calls.Result:
        suffix = " compensation" if phase == "compensation" else ""
        return await calls.send(
            self._handler, request, key=f"{saga.id}:{step}:{phase}", source=self._service,
            workflow=saga.id, step=step, span_name=f"saga {saga.definition.name} {step}{suffix}",
            trace=saga.trace, tracing=self._tracing, clock=self._clock,
            want_body=phase == "action" and bool(_wanted(saga, step)))

    async def _save(self, saga: Saga, *, release: bool = False) -> None:
        await self.store.save_saga(saga, now=self._clock.time(), release=release)

    def _ending(self, id: str) -> None:
        for ended in self._ended.get(id, []):
            ended.set()

    def _count_step(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.workflow_step(outcome)

    # ---- fan-out deliveries

    def _start_delivery(self, delivery: Delivery) -> None:
        self._start(delivery.id, "delivery", functools.partial(self._run_delivery, delivery))

    async def _run_delivery(self, delivery: Delivery) -> None:
        try:
            while delivery.status == PENDING and not self._closing:
                try:
                    if await self._deliver(delivery):
                        return
                except LostClaim:
                    return
                except Exception as exc:
                    log.error("delivery transition failed; will retry",
                              extra={"workflow": delivery.fanout, "error": type(exc).__name__})
                    delivery = await self._reread(
                        functools.partial(self.store.delivery, delivery.id), delivery)
        finally:
            self._running.discard(delivery.id)

    async def _deliver(self, delivery: Delivery) -> bool:
        definition, trace = await self._fanout(delivery.fanout)
        delivery.attempts += 1
        await self._save_delivery(delivery)  # write-ahead
        crash.reach(f"before-delivery:{delivery.target}")
        result = await calls.send(
            self._handler, definition.request(delivery.target),
            key=f"{delivery.fanout}:{delivery.target}", source=self._service,
            workflow=delivery.fanout, step=delivery.target,
            span_name=f"fanout {delivery.target}", trace=trace, tracing=self._tracing,
            clock=self._clock, want_body=False)
        crash.reach(f"after-delivery:{delivery.target}")
        delivery.attempts += max(result.attempts - 1, 0)
        if result.ok:
            delivery.status = DELIVERED
            delivery.last_reason = None
            await self._save_delivery(delivery)
            self._count_delivery(delivery.target, "delivered")
            return False
        delivery.last_reason = result.why
        now = self._clock.time()
        delivery.failing_since = delivery.failing_since or now
        if result.permanent or now - delivery.failing_since >= self.settings.give_up_after:
            delivery.status = DEAD
            await self._save_delivery(delivery)
            self._count_delivery(delivery.target, "dead")
            self.dead_letters += 1
            log.warning("delivery gave up: a dead letter waits for a redrive",
                        extra={"workflow": delivery.fanout, "peer": delivery.target,
                               "reason": result.why})
            return False
        self._count_delivery(delivery.target, "retried")
        if delivery.rounds == 0 and delivery.attempts < result.retry.attempts:
            delay = backoff_delay(result.retry.backoff, delivery.attempts - 1, self._rng)
            await self._clock.sleep(delay)
            return False
        delivery.rounds += 1
        delivery.next_at = now + redelivery_delay(self.settings.redelivery, delivery.rounds,
                                                  self._rng)
        await self._save_delivery(delivery, release=True)
        return True

    async def _fanout(self, id: str) -> tuple[FanoutDef, str | None]:
        """A delivery's definition and trace, read once per fan-out."""
        cached = self._fanouts.get(id)
        if cached is not None:
            return cached
        found = await self.store.fanout(id)
        if found is None:
            raise LostClaim(id)  # purged meanwhile: nothing left to deliver
        if len(self._fanouts) >= _CACHED_FANOUTS:
            self._fanouts.clear()
        self._fanouts[id] = (found[0].definition, found[0].trace)
        return self._fanouts[id]

    async def _save_delivery(self, delivery: Delivery, *, release: bool = False) -> None:
        await self.store.save_delivery(delivery, now=self._clock.time(), release=release)

    def _count_delivery(self, peer: str, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.delivery(peer, outcome)


def _values(saga: Saga) -> dict[str, dict[str, Any]]:
    return {state.name: state.values for state in saga.steps}


def _wanted(saga: Saga, step: str) -> list[str]:
    """The fields of `step`'s response that some template of the saga takes."""
    fields: set[str] = set()
    for later in saga.definition.steps:
        for request in (later.action, later.compensation):
            if request is not None:
                fields.update(path for name, path in templating.references(request)
                              if name == step)
    return sorted(fields)

