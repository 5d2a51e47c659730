"""Where `coheara serve` may listen, and with which certificate: decided before it binds.

Without an active API key the server is a single-user tool: loopback only. Asked to
listen anywhere else (0.0.0.0, ::, a LAN address, a host name) without one, it refuses
to start rather than serve patient data to the network unauthenticated. TLS is optional;
a non-loopback bind without it works but is warned about (keys travel in the clear).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from coheara.access.egress import is_loopback
from coheara.errors import ConfigurationError


def is_loopback_bind(host: str) -> bool:
    """Whether a bind address (`127.0.0.1`, `[::1]`, `localhost`, ...) is this machine only."""
    return is_loopback(host.strip().strip("[]").lower().rstrip("."))


def check_bind(host: str, active_keys: int) -> None:
    """ConfigurationError unless `host` is loopback or at least one key is active."""
    if is_loopback_bind(host) or active_keys > 0:
        return
    raise ConfigurationError(
        f"refusing to listen on {host}: it is not loopback and there is no active API key, "
        "so anyone on the network could call the model",
        hint="create one with `coheara keys create NAME`, or serve on --host 127.0.0.1",
    )


@dataclass(frozen=True)
class Tls:
    certfile: Path
    keyfile: Path


def check_tls(certfile: Path | None, keyfile: Path | None) -> Tls | None:
    """Both files, readable and matching (loaded once here, as the server will), or neither."""
    if certfile is None and keyfile is None:
        return None
    if certfile is None or keyfile is None:
        given, missing = ("certificate", "key") if keyfile is None else ("key", "certificate")
        raise ConfigurationError(
            f"TLS needs both a certificate and a key: the {given} is set, the {missing} is not",
            hint="set both --tls-cert and --tls-key (COHEARA_TLS_CERTFILE, COHEARA_TLS_KEYFILE)",
        )
    certfile, keyfile = certfile.expanduser(), keyfile.expanduser()
    for what, path in (("certificate", certfile), ("key", keyfile)):
        try:
            with path.open("rb") as handle:
                handle.read(1)
        except OSError as exc:
            raise ConfigurationError(f"cannot read the TLS {what} {path}: {exc.strerror}") from None
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(certfile, keyfile)
    except (ssl.SSLError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or type(exc).__name__
        raise ConfigurationError(
            f"the TLS certificate {certfile} and key {keyfile} cannot be used ({reason})",
            hint="give a PEM certificate and its own unencrypted PEM private key",
        ) from None
    return Tls(certfile, keyfile)


def bind_warning(host: str, tls: Tls | None) -> str | None:
    """The one line to print when a non-loopback bind is served without TLS."""
    if tls is not None or is_loopback_bind(host):
        return None
    return (
        f"warning: serving {host} without TLS: API keys and patient data cross the network "
        "in the clear (set --tls-cert and --tls-key, or put a TLS proxy in front)"
    )
