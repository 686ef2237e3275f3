import hashlib
import itertools
import json
from pathlib import Path
from typing import Any

import pytest

import sidecar.audit.log as audit_module
from sidecar.audit.log import GENESIS, AuditLog, verify_file
from sidecar.clock import FakeClock

SPEC_FIELDS = {
    "ts", "direction", "source", "target", "method", "route", "status", "decision",
    "reason", "duration_ms", "attempts", "trace_id", "prev_hash", "hash",
    "tls", "peer_id",  # SPEC "Encryption in transit"
}  # fmt: skip


def call(log: AuditLog, n: int = 0, **override: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "direction": "inbound",
        "source": "healthcare-api",
        "target": "billing-engine",
        "method": "POST",
        "route": "/claims/{id}",
        "status": 200,
        "decision": "allowed",
        "reason": None,
        "duration_ms": 12.5,
        "attempts": 1,
        "trace_id": f"{n:032x}",
    }
    fields.update(override)
    return log.record(**fields)


def files_in(directory: Path) -> list[Path]:
    return list(directory.iterdir())


def lines_of(path: Path) -> list[str]:
    return path.read_text("utf-8").splitlines()


async def write_records(path: Path, count: int, clock: FakeClock | None = None) -> list[dict]:
    log = AuditLog(path, clock=clock or FakeClock())
    await log.start()
    records = [call(log, n) for n in range(count)]
    await log.close()
    return records


async def test_records_are_chained_and_written(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    records = await write_records(path, 4)
    assert records[0]["prev_hash"] == GENESIS
    for before, after in itertools.pairwise(records):
        assert after["prev_hash"] == before["hash"]
    assert [json.loads(line) for line in lines_of(path)] == records
    assert verify_file(path) == (True, None, "intact: 4 records")


async def test_record_has_exactly_the_spec_fields(tmp_path: Path) -> None:
    log = AuditLog(None)
    entry = call(log, reason="policy_denied", decision="denied", status=403)
    assert set(entry) == SPEC_FIELDS
    assert entry["reason"] == "policy_denied"
    assert entry["decision"] == "denied"


async def test_hash_is_spec_serialisation(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    await write_records(path, 1)
    stored = json.loads(lines_of(path)[0])
    without = {k: v for k, v in stored.items() if k != "hash"}
    text = json.dumps(without, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert " " not in text
    assert stored["hash"] == hashlib.sha256(text.encode("utf-8")).hexdigest()


async def test_hash_keeps_non_ascii_as_utf8() -> None:
    entry = call(AuditLog(None), target="tjänst")
    without = {k: v for k, v in entry.items() if k != "hash"}
    text = json.dumps(without, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert "tjänst" in text
    assert entry["hash"] == hashlib.sha256(text.encode("utf-8")).hexdigest()


async def test_timestamp_is_rfc3339_utc_with_milliseconds() -> None:
    clock = FakeClock(wall=1_700_000_000.0)
    log = AuditLog(None, clock=clock)
    assert call(log)["ts"] == "2023-11-14T22:13:20.000Z"
    clock.advance(61.2345)
    assert call(log)["ts"] == "2023-11-14T22:14:21.234Z"


async def test_chain_continues_after_reopening(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    first = await write_records(path, 3)
    second = await write_records(path, 2)
    assert second[0]["prev_hash"] == first[-1]["hash"]
    assert len(lines_of(path)) == 5
    assert verify_file(path) == (True, None, "intact: 5 records")


async def test_empty_existing_file_starts_a_new_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"")
    records = await write_records(path, 1)
    assert records[0]["prev_hash"] == GENESIS


async def test_last_line_without_newline_is_continued_on_a_new_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    first = await write_records(path, 2)
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    second = await write_records(path, 1)
    assert second[0]["prev_hash"] == first[-1]["hash"]
    assert verify_file(path) == (True, None, "intact: 3 records")


async def test_torn_last_line_is_reported_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    await write_records(path, 2)
    with path.open("ab") as f:
        f.write(b'{"ts":"2024-')  # a crash mid-write
    await write_records(path, 1)
    assert len(lines_of(path)) == 4
    assert verify_file(path)[:2] == (False, 3)


async def test_long_last_line_is_found_across_read_chunks(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    first = await write_records(path, 2)
    log = AuditLog(path)
    await log.start()
    long = call(log, route="/" + "a" * 10_000)
    await log.close()
    assert long["prev_hash"] == first[-1]["hash"]
    second = await write_records(path, 1)
    assert second[0]["prev_hash"] == long["hash"]


async def test_start_creates_parent_directories(tmp_path: Path) -> None:
    path = tmp_path / "var" / "log" / "sidecar" / "audit.jsonl"
    await write_records(path, 1)
    assert len(lines_of(path)) == 1


async def test_close_flushes_every_record(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    await log.start()
    records = [call(log, n) for n in range(5000)]
    await log.close()
    lines = lines_of(path)
    assert len(lines) == 5000
    assert json.loads(lines[-1]) == records[-1]
    assert verify_file(path) == (True, None, "intact: 5000 records")


async def test_flush_writes_what_was_recorded(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    await log.start()
    entry = call(log)
    await log.flush()
    assert json.loads(lines_of(path)[0]) == entry
    await log.close()


async def test_record_after_close_is_still_written_in_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    await log.start()
    call(log, 1)
    await log.close()
    call(log, 2)
    assert verify_file(path) == (True, None, "intact: 2 records")


async def test_record_before_start_is_a_programming_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        call(AuditLog(tmp_path / "audit.jsonl"))


async def test_disabled_log_returns_records_and_writes_nothing(tmp_path: Path) -> None:
    log = AuditLog(None)
    await log.start()
    first, second = call(log), call(log)
    await log.close()
    assert second["prev_hash"] == first["hash"]
    assert files_in(tmp_path) == []


async def test_failed_write_is_retried_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit.jsonl"
    real_write = audit_module._write_all
    failures = [OSError(28, "No space left on device")]

    def flaky_write(fd: int, data: bytes) -> None:
        if failures:
            raise failures.pop()
        real_write(fd, data)

    monkeypatch.setattr(audit_module, "_write_all", flaky_write)
    log = AuditLog(path, clock=FakeClock())
    await log.start()
    call(log, 1)
    call(log, 2)
    with pytest.raises(OSError):
        await log.flush()
    assert path.read_bytes() == b""
    call(log, 3)
    await log.close()
    assert verify_file(path) == (True, None, "intact: 3 records")


async def test_full_queue_drops_and_counts(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, max_queued=2)
    await log.start()
    call(log, 1)
    call(log, 2)
    call(log, 3)
    assert log.dropped == 1
    await log.close()
    assert verify_file(path) == (True, None, "intact: 2 records")


# verify_file


async def chained_file(tmp_path: Path, count: int = 4) -> Path:
    path = tmp_path / "audit.jsonl"
    await write_records(path, count)
    return path


def rewrite(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), "utf-8")


async def test_verify_detects_an_edited_line(tmp_path: Path) -> None:
    path = await chained_file(tmp_path)
    lines = lines_of(path)
    lines[1] = lines[1].replace('"status":200', '"status":201')
    rewrite(path, lines)
    ok, line, message = verify_file(path)
    assert (ok, line) == (False, 2)
    assert message.startswith("line 2:")


async def test_verify_detects_a_rehashed_edit_by_its_broken_link(tmp_path: Path) -> None:
    path = await chained_file(tmp_path)
    lines = lines_of(path)
    edited = json.loads(lines[1])
    edited["status"] = 201
    edited["hash"] = audit_module.digest(edited)
    lines[1] = json.dumps(edited)
    rewrite(path, lines)
    assert verify_file(path)[:2] == (False, 3)


async def test_verify_detects_a_deleted_line(tmp_path: Path) -> None:
    path = await chained_file(tmp_path)
    lines = lines_of(path)
    del lines[1]
    rewrite(path, lines)
    assert verify_file(path)[:2] == (False, 2)


async def test_verify_detects_a_deleted_first_line(tmp_path: Path) -> None:
    path = await chained_file(tmp_path)
    rewrite(path, lines_of(path)[1:])
    assert verify_file(path)[:2] == (False, 1)


async def test_verify_detects_reordered_lines(tmp_path: Path) -> None:
    path = await chained_file(tmp_path)
    lines = lines_of(path)
    lines[2], lines[3] = lines[3], lines[2]
    rewrite(path, lines)
    assert verify_file(path)[:2] == (False, 3)


@pytest.mark.parametrize("junk", ["not json", "[1, 2]", "", '{"a": 1}'])
async def test_verify_detects_a_line_that_is_not_a_record(tmp_path: Path, junk: str) -> None:
    path = await chained_file(tmp_path)
    lines = lines_of(path)
    lines.insert(2, junk)
    rewrite(path, lines)
    assert verify_file(path)[:2] == (False, 3)


async def test_verify_empty_and_missing_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert verify_file(empty) == (True, None, "intact: 0 records")
    ok, line, message = verify_file(tmp_path / "missing.jsonl")
    assert (ok, line) == (False, None)
    assert "cannot read" in message


async def test_reopen_after_rotation_starts_a_new_verified_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, clock=FakeClock())
    await log.start()
    for _ in range(3):
        log.record(**_FIELDS_FOR_ROTATION)
    await log.flush()
    rotated = tmp_path / "audit.jsonl.1"
    path.rename(rotated)
    log.record(**_FIELDS_FOR_ROTATION)  # still bound for the old file
    await log.reopen()
    for _ in range(2):
        log.record(**_FIELDS_FOR_ROTATION)
    await log.close()
    assert len(rotated.read_text().splitlines()) == 4
    assert len(path.read_text().splitlines()) == 2
    assert verify_file(rotated)[0] and verify_file(path)[0]
    # Reopening the same file just continues its chain.
    again = AuditLog(path, clock=FakeClock())
    await again.start()
    await again.reopen()
    again.record(**_FIELDS_FOR_ROTATION)
    await again.close()
    assert verify_file(path) == (True, None, "intact: 3 records")


_FIELDS_FOR_ROTATION = dict(
    direction="inbound", source="a", target="b", method="GET", route="/claims/{id}",
    status=200, decision="allowed", reason=None, duration_ms=1.0, attempts=1,
    trace_id="ab" * 16,
)
