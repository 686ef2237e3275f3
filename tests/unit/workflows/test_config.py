"""The `workflows` and `audit.ship` sections: defaults, key paths, the reserved name."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.config import loader as config
from sidecar.config.settings import AuditShip, Backoff, Workflows
from sidecar.config.units import parse_duration
from sidecar.identity import keys


@pytest.fixture
def base(tmp_path: Path) -> dict[str, object]:
    keys.generate(service="a", out_dir=tmp_path)
    (tmp_path / "jwks.json").write_text(__import__("json").dumps(keys.merge_jwks([tmp_path])))
    return {
        "service": "a",
        "identity": {"private_key_file": str(tmp_path / "a.pem"),
                     "jwks_file": str(tmp_path / "jwks.json")},
        "services": {"collector": {"endpoints": ["http://127.0.0.1:9"]}},
    }


def errors_of(doc: dict[str, object]) -> list[str]:
    with pytest.raises(config.ConfigError) as caught:
        config.parse(doc)
    return caught.value.errors


def test_workflows_are_off_without_the_section_and_default_with_it(base) -> None:
    assert config.parse(base).workflows is None
    assert config.parse({**base, "workflows": None}).workflows == Workflows()
    assert Workflows().store == "sqlite:///var/lib/sidecar/workflows.db"
    assert Workflows().retention == 7 * 86400
    assert parse_duration("7d") == 7 * 86400


def test_the_spec_section_loads(base, tmp_path: Path) -> None:
    cfg = config.parse({**base, "workflows": {
        "store": "sqlite://wf/workflows.db", "max_steps": 5, "retention": "2h",
        "redelivery": {"base": "100ms", "max": "2s"}, "give_up_after": "10m",
    }}, base_dir=tmp_path)
    assert cfg.workflows == Workflows(store=f"sqlite://{tmp_path}/wf/workflows.db", max_steps=5,
                                      retention=7200, redelivery=Backoff(0.1, 2.0),
                                      give_up_after=600)
    pg = config.parse({**base, "workflows": {"store": "postgresql://mesh@db.local/wf"}})
    assert pg.workflows is not None and pg.workflows.store == "postgresql://mesh@db.local/wf"


def test_bad_workflow_settings_are_named_by_key_path(base) -> None:
    found = errors_of({**base, "workflows": {
        "store": "mysql://x/y", "max_steps": 0, "retention": "forever", "colour": "red",
        "redelivery": {"base": "2s", "max": "1s"},
    }})
    assert "workflows.store: must be sqlite://PATH or postgresql://user@host/db" in found
    assert "workflows.max_steps: must be from 1 to 1000" in found
    assert any(line.startswith("workflows.retention: ") for line in found)
    assert "workflows.colour: unknown key" in found
    assert "workflows.redelivery.max: must not be less than base" in found


def test_a_service_named_sidecar_is_refused(base) -> None:
    found = errors_of({**base, "services": {"_sidecar": {"endpoints": ["http://127.0.0.1:9"]}}})
    assert found == ["services._sidecar: '_sidecar' is reserved for the sidecar's own API"]


def test_audit_ship_loads_and_needs_a_collector_a_file_and_a_store(base) -> None:
    cfg = config.parse({**base, "workflows": {"store": "sqlite:///tmp/x.db"},
                        "audit": {"path": "/tmp/a.jsonl",
                                  "ship": {"service": "collector", "batch": 10,
                                           "interval": "250ms"}}})
    assert cfg.audit.ship == AuditShip(service="collector", path="/audit/records", batch=10,
                                       interval=0.25)
    found = errors_of({**base, "audit": {"ship": {"service": "nobody", "path": "/a/../b",
                                                  "batch": 0}}})
    assert "audit.ship.service: must be one of `services`" in found
    assert "audit.ship: needs audit.path: the records are read from it" in found
    assert any(line.startswith("audit.ship: needs a `workflows` section") for line in found)
    assert any(line.startswith("audit.ship.path: must be a plain path") for line in found)
    assert "audit.ship.batch: must be from 1 to 10000" in found
    assert errors_of({**base, "audit": {"ship": {}}})[0] == (
        "audit.ship.service: is required (the collector service)")


def test_the_store_password_is_redacted(base) -> None:
    cfg = config.parse({**base, "workflows": {"store": "postgresql://mesh:s3cret@db/wf"}})
    doc = config.redacted(cfg)
    assert doc["workflows"]["store"] == "postgresql://mesh:[redacted]@db/wf"
    assert "s3cret" not in str(doc)
