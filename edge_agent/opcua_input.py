"""OPC-UA input: data-change subscriptions on mapped nodes, turned into readings.

:class:`OpcUaInput` runs an asyncua client in its own thread (with its own event loop),
so the synchronous agent only calls :meth:`~OpcUaInput.start` and
:meth:`~OpcUaInput.stop`. For one :class:`~meshwatch.config.OpcUaServerConfig` it
creates one subscription with a monitored item per mapped node (trigger
status/value/timestamp, so a repeated value with a new source timestamp is a new
reading) and hands every good value to ``on_reading`` as an :class:`OpcUaReading`, on
the input's thread.

**Event time** is the value's source timestamp; without one (or outside 2000..2099) the
server timestamp, then the time it was received; ``time_source.*`` counters say how
often each was used.

**Bad values** (a status that is not Good, no value, a non-number such as a string or a
bool, NaN or infinity) are counted by reason (``bad_value.<reason>``) and logged with
the node id at most once a minute per node and reason; they never stop the input.

**Connection loss.** asyncua's supervisor reads the server state every ``keepalive_s``
and notices a closed socket at once; asyncua re-creates a subscription that sent neither
data nor keep-alive for 1.5 × ``keepalive_s``. On a loss the client is dropped, and a
new one connects after a :class:`~meshwatch.backoff.Backoff` delay (capped at
``reconnect_max_s``) and subscribes again, for as long as it takes.

asyncua is imported only in the input's thread, so importing this module (or the agent)
without OPC-UA configured does not load it.

>>> from meshwatch.config import OpcUaNodeConfig
>>> node = OpcUaNodeConfig(node_id="ns=2;s=dma-01-pump.flow_lpm", device_id="dma-01-pump",
...                        metric="flow_m3h", scale=0.06)
>>> convert(node, 500.0, 0, None, None, received_ms=1767571260000)
OpcUaReading(device_id='dma-01-pump', metric='flow_m3h', value=30.0, ts_ms=1767571260000, \
time_source='received', node_id='ns=2;s=dma-01-pump.flow_lpm')
>>> convert(node, "12.5", 0, None, None, received_ms=1767571260000).reason
'wrong_type'
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from meshwatch.backoff import Backoff
from meshwatch.config import OpcUaNodeConfig, OpcUaServerConfig, mask_url
from meshwatch.contract.events import MAX_TS_MS, MIN_TS_MS

if TYPE_CHECKING:
    from asyncua import Client, ua
    from asyncua.common.subscription import DataChangeNotif

TimeSource = Literal["source", "server", "received"]
BadReason = Literal["status_bad", "status_uncertain", "null", "wrong_type", "not_finite"]

LOG_EVERY_S = 60.0
"""A bad value of one node and reason is logged at most this often."""

REQUEST_TIMEOUT_S = 4.0
"""How long one OPC-UA request (connect included) may take."""

_LOG = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class OpcUaReading:
    """A good value of a mapped node, scaled, with its event time (UTC epoch ms)."""

    device_id: str
    metric: str
    value: float
    ts_ms: int
    time_source: TimeSource
    node_id: str


@dataclass(frozen=True, slots=True)
class BadValue:
    """A notification that did not give a reading, and why."""

    node_id: str
    reason: BadReason
    detail: str


def convert(node: OpcUaNodeConfig, value: object, status: int,
            source_time: datetime | None, server_time: datetime | None, *,
            received_ms: int) -> OpcUaReading | BadValue:
    """Turn one data-change notification of ``node`` into a reading, or say why not.

    ``status`` is the OPC-UA status code (0 is Good); naive datetimes are taken as UTC.
    """
    severity = status >> 30  # 0 Good, 1 Uncertain, 2 and 3 Bad
    if severity:
        reason: BadReason = "status_uncertain" if severity == 1 else "status_bad"
        return BadValue(node.node_id, reason, f"status 0x{status:08X}")
    if value is None:
        return BadValue(node.node_id, "null", "no value")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return BadValue(node.node_id, "wrong_type",
                        f"{type(value).__name__} {_short(value)} where a number is expected")
    try:
        scaled = float(value) * node.scale + node.offset
    except OverflowError:
        scaled = math.inf
    if not math.isfinite(scaled):
        return BadValue(node.node_id, "not_finite", f"{_short(value)} (scaled: {scaled})")
    stamps: tuple[tuple[TimeSource, datetime | None], ...] = (
        ("source", source_time), ("server", server_time))
    for source, stamp in stamps:
        ts_ms = _epoch_ms(stamp)
        if ts_ms is not None:
            return OpcUaReading(node.device_id, node.metric, scaled, ts_ms, source, node.node_id)
    return OpcUaReading(node.device_id, node.metric, scaled, received_ms, "received",
                        node.node_id)


def _epoch_ms(stamp: datetime | None) -> int | None:
    if stamp is None:
        return None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    ts_ms = round(stamp.timestamp() * 1000)
    return ts_ms if MIN_TS_MS <= ts_ms < MAX_TS_MS else None


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class OpcUaInput:
    """Subscribe to one OPC-UA server's mapped nodes and hand out readings.

    ``on_reading`` is called on the input's own thread, once per good value; it must be
    quick and thread-safe. ``backoff`` defaults to full jitter from 0.5 s up to the
    server's ``reconnect_max_s``.

    Counters (:meth:`counters`): ``notifications``, ``readings``,
    ``bad_value.<reason>``, ``time_source.<source|server|received>``, ``connects``,
    ``reconnects`` (connections after the first), ``connect_failures``,
    ``node_errors`` (nodes the server refused to monitor), ``callback_errors``,
    ``connected`` (0 or 1).
    """

    def __init__(self, server: OpcUaServerConfig, on_reading: Callable[[OpcUaReading], None],
                 *, backoff: Backoff | None = None) -> None:
        self.server = server
        self.on_reading = on_reading
        self.backoff = backoff or Backoff(initial_s=min(0.5, server.reconnect_max_s),
                                          max_s=server.reconnect_max_s)
        self._nodes = dict(enumerate(server.nodes, start=1))  # client handle -> mapping
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._logged: dict[tuple[str, str], tuple[float, int]] = {}
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_requested = threading.Event()
        self._stop: asyncio.Event | None = None

    @property
    def connected(self) -> bool:
        """True while subscribed to a reachable server."""
        with self._lock:
            return bool(self._counts["connected"])

    def counters(self) -> dict[str, int]:
        """A snapshot of the counters (see the class doc)."""
        with self._lock:
            return {"connected": 0, **self._counts}

    def start(self) -> None:
        """Start the input's thread; it connects and keeps reconnecting until :meth:`stop`.

        Raises:
            RuntimeError: the input was started before.

        """
        if self._thread is not None:
            msg = "this OpcUaInput was started before; create a new one"
            raise RuntimeError(msg)
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()),
                                        name=f"opcua {mask_url(self.server.url)}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Unsubscribe, disconnect and join the thread (waiting at most ``timeout`` s)."""
        with self._lock:
            self._stop_requested.set()
            if self._loop is not None and self._stop is not None:
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout)

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def _mark_connected(self) -> None:
        with self._lock:
            self._counts["connects"] += 1
            self._counts["reconnects"] = self._counts["connects"] - 1
            self._counts["connected"] = 1

    def _mark_disconnected(self) -> None:
        with self._lock:
            self._counts["connected"] = 0

    async def _main(self) -> None:
        with self._lock:
            self._loop = asyncio.get_running_loop()
            self._stop = stop = asyncio.Event()
            if self._stop_requested.is_set():
                stop.set()
        url = mask_url(self.server.url)
        try:
            while not stop.is_set():
                try:
                    await self._session(stop)
                except Exception as exc:  # every failure is retried; none is fatal
                    self._count("connect_failures")
                    first = self.backoff.attempts == 0  # later ones until success: INFO
                    _LOG.log(logging.WARNING if first else logging.INFO,
                             "OPC-UA %s: connection failed: %r", url, exc,
                             exc_info=not isinstance(exc, OSError | TimeoutError))
                if stop.is_set():
                    break
                delay = self.backoff.next_delay()
                _LOG.info("OPC-UA %s: reconnecting in %.1f s", url, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
        finally:
            with self._lock:
                self._loop = None  # stop() must not touch a closed loop

    async def _session(self, stop: asyncio.Event) -> None:
        """Connect, subscribe, and return when the connection is lost or stop is set."""
        from asyncua import Client

        config = self.server
        client = Client(config.url, timeout=REQUEST_TIMEOUT_S,
                        watchdog_intervall=config.keepalive_s)
        client.session_timeout = max(60_000, round(config.keepalive_s * 3000))
        if config.username is not None and config.password is not None:
            client.set_user(config.username)
            client.set_password(config.password.get_secret_value())
        lost = asyncio.Event()

        async def connection_lost(exc: Exception) -> None:
            _LOG.warning("OPC-UA %s: connection lost: %r", mask_url(config.url), exc)
            lost.set()

        client.connection_lost_callback = connection_lost
        await client.connect(auto_reconnect=False)
        try:
            await self._subscribe(client, lost)
            self._mark_connected()
            self.backoff.reset()
            waits = [asyncio.ensure_future(lost.wait()), asyncio.ensure_future(stop.wait())]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()
        finally:
            self._mark_disconnected()
            try:
                await asyncio.wait_for(client.disconnect(), REQUEST_TIMEOUT_S)
            except Exception as exc:  # the connection may already be gone
                _LOG.debug("OPC-UA disconnect: %r", exc)

    async def _subscribe(self, client: Client, lost: asyncio.Event) -> None:
        from asyncua import ua

        config = self.server
        keepalive = max(1, math.ceil(config.keepalive_s * 1000 / config.publishing_interval_ms))
        params = ua.CreateSubscriptionParameters(
            RequestedPublishingInterval=config.publishing_interval_ms,
            RequestedMaxKeepAliveCount=keepalive, RequestedLifetimeCount=10 * keepalive,
            MaxNotificationsPerPublish=10_000, PublishingEnabled=True, Priority=0)
        subscription = await client.create_subscription(params, _Handler(self, lost))
        every_sample = ua.DataChangeFilter(Trigger=ua.DataChangeTrigger.StatusValueTimestamp)
        requests = [
            ua.MonitoredItemCreateRequest(
                ItemToMonitor=ua.ReadValueId(NodeId=ua.NodeId.from_string(node.node_id),
                                             AttributeId=ua.AttributeIds.Value),
                MonitoringMode=ua.MonitoringMode.Reporting,
                RequestedParameters=ua.MonitoringParameters(
                    ClientHandle=handle, SamplingInterval=0, QueueSize=config.queue_size,
                    DiscardOldest=True, Filter=every_sample))
            for handle, node in self._nodes.items()]
        results = await subscription.create_monitored_items(requests)
        for node, result in zip(self._nodes.values(), results, strict=True):
            if isinstance(result, ua.StatusCode):
                self._count("node_errors")
                _LOG.error("OPC-UA %s: the server refused to monitor %s (%s); check node_id "
                           "in the [[opcua.nodes]] config", mask_url(config.url), node.node_id,
                           result.name)
        _LOG.info("OPC-UA %s: subscribed to %d node(s)", mask_url(config.url), len(requests))

    def _on_change(self, item: ua.MonitoredItemNotification) -> None:
        received_ms = time.time_ns() // 1_000_000
        node = self._nodes[item.ClientHandle]
        data = item.Value
        value: Any = None if data.Value is None else data.Value.Value
        status = 0 if data.StatusCode is None else data.StatusCode.value
        result = convert(node, value, status, data.SourceTimestamp, data.ServerTimestamp,
                         received_ms=received_ms)
        self._count("notifications")
        if isinstance(result, BadValue):
            if result.reason.startswith("status_"):
                result = replace(result, detail=f"{data.StatusCode.name} ({result.detail})")
            self._count(f"bad_value.{result.reason}")
            self._log_bad(result)
            return
        self._count("readings")
        self._count(f"time_source.{result.time_source}")
        try:
            self.on_reading(result)
        except Exception:
            self._count("callback_errors")
            _LOG.exception("OPC-UA reading callback failed for %s", node.node_id)

    def _log_bad(self, bad: BadValue) -> None:
        key = (bad.node_id, bad.reason)
        now = time.monotonic()
        last, suppressed = self._logged.get(key, (-math.inf, 0))
        if now - last < LOG_EVERY_S:
            self._logged[key] = (last, suppressed + 1)
            return
        self._logged[key] = (now, 0)
        more = f" ({suppressed} more since the last report)" if suppressed else ""
        _LOG.warning("OPC-UA %s: bad value from %s: %s: %s%s", mask_url(self.server.url),
                     bad.node_id, bad.reason, bad.detail, more)


class _Handler:
    """asyncua subscription callbacks, forwarded to the input (runs on its loop)."""

    def __init__(self, owner: OpcUaInput, lost: asyncio.Event) -> None:
        self._owner = owner
        self._lost = lost

    def datachange_notification(self, node: object, value: object,
                                data: DataChangeNotif) -> None:
        self._owner._on_change(data.monitored_item)

    def status_change_notification(self, status: ua.StatusChangeNotification) -> None:
        if status.Status is not None and not status.Status.is_good() and not self._lost.is_set():
            _LOG.warning("OPC-UA %s: subscription status %s; reconnecting",
                         mask_url(self._owner.server.url), status.Status.name)
            self._lost.set()
