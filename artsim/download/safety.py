"""URL and address checks, and HTTP connections pinned to the address that was checked.

Every image URL is hostile until proven otherwise. The rules:

* only ``http``/``https`` (``s3://`` and local files only when ``download.allow_local_files``);
* no credentials in URLs, no empty or non-ASCII-encodable hosts;
* the host name is resolved *once*, every resolved address must be globally routable (no loopback, private,
  link-local such as 169.254.169.254, CGNAT, multicast, reserved, unspecified, nor their IPv6 forms, including
  IPv4-mapped / 6to4 / NAT64 addresses that embed a blocked IPv4 address);
* the connection then goes to the address that was checked (:class:`PinnedHTTPConnection`), with ``Host`` and TLS
  SNI/certificate checks for the *name*, so a second DNS answer (DNS rebinding) can never redirect it;
* the same checks run again on every redirect target.

``allow_hosts`` exempts hosts by the exact host string of the URL (``127.0.0.1``, ``mirror.internal``). An IP entry
exempts that literal in URLs only, never "any name that resolves there": otherwise any attacker-controlled name
pointing at 127.0.0.1 would inherit the exemption.
"""
from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
from dataclasses import dataclass
from typing import Callable, Optional
from urllib.parse import urlsplit, urlunsplit

# A resolver maps (host, port) to candidate IP address strings. The default is the system resolver; tests inject
# one to simulate names that resolve to private addresses without touching /etc/hosts or the network.
Resolver = Callable[[str, int], list[str]]

DNS_CACHE_S = 30.0  # how long a resolved answer is reused (each use is still checked)

_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")


class UnsafeURL(Exception):
    """The URL may not be fetched. ``status`` is the record status to report (invalid_url / blocked_address)."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


def system_resolver(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise OSError(f"cannot resolve {host!r}: {exc.strerror or exc}") from None
    seen: list[str] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        addr = sockaddr[0].split("%", 1)[0]  # drop an IPv6 zone id
        if addr not in seen:
            seen.append(addr)
    return seen


class CachingResolver:
    """Remembers a resolver's answers for ``ttl_s`` (the system resolver does not expose DNS TTLs, so a short bound
    stands in for them), up to ``max_entries`` names. Only the *answers* are cached: :meth:`URLPolicy.check` still
    judges every address of every answer on every use, and a connection is pinned to the address it was checked
    with, so a cached answer can never let a private address through. Failures are not cached."""

    def __init__(self, resolve: Resolver, ttl_s: float = 30.0, max_entries: int = 4096):
        import threading
        import time

        self.resolve = resolve
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = time.monotonic
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, int], tuple[float, list[str]]] = {}
        self.misses = 0

    def __call__(self, host: str, port: int) -> list[str]:
        key = (host, port)
        now = self._clock()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        addresses = self.resolve(host, port)
        with self._lock:
            self.misses += 1
            if len(self._cache) >= self.max_entries:
                self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
                if len(self._cache) >= self.max_entries:
                    self._cache.clear()
            self._cache[key] = (now + self.ttl_s, list(addresses))
        return addresses


def blocked_reason(address: str) -> Optional[str]:
    """Why ``address`` must not be contacted, or None when it is a public unicast address."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address):
        # Addresses that carry an IPv4 address inside are judged by that address.
        embedded = ip.ipv4_mapped or (ip.sixtofour if ip.sixtofour else None)
        if embedded is None and ip.teredo:
            embedded = ip.teredo[1]
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            inner = blocked_reason(str(embedded))
            return f"{inner} (embedded in {ip})" if inner else None
        if ip in _NAT64_LOCAL:
            return "local-use NAT64"
    checks = (
        (ip.is_unspecified, "unspecified"),
        (ip.is_loopback, "loopback"),
        (ip.is_link_local, "link-local"),
        (ip.is_multicast, "multicast"),
        (isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT, "carrier-grade NAT"),
        (ip.is_private, "private"),
        (ip.is_reserved, "reserved"),
        (getattr(ip, "is_site_local", False), "site-local"),
        (not ip.is_global, "not globally routable"),
    )
    for hit, reason in checks:
        if hit:
            return reason
    return None


@dataclass(frozen=True)
class Target:
    """A checked http(s) URL: where to connect (``address``) and what to call it (``host``)."""

    url: str
    scheme: str
    host: str  # as in the URL, lower-case, IDNA-encoded; goes into Host and SNI
    port: int
    path: str  # path + query, what goes on the request line
    address: str  # the checked IP the connection is pinned to


def normalize_host(host: str) -> str:
    host = host.strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


class URLPolicy:
    """Checks URLs and resolves them to a pinned :class:`Target`."""

    def __init__(self, allow_private_addresses: bool = False, allow_hosts: tuple[str, ...] | list[str] = (),
                 allow_local_files: bool = False, resolver: Optional[Resolver] = None):
        self.allow_private_addresses = allow_private_addresses
        self.allow_hosts = frozenset(normalize_host(h) for h in allow_hosts)
        self.allow_local_files = allow_local_files
        # The system resolver behind a short cache: a host with thousands of images is resolved about once per
        # DNS_CACHE_S, not once per image. An injected resolver (tests) is used as given.
        self.resolver = resolver or CachingResolver(system_resolver, DNS_CACHE_S)

    def scheme_of(self, url: str) -> str:
        """Classify a URL: 'http' (http/https), 'local' (s3, file, plain path) or raise UnsafeURL."""
        if not isinstance(url, str) or not url.strip():
            raise UnsafeURL("invalid_url", "empty URL")
        if any(c in url for c in "\r\n\t\x00"):
            raise UnsafeURL("invalid_url", "control characters in URL")
        scheme = urlsplit(url.strip()).scheme.lower()
        if scheme in ("http", "https"):
            return "http"
        if scheme in ("s3", "file", ""):
            if not self.allow_local_files:
                raise UnsafeURL("invalid_url", f"scheme {scheme or 'local path'!r} needs download.allow_local_files")
            return "local"
        raise UnsafeURL("invalid_url", f"unsupported scheme {scheme!r} (only http and https)")

    def check(self, url: str) -> Target:
        """Parse, validate and resolve an http(s) URL; raises UnsafeURL. Resolution errors raise OSError."""
        try:
            parts = urlsplit(url.strip())
            port = parts.port
        except ValueError as exc:
            raise UnsafeURL("invalid_url", f"malformed URL: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise UnsafeURL("invalid_url", f"unsupported scheme {scheme!r} (only http and https)")
        if parts.username is not None or parts.password is not None:
            raise UnsafeURL("invalid_url", "credentials in URL")
        raw_host = parts.hostname or ""
        if not raw_host:
            raise UnsafeURL("invalid_url", "URL has no host")
        host = normalize_host(raw_host)
        try:
            host_ascii = host if _is_ip(host) else host.encode("idna").decode("ascii")
        except UnicodeError:
            raise UnsafeURL("invalid_url", f"host {raw_host!r} is not a valid domain name") from None
        port = port or (443 if scheme == "https" else 80)
        if not 0 < port < 65536:
            raise UnsafeURL("invalid_url", f"bad port {port}")
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        if any(ord(c) < 0x21 or ord(c) > 0x7E for c in path):
            # Keep the request line ASCII; quote what the source left unquoted.
            from urllib.parse import quote

            path = quote(path, safe="/?&=%:;@+$,!~*'()[]#-._")
        addresses = self.resolver(host_ascii, port)
        if not addresses:
            raise OSError(f"cannot resolve {host_ascii!r}: no addresses")
        exempt = self.allow_private_addresses or host_ascii in self.allow_hosts
        if not exempt:
            # Every answer must be safe: picking the one good answer out of a mixed set is what rebinding exploits.
            for address in addresses:
                reason = blocked_reason(address)
                if reason:
                    where = address if address == host_ascii else f"{host_ascii} resolves to {address}"
                    raise UnsafeURL("blocked_address", f"{where}: {reason} address refused")
        clean = urlunsplit((scheme, parts.netloc, parts.path or "/", parts.query, ""))
        return Target(url=clean, scheme=scheme, host=host_ascii, port=port, path=path, address=addresses[0])


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


class PinnedHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection to a fixed IP address; ``Host`` carries the name given as ``host``."""

    def __init__(self, target: Target, timeout: float):
        super().__init__(target.host, target.port, timeout=timeout)
        self._address = target.address
        self.raw_sock: Optional[socket.socket] = None

    def connect(self):
        self.sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # http.client drops .sock when the response takes the connection over; deadlines need the socket itself.
        self.raw_sock = self.sock


class PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a fixed IP address; SNI and certificate verification use the host name."""

    def __init__(self, target: Target, timeout: float, context: Optional[ssl.SSLContext] = None):
        context = context or ssl.create_default_context()
        super().__init__(target.host, target.port, timeout=timeout, context=context)
        self._address = target.address
        self._ssl_context = context
        self.raw_sock: Optional[socket.socket] = None

    def connect(self):
        sock = socket.create_connection((self._address, self.port), self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = self._ssl_context.wrap_socket(sock, server_hostname=self.host)
        self.raw_sock = self.sock


def open_connection(target: Target, timeout: float) -> http.client.HTTPConnection:
    if target.scheme == "https":
        return PinnedHTTPSConnection(target, timeout)
    return PinnedHTTPConnection(target, timeout)
