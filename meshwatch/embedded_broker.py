"""The zero-setup MQTT broker: amqtt in-process, for ``embedded://`` URLs and ``meshwatch demo``.

amqtt runs in a background thread with its own event loop and listens on a loopback port,
so every component talks to it over real MQTT exactly as it would to mosquitto. Limits,
measured here: amqtt speaks MQTT 3.1.1 only (clients must connect with protocol 3.1.1, so no
v5 reason codes or receive maximum) and forwards ~1.9k messages/s, which is why telemetry is
batched and why production uses mosquitto or a broker cluster (``mqtt://``). It waits 5 s for
a QoS1 PUBACK, then forgets the message (no redelivery after a reconnect): those timeouts are
counted (:func:`puback_timeouts`) instead of logged with a traceback each.

This module is part of the command-line layer (with :mod:`meshwatch.cli`): it imports amqtt
only when a broker is started.

>>> with EmbeddedBroker() as broker:
...     broker.url.startswith("mqtt://127.0.0.1:")
True
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from types import TracebackType
from typing import Any, Final, Self

MQTT_PROTOCOL: Final = "3.1.1"
"""The only protocol version amqtt speaks."""

PUBACK_TIMEOUT_S: Final = 5.0
"""How long amqtt waits for a subscriber's PUBACK; then it forgets the message (it stays
delivered, but would not be sent again after a reconnect) and logs a traceback."""


class _PubackTimeouts(logging.Filter):
    """Counts amqtt's PUBACK timeouts and drops its log records about them.

    Consumers that acknowledge late on purpose (the dataflow, after a snapshot) would
    otherwise print a traceback per message; :func:`puback_timeouts` says how many there were.
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        error = record.exc_info[1] if record.exc_info else None
        if message.startswith("Timeout waiting for PUBACK"):
            with self._lock:
                self.count += 1
            return False
        if isinstance(error, TimeoutError) and "PUBACK" in str(error):
            return False  # the task that timed out, logged by the broker
        # what follows a timeout: the late PUBACK, or its packet id already reused
        return not message.startswith(("Received PUBACK for unknown pending message",
                                       "PUBACK waiter with Id"))


_TIMEOUTS = _PubackTimeouts()
_TIMEOUT_LOGGERS = ("amqtt.broker", "amqtt.mqtt.protocol.handler")


def puback_timeouts() -> int:
    """QoS1 messages whose PUBACK came after :data:`PUBACK_TIMEOUT_S`, in every broker."""
    return _TIMEOUTS.count


class EmbeddedBroker:
    """An amqtt broker on ``host:port`` (a free port when 0), run in a daemon thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker: Any = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        """``mqtt://host:port`` of the running broker."""
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> Self:
        """Start the broker and wait until it accepts connections."""
        for name in ("amqtt", "transitions"):  # they log every connection at INFO
            logging.getLogger(name).setLevel(logging.WARNING)
        for name in _TIMEOUT_LOGGERS:
            if _TIMEOUTS not in logging.getLogger(name).filters:
                logging.getLogger(name).addFilter(_TIMEOUTS)
        self._thread = threading.Thread(target=self._run, name="embedded-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s) or self._error is not None:
            msg = f"the embedded MQTT broker did not start on {self.host}:{self.port}"
            raise RuntimeError(msg) from self._error
        return self

    def subscribers(self, topic_filter: str) -> set[str]:
        """Client ids of the connected sessions subscribed to exactly ``topic_filter``.

        amqtt keeps no messages for a subscriber before it subscribes (nor, for anonymous
        clients, while it is away): wait for a consumer here before publishing to it.
        """
        loop, broker = self._loop, self._broker
        if loop is None or broker is None:
            return set()

        async def read() -> set[str]:
            return {session.client_id for session, _qos in
                    broker.subscriptions.get(topic_filter, ())
                    if session.transitions.state == "connected"}

        return asyncio.run_coroutine_threadsafe(read(), loop).result(timeout=10)

    def stop(self) -> None:
        """Shut the broker down and wait for its thread."""
        loop, broker = self._loop, self._broker
        if loop is None or broker is None or self._thread is None:
            return
        asyncio.run_coroutine_threadsafe(broker.shutdown(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(timeout=10)
        self._loop = None

    def _run(self) -> None:
        from amqtt.broker import Broker

        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin":
                        {"allow_anonymous": True}},
        }
        try:
            self._broker = Broker(config, loop=loop)
            loop.run_until_complete(self._broker.start())
        except BaseException as exc:  # reported by start()
            self._error = exc
            self._ready.set()
            return
        self._loop = loop
        self._ready.set()
        loop.run_forever()
        loop.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def free_port(host: str) -> int:
    """A TCP port on ``host`` that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
