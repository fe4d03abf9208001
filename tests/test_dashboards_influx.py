"""Every panel, variable and annotation query runs on a real influxd and returns data.

The data is what the platform writes: readings go through the dataflow's own ordering
(``ShardState``: de-duplication, gap filling, silence records) and become line protocol by
the InfluxDB sink's ``lines_of``; the other measurements (alerts, incidents, KPIs,
bridge/edge/dead-letter metrics, the ledger) come from ``meshwatch.contract.measurements``.
The lines are loaded through influxd 1.6's v1 ``/write`` and each query is sent to ``/query``
after the substitutions Grafana makes (``$timeFilter``, ``$__interval``, variables).
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from servers import InfluxDB1

from dashboards.boards import all_dashboards
from dashboards.influxql import interpolate
from dataflows.connectors import influx
from dataflows.ordering import Kind, OrderSettings, ShardState
from dataflows.records import DistrictOutput, ShardOutput
from meshwatch.contract import Reading
from meshwatch.contract import measurements as m

MIN = 60_000
NOW = int(time.time() * 1000) // MIN * MIN
T0 = NOW - 3 * 3_600_000  # event time of the first reading
STATS0 = NOW - 2 * 3_600_000  # wall clock of the first counter sample
VARIABLES = {"district": ["d1", "d2"], "device": ["m1", "m2"], "metric": "flow_lpm"}
START, END, INTERVAL = NOW - 6 * 3_600_000, NOW + MIN, "5m"
BOARDS = all_dashboards()


def dataflow_lines() -> list[str]:
    """m1 misses minutes 50-51 (2 imputed points), m2 goes silent at minute 60, m3 is fine;
    m1's reading of minute 30 arrives twice. m1 and m2 are in shard 0, m3 in shard 1."""
    settings = OrderSettings(allowed_lateness_ms=0, gap_fill_max_intervals=4)
    shards = {0: ShardState(settings), 1: ShardState(settings)}
    cadences = dict.fromkeys(("m1", "m2", "m3"), 60.0)
    seqs: Counter[str] = Counter()
    lines = []
    for minute in range(120):
        batches: dict[int, list[Reading]] = {0: [], 1: []}
        for device, shard in (("m1", 0), ("m2", 0), ("m3", 1)):
            if (device == "m1" and minute in (50, 51)) or (device == "m2" and minute >= 60):
                continue
            metrics = {"flow_lpm": 1.0 + minute % 7}
            if device == "m3":
                metrics["pressure_bar"] = 3.2
            reading = Reading(device_id=device, ts_ms=T0 + minute * MIN, seq=seqs[device],
                              metrics=metrics)
            seqs[device] += 1
            batches[shard].append(reading)
            if device == "m1" and minute == 30:
                batches[shard].append(reading)  # a redelivery
        for shard, readings in batches.items():
            released = shards[shard].process(readings, cadences)
            scores = [(p.device_id, p.ts_ms, 0.25) for p in released.points
                      if p.kind is Kind.MEASURED]
            out = ShardOutput(shard, released, dict(shards[shard].counts),
                              STATS0 + minute * MIN + shard)
            lines += influx.lines_of(out)
            detected = DistrictOutput("d1", [], {"scored": len(scores)},
                                      STATS0 + minute * MIN + shard, scores=scores)
            lines += influx.lines_of(detected)
    return lines


ALERTS = [  # (minute, tags, loss, active)
    (60, {"district": "d1", "kind": "leak", "severity": "major", "status": "open",
          "device": "m1"}, 120.0, 1),
    (90, {"district": "d1", "kind": "leak", "severity": "major", "status": "update",
          "device": "m1"}, 150.0, 1),
    (70, {"district": "d1", "kind": "burst", "severity": "critical", "status": "open"},
     3000.0, 1),
    (100, {"district": "d1", "kind": "burst", "severity": "critical", "status": "cleared"},
     0.0, 0),
    (80, {"district": "d2", "kind": "sensor_fault", "severity": "minor", "status": "open",
          "device": "m3"}, 0.0, 1),
]


def future_lines() -> list[str]:
    """The measurements of meshwatch.contract.measurements, as their writers write them."""
    lines = []
    for i, (minute, tags, loss, active) in enumerate(ALERTS):
        ts = T0 + minute * MIN
        lines.append(m.ALERT.line(tags, {
            "alert_id": f"a{i}", "active": active, "score": 0.95, "est_loss_lph": loss,
            "first_ts_ms": ts, "last_ts_ms": ts}, ts))
    for minute, event, kind, incident in ((60, "opened", "leak", "i1"),
                                          (65, "assigned", "leak", "i1"),
                                          (110, "resolved", "leak", "i1"),
                                          (70, "opened", "burst", "i2"),
                                          (100, "false_alarm", "burst", "i2")):
        lines.append(m.INCIDENT.line({"district": "d1", "kind": kind, "event": event}, {
            "incident_id": incident, "work_order_id": f"wo-{incident}", "priority": 2,
            "est_loss_lph": 150.0, "text": f"{kind} incident {incident} {event}"},
            STATS0 + minute * MIN))
    for step in range(12):
        ts = STATS0 + step * 10 * MIN
        lines.append(m.KPI.line({}, {
            "alerts": 3 + step, "remediation_rate": 0.5, "false_alarm_rate": 0.25,
            "mtta_s": 600.0 + step, "mttr_s": 7200.0, "water_saved_m3": 12.5 * step,
            "open_incidents": 1}, ts))
        for state, count in (("resolved", step), ("assigned", 1)):
            lines.append(m.WORK_ORDERS.line({"state": state}, {"count": count}, ts))
    for quarter in range(8):
        for district, base in (("d1", 100.0), ("d2", 50.0)):
            lines.append(m.DISTRICT.line({"district": district}, {
                "inlet_flow_lpm": base + quarter, "customer_flow_lpm": base * 0.9,
                "balance_lpm": base * 0.1 + quarter, "pressure_bar": 3.3},
                T0 + quarter * 15 * MIN))
    for minute in range(120):
        ts = STATS0 + minute * MIN
        lines.append(m.BRIDGE.line({"bridge": "b1"}, {
            "messages_in": minute * 2, "readings_in": minute * 200,
            "readings_forwarded": minute * 199, "duplicates": minute, "late": 0,
            "in_flight": minute % 5, "cloud_connected": 1, "lag_p95_s": 0.25}, ts))
        for gateway in ("gw-1", "gw-2"):
            lines.append(m.EDGE.line({"gateway": gateway}, {
                "queue_depth": minute % 10, "queue_bytes": 1000 * (minute % 10),
                "oldest_queued_age_s": float(minute % 10), "in_flight": 1, "connected": 1,
                "readings_in": minute * 100, "acked": minute, "readings_dropped": 0}, ts))
        for component, instance, reason, per_minute in (
                ("bridge", "b1", "malformed_json", 1), ("bridge", "b1", "invalid_field", 2),
                ("flow", "f1", "missing_field", 1)):
            lines.append(m.DEAD_LETTERS.line(
                {"component": component, "instance": instance, "reason": reason},
                {"count": minute * per_minute}, ts))
        for hop, instance, received, forwarded in (("edge", "gw-1", 100, 100),
                                                   ("edge", "gw-2", 100, 100),
                                                   ("bridge", "b1", 200, 199),
                                                   ("flow", "f1", 199, 199)):
            lines.append(m.LEDGER.line({"hop": hop, "instance": instance}, {
                "received": minute * received, "forwarded": minute * forwarded,
                "duplicates": 0, "dead_letters": minute * (received - forwarded),
                "dropped": 0}, ts))
    return lines


@pytest.fixture(scope="module")
def db(influxdb: InfluxDB1) -> Iterator[str]:
    if not influxdb.running:
        influxdb.start()
    name = f"dashboards_{uuid.uuid4().hex[:8]}"
    influxdb.create_database(name)
    influxdb.write(name, dataflow_lines() + future_lines(), precision="ms")
    yield name
    if influxdb.running:
        influxdb.drop_database(name)


def run(influxdb: InfluxDB1, db: str, query: str) -> list[dict[str, Any]]:
    """The series of one query, run as Grafana would run it."""
    answer = influxdb.query(db, interpolate(query, VARIABLES, START, END, INTERVAL), epoch="ms")
    (result,) = answer["results"]
    series: list[dict[str, Any]] = result.get("series", [])
    return series


def values(series: list[dict[str, Any]], column: str) -> list[Any]:
    return [row[s["columns"].index(column)] for s in series for row in s["values"]
            if row[s["columns"].index(column)] is not None]


def single(influxdb: InfluxDB1, db: str, uid: str, title: str) -> Any:
    """The one value a stat panel shows (the last non-null value of its only series)."""
    panel = next(p for b in BOARDS if b["uid"] == uid for p in b["panels"]
                 if p["title"] == title)
    (series,) = run(influxdb, db, panel["targets"][0]["query"])
    (column,) = [c for c in series["columns"] if c != "time"]
    return values([series], column)[-1]


PANEL_QUERIES = [(b["uid"], p["title"], t["refId"], t["query"]) for b in BOARDS
                 for p in b["panels"] for t in p.get("targets", [])]


@pytest.mark.parametrize(("uid", "title", "ref", "query"), PANEL_QUERIES,
                         ids=[f"{u}:{t}:{r}" for u, t, r, _ in PANEL_QUERIES])
def test_every_panel_query_returns_data(influxdb: InfluxDB1, db: str, uid: str, title: str,
                                        ref: str, query: str) -> None:
    series = run(influxdb, db, query)
    assert series, f"{uid} / {title} ({ref}) returned nothing: {query}"
    data = [v for s in series for row in s["values"] for c, v in zip(s["columns"], row,
                                                                     strict=True)
            if c != "time" and v is not None]
    assert data, f"{uid} / {title} ({ref}) returned only nulls: {query}"


def test_variables_list_what_was_written(influxdb: InfluxDB1, db: str) -> None:
    found = {v["name"]: sorted(values(run(influxdb, db, v["query"]),
                                      "fieldKey" if "FIELD" in v["query"] else "value"))
             for b in BOARDS for v in b["templating"]["list"]}
    assert found == {"district": ["d1", "d2"], "device": ["m1", "m2", "m3"],
                     "metric": ["flow_lpm", "pressure_bar"]}


@pytest.mark.parametrize("board", BOARDS, ids=[b["uid"] for b in BOARDS])
def test_annotations_return_events(influxdb: InfluxDB1, db: str, board: dict[str, Any]
                                   ) -> None:
    for annotation in board["annotations"]["list"]:
        if "target" not in annotation:
            continue  # Grafana's own built-in annotations
        target = annotation["target"]
        series = run(influxdb, db, target["query"])
        assert values(series, "time"), annotation["name"]
        columns = set(series[0]["columns"])
        wanted = {target["textColumn"], *target["tagsColumn"].split(",")}
        assert wanted <= columns, (annotation["name"], wanted - columns)
        assert values(series, target["textColumn"]), annotation["name"]


def test_fleet_figures_are_right(influxdb: InfluxDB1, db: str) -> None:
    assert single(influxdb, db, "mw-fleet", "Active devices") == 3
    assert single(influxdb, db, "mw-fleet", "Silent devices now") == 1  # m2
    assert single(influxdb, db, "mw-fleet", "Active alerts") == 2  # the burst was cleared
    assert single(influxdb, db, "mw-fleet", "Estimated loss now") == 150.0  # the leak's update
    board = next(b for b in BOARDS if b["uid"] == "mw-fleet")
    by_kind = next(p for p in board["panels"] if p["title"] == "Active alerts by kind")
    series = run(influxdb, db, by_kind["targets"][0]["query"])
    assert {s["tags"]["kind"]: s["values"][0][1] for s in series} == {
        "burst": 0, "leak": 1, "sensor_fault": 1}
    rate = next(p for p in board["panels"] if p["title"] == "Ingest rate")
    rates = values(run(influxdb, db, rate["targets"][0]["query"]), "received")
    # 3 readings a minute (2 in shard 0, 1 in shard 1) while m2 reports, 2 after (the last
    # bucket is partial)
    assert any(abs(r - 3 / 60) < 1e-9 for r in rates), rates
    assert any(abs(r - 2 / 60) < 1e-9 for r in rates), rates
    assert all(1.5 / 60 < r < 3.5 / 60 for r in rates[:-1]), rates


def test_district_and_device_figures_are_right(influxdb: InfluxDB1, db: str) -> None:
    assert single(influxdb, db, "mw-district", "Estimated loss now") == 150.0
    assert single(influxdb, db, "mw-device", "Imputed readings") == 2  # minutes 50 and 51
    board = next(b for b in BOARDS if b["uid"] == "mw-device")
    measured, imputed = board["panels"][0]["targets"]
    # at a 1-minute interval, the imputed series has points exactly where m1 was missing
    interval = interpolate(imputed["query"], VARIABLES, START, END, "1m")
    answer = influxdb.query(db, interval, epoch="ms")
    times = [row[0] for s in answer["results"][0]["series"] for row in s["values"]
             if row[1] is not None]
    assert times == [T0 + 50 * MIN, T0 + 51 * MIN]
    assert len(values(run(influxdb, db, measured["query"]), "measured")) > 20


def test_pipeline_ledger_and_counters_are_right(influxdb: InfluxDB1, db: str) -> None:
    board = next(b for b in BOARDS if b["uid"] == "mw-pipeline")
    panels = {p["title"]: p for p in board["panels"]}
    (series,) = run(influxdb, db, panels["Dataflow counters (all shards)"]["targets"][0]
                    ["query"])
    row = dict(zip(series["columns"], series["values"][0], strict=True))
    assert row["received"] == 118 + 60 + 120 + 1  # m1 + m2 + m3 + the redelivery
    assert row["duplicates"] == 1
    assert row["imputed"] == 2
    assert row["silent_onsets"] == 1
    ledger = run(influxdb, db, panels["Loss ledger by hop"]["targets"][0]["query"])
    by_hop = {s["tags"]["hop"]: dict(zip(s["columns"], s["values"][0], strict=True))
              for s in ledger}
    assert by_hop["edge"]["forwarded"] == 2 * 119 * 100  # two gateways
    assert by_hop["bridge"]["received"] - by_hop["bridge"]["forwarded"] == 119
    dead = run(influxdb, db, panels["Dead letters by reason"]["targets"][0]["query"])
    totals = {s["tags"]["reason"]: sum(v for v in values([s], "dead_letters")) for s in dead}
    # differences between 5-minute buckets: what came after the first bucket's last sample
    bucket = 5 * MIN
    first = (STATS0 // bucket * bucket + bucket - 1 - STATS0) // MIN
    assert totals == {"invalid_field": 2 * (119 - first), "malformed_json": 119 - first,
                      "missing_field": 119 - first}


def test_dashboards_read_the_names_the_dataflow_writes() -> None:
    assert (m.TELEMETRY.name, m.SILENCE.name, m.SCORE.name, m.FLOW.name) == (
        influx.TELEMETRY, influx.SILENCE, influx.SCORE, influx.STATS)
    *_, line, ledger = influx.lines_of(ShardOutput(3, ShardState(OrderSettings()).process(
        [], {}), {"received": 5}, 1))
    assert line == "mw_flow,shard=3 received=5i 1"
    assert ledger.startswith("mw_ledger,hop=flow,instance=shard-3 received=5i,forwarded=0i,")
    assert set(m.FLOW.fields) == set(__import__("dataflows.ordering").ordering.COUNTERS)
