"""Drain the durable outbox to an MQTT broker: QoS1, urgent first, in order, acked row by row.

:class:`OutboxPublisher` runs one thread that owns a paho-mqtt client (MQTT v5). It sends
outbox messages with at most ``max_in_flight`` unacknowledged, and deletes an outbox row only
when the broker's PUBACK reports success (reason code < 128).

Delivery: at-least-once, in order per device within each lane.

- Two lanes (see :mod:`edge_agent.outbox`). Whenever the window has room, queued *urgent*
  messages (edge alerts) are sent first; an ordinary message is sent only when no urgent one
  is waiting to be sent on this connection. So an alert appended behind a backlog of
  thousands of telemetry messages goes out on the next round (within ``poll_s``, or once one
  in-flight slot is acknowledged if the window is full), not after the backlog.
- Each lane is sent in its insertion order, from its own cursor. Ordinary messages (all
  telemetry) keep exactly the order of their appends, as before; urgent messages keep theirs
  (an alert's ``cleared`` never overtakes its ``open``). There is no order *between* lanes: an
  alert may arrive before telemetry or scores that were appended earlier.
- Urgent messages are otherwise treated like the rest: QoS1, deleted only on a successful
  PUBACK, sent again after a reconnect (the urgent lane first again).
- On a disconnect, everything in flight goes back to pending and, after the reconnect, each
  lane is sent again from its oldest unacknowledged message. So per-device order holds for
  first arrivals, and messages the broker had already received arrive twice: downstream
  de-duplicates by ``(device, seq)`` (alerts by id and status). Message ids are per
  connection and reused, so PUBACKs are matched only against the connection that sent the
  message (each connection gets a fresh paho client; paho's in-memory session state is never
  relied on, the outbox is the only source of truth).
- A PUBACK with a failure reason code (>= 128) is counted in ``rejected`` and logged. If the
  code says the message itself is refused for good (:data:`PERMANENT_REJECTIONS`: not
  authorized, topic name or payload format invalid, packet too large), the message is set
  aside as a dead letter in the outbox file (see :meth:`Outbox.set_aside`), so one bad message
  cannot stall the queue; otherwise (quota exceeded, unspecified error...) it stays queued and
  is sent again after the next reconnect. mosquitto 2.0 closes the connection right after
  refusing a publish, so the next message goes out on a new connection.
- Reconnects wait :class:`meshwatch.backoff.Backoff` delays. The back-off is reset only once a
  connection has stayed up for ``stable_after_s``, so a broker that accepts and then drops us
  at once is not hammered.
- Ordinary sending is paced by a token bucket (``rate_limit_per_s``, bursts of
  ``max_in_flight``), so a backlog after an outage or restart drains at that rate instead of
  flooding the broker; live traffic below the rate is not delayed. Tokens are spent only on
  messages actually sent (unused ones are given back), so an idle publisher keeps its burst.
- Urgent messages do not take tokens from that bucket, so a backlog never holds them back.
  They have their own bucket (``urgent_rate_limit_per_s``, default 50/s, bursts of
  ``max_in_flight``): alerts are rare (one per device per episode, plus its clearing), and the
  cap only keeps a bug or a fleet-wide event that marks many messages urgent from bypassing
  the broker's protection. While urgent messages wait for that cap, ordinary ones wait too
  (urgent first, always); the total rate is at most the sum of the two limits.

Status: on the gateway's retained status topic
(:func:`meshwatch.contract.topics.site_status`), at QoS1, all :class:`DeviceStatus` events:
birth on every connect, a heartbeat with :meth:`OutboxPublisher.stats` counters every
``heartbeat_s``, a clean death on :meth:`OutboxPublisher.close`, and the same death as the
MQTT last will, which the broker publishes when the connection dies without a DISCONNECT.
Status messages do not go through the outbox: a stale heartbeat is worth nothing later.

Threading: :meth:`start` launches the publisher thread, which does all MQTT and outbox-reading
work; the application appends to the outbox from its own thread. :meth:`close` flushes
(waits until the outbox is empty, up to a timeout), publishes the clean death and disconnects:
this is what SIGTERM handling calls.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.outbox import Outbox

if TYPE_CHECKING:
    from meshwatch.config import TLSConfig
from meshwatch.backoff import Backoff
from meshwatch.contract import DeviceState, DeviceStatus, encode, topics

__all__ = [
    "PERMANENT_REJECTIONS",
    "BrokerAddress",
    "OutboxPublisher",
    "TlsOptions",
    "TokenBucket",
    "apply_address",
    "parse_broker_url",
]

log = logging.getLogger(__name__)

DEFAULT_PORT = 1883
DEFAULT_TLS_PORT = 8883

PERMANENT_REJECTIONS = frozenset({0x87, 0x90, 0x95, 0x99})
"""PUBACK reason codes that refuse the message itself: not authorized, topic name invalid,
packet too large, payload format invalid. Such messages become dead letters."""


MqttProtocol = Literal["5", "3.1.1"]


def paho_protocol(version: str) -> MQTTProtocolVersion:
    """Paho's constant for an MQTT protocol version, ``"5"`` or ``"3.1.1"``.

    >>> paho_protocol("3.1.1") == mqtt.MQTTv311
    True
    """
    protocols = {"5": mqtt.MQTTv5, "3.1.1": mqtt.MQTTv311}
    if version not in protocols:
        msg = f"MQTT protocol must be '5' or '3.1.1', got {version!r}"
        raise ValueError(msg)
    return protocols[version]


@dataclass(frozen=True, slots=True)
class TlsOptions:
    """TLS for an MQTT connection: CA file (None: the system's CAs), client certificate."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False
    """Skip hostname verification (tests only)."""

    @classmethod
    def of(cls, tls: TLSConfig | None) -> TlsOptions | None:
        """The options of a broker's ``tls`` config section (None stays None)."""
        if tls is None:
            return None
        paths = (tls.ca_file, tls.cert_file, tls.key_file)
        return cls(*(str(path) if path else None for path in paths), insecure=tls.insecure)


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    """Where and as whom to connect (``tls`` None: plain TCP); built by :func:`parse_broker_url`."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls: TlsOptions | None = None


def parse_broker_url(url: str, tls: TlsOptions | None = None) -> BrokerAddress:
    """Parse ``mqtt://[user[:password]@]host[:port]`` (port 1883) or ``mqtts://...`` (TLS, 8883).

    ``tls`` gives the TLS files of an ``mqtts://`` URL (default: the system's CAs).

    >>> parse_broker_url("mqtt://gw:s%40cret@broker.local:1884")
    BrokerAddress(host='broker.local', port=1884, username='gw', password='s@cret', tls=None)
    >>> parse_broker_url("mqtt://127.0.0.1").port
    1883
    >>> address = parse_broker_url("mqtts://broker.local", TlsOptions(ca_file="ca.pem"))
    >>> address.port, address.tls.ca_file
    (8883, 'ca.pem')
    >>> parse_broker_url("mqtt://broker.local", TlsOptions())
    Traceback (most recent call last):
    ...
    ValueError: broker url 'mqtt://broker.local' is plain TCP but TLS files are set; use mqtts://
    """
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        msg = f"broker url {url!r}: use mqtt://host:port, or mqtts://host:port for TLS"
        raise ValueError(msg)
    secure = parts.scheme == "mqtts"
    if tls is not None and not secure:
        msg = f"broker url {url!r} is plain TCP but TLS files are set; use mqtts://"
        raise ValueError(msg)
    try:
        port = parts.port or (DEFAULT_TLS_PORT if secure else DEFAULT_PORT)
    except ValueError:
        msg = f"broker url {url!r} has a bad port; use mqtt://host:port with port 1-65535"
        raise ValueError(msg) from None
    if not parts.hostname:
        msg = f"broker url {url!r} has no host; use mqtt://host:port"
        raise ValueError(msg)
    return BrokerAddress(
        host=parts.hostname,
        port=port,
        username=unquote(parts.username) if parts.username is not None else None,
        password=unquote(parts.password) if parts.password is not None else None,
        tls=(tls or TlsOptions()) if secure else None,
    )


def apply_address(client: mqtt.Client, address: BrokerAddress) -> None:
    """Set ``address``'s credentials and TLS on a paho client, before it connects."""
    if address.username is not None:
        client.username_pw_set(address.username, address.password)
    if address.tls is not None:
        tls = address.tls
        client.tls_set(ca_certs=tls.ca_file, certfile=tls.cert_file, keyfile=tls.key_file)
        client.tls_insecure_set(tls.insecure)


class TokenBucket:
    """Allow ``rate`` events per second on average, in bursts of at most ``burst``.

    Time is passed in (monotonic seconds), so the bucket is deterministic to test.

    >>> bucket = TokenBucket(rate=10.0, burst=5, now=0.0)
    >>> bucket.take(100, now=0.0), bucket.take(100, now=0.0), bucket.take(100, now=0.3)
    (5, 0, 3)
    """

    def __init__(self, rate: float, burst: int, *, now: float) -> None:
        if not rate > 0:
            msg = f"rate must be > 0 per second, got {rate!r}; use None for no limit"
            raise ValueError(msg)
        if burst < 1:
            msg = f"burst must be at least 1, got {burst}"
            raise ValueError(msg)
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._at = now

    def take(self, wanted: int, *, now: float) -> int:
        """Take up to ``wanted`` whole tokens; return how many were granted."""
        self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate)
        self._at = now
        granted = min(wanted, int(self._tokens))
        self._tokens -= granted
        return granted

    def give_back(self, unused: int) -> None:
        """Return tokens taken but not used (never more than a burst's worth is kept)."""
        self._tokens = min(float(self.burst), self._tokens + unused)


class OutboxPublisher:
    """Publish an :class:`~edge_agent.outbox.Outbox` to a broker; see the module doc.

    Args:
        outbox: the queue to drain; the caller keeps owning it (and closes it).
        url: ``mqtt://[user[:password]@]host[:port]``, or ``mqtts://`` for TLS.
        site: the gateway's site id (status topic and events).
        gateway_id: the gateway id; also the default MQTT client id ``mw-edge-{site}-{gw}``.
        username, password: broker credentials; override those in the URL.
        client_id: MQTT client id; keep it stable per gateway.
        max_in_flight: unacknowledged messages at most (capped by the broker's Receive
            Maximum).
        rate_limit_per_s: ordinary messages per second at most (token bucket, bursts of
            ``max_in_flight``); None for no limit.
        urgent_rate_limit_per_s: urgent messages per second at most, on top of
            ``rate_limit_per_s`` (a separate bucket, bursts of ``max_in_flight``); None for
            no limit.
        heartbeat_s: seconds between heartbeats.
        keepalive_s: MQTT keep-alive; a dead connection is noticed within ~1.5x this.
        connect_timeout_s: how long to wait for the TCP connect and the CONNACK.
        stable_after_s: a connection that stays up this long resets the back-off.
        backoff: reconnect policy; default ``Backoff(initial_s=0.5, max_s=30.0)``.
        devices: device ids announced in status events.
        agent_version: reported in status events.
        poll_s: how long the thread waits for network traffic before looking at the
            outbox again; the longest delay between an append and its publish when idle.
        protocol: ``"5"`` (default) or ``"3.1.1"`` for brokers without MQTT 5 (the embedded
            amqtt broker); 3.1.1 has no PUBACK reason codes, so nothing is ever refused.
        tls: TLS files for an ``mqtts://`` URL (default: the system's CAs).

    """

    def __init__(
        self,
        outbox: Outbox,
        url: str,
        *,
        site: str,
        gateway_id: str,
        username: str | None = None,
        password: str | None = None,
        client_id: str | None = None,
        max_in_flight: int = 32,
        rate_limit_per_s: float | None = 500.0,
        urgent_rate_limit_per_s: float | None = 50.0,
        heartbeat_s: float = 30.0,
        keepalive_s: int = 30,
        connect_timeout_s: float = 10.0,
        stable_after_s: float = 10.0,
        backoff: Backoff | None = None,
        devices: Sequence[str] = (),
        agent_version: str | None = None,
        poll_s: float = 0.02,
        protocol: MqttProtocol = "5",
        tls: TlsOptions | None = None,
    ) -> None:
        address = parse_broker_url(url, tls)
        if max_in_flight < 1:
            msg = f"max_in_flight must be at least 1, got {max_in_flight}"
            raise ValueError(msg)
        for name, rate in (
            ("rate_limit_per_s", rate_limit_per_s),
            ("urgent_rate_limit_per_s", urgent_rate_limit_per_s),
        ):
            if rate is not None and not rate > 0:
                msg = f"{name} must be > 0 per second, got {rate!r}; use None for no limit"
                raise ValueError(msg)
        if not heartbeat_s > 0 or not poll_s > 0 or not connect_timeout_s > 0:
            msg = (
                f"heartbeat_s, poll_s and connect_timeout_s must be > 0, got {heartbeat_s!r},"
                f" {poll_s!r}, {connect_timeout_s!r}"
            )
            raise ValueError(msg)
        paho_protocol(protocol)  # validates it
        self.protocol = protocol
        self.outbox = outbox
        self.url = url
        self.site = site
        self.gateway_id = gateway_id
        self.status_topic = topics.site_status(site, gateway_id)  # validates both ids
        self.client_id = client_id or f"mw-edge-{site}-{gateway_id}"
        self.max_in_flight = max_in_flight
        self.rate_limit_per_s = rate_limit_per_s
        self.urgent_rate_limit_per_s = urgent_rate_limit_per_s
        self.heartbeat_s = heartbeat_s
        self.keepalive_s = keepalive_s
        self.connect_timeout_s = connect_timeout_s
        self.stable_after_s = stable_after_s
        self.backoff = backoff or Backoff(initial_s=0.5, max_s=30.0)
        self.devices = list(devices)
        self.agent_version = agent_version
        self.model_version: str | None = None  # the edge model serving now, for status events
        self.heartbeat_counters: Callable[[], Mapping[str, int | float]] = self.stats
        """What heartbeats carry (the agent puts its own stats, these included, here)."""
        self.poll_s = poll_s
        self._address = BrokerAddress(
            address.host,
            address.port,
            username if username is not None else address.username,
            password if password is not None else address.password,
            address.tls,
        )
        # Counters (read from any thread; written by the publisher thread only).
        self.published = 0  # outbox messages handed to the broker, resends included
        self.urgent_published = 0  # of ``published``, urgent-lane messages
        self.acked = 0  # outbox messages the broker acknowledged
        self.resent = 0  # of ``published``, messages sent before on an earlier connection
        self.rejected = 0  # PUBACKs with a failure reason code
        self.dead_lettered = 0  # of those, messages set aside for good
        self.reconnects = 0  # successful connections after the first
        self.connect_failures = 0
        # Publisher-thread state.
        self._client: mqtt.Client | None = None
        self._generation = 0  # connection number; callbacks from older ones are ignored
        self._in_flight: dict[int, int] = {}  # paho mid -> outbox id, current connection
        self._to_ack: list[int] = []  # outbox ids acked by the broker, not yet deleted
        self._to_set_aside: dict[int, str] = {}  # outbox id -> why the broker refused it
        self._connected_at = 0.0
        self._cursor: int | None = None  # last ordinary outbox id sent on this connection
        self._urgent_cursor: int | None = None  # last urgent outbox id sent on this connection
        self._sent_high = 0  # highest ordinary outbox id ever sent (to count resends)
        self._urgent_sent_high = 0  # highest urgent outbox id ever sent
        self._urgent_bucket: TokenBucket | None = None
        self._window = max_in_flight
        self._connack: ReasonCode | None = None
        self._lost = False
        self._ever_connected = False
        self._death_mid: int | None = None
        self._death_acked = False
        self._next_heartbeat = 0.0
        self._notes: list[str] = []  # messages for the next heartbeats (list ops are atomic)
        self._bucket: TokenBucket | None = None
        self._stop = threading.Event()  # set by close(): flush, say goodbye, leave
        self._flush_deadline = 0.0
        self._flushed = False
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # -- public API ----------------------------------------------------------------------------

    def start(self) -> Self:
        """Start the publisher thread; it connects (retrying with back-off) and drains."""
        if self._thread is not None:
            msg = "OutboxPublisher.start() was already called; create a new publisher instead"
            raise RuntimeError(msg)
        self._thread = threading.Thread(
            target=self._run, name=f"outbox-publisher-{self.gateway_id}", daemon=True
        )
        self._thread.start()
        return self

    @property
    def connected(self) -> bool:
        """Whether a broker connection is up (CONNACK received, not yet lost)."""
        return self._client is not None

    @property
    def in_flight(self) -> int:
        """Outbox messages sent on the current connection and not yet acknowledged."""
        return len(self._in_flight)

    def stats(self) -> dict[str, int | float]:
        """Counters and gauges, for heartbeats and metrics.

        Keys: published, urgent_published (of published, urgent-lane sends, resends included),
        acked, resent, rejected, dead_lettered, reconnects, connect_failures, connected,
        in_flight, queue_depth, urgent_queue_depth (of queue_depth, urgent messages),
        queue_bytes, oldest_age_s, dropped_readings.
        """
        return {
            "published": self.published,
            "urgent_published": self.urgent_published,
            "acked": self.acked,
            "resent": self.resent,
            "rejected": self.rejected,
            "dead_lettered": self.dead_lettered,
            "reconnects": self.reconnects,
            "connect_failures": self.connect_failures,
            "connected": int(self.connected),
            "in_flight": self.in_flight,
            "queue_depth": self.outbox.depth,
            "urgent_queue_depth": self.outbox.urgent_depth,
            "queue_bytes": self.outbox.bytes_used,
            "oldest_age_s": self.outbox.oldest_age_s(),
            "dropped_readings": self.outbox.dropped_readings,
        }

    def report(self, message: str) -> None:
        """Publish ``message`` in a heartbeat on the status topic as soon as connected.

        For events operators must see, such as a rejected model update. Any thread may call it.
        """
        self._notes.append(message)

    def close(self, timeout_s: float = 10.0) -> bool:
        """Flush and stop: wait up to ``timeout_s`` for the outbox to drain, then say goodbye.

        Publishes the clean death (if connected) and disconnects. Returns True if the outbox
        was empty at the end; what is left stays in the outbox for the next start.

        Raises:
            RuntimeError: the publisher thread had died of an unexpected error (chained).

        """
        if self._thread is None:
            return self.outbox.depth == 0
        self._flush_deadline = time.monotonic() + timeout_s
        self._stop.set()
        self._thread.join(timeout_s + self.connect_timeout_s + 5.0)
        if self._error is not None:
            msg = f"the outbox publisher thread failed: {self._error!r}; see the log"
            raise RuntimeError(msg) from self._error
        return self._flushed

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- the publisher thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._closing_done():
                if self._client is None:
                    self._connect()
                else:
                    self._step()
            self._say_goodbye()
        except BaseException as exc:  # reported by close()
            log.exception("outbox publisher thread for %s stopped", self.gateway_id)
            self._error = exc

    def _closing_done(self) -> bool:
        """Whether close() was called and the outbox is drained or the flush time is up."""
        if not self._stop.is_set():
            return False
        drained = self.outbox.depth == 0 and not self._in_flight
        drained = drained and not self._to_ack and not self._to_set_aside
        return drained or time.monotonic() >= self._flush_deadline

    def _step(self) -> None:
        """One round: network I/O, commit acks, send more, heartbeat when due."""
        client = self._client
        assert client is not None
        rc = client.loop(timeout=self.poll_s)
        if rc != mqtt.MQTT_ERR_SUCCESS or self._lost:
            ok = rc == mqtt.MQTT_ERR_SUCCESS
            self._connection_lost("closed by the broker" if ok else mqtt.error_string(rc))
            return
        self._commit_acks()
        self._fill_window(client)
        now = time.monotonic()
        if self.backoff.attempts and now - self._connected_at >= self.stable_after_s:
            self.backoff.reset()
        if now >= self._next_heartbeat or self._notes:
            note = self._notes.pop(0) if self._notes else None
            self._publish_status(client, DeviceState.HEARTBEAT, note)
            self._next_heartbeat = time.monotonic() + self.heartbeat_s

    def _connect(self) -> None:
        """One connection attempt; on failure, wait the back-off delay (or until close())."""
        self._generation += 1
        client = self._new_client()
        self._connack = None
        self._lost = False
        failure: str | None = None
        try:
            if self.protocol == "5":
                properties = Properties(PacketTypes.CONNECT)
                properties.SessionExpiryInterval = 0  # the outbox is our session
                client.connect(self._address.host, self._address.port,
                               keepalive=self.keepalive_s, clean_start=True,
                               properties=properties)
            else:  # 3.1.1: a clean session, set when the client was made
                client.connect(self._address.host, self._address.port,
                               keepalive=self.keepalive_s)
            deadline = time.monotonic() + self.connect_timeout_s
            while self._connack is None and time.monotonic() < deadline and not self._lost:
                if client.loop(timeout=self.poll_s) != mqtt.MQTT_ERR_SUCCESS:
                    break
            if self._connack is None:
                failure = f"no CONNACK within {self.connect_timeout_s:g}s"
            elif self._connack.is_failure:
                failure = f"broker refused the connection: {self._connack}"
        except OSError as exc:
            failure = str(exc) or type(exc).__name__
        if failure is not None:
            client.disconnect()
            self.connect_failures += 1
            delay = self.backoff.next_delay()
            log.warning(
                "cannot connect to %s:%d as %s (%s); retrying in %.1fs",
                self._address.host,
                self._address.port,
                self.client_id,
                failure,
                delay,
            )
            self._pause(delay)
            return
        self._connected_at = time.monotonic()
        self.reconnects += int(self._ever_connected)
        self._ever_connected = True
        self._client = client
        self._cursor = self._urgent_cursor = None
        self._in_flight.clear()
        now = time.monotonic()
        if self.rate_limit_per_s is not None:
            self._bucket = TokenBucket(self.rate_limit_per_s, self._window, now=now)
        if self.urgent_rate_limit_per_s is not None:
            self._urgent_bucket = TokenBucket(self.urgent_rate_limit_per_s, self._window, now=now)
        log.info(
            "connected to %s:%d as %s; %d messages queued",
            self._address.host,
            self._address.port,
            self.client_id,
            self.outbox.depth,
        )
        self._publish_status(client, DeviceState.BIRTH)
        self._next_heartbeat = now + self.heartbeat_s

    def _new_client(self) -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=paho_protocol(self.protocol),
            clean_session=None if self.protocol == "5" else True,
            userdata=self._generation,
        )
        client.max_inflight_messages_set(0)  # we keep our own window; paho must not queue
        client.connect_timeout = self.connect_timeout_s
        apply_address(client, self._address)
        death = self._status(DeviceState.DEATH, "connection lost (last will)")
        client.will_set(self.status_topic, encode(death), qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        return client

    def _connection_lost(self, why: str) -> None:
        """Everything in flight goes back to pending; the next connection resends it."""
        log.warning(
            "connection to %s:%d lost (%s); %d in flight will be sent again",
            self._address.host,
            self._address.port,
            why,
            len(self._in_flight),
        )
        self._commit_acks()
        self._in_flight.clear()
        self._cursor = self._urgent_cursor = None
        self._client = None
        self._death_mid = None
        if time.monotonic() - self._connected_at < self.stable_after_s:
            self._pause(self.backoff.next_delay())  # it keeps dropping us: do not hammer it

    def _pause(self, delay: float) -> None:
        """Wait ``delay`` seconds before reconnecting; close() cuts it short."""
        if self._stop.is_set():  # flushing: keep trying until the flush deadline
            time.sleep(max(0.0, min(delay, self._flush_deadline - time.monotonic())))
        else:
            self._stop.wait(delay)  # close() wakes us to start flushing

    def _fill_window(self, client: mqtt.Client) -> None:
        """Send what the window and the buckets allow: urgent messages first, then ordinary."""
        room = self._window - len(self._in_flight)
        if room > 0 and self.outbox.urgent_depth:  # an in-memory count: no query when none
            room, waiting = self._send_lane(client, room, urgent=True)
            if waiting:
                return  # urgent messages still unsent (capped): ordinary ones wait behind them
        if room > 0:
            self._send_lane(client, room, urgent=False)

    def _send_lane(self, client: mqtt.Client, room: int, *, urgent: bool) -> tuple[int, bool]:
        """Send up to ``room`` messages of one lane, paced by its bucket, from its cursor.

        Returns the room left and, for the urgent lane, whether messages are still waiting
        to be sent (always False for the ordinary lane, which is not asked).
        """
        bucket = self._urgent_bucket if urgent else self._bucket
        granted = room if bucket is None else bucket.take(room, now=time.monotonic())
        probe = int(urgent)  # one more than granted tells whether more urgent ones wait
        if granted + probe == 0:
            return room, False
        batch = self.outbox.peek(
            granted + probe,
            after_id=self._urgent_cursor if urgent else self._cursor,
            urgent=urgent,
        )
        sent = 0
        for message in batch[:granted]:
            info = client.publish(
                message.topic, message.payload, qos=message.qos, retain=message.retain
            )
            if info.rc != mqtt.MQTT_ERR_SUCCESS:  # the connection broke under us
                self._lost = True
                break
            sent += 1
            self._in_flight[info.mid] = message.id
            self.published += 1
            if urgent:
                self._urgent_cursor = message.id
                self.urgent_published += 1
                self.resent += message.id <= self._urgent_sent_high
                self._urgent_sent_high = max(self._urgent_sent_high, message.id)
            else:
                self._cursor = message.id
                self.resent += message.id <= self._sent_high
                self._sent_high = max(self._sent_high, message.id)
        if bucket is not None and granted > sent:
            bucket.give_back(granted - sent)  # tokens are spent on messages, not on polls
        return room - sent, self._lost or len(batch) > sent

    def _commit_acks(self) -> None:
        if self._to_ack:
            self.outbox.ack(self._to_ack)
            self.acked += len(self._to_ack)
            self._to_ack.clear()
        for outbox_id, reason in self._to_set_aside.items():
            self.dead_lettered += self.outbox.set_aside([outbox_id], reason)
        self._to_set_aside.clear()

    def _publish_status(
        self, client: mqtt.Client, state: DeviceState, note: str | None = None
    ) -> int:
        payload = encode(self._status(state, note))
        return client.publish(self.status_topic, payload, qos=1, retain=True).mid

    def _status(self, state: DeviceState, note: str | None) -> DeviceStatus:
        counters: dict[str, int] = {}
        if state is DeviceState.HEARTBEAT:
            counters = {name: int(value) for name, value in self.heartbeat_counters().items()}
        return DeviceStatus(
            site=self.site,
            gateway_id=self.gateway_id,
            state=state,
            sent_ms=int(time.time() * 1000),
            devices=self.devices,
            counters=counters,
            agent_version=self.agent_version,
            model_version=self.model_version,
            message=note,
        )

    def _say_goodbye(self) -> None:
        """End of close(): publish the clean death and disconnect."""
        self._commit_acks()
        self._flushed = self.outbox.depth == 0
        client = self._client
        if client is None:
            log.warning(
                "closing while disconnected from %s:%d; %d messages stay in the outbox",
                self._address.host,
                self._address.port,
                self.outbox.depth,
            )
            return
        note = "clean shutdown" if self._flushed else f"shutdown with {self.outbox.depth} queued"
        self._death_mid = self._publish_status(client, DeviceState.DEATH, note)
        deadline = max(self._flush_deadline, time.monotonic() + 1.0)
        while not self._death_acked and not self._lost and time.monotonic() < deadline:
            if client.loop(timeout=self.poll_s) != mqtt.MQTT_ERR_SUCCESS:
                break
        self._commit_acks()
        client.disconnect()
        client.loop(timeout=self.poll_s)
        self._client = None

    # -- paho callbacks (run on the publisher thread, inside client.loop()) ---------------------

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if userdata != self._generation:
            return
        receive_max = getattr(properties, "ReceiveMaximum", None)
        # Keep one slot for a status message, so the broker's limit is never exceeded.
        self._window = (
            self.max_in_flight
            if receive_max is None
            else max(1, min(self.max_in_flight, int(receive_max) - 1))
        )
        self._connack = reason_code

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if userdata == self._generation:
            self._lost = True

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if userdata != self._generation:
            return  # a message id from an older connection: it means nothing now
        if mid == self._death_mid:
            self._death_acked = True
            return
        outbox_id = self._in_flight.pop(mid, None)
        if outbox_id is None:
            return  # a birth or heartbeat
        if reason_code.is_failure:
            self.rejected += 1
            if reason_code.value in PERMANENT_REJECTIONS:
                log.error(
                    "broker refused outbox message %d (%s); kept as a dead letter in %s",
                    outbox_id, reason_code, self.outbox.path,
                )  # fmt: skip
                self._to_set_aside[outbox_id] = f"PUBACK {reason_code.value:#04x} {reason_code}"
            else:
                log.warning(
                    "broker refused outbox message %d (%s); it stays queued and is sent again"
                    " after the next reconnect",
                    outbox_id, reason_code,
                )  # fmt: skip
            return
        self._to_ack.append(outbox_id)
