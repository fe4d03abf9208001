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

import math
import re
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from meshwatch.contract.events import ID_PATTERN
from meshwatch.contract.units import METRIC_NAME_PATTERN, UNITS

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
    protocol: Literal["5", "3.1.1"] = "5"
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


OPCUA_NODE_ID_PATTERN = (
    r"^(?:ns=\d{1,5};)?(?:i=\d{1,10}|s=.+|b=[A-Za-z0-9+/]+={0,2}"
    r"|g=[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12})$"
)
"""OPC-UA node ids in their string form: ``ns=<index>;`` then ``s=``, ``i=``, ``g=`` or ``b=``."""


class OpcUaNodeConfig(_Section):
    """One OPC-UA variable mapped to a device's metric: ``value * scale + offset``.

    >>> OpcUaNodeConfig(node_id="ns=2;s=dma-01-pump.flow_lpm", device_id="dma-01-pump",
    ...                 metric="flow_lpm").scale
    1.0
    """

    node_id: str
    device_id: str
    metric: str
    scale: float = 1.0
    offset: float = 0.0

    @field_validator("node_id")
    @classmethod
    def _node_id(cls, node_id: str) -> str:
        if not re.fullmatch(OPCUA_NODE_ID_PATTERN, node_id):
            msg = (f"node_id {node_id!r} is not an OPC-UA node id; write it as "
                   "ns=<index>;s=<name> (or i=<number>, g=<guid>, b=<base64>), "
                   "e.g. ns=2;s=dma-01-pump.flow_lpm")
            raise ValueError(msg)
        return node_id

    @field_validator("device_id")
    @classmethod
    def _device_id(cls, device_id: str) -> str:
        return _topic_level(device_id)

    @field_validator("metric")
    @classmethod
    def _metric(cls, metric: str) -> str:
        if not re.fullmatch(METRIC_NAME_PATTERN, metric):
            msg = (f"metric {metric!r} must be <quantity>_<unit> in lower snake case, "
                   f"e.g. flow_lpm; the unit is one of {', '.join(UNITS)}")
            raise ValueError(msg)
        return metric

    @field_validator("scale", "offset")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            msg = f"must be a finite number, got {value!r}"
            raise ValueError(msg)
        return value


class OpcUaServerConfig(_Section):
    """An OPC-UA server to subscribe to, and which of its nodes become which metrics.

    ``username``/``password`` log in with a user name token (both or neither; anonymous
    when unset). ``publishing_interval_ms`` is the subscription's publishing interval;
    ``queue_size`` is how many changes the server keeps per node between publishes, so
    values that change faster than the interval are not lost. Every ``keepalive_s`` the
    client reads the server's state and expects at least a keep-alive from the
    subscription: a failed read means the connection is lost, a subscription silent for
    1.5 times that long is re-created. A lost connection is retried with back-off capped
    at ``reconnect_max_s``, and the subscription is created anew each time.
    """

    url: str
    username: str | None = None
    password: SecretStr | None = None
    publishing_interval_ms: int = Field(1000, ge=10, le=3_600_000)
    queue_size: int = Field(100, ge=1, le=10_000)
    keepalive_s: float = Field(10.0, ge=0.1, le=3600)
    reconnect_max_s: float = Field(30.0, ge=0.1, le=3600)
    nodes: list[OpcUaNodeConfig] = Field(min_length=1)

    @field_validator("url")
    @classmethod
    def _opc_tcp(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme != "opc.tcp" or not parts.hostname:
            msg = f"opcua url must look like opc.tcp://host:4840, got {mask_url(url)!r}"
            raise ValueError(msg)
        return url

    @model_validator(mode="after")
    def _consistent(self) -> OpcUaServerConfig:
        if (self.username is None) != (self.password is None):
            msg = "set both username and password for a user login, or neither for anonymous"
            raise ValueError(msg)
        node_ids = Counter(node.node_id for node in self.nodes)
        targets = Counter(f"{node.device_id}/{node.metric}" for node in self.nodes)
        for what, counts in (("node_id", node_ids), ("device_id/metric", targets)):
            twice = sorted(value for value, count in counts.items() if count > 1)
            if twice:
                msg = (f"nodes: {what} {', '.join(twice)} mapped more than once; "
                       "map each node and each device metric once")
                raise ValueError(msg)
        return self


class EdgeConfig(_Section):
    """One edge agent process: the gateway it serves, its outbox, batching and scoring."""

    site: str | None = None
    gateway_id: str | None = None
    outbox_path: Path = Path("edge-outbox.db")
    outbox_max_mb: float = Field(256.0, gt=0)
    outbox_full_policy: Literal["refuse", "drop_oldest"] = "refuse"
    outbox_synchronous: Literal["FULL", "NORMAL"] = "FULL"
    batch_max_readings: int = Field(500, ge=1, le=10_000)
    batch_max_delay_s: float = Field(1.0, gt=0)
    max_in_flight: int = Field(32, ge=1, le=65_535)
    backlog_rate_per_s: float = Field(500.0, ge=0)
    heartbeat_s: float = Field(30.0, gt=0)
    shutdown_timeout_s: float = Field(10.0, ge=0)
    metrics_port: int = Field(0, ge=0, le=65_535)
    model_dir: Path | None = None
    model_staging_dir: Path = Path("edge-models")
    alert_threshold: float = Field(0.8, gt=0, le=1)
    raw_input_url: str | None = None
    raw_input_protocol: Literal["5", "3.1.1"] = "5"
    raw_input_session_expiry_s: int = Field(7 * 24 * 3600, ge=60, le=2**32 - 1)

    @field_validator("site", "gateway_id")
    @classmethod
    def _topic_safe(cls, value: str | None) -> str | None:
        return None if value is None else _topic_level(value)

    @field_validator("raw_input_url")
    @classmethod
    def _local_mqtt(cls, url: str | None) -> str | None:
        if url is not None and (urlsplit(url).scheme != "mqtt" or not urlsplit(url).hostname):
            msg = (f"raw_input_url must look like mqtt://[user:password@]host:1883 (the"
                   f" gateway's local broker), got {mask_url(url)!r}")
            raise ValueError(msg)
        return url


class BridgeConfig(_Section):
    """``meshwatch bridge``: what it consumes, how much it holds, how it reports health."""

    client_id: str = "mw-bridge"
    site_brokers: list[BrokerConfig] = []
    max_in_flight: int = Field(500, ge=1, le=65_535)
    routing_processes: int = Field(1, ge=1, le=64)
    mesh_batch_readings: int = Field(500, ge=1, le=10_000)
    linger_ms: int = Field(50, ge=0, le=60_000)
    late_horizon_s: float = Field(3600.0, ge=0)
    heartbeat_s: float = Field(5.0, gt=0)
    healthy_within_s: float = Field(15.0, gt=0)
    reconnect_max_s: float = Field(10.0, ge=0.1, le=3600)
    shutdown_timeout_s: float = Field(10.0, ge=0)
    healthz_port: int = Field(0, ge=0, le=65_535)
    metrics_port: int = Field(0, ge=0, le=65_535)
    stats_s: float = Field(10.0, gt=0)
    opcua_site: str | None = None
    opcua_gateway_id: str | None = None
    opcua_store_path: Path = Path("bridge-opcua.db")

    @field_validator("client_id", "opcua_site", "opcua_gateway_id")
    @classmethod
    def _topic_safe(cls, value: str | None) -> str | None:
        return None if value is None else _topic_level(value)

    @model_validator(mode="after")
    def _opcua_identity(self) -> BridgeConfig:
        if (self.opcua_site is None) != (self.opcua_gateway_id is None):
            msg = ("set both opcua_site and opcua_gateway_id for the bridge to read the [[opcua]]"
                   " servers itself, or neither")
            raise ValueError(msg)
        return self


class CrewConfig(_Section):
    """A field crew of ``meshwatch remediation``: where it works, what it can fix, its token."""

    crew_id: str
    districts: list[str] = []
    skills: list[Literal["pipes", "meters"]] = ["pipes", "meters"]
    capacity: int = Field(5, ge=1, le=1000)
    token: SecretStr | None = None

    @field_validator("crew_id")
    @classmethod
    def _crew_id(cls, value: str) -> str:
        return _topic_level(value)


class RemediationConfig(_Section):
    """``meshwatch remediation``: intake, correlation, SLAs, notifications, API and crews."""

    client_id: str = "mw-remediation"
    http_host: str = "127.0.0.1"
    http_port: int = Field(8080, ge=0, le=65_535)
    operator_tokens: list[SecretStr] = []
    correlation_window_s: float = Field(6 * 3600.0, gt=0)
    sla_ack_s: list[float] = [900.0, 3600.0, 4 * 3600.0, 24 * 3600.0]
    sla_resolve_s: list[float] = [4 * 3600.0, 24 * 3600.0, 72 * 3600.0, 168 * 3600.0]
    sla_check_s: float = Field(30.0, gt=0)
    batch_max: int = Field(200, ge=1, le=10_000)
    webhook_url: str | None = None
    webhook_retries: int = Field(5, ge=0, le=100)
    webhook_backoff_max_s: float = Field(60.0, gt=0)
    saved_horizon_h: float = Field(720.0, ge=0)
    influx_kpi_s: float = Field(60.0, gt=0)
    crews: list[CrewConfig] = []

    @field_validator("client_id")
    @classmethod
    def _client_id(cls, value: str) -> str:
        return _topic_level(value)

    @field_validator("sla_ack_s", "sla_resolve_s")
    @classmethod
    def _per_priority(cls, value: list[float]) -> list[float]:
        if len(value) != 4 or any(not (v > 0 and math.isfinite(v)) for v in value):
            msg = f"give 4 positive seconds, for priorities 1 (most urgent) to 4, got {value!r}"
            raise ValueError(msg)
        return value

    @field_validator("webhook_url")
    @classmethod
    def _webhook_http(cls, url: str | None) -> str | None:
        if url is not None and urlsplit(url).scheme not in {"http", "https"}:
            msg = f"webhook_url must start with http:// or https://, got {mask_url(url)!r}"
            raise ValueError(msg)
        return url


class FlowConfig(_Section):
    """``meshwatch flow``: the bytewax dataflow (source sessions, ordering, gaps, sinks)."""

    client_id: str = "mw-flow"
    session_expiry_s: int = Field(7 * 24 * 3600, ge=60, le=2**32 - 1)
    receive_maximum: int = Field(1000, ge=1, le=65_535)
    shards_per_partition: int = Field(4, ge=1, le=1024)
    allowed_lateness_s: float = Field(60.0, ge=0)
    gap_fill_max_intervals: int = Field(4, ge=1, le=1000)
    dedup_window: int = Field(1024, ge=1, le=1_000_000)
    idle_flush_s: float = Field(5.0, gt=0)
    workers: int = Field(1, ge=1, le=256)
    snapshot_interval_s: float = Field(5.0, gt=0)
    recovery_dir: Path | None = None
    lake_dir: Path | None = None
    write_retry_max_s: float = Field(10.0, gt=0, le=3600)
    detect: bool = True
    """Run the detection stage (needs ``registry.file``: districts and device kinds)."""
    write_scores: bool = True
    """With detection and ``influxdb``: write each scored reading's score (``mw_score``)."""
    edge_scores: bool = True
    """With ``influxdb``: store edge models' scores from ``mw/v1/mesh/scores/{n}``."""

    @field_validator("client_id")
    @classmethod
    def _topic_safe(cls, value: str) -> str:
        return _topic_level(value)


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
    opcua: list[OpcUaServerConfig] = []
    edge: EdgeConfig = EdgeConfig()
    bridge: BridgeConfig = BridgeConfig()
    flow: FlowConfig = FlowConfig()
    remediation: RemediationConfig = RemediationConfig()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    reads_environment: ClassVar[bool] = True
    """False for :meth:`from_values`: the keyword arguments only."""

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
        return (env_settings, init_settings) if cls.reads_environment else (init_settings,)

    @classmethod
    def from_values(cls, **values: Any) -> Config:
        """A config from ``values`` alone, whatever ``MESHWATCH_*`` says.

        For services a command runs in-process with settings of its own (``meshwatch demo``):
        an operator's environment must not point a demo at a production database.

        >>> import os
        >>> os.environ["MESHWATCH_DATABASE__URL"] = "postgresql://db.prod/meshwatch"
        >>> Config(database={"url": "sqlite:///demo.db"}).database.url  # the environment wins
        'postgresql://db.prod/meshwatch'
        >>> Config.from_values(database={"url": "sqlite:///demo.db"}).database.url
        'sqlite:///demo.db'
        >>> del os.environ["MESHWATCH_DATABASE__URL"]
        """
        return _ValuesOnly(**values)



class _ValuesOnly(Config):
    """A :class:`Config` that reads no environment (:meth:`Config.from_values`)."""

    reads_environment = False


def _topic_level(value: str) -> str:
    """``value`` if it is a valid id (ids are MQTT topic levels), else a clear ``ValueError``."""
    if not re.fullmatch(ID_PATTERN, value):
        msg = (f"{value!r} must be 1 to 64 letters, digits or _.:- starting with a letter or"
               " digit (it is an MQTT topic level)")
        raise ValueError(msg)
    return value


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
    if isinstance(value, list):
        return [_mask(item) for item in value]
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
            if any(isinstance(part, int) for part in error["loc"]):  # lists: whole JSON value
                env_name = f"{ENV_PREFIX}{str(error['loc'][0]).upper()} as JSON"
            lines.append(f"  {where}: {error['msg']} (set in the file or as {env_name})")
    return "\n".join(lines)
