"""Processes of a local mesh: the one harness of the tests, `make bench` and `make demo`.

`SidecarProcess` is one `python -m sidecar run -c FILE`: it writes its config
(listen addresses and audit path filled in when the config leaves them out),
starts, waits until its admin port answers, picks new ports and starts again
when one was taken meanwhile, and takes signals. `Process` is what it shares
with any other child, such as an example app: a session (process group) of its
own, so a Ctrl-C at the terminal reaches only the driver and `stop`/`kill` end
the whole group; output in files; an environment without proxies or
inherited OTEL_* settings. `KeyRing` is the key material a mesh's configs name.

`deploy.mesh` builds the example mesh of `make demo` on these, the bench its
two sidecars, and `tests.support.mesh` the integration tests' meshes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from sidecar.identity import keys
from sidecar.tls import certs

ROOT = Path(__file__).resolve().parents[1]
READY_WITHIN = 30.0  # seconds a sidecar gets to answer its readiness probe
STOP_WITHIN = 15.0  # seconds a process gets after SIGTERM before SIGKILL
POLL = 0.05  # seconds between looks at a starting or stopping process
PORT_ATTEMPTS = 4  # starts of a sidecar whose ports were taken between choice and bind
LOG_TAIL = 4000  # characters of each output file that an error message quotes
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=10)
# Never inherited by the mesh's processes: a proxy would carry their traffic
# (the OTLP exporter honours HTTP_PROXY) somewhere this machine does not own.
PROXY_VARIABLES = frozenset({"http_proxy", "https_proxy", "all_proxy", "no_proxy"})
# Below the kernel's ephemeral range (32768-60999 by default), so a port
# chosen here is not taken meanwhile as the source port of some connection.
PORT_RANGE = (20000, 32000)


def free_ports(count: int) -> list[int]:
    """`count` distinct ports that were free on 127.0.0.1 a moment ago."""
    held: list[socket.socket] = []
    try:
        # Held open together, so no port is handed out twice.
        for _ in range(count * 50):
            if len(held) == count:
                break
            sock = socket.socket()
            try:
                sock.bind(("127.0.0.1", random.randrange(*PORT_RANGE)))
            except OSError:
                sock.close()
                continue
            held.append(sock)
        if len(held) < count:
            raise RuntimeError("not enough free ports on 127.0.0.1")
        return [int(sock.getsockname()[1]) for sock in held]
    finally:
        for sock in held:
            sock.close()


def free_port() -> int:
    return free_ports(1)[0]


def loopback_url(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def loopback_listen(*, outbound: int, inbound: int, admin: int) -> dict[str, str]:
    """A config's `listen` section: the three listeners on 127.0.0.1."""
    return {
        "outbound": f"127.0.0.1:{outbound}",
        "inbound": f"127.0.0.1:{inbound}",
        "admin": f"127.0.0.1:{admin}",
    }


def child_env(base: Mapping[str, str], extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a mesh process: no proxies, no inherited OTEL_* or *_URL."""
    env = {
        name: value
        for name, value in base.items()
        if name.lower() not in PROXY_VARIABLES
        and not name.startswith("OTEL_")
        and not name.endswith("_URL")  # the apps read <SERVICE>_URL as an upstream address
    }
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), base.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def loopback_session() -> aiohttp.ClientSession:
    """A client for this machine's loopback: no proxies, no pooled connections."""
    connector = aiohttp.TCPConnector(force_close=True)
    return aiohttp.ClientSession(connector=connector, timeout=REQUEST_TIMEOUT, trust_env=False)


@dataclass(frozen=True, slots=True)
class KeyRing:
    """A key pair per service and one JWKS of all their public keys, under `workdir`."""

    workdir: Path
    algorithm: str = "EdDSA"

    @property
    def keys_dir(self) -> Path:
        return self.workdir / "keys"

    @property
    def jwks_path(self) -> Path:
        return self.workdir / "jwks.json"

    def private_key(self, service: str) -> Path:
        return self.keys_dir / f"{service}.pem"

    def generate(self, services: Iterable[str]) -> KeyRing:
        """The key pairs and the JWKS, made in this process as `sidecar keygen` and `jwks` do."""
        self.keys_dir.mkdir(parents=True, exist_ok=True)
        for service in services:
            keys.generate(service=service, out_dir=self.keys_dir, algorithm=self.algorithm)
        self.jwks_path.write_text(json.dumps(keys.merge_jwks([self.keys_dir])))
        return self

    def identity(self, service: str) -> dict[str, Any]:
        """The `identity` section of `service`'s config."""
        return {
            "algorithm": self.algorithm,
            "private_key_file": str(self.private_key(service)),
            "jwks_file": str(self.jwks_path),
        }


@dataclass(frozen=True, slots=True)
class CertRing:
    """A mesh CA and a certificate per service, as `sidecar certs` makes them; `tls` is the
    config section that names them.

    The CA itself lives in `ca_dir`; the sidecars read the bundle `ca_file`,
    which holds it (and, during a rotation, the next CA too). Files are
    replaced by rename, as a Kubernetes Secret or an atomic deploy does.
    """

    workdir: Path
    trust_domain: str = "mesh.test"

    @property
    def certs_dir(self) -> Path:
        return self.workdir / "certs"

    @property
    def ca_dir(self) -> Path:
        return self.workdir / "ca"

    @property
    def next_ca_dir(self) -> Path:
        """Where a rotation makes the CA that replaces the one in `ca_dir`."""
        return self.workdir / "next-ca"

    @property
    def ca_file(self) -> Path:
        return self.certs_dir / "mesh-ca.pem"

    def cert_file(self, service: str) -> Path:
        return self.certs_dir / f"{service}.crt"

    def key_file(self, service: str) -> Path:
        return self.certs_dir / f"{service}.key"

    def generate(self, services: Iterable[str]) -> CertRing:
        certs.make_ca(self.ca_dir)
        self.certs_dir.mkdir(parents=True, exist_ok=True)
        self.trust(self.ca_dir)
        for service in services:
            self.issue(service)
        return self

    def issue(self, service: str, *, ca_dir: Path | None = None,
              **options: Any) -> tuple[Path, Path]:
        """A (new) certificate for `service` from the CA in `ca_dir` (the mesh CA unless
        given), in place of its files: the key first, then the certificate."""
        fresh = self.workdir / "issuing"
        cert, key = certs.issue(ca_dir or self.ca_dir, service=service,
                                trust_domain=self.trust_domain, out_dir=fresh, overwrite=True,
                                **options)
        os.replace(key, self.key_file(service))
        os.replace(cert, self.cert_file(service))
        return self.cert_file(service), self.key_file(service)

    def trust(self, *ca_dirs: Path) -> None:
        """Make the bundle the CAs of `ca_dirs`, in one rename."""
        staged = self.workdir / "bundle.pem"
        staged.write_bytes(b"".join((d / certs.CA_FILE).read_bytes() for d in ca_dirs))
        os.replace(staged, self.ca_file)

    def begin_ca_rotation(self) -> None:
        """Step 1 of 3: a new CA, trusted beside the old one."""
        certs.make_ca(self.next_ca_dir, overwrite=True)
        self.trust(self.ca_dir, self.next_ca_dir)

    # Step 2 of 3: `issue(service, ca_dir=next_ca_dir)` for every service.

    def finish_ca_rotation(self) -> None:
        """Step 3 of 3: only the new CA is trusted, and it becomes the mesh CA."""
        self.trust(self.next_ca_dir)
        for name in (certs.CA_FILE, certs.CA_KEY):
            os.replace(self.next_ca_dir / name, self.ca_dir / name)

    def tls(self, service: str, mode: str = "strict") -> dict[str, Any]:
        """The `tls` section of `service`'s config (the top-level `trust_domain` goes with it)."""
        return {"mode": mode, "ca_file": str(self.ca_file),
                "cert_file": str(self.cert_file(service)), "key_file": str(self.key_file(service))}


class ProcessError(RuntimeError):
    """A process failed, exited early or never became ready; the message ends with its output."""


class PortTaken(ProcessError):
    """The sidecar could not bind one of its ports."""


class Process:
    """One child process in a session (process group) of its own, its output in files.

    `env` holds what the child gets on top of `child_env(os.environ)`; it may be
    changed until `spawn`. Without `stderr_path`, stderr goes to `stdout_path`.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        stdout_path: Path,
        stderr_path: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.stdout_path = stdout_path
        self.stderr_path = stderr_path
        self.env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self) -> None:
        """Start the process and return at once; its output is appended to the files."""
        with contextlib.ExitStack() as files:
            stdout = files.enter_context(self.stdout_path.open("ab"))
            stderr = (
                files.enter_context(self.stderr_path.open("ab"))
                if self.stderr_path is not None
                else subprocess.STDOUT
            )
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                env=child_env(os.environ, self.env),
                cwd=ROOT,
                start_new_session=True,
            )

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check(self) -> None:
        """ProcessError, with the end of its output, if the process has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise ProcessError(f"{self.name} exited with {self.proc.returncode}; {self.logs()}")

    def signal(self, signum: signal.Signals) -> None:
        """`signum` to the whole group (the process leads its own, being a new session)."""
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    # `timeout`, not `within`, as the tests have always called it.
    async def wait_exit(self, timeout: float = STOP_WITHIN) -> int:  # noqa: ASYNC109
        """The exit code; TimeoutError if the process still runs after `timeout` seconds."""
        assert self.proc is not None
        ends = time.monotonic() + timeout
        # Polled: a thread blocked in wait() would hold up the loop's exit after a Ctrl-C.
        while self.proc.poll() is None:
            if time.monotonic() >= ends:
                raise TimeoutError(f"{self.name} did not exit within {timeout:.0f}s")
            await asyncio.sleep(POLL)
        return self.proc.returncode

    async def stop(self, within: float = STOP_WITHIN) -> int | None:
        """SIGTERM, wait up to `within` seconds, then SIGKILL; the exit code (None: never ran)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await self.wait_exit(within)
        # The group too, even after a clean exit: nothing the process started may outlive it.
        self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the whole group at once and reap it; for clean-up after errors."""
        if self.proc is None:
            return
        self.signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)

    def logs(self, chars: int = LOG_TAIL) -> str:
        """The last `chars` characters of each output file, each headed by its path."""
        parts = []
        for path in (self.stdout_path, self.stderr_path):
            if path is None:
                continue
            try:
                text = path.read_text(errors="replace")
            except OSError:
                text = ""
            parts.append(f"--- {path}\n{text[-chars:]}")
        return "\n".join(parts)

    def forget_output(self) -> None:
        """Remove the output files, so that the next start's output is read alone."""
        for path in (self.stdout_path, self.stderr_path):
            if path is not None:
                path.unlink(missing_ok=True)


class SidecarProcess(Process):
    """One `python -m sidecar run -c FILE`, with its config file, ports and readiness probe.

    `config` may be changed until `start` or the next `write_config`. Without
    `ports` it gets three free loopback ports, and a `listen` section naming
    them unless `config` has one. `prefix` comes before the command (such as
    `ip netns exec NS`); `session` makes the client of the readiness probe
    (`ready_path` on the admin port), for sidecars in another network.
    """

    def __init__(
        self,
        name: str,
        config: dict[str, Any],
        *,
        config_path: Path,
        audit_path: Path,
        stdout_path: Path,
        stderr_path: Path | None = None,
        ports: tuple[int, int, int] | None = None,
        prefix: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        ready_path: str = "/healthz",
        session: Callable[[], aiohttp.ClientSession] = loopback_session,
    ) -> None:
        command = [sys.executable, "-m", "sidecar", "run", "-c", str(config_path)]
        super().__init__(
            name, [*prefix, *command], stdout_path=stdout_path, stderr_path=stderr_path, env=env
        )
        self.config = config
        self.config_path = config_path
        self.audit_path = audit_path
        self.outbound, self.inbound, self.admin = ports or free_ports(3)
        self.ready_path = ready_path
        self.session = session

    @classmethod
    def in_dir(cls, name: str, config: dict[str, Any], workdir: Path) -> SidecarProcess:
        """Free loopback ports; the files `workdir/<name>.yaml`, `-audit.jsonl`, `.out`, `.err`."""
        return cls(
            name,
            config,
            config_path=workdir / f"{name}.yaml",
            audit_path=workdir / f"{name}-audit.jsonl",
            stdout_path=workdir / f"{name}.out",
            stderr_path=workdir / f"{name}.err",
        )

    @property
    def outbound_url(self) -> str:
        return loopback_url(self.outbound)

    @property
    def inbound_url(self) -> str:
        return loopback_url(self.inbound)

    @property
    def admin_url(self) -> str:
        return loopback_url(self.admin)

    def write_config(self) -> None:
        """`config` as YAML at `config_path`, with the listen and audit sections it leaves out."""
        doc = dict(self.config)
        ports = {"outbound": self.outbound, "inbound": self.inbound, "admin": self.admin}
        doc.setdefault("listen", loopback_listen(**ports))
        doc.setdefault("audit", {"path": str(self.audit_path)})
        self.config_path.write_text(yaml.safe_dump(doc, sort_keys=False))

    async def start(
        self, within: float = READY_WITHIN, *, watch: Sequence[Process] = ()
    ) -> SidecarProcess:
        """Write the config, spawn, and `wait_ready`.

        When the sidecar could not bind a port it chose (another process took it
        between choosing and binding), it starts again on new ports.
        """
        attempts = 1 if "listen" in self.config else PORT_ATTEMPTS
        for _ in range(attempts - 1):
            try:
                return await self._start_once(within, watch)
            except PortTaken:
                self.forget_output()
                self.outbound, self.inbound, self.admin = free_ports(3)
        return await self._start_once(within, watch)

    async def _start_once(self, within: float, watch: Sequence[Process]) -> SidecarProcess:
        self.write_config()
        self.spawn()
        await self.wait_ready(within, watch=watch)
        return self

    def check(self) -> None:
        """As `Process.check`, but PortTaken when the sidecar exited unable to bind."""
        try:
            super().check()
        except ProcessError as exc:
            if "address already in use" in self.logs():
                raise PortTaken(str(exc)) from None
            raise

    async def wait_ready(
        self, within: float = READY_WITHIN, *, watch: Sequence[Process] = ()
    ) -> None:
        """Until `ready_path` on the admin port answers 200.

        ProcessError (PortTaken when it could not bind) if this sidecar, or a
        process in `watch` such as its app, exits first, or after `within` seconds.
        """
        watched = [self, *watch]
        ends = time.monotonic() + within
        last = "no answer"
        async with self.session() as session:
            while time.monotonic() < ends:
                for process in watched:
                    process.check()
                try:
                    async with session.get(self.admin_url + self.ready_path) as response:
                        if response.status == 200:
                            return
                        last = f"{response.status} {await response.text()}"
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    last = type(exc).__name__
                await asyncio.sleep(POLL)
        raise ProcessError(f"{self.name} not ready within {within:.0f}s ({last}); {self.logs()}")
