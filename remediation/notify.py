"""Sending the outbox: MQTT (crew topics, feedback, dead letters) and the webhook.

:class:`OutboxSender` polls the ``outbox`` table. MQTT rows are published at QoS1 and marked
sent once the broker's PUBACK came, so a crash in between sends them again (at-least-once;
every message carries ids that make it idempotent downstream: ``Feedback`` is keyed by work
order, ``WorkOrderEvent`` by work order and event). A PUBACK with a failure reason code
(MQTT 5; mosquitto answers "Not authorized" when the account's ACL lacks the topic) is not a
delivery: the row is kept and retried later, and the log says which topic to allow. Webhook
rows are POSTed as JSON; a failure (connection error, time-out, a status other than 2xx) is
retried after a capped, jittered back-off (:class:`meshwatch.backoff.Backoff`) up to
``webhook_retries`` times, then given up and logged (``sent_ms = -1``, ``last_error`` kept).
"""

from __future__ import annotations

import logging
import threading
import urllib.error
import urllib.request

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.publisher import BrokerAddress, apply_address, paho_protocol
from meshwatch.backoff import Backoff
from remediation.store import Store

log = logging.getLogger(__name__)

PUBACK_TIMEOUT_S = 10.0
REFUSED_RETRY_S = 60.0
"""A publish the broker refused (ACL) is tried again after this long."""
WEBHOOK_TIMEOUT_S = 5.0


def webhook_delay(attempt: int, max_s: float, seed: int | None = None) -> float:
    """Seconds to wait before webhook attempt ``attempt + 1`` (capped, jittered).

    >>> 0.0 <= webhook_delay(0, 60.0, seed=1) <= 0.5
    True
    >>> webhook_delay(20, 60.0, seed=1) <= 60.0
    True
    """
    backoff = Backoff(initial_s=0.5, max_s=max_s, jitter="full", seed=seed)
    delay = 0.0
    for _ in range(attempt + 1):
        delay = backoff.next_delay()
    return delay


class OutboxSender:
    """Publish pending outbox rows; see the module doc.

    Args:
        store: the outbox lives in its database.
        broker: the mesh broker (None: MQTT rows wait).
        webhook_url: where webhook rows are POSTed (None: they wait).

    """

    def __init__(self, store: Store, broker: BrokerAddress | None, *, client_id: str,
                 webhook_url: str | None = None, webhook_retries: int = 5,
                 webhook_backoff_max_s: float = 60.0, poll_s: float = 0.05,
                 protocol: str = "5") -> None:
        self.store = store
        self.broker = broker
        self.client_id = client_id
        self.protocol = protocol
        self.webhook_url = webhook_url
        self.webhook_retries = webhook_retries
        self.webhook_backoff_max_s = webhook_backoff_max_s
        self.poll_s = poll_s
        self.published = 0
        self.webhooks = 0
        self._stop = threading.Event()
        self._client: mqtt.Client | None = None
        self._refused: dict[int, ReasonCode] = {}  # mid -> failure reason of its PUBACK
        self._threads = [threading.Thread(target=self._mqtt_loop, name="outbox-mqtt",
                                          daemon=True),
                         threading.Thread(target=self._webhook_loop, name="outbox-webhook",
                                          daemon=True)]

    def start(self) -> OutboxSender:
        """Connect to the broker and start sending."""
        if self.broker is not None:
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                 protocol=paho_protocol(self.protocol))
            client.reconnect_delay_set(min_delay=1, max_delay=30)
            client.max_inflight_messages_set(1000)
            apply_address(client, self.broker)
            client.on_publish = self._on_publish
            client.connect_async(self.broker.host, self.broker.port, keepalive=30)
            client.loop_start()
            self._client = client
        for thread in self._threads:
            thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop sending (unsent rows stay in the outbox for the next start)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout_s)
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()

    def _mqtt_loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            client = self._client
            if client is None or not client.is_connected():
                continue
            try:
                self.send_mqtt(client)
            except Exception:
                log.exception("publishing the outbox failed; retrying")
                self._stop.wait(1.0)

    def _on_publish(self, client: mqtt.Client, userdata: object, mid: int,
                    reason: ReasonCode, properties: object) -> None:
        if reason.is_failure:
            self._refused[mid] = reason

    def send_mqtt(self, client: mqtt.Client) -> int:
        """Publish one page of pending MQTT rows, mark the PUBACKed ones sent."""
        rows = self.store.pending("mqtt")
        infos = [(row, client.publish(row.topic or "", row.payload, qos=1)) for row in rows]
        done = []
        for row, info in infos:
            try:
                info.wait_for_publish(PUBACK_TIMEOUT_S)
            except (RuntimeError, ValueError) as exc:
                log.warning("outbox row %d not published: %s", row.id, exc)
                continue
            refused = self._refused.pop(info.mid, None)
            if refused is not None:
                log.error("the broker refused %s (%s); allow this account to write it "
                          "(meshwatch broker-config); retrying in %.0f s", row.topic, refused,
                          REFUSED_RETRY_S)
                self.store.mark_failed(row.id, f"PUBACK {refused}",
                                       self.store.clock() + int(REFUSED_RETRY_S * 1000))
            elif info.is_published():
                done.append(row.id)
        self.store.mark_sent(done)
        self.published += len(done)
        return len(done)

    def _webhook_loop(self) -> None:
        while not self._stop.wait(self.poll_s * 4):
            if self.webhook_url is None:
                continue
            try:
                self.send_webhooks()
            except Exception:
                log.exception("sending webhooks failed; retrying")
                self._stop.wait(1.0)

    def send_webhooks(self) -> int:
        """POST every due webhook row once; returns how many succeeded."""
        assert self.webhook_url is not None
        sent = 0
        for row in self.store.pending("webhook", limit=100):
            request = urllib.request.Request(
                self.webhook_url, data=row.payload, method="POST",
                headers={"Content-Type": "application/json", "Idempotency-Key": row.dedupe_key})
            try:
                with urllib.request.urlopen(request, timeout=WEBHOOK_TIMEOUT_S) as response:
                    ok = 200 <= response.status < 300
                    error = f"HTTP {response.status}"
            except urllib.error.HTTPError as exc:
                ok, error = False, f"HTTP {exc.code}"
            except (OSError, ValueError) as exc:
                ok, error = False, f"{type(exc).__name__}: {exc}"
            if ok:
                self.store.mark_sent([row.id])
                sent += 1
                continue
            if row.attempts >= self.webhook_retries:
                log.error("webhook %s gave up after %d attempts: %s", row.dedupe_key,
                          row.attempts + 1, error)
                self.store.mark_failed(row.id, error, None)
            else:
                delay = webhook_delay(row.attempts, self.webhook_backoff_max_s)
                self.store.mark_failed(row.id, error, self.store.clock() + int(delay * 1000))
        self.webhooks += sent
        return sent
