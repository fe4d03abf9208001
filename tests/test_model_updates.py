"""Model updates: a good model swaps in between blocks with no reading lost; bad ones are
rejected with a reason in a status message while the old model keeps serving."""

from __future__ import annotations

import dataclasses
import functools
import http.server
import json
import logging
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from conftest import SMALL_EDGE_TRAINING
from mqtt_ledger import Ledger, wait_until
from paho.mqtt.enums import CallbackAPIVersion
from servers import Mosquitto, free_port
from test_edge_model import onnx_model, replace_model

from edge_agent.agent import AgentSettings, EdgeAgent
from edge_agent.model_updates import ModelWatcher, watch_models
from edge_agent.scoring import EdgeScorer
from meshwatch.contract import DeviceStatus, EdgeScore, ModelAnnouncement, encode, topics
from models.edge.package import EdgeModel, load_package
from models.edge.train import train_edge_model, write_package
from simulators import FleetConfig, FleetSimulator, SimConfig

SITE, GATEWAY = "dma-01", "dma-01-gw-001"
MODEL_TOPIC = topics.build("site_model", site=SITE, gateway=GATEWAY)
T0_MS = 1_767_571_200_000


@pytest.fixture(scope="module")
def new_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, different model: another seed and fewer trees (about a second to train)."""
    trained = train_edge_model(dataclasses.replace(SMALL_EDGE_TRAINING, seed=7, trees=5))
    return write_package(trained, tmp_path_factory.mktemp("new-model") / "pkg")


@pytest.fixture
def old_model(edge_model_dir: Path) -> EdgeModel:
    return load_package(edge_model_dir)


@pytest.fixture
def agent(tmp_path: Path, mosquitto: Mosquitto, old_model: EdgeModel) -> Iterator[EdgeAgent]:
    settings = AgentSettings(site=SITE, gateway_id=GATEWAY, broker_url=mosquitto.url,
                             outbox_path=tmp_path / "outbox.db", outbox_synchronous="NORMAL",
                             max_batch_readings=100, backlog_rate_per_s=None)
    scorer = EdgeScorer(old_model, site=SITE, gateway_id=GATEWAY, threshold=0.9)
    with EdgeAgent(settings, scorer=scorer) as running:
        yield running


@pytest.fixture
def ledger(mosquitto: Mosquitto) -> Iterator[Ledger]:
    ledger = Ledger(mosquitto, "ledger-models", *(topics.subscription(kind) for kind in (
        "site_telemetry", "site_scores", "site_alerts", "site_status")))
    yield ledger
    ledger.close()


@pytest.fixture
def staging(tmp_path: Path) -> Path:
    return tmp_path / "staging"


def blocks(days: float) -> list:
    config = SimConfig(fleet=FleetConfig(meters=200), days=days, seed=5)
    return [b for b in FleetSimulator(config) if b.gateway_id == GATEWAY]


def announcement(package: Path, *, url: str | None = None, sha256: str | None = None,
                 ts_ms: int = T0_MS) -> ModelAnnouncement:
    manifest = json.loads((package / "manifest.json").read_text())
    return ModelAnnouncement(model_id=manifest["model_id"], version=manifest["version"],
                             url=url or package.as_uri(), sha256=sha256 or manifest["sha256"],
                             ts_ms=ts_ms)


def announce(broker: Mosquitto, payload: bytes) -> None:
    """Publish a retained announcement at QoS1 and wait for the broker's PUBACK."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect(broker.host, broker.port)
    client.loop_start()
    client.publish(MODEL_TOPIC, payload, qos=1, retain=True).wait_for_publish(5)
    client.disconnect()
    client.loop_stop()


def score_versions(ledger: Ledger) -> list[str]:
    return [e.model_version for e in list(ledger.events) if isinstance(e, EdgeScore)]


def notes(ledger: Ledger) -> list[str]:
    return [s.message or "" for s, _ in ledger.status_events(GATEWAY)]


def wait_for_note(ledger: Ledger, *parts: str) -> str:
    def found() -> str | None:
        return next((n for n in notes(ledger) if all(p in n for p in parts)), None)
    wait_until(lambda: found() is not None, 10, f"a status message with {parts}")
    return found() or ""


def submit(agent: EdgeAgent, todo: list) -> None:
    for block in todo:
        assert agent.submit_block(block)


def wait_delivered(agent: EdgeAgent, ledger: Ledger, done: list) -> set[tuple[str, int]]:
    """Wait until every reading of ``done`` and every message the agent sent has arrived."""
    expected = {(str(d), int(s)) for b in done for d, s in zip(b.device_ids, b.seq, strict=True)}
    ledger.wait_for(expected)
    sent = agent.stats()["messages_out"]  # telemetry, scores and alerts (statuses skip the outbox)
    wait_until(lambda: sum(not isinstance(e, DeviceStatus) for e in list(ledger.events)) >= sent,
               10, "every message to arrive")
    return expected


def test_a_good_model_swaps_in_between_blocks_with_no_reading_lost(
        agent, ledger, mosquitto, staging, old_model, new_model_dir) -> None:
    new = announcement(new_model_dir)
    assert new.version != old_model.version
    todo = blocks(days=1.5)
    watcher = watch_models(agent, mosquitto.url, staging)
    for i, block in enumerate(todo):
        if i == 30:
            announce(mosquitto, encode(new))
        if i > 30 and watcher.accepted == 0:
            time.sleep(0.01)  # the input keeps going while the package is fetched and loaded
        assert agent.submit_block(block)
    watcher.close()
    assert (watcher.accepted, watcher.rejected) == (1, 0)
    wait_delivered(agent, ledger, todo)  # every (device, seq) arrived: none lost
    versions = score_versions(ledger)
    switch = versions.index(new.version)
    assert switch > 0
    assert set(versions[:switch]) == {old_model.version}  # one switch, between two blocks
    assert set(versions[switch:]) == {new.version}
    serving = f"model {new.model_id} {new.version} now serving"
    wait_for_note(ledger, serving)
    status = next(s for s, _ in ledger.status_events(GATEWAY) if s.message == serving)
    assert status.model_version == new.version
    assert [p.name.startswith(f"pkg-{new.model_id}-{new.version}-") for p in staging.iterdir()
            ] == [True]


def test_a_bad_checksum_is_rejected_and_the_old_model_keeps_serving(
        agent, ledger, mosquitto, staging, old_model, new_model_dir) -> None:
    announce(mosquitto, encode(announcement(new_model_dir, sha256="0" * 64)))  # retained first
    with watch_models(agent, mosquitto.url, staging) as watcher:
        wait_until(lambda: watcher.rejected == 1, 10, "the rejection")
        todo = blocks(days=0.5)
        submit(agent, todo)
        wait_delivered(agent, ledger, todo)
    assert watcher.accepted == 0
    assert set(score_versions(ledger)) == {old_model.version}
    note = wait_for_note(ledger, "rejected")
    assert "the announcement says 0000" in note
    assert new_model_dir.as_uri() in note  # names the package the operator announced
    assert list(staging.iterdir()) == []  # nothing rejected stays on disk


def test_a_model_with_the_wrong_input_shape_is_rejected(
        agent, ledger, mosquitto, staging, tmp_path, old_model, new_model_dir) -> None:
    package = tmp_path / "narrow"
    shutil.copytree(new_model_dir, package)
    replace_model(package, onnx_model(width=14))  # 14 inputs, manifest lists 15 features
    with watch_models(agent, mosquitto.url, staging) as watcher:
        announce(mosquitto, encode(announcement(package)))
        wait_until(lambda: watcher.rejected == 1, 10, "the rejection")
        todo = blocks(days=0.5)
        submit(agent, todo)
        wait_delivered(agent, ledger, todo)
    note = wait_for_note(ledger, "rejected")
    assert "input is 'features' tensor(float) [None, 14]" in note
    assert "[N, 15]" in note
    assert set(score_versions(ledger)) == {old_model.version}
    assert agent.publisher.model_version == old_model.version  # never swapped


@pytest.mark.parametrize(("payload", "reason"), [
    (lambda p: encode(announcement(p, url=f"http://127.0.0.1:{free_port()}/pkg/")),
     "/pkg/model.onnx failed: [Errno 111] Connection refused"),
    (lambda p: encode(announcement(p, url=str(p.parent / "missing"))),
     "missing/model.onnx not found"),
    (lambda p: encode(announcement(p, url="ftp://models.local/pkg/")),
     "unsupported package url 'ftp://models.local/pkg/'"),
    (lambda p: b'{"type": "model", "model_id": "m"}', "missing_field"),
    (lambda p: b"not json", "malformed_json"),
])
def test_unreachable_and_malformed_announcements_are_rejected_with_the_reason(
        agent, ledger, mosquitto, staging, old_model, new_model_dir, payload, reason) -> None:
    with watch_models(agent, mosquitto.url, staging) as watcher:
        announce(mosquitto, payload(new_model_dir))
        wait_until(lambda: watcher.rejected == 1, 10, "the rejection")
        note = wait_for_note(ledger, "rejected")
    assert reason in note
    new = announcement(new_model_dir)
    assert note.startswith((f"model {new.model_id} {new.version} rejected: ",
                            f"model announcement rejected: bad announcement on {MODEL_TOPIC}: "))
    assert agent.scorer.model is old_model


def test_the_version_already_serving_is_ignored(
        agent, mosquitto, staging, edge_model_dir, caplog) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent.model_updates")
    announce(mosquitto, encode(announcement(edge_model_dir)))
    with watch_models(agent, mosquitto.url, staging) as watcher:
        wait_until(lambda: "already serves" in caplog.text, 10, "the announcement")
    assert (watcher.accepted, watcher.rejected) == (0, 0)
    assert list(staging.iterdir()) == []
    assert agent.publisher.model_version == agent.scorer.model.version  # unchanged


def test_a_package_is_fetched_over_http_and_old_staged_packages_are_pruned(
        mosquitto, tmp_path, old_model, new_model_dir) -> None:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler,
                                directory=str(new_model_dir.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    staging = tmp_path / "staging"
    for old in ("pkg-a-1-x", "pkg-b-2-y"):
        (staging / old).mkdir(parents=True)
        time.sleep(0.01)  # distinct modification times
    models: list[EdgeModel] = []
    url = f"http://127.0.0.1:{server.server_port}/{new_model_dir.name}"
    try:
        with ModelWatcher(mosquitto.url, site=SITE, gateway_id=GATEWAY, staging_dir=staging,
                          serving=lambda: old_model, on_model=models.append,
                          on_reject=lambda a, why: pytest.fail(why)):
            announce(mosquitto, encode(announcement(new_model_dir, url=url)))
            wait_until(lambda: len(models) == 1, 10, "the model")
    finally:
        server.shutdown()
    assert models[0].version == load_package(new_model_dir).version
    assert sorted(p.name[:9] for p in staging.iterdir()) == ["pkg-b-2-y", "pkg-edge-"]
