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

from meshwatch.contract import Alert
from meshwatch.contract.topics import partition_of
from meshwatch.contract.wire import telemetry_payloads
from models.evaluate import EVALUATION_RATES, EvalSettings, simulate_and_detect
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
