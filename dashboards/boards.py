"""The six Meshwatch dashboards, as code: fleet, district, device, alerts, KPIs, pipeline.

Every query is InfluxQL on the measurements of :mod:`meshwatch.contract.measurements` (the ones the
dataflow writes today and the ones defined there for other components). Queries keep to
plain InfluxQL meant for InfluxDB 1.x, 2.x (v1 compatibility API) and 3.x: raw ``SELECT``,
selectors and aggregates, ``GROUP BY time()``, ``fill()``, subqueries, ``SHOW TAG VALUES``
and ``SHOW FIELD KEYS``; no ``SLIMIT``, no time zones, no cardinality metaqueries (which
InfluxDB 3 lacks). The tests run them on InfluxDB 1.6 only.

Cumulative counters (``mw_flow``, ``mw_bridge``...) are per instance (shard, bridge,
gateway): a rate takes ``non_negative_derivative`` per instance in a subquery, then sums
the instances; a current total takes ``last`` per instance, then sums.

>>> [b["uid"] for b in all_dashboards()]
['mw-fleet', 'mw-district', 'mw-device', 'mw-alerts', 'mw-kpis', 'mw-pipeline']
"""

from __future__ import annotations

from dashboards.model import (
    Json,
    annotation,
    bargauge,
    dashboard,
    row,
    stat,
    table,
    target,
    timeseries,
    variable,
)
from meshwatch.contract import measurements as m

__all__ = ["alerts", "all_dashboards", "device", "district", "fleet", "kpis", "pipeline"]

T, SIL, SCORE, FLOW = m.TELEMETRY.name, m.SILENCE.name, m.SCORE.name, m.FLOW.name
ALERT, INCIDENT, KPI, WO = m.ALERT.name, m.INCIDENT.name, m.KPI.name, m.WORK_ORDERS.name
DISTRICT, BRIDGE, EDGE = m.DISTRICT.name, m.BRIDGE.name, m.EDGE.name
DEAD, LEDGER = m.DEAD_LETTERS.name, m.LEDGER.name

_ALERT_KEY = '"district", "device", "kind"'  # one alert (incident) per key


def _rate(measurement: str, field: str, per: str, by: str = "") -> str:
    """Per-second rate of a cumulative counter summed over instances (tag ``per``)."""
    group = f", {by}" if by else ""
    return (f'SELECT sum("r") AS "{field}" FROM (SELECT non_negative_derivative(last("{field}"),'
            f' 1s) AS "r" FROM "{measurement}" WHERE $timeFilter GROUP BY time($__interval), '
            f'"{per}"{group}) GROUP BY time($__interval){group}')


def _total(measurement: str, fields: tuple[str, ...], per: str, by: str = "") -> str:
    """Current value of cumulative counters: ``last`` per instance, summed."""
    inner = ", ".join(f'last("{f}") AS "{f}"' for f in fields)
    outer = ", ".join(f'sum("{f}") AS "{f}"' for f in fields)
    group = f", {by}" if by else ""
    return (f'SELECT {outer} FROM (SELECT {inner} FROM "{measurement}" WHERE $timeFilter '
            f'GROUP BY "{per}"{group}){" GROUP BY " + by if by else ""}')


def _silent_now(where: str = "") -> str:
    return (f'SELECT count("r") AS "silent" FROM (SELECT last("resumed") AS "r" FROM "{SIL}" '
            f'WHERE $timeFilter{where} GROUP BY "device") WHERE "r" = 0')


def _loss_now(where: str = "") -> str:
    return (f'SELECT sum("l") AS "est_loss_lph" FROM (SELECT last("est_loss_lph") AS "l" '
            f'FROM "{ALERT}" WHERE $timeFilter{where} GROUP BY {_ALERT_KEY})')


def _active_alerts(where: str = "", by: str = "") -> str:
    return (f'SELECT sum("a") AS "active" FROM (SELECT last("active") AS "a" FROM "{ALERT}" '
            f'WHERE $timeFilter{where} GROUP BY {_ALERT_KEY}){" GROUP BY " + by if by else ""}')


def _alert_table(where: str = "") -> str:
    return (f'SELECT "alert_id", "kind", "severity", "status", "district", "device", "score", '
            f'"est_loss_lph" FROM "{ALERT}" WHERE $timeFilter{where} ORDER BY time DESC '
            f'LIMIT 500')


def _alert_annotation(where: str = "") -> Json:
    return annotation("Alerts opened",
                      f'SELECT "alert_id", "kind", "severity", "device", "district" FROM '
                      f'"{ALERT}" WHERE "status" = \'open\'{where} AND $timeFilter',
                      color="red", text="alert_id", tags=("kind", "severity", "device"))


def fleet() -> Json:
    """Fleet overview: ingest rate, active and silent devices, alerts by kind, loss."""
    return dashboard("mw-fleet", "Meshwatch / Fleet overview", [
        stat("Active devices", [target(
            f'SELECT count("n") AS "devices" FROM (SELECT count("flow_lpm") AS "n" FROM '
            f'"{T}" WHERE $timeFilter AND "imputed" = \'false\' GROUP BY "device")')],
            description="Devices with at least one measured flow_lpm reading in the range."),
        stat("Silent devices now", [target(_silent_now())],
             description="Devices whose last silence record is an onset (no resumption yet)."),
        stat("Active alerts", [target(_active_alerts())],
             description="Alerts whose last event is open or update (not cleared)."),
        stat("Estimated loss now", [target(_loss_now())], unit="litre/h",
             description="Sum of est_loss_lph of the alerts still active."),
        timeseries("Ingest rate", [target(_rate(FLOW, "received", "shard"),
                                          alias="readings/s")],
                   unit="reqps", description="Readings entering the dataflow per second "
                   "(mw_flow.received, all shards)."),
        timeseries("Alerts opened by kind", [target(
            f'SELECT count("score") AS "alerts" FROM "{ALERT}" WHERE $timeFilter AND '
            f'"status" = \'open\' GROUP BY time($__interval), "kind" fill(0)',
            alias="$tag_kind")], bars=True),
        bargauge("Active alerts by kind", [target(_active_alerts(by='"kind"'),
                                                  alias="$tag_kind")]),
        timeseries("Estimated loss by kind", [target(
            f'SELECT sum("l") AS "loss" FROM (SELECT last("est_loss_lph") AS "l" FROM '
            f'"{ALERT}" WHERE $timeFilter GROUP BY time($__interval), {_ALERT_KEY} '
            f'fill(previous)) GROUP BY time($__interval), "kind"', alias="$tag_kind")],
            unit="litre/h", bars=True),
    ], description="The whole fleet at a glance.", tags=["fleet"],
        annotations=[_alert_annotation()])


def district() -> Json:
    """One or more districts (DMAs): inlet vs customers, water balance, pressure, alerts."""
    where = ' AND "district" =~ /^$district$/'
    by = 'time($__interval), "district"'
    return dashboard("mw-district", "Meshwatch / District", [
        stat("Estimated loss now", [target(_loss_now(where))], unit="litre/h"),
        stat("Active alerts", [target(_active_alerts(where))]),
        timeseries("Inlet flow vs customer meters", [
            target(f'SELECT mean("inlet_flow_lpm") AS "inlet" FROM "{DISTRICT}" WHERE '
                   f'$timeFilter{where} GROUP BY {by}', alias="$tag_district inlet"),
            target(f'SELECT mean("customer_flow_lpm") AS "customers" FROM "{DISTRICT}" WHERE '
                   f'$timeFilter{where} GROUP BY {by}', alias="$tag_district customers")],
            unit="litre/min", width=24),
        timeseries("Water balance (inlet - customers)", [target(
            f'SELECT mean("balance_lpm") AS "balance" FROM "{DISTRICT}" WHERE '
            f'$timeFilter{where} GROUP BY {by}', alias="$tag_district")], unit="litre/min",
            description="Water the customer meters do not account for: leaks, theft, "
            "meter under-registration."),
        timeseries("Daily minimum inlet flow", [target(
            f'SELECT min("inlet_flow_lpm") AS "min_flow" FROM "{DISTRICT}" WHERE '
            f'$timeFilter{where} GROUP BY time(1d), "district"', alias="$tag_district")],
            unit="litre/min", description="The minimum night flow rises under a leak."),
        timeseries("Inlet pressure", [target(
            f'SELECT mean("pressure_bar") AS "pressure" FROM "{DISTRICT}" WHERE '
            f'$timeFilter{where} GROUP BY {by}', alias="$tag_district")], unit="pressurebar"),
        timeseries("Alerts opened by kind", [target(
            f'SELECT count("score") AS "alerts" FROM "{ALERT}" WHERE $timeFilter{where} AND '
            f'"status" = \'open\' GROUP BY time($__interval), "kind" fill(0)',
            alias="$tag_kind")], bars=True),
        table("Alerts", [target(_alert_table(where))]),
    ], description="District metered areas: balance, night flow, pressure and alerts.",
        tags=["district"],
        variables=[variable("district", f'SHOW TAG VALUES FROM "{DISTRICT}" WITH KEY = '
                            f'"district"', label="District", multi=True, include_all=True)],
        annotations=[_alert_annotation(where)])


def device() -> Json:
    """One device: a metric with imputed points marked, scores, silences and alerts."""
    where = ' AND "device" =~ /^$device$/'
    imputed_points = {
        "matcher": {"id": "byRegexp", "options": ".*imputed.*"},
        "properties": [
            {"id": "custom.drawStyle", "value": "points"},
            {"id": "custom.pointSize", "value": 7},
            {"id": "color", "value": {"mode": "fixed", "fixedColor": "orange"}}]}
    by = 'time($__interval), "device"'
    return dashboard("mw-device", "Meshwatch / Device", [
        timeseries("$metric: measured and imputed", [
            target(f'SELECT mean("$metric") AS "measured" FROM "{T}" WHERE $timeFilter{where} '
                   f'AND "imputed" = \'false\' GROUP BY {by}', alias="$tag_device measured"),
            target(f'SELECT mean("$metric") AS "imputed" FROM "{T}" WHERE $timeFilter{where} '
                   f'AND "imputed" = \'true\' GROUP BY {by}', alias="$tag_device imputed")],
            width=24, overrides=[imputed_points],
            description="Imputed points (gaps filled by interpolation) are orange dots; "
            "they are never counted as measured."),
        timeseries("Anomaly score", [target(
            f'SELECT max("score") AS "score" FROM "{SCORE}" WHERE $timeFilter{where} '
            f'GROUP BY {by}', alias="$tag_device")], unit="percentunit"),
        stat("Imputed readings", [target(
            f'SELECT count("$metric") AS "imputed" FROM "{T}" WHERE $timeFilter{where} AND '
            f'"imputed" = \'true\'')], description="Imputed readings of $metric in the range."),
        stat("Silences", [target(
            f'SELECT count("missed") AS "silences" FROM "{SIL}" WHERE $timeFilter{where} AND '
            f'"resumed" = 0')]),
        table("Silence records", [target(
            f'SELECT "device", "missed", "last_seen_ms", "resumed" FROM "{SIL}" WHERE '
            f'$timeFilter{where} ORDER BY time DESC LIMIT 200')], width=12),
        table("Alerts", [target(_alert_table(where))], width=12),
    ], description="One device's readings; imputed points are marked.", tags=["device"],
        variables=[
            variable("device", f'SHOW TAG VALUES FROM "{T}" WITH KEY = "device"',
                     label="Device", multi=True),
            variable("metric", f'SHOW FIELD KEYS FROM "{T}"', label="Metric")],
        annotations=[
            _alert_annotation(where),
            annotation("Silence onsets",
                       f'SELECT "missed", "device" FROM "{SIL}" WHERE "resumed" = 0{where} '
                       f'AND $timeFilter', color="orange", text="missed", tags=("device",))])


def alerts() -> Json:
    """Alerts and incidents, with both as annotations."""
    where = ' AND "district" =~ /^$district$/'
    return dashboard("mw-alerts", "Meshwatch / Alerts and incidents", [
        stat("Active alerts", [target(_active_alerts(where))]),
        stat("Estimated loss now", [target(_loss_now(where))], unit="litre/h"),
        stat("Incidents opened", [target(
            f'SELECT count("incident_id") AS "opened" FROM "{INCIDENT}" WHERE '
            f'$timeFilter{where} AND "event" = \'opened\'')]),
        stat("Incidents closed", [target(
            f'SELECT count("incident_id") AS "closed" FROM "{INCIDENT}" WHERE $timeFilter'
            f'{where} AND "event" =~ /^(resolved|false_alarm|cancelled)$/')]),
        timeseries("Alerts opened by severity", [target(
            f'SELECT count("score") AS "alerts" FROM "{ALERT}" WHERE $timeFilter{where} AND '
            f'"status" = \'open\' GROUP BY time($__interval), "severity" fill(0)',
            alias="$tag_severity")], bars=True),
        timeseries("Incident events", [target(
            f'SELECT count("incident_id") AS "events" FROM "{INCIDENT}" WHERE $timeFilter'
            f'{where} GROUP BY time($__interval), "event" fill(0)', alias="$tag_event")],
            bars=True),
        table("Alerts", [target(_alert_table(where))]),
        table("Incident events", [target(
            f'SELECT "incident_id", "event", "kind", "district", "work_order_id", "priority", '
            f'"est_loss_lph", "text" FROM "{INCIDENT}" WHERE $timeFilter{where} '
            f'ORDER BY time DESC LIMIT 500')]),
    ], description="Alerts from the dataflow and the incidents remediation made of them.",
        tags=["alerts"],
        variables=[variable("district", f'SHOW TAG VALUES FROM "{ALERT}" WITH KEY = '
                            f'"district"', label="District", multi=True, include_all=True)],
        annotations=[
            _alert_annotation(where),
            annotation("Incidents", f'SELECT "text", "event", "incident_id" FROM "{INCIDENT}"'
                       f' WHERE $timeFilter{where}', color="purple", text="text",
                       tags=("event", "incident_id"))])


def kpis() -> Json:
    """Remediation KPIs: rates, MTTA/MTTR, water saved, work orders by state."""
    def last(field: str) -> str:
        return f'SELECT last("{field}") AS "{field}" FROM "{KPI}" WHERE $timeFilter'

    def trend(field: str) -> str:
        return (f'SELECT last("{field}") AS "{field}" FROM "{KPI}" WHERE $timeFilter '
                f'GROUP BY time($__interval) fill(none)')

    return dashboard("mw-kpis", "Meshwatch / Remediation KPIs", [
        stat("Remediation rate", [target(last("remediation_rate"))], unit="percentunit",
             description="Alerts whose incident ended in a confirmed repair / alerts."),
        stat("False-alarm rate", [target(last("false_alarm_rate"))], unit="percentunit",
             description="Work orders closed as false alarms / closed work orders."),
        stat("MTTA", [target(last("mtta_s"))], unit="s",
             description="Mean time from work order to acknowledgement."),
        stat("MTTR", [target(last("mttr_s"))], unit="s",
             description="Mean time from work order to resolution."),
        stat("Water saved", [target(last("water_saved_m3"))], unit="m3",
             description="Loss rate x (horizon - time to repair), summed over repairs."),
        stat("Open incidents", [target(last("open_incidents"))]),
        stat("Alerts received", [target(last("alerts"))]),
        timeseries("Remediation and false-alarm rates", [
            target(trend("remediation_rate"), alias="remediation rate"),
            target(trend("false_alarm_rate"), alias="false-alarm rate")], unit="percentunit"),
        timeseries("MTTA and MTTR", [target(trend("mtta_s"), alias="MTTA"),
                                     target(trend("mttr_s"), alias="MTTR")], unit="s"),
        bargauge("Work orders by state", [target(
            f'SELECT last("count") AS "work_orders" FROM "{WO}" WHERE $timeFilter GROUP BY '
            f'"state"', alias="$tag_state")], width=24),
    ], description="How well alerts turn into repairs.", tags=["remediation"],
        time_from="now-7d", refresh="5m")


def pipeline() -> Json:
    """Pipeline health: lag, dead letters by reason, edge queues, the loss ledger."""
    counters = ("received", "duplicates", "measured", "late", "unverified", "imputed",
                "gaps_filled", "silent_onsets", "long_gaps")
    ledger = ("received", "forwarded", "duplicates", "dead_letters", "dropped")
    return dashboard("mw-pipeline", "Meshwatch / Pipeline health", [
        row("Lag and queues"),
        timeseries("Bridge lag (p95)", [target(
            f'SELECT max("lag_p95_s") AS "lag" FROM "{BRIDGE}" WHERE $timeFilter GROUP BY '
            f'time($__interval), "bridge"', alias="$tag_bridge")], unit="s",
            description="Receive time at the bridge - the batch's sent_ms."),
        timeseries("Edge outbox: oldest queued message", [target(
            f'SELECT max("oldest_queued_age_s") AS "age" FROM "{EDGE}" WHERE $timeFilter '
            f'GROUP BY time($__interval), "gateway"', alias="$tag_gateway")], unit="s"),
        timeseries("Edge queue depth", [target(
            f'SELECT max("queue_depth") AS "queue_depth" FROM "{EDGE}" WHERE $timeFilter '
            f'GROUP BY time($__interval), "gateway"', alias="$tag_gateway")],
            description="Messages in each gateway's durable outbox."),
        timeseries("Bridge in flight", [target(
            f'SELECT max("in_flight") AS "in_flight" FROM "{BRIDGE}" WHERE $timeFilter '
            f'GROUP BY time($__interval), "bridge"', alias="$tag_bridge")]),
        row("Dead letters"),
        timeseries("Dead letters by reason", [target(
            f'SELECT sum("n") AS "dead_letters" FROM (SELECT non_negative_difference('
            f'last("count")) AS "n" FROM "{DEAD}" WHERE $timeFilter GROUP BY '
            f'time($__interval), "component", "instance", "reason") GROUP BY '
            f'time($__interval), "reason"', alias="$tag_reason")], bars=True),
        bargauge("Dead letters in range, by component and reason", [target(
            f'SELECT sum("n") AS "dead_letters" FROM (SELECT spread("count") AS "n" FROM '
            f'"{DEAD}" WHERE $timeFilter GROUP BY "component", "instance", "reason") '
            f'GROUP BY "component", "reason"', alias="$tag_component $tag_reason")]),
        row("Dataflow"),
        timeseries("Dataflow in and out", [
            target(_rate(FLOW, "received", "shard"), alias="received/s"),
            target(_rate(FLOW, "duplicates", "shard"), alias="duplicates/s"),
            target(_rate(FLOW, "late", "shard"), alias="late/s"),
            target(_rate(FLOW, "imputed", "shard"), alias="imputed/s")], unit="reqps"),
        table("Dataflow counters (all shards)", [target(_total(FLOW, counters, "shard"))],
              width=12),
        row("Loss ledger"),
        table("Loss ledger by hop", [target(_total(LEDGER, ledger, "instance", '"hop"'))],
              description="Per hop, what it received, forwarded, de-duplicated, "
              "dead-lettered and dropped; readings are lost between hops where one hop's "
              "forwarded exceeds the next hop's received.", width=12),
        timeseries("Ledger: forwarded per second by hop", [target(
            _rate(LEDGER, "forwarded", "instance", '"hop"'), alias="$tag_hop")],
            unit="reqps", width=12),
    ], description="Is every reading getting through, and how fast?", tags=["pipeline"])


def all_dashboards() -> list[Json]:
    """The six dashboards, in menu order."""
    return [fleet(), district(), device(), alerts(), kpis(), pipeline()]
