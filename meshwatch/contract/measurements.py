"""Every InfluxDB measurement of the platform: name, tags, fields, and who writes it.

Part of the contract: writers (dataflow, remediation...) and readers (the dashboards) share
it, as they share the event contract.

Who writes what:

- the dataflow's InfluxDB sink (``dataflows/connectors/influx.py``): ``mw_telemetry``,
  ``mw_silence``, ``mw_score``, ``mw_flow``, ``mw_alert``, ``mw_district`` (a district's
  water balance, from the detection step) and the flow hop of ``mw_ledger``. The dataflow's
  names are repeated here (the contract imports no ``dataflows/``; a test checks that the
  names agree);
- remediation (``remediation/influx.py``): ``mw_incident``, ``mw_kpi``, ``mw_work_orders``;
- the bridge (``mesh_bridge/stats.py``): ``mw_bridge``, ``mw_dead_letters``, the bridge and
  edge hops of ``mw_ledger`` and, from the gateways' heartbeats, ``mw_edge``.

The dashboards are built and tested on these definitions (the tests write lines made by
:meth:`Measurement.line`).

Times are UTC epoch milliseconds (write with ``precision=ms``). Cumulative counters are
integers stamped with wall-clock time (the newest sample is the current value), like
``mw_flow``; panels take ``non_negative_difference`` or ``last`` of them.

>>> ALERT.line({"district": "d1", "kind": "leak", "severity": "major", "status": "open",
...             "device": "m1"},
...            {"alert_id": "a-1", "active": 1, "score": 0.97, "est_loss_lph": 120.0},
...            1767225600000)
'mw_alert,device=m1,district=d1,kind=leak,severity=major,status=open alert_id="a-1",active=1i,\
score=0.97,est_loss_lph=120.0 1767225600000'
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["ALERT", "ALL", "BRIDGE", "DEAD_LETTERS", "DISTRICT", "EDGE", "FLOW", "INCIDENT",
           "KPI", "LEDGER", "SCORE", "SILENCE", "TELEMETRY", "WORK_ORDERS", "Measurement"]

_TYPES = {"float": float, "int": int, "str": str}


@dataclass(frozen=True, slots=True)
class Measurement:
    """One measurement: its tags, its fields (name -> ``float``, ``int`` or ``str``).

    ``fields`` may be empty when they are open-ended (``mw_telemetry`` has one field per
    metric name of the contract). ``writer`` is the component that writes it.
    """

    name: str
    tags: tuple[str, ...]
    fields: Mapping[str, str]
    writer: str
    doc: str

    def line(self, tags: Mapping[str, str], fields: Mapping[str, object], ts_ms: int) -> str:
        """One line of line protocol (ms precision); refuses unknown or mistyped keys.

        >>> KPI.line({}, {"mttr_s": "soon"}, 0)
        Traceback (most recent call last):
        ...
        ValueError: mw_kpi.mttr_s must be float, got 'soon'
        """
        unknown = set(tags) - set(self.tags)
        if unknown:
            msg = f"{self.name} has no tag {sorted(unknown)}; its tags are {list(self.tags)}"
            raise ValueError(msg)
        if not fields:
            msg = f"a {self.name} line needs at least one field"
            raise ValueError(msg)
        parts = [self.name] + [f"{k}={_escape_tag(v)}" for k, v in sorted(tags.items()) if v]
        values = []
        for key, value in fields.items():
            kind = self.fields.get(key)
            if kind is None:
                msg = f"{self.name} has no field {key!r}; its fields are {list(self.fields)}"
                raise ValueError(msg)
            values.append(f"{key}={_field_value(self.name, key, kind, value)}")
        return f"{','.join(parts)} {','.join(values)} {int(ts_ms)}"


def _escape_tag(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace(",", r"\,").replace("=", r"\=").replace(
        " ", r"\ ")


def _field_value(measurement: str, key: str, kind: str, value: object) -> str:
    expected = _TYPES[kind]
    if isinstance(value, bool) or not isinstance(value, (expected, int) if kind == "float"
                                                  else expected):
        msg = f"{measurement}.{key} must be {kind}, got {value!r}"
        raise ValueError(msg)
    if kind == "int":
        return f"{value}i"
    if kind == "float":
        return repr(float(value))  # type: ignore[arg-type]
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


_SINK = "dataflows/connectors/influx.py (the dataflow's InfluxDB sink)"

TELEMETRY = Measurement(
    "mw_telemetry", ("device", "imputed"), {}, _SINK,
    "Every released reading, event time; one field per metric (flow_lpm, pressure_bar...); "
    "imputed=true for gap-filled points.")
SILENCE = Measurement(
    "mw_silence", ("device",), {"missed": "int", "last_seen_ms": "int", "resumed": "int"},
    _SINK, "Silence records: an onset (resumed=0) and a resumption (resumed=1).")
SCORE = Measurement(
    "mw_score", ("device",), {"score": "float"}, _SINK,
    "The detection stage's score in [0, 1] of each reading it scored (the highest of the "
    "water detectors').")
FLOW = Measurement(
    "mw_flow", ("shard",),
    {name: "int" for name in ("received", "duplicates", "measured", "late", "unverified",
                              "imputed", "gaps_filled", "silent_onsets", "long_gaps")},
    _SINK, "A shard's cumulative pipeline counters, wall-clock stamped.")

ALERT = Measurement(
    "mw_alert", ("district", "kind", "severity", "status", "device"),
    {"alert_id": "str", "active": "int", "score": "float", "est_loss_lph": "float",
     "first_ts_ms": "int", "last_ts_ms": "int"},
    _SINK + ", from the detection stage's Alert events (also published to "
    "mw/v1/alerts/...)",
    "One point per Alert event at its last_ts_ms. ``active`` is 1 for open/update, 0 for "
    "cleared; a cleared alert writes est_loss_lph=0, so the last value per (district, "
    "device, kind) is the loss still running. ``device`` is absent for district-wide alerts.")

INCIDENT = Measurement(
    "mw_incident", ("district", "kind", "event"),
    {"incident_id": "str", "work_order_id": "str", "priority": "int", "est_loss_lph": "float",
     "text": "str"},
    "remediation (remediation/store.py, in the transaction that changes the incident)",
    "Incident and work-order life-cycle events (event = opened, escalated, assigned, "
    "resolved, false_alarm, cancelled, reopened) at wall-clock time; ``text`` is the "
    "one-line summary shown as an annotation.")
KPI = Measurement(
    "mw_kpi", (),
    {"alerts": "int", "remediation_rate": "float", "false_alarm_rate": "float",
     "mtta_s": "float", "mttr_s": "float", "water_saved_m3": "float", "open_incidents": "int"},
    "remediation (remediation/influx.py: remediation/kpi.py's compute(), sampled "
    "periodically)",
    "The remediation KPIs that are Prometheus gauges mw_remediation_* today; a KPI that is "
    "not known yet (None) is left out of the line.")
WORK_ORDERS = Measurement(
    "mw_work_orders", ("state",), {"count": "int"},
    "remediation (remediation/influx.py, with mw_kpi)",
    "Work orders by state now (Prometheus mw_remediation_work_orders today).")
DISTRICT = Measurement(
    "mw_district", ("district",),
    {"inlet_flow_lpm": "float", "customer_flow_lpm": "float", "balance_lpm": "float",
     "pressure_bar": "float"},
    _SINK + ", from the detection step (the district leak detector's input)",
    "Per district and 15 minutes of event time, stamped at the interval's start: inlet "
    "flow, the sum of its customer meters (missing meters imputed; left out below 80 % "
    "coverage), the balance (inlet - customers) and the inlet pressure. mw_telemetry "
    "carries no district tag, so this is what the district dashboard reads.")
BRIDGE = Measurement(
    "mw_bridge", ("bridge",),
    {"messages_in": "int", "readings_in": "int", "readings_forwarded": "int",
     "duplicates": "int", "late": "int", "in_flight": "int", "cloud_connected": "int",
     "lag_p95_s": "float"},
    "mesh_bridge (mesh_bridge/stats.py, every bridge.stats_s; also Prometheus "
    "meshwatch_bridge_*)",
    "The bridge's cumulative counters, its gauges and the 95th percentile of "
    "receive time - sent_ms over the last interval.")
EDGE = Measurement(
    "mw_edge", ("site", "gateway"),
    {"queue_depth": "int", "queue_bytes": "int", "oldest_queued_age_s": "float",
     "in_flight": "int", "connected": "int", "readings_in": "int", "acked": "int",
     "readings_dropped": "int"},
    "mesh_bridge (mesh_bridge/stats.py), from each gateway's newest heartbeat",
    "An edge agent's durable outbox and link, from the stats() counters of its heartbeats "
    "(stamped with the heartbeat's sent_ms; also Prometheus meshwatch_edge_* at the edge).")
DEAD_LETTERS = Measurement(
    "mw_dead_letters", ("component", "instance", "reason"), {"count": "int"},
    "mesh_bridge (mesh_bridge/stats.py)",
    "Cumulative dead letters the bridge published, per instance and reason code "
    "(meshwatch.contract ContractError.reason), its own and those of the gateways it "
    "forwards (component=bridge). The dataflow's rare decode failures (the bridge has "
    "validated everything) are counted only on the dead-letter topic.")
LEDGER = Measurement(
    "mw_ledger", ("hop", "instance"),
    {"received": "int", "forwarded": "int", "duplicates": "int", "dead_letters": "int",
     "dropped": "int"},
    "mesh_bridge/stats.py (hops edge and bridge), the dataflow's sink (hop flow)",
    "The loss ledger of ARCHITECTURE.md: what each hop (edge, bridge, flow) received, "
    "forwarded, de-duplicated, dead-lettered and dropped, in readings, cumulative. The edge "
    "hop has received, dead_letters and dropped (its heartbeats count messages, not "
    "readings, out); the flow's forwarded is what it stored (in order or late).")

ALL: tuple[Measurement, ...] = (TELEMETRY, SILENCE, SCORE, FLOW, ALERT, INCIDENT, KPI,
                                WORK_ORDERS, DISTRICT, BRIDGE, EDGE, DEAD_LETTERS, LEDGER)
