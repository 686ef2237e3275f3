"""The outbound sidecar is never an open proxy: hostile targets through one real sidecar.

Loopback and metadata addresses in every spelling, unknown names and
userinfo tricks, as an absolute-form target, a Host header or a first path
segment: each is 404 `no_route` with no attempt made, audited `denied`, and
nothing connects to the canary listening on the loopback port the target
names. The sidecar dials only its configured endpoints (all on loopback
here), never a host from the request, so even a broken routing rule could
not send traffic off this machine; the canary proves it dials nothing else
either.

Redirects from an upstream go back to the app as they came, whether the
upstream is outside the mesh or behind a far sidecar.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web

from deploy.process import SidecarProcess
from tests.support.audit import read_records
from tests.support.hostile import Canary, audit_record_after, exchange, request
from tests.support.mesh import Mesh
from tests.support.upstream import Upstream

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(60)]

# `{port}` is the canary's: were anything dialled, it would be counted there.
LOOPBACK_SPELLINGS = [
    "127.0.0.1:{port}", "2130706433:{port}", "0x7f000001:{port}", "0x7f.0.0.1:{port}",
    "0177.0.0.1:{port}", "017700000001:{port}", "127.1:{port}", "127.0.0.2:{port}",
    "0.0.0.0:{port}", "0:{port}", "[::1]:{port}", "[::ffff:127.0.0.1]:{port}",
    "[::ffff:7f00:1]:{port}", "[0:0:0:0:0:0:0:1]:{port}", "localhost:{port}",
    "LOCALHOST:{port}", "localhost.:{port}", "127.0.0.1.nip.io:{port}",
]
METADATA_SPELLINGS = [
    "169.254.169.254", "169.254.169.254:80", "2852039166", "0xa9fea9fe", "0251.0376.0251.0376",
    "[::ffff:169.254.169.254]", "[fd00:ec2::254]", "metadata.google.internal",
    "metadata", "100.100.100.200",
]
UNKNOWN_NAMES = ["nowhere", "billing.evil.example", "billing-engine", "billinq", "billing.",
                 "*"]
# A URL's host is what follows the userinfo: `billing:80@nowhere` names nowhere.
USERINFO = ["billing@127.0.0.1:{port}", "billing:x@127.0.0.1:{port}",
            "billing:80@127.0.0.1:{port}", "billing:80@nowhere", "127.0.0.1:{port}@billing",
            "user@billing", "user:pass@billing"]


@dataclass(frozen=True)
class Case:
    name: str
    target: str  # the request-target; `{port}` is the canary's
    host: str = "localhost"

    def bytes_for(self, port: int) -> bytes:
        return request(self.target.format(port=port).encode(),
                       [], host=self.host.format(port=port).encode())


CASES = [
    # Absolute form: the target's host names the service, or nothing does.
    *[Case(f"absolute-{spelling}", f"http://{spelling}/latest/meta-data/")
      for spelling in LOOPBACK_SPELLINGS + METADATA_SPELLINGS + UNKNOWN_NAMES + USERINFO],
    # Absolute form naming an address, with a Host naming a service: the Host is ignored.
    Case("absolute-loopback-host-billing", "http://127.0.0.1:{port}/x", host="billing"),
    Case("absolute-unknown-host-billing", "http://nowhere/x", host="billing"),
    # Host header: names no service, and is not the sidecar itself.
    *[Case(f"host-{spelling}", "/latest/meta-data/", host=spelling)
      for spelling in LOOPBACK_SPELLINGS + METADATA_SPELLINGS + UNKNOWN_NAMES],
    *[Case(f"host-userinfo-{spelling}", "/x", host=spelling) for spelling in USERINFO],
    # The sidecar itself as Host, and an address or unknown name as the first segment.
    *[Case(f"segment-{spelling}", f"/{spelling}/latest/meta-data/")
      for spelling in LOOPBACK_SPELLINGS + METADATA_SPELLINGS + UNKNOWN_NAMES
      if "[" not in spelling],
    Case("segment-encoded-loopback", "/%31%32%37.0.0.1:{port}/x"),
]


@dataclass
class Site:
    a: SidecarProcess
    b: SidecarProcess
    outside: Upstream
    app_b: Upstream
    canary: Canary

    def audit(self) -> list[dict[str, Any]]:
        return read_records(self.a.audit_path)

    async def audited_after(self, count: int) -> dict[str, Any]:
        return await audit_record_after(self.a.audit_path, count)

    def received(self) -> int:
        return len(self.outside.seen) + len(self.app_b.seen)


async def redirect(request: web.Request) -> web.StreamResponse:
    """Answers `/redirect/<status>` with that status, pointing at the canary's `?to=`."""
    status = int(request.match_info["tail"].rpartition("/")[2])
    return web.Response(status=status, headers={"Location": request.query["to"]})


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def site(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Site]:
    mesh = Mesh(tmp_path_factory.mktemp("ssrf"), ["a", "b"])
    canary = await Canary().start()
    outside = await Upstream(script=redirect).start()
    app_b = await Upstream(script=redirect).start()
    b = mesh.sidecar("b", inbound={"app": app_b.url})
    a = mesh.sidecar("a", services={
        "billing": {"endpoints": [outside.url], "mesh": False, "retry": {"attempts": 1}},
        "b": {"endpoints": [b.inbound_url], "retry": {"attempts": 1}},
    })
    try:
        await b.start()
        await a.start()
        yield Site(a, b, outside, app_b, canary)
    finally:
        await mesh.stop()
        await outside.stop()
        await app_b.stop()
        await canary.stop()


@pytest.mark.parametrize("case", CASES, ids=[c.name.replace("{port}", "PORT") for c in CASES])
async def test_a_hostile_target_is_no_route_and_dials_nothing(site: Site, case: Case) -> None:
    received, audited = site.received(), len(site.audit())

    answer = await exchange(site.a.outbound, case.bytes_for(site.canary.port))

    assert (answer.status, answer.reason) == (404, "no_route"), answer.body
    assert answer.headers["x-sidecar-attempts"] == "0"
    assert site.received() == received, "an upstream received the call"
    assert site.canary.connections == 0, "the sidecar dialled the address in the request"
    record = await site.audited_after(audited)
    assert (record["decision"], record["reason"], record["target"]) == (
        "denied", "no_route", "unknown")


async def test_a_known_absolute_target_wins_over_a_host_naming_an_address(site: Site) -> None:
    seen = len(site.outside.seen)
    data = request(b"http://billing/redirect/200?to=/", [],
                   host=f"127.0.0.1:{site.canary.port}".encode())
    answer = await exchange(site.a.outbound, data)
    assert answer.status == 200
    assert len(site.outside.seen) == seen + 1
    assert site.canary.connections == 0


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("service", ["billing", "b"])
async def test_redirects_go_back_to_the_app_as_they_came(
    site: Site, service: str, status: int
) -> None:
    upstream = site.outside if service == "billing" else site.app_b
    seen = len(upstream.seen)
    location = f"{site.canary.url}/latest/meta-data/"
    target = f"/{service}/redirect/{status}?to={location}".encode()

    answer = await exchange(site.a.outbound, request(target, [], method=b"POST"))

    assert answer.status == status
    assert answer.headers["location"] == location
    assert answer.headers["x-sidecar-attempts"] == "1"
    assert len(upstream.seen) == seen + 1, "the redirect was followed"
    assert site.canary.connections == 0
