"""A real PostgreSQL server for the tests: Debian's binaries, a temporary cluster, loopback.

`postgres_server` (session) runs `initdb` into a fresh folder and starts the
server on a free 127.0.0.1 port; it is stopped and removed after the
session. PostgreSQL refuses to run as root, so as root the cluster belongs
to the unprivileged `postgres` user and every command runs as that user.
`pg_database` (per test) is a database of its own, dropped afterwards.

`make test` installs Debian's `postgresql` package when it is missing and
sets SIDECAR_POSTGRES=required, so a missing server fails the run there;
elsewhere the PostgreSQL tests are skipped with the reason.
"""

from __future__ import annotations

import asyncio
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from deploy.process import free_port

SUPERUSER = "mesh"
START_WITHIN = 60  # seconds for pg_ctl to see the server accept connections
UNPRIVILEGED = "postgres"


def find_bindir() -> Path | None:
    """Where `initdb` and `pg_ctl` are: Debian keeps them out of PATH, per major version."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    if found:
        return Path(found[0]).parent
    on_path = shutil.which("initdb")
    return Path(on_path).resolve().parent if on_path else None


@dataclass
class PostgresServer:
    bindir: Path
    root: Path
    port: int
    user: str | None  # the OS user the server runs as (None: this one)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def url(self) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/postgres"

    def database_url(self, name: str) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{name}"

    def run(self, *argv: str, timeout: float = START_WITHIN) -> None:
        subprocess.run([str(self.bindir / argv[0]), *argv[1:]], check=True, timeout=timeout,
                       user=self.user, cwd=self.root, capture_output=True)

    def start(self) -> None:
        self.run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8",
                 "--no-sync")
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root}"
                   " -c fsync=off -c max_connections=200")
        self.run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "log"),
                 "-w", "-t", str(START_WITHIN), "start")

    def stop(self) -> None:
        try:
            self.run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", timeout=30)
        except (subprocess.SubprocessError, OSError):
            pass
        shutil.rmtree(self.root, ignore_errors=True)


def _start() -> PostgresServer:
    bindir = find_bindir()
    if bindir is None:
        why = "PostgreSQL is not installed (make test installs Debian's postgresql package)"
        if os.environ.get("SIDECAR_POSTGRES") == "required":
            pytest.fail(why)
        pytest.skip(why)
    root = Path(tempfile.mkdtemp(prefix="sidecar-pg-"))
    user = None
    if os.geteuid() == 0:
        # PostgreSQL will not run as root.
        user = UNPRIVILEGED
        entry = pwd.getpwnam(user)
        root.chmod(0o755)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    server = PostgresServer(bindir=bindir, root=root, port=free_port(), user=user)
    try:
        server.start()
    except subprocess.CalledProcessError as exc:
        log = (root / "log").read_text(errors="replace") if (root / "log").exists() else ""
        server.stop()
        raise RuntimeError(f"PostgreSQL did not start: {exc.stderr!r} {log[-2000:]}") from exc
    return server


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = _start()
    try:
        yield server
    finally:
        server.stop()


async def _admin(server: PostgresServer, statement: str) -> None:
    admin = await asyncpg.connect(server.url)
    try:
        await admin.execute(statement)
    finally:
        await admin.close()


@pytest.fixture
def pg_database(postgres_server: PostgresServer) -> Iterator[str]:
    """The URL of a new, empty database, dropped after the test.

    A plain fixture (its own short event loop), so parametrised fixtures may ask for it.
    """
    name = f"t_{os.urandom(6).hex()}"
    asyncio.run(_admin(postgres_server, f"CREATE DATABASE {name} STRATEGY FILE_COPY"))
    yield postgres_server.database_url(name)
    asyncio.run(_admin(postgres_server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
