"""Host and cross-site checks, so a web page a user visits cannot drive the API through the browser.

Why: the embedded `rigl serve` runs without API keys. A page on any site could then (a) rebind its
own DNS name to 127.0.0.1 and read the API as "same origin" (DNS rebinding: its requests carry
`Host: attacker.example`), or (b) send "simple" cross-site requests that need no CORS pre-flight
(a `text/plain` upload, an empty POST to cancel a job). So:

- `Host` must be one of `allowed_hosts` (names, `*` for any) or an IP address literal (a browser
  only sends an IP as Host when the page itself was loaded from that IP: no rebinding) → else 400.
- POST/PUT/PATCH/DELETE are refused (403) when their `Origin` is neither this server's own
  (`Origin` host:port equal to `Host`) nor one of `allowed_origins`; without `Origin`, when
  `Sec-Fetch-Site` says `cross-site`/`same-site`; and whenever their Content-Type is one a browser
  may send cross-site without a pre-flight (`text/plain`, form encodings). JSON bodies and raw
  uploads (`application/octet-stream`) are unaffected; so are clients that are not browsers.

Pure ASGI (no body buffering) and installed outermost, so a refused request costs nothing.
"""

from __future__ import annotations

import ipaddress
import json
from urllib.parse import urlsplit

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
SIMPLE_CONTENT_TYPES = frozenset({"text/plain", "application/x-www-form-urlencoded", "multipart/form-data"})
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def split_list(value: str | None) -> list[str] | None:
    """'a, b' → ['a', 'b']; None stays None (not configured)."""
    if value is None:
        return None
    return [item.strip() for item in value.split(",") if item.strip()]


def host_name(host_header: str) -> str:
    """'Example.COM:8000' → 'example.com'; '[::1]:8000' → '::1'."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def default_allowed_hosts(bind_host: str) -> list[str]:
    """Loopback names and the name `rigl serve --host` binds; for a wildcard bind (0.0.0.0, ::)
    also this machine's host names. IP literals are always answered (see the module docstring)."""
    import socket

    hosts = [*LOOPBACK_NAMES, host_name(bind_host)]
    if bind_host in ("0.0.0.0", "::", ""):
        hosts += [socket.gethostname().lower(), socket.getfqdn().lower()]
    return list(dict.fromkeys(h for h in hosts if h))


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class OriginGuard:
    """ASGI middleware. `allowed_hosts=None` checks no Host (an app built directly, e.g. in tests);
    `rigl serve` always passes a list: RIGL_ALLOWED_HOSTS, else `default_allowed_hosts` with API
    keys off and `*` with keys on (a rebinding page cannot get a key, and sees only /healthz)."""

    def __init__(self, app, allowed_hosts: list[str] | None = None, allowed_origins: list[str] | None = None):
        self.app = app
        hosts = None if allowed_hosts is None else [host_name(h) for h in allowed_hosts]
        self.any_host = hosts is None or "*" in hosts
        self.hosts = frozenset(hosts or ())
        self.origins = frozenset(o.strip().rstrip("/").lower() for o in (allowed_origins or ()))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers: dict[str, str] = {}
        for name, value in scope.get("headers", []):
            headers.setdefault(name.decode("latin-1"), value.decode("latin-1"))
        refusal = self._check_host(headers.get("host"))
        if refusal is None and scope["method"] in UNSAFE_METHODS:
            refusal = self._check_cross_site(headers)
        if refusal is not None:
            return await _send_error(send, *refusal)
        return await self.app(scope, receive, send)

    def _check_host(self, host: str | None):
        if self.any_host:
            return None
        name = host_name(host or "")
        if name and (name in self.hosts or _is_ip(name)):
            return None
        shown = (host or "")[:100]
        return (400, "invalid_host",
                f"this server does not answer to Host {shown!r}; use its address or set RIGL_ALLOWED_HOSTS", "Host")

    def _check_cross_site(self, headers: dict[str, str]):
        origin = headers.get("origin")
        if origin is not None:
            if not self._origin_allowed(origin, headers.get("host", "")):
                return (403, "cross_site_request",
                        "requests that change state are refused from another site's page "
                        "(add the site to RIGL_ALLOWED_ORIGINS if it is yours)", "Origin")
        elif headers.get("sec-fetch-site", "").strip().lower() in ("cross-site", "same-site"):
            return (403, "cross_site_request", "requests that change state are refused from another site's page",
                    "Sec-Fetch-Site")
        media_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media_type in SIMPLE_CONTENT_TYPES:
            return (403, "cross_site_request",
                    f"Content-Type {media_type} is refused here (a browser sends it cross-site without asking): "
                    "send JSON as application/json and uploads as application/octet-stream", "Content-Type")
        return None

    def _origin_allowed(self, origin: str, host: str) -> bool:
        origin = origin.strip().rstrip("/").lower()
        if origin in self.origins:
            return True
        if origin == "null":  # sandboxed frames, file:// pages
            return False
        netloc = urlsplit(origin).netloc
        if not netloc or not host:
            return False
        scheme = urlsplit(origin).scheme
        host = host.strip().lower()
        default = {"http": ":80", "https": ":443"}.get(scheme, "")
        return netloc == host or netloc + default == host or netloc == host.removesuffix(default)


async def _send_error(send, status: int, code: str, message: str, field: str) -> None:
    body = json.dumps({"error": {"code": code, "message": message, "field": field}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
