"""``meshwatch flow --config FILE``: run the dataflow with bytewax (``bytewax.run`` in-process).

Reads ``[flow]`` (see examples/meshwatch.toml), ``mesh_broker`` (consumed with persistent
sessions, one per partition, over MQTT 5 or, with ``protocol = "3.1.1"``, 3.1.1; dead
letters are published there too), ``mesh.partitions``,
``influxdb`` (unset url: no TSDB writes) and ``registry.file`` (device cadences, districts
and kinds; without it cadences are learned from the stream and nothing is detected). With a
registry and ``flow.detect`` (the default), the detection stage runs one water pipeline per
district and publishes alerts to ``mw/v1/alerts/{district}/{kind}`` on ``mesh_broker``,
taking crews' feedback from ``mw/v1/feedback/+``; with ``influxdb`` it also stores edge
scores from ``mw/v1/mesh/scores/{n}`` (``flow.edge_scores``).
``-w``, ``-r`` and ``-s`` override ``flow.workers``,
``flow.recovery_dir`` and ``flow.snapshot_interval_s``; ``-i``/``-a`` run one process of a
cluster (bytewax's own options: every process gets the same config and the whole list of
addresses; each owns some partitions). A recovery directory that does not
exist or is empty is initialised (``python -m bytewax.recovery DIR N``) first.

Once the flow is built, the objects that exist (imports, layout) are frozen out of the garbage
collector's scans (``gc.freeze()``): full collections then take milliseconds, not the ~0.1-0.2 s
pauses that held alerts back.

The same flow runs under bytewax's own runner::

    python -m bytewax.run "dataflows.command:flow_from_file('meshwatch.toml')" -w 2 -r DIR -s 5
"""

from __future__ import annotations

import argparse
import gc
import logging
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

from bytewax.dataflow import Dataflow
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.run import cli_main

from dataflows.connectors.influx import InfluxSettings
from dataflows.connectors.mqtt import MqttSourceSettings
from dataflows.detection import DetectionLayout
from dataflows.flow import Detection, FlowSettings, build_flow
from dataflows.ordering import OrderSettings
from edge_agent.publisher import BrokerAddress, TlsOptions, parse_broker_url
from meshwatch.cli import refuse
from meshwatch.config import BrokerConfig, Config, ConfigError, load_config
from meshwatch.logs import configure_logging
from meshwatch.registry import RegistryError, load_registry

__all__ = ["add_arguments", "flow_from_file", "flow_settings", "run"]

log = logging.getLogger(__name__)

RECOVERY_PARTITIONS = 4
"""Recovery partitions created in a new recovery directory (bytewax spreads state over them)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``meshwatch flow``."""
    parser.add_argument("--config", type=Path, required=True, help="TOML configuration file")
    parser.add_argument("-w", "--workers", type=int, help="workers (default: flow.workers)")
    parser.add_argument("-r", "--recovery-dir", type=Path,
                        help="bytewax recovery directory (default: flow.recovery_dir)")
    parser.add_argument("-s", "--snapshot-interval", type=float,
                        help="seconds per epoch: snapshots and acks (flow.snapshot_interval_s)")
    parser.add_argument("-i", "--process-id", type=int,
                        help="this process's index in a cluster of processes (with -a)")
    parser.add_argument("-a", "--addresses",
                        help='every process as host:port, separated by ";" (with -i)')


def run(args: argparse.Namespace) -> int:
    """Run the dataflow until killed; returns the exit code."""
    try:
        config = load_config(args.config)
        configure_logging(config.log_level)
        settings = flow_settings(config)
        workers = args.workers or config.flow.workers
        if workers < 1:
            msg = f"--workers must be at least 1, got {workers}"
            raise ValueError(msg)
        interval = args.snapshot_interval or config.flow.snapshot_interval_s
        recovery_dir = args.recovery_dir or config.flow.recovery_dir
        if (args.process_id is None) != (args.addresses is None):
            msg = "give both -i/--process-id and -a/--addresses for a cluster, or neither"
            raise ValueError(msg)
        addresses = args.addresses.split(";") if args.addresses else None
    except (ConfigError, RegistryError, ValueError) as exc:
        return refuse("cannot start the flow", exc)
    recovery = None
    if recovery_dir is not None:
        recovery_dir.mkdir(parents=True, exist_ok=True)
        if not any(recovery_dir.iterdir()):
            init_db_dir(recovery_dir, RECOVERY_PARTITIONS)  # type: ignore[no-untyped-call]
        recovery = RecoveryConfig(str(recovery_dir))  # type: ignore[no-untyped-call]
    log.info("flow: %d partitions from %s:%d, %d worker(s), epoch %gs, recovery %s",
             settings.source.partitions, settings.source.broker.host,
             settings.source.broker.port, workers, interval, recovery_dir or "off")
    cli_main(_frozen(build_flow(settings)),  # type: ignore[no-untyped-call]
             workers_per_process=workers, process_id=args.process_id, addresses=addresses,
             epoch_interval=timedelta(seconds=interval), recovery_config=recovery)
    return 0


def flow_settings(config: Config) -> FlowSettings:
    """The flow's settings from a configuration (raises ``ValueError``, ``RegistryError``)."""
    f = config.flow
    broker = _address(config.mesh_broker)
    source = MqttSourceSettings(broker, config.mesh.partitions, client_id=f.client_id,
                                session_expiry_s=f.session_expiry_s,
                                receive_maximum=f.receive_maximum,
                                keepalive_s=config.mesh_broker.keepalive_s,
                                protocol=config.mesh_broker.protocol)
    influx = None
    if config.influxdb.url is not None:
        token = config.influxdb.token.get_secret_value() if config.influxdb.token else ""
        influx = InfluxSettings(config.influxdb.url, token, config.influxdb.org,
                                config.influxdb.bucket, config.mesh.partitions,
                                batch_size=config.influxdb.batch_size,
                                retry_max_s=f.write_retry_max_s)
    cadences: dict[str, float] = {}
    detection = None
    if config.registry.file is not None:
        registry = load_registry(config.registry.file)
        cadences = {d.device_id: float(d.cadence_s) for d in registry}
        if f.detect:
            detection = Detection(DetectionLayout.from_registry(
                registry, config.mesh.partitions, f.shards_per_partition),
                scores=f.write_scores and influx is not None)
    order = OrderSettings(allowed_lateness_ms=int(f.allowed_lateness_s * 1000),
                          gap_fill_max_intervals=f.gap_fill_max_intervals,
                          dedup_window=f.dedup_window)
    return FlowSettings(source=source, dead_letter_broker=broker, order=order,
                        shards_per_partition=f.shards_per_partition, idle_flush_s=f.idle_flush_s,
                        influx=influx, lake_dir=f.lake_dir, cadences=cadences,
                        detection=detection, edge_scores=f.edge_scores)


def flow_from_file(path: str) -> Dataflow:
    """The dataflow of a config file, for ``python -m bytewax.run``."""
    config = load_config(path)
    configure_logging(config.log_level)
    return _frozen(build_flow(flow_settings(config)))


def _frozen(flow: Dataflow) -> Dataflow:
    """``flow``, with every object that exists by now out of the garbage collector's scans.

    They are the imported modules (numpy, pydantic, paho, bytewax, influxdb-client, the models:
    ~190k objects) and the flow's layout, and they live as long as the process. Left in, a full
    collection scanned them every ~2 s for 105–190 ms, stalling the worker and every alert
    behind it; frozen, full collections see only what the flow makes afterwards (4–40 ms).
    """
    gc.freeze()
    return flow


def _address(broker: BrokerConfig) -> BrokerAddress:
    if broker.url.startswith("embedded:"):
        msg = "the flow needs a real broker: set mesh_broker.url to mqtt://host:port"
        raise ValueError(msg)
    tls, files = broker.tls, None
    if tls is not None:
        files = TlsOptions(ca_file=_path(tls.ca_file), cert_file=_path(tls.cert_file),
                           key_file=_path(tls.key_file), insecure=tls.insecure)
    address = parse_broker_url(broker.url, files)
    if broker.username is None:
        return address
    password = broker.password.get_secret_value() if broker.password else None
    return replace(address, username=broker.username, password=password)


def _path(path: Path | None) -> str | None:
    return None if path is None else str(path)
