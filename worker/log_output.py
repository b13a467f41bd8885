"""Everything a worker writes goes through the service's log handler (service_common/log_context.py), so with
`RIGL_LOG_FORMAT=json` every line of its stdout and stderr is a JSON object a log shipper can parse.

Celery writes past logging in four places, each taken over here:
- its startup banner, printed to stdout: the worker runs with `--quiet` (`QUIET_ARGS`); the same facts
  (node name, queues, concurrency) are in its "ready" log line and in `rigl worker`'s own line;
- its own log setup, which gives billiard's process logger (a pool process that died: "Process
  'ForkPoolWorker-2' exited with 'signal 15'") a handler of Celery's plain format: a `setup_logging`
  receiver (`take_over`) makes Celery leave logging to us, and that logger gets our handler;
- prints to stdout/stderr (in the worker, a job's code, a library): redirected to the
  `celery.redirected` logger, as Celery itself does when it owns logging;
- its shutdown notices ("worker: Warm shutdown (MainProcess)"), printed straight to the process's original
  stdout from the signal handler: sent to the `celery.worker` logger instead.
Python's warnings (Celery's superuser warning, torch's) go through logging too (`logging.captureWarnings`,
in configure_logging).
"""

from __future__ import annotations

import logging

QUIET_ARGS = ["--quiet"]  # Celery's top-level option: no banner


def take_over(app, handler: logging.Handler) -> None:
    """Before `worker_main`: Celery's logging, its stdout/stderr and its shutdown notices through `handler`."""
    import celery.apps.worker as celery_worker
    from billiard.util import get_logger as billiard_logger
    from celery.signals import setup_logging

    def ours(loglevel=None, **_kwargs) -> None:  # called in the main process and again in each pool process
        process_logger = billiard_logger()  # does not propagate: it needs the handler itself
        if handler not in process_logger.handlers:
            process_logger.addHandler(handler)
            process_logger.setLevel(logging.ERROR)
        app.log.redirect_stdouts_to_logger(logging.getLogger("celery.redirected"), loglevel=logging.WARNING)

    setup_logging.connect(ours, weak=False)
    notices = logging.getLogger("celery.worker")
    celery_worker.safe_say = lambda message, _file=None: notices.warning(message.strip())
