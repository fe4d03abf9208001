"""Bridge faults and fuzzing against two real mosquitto brokers (site and cloud).

- The site broker restarts (persistence on) while gateways publish and the bridge forwards:
  the cloud ledger misses no ``(device, seq)``.
- Over 10,000 random and mutated payloads go through the live ``meshwatch bridge`` process,
  interleaved with valid batches: each invalid one comes out as exactly one dead letter with
  the contract's reason and the original payload, every valid reading is forwarded, and the
  process stays up and healthy.
"""

from __future__ import annotations

import base64
import json
import random
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import paho.mqtt.client as mqtt
from bridge_support import DEVICES, GATEWAYS, SITE, P, healthz, spawn_bridge, write_config
from mqtt_ledger import Ledger, wait_until
from paho.mqtt.enums import CallbackAPIVersion
from servers import Mosquitto, free_port

from edge_agent.publisher import parse_broker_url
from mesh_bridge.routing import RouterSpec
from mesh_bridge.shell import Bridge, BridgeSettings, SiteBroker
from meshwatch.contract import (
    ContractError,
    DeadLetter,
    DeviceStatus,
    Reading,
    TelemetryBatch,
    decode,
    encode,
    topics,
)
from meshwatch.registry import Registry

T0 = 1_767_225_600_000
WAIT_S = 30.0

Outgoing = tuple[str, bytes]


def batch(gw: str, seq: int, devices: list[str] | None = None,
          payload_gateway: str | None = None) -> TelemetryBatch:
    """A telemetry batch of ``gw`` with one reading per device at ``seq``."""
    readings = [Reading(device_id=d, ts_ms=T0 + seq * 1000, seq=seq, metrics={"flow_lpm": 1.5})
                for d in (devices or DEVICES[gw])]
    return TelemetryBatch(site=SITE, gateway_id=payload_gateway or gw, sent_ms=T0 + seq * 1000,
                          readings=readings)


def telemetry(gw: str, seq: int) -> Outgoing:
    """The site topic and payload of ``batch(gw, seq)``."""
    return topics.site_telemetry(SITE, gw), encode(batch(gw, seq))


class RetryingPublisher:
    """A QoS1 site publisher that sends again whatever the site broker did not PUBACK.

    Messages go out in windows; a message whose PUBACK did not come (the connection was lost)
    is published again once paho has reconnected. Duplicates are possible, losses are not.
    """

    def __init__(self, broker: Mosquitto, client_id: str = "site-pub", window: int = 30) -> None:
        self.window = window
        self.retries = 0
        self.connected = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        self.client.reconnect_delay_set(min_delay=0.1, max_delay=0.5)
        self.client.on_connect = lambda *_: self.connected.set()
        self.client.on_disconnect = lambda *_: self.connected.clear()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert self.connected.wait(10), "the publisher could not connect"

    def send(self, messages: list[Outgoing], pause_s: float = 0.0) -> None:
        """Publish every message until the broker has PUBACKed each at least once."""
        for start in range(0, len(messages), self.window):
            pending = messages[start:start + self.window]
            while pending:
                assert self.connected.wait(WAIT_S), "the publisher did not reconnect"
                infos = [(m, self.client.publish(*m, qos=1)) for m in pending]
                deadline = time.monotonic() + 2.0
                for _, info in infos:
                    while not published(info) and time.monotonic() < deadline:
                        time.sleep(0.002)
                failed = [m for m, info in infos if not published(info)]
                self.retries += len(failed)
                pending = failed
            if pause_s:
                time.sleep(pause_s)

    def close(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()


def published(info: mqtt.MQTTMessageInfo) -> bool:
    """Whether the broker PUBACKed ``info``; False if it failed (paho raises then)."""
    try:
        return info.is_published()
    except RuntimeError:  # not connected when published, or the queue was full
        return False


def births(publisher: RetryingPublisher) -> None:
    """Every gateway announces its devices."""
    publisher.send([
        (topics.site_status(SITE, gw),
         encode(DeviceStatus(site=SITE, gateway_id=gw, state="birth", sent_ms=T0,
                             devices=DEVICES[gw])))
        for gw in GATEWAYS
    ])


def test_site_broker_restart_loses_nothing(mosquitto: Mosquitto, cloud: Mosquitto) -> None:
    ledger = Ledger(cloud, "cloud-ledger", topics.subscription("mesh_telemetry"))
    settings = BridgeSettings(
        sites=(SiteBroker(parse_broker_url(mosquitto.url)),), cloud=parse_broker_url(cloud.url),
        client_id="bridge-site-restart", max_in_flight=20, heartbeat_s=0.2,
        healthy_within_s=1.0, reconnect_max_s=1.0, connect_timeout_s=2.0)
    bridge = Bridge(settings, RouterSpec(Registry([]), partitions=P))  # births grant
    bridge.start()
    publisher = RetryingPublisher(mosquitto)
    try:
        assert bridge.site.subscribed.wait(10), "the bridge did not subscribe"
        births(publisher)
        seqs = range(1, 301)
        want = {(d, s) for gw in GATEWAYS for d in DEVICES[gw] for s in seqs}
        sender = threading.Thread(
            target=publisher.send,
            args=([telemetry(gw, s) for s in seqs for gw in GATEWAYS], 0.01))
        sender.start()
        wait_until(lambda: len(ledger.received()) > 300, what="some readings before the restart")
        mosquitto.restart()
        before = ledger.received()
        sender.join(WAIT_S)
        assert not sender.is_alive()
        assert not want <= before, "restarted too late: everything had arrived already"
        ledger.wait_for(want, WAIT_S)
        ledger.assert_complete_and_ordered(want)
        wait_until(lambda: bridge.in_flight == 0, what="every site message acknowledged")
    finally:
        publisher.close()
        bridge.stop(5)
        ledger.close()


# --- fuzzing through the live service --------------------------------------------------------

FUZZ_GW = "gw-0"
FUZZ_TOPIC = topics.site_telemetry(SITE, FUZZ_GW)
INVALID = 10_500
VALID_EVERY = 20
PROBE_SEQ = 10**8


def random_json(rng: random.Random, depth: int = 0) -> object:
    """A random JSON value, sometimes shaped like a telemetry batch."""
    roll = rng.random()
    if depth > 3 or roll < 0.3:
        return rng.choice([None, True, False, rng.randint(-2**70, 2**70), rng.random() * 1e9,
                           "".join(chr(rng.randint(0, 0x2FF)) for _ in range(rng.randint(0, 12))),
                           "telemetry", FUZZ_GW, SITE, "1.0"])
    if roll < 0.5:
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    keys = ["schema_version", "type", "site", "gateway_id", "sent_ms", "readings", "device_id",
            "ts_ms", "seq", "metrics", "quality", "x"]
    return {rng.choice(keys): random_json(rng, depth + 1) for _ in range(rng.randint(0, 6))}


def mutate_fields(rng: random.Random, valid: bytes) -> bytes:
    """A valid batch with one field deleted or given a wrong value, as JSON."""
    doc = json.loads(valid)
    target = doc if rng.random() < 0.5 else rng.choice(doc["readings"])
    key = rng.choice(sorted(target))
    if rng.random() < 0.4:
        del target[key]
    else:
        target[key] = random_json(rng, 3)
    return json.dumps(doc).encode()


def fuzz_payload(rng: random.Random, valid: bytes) -> bytes:
    """One random or mutated payload (it may, rarely, still be valid)."""
    kind = rng.randrange(6)
    if kind == 0:
        return rng.randbytes(rng.randint(0, 300))
    if kind == 1:
        return json.dumps(random_json(rng)).encode()
    if kind == 2:
        return valid[:rng.randrange(len(valid))]
    if kind == 3:
        flipped = bytearray(valid)
        for _ in range(rng.randint(1, 3)):
            flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        return bytes(flipped)
    if kind == 4:
        return mutate_fields(rng, valid)
    return rng.choice([b"", b"null", b"[]", b"{}", b'"x"', b"\xff\xfe", b"{" * 2000,
                       b'{"type":"telemetry"}', valid + b"x", b" " + valid[:-1]])


def expected_reason(payload: bytes) -> str | None:
    """The contract's reason code for ``payload`` on FUZZ_TOPIC, or None if it decodes."""
    try:
        decode(payload, TelemetryBatch)
    except ContractError as exc:
        return str(exc.reason)
    return None


class FuzzPlan:
    """What the fuzz test publishes and what it expects at the cloud broker."""

    def __init__(self, seed: int) -> None:
        rng = random.Random(seed)
        self.messages: list[Outgoing] = []
        self.valid: set[tuple[str, int]] = set()
        self.letters: Counter[tuple[str, str]] = Counter()  # (reason, payload_b64)
        self.spoofed: set[tuple[str, int]] = set()  # readings dead-lettered as unauthorized
        self.spoofed_batches = 0
        self.skipped = 0  # mutants that still decoded: not sent
        seq = 1
        invalid = 0
        while invalid < INVALID:
            if invalid % VALID_EVERY == 0:
                seq += 1
                self._valid(seq)
                if invalid % (VALID_EVERY * 25) == 0:  # now and then a partly spoofed batch
                    seq += 1
                    self._spoofed(seq)
            template = encode(batch(FUZZ_GW, rng.randint(1, 10**9)))
            payload = fuzz_payload(rng, template)
            reason = expected_reason(payload)
            if reason is None:
                self.skipped += 1
                continue
            self.messages.append((FUZZ_TOPIC, payload))
            self.letters[(reason, base64.b64encode(payload).decode())] += 1
            invalid += 1
        seq += 1
        self._valid(seq)  # the last message is valid: it arriving means the rest was routed

    def _valid(self, seq: int) -> None:
        self.messages.append(telemetry(FUZZ_GW, seq))
        self.valid |= {(d, seq) for d in DEVICES[FUZZ_GW]}

    def _spoofed(self, seq: int) -> None:
        """gw-0 sends two of its own readings and two of gw-1's: half forwarded, half not."""
        own, foreign = DEVICES[FUZZ_GW][:2], DEVICES["gw-1"][:2]
        self.messages.append((FUZZ_TOPIC, encode(batch(FUZZ_GW, seq, own + foreign))))
        self.valid |= {(d, seq) for d in own}
        self.spoofed |= {(d, seq) for d in foreign}
        self.spoofed_batches += 1




class LetterLedger(Ledger):
    """The cloud ledger, also keeping each dead letter's topic reason and event."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.letters: list[tuple[str, DeadLetter]] = []
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        super()._on_message(client, userdata, msg)
        event = self.events[-1]
        if isinstance(event, DeadLetter):
            with self._lock:
                self.letters.append((msg.topic.rsplit("/", 1)[1], event))

    def letter_count(self) -> int:
        with self._lock:
            return len(self.letters)


def test_fuzzing_the_live_bridge(mosquitto: Mosquitto, cloud: Mosquitto, tmp_path: Path) -> None:
    plan = FuzzPlan(seed=4)
    assert sum(plan.letters.values()) >= 10_000
    log, port = tmp_path / "bridge.log", free_port()
    config = write_config(tmp_path, mosquitto, cloud, "bridge-fuzz", port)
    ledger = LetterLedger(cloud, "fuzz-ledger", topics.subscription("mesh_telemetry"),
                          topics.subscription("dead_letter"))
    proc = spawn_bridge(config, log)
    publisher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="fuzz-pub")
    publisher.max_inflight_messages_set(1000)
    publisher.connect(mosquitto.host, mosquitto.port)
    publisher.loop_start()
    try:
        probe = 0
        while not ledger.received():  # the bridge's session exists once a probe gets through
            probe += 1  # probe seqs are far above the plan's
            publisher.publish(*telemetry(FUZZ_GW, PROBE_SEQ + probe), qos=1).wait_for_publish(5)
            time.sleep(0.1)
            assert proc.poll() is None, log.read_text()[-3000:]
        infos = [publisher.publish(topic, payload, qos=1) for topic, payload in plan.messages]
        for info in infos:
            info.wait_for_publish(WAIT_S)
        ledger.wait_for(plan.valid, WAIT_S)
        letters_due = sum(plan.letters.values()) + plan.spoofed_batches
        wait_until(lambda: ledger.letter_count() >= letters_due, what="every dead letter")
        time.sleep(0.3)  # anything extra would arrive by now
        assert proc.poll() is None, log.read_text()[-3000:]
        assert healthz(port) == 200
    finally:
        publisher.disconnect()
        publisher.loop_stop()
        ledger.close()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(20)
    assert code == 0, log.read_text()[-3000:]

    forwarded = {(d, s) for d, s in ledger.received() if s < PROBE_SEQ}
    assert forwarded == plan.valid  # every valid reading, no spoofed or mutated one
    letters: Counter[tuple[str, str]] = Counter()
    spoofed: set[tuple[str, int]] = set()
    for reason, letter in ledger.letters:
        assert reason == letter.reason
        if reason == "unauthorized_device":
            spoofed |= {(r.device_id, r.seq) for r in
                        decode(base64.b64decode(letter.payload_b64), TelemetryBatch).readings}
        else:
            letters[(reason, letter.payload_b64)] += 1
    assert spoofed == plan.spoofed
    assert letters == plan.letters, (
        f"missing {sum((plan.letters - letters).values())}, "
        f"extra {sum((letters - plan.letters).values())}")
