"""The bridge's I/O process: sources in, router processes in the middle, cloud broker out.

**Threads and processes.** Everything meets on one event queue, read by one worker thread:

- *Sources* put :class:`Job` items: a :class:`SiteConsumer` per site broker (paho network
  thread; it takes one in-flight slot per message, waiting while ``max_in_flight`` are
  unacknowledged) and optionally the OPC-UA source (:mod:`mesh_bridge.opcua_source`).
- *Router processes* (:mod:`mesh_bridge.routing`) decode, validate, authorize, de-duplicate,
  partition and coalesce; their answers (:class:`~mesh_bridge.routing.RoutingResult`) come back
  as events through a reader thread each.
- *The cloud connection* (:class:`CloudLink`, a paho client with its own network thread) puts
  PUBACKs and its loss as events.
- *Worker thread* (:meth:`Bridge._run`): sends jobs to the routers, publishes every output at
  QoS1, matches PUBACKs, acknowledges site messages and publishes the heartbeat. It blocks on
  the queue, so it wakes as soon as anything happens.
- Any other thread may read :class:`Liveness`, :class:`Metrics` and
  :class:`~mesh_bridge.stats.PipelineStats` (``/healthz``, ``/metrics``, the InfluxDB
  statistics) and call :meth:`Bridge.stop`.

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
- *A router process dies*: the worker stops with an error (:attr:`Bridge.failed`), so the
  service exits non-zero; what was not acknowledged comes again to the next process.

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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from edge_agent.mqtt_input import Delivery
from edge_agent.publisher import BrokerAddress, MqttProtocol, apply_address, paho_protocol
from mesh_bridge.coalesce import MeshMessage
from mesh_bridge.ledger import Counts
from mesh_bridge.route import Incoming
from mesh_bridge.routing import RouterFailed, RouterPool, RouterSpec, RoutingResult
from mesh_bridge.stats import PipelineStats
from meshwatch.backoff import Backoff
from meshwatch.contract import DeviceStatus, decode, topics

__all__ = ["Bridge", "BridgeSettings", "CloudLink", "Job", "Liveness", "Metrics", "SiteBroker",
           "SiteConsumer", "Source"]

log = logging.getLogger(__name__)

SITE_KINDS = ("site_status", "site_telemetry", "site_scores", "site_alerts", "site_dead_letter")
"""Subscribed in this order: births first, so devices are granted before their telemetry."""
POLL_S = 0.05
"""The longest the worker waits for an event before its housekeeping (stop, heartbeat)."""
LAG_BUCKETS_S = (0.01, 0.05, 0.1, 0.5, 1, 5, 30, 60, 300, 3600)


@dataclass(frozen=True, slots=True)
class SiteBroker:
    """One site broker to consume; ``client_id`` defaults to the bridge's."""

    address: BrokerAddress
    protocol: MqttProtocol = "5"
    client_id: str | None = None


@dataclass(frozen=True, slots=True)
class BridgeSettings:
    """How the bridge connects and how much it holds; see the module doc.

    ``max_in_flight`` bounds the site messages held per source; ``routing_processes`` is how
    many router processes decode and route (:mod:`mesh_bridge.routing`).
    """

    sites: tuple[SiteBroker, ...]
    cloud: BrokerAddress
    cloud_protocol: MqttProtocol = "5"
    client_id: str = "mw-bridge"
    session_expiry_s: int = 7 * 24 * 3600
    keepalive_s: int = 30
    max_in_flight: int = 500
    routing_processes: int = 1
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

    def routed(self, c: Counts, lag_ms: int | None) -> None:
        """Count one routed site message."""
        self.messages_in.inc()
        self.readings_in.inc(c.readings_in)
        self.forwarded.inc(c.forwarded)
        self.duplicates.inc(c.duplicates)
        self.late.inc(c.late)
        for reason, n in c.dead_letters.items():
            self.dead_letters.labels(reason).inc(n)
        if lag_ms is not None:
            self.lag.observe(max(0, lag_ms) / 1000)


def _connect_properties(session_expiry_s: int, receive_max: int | None) -> Properties:
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = session_expiry_s
    if receive_max is not None:
        properties.ReceiveMaximum = receive_max
    return properties


class Source(Protocol):
    """Where site messages come from: a site broker, or the bridge's own OPC-UA input.

    A source puts :class:`Job` items on the bridge's queue, at most ``max_in_flight`` not yet
    acknowledged, and is told with :meth:`ack` when one is safe in the cloud broker.
    """

    name: str

    def start(self) -> None:
        """Begin delivering jobs."""

    def stop_taking(self) -> None:
        """Deliver no more jobs; what is not acknowledged comes again next start."""

    def close(self) -> None:
        """Release connections and files (after the acknowledgements already given)."""

    def ack(self, delivery: Any) -> bool:
        """``delivery``'s outputs are safe: drop it at the source; False if no longer possible."""


@dataclass(frozen=True, slots=True)
class Job:
    """One site message to route, with what its source needs to acknowledge it."""

    incoming: Incoming
    delivery: Any
    source: Source


class SiteConsumer:
    """The site broker side: persistent session, QoS1 subscriptions, manual acknowledgement."""

    def __init__(self, settings: BridgeSettings, site: SiteBroker,
                 put: Callable[[Job], None]) -> None:
        self.settings = settings
        self.address = site.address
        self.name = f"{self.address.host}:{self.address.port}"
        self.client_id = site.client_id or settings.client_id
        self.protocol = site.protocol
        self._put = put
        self._slots = threading.BoundedSemaphore(settings.max_in_flight)
        self._lock = threading.Lock()
        self._connection = 0
        self._connected = False
        self._taking = True
        self._last_subscribe: int | None = None
        self.subscribed = threading.Event()
        """Set once the broker confirmed the subscriptions of the first connection."""
        v5 = site.protocol == "5"
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=paho_protocol(site.protocol),
                             clean_session=None if v5 else False, manual_ack=True)
        client.reconnect_delay_set(min_delay=1, max_delay=max(1, int(settings.reconnect_max_s)))
        apply_address(client, self.address)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        self._client = client

    def start(self) -> None:
        """Connect in the background (paho retries with back-off) and subscribe."""
        s = self.settings
        if self.protocol == "5":
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
                        self.name, self.client_id, reason_code)
            return
        with self._lock:
            self._connection += 1
            self._connected = True
        log.info("connected to site broker %s as %s (session present: %s)", self.name,
                 self.client_id, flags.session_present)
        for kind in SITE_KINDS:  # harmless when the session kept them
            _, self._last_subscribe = client.subscribe(topics.subscription(kind), qos=1)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int,
                      reason_codes: list[ReasonCode], properties: Properties | None) -> None:
        if any(code.is_failure for code in reason_codes):
            log.error("site broker %s refused a subscription of %s: %s; check its ACL",
                      self.name, self.client_id, reason_codes)
        elif mid == self._last_subscribe:
            self.subscribed.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: mqtt.DisconnectFlags,
                       reason_code: ReasonCode, properties: Properties | None) -> None:
        with self._lock:
            self._connected = False
        if self._taking:
            log.warning("lost the site broker %s (%s); paho reconnects", self.name,
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
                            source_broker=self.name, client_id=self.client_id)
        self._put(Job(incoming, Delivery(msg.mid, msg.qos, connection), self))


@dataclass(slots=True, eq=False)
class _Held:
    """A site message being bridged.

    Once ``routed``, ``waiting`` counts the outputs holding its readings that are not PUBACKed
    yet (open coalescer batches included); at 0, and once every earlier one is done, it is
    acknowledged.
    """

    job: Job
    job_id: int
    routed: bool = False
    waiting: int = 0


@dataclass(frozen=True, slots=True)
class _PubAck:
    """The cloud broker's PUBACK for packet ``mid`` of connection ``generation``."""

    generation: int
    mid: int
    ok: bool


@dataclass(frozen=True, slots=True)
class _Lost:
    """Connection ``generation`` to the cloud broker is gone."""

    generation: int


_Event = Job | _PubAck | _Lost | RoutingResult | RouterFailed


class CloudLink:
    """The cloud broker side: QoS1 publishes from the worker thread, PUBACKs as events.

    Each connection gets a new paho client (with its own network thread) tagged with a
    generation; its PUBACKs and its loss are put on the worker's event queue with that
    generation, so those of an older connection (packet ids are reused) are ignored.
    """

    def __init__(self, settings: BridgeSettings, liveness: Liveness,
                 put: Callable[[_Event], None]) -> None:
        self.settings = settings
        self.address = settings.cloud
        self.client_id = f"{settings.client_id}-cloud"
        self.heartbeat_topic = topics.build("bridge_heartbeat", bridge=settings.client_id)
        self.liveness = liveness
        self.backoff = Backoff(max_s=settings.reconnect_max_s)
        self.client: mqtt.Client | None = None
        self.generation = 0
        self._put = put
        self._connack: ReasonCode | None = None
        self._connacked = threading.Event()

    @property
    def connected(self) -> bool:
        """Whether a connection is up (as far as the worker knows)."""
        return self.client is not None

    def connect(self) -> bool:
        """One connection attempt; False after a failure (the caller waits ``delay()``)."""
        self.generation += 1
        s = self.settings
        v5 = s.cloud_protocol == "5"
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=paho_protocol(s.cloud_protocol),
                             clean_session=None if v5 else True, userdata=self.generation)
        client.max_inflight_messages_set(0)  # bounded by max_in_flight site messages
        apply_address(client, self.address)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        self._connack = None
        self._connacked.clear()
        failure: str | None = None
        try:
            if v5:  # outputs are kept in memory; no session is needed
                client.connect(self.address.host, self.address.port, keepalive=s.keepalive_s,
                               clean_start=True, properties=_connect_properties(0, None))
            else:
                client.connect(self.address.host, self.address.port, keepalive=s.keepalive_s)
            client.loop_start()
            if not self._connacked.wait(s.connect_timeout_s):
                failure = f"no CONNACK within {s.connect_timeout_s:g}s"
            elif self._connack is None or self._connack.is_failure:
                failure = f"refused: {self._connack}; check mesh_broker credentials"
        except OSError as exc:
            failure = str(exc) or type(exc).__name__
        if failure is not None:
            client.disconnect()
            client.loop_stop()
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
        """Publish at QoS1; the packet id, or None if the connection broke (it is dropped)."""
        assert self.client is not None
        info = self.client.publish(topic, payload, qos=1)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._put(_Lost(self.generation))
            return None
        return info.mid

    def heartbeat(self) -> None:
        """Publish a heartbeat at QoS0; it counts when it comes back."""
        assert self.client is not None
        self.client.publish(self.heartbeat_topic, str(time.time()).encode(), qos=0)

    def drop(self) -> None:
        """Forget the current connection after a loss (unacked outputs are sent again)."""
        log.warning("lost the cloud broker %s:%d; unacked outputs will be sent again",
                    self.address.host, self.address.port)
        self.close()

    def close(self) -> None:
        """Disconnect and stop the connection's network thread."""
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()
            self.client = None

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: mqtt.ConnectFlags,
                    reason_code: ReasonCode, properties: Properties | None) -> None:
        if userdata != self.generation:
            return
        receive_max = getattr(properties, "ReceiveMaximum", None)
        if receive_max is not None:  # the broker's limit: paho queues the rest
            client.max_inflight_messages_set(int(receive_max))
        self._connack = reason_code
        self._connacked.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: mqtt.DisconnectFlags,
                       reason_code: ReasonCode, properties: Properties | None) -> None:
        self._put(_Lost(userdata))

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int,
                    reason_code: ReasonCode, properties: Properties | None) -> None:
        self._put(_PubAck(userdata, mid, not reason_code.is_failure))

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if userdata == self.generation and msg.topic == self.heartbeat_topic:
            self.liveness.mark()


class Bridge:
    """Site sources to the cloud broker through router processes; see the module doc.

    Usage: ``start()``, then ``stop(timeout_s)`` from any thread (it returns whether every
    held message was acknowledged). ``extra_sources`` are built with the function that queues
    a :class:`Job` (the bridge's OPC-UA input, :mod:`mesh_bridge.opcua_source`).
    """

    def __init__(self, settings: BridgeSettings, routing: RouterSpec,
                 metrics: Metrics | None = None,
                 extra_sources: Callable[[Callable[[Job], None]], list[Source]] | None = None,
                 ) -> None:
        self.settings = settings
        self.metrics = metrics if metrics is not None else Metrics()
        self.stats = PipelineStats(settings.client_id)
        self.liveness = Liveness(settings.healthy_within_s)
        self._events: queue.SimpleQueue[_Event] = queue.SimpleQueue()
        put = self._events.put
        self.sites = [SiteConsumer(settings, site, put) for site in settings.sites]
        self.sources: list[Source] = [*self.sites, *(extra_sources(put) if extra_sources else [])]
        self.cloud = CloudLink(settings, self.liveness, put)
        self.routers = RouterPool(routing, settings.routing_processes, put)
        self._linger_s = routing.linger_s
        self._held: deque[_Held] = deque()
        self._by_job: dict[int, _Held] = {}
        self._next_job = 0
        self._to_route: list[tuple[int, Incoming]] = []
        self._flush_asked_at: float | None = None
        self._outputs: dict[int, MeshMessage[_Held]] = {}  # not PUBACKed, in creation order
        self._next_output = 0
        self._by_mid: dict[int, int] = {}  # packet id -> output number, this connection
        self._stopping = threading.Event()
        self._deadline = float("inf")
        self._next_heartbeat = 0.0
        self._thread = threading.Thread(target=self._run, name="bridge-worker", daemon=True)
        self._error: BaseException | None = None
        self.flushed = False

    @property
    def site(self) -> SiteConsumer:
        """The first site consumer."""
        return self.sites[0]

    @property
    def in_flight(self) -> int:
        """Site messages held (routed, waiting for PUBACKs or for earlier ones)."""
        return len(self._held)

    @property
    def failed(self) -> bool:
        """Whether the worker stopped on an error (:meth:`stop` raises it)."""
        return self._error is not None

    def start(self) -> None:
        """Start the router processes, the worker and the sources."""
        self.routers.start()
        self._thread.start()
        for source in self.sources:
            source.start()

    def stop(self, timeout_s: float = 10.0) -> bool:
        """Stop taking input, finish what is held (up to ``timeout_s``), disconnect.

        Returns True if every held message was acknowledged.

        Raises:
            RuntimeError: the worker thread had died of an unexpected error (chained).

        """
        for source in self.sources:
            source.stop_taking()
        self._deadline = time.monotonic() + timeout_s
        self._stopping.set()
        self._thread.join(timeout_s + self.settings.connect_timeout_s + 5)
        for source in self.sources:
            source.close()
        self.routers.stop()
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
            self.flushed = not self._held
            self.cloud.close()
        except BaseException as exc:  # reported by stop()
            log.exception("the bridge worker thread stopped")
            self._error = exc
            self._stopping.set()

    def _pause(self, delay: float) -> None:
        """Wait before reconnecting; stop() cuts it short, but flushing keeps retrying."""
        if self._stopping.is_set():
            time.sleep(max(0.0, min(delay, self._deadline - time.monotonic())))
        else:
            self._stopping.wait(delay)

    def _done(self) -> bool:
        if not self._stopping.is_set():
            return False
        return (not self._held and self._events.empty()) or time.monotonic() >= self._deadline

    def _step(self) -> None:
        """Handle the events that are there (waiting a little for one), then route and ack."""
        now = time.monotonic()
        try:
            event: _Event | None = self._events.get(
                timeout=min(max(0.0, self._next_heartbeat - now), POLL_S))
        except queue.Empty:
            event = None
        handled = 0
        while event is not None:
            self._handle(event)
            handled += 1
            if handled >= self.settings.max_in_flight or not self.cloud.connected:
                break
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                event = None
        if self._to_route:
            self.routers.route(self._to_route)
            self._to_route = []
        if not self.cloud.connected:
            return
        now = time.monotonic()
        self._ask_flush(now)
        self._release()
        if now >= self._next_heartbeat:
            self.cloud.heartbeat()
            self._next_heartbeat = now + self.settings.heartbeat_s

    def _ask_flush(self, now: float) -> None:
        """When no more input can come (window full, or stopping), close open batches now."""
        asked = self._flush_asked_at
        if asked is not None and now - asked < self._linger_s:
            return
        if len(self._held) >= self.settings.max_in_flight or (
                self._stopping.is_set() and self._held):
            self.routers.flush()
            self._flush_asked_at = now

    def _handle(self, event: _Event) -> None:
        if isinstance(event, Job):
            self._take(event)
        elif isinstance(event, RoutingResult):
            self._routed(event)
        elif isinstance(event, RouterFailed):
            raise RuntimeError(event.why)
        elif event.generation != self.cloud.generation:
            return  # of an older connection
        elif isinstance(event, _PubAck):
            self._puback(event)
        else:
            self.cloud.drop()
            self.metrics.cloud_connected.set(0)
            self._by_mid.clear()

    def _take(self, job: Job) -> None:
        job_id = self._next_job
        self._next_job += 1
        held = _Held(job, job_id)
        self._held.append(held)
        self._by_job[job_id] = held
        self._to_route.append((job_id, job.incoming))
        self.metrics.in_flight.set(len(self._held))

    def _routed(self, result: RoutingResult) -> None:
        self._flush_asked_at = None
        by_job = self._by_job
        for job in result.jobs:
            held = by_job[job.job_id]
            held.routed = True
            held.waiting += len(job.messages) + job.parts
            self.metrics.routed(job.counts, job.lag_ms)
            self.stats.routed(job.counts, job.lag_ms)
            if job.counts.status_applied:  # validated by the router: keep its counters
                self.stats.gateway(decode(held.job.incoming.payload, DeviceStatus))
            for message in job.messages:
                self._emit(MeshMessage(message.topic, message.payload, [held], 0))
        for mesh in result.mesh:
            owners = [by_job[job_id] for job_id in mesh.owners]
            self._emit(MeshMessage(mesh.topic, mesh.payload, owners, mesh.readings))

    def _emit(self, message: MeshMessage[_Held]) -> None:
        number = self._next_output
        self._next_output += 1
        self._outputs[number] = message
        if self.cloud.connected:
            self._publish(number, message)

    def _publish(self, number: int, message: MeshMessage[_Held]) -> bool:
        mid = self.cloud.publish(message.topic, message.payload)
        if mid is None:
            return False  # sent again after the reconnect
        self._by_mid[mid] = number
        return True

    def _republish(self) -> None:
        for number, message in list(self._outputs.items()):
            self.metrics.republished.inc()
            if not self._publish(number, message):
                break
        if self._outputs:
            log.info("sent again %d messages not PUBACKed before the reconnect",
                     len(self._outputs))

    def _puback(self, ack: _PubAck) -> None:
        number = self._by_mid.pop(ack.mid, None)
        if number is None:
            return  # the heartbeat (QoS0 has none), or a duplicate
        if ack.ok:
            message = self._outputs.pop(number)
            for owner in message.owners:
                owner.waiting -= 1
            self.metrics.messages_out.inc()
            self.liveness.mark()
        else:
            self.metrics.rejected.inc()
            log.error("cloud broker refused a message on %s; it is sent again after the "
                      "next reconnect; check the bridge account's ACL",
                      self._outputs[number].topic)

    def _release(self) -> None:
        held = self._held
        while held and held[0].routed and not held[0].waiting:
            done = held.popleft()
            del self._by_job[done.job_id]
            if done.job.source.ack(done.job.delivery):
                self.metrics.site_acked.inc()
        self.metrics.in_flight.set(len(held))
