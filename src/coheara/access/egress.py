"""The egress guard: patient data goes only to loopback or a host the site allowed.

A backend URL is checked when the backend is built (start-up), never per request. Only
literal addresses and the name `localhost` count as loopback: a name is not resolved,
because what it resolves to can change after the check.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit, urlunsplit

from coheara.errors import ConfigurationError

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def host_of(url: str) -> str:
    """The host of `url`, lower case, without brackets, port or credentials."""
    try:
        host = urlsplit(url if "://" in url else f"http://{url}").hostname
    except ValueError:
        host = None
    if not host:
        raise ConfigurationError("a backend URL has no host", hint="e.g. http://127.0.0.1:11434")
    return host.lower().rstrip(".")


def public_url(url: str) -> str:
    """`url` as logs, metrics, results and audit records may show it: scheme, host, port and
    path; never a user name, password, query or fragment (where credentials travel). A
    name that is not a URL keeps what follows its last `@`."""
    text = url.strip()
    if "://" not in text:
        return text.rsplit("@", 1)[-1][:200]
    try:
        parts = urlsplit(text)
        host, port = parts.hostname or "", parts.port
    except ValueError:
        return ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))[:200]


def _address(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def is_loopback(host: str) -> bool:
    address = _address(host)
    if address is None:
        return host == "localhost"
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


def _allowed(host: str, allowed: Iterable[str]) -> bool:
    address = _address(host)
    for entry in allowed:
        entry = entry.strip().lower().strip("[]").rstrip(".")
        if not entry:
            continue
        if address is not None and ("/" in entry or _address(entry) is not None):
            try:
                if address in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                continue
        elif entry == host:
            return True
    return False


def check_backend_url(url: str, allowed: Iterable[str]) -> None:
    """Refuse (ConfigurationError) a backend URL that is neither loopback nor allowed."""
    host = host_of(url)
    if is_loopback(host) or _allowed(host, allowed):
        return
    raise ConfigurationError(
        f"refusing to send requests to backend host {host}: it is not loopback and not in "
        "allowed_backend_hosts (patient data must not leave the site by a configuration slip)",
        hint=f"if {host} is inside the site, set COHEARA_ALLOWED_BACKEND_HOSTS={host}",
    )
