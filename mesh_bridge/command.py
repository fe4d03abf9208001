"""``meshwatch bridge --config FILE``: bridge the site broker into the cloud mesh until stopped.

Reads ``site_broker`` (consumed with a persistent session and manual acknowledgement),
``mesh_broker`` (published to at QoS1), ``mesh.partitions`` and ``registry.file`` (devices
owned per gateway; without it only births grant devices). The delivery rules are in
:mod:`mesh_bridge.shell`.

``--healthz-port`` serves ``GET /healthz``: 200 ``ok`` while a heartbeat or a forwarded
message went through the cloud broker within ``--healthy-within-s``, else 503. ``--metrics-port``
serves Prometheus metrics. SIGTERM and Ctrl-C stop consuming, wait up to
``--shutdown-timeout-s`` for the PUBACKs of what is held, acknowledge it and exit 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType

from prometheus_client import start_http_server
from rich.console import Console

from edge_agent.publisher import BrokerAddress, parse_broker_url
from mesh_bridge.identity import Identity
from mesh_bridge.route import Router
from mesh_bridge.shell import Bridge, BridgeSettings, Liveness
from meshwatch.config import BrokerConfig, Config, ConfigError, load_config
from meshwatch.logs import configure_logging
from meshwatch.registry import Registry, RegistryError, load_registry

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``meshwatch bridge``."""
    parser.add_argument("--config", type=Path, required=True, help="TOML configuration file")
    parser.add_argument("--healthz-port", type=int, default=0,
                        help="serve GET /healthz on this port (0: off)")
    parser.add_argument("--metrics-port", type=int, default=0,
                        help="serve Prometheus metrics on this port (0: off)")
    parser.add_argument("--max-in-flight", type=int, default=100,
                        help="site messages held unacknowledged at most (default 100)")
    parser.add_argument("--heartbeat-s", type=float, default=5.0,
                        help="seconds between end-to-end heartbeats (default 5)")
    parser.add_argument("--healthy-within-s", type=float, default=15.0,
                        help="healthy while something went through within this (default 15)")
    parser.add_argument("--reconnect-max-s", type=float, default=10.0,
                        help="longest wait between reconnection attempts (default 10)")
    parser.add_argument("--shutdown-timeout-s", type=float, default=10.0,
                        help="how long SIGTERM waits for outstanding PUBACKs (default 10)")


def run(args: argparse.Namespace) -> int:
    """Run the bridge; returns the exit code."""
    err = Console(stderr=True)
    try:
        config = load_config(args.config)
        configure_logging(config.log_level)
        settings = bridge_settings(config, args)
        registry = _registry(config)
    except (ConfigError, RegistryError, ValueError) as exc:
        err.print(f"[red]cannot start the bridge:[/red] {exc}", highlight=False)
        return 2
    router = Router(Identity(registry), partitions=config.mesh.partitions)
    bridge = Bridge(settings, router)
    stop = threading.Event()
    _on_signals(stop)
    if args.metrics_port:
        start_http_server(args.metrics_port, registry=bridge.metrics.registry)
    if args.healthz_port:
        serve_healthz(bridge.liveness, args.healthz_port)
    bridge.start()
    log.info("bridging %s to %s in %d partitions", bridge.site.source,
             f"{settings.cloud.host}:{settings.cloud.port}", config.mesh.partitions)
    stop.wait()
    flushed = bridge.stop(args.shutdown_timeout_s)
    log.info("stopped; %s", "everything held was acknowledged" if flushed else
             f"{bridge.in_flight} site messages stay unacknowledged and come again next start")
    return 0


def bridge_settings(config: Config, args: argparse.Namespace) -> BridgeSettings:
    """The bridge's settings from the configuration and the command line."""
    if args.max_in_flight < 1 or args.heartbeat_s <= 0 or args.healthy_within_s <= 0:
        msg = "--max-in-flight must be >= 1, --heartbeat-s and --healthy-within-s > 0"
        raise ValueError(msg)
    return BridgeSettings(
        site=_address(config.site_broker, "site_broker"),
        cloud=_address(config.mesh_broker, "mesh_broker"),
        site_protocol=config.site_broker.protocol,
        cloud_protocol=config.mesh_broker.protocol,
        client_id=config.site_broker.client_id or "mw-bridge",
        keepalive_s=config.site_broker.keepalive_s,
        max_in_flight=args.max_in_flight,
        heartbeat_s=args.heartbeat_s,
        healthy_within_s=args.healthy_within_s,
        reconnect_max_s=args.reconnect_max_s,
    )


def _address(broker: BrokerConfig, section: str) -> BrokerAddress:
    if broker.url.startswith("embedded:"):
        msg = f"the bridge needs a real broker: set {section}.url to mqtt://host:port"
        raise ValueError(msg)
    address = parse_broker_url(broker.url)
    if broker.username is None:
        return address
    password = broker.password.get_secret_value() if broker.password else None
    return BrokerAddress(address.host, address.port, broker.username, password)


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

