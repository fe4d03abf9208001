"""Remediation to InfluxDB: ``mw_incident`` events and ``mw_kpi`` / ``mw_work_orders`` snapshots.

On when ``[influxdb] url`` is set. Lines are made by ``meshwatch/contract/measurements.py``
(:meth:`~meshwatch.contract.measurements.Measurement.line`), so they are what the dashboards read.

- **mw_incident** (``event`` = opened, escalated, assigned, resolved, false_alarm, cancelled,
  reopened): :class:`remediation.store.Store` queues the line as an ``influx`` row of the
  outbox, in the transaction that changed the incident or work order (so a crash loses none,
  a replay queues none twice). Its timestamp is fixed when queued, so re-sending a line after
  a crash between the write and ``mark_sent`` overwrites the same point.
- **mw_kpi**, **mw_work_orders**: :func:`remediation.kpi.compute` every
  ``remediation.influx_kpi_s`` seconds of wall clock, stamped with the wall-clock ms.

:class:`InfluxWriter` runs in its own thread: intake never waits for it. A write that fails for
a reason that may pass (refused, reset, time-out, 5xx, 429, 401/403/404) is retried with capped
back-off, forever (outbox rows stay pending meanwhile; a KPI snapshot keeps its time stamp
and is retried until written, the next one follows ``influx_kpi_s`` later). A batch refused
as malformed (400, 422) is logged and its outbox rows given up (``sent_ms = -1``), as
webhooks are.

>>> kpi_lines({"alerts": 4, "remediation_rate": 0.5, "false_alarm_rate": None,
...            "mtta_s": 60.0, "mttr_s": None, "water_saved_m3": 0.0, "open_incidents": 1,
...            "work_orders": {"open": 1, "resolved": 1}}, 1767225600000)
['mw_kpi alerts=4i,remediation_rate=0.5,mtta_s=60.0,water_saved_m3=0.0,open_incidents=1i \
1767225600000', 'mw_work_orders,state=open count=1i 1767225600000', \
'mw_work_orders,state=resolved count=1i 1767225600000']
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from meshwatch.contract.measurements import INCIDENT, KPI, WORK_ORDERS
from meshwatch.tsdb import LineWriter, Stopping
from remediation.db import IncidentRow, WorkOrderRow
from remediation.kpi import compute
from remediation.store import Store

__all__ = ["CHANNEL", "STATES", "InfluxWriter", "incident_line", "kpi_lines"]

log = logging.getLogger(__name__)

CHANNEL = "influx"
"""The outbox channel of ``mw_incident`` lines."""
STATES = ("open", "assigned", "acknowledged", "in_progress", "resolved", "false_alarm",
          "cancelled")
"""Every work-order state: each snapshot writes all of them (0 where none), so a state that
empties reads 0, not its last non-zero count."""
_KPI_FIELDS = ("alerts", "remediation_rate", "false_alarm_rate", "mtta_s", "mttr_s",
               "water_saved_m3", "open_incidents")


def incident_line(event: str, incident: IncidentRow, wo: WorkOrderRow, text: str,
                  ts_ms: int) -> str:
    """One ``mw_incident`` line (``est_loss_lph`` left out while unknown).

    >>> inc = IncidentRow(incident_id="inc-1", district="dma-01", kind="leak",
    ...                   est_loss_lph=120.0)
    >>> incident_line("opened", inc, WorkOrderRow(work_order_id="wo-1", priority=3),
    ...               "opened: leak", 1767225600000)
    'mw_incident,district=dma-01,event=opened,kind=leak incident_id="inc-1",\
work_order_id="wo-1",priority=3i,est_loss_lph=120.0,text="opened: leak" 1767225600000'
    """
    fields: dict[str, object] = {"incident_id": incident.incident_id,
                                 "work_order_id": wo.work_order_id, "priority": wo.priority}
    if incident.est_loss_lph is not None:
        fields["est_loss_lph"] = float(incident.est_loss_lph)
    fields["text"] = " ".join(text.split())[:500]  # one line: no newlines in line protocol
    return INCIDENT.line({"district": incident.district, "kind": incident.kind,
                          "event": event}, fields, ts_ms)


def kpi_lines(kpis: Mapping[str, Any], ts_ms: int) -> list[str]:
    """The ``mw_kpi`` line (unknown KPIs left out), one ``mw_work_orders`` line per state.

    The states are those of ``kpis["work_orders"]``.
    """
    fields = {name: kpis[name] for name in _KPI_FIELDS if kpis.get(name) is not None}
    lines = [KPI.line({}, fields, ts_ms)] if fields else []
    lines += [WORK_ORDERS.line({"state": state}, {"count": int(n)}, ts_ms)
              for state, n in sorted(kpis.get("work_orders", {}).items())]
    return lines


class InfluxWriter:
    """Send the outbox's ``influx`` rows and KPI snapshots; see the module doc.

    Args:
        store: the outbox and the KPIs live in its database.
        url, token, org, bucket: the InfluxDB v2 write API (or VictoriaMetrics).
        kpi_interval_s: seconds between KPI snapshots (wall clock).

    """

    def __init__(self, store: Store, *, url: str, token: str | None, org: str, bucket: str,
                 kpi_interval_s: float = 60.0, saved_horizon_h: float = 720.0,
                 batch_size: int = 5000, poll_s: float = 0.1, timeout_s: float = 10.0,
                 retry_max_s: float = 30.0) -> None:
        self.store = store
        self.kpi_interval_s = kpi_interval_s
        self.saved_horizon_h = saved_horizon_h
        self.batch_size = batch_size
        self.poll_s = poll_s
        self.events = 0
        """``mw_incident`` lines written."""
        self.snapshots = 0
        """KPI snapshots written."""
        self._writer = LineWriter(url, token=token, org=org, bucket=bucket, timeout_s=timeout_s,
                                  retry_max_s=retry_max_s, what="remediation lines")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="influx", daemon=True)

    @property
    def retries(self) -> int:
        """Writes retried so far."""
        return self._writer.retries

    def start(self) -> InfluxWriter:
        """Start writing."""
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop (unsent rows stay in the outbox for the next start); also if never started."""
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(timeout_s)
        self._writer.close()

    def _loop(self) -> None:
        next_kpi = time.time()
        while not self._stop.is_set():
            try:
                if time.time() >= next_kpi:
                    next_kpi = time.time() + self.kpi_interval_s
                    self.write_kpis()
                if not self.write_events():
                    self._stop.wait(self.poll_s)
            except Stopping:
                return
            except Exception:
                log.exception("writing remediation points to InfluxDB failed; retrying")
                self._stop.wait(1.0)

    def write_events(self) -> int:
        """Write one page of pending ``mw_incident`` rows, mark them sent; returns how many."""
        rows = self.store.pending(CHANNEL, limit=self.batch_size)
        if not rows:
            return 0
        error = self._send([row.payload.decode() for row in rows])
        if error is not None:  # malformed: would never pass
            for row in rows:
                self.store.mark_failed(row.id, error, None)
            return 0
        self.store.mark_sent([row.id for row in rows])
        self.events += len(rows)
        return len(rows)

    def write_kpis(self, ts_ms: int | None = None) -> list[str]:
        """Compute the KPIs now and write them; returns the lines."""
        kpis = compute(self.store.reader, self.saved_horizon_h)
        kpis["work_orders"] = {state: kpis["work_orders"].get(state, 0) for state in STATES}
        lines = kpi_lines(kpis, int(time.time() * 1000) if ts_ms is None else ts_ms)
        if self._send(lines) is None:
            self.snapshots += 1
        return lines

    def _send(self, lines: list[str]) -> str | None:
        """Write ``lines``, retrying what may pass; the error if refused as malformed.

        Raises :class:`~meshwatch.tsdb.Stopping` when the writer stops before it could write.
        """
        return self._writer.write(lines, stop=self._stop)


