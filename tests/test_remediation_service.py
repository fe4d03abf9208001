"""The remediation service against real mosquitto: intake, dead letters, API auth, restarts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from remediation_support import (
    T0,
    TOKENS,
    Recorder,
    alert,
    count,
    publish_all,
    publisher,
    service_config,
    wait_for,
)
from servers import Mosquitto, free_port

from meshwatch.contract import DeadLetter, Feedback, decode, encode, topics
from remediation.command import Service
from remediation.db import AlertRow, WorkOrderRow, make_engine


@pytest.fixture(params=["5", "3.1.1"])  # 3.1.1: brokers without MQTT 5 (the demo's amqtt)
def service(request: pytest.FixtureRequest, tmp_path: Path,
            mosquitto: Mosquitto) -> Iterator[Service]:
    config = service_config(tmp_path, f"sqlite:///{tmp_path / 'r.db'}", mosquitto.url,
                            free_port(), protocol=request.param)
    svc = Service(config).start()
    wait_for(lambda: svc.intake.connected, what="intake connected")
    yield svc
    svc.stop()


def test_intake_api_auth_and_feedback(service: Service, mosquitto: Mosquitto) -> None:
    recorder = Recorder(mosquitto, "mw/v1/deadletter/#", "mw/v1/feedback/#", "mw/v1/crews/#")
    pub = publisher(mosquitto)
    good = [alert("a-1", device_id="mtr-1"), alert("a-2", district="dma-02", device_id="mtr-2")]
    messages = [(topics.alerts(a.district or "", a.kind.value), encode(a)) for a in good]
    messages += [(topics.alerts("dma-01", "leak"), b'{"type": "alert", "alert_id": "x"'),
                 (topics.alerts("dma-01", "leak"), encode(alert("a-3")).replace(
                     b'"alert"', b'"feedback"', 1)),
                 (topics.alerts("dma-01", "leak"), json.dumps(
                     {"type": "alert", "alert_id": "no-subject", "kind": "leak",
                      "severity": "minor", "score": 0.5, "first_ts_ms": T0, "last_ts_ms": T0,
                      "model_version": "m"}).encode())]
    publish_all(pub, messages + messages[:2])  # the good ones twice: redelivery
    wait_for(lambda: len(recorder.on("mw/v1/deadletter/")) >= 3, what="dead letters")
    wait_for(lambda: service.intake.stored + service.intake.duplicates >= 4, what="intake")
    assert count(service.engine, WorkOrderRow) == 2
    reasons = sorted(decode(p, DeadLetter).reason for _, p in recorder.on("mw/v1/deadletter/"))
    assert reasons == ["invalid_field", "malformed_json", "wrong_type"]
    letter = decode(recorder.on("mw/v1/deadletter/malformed_json")[0][1], DeadLetter)
    assert letter.source_topic == "mw/v1/alerts/dma-01/leak"
    assert letter.detail
    wait_for(lambda: len(recorder.on("mw/v1/crews/crew-a/")) == 1, what="crew-a notified")
    assert len(recorder.on("mw/v1/crews/crew-b/")) == 1

    base = f"http://127.0.0.1:{service.config.remediation.http_port}"
    api = httpx.Client(base_url=base, timeout=10)

    def auth(who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKENS[who]}"}

    assert api.get("/api/v1/work-orders").status_code == 401
    assert api.get("/api/v1/work-orders", headers={"Authorization": "Bearer nope"}
                   ).status_code == 401
    assert api.get("/healthz").json()["status"] == "ok"
    everything = api.get("/api/v1/work-orders", headers=auth("operator")).json()
    assert everything["total"] == 2
    mine = api.get("/api/v1/work-orders", headers=auth("crew-a")).json()
    assert [wo["crew_id"] for wo in mine["items"]] == ["crew-a"]
    wid = mine["items"][0]["work_order_id"]
    other = next(wo["work_order_id"] for wo in everything["items"] if wo["crew_id"] == "crew-b")
    assert api.get(f"/api/v1/work-orders/{other}", headers=auth("crew-a")).status_code == 404
    steal = api.post(f"/api/v1/work-orders/{other}/transitions", headers=auth("crew-a"),
                     json={"state": "acknowledged"})
    assert steal.status_code == 404
    assert api.get("/api/v1/incidents", headers=auth("crew-a")).status_code == 403
    bad = api.post(f"/api/v1/work-orders/{wid}/transitions", headers=auth("crew-a"),
                   json={"state": "resolved", "outcome": "confirmed_leak"})
    assert bad.status_code == 409
    assert "cannot go from assigned to resolved" in bad.json()["detail"]
    assert api.post(f"/api/v1/work-orders/{wid}/transitions", headers=auth("crew-a"),
                    json={"state": "teleported"}).status_code == 422
    page = api.get("/api/v1/work-orders", headers=auth("operator"),
                   params={"limit": 1, "offset": 1, "district": "dma-02"}).json()
    assert (page["total"], len(page["items"])) == (1, 0)
    for state in ("acknowledged", "in_progress"):
        r = api.post(f"/api/v1/work-orders/{wid}/transitions", headers=auth("crew-a"),
                     json={"state": state})
        assert r.status_code == 200, r.text
    r = api.post(f"/api/v1/work-orders/{wid}/transitions", headers=auth("crew-a"),
                 json={"state": "resolved", "outcome": "confirmed_leak", "note": "fixed"})
    assert r.json()["state"] == "resolved"
    wait_for(lambda: len(recorder.on("mw/v1/feedback/dma-01")) == 1, what="feedback")
    feedback = decode(recorder.on("mw/v1/feedback/dma-01")[0][1], Feedback)
    assert (feedback.work_order_id, feedback.alert_ids, feedback.outcome.value) == (
        wid, ["a-1"], "confirmed_leak")
    kpis = api.get("/api/v1/kpis", headers=auth("operator")).json()
    assert kpis["remediation_rate"] == 0.5
    assert kpis["water_saved_m3"] > 0
    metrics = api.get("/metrics").text
    assert "mw_remediation_remediation_rate 0.5" in metrics
    assert "/api/v1/work-orders" in api.get("/openapi.json").text
    pub.loop_stop()
    recorder.close()


def _config_file(tmp_path: Path, db: str, broker: Mosquitto, port: int) -> Path:
    path = tmp_path / "remediation.toml"
    path.write_text(f'log_level = "WARNING"\n[database]\nurl = "{db}"\n'
                    f'[mesh_broker]\nurl = "{broker.url}"\n'
                    f'[remediation]\nhttp_port = {port}\nbatch_max = 50\n')
    return path


def _consuming(port: int) -> bool:
    """Whether the service answers /healthz with its intake connected (and so subscribed)."""
    try:
        return bool(httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).json()
                    .get("intake_connected"))
    except (httpx.HTTPError, ValueError):
        return False


def _start(config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "meshwatch.cli", "remediation", "--config",
                             str(config)], stderr=subprocess.PIPE,
                            env=os.environ | {"PYTHONUNBUFFERED": "1"})


def test_killed_mid_processing_loses_nothing(tmp_path: Path, mosquitto: Mosquitto) -> None:
    db = f"sqlite:///{tmp_path / 'r.db'}"
    port = free_port()
    config = _config_file(tmp_path, db, mosquitto, port)
    engine = make_engine(db)
    proc = _start(config)
    try:
        wait_for(lambda: _consuming(port), 30, "the service consuming")
        time.sleep(0.3)  # the SUBSCRIBE went out right after the connection
        n = 3000
        pub = publisher(mosquitto)
        alerts = [alert(f"k-{i}", district=f"dma-{i % 50:02d}", device_id=f"m-{i}",
                        ts=T0 + i) for i in range(n)]
        sender = threading.Thread(target=publish_all, args=(pub, [
            (topics.alerts(a.district or "", "leak"), encode(a)) for a in alerts]))
        sender.start()  # killed while alerts still arrive, however fast the service stores
        wait_for(lambda: _stored(engine) >= 300, 30, "some alerts stored")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        sender.join(60)
        partial = _stored(engine)
        assert partial < n, "killed too late to test anything"
        publish_all(pub, [(topics.alerts(a.district or "", "leak"), encode(a))
                          for a in alerts[:100]])  # and some redelivered on top
        proc = _start(config)
        wait_for(lambda: _stored(engine) == n, 60, "every alert stored after the restart")
        time.sleep(0.5)
        assert count(engine, WorkOrderRow) == n  # one per device-level leak, none twice
        pub.loop_stop()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        engine.dispose()


def _stored(engine) -> int:
    try:
        return count(engine, AlertRow)
    except Exception:
        return -1


def test_command_refuses_a_config_it_cannot_run(tmp_path: Path, capsys) -> None:
    from meshwatch.cli import main

    path = tmp_path / "c.toml"
    path.write_text('[remediation]\nsla_ack_s = [1, 2]\n')
    assert main(["remediation", "--config", str(path)]) == 2
    assert "give 4 positive seconds" in capsys.readouterr().err
    path.write_text('[database]\nurl = "sqlite:///' + str(tmp_path / "x.db") + '"\n')
    assert main(["remediation", "--config", str(path)]) == 2  # embedded:// broker
    assert "needs a real broker" in capsys.readouterr().err
