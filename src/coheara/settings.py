"""All configuration, read once: `COHEARA_*` environment variables, then a TOML file.

No other module reads the environment. Precedence, highest first: explicit
arguments, environment, the TOML file (`COHEARA_CONFIG`, else
`./coheara.toml`, else `~/.config/coheara/config.toml`), defaults.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from coheara import model_facts

if TYPE_CHECKING:
    from coheara.imaging.limits import ImageLimits

BackendName = Literal["auto", "ollama", "openai", "transformers"]


def normalize_ollama_host(value: str) -> str:
    """Read OLLAMA_HOST as Ollama and its official client do.

    `host`, `host:port` and `:port` mean http on port 11434 by default; a URL with a
    scheme but no port means that scheme's own port (80 or 443). A bind-all address
    means this machine.
    """
    value = value.strip().rstrip("/")
    scheme, has_scheme, rest = value.partition("://")
    if not has_scheme:
        scheme, rest = "http", value
    host, _, port = rest.partition(":")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    if not port:
        port = "11434" if not has_scheme else ("443" if scheme == "https" else "80")
    return f"{scheme}://{host}:{port}"


def data_dir() -> Path:
    """The platform's user data directory (XDG on Linux): `$XDG_DATA_HOME/coheara`, else
    `~/.local/share/coheara`."""
    base = os.environ.get("XDG_DATA_HOME") or ""
    root = Path(base) if Path(base).is_absolute() else Path.home() / ".local" / "share"
    return root / "coheara"


def default_audit_path() -> Path:
    return data_dir() / "audit.sqlite3"


def default_keys_path() -> Path:
    return data_dir() / "keys.json"


def default_adapters_dir() -> Path:
    return data_dir() / "adapters"


CommaList = Annotated[list[str], NoDecode]
"""A list setting: a TOML array, or in the environment a comma-separated string."""


def config_file() -> Path | None:
    explicit = os.environ.get("COHEARA_CONFIG")
    if explicit:
        return Path(explicit)
    for candidate in (Path("coheara.toml"), Path.home() / ".config" / "coheara" / "config.toml"):
        if candidate.is_file():
            return candidate
    return None


class Settings(BaseSettings):
    """Every setting, typed. Environment variable names are `COHEARA_` + the field name."""

    model_config = SettingsConfigDict(env_prefix="COHEARA_", extra="ignore")

    backend: BackendName = "auto"
    model: str | None = Field(
        default=None, description="Model id or path for the chosen backend (else its default)."
    )

    ollama_url: str = Field(
        default_factory=lambda: normalize_ollama_host(
            os.environ.get("OLLAMA_HOST", "http://127.0.0.1:11434")
        )
    )
    ollama_model: str = model_facts.DEFAULT_OLLAMA_MODEL
    num_ctx: int = Field(
        default=8192,
        ge=512,
        le=model_facts.CONTEXT_LENGTH,
        description="Context window sent on every Ollama call; one value per deployment.",
    )
    ollama_keep_alive: str | None = None

    openai_url: str = "http://127.0.0.1:8000/v1"
    openai_model: str = model_facts.DEFAULT_HF_MODEL
    openai_api_key: SecretStr = SecretStr("not-needed")
    openai_context_length: int = Field(default=model_facts.CONTEXT_LENGTH, ge=512)
    openai_vision: bool = Field(
        default=True, description="Whether the OpenAI-compatible server's model reads images."
    )

    transformers_model: str | None = Field(
        default=None, description="Local folder (or hub id, with allow_download) of the weights."
    )
    transformers_device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    transformers_dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    allow_download: bool = False

    max_output_tokens: int = Field(default=1024, ge=1, le=model_facts.MAX_OUTPUT_TOKENS)
    timeout_s: float = Field(default=300.0, gt=0)
    eval_tolerance: float = Field(
        default=0.02,
        ge=0,
        le=1,
        description="`coheara eval --gate`: the largest drop allowed in a rate or score.",
    )
    eval_latency_tolerance: float = Field(
        default=0.25,
        ge=0,
        description="`coheara eval --gate`: the largest slow-down allowed in a time (0.25: 25%).",
    )
    connect_timeout_s: float = Field(default=5.0, gt=0)
    extract_retries: int = Field(default=1, ge=0, le=5)
    extract_field_fallback: bool = Field(
        default=True, description="After failed retries, ask for one top-level field at a time."
    )
    extract_max_string: int = Field(
        default=2000, ge=8, le=100_000, description="maxLength put on every schema string."
    )
    extract_max_items: int = Field(
        default=64, ge=1, le=10_000, description="maxItems put on every schema array."
    )
    guard_enabled: bool = True

    max_images: int = Field(default=128, ge=1, le=1024, description="Images per request.")
    max_image_bytes: int = Field(default=64 * 1024 * 1024, ge=1, description="Picture file.")
    max_dicom_bytes: int = Field(default=512 * 1024 * 1024, ge=1, description="DICOM file.")
    max_image_pixels: int = Field(
        default=50_000 * 50_000 // 4, ge=1, description="One image, a file's frames, a volume."
    )
    max_dicom_frames: int = Field(default=2_000, ge=1, description="Frames in one DICOM file.")
    max_series_files: int = Field(default=2_000, ge=1, description="Files in one series folder.")

    host: str = "127.0.0.1"
    port: int = Field(default=11435, ge=1, le=65535)

    # ----- access (coheara serve) -----
    keys_path: Path = Field(
        default_factory=default_keys_path,
        description="The API keys (salted hashes only), managed by `coheara keys`. With at "
        "least one active key every API route needs one; with none, `serve` binds loopback only.",
    )
    adapters_dir: Path = Field(
        default_factory=default_adapters_dir,
        description="The LoRA adapters `coheara finetune` trains (one folder each) and their "
        "registry (registry.json), which the Transformers backend loads adapters from.",
    )
    allowed_backend_hosts: CommaList = Field(
        default_factory=list,
        description="Hosts (names, addresses or CIDR ranges) a backend URL may point to besides "
        "loopback; any other backend URL is refused at start-up (the egress guard).",
    )
    tls_certfile: Path | None = Field(default=None, description="PEM certificate: serve HTTPS.")
    tls_keyfile: Path | None = Field(default=None, description="PEM private key of tls_certfile.")

    # ----- load and faults (coheara serve) -----
    max_body_bytes: int = Field(default=256 * 1024 * 1024, ge=1024, description="413 beyond.")
    max_text_chars: int = Field(
        default=1_000_000, ge=1, description="Characters of text in one request; 413 beyond."
    )
    max_concurrency: int = Field(
        default=4, ge=1, le=1024, description="Model calls in flight per backend endpoint."
    )
    max_queue: int = Field(
        default=64, ge=0, le=100_000, description="Calls waiting for a slot; 429/503 beyond."
    )
    queue_timeout_s: float = Field(
        default=60.0, gt=0, description="Longest wait for a slot before a 429/503."
    )
    first_token_timeout_s: float = Field(
        default=120.0, gt=0, description="Longest wait for the backend's first token."
    )
    backend_replicas: CommaList = Field(
        default_factory=list,
        description="More endpoints of the same runtime (URLs), served together with the "
        "configured one: health-checked, least busy first, failed over before the first token.",
    )
    health_interval_s: float = Field(default=10.0, gt=0, description="Replica health checks.")
    eject_after_failures: int = Field(
        default=3, ge=1, description="Consecutive failures that take a replica out of rotation."
    )
    metrics_enabled: bool = Field(default=True, description="Prometheus /metrics.")
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    audit_enabled: bool | None = Field(
        default=None,
        description="The audit trail. Unset: on for `coheara serve`, off for `ask`, `run` and "
        "`coheara.audit.attach` (the Python API); true: on for all; false: off everywhere.",
    )
    audit_path: Path = Field(
        default_factory=default_audit_path,
        description="The audit SQLite database (default: the user data directory).",
    )
    audit_key_file: Path | None = Field(
        default=None,
        description="The HMAC key of the audit digests and seal (default: audit.key beside "
        "the database, created 0600 on first use); never stored in the database.",
    )
    audit_retain_content: bool = Field(
        default=False,
        description="Keep each call's full input and output text, encrypted (AES-GCM), for "
        "audit_retention_days; off by default. Needs a content key.",
    )
    audit_content_key: SecretStr | None = Field(
        default=None, description="The content key: 32 bytes, base64 (environment only)."
    )
    audit_content_key_file: Path | None = Field(
        default=None, description="A file holding the content key (base64); never the database."
    )
    audit_retention_days: float = Field(
        default=30.0, gt=0, description="Retained content is purged after this many days."
    )

    @field_validator("allowed_backend_hosts", "backend_replicas", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("ollama_url")
    @classmethod
    def _normalize(cls, value: str) -> str:
        return normalize_ollama_host(value)

    def image_limits(self) -> ImageLimits:
        """The limits every image input of this deployment is held to."""
        from coheara.imaging.limits import ImageLimits

        return ImageLimits(
            max_image_bytes=self.max_image_bytes,
            max_dicom_bytes=self.max_dicom_bytes,
            max_pixels=self.max_image_pixels,
            max_frames=self.max_dicom_frames,
            max_series_files=self.max_series_files,
            max_images=self.max_images,
        )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = config_file()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)


def load_settings(**overrides: object) -> Settings:
    """Settings in force, with explicit (non-None) overrides on top."""
    from pydantic import ValidationError

    from coheara.errors import ConfigurationError

    clean = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**clean)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigurationError(
            f"invalid setting {where}: {first['msg']}",
            hint=f"check COHEARA_{where.upper()} or the config file {config_file() or '(none)'}",
        ) from None
    except OSError as exc:
        raise ConfigurationError(f"cannot read the config file: {exc.strerror}") from None
