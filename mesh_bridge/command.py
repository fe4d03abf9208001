"""``meshwatch bridge --config FILE``: bridge site brokers (and OPC-UA) into the cloud mesh.

Reads ``[bridge]`` (see examples/meshwatch.toml), the site brokers (``bridge.site_brokers``,
or ``[site_broker]`` when that list is empty; each consumed with a persistent session and
manual acknowledgement), ``mesh_broker`` (published to at QoS1), ``mesh.partitions`` and
``registry.file`` (devices owned per gateway; without it only births grant devices). With
``bridge.opcua_site`` and ``bridge.opcua_gateway_id`` set it also subscribes to every
``[[opcua]]`` server (:mod:`mesh_bridge.opcua_source`). The delivery rules are in
:mod:`mesh_bridge.shell`.

``bridge.healthz_port`` serves ``GET /healthz``: 200 ``ok`` while a heartbeat or a forwarded
message went through the cloud broker within ``bridge.healthy_within_s``, else 503.
``bridge.metrics_port`` serves Prometheus metrics. With ``[influxdb] url`` set, the bridge
writes its ledger and its gateways' heartbeat counters every ``bridge.stats_s`` seconds
(:mod:`mesh_bridge.stats`). SIGTERM and Ctrl-C stop consuming, wait up
to ``bridge.shutdown_timeout_s`` for the PUBACKs of what is held, acknowledge it and exit 0;
an internal failure (a router process died) exits 1.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType

from prometheus_client import start_http_server

from edge_agent.publisher import BrokerAddress, TlsOptions, parse_broker_url
from mesh_bridge.routing import RouterSpec
from mesh_bridge.shell import Bridge, BridgeSettings, Job, Liveness, SiteBroker, Source
from mesh_bridge.stats import StatsWriter
from meshwatch.cli import refuse
from meshwatch.config import BrokerConfig, Config, ConfigError, InfluxConfig, load_config
from meshwatch.logs import configure_logging
from meshwatch.registry import Registry, RegistryError, load_registry
from meshwatch.tsdb import LineWriter

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``meshwatch bridge``: the config file says the rest (``[bridge]``)."""
    parser.add_argument("--config", type=Path, required=True, help="TOML configuration file")


def run(args: argparse.Namespace) -> int:
    """Run the bridge; returns the exit code."""
    try:
        config = load_config(args.config)
        configure_logging(config.log_level)
        settings = bridge_settings(config)
        registry = _registry(config)
        if config.bridge.opcua_site is not None and not config.opcua:
            msg = "bridge.opcua_site is set but there is no [[opcua]] server to read"
            raise ValueError(msg)
    except (ConfigError, RegistryError, ValueError) as exc:
        return refuse("cannot start the bridge", exc)
    b = config.bridge
    routing = RouterSpec(registry, partitions=config.mesh.partitions,
                         late_horizon_ms=int(b.late_horizon_s * 1000),
                         mesh_batch_readings=b.mesh_batch_readings, linger_s=b.linger_ms / 1000)
    bridge = Bridge(settings, routing, extra_sources=_opcua_sources(config, settings))
    stop = threading.Event()
    _on_signals(stop)
    if config.bridge.metrics_port:
        start_http_server(config.bridge.metrics_port, registry=bridge.metrics.registry)
    if config.bridge.healthz_port:
        serve_healthz(bridge.liveness, config.bridge.healthz_port)
    bridge.start()
    stats = start_stats_writer(config.influxdb, config.bridge.stats_s, bridge)
    log.info("bridging %s to %s in %d partitions",
             ", ".join(source.name for source in bridge.sources),
             f"{settings.cloud.host}:{settings.cloud.port}", config.mesh.partitions)
    while not stop.wait(0.5) and not bridge.failed:
        pass
    try:
        flushed = bridge.stop(config.bridge.shutdown_timeout_s)
    except RuntimeError as exc:
        log.error("%s; what was not acknowledged comes again at the next start", exc)
        return 1
    finally:
        if stats is not None:
            stats.stop()
    log.info("stopped; %s", "everything held was acknowledged" if flushed else
             f"{bridge.in_flight} site messages stay unacknowledged and come again next start")
    return 0


def bridge_settings(config: Config) -> BridgeSettings:
    """The bridge's settings from the configuration (``[bridge]``, brokers)."""
    b = config.bridge
    sites = b.site_brokers or [config.site_broker]
    return BridgeSettings(
        sites=tuple(SiteBroker(_address(site, "site broker"), site.protocol, site.client_id)
                    for site in sites),
        cloud=_address(config.mesh_broker, "mesh_broker"),
        cloud_protocol=config.mesh_broker.protocol,
        client_id=b.client_id,
        keepalive_s=config.mesh_broker.keepalive_s,
        max_in_flight=b.max_in_flight,
        routing_processes=b.routing_processes,
        heartbeat_s=b.heartbeat_s,
        healthy_within_s=b.healthy_within_s,
        reconnect_max_s=b.reconnect_max_s,
    )


def start_stats_writer(influx: InfluxConfig, interval_s: float,
                       bridge: Bridge) -> StatsWriter | None:
    """Start the pipeline statistics writer of a started ``bridge`` when ``influx.url`` is set.

    Writes every ``interval_s`` seconds (``bridge.stats_s``); stop it after the bridge.
    ``meshwatch demo`` starts its bridge's writer here too.
    """
    if influx.url is None:
        return None
    writer = LineWriter(influx.url, token=influx.token.get_secret_value() if influx.token
                        else None, org=influx.org, bucket=influx.bucket, what="bridge stats")
    return StatsWriter(bridge.stats, writer, interval_s,
                       lambda: (bridge.in_flight, bridge.cloud.connected)).start()


def _opcua_sources(
    config: Config, settings: BridgeSettings
) -> Callable[[Callable[[Job], None]], list[Source]] | None:
    b = config.bridge
    if b.opcua_site is None or b.opcua_gateway_id is None:
        return None
    site, gateway_id = b.opcua_site, b.opcua_gateway_id
    from mesh_bridge.opcua_source import OpcUaSource  # asyncua only when OPC-UA is configured

    def build(put: Callable[[Job], None]) -> list[Source]:
        return [OpcUaSource(config.opcua, put, site=site, gateway_id=gateway_id,
                            store_path=b.opcua_store_path, max_in_flight=settings.max_in_flight)]

    return build


def _address(broker: BrokerConfig, section: str) -> BrokerAddress:
    if broker.url.startswith("embedded:"):
        msg = f"the bridge needs a real broker: set {section}.url to mqtt://host:port"
        raise ValueError(msg)
    address = parse_broker_url(broker.url, TlsOptions.of(broker.tls))
    if broker.username is None:
        return address
    password = broker.password.get_secret_value() if broker.password else None
    return replace(address, username=broker.username, password=password)


def _registry(config: Config) -> Registry:
    if config.registry.file is None:
        log.warning("registry.file is not set: only gateway births grant devices")
        return Registry([])
    return load_registry(config.registry.file)


def serve_healthz(liveness: Liveness, port: int, host: str = "0.0.0.0") -> ThreadingHTTPServer:
    """Serve ``GET /healthz`` (200 ok / 503 unhealthy) from a daemon thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/healthz":
                self.send_error(404, "only /healthz is served here")
                return
            healthy = liveness.healthy()
            body = b"ok\n" if healthy else b"unhealthy: nothing went through the cloud broker\n"
            self.send_response(200 if healthy else 503)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            """Quiet: probes come every few seconds."""

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="healthz", daemon=True).start()
    return server


def _on_signals(stop: threading.Event) -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)

