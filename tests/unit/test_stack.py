"""What every layer shares: the call's body."""

from __future__ import annotations

from sidecar.stack import Body


async def test_body_watchers_see_reading_begin_and_end() -> None:
    async def stream():
        yield b"a"
        yield b"b"

    events: list[str] = []
    body = Body(stream=stream())
    body.watch(lambda: events.append("start"), lambda: events.append("end"))
    assert events == []
    assert b"".join([chunk async for chunk in body.payload()]) == b"ab"  # type: ignore[union-attr]
    assert events == ["start", "end"]
    done = Body(data=b"x")
    done.watch(lambda: events.append("never"), lambda: events.append("never"))
    assert events == ["start", "end"]
