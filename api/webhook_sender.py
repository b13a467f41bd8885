"""The API's webhook sender: a background loop (store/background.py) that sends due deliveries.

Each pass takes the deliveries that are due (store/webhooks.py `due`: a compare-and-set, so replicas
never send one attempt twice), checks the endpoint's address again (api/webhook_address.py: the host
may resolve elsewhere since it was created), POSTs the stored body to the checked address with the
signature, and records the attempt. 2xx is delivered; anything else (a status, a timeout, a refused
address) is retried with backoff until `webhook_max_attempts`. Redirects are not followed (a 3xx is a
failed attempt: a redirect could point anywhere), and at most 1 KiB of the answer is read.

Signature (as Stripe's): `Rigl-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>" keyed
with the endpoint's secret>`; docs/guide/webhooks.md shows the receiver's check.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import logging
import socket
import ssl
import time

from api.webhook_address import AddressRefused, Target, resolve
from store import webhooks
from store.background import BackgroundLoop
from store.jobs import JobStore
from store.settings import Settings

log = logging.getLogger("rigl.webhooks")
SIGNATURE_HEADER = "Rigl-Signature"
USER_AGENT = "rigl-webhooks/1"


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The Rigl-Signature header's value for `body` sent at `timestamp`."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


class _PinnedHTTP(http.client.HTTPConnection):
    """Connects to the checked address, whatever the host name would resolve to now."""

    def __init__(self, target: Target, timeout: float):
        super().__init__(target.host, target.port, timeout=timeout)
        self.address = target.address

    def connect(self):
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """The same over TLS, the certificate checked against the host name (SNI too)."""

    def __init__(self, target: Target, timeout: float):
        super().__init__(target.host, target.port, timeout=timeout, context=ssl.create_default_context())
        self.address = target.address

    def connect(self):
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def post(url: str, body: bytes, headers: dict, settings: Settings) -> tuple[int | None, str | None]:
    """One attempt: (HTTP status or None, error or None)."""
    try:
        target = resolve(url, settings)
    except AddressRefused as exc:
        return None, f"refused: {exc}"
    connection = (_PinnedHTTPS if target.scheme == "https" else _PinnedHTTP)(target, settings.webhook_timeout_seconds)
    try:
        connection.request("POST", target.path, body=body, headers={**headers, "Host": _host_header(target)})
        response = connection.getresponse()
        response.read(1024)
        return response.status, None
    except (OSError, http.client.HTTPException) as exc:
        return None, f"{type(exc).__name__}: {exc}"[:500]
    finally:
        connection.close()


def _host_header(target: Target) -> str:
    host = f"[{target.host}]" if ":" in target.host else target.host
    default = 443 if target.scheme == "https" else 80
    return host if target.port == default else f"{host}:{target.port}"


class WebhookSender(BackgroundLoop):
    idle = int  # a failed pass sent nothing

    def __init__(self, store: JobStore, settings: Settings):
        super().__init__("rigl-webhooks", settings.webhook_interval_seconds, log)
        self.store, self.settings = store, settings
        self.prune_at = 0.0  # the first pass prunes

    def work(self) -> int:
        """One pass (`run_once`): send every due delivery; how many attempts were made. About once an hour,
        prune finished deliveries past webhooks.KEEP_DAYS."""
        if time.monotonic() >= self.prune_at:
            self.prune_at = time.monotonic() + 3600
            webhooks.prune(self.store)
        sent = 0
        while batch := webhooks.due(self.store):
            for delivery, hook in batch:
                self.attempt(delivery, hook)
                sent += 1
            if self.stopping.is_set():
                break
        return sent

    def attempt(self, delivery, hook) -> str:
        body = delivery.payload.encode()
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT,
                   SIGNATURE_HEADER: sign(hook.secret, body, int(time.time())),
                   "Rigl-Event-Id": delivery.event_id, "Rigl-Event-Type": delivery.event_type,
                   "Rigl-Delivery-Id": delivery.id}
        start = time.perf_counter()
        status, error = post(hook.url, body, headers, self.settings)
        duration_ms = round((time.perf_counter() - start) * 1000, 1)
        ok = status is not None and 200 <= status < 300
        if status is not None and not ok:
            error = f"HTTP {status}" + (" (redirects are not followed)" if 300 <= status < 400 else "")
        outcome = webhooks.record(self.store, delivery.id, {"status_code": status, "error": error,
                                                            "duration_ms": duration_ms},
                                  ok, self.settings.webhook_max_attempts, self.settings.webhook_retry_base_seconds)
        if not ok:
            log.info("webhook %s delivery %s attempt %d: %s (%s)", hook.id, delivery.id, delivery.attempts + 1,
                     error, outcome)
        return outcome
