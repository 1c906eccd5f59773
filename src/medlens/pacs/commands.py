"""``medlens dicom listen RUN``: the DICOM node as a command (see :mod:`medlens.pacs.node`)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from medlens.errors import MedlensError

DEFAULT_SPOOL = "dicom-spool"


def add_commands(subparsers: Any) -> None:
    dicom = subparsers.add_parser("dicom", help="DICOM networking: a node that answers a PACS with SR results")
    sub = dicom.add_subparsers(dest="dicom_action", required=True, metavar="ACTION")
    ls = sub.add_parser("listen", help="C-STORE SCP: receive images, predict, send SR + heat map to a PACS")
    ls.add_argument("run", metavar="RUN", help="run directory (`medlens train --out RUN`)")
    ls.add_argument("--ae-title", default="MEDLENS", help="this node's AE title (default MEDLENS)")
    ls.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    ls.add_argument("--port", type=int, default=11112, help="DICOM port (default 11112)")
    ls.add_argument("--destination", required=True,
                    help="where results go: AET@HOST:PORT (C-STORE) or https://.../dicom-web (STOW-RS)")
    ls.add_argument("--allow-aet", action="append", default=[], metavar="AET",
                    help="a calling AE title that may send (repeat; default: any)")
    ls.add_argument("--allow-host", action="append", default=[], metavar="ADDR",
                    help="an address or network (10.1.0.0/16) that may send (repeat; default: any)")
    ls.add_argument("--spool", help=f"spool folder (default RUN/{DEFAULT_SPOOL}); give the API the same "
                                    "(MEDLENS_DICOM_SPOOL) so it serves the SRs")
    ls.add_argument("--db", help="audit database: a SQLAlchemy URL or SQLite file (default: the service's)")
    ls.add_argument("--backend", choices=("torch", "onnx", "onnx-int8"), default="torch")
    ls.add_argument("--max-backoff", type=float, default=60.0, help="longest wait between retries (s)")
    ls.set_defaults(func=cmd_listen)


def cmd_listen(args: argparse.Namespace) -> int:
    try:
        import highdicom  # noqa: F401
        import pynetdicom  # noqa: F401
    except ImportError as exc:
        raise MedlensError(f"the DICOM node needs packages that are not installed ({exc.name})",
                           hint="pip install 'medlens[dicom]'") from exc
    from medlens import __version__
    from medlens.inference import Predictor
    from medlens.pacs.destinations import parse_destination
    from medlens.pacs.node import DicomNode, NodeConfig
    from medlens.pacs.spool import Spool
    from medlens.rundir import existing_run
    from medlens.service.audit import AuditLog
    from medlens.service.settings import ServiceSettings

    run = existing_run(args.run)
    if len(args.ae_title) > 16:
        raise MedlensError(f"AE title '{args.ae_title}' is longer than 16 characters")
    settings = ServiceSettings.load(run, database=args.db)
    destination = parse_destination(args.destination, args.ae_title)
    spool = Spool(Path(args.spool) if args.spool else settings.dicom_spool or run / DEFAULT_SPOOL)
    config = NodeConfig(ae_title=args.ae_title, host=args.host, port=args.port,
                        allowed_ae_titles=tuple(args.allow_aet), allowed_hosts=tuple(args.allow_host),
                        max_backoff_s=args.max_backoff)
    predictor = Predictor.from_run(run, backend=args.backend)
    audit = AuditLog(settings.database_url, hash_key=settings.audit_key)
    node = DicomNode(config, spool, predictor, audit, destination, version=__version__)
    stopped = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopped.set())
    try:
        node.start()
    except OSError as exc:
        raise MedlensError(f"cannot listen on {args.host}:{args.port} ({exc.strerror or exc})",
                           hint="choose another --port, or stop what is using it") from None
    print(f"medlens: DICOM node {args.ae_title} listening on {args.host}:{args.port}; results to "
          f"{destination.describe()}; spool {spool.root}; {len(spool.pending())} waiting, "
          f"{len(spool.outbox())} to send", file=sys.stderr, flush=True)
    stopped.wait()
    node.stop()
    audit.close()
    return 0
