"""``meshwatch remediation --config FILE``: alerts in, work orders, API and pages out.

Reads ``[database] url`` (migrated at start), ``[mesh_broker]`` (alerts are consumed from it,
feedback, crew notifications and dead letters published to it), ``[registry] file`` (customer
criticality, coordinates) and ``[remediation]`` (see examples/meshwatch.toml). Runs:

- :class:`remediation.intake.AlertIntake`: the alert consumer (manual ack after commit);
- :class:`remediation.notify.OutboxSender`: MQTT and webhook delivery of the outbox;
- the SLA timer, every ``remediation.sla_check_s``;
- :class:`remediation.influx.InfluxWriter` when ``[influxdb] url`` is set: ``mw_incident``
  events from the outbox, ``mw_kpi`` and ``mw_work_orders`` every ``remediation.influx_kpi_s``;
- the API and pages (uvicorn) on ``remediation.http_host:http_port``.

SIGTERM and Ctrl-C stop the server, then the intake (what was committed is acknowledged; the
rest comes again at the next start) and the sender (unsent rows stay in the outbox).
"""

from __future__ import annotations

import argparse
import logging
import threading
from pathlib import Path

import uvicorn
from prometheus_client import CollectorRegistry

from edge_agent.publisher import BrokerAddress, TlsOptions, parse_broker_url
from meshwatch.cli import refuse
from meshwatch.config import Config, ConfigError, load_config
from meshwatch.logs import configure_logging
from meshwatch.registry import Registry, RegistryError, load_registry
from remediation.api import Principal, Tokens, create_app
from remediation.assign import Crew
from remediation.db import make_engine, upgrade
from remediation.influx import InfluxWriter
from remediation.intake import AlertIntake
from remediation.kpi import KpiCollector
from remediation.notify import OutboxSender
from remediation.store import Settings, Store

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``meshwatch remediation``: the config file says the rest."""
    parser.add_argument("--config", type=Path, required=True, help="TOML configuration file")


def run(args: argparse.Namespace) -> int:
    """Run the service until SIGTERM or Ctrl-C; returns the exit code."""
    try:
        config = load_config(args.config)
        configure_logging(config.log_level)
        service = Service(config)
    except (ConfigError, RegistryError, ValueError) as exc:
        return refuse("cannot start remediation", exc)
    service.start_background()
    try:
        service.server.run()  # uvicorn handles SIGINT and SIGTERM
    finally:
        service.stop_background()
    return 0


class Service:
    """Everything ``meshwatch remediation`` runs, startable in-process (tests, demo)."""

    def __init__(self, config: Config) -> None:
        r = config.remediation
        self.config = config
        registry = (load_registry(config.registry.file) if config.registry.file
                    else Registry([]))
        self.engine = make_engine(config.database.url)
        upgrade(self.engine)
        crews = [Crew(c.crew_id, tuple(c.districts), tuple(c.skills), c.capacity)
                 for c in r.crews]
        self.store = Store(self.engine, Settings(
            window_ms=int(r.correlation_window_s * 1000), sla_ack_s=tuple(r.sla_ack_s),
            sla_resolve_s=tuple(r.sla_resolve_s), webhook=r.webhook_url is not None,
            client_id=r.client_id, influx=config.influxdb.url is not None), crews=crews,
            registry=registry)
        principals = {t.get_secret_value(): Principal("operator") for t in r.operator_tokens}
        for crew in r.crews:
            if crew.token is not None:
                principals[crew.token.get_secret_value()] = Principal("crew", crew.crew_id)
        self.metrics = CollectorRegistry()
        self.metrics.register(KpiCollector(self.store.reader, r.saved_horizon_h))
        broker = _broker(config)
        self.intake = AlertIntake(self.store, broker, client_id=r.client_id,
                                  batch_max=r.batch_max, protocol=config.mesh_broker.protocol,
                                  registry=self.metrics)
        self.sender = OutboxSender(self.store, broker, client_id=f"{r.client_id}-out",
                                   webhook_url=r.webhook_url, webhook_retries=r.webhook_retries,
                                   webhook_backoff_max_s=r.webhook_backoff_max_s,
                                   protocol=config.mesh_broker.protocol)
        influx = config.influxdb
        self.influx = None if influx.url is None else InfluxWriter(
            self.store, url=influx.url,
            token=None if influx.token is None else influx.token.get_secret_value(),
            org=influx.org, bucket=influx.bucket, kpi_interval_s=r.influx_kpi_s,
            saved_horizon_h=r.saved_horizon_h, batch_size=influx.batch_size)
        self.app = create_app(self.store, Tokens(principals), saved_horizon_h=r.saved_horizon_h,
                              metrics=self.metrics, health=self.health)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host=r.http_host,
                                                    port=r.http_port, log_level="warning"))
        self._stop = threading.Event()
        self._sla = threading.Thread(target=self._sla_loop, name="sla", daemon=True)
        self._http: threading.Thread | None = None

    def health(self) -> dict[str, object]:
        """Liveness facts for ``/healthz``."""
        return {"intake_connected": self.intake.connected, "alerts_stored": self.intake.stored}

    def start_background(self) -> None:
        """Start intake, outbox sender and SLA timer (not the HTTP server)."""
        self.intake.start()
        self.sender.start()
        if self.influx is not None:
            self.influx.start()
        self._sla.start()

    def stop_background(self) -> None:
        """Stop what :meth:`start_background` started."""
        self._stop.set()
        self.intake.stop()
        self.sender.stop()
        if self.influx is not None:
            self.influx.stop()
        self._sla.join(5)

    def start(self) -> Service:
        """Start everything, the HTTP server in a thread; returns once it listens."""
        self.start_background()
        self._http = threading.Thread(target=self.server.run, name="http", daemon=True)
        self._http.start()
        while not self.server.started:
            if not self._http.is_alive():
                msg = "the HTTP server did not start (port taken?)"
                raise RuntimeError(msg)
            self._stop.wait(0.02)
        return self

    def stop(self) -> None:
        """Stop everything started by :meth:`start`."""
        self.server.should_exit = True
        if self._http is not None:
            self._http.join(10)
        self.stop_background()
        self.engine.dispose()

    def _sla_loop(self) -> None:
        interval = self.config.remediation.sla_check_s
        while not self._stop.wait(interval):
            try:
                escalated = self.store.check_sla()
                if escalated:
                    log.info("escalated %d work orders past their SLA", escalated)
            except Exception:
                log.exception("SLA check failed; trying again in %.0f s", interval)


def _broker(config: Config) -> BrokerAddress:
    broker = config.mesh_broker
    if broker.url.startswith("embedded:"):
        msg = "remediation needs a real broker: set mesh_broker.url to mqtt://host:port"
        raise ValueError(msg)
    tls = None
    if broker.tls is not None:
        t = broker.tls
        tls = TlsOptions(ca_file=None if t.ca_file is None else str(t.ca_file),
                         cert_file=None if t.cert_file is None else str(t.cert_file),
                         key_file=None if t.key_file is None else str(t.key_file),
                         insecure=t.insecure)
    address = parse_broker_url(broker.url, tls)
    if broker.username is None:
        return address
    password = broker.password.get_secret_value() if broker.password else None
    return BrokerAddress(address.host, address.port, broker.username, password, address.tls)
