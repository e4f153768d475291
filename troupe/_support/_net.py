"""Address helpers shared by the socket transports: routable host detection, host:port text.

A worker bound to "any" (``0.0.0.0`` / ``::``) or to an auto-detected host must advertise an
address other processes can reach, never the wildcard itself. Pure functions, no sockets kept.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from troupe.errors import TransportError

__all__ = ["WILDCARD_HOSTS", "advertised_host", "detect_host", "format_hostport", "split_address"]

WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", "*", ""})

# A documentation-range address: connecting a UDP socket to it selects the outgoing interface
# without sending a single packet.
_PROBE_ADDRESS = ("192.0.2.1", 9)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def detect_host() -> str:
    """Best guess at this machine's routable IPv4 address; ``127.0.0.1`` when there is none.

    Tries the host name's addresses first, then the interface the kernel would route through
    (a UDP ``connect`` sends nothing).
    """
    try:
        candidates = socket.gethostbyname_ex(socket.gethostname())[2]
    except OSError:
        candidates = []
    for candidate in candidates:
        if not _is_loopback(candidate):
            return candidate
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(_PROBE_ADDRESS)
            host = str(probe.getsockname()[0])
    except OSError:
        return "127.0.0.1"
    return host if host not in WILDCARD_HOSTS else "127.0.0.1"


def advertised_host(bound_host: str) -> str:
    """The host to advertise for a server bound to ``bound_host``."""
    if bound_host in WILDCARD_HOSTS:
        return detect_host()
    return bound_host


def format_hostport(host: str, port: int) -> str:
    """``host:port``, with IPv6 literals bracketed."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def split_address(address: str, scheme: str) -> tuple[str, int]:
    """Split ``scheme://host:port`` into host and port.

    Raises:
        TransportError: the address has another scheme, or no host or port.
    """
    parts = urlsplit(address)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != scheme or not parts.hostname or port is None:
        raise TransportError(
            f"malformed {scheme} address {address!r}: expected {scheme}://host:port",
            address=address,
        )
    return parts.hostname, port
