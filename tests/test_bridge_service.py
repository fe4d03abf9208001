"""The bridge service against two real mosquitto brokers (site and cloud), with faults."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from bridge_support import DEVICES, GATEWAYS, P, healthz, spawn_bridge, write_config
from mqtt_ledger import Ledger, wait_until
from paho.mqtt.enums import CallbackAPIVersion
from servers import Mosquitto, Pki, free_port

from edge_agent.publisher import TlsOptions, parse_broker_url
from mesh_bridge.command import bridge_settings, serve_healthz
from mesh_bridge.routing import RouterSpec
from mesh_bridge.shell import Bridge, BridgeSettings, CloudLink, Liveness, SiteBroker
from meshwatch.config import load_config
from meshwatch.contract import (
    Alert,
    DeadLetter,
    DeviceStatus,
    EdgeScore,
    Reading,
    TelemetryBatch,
    WindowScore,
    encode,
    topics,
)
from meshwatch.registry import Registry

T0 = 1_767_225_600_000
EXPECT_WAIT_S = 30.0

Outgoing = tuple[str, bytes]


class TopicLedger(Ledger):
    """A ledger that also keeps (topic, event) pairs, to check partitions and dead letters."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.by_topic: list[tuple[str, object]] = []
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        super()._on_message(client, userdata, msg)
        with self._lock:
            self.by_topic.append((msg.topic, self.events[-1]))


def birth(gw: str) -> Outgoing:
    status = DeviceStatus(site="s1", gateway_id=gw, state="birth", sent_ms=T0,
                          devices=DEVICES[gw])
    return topics.site_status("s1", gw), encode(status)


def telemetry(gw: str, seq: int, devices: list[str] | None = None) -> Outgoing:
    readings = [Reading(device_id=d, ts_ms=T0 + seq * 1000, seq=seq, metrics={"flow_lpm": 1.0})
                for d in (devices or DEVICES[gw])]
    batch = TelemetryBatch(site="s1", gateway_id=gw, sent_ms=T0 + seq * 1000, readings=readings)
    return topics.site_telemetry("s1", gw), encode(batch)


def expected(seqs: range) -> set[tuple[str, int]]:
    return {(d, s) for gw in GATEWAYS for d in DEVICES[gw] for s in seqs}


def stream(seqs: range) -> list[Outgoing]:
    return [telemetry(gw, seq) for seq in seqs for gw in GATEWAYS]


class SitePublisher:
    """A QoS1 publisher on the site broker that waits for each PUBACK."""

    def __init__(self, broker: Mosquitto) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="site-pub")
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def send(self, messages: list[Outgoing], pause_s: float = 0.0) -> None:
        for topic, payload in messages:
            self.client.publish(topic, payload, qos=1).wait_for_publish(10)
            if pause_s:
                time.sleep(pause_s)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def site_pub(mosquitto: Mosquitto) -> Iterator[SitePublisher]:
    publisher = SitePublisher(mosquitto)
    yield publisher
    publisher.close()


def settings(site: Mosquitto, cloud: Mosquitto, **overrides: object) -> BridgeSettings:
    values: dict[str, object] = {"client_id": "bridge-t", "max_in_flight": 20,
                                 "heartbeat_s": 0.2, "healthy_within_s": 1.0,
                                 "reconnect_max_s": 1.0, "connect_timeout_s": 2.0}
    return BridgeSettings(sites=(SiteBroker(parse_broker_url(site.url)),),
                          cloud=parse_broker_url(cloud.url), **(values | overrides))  # type: ignore[arg-type]


@pytest.fixture
def bridge(mosquitto: Mosquitto, cloud: Mosquitto) -> Iterator[Bridge]:
    service = Bridge(settings(mosquitto, cloud), RouterSpec(Registry([]), partitions=P))
    service.start()
    assert service.site.subscribed.wait(10), "the bridge did not subscribe on the site broker"
    yield service
    service.stop(5)


def mesh_ledger(cloud: Mosquitto) -> TopicLedger:
    return TopicLedger(cloud, "cloud-ledger", topics.subscription("mesh_telemetry"),
                       topics.subscription("dead_letter"))


def test_valid_telemetry_is_partitioned_and_garbage_dead_lettered(
    bridge: Bridge, cloud: Mosquitto, site_pub: SitePublisher,
) -> None:
    ledger = mesh_ledger(cloud)
    site_pub.send([birth(gw) for gw in GATEWAYS])
    letter = DeadLetter(reason="malformed_json", detail="x", payload_b64="", received_ms=T0)
    garbage: list[Outgoing] = [
        (topics.site_telemetry("s1", "gw-0"), b"{nope"),
        telemetry("gw-1", 999, devices=["gw-0-m0"]),  # another gateway's device
        (topics.site_status("s1", "gw-2"), b'{"type": "status"}'),
        (topics.build("site_dead_letter", site="s1", gateway="gw-2", reason="malformed_json"),
         encode(letter)),
    ]
    messages = stream(range(1, 21))
    for i, bad in enumerate(garbage):  # interleaved with the valid stream
        messages.insert(10 * i + 5, bad)
    site_pub.send(messages)
    want = expected(range(1, 21))
    ledger.wait_for(want, EXPECT_WAIT_S)
    wait_until(lambda: sum(isinstance(e, DeadLetter) for _, e in ledger.by_topic) >= 4,
               what="dead letters")
    time.sleep(0.3)  # anything extra (a wrongly forwarded spoof) would arrive by now
    ledger.close()

    assert ledger.received() == want  # the spoofed reading (gw-0-m0, 999) is not forwarded
    for topic, event in ledger.by_topic:
        if isinstance(event, TelemetryBatch):
            assert {topics.partition_of(r.device_id, P) for r in event.readings} == {
                int(topic.rsplit("/", 1)[1])}, topic
    reasons = sorted(t.rsplit("/", 1)[1] for t, e in ledger.by_topic if isinstance(e, DeadLetter))
    assert reasons == ["malformed_json", "malformed_json", "missing_field", "unauthorized_device"]
    wait_until(lambda: bridge.in_flight == 0, what="every site message acknowledged")
    acked = bridge.metrics.site_acked._value.get()
    assert acked == len(messages) + len(GATEWAYS)


def test_cloud_broker_restart_loses_nothing(
    bridge: Bridge, cloud: Mosquitto, site_pub: SitePublisher,
) -> None:
    ledger = mesh_ledger(cloud)
    site_pub.send([birth(gw) for gw in GATEWAYS])
    sender = threading.Thread(target=site_pub.send, args=(stream(range(1, 201)), 0.002))
    sender.start()
    wait_until(lambda: len(ledger.received()) > 100, what="some readings before the restart")
    cloud.restart()
    sender.join()
    ledger.wait_for(expected(range(1, 201)), EXPECT_WAIT_S)
    ledger.close()
    assert bridge.cloud.connected




def test_kill_9_and_restart_loses_nothing(
    mosquitto: Mosquitto, cloud: Mosquitto, site_pub: SitePublisher, tmp_path: Path,
) -> None:
    log, port = tmp_path / "bridge.log", free_port()
    config = write_config(tmp_path, mosquitto, cloud, "bridge-p", port)
    ledger = mesh_ledger(cloud)
    proc = spawn_bridge(config, log)
    probe = 0
    while not ledger.received():  # the session exists once a probe gets through
        probe += 1
        site_pub.send([telemetry("gw-0", probe)])
        time.sleep(0.2)
        assert proc.poll() is None, log.read_text()
    proc.kill()  # SIGKILL while idle: what is sent now queues in the bridge's session
    proc.wait()
    sent = range(probe + 1, probe + 1001)
    want = expected(sent)
    site_pub.send(stream(sent))
    proc = spawn_bridge(config, log)
    wait_until(lambda: len(ledger.received() & want) > 300, what="the backlog to start")
    proc.kill()  # SIGKILL mid-drain, with site messages held for PUBACKs
    proc.wait()
    assert not want <= ledger.received(), "killed too late: the backlog was already drained"
    proc = spawn_bridge(config, log)
    try:
        ledger.wait_for(expected(sent), EXPECT_WAIT_S)
        wait_until(lambda: healthz(port) == 200, what="healthy after the restart")
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(20)
        ledger.close()
    assert code == 0, log.read_text()[-3000:]


def test_healthz_follows_the_cloud_broker(bridge: Bridge, cloud: Mosquitto) -> None:
    port = free_port()
    server = serve_healthz(bridge.liveness, port, host="127.0.0.1")
    try:
        wait_until(lambda: healthz(port) == 200, what="healthy")
        cloud.stop()
        down = time.monotonic()
        wait_until(lambda: healthz(port) == 503, what="unhealthy with the cloud broker down")
        took = time.monotonic() - down
        assert took >= bridge.settings.healthy_within_s - 0.3  # not before N seconds
        cloud.start()
        wait_until(lambda: healthz(port) == 200, what="healthy again")
    finally:
        server.shutdown()


@pytest.mark.parametrize("processes", [1, 2])
def test_two_site_brokers_into_one_mesh(mosquitto: Mosquitto, cloud: Mosquitto,
                                        tmp_path: Path, processes: int) -> None:
    (tmp_path / "site-b").mkdir()
    with Mosquitto(tmp_path / "site-b") as site_b:
        both = settings(mosquitto, cloud, client_id="bridge-2s", routing_processes=processes)
        both = replace(both, sites=(*both.sites, SiteBroker(parse_broker_url(site_b.url))))
        service = Bridge(both, RouterSpec(Registry([]), partitions=P))
        service.start()
        publishers = [SitePublisher(mosquitto), SitePublisher(site_b)]
        ledger = mesh_ledger(cloud)
        try:
            assert all(site.subscribed.wait(10) for site in service.sites)
            assert [s.name for s in service.sources] == [
                f"{b.host}:{b.port}" for b in (mosquitto, site_b)]
            # gw-0 and gw-1 publish to site A, gw-2 to site B
            publishers[0].send([birth("gw-0"), birth("gw-1")])
            publishers[1].send([birth("gw-2")])
            seqs = range(1, 31)
            publishers[0].send([telemetry(gw, s) for s in seqs for gw in ("gw-0", "gw-1")])
            publishers[1].send([telemetry("gw-2", s) for s in seqs])
            ledger.wait_for(expected(seqs), EXPECT_WAIT_S)
            wait_until(lambda: service.in_flight == 0, what="both sites acknowledged")
        finally:
            ledger.close()
            for publisher in publishers:
                publisher.close()
            assert service.stop(5)
        assert service.metrics.site_acked._value.get() == 3 + 3 * len(seqs)
        per_device = {}
        for device, seq in ledger.arrivals:
            per_device.setdefault(device, []).append(seq)
        assert all(got == list(seqs) for got in per_device.values())  # once each, in order


def test_bridge_refuses_a_config_it_cannot_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                               ) -> None:
    from meshwatch.cli import main

    config = tmp_path / "bridge.toml"
    config.write_text('[site_broker]\nurl = "mqtt://127.0.0.1:1"\n[mesh_broker]\n'
                      'url = "mqtt://127.0.0.1:2"\n[bridge]\nopcua_site = "dma-01"\n'
                      'opcua_gateway_id = "dma-01-scada"\n')
    assert main(["bridge", "--config", str(config)]) == 2
    assert "no [[opcua]] server" in capsys.readouterr().err
    config.write_text('[mesh_broker]\nurl = "mqtt://127.0.0.1:2"\n')  # site broker: embedded
    assert main(["bridge", "--config", str(config)]) == 2
    assert "set site broker.url to mqtt://" in capsys.readouterr().err


def test_bridge_talks_tls_to_both_brokers(tmp_path: Path, pki: Pki) -> None:
    """Site and cloud over mqtts:// with the test CA, as `meshwatch bridge` reads them."""
    (tmp_path / "site").mkdir()
    (tmp_path / "cloud").mkdir()
    with Mosquitto(tmp_path / "site", tls=pki) as site, \
            Mosquitto(tmp_path / "cloud", tls=pki) as cloud:
        config = tmp_path / "bridge.toml"
        tls = f'[{{section}}.tls]\nca_file = "{pki.ca}"\n'
        config.write_text(
            f'[site_broker]\nurl = "{site.tls_url}"\n{tls.format(section="site_broker")}'
            f'[mesh_broker]\nurl = "{cloud.tls_url}"\n{tls.format(section="mesh_broker")}'
            f'[bridge]\nclient_id = "bridge-tls"\n')
        settings = bridge_settings(load_config(config))
        assert settings.sites[0].address.tls is not None
        assert settings.sites[0].address.port == site.tls_port
        service = Bridge(settings, RouterSpec(Registry([]), partitions=P))
        service.start()
        publisher, ledger = SitePublisher(site), mesh_ledger(cloud)  # plain listeners
        try:
            assert service.site.subscribed.wait(10), "no TLS session with the site broker"
            publisher.send([birth("gw-0"), *[telemetry("gw-0", s) for s in range(1, 6)]])
            ledger.wait_for({(d, s) for d in DEVICES["gw-0"] for s in range(1, 6)},
                            EXPECT_WAIT_S)
        finally:
            ledger.close()
            publisher.close()
            assert service.stop(5)
        wrong = replace(settings.cloud, tls=TlsOptions(ca_file=str(pki.other_ca)))
        link = CloudLink(replace(settings, cloud=wrong), Liveness(1.0), lambda event: None)
        assert not link.connect(), "a server certificate from another CA must be refused"


def test_a_dead_router_process_stops_the_service_with_an_error(
    mosquitto: Mosquitto, cloud: Mosquitto, tmp_path: Path, site_pub: SitePublisher,
) -> None:
    log, port = tmp_path / "bridge.log", free_port()
    config = write_config(tmp_path, mosquitto, cloud, "bridge-die", port)
    proc = spawn_bridge(config, log)
    try:
        wait_until(lambda: healthz(port) == 200, what="the bridge to be up")
        children = router_children(proc.pid)
        assert children, "a router process runs beside the bridge"
        for child in children:
            os.kill(child, signal.SIGKILL)
        assert proc.wait(20) == 1, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "router process 0 died" in log.read_text()


def router_children(pid: int) -> list[int]:
    """Child process ids of ``pid`` that run a bridge router (from /proc)."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            if b"multiprocessing" in cmdline:
                children.append(int(child))
    return children


def test_edge_scores_and_alerts_reach_the_mesh(bridge: Bridge, cloud: Mosquitto,
                                               site_pub: SitePublisher) -> None:
    ledger = TopicLedger(cloud, "scores-ledger", topics.subscription("mesh_scores"),
                         topics.subscription("alerts"))
    windows = [WindowScore(device_id=d, window_start_ms=T0, window_end_ms=T0 + 60_000, score=0.2)
               for d in DEVICES["gw-1"]]
    score = EdgeScore(site="s1", gateway_id="gw-1", model_id="edge-rf", model_version="v3",
                      windows=windows)
    alert = Alert(alert_id="edge-gw-1-m0-burst", device_id="gw-1-m0", kind="burst",
                  severity="critical", score=0.95, first_ts_ms=T0, last_ts_ms=T0,
                  model_version="v3")
    site_pub.send([birth("gw-1"), (topics.build("site_scores", site="s1", gateway="gw-1"),
                                   encode(score)),
                   (topics.build("site_alerts", site="s1", gateway="gw-1"), encode(alert))])
    wait_until(lambda: len(ledger.by_topic) >= 2, what="scores and the alert in the mesh")
    time.sleep(0.3)
    ledger.close()
    got_windows = sorted(w.device_id for _, e in ledger.by_topic if isinstance(e, EdgeScore)
                         for w in e.windows)
    assert got_windows == sorted(DEVICES["gw-1"])
    assert [(t, e) for t, e in ledger.by_topic if isinstance(e, Alert)] == [
        (topics.alerts("s1", "burst"), alert)]
