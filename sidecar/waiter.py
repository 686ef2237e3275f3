"""`sidecar wait`: holds an app's entrypoint until its sidecar's outbound path is ready.

What Istio's `holdApplicationUntilProxyStarts` and Dapr's
`/v1.0/healthz/outbound` give their users: an app that calls out at start-up
must not race its sidecar. This polls `GET /readyz/outbound` on the admin port
with exponential backoff until it answers 200 or the time is up.

The poll is aiohttp-retry's, configured so that none of its defaults decide
anything: GET only, retried on 503 (not ready yet) and on a refused or timed
out connection (not listening yet), never on any other status, a fixed number
of attempts within the deadline, and every response it discards released.
The data path keeps its own retry layer (`resilience/retry.py`); see the README.
"""

from __future__ import annotations

import asyncio
import ipaddress

import aiohttp
from aiohttp_retry import ExponentialRetry, RetryClient

READY_PATH = "/readyz/outbound"
FIRST_DELAY = 0.05  # seconds before the second poll; each delay doubles
MAX_DELAY = 1.0  # seconds: a started sidecar is noticed within a second
POLL_TIMEOUT = 1.0  # seconds one poll may take: the admin port is on loopback
NOT_YET = frozenset({503})  # the admin port's answer until the outbound path is up


class _Backoff(ExponentialRetry):
    """aiohttp-retry's exponential backoff, releasing each response it retries after.

    aiohttp-retry drops a response that it retries after without releasing
    it, which holds its connection; `get_timeout` is handed exactly that
    response before the delay, so it is released here.
    """

    def __init__(self, *, attempts: int) -> None:
        super().__init__(
            attempts=attempts,
            start_timeout=FIRST_DELAY / 2,  # aiohttp-retry waits start * factor ** attempt
            max_timeout=MAX_DELAY,
            factor=2.0,
            statuses=set(NOT_YET),
            exceptions={aiohttp.ClientConnectionError, TimeoutError},
            methods={"GET"},
            retry_all_server_errors=False,  # a 500 is an answer, not "not yet"
        )
        self.last: str = "it did not answer"

    def get_timeout(self, attempt: int, response: aiohttp.ClientResponse | None = None) -> float:
        if response is None:
            self.last = "it did not answer"
        else:
            self.last = f"it answered {response.status}"
            response.release()
        return super().get_timeout(attempt, response)


def attempts_within(seconds: float) -> int:
    """How many polls the backoff makes in `seconds` (at least one)."""
    attempts, waited, delay = 1, 0.0, FIRST_DELAY
    while waited + delay <= seconds:
        waited += delay
        attempts += 1
        delay = min(delay * 2, MAX_DELAY)
    return attempts


def probe_host(host: str) -> str:
    """Where to reach a listener bound to `host`: loopback for a wildcard address."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if address.is_unspecified:
        return "::1" if address.version == 6 else "127.0.0.1"
    return host


async def wait_ready(admin: tuple[str, int], *, within: float) -> tuple[bool, str]:
    """Poll the admin port at `admin` until the outbound path is ready.

    (True, "") once it is; (False, why) after `within` seconds or on an answer
    other than 200 and 503.
    """
    host, port = probe_host(admin[0]), admin[1]
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    url = f"http://{authority}{READY_PATH}"
    backoff = _Backoff(attempts=attempts_within(within))
    # Never through a proxy: HTTP_PROXY may name the very sidecar being waited for.
    async with aiohttp.ClientSession(
        trust_env=False, timeout=aiohttp.ClientTimeout(total=POLL_TIMEOUT),
        connector=aiohttp.TCPConnector(force_close=True),
    ) as session:
        client = RetryClient(client_session=session, retry_options=backoff)
        try:
            async with asyncio.timeout(within):
                async with client.get(url, allow_redirects=False) as response:
                    if response.status == 200:
                        return True, ""
                    backoff.last = f"it answered {response.status}"
                    if response.status not in NOT_YET:
                        return False, (f"{url} answered {response.status}: is this the "
                                       "admin port of a sidecar that has /readyz/outbound?")
        except TimeoutError:
            pass
        except aiohttp.ClientError:
            backoff.last = "it did not answer"
    return False, (f"the sidecar's outbound path was not ready within {within:g}s "
                   f"({url}: {backoff.last})")
