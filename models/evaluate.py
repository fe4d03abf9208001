"""Evaluation harness: the water detectors and alert policy against simulated ground truth.

:func:`evaluate` simulates a fleet (:mod:`simulators`, communication faults included), feeds
every delivered block to a :class:`~models.water.pipeline.WaterPipeline` in delivery order
(detectors see event time and drop what arrives out of order), advances the watermark every
15 minutes of event time, collects the alerts, and scores them against the truth.

**Truth.** Incidents come from the simulator's episodes: ``customer_leak``, ``network_leak``,
``burst`` and the meter faults (``stuck``, ``stopped``, ``spikes``, ``drift``,
``battery_depletion``). Two more kinds are built from its communication-fault log:
``clock_skew`` (a customer meter reporting shifted timestamps: from its first to its last
skewed reading, by true or reported time, whichever is wider) and ``silent`` (a device
whose readings do not arrive: a network gap or a gateway outage, from the last reading
before it to the gap's end or the backlog's delivery; and a meter whose battery died, to
the end of the run), by :func:`simulators.truth.comm_episodes` and
:func:`~simulators.truth.battery_silence`, which the crew simulator's truth shares.
Confounders (garden watering, pool filling, round-the-clock businesses) are not incidents:
alerts on them are false alarms.

**Matching.** An alert is identified by its id (folded re-openings are one alert) and
raised at its ``first_ts_ms``. It *matches* an episode when the episode's kind is compatible
with the alert's category (:data:`CATEGORY_KINDS`), it is on the same device (or district
for ``network_leak`` and ``burst``), and it was raised between the episode's start and its
end plus ``grace_h``. Matched alerts are true positives; the others are false alarms.
An episode is detected by its earliest matching alert; time to detect is the time from
the episode's start to that alert.

**What is scored.** Detectors learn each device's normal behaviour first: episodes that start
and alerts raised in the first ``warmup_days`` are left out, and so are alerts matching
such episodes; the report counts them. An episode whose duration in the run is shorter than
the evidence its kind needs (:data:`EVIDENCE_H`: 24 h of flow for a customer leak, one night
for a district leak, ``stuck_h`` for a stuck register...) cannot be detected by design: it is
reported as ``too_short``, left out of ``recall`` and kept in ``recall_all``. The duration
in the run ends at the run's end: the simulator clips its incidents there, but a ``silent``
episode keeps its true end (a gap's end, a backlog's delivery), which may lie beyond it.
Nothing else is excluded: leaks hidden by a business's round-the-clock flow, slow drifts and
small network leaks count as misses.

**Rates.** :data:`EVALUATION_RATES` are the simulator's realistic defaults, except district
incidents, which are raised (network leaks ×2.5, bursts ×10) so that a month of a few
thousand meters holds enough of them to measure; customer-side rates stay realistic, so
precision and false alarms per meter mean what they would in the field.

>>> report = evaluate(EvalSettings(meters=150, days=3, warmup_days=1, seed=11, districts=1))
>>> sorted(report["kinds"])[:3], report["scored_meter_days"]
(['battery_depletion', 'burst', 'clock_skew'], 300.0)
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from meshwatch.contract.events import Alert, AlertStatus
from models.seeds import EVALUATION_SEEDS, is_held_out
from models.water.pipeline import FleetLayout, PipelineSettings, WaterPipeline
from simulators import CommFaultLog, CommRates, Episode, FleetConfig, FleetSimulator, SimConfig
from simulators.config import DEFAULT_START, IncidentRates
from simulators.truth import battery_silence, comm_episodes

MS_PER_HOUR = 3_600_000
TICK_MS = 900_000

EVALUATION_RATES = dataclasses.replace(IncidentRates(), network_leak_per_district_day=0.05,
                                       burst_per_district_day=0.1)
"""Realistic rates with district incidents raised so that they can be measured."""

FAULT_KINDS = ("stuck", "stopped", "spikes", "drift", "battery_depletion")
CATEGORY_KINDS: dict[str, frozenset[str]] = {
    "customer_leak": frozenset({"customer_leak"}),
    "network_leak": frozenset({"network_leak"}),
    "burst": frozenset({"burst"}),
    "sensor_fault": frozenset(FAULT_KINDS),
    "clock_skew": frozenset({"clock_skew"}),
    "silent": frozenset({"silent"}),
}
"""The episode kinds each alert category can match."""

DISTRICT_KINDS = frozenset({"network_leak", "burst"})

EVIDENCE_H: dict[str, float] = {
    "customer_leak": 24.0, "network_leak": 24.0, "burst": 0.0, "stuck": 16.0,
    "stopped": 30.0, "spikes": 0.25, "drift": 0.0, "battery_depletion": 0.0,
    "clock_skew": 0.25, "silent": 6.25,
}
"""Hours of an episode a detector needs before it can tell (see the module docs); for
``silent`` this is for 15-minute meters (SCADA devices need 25 minutes)."""

ROWS = ("customer_leak", "network_leak", "burst", "sensor_fault", *FAULT_KINDS, "clock_skew",
        "silent")
"""Rows of the report: categories, with the meter faults also one by one."""


@dataclass(frozen=True)
class EvalSettings:
    """What to simulate and how to score it (see the module docs)."""

    meters: int = 2000
    days: float = 28.0
    seed: int = EVALUATION_SEEDS[0]
    districts: int | None = None
    warmup_days: float = 7.0
    grace_h: float = 24.0
    rates: IncidentRates = EVALUATION_RATES
    comms: CommRates = field(default_factory=CommRates)
    start: datetime = DEFAULT_START
    pipeline: PipelineSettings = field(default_factory=PipelineSettings)
    timeline_devices: int = 200
    commercial_fraction: float = FleetConfig.commercial_fraction

    @property
    def district_count(self) -> int:
        """Districts: as given, or one per 500 meters (at least 2)."""
        if self.districts is not None:
            return self.districts
        return max(2, round(self.meters / 500))

    def sim_config(self) -> SimConfig:
        """The simulation that is evaluated."""
        fleet = FleetConfig(meters=self.meters, districts=self.district_count,
                            commercial_fraction=self.commercial_fraction)
        return SimConfig(fleet=fleet,
                         incidents=self.rates, comms=self.comms, seed=self.seed,
                         start=self.start, days=self.days)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad setting."""
        if not 0 <= self.warmup_days < self.days:
            msg = f"warmup_days is {self.warmup_days}; expected 0 or more and below days"
            raise ValueError(msg)
        if self.grace_h < 0:
            msg = f"grace_h is {self.grace_h}; expected 0 or more"
            raise ValueError(msg)
        self.sim_config().validate()


@dataclass
class Run:
    """Everything one evaluation run produced, before scoring."""

    settings: EvalSettings
    episodes: list[Episode]
    alerts: list[Alert]
    pipeline: WaterPipeline
    start_ms: int
    end_ms: int
    customers: int
    simulate_s: float
    detect_s: float
    readings: int
    traces: dict[int, tuple[list[int], list[float]]]
    stats: dict[str, Any]


Hook = Callable[[WaterPipeline, list[Alert], int], None]
"""``hook(pipeline, new_alerts, now_ms)``: called after each delivered block (feedback tests)."""


def simulate_and_detect(settings: EvalSettings,
                        progress: Callable[[float], None] | None = None,
                        hook: Hook | None = None) -> Run:
    """Run the simulator and the pipeline; return the alerts and the truth (episodes)."""
    settings.validate()
    config = settings.sim_config()
    episodes: list[Episode] = []
    logs: list[CommFaultLog] = []
    simulator = FleetSimulator(config, on_episode=episodes.append, on_comm_faults=logs.append)
    fleet = simulator.fleet
    layout = FleetLayout.from_simulator(fleet, config.fleet.customer_cadence_s,
                                        config.fleet.scada_cadence_s)
    pipeline = WaterPipeline(layout, settings.pipeline)
    start = config.start_ms
    end = start + config.steps * config.fleet.customer_cadence_s * 1000
    customers = fleet.customer_count
    traced = np.zeros(fleet.device_count, bool)
    traced[: min(settings.timeline_devices, customers)] = True
    traced[customers: customers + fleet.district_count] = True  # district inlets
    traces: dict[int, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
    alerts: list[Alert] = []
    next_tick = start + TICK_MS
    detect_s = 0.0
    wall = time.perf_counter()
    for block in simulator:
        t0 = time.perf_counter()
        while next_tick <= min(block.sent_ms, end):  # the watermark stops at the run's end
            alerts += pipeline.tick(min(next_tick, pipeline.max_ts or next_tick))
            next_tick += TICK_MS
        device = block.device_index
        first_new = len(alerts)
        if block.kind == "customer_meter":
            alerts += pipeline.customer_readings(device, block.ts_ms, block.metrics)
        elif block.kind == "district_meter":
            alerts += pipeline.inlet_readings(device, block.ts_ms, block.metrics)
        else:
            pipeline.other_readings(device, block.ts_ms)
        if hook is not None:
            hook(pipeline, alerts[first_new:], min(block.sent_ms, end))
        detect_s += time.perf_counter() - t0
        keep = traced[device]
        if keep.any():
            for d, t, f in zip(device[keep].tolist(), block.ts_ms[keep].tolist(),
                               block.metrics["flow_lpm"][keep].tolist(), strict=True):
                traces[d][0].append(t)
                traces[d][1].append(f)
        if progress is not None:
            progress(min(1.0, (block.sent_ms - start) / (end - start)))
    t0 = time.perf_counter()
    alerts += pipeline.tick(min(end, max(pipeline.max_ts, next_tick - TICK_MS)))
    detect_s += time.perf_counter() - t0
    total_s = time.perf_counter() - wall
    truth = list(episodes) + comm_episodes(logs, fleet.customer_count, fleet.district_of,
                                           layout.cadence_s)
    truth += battery_silence(episodes, end)
    stats = {"produced": simulator.stats.produced, "lost": simulator.stats.lost,
             "duplicated": simulator.stats.duplicated,
             "comm_faults": dict(simulator.stats.comm_faults),
             "confounders": dict(simulator.stats.confounders),
             "stale_readings": {"customer_leak": pipeline.leak.stale,
                                "sensor_faults": pipeline.faults.stale,
                                "burst": pipeline.burst.stale},
             "late_for_district_balance": pipeline.aggregator.late,
             "suppressed_by_fusion": pipeline.policy.suppressed,
             "rate_limited": pipeline.policy.rate_limited,
             "score_drift": pipeline.drift_metrics()}
    return Run(settings, truth, alerts, pipeline, start, end, customers, total_s - detect_s,
               detect_s, pipeline.readings, dict(traces), stats)


# -- scoring ------------------------------------------------------------------------------------

@dataclass
class _Raised:
    alert_id: str
    category: str
    subject: int
    ts: int


def raised_alerts(alerts: Iterable[Alert], device_index: dict[str, int],
                  district_index: dict[str, int]) -> list[_Raised]:
    """One entry per alert id: its category, subject index and the time it was raised."""
    seen: dict[str, _Raised] = {}
    for alert in alerts:
        if alert.status is not AlertStatus.OPEN or alert.alert_id in seen:
            continue
        category = str(alert.evidence["category"])
        if category in ("network_leak", "burst"):
            subject = district_index[str(alert.district)]
        else:
            subject = device_index[str(alert.device_id)]
        seen[alert.alert_id] = _Raised(alert.alert_id, category, subject, alert.first_ts_ms)
    return list(seen.values())


def score_run(run: Run) -> dict[str, Any]:
    """Match alerts to episodes and compute the report (see the module docs)."""
    settings = run.settings
    layout = run.pipeline.layout
    device_index = {str(name): i for i, name in enumerate(layout.device_ids.tolist())}
    district_index = {name: i for i, name in enumerate(layout.district_ids)}
    raised = raised_alerts(run.alerts, device_index, district_index)
    warm_end = run.start_ms + int(settings.warmup_days * 24 * MS_PER_HOUR)
    grace = int(settings.grace_h * MS_PER_HOUR)
    scada_cadence = int(layout.cadence_s[layout.kind != 0].min()) if (layout.kind != 0).any() \
        else 60

    by_subject: dict[tuple[bool, int], list[Episode]] = defaultdict(list)
    for episode in run.episodes:
        district_wide = episode.kind in DISTRICT_KINDS
        by_subject[(district_wide, episode.district if district_wide else episode.device)].append(
            episode)

    detected: dict[str, int] = {}  # episode id -> first matching alert time
    outcome: dict[str, str] = {}  # alert id -> "tp" | "fa" | "warmup"
    category_of: dict[str, str] = {}
    for alert in raised:
        kinds = CATEGORY_KINDS[alert.category]
        district_wide = alert.category in ("network_leak", "burst")
        matches = [e for e in by_subject.get((district_wide, alert.subject), [])
                   if e.kind in kinds and e.start_ms <= alert.ts <= e.end_ms + grace]
        category_of[alert.alert_id] = alert.category
        if alert.ts < warm_end or (matches and all(e.start_ms < warm_end for e in matches)):
            outcome[alert.alert_id] = "warmup"
            continue
        outcome[alert.alert_id] = "tp" if matches else "fa"
        for episode in matches:
            best = detected.get(episode.episode_id)
            if best is None or alert.ts < best:
                detected[episode.episode_id] = alert.ts

    scored_days = (run.end_ms - warm_end) / (24 * MS_PER_HOUR)
    meter_days = run.customers * scored_days
    kinds: dict[str, Any] = {}
    for row in ROWS:
        members = CATEGORY_KINDS.get(row, frozenset({row}))
        in_scope = [e for e in run.episodes if e.kind in members and e.start_ms >= warm_end]
        def needed(e: Episode) -> float:
            if e.kind == "silent" and layout.kind[e.device] != 0:
                return EVIDENCE_H["silent"] * scada_cadence / 900
            return EVIDENCE_H[e.kind]
        detectable = [e for e in in_scope  # the part in the run: the detectors see no further
                      if min(e.end_ms, run.end_ms) - e.start_ms >= needed(e) * MS_PER_HOUR]
        hit = [e for e in detectable if e.episode_id in detected]
        hit_all = [e for e in in_scope if e.episode_id in detected]
        ttd = np.array([(detected[e.episode_id] - e.start_ms) / MS_PER_HOUR for e in hit])
        entry: dict[str, Any] = {
            "episodes": len(in_scope), "too_short": len(in_scope) - len(detectable),
            "detectable": len(detectable), "detected": len(hit),
            "recall": _ratio(len(hit), len(detectable)),
            "recall_all": _ratio(len(hit_all), len(in_scope)),
            "warmup_episodes": sum(1 for e in run.episodes
                                   if e.kind in members and e.start_ms < warm_end),
            "median_ttd_h": _round(np.median(ttd)) if len(ttd) else None,
            "p90_ttd_h": _round(np.percentile(ttd, 90)) if len(ttd) else None,
        }
        if row == "burst":
            within = sum(1 for e in hit
                         if detected[e.episode_id] - e.start_ms <= 2 * scada_cadence * 1000)
            entry["within_2_readings"] = within
            entry["recall_within_2_readings"] = _ratio(within, len(detectable))
        if row in CATEGORY_KINDS:
            ids = [a for a, c in category_of.items() if c == row]
            tp = sum(1 for a in ids if outcome[a] == "tp")
            fa = sum(1 for a in ids if outcome[a] == "fa")
            entry.update({
                "alerts": tp + fa, "true_alerts": tp, "false_alarms": fa,
                "warmup_alerts": sum(1 for a in ids if outcome[a] == "warmup"),
                "precision": _ratio(tp, tp + fa),
                "false_alarms_per_1000_meter_days": _round(1000 * fa / meter_days),
            })
            precision, recall = entry["precision"], entry["recall"]
            entry["f1"] = (_round(2 * precision * recall / (precision + recall))
                           if precision is not None and recall is not None
                           and precision + recall > 0 else None)
        kinds[row] = entry
    false_alarms = sum(1 for value in outcome.values() if value == "fa")
    return {
        "settings": {"meters": settings.meters, "days": settings.days, "seed": settings.seed,
                     "districts": settings.district_count, "warmup_days": settings.warmup_days,
                     "grace_h": settings.grace_h, "start": settings.start.isoformat(),
                     "incident_rates": dataclasses.asdict(settings.rates),
                     "comm_rates": dataclasses.asdict(settings.comms)},
        "held_out_seed": is_held_out(settings.seed),
        "model_version": run.pipeline.policy.settings.model_version,
        "scored_days": _round(scored_days),
        "scored_meter_days": _round(meter_days),
        "kinds": kinds,
        "false_alarms": false_alarms,
        "false_alarms_per_1000_meter_days": _round(1000 * false_alarms / meter_days),
        "alerts": len(raised),
        "alert_messages": len(run.alerts),
        "readings": run.readings,
        "detect_s": _round(run.detect_s),
        "simulate_s": _round(run.simulate_s),
        "readings_per_s": _round(run.readings / max(run.detect_s, 1e-9)),
        "stats": run.stats,
    }


def evaluate(settings: EvalSettings,
             progress: Callable[[float], None] | None = None) -> dict[str, Any]:
    """Simulate, detect and score: the report as a JSON-ready dict."""
    return score_run(simulate_and_detect(settings, progress))


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 4) if b else None


def _round(value: float) -> float:
    return round(float(value), 4)


# -- timeline -----------------------------------------------------------------------------------

def plot_timeline(run: Run, path: str | Path, devices: int = 5) -> list[str]:
    """Draw a PNG timeline of a few devices: flow, incidents (shaded) and alerts (lines).

    Picks traced devices with episodes of different kinds first, then one with a false
    alarm if any, then a district inlet. Returns the device ids drawn.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layout = run.pipeline.layout
    ids = layout.device_ids
    device_index = {str(name): i for i, name in enumerate(ids.tolist())}
    district_index = {name: i for i, name in enumerate(layout.district_ids)}
    raised = raised_alerts(run.alerts, device_index, district_index)
    chosen: list[int] = []
    kinds_seen: set[str] = set()
    for episode in sorted(run.episodes, key=lambda e: e.start_ms):
        if (episode.device in run.traces and episode.kind not in kinds_seen
                and episode.device not in chosen and episode.kind != "silent"):
            chosen.append(episode.device)
            kinds_seen.add(episode.kind)
        if len(chosen) >= devices - 1:
            break
    truth_devices = {e.device for e in run.episodes}
    for alert in raised:
        if (alert.category not in ("network_leak", "burst") and alert.subject in run.traces
                and alert.subject not in truth_devices and alert.subject not in chosen):
            chosen.append(alert.subject)  # a false alarm
            break
    inlets = [d for d in run.traces if layout.kind[d] == 1]
    if inlets:
        chosen.append(inlets[0])
    fig, axes = plt.subplots(len(chosen) or 1, 1, figsize=(12, 2.2 * max(len(chosen), 1)),
                             sharex=True, squeeze=False)
    colours = {"customer_leak": "tab:blue", "network_leak": "tab:blue", "burst": "tab:red",
               "clock_skew": "tab:purple", "silent": "tab:gray"}
    for ax, device in zip(axes[:, 0], chosen, strict=False):
        times, flows = run.traces[device]
        hours = (np.array(times) - run.start_ms) / MS_PER_HOUR
        ax.plot(hours, flows, lw=0.6, color="black")
        ax.axvline(run.settings.warmup_days * 24, color="gray", lw=0.8, ls=":",
                   label="end of warm-up")
        district = int(layout.district_of[device])
        is_inlet = layout.kind[device] == 1
        for episode in run.episodes:
            mine = (episode.district == district and episode.kind in DISTRICT_KINDS) if is_inlet \
                else (episode.device == device and episode.kind not in DISTRICT_KINDS)
            if mine:
                ax.axvspan((episode.start_ms - run.start_ms) / MS_PER_HOUR,
                           (episode.end_ms - run.start_ms) / MS_PER_HOUR, alpha=0.2,
                           color=colours.get(episode.kind, "tab:orange"), label=episode.kind)
        for alert in raised:
            mine = (alert.subject == district and alert.category in ("network_leak", "burst")) \
                if is_inlet else (alert.subject == device
                                  and alert.category not in ("network_leak", "burst"))
            if mine:
                ax.axvline((alert.ts - run.start_ms) / MS_PER_HOUR, color="tab:red", lw=1.2,
                           ls="--", label=f"alert: {alert.category}")
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        if unique:
            ax.legend(unique.values(), unique.keys(), loc="upper left", fontsize=7)
        ax.set_ylabel("L/min")
        ax.set_title(str(ids[device]), fontsize=9, loc="right")
    axes[-1, 0].set_xlabel("hours since start (event time)")
    fig.suptitle("Incidents (shaded) and alerts (dashed)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [str(ids[d]) for d in chosen]
