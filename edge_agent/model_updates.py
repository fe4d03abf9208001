"""Follow the gateway's retained model announcement; fetch, verify and offer new edge models.

:class:`ModelWatcher` subscribes (QoS1, its own paho-mqtt client, reconnecting by itself) to
the gateway's retained ``site_model`` topic. Each :class:`ModelAnnouncement` names a package
directory (``url``) and the sha256 of its ``model.onnx``. Unless that model id and version
already serve, a worker thread (never paho's network thread) copies the package into a fresh
directory under ``staging_dir`` and loads it with :func:`models.edge.package.load_package`,
which verifies the checksum against the announcement, the input signature against the serving
model's features, and warms the model up. Then:

- success: ``on_model(model)``; the agent swaps it in between two blocks
  (:meth:`edge_agent.agent.EdgeAgent.offer_model`);
- failure: ``on_reject(announcement, reason)``, ``announcement`` being None when the payload
  itself broke the contract; nothing changes, the current model keeps serving.

Package URLs: ``file:///abs/dir``, ``/abs/dir`` or ``http(s)://host/path/`` (``manifest.json``
and ``model.onnx`` are fetched from there with a timeout and a size cap).

Announcements are handled once: a payload equal to the last one received (the retained copy
the broker sends again after every reconnect) is ignored, whether it was accepted or
rejected. To retry a rejected package, publish the announcement again with a new ``ts_ms``.
Only the latest announcement counts: those arriving while a package loads replace each other.
The last ``keep`` accepted packages stay under ``staging_dir`` for inspection; rejected ones
are deleted at once.

:func:`watch_models` wires a watcher to an agent; it is what ``meshwatch edge`` uses.
"""

from __future__ import annotations

import http.client
import logging
import shutil
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import unquote, urljoin, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.publisher import (
    MqttProtocol,
    TlsOptions,
    apply_address,
    paho_protocol,
    parse_broker_url,
)
from meshwatch.contract import ContractError, ModelAnnouncement, decode, topics
from models.edge.package import (
    MANIFEST_FILE,
    MODEL_FILE,
    EdgeModel,
    ModelPackageError,
    load_package,
)

if TYPE_CHECKING:
    from edge_agent.agent import EdgeAgent

__all__ = ["FetchError", "ModelWatcher", "fetch_package", "watch_models"]

log = logging.getLogger(__name__)

MAX_REASON_CHARS = 1000
"""Rejection reasons are cut to this length, so they fit in a status event's message."""
STAGED_PREFIX = "pkg-"
"""Staged package directories are named ``pkg-{model_id}-{version}-{random}``."""

OnModel = Callable[[EdgeModel], None]
OnReject = Callable[[ModelAnnouncement | None, str], None]


class FetchError(Exception):
    """A model package could not be fetched; the message says from where and why."""


def fetch_package(url: str, target: Path, *, timeout_s: float = 30.0,
                  max_bytes: int = 16 * 1024 * 1024) -> None:
    """Copy ``model.onnx`` and ``manifest.json`` of the package at ``url`` into ``target``.

    ``url`` is ``file:///abs/dir``, ``/abs/dir`` or ``http(s)://host/path/``; each file may
    hold at most ``max_bytes``. Nothing is verified here: :func:`load_package` does that.

    >>> fetch_package("pkg/", Path("."))
    Traceback (most recent call last):
    ...
    edge_agent.model_updates.FetchError: unsupported package url 'pkg/'; use file:///abs/dir, /abs/dir or http(s)://host/path/

    Raises:
        FetchError: the url is not supported, a file is missing, unreachable or too large.

    """  # noqa: E501
    for name in (MODEL_FILE, MANIFEST_FILE):
        data = _read(url, name, timeout_s, max_bytes)
        try:
            (target / name).write_bytes(data)
        except OSError as exc:
            msg = f"cannot stage {name} in {target}: {exc}; check free space and permissions there"
            raise FetchError(msg) from None


def _read(url: str, name: str, timeout_s: float, max_bytes: int) -> bytes:
    """The bytes of file ``name`` of the package at ``url`` (at most ``max_bytes``)."""
    parts = urlsplit(url)
    if parts.scheme in ("http", "https"):
        source = urljoin(url if url.endswith("/") else url + "/", name)
        try:
            with urllib.request.urlopen(source, timeout=timeout_s) as response:
                data: bytes = response.read(max_bytes + 1)
        except urllib.error.HTTPError as exc:
            msg = f"download of {source} failed: HTTP {exc.code} {exc.reason}"
            raise FetchError(msg) from None
        except urllib.error.URLError as exc:
            msg = f"download of {source} failed: {exc.reason}; is the server up and the url right?"
            raise FetchError(msg) from None
        except (OSError, http.client.HTTPException) as exc:
            msg = f"download of {source} failed: {exc or type(exc).__name__}"
            raise FetchError(msg) from None
    elif (parts.scheme == "file" and parts.netloc in ("", "localhost")) or (
            not parts.scheme and url.startswith("/")):
        source = str(Path(unquote(parts.path)) / name)
        try:
            with open(source, "rb") as file:
                data = file.read(max_bytes + 1)
        except FileNotFoundError:
            msg = (f"{source} not found; the announcement's url must name a package directory"
                   f" holding {MODEL_FILE} and {MANIFEST_FILE}")
            raise FetchError(msg) from None
        except OSError as exc:
            msg = f"cannot read {source}: {exc}"
            raise FetchError(msg) from None
    else:
        msg = f"unsupported package url {url!r}; use file:///abs/dir, /abs/dir or http(s)://host/path/"
        raise FetchError(msg)
    if len(data) > max_bytes:
        msg = f"{source} is larger than {max_bytes} bytes; raise max_bytes if that is intended"
        raise FetchError(msg)
    return data


class ModelWatcher:
    """Turn the gateway's model announcements into verified models (see the module doc).

    Callbacks run on the watcher's threads; they must be quick and thread-safe.

    Args:
        broker_url: ``mqtt://[user[:password]@]host[:port]`` of the site broker.
        site, gateway_id: whose ``site_model`` topic to follow.
        staging_dir: where packages are copied to (created; the watcher owns its ``pkg-*``).
        serving: returns the model serving now (its id, version and feature names).
        on_model: called with each model that passed every check.
        on_reject: called with the announcement (None for a bad payload) and why.
        username, password: broker credentials; override those in the URL.
        timeout_s: network timeout of one download.
        max_bytes: the largest file of a package accepted.
        keep: accepted packages kept under ``staging_dir``.

    """

    def __init__(
        self,
        broker_url: str,
        *,
        site: str,
        gateway_id: str,
        staging_dir: str | Path,
        serving: Callable[[], EdgeModel],
        on_model: OnModel,
        on_reject: OnReject,
        protocol: MqttProtocol = "5",
        username: str | None = None,
        password: str | None = None,
        tls: TlsOptions | None = None,
        timeout_s: float = 30.0,
        max_bytes: int = 16 * 1024 * 1024,
        keep: int = 2,
    ) -> None:
        if keep < 1:
            msg = f"keep must be at least 1 (the serving package), got {keep}"
            raise ValueError(msg)
        address = parse_broker_url(broker_url, tls)
        self.address = replace(
            address, username=username if username is not None else address.username,
            password=password if password is not None else address.password)
        self.topic = topics.build("site_model", site=site, gateway=gateway_id)
        self.client_id = f"mw-edge-model-{site}-{gateway_id}"
        self.staging_dir = Path(staging_dir)
        self.serving = serving
        self.on_model = on_model
        self.on_reject = on_reject
        paho_protocol(protocol)  # validates it
        self.protocol = protocol
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.keep = keep
        self.accepted = 0
        self.rejected = 0
        self._client: mqtt.Client | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._latest: ModelAnnouncement | None = None  # waiting for the worker
        self._last_payload: bytes | None = None
        self._worker = threading.Thread(target=self._work, name=f"model-watcher-{gateway_id}",
                                        daemon=True)

    def start(self) -> Self:
        """Create the staging directory, start the worker and connect in the background.

        Raises:
            RuntimeError: it was already started.

        """
        if self._client is not None:
            msg = "ModelWatcher.start() was already called; create a new watcher instead"
            raise RuntimeError(msg)
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        self._worker.start()
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=paho_protocol(self.protocol))
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        apply_address(client, self.address)
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        client.connect_async(self.address.host, self.address.port, keepalive=30)
        client.loop_start()  # retries the first connection too
        self._client = client
        return self

    def close(self, timeout_s: float = 5.0) -> None:
        """Disconnect and stop the worker (a download in progress may take ``timeout_s``)."""
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
        self._stop.set()
        self._wake.set()
        if self._worker.is_alive():
            self._worker.join(timeout_s)

    def __enter__(self) -> Self:
        return self if self._client is not None else self.start()  # watch_models() starts it

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- paho callbacks (paho's network thread: decode only, no I/O) ---------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: mqtt.ConnectFlags,
                    reason_code: ReasonCode, properties: Properties | None) -> None:
        if reason_code.is_failure:
            log.warning("the broker refused the model watcher %s: %s", self.client_id,
                        reason_code)
            return
        client.subscribe(self.topic, qos=1)

    def _on_message(self, client: mqtt.Client, userdata: Any,
                    message: mqtt.MQTTMessage) -> None:
        payload = bytes(message.payload)
        if not payload or payload == self._last_payload:
            return  # the retained announcement was cleared, or sent again after a reconnect
        self._last_payload = payload
        try:
            announcement = decode(payload, ModelAnnouncement)
        except ContractError as exc:
            self._reject(None, f"bad announcement on {message.topic}: {exc}")
            return
        with self._lock:
            self._latest = announcement
            self._wake.set()

    # -- the worker thread ---------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            self._wake.wait()
            if self._stop.is_set():
                return
            with self._lock:
                announcement, self._latest = self._latest, None
                self._wake.clear()
            if announcement is not None:
                self._handle(announcement)

    def _handle(self, announcement: ModelAnnouncement) -> None:
        """Fetch, verify and offer one announced package, or reject it."""
        serving = self.serving()
        wanted = (announcement.model_id, announcement.version)
        if wanted == (serving.model_id, serving.version):
            log.info("model %s %s already serves; announcement ignored", *wanted)
            return
        staging: Path | None = None
        try:
            staging = Path(tempfile.mkdtemp(prefix=f"{STAGED_PREFIX}{'-'.join(wanted)}-",
                                            dir=self.staging_dir))
            fetch_package(announcement.url, staging, timeout_s=self.timeout_s,
                          max_bytes=self.max_bytes)
            model = load_package(staging, expected_sha256=announcement.sha256,
                                 expected_features=serving.manifest.feature_names)
            if (model.model_id, model.version) != wanted:
                msg = (f"model package {announcement.url}: its manifest says"
                       f" {model.model_id} {model.version}; announce what the package holds")
                raise ModelPackageError(msg)
        except (FetchError, ModelPackageError, OSError) as exc:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
                # the staged copy is gone: name the package by the url the operator announced
                reason = str(exc).replace(str(staging), announcement.url)
            else:
                reason = f"cannot create a staging directory in {self.staging_dir}: {exc}"
            self._reject(announcement, reason)
            return
        self._prune()
        self.accepted += 1
        log.info("model %s %s verified from %s", *wanted, announcement.url)
        self.on_model(model)

    def _reject(self, announcement: ModelAnnouncement | None, reason: str) -> None:
        self.rejected += 1
        if len(reason) > MAX_REASON_CHARS:
            reason = reason[:MAX_REASON_CHARS - 3] + "..."
        log.warning("model update rejected on %s: %s", self.topic, reason)
        self.on_reject(announcement, reason)

    def _prune(self) -> None:
        """Keep the newest ``keep`` staged packages."""
        staged = sorted((p for p in self.staging_dir.glob(f"{STAGED_PREFIX}*") if p.is_dir()),
                        key=lambda p: p.stat().st_mtime)
        for old in staged[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)


def watch_models(agent: EdgeAgent, broker_url: str, staging_dir: str | Path) -> ModelWatcher:
    """Start a watcher that offers verified models to ``agent`` and reports rejections.

    Accepted models go to :meth:`EdgeAgent.offer_model` (which reports "now serving" when
    it swaps); rejections become "model ... rejected: why" notes in the agent's heartbeats.
    The agent's credentials are used. Close the watcher before the agent.

    Raises:
        ValueError: the agent has no scorer, so there is no model to update.

    """
    scorer = agent.scorer
    if scorer is None:
        msg = ("the agent has no edge model to update; build it with"
               " EdgeAgent(..., scorer=EdgeScorer(model, ...)) to follow announcements")
        raise ValueError(msg)

    def report_rejection(announcement: ModelAnnouncement | None, reason: str) -> None:
        what = ("model announcement" if announcement is None
                else f"model {announcement.model_id} {announcement.version}")
        agent.publisher.report(f"{what} rejected: {reason}")

    return ModelWatcher(
        broker_url, site=agent.settings.site, gateway_id=agent.settings.gateway_id,
        staging_dir=staging_dir, serving=lambda: scorer.model, on_model=agent.offer_model,
        on_reject=report_rejection, protocol=agent.settings.mqtt_protocol,
        username=agent.settings.username,
        password=agent.settings.password,
        tls=agent.settings.tls,
    ).start()
