"""What the detection tests share: a small simulated fleet, evaluate's alerts, its mesh load.

The fleet is :func:`eval_settings`: a few hundred meters in 2 districts for a few days, with
incident rates raised so that leaks, bursts, meter faults and silences happen, and with the
communication faults that *reorder* a device's readings switched off (see
:data:`IN_ORDER_COMMS`). :func:`reference` runs ``meshwatch evaluate``'s pipeline
(:func:`models.evaluate.simulate_and_detect`) on it; :func:`mesh_load` cuts the same
simulator's blocks into mesh telemetry messages per partition (``crc32(device) % P``), in
delivery order, as the bridge would publish them.

**Why in order.** ``meshwatch evaluate`` feeds the pipeline in *delivery* order and lets the
detectors drop what is out of order; the flow puts readings in *event-time* order first
(allowed lateness) and de-duplicates them by ``(device, seq)``. The two agree exactly when
each device's readings are delivered in order, once. With late retries, gateway-outage
backlogs, duplicates or skewed clocks they differ, by design:

- a late reading within the flow's lateness is put back in order and scored by the flow,
  while evaluate drops it as stale;
- a duplicate is dropped by the flow's de-duplication, while evaluate gives the alert policy
  a score of 0 for it, which may start an alert's clearing clock earlier;
- evaluate ticks when a block is *delivered* past a 15-minute boundary, at the newest event
  time it was fed; the flow ticks on the district's *event-time* watermark (a minimum over
  shards). A backlog that arrives hours late lands on the other side of a different number
  of silence checks, and a clock running ahead drags evaluate's ticks ahead of the readings
  (fleet-wide, while it lasts), which moves silence clears by one tick.

Lost readings and meter gaps (silences) keep each device in order and are kept on.
``tests/test_flow_detect.py`` also runs the faults that reorder and checks that the
incidents and openings still agree and only clear times differ, as explained here.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from dataflows.detection import DetectionLayout
from meshwatch.contract import Alert, Feedback
from meshwatch.contract.topics import partition_of
from meshwatch.contract.wire import telemetry_payloads
from models.evaluate import EVALUATION_RATES, EvalSettings, simulate_and_detect
from models.feedback import FeedbackApplier
from models.water.pipeline import WaterPipeline
from simulators import CommRates, FleetSimulator
from simulators.output import write_registry

IN_ORDER_COMMS = CommRates(duplicate_probability=0.0, late_probability=0.0,
                           gateway_outage_per_gateway_day=0.0, clock_skew_per_device_day=0.0,
                           meter_gap_per_device_day=0.05)
"""Loss and meter gaps on (more gaps than default: silences); nothing that reorders."""

RATES = dataclasses.replace(
    EVALUATION_RATES, customer_leak_per_meter_day=0.02, network_leak_per_district_day=0.4,
    burst_per_district_day=0.6, stuck_per_meter_day=0.004, stopped_per_meter_day=0.004,
    spikes_per_meter_day=0.004)
"""Incident rates raised so that a few days of a few hundred meters hold every kind."""


def eval_settings(meters: int = 300, days: float = 3.0, seed: int = 20261123) -> EvalSettings:
    """The simulated fleet of the detection tests."""
    return EvalSettings(meters=meters, days=days, seed=seed, districts=2, warmup_days=1.0,
                        rates=RATES, comms=IN_ORDER_COMMS)


def reference(settings: EvalSettings) -> list[Alert]:
    """The alerts of ``meshwatch evaluate``'s pipeline over the fleet (delivery order)."""
    return simulate_and_detect(settings).alerts


def alert_keys(alerts: Iterable[Alert]) -> list[tuple[object, ...]]:
    """What must agree, alert message by alert message, sorted (the order of districts and
    of alerts within one event time is not part of the contract)."""
    return sorted((a.alert_id, a.status.value, a.kind.value, a.device_id or "", a.district or "",
                   a.severity.value, a.first_ts_ms, a.last_ts_ms, round(a.score, 6),
                   a.est_loss_lph) for a in alerts)


def mesh_load(settings: EvalSettings, partitions: int,
              per_message: int = 500) -> dict[int, list[bytes]]:
    """The simulator's delivered blocks as mesh telemetry payloads per partition, in order."""
    simulator = FleetSimulator(settings.sim_config())
    out: dict[int, list[bytes]] = defaultdict(list)
    for block in simulator:
        ids = block.device_ids
        part = np.array([partition_of(str(d), partitions) for d in ids.tolist()])
        for p in np.unique(part).tolist():
            rows = part == p
            out[p] += telemetry_payloads(
                block.site, block.gateway_id, block.sent_ms, ids[rows], block.ts_ms[rows],
                block.seq[rows], {name: values[rows] for name, values in block.metrics.items()},
                per_message)
    return dict(out)


def write_fleet_registry(path: Path, settings: EvalSettings) -> Path:
    """The simulated fleet's registry CSV (districts, kinds, cadences)."""
    config = settings.sim_config()
    write_registry(path, FleetSimulator(config).fleet, config)
    return path


@dataclasses.dataclass(frozen=True)
class RoundTheClockTown:
    """One district whose round-the-clock businesses look like leaks, and a few homes.

    Every customer meter reads every 15 minutes from :attr:`start_ms` (a Monday, 00:00 UTC).
    A business (``biz-*``) draws water day and night and stops for one hour (02:00-03:00 UTC)
    only every other night: after 24 hours without a ~0 reading the customer-leak detector
    (rule "never ~0") alarms, the stop clears the alert six hours later, and the next day it
    alarms again (folded into the same alert, status ``update``): a repeat false alarm every
    two days, until a crew's ``false_alarm`` feedback teaches the detector. A home
    (``home-*``) is idle at night and never alarms.

    >>> town = RoundTheClockTown()
    >>> town.devices[:2], town.flow_lpm("biz-1", 1), town.flow_lpm("biz-1", 9)
    (('biz-1', 'biz-2'), 0.6, 0.0)
    """

    businesses: int = 5
    homes: int = 3
    start_ms: int = 1_767_571_200_000
    district: str = "dma-01"
    step_ms: int = 900_000

    @property
    def devices(self) -> tuple[str, ...]:
        """Business then home meter ids."""
        return (*(f"biz-{k}" for k in range(1, self.businesses + 1)),
                *(f"home-{k}" for k in range(1, self.homes + 1)))

    def ts_ms(self, step: int) -> int:
        """The event time of reading number ``step`` (step 0 is :attr:`start_ms`)."""
        return self.start_ms + step * self.step_ms

    def step_at(self, hours: float) -> int:
        """The step of the reading ``hours`` after :attr:`start_ms`."""
        return round(hours * 3_600_000 / self.step_ms)

    def flow_lpm(self, device: str, step: int) -> float:
        """The interval's mean flow of ``device`` at ``step`` (L/min, 3 decimals)."""
        hour = (self.ts_ms(step) % 86_400_000) / 3_600_000
        day = (step * self.step_ms) // 86_400_000
        k = int(device.split("-")[1])
        if device.startswith("biz-"):
            if day % 2 == 0 and 2 <= hour < 3:
                return 0.0
            busy = 1.0 + 0.1 * (step % 5) if 8 <= hour < 18 else 0.0
            return round(0.3 + 0.1 * k + 0.2 * (step % 2) + busy, 3)
        used = (7 <= hour < 9 or 18 <= hour < 21) and step % 3 == 0
        return round(0.8 + 0.1 * k, 3) if used else 0.0

    def registry_rows(self) -> list[tuple[str, str, str, float]]:
        """``(device, kind, district, cadence_s)`` rows (:meth:`DetectionLayout.from_rows`)."""
        return [(d, "customer_meter", self.district, self.step_ms / 1000) for d in self.devices]

    def columns(self, first: int, last: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Device ids, event times and flows of steps ``first`` to ``last`` (time order)."""
        steps = [s for s in range(first, last + 1) for _ in self.devices]
        ids = np.array([d for _ in range(first, last + 1) for d in self.devices], dtype=object)
        flows = np.array([self.flow_lpm(d, s) for d, s in zip(ids.tolist(), steps,
                                                              strict=True)])
        return ids, np.array([self.ts_ms(s) for s in steps], np.int64), flows

    def mesh_load(self, first: int, last: int, partitions: int,
                  per_message: int = 200) -> dict[int, list[bytes]]:
        """Steps ``first`` to ``last`` as mesh telemetry payloads per partition, in time order
        (``seq`` is the step)."""
        ids, ts, flows = self.columns(first, last)
        seq = (ts - self.start_ms) // self.step_ms
        part = np.array([partition_of(str(d), partitions) for d in ids.tolist()])
        out: dict[int, list[bytes]] = {}
        for p in np.unique(part).tolist():
            rows = part == p
            out[p] = telemetry_payloads(
                "s1", "gw-1", int(ts[-1]), ids[rows], ts[rows], seq[rows],
                {"flow_lpm": flows[rows], "battery_v": np.full(int(rows.sum()), 3.6)},
                per_message)
        return out

    def reference(self, last: int, feedback: Iterable[Feedback] = ()) -> list[Alert]:
        """The alerts of one :class:`WaterPipeline` fed steps 1 to ``last`` in event time:
        each step's readings, then ``tick`` at their time; each feedback applied before the
        first reading stamped at or after its ``ts_ms`` (what the flow must raise)."""
        layout = DetectionLayout.from_rows(self.registry_rows(), 1, 1)
        pipeline = WaterPipeline(layout.layouts[self.district])
        applier = FeedbackApplier(pipeline)
        waiting = sorted(feedback, key=lambda f: (f.ts_ms, f.work_order_id))
        slots = np.array([layout.slot_of[d][1] for d in self.devices])
        alerts: list[Alert] = []
        for step in range(1, last + 1):
            _, ts, flows = self.columns(step, step)
            while waiting and waiting[0].ts_ms <= ts[0]:
                alerts += [a.model_copy(update={"district": self.district})
                           for a in applier.apply(waiting.pop(0))]
            alerts += pipeline.customer_readings(
                slots, ts, {"flow_lpm": flows, "battery_v": np.full(len(ts), 3.6)})
            alerts += pipeline.tick(int(ts[0]))
        return alerts
