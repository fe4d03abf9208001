"""The bridge's I/O shell: site broker in, :class:`Router` in the middle, cloud broker out.

**Threads.**

- *Site network thread* (paho ``loop_start``): :class:`SiteConsumer` receives a site message,
  takes one in-flight slot (waiting while ``max_in_flight`` site messages are unacknowledged)
  and queues it with its :class:`~edge_agent.mqtt_input.Delivery`. It never routes.
- *Worker thread* (:meth:`Bridge._run`): the only thread that touches the router (it is not
  thread-safe) and the cloud client (:class:`CloudLink`, driven with ``client.loop()``). It
  routes queued messages, publishes every output at QoS1, matches PUBACKs, acknowledges site
  messages and publishes the heartbeat.
- Any other thread may read :class:`Liveness` and :class:`Metrics` (``/healthz``,
  ``/metrics``) and call :meth:`Bridge.stop`.

**Ack rule.** A site message is acknowledged (paho manual ack, on the connection that received
it) once every message it produced has a successful PUBACK from the cloud broker *and* every
site message received before it is done; a message with no output (a status, a duplicate) is
done at once. Acknowledging in arrival order keeps MQTT's PUBACK order, and it means a
redelivered copy, taken for a duplicate by the router, is never acknowledged before the
original's outputs are safe.

**Bounds.** At most ``max_in_flight`` site messages are held (queued, routed or waiting for
PUBACKs). MQTT 5 tells the site broker so (Receive Maximum in CONNECT), so it keeps the rest
in the session's queue; on MQTT 3.1.1 the site network thread waits for a slot instead.

**Faults.**

- *Cloud connection lost*: the outputs not yet PUBACKed stay in memory with their site
  message and are published again, in order, on the next connection (a new paho client;
  packet ids of an old connection are ignored). At-least-once: the cloud broker may get some
  twice; downstream de-duplicates by ``(device, seq)``. Site messages wait meanwhile.
- *Site connection lost*: what was received on it can no longer be acknowledged; its outputs
  are still published, and the broker sends the message again on the new connection, where the
  router counts its readings as duplicates (so they are not forwarded twice).
- *Bridge killed*: unacknowledged site messages stay in the persistent session (stable client
  id, ``clean_start=False``, session expiry) and come again to the next process, whose fresh
  router forwards them: duplicates downstream, no loss.
- *A PUBACK with a failure code*: logged and counted in ``rejected``; the output stays pending
  and is sent again after the next reconnect (mosquitto drops the connection after refusing).

**Liveness.** Every ``heartbeat_s`` the worker publishes a heartbeat on
``mw/v1/bridge/{client_id}/heartbeat`` and subscribes to it; the bridge is healthy while
a heartbeat came back, or a forwarded message was PUBACKed, within ``healthy_within_s``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from edge_agent.mqtt_input import Delivery
from edge_agent.publisher import BrokerAddress, MqttProtocol, paho_protocol
from mesh_bridge.route import Incoming, Message, Routed, Router
from meshwatch.backoff import Backoff
from meshwatch.contract import topics

__all__ = ["Bridge", "BridgeSettings", "CloudLink", "Liveness", "Metrics", "SiteConsumer"]

log = logging.getLogger(__name__)

SITE_KINDS = ("site_status", "site_telemetry", "site_dead_letter")
"""Subscribed in this order: births first, so devices are granted before their telemetry."""
POLL_S = 0.01
LAG_BUCKETS_S = (0.01, 0.05, 0.1, 0.5, 1, 5, 30, 60, 300, 3600)


@dataclass(frozen=True, slots=True)
class BridgeSettings:
    """How the bridge connects and how much it holds; see the module doc."""

    site: BrokerAddress
    cloud: BrokerAddress
    site_protocol: MqttProtocol = "5"
    cloud_protocol: MqttProtocol = "5"
    client_id: str = "mw-bridge"
    session_expiry_s: int = 7 * 24 * 3600
    keepalive_s: int = 30
    max_in_flight: int = 100
    heartbeat_s: float = 5.0
    healthy_within_s: float = 15.0
    connect_timeout_s: float = 5.0
    reconnect_max_s: float = 10.0


class Liveness:
    """When something last went through the cloud broker (monotonic seconds)."""

    def __init__(self, healthy_within_s: float) -> None:
        self.healthy_within_s = healthy_within_s
        self.last_through: float | None = None

    def mark(self) -> None:
        """A heartbeat came back, or a forwarded message was PUBACKed."""
        self.last_through = time.monotonic()

    def healthy(self) -> bool:
        """Whether something went through within ``healthy_within_s``."""
        last = self.last_through
        return last is not None and time.monotonic() - last <= self.healthy_within_s


class Metrics:
    """The bridge's Prometheus metrics, on a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r, p = self.registry, "meshwatch_bridge_"
        self.messages_in = Counter(p + "messages_in", "Site messages routed", registry=r)
        self.readings_in = Counter(p + "readings_in", "Readings in site telemetry", registry=r)
        self.forwarded = Counter(p + "readings_forwarded", "Readings forwarded", registry=r)
        self.messages_out = Counter(p + "messages_out", "Cloud messages PUBACKed", registry=r)
        self.republished = Counter(p + "republished", "Outputs sent again after a reconnect",
                                   registry=r)
        self.rejected = Counter(p + "rejected", "PUBACKs with a failure code", registry=r)
        self.dead_letters = Counter(p + "dead_letters", "Dead letters published, by reason",
                                    ["reason"], registry=r)
        self.duplicates = Counter(p + "duplicates", "Duplicate readings dropped", registry=r)
        self.late = Counter(p + "late", "Readings forwarded with the late flag", registry=r)
        self.site_acked = Counter(p + "site_acked", "Site messages acknowledged", registry=r)
        self.lag = Histogram(p + "lag_seconds", "Receive time minus the batch's sent_ms",
                             buckets=LAG_BUCKETS_S, registry=r)
        self.in_flight = Gauge(p + "in_flight", "Site messages held, not yet acknowledged",
                               registry=r)
        self.cloud_connected = Gauge(p + "cloud_connected", "1 while the cloud link is up",
                                     registry=r)

    def routed(self, routed: Routed) -> None:
        """Count one routed site message."""
        c = routed.counts
        self.messages_in.inc()
        self.readings_in.inc(c.readings_in)
        self.forwarded.inc(c.forwarded)
        self.duplicates.inc(c.duplicates)
        self.late.inc(c.late)
        for reason, n in c.dead_letters.items():
            self.dead_letters.labels(reason).inc(n)
        if routed.lag_ms is not None:
            self.lag.observe(max(0, routed.lag_ms) / 1000)


def _connect_properties(session_expiry_s: int, receive_max: int | None) -> Properties:
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = session_expiry_s
    if receive_max is not None:
        properties.ReceiveMaximum = receive_max
    return properties


@dataclass(frozen=True, slots=True)
class _Job:
    incoming: Incoming
    delivery: Delivery


class SiteConsumer:
    """The site broker side: persistent session, QoS1 subscriptions, manual acknowledgement."""

    def __init__(self, settings: BridgeSettings, jobs: queue.SimpleQueue[_Job]) -> None:
        self.settings = settings
        self.address = settings.site
        self.source = f"{self.address.host}:{self.address.port}"
        self.client_id = settings.client_id
        self._jobs = jobs
        self._slots = threading.BoundedSemaphore(settings.max_in_flight)
        self._lock = threading.Lock()
        self._connection = 0
        self._connected = False
        self._taking = True
        self._last_subscribe: int | None = None
        self.subscribed = threading.Event()
        """Set once the broker confirmed the subscriptions of the first connection."""
        v5 = settings.site_protocol == "5"
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=paho_protocol(settings.site_protocol),
                             clean_session=None if v5 else False, manual_ack=True)
        client.reconnect_delay_set(min_delay=1, max_delay=max(1, int(settings.reconnect_max_s)))
        if self.address.username is not None:
            client.username_pw_set(self.address.username, self.address.password)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        self._client = client

    def start(self) -> None:
        """Connect in the background (paho retries with back-off) and subscribe."""
        s = self.settings
        if s.site_protocol == "5":
            # clean_start=False on every connect, the first included (mosquitto does not
            # persist a session created clean); Receive Maximum bounds what it sends us.
            self._client.connect_async(
                self.address.host, self.address.port, keepalive=s.keepalive_s,
                clean_start=False,
                properties=_connect_properties(s.session_expiry_s, s.max_in_flight))
        else:
            self._client.connect_async(self.address.host, self.address.port,
                                       keepalive=s.keepalive_s)
        self._client.loop_start()

    def stop_taking(self) -> None:
        """Queue no more messages; those arriving now stay unacknowledged in the session."""
        self._taking = False

    def close(self) -> None:
        """Disconnect (after the acknowledgements already given); the session stays."""
        self._client.disconnect()
        self._client.loop_stop()

    def ack(self, delivery: Delivery) -> bool:
        """Acknowledge ``delivery`` and free its slot; False if its connection is gone."""
        self._slots.release()
        with self._lock:
            current = self._connected and delivery.connection == self._connection
        if not current:
            return False
        return self._client.ack(delivery.mid, delivery.qos) == MQTTErrorCode.MQTT_ERR_SUCCESS

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: mqtt.ConnectFlags,
                    reason_code: ReasonCode, properties: Properties | None) -> None:
        if reason_code.is_failure:
            log.warning("site broker %s refused %s: %s; check site_broker credentials",
                        self.source, self.client_id, reason_code)
            return
        with self._lock:
            self._connection += 1
            self._connected = True
        log.info("connected to site broker %s as %s (session present: %s)", self.source,
                 self.client_id, flags.session_present)
        for kind in SITE_KINDS:  # harmless when the session kept them
            _, self._last_subscribe = client.subscribe(topics.subscription(kind), qos=1)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int,
                      reason_codes: list[ReasonCode], properties: Properties | None) -> None:
        if any(code.is_failure for code in reason_codes):
            log.error("site broker %s refused a subscription of %s: %s; check its ACL",
                      self.source, self.client_id, reason_codes)
        elif mid == self._last_subscribe:
            self.subscribed.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: mqtt.DisconnectFlags,
                       reason_code: ReasonCode, properties: Properties | None) -> None:
        with self._lock:
            self._connected = False
        if self._taking:
            log.warning("lost the site broker %s (%s); paho reconnects", self.source,
                        reason_code)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        while not self._slots.acquire(timeout=0.5):
            if not self._taking:
                return
        if not self._taking:
            self._slots.release()
            return
        with self._lock:
            connection = self._connection
        incoming = Incoming(msg.topic, bytes(msg.payload), int(time.time() * 1000),
                            source_broker=self.source, client_id=self.client_id)
        self._jobs.put(_Job(incoming, Delivery(msg.mid, msg.qos, connection)))


@dataclass(slots=True, eq=False)
class _Held:
    """A site message being bridged: its outputs, and which are not PUBACKed yet."""

    job: _Job
    messages: list[Message]
    unacked: set[int] = field(default_factory=set)


class CloudLink:
    """The cloud broker side, used by the worker thread only: QoS1 publishes, PUBACKs.

    Each connection gets a new paho client tagged with a generation, so PUBACKs of an older
    connection (packet ids are reused) are ignored.
    """

    def __init__(self, settings: BridgeSettings, liveness: Liveness) -> None:
        self.settings = settings
        self.address = settings.cloud
        self.client_id = f"{settings.client_id}-cloud"
        self.heartbeat_topic = topics.build("bridge_heartbeat", bridge=settings.client_id)
        self.liveness = liveness
        self.backoff = Backoff(max_s=settings.reconnect_max_s)
        self.client: mqtt.Client | None = None
        self.acked: list[tuple[int, bool]] = []  # (mid, success) since the last take_acks()
        self._generation = 0
        self._connack: ReasonCode | None = None
        self._lost = False

    @property
    def connected(self) -> bool:
        """Whether a connection is up."""
        return self.client is not None

    def connect(self) -> bool:
        """One connection attempt; False after a failure (the caller waits ``delay()``)."""
        self._generation += 1
        s = self.settings
        v5 = s.cloud_protocol == "5"
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=paho_protocol(s.cloud_protocol),
                             clean_session=None if v5 else True, userdata=self._generation)
        client.max_inflight_messages_set(0)  # bounded by max_in_flight site messages
        if self.address.username is not None:
            client.username_pw_set(self.address.username, self.address.password)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        self._connack, self._lost = None, False
        failure: str | None = None
        try:
            if v5:  # outputs are kept in memory; no session is needed
                client.connect(self.address.host, self.address.port, keepalive=s.keepalive_s,
                               clean_start=True, properties=_connect_properties(0, None))
            else:
                client.connect(self.address.host, self.address.port, keepalive=s.keepalive_s)
            deadline = time.monotonic() + s.connect_timeout_s
            while self._connack is None and not self._lost and time.monotonic() < deadline:
                if client.loop(timeout=POLL_S) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    break
            if self._connack is None:
                failure = f"no CONNACK within {s.connect_timeout_s:g}s"
            elif self._connack.is_failure:
                failure = f"refused: {self._connack}; check mesh_broker credentials"
        except OSError as exc:
            failure = str(exc) or type(exc).__name__
        if failure is not None:
            client.disconnect()
            log.warning("cannot connect to cloud broker %s:%d (%s)", self.address.host,
                        self.address.port, failure)
            return False
        self.backoff.reset()
        client.subscribe(self.heartbeat_topic, qos=0)
        self.client = client
        log.info("connected to cloud broker %s:%d as %s", self.address.host,
                 self.address.port, self.client_id)
        return True

    def publish(self, topic: str, payload: bytes) -> int | None:
        """Publish at QoS1; the packet id, or None if the connection broke."""
        assert self.client is not None
        info = self.client.publish(topic, payload, qos=1)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._lost = True
            return None
        return info.mid

    def heartbeat(self) -> None:
        """Publish a heartbeat at QoS0; it counts when it comes back."""
        assert self.client is not None
        self.client.publish(self.heartbeat_topic, str(time.time()).encode(), qos=0)

    def loop(self, timeout: float) -> bool:
        """Network I/O for up to ``timeout`` seconds; False once the connection is lost."""
        assert self.client is not None
        rc = self.client.loop(timeout=timeout)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or self._lost:
            log.warning("lost the cloud broker %s:%d (%s); unacked outputs will be sent again",
                        self.address.host, self.address.port,
                        "closed" if rc == MQTTErrorCode.MQTT_ERR_SUCCESS
                        else mqtt.error_string(rc))
            self.client.disconnect()
            self.client = None
            self.acked.clear()
            return False
        return True

    def close(self) -> None:
        """Disconnect."""
        if self.client is not None:
            self.client.disconnect()
            self.client.loop(timeout=POLL_S)
            self.client = None

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: mqtt.ConnectFlags,
                    reason_code: ReasonCode, properties: Properties | None) -> None:
        if userdata != self._generation:
            return
        receive_max = getattr(properties, "ReceiveMaximum", None)
        if receive_max is not None:  # the broker's limit: paho queues the rest
            client.max_inflight_messages_set(int(receive_max))
        self._connack = reason_code

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: mqtt.DisconnectFlags,
                       reason_code: ReasonCode, properties: Properties | None) -> None:
        if userdata == self._generation:
            self._lost = True

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int,
                    reason_code: ReasonCode, properties: Properties | None) -> None:
        if userdata == self._generation:
            self.acked.append((mid, not reason_code.is_failure))

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if userdata == self._generation and msg.topic == self.heartbeat_topic:
            self.liveness.mark()


class Bridge:
    """Site broker to cloud broker through a :class:`Router`; see the module doc.

    Usage: ``start()``, then ``stop(timeout_s)`` from any thread (it returns whether every
    held message was acknowledged).
    """

    def __init__(self, settings: BridgeSettings, router: Router,
                 metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.router = router
        self.metrics = metrics if metrics is not None else Metrics()
        self.liveness = Liveness(settings.healthy_within_s)
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self.site = SiteConsumer(settings, self._jobs)
        self.cloud = CloudLink(settings, self.liveness)
        self._held: deque[_Held] = deque()
        self._by_mid: dict[int, tuple[_Held, int]] = {}
        self._stopping = threading.Event()
        self._deadline = float("inf")
        self._next_heartbeat = 0.0
        self._thread = threading.Thread(target=self._run, name="bridge-worker", daemon=True)
        self._error: BaseException | None = None
        self.flushed = False

    @property
    def in_flight(self) -> int:
        """Site messages held (routed, waiting for PUBACKs or for earlier ones)."""
        return len(self._held)

    def start(self) -> None:
        """Start the worker and the site consumer."""
        self._thread.start()
        self.site.start()

    def stop(self, timeout_s: float = 10.0) -> bool:
        """Stop consuming, finish what is held (up to ``timeout_s``), disconnect.

        Returns True if every held message was acknowledged.

        Raises:
            RuntimeError: the worker thread had died of an unexpected error (chained).

        """
        self.site.stop_taking()
        self._deadline = time.monotonic() + timeout_s
        self._stopping.set()
        self._thread.join(timeout_s + self.settings.connect_timeout_s + 5)
        self.site.close()
        if self._error is not None:
            msg = f"the bridge worker thread failed: {self._error!r}; see the log"
            raise RuntimeError(msg) from self._error
        return self.flushed

    def _run(self) -> None:
        try:
            while not self._done():
                if self.cloud.connected:
                    self._step()
                elif self.cloud.connect():
                    self.metrics.cloud_connected.set(1)
                    self._republish()
                else:
                    self._pause(self.cloud.backoff.next_delay())
            self.flushed = not self._held and self._jobs.empty()
            self.cloud.close()
        except BaseException as exc:  # reported by stop()
            log.exception("the bridge worker thread stopped")
            self._error = exc

    def _pause(self, delay: float) -> None:
        """Wait before reconnecting; stop() cuts it short, but flushing keeps retrying."""
        if self._stopping.is_set():
            time.sleep(max(0.0, min(delay, self._deadline - time.monotonic())))
        else:
            self._stopping.wait(delay)

    def _done(self) -> bool:
        if not self._stopping.is_set():
            return False
        return (not self._held and self._jobs.empty()) or time.monotonic() >= self._deadline

    def _step(self) -> None:
        took = self._take_jobs()
        if not self.cloud.loop(0 if took else POLL_S):
            self.metrics.cloud_connected.set(0)
            self._by_mid.clear()
            return
        self._match_pubacks()
        self._release()
        now = time.monotonic()
        if now >= self._next_heartbeat:
            self.cloud.heartbeat()
            self._next_heartbeat = now + self.settings.heartbeat_s

    def _take_jobs(self) -> int:
        took = 0
        while took < self.settings.max_in_flight:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            took += 1
            routed = self.router.route(job.incoming)
            self.metrics.routed(routed)
            held = _Held(job, routed.messages, set(range(len(routed.messages))))
            self._held.append(held)
            self._send(held)
        self.metrics.in_flight.set(len(self._held))
        return took

    def _send(self, held: _Held) -> None:
        for index in sorted(held.unacked):
            message = held.messages[index]
            mid = self.cloud.publish(message.topic, message.payload)
            if mid is None:
                return  # sent again after the reconnect
            self._by_mid[mid] = (held, index)

    def _republish(self) -> None:
        waiting = [h for h in self._held if h.unacked]
        for held in waiting:
            self.metrics.republished.inc(len(held.unacked))
            self._send(held)
        if waiting:
            log.info("sent again the outputs of %d site messages", len(waiting))

    def _match_pubacks(self) -> None:
        for mid, ok in self.cloud.acked:
            entry = self._by_mid.pop(mid, None)
            if entry is None:
                continue  # the heartbeat, or a message of an older connection
            held, index = entry
            if ok:
                held.unacked.discard(index)
                self.metrics.messages_out.inc()
                self.liveness.mark()
            else:
                self.metrics.rejected.inc()
                log.error("cloud broker refused a message on %s; it is sent again after the "
                          "next reconnect; check the bridge account's ACL",
                          held.messages[index].topic)
        self.cloud.acked.clear()

    def _release(self) -> None:
        held = self._held
        while held and not held[0].unacked:
            done = held.popleft()
            if self.site.ack(done.job.delivery):
                self.metrics.site_acked.inc()
        self.metrics.in_flight.set(len(held))
