"""Remediation writes mw_incident, mw_kpi and mw_work_orders to a real VictoriaMetrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from remediation_support import (
    T0,
    TOKENS,
    alert,
    count,
    publish_all,
    publisher,
    service_config,
    wait_for,
)
from servers import Mosquitto, VictoriaMetrics, free_port
from sqlalchemy import update
from sqlalchemy.orm import Session

from meshwatch.config import InfluxConfig
from meshwatch.contract import encode, topics
from meshwatch.contract.measurements import INCIDENT, KPI, WORK_ORDERS
from remediation.command import Service
from remediation.db import AlertRow, IncidentRow, OutboxRow, WorkOrderRow
from remediation.influx import CHANNEL, incident_line, kpi_lines
from remediation.kpi import compute


def _incidents(vm: VictoriaMetrics, n: int) -> set[tuple[str, str, int, float]]:
    """(district, event, ts_ms, priority) of every mw_incident point (distinct)."""
    series = vm.wait_for_samples('{__name__="mw_incident_priority"}', n)
    return {(s["metric"]["district"], s["metric"]["event"], ts, v) for s in series
            for ts, v in zip(s["timestamps"], s["values"], strict=True)}


def _newest(vm: VictoriaMetrics, name: str) -> dict[str, float]:
    """The newest value of each series of ``name``, by its ``state`` label ('' if none)."""
    vm.force_flush()
    return {s["metric"].get("state", ""): max(zip(s["timestamps"], s["values"],
                                                  strict=True))[1]
            for s in vm.export(f'{{__name__="{name}"}}')}


def test_incident_events_and_kpis(tmp_path: Path, mosquitto: Mosquitto,
                                  victoria_metrics: VictoriaMetrics) -> None:
    vm = victoria_metrics
    config = service_config(tmp_path, f"sqlite:///{tmp_path / 'r.db'}", mosquitto.url,
                            free_port(), influx_kpi_s=0.3)
    config = config.model_copy(update={"influxdb": InfluxConfig(
        url=vm.url, org="mw", bucket="mw", token="t")})
    vm.stop()  # InfluxDB down: intake goes on, the writer retries
    svc = Service(config).start()
    try:
        wait_for(lambda: svc.intake.connected, what="intake connected")
        writer = svc.influx
        assert writer is not None
        pub = publisher(mosquitto)
        first = [alert("a-1", device_id="mtr-1", loss=100.0),
                 alert("a-2", district="dma-02", device_id="mtr-2", loss=50.0)]
        publish_all(pub, [(topics.alerts(a.district or "", a.kind.value), encode(a))
                          for a in first])
        wait_for(lambda: count(svc.engine, WorkOrderRow, WorkOrderRow.state == "assigned") == 2,
                 what="work orders assigned while InfluxDB is down")
        wait_for(lambda: writer.retries >= 2, what="writes retried")
        assert count(svc.engine, OutboxRow, OutboxRow.channel == CHANNEL,
                     OutboxRow.sent_ms.is_(None)) == 4  # opened + assigned, twice
        vm.start()

        worse = alert("a-3", device_id="mtr-1", severity="major", loss=400.0, ts=T0 + 60_000)
        publish_all(pub, [(topics.alerts("dma-01", "leak"), encode(worse))])
        wait_for(lambda: count(svc.engine, AlertRow) == 3, what="third alert")

        api = httpx.Client(base_url=f"http://127.0.0.1:{config.remediation.http_port}",
                           timeout=10)

        def move(who: str, district: str, state: str, **body: str) -> None:
            headers = {"Authorization": f"Bearer {TOKENS[who]}"}
            items = api.get("/api/v1/work-orders", headers=headers).json()["items"]
            wid = next(wo["work_order_id"] for wo in items if wo["district"] == district)
            r = api.post(f"/api/v1/work-orders/{wid}/transitions", headers=headers,
                         json={"state": state, **body})
            assert r.status_code == 200, r.text

        for state in ("acknowledged", "in_progress"):
            move("crew-a", "dma-01", state)
        move("crew-a", "dma-01", "resolved", outcome="confirmed_leak", note="fixed")
        move("crew-b", "dma-02", "acknowledged")
        move("crew-b", "dma-02", "false_alarm", note="nothing there")

        wait_for(lambda: count(svc.engine, OutboxRow, OutboxRow.channel == CHANNEL,
                               OutboxRow.sent_ms.is_(None)) == 0, what="outbox written")
        points = _incidents(vm, 7)
        with Session(svc.engine) as session:
            rows = list(session.query(OutboxRow).filter(OutboxRow.channel == CHANNEL)
                        .order_by(OutboxRow.id))
            orders = {wo.district: wo for wo in session.query(WorkOrderRow)}
            incidents = {i.district: i for i in session.query(IncidentRow)}
        lines = [row.payload.decode() for row in rows]
        events = [(line.split(",")[1].split("=")[1], line.split(",event=")[1].split(",")[0])
                  for line in lines]
        assert sorted(events) == sorted([
            ("dma-01", "opened"), ("dma-01", "assigned"), ("dma-01", "escalated"),
            ("dma-01", "resolved"), ("dma-02", "opened"), ("dma-02", "assigned"),
            ("dma-02", "false_alarm")])
        stamps = [int(line.rsplit(" ", 1)[1]) for line in lines]
        assert len(set(stamps)) == 7  # one ms each: no point overwrites another
        assert {(d, e, ts) for d, e, ts, _ in points} == {
            (d, e, ts) for (d, e), ts in zip(events, stamps, strict=True)}
        priority = {(d, e): v for d, e, _, v in points}
        assert priority[("dma-01", "resolved")] == orders["dma-01"].priority
        assert priority[("dma-02", "false_alarm")] == orders["dma-02"].priority
        assert priority[("dma-01", "escalated")] <= priority[("dma-01", "opened")]
        # every line is exactly what meshwatch/contract/measurements.py defines
        resolved = next(line for line in lines if ",event=resolved," in line)
        ts = int(resolved.rsplit(" ", 1)[1])
        assert resolved == incident_line("resolved", incidents["dma-01"], orders["dma-01"],
                                         resolved.split('text="')[1].rsplit('"', 1)[0], ts)
        assert resolved.startswith("mw_incident,district=dma-01,event=resolved,kind=leak ")
        assert 'text="resolved: leak major in dma-01 at mtr-1' in resolved
        vm.force_flush()
        loss = {(s["metric"]["district"], s["metric"]["event"]): s["values"]
                for s in vm.export('{__name__="mw_incident_est_loss_lph"}')}
        assert loss[("dma-01", "opened")] == [100.0]
        assert loss[("dma-01", "escalated")] == [400.0]
        assert loss[("dma-02", "false_alarm")] == [50.0]

        # the KPI snapshots: what kpi.compute() says now
        want = compute(svc.engine)
        assert (want["alerts"], want["remediation_rate"], want["false_alarm_rate"]) == (
            3, 2 / 3, 0.5)

        def kpis_now() -> bool:
            kpi = {name: _newest(vm, f"mw_kpi_{name}").get("") for name in KPI.fields}
            states = _newest(vm, "mw_work_orders_count")
            return kpi == {name: None if want[name] is None else pytest.approx(want[name],
                                                                                rel=1e-9)
                           for name in KPI.fields} and states == {
                "open": 0, "assigned": 0, "acknowledged": 0, "in_progress": 0,
                "resolved": 1, "false_alarm": 1, "cancelled": 0}

        wait_for(kpis_now, timeout=10, what="KPI snapshot in VictoriaMetrics")
        assert writer.snapshots >= 2

        # a re-send (a crash between the write and mark_sent) writes the same points again
        with Session(svc.engine) as session, session.begin():
            session.execute(update(OutboxRow).where(OutboxRow.channel == CHANNEL)
                            .values(sent_ms=None))
        wait_for(lambda: writer.events >= 14, what="re-sent")
        assert _incidents(vm, 7) == points
        pub.loop_stop()
    finally:
        svc.stop()


def test_lines_match_the_dashboards_definitions() -> None:
    kpis: dict[str, Any] = {"alerts": 2, "remediation_rate": 0.5, "false_alarm_rate": None,
                            "mtta_s": 1.5, "mttr_s": 30, "water_saved_m3": 0.0,
                            "open_incidents": 1, "work_orders": {"resolved": 1, "open": 1}}
    assert kpi_lines(kpis, T0) == [
        KPI.line({}, {"alerts": 2, "remediation_rate": 0.5, "mtta_s": 1.5, "mttr_s": 30,
                      "water_saved_m3": 0.0, "open_incidents": 1}, T0),
        WORK_ORDERS.line({"state": "open"}, {"count": 1}, T0),
        WORK_ORDERS.line({"state": "resolved"}, {"count": 1}, T0)]
    incident = IncidentRow(incident_id="inc-1", district="dma 1", kind="leak",
                           est_loss_lph=None)
    wo = WorkOrderRow(work_order_id="wo-1", priority=2)
    line = incident_line("opened", incident, wo, 'a "b"\nc', T0)
    assert line == INCIDENT.line({"district": "dma 1", "kind": "leak", "event": "opened"},
                                 {"incident_id": "inc-1", "work_order_id": "wo-1",
                                  "priority": 2, "text": 'a "b" c'}, T0)
    assert "\n" not in line
