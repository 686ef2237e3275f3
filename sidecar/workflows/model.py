"""What a workflow is: its checked definition, and the state the store keeps of it.

Definitions are frozen and come only from `definitions.parse_*`; the state
(`Saga`, `Delivery`) is what the engine changes and the store writes, one
transition at a time. Both turn into plain JSON for the store and back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# Saga states and step statuses (SPEC "Workflows").
RUNNING = "running"
COMPLETED = "completed"
COMPENSATING = "compensating"
COMPENSATED = "compensated"
FAILED = "failed"
SAGA_STATES = (RUNNING, COMPLETED, COMPENSATING, COMPENSATED, FAILED)
ACTIVE_STATES = (RUNNING, COMPENSATING)

PENDING = "pending"
DONE = "done"
STEP_FAILED = "failed"
STEP_COMPENSATED = "compensated"

# Delivery statuses; a fan-out is `running` while any is pending, then
# `delivered` (all were) or `dead` (some are dead letters).
DELIVERED = "delivered"
DEAD = "dead"
FANOUT_STATES = (RUNNING, DELIVERED, DEAD)

SAGA = "saga"
FANOUT = "fanout"
# Finished and nobody needs to act: purged after `workflows.retention`.
# `failed` sagas and dead letters wait for a person.
PURGEABLE = ((SAGA, COMPLETED), (SAGA, COMPENSATED), (FANOUT, DELIVERED))


@dataclass(frozen=True, slots=True)
class Request:
    """One call a workflow makes; `path` and `body` may hold templates."""

    service: str
    method: str
    path: str
    body: Any = None  # JSON; None sends no body

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Request:
        return cls(doc["service"], doc["method"], doc["path"], doc.get("body"))


@dataclass(frozen=True, slots=True)
class StepDef:
    name: str
    action: Request
    compensation: Request | None = None


@dataclass(frozen=True, slots=True)
class SagaDef:
    name: str
    steps: tuple[StepDef, ...]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> SagaDef:
        return cls(
            name=doc["name"],
            steps=tuple(
                StepDef(
                    name=step["name"],
                    action=Request.from_json(step["action"]),
                    compensation=(Request.from_json(step["compensation"])
                                  if step.get("compensation") else None),
                )
                for step in doc["steps"]
            ),
        )


@dataclass(frozen=True, slots=True)
class FanoutDef:
    targets: tuple[str, ...]
    method: str
    path: str
    body: Any = None

    def request(self, target: str) -> Request:
        return Request(target, self.method, self.path, self.body)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> FanoutDef:
        return cls(tuple(doc["targets"]), doc["method"], doc["path"], doc.get("body"))


@dataclass(slots=True)
class StepState:
    """Where one step stands. `values` holds only what later templates take from
    its response (never the whole body); `failing_since` and `rounds` pace a
    compensation that keeps failing."""

    name: str
    status: str = PENDING
    attempts: int = 0
    compensation_attempts: int = 0
    last_reason: str | None = None
    values: dict[str, Any] = field(default_factory=dict)
    failing_since: float | None = None
    rounds: int = 0

    def view(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "attempts": self.attempts,
                "compensation_attempts": self.compensation_attempts,
                "last_reason": self.last_reason}


@dataclass(slots=True)
class Saga:
    """One saga instance as stored: its definition and its progress."""

    id: str
    definition: SagaDef
    steps: list[StepState]
    state: str = RUNNING
    trace: str | None = None  # the submitter's traceparent, or only a trace id
    created: float = 0.0
    next_at: float = 0.0

    @property
    def finished(self) -> bool:
        return self.state not in ACTIVE_STATES

    def progress_json(self) -> list[dict[str, Any]]:
        return [asdict(step) for step in self.steps]

    @staticmethod
    def steps_from_json(doc: list[dict[str, Any]]) -> list[StepState]:
        return [StepState(**step) for step in doc]

    def view(self) -> dict[str, Any]:
        """`GET /_sidecar/v1/sagas/{id}`: state, per step status and attempts, no bodies."""
        return {"id": self.id, "name": self.definition.name, "state": self.state,
                "steps": [step.view() for step in self.steps]}


@dataclass(slots=True)
class Delivery:
    """One fan-out target: at least once, then delivered or a dead letter."""

    id: str
    fanout: str
    target: str
    status: str = PENDING
    attempts: int = 0
    last_reason: str | None = None
    failing_since: float | None = None
    rounds: int = 0
    next_at: float = 0.0

    def view(self) -> dict[str, Any]:
        return {"status": self.status, "attempts": self.attempts}

    def dead_letter(self) -> dict[str, Any]:
        return {"id": self.id, "fanout": self.fanout, "target": self.target,
                "attempts": self.attempts, "last_reason": self.last_reason}


@dataclass(slots=True)
class Fanout:
    id: str
    definition: FanoutDef
    state: str = RUNNING
    trace: str | None = None
    created: float = 0.0

    @property
    def finished(self) -> bool:
        return self.state != RUNNING
