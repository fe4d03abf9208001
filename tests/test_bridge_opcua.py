"""The bridge's own OPC-UA input, against a real asyncua pump station and real mosquitto brokers.

The station restarts mid-stream: the bridge re-subscribes by itself, and the ledger of
(device, seq) in the cloud holds every seq the bridge assigned, once per reading it received.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from mqtt_ledger import Ledger, wait_until
from servers import Mosquitto, free_port

from edge_agent.publisher import parse_broker_url
from mesh_bridge.opcua_source import OpcUaSource
from mesh_bridge.routing import RouterSpec
from mesh_bridge.shell import Bridge, BridgeSettings, Job, SiteBroker, Source
from meshwatch.config import OpcUaServerConfig
from meshwatch.contract import topics
from meshwatch.registry import Registry
from simulators.config import FleetConfig, SimConfig
from simulators.opcua_station import PUMP_METRICS, PumpStation

SIM = SimConfig(fleet=FleetConfig(meters=300), seed=7, days=2, speed=600)  # 10 samples/s
DEVICE = "dma-01-pump"
SITE, GATEWAY = "dma-01", "dma-01-scada"


@pytest.fixture
def run() -> Iterator[Callable[[Coroutine[Any, Any, Any]], Any]]:
    """Run coroutines on an event loop in a background thread (where the station lives)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield lambda coro: asyncio.run_coroutine_threadsafe(coro, loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def opcua_server(station: PumpStation) -> OpcUaServerConfig:
    return OpcUaServerConfig(
        url=station.endpoint, publishing_interval_ms=100, keepalive_s=1.0, reconnect_max_s=1.0,
        nodes=[{"node_id": f"ns=2;s={DEVICE}.{metric}", "device_id": DEVICE, "metric": metric}
               for metric in PUMP_METRICS])


def test_opcua_server_restart_loses_nothing_the_bridge_received(
    run: Callable[[Coroutine[Any, Any, Any]], Any], mosquitto: Mosquitto, cloud: Mosquitto,
    tmp_path: Path,
) -> None:
    station = PumpStation(SIM, port=free_port())
    run(station.start())
    sources: list[OpcUaSource] = []

    def opcua(put: Callable[[Job], None]) -> list[Source]:
        sources.append(OpcUaSource([opcua_server(station)], put, site=SITE, gateway_id=GATEWAY,
                                   store_path=tmp_path / "opcua.db", max_in_flight=50,
                                   batch_max_delay_s=0.2))
        return list(sources)

    settings = BridgeSettings(sites=(SiteBroker(parse_broker_url(mosquitto.url)),),
                              cloud=parse_broker_url(cloud.url), client_id="bridge-opcua",
                              heartbeat_s=0.2, reconnect_max_s=1.0, connect_timeout_s=2.0)
    # An empty registry: the source's birth is what grants its devices.
    bridge = Bridge(settings, RouterSpec(Registry([]), partitions=4), extra_sources=opcua)
    ledger = Ledger(cloud, "opcua-ledger", topics.subscription("mesh_telemetry"),
                    topics.subscription("dead_letter"))
    bridge.start()
    [source] = sources
    try:
        wait_until(lambda: len(ledger.received()) >= 60, 20, "readings before the restart")
        run(station.stop())
        wait_until(lambda: not source.counters()["connected"], 10, "the input to notice")
        before = {seq for _, seq in ledger.received()}
        run(station.start())
        wait_until(lambda: len(ledger.received()) >= len(before) + 60, 30,
                   "readings after the restart, with no operator action")
        run(station.stop())
        wait_until(lambda: not source.counters()["connected"], 10, "the input to notice")
        wait_until(lambda: len(ledger.received()) == source.counters()["readings"], 10,
                   "the last readings to go through")
    finally:
        run(station.stop())
        assert bridge.stop(10), "everything held was acknowledged"
    counters = source.counters()
    assert counters["reconnects"] >= 1
    assert not [e for e in ledger.events if type(e).__name__ == "DeadLetter"]
    # Every value the input handed over got one seq, was stored and arrived in the mesh.
    assigned = counters["readings"] - counters["invalid"]
    got = [seq for device, seq in ledger.arrivals if device == DEVICE]
    assert {device for device, _ in ledger.arrivals} == {DEVICE}
    assert set(got) == set(range(assigned)), "a gap in seq: a reading was lost"
    assert counters["depth"] == 0  # the durable queue is empty: all acknowledged
    ledger.close()
