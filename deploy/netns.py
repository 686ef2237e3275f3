"""The example mesh in Linux network namespaces, wired the way Compose wires it.

Each service gets a namespace of its own, as a Compose app container does:
its app on 127.0.0.1:8000 and its sidecar on 15001/15006/15000, the same
ports as in `deploy/docker-compose.yml`. A "switch" namespace holds a bridge;
every service namespace has a veth pair into it and one address from
198.18.0.0/15 (RFC 2544's benchmarking range: never a host's, never routed).
Names resolve through `/etc/netns/<ns>/hosts`, which `ip netns exec` mounts
over `/etc/hosts`: each service name, and `jaeger` as the switch's own
address, where a `Relay` passes traces on to a receiver on the host's loopback.

Nothing is added to the host's own namespace: veth pairs are created inside
the switch with their far end placed straight into the service namespace.
Namespace names carry the creating process's pid and a random token, so
parallel runs never clash and `sweep_stale` can remove what a killed run left.

The process that drives the mesh stays in the host namespace and reaches into
a service's network with `socket_in`: a socket made by a short-lived thread
that joined that namespace belongs to it for its whole life.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import aiohttp

SUBNET = ipaddress.ip_network("198.18.0.0/24")
SWITCH_ADDRESS = SUBNET[1]  # the bridge's own address: where `jaeger` resolves
FIRST_SERVICE_HOST = 10  # services get .10, .11, ... in SUBNET
PREFIX = "meshdemo"
ETC_NETNS = Path("/etc/netns")
RUN_NETNS = Path("/run/netns")
BRIDGE = "br0"
SERVICE_IFACE = "eth0"
TRACES_NAME = "jaeger"  # the name the Compose configs send traces to
TRACES_PORT = 4318
CLONE_NEWNET = 0x40000000
COMMAND_TIMEOUT = 10.0  # seconds for one `ip` command

T = TypeVar("T")
_NAME = re.compile(rf"^{PREFIX}-(\d+)-[0-9a-f]+-")


class NetnsError(RuntimeError):
    """A namespace could not be built; the message says which command failed and why."""


@dataclass(frozen=True, slots=True)
class Layout:
    """Which namespace and address each service has in one run."""

    run_id: str
    switch: str  # the bridge's namespace
    namespaces: dict[str, str]  # service -> namespace
    addresses: dict[str, str]  # service -> its address on the bridge

    @property
    def all_namespaces(self) -> list[str]:
        return [self.switch, *self.namespaces.values()]


def plan(services: Sequence[str], *, run_id: str | None = None) -> Layout:
    """Names and addresses for `services`; nothing is created yet."""
    if len(services) > SUBNET.num_addresses - FIRST_SERVICE_HOST - 1:
        raise ValueError(f"too many services for {SUBNET}")
    run_id = run_id or f"{PREFIX}-{os.getpid()}-{secrets.token_hex(3)}"
    return Layout(
        run_id=run_id,
        switch=f"{run_id}-switch",
        namespaces={service: f"{run_id}-{service}" for service in services},
        addresses={
            service: str(SUBNET[FIRST_SERVICE_HOST + index])
            for index, service in enumerate(services)
        },
    )


def commands(layout: Layout) -> list[list[str]]:
    """The `ip` commands that build `layout`, in order."""
    prefix = SUBNET.prefixlen
    switch = layout.switch
    out = [
        ["ip", "netns", "add", switch],
        ["ip", "-n", switch, "link", "set", "lo", "up"],
        ["ip", "-n", switch, "link", "add", BRIDGE, "type", "bridge"],
        ["ip", "-n", switch, "addr", "add", f"{SWITCH_ADDRESS}/{prefix}", "dev", BRIDGE],
        ["ip", "-n", switch, "link", "set", BRIDGE, "up"],
    ]
    for index, (service, ns) in enumerate(layout.namespaces.items()):
        port = f"p{index}"  # the switch end; interface names live per namespace
        address = layout.addresses[service]
        out += [
            ["ip", "netns", "add", ns],
            ["ip", "-n", ns, "link", "set", "lo", "up"],
            ["ip", "-n", switch, "link", "add", port, "type", "veth",
             "peer", "name", SERVICE_IFACE, "netns", ns],
            ["ip", "-n", switch, "link", "set", port, "master", BRIDGE],
            ["ip", "-n", switch, "link", "set", port, "up"],
            ["ip", "-n", ns, "addr", "add", f"{address}/{prefix}", "dev", SERVICE_IFACE],
            ["ip", "-n", ns, "link", "set", SERVICE_IFACE, "up"],
        ]  # fmt: skip
    return out


def hosts_file(layout: Layout) -> str:
    """`/etc/hosts` as every namespace sees it: the service names, and `jaeger`."""
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    lines += [f"{address}\t{service}" for service, address in layout.addresses.items()]
    lines.append(f"{SWITCH_ADDRESS}\t{TRACES_NAME}")
    return "\n".join(lines) + "\n"


# Without this, a name missing from hosts would be asked of the host's resolver,
# which a namespace cannot reach anyway; loopback makes that fail at once.
RESOLV_CONF = "# a mesh namespace: names come from /etc/hosts only\nnameserver 127.0.0.1\n"


def unavailable_reason() -> str | None:
    """Why namespaces cannot be used here (not root, no `ip`, no permission), or None."""
    if os.geteuid() != 0:
        return f"network namespaces need root, and this is uid {os.geteuid()}"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(3)}-probe"
    try:
        _ip(["ip", "netns", "add", probe])
    except NetnsError as exc:
        return f"`ip netns add` does not work here: {exc}"
    finally:
        _quiet(["ip", "netns", "del", probe])
    try:
        ETC_NETNS.mkdir(exist_ok=True)
    except OSError as exc:
        return f"cannot write {ETC_NETNS}: {exc.strerror}"
    return None


def build(layout: Layout) -> None:
    """Create the namespaces, bridge, veth pairs and hosts files; undone on failure."""
    try:
        for namespace in layout.all_namespaces:
            directory = ETC_NETNS / namespace
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "hosts").write_text(hosts_file(layout))
            (directory / "resolv.conf").write_text(RESOLV_CONF)
        for command in commands(layout):
            _ip(command)
    except BaseException:
        destroy(layout)
        raise


def destroy(layout: Layout) -> None:
    """Remove every namespace and `/etc/netns` directory of `layout`; never raises.

    Stop the processes in them first, gracefully; any still inside are killed
    here, since a namespace lives on, unnamed, while a process is in it.
    """
    for namespace in reversed(layout.all_namespaces):
        _remove(namespace)


@contextlib.contextmanager
def built(layout: Layout) -> Iterator[Layout]:
    """`layout` built for the `with` block and destroyed after it, whatever happens in it."""
    build(layout)
    try:
        yield layout
    finally:
        destroy(layout)


def sweep_stale() -> list[str]:
    """Remove namespaces that earlier runs left behind when they were killed.

    Only names this module made, and only those whose creating process is gone.
    """
    found = {path.name for path in RUN_NETNS.iterdir()} if RUN_NETNS.is_dir() else set()
    found |= {path.name for path in ETC_NETNS.iterdir()} if ETC_NETNS.is_dir() else set()
    removed = []
    for name in sorted(found):
        match = _NAME.match(name)
        if match and not _alive(int(match.group(1))):
            _remove(name)
            removed.append(name)
    return removed


def exec_prefix(namespace: str) -> list[str]:
    """The command prefix that runs a process inside `namespace` (it execs, keeping the pid)."""
    return ["ip", "netns", "exec", namespace]


# ---- reaching into a namespace from this process


def run_in(namespace: str, action: Callable[[], T]) -> T:
    """`action()` on a fresh thread that has joined `namespace`'s network.

    setns(CLONE_NEWNET) changes only the calling thread, and the thread ends
    right after, so no other code ever runs in the wrong namespace.
    """
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            _join(namespace)
            outcome["value"] = action()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, name=f"netns-{namespace}", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


def socket_in(namespace: str, family: int, kind: int, proto: int = 0) -> socket.socket:
    """A new socket that lives in `namespace`'s network, wherever it is used from."""
    return run_in(namespace, lambda: socket.socket(family, kind, proto))


def connector_in(namespace: str) -> aiohttp.TCPConnector:
    """An aiohttp connector whose connections start in `namespace`.

    Use addresses, not names: names are resolved in this process, which sees
    the host's /etc/hosts, not the namespace's.
    """

    def factory(addr_info: tuple[int, int, int, str, tuple[object, ...]]) -> socket.socket:
        family, kind, proto = addr_info[0], addr_info[1], addr_info[2]
        return socket_in(namespace, family, kind, proto)

    return aiohttp.TCPConnector(socket_factory=factory, force_close=True)


def listener_in(namespace: str, host: str, port: int) -> socket.socket:
    """A listening TCP socket on `host:port` inside `namespace`."""
    sock = socket_in(namespace, socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(64)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class Relay:
    """Passes each TCP connection accepted on `listener` on to `target` (host, port).

    It lets the namespaces send traces to a receiver on the host's loopback
    without giving them any route out: only this process crosses over.
    """

    def __init__(self, listener: socket.socket, target: tuple[str, int]) -> None:
        self._listener = listener
        self._target = target
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self.connections = 0

    async def start(self) -> Relay:
        self._server = await asyncio.start_server(self._pipe, sock=self._listener)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            # Exporters keep their connections alive; close them, or waiting never ends.
            for writer in list(self._open):
                writer.close()
            await self._server.wait_closed()
            self._server = None

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            far_reader, far_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.close()
            return
        self._open |= {writer, far_writer}
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(_copy(reader, far_writer))
                group.create_task(_copy(far_reader, writer))
        except* OSError:
            pass  # either side going away ends the relayed connection
        finally:
            for side in (writer, far_writer):
                side.close()
                self._open.discard(side)


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while chunk := await reader.read(65536):
        writer.write(chunk)
        await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()


# ---- helpers


def _join(namespace: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(RUN_NETNS / namespace, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns into {namespace}: {os.strerror(errno)}")
    finally:
        os.close(fd)


def _ip(command: list[str]) -> None:
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"{' '.join(command)}: {exc}") from exc
    if done.returncode != 0:
        raise NetnsError(f"{' '.join(command)}: {done.stderr.strip() or done.returncode}")


def _quiet(command: list[str]) -> None:
    try:
        subprocess.run(command, capture_output=True, timeout=COMMAND_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired):
        pass


def _remove(namespace: str) -> None:
    if (RUN_NETNS / namespace).exists():
        for pid in _pids(namespace):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        _quiet(["ip", "netns", "del", namespace])
    shutil.rmtree(ETC_NETNS / namespace, ignore_errors=True)


def _pids(namespace: str) -> list[int]:
    try:
        done = subprocess.run(
            ["ip", "netns", "pids", namespace],
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [int(word) for word in done.stdout.split() if word.isdigit()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def namespaces_of(run_id: str) -> list[str]:
    """The namespaces that still exist for `run_id` (for tests of clean-up)."""
    names: Iterable[str] = (p.name for p in RUN_NETNS.iterdir()) if RUN_NETNS.is_dir() else ()
    return sorted(name for name in names if name.startswith(run_id + "-"))
