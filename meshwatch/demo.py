"""``meshwatch demo``: the platform as far as it exists, on embedded defaults, with no servers.

What runs, in order of the data path:

1. two embedded MQTT brokers (amqtt, :mod:`meshwatch.embedded_broker`; MQTT 3.1.1 only), a
   site broker and the cloud mesh, or ``--broker URL`` for both (MQTT 5);
2. the fleet simulator (``--meters`` customer meters in ``--districts`` districts for
   ``--days`` simulated days, as fast as it goes) and, for district 1, the OPC-UA pump station
   (:mod:`simulators.opcua_station`) serving in simulated time;
3. one edge agent per gateway, each with its durable outbox and the edge model (trained on
   the first run into ``OUT/edge-model``); the SCADA gateway of district 1 reads its pump
   station over OPC-UA instead of from the simulator;
4. the mesh bridge (:mod:`mesh_bridge.shell`, with its router process) from the site broker
   into the mesh, validating against the registry the simulator writes into
   ``OUT/registry.csv``; with an InfluxDB URL (see 5) it writes its statistics there as
   ``meshwatch bridge`` does (:mod:`mesh_bridge.stats`);
5. the dataflow, ``meshwatch flow`` in a child process (config ``OUT/flow.toml``, log
   ``OUT/flow.log``) on the mesh broker over MQTT 3.1.1, with the Parquet lake in
   ``OUT/lake`` and its recovery directory in ``OUT/flow-recovery``; InfluxDB writes only with
   ``--influx-url`` or ``MESHWATCH_INFLUXDB__URL`` (token, org and bucket from
   ``MESHWATCH_INFLUXDB__TOKEN``, ``__ORG``, ``__BUCKET``). A child process because the demo's
   process already runs everything else under one GIL, bytewax holds the thread that runs a
   flow until it ends, and so the flow runs exactly as deployed; it shares the demo's process
   group (Ctrl-C reaches it) and is stopped and reaped on every way out. Where the flow has a
   detection stage (it needs the registry, given here), its alerts go to the mesh's alert
   topic too;
6. remediation in-process (:class:`remediation.command.Service`: SQLite in
   ``OUT/remediation.db``, the API and the crew and operator pages on a free port, printed at
   the start) on the mesh's alert topic (the edge alerts the bridge forwards, and the
   dataflow's); one crew per district, worked by the crew simulator
   (:mod:`simulators.crews`) while the simulation runs: the crews find what the ground truth
   holds at the time (incidents as they begin, clock skews and silences from the
   communication faults, the silence of a dead battery; see
   :class:`simulators.crews.TruthBook`);
7. subscribers that count what reaches the site broker and the mesh, per gateway, by
   ``(device, seq)``, stamp when it arrived, and keep the alerts and feedback in the mesh.

The simulation uses :data:`meshwatch.report.detection.DEMO_RATES` (customer leaks and bursts
raised, so that a few days hold enough to measure) and writes its truth into
``OUT/ground_truth.csv`` and ``OUT/comm_faults.csv``. It ends with a table per gateway
(readings sent, at the site broker, in the mesh, missing, scores, edge alerts), the bridge's
counts, the lake read back against the mesh (every reading once), remediation's work orders
(created, resolved by outcome, false alarms, cancelled, still open, feedback sent) and KPIs,
then latency and throughput, detection against the ground truth by kind, the Grafana
dashboards exported into ``OUT/dashboards`` and the report ``OUT/report.html`` (with
``report.json`` and PNG plots; :mod:`meshwatch.report`). It exits 1 if any reading an agent
accepted did not reach the mesh, if the lake misses a reading of the mesh or holds one twice,
if an alert of the mesh was not stored by remediation, or (``--quick``) if detection falls
below a floor of :data:`meshwatch.report.detection.QUICK_FLOORS`, saying which. Every run
starts from empty outboxes, lake, recovery directory and database. This module belongs to
the command-line layer: it is the one place besides :mod:`meshwatch.cli` that wires other
packages together, and it imports them only when the demo runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from meshwatch.contract import (
    Alert,
    ContractError,
    DeadLetter,
    EdgeScore,
    Feedback,
    TelemetryBatch,
    decode_event,
    topics,
)
from meshwatch.report.timing import Arrivals

if TYPE_CHECKING:
    from meshwatch.report.summary import Counted
    from simulators.crews import TruthBook

OPCUA_DISTRICT = 1
OPCUA_SPEED = 3600.0  # one simulated hour per second
DELIVERY_TIMEOUT_S = 60.0
MESH_PARTITIONS = 4
FLOW_CLIENT_ID = "demo-flow"
FLOW_EPOCH_S = 1.0
"""Seconds per dataflow epoch. Acks go out one or two epochs late, and amqtt forgets a QoS1
message (no redelivery) whose PUBACK takes more than 5 s: keep this well below."""
FLOW_IDLE_FLUSH_S = 5.0
"""Wall-clock seconds before the dataflow stops waiting for a quiet shard. At 1 s, on a
loaded machine, districts moved on without shards that had only fallen behind, and their
meters were alerted as silent: 300 false ``silent`` alerts in one quick run (seed 8)
against none at 5 s."""
STALL_TIMEOUT_S = 60.0
"""The lake or remediation waits give up when nothing moved for this long."""
REMEDIATION_CLIENT_ID = "demo-remediation"
OPERATOR_TOKEN = "demo-operator"  # a demo on loopback: printed on purpose
CREW_SPEED = 3600.0
"""The crews' time compression: an hour of field work per second."""
CREW_POLL_S = 0.25
"""The crews look at their work orders this often (15 minutes of field time at
:data:`CREW_SPEED`, the order of their reaction time): their HTTP calls share the demo's
process with the simulation, so not more often."""
QUICK_METERS, QUICK_DISTRICTS, QUICK_DAYS = 400, 2, 6.0
"""``--quick``: 3 days for the detectors to learn (see :data:`meshwatch.report.detection
.WARMUP_DAYS`) and 3 scored days; under 2 minutes on 2 cores."""


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
                        help=f"a small run for CI: {QUICK_METERS} meters, {QUICK_DISTRICTS}"
                        f" districts, {QUICK_DAYS:g} days; fails below its detection floors")
    parser.add_argument("--influx-url", default=None,
                        help="also write the dataflow's points and the bridge's statistics"
                        " to this InfluxDB v2 write API"
                        " (default: MESHWATCH_INFLUXDB__URL if set, else no writes; token,"
                        " org and bucket from MESHWATCH_INFLUXDB__TOKEN, __ORG, __BUCKET)")


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns 0 when every reading arrived everywhere it should, once."""
    from edge_agent.agent import AgentSettings, EdgeAgent
    from edge_agent.opcua_input import OpcUaInput, OpcUaReading
    from edge_agent.publisher import MqttProtocol
    from edge_agent.scoring import EdgeScorer
    from meshwatch.config import OpcUaServerConfig
    from meshwatch.embedded_broker import (
        MQTT_PROTOCOL,
        EmbeddedBroker,
        free_port,
        puback_timeouts,
    )
    from meshwatch.report.detection import DEMO_RATES, QUICK_FLOORS, TruthCollector
    from meshwatch.report.summary import summarise
    from simulators import FleetConfig, FleetSimulator, SimConfig
    from simulators.crews import TruthBook
    from simulators.opcua_station import PUMP_METRICS, PumpStation, pump_node_id
    from simulators.output import CommFaultWriter, EpisodeWriter

    if args.quick:
        args.meters, args.districts, args.days = QUICK_METERS, QUICK_DISTRICTS, QUICK_DAYS
    logging.getLogger("asyncua").setLevel(logging.ERROR)  # security-policy chatter
    console = Console()
    started = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    for stale in ("outboxes", "lake", "flow-recovery"):  # every run starts from nothing
        shutil.rmtree(args.out / stale, ignore_errors=True)
    for suffix in ("", "-wal", "-shm"):
        (args.out / f"remediation.db{suffix}").unlink(missing_ok=True)
    model = _edge_model(args.out / "edge-model", console)
    influx_url = args.influx_url or os.environ.get("MESHWATCH_INFLUXDB__URL") or None
    with contextlib.ExitStack() as stack:  # stops what started, in reverse, however we leave
        brokers = [] if args.broker else [
            stack.enter_context(EmbeddedBroker()), stack.enter_context(EmbeddedBroker())]
        url = args.broker or brokers[0].url
        mesh_url = args.broker or brokers[1].url
        mesh_broker = brokers[1] if brokers else None
        protocol: MqttProtocol = "5" if args.broker else MQTT_PROTOCOL
        sim_config = SimConfig(fleet=FleetConfig(meters=args.meters, districts=args.districts),
                               incidents=DEMO_RATES, days=args.days, seed=args.seed)
        simulator = FleetSimulator(sim_config)
        fleet = simulator.fleet
        truth = TruthCollector(fleet)  # for scoring the detection at the end
        crew_truth = TruthBook()  # what the crews find, as the simulation goes
        cadence_s = fleet.cadence_s(sim_config.fleet)
        truth_file = EpisodeWriter(args.out / "ground_truth.csv", fleet, "incident_id")
        stack.callback(truth_file.close)
        comm_file = CommFaultWriter(args.out / "comm_faults.csv", fleet)
        stack.callback(comm_file.close)

        def on_episode(episode: Any) -> None:
            truth.on_episode(episode)
            if episode.episode_id.startswith("inc-"):  # incidents, not confounders
                truth_file(episode)
                crew_truth.record_simulated(episode, fleet)

        def on_comm_faults(log: Any) -> None:
            truth.on_comm_faults(log)
            comm_file(log)
            crew_truth.record_comm_faults(log, fleet, cadence_s)

        simulator.on_episode, simulator.on_comm_faults = on_episode, on_comm_faults
        site_counter = _Counter(url, protocol, ("site_telemetry", "site_scores", "site_alerts"))
        stack.callback(site_counter.close)
        mesh = _Counter(mesh_url, protocol, ("mesh_telemetry", "dead_letter", "alerts",
                                             "feedback"))
        stack.callback(mesh.close)
        bridge = _bridge(args.out, simulator, url, mesh_url, protocol)  # writes registry.csv
        stats = _bridge_stats(bridge, influx_url)
        if stats is not None:  # stopped after the bridge: its last snapshot has every count
            stack.callback(stats.stop)
        stop_bridge = _Once(bridge.stop)
        # on the way out after Ctrl-C, which also stopped its router process: no traceback
        stack.callback(_unless_interrupted, stop_bridge, 0)
        flow = _Flow(args.out, mesh_url, protocol, influx_url)
        stack.callback(flow.stop)
        remediation = _Remediation(args.out, mesh_url, protocol, fleet.district_ids,
                                   free_port("127.0.0.1"), influx_url)
        stack.callback(remediation.stop)
        flow.start(mesh_broker)
        remediation.start(mesh_broker)
        remediation.start_crews(crew_truth)  # they work while the simulation runs
        console.print(f"crew page: [bold]{remediation.base_url}/ui/crew[/bold] (log in at"
                      f" /ui/login with a crew token: {remediation.token_hint}); operator page:"
                      f" /ui/operator (token {OPERATOR_TOKEN})", soft_wrap=True)
        console.print(f"dataflow: meshwatch flow in a child process, lake in {flow.lake},"
                      f" InfluxDB {'at ' + influx_url if influx_url else 'off'}; log in"
                      f" {flow.log}", soft_wrap=True, highlight=False)

        station_config = SimConfig(fleet=sim_config.fleet, days=365, seed=args.seed,
                                   speed=OPCUA_SPEED)
        station = PumpStation(station_config, OPCUA_DISTRICT, port=free_port("127.0.0.1"))
        loop = asyncio.new_event_loop()
        loop_thread = threading.Thread(target=loop.run_forever, name="opcua-station",
                                       daemon=True)
        loop_thread.start()
        asyncio.run_coroutine_threadsafe(station.start(), loop).result(timeout=30)
        scada = f"dma-{OPCUA_DISTRICT:02d}-scada"
        opcua_server = OpcUaServerConfig(
            url=station.endpoint, publishing_interval_ms=100, keepalive_s=2, reconnect_max_s=2,
            nodes=[{"node_id": pump_node_id(station.device_id, metric),
                    "device_id": station.device_id, "metric": metric}
                   for metric in PUMP_METRICS],
        )

        outboxes = args.out / "outboxes"
        agents: dict[str, EdgeAgent] = {}
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
        start_ms = known_ms = sim_config.start_ms
        interrupted = False
        try:
            with _progress(console) as progress:
                task = progress.add_task("simulated days", total=args.days)
                for block in simulator:
                    if block.sent_ms > known_ms:  # a new step: incidents that began in it
                        known_ms = block.sent_ms
                        for episode in simulator.ongoing_episodes():
                            crew_truth.record_simulated(episode, fleet)
                    truth.trace(block)
                    if block.gateway_id == scada and block.kind == "pump_station":
                        continue  # district 1's pump station arrives over OPC-UA
                    if agents[block.gateway_id].submit_block(block):
                        sent[block.gateway_id].update(
                            zip(block.device_ids.tolist(), block.seq.tolist(), strict=True))
                    _feed_opcua(agents[scada], readings)
                    progress.update(task, completed=(block.sent_ms - start_ms) / 86_400_000)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            opcua.stop()
            _feed_opcua(agents[scada], readings)
            asyncio.run_coroutine_threadsafe(station.stop(), loop).result(timeout=30)
            loop.call_soon_threadsafe(loop.stop)
            drained = {gateway: agent.close(timeout_s=0 if interrupted else DELIVERY_TIMEOUT_S)
                       for gateway, agent in agents.items()}
        if interrupted:
            console.print("[yellow]interrupted: stopping everything[/yellow]")
            return 1
        try:
            opcua_sent = int(agents[scada].final_stats["readings_in"]) - len(sent[scada])
            site_counter.wait_for(sent, DELIVERY_TIMEOUT_S)
            mesh.wait_for(sent, DELIVERY_TIMEOUT_S)
            bridged = bool(stop_bridge(DELIVERY_TIMEOUT_S))
            in_mesh = mesh.readings()
            lake = flow.wait_for_lake(in_mesh, console)
            work = remediation.finish(mesh, console)
            late_pubacks = puback_timeouts()
        except KeyboardInterrupt:
            console.print("[yellow]interrupted: stopping everything[/yellow]")
            return 1
    elapsed = time.monotonic() - started
    missing = _report(console, agents, sent, site_counter, mesh, drained, opcua_sent, scada,
                      elapsed)
    _report_bridge(console, bridge, mesh, bridged)
    _report_lake(console, lake, len(in_mesh), influx_url, late_pubacks)
    _report_remediation(console, work)
    summary = summarise(
        console, args.out, _counted(args, elapsed, agents, sent, mesh, missing, lake, work,
                                    influx_url),
        site_counter.arrivals, mesh.arrivals, mesh.alert_log, truth, simulator,
        QUICK_FLOORS if args.quick else ())
    if missing or not lake.exact or work.alerts_lost:
        console.print("[red]the ledger does not balance: see above[/red]")
        return 1
    if summary.failed:
        console.print(f"[red]detection below its floors[/red]: {'; '.join(summary.failed)}",
                      highlight=False, soft_wrap=True)
        return 1
    return 0


def _counted(args: argparse.Namespace, elapsed: float, agents: dict[str, Any],
             sent: dict[str, set[tuple[str, int]]], mesh: _Counter, missing: int,
             lake: _LakeCheck, work: _Work, influx_url: str | None) -> Counted:
    """What the demo counted, as sections of the report."""
    from meshwatch.report.summary import Counted

    ledger = [(gateway, f"accepted by its edge agent {agent.final_stats['readings_in']:,}"
                        " (with the duplicates the simulator sends),"
                        f" in the mesh {len(mesh.received[gateway]):,}, missing"
                        f" {len(sent[gateway] - mesh.received[gateway]):,}")
              for gateway, agent in agents.items()]
    ledger.append(("lake, read back",
                   f"{lake.rows:,} rows; missing {lake.missing:,}, twice {lake.twice:,},"
                   f" not from the mesh {lake.extra:,}"))
    ledger.append(("verdict", "nothing lost, nothing twice" if lake.exact and not missing
                   and not work.alerts_lost else "NOT BALANCED: see the rows above"))
    letters = ", ".join(f"{reason} {n:,}" for reason, n in sorted(mesh.dead_letters.items()))
    states, k = work.work_orders, work.kpis
    created = sum(states.values())

    def rate(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.0%}"

    remediation = [
        ("alerts in the mesh / stored", f"{work.alert_messages:,} / {work.stored:,}"
                                        f" ({work.alerts_lost:,} lost)"),
        ("work orders created", f"{created:,}"),
        ("resolved (by outcome)", f"{states.get('resolved', 0):,} ("
         + (", ".join(f"{o} {n:,}" for o, n in sorted(work.outcomes.items())) or "none") + ")"),
        ("closed as false alarms", f"{states.get('false_alarm', 0):,}"),
        ("cancelled (the alert cleared before a crew acknowledged)",
         f"{states.get('cancelled', 0):,}"),
        ("still open", f"{sum(states.get(s, 0) for s in ACTIVE_STATES):,}"),
        ("remediation rate", rate(k["remediation_rate"])),
        ("false-alarm rate", rate(k["false_alarm_rate"])),
        ("estimated water loss avoided", f"{k['water_saved_m3']:,.1f} m³ (remediation's KPI:"
         " each confirmed leak's estimated loss over its saved horizon)"),
    ]
    dead = [("bridge (by reason)", letters or "none"),
            ("remediation intake", f"{work.dead_letters:,}")]
    outcomes = dict(work.outcomes)
    outcomes["false_alarm"] = states.get("false_alarm", 0)
    outcomes["cancelled (cleared before a crew acknowledged)"] = states.get("cancelled", 0)
    title = (f"Meshwatch demo: {args.meters:,} meters, {args.districts} districts,"
             f" {args.days:g} simulated days, seed {args.seed}")
    total = sum(int(agent.final_stats["readings_in"]) for agent in agents.values())
    return Counted(title, elapsed, total,
                   [("Ledger, counted by (device, seq)", ledger),
                    ("Remediation", remediation), ("Dead letters", dead)],
                   outcomes, influx_url)


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


def _influx(influx_url: str | None) -> dict[str, str]:
    """The demo's ``[influxdb]`` settings (none without a URL).

    The URL, and token, org and bucket from ``MESHWATCH_INFLUXDB__TOKEN``, ``__ORG``,
    ``__BUCKET``, as the dataflow reads them.
    """
    if influx_url is None:
        return {}
    return {"url": influx_url} | {
        name: os.environ[f"MESHWATCH_INFLUXDB__{name.upper()}"]
        for name in ("token", "org", "bucket")
        if os.environ.get(f"MESHWATCH_INFLUXDB__{name.upper()}")}


def _bridge_stats(bridge: Any, influx_url: str | None) -> Any:
    """The bridge's statistics writer, started as ``meshwatch bridge`` starts it, or None.

    Only with an InfluxDB URL (:func:`_influx`), every ``bridge.stats_s`` (default).
    """
    if influx_url is None:
        return None
    from mesh_bridge.command import start_stats_writer
    from meshwatch.config import BridgeConfig, InfluxConfig

    return start_stats_writer(InfluxConfig(**_influx(influx_url)), BridgeConfig().stats_s,
                              bridge)


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
    alert_messages: int = 0
    feedback: Counter[str] = field(default_factory=Counter)
    undecodable: int = 0
    arrivals: Arrivals = field(default_factory=Arrivals)
    alert_log: list[tuple[float, Alert]] = field(default_factory=list)
    """Every alert message with the wall time it arrived."""

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
        at = time.time()
        try:
            event = decode_event(message.payload)
        except ContractError:
            self.undecodable += 1
            return
        with self._lock:
            if isinstance(event, TelemetryBatch):
                seen = self.received[event.gateway_id]
                keys = [(reading.device_id, reading.seq) for reading in event.readings]
                for key in keys:
                    if key in seen:
                        self.duplicates[event.gateway_id] += 1
                    seen.add(key)
                self.arrivals.add(keys, max(reading.ts_ms for reading in event.readings), at)
            elif isinstance(event, EdgeScore):
                self.windows[event.gateway_id] += len(event.windows)
            elif isinstance(event, Alert):
                self.alert_messages += 1
                self.alert_log.append((at, event))
                if event.status == "open":
                    self.alerts[str(event.evidence.get("gateway_id"))] += 1
            elif isinstance(event, DeadLetter):
                self.dead_letters[event.reason] += 1
            elif isinstance(event, Feedback):
                self.feedback[event.work_order_id] += 1

    def wait_for(self, sent: dict[str, set[tuple[str, int]]], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if all(keys <= self.received[gateway] for gateway, keys in sent.items()):
                    return
            time.sleep(0.1)

    def readings(self) -> set[tuple[str, int]]:
        """Every ``(device, seq)`` received, all gateways together."""
        with self._lock:
            return set().union(*self.received.values())

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class _Once:
    """Calls ``fn`` the first time only; later calls return the first result."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.called = False
        self.result: Any = None

    def __call__(self, *args: Any) -> Any:
        if not self.called:
            self.called = True
            self.result = self.fn(*args)
        return self.result


def _unless_interrupted(stop: Callable[[float], Any], timeout_s: float) -> None:
    """``stop(timeout_s)``; its RuntimeError (a child process gone, say) is expected then."""
    with contextlib.suppress(RuntimeError):
        stop(timeout_s)


def _wait_until(ready: Callable[[], bool], timeout_s: float, what: str,
                alive: Callable[[], bool] = lambda: True) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if not alive() or time.monotonic() > deadline:
            msg = f"the demo gave up waiting for {what}"
            raise RuntimeError(msg)
        time.sleep(0.1)


def _create_sessions(url: str, protocol: str, sessions: dict[str, str]) -> None:
    """Open the persistent sessions ``{client id: topic filter}`` once, subscribed at QoS1.

    For an external broker (``--broker``): what is published before a consumer connects then
    waits in its session. (The embedded amqtt keeps nothing for anonymous clients away; the
    demo waits for their subscriptions instead, see ``EmbeddedBroker.subscribers``.)
    """
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from edge_agent.publisher import paho_protocol, parse_broker_url

    address = parse_broker_url(url)
    v5 = protocol == "5"
    for client_id, topic in sessions.items():
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=paho_protocol(protocol),
                             clean_session=None if v5 else False)
        subscribed = threading.Event()
        client.on_connect = lambda c, *_, t=topic: c.subscribe(t, qos=1)
        client.on_subscribe = lambda *_, e=subscribed: e.set()
        if v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = 3600
            client.connect(address.host, address.port, clean_start=False,
                           properties=properties)
        else:
            client.connect(address.host, address.port)
        client.loop_start()
        ok = subscribed.wait(10)
        client.disconnect()
        client.loop_stop()
        if not ok:
            msg = f"the demo cannot create the session {client_id} at {url}"
            raise RuntimeError(msg)


@dataclass(frozen=True)
class _LakeCheck:
    """The lake read back against the readings that reached the mesh."""

    rows: int
    missing: int  # in the mesh, not in the lake
    extra: int  # in the lake, never in the mesh
    twice: int  # (device, seq) in the lake more than once
    files: int

    @property
    def exact(self) -> bool:
        return not (self.missing or self.extra or self.twice)


class _Flow:
    """``meshwatch flow`` in a child process on the demo's mesh broker, writing the lake.

    A child process, not a thread: the demo's process already runs the simulator, the edge
    agents, the bridge's I/O and both amqtt brokers under one GIL, and the flow gets a core of
    its own; bytewax owns the thread that runs it until the flow ends and takes Ctrl-C through
    the main thread; and the flow runs exactly as deployed, from a config file
    (``OUT/flow.toml``; log in ``OUT/flow.log``). The child stays in the demo's process group,
    so Ctrl-C in the terminal reaches it as well; :meth:`stop` ends it (SIGTERM, then SIGKILL)
    and reaps it on every way out.
    """

    def __init__(self, out: Path, mesh_url: str, protocol: str, influx_url: str | None) -> None:
        self.lake = out / "lake"
        self.recovery = out / "flow-recovery"
        self.log = out / "flow.log"
        self.config = out / "flow.toml"
        self.mesh_url = mesh_url
        self.protocol = protocol
        self.influx_url = influx_url
        self._proc: subprocess.Popen[bytes] | None = None
        self._rows: dict[Path, int] = {}
        self.config.write_text("\n".join([
            'log_level = "INFO"',
            "[mesh_broker]", f"url = {json.dumps(mesh_url)}", f"protocol = {json.dumps(protocol)}",
            "[mesh]", f"partitions = {MESH_PARTITIONS}",
            "[registry]", f"file = {json.dumps(str(out / 'registry.csv'))}",
            "[flow]", f"client_id = {json.dumps(FLOW_CLIENT_ID)}",
            f"snapshot_interval_s = {FLOW_EPOCH_S}", f"idle_flush_s = {FLOW_IDLE_FLUSH_S}",
            f"lake_dir = {json.dumps(str(self.lake))}",
            f"recovery_dir = {json.dumps(str(self.recovery))}", ""]))

    def start(self, broker: Any) -> None:
        """Start the child and return once every partition is subscribed."""
        sessions = {f"{FLOW_CLIENT_ID}-p{p}": topics.mesh_telemetry(p)
                    for p in range(MESH_PARTITIONS)}
        if broker is None:
            _create_sessions(self.mesh_url, self.protocol, sessions)
        # the demo's own settings, whatever MESHWATCH_* says, but for InfluxDB's
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("MESHWATCH_") or k.startswith("MESHWATCH_INFLUXDB__")}
        if self.influx_url:
            env["MESHWATCH_INFLUXDB__URL"] = self.influx_url
        env["RUST_BACKTRACE"] = "0"  # bytewax reports Ctrl-C as a panic: no stack dump
        with self.log.open("wb") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "meshwatch.cli", "flow", "--config", str(self.config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
        if broker is not None:
            _wait_until(lambda: all(client in broker.subscribers(topic)
                                    for client, topic in sessions.items()),
                        60, f"the dataflow to subscribe (see {self.log})", self.alive)

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def lake_rows(self) -> int:
        """Rows in the lake's committed files (they never change once renamed in place)."""
        for path in self.lake.glob("date=*/*.parquet"):
            if path not in self._rows:
                import pyarrow.parquet as pq

                with contextlib.suppress(OSError):
                    self._rows[path] = pq.read_metadata(path).num_rows
        return sum(self._rows.values())

    def wait_for_lake(self, in_mesh: set[tuple[str, int]], console: Console) -> _LakeCheck:
        """Wait for a lake row per reading in the mesh (or a stall); compare by (device, seq).

        The lake is read back from its Parquet files, as any reader would.
        """
        with console.status("waiting for the dataflow to write the lake ..."):
            _settle(lambda: len(in_mesh) - self.lake_rows())
        if not self._rows:
            return _LakeCheck(rows=0, missing=len(in_mesh), extra=0, twice=0, files=0)
        import pyarrow.dataset as ds

        table = ds.dataset(self.lake, format="parquet", partitioning="hive").to_table(
            columns=["device_id", "seq"])
        ids = Counter(zip(table.column("device_id").to_pylist(),
                          table.column("seq").to_pylist(), strict=True))
        return _LakeCheck(rows=table.num_rows, missing=len(in_mesh - ids.keys()),
                          extra=len(ids.keys() - in_mesh),
                          twice=sum(1 for n in ids.values() if n > 1), files=len(self._rows))

    def stop(self) -> int | None:
        """End the child (Ctrl-C may have already) and reap it; its exit code.

        A flow killed at any moment loses nothing (see dataflows.connectors.mqtt); here the lake
        has been read back already.
        """
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(0.5)  # a Ctrl-C in the terminal reached it already
        if proc.poll() is None:
            proc.terminate()  # SIGTERM: ends it at once (SIGINT may be ignored, as under nohup)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode


@dataclass(frozen=True)
class _Work:
    """What remediation did with the mesh's alerts."""

    alert_messages: int
    stored: int
    duplicates: int
    dead_letters: int
    work_orders: dict[str, int]  # by state
    outcomes: dict[str, int]  # resolved work orders by outcome
    feedback: int
    kpis: dict[str, Any]

    @property
    def alerts_lost(self) -> int:
        return max(0, self.alert_messages - self.stored - self.duplicates - self.dead_letters)


ACTIVE_STATES = ("open", "assigned", "acknowledged", "in_progress")


class _Remediation:
    """``meshwatch remediation`` in-process, and the crew simulator working its orders.

    SQLite in ``OUT/remediation.db``, the API and pages on a free port, alerts from the mesh
    broker's alert topic, one crew per district (both skills); InfluxDB writes only with the
    demo's InfluxDB URL. The demo's settings only: ``MESHWATCH_*`` in the environment (an
    operator's production database, say) is not read (:meth:`meshwatch.config.Config.from_values`).
    """

    def __init__(self, out: Path, mesh_url: str, protocol: str, districts: Sequence[str],
                 port: int, influx_url: str | None = None) -> None:
        from meshwatch.config import Config
        from remediation.command import Service

        self.mesh_url = mesh_url
        self.protocol = protocol
        self.crews = {f"crew-{d}": f"demo-crew-{d}" for d in districts}
        config = Config.from_values(
            influxdb=_influx(influx_url),
            database={"url": f"sqlite:///{out / 'remediation.db'}"},
            mesh_broker={"url": mesh_url, "protocol": protocol},
            registry={"file": out / "registry.csv"},
            remediation={
                "client_id": REMEDIATION_CLIENT_ID, "http_port": port,
                "operator_tokens": [OPERATOR_TOKEN], "sla_check_s": 1.0,
                "crews": [{"crew_id": crew, "districts": [crew.removeprefix("crew-")],
                           "skills": ["pipes", "meters"], "token": token}
                          for crew, token in self.crews.items()]})
        self.service = Service(config)
        self.base_url = f"http://127.0.0.1:{port}"
        crew, token = next(iter(self.crews.items()))
        self.token_hint = f"{crew}'s is {token}"
        self.crew_sim: Any = None
        self._crews_stop = threading.Event()
        self._crews_thread: threading.Thread | None = None
        self._started = False

    def start(self, broker: Any) -> None:
        """Start the service; return once the intake is subscribed to the alert topic."""
        alerts = topics.subscription("alerts")
        if broker is None:
            _create_sessions(self.mesh_url, self.protocol, {REMEDIATION_CLIENT_ID: alerts})
        self.service.start()
        self._started = True
        if broker is not None:
            _wait_until(lambda: REMEDIATION_CLIENT_ID in broker.subscribers(alerts), 30,
                        "remediation to subscribe to the alert topic")

    def start_crews(self, truth: TruthBook) -> None:
        """The crews work their orders through the API, finding what ``truth`` says."""
        from simulators.crews import CrewSimulator

        self.crew_sim = CrewSimulator(self.base_url, self.crews, truth, speed=CREW_SPEED,
                                      seed=1)
        self._crews_thread = threading.Thread(target=self._crew_loop, name="crews", daemon=True)
        self._crews_thread.start()

    def _crew_loop(self) -> None:
        while not self._crews_stop.wait(CREW_POLL_S):
            try:
                self.crew_sim.step()
            except Exception as exc:  # the API restarting, a timeout: try again
                logging.getLogger(__name__).warning("crew simulator: %s", exc)
                self._crews_stop.wait(1.0)

    def _counts(self) -> tuple[dict[str, int], dict[str, int]]:
        from sqlalchemy import func, select
        from sqlalchemy.orm import Session

        from remediation.db import WorkOrderRow

        with Session(self.service.engine) as session:
            rows = session.execute(select(WorkOrderRow.state, WorkOrderRow.outcome, func.count())
                                   .group_by(WorkOrderRow.state, WorkOrderRow.outcome)).all()
        states: Counter[str] = Counter()
        outcomes: Counter[str] = Counter()
        for state, outcome, n in rows:
            states[state] += n
            if state == "resolved":
                outcomes[outcome or "none"] += n
        return dict(states), dict(outcomes)

    def finish(self, mesh: _Counter, console: Console) -> _Work:
        """Wait until every alert in the mesh is stored and every work order closed; count.

        Each wait ends early when nothing moved for a while (crews can be slow or gone).
        """
        from remediation.kpi import compute

        intake = self.service.intake

        def processed() -> int:
            return intake.stored + intake.duplicates + intake.dead_letters

        def active() -> int:
            states = self._counts()[0]
            return sum(states.get(state, 0) for state in ACTIVE_STATES)

        with console.status("waiting for remediation and the crews ..."):
            _settle(lambda: mesh.alert_messages - processed())
            _settle(active)
            closed = sum(self._counts()[0].get(s, 0) for s in ("resolved", "false_alarm"))
            _settle(lambda: closed - len(mesh.feedback), stall_s=10)
        states, outcomes = self._counts()
        return _Work(mesh.alert_messages, intake.stored, intake.duplicates, intake.dead_letters,
                     states, outcomes, len(mesh.feedback),
                     compute(self.service.engine, self.service.config.remediation.saved_horizon_h))

    def stop(self) -> None:
        """Stop the crews, then the service (intake, outbox sender, HTTP server)."""
        self._crews_stop.set()
        if self._crews_thread is not None:
            self._crews_thread.join(15)
        if self._started:
            self._started = False
            self.service.stop()


def _settle(remaining: Callable[[], int], stall_s: float = STALL_TIMEOUT_S) -> None:
    """Wait until ``remaining()`` is 0, or has not gone down for ``stall_s``."""
    best, moved = remaining(), time.monotonic()
    while best > 0 and time.monotonic() - moved < stall_s:
        time.sleep(0.2)
        now = remaining()
        if now < best:
            best, moved = now, time.monotonic()


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


def _report_lake(console: Console, lake: _LakeCheck, in_mesh: int, influx_url: str | None,
                 late_pubacks: int) -> None:
    from meshwatch.embedded_broker import PUBACK_TIMEOUT_S

    wrong = ", ".join(f"{n:,} {what}" for n, what in (
        (lake.missing, "MISSING"), (lake.twice, "TWICE"), (lake.extra, "NOT FROM THE MESH"))
        if n)
    verdict = wrong or "every reading that reached the mesh is in the lake exactly once"
    console.print(
        f"dataflow: {lake.rows:,} rows in the Parquet lake ({lake.files:,} files) for"
        f" {in_mesh:,} readings in the mesh; {verdict}"
        f"{'; InfluxDB at ' + influx_url if influx_url else '; InfluxDB off'}.",
        highlight=False)
    if late_pubacks:
        console.print(
            f"amqtt: {late_pubacks:,} QoS1 messages were acknowledged after its"
            f" {PUBACK_TIMEOUT_S:g} s limit (the dataflow acknowledges after a snapshot, and"
            " fell behind); they arrived, but amqtt would not have sent them again after a"
            " reconnect.", highlight=False)


def _report_remediation(console: Console, work: _Work) -> None:
    states = work.work_orders
    created = sum(states.values())
    resolved = states.get("resolved", 0)
    outcomes = ", ".join(f"{o} {n:,}" for o, n in sorted(work.outcomes.items()))
    still = sum(states.get(s, 0) for s in ACTIVE_STATES)
    lost = f"{work.alerts_lost:,} LOST" if work.alerts_lost else "none lost"
    console.print(
        f"remediation: {work.alert_messages:,} alerts in the mesh, {work.stored:,} stored"
        f" ({work.duplicates:,} duplicates, {work.dead_letters:,} dead letters; {lost});"
        f" {created:,} work orders created, {resolved:,} resolved"
        f"{' (' + outcomes + ')' if outcomes else ''}, {states.get('false_alarm', 0):,} false"
        f" alarms, {states.get('cancelled', 0):,} cancelled (cleared before a crew"
        f" acknowledged), {still:,} still open; {work.feedback:,} feedback messages to the"
        " mesh.",
        highlight=False)
    k = work.kpis

    def rate(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.0%}"

    def seconds(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.1f} s"

    console.print(
        f"remediation KPIs: remediation rate {rate(k['remediation_rate'])}, false-alarm rate"
        f" {rate(k['false_alarm_rate'])}, MTTA {seconds(k['mtta_s'])}, MTTR"
        f" {seconds(k['mttr_s'])}, water saved {k['water_saved_m3']:,.1f} m³ (wall clock:"
        f" the crews work while the simulation runs, at {CREW_SPEED:,.0f}× real time, and"
        f" find what its ground truth holds at the time).", highlight=False)
