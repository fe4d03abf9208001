"""The demo's detection against the simulator's ground truth, and the floors it must keep.

:class:`TruthCollector` takes the simulator's truth while the demo runs, as
``meshwatch evaluate`` does (its incident episodes, and its communication-fault log, from
which :func:`simulators.truth.comm_episodes` builds ``clock_skew`` and ``silent`` episodes).
:func:`score_detection` hands the dataflow's alerts, as they reached the mesh, to
:func:`models.evaluate.score_run`: the same matching (kind, place, raised between the
episode's start and its end plus a grace), the same precision, recall and time to detect
(TTD, in event time), the same warm-up rule. Edge alerts (the edge model's ``anomaly``, with
no category) are not scored: they say "look here", not what is wrong.

**The load.** :data:`DEMO_RATES` raises customer leaks and bursts far above their realistic
rates so that a few simulated days of a few hundred meters hold enough of them to measure
(about 15 customer leaks and 8 bursts in the quick demo); precision is therefore higher than
in the field, where leaks are rarer (see ``meshwatch evaluate`` for realistic rates).

>>> floor = Floor("burst", "recall", 0.75, "why")
>>> failed_floors({"kinds": {"burst": {"recall": 0.5, "detectable": 8}}}, [floor])
['burst recall is 0.50, below its floor 0.75 (why)']
>>> failed_floors({"kinds": {"burst": {"recall": None, "detectable": 0}}}, [floor])[0][:45]
'burst: no detectable episode in the simulated'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from simulators.config import IncidentRates

DEMO_RATES = dataclasses.replace(IncidentRates(), customer_leak_per_meter_day=0.015,
                                 burst_per_district_day=2.0,
                                 network_leak_per_district_day=0.05)
"""Customer leaks ×7.5, bursts ×200, network leaks ×2.5 (as ``meshwatch evaluate``): enough
of each to measure in days; the other rates are realistic."""

WARMUP_DAYS = 3.0
"""The customer-leak detector learns a meter's night flow over 3 nights before it can alarm:
episodes that begin, and alerts raised, in the first 3 simulated days are not scored."""

SCORED_KINDS = ("customer_leak", "burst", "network_leak", "sensor_fault", "clock_skew",
                "silent")
"""Rows of the detection table."""


@dataclass(frozen=True)
class Floor:
    """A detection figure the quick demo must reach: ``kinds[kind][metric] >= value``."""

    kind: str
    metric: str
    value: float
    why: str


QUICK_FLOORS = (
    Floor("customer_leak", "recall", 0.8,
          "the quick demo found every one of 12-18 detectable leaks with seeds 7-11; one"
          " miss in ten is noise, three are a regression"),
    Floor("customer_leak", "precision", 0.8,
          "1.0 with seeds 7-11: the leak detector alarms only after 24 h of flow that never"
          " stops"),
    Floor("burst", "recall", 0.8,
          "every one of 4-10 bursts with seeds 7-11 (median time to detect under a"
          " minute); the margin is for a burst that begins in the last minutes of the run"),
)
"""Floors for ``meshwatch demo --quick`` (seed 7 in CI), from runs of its load with seeds 7-11
and a margin (see each ``why``). Network leaks (about one per run, found a night later
or not at all) and meter faults (one or two) are too few here to floor."""


def floor_verdict(report: dict[str, Any], floor: Floor) -> str | None:
    """Why ``report`` misses ``floor``, or None when it keeps it."""
    entry = report["kinds"][floor.kind]
    value = entry.get(floor.metric)
    if not entry["detectable"]:
        return (f"{floor.kind}: no detectable episode in the simulated load, so its floor"
                " means nothing; raise its rate or the days")
    if value is None or value < floor.value:
        shown = "n/a" if value is None else f"{value:.2f}"
        return (f"{floor.kind} {floor.metric} is {shown}, below its floor {floor.value:.2f}"
                f" ({floor.why})")
    return None


def failed_floors(report: dict[str, Any], floors: Sequence[Floor]) -> list[str]:
    """One sentence per floor the report misses (empty: all kept)."""
    return [why for floor in floors if (why := floor_verdict(report, floor)) is not None]


@dataclass
class TruthCollector:
    """The simulator's ground truth as the demo runs, and the flow of a few devices.

    Give the simulator :meth:`on_episode` and :meth:`on_comm_faults`, and :meth:`trace`
    every block: it keeps the flow of the first ``traced`` customer meters and of every
    district inlet, for the timeline plot (as ``meshwatch evaluate`` does).
    """

    fleet: Any
    traced: int = 200
    incidents: list[Any] = field(default_factory=list)
    comm_logs: list[Any] = field(default_factory=list)
    traces: dict[int, tuple[list[int], list[float]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        import numpy as np

        customers = self.fleet.customer_count
        self._watched = np.zeros(self.fleet.device_count, bool)
        self._watched[: min(self.traced, customers)] = True
        self._watched[customers: customers + self.fleet.district_count] = True  # inlets

    def on_episode(self, episode: Any) -> None:
        """Keep incident episodes (ids ``inc-``), not confounders."""
        if episode.episode_id.startswith("inc-"):
            self.incidents.append(episode)

    def on_comm_faults(self, log: Any) -> None:
        """Keep a step's communication-fault records."""
        self.comm_logs.append(log)

    def trace(self, block: Any) -> None:
        """Keep the flow readings of the watched devices in ``block``."""
        keep = self._watched[block.device_index]
        if "flow_lpm" not in block.metrics or not keep.any():
            return
        for device, ts, flow in zip(block.device_index[keep].tolist(),
                                    block.ts_ms[keep].tolist(),
                                    block.metrics["flow_lpm"][keep].tolist(), strict=True):
            times, flows = self.traces.setdefault(device, ([], []))
            times.append(ts)
            flows.append(flow)


def score_detection(alerts: Iterable[Any], truth: TruthCollector, simulator: Any,
                    warmup_days: float = WARMUP_DAYS) -> tuple[dict[str, Any], Any]:
    """Score the dataflow's ``alerts`` against ``truth``: evaluate's report, and its run.

    The run (:class:`models.evaluate.Run`, for :func:`models.evaluate.plot_timeline`) has no
    detection timings: the dataflow's are measured by :mod:`meshwatch.report.timing`.
    """
    from models.evaluate import CATEGORY_KINDS, EvalSettings, Run, score_run
    from models.water.pipeline import FleetLayout, WaterPipeline
    from simulators.truth import battery_silence, comm_episodes

    config, fleet = simulator.config, truth.fleet
    layout = FleetLayout.from_simulator(fleet, config.fleet.customer_cadence_s,
                                        config.fleet.scada_cadence_s)
    start = config.start_ms
    end = start + config.steps * config.fleet.customer_cadence_s * 1000
    episodes = [*truth.incidents,
                *comm_episodes(truth.comm_logs, fleet.customer_count, fleet.district_of,
                               layout.cadence_s),
                *battery_silence(truth.incidents, end)]
    settings = EvalSettings(meters=config.fleet.meters, days=config.days, seed=config.seed,
                            districts=fleet.district_count, warmup_days=warmup_days,
                            rates=config.incidents, comms=config.comms, start=config.start)
    scored = [a for a in alerts if a.evidence.get("category") in CATEGORY_KINDS]
    run = Run(settings, episodes, scored, WaterPipeline(layout), start, end,
              fleet.customer_count, simulate_s=0.0, detect_s=0.0, readings=0, traces=truth.traces,
              stats={})
    return score_run(run), run
