"""``meshwatch broker-config``: a real mosquitto runs the generated configuration.

One broker (plain + TLS listener, generated accounts and ACLs) serves the whole module; each
claim is checked against what that broker actually does.
"""

from __future__ import annotations

import csv
import os
import pwd
import queue
import ssl
import stat
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from servers import Mosquitto, Pki, free_port

import mesh_bridge.broker_config as broker_config
from mesh_bridge.broker_config import (
    MAX_INFLIGHT_MESSAGES,
    BrokerSettings,
    TlsFiles,
    verify_password,
    write_broker_config,
)
from meshwatch.cli import main
from meshwatch.contract import topics
from meshwatch.registry import load_registry

REGISTRY = """\
device_id,device_kind,site,district,gateway_id,cadence_s
mtr-1,customer_meter,dma-01,dma-01,gw-1,900
mtr-2,customer_meter,dma-01,dma-01,gw-2,900
mtr-3,customer_meter,dma-02,dma-02,gw-3,900
"""
WAIT_S = 5.0


# -- a broker that runs the generated configuration -------------------------------------------


class GeneratedMosquitto(Mosquitto):
    """tests/servers.py's controller, but running ``meshwatch broker-config``'s files."""

    def __init__(self, base_dir: Path, registry: Path, pki: Pki) -> None:
        super().__init__(base_dir)
        self.registry = registry
        self.pki = pki
        self.tls_port = free_port()

    @property
    def out_dir(self) -> Path:
        return self._dir / "generated"

    @property
    def config_path(self) -> Path:
        return self.out_dir / "mosquitto.conf"

    def _prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        settings = BrokerSettings(
            port=self.port, bind=self.host,
            tls=TlsFiles(self.pki.cert, self.pki.key, self.pki.ca),
            tls_port=self.tls_port, tls_bind=self.host,
            data_dir=self.data_dir, log_file=self._dir / "broker.log",
            # like servers.Mosquitto: run as ourselves, so persistence is writable
            user=pwd.getpwuid(os.geteuid()).pw_name,
        )
        write_broker_config(load_registry(self.registry), self.out_dir, settings)

    def _is_ready(self) -> bool:
        """Ready once the broker answers CONNECT at all: anonymous gets 'not authorized'."""
        import socket

        try:
            with socket.create_connection((self.host, self.port), timeout=1.0) as sock:
                sock.sendall(self._CONNECT)
                connack = sock.recv(4)
        except OSError:
            return False
        return connack[:2] == b"\x20\x02"


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[GeneratedMosquitto]:
    base = tmp_path_factory.mktemp("broker")
    registry = base / "registry.csv"
    registry.write_text(REGISTRY)
    with GeneratedMosquitto(base, registry, pki) as server:
        yield server


@pytest.fixture(scope="module")
def passwords(broker: GeneratedMosquitto) -> dict[str, str]:
    with (broker.out_dir / "credentials.csv").open(newline="") as handle:
        return {row["username"]: row["password"] for row in csv.DictReader(handle)}


# -- MQTT helpers -----------------------------------------------------------------------------


class Client:
    """A connected paho client that collects messages, PUBACK reason codes and disconnects."""

    def __init__(self, broker: GeneratedMosquitto, user: str | None, password: str | None, *,
                 protocol: mqtt.MQTTProtocolVersion = mqtt.MQTTv311, tls_ca: Path | None = None,
                 client_id: str = "", clean: bool = True) -> None:
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.pubacks: dict[int, Any] = {}
        self.connack: queue.Queue[Any] = queue.Queue()
        self.disconnected = threading.Event()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id or f"t-{uuid.uuid4().hex[:8]}",
            protocol=protocol, clean_session=clean if protocol == mqtt.MQTTv311 else None,
        )
        if user is not None:
            self.client.username_pw_set(user, password)
        if tls_ca is not None:
            self.client.tls_set(ca_certs=str(tls_ca))
        self.client.on_connect = lambda _c, _u, _f, rc, _p: self.connack.put(rc)
        self.client.on_message = lambda _c, _u, m: self.messages.put((m.topic, m.payload))
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_disconnect = lambda *_: self.disconnected.set()
        port = broker.tls_port if tls_ca is not None else broker.port
        self.client.connect(broker.host, port, keepalive=30)
        self.client.loop_start()
        self.rc = self.connack.get(timeout=WAIT_S)

    def _on_publish(self, _c: object, _u: object, mid: int, rc: Any, _p: object) -> None:
        self.pubacks[mid] = rc

    def subscribe(self, *filters: str) -> None:
        self.subscribed.clear()
        self.client.subscribe([(f, 1) for f in filters])
        assert self.subscribed.wait(WAIT_S)

    def publish(self, topic: str, payload: bytes) -> int:
        info = self.client.publish(topic, payload, qos=1)
        return info.mid

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    made: list[Client] = []
    yield made
    for client in made:
        client.close()


def _connect(clients: list[Client], broker: GeneratedMosquitto, user: str | None,
             password: str | None, **kwargs: Any) -> Client:
    client = Client(broker, user, password, **kwargs)
    clients.append(client)
    return client


# -- what the broker does -----------------------------------------------------------------------


def test_a_gateway_publishes_under_its_prefix_and_the_bridge_receives(
    broker: GeneratedMosquitto, passwords: dict[str, str], clients: list[Client]
) -> None:
    bridge = _connect(clients, broker, "bridge", passwords["bridge"])
    bridge.subscribe(topics.subscription("site_telemetry"), topics.subscription("site_status"))
    gateway = _connect(clients, broker, "gw-1", passwords["gw-1"])
    assert gateway.rc == 0
    gateway.publish(topics.site_telemetry("dma-01", "gw-1"), b"batch")
    gateway.publish(topics.site_status("dma-01", "gw-1"), b"birth")
    received = {bridge.messages.get(timeout=WAIT_S) for _ in range(2)}
    assert received == {
        (topics.site_telemetry("dma-01", "gw-1"), b"batch"),
        (topics.site_status("dma-01", "gw-1"), b"birth"),
    }


def test_a_gateway_cannot_publish_for_another_gateway_nor_its_own_model(
    broker: GeneratedMosquitto, passwords: dict[str, str], clients: list[Client]
) -> None:
    bridge = _connect(clients, broker, "bridge", passwords["bridge"])
    bridge.subscribe(topics.subscription("site_telemetry"), topics.subscription("site_model"))
    gateway = _connect(clients, broker, "gw-1", passwords["gw-1"])
    forbidden = [
        topics.site_telemetry("dma-01", "gw-2"),  # same site, other gateway
        topics.site_telemetry("dma-02", "gw-3"),  # other site
        topics.site_telemetry("dma-02", "gw-1"),  # its own id under another site
        topics.build("site_model", site="dma-01", gateway="gw-1"),  # models come from the cloud
    ]
    for topic in forbidden:
        gateway.publish(topic, b"spoofed")
    own = topics.site_telemetry("dma-01", "gw-1")
    gateway.publish(own, b"marker")
    # One publisher, one subscriber, QoS1: order is kept, so the marker comes after the rest.
    assert bridge.messages.get(timeout=WAIT_S) == (own, b"marker")
    assert bridge.messages.empty()


def test_mqtt5_denied_publish_is_acked_not_authorized(
    broker: GeneratedMosquitto, passwords: dict[str, str], clients: list[Client]
) -> None:
    bridge = _connect(clients, broker, "bridge", passwords["bridge"])
    bridge.subscribe(topics.subscription("site_telemetry"))
    gateway = _connect(clients, broker, "gw-1", passwords["gw-1"], protocol=mqtt.MQTTv5)
    denied = gateway.publish(topics.site_telemetry("dma-01", "gw-2"), b"spoofed")
    allowed = gateway.publish(topics.site_telemetry("dma-01", "gw-1"), b"own")
    assert bridge.messages.get(timeout=WAIT_S) == (topics.site_telemetry("dma-01", "gw-1"), b"own")
    # mosquitto 2.0.11 answers the denied QoS1 PUBLISH with PUBACK 0x87 and keeps the session.
    assert gateway.pubacks[denied].value == 0x87
    assert gateway.pubacks[allowed].value == 0
    assert not gateway.disconnected.is_set()
    assert bridge.messages.empty()


def test_anonymous_and_wrong_passwords_are_refused(
    broker: GeneratedMosquitto, passwords: dict[str, str], clients: list[Client]
) -> None:
    assert _connect(clients, broker, None, None).rc == "Not authorized"
    assert _connect(clients, broker, "gw-1", "not-the-password").rc == "Not authorized"
    assert _connect(clients, broker, "gw-1", passwords["gw-2"]).rc == "Not authorized"
    assert _connect(clients, broker, "nobody", passwords["gw-1"]).rc == "Not authorized"


def test_every_generated_password_is_accepted_by_mosquitto(
    broker: GeneratedMosquitto, passwords: dict[str, str], clients: list[Client]
) -> None:
    assert set(passwords) == {"gw-1", "gw-2", "gw-3", "bridge", "dataflow", "remediation"}
    for user, password in passwords.items():
        assert _connect(clients, broker, user, password).rc == 0, user


def test_service_accounts_are_confined_to_their_topics(
    broker: GeneratedMosquitto, passwords: dict[str, str], clients: list[Client]
) -> None:
    remediation = _connect(clients, broker, "remediation", passwords["remediation"])
    remediation.subscribe(topics.subscription("alerts"), "mw/v1/#")
    dataflow = _connect(clients, broker, "dataflow", passwords["dataflow"])
    dataflow.publish(topics.mesh_telemetry(0), b"not the bridge's job")  # dataflow may not
    dataflow.publish(topics.alerts("dma-01", "leak"), b"alert")
    assert remediation.messages.get(timeout=WAIT_S) == (topics.alerts("dma-01", "leak"), b"alert")
    gateway = _connect(clients, broker, "gw-1", passwords["gw-1"])
    gateway.publish(topics.site_telemetry("dma-01", "gw-1"), b"remediation may not read this")
    dataflow.publish(topics.alerts("dma-01", "burst"), b"marker")
    assert remediation.messages.get(timeout=WAIT_S) == (topics.alerts("dma-01", "burst"), b"marker")
    assert remediation.messages.empty()


def test_remediation_writes_feedback_crews_and_dead_letters_and_nothing_else(
    broker: GeneratedMosquitto, passwords: dict[str, str], clients: list[Client]
) -> None:
    dataflow = _connect(clients, broker, "dataflow", passwords["dataflow"])
    dataflow.subscribe(topics.subscription("feedback"))
    remediation = _connect(clients, broker, "remediation", passwords["remediation"],
                           protocol=mqtt.MQTTv5)
    allowed = [topics.build("feedback", district="dma-01"), topics.crew_work_orders("crew-a"),
               topics.dead_letter("malformed_json")]
    forbidden = [topics.alerts("dma-01", "leak"), topics.mesh_telemetry(0),
                 topics.site_telemetry("dma-01", "gw-1"),
                 topics.build("site_model", site="dma-01", gateway="gw-1"),
                 topics.build("bridge_heartbeat", bridge="b1")]
    mids = {topic: remediation.publish(topic, b"x") for topic in allowed + forbidden}
    assert dataflow.messages.get(timeout=WAIT_S) == (allowed[0], b"x")
    for _ in range(int(WAIT_S / 0.05)):
        if set(mids.values()) <= set(remediation.pubacks):
            break
        threading.Event().wait(0.05)
    codes = {topic: remediation.pubacks[mid].value for topic, mid in mids.items()}
    # 0x10: accepted, no subscriber (nobody else reads crews and dead letters here)
    assert {topic: codes[topic] for topic in allowed} == {
        allowed[0]: 0, allowed[1]: 0x10, allowed[2]: 0x10}
    assert {codes[topic] for topic in forbidden} == {0x87}, codes


def test_the_outbox_sender_delivers_as_remediation_and_keeps_what_the_acl_refuses(
    broker: GeneratedMosquitto, passwords: dict[str, str], clients: list[Client],
    tmp_path: Path,
) -> None:
    from remediation_support import T0, alert, new_store, wait_for
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from edge_agent.publisher import BrokerAddress
    from remediation.db import OutboxRow
    from remediation.notify import OutboxSender
    from remediation.store import Incoming, dead_letter_for

    store = new_store(f"sqlite:///{tmp_path / 'remediation.db'}")
    store.ingest([Incoming(alert=alert("a-1", device_id="mtr-1")),  # crew-a is notified
                  Incoming(dead_letter=dead_letter_for(
                      b"{", reason="malformed_json", detail="x", topic="t", client_id="c",
                      received_ms=T0))])
    (work_order,) = store.list_work_orders()[1]
    store.transition(work_order["work_order_id"], "false_alarm", actor="crew:crew-a",
                     role="crew", crew_scope="crew-a")  # feedback to the dataflow
    spoofed = topics.alerts("dma-01", "leak")  # a topic remediation must never write
    with store.session() as session:
        session.add(OutboxRow(dedupe_key="spoof", channel="mqtt", topic=spoofed, payload=b"x",
                              created_ms=T0, attempts=0, next_attempt_ms=T0))
    dataflow = _connect(clients, broker, "dataflow", passwords["dataflow"])
    dataflow.subscribe(topics.subscription("feedback"), topics.subscription("alerts"))
    sender = OutboxSender(store, BrokerAddress(broker.host, broker.port, "remediation",
                                               passwords["remediation"]),
                          client_id="remediation-out-test").start()
    try:
        wait_for(lambda: sender.published == 3, what="three rows published")

        def rows() -> dict[str, tuple[int | None, str | None]]:
            with Session(store.engine) as session:
                return {row.topic: (row.sent_ms, row.last_error)
                        for row in session.scalars(select(OutboxRow))}

        wait_for(lambda: rows()[spoofed][1] is not None, what="the refusal recorded")
    finally:
        sender.stop()
        store.engine.dispose()
    got = rows()
    assert {topic for topic, (sent, _) in got.items() if sent is not None} == {
        topics.crew_work_orders("crew-a"), topics.dead_letter("malformed_json"),
        topics.build("feedback", district="dma-01")}
    assert got[spoofed] == (None, "PUBACK Not authorized")  # kept, to retry once allowed
    assert dataflow.messages.get(timeout=WAIT_S)[0] == topics.build("feedback", district="dma-01")
    assert dataflow.messages.empty()


def test_tls_works_with_the_test_ca_and_fails_with_another(
    broker: GeneratedMosquitto, passwords: dict[str, str], pki: Pki, clients: list[Client]
) -> None:
    bridge = _connect(clients, broker, "bridge", passwords["bridge"], tls_ca=pki.ca)
    assert bridge.rc == 0
    bridge.subscribe(topics.subscription("site_telemetry"))
    gateway = _connect(clients, broker, "gw-3", passwords["gw-3"], tls_ca=pki.ca)
    gateway.publish(topics.site_telemetry("dma-02", "gw-3"), b"over tls")
    assert bridge.messages.get(timeout=WAIT_S) == (topics.site_telemetry("dma-02", "gw-3"),
                                                   b"over tls")
    with pytest.raises(ssl.SSLCertVerificationError):
        Client(broker, "gw-3", passwords["gw-3"], tls_ca=pki.other_ca)
    # TLS does not replace the password
    assert _connect(clients, broker, "gw-3", "wrong", tls_ca=pki.ca).rc == "Not authorized"


def _conf(path: Path) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            values.setdefault(key, []).append(value)
    return values


def test_config_says_what_the_issue_asks(broker: GeneratedMosquitto) -> None:
    conf = _conf(broker.config_path)
    assert conf["per_listener_settings"] == ["false"]
    assert conf["allow_anonymous"] == ["false"]
    assert conf["persistence"] == ["true"]
    assert 1 <= int(conf["autosave_interval"][0]) <= 5
    # QoS1 limits: far above mosquitto's dropping defaults (20 in flight, 1000 queued)
    assert int(conf["max_inflight_messages"][0]) == MAX_INFLIGHT_MESSAGES == 65_535
    assert int(conf["max_queued_messages"][0]) == broker_config.DEFAULT_MAX_QUEUED_MESSAGES
    assert int(conf["max_queued_bytes"][0]) == broker_config.DEFAULT_MAX_QUEUED_MB * 2**20
    assert conf["listener"] == [f"{broker.port} 127.0.0.1", f"{broker.tls_port} 127.0.0.1"]
    assert conf["require_certificate"] == ["false"]
    assert Path(conf["persistence_location"][0]) == broker.data_dir


def test_an_offline_consumer_gets_every_queued_message_across_a_broker_restart(
    broker: GeneratedMosquitto, passwords: dict[str, str], clients: list[Client]
) -> None:
    """3,000 QoS1 messages for an offline session: mosquitto's defaults would keep 1,000."""
    count = 3_000
    consumer_id = f"dataflow-{uuid.uuid4().hex[:6]}"
    dataflow = Client(broker, "dataflow", passwords["dataflow"], client_id=consumer_id,
                      clean=False)
    dataflow.subscribe(topics.subscription("mesh_telemetry"))
    dataflow.close()
    bridge = _connect(clients, broker, "bridge", passwords["bridge"])
    mids = [bridge.publish(topics.mesh_telemetry(i % 4), str(i).encode()) for i in range(count)]
    deadline_ok = threading.Event()
    for _ in range(int(WAIT_S / 0.05)):
        if all(mid in bridge.pubacks for mid in mids):
            deadline_ok.set()
            break
        deadline_ok.wait(0.05)
    assert deadline_ok.is_set(), "the broker did not PUBACK every message"
    broker.restart()  # a clean stop saves the queue; persistence must be writable
    dataflow = _connect(clients, broker, "dataflow", passwords["dataflow"],
                        client_id=consumer_id, clean=False)
    got = {int(dataflow.messages.get(timeout=WAIT_S)[1]) for _ in range(count)}
    assert got == set(range(count))


# -- the generator and its command line ---------------------------------------------------------


def test_password_hashes_match_mosquitto_passwd(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(path), "alice", "s3cret"], check=True)
    line = path.read_text().strip().split(":", 1)[1]
    assert line.startswith(f"$7${broker_config.PBKDF2_ITERATIONS}$")
    assert verify_password("s3cret", line)
    assert not verify_password("s3creT", line)


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    path = tmp_path / "registry.csv"
    path.write_text(REGISTRY)
    return path


def _credentials(out: Path) -> dict[str, str]:
    with (out / "credentials.csv").open(newline="") as handle:
        return {row["username"]: row["password"] for row in csv.DictReader(handle)}


def test_cli_writes_files_and_rerun_keeps_passwords(
    registry: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(["broker-config", "--registry", str(registry), "--out", str(out),
                 "--accounts", "bridge"]) == 0
    first = _credentials(out)
    assert set(first) == {"gw-1", "gw-2", "gw-3", "bridge"}
    assert stat.S_IMODE((out / "credentials.csv").stat().st_mode) == 0o600
    assert len(set(first.values())) == 4
    assert all(len(password) >= 40 for password in first.values())
    registry.write_text(REGISTRY + "mtr-4,customer_meter,dma-02,dma-02,gw-4,900\n")
    assert main(["broker-config", "--registry", str(registry), "--out", str(out)]) == 0
    second = _credentials(out)
    assert {user: second[user] for user in first} == first
    assert set(second) - set(first) == {"gw-4", "dataflow", "remediation"}
    assert "3 new" in capsys.readouterr().out.splitlines()[-1]
    passwd = dict(line.split(":", 1) for line in (out / "passwd").read_text().splitlines())
    assert all(verify_password(second[user], passwd[user]) for user in second)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tls-cert", "/nonexistent.crt"], "go together"),
        (["--tls-cert", "/nonexistent.crt", "--tls-key", "/k", "--tls-ca", "/c"],
         "--tls-cert /nonexistent.crt is not a file"),
        (["--accounts", "bridge,admin"], "unknown service account 'admin'"),
        (["--client-expiration", "forever"], "--client-expiration"),
        (["--require-certificate"], "--require-certificate needs"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_message(
    registry: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str],
    message: str,
) -> None:
    out = tmp_path / "out"
    assert main(["broker-config", "--registry", str(registry), "--out", str(out), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (out / "passwd").exists()


def test_mismatched_key_and_missing_registry_and_file_as_out_exit_2(
    registry: Path, tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "out")
    tls = ["--tls-cert", str(pki.cert), "--tls-key", str(pki.key), "--tls-ca", str(pki.ca)]
    assert main(["broker-config", "--registry", str(registry), "--out", out, *tls]) == 0
    wrong_key = ["--tls-cert", str(pki.ca), "--tls-key", str(pki.key), "--tls-ca", str(pki.ca)]
    assert main(["broker-config", "--registry", str(registry), "--out", out, *wrong_key]) == 2
    assert "matching unencrypted private key" in capsys.readouterr().err
    assert main(["broker-config", "--registry", str(tmp_path / "no.csv"), "--out", out]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["broker-config", "--registry", str(registry), "--out", str(registry)]) == 2
    assert "is a file; pass a directory" in capsys.readouterr().err


def test_a_gateway_in_two_sites_is_an_error(registry: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    registry.write_text(REGISTRY + "mtr-9,customer_meter,dma-02,dma-02,gw-1,900\n")
    assert main(["broker-config", "--registry", str(registry), "--out", str(tmp_path)]) == 2
    assert "gw-1: dma-01, dma-02" in capsys.readouterr().err


def test_tls_install_dir_names_the_files_where_the_broker_sees_them(
    tmp_path: Path, pki: Pki
) -> None:
    registry = load_registry_text(tmp_path)
    settings = BrokerSettings(tls=TlsFiles(pki.cert, pki.key, pki.ca),
                              tls_install_dir=Path("/mosquitto/config/certs"))
    write_broker_config(registry, tmp_path / "out", settings)
    conf = (tmp_path / "out" / "mosquitto.conf").read_text()
    for key, path in (("certfile", pki.cert), ("keyfile", pki.key), ("cafile", pki.ca)):
        assert f"{key} /mosquitto/config/certs/{path.name}\n" in conf
    clash = tmp_path / "other"  # two files of one name would overwrite each other there
    clash.mkdir()
    (clash / pki.cert.name).write_bytes(pki.ca.read_bytes())
    settings = BrokerSettings(tls=TlsFiles(pki.cert, pki.key, clash / pki.cert.name),
                              tls_install_dir=Path("/certs"))
    with pytest.raises(broker_config.BrokerConfigError, match="three different file names"):
        write_broker_config(registry, tmp_path / "out2", settings)


def load_registry_text(directory: Path) -> Any:
    path = directory / "registry.csv"
    path.write_text(REGISTRY)
    return load_registry(path)
