"""Key figures: remediation rate, false-alarm rate, MTTA, MTTR, water saved; as Prometheus.

- *remediation rate*: alerts whose incident ended in a confirmed repair (``confirmed_leak``,
  ``confirmed_burst``, ``meter_fault``) / all alerts received.
- *false-alarm rate*: work orders closed as ``false_alarm`` / work orders resolved or false
  alarms.
- *MTTA*, *MTTR*: mean seconds from work order creation to acknowledgement, and to resolution.
- *water saved*: for each confirmed leak or burst, its estimated loss rate times the time it
  would have run undetected (``saved_horizon_h``) minus the time it took to resolve.

The gauges are computed from the database at every scrape; :mod:`remediation.influx` writes
them to InfluxDB (``mw_kpi``, ``mw_work_orders``) periodically.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from remediation.db import AlertRow, IncidentRow, WorkOrderRow
from remediation.workorders import REPAIR_OUTCOMES

WATER_OUTCOMES = ("confirmed_leak", "confirmed_burst")


def water_saved_m3(loss_lph: float | None, resolve_h: float, horizon_h: float) -> float:
    """Cubic metres a repair saved: the loss it stopped over the rest of the horizon.

    >>> water_saved_m3(500.0, resolve_h=20.0, horizon_h=720.0)
    350.0
    >>> water_saved_m3(500.0, resolve_h=900.0, horizon_h=720.0), water_saved_m3(None, 1, 720)
    (0.0, 0.0)
    """
    if not loss_lph:
        return 0.0
    return loss_lph * max(0.0, horizon_h - resolve_h) / 1000.0


def compute(engine: Engine, saved_horizon_h: float = 720.0) -> dict[str, Any]:
    """Every KPI from the database (None where nothing is known yet)."""
    with Session(engine) as session:
        alerts = session.scalar(select(func.count()).select_from(AlertRow)) or 0
        remediated = session.scalar(
            select(func.count()).select_from(AlertRow)
            .join(WorkOrderRow, WorkOrderRow.incident_id == AlertRow.incident_id)
            .where(WorkOrderRow.state == "resolved",
                   WorkOrderRow.outcome.in_(REPAIR_OUTCOMES))) or 0
        by_state = dict(session.execute(select(WorkOrderRow.state, func.count())
                                        .group_by(WorkOrderRow.state)).all())
        mtta = session.scalar(select(func.avg(WorkOrderRow.acknowledged_ms
                                              - WorkOrderRow.created_ms))
                              .where(WorkOrderRow.acknowledged_ms.is_not(None)))
        mttr = session.scalar(select(func.avg(WorkOrderRow.closed_ms - WorkOrderRow.created_ms))
                              .where(WorkOrderRow.state == "resolved"))
        repairs = session.execute(
            select(IncidentRow.est_loss_lph, WorkOrderRow.created_ms, WorkOrderRow.closed_ms)
            .join(WorkOrderRow, WorkOrderRow.incident_id == IncidentRow.incident_id)
            .where(WorkOrderRow.state == "resolved", WorkOrderRow.outcome.in_(WATER_OUTCOMES)))
        saved = sum(water_saved_m3(loss, ((closed or created) - created) / 3_600_000,
                                   saved_horizon_h) for loss, created, closed in repairs)
        open_incidents = session.scalar(select(func.count()).select_from(IncidentRow)
                                        .where(IncidentRow.state == "open")) or 0
    closed = by_state.get("resolved", 0) + by_state.get("false_alarm", 0)
    return {
        "alerts": alerts,
        "remediation_rate": remediated / alerts if alerts else None,
        "false_alarm_rate": by_state.get("false_alarm", 0) / closed if closed else None,
        "mtta_s": None if mtta is None else float(mtta) / 1000,
        "mttr_s": None if mttr is None else float(mttr) / 1000,
        "water_saved_m3": saved,
        "open_incidents": open_incidents,
        "work_orders": {str(k): int(v) for k, v in by_state.items()},
    }


class KpiCollector(Collector):
    """Prometheus collector computing :func:`compute` at each scrape."""

    def __init__(self, engine: Engine, saved_horizon_h: float = 720.0) -> None:
        self.engine = engine
        self.saved_horizon_h = saved_horizon_h

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Yield the KPI gauges."""
        k = compute(self.engine, self.saved_horizon_h)
        for name, doc in (("remediation_rate", "alerts that led to a confirmed repair / alerts"),
                          ("false_alarm_rate", "false alarms / closed work orders"),
                          ("mtta_s", "mean time to acknowledge, seconds"),
                          ("mttr_s", "mean time to resolve, seconds"),
                          ("water_saved_m3", "estimated water saved by repairs, m3"),
                          ("open_incidents", "incidents open now")):
            value = k[name]
            gauge = GaugeMetricFamily(f"mw_remediation_{name}", doc)
            gauge.add_metric([], float("nan") if value is None else float(value))
            yield gauge
        states = GaugeMetricFamily("mw_remediation_work_orders", "work orders by state",
                                   labels=["state"])
        for state, n in k["work_orders"].items():
            states.add_metric([state], n)
        yield states
