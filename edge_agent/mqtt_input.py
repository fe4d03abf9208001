"""Raw readings of local devices over MQTT: subscribe, decode, hand over, acknowledge late.

Local devices that number nothing publish one :class:`~meshwatch.contract.RawReading` per
message on ``mw/v1/site/{site}/gw/{gateway}/raw/{device}`` (QoS1) to the gateway's local
broker. :class:`MqttReadingInput` subscribes to its gateway's raw topics with a paho-mqtt
client of its own and turns each message into one of two items:

- :class:`DeviceReading` for a good message, passed to ``on_reading``; the agent assigns the
  seq (:meth:`edge_agent.agent.EdgeAgent.submit_reading`);
- :class:`InvalidMessage` for a message that breaks the contract (bad JSON, bad metric name,
  NaN, wrong type, a device level that is not an id...), passed to ``on_invalid``; it becomes
  a ``DeadLetter`` with the reason code and the original bytes
  (:meth:`MqttReadingInput.dead_letter`).

The callbacks run on paho's network thread: they must only hand the item over (``meshwatch
edge`` puts it on the queue its OPC-UA readings use), never touch the outbox.

**Session.** The client id is stable (``mw-edge-raw-{site}-{gateway}``) and the session
persistent: MQTT 5 connects with ``clean_start=False`` every time and a session expiry
(``session_expiry_s``), MQTT 3.1.1 with ``clean_session=False``. So readings published while
the agent is stopped or restarting wait in the broker and arrive once it is back.

**Acknowledgement: after the outbox.** The client uses paho's manual acknowledgement: the
PUBACK of a message is sent only when the caller calls :meth:`MqttReadingInput.ack` with its
:class:`Delivery`, which ``meshwatch edge`` does once the reading (or its dead letter) is in
the durable outbox (:class:`AckQueue` keeps that in arrival order). A crash before that point
loses nothing: the broker still holds the message and sends it again to the session. The
price is duplicates, never loss: a message stored but not yet acknowledged when the agent
dies or the connection drops is delivered again and stored again under a new seq (a
duplicate with the same device and ``ts_ms``). An acknowledgement is only ever sent on the
connection that received the message, since packet ids are reused.

The broker sends only a window of unacknowledged messages (mosquitto's
``max_inflight_messages``, 20 by default), so the caller must store what it holds soon
rather than wait for a full telemetry batch; ``meshwatch edge`` writes pending readings as
soon as its input queue runs dry while raw messages wait for their acknowledgement.

>>> from meshwatch.contract import encode
>>> got = []
>>> source = MqttReadingInput("mqtt://127.0.0.1:1883", site="dma-01", gateway_id="gw-01",
...                           on_reading=got.append, on_invalid=got.append)
>>> source.topic
'mw/v1/site/dma-01/gw/gw-01/raw/+'
>>> payload = encode(RawReading(ts_ms=1767225600000, metrics={"flow_lpm": 3.5}))
>>> source.handle("mw/v1/site/dma-01/gw/gw-01/raw/mtr-1", payload, Delivery(1, 1, 0))
>>> source.handle("mw/v1/site/dma-01/gw/gw-01/raw/mtr-1", b'{"ts_ms": 1767225600000}',
...               Delivery(2, 1, 0))
>>> got[0].device_id, got[0].metrics, got[1].reason.value, got[1].detail
('mtr-1', {'flow_lpm': 3.5}, 'missing_field', 'metrics: Field required')
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.publisher import MqttProtocol, paho_protocol, parse_broker_url
from meshwatch.contract import (
    ContractError,
    DeadLetter,
    QualityFlag,
    RawReading,
    Reason,
    decode,
    topics,
)

__all__ = ["AckQueue", "Delivery", "DeviceReading", "InvalidMessage", "MqttReadingInput"]

log = logging.getLogger(__name__)

MAX_DETAIL_CHARS = 2000
"""A dead letter's detail is cut to this length (the contract's limit for text)."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """Which MQTT message to acknowledge: its packet id and QoS, and the connection it came on."""

    mid: int
    qos: int
    connection: int


@dataclass(frozen=True, slots=True)
class DeviceReading:
    """A good raw reading; ``device_id`` comes from the topic."""

    device_id: str
    ts_ms: int
    metrics: dict[str, float]
    quality: tuple[QualityFlag, ...]
    delivery: Delivery


@dataclass(frozen=True, slots=True)
class InvalidMessage:
    """A raw message that broke the contract, with the reason code and the original bytes."""

    topic: str
    payload: bytes
    reason: Reason
    detail: str
    received_ms: int
    delivery: Delivery


OnReading = Callable[[DeviceReading], None]
OnInvalid = Callable[[InvalidMessage], None]


class MqttReadingInput:
    """Subscribe to a gateway's raw device topics; see the module doc.

    Args:
        url: ``mqtt://[user[:password]@]host[:port]`` of the local broker.
        site, gateway_id: whose ``site_raw`` topics to follow.
        on_reading, on_invalid: called on paho's thread for each message; hand over only.
        protocol: ``"5"`` or ``"3.1.1"``.
        session_expiry_s: MQTT 5 only: how long the broker keeps the session (and queues
            readings for it) while the agent is away.
        client_id: defaults to ``mw-edge-raw-{site}-{gateway_id}``; keep it stable, the
            session is bound to it.

    """

    def __init__(
        self,
        url: str,
        *,
        site: str,
        gateway_id: str,
        on_reading: OnReading,
        on_invalid: OnInvalid,
        protocol: MqttProtocol = "5",
        session_expiry_s: int = 7 * 24 * 3600,
        client_id: str | None = None,
    ) -> None:
        self.address = parse_broker_url(url)
        paho_protocol(protocol)  # validates it
        self.protocol = protocol
        self.site = site
        self.gateway_id = gateway_id
        self.topic = topics.subscription("site_raw", site=site, gateway=gateway_id)
        self.client_id = client_id or f"mw-edge-raw-{site}-{gateway_id}"
        self.source_broker = f"{self.address.host}:{self.address.port}"
        self.on_reading = on_reading
        self.on_invalid = on_invalid
        self.session_expiry_s = session_expiry_s
        self.messages = 0
        self.readings = 0
        self.invalid: Counter[Reason] = Counter()
        self.acked = 0
        self.connects = 0
        self._client: mqtt.Client | None = None
        self._lock = threading.Lock()
        self._connection = 0  # grows with every successful connect
        self._connected = False

    def start(self) -> Self:
        """Connect in the background (paho retries with back-off, 1 to 30 s) and subscribe.

        Raises:
            RuntimeError: it was already started.

        """
        if self._client is not None:
            msg = "MqttReadingInput.start() was already called; create a new input instead"
            raise RuntimeError(msg)
        v5 = self.protocol == "5"
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=paho_protocol(self.protocol),
                             clean_session=None if v5 else False, manual_ack=True)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        if self.address.username is not None:
            client.username_pw_set(self.address.username, self.address.password)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        if v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = self.session_expiry_s
            # clean_start=False on every connect, the first included: a session created
            # with clean_start=True is not persisted by mosquitto 2.0, expiry or not.
            client.connect_async(self.address.host, self.address.port, keepalive=30,
                                 clean_start=False, properties=properties)
        else:
            client.connect_async(self.address.host, self.address.port, keepalive=30)
        client.loop_start()
        self._client = client
        return self

    def stop(self) -> None:
        """Disconnect; messages not acknowledged by then are sent again at the next start."""
        with self._lock:
            self._connected = False
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()

    def ack(self, delivery: Delivery) -> bool:
        """Acknowledge a message whose content is stored; False if its connection is gone.

        A message of a lost connection is not acknowledged: the broker sends it again.
        """
        with self._lock:
            current = self._connected and delivery.connection == self._connection
        if not current or self._client is None:
            return False
        if self._client.ack(delivery.mid, delivery.qos) != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return False
        self.acked += 1
        return True

    def dead_letter(self, message: InvalidMessage) -> DeadLetter:
        """The ``DeadLetter`` event that records ``message``."""
        return DeadLetter(
            reason=message.reason.value, detail=message.detail[:MAX_DETAIL_CHARS],
            payload_b64=base64.b64encode(message.payload).decode("ascii"),
            received_ms=message.received_ms, source_broker=self.source_broker,
            source_topic=message.topic[:MAX_DETAIL_CHARS], client_id=self.client_id,
        )

    def stats(self) -> dict[str, int]:
        """Counters: messages, readings, invalid messages (in all and by reason), acks."""
        return {
            "raw_messages": self.messages,
            "raw_readings": self.readings,
            "raw_invalid": sum(self.invalid.values()),
            **{f"raw_invalid_{reason.value}": n for reason, n in sorted(self.invalid.items())},
            "raw_acked": self.acked,
            "raw_connects": self.connects,
        }

    def handle(self, topic: str, payload: bytes, delivery: Delivery) -> None:
        """Decode one message and pass it to ``on_reading`` or ``on_invalid``; never raises."""
        self.messages += 1
        try:
            device_id = self._device_of(topic)
            raw = decode(payload, RawReading)
        except ContractError as exc:
            self.invalid[exc.reason] += 1
            log.warning("dead letter %s on %s: %s", exc.reason.value, topic[:200], exc.detail)
            self.on_invalid(InvalidMessage(topic, payload, exc.reason, exc.detail,
                                           int(time.time() * 1000), delivery))
            return
        self.readings += 1
        self.on_reading(DeviceReading(device_id, raw.ts_ms, dict(raw.metrics), raw.quality,
                                      delivery))

    def _device_of(self, topic: str) -> str:
        parsed = topics.parse(topic)
        wanted = {"site": self.site, "gateway": self.gateway_id}
        if parsed.kind != "site_raw" or any(parsed.params[k] != v for k, v in wanted.items()):
            msg = f"{topic[:200]!r} is not a raw topic of this gateway ({self.topic})"
            raise ContractError(Reason.BAD_TOPIC, msg)
        return parsed.params["device"]

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- paho callbacks (paho's network thread: decode and hand over only) --------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: mqtt.ConnectFlags,
                    reason_code: ReasonCode, properties: Properties | None) -> None:
        if reason_code.is_failure:
            log.warning("the local broker %s refused %s: %s", self.source_broker,
                        self.client_id, reason_code)
            return
        with self._lock:
            self._connection += 1
            self._connected = True
        self.connects += 1
        client.subscribe(self.topic, qos=1)  # harmless when the session kept it

    def _on_disconnect(self, client: mqtt.Client, userdata: Any,
                       flags: mqtt.DisconnectFlags, reason_code: ReasonCode,
                       properties: Properties | None) -> None:
        with self._lock:
            self._connected = False

    def _on_message(self, client: mqtt.Client, userdata: Any,
                    message: mqtt.MQTTMessage) -> None:
        with self._lock:
            connection = self._connection
        self.handle(message.topic, bytes(message.payload),
                    Delivery(message.mid, message.qos, connection))


class AckQueue:
    """Acknowledge deliveries in arrival order, each once the readings before it are stored.

    ``after(delivery, readings=n)`` says the delivery may be acknowledged once ``n`` readings
    (counted from the start) are stored; ``release(stored)`` acknowledges every delivery at
    the front whose count is reached. A dead letter, stored at once, waits behind the
    readings that arrived before it, so PUBACKs keep the order MQTT asks for.

    >>> acked = []
    >>> acks = AckQueue(lambda d: acked.append(d.mid) or True)
    >>> acks.after(Delivery(1, 1, 0), readings=3)  # the 3rd reading so far
    >>> acks.after(Delivery(2, 1, 0), readings=3)  # a dead letter right behind it
    >>> acks.release(stored=2), acked
    (0, [])
    >>> acks.release(stored=3), acked, acks.waiting
    (2, [1, 2], 0)
    """

    def __init__(self, ack: Callable[[Delivery], bool]) -> None:
        self._ack = ack
        self._waiting: deque[tuple[int, Delivery]] = deque()

    @property
    def waiting(self) -> int:
        """Deliveries not acknowledged yet."""
        return len(self._waiting)

    def after(self, delivery: Delivery, *, readings: int) -> None:
        """Acknowledge ``delivery`` once ``readings`` readings are stored."""
        self._waiting.append((readings, delivery))

    def release(self, stored: int) -> int:
        """Acknowledge what ``stored`` readings allow; returns how many were released."""
        released = 0
        while self._waiting and self._waiting[0][0] <= stored:
            self._ack(self._waiting.popleft()[1])
            released += 1
        return released
