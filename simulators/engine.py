"""The simulation loop: one customer interval per step, all meters at once.

Each step (15 minutes by default) advances the weather, starts new incidents and
communication faults, draws every customer meter's consumption, adds confounders and
leaks, turns true flows into meter readings (faults, battery), computes each district's
per-minute inlet and pump station readings, applies communication faults, and yields the
delivered readings as one :class:`~simulators.block.ReadingBlock` per gateway and device
kind, in delivery order (by ``sent_ms``).

Conventions:

- A customer reading's ``ts_ms`` is the *end* of its interval and ``flow_lpm`` the mean
  flow over that interval (volume / minutes). SCADA readings are 1-minute means, also
  stamped at the end of their minute.
- A gateway sends each step's readings at the end of the interval plus its own latency
  (2–60 s for concentrators, 1 s for SCADA); held readings (late, outage backlog,
  duplicates) go out with the first step at or after their release time, after the
  on-time readings of the same gateway.
- After the last step, held readings are delivered at their release times, so every
  produced reading is either lost (and recorded) or delivered.
- ``seq`` starts at 0 per device and grows by one per produced reading, lost ones
  included; a device whose battery died produces nothing more.

>>> from simulators.config import FleetConfig, SimConfig
>>> simulator = FleetSimulator(SimConfig(fleet=FleetConfig(meters=300), days=0.25, seed=1))
>>> blocks = list(simulator)
>>> sum(len(block) for block in blocks) == simulator.stats.delivered_rows
True
>>> simulator.stats.produced == simulator.stats.delivered + simulator.stats.lost
True
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from simulators.block import ReadingBlock, Readings
from simulators.comms import CommFault, CommFaultLog, CommFaults
from simulators.config import SimConfig
from simulators.confounders import Confounders
from simulators.demand import CustomerDemand
from simulators.fleet import KIND_NAMES, DeviceKind, Fleet
from simulators.incidents import Fault, Incidents
from simulators.network import Hydraulics
from simulators.truth import Episode
from simulators.weather import Weather, water_temperature

MS_PER_DAY = 86_400_000
GATEWAY_LATENCY_MS = (2_000, 60_000)
SCADA_LATENCY_MS = 1_000
STAGNANT_PULL = 0.35  # still water in a meter moves this far towards room temperature
ROOM_C = 17.0
METER_TEMPERATURE_SD = 0.8
DECIMALS = 3

EpisodeSink = Callable[[Episode], None]
CommFaultSink = Callable[[CommFaultLog], None]


@dataclass
class RunStats:
    """Counters of a run; ``delivered`` is exact once the iterator is exhausted."""

    produced: int = 0
    lost: int = 0
    duplicated: int = 0
    delivered_rows: int = 0  # readings in yielded blocks, duplicates included
    produced_by_kind: Counter[str] = field(default_factory=Counter)
    incidents: Counter[str] = field(default_factory=Counter)
    confounders: Counter[str] = field(default_factory=Counter)
    comm_faults: Counter[str] = field(default_factory=Counter)
    elapsed_s: float = 0.0

    @property
    def delivered(self) -> int:
        """Distinct readings delivered (duplicates counted once)."""
        return self.delivered_rows - self.duplicated


class FleetSimulator:
    """A reproducible smart-water fleet; iterate over it to get its delivered readings.

    ``on_episode`` receives every ground-truth incident when it ends (or at the end of the
    run) and every confounder when it starts; ``on_comm_faults`` receives, per step, the
    readings that communication faults touched. Both are optional.
    """

    def __init__(
        self, config: SimConfig, on_episode: EpisodeSink | None = None,
        on_comm_faults: CommFaultSink | None = None,
    ) -> None:
        config.validate()
        self.config = config
        self.stats = RunStats()
        self.on_episode = on_episode
        """Receives ground-truth episodes; may be set until the run starts."""
        self.on_comm_faults = on_comm_faults
        """Receives each step's comm-fault records; may be set until the run starts."""
        seeds = np.random.SeedSequence(config.seed).spawn(8)
        rngs = [np.random.default_rng(seed) for seed in seeds]
        self.fleet = Fleet.build(config.fleet, rngs[0])
        fleet = self.fleet
        self._start_ms = config.start_ms
        self._step_ms = config.fleet.customer_cadence_s * 1000
        self._sample_ms = config.fleet.scada_cadence_s * 1000
        self._end_ms = self._start_ms + config.steps * self._step_ms
        self._weather = Weather(fleet.district_count, rngs[1])
        self._demand = CustomerDemand(fleet, rngs[2])
        self._confounders = Confounders(fleet, rngs[3], self._start_ms, self._end_ms)
        self._incidents = Incidents(fleet, config.incidents, rngs[4], self._start_ms,
                                    self._end_ms)
        n = fleet.customer_count
        connections = np.bincount(fleet.district_of[:n], minlength=fleet.district_count)
        mean_demand = np.bincount(fleet.district_of[:n], self._demand.daily_volume_l,
                                  minlength=fleet.district_count) / 1440
        self._hydraulics = Hydraulics(connections, mean_demand, rngs[5],
                                      config.fleet.pumps_per_station)
        self._comms = CommFaults(config.comms, fleet.gateway_of, len(fleet.gateway_ids),
                                 rngs[6])
        self._rng = rngs[7]
        self._temperature_offset = self._rng.normal(0, METER_TEMPERATURE_SD, n)
        latency = self._rng.integers(*GATEWAY_LATENCY_MS, len(fleet.gateway_ids))
        latency[fleet.scada_gateway(0):] = SCADA_LATENCY_MS
        self._latency = latency
        self._seq = np.zeros(fleet.device_count, np.int64)
        self._sites = [fleet.district_ids[d] for d in fleet.gateway_district.tolist()]
        self._gateway_names = fleet.gateway_ids.tolist()
        self._started = False

    def ongoing_episodes(self) -> list[Episode]:
        """Ground-truth incidents that have begun and not ended yet.

        ``on_episode`` receives them when they end; ``end_ms`` is the planned end, which may
        lie beyond the run.
        """
        return self._incidents.ongoing()

    def __iter__(self) -> Iterator[ReadingBlock]:
        """Run the simulation, yielding blocks in delivery order; a simulator runs once."""
        if self._started:
            msg = "this FleetSimulator has already run; create a new one to run again"
            raise RuntimeError(msg)
        self._started = True
        return self._run()

    def _run(self) -> Iterator[ReadingBlock]:
        wall_start = time.perf_counter()
        for step in range(self.config.steps):
            start = self._start_ms + step * self._step_ms
            blocks = self._step(start, start + self._step_ms)
            self._pace(start + self._step_ms, wall_start)
            yield from blocks
            self.stats.elapsed_s = time.perf_counter() - wall_start
        while (due := self._comms.next_release_ms()) is not None:
            steps = -(-(due - self._start_ms) // self._step_ms)
            now = self._start_ms + steps * self._step_ms
            blocks = self._deliver([[] for _ in KIND_NAMES], now)
            self._pace(now, wall_start)
            yield from blocks
        for episode in self._incidents.finish():
            self._emit(episode, self.stats.incidents)
        self.stats.elapsed_s = time.perf_counter() - wall_start

    def _pace(self, sim_ms: int, wall_start: float) -> None:
        if self.config.speed is None:
            return
        due = wall_start + (sim_ms - self._start_ms) / 1000 / self.config.speed
        time.sleep(max(0.0, due - time.perf_counter()))

    def _step(self, start: int, end: int) -> list[ReadingBlock]:
        fleet, incidents = self.fleet, self._incidents
        n = fleet.customer_count
        samples = self._step_ms // self._sample_ms
        _, daily_air = self._weather.advance(start, samples, self._sample_ms)
        protected = np.zeros(fleet.device_count, bool)
        protected[:n] = (incidents.leak_until > start) | (incidents.fault != Fault.NONE)
        self._comms.start_new(start, end, protected)
        incidents.start_new(start, end, protected=self._comms.skew_until[:n] > start)

        litres = self._customer_litres(start, end, daily_air)
        customers = self._customer_readings(end, litres)
        district_litres = np.bincount(fleet.district_of[:n], litres,
                                      minlength=fleet.district_count)
        times = start + self._sample_ms * np.arange(1, samples + 1)
        inlet, pump = self._hydraulics.step(district_litres, *incidents.district_flows(times),
                                            minutes_per_sample=self._sample_ms / 60_000)
        districts = np.arange(fleet.district_count)
        produced = [customers,
                    self._scada_readings(fleet.inlet_device(districts), times, inlet),
                    self._scada_readings(fleet.pump_device(districts), times, pump)]
        on_time: list[list[Readings]] = []
        logs: list[CommFaultLog] = []
        for kind, readings in enumerate(produced):
            self.stats.produced += len(readings)
            self.stats.produced_by_kind[KIND_NAMES[kind]] += len(readings)
            delivered, log = self._comms.process(readings, end, self._step_ms,
                                                 scada=kind != DeviceKind.CUSTOMER_METER,
                                                 kind=kind)
            on_time.append([delivered])
            logs.append(log)
        self._count_comm_faults(CommFaultLog.concat(logs))
        for episode in incidents.drain_ended(end):
            self._emit(episode, self.stats.incidents)
        for episode in self._confounders.drain_episodes():
            self._emit(episode, self.stats.confounders)
        return self._deliver(on_time, end)

    def _customer_litres(self, start: int, end: int, daily_air: np.ndarray) -> np.ndarray:
        slot = (start % MS_PER_DAY) // self._step_ms
        weekend = (start // MS_PER_DAY + 3) % 7 >= 5  # 1970-01-01 was a Thursday
        litres = self._demand.interval_volume(int(slot), bool(weekend),
                                              self._step_ms // 1000, daily_air)
        meters, extra = self._confounders.interval_volume(start, end, daily_air)
        np.add.at(litres, meters, extra)
        meters, extra = self._incidents.leak_litres(start, end)
        litres[meters] += extra
        return litres

    def _customer_readings(self, ts: int, litres: np.ndarray) -> Readings:
        incidents = self._incidents
        true_flow = litres / (self._step_ms / 60_000)
        flow = true_flow * incidents.bias
        incidents.apply_meter_faults(ts, flow)
        water = water_temperature(ts) + self._temperature_offset
        water += (ROOM_C - water) * STAGNANT_PULL * (true_flow == 0)
        water += self._rng.normal(0, 0.03, len(water))
        metrics = {"flow_lpm": flow, "temperature_c": water,
                   "battery_v": incidents.battery_v(ts, water)}
        alive = incidents.alive(ts, self._step_ms)
        devices = np.flatnonzero(alive).astype(np.int32)
        if len(devices) < len(alive):
            metrics = {name: values[devices] for name, values in metrics.items()}
        seq = self._seq[devices]
        self._seq[devices] += 1
        return Readings(devices, np.full(len(devices), ts, np.int64), seq,
                        {name: np.round(values, DECIMALS) for name, values in metrics.items()})

    def _scada_readings(
        self, devices: np.ndarray, times: np.ndarray, metrics: dict[str, np.ndarray]
    ) -> Readings:
        samples = len(times)
        seq = np.repeat(self._seq[devices], samples) + np.tile(np.arange(samples), len(devices))
        self._seq[devices] += samples
        return Readings(np.repeat(devices, samples).astype(np.int32),
                        np.tile(times, len(devices)), seq,
                        {name: np.round(values.ravel(), DECIMALS)
                         for name, values in metrics.items()})

    def _count_comm_faults(self, log: CommFaultLog) -> None:
        counts = np.bincount(log.fault, minlength=len(CommFault))
        for fault in CommFault:
            if counts[fault]:
                self.stats.comm_faults[fault.name.lower()] += int(counts[fault])
        self.stats.lost += int(counts[CommFault.LOST] + counts[CommFault.GAP])
        self.stats.duplicated += int(counts[CommFault.DUPLICATE])
        if self.on_comm_faults is not None and len(log):
            self.on_comm_faults(log)

    def _emit(self, episode: Episode, counter: Counter[str]) -> None:
        counter[episode.kind] += 1
        if self.on_episode is not None:
            self.on_episode(episode)

    def _deliver(self, parts: list[list[Readings]], now: int) -> list[ReadingBlock]:
        """Blocks of this step's readings plus released held ones, ordered by sent time."""
        for kind, readings in self._comms.release(now):
            parts[kind].append(readings)
        keyed: list[tuple[int, int, int, ReadingBlock]] = []
        gateway_of = self.fleet.gateway_of
        for kind, kind_parts in enumerate(parts):
            if not kind_parts:
                continue
            readings = Readings.concat(kind_parts)
            if len(kind_parts) > 1:
                readings = readings.take(np.argsort(gateway_of[readings.device], kind="stable"))
            gateways = gateway_of[readings.device]
            edges = np.flatnonzero(np.diff(gateways)) + 1
            starts = np.concatenate([[0], edges]).tolist()
            stops = [*edges.tolist(), len(readings)]
            for first, last in zip(starts, stops, strict=True):
                if first == last:
                    continue
                gateway = int(gateways[first])
                sent = now + int(self._latency[gateway])
                part = slice(first, last)
                keyed.append((sent, kind, gateway, ReadingBlock(
                    site=self._sites[gateway], gateway_id=self._gateway_names[gateway],
                    kind=KIND_NAMES[kind], sent_ms=sent, id_table=self.fleet.device_ids,
                    device_index=readings.device[part], ts_ms=readings.ts_ms[part],
                    seq=readings.seq[part],
                    metrics={name: values[part] for name, values in readings.metrics.items()},
                )))
        keyed.sort(key=lambda item: item[:3])
        self.stats.delivered_rows += sum(len(item[3]) for item in keyed)
        return [item[3] for item in keyed]
