"""`rigl serve`: the API plus one real Celery worker process, with embedded defaults.

SQLite and artifacts under --data-dir, kombu's filesystem transport as the broker: nothing to
install beyond `pip install`.

Safety: API keys are off in the embedded mode, so a non-loopback --host is refused unless keys are
on or --insecure-no-auth is passed; the API answers only known Host names and refuses cross-site
state changes (api.origin_guard).

Stopping: SIGINT (Ctrl-C), SIGTERM and SIGHUP all stop the API and then the worker (a warm
shutdown: its running job checkpoints and requeues), killing the worker's process group after
--worker-stop-timeout. The worker runs in its own session, so a terminal's Ctrl-C reaches only
`rigl serve`, which forwards it; on Linux it also gets SIGTERM if `rigl serve` dies (even SIGKILL),
so it never keeps consuming the queue as an orphan.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time

from rigl_core.optional import SERVICE_MODULES, add_unavailable_command, missing

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def add_command(subparsers) -> None:
    help = "run the job service (API + one worker) with embedded defaults"
    if absent := missing(*SERVICE_MODULES):  # a library-only install: say what to install
        return add_unavailable_command(subparsers, "serve", "service", absent, help)
    parser = subparsers.add_parser("serve", help=help)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--data-dir", help="where the database, queue and artifacts live (default ~/.rigl)")
    parser.add_argument("--no-worker", action="store_true", help="start the API only")
    parser.add_argument("--insecure-no-auth", action="store_true",
                        help="allow a non-loopback --host while API keys are off: anyone who can reach the port "
                             "can submit, read and cancel every job")
    parser.add_argument("--worker-stop-timeout", type=float, default=60.0,
                        help="seconds the worker gets to checkpoint its job and exit before it is killed")
    parser.set_defaults(handler=run)


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and names that resolve only to them; 0.0.0.0 and unresolvable names are not."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def refusal(host: str) -> str:
    return (f"rigl serve: refusing to listen on {host} with API keys off: anyone who can reach this port could "
            "submit, read and cancel jobs and download their data.\n"
            "  Turn keys on: create one with `rigl keys create --owner NAME` (RIGL_DATA_DIR=<the --data-dir> if you "
            "pass one), start with `RIGL_AUTH=true rigl serve ...`, and send the key as `Authorization: Bearer <key>` "
            "(RIGL_API_KEY for the client and CLI; the dashboard asks for it);\n"
            "  or listen on 127.0.0.1 only (the default);\n"
            "  or, if every machine that can reach this port is trusted, pass --insecure-no-auth.")


def run(args: argparse.Namespace) -> int:
    if args.data_dir:
        os.environ["RIGL_DATA_DIR"] = os.path.abspath(os.path.expanduser(args.data_dir))
    from store.settings import Settings

    settings = Settings().resolved()
    if not settings.auth and not is_loopback(args.host) and not args.insecure_no_auth:
        print(refusal(args.host), file=sys.stderr, flush=True)
        return 2
    if settings.allowed_hosts is None:  # keys off: DNS rebinding would hand a web page the whole API
        from api.origin_guard import default_allowed_hosts

        hosts = "*" if settings.auth else ",".join(default_allowed_hosts(args.host))
        settings = settings.model_copy(update={"allowed_hosts": hosts})
    from service_common.log_context import configure_logging

    configure_logging(settings.log_format)  # one readable line per record (RIGL_LOG_FORMAT=json: JSON lines)
    if not args.no_worker and settings.worker_metrics_dir is None:  # /metrics shows the worker's series too
        folder = settings.data_dir / "metrics" / "worker"
        os.environ["RIGL_WORKER_METRICS_DIR"] = str(folder)  # the worker inherits it (worker/metrics.py)
        settings = settings.model_copy(update={"worker_metrics_dir": folder})

    # From here on a stop signal never kills this process outright (uvicorn.run re-raised SIGTERM
    # with the default handler after its shutdown, so the worker was never stopped): it asks
    # uvicorn to exit and the worker to shut down, and the `finally` below waits for both. A second
    # signal forces both.
    received: list[int] = []
    server = worker = None

    def on_signal(signum, _frame) -> None:
        received.append(signum)
        if server is not None:
            server.should_exit = True
            server.force_exit = len(received) > 1
        if worker is not None and len(received) == 1:
            warm_shutdown(worker)  # at once: it checkpoints while the API drains

    for sig in STOP_SIGNALS:
        signal.signal(sig, on_signal)

    import uvicorn

    from api.app import create_app
    from store.startup import schema_refuses_start

    if schema_refuses_start(settings, "rigl serve"):  # upgrades the schema, or refuses when told not to
        return 2
    app = create_app(settings)
    # open event streams would hold a graceful shutdown forever: give them a few seconds
    server = _server_class()(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                            log_config=None,  # its lines through ours
                                            timeout_graceful_shutdown=5))
    if received:
        server.should_exit = True
    try:
        if not args.no_worker and not received:
            worker = start_worker()
        print(f"rigl serve: dashboard and API on http://{args.host}:{args.port} (API docs at /docs); "
              f"data in {settings.data_dir}; "
              f"database {settings.database_url.split('://')[0]}; broker {settings.broker_url.split('://')[0]}; "
              f"API keys {'on' if settings.auth else 'off'}",
              file=sys.stderr, flush=True)
        import gc

        gc.collect()
        gc.freeze()  # the imported torch/FastAPI objects never die: keep them out of every GC pass
        gc.set_threshold(50_000, 20, 20)  # fewer young-generation passes under request load
        if not received:
            server.run()
    finally:
        if worker is not None:
            stop_worker(worker, args.worker_stop_timeout, force=lambda: len(received) > 1)
    return 0


def _server_class():
    """uvicorn.Server that leaves signal handling to `run`."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            yield  # our handlers (run) stay installed: they stop this server and the worker

    return Server


def start_worker() -> subprocess.Popen:
    """`rigl worker` in its own session (process group); on Linux it gets SIGTERM when we die."""
    preexec = None
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)  # loaded here: no dlopen between fork and exec
        parent = os.getpid()

        def preexec() -> None:
            libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
            if os.getppid() != parent:  # we died before prctl: no signal will come
                os._exit(1)

    return subprocess.Popen([sys.executable, "-m", "rigl_core.cli", "worker", "--loglevel", "WARNING"],
                            env=os.environ.copy(), start_new_session=True, preexec_fn=preexec)


def warm_shutdown(worker: subprocess.Popen) -> None:
    """SIGTERM once: Celery's warm shutdown (a second SIGTERM changes nothing, but send one only)."""
    if not getattr(worker, "warm_shutdown_sent", False) and worker.poll() is None:
        worker.warm_shutdown_sent = True
        try:
            worker.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass


def stop_worker(worker: subprocess.Popen, timeout: float, force=lambda: False) -> None:
    """Warm shutdown (SIGTERM: the running job checkpoints and requeues), then SIGKILL to the whole
    process group (the worker, its pool process and anything they left)."""
    if worker.poll() is None:
        warm_shutdown(worker)
        deadline = time.monotonic() + timeout
        while worker.poll() is None and time.monotonic() < deadline and not force():
            time.sleep(0.1)
        if worker.poll() is None:
            print(f"rigl serve: the worker did not stop within {timeout:g}s; killing it", file=sys.stderr, flush=True)
    try:
        os.killpg(worker.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    worker.wait()
