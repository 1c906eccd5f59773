"""The service's administration commands: ``medlens keys create|list|revoke`` and ``medlens audit export``.

:func:`add_commands` adds them to the ``medlens`` parser's subparsers; each sets ``func`` to a handler that
returns an exit code and raises :class:`~medlens.errors.MedlensError` subclasses for user mistakes.

The database is ``--db`` (a SQLAlchemy URL, a SQLite file, or a run directory meaning ``RUN/audit.db``), or
else ``MEDLENS_DATABASE_URL`` / ``database_url`` in the ``MEDLENS_SETTINGS`` file: the same database the
service uses, so keys created here are the ones it accepts.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from medlens.errors import ConfigError, DataError


def add_commands(subparsers: Any) -> None:
    """Add ``keys`` and ``audit`` to an ``argparse`` subparsers object (``parser.add_subparsers()``)."""
    from medlens.service.auth import ROLES

    keys = subparsers.add_parser("keys", help="API keys for the service: create, list, revoke")
    keys_sub = keys.add_subparsers(dest="keys_action", required=True, metavar="ACTION")

    create = keys_sub.add_parser("create", help="create a key; its secret is printed once, never stored")
    create.add_argument("name", metavar="NAME", help="who or what the key is for (shown in the audit trail)")
    create.add_argument("--role", required=True, choices=ROLES,
                        help="viewer: read predictions; clinician: also submit images; admin: also read the audit")
    _db_option(create)
    create.set_defaults(func=cmd_keys_create)

    listing = keys_sub.add_parser("list", help="list the keys (names, roles, dates; never the secrets)")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    _db_option(listing)
    listing.set_defaults(func=cmd_keys_list)

    revoke = keys_sub.add_parser("revoke", help="revoke a key at once (its name is never reused)")
    revoke.add_argument("name", metavar="NAME")
    _db_option(revoke)
    revoke.set_defaults(func=cmd_keys_revoke)

    audit = subparsers.add_parser("audit", help="the service's audit trail: export")
    audit_sub = audit.add_subparsers(dest="audit_action", required=True, metavar="ACTION")
    export = audit_sub.add_parser("export", help="write the audit trail as CSV (oldest first)")
    export.add_argument("--out", required=True, metavar="FILE.csv", help="CSV file to write (- for stdout)")
    export.add_argument("--since", default=None, metavar="TIME",
                        help="only rows at or after this ISO 8601 date or time (UTC unless it has an offset)")
    _db_option(export)
    export.set_defaults(func=cmd_audit_export)


def _db_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", default=None, metavar="URL",
                        help="database URL, SQLite file or run directory (default: MEDLENS_DATABASE_URL or the "
                             "MEDLENS_SETTINGS file)")


def resolve_database(db: str | None, *, must_exist: bool) -> str:
    """The database URL for a command: ``--db``, else the settings; a missing SQLite file is a DataError
    when the command only reads (a typo must not create an empty database and report nothing)."""
    from medlens.service.settings import ENV_PREFIX, database_url, read_settings, sqlite_path

    url = database_url(db) if db else read_settings().get("database_url")
    if not url:
        raise ConfigError("no database given",
                          hint=f"pass --db URL|FILE|RUN, or set {ENV_PREFIX}DATABASE_URL")
    path = sqlite_path(url)
    if must_exist and path is not None and not path.is_file():
        raise DataError(f"no audit database at {path}",
                        hint="check --db (the service creates RUN/audit.db on first start)")
    return url


def cmd_keys_create(args: argparse.Namespace) -> int:
    from medlens.service.auth import KeyStore

    with KeyStore(resolve_database(args.db, must_exist=False)) as store:
        plaintext = store.create(args.name, args.role)
    print(plaintext)
    print(f"medlens: created {args.role} key '{args.name}'; copy it now, it cannot be shown again",
          file=sys.stderr)
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    from medlens.service.auth import KeyStore

    with KeyStore(resolve_database(args.db, must_exist=True)) as store:
        keys = store.list()
    if args.json:
        for k in keys:
            print(json.dumps({"name": k.name, "role": k.role, "created": k.created, "revoked": k.revoked}))
        return 0
    if not keys:
        print("no keys (create one with `medlens keys create NAME --role ROLE`)", file=sys.stderr)
        return 0
    width = max(4, *(len(k.name) for k in keys))
    print(f"{'NAME':<{width}}  {'ROLE':<9}  {'CREATED':<32}  REVOKED")
    for k in keys:
        print(f"{k.name:<{width}}  {k.role:<9}  {k.created:<32}  {k.revoked or '-'}")
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from medlens.service.auth import KeyStore

    with KeyStore(resolve_database(args.db, must_exist=True)) as store:
        changed = store.revoke(args.name)
    print(f"medlens: key '{args.name}' {'revoked' if changed else 'was already revoked'}", file=sys.stderr)
    return 0


def cmd_audit_export(args: argparse.Namespace) -> int:
    from medlens.service.audit import AuditLog
    from medlens.service.db import utc_iso

    since = utc_iso(args.since) if args.since else None  # a bad time fails before the database is opened
    with AuditLog(resolve_database(args.db, must_exist=True)) as log:
        if args.out == "-":
            n = log.export_csv(sys.stdout, since)
        else:
            try:
                n = log.export_csv(args.out, since)
            except OSError as exc:
                raise DataError(f"{args.out}: cannot be written ({exc.strerror or exc})") from exc
    where = "stdout" if args.out == "-" else args.out
    print(f"medlens: wrote {n} audit rows to {where}", file=sys.stderr)
    return 0
