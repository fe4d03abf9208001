"""``meshwatch edge --config FILE``: run one gateway's edge agent until stopped.

The agent publishes to ``site_broker`` with the ``[edge]`` settings of the configuration.
Inputs, any combination:

- the OPC-UA servers of ``[[opcua]]`` (data-change subscriptions);
- with ``edge.raw_input_url``, local devices publishing raw readings to the gateway's local
  broker (:mod:`edge_agent.mqtt_input`); bad messages become dead letters in the outbox, and
  a message is acknowledged to that broker only once its reading or dead letter is stored;
- ``--simulate``: the fleet simulator, run in a child process that sends the readings of
  this gateway's devices (:mod:`simulators.feed`), so the agent's memory and CPU stay its
  own (for demos and load tests; ``--speed`` paces it, else it runs flat out and the agent
  exits when the simulated days are over).

OPC-UA and raw readings arrive on paho's and asyncua's threads and are queued; one loop hands
them to the agent (:class:`Intake`). While raw messages wait for their acknowledgement, the
loop writes pending readings each time the queue runs dry instead of waiting for
``edge.batch_max_delay_s``: the local broker sends only a small window of unacknowledged
messages.

With ``edge.model_dir`` set, closed feature windows are scored by that model, and the agent
follows its retained model-announcement topic for updates (:mod:`edge_agent.model_updates`).

SIGTERM and Ctrl-C stop the inputs, write pending readings to the outbox, wait up to
``edge.shutdown_timeout_s`` for the outbox to drain, publish a clean death and exit 0.

Memory: a gateway is small, so what the agent does not need is not imported. onnxruntime
comes with a model (``edge.model_dir``), asyncua with ``[[opcua]]``, prometheus_client with
``edge.metrics_port``, rich only for error messages and the final summary, and the simulator
runs in its own process. The summary reports the agent's own CPU time and peak RSS.
"""

from __future__ import annotations

import argparse
import logging
import queue
import resource
import signal
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from edge_agent.agent import AgentSettings, EdgeAgent
from edge_agent.mqtt_input import AckQueue, DeviceReading, InvalidMessage, MqttReadingInput
from edge_agent.opcua_input import OpcUaInput, OpcUaReading
from edge_agent.outbox import OutboxError
from edge_agent.publisher import TlsOptions
from edge_agent.scoring import EdgeScorer
from meshwatch.config import Config, ConfigError, load_config
from meshwatch.logs import configure_logging
from models.edge.package import ModelPackageError, load_package

if TYPE_CHECKING:  # imported when needed (see the module docs)
    from simulators.feed import BlockFeed

log = logging.getLogger(__name__)
IDLE_WAIT_S = 0.05
Item = OpcUaReading | DeviceReading | InvalidMessage
"""What the inputs queue for the agent."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``meshwatch edge``."""
    parser.add_argument("--config", type=Path, required=True, help="TOML configuration file")
    sim = parser.add_argument_group("simulated input")
    sim.add_argument("--simulate", action="store_true",
                     help="feed this gateway's devices from the in-process fleet simulator")
    sim.add_argument("--meters", type=int, default=2000, help="fleet size (default 2000)")
    sim.add_argument("--districts", type=int, default=None, help="districts (default: derived)")
    sim.add_argument("--meters-per-gateway", type=int, default=500,
                     help="customer meters per gateway (default 500)")
    sim.add_argument("--days", type=float, default=1.0, help="simulated days (default 1)")
    sim.add_argument("--seed", type=int, default=0, help="simulator seed")
    sim.add_argument("--speed", type=float, default=None,
                     help="simulated seconds per wall second (default: as fast as possible)")


def run(args: argparse.Namespace) -> int:
    """Run the agent; returns the exit code."""
    try:
        config = load_config(args.config)
        configure_logging(config.log_level)
        settings = agent_settings(config)
        feed = _simulated_blocks(args, settings) if args.simulate else None
    except (ConfigError, ValueError) as exc:
        return _refuse("cannot start the edge agent", exc)
    try:
        return _run(config, settings, feed)
    finally:
        if feed is not None:
            feed.close()


def _run(config: Config, settings: AgentSettings, blocks: BlockFeed | None) -> int:
    try:
        scorer = _scorer(config, settings)
    except ModelPackageError as exc:
        return _refuse("cannot load the edge model", exc)
    stop = threading.Event()
    try:
        agent = EdgeAgent(settings, devices=_devices(config), scorer=scorer)
    except OutboxError as exc:
        return _refuse("cannot open the outbox", exc)
    _on_signals(stop, agent)
    agent.start()
    if config.edge.metrics_port:
        from edge_agent.metrics import serve_metrics  # prometheus_client only when served

        serve_metrics([agent], config.edge.metrics_port)
    watcher = None
    if scorer is not None:
        from edge_agent.model_updates import watch_models

        watcher = watch_models(agent, settings.broker_url, config.edge.model_staging_dir)
    readings: queue.SimpleQueue[Item] = queue.SimpleQueue()
    inputs = [OpcUaInput(server, readings.put) for server in config.opcua]
    for source in inputs:
        source.start()
    raw = _raw_input(config, settings, readings)
    intake = Intake(agent, raw.start() if raw is not None else None)
    started = time.monotonic()
    try:
        _pump(agent, blocks, readings, intake, stop)
    finally:
        for source in inputs:
            source.stop()
        if watcher is not None:
            watcher.close()
        intake.drain(readings)
        intake.close_raw()
        intake.drain(readings)
        agent.stop_waiting()
        drained = agent.close(config.edge.shutdown_timeout_s)
    _print_summary(agent.final_stats, time.monotonic() - started, drained)
    return 0


def agent_settings(config: Config) -> AgentSettings:
    """The agent's settings from the ``[edge]`` and ``[site_broker]`` sections."""
    edge, broker = config.edge, config.site_broker
    if edge.site is None or edge.gateway_id is None:
        msg = "set edge.site and edge.gateway_id: one agent process serves one gateway"
        raise ValueError(msg)
    if broker.url.startswith("embedded:"):
        msg = "the edge agent needs a real site broker: set site_broker.url to mqtt://host:port"
        raise ValueError(msg)
    return AgentSettings(
        site=edge.site, gateway_id=edge.gateway_id, broker_url=broker.url,
        username=broker.username, mqtt_protocol=broker.protocol, tls=TlsOptions.of(broker.tls),
        password=broker.password.get_secret_value() if broker.password else None,
        outbox_path=edge.outbox_path, outbox_max_bytes=int(edge.outbox_max_mb * 1024 * 1024),
        outbox_full_policy=edge.outbox_full_policy, outbox_synchronous=edge.outbox_synchronous,
        max_batch_readings=edge.batch_max_readings, max_batch_delay_s=edge.batch_max_delay_s,
        max_in_flight=edge.max_in_flight,
        backlog_rate_per_s=edge.backlog_rate_per_s or None, heartbeat_s=edge.heartbeat_s,
    )


def _pump(agent: EdgeAgent, blocks: Iterator[Any] | None, readings: queue.SimpleQueue[Item],
          intake: Intake, stop: threading.Event) -> None:
    """Move input into the agent until stopped, or until the simulated run is over."""
    while not stop.is_set():
        busy = intake.drain(readings) > 0
        if blocks is not None:
            block = next(blocks, None)
            if block is None:
                return
            agent.submit_block(block)
            busy = True
        agent.tick()
        intake.settle()
        if not busy:
            stop.wait(IDLE_WAIT_S)


class Intake:
    """Hand queued readings to the agent; acknowledge raw MQTT messages once they are stored.

    Readings enter the agent's batcher, which writes them to the outbox in arrival order, so
    ``submitted - agent.batcher.pending`` readings are stored at any time; each raw message
    waits in an :class:`AckQueue` for its reading's turn. Invalid raw messages become dead
    letters, stored at once. A raw message that arrives after :meth:`close_raw` is left
    unacknowledged for the broker to send again at the next start.
    """

    def __init__(self, agent: EdgeAgent, raw: MqttReadingInput | None) -> None:
        self.agent = agent
        self.raw = raw
        self.acks = AckQueue(raw.ack) if raw is not None else None
        self.submitted = 0
        self._raw_closed = False

    def drain(self, readings: queue.SimpleQueue[Item]) -> int:
        """Hand every queued item to the agent; returns how many there were."""
        count = 0
        while True:
            try:
                item = readings.get_nowait()
            except queue.Empty:
                return count
            count += 1
            if isinstance(item, OpcUaReading):
                self._opcua(item)
            elif not self._raw_closed:
                self._raw(item)

    def settle(self) -> None:
        """Write readings that raw messages wait for, then acknowledge what is stored."""
        if self.acks is None or not self.acks.waiting:
            return
        self.agent.batcher.flush()
        self.acks.release(self.submitted - self.agent.batcher.pending)

    def close_raw(self) -> None:
        """Store and acknowledge what the raw input delivered, then disconnect it."""
        if self.raw is None:
            return
        self.settle()
        self._raw_closed = True
        self.raw.stop()

    def _opcua(self, reading: OpcUaReading) -> None:
        try:
            self.agent.submit_reading(reading.device_id, reading.ts_ms,
                                      {reading.metric: reading.value})
        except ValidationError as exc:
            log.warning("dropped OPC-UA reading of node %s: %s", reading.node_id, exc)
            return
        self.submitted += 1

    def _raw(self, item: DeviceReading | InvalidMessage) -> None:
        assert self.raw is not None  # only the raw input queues these
        assert self.acks is not None
        if isinstance(item, DeviceReading):
            # valid already: RawReading and the topic check what Reading checks
            self.agent.submit_reading(item.device_id, item.ts_ms, item.metrics, item.quality)
            self.submitted += 1
        elif not self.agent.submit_dead_letter(self.raw.dead_letter(item)):
            return  # shutdown interrupted a wait for room: the broker sends it again
        self.acks.after(item.delivery, readings=self.submitted)


def _raw_input(config: Config, settings: AgentSettings,
               readings: queue.SimpleQueue[Item]) -> MqttReadingInput | None:
    """The raw device input of ``edge.raw_input_url`` (None when unset), not started."""
    edge = config.edge
    if edge.raw_input_url is None:
        return None
    return MqttReadingInput(
        edge.raw_input_url, site=settings.site, gateway_id=settings.gateway_id,
        on_reading=readings.put, on_invalid=readings.put, protocol=edge.raw_input_protocol,
        session_expiry_s=edge.raw_input_session_expiry_s,
    )


def _scorer(config: Config, settings: AgentSettings) -> EdgeScorer | None:
    if config.edge.model_dir is None:
        return None
    return EdgeScorer(load_package(config.edge.model_dir), site=settings.site,
                      gateway_id=settings.gateway_id, threshold=config.edge.alert_threshold)


def _devices(config: Config) -> list[str]:
    """Devices announced in birth messages: those of the OPC-UA mappings."""
    return sorted({node.device_id for server in config.opcua for node in server.nodes})


def _simulated_blocks(args: argparse.Namespace, settings: AgentSettings) -> BlockFeed:
    """The gateway's blocks from the simulator in a child process (ValueError: bad options)."""
    from simulators.feed import BlockFeed, FeedOptions

    return BlockFeed.start(FeedOptions(
        gateway_id=settings.gateway_id, meters=args.meters, districts=args.districts,
        meters_per_gateway=args.meters_per_gateway, days=args.days, seed=args.seed,
        speed=args.speed))


def _refuse(what: str, exc: Exception) -> int:
    """Say why the agent cannot start; returns the exit code (2)."""
    from meshwatch.cli import refuse  # rich, only when there is something to say

    return refuse(what, exc)


def _on_signals(stop: threading.Event, agent: EdgeAgent) -> None:
    def handle(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()
        agent.stop_waiting()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


def _print_summary(stats: dict[str, int | float], elapsed: float, drained: bool) -> None:
    """The run's counters, and the agent's own CPU time and peak RSS (not its children's)."""
    own = resource.getrusage(resource.RUSAGE_SELF)  # before rich is imported
    from rich.console import Console
    from rich.table import Table

    table = Table("what", "value", title="edge agent")
    for key in ("readings_in", "messages_out", "dead_letters", "acked", "resent", "reconnects",
                "queue_depth", "readings_dropped"):
        table.add_row(key, f"{stats.get(key, 0):,}")
    table.add_row("elapsed", f"{elapsed:.1f} s")
    table.add_row("cpu", f"{own.ru_utime + own.ru_stime:.2f} s")
    table.add_row("peak rss", f"{own.ru_maxrss / 1024:.1f} MB")
    table.add_row("outbox", "empty" if drained else "kept for the next start")
    table.add_row("stopped at", datetime.now(UTC).isoformat(timespec="seconds"))
    Console().print(table)
    sys.stdout.flush()
