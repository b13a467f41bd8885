"""Where a webhook may send: the one rule, checked when an endpoint is created and again before every
attempt (its host may resolve elsewhere by then: DNS rebinding).

A webhook URL is http or https to a host whose every resolved address is public: not private, loopback,
link-local (169.254.169.254 is the cloud metadata service), multicast, reserved, unspecified or
otherwise not globally routable, an IPv4-mapped IPv6 address judged as its IPv4 one. The operator
opens more: `webhook_allow_private` (private and loopback ranges, for an internal receiver or a
development machine) and `webhook_allowed_networks` (CIDRs, any kind). The attempt then connects to
the address that was checked (api/webhook_sender.py), never resolving the name a second time.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from store.settings import Settings

MAX_URL = 2048
PRIVATE = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8",
                                              "::1/128", "fc00::/7")]


class AddressRefused(ValueError):
    """The URL may not be used; the message says why (a 422 naming `url` at creation)."""


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str  # as written (the Host header and the TLS server name)
    port: int
    path: str  # with the query
    address: str  # the checked IP to connect to


def networks(settings: Settings) -> list:
    try:
        return [ipaddress.ip_network(part.strip(), strict=False)
                for part in settings.webhook_allowed_networks.split(",") if part.strip()]
    except ValueError as exc:
        raise AddressRefused(f"RIGL_WEBHOOK_ALLOWED_NETWORKS is not a list of CIDRs: {exc}") from None


def allowed(address: str, settings: Settings) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])  # an IPv6 zone id is not part of the address
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip in network for network in networks(settings) if network.version == ip.version):
        return True
    if settings.webhook_allow_private and any(ip in n for n in PRIVATE if n.version == ip.version):
        return True
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified or ip.is_link_local)


def parse(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path) of an http(s) URL, or AddressRefused."""
    if len(url) > MAX_URL:
        raise AddressRefused(f"at most {MAX_URL} characters")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise AddressRefused("must be an http:// or https:// URL")
    if parts.username or parts.password:
        raise AddressRefused("must not hold a user name or password")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise AddressRefused("has an invalid port") from None
    if not parts.hostname:
        raise AddressRefused("must name a host")
    return parts.scheme, parts.hostname, port, (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def resolve(url: str, settings: Settings) -> Target:
    """The URL's target with an address it may connect to; AddressRefused naming the refused address."""
    scheme, host, port, path = parse(url)
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise AddressRefused(f"host {host!r} does not resolve ({exc})") from None
    addresses = list(dict.fromkeys(info[4][0] for info in found))
    refused = [address for address in addresses if not allowed(address, settings)]
    if refused or not addresses:
        raise AddressRefused(f"host {host!r} resolves to {', '.join(refused) or 'nothing'}, which webhooks may "
                             "not reach (private, loopback, link-local or reserved; the operator allows more "
                             "with RIGL_WEBHOOK_ALLOW_PRIVATE or RIGL_WEBHOOK_ALLOWED_NETWORKS)")
    return Target(scheme, host, port, path, addresses[0])
