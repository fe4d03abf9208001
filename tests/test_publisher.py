"""Outbox publisher against real mosquitto: outages, crashes, status, pacing, urgent lane, refusals.

A ``Ledger`` subscriber with a persistent session (``clean_start=False`` on every connect and a
session expiry, so mosquitto keeps its queue across broker restarts) records every
``(device, seq)`` that arrives; the tests reconcile it with what was appended.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import paho.mqtt.client as mqtt
import pytest
from mqtt_ledger import WAIT_S, Ledger, wait_until
from servers import Mosquitto, Pki

import edge_agent.outbox
import edge_agent.publisher
from edge_agent.outbox import Outbox, OutgoingMessage
from edge_agent.publisher import OutboxPublisher, TlsOptions, TokenBucket, parse_broker_url
from meshwatch.backoff import Backoff
from meshwatch.contract import (
    Alert,
    DeviceState,
    DeviceStatus,
    Reading,
    TelemetryBatch,
    encode,
    topics,
)

REPO = Path(__file__).resolve().parents[1]
SITE = "dma-01"
T0_MS = 1_767_225_600_000
OUTAGE_S = float(os.environ.get("MESHWATCH_TEST_OUTAGE_S", "6"))
"""How long the broker is down in the outage test; the issue's full figure is 60."""

def batch_payload(gateway: str, seqs: dict[str, range]) -> bytes:
    """A TelemetryBatch with readings ``seqs[device]`` for each device."""
    readings = [
        Reading(device_id=device, ts_ms=T0_MS + seq * 1000, seq=seq, metrics={"flow_lpm": 1.0})
        for device, span in seqs.items()
        for seq in span
    ]
    return encode(TelemetryBatch(site=SITE, gateway_id=gateway, sent_ms=T0_MS, readings=readings))


def alert_payload(n: int) -> bytes:
    """An edge Alert numbered ``n`` (its id is ``edge-alert-{n}``)."""
    alert = Alert(
        alert_id=f"edge-alert-{n}", device_id="mtr-1", kind="leak", severity="major",
        score=0.9, first_ts_ms=T0_MS, last_ts_ms=T0_MS + 60_000, model_version="v1",
    )  # fmt: skip
    return encode(alert)


def telemetry(gateway: str, order: list[tuple[str, int]]) -> list[OutgoingMessage]:
    """One ordinary message per ``(device, seq)``, in that order."""
    topic = topics.site_telemetry(SITE, gateway)
    return [
        OutgoingMessage(topic, batch_payload(gateway, {d: range(s, s + 1)}), key=d, readings=1)
        for d, s in order
    ]


def arrival_order(ledger: Ledger) -> list[str | tuple[str, int]]:
    """What arrived, in order: an alert's id, or a telemetry reading's (device, seq)."""
    with ledger._lock:
        events = list(ledger.events)
    order: list[str | tuple[str, int]] = []
    for event in events:
        if isinstance(event, Alert):
            order.append(event.alert_id)
        elif isinstance(event, TelemetryBatch):
            order += [(r.device_id, r.seq) for r in event.readings]
    return order


def first_arrivals(order: list[str | tuple[str, int]]) -> list[str | tuple[str, int]]:
    """``order`` without the repeats (at-least-once resends)."""
    return list(dict.fromkeys(order))


class Writer:
    """Appends one TelemetryBatch every ``period_s`` for several devices, seq increasing."""

    def __init__(
        self, box: Outbox, gateway: str, devices: int = 5, per_device: int = 3, period_s=0.02
    ) -> None:
        self.box = box
        self.gateway = gateway
        self.devices = [f"mtr-{n:06d}" for n in range(devices)]
        self.per_device = per_device
        self.period_s = period_s
        self.appended: set[tuple[str, int]] = set()
        self.batches = 0
        self._next_seq = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Writer:
        self._thread.start()
        return self

    def _run(self) -> None:
        topic = topics.site_telemetry(SITE, self.gateway)
        while not self._stop.wait(self.period_s):
            span = range(self._next_seq, self._next_seq + self.per_device)
            payload = batch_payload(self.gateway, dict.fromkeys(self.devices, span))
            self.box.append(topic, payload, readings=len(self.devices) * len(span))
            self.appended |= {(d, s) for d in self.devices for s in span}
            self._next_seq += self.per_device
            self.batches += 1

    def stop(self) -> set[tuple[str, int]]:
        self._stop.set()
        self._thread.join()
        return self.appended


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Outbox]:
    with Outbox(tmp_path / "outbox.db") as outbox:
        yield outbox


def fast_backoff() -> Backoff:
    return Backoff(initial_s=0.1, max_s=1.0, seed=1)


# -- the claims ---------------------------------------------------------------------------


@pytest.mark.parametrize("outage_s", [OUTAGE_S])
def test_broker_outage_loses_no_reading_and_keeps_device_order(
    mosquitto: Mosquitto, box: Outbox, outage_s: float
) -> None:
    gateway = "gw-outage"
    ledger = Ledger(mosquitto, "ledger-outage", topics.subscription("site_telemetry"))
    publisher = OutboxPublisher(
        box, mosquitto.url, site=SITE, gateway_id=gateway, backoff=fast_backoff(),
        max_in_flight=16, rate_limit_per_s=300, heartbeat_s=1.0,
    ).start()  # fmt: skip
    writer = Writer(box, gateway).start()
    wait_until(lambda: len(ledger.received()) > 100, what="traffic before the outage")

    mosquitto.stop()
    time.sleep(outage_s)
    backlog = box.depth
    assert backlog >= outage_s * 20, f"only {backlog} messages queued during the outage"
    assert not publisher.connected
    mosquitto.start()  # same port, same persistence file
    time.sleep(1.0)  # live traffic on top of the backlog

    expected = writer.stop()
    assert publisher.close(timeout_s=WAIT_S), f"{box.depth} messages left in the outbox"
    ledger.wait_for(expected)
    ledger.assert_complete_and_ordered(expected)
    ledger.close()
    stats = publisher.stats()
    assert stats["reconnects"] >= 1
    assert stats["acked"] == writer.batches
    assert stats["queue_depth"] == stats["in_flight"] == 0


_CRASH_CHILD = """
import sys, time
from edge_agent.outbox import Outbox
from edge_agent.publisher import OutboxPublisher
from meshwatch.backoff import Backoff
from meshwatch.contract import Reading, TelemetryBatch, encode, topics

path, url, site, gateway, t0 = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
box = Outbox(path)
OutboxPublisher(box, url, site=site, gateway_id=gateway, rate_limit_per_s=30, max_in_flight=5,
                heartbeat_s=0.2, backoff=Backoff(initial_s=0.1, max_s=1.0)).start()
topic = topics.site_telemetry(site, gateway)
seq = 0
while True:
    readings = [Reading(device_id=d, ts_ms=t0 + seq * 1000, seq=seq, metrics={"flow_lpm": 1.0})
                for d in ("mtr-a", "mtr-b", "mtr-c")]
    batch = TelemetryBatch(site=site, gateway_id=gateway, sent_ms=t0, readings=readings)
    box.append(topic, encode(batch), readings=3)
    print(seq, flush=True)
    seq += 1
    time.sleep(0.01)
"""


def test_kill_9_mid_run_then_a_new_publisher_delivers_the_buffer_and_the_will_fires(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    gateway = "gw-crash"
    path = tmp_path / "outbox.db"
    ledger = Ledger(
        mosquitto, "ledger-crash", topics.subscription("site_telemetry"),
        topics.site_status(SITE, gateway),
    )  # fmt: skip
    child = subprocess.Popen(
        [sys.executable, "-c", _CRASH_CHILD, str(path), mosquitto.url, SITE, gateway, str(T0_MS)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    appended = []
    for line in child.stdout:
        appended.append(int(line))
        if len(appended) >= 60 and len(ledger.received()) >= 30:
            break
    wait_until(
        lambda: any(e.state is DeviceState.HEARTBEAT for e, _ in ledger.status_events(gateway)),
        what="a heartbeat from the child",
    )
    child.send_signal(signal.SIGKILL)
    assert child.wait(10) == -signal.SIGKILL
    appended += [int(line) for line in child.stdout.read().splitlines() if line.strip()]
    child.stdout.close()

    # The broker notices the dead connection and publishes the last will, retained.
    wait_until(
        lambda: any(e.state is DeviceState.DEATH for e, _ in ledger.status_events(gateway)),
        timeout=10, what="the last will",
    )  # fmt: skip
    will = [e for e, _ in ledger.status_events(gateway) if e.state is DeviceState.DEATH][-1]
    assert will.message == "connection lost (last will)"
    states = [e.state for e, _ in ledger.status_events(gateway)]
    assert states[0] is DeviceState.BIRTH

    expected = {(d, seq) for d in ("mtr-a", "mtr-b", "mtr-c") for seq in appended}
    with Outbox(path) as box:
        assert box.depth > 10, "the child's publisher kept up: nothing was buffered"
        assert not expected <= ledger.received()
        publisher = OutboxPublisher(box, mosquitto.url, site=SITE, gateway_id=gateway).start()
        assert publisher.close(timeout_s=WAIT_S)
    ledger.wait_for(expected)
    ledger.assert_complete_and_ordered(expected)
    births = [e for e, _ in ledger.status_events(gateway) if e.state is DeviceState.BIRTH]
    assert len(births) == 2  # the restarted publisher announced itself
    ledger.close()


def test_birth_heartbeats_and_clean_death_on_the_retained_status_topic(
    mosquitto: Mosquitto, box: Outbox
) -> None:
    gateway = "gw-status"
    status = topics.site_status(SITE, gateway)
    ledger = Ledger(mosquitto, "ledger-status", status)
    publisher = OutboxPublisher(
        box, mosquitto.url, site=SITE, gateway_id=gateway, heartbeat_s=0.2,
        devices=["mtr-000001", "mtr-000002"], agent_version="test-1",
    ).start()  # fmt: skip
    topic = topics.site_telemetry(SITE, gateway)
    for seq in range(3):
        box.append(topic, batch_payload(gateway, {"mtr-000001": range(seq, seq + 1)}))

    def heartbeat_with_3_acked() -> bool:
        return any(
            e.state is DeviceState.HEARTBEAT and e.counters.get("acked") == 3
            for e, _ in ledger.status_events(gateway)
        )

    wait_until(heartbeat_with_3_acked, what="a heartbeat counting 3 acked messages")
    assert publisher.close(timeout_s=5)
    wait_until(
        lambda: ledger.status_events(gateway)[-1][0].state is DeviceState.DEATH,
        what="the clean death",
    )
    events = [e for e, _ in ledger.status_events(gateway)]
    assert events[0].state is DeviceState.BIRTH
    assert events[0].devices == ["mtr-000001", "mtr-000002"]
    assert events[0].agent_version == "test-1"
    heartbeat = next(e for e in events if e.state is DeviceState.HEARTBEAT)
    assert set(heartbeat.counters) >= {"published", "acked", "reconnects", "queue_depth"}
    assert events[-1].message == "clean shutdown"
    assert [e.state for e in events].count(DeviceState.DEATH) == 1  # the will did not fire
    ledger.close()

    late = Ledger(mosquitto, "late-reader", status)  # the last state is retained
    wait_until(lambda: bool(late.status_events(gateway)), timeout=5, what="the retained status")
    retained, flag = late.status_events(gateway)[0]
    assert (retained.state, retained.message, flag) == (DeviceState.DEATH, "clean shutdown", True)
    late.close()


# -- pacing, windows, rejections, closing ---------------------------------------------------------


@pytest.mark.parametrize(("rate", "slowest_s", "fastest_s"), [(100.0, 3.0, 1.0), (None, 0.8, 0.0)])
def test_a_backlog_drains_at_the_configured_rate_within_the_window(
    mosquitto: Mosquitto, box: Outbox, rate: float | None, slowest_s: float, fastest_s: float
) -> None:
    gateway = "gw-pace"
    ledger = Ledger(mosquitto, "ledger-pace", topics.subscription("site_telemetry"))
    topic = topics.site_telemetry(SITE, gateway)
    for seq in range(120):
        box.append(topic, batch_payload(gateway, {"mtr-1": range(seq, seq + 1)}))
    publisher = OutboxPublisher(
        box, mosquitto.url, site=SITE, gateway_id=gateway, rate_limit_per_s=rate, max_in_flight=10
    )
    started = time.monotonic()
    publisher.start()
    most_in_flight = 0
    while box.depth and time.monotonic() - started < WAIT_S:
        most_in_flight = max(most_in_flight, publisher.in_flight)
        time.sleep(0.001)
    elapsed = time.monotonic() - started
    # 120 messages, a burst of 10, then 100/s: at least 1.1 s.
    assert fastest_s <= elapsed < slowest_s
    assert 1 <= most_in_flight <= 10
    assert publisher.close(timeout_s=5)
    expected = {("mtr-1", seq) for seq in range(120)}
    ledger.wait_for(expected)
    ledger.assert_complete_and_ordered(expected)
    ledger.close()


# -- the urgent lane ------------------------------------------------------------------------------


def test_an_urgent_message_overtakes_a_rate_limited_backlog(
    mosquitto: Mosquitto, box: Outbox
) -> None:
    gateway = "gw-urgent"
    ledger = Ledger(
        mosquitto, "ledger-urgent", topics.subscription("site_telemetry"),
        topics.subscription("site_alerts"),
    )  # fmt: skip
    backlog = [(f"mtr-{n % 3}", n // 3) for n in range(300)]
    box.append_many(telemetry(gateway, backlog))
    publisher = OutboxPublisher(
        box, mosquitto.url, site=SITE, gateway_id=gateway, rate_limit_per_s=200, max_in_flight=10
    ).start()  # 300 messages at 200/s: the backlog takes ~1.5 s to drain
    wait_until(lambda: len(ledger.received()) >= 20, what="the backlog to start draining")
    before = len(ledger.received())
    box.append(
        topics.build("site_alerts", site=SITE, gateway=gateway), alert_payload(1), key="mtr-1",
        urgent=True,
    )  # fmt: skip
    wait_until(lambda: "edge-alert-1" in arrival_order(ledger), what="the urgent alert")
    assert box.depth > 150, "the backlog drained before the alert arrived: nothing was shown"
    assert publisher.close(timeout_s=WAIT_S)
    ledger.wait_for(set(backlog))

    order = arrival_order(ledger)
    overtaken = order.index("edge-alert-1")
    # Only what was already in flight (or sent in the same round) may arrive before the alert.
    assert overtaken - before <= 2 * 10, f"{overtaken - before} backlog messages went first"
    assert overtaken < len(backlog) // 2
    assert first_arrivals([o for o in order if o != "edge-alert-1"]) == backlog  # exact order
    stats = publisher.stats()
    assert (stats["urgent_published"], stats["published"]) == (1, len(backlog) + 1)
    assert (stats["acked"], stats["resent"], stats["urgent_queue_depth"]) == (301, 0, 0)
    ledger.close()


def test_urgent_messages_survive_a_broker_crash_in_flight_and_a_reopened_outbox(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    gateway = "gw-urgent-crash"
    alerts = topics.build("site_alerts", site=SITE, gateway=gateway)
    subscribed = time.time()
    ledger = Ledger(
        mosquitto, "ledger-urgent-crash", topics.subscription("site_telemetry"),
        topics.subscription("site_alerts"),
    )  # fmt: skip
    saved = mosquitto.data_dir / "mosquitto.db"  # the ledger's session must survive the crash
    wait_until(
        lambda: saved.exists() and saved.stat().st_mtime > subscribed, timeout=5,
        what="mosquitto to save the ledger's session",
    )  # fmt: skip
    box = Outbox(tmp_path / "outbox.db")
    publisher = OutboxPublisher(
        box, mosquitto.url, site=SITE, gateway_id=gateway, rate_limit_per_s=100,
        max_in_flight=10, backoff=fast_backoff(),
    ).start()  # fmt: skip
    wait_until(lambda: publisher.connected, what="the first connection")

    # Freeze the broker: what is sent now stays in flight, unacknowledged, then dies with it.
    pid = mosquitto.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        stat = Path(f"/proc/{pid}/stat")
        wait_until(lambda: stat.read_text().rsplit(")", 1)[1].split()[0] == "T", timeout=5,
                   what="the broker to stop")  # fmt: skip
        box.append(alerts, alert_payload(1), urgent=True)
        box.append_many(telemetry(gateway, [("mtr-1", s) for s in range(5)]))
        wait_until(lambda: publisher.in_flight == 6, timeout=5, what="6 messages in flight")
    finally:
        mosquitto.kill()  # SIGKILL ends a stopped process too
    wait_until(lambda: not publisher.connected, what="the publisher to notice the crash")
    box.append_many(telemetry(gateway, [("mtr-1", s) for s in range(5, 60)]))
    box.append(alerts, alert_payload(2), urgent=True)
    mosquitto.start()
    wait_until(lambda: box.depth == 0, what="the outbox to drain after the crash")
    assert publisher.stats()["reconnects"] == 1
    assert publisher.urgent_published == 3  # alert 1 twice (in flight at the crash), alert 2
    assert publisher.resent == 6
    assert publisher.close(timeout_s=5)
    crash = [("mtr-1", s) for s in range(60)]
    ledger.wait_for(set(crash))
    # After the reconnect, both alerts went first, though alert 2 was appended last.
    assert first_arrivals(arrival_order(ledger)) == ["edge-alert-1", "edge-alert-2", *crash]

    # Queued while no publisher runs, then the outbox is closed and reopened.
    box.append_many(telemetry(gateway, [("mtr-1", s) for s in range(60, 100)]))
    box.append(alerts, alert_payload(3), urgent=True)
    box.close()
    with Outbox(tmp_path / "outbox.db") as box:
        assert (box.depth, box.urgent_depth) == (41, 1)
        assert box.peek(1)[0].urgent
        publisher = OutboxPublisher(
            box, mosquitto.url, site=SITE, gateway_id=gateway, rate_limit_per_s=100
        ).start()
        assert publisher.close(timeout_s=WAIT_S)
    reopened = [("mtr-1", s) for s in range(60, 100)]
    ledger.wait_for(set(reopened))
    assert first_arrivals(arrival_order(ledger))[62:] == ["edge-alert-3", *reopened]
    ledger.close()


class FakeClient:
    """Records what the publisher hands to paho; every publish succeeds."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> SimpleNamespace:
        self.sent.append(payload)
        return SimpleNamespace(rc=mqtt.MQTT_ERR_SUCCESS, mid=len(self.sent))


def test_urgent_messages_go_first_under_their_own_cap_and_ordinary_ones_wait(
    box: Outbox,
) -> None:
    topic = topics.site_telemetry(SITE, "gw-fake")
    ordinary = [f"o{n}".encode() for n in range(6)]
    urgent = [f"u{n}".encode() for n in range(6)]
    box.append_many([OutgoingMessage(topic, p) for p in ordinary])
    box.append_many([OutgoingMessage(topic, p, urgent=True) for p in urgent])
    publisher = OutboxPublisher(box, "mqtt://127.0.0.1", site=SITE, gateway_id="gw-fake",
                                max_in_flight=4)  # fmt: skip
    client = FakeClient()
    now = time.monotonic()
    # What _connect() sets up, with rates so low that no token refills during the test.
    publisher._bucket = TokenBucket(1e-6, 4, now=now)
    publisher._urgent_bucket = TokenBucket(1e-6, 4, now=now)

    def fill(acked: bool = True) -> list[bytes]:
        if acked:
            publisher._in_flight.clear()  # as if every PUBACK had come
        start = len(client.sent)
        publisher._fill_window(client)  # type: ignore[arg-type]
        return client.sent[start:]

    assert fill() == urgent[:4]  # the urgent lane first, a burst of the window
    assert fill() == []  # 2 urgent wait for their cap; ordinary messages wait behind them
    publisher._urgent_bucket.give_back(1)
    assert fill(acked=False) == urgent[4:5]
    publisher._urgent_bucket = None  # lift the urgent cap
    assert fill(acked=False) == [urgent[5], *ordinary[:2]]  # then ordinary, 3 slots free
    assert fill() == ordinary[2:4]  # urgent sends took no ordinary tokens: 4 in all
    assert fill() == []  # the ordinary bucket is empty
    stats = publisher.stats()
    assert (stats["published"], stats["urgent_published"], stats["resent"]) == (10, 6, 0)

    publisher._connection_lost("test")  # nothing was acked: resend, urgent lane first
    publisher._bucket = None
    assert fill() == urgent[:4]
    assert publisher.resent == 4
    assert fill() == [*urgent[4:], *ordinary[:2]]


class RestrictedMosquitto(Mosquitto):
    """Mosquitto whose ACL lets anonymous clients publish to ``mw/#`` only."""

    def _prepare(self) -> None:
        super()._prepare()
        acl = self.config_path.with_name("acl")
        acl.write_text("topic readwrite mw/#\n")
        with self.config_path.open("a") as config:
            config.write(f"acl_file {acl}\n")


def test_a_refused_message_becomes_a_dead_letter_and_does_not_stall_the_queue(
    tmp_path: Path, box: Outbox
) -> None:
    gateway = "gw-acl"
    topic = topics.site_telemetry(SITE, gateway)
    with RestrictedMosquitto(tmp_path) as broker:
        ledger = Ledger(broker, "ledger-acl", topics.subscription("site_telemetry"))
        box.append(topic, batch_payload(gateway, {"mtr-1": range(0, 1)}))
        box.append("forbidden/topic", b"not allowed here")
        for seq in range(1, 4):
            box.append(topic, batch_payload(gateway, {"mtr-1": range(seq, seq + 1)}))
        publisher = OutboxPublisher(
            box, broker.url, site=SITE, gateway_id=gateway, backoff=fast_backoff()
        ).start()
        expected = {("mtr-1", seq) for seq in range(4)}
        ledger.wait_for(expected)  # mosquitto dropped the connection; the rest still arrived
        assert publisher.close(timeout_s=5)
        ledger.assert_complete_and_ordered(expected)
        assert (publisher.rejected, publisher.dead_lettered, publisher.acked) == (1, 1, 4)
        assert publisher.resent >= 3  # what followed the refused message in flight was lost
        assert (box.depth, box.dead_letters) == (0, 1)
        ledger.close()


def test_close_while_the_broker_is_down_keeps_the_messages(
    mosquitto: Mosquitto, box: Outbox
) -> None:
    publisher = OutboxPublisher(
        box, mosquitto.url, site=SITE, gateway_id="gw-down", backoff=fast_backoff()
    ).start()
    wait_until(lambda: publisher.connected, what="the first connection")
    mosquitto.stop()
    wait_until(lambda: not publisher.connected, what="the publisher to notice")
    box.append("mw/v1/site/dma-01/gw/gw-down/telemetry", b"{}")
    started = time.monotonic()
    assert not publisher.close(timeout_s=1.0)
    assert 0.9 <= time.monotonic() - started < 5.0  # it kept trying until the deadline
    assert box.depth == 1
    assert publisher.connect_failures >= 1


def test_close_waits_for_the_broker_to_come_back_within_the_timeout(
    mosquitto: Mosquitto, box: Outbox
) -> None:
    publisher = OutboxPublisher(
        box, mosquitto.url, site=SITE, gateway_id="gw-back", backoff=fast_backoff()
    ).start()
    wait_until(lambda: publisher.connected, what="the first connection")
    mosquitto.stop()
    box.append("mw/v1/site/dma-01/gw/gw-back/telemetry", b"{}")
    comeback = threading.Timer(1.0, mosquitto.start)
    comeback.start()
    assert publisher.close(timeout_s=10.0)
    comeback.join()  # start() returns once the broker answers; let it finish before teardown
    assert box.depth == 0


# -- pure parts -----------------------------------------------------------------------------------


def test_token_bucket_refills_at_its_rate_and_caps_bursts() -> None:
    bucket = TokenBucket(rate=50.0, burst=10, now=0.0)
    assert bucket.take(25, now=0.0) == 10
    assert bucket.take(25, now=0.1) == 5
    assert bucket.take(25, now=100.0) == 10  # idle time does not bank more than a burst
    bucket.give_back(3)  # tokens taken but not spent
    assert bucket.take(25, now=100.0) == 3
    bucket.give_back(50)
    assert bucket.take(25, now=100.0) == 10  # never more than a burst
    with pytest.raises(ValueError, match="rate must be > 0"):
        TokenBucket(rate=0.0, burst=1, now=0.0)


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("tcp://broker:1883", "use mqtt://host:port, or mqtts://"),
        ("mqtt://:1883", "has no host"),
        ("mqtt://broker:99999", "bad port"),
    ],
)
def test_bad_broker_urls_say_what_to_do(url: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        parse_broker_url(url)


def test_credentials_from_arguments_override_the_url(box: Outbox) -> None:
    publisher = OutboxPublisher(
        box, "mqtt://u:p@broker", site=SITE, gateway_id="gw-1", password="other"
    )
    assert publisher._address == edge_agent.publisher.BrokerAddress("broker", 1883, "u", "other")
    with pytest.raises(ValueError, match="topic level gateway='bad/id'"):
        OutboxPublisher(box, "mqtt://broker", site=SITE, gateway_id="bad/id")
    with pytest.raises(ValueError, match="urgent_rate_limit_per_s must be > 0"):
        OutboxPublisher(box, "mqtt://b", site=SITE, gateway_id="g", urgent_rate_limit_per_s=0.0)



def test_reported_events_reach_the_status_topic_with_the_model_version(
    mosquitto: Mosquitto, box: Outbox
) -> None:
    ledger = Ledger(mosquitto, "ledger-report", topics.subscription("site_status"))
    publisher = OutboxPublisher(box, mosquitto.url, site=SITE, gateway_id="gw-report",
                                heartbeat_s=3600)
    publisher.model_version = "abc123"
    publisher.report("model edge-rf 7 rejected: sha256 mismatch")
    publisher.start()

    def reported() -> list[DeviceStatus]:
        return [e for e, _ in ledger.status_events("gw-report") if e.message]

    wait_until(lambda: any("rejected" in (e.message or "") for e in reported()),
               what="the reported event")
    event = next(e for e in reported() if "rejected" in (e.message or ""))
    assert event.state == DeviceState.HEARTBEAT
    assert event.model_version == "abc123"
    publisher.close()
    ledger.close()


def test_publishes_over_tls_with_the_test_ca_and_refuses_another(
    tmp_path: Path, pki: Pki, box: Outbox
) -> None:
    with Mosquitto(tmp_path, tls=pki) as broker:
        ledger = Ledger(broker, "ledger-tls", topics.subscription("site_telemetry"))
        messages = telemetry("gw-tls", [("mtr-1", 0), ("mtr-2", 0), ("mtr-1", 1)])
        box.append_many(messages)
        publisher = OutboxPublisher(box, broker.tls_url, site=SITE, gateway_id="gw-tls",
                                    tls=TlsOptions(ca_file=str(pki.ca))).start()
        assert publisher.close(timeout_s=WAIT_S), "the outbox did not drain over TLS"
        ledger.wait_for({("mtr-1", 0), ("mtr-2", 0), ("mtr-1", 1)})
        ledger.close()
        box.append_many(telemetry("gw-tls", [("mtr-1", 2)]))
        wrong = OutboxPublisher(box, broker.tls_url, site=SITE, gateway_id="gw-tls",
                                tls=TlsOptions(ca_file=str(pki.other_ca)),
                                backoff=fast_backoff()).start()
        time.sleep(1.0)
        assert not wrong.connected
        assert wrong.stats()["connect_failures"] >= 1
        assert not wrong.close(timeout_s=0.5)
        assert box.depth == 1  # kept for a publisher that can connect
