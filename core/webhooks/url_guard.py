"""The SSRF guard for URLs the service connects to on a user's behalf (webhooks; dataset imports).

A URL is allowed when it is https and every address its host resolves to is a public unicast one.
Hosts in the development allow-list (`ATELIER_WEBHOOK_ALLOW_HOSTS`, matched against the host as
written: a name, an IP or a CIDR network) may also use http and private addresses.

Checking a name and then letting the HTTP client resolve it again would let a rebinding DNS server
answer "public" to the check and "169.254.169.254" to the connect; `check_url` therefore returns
the address it checked, and callers connect to that address (see core/webhooks/delivery.py).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# glibc's inet_aton accepts "2130706433", "0x7f.1", "0177.0.0.1" and "127.1" as IPv4 addresses, and so
# do browsers and most HTTP clients: such hosts are numbers, never names to look up.
_NUMERIC_HOST = re.compile(r"(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}\.?", re.IGNORECASE)
# IPv6 prefixes that carry an IPv4 address in their low 32 bits (NAT64 well-known and local-use).
_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))
_CGNAT = ipaddress.IPv4Network("100.64.0.0/10")
MAX_URL_LENGTH = 2048


class UrlNotAllowed(ValueError):
    """The URL must not be connected to; `reason` is a stable word, the message is for people."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class CheckedUrl:
    """A URL that passed the guard, with the address to connect to (the one that was checked)."""

    url: str
    scheme: str
    host: str  # as written, lower case, IPv6 without brackets
    port: int
    address: IPAddress
    allow_listed: bool

    @property
    def target(self) -> str:
        """The URL with the checked address in place of the host name."""
        parts = urlsplit(self.url)
        ip = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        path = parts.path or "/"
        return f"{self.scheme}://{ip}:{self.port}{path}" + (f"?{parts.query}" if parts.query else "")

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address the host resolves to (tests replace this to play a hostile DNS server)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]


def forbidden_reason(address: IPAddress) -> str | None:
    """Why the address is not a public unicast one, or None when it is."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            return forbidden_reason(embedded)
    checks = (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link_local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("private", address.is_private),
        ("reserved", address.is_reserved),
        ("shared", isinstance(address, ipaddress.IPv4Address) and address in _CGNAT),
        ("site_local", isinstance(address, ipaddress.IPv6Address) and address.is_site_local),
        # Everything IANA does not mark globally reachable (documentation, benchmarking, 6to4 relays...).
        ("not_global", not address.is_global),
    )
    return next((name for name, hit in checks if hit), None)


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    # ::ffff:127.0.0.1 connects to 127.0.0.1 on a dual-stack socket; 6to4, Teredo and NAT64 gateways
    # forward to their embedded IPv4 address, so each is judged by that address.
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if any(address in net for net in _NAT64):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if int(address) >> 32 == 0 and int(address) > 1:  # deprecated IPv4-compatible ::a.b.c.d
        return ipaddress.IPv4Address(int(address))
    return None


def literal_address(host: str) -> IPAddress | None:
    """The address of a host written as an IP address; None for a name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if not _NUMERIC_HOST.fullmatch(host):
        return None
    try:
        meant = ipaddress.IPv4Address(socket.inet_aton(host.rstrip(".")))
    except OSError as exc:
        raise UrlNotAllowed("invalid_host", f"{host!r} is neither an IP address nor a host name") from exc
    # Refused whatever it stands for: such spellings exist to slip past string checks, and an
    # allow-list entry "127.0.0.1" must not also admit "0x7f.1".
    raise UrlNotAllowed(
        "numeric_host", f"{host!r} is a non-standard spelling of {meant}; write addresses as a.b.c.d"
    )


def _allow_listed(host: str, literal: IPAddress | None, allow_hosts: list[str]) -> bool:
    for entry in allow_hosts:
        entry = entry.strip().lower().rstrip(".").strip("[]")
        if not entry:
            continue
        try:
            network = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            if host == entry:
                return True
            continue
        if literal is not None and literal in network:
            return True
    return False


def _parse(url: str) -> tuple[SplitResult, str, int]:
    if len(url) > MAX_URL_LENGTH:
        raise UrlNotAllowed("too_long", f"the URL is longer than {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UrlNotAllowed("invalid_url", f"not a valid URL: {exc}") from exc
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http"):
        raise UrlNotAllowed("scheme", f"only https URLs are allowed, not {parts.scheme or 'no scheme'!r}")
    if parts.username is not None or parts.password is not None:
        # Credentials in the URL would be echoed in job listings and logs; receivers verify signatures.
        raise UrlNotAllowed("credentials", "URLs with user:password@ are not allowed")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise UrlNotAllowed("invalid_url", "the URL has no host")
    return parts, host, port or (443 if scheme == "https" else 80)


def check_url(url: str, *, allow_hosts: list[str]) -> CheckedUrl:
    """Resolve and check the URL now; raises UrlNotAllowed, or returns the address to connect to."""
    parts, host, port = _parse(url)
    scheme = parts.scheme.lower()
    literal = literal_address(host)
    listed = _allow_listed(host, literal, allow_hosts)
    if scheme == "http" and not listed:
        raise UrlNotAllowed("scheme", "only https URLs are allowed (http only for allow-listed hosts)")
    if literal is not None:
        addresses = [literal]
    else:
        try:
            host.encode("idna")
            addresses = resolve(host, port)
        except (OSError, UnicodeError) as exc:
            raise UrlNotAllowed("unresolvable", f"the host {host!r} does not resolve: {exc}") from exc
        if not addresses:
            raise UrlNotAllowed("unresolvable", f"the host {host!r} has no addresses")
    if not listed:
        # Every answer is checked: a name with one public and one private address is refused, since the
        # connection could go to either.
        for address in addresses:
            reason = forbidden_reason(address)
            if reason is not None:
                raise UrlNotAllowed(
                    reason, f"the host {host!r} resolves to {address}, a {reason.replace('_', ' ')} address"
                )
    return CheckedUrl(url=url, scheme=scheme, host=host, port=port, address=addresses[0], allow_listed=listed)
