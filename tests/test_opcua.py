"""OPC-UA pump station and OPC-UA input, against real asyncua servers (no mocks).

The station runs on a background event loop (its own thread); the input runs on its own
thread as it does in the agent.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
from asyncua import Client, ua
from hypothesis import given
from hypothesis import strategies as st
from servers import free_port

from edge_agent.opcua_input import BadValue, OpcUaInput, OpcUaReading, convert
from meshwatch.config import OpcUaNodeConfig, OpcUaServerConfig
from meshwatch.contract.events import MAX_TS_MS, MIN_TS_MS
from simulators.config import CommRates, FleetConfig, SimConfig
from simulators.engine import FleetSimulator
from simulators.opcua_station import PUMP_METRICS, PumpStation

SIM = SimConfig(fleet=FleetConfig(meters=300), seed=7, days=2, speed=600)  # 10 samples/s
DEVICE = "dma-01-pump"


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop on a background thread, for the stations."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


@pytest.fixture
def run(loop: asyncio.AbstractEventLoop) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    def run(coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(30)

    return run


@pytest.fixture
def station(run) -> Iterator[PumpStation]:
    station = PumpStation(SIM, port=free_port())
    run(station.start())
    yield station
    run(station.stop())


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``predicate``; return the seconds it took, fail after ``timeout``."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - started


def input_config(url: str, nodes: list[dict[str, Any]], **options: Any) -> OpcUaServerConfig:
    settings = {"publishing_interval_ms": 100, "keepalive_s": 1.0, "reconnect_max_s": 1.0}
    return OpcUaServerConfig(url=url, nodes=nodes, **(settings | options))


def station_nodes() -> list[dict[str, Any]]:
    """The documented node ids, spelled out (so a change to the scheme fails here)."""
    return [{"node_id": f"ns=2;s=dma-01-pump.{metric}", "device_id": DEVICE, "metric": metric}
            for metric in PUMP_METRICS]


class Collector:
    """Thread-safe list of readings handed out by an input."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._readings: list[OpcUaReading] = []

    def __call__(self, reading: OpcUaReading) -> None:
        with self._lock:
            self._readings.append(reading)

    @property
    def readings(self) -> list[OpcUaReading]:
        with self._lock:
            return list(self._readings)


@pytest.fixture
def started() -> Iterator[Callable[[OpcUaServerConfig], tuple[OpcUaInput, Collector]]]:
    """Start inputs; each is stopped (and its thread must end) after the test."""
    inputs: list[OpcUaInput] = []

    def start(config: OpcUaServerConfig) -> tuple[OpcUaInput, Collector]:
        collector = Collector()
        opcua = OpcUaInput(config, collector)
        opcua.start()
        inputs.append(opcua)
        return opcua, collector

    yield start
    for opcua in inputs:
        opcua.stop()
        assert not opcua._thread.is_alive(), "stop() left the input's thread running"


def expected_pump_readings(config: SimConfig) -> dict[int, dict[str, float]]:
    """event time -> metric values of district 1's pump station, straight from the engine."""
    simulator = FleetSimulator(replace(config, comms=CommRates.none(), speed=None))
    expected: dict[int, dict[str, float]] = {}
    for block in simulator:
        if block.kind != "pump_station":
            continue
        for i, device in enumerate(block.device_ids.tolist()):
            if device == DEVICE:
                expected[int(block.ts_ms[i])] = {m: float(block.metrics[m][i])
                                                 for m in PUMP_METRICS}
        if len(expected) > 600:
            return expected
    return expected


def test_station_serves_the_simulators_pump_readings_mapped_by_config(station, started) -> None:
    nodes = station_nodes()
    nodes[1] = {"node_id": "ns=2;s=dma-01-pump.inlet_pressure_bar", "device_id": "dma-01-in",
                "metric": "inlet_pressure_kpa", "scale": 100.0}
    nodes[3] = {"node_id": "ns=2;s=dma-01-pump.pumps_running_count", "device_id": DEVICE,
                "metric": "pumps_standby_count", "scale": -1.0, "offset": 3.0}
    opcua, collector = started(input_config(station.endpoint, nodes))

    def enough() -> bool:
        times = {r.ts_ms for r in collector.readings}
        return len(times) >= 20
    wait_until(enough, 15, "20 simulated minutes of readings")

    expected = expected_pump_readings(SIM)
    readings = collector.readings
    assert {(r.device_id, r.metric) for r in readings} == {
        (DEVICE, "flow_lpm"), ("dma-01-in", "inlet_pressure_kpa"),
        (DEVICE, "outlet_pressure_bar"), (DEVICE, "pumps_standby_count"),
        (DEVICE, "energy_kwh"), (DEVICE, "running_h")}
    source = {"inlet_pressure_kpa": "inlet_pressure_bar",
              "pumps_standby_count": "pumps_running_count"}
    for reading in readings:
        assert reading.time_source == "source"
        want = expected[reading.ts_ms][source.get(reading.metric, reading.metric)]
        if reading.metric == "inlet_pressure_kpa":
            want *= 100
        elif reading.metric == "pumps_standby_count":
            want = 3 - want
        assert reading.value == pytest.approx(want, rel=1e-12), reading
    flow_times = sorted(r.ts_ms for r in readings if r.metric == "flow_lpm")
    assert flow_times[0] == min(expected)  # the first simulated minute is served
    assert all(b - a == 60_000 for a, b in itertools.pairwise(flow_times))
    counters = opcua.counters()
    assert counters["connected"] == 1
    assert counters["readings"] == counters["notifications"] >= len(readings)
    assert counters["time_source.source"] == counters["readings"]


def test_input_started_before_the_server_and_server_restart_resume_by_themselves(
        run, started) -> None:
    port = free_port()
    station = PumpStation(SIM, port=port)
    opcua, collector = started(input_config(station.endpoint, station_nodes()))
    wait_until(lambda: opcua.counters().get("connect_failures", 0) >= 2, 10,
               "failed connects while no server listens")
    assert not opcua.connected
    run(station.start())
    try:
        wait_until(lambda: len(collector.readings) >= 60, 15, "readings after the first start")
        run(station.stop())
        stopped_at = len(collector.readings)
        last_before = max(r.ts_ms for r in collector.readings)
        wait_until(lambda: not opcua.connected, 5, "the input to notice the stop")
        time.sleep(3)
        run(station.start())
        recovery = wait_until(
            lambda: any(r.ts_ms > last_before for r in collector.readings[stopped_at:]), 15,
            "readings with event times after the restart")
        print(f"data resumed {recovery:.2f} s after the restarted server listened")
    finally:
        run(station.stop())
    counters = opcua.counters()
    assert counters["reconnects"] >= 1
    assert counters["connects"] == counters["reconnects"] + 1
    assert counters["connect_failures"] >= 3  # before the first start, and while down
    after = [r for r in collector.readings[stopped_at:] if r.metric == "flow_lpm"]
    times = [r.ts_ms for r in after]
    assert times == sorted(times)
    assert len(times) >= 1


async def add_test_nodes(station: PumpStation) -> dict[str, ua.NodeId]:
    """Extra variables of types the pump station never serves, for bad-value tests."""
    assert station.server is not None
    objects = station.server.nodes.objects
    return {
        "text_count": (await objects.add_variable(
            ua.NodeId("test.text_count", 2), "text_count", "12.5")).nodeid,
        "flag_state": (await objects.add_variable(
            ua.NodeId("test.flag_state", 2), "flag_state", True)).nodeid,
        "empty_count": (await objects.add_variable(
            ua.NodeId("test.empty_count", 2), "empty_count", ua.Variant(None),
            datatype=ua.NodeId(ua.ObjectIds.Number))).nodeid,
        "spare_lpm": (await objects.add_variable(
            ua.NodeId("test.spare_lpm", 2), "spare_lpm", 0.0)).nodeid,
    }


def test_bad_values_are_counted_and_logged_while_good_values_keep_flowing(
        station, run, started, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="edge_agent.opcua_input")
    test_nodes = run(add_test_nodes(station))
    nodes = [*station_nodes(), *[
        {"node_id": f"ns=2;s=test.{name}", "device_id": "test-dev", "metric": name}
        for name in test_nodes]]
    opcua, collector = started(input_config(station.endpoint, nodes))
    wait_until(lambda: opcua.connected and len(collector.readings) >= 12, 10, "good readings")

    flow = ua.NodeId("dma-01-pump.flow_lpm", 2)
    now = datetime.now(UTC)
    old = datetime(1900, 1, 1, tzinfo=UTC)

    async def write_bad_values() -> None:
        assert station.server is not None
        write = station.server.write_attribute_value
        for value in (math.nan, math.inf, math.nan):
            await write(flow, ua.DataValue(ua.Variant(value, ua.VariantType.Double),
                                           SourceTimestamp=now))
        await write(flow, ua.DataValue(StatusCode=ua.StatusCode(ua.StatusCodes.BadSensorFailure),
                                       SourceTimestamp=now))
        await write(flow, ua.DataValue(ua.Variant(1.0, ua.VariantType.Double),
                                       StatusCode=ua.StatusCode(
                                           ua.StatusCodes.UncertainLastUsableValue)))
        await write(test_nodes["empty_count"], ua.DataValue(ua.Variant(None),
                                                            SourceTimestamp=now))
        await write(test_nodes["spare_lpm"], ua.DataValue(
            ua.Variant(1.0, ua.VariantType.Double), SourceTimestamp=old, ServerTimestamp=now))
        await write(test_nodes["spare_lpm"], ua.DataValue(ua.Variant(2.0, ua.VariantType.Double)))

    written = len(collector.readings)
    run(write_bad_values())

    def all_reasons() -> bool:
        counters = opcua.counters()
        return all(counters.get(f"bad_value.{reason}", 0) for reason in (
            "not_finite", "status_bad", "status_uncertain", "null", "wrong_type"))
    wait_until(all_reasons, 10, "every kind of bad value to be counted")
    wait_until(lambda: len(collector.readings) >= written + 30, 10, "good values after the bad")

    counters = opcua.counters()
    assert counters["bad_value.not_finite"] == 3
    assert counters["bad_value.wrong_type"] == 2  # a string and a bool
    assert counters["bad_value.null"] >= 2  # the empty node's first value and the write
    assert counters["connected"] == 1
    assert counters.get("reconnects", 0) == 0
    spare = [r for r in collector.readings if r.metric == "spare_lpm"]
    assert [(r.value, r.time_source) for r in spare[-2:]] == [(1.0, "server"), (2.0, "received")]
    assert spare[-2].ts_ms == round(now.timestamp() * 1000)
    assert counters["time_source.server"] >= 1
    assert counters["time_source.received"] >= 1
    flows = [r for r in collector.readings[written:] if r.metric == "flow_lpm"]
    assert len(flows) >= 3
    assert all(math.isfinite(r.value) for r in flows)
    logged = [r.getMessage() for r in caplog.records]
    assert any("ns=2;s=test.text_count" in m and "wrong_type" in m for m in logged)
    assert any("ns=2;s=dma-01-pump.flow_lpm" in m and "BadSensorFailure" in m
               and "status_bad" in m for m in logged)
    nan_lines = [m for m in logged if "dma-01-pump.flow_lpm" in m and "not_finite" in m]
    assert len(nan_lines) == 1  # three NaN/inf values, one log line (rate-limited)


def test_unknown_node_is_reported_and_the_rest_still_flow(station, started) -> None:
    nodes = [*station_nodes(), {"node_id": "ns=2;s=no.such_node_count", "device_id": DEVICE,
                                "metric": "missing_count"}]
    opcua, collector = started(input_config(station.endpoint, nodes))
    wait_until(lambda: len(collector.readings) >= 12, 10, "readings of the known nodes")
    assert opcua.counters()["node_errors"] == 1


ANY_VALUE = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5)
             | st.binary(max_size=5) | st.lists(st.floats(), max_size=2))
ANY_TIME = st.none() | st.datetimes(min_value=datetime(1601, 1, 1),
                                    max_value=datetime(9999, 1, 1),
                                    timezones=st.none() | st.just(UTC))


@given(value=ANY_VALUE, status=st.integers(0, 2**32 - 1) | st.just(0), source=ANY_TIME,
       server=ANY_TIME, scale=st.floats(-1e300, 1e300), offset=st.floats(-1e300, 1e300))
def test_any_notification_gives_a_valid_reading_or_a_reason(value, status, source, server,
                                                             scale, offset) -> None:
    node = OpcUaNodeConfig(node_id="ns=2;s=x", device_id="dev-1", metric="flow_lpm",
                           scale=scale, offset=offset)
    result = convert(node, value, status, source, server, received_ms=1_767_571_200_000)
    if isinstance(result, BadValue):
        assert result.reason in {"status_bad", "status_uncertain", "null", "wrong_type",
                                 "not_finite"}
        assert result.node_id == "ns=2;s=x"
        return
    assert status >> 30 == 0
    assert isinstance(value, int | float)
    assert not isinstance(value, bool)
    assert math.isfinite(result.value)
    assert MIN_TS_MS <= result.ts_ms < MAX_TS_MS
    if result.time_source == "received":
        assert result.ts_ms == 1_767_571_200_000


def test_importing_the_agent_and_config_does_not_load_asyncua() -> None:
    code = ("import sys, edge_agent, edge_agent.opcua_input, meshwatch.config\n"
            "from meshwatch.config import load_config\n"
            "load_config('examples/meshwatch.toml')\n"
            "print('asyncua' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.stdout.strip() == "False"


def test_station_needs_speed_and_an_existing_district() -> None:
    with pytest.raises(ValueError, match=r"district 2 does not exist.*1 district"):
        PumpStation(SIM, district=2)
    with pytest.raises(ValueError, match="speed"):
        PumpStation(replace(SIM, speed=None))


def test_cli_serves_the_station_until_sigint(run) -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "meshwatch.cli", "simulate", "opcua", "--port", str(port),
         "--meters", "300", "--seed", "7", "--speed", "600"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        async def read_flow() -> tuple[float, datetime]:
            async with Client(f"opc.tcp://127.0.0.1:{port}") as client:
                data = await client.get_node("ns=2;s=dma-01-pump.flow_lpm").read_data_value()
                return data.Value.Value, data.SourceTimestamp

        def listening() -> bool:
            try:
                run(read_flow())
            except (OSError, TimeoutError):
                return process.poll() is not None  # stop polling if it died
            return True
        wait_until(listening, 20, "the CLI station to answer")
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        value, stamp = run(read_flow())
        assert value > 0
        assert stamp.year == 2026
    finally:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=15)
    assert process.returncode in (0, 130), err
    assert "Traceback" not in err
    assert "ns=2;s=dma-01-pump.flow_lpm" in out
    assert "stopped after serving" in err
