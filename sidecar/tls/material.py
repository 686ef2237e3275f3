"""This sidecar's TLS material as it is now: contexts, expiry, and reloading them.

`MeshTLS` builds the server and client contexts from the `tls` files and
swaps in new ones when the files change (`watch`, polling their stat) or on
SIGHUP (`reload`). New connections take the current context; open ones keep
the one they were made with, so a rotation drops no call. New files that do
not pass `check.problems` are refused whole and the old contexts stay. A CA
bundle may hold the old and the new CA while a rotation is under way.
"""

from __future__ import annotations

import datetime
import logging
import os
import ssl
from dataclasses import dataclass

from sidecar.clock import SYSTEM_CLOCK, Clock, rfc3339_ms
from sidecar.config.settings import TLS
from sidecar.names import spiffe_id
from sidecar.tls import certs, check
from sidecar.tls.contexts import MeshClientContext, client_context, server_context

log = logging.getLogger("sidecar.tls")

WATCH_INTERVAL = 1.0  # seconds between looks at the files' stat
WARN_EVERY = 86400.0  # the expiry warning repeats daily while it holds

Stamp = tuple[int, int, int, int]  # device, inode, mtime (ns), size: a replaced file changes one


def _stamp(path: str) -> Stamp | None:
    try:
        st = os.stat(path)  # follows symlinks: a Kubernetes Secret swaps its ..data link
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


def _epoch(moment: datetime.datetime) -> float:
    return moment.timestamp()


@dataclass(frozen=True, slots=True)
class Loaded:
    """One consistent set: both contexts and the dates they were built from."""

    server: ssl.SSLContext
    client: MeshClientContext
    not_after: float  # the certificate's, epoch seconds
    ca_not_after: float  # the earliest of the bundle's CAs


class MeshTLS:
    """The current contexts of one sidecar; `load` once at start, then `watch`."""

    def __init__(self, settings: TLS, *, service: str, trust_domain: str,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self.settings = settings
        self.service = service
        self.trust_domain = trust_domain
        self.spiffe_id = spiffe_id(trust_domain, service)
        self._clock = clock
        self._loaded: Loaded | None = None
        self._stamps: tuple[Stamp | None, ...] = ()
        self._warned: float | None = None

    @property
    def files(self) -> tuple[str, str, str]:
        s = self.settings
        assert s.ca_file and s.cert_file and s.key_file
        return s.ca_file, s.cert_file, s.key_file

    @property
    def current(self) -> Loaded:
        assert self._loaded is not None, "MeshTLS.load() comes first"
        return self._loaded

    @property
    def server(self) -> ssl.SSLContext:
        return self.current.server

    @property
    def client(self) -> MeshClientContext:
        return self.current.client

    def load(self) -> None:
        """Build the contexts from the files; ValueError, OSError or SSLError when they do not
        pass `check.problems` (dates aside: readiness reports those)."""
        self._stamps = tuple(_stamp(path) for path in self.files)
        problems = check.problems(self.settings, service=self.service,
                                  trust_domain=self.trust_domain, now=None)
        if problems:
            raise ValueError("; ".join(problems))
        ca_file, cert_file, _ = self.files
        leaf = certs.load_certificates(cert_file)[0]
        cas = [cert for cert in certs.load_certificates(ca_file) if certs.is_ca(cert)]
        self._loaded = Loaded(
            server=server_context(self.settings),
            client=client_context(self.settings, self.trust_domain),
            not_after=_epoch(leaf.not_valid_after_utc),
            ca_not_after=min(_epoch(ca.not_valid_after_utc) for ca in cas),
        )
        self._warned = None

    def stamps(self) -> tuple[Stamp | None, ...]:
        """What the files are now: a replaced, rewritten or moved file changes its stamp."""
        return tuple(_stamp(path) for path in self.files)

    def changed(self) -> bool:
        """Whether any of the files is not the one last read."""
        return self.stamps() != self._stamps

    def reload(self) -> bool:
        """Read the files again; on any problem keep the contexts in use and log why."""
        try:
            self.load()
        except (ValueError, OSError, ssl.SSLError) as exc:
            # check.problems words its findings as `tls.<key>: ...`; other errors by type.
            problem = str(exc) if isinstance(exc, ValueError) else type(exc).__name__
            log.error("new certificate files refused; the ones in use stay",
                      extra={"problem": problem})
            return False
        loaded = self.current
        log.info("certificates reloaded", extra={
            "spiffe_id": self.spiffe_id, "not_after": rfc3339_ms(loaded.not_after)})
        self.warn_if_expiring()
        return True

    def expiry(self) -> list[tuple[str, float]]:
        """Seconds left (negative once past) for the certificate and the earliest CA."""
        if self._loaded is None:
            return []
        now = self._clock.time()
        return [("certificate", self._loaded.not_after - now),
                ("ca", self._loaded.ca_not_after - now)]

    def not_ready(self) -> list[str]:
        """Why this sidecar cannot do mTLS now: an expired certificate or CA."""
        reasons = []
        for kind, left in self.expiry():
            if left <= 0:
                ends = rfc3339_ms(self._clock.time() + left)
                key = "cert_file" if kind == "certificate" else "ca_file"
                reasons.append(f"tls.{key}: the {kind} expired at {ends}; replace the file")
        return reasons

    def warn_if_expiring(self) -> None:
        """One warning when less than `expiry_warning` is left, again every day it still is."""
        soonest = min((left for _, left in self.expiry()), default=None)
        if soonest is None or soonest >= self.settings.expiry_warning:
            self._warned = None
            return
        now = self._clock.monotonic()
        if self._warned is not None and now - self._warned < WARN_EVERY:
            return
        self._warned = now
        kind, left = min(self.expiry(), key=lambda item: item[1])
        message = ("the certificate expires soon: issue a new one and replace the files"
                   if kind == "certificate" else
                   "the mesh CA expires soon: rotate it (deploy/README.md shows how)")
        log.warning(message, extra={"spiffe_id": self.spiffe_id,
                                    "not_after": rfc3339_ms(self._clock.time() + left),
                                    "days_left": round(left / 86400, 1)})

    async def watch(self, interval: float = WATCH_INTERVAL) -> None:
        """Forever: reload once changed files have settled, and warn while expiry is near.

        Settled: unchanged since the last look, so a certificate and its key
        written one after the other are read together, not as a mismatched pair.
        """
        self.warn_if_expiring()
        seen = self._stamps
        while True:
            await self._clock.sleep(interval)
            now = self.stamps()
            if now != self._stamps and now == seen:
                self.reload()
            seen = now
            self.warn_if_expiring()

