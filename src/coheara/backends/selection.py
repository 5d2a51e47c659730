"""Which backend serves a request: named explicitly, or `auto`.

`auto` prefers an Ollama that has the model, then a configured local
Transformers model, and otherwise says how to get either.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from contextlib import aclosing

from coheara.access.egress import check_backend_url, public_url
from coheara.backends.base import (
    Backend,
    Capabilities,
    ChatRequest,
    EndpointStatus,
    Health,
    StreamEvent,
)
from coheara.errors import BackendUnavailableError, CohearaError, ConfigurationError
from coheara.settings import Settings, normalize_ollama_host


def create_backend(
    settings: Settings, *, model: str | None = None, url: str | None = None
) -> Backend:
    name = settings.backend
    model = model or settings.model
    if settings.backend_replicas and name in ("ollama", "openai"):
        return _pool(settings, model=model, url=url)
    if settings.backend_replicas and name == "transformers":
        raise ConfigurationError(
            "backend_replicas needs a remote runtime (ollama or openai), not transformers",
            hint="set COHEARA_BACKEND=ollama or openai, or unset COHEARA_BACKEND_REPLICAS",
        )
    if name == "auto" and settings.backend_replicas:
        replica_urls(settings, url)  # refused at start-up, not when auto first probes
    if name in ("ollama", "auto"):
        check_backend_url(url or settings.ollama_url, settings.allowed_backend_hosts)
    elif name == "openai":
        check_backend_url(url or settings.openai_url, settings.allowed_backend_hosts)
    if name == "ollama":
        from coheara.backends.ollama import OllamaBackend

        return OllamaBackend(
            url=url or settings.ollama_url,
            model=model or settings.ollama_model,
            num_ctx=settings.num_ctx,
            timeout_s=settings.timeout_s,
            connect_timeout_s=settings.connect_timeout_s,
            keep_alive=settings.ollama_keep_alive,
        )
    if name == "openai":
        from coheara.backends.openai_compat import OpenAIBackend

        return OpenAIBackend(
            base_url=url or settings.openai_url,
            model=model or settings.openai_model,
            api_key=settings.openai_api_key.get_secret_value(),
            context_length=settings.openai_context_length,
            vision=settings.openai_vision,
            timeout_s=settings.timeout_s,
            connect_timeout_s=settings.connect_timeout_s,
        )
    if name == "transformers":
        path = model or settings.transformers_model
        if not path:
            raise ConfigurationError(
                "no Transformers model configured",
                hint="pass --model PATH or set COHEARA_TRANSFORMERS_MODEL to a weights folder",
            )
        try:
            from coheara.backends.transformers_backend import TransformersBackend
        except ImportError:
            raise ConfigurationError(
                "the Transformers backend needs the optional dependencies",
                hint="pip install 'coheara[transformers]' (with torch pinned for your platform)",
            ) from None
        return TransformersBackend(
            path,
            device=settings.transformers_device,
            dtype=settings.transformers_dtype,
            allow_download=settings.allow_download,
            adapters_dir=settings.adapters_dir,
        )
    return AutoBackend(settings, model=model, url=url)


def replica_urls(settings: Settings, url: str | None = None) -> list[str]:
    """The configured URL (or `url`), then each replica, once each, every one through the
    egress guard (a replica is as able as the main URL to carry patient data off site)."""
    if settings.backend == "openai":
        candidates = [url or settings.openai_url, *settings.backend_replicas]
        normal = [candidate.strip().rstrip("/") for candidate in candidates]
    else:
        candidates = [url or settings.ollama_url, *settings.backend_replicas]
        normal = [normalize_ollama_host(candidate) for candidate in candidates]
    urls: list[str] = []
    for candidate in normal:
        check_backend_url(candidate, settings.allowed_backend_hosts)
        if candidate not in urls:
            urls.append(candidate)
    return urls


def _pool(settings: Settings, *, model: str | None, url: str | None) -> Backend:
    """One backend per URL (same runtime, same model), behind a `PooledBackend`."""
    from coheara.backends.pool import PooledBackend

    urls = replica_urls(settings, url)
    single = settings.model_copy(update={"backend_replicas": []})
    return PooledBackend(
        [(each, create_backend(single, model=model, url=each)) for each in urls],
        health_interval_s=settings.health_interval_s,
        eject_after_failures=settings.eject_after_failures,
    )


class AutoBackend(Backend):
    """Resolves to a concrete backend on first use, then delegates to it."""

    name = "auto"

    def __init__(self, settings: Settings, *, model: str | None, url: str | None) -> None:
        self._settings = settings
        self._model = model
        self._url = url
        self._chosen: Backend | None = None
        self._lock = asyncio.Lock()

    async def resolve(self) -> Backend:
        """Probe once, even when the first requests arrive together."""
        async with self._lock:
            if self._chosen is None:
                self._chosen = await self._probe()
            return self._chosen

    async def _probe(self) -> Backend:
        reasons: list[str] = []
        where = public_url(self._url or self._settings.ollama_url)
        ollama = create_backend(
            self._settings.model_copy(update={"backend": "ollama"}),
            model=self._model,
            url=self._url,
        )
        health = await ollama.health()
        if health.ok:
            try:
                await ollama.capabilities()
                return ollama
            except CohearaError as exc:
                reasons.append(f"Ollama at {where}: {exc}")
        else:
            reasons.append(f"Ollama at {where}: {health.detail}")
        await ollama.aclose()
        if self._settings.transformers_model or (self._model and not self._url):
            return create_backend(
                self._settings.model_copy(update={"backend": "transformers"}), model=self._model
            )
        reasons.append("no local Transformers model configured (COHEARA_TRANSFORMERS_MODEL)")
        raise BackendUnavailableError(
            "no backend available: " + "; ".join(reasons),
            hint=(
                f"start Ollama and run `ollama pull {self._settings.ollama_model}`, or set "
                "COHEARA_TRANSFORMERS_MODEL to a local MedGemma folder"
            ),
        )

    @property
    def model(self) -> str:  # type: ignore[override]
        return self._chosen.model if self._chosen else (self._model or "")

    @property
    def context_window(self) -> int | None:
        return self._chosen.context_window if self._chosen else None

    def count_prompt_tokens(self, request: ChatRequest) -> int | None:
        return self._chosen.count_prompt_tokens(request) if self._chosen else None

    def endpoints(self) -> list[EndpointStatus]:
        return self._chosen.endpoints() if self._chosen else super().endpoints()

    async def readiness(self, timeout_s: float) -> list[EndpointStatus]:
        """The chosen backend's readiness; before the first call, probing for one."""
        if self._chosen is None:
            return await super().readiness(timeout_s)
        return await self._chosen.readiness(timeout_s)

    async def stream(self, request: ChatRequest) -> AsyncGenerator[StreamEvent, None]:
        backend = await self.resolve()
        events = backend.stream(request)
        async with aclosing(events):
            async for event in events:
                yield event

    async def capabilities(self) -> Capabilities:
        return await (await self.resolve()).capabilities()

    async def health(self) -> Health:
        try:
            backend = await self.resolve()
        except CohearaError as exc:
            return Health(False, "auto", str(exc))
        return await backend.health()

    async def aclose(self) -> None:
        if self._chosen is not None:
            await self._chosen.aclose()
