"""Configuration shared by every Meshwatch service: one TOML file plus environment overrides.

Precedence, highest first: environment variables ``MESHWATCH_<SECTION>__<KEY>``
(for example ``MESHWATCH_INFLUXDB__TOKEN``), then the TOML file, then the
defaults below. Unknown keys in the file are errors, so typos do not pass silently.

>>> cfg = load_config(None)
>>> cfg.mesh.partitions, cfg.site_broker.url
(8, 'embedded://')
>>> cfg = Config(influxdb={"url": "http://tsdb:8086", "token": "s3cret"})
>>> masked_dump(cfg)["influxdb"]["token"]
'***'
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

ENV_PREFIX = "MESHWATCH_"
MASK = "***"


class ConfigError(ValueError):
    """The configuration file or environment is invalid; the message lists every problem."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TLSConfig(_Section):
    """TLS for a broker connection; paths are PEM files."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    insecure: bool = Field(False, description="skip hostname verification (tests only)")


class BrokerConfig(_Section):
    """An MQTT broker: ``mqtt://`` (TCP), ``mqtts://`` (TLS) or ``embedded://`` (in-process)."""

    url: str = "embedded://"
    username: str | None = None
    password: SecretStr | None = None
    client_id: str | None = None
    keepalive_s: int = Field(30, ge=5, le=3600)
    tls: TLSConfig | None = None

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in {"mqtt", "mqtts", "embedded"}:
            msg = f"broker url must start with mqtt://, mqtts:// or embedded://, got {url!r}"
            raise ValueError(msg)
        if parts.scheme != "embedded" and not parts.hostname:
            msg = f"broker url {mask_url(url)!r} has no host"
            raise ValueError(msg)
        return url


class MeshConfig(_Section):
    """The cloud mesh: how many telemetry partitions the bridge writes."""

    partitions: int = Field(8, ge=1, le=4096)


class InfluxConfig(_Section):
    """InfluxDB v2 API (or a compatible TSDB). Writing is off while ``url`` is unset."""

    url: str | None = None
    token: SecretStr | None = None
    org: str = "meshwatch"
    bucket: str = "meshwatch"
    batch_size: int = Field(5000, ge=1, le=100_000)

    @field_validator("url")
    @classmethod
    def _http(cls, url: str | None) -> str | None:
        if url is not None and urlsplit(url).scheme not in {"http", "https"}:
            msg = f"influxdb url must start with http:// or https://, got {url!r}"
            raise ValueError(msg)
        return url


class DatabaseConfig(_Section):
    """SQLAlchemy URL of the remediation database (SQLite file by default)."""

    url: str = "sqlite:///meshwatch.db"

    @field_validator("url")
    @classmethod
    def _known_backend(cls, url: str) -> str:
        if not url.startswith(("sqlite:", "postgresql:", "postgresql+")):
            msg = f"database url must be sqlite:///PATH or postgresql://..., got {mask_url(url)!r}"
            raise ValueError(msg)
        return url


class RegistryConfig(_Section):
    """The site/district/device registry (CSV, as written by ``meshwatch simulate --out``)."""

    file: Path | None = None


class Config(BaseSettings):
    """Everything a Meshwatch service reads at start-up."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", frozen=True
    )

    site_broker: BrokerConfig = BrokerConfig()
    mesh_broker: BrokerConfig = BrokerConfig()
    mesh: MeshConfig = MeshConfig()
    influxdb: InfluxConfig = InfluxConfig()
    database: DatabaseConfig = DatabaseConfig()
    registry: RegistryConfig = RegistryConfig()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Environment first, then the keyword arguments, which carry the TOML file."""
        return (env_settings, init_settings)


def load_config(path: Path | str | None) -> Config:
    """Read ``path`` (TOML; ``None`` for defaults only) with overrides from the environment.

    Raises :class:`ConfigError` listing every problem.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            msg = f"config file {path} does not exist; start from examples/meshwatch.toml"
            raise ConfigError(msg) from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    try:
        return Config(**data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from None


def masked_dump(config: Config) -> dict[str, Any]:
    """The effective configuration as plain data, with passwords, tokens and URL secrets masked."""
    dumped: dict[str, Any] = _mask(config.model_dump(mode="python"))
    return dumped


def mask_url(url: str) -> str:
    """Hide the password in a URL.

    >>> mask_url("mqtts://gw-01:hunter2@broker.example:8883")
    'mqtts://gw-01:***@broker.example:8883'
    """
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:{MASK}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _mask(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return MASK
    if isinstance(value, dict):
        return {key: _mask(item) for key, item in value.items()}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, str) and "://" in value:
        return mask_url(value)
    return value


def _describe(exc: ValidationError, path: Path | str | None) -> str:
    source = f"config {path}" if path is not None else "configuration"
    lines = [f"{source} has {exc.error_count()} problem(s):"]
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"]) or "(top level)"
        if error["type"] == "extra_forbidden":
            lines.append(f"  {where}: unknown key (see examples/meshwatch.toml for every key)")
        else:
            env_name = ENV_PREFIX + "__".join(str(p).upper() for p in error["loc"])
            lines.append(f"  {where}: {error['msg']} (set in the file or as {env_name})")
    return "\n".join(lines)
