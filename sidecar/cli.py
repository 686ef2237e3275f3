"""The `sidecar` command line (SPEC "Command line")."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from sidecar import names
from sidecar.config import loader as config_loader
from sidecar.config.settings import Identity, Listen
from sidecar.config.units import parse_duration
from sidecar.identity import keys
from sidecar.tls import certs

WAIT_TIMEOUT = "60s"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sidecar", description="A PHI-safe mesh sidecar.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the three listeners until SIGTERM")
    run.add_argument("-c", "--config", help="config file (or SIDECAR_CONFIG)")

    check = commands.add_parser("check", help="validate a config")
    check.add_argument("-c", "--config", help="config file (or SIDECAR_CONFIG)")

    admin_host, admin_port = Listen().admin
    wait = commands.add_parser(
        "wait", help="exit 0 once this sidecar's outbound path is ready (for an app's entrypoint)",
        description="Polls the admin port's /readyz/outbound. The admin address comes from "
                    "--admin, else the config (-c or SIDECAR_CONFIG), else "
                    f"{admin_host}:{admin_port}. After `--`, a command to exec once ready.")
    wait.add_argument("-c", "--config", help="config file (or SIDECAR_CONFIG)")
    wait.add_argument("--admin", metavar="HOST:PORT", help="the sidecar's admin address")
    wait.add_argument("--timeout", default=WAIT_TIMEOUT,
                      help=f"how long to wait, with a unit (default {WAIT_TIMEOUT})")
    wait.add_argument("exec_command", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                      help="run in place of `sidecar wait` once ready")

    keygen = commands.add_parser("keygen", help="make a service's key pair")
    keygen.add_argument("--service", required=True)
    keygen.add_argument("--out", required=True)
    keygen.add_argument("--algorithm", default=Identity().algorithm,
                        choices=names.KEY_PAIR_ALGORITHMS)
    keygen.add_argument("--force", action="store_true", help="replace existing key files")

    jwks = commands.add_parser("jwks", help="merge *.jwks.json files into one JWKS")
    jwks.add_argument("-o", "--out")
    jwks.add_argument("dirs", nargs="+")

    _certs_parser(commands.add_parser("certs", help="the mesh CA and service certificates"))

    audit = commands.add_parser("audit", help="audit log tools")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_commands.add_parser("verify", help="check the audit hash chain")
    verify.add_argument("file")
    return parser


def _certs_parser(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="certs_command", required=True)
    ca = commands.add_parser("ca", help="make a mesh CA: DIR/ca.pem and DIR/ca.key")
    ca.add_argument("--out", required=True)
    ca.add_argument("--days", type=int, default=certs.CA_DAYS)
    ca.add_argument("--algorithm", default=certs.DEFAULT_ALGORITHM, choices=names.CERT_ALGORITHMS)
    ca.add_argument("--force", action="store_true", help="replace existing files")
    issue = commands.add_parser("issue", help="a service's certificate: DIR/NAME.crt, NAME.key")
    issue.add_argument("--ca", required=True, help="the folder of ca.pem and ca.key")
    issue.add_argument("--service", required=True)
    issue.add_argument("--trust-domain", required=True)
    issue.add_argument("--out", required=True)
    issue.add_argument("--days", type=int, default=certs.LEAF_DAYS)
    issue.add_argument("--force", action="store_true", help="replace existing files")
    show = commands.add_parser("show", help="subject, SPIFFE ID and validity of a certificate")
    show.add_argument("file")


def _certs(args: argparse.Namespace) -> int:
    try:
        if args.certs_command == "show":
            print("\n".join(certs.describe(args.file)))
            return 0
        if args.certs_command == "ca":
            written = certs.make_ca(args.out, days=args.days, algorithm=args.algorithm,
                                    overwrite=args.force)
        else:
            written = certs.issue(args.ca, service=args.service, trust_domain=args.trust_domain,
                                  out_dir=args.out, days=args.days, overwrite=args.force)
    except (ValueError, OSError) as exc:
        print(f"sidecar certs {args.certs_command}: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {written[0]} and {written[1]}")
    return 0


def _config_path(value: str | None) -> str | None:
    return value or os.environ.get("SIDECAR_CONFIG")


def _wait(args: argparse.Namespace) -> int:
    """`sidecar wait`: 0 once ready (or the command's exec), 1 if not in time, 2 on bad usage."""
    try:
        within = parse_duration(args.timeout)
    except ValueError as exc:
        print(f"sidecar wait: --timeout {exc}", file=sys.stderr)
        return 2
    command = args.exec_command
    if command[:1] == ["--"]:
        command = command[1:]
    path = _config_path(args.config)
    if args.admin:
        try:
            admin = config_loader.parse_address(args.admin)
        except ValueError as exc:
            print(f"sidecar wait: --admin {exc}", file=sys.stderr)
            return 2
    elif path:
        try:
            admin = config_loader.load(path).listen.admin
        except config_loader.ConfigError as exc:
            for line in exc.errors:
                print(line, file=sys.stderr)
            return 2
    else:
        admin = Listen().admin
    import asyncio

    from sidecar.waiter import wait_ready

    ready, why = asyncio.run(wait_ready(admin, within=within))
    if not ready:
        print(f"sidecar wait: {why}", file=sys.stderr)
        return 1
    if command:
        try:
            os.execvp(command[0], command)
        except OSError as exc:
            print(f"sidecar wait: cannot run {command[0]}: {exc.strerror}", file=sys.stderr)
            return 127
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "wait":
        return _wait(args)
    if args.command in ("run", "check"):
        path = _config_path(args.config)
        if not path:
            print("(file): no config given: use -c FILE or set SIDECAR_CONFIG", file=sys.stderr)
            return 2
        try:
            config = config_loader.load(path)
        except config_loader.ConfigError as exc:
            for line in exc.errors:
                print(line, file=sys.stderr)
            return 2
        from sidecar.wiring import check_keys

        problems = check_keys(config, dates=args.command == "check")
        for line in problems:
            print(line, file=sys.stderr)
        if problems:
            return 2
        if args.command == "check":
            print(f"{path}: valid ({config.service}, {len(config.services)} services)")
            return 0
        from sidecar.server import run_forever

        return run_forever(config)
    if args.command == "keygen":
        try:
            pem, jwks_path = keys.generate(service=args.service, out_dir=args.out,
                                           algorithm=args.algorithm, overwrite=args.force)
        except (ValueError, FileExistsError, OSError) as exc:
            print(f"sidecar keygen: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {pem} and {jwks_path}")
        return 0
    if args.command == "jwks":
        try:
            merged = keys.merge_jwks(args.dirs)
        except (ValueError, OSError) as exc:
            print(f"sidecar jwks: {exc}", file=sys.stderr)
            return 2
        text = json.dumps(merged, indent=2, sort_keys=True) + "\n"
        if args.out:
            Path(args.out).write_text(text, encoding="utf-8")
        else:
            sys.stdout.write(text)
        return 0
    if args.command == "certs":
        return _certs(args)
    if args.command == "audit":
        from sidecar.audit.log import verify_file

        ok, _line, message = verify_file(args.file)
        if ok:
            print(f"{args.file}: {message}")
            return 0
        # Like `sha256sum -c`, the verdict is the command's output, on stdout.
        print(f"{args.file}: broken: {message}")
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
