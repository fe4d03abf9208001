"""An OPC-UA pump station: one district's pump station from the fleet simulator, served live.

:class:`PumpStation` is a real asyncua server. It takes the pump-station readings of one
district from :class:`~simulators.engine.FleetSimulator` and writes each one into its
variables when the simulated clock reaches the reading's event time (``speed`` simulated
seconds per wall second; the clock starts at the first reading when the station first
starts, and keeps running while the server is stopped). The event time is the value's
*source timestamp*; the server timestamp is the wall clock.

**Node ids** (stable; namespace ``urn:meshwatch:simulators:pump-station``, which is
index 2 on the station's server): the object ``ns=2;s=<device>`` (``dma-01-pump``) under
Objects holds one variable per metric, ``ns=2;s=<device>.<metric>``:

- ``ns=2;s=dma-01-pump.flow_lpm`` (Double): outlet flow, L/min, 1-minute mean
- ``ns=2;s=dma-01-pump.inlet_pressure_bar`` (Double): suction pressure, bar
- ``ns=2;s=dma-01-pump.outlet_pressure_bar`` (Double): discharge pressure, bar
- ``ns=2;s=dma-01-pump.pumps_running_count`` (Int32): duty pumps running
- ``ns=2;s=dma-01-pump.energy_kwh`` (Double): cumulative energy, kWh
- ``ns=2;s=dma-01-pump.running_h`` (Double): cumulative pump running hours

The station is the PLC itself, so it serves every reading the simulator *produces*:
communication faults (loss, delay, clock skew) belong to the link and are switched off
(``CommRates.none()``). The same seed and fleet options give the same values as
``FleetSimulator(replace(config, comms=CommRates.none()))``.

>>> pump_node_id("dma-01-pump", "flow_lpm")
'ns=2;s=dma-01-pump.flow_lpm'
>>> from simulators.config import FleetConfig, SimConfig
>>> first = next(pump_samples(SimConfig(fleet=FleetConfig(meters=50), days=0.02, seed=3), 1))
>>> first.device_id, first.ts_ms, sorted(first.values) == sorted(PUMP_METRICS)
('dma-01-pump', 1767571260000, True)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import numpy as np
from asyncua import Server, ua

from meshwatch.contract.events import ms_to_datetime
from simulators.config import CommRates, SimConfig
from simulators.engine import FleetSimulator

NAMESPACE_URI = "urn:meshwatch:simulators:pump-station"
"""The namespace of the station's nodes (index 2 on the station's server)."""

PUMP_METRICS: dict[str, ua.VariantType] = {
    "flow_lpm": ua.VariantType.Double,
    "inlet_pressure_bar": ua.VariantType.Double,
    "outlet_pressure_bar": ua.VariantType.Double,
    "pumps_running_count": ua.VariantType.Int32,
    "energy_kwh": ua.VariantType.Double,
    "running_h": ua.VariantType.Double,
}
"""The station's variables and their OPC-UA types."""

_LOG = logging.getLogger(__name__)


def pump_node_id(device_id: str, metric: str, namespace: int = 2) -> str:
    """The string node id of a station variable."""
    return f"ns={namespace};s={device_id}.{metric}"


@dataclass(frozen=True)
class PumpSample:
    """One pump-station reading: device, event time (UTC epoch ms) and metric values."""

    device_id: str
    ts_ms: int
    values: dict[str, float]


def pump_samples(config: SimConfig, district: int) -> Iterator[PumpSample]:
    """The pump-station readings of ``district`` (1-based), in event-time order.

    Communication faults are switched off (see the module doc); ``config.speed`` is
    ignored, the caller paces. Raises ``ValueError`` if the district does not exist.
    """
    simulator = FleetSimulator(replace(config, comms=CommRates.none(), speed=None))
    count = simulator.fleet.district_count
    if not 1 <= district <= count:
        msg = (f"district {district} does not exist: the fleet has {count} district(s); "
               f"choose 1..{count}, or more --districts / --meters")
        raise ValueError(msg)
    return _samples(simulator, simulator.fleet.pump_device(district - 1))


def _samples(simulator: FleetSimulator, device: int) -> Iterator[PumpSample]:
    device_id = str(simulator.fleet.device_ids[device])
    for block in simulator:
        if block.kind != "pump_station":
            continue
        for row in np.flatnonzero(block.device_index == device).tolist():
            yield PumpSample(device_id, int(block.ts_ms[row]),
                             {name: float(block.metrics[name][row]) for name in PUMP_METRICS})


class PumpStation:
    """An asyncua server serving one district's pump station in simulated time.

    Use it as an async context manager, or call :meth:`start` and :meth:`stop`; it can
    be started again (on the same port) after a stop, and carries on where the simulated
    clock is by then. ``config.speed`` (simulated seconds per wall second) must be set.

    Raises:
        ValueError: ``config.speed`` is unset, or the district does not exist.

    """

    def __init__(self, config: SimConfig, district: int = 1, *, host: str = "127.0.0.1",
                 port: int = 4840) -> None:
        if config.speed is None:
            msg = "set config.speed: the station serves readings in simulated time"
            raise ValueError(msg)
        self.config = config
        self.district = district
        self.host = host
        self.port = port
        self.server: Server | None = None
        """The running asyncua server (None while stopped)."""
        self.served = 0
        """Readings fed into the variables since construction, over all starts."""
        self._speed = config.speed
        self._samples = pump_samples(config, district)
        self._current = next(self._samples)
        self.device_id = self._current.device_id
        self._origin: tuple[float, int] | None = None  # (monotonic s, simulated ms)
        self._pending: PumpSample | None = None
        self._nodes: dict[str, ua.NodeId] = {}
        self._namespace = 2
        self._feeder: asyncio.Task[None] | None = None

    @property
    def endpoint(self) -> str:
        """The URL clients connect to."""
        return f"opc.tcp://{self.host}:{self.port}"

    @property
    def node_ids(self) -> dict[str, str]:
        """Metric name → string node id."""
        return {metric: pump_node_id(self.device_id, metric, self._namespace)
                for metric in PUMP_METRICS}

    @property
    def last_ts_ms(self) -> int:
        """Event time of the values the station serves now."""
        return self._current.ts_ms

    async def start(self) -> None:
        """Build the address space, listen, and start feeding readings.

        Raises:
            RuntimeError: the station is already running.
            OSError: the port cannot be bound.

        """
        if self.server is not None:
            msg = "the station is already running; stop() it first"
            raise RuntimeError(msg)
        server = Server()
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_server_name(f"Meshwatch pump station {self.device_id}")
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        namespace = self._namespace = await server.register_namespace(NAMESPACE_URI)
        station = await server.nodes.objects.add_object(
            ua.NodeId(self.device_id, namespace), self.device_id)
        for metric, kind in PUMP_METRICS.items():
            variable = await station.add_variable(
                ua.NodeId(f"{self.device_id}.{metric}", namespace), metric,
                ua.Variant(_typed(self._current.values[metric], kind), kind))
            self._nodes[metric] = variable.nodeid
        self.server = server
        await self._write(self._current)
        try:
            await server.start()
        except BaseException:
            self.server = None
            raise
        if self._origin is None:
            self._origin = (time.monotonic(), self._current.ts_ms)
        self._feeder = asyncio.create_task(self._feed(self._origin), name=self.device_id)
        _LOG.info("pump station %s serving on %s", self.device_id, self.endpoint)

    async def stop(self) -> None:
        """Stop feeding and close the server and its client connections."""
        if self._feeder is not None:
            self._feeder.cancel()
            await asyncio.gather(self._feeder, return_exceptions=True)
            self._feeder = None
        if self.server is not None:
            server, self.server = self.server, None
            await server.stop()
            # asyncua keeps a session with subscriptions open after its connection drops,
            # so that the client may resume it, even once the whole server has stopped:
            # close them, or their tasks outlive the server by the session timeout.
            for session in list(server.iserver._external_sessions.values()):
                await session.close_session(True)

    async def __aenter__(self) -> PumpStation:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _feed(self, origin: tuple[float, int]) -> None:
        while True:
            sample = self._pending or next(self._samples, None)
            if sample is None:
                _LOG.info("pump station %s: simulation ended at %s; serving the last values",
                          self.device_id, ms_to_datetime(self._current.ts_ms).isoformat())
                return
            self._pending = sample
            wall_start, sim_start = origin
            due = wall_start + (sample.ts_ms - sim_start) / 1000 / self._speed
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            await self._write(sample)
            self._pending = None
            self.served += 1

    async def _write(self, sample: PumpSample) -> None:
        assert self.server is not None  # only called while running
        source = ms_to_datetime(sample.ts_ms)
        now = datetime.now(UTC)
        for metric, kind in PUMP_METRICS.items():
            value = ua.DataValue(ua.Variant(_typed(sample.values[metric], kind), kind),
                                 SourceTimestamp=source, ServerTimestamp=now)
            await self.server.write_attribute_value(self._nodes[metric], value)
        self._current = sample


def _typed(value: float, kind: ua.VariantType) -> float | int:
    return round(value) if kind == ua.VariantType.Int32 else value
