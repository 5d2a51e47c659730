"""`coheara serve`: the engine behind native, OpenAI- and Ollama-compatible HTTP APIs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from coheara.cli.common import (
    BackendOption,
    ModelOption,
    UrlOption,
    err_console,
    settings_for,
)


def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 11435).")] = None,
    backend: BackendOption = None,
    model: ModelOption = None,
    url: UrlOption = None,
    tls_cert: Annotated[
        Path | None, typer.Option("--tls-cert", help="PEM certificate: serve HTTPS.")
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option("--tls-key", help="PEM private key of --tls-cert.")
    ] = None,
) -> None:
    """Serve the model over HTTP until interrupted.

    Without an active API key (`coheara keys create`) it listens on loopback only."""
    import threading

    import uvicorn

    from coheara.access.auth import Access
    from coheara.access.bind import bind_warning, check_bind, check_tls, is_loopback_bind
    from coheara.access.keys import KeyStore
    from coheara.audit import AuditLog
    from coheara.engine import Engine
    from coheara.logs import configure_logging
    from coheara.server.app import create_app
    from coheara.tasks import icd10

    settings = settings_for(
        backend, host=host, port=port, tls_certfile=tls_cert, tls_keyfile=tls_key
    )
    keys = KeyStore(settings.keys_path)
    check_bind(settings.host, keys.active_count())  # before anything else starts
    tls = check_tls(settings.tls_certfile, settings.tls_keyfile)
    # Off loopback a key is needed even if every key is later revoked: never open there.
    access = Access(keys, required=not is_loopback_bind(settings.host))
    # The ICD-10-CM table takes seconds to load: now, beside startup, not on the first SLM-02.
    threading.Thread(target=icd10.preload, name="icd10-preload", daemon=True).start()
    configure_logging(settings)  # JSON or text lines; our access log replaces uvicorn's
    engine = Engine.from_config(model=model, url=url, settings=settings)
    audit = AuditLog.from_settings(settings, default=True)  # on unless turned off
    app = create_app(engine, settings, close_engine=True, audit=audit, access=access)
    err_console.print(
        f"coheara serving {settings.backend} backend on "
        f"{'https' if tls else 'http'}://{settings.host}:{settings.port} "
        "(native /v1/generate, tasks /v1/tasks, OpenAI /v1/chat/completions, Ollama /api/chat)",
        markup=False,
    )
    warning = bind_warning(settings.host, tls)
    if warning is not None:
        err_console.print(warning, markup=False)
    if audit is None:
        err_console.print(
            "warning: the audit trail is off (COHEARA_AUDIT_ENABLED=false)"
            + (": no content is retained either" if settings.audit_retain_content else ""),
            markup=False,
        )
    else:
        err_console.print(f"audit trail: {audit.path}", markup=False)
    try:
        uvicorn.run(
            app,
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            log_config=None,  # configure_logging's handler, not uvicorn's
            access_log=False,  # uvicorn's prints raw paths; AccessLogMiddleware logs routes
            ssl_certfile=tls.certfile if tls else None,
            ssl_keyfile=tls.keyfile if tls else None,
        )
    finally:
        if audit is not None:
            audit.close()
