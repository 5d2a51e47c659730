"""`coheara serve`: the engine behind native, OpenAI- and Ollama-compatible HTTP APIs."""

from __future__ import annotations

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
) -> None:
    """Serve the model over HTTP until interrupted."""
    import threading

    import uvicorn

    from coheara.audit import AuditLog
    from coheara.engine import Engine
    from coheara.server.app import create_app
    from coheara.tasks import icd10

    # The ICD-10-CM table takes seconds to load: now, beside startup, not on the first SLM-02.
    threading.Thread(target=icd10.preload, name="icd10-preload", daemon=True).start()
    settings = settings_for(backend, host=host, port=port)
    engine = Engine.from_config(model=model, url=url, settings=settings)
    audit = AuditLog.from_settings(settings, default=True)  # on unless turned off
    app = create_app(engine, settings, close_engine=True, audit=audit)
    err_console.print(
        f"coheara serving {settings.backend} backend on http://{settings.host}:{settings.port} "
        "(native /v1/generate, tasks /v1/tasks, OpenAI /v1/chat/completions, Ollama /api/chat)",
        markup=False,
    )
    if audit is None:
        err_console.print(
            "warning: the audit trail is off (COHEARA_AUDIT_ENABLED=false)", markup=False
        )
    else:
        err_console.print(f"audit trail: {audit.path}", markup=False)
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
    finally:
        if audit is not None:
            audit.close()
