"""A QoS1 subscriber that records every (device, seq) it receives: the loss ledger of tests.

It keeps a persistent session (``clean_start=False`` on every connect and a session expiry),
so mosquitto queues for it across broker restarts.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import defaultdict
from collections.abc import Callable

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from servers import Mosquitto

from edge_agent.publisher import paho_protocol
from meshwatch.contract import DeviceStatus, TelemetryBatch, decode_event
from meshwatch.embedded_broker import EmbeddedBroker

WAIT_S = 30.0


def wait_until(condition: Callable[[], bool], timeout: float = WAIT_S, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what or condition}")
        time.sleep(0.02)


class Ledger:
    """A QoS1 subscriber with a persistent session that records what arrives, in order."""

    def __init__(self, broker: Mosquitto | EmbeddedBroker, client_id: str, *filters: str,
                 protocol: str = "5") -> None:
        self.arrivals: list[tuple[str, int]] = []  # (device, seq) per reading, arrival order
        self.statuses: list[tuple[DeviceStatus, bool]] = []  # (event, retained flag)
        self.events: list[object] = []  # every decoded event, arrival order
        self.subscribed = threading.Event()
        self._filters = filters
        self._lock = threading.Lock()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho_protocol(protocol),
            clean_session=False if protocol == "3.1.1" else None,
        )
        self.client.reconnect_delay_set(min_delay=0.1, max_delay=0.5)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = self._on_message
        if protocol == "5":
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = 600
            # clean_start=False on EVERY connect: mosquitto 2.0.11 does not persist a session
            # that was created with clean_start=True, even with a session expiry.
            self.client.connect(broker.host, broker.port, clean_start=False,
                                properties=properties)
        else:
            self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert self.subscribed.wait(10), "the ledger could not subscribe"

    def _on_connect(self, client: mqtt.Client, *args: object) -> None:
        flags = args[1]
        assert isinstance(flags, mqtt.ConnectFlags)
        if not flags.session_present:  # a resumed session keeps its subscriptions
            client.subscribe([(f, 1) for f in self._filters])

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        event = decode_event(msg.payload)
        with self._lock:
            self.events.append(event)
            if isinstance(event, TelemetryBatch):
                self.arrivals += [(r.device_id, r.seq) for r in event.readings]
            elif isinstance(event, DeviceStatus):
                self.statuses.append((event, bool(msg.retain)))

    def received(self) -> set[tuple[str, int]]:
        with self._lock:
            return set(self.arrivals)

    def status_events(self, gateway: str) -> list[tuple[DeviceStatus, bool]]:
        with self._lock:
            return [(e, r) for e, r in self.statuses if e.gateway_id == gateway]

    def wait_for(self, expected: set[tuple[str, int]], timeout: float = WAIT_S) -> None:
        wait_until(lambda: expected <= self.received(), timeout, "every reading to arrive")

    def assert_complete_and_ordered(self, expected: set[tuple[str, int]]) -> None:
        """None missing; per device, first arrivals come in increasing seq order."""
        with self._lock:
            arrivals = list(self.arrivals)
        first: dict[str, list[int]] = defaultdict(list)
        seen: set[tuple[str, int]] = set()
        for device, seq in arrivals:
            if (device, seq) not in seen:
                seen.add((device, seq))
                first[device].append(seq)
        missing = sorted(expected - seen)
        assert not missing, f"{len(missing)} readings never arrived, e.g. {missing[:10]}"
        for device, seqs in first.items():
            out_of_order = [(a, b) for a, b in itertools.pairwise(seqs) if b < a]
            assert not out_of_order, f"{device}: seq went back {out_of_order[:5]}"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
