"""``medlens serve --workers N``: N server processes on one port, each with its own listening socket.

Why not uvicorn's own ``workers=N``: uvicorn binds one socket in the parent process, and every worker accepts
from it. When keep-alive connections open in a burst, one worker's accept loop takes them all. A load balancer's
connection pool does this, and so does the load test. That worker then serves every request on them until they
close, while the others sit idle. This was measured with 16 clients and ``--workers 2`` on 2 cores: over 20 s,
one worker used 23.8 CPU-seconds and the other 0.03. The service was capped at what one process can do, and the
"servers use only 60% of the cores" of issue 9 came from this.

Here each worker binds its own socket to the same address with ``SO_REUSEPORT``. The kernel then hashes every
new connection to one of the N sockets, so connections spread over the processes. The supervisor is this
module's :func:`serve_workers`, and it does what uvicorn's supervisor does:
- it starts the N workers (spawned, each building the app from the environment, see ``app.app_from_env``);
- it replaces a worker that dies. A worker that fails at start-up stops the whole server instead, because it
  would fail the same way every time;
- on SIGINT or SIGTERM it passes the signal on, waits for the graceful shutdowns (each worker's lifespan
  drains its audit writer), and kills what is left after ``grace_s``.

One cost of ``SO_REUSEPORT``: connections waiting in a worker's accept queue when that worker is killed are
reset, not handed to another worker. Clients retry them like any dropped connection. The audit guarantees do
not depend on this (docs/AUDIT.md): a request that got no answer was never acknowledged. Without
``SO_REUSEPORT`` (not Linux or BSD), uvicorn's shared socket is used.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from typing import Any

log = logging.getLogger("medlens.service")
#: uvicorn's exit code for a worker that failed before it started serving
STARTUP_FAILURE = 3


def reuse_port_supported() -> bool:
    return hasattr(socket, "SO_REUSEPORT")


def _listening_socket(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    sock.listen(2048)
    return sock


def _worker(app: str, host: str, port: int, env: dict[str, str], options: dict[str, Any]) -> None:
    """One server process (spawned): its own SO_REUSEPORT socket, the app built from the environment."""
    import uvicorn

    os.environ.update(env)
    sys.path[:0] = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]
    try:
        sock = _listening_socket(host, port)
    except OSError as exc:
        print(f"medlens: worker {os.getpid()} cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        sys.exit(STARTUP_FAILURE)
    config = uvicorn.Config(app, factory=True, host=host, port=port, **options)
    uvicorn.Server(config).run(sockets=[sock])


def serve_workers(n: int, host: str, port: int, env: dict[str, str], options: dict[str, Any],
                  grace_s: float = 30.0, app: str = "medlens.service.app:app_from_env") -> int:
    """Run ``n`` workers of the app factory ``app`` until SIGINT / SIGTERM; the exit code (1 when a worker failed
    at start-up)."""
    probe = _listening_socket(host, port)  # the port is free (or shared with SO_REUSEPORT): fail here, in words
    probe.close()
    spawn = multiprocessing.get_context("spawn")
    stop: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.append(signum))

    def start() -> Any:
        process = spawn.Process(target=_worker, args=(app, host, port, env, options), name="medlens-worker")
        process.start()
        log.info("started server process %d", process.pid)
        return process

    workers = [start() for _ in range(n)]
    code = 0
    try:
        while not stop:
            time.sleep(0.5)
            for i, process in enumerate(workers):
                if process.exitcode is None or stop:
                    continue
                if process.exitcode == STARTUP_FAILURE:
                    print(f"medlens: server process {process.pid} failed to start; stopping", file=sys.stderr)
                    stop.append(signal.SIGTERM)
                    code = 1
                    break
                print(f"medlens: server process {process.pid} ended (exit code {process.exitcode}); starting "
                      "another", file=sys.stderr)
                workers[i] = start()
    finally:
        for process in workers:
            if process.exitcode is None and process.pid is not None:
                os.kill(process.pid, stop[0] if stop else signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for process in workers:
            process.join(max(0.1, deadline - time.monotonic()))
            if process.exitcode is None:
                process.kill()
                process.join()
    return code
