"""`rigl serve`: the API plus one real Celery worker process, with embedded defaults.

SQLite and artifacts under --data-dir, kombu's filesystem transport as the broker: nothing to
install beyond `pip install`. Ctrl-C stops both.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys


def add_command(subparsers) -> None:
    parser = subparsers.add_parser("serve", help="run the job service (API + one worker) with embedded defaults")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--data-dir", help="where the database, queue and artifacts live (default ~/.rigl)")
    parser.add_argument("--no-worker", action="store_true", help="start the API only")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    if args.data_dir:
        os.environ["RIGL_DATA_DIR"] = os.path.abspath(os.path.expanduser(args.data_dir))
    from store.settings import Settings

    settings = Settings().resolved()
    from api.app import create_app

    app = create_app(settings)
    worker = None
    if not args.no_worker:
        worker = subprocess.Popen([sys.executable, "-m", "rigl_core.cli", "worker", "--loglevel", "WARNING"],
                                  env=os.environ.copy())
    print(f"rigl serve: dashboard and API on http://{args.host}:{args.port} (API docs at /docs); "
          f"data in {settings.data_dir}; "
          f"database {settings.database_url.split('://')[0]}; broker {settings.broker_url.split('://')[0]}",
          file=sys.stderr, flush=True)
    import gc

    gc.collect()
    gc.freeze()  # the imported torch/FastAPI objects never die: keep them out of every GC pass
    gc.set_threshold(50_000, 20, 20)  # fewer young-generation passes under request load
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=15)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
    return 0
