"""``meshwatch demo``: the platform as far as it exists, in one process, with no servers.

What runs, in order of the data path:

1. the embedded MQTT broker (amqtt, :mod:`meshwatch.embedded_broker`), or ``--broker URL``;
2. the fleet simulator (``--meters`` customer meters in ``--districts`` districts for
   ``--days`` simulated days, as fast as it goes) and, for district 1, the OPC-UA pump
   station (:mod:`simulators.opcua_station`) serving in simulated time;
3. one edge agent per gateway, each with its durable outbox and the edge model (trained on
   the first run into ``OUT/edge-model``); the SCADA gateway of district 1 reads its pump
   station over OPC-UA instead of from the simulator;
4. the mesh bridge (:mod:`mesh_bridge.shell`, with its router process) from the site broker
   into the cloud mesh (a second embedded broker, or the same ``--broker``), validating
   against the registry the simulator writes into ``OUT/registry.csv``;
5. subscribers that count what reaches the site broker and, through the bridge, the mesh,
   per gateway, by ``(device, seq)``.

It ends with a table per gateway (readings sent, at the site broker, in the mesh, missing,
scores, edge alerts) and exits 1 if any reading an agent accepted did not reach the mesh.
This module belongs to the command-line layer: it is the one place besides
:mod:`meshwatch.cli` that wires other packages together, and it imports them only when the
demo runs.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import queue
import shutil
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from meshwatch.contract import (
    Alert,
    ContractError,
    DeadLetter,
    EdgeScore,
    TelemetryBatch,
    decode_event,
    topics,
)

OPCUA_DISTRICT = 1
OPCUA_SPEED = 3600.0  # one simulated hour per second
DELIVERY_TIMEOUT_S = 60.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``meshwatch demo``."""
    parser.add_argument("--meters", type=int, default=2000, help="customer meters (2000)")
    parser.add_argument("--districts", type=int, default=3, help="districts (3)")
    parser.add_argument("--days", type=float, default=7.0, help="simulated days (7)")
    parser.add_argument("--seed", type=int, default=7, help="simulator seed (7)")
    parser.add_argument("--out", type=Path, default=Path("demo-out"),
                        help="work directory: outboxes, the edge model (demo-out)")
    parser.add_argument("--broker", default=None,
                        help="use this broker (mqtt://host:port) instead of the embedded one")
    parser.add_argument("--quick", action="store_true",
                        help="a small run for CI: 600 meters, 2 districts, 2 days")


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns 0 when every accepted reading reached the broker."""
    from edge_agent.agent import AgentSettings, EdgeAgent
    from edge_agent.opcua_input import OpcUaInput, OpcUaReading
    from edge_agent.publisher import MqttProtocol
    from edge_agent.scoring import EdgeScorer
    from meshwatch.config import OpcUaServerConfig
    from meshwatch.embedded_broker import MQTT_PROTOCOL, EmbeddedBroker, free_port
    from simulators import FleetConfig, FleetSimulator, SimConfig
    from simulators.opcua_station import PUMP_METRICS, PumpStation, pump_node_id

    if args.quick:
        args.meters, args.districts, args.days = 600, 2, 2.0
    logging.getLogger("asyncua").setLevel(logging.ERROR)  # security-policy chatter
    console = Console()
    started = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    model = _edge_model(args.out / "edge-model", console)
    brokers = [] if args.broker else [EmbeddedBroker().start(), EmbeddedBroker().start()]
    url = args.broker or brokers[0].url
    mesh_url = args.broker or brokers[1].url
    protocol: MqttProtocol = "5" if args.broker else MQTT_PROTOCOL
    sim_config = SimConfig(fleet=FleetConfig(meters=args.meters, districts=args.districts),
                           days=args.days, seed=args.seed)
    simulator = FleetSimulator(sim_config)
    site_counter = _Counter(url, protocol, ("site_telemetry", "site_scores", "site_alerts"))
    mesh = _Counter(mesh_url, protocol, ("mesh_telemetry", "dead_letter"))
    bridge = _bridge(args.out, simulator, url, mesh_url, protocol)

    station_config = SimConfig(fleet=sim_config.fleet, days=365, seed=args.seed,
                               speed=OPCUA_SPEED)
    station = PumpStation(station_config, OPCUA_DISTRICT, port=free_port("127.0.0.1"))
    loop = asyncio.new_event_loop()
    loop_thread = threading.Thread(target=loop.run_forever, name="opcua-station", daemon=True)
    loop_thread.start()
    asyncio.run_coroutine_threadsafe(station.start(), loop).result(timeout=30)
    scada = f"dma-{OPCUA_DISTRICT:02d}-scada"
    opcua_server = OpcUaServerConfig(
        url=station.endpoint, publishing_interval_ms=100, keepalive_s=2, reconnect_max_s=2,
        nodes=[{"node_id": pump_node_id(station.device_id, metric), "device_id": station.device_id,
                "metric": metric} for metric in PUMP_METRICS],
    )

    outboxes = args.out / "outboxes"
    shutil.rmtree(outboxes, ignore_errors=True)
    agents: dict[str, EdgeAgent] = {}
    fleet = simulator.fleet
    for gateway, district in zip(fleet.gateway_ids.tolist(), fleet.gateway_district.tolist(),
                                 strict=True):
        site = fleet.district_ids[district]  # a district's gateways share its site broker
        settings = AgentSettings(
            site=site, gateway_id=gateway, broker_url=url, mqtt_protocol=protocol,
            outbox_path=outboxes / f"{gateway}.db", outbox_synchronous="NORMAL",
            backlog_rate_per_s=None, heartbeat_s=5.0)
        scorer = EdgeScorer(model, site=site, gateway_id=gateway, threshold=0.8)
        agents[gateway] = EdgeAgent(settings, scorer=scorer).start()
    readings: queue.SimpleQueue[OpcUaReading] = queue.SimpleQueue()
    opcua = OpcUaInput(opcua_server, readings.put)
    opcua.start()

    sent: dict[str, set[tuple[str, int]]] = defaultdict(set)
    start_ms = sim_config.start_ms
    interrupted = False
    try:
        with _progress(console) as progress:
            task = progress.add_task("simulated days", total=args.days)
            for block in simulator:
                if block.gateway_id == scada and block.kind == "pump_station":
                    continue  # district 1's pump station arrives over OPC-UA
                if agents[block.gateway_id].submit_block(block):
                    sent[block.gateway_id].update(
                        zip(block.device_ids.tolist(), block.seq.tolist(), strict=True))
                _feed_opcua(agents[scada], readings)
                progress.update(task, completed=(block.sent_ms - start_ms) / 86_400_000)
    except KeyboardInterrupt:
        interrupted = True
        console.print("[yellow]interrupted: stopping cleanly[/yellow]")
    finally:
        opcua.stop()
        _feed_opcua(agents[scada], readings)
        asyncio.run_coroutine_threadsafe(station.stop(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        drained = {gateway: agent.close(timeout_s=DELIVERY_TIMEOUT_S)
                   for gateway, agent in agents.items()}
    opcua_sent = int(agents[scada].final_stats["readings_in"]) - len(sent[scada])
    site_counter.wait_for(sent, DELIVERY_TIMEOUT_S)
    mesh.wait_for(sent, DELIVERY_TIMEOUT_S)
    bridged = bridge.stop(DELIVERY_TIMEOUT_S)
    site_counter.close()
    mesh.close()
    for broker in brokers:
        broker.stop()
    missing = _report(console, agents, sent, site_counter, mesh, drained, opcua_sent, scada,
                      time.monotonic() - started)
    _report_bridge(console, bridge, mesh, bridged)
    return 1 if missing or interrupted else 0


def _bridge(out: Path, simulator: Any, site_url: str, mesh_url: str, protocol: str) -> Any:
    """The mesh bridge from the site broker to the mesh, started and subscribed."""
    from edge_agent.publisher import parse_broker_url
    from mesh_bridge.routing import RouterSpec
    from mesh_bridge.shell import Bridge, BridgeSettings, SiteBroker
    from meshwatch.registry import load_registry
    from simulators.output import write_registry

    write_registry(out / "registry.csv", simulator.fleet, simulator.config)
    settings = BridgeSettings(
        sites=(SiteBroker(parse_broker_url(site_url), protocol),),  # type: ignore[arg-type]
        cloud=parse_broker_url(mesh_url), cloud_protocol=protocol,  # type: ignore[arg-type]
        client_id="demo-bridge")
    bridge = Bridge(settings, RouterSpec(load_registry(out / "registry.csv"),
                                         partitions=4))
    bridge.start()
    if not bridge.site.subscribed.wait(30):
        msg = f"the demo's bridge cannot subscribe at {site_url}"
        raise RuntimeError(msg)
    return bridge


def _edge_model(directory: Path, console: Console) -> Any:
    """The demo's edge model: loaded, or trained on the first run."""
    from models.edge.package import ModelPackageError, load_package

    try:
        return load_package(directory)
    except ModelPackageError:
        from models.command import TrainingProgress
        from models.edge.train import TrainSettings, train_edge_model, write_package

        console.print("training the edge model (first run only) ...")
        with TrainingProgress(quiet=False) as progress:
            write_package(train_edge_model(TrainSettings(meters=1000, days=5), progress),
                          directory)
        return load_package(directory)


def _feed_opcua(agent: Any, readings: queue.SimpleQueue[Any]) -> None:
    while True:
        try:
            reading = readings.get_nowait()
        except queue.Empty:
            return
        agent.submit_reading(reading.device_id, reading.ts_ms, {reading.metric: reading.value})


@dataclass
class _Counter:
    """A QoS1 subscriber counting what reaches a broker on ``kinds`` of topics, per gateway."""

    url: str
    protocol: str
    kinds: tuple[str, ...]
    received: dict[str, set[tuple[str, int]]] = field(default_factory=lambda: defaultdict(set))
    duplicates: Counter[str] = field(default_factory=Counter)
    windows: Counter[str] = field(default_factory=Counter)
    alerts: Counter[str] = field(default_factory=Counter)
    dead_letters: Counter[str] = field(default_factory=Counter)
    undecodable: int = 0

    def __post_init__(self) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        from edge_agent.publisher import paho_protocol, parse_broker_url

        self._lock = threading.Lock()
        address = parse_broker_url(self.url)
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2,
                                  protocol=paho_protocol(self.protocol))
        self.client.on_connect = lambda client, *_: client.subscribe(
            [(topics.subscription(kind), 1) for kind in self.kinds])
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(address.host, address.port)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            msg = f"the demo cannot subscribe at {self.url}"
            raise RuntimeError(msg)

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        try:
            event = decode_event(message.payload)
        except ContractError:
            self.undecodable += 1
            return
        with self._lock:
            if isinstance(event, TelemetryBatch):
                seen = self.received[event.gateway_id]
                for reading in event.readings:
                    key = (reading.device_id, reading.seq)
                    if key in seen:
                        self.duplicates[event.gateway_id] += 1
                    seen.add(key)
            elif isinstance(event, EdgeScore):
                self.windows[event.gateway_id] += len(event.windows)
            elif isinstance(event, Alert) and event.status == "open":
                self.alerts[str(event.evidence.get("gateway_id"))] += 1
            elif isinstance(event, DeadLetter):
                self.dead_letters[event.reason] += 1

    def wait_for(self, sent: dict[str, set[tuple[str, int]]], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if all(keys <= self.received[gateway] for gateway, keys in sent.items()):
                    return
            time.sleep(0.1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _report(console: Console, agents: dict[str, Any], sent: dict[str, set[tuple[str, int]]],
            site: _Counter, mesh: _Counter, drained: dict[str, bool], opcua_sent: int,
            scada: str, elapsed: float) -> int:
    table = Table("gateway", "sent", "at site broker", "in the mesh", "missing", "dups",
                  "windows", "alerts", "outbox",
                  title="edge agents → site broker → bridge → mesh, counted by (device, seq)",
                  caption="missing: sent but not in the mesh; dups: readings that reached the"
                  " site broker twice (the simulator sends duplicates on purpose; the bridge"
                  " drops them); windows: feature windows scored at the edge; alerts: edge"
                  " alerts opened")
    total_missing = 0
    for gateway, agent in agents.items():
        stats = agent.final_stats
        in_mesh = mesh.received[gateway]
        missing = len(sent[gateway] - in_mesh)
        total_missing += missing
        label = gateway + (" +OPC-UA" if gateway == scada else "")
        table.add_row(label, f"{stats['readings_in']:,}", f"{len(site.received[gateway]):,}",
                      f"{len(in_mesh):,}", f"[red]{missing:,}[/red]" if missing else "0",
                      f"{site.duplicates[gateway]:,}", f"{site.windows[gateway]:,}",
                      f"{site.alerts[gateway]:,}", "empty" if drained[gateway] else "kept")
    console.print(table)
    total = sum(agent.final_stats["readings_in"] for agent in agents.values())
    verdict = f"{total_missing:,} MISSING" if total_missing else "nothing lost"
    console.print(f"{total:,} readings through {len(agents)} edge agents and the bridge in"
                  f" {elapsed:.1f} s; {opcua_sent:,} of them read over OPC-UA from {scada}'s"
                  f" pump station; {verdict}.")
    return total_missing


def _report_bridge(console: Console, bridge: Any, mesh: _Counter, flushed: bool) -> None:
    m = bridge.metrics

    def value(counter: Any) -> int:
        return int(counter._value.get())

    letters = ", ".join(f"{reason} {n:,}" for reason, n in sorted(mesh.dead_letters.items()))
    console.print(
        f"bridge: {value(m.messages_in):,} site messages, {value(m.readings_in):,} readings in,"
        f" {value(m.forwarded):,} forwarded in {value(m.messages_out):,} mesh messages,"
        f" {value(m.duplicates):,} duplicates dropped; dead letters: {letters or 'none'};"
        f" {'all acknowledged' if flushed else 'some left unacknowledged'}.")


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn(
        "{task.completed:.1f}/{task.total:g}"), TimeElapsedColumn(), console=console)

