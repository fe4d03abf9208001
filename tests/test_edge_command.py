"""`meshwatch edge` as a process: simulated and OPC-UA input, kill -9 and SIGTERM, bad config."""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from mqtt_ledger import Ledger, wait_until
from servers import Mosquitto, free_port

from meshwatch.contract import EdgeScore, TelemetryBatch, decode, topics
from simulators import FleetConfig, FleetSimulator, SimConfig

GATEWAY = "dma-01-gw-001"
SIM_ARGS = ["--meters", "600", "--days", "1", "--seed", "5"]


def _config(tmp_path: Path, broker: Mosquitto, extra: str = "", **edge: object) -> Path:
    values = {"site": "dma-01", "gateway_id": GATEWAY, "outbox_path": str(tmp_path / "o.db"),
              "outbox_synchronous": "NORMAL", "backlog_rate_per_s": 0,
              "shutdown_timeout_s": 5, **edge}
    lines = [f'[site_broker]\nurl = "{broker.url}"\n', "[edge]"]
    lines += [f"{key} = {value!r}".replace("'", '"') for key, value in values.items()]
    path = tmp_path / "edge.toml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def _edge(config: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "meshwatch.cli", "edge", "--config", str(config), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _expected_readings() -> set[tuple[str, int]]:
    config = SimConfig(fleet=FleetConfig(meters=600), days=1, seed=5)
    return {(str(d), int(s)) for b in FleetSimulator(config) if b.gateway_id == GATEWAY
            for d, s in zip(b.device_ids, b.seq, strict=True)}


def test_a_simulated_run_delivers_every_reading_and_its_scores(
    tmp_path, mosquitto, edge_model_dir
) -> None:
    ledger = Ledger(mosquitto, "ledger-cmd", topics.subscription("site_telemetry"),
                    topics.subscription("site_scores"))
    config = _config(tmp_path, mosquitto, model_dir=str(edge_model_dir))
    process = _edge(config, "--simulate", *SIM_ARGS)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    expected = _expected_readings()
    ledger.wait_for(expected)
    assert "readings_in" in out
    assert "empty" in out  # the outbox drained before exit
    assert "peak rss" in out  # the agent's own, without its simulator child
    scored = {w.device_id for e in ledger.events if isinstance(e, EdgeScore) for w in e.windows}
    assert len(scored) > 100
    ledger.close()


def test_kill_9_then_restart_delivers_what_the_outbox_held(tmp_path, mosquitto) -> None:
    config = _config(tmp_path, mosquitto)
    mosquitto.stop()  # nothing can leave: everything accepted stays in the outbox
    process = _edge(config, "--simulate", *SIM_ARGS, "--speed", "20000")
    time.sleep(4)
    process.kill()
    process.wait(timeout=10)
    with contextlib.closing(sqlite3.connect(tmp_path / "o.db")) as db:
        payloads = [row[0] for row in db.execute("SELECT payload FROM messages")]
    held = {(r.device_id, r.seq) for p in payloads
            for r in decode(p, TelemetryBatch).readings}
    assert len(held) > 1000, "the agent should have buffered readings before the kill"
    mosquitto.start()
    ledger = Ledger(mosquitto, "ledger-kill", topics.subscription("site_telemetry"))
    restarted = _edge(config)  # no input: it only drains its outbox
    try:
        ledger.wait_for(held)
    finally:
        restarted.send_signal(signal.SIGTERM)
        out, err = restarted.communicate(timeout=30)
    assert restarted.returncode == 0, err
    assert "Traceback" not in err
    assert "empty" in out
    ledger.close()


def test_opcua_readings_get_seqs_and_reach_the_broker(tmp_path, mosquitto) -> None:
    port = free_port()
    station = subprocess.Popen(
        [sys.executable, "-m", "meshwatch.cli", "simulate", "opcua", "--port", str(port),
         "--meters", "300", "--seed", "7", "--speed", "600"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    nodes = "".join(
        f'[[opcua.nodes]]\nnode_id = "ns=2;s=dma-01-pump.{metric}"\n'
        f'device_id = "dma-01-pump"\nmetric = "{metric}"\n'
        for metric in ("flow_lpm", "outlet_pressure_bar"))
    opcua = (f'[[opcua]]\nurl = "opc.tcp://127.0.0.1:{port}"\npublishing_interval_ms = 100\n'
             f"keepalive_s = 1\nreconnect_max_s = 1\n{nodes}")
    config = _config(tmp_path, mosquitto, opcua, gateway_id="dma-01-scada",
                     batch_max_delay_s=0.2)
    ledger = Ledger(mosquitto, "ledger-opcua", topics.subscription("site_telemetry"))
    agent = _edge(config)
    try:
        wait_until(lambda: len(ledger.received()) >= 40, 40, "OPC-UA readings via the agent")
    finally:
        agent.send_signal(signal.SIGTERM)
        _, err = agent.communicate(timeout=30)
        station.send_signal(signal.SIGINT)
        station.communicate(timeout=15)
    assert agent.returncode == 0, err
    seqs = sorted(seq for device, seq in ledger.received() if device == "dma-01-pump")
    assert seqs == list(range(len(seqs)))  # the agent numbered them, none missing
    ledger.close()


def test_a_simulated_gateway_outside_the_fleet_is_refused(tmp_path, mosquitto) -> None:
    config = _config(tmp_path, mosquitto, gateway_id="dma-09-gw-001")
    process = _edge(config, "--simulate", *SIM_ARGS)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 2
    assert "has no gateway dma-09-gw-001" in err
    assert "Traceback" not in err
    assert not (tmp_path / "o.db").exists()  # refused before the outbox was opened


def test_a_bad_configuration_is_refused_with_a_reason(tmp_path, mosquitto) -> None:
    config = tmp_path / "edge.toml"
    config.write_text('[site_broker]\nurl = "mqtt://127.0.0.1:1"\n[edge]\nsite = "dma-01"\n')
    process = _edge(config)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 2
    assert "edge.gateway_id" in err
    assert "Traceback" not in err
    bad_model = _config(tmp_path, mosquitto, model_dir=str(tmp_path / "missing"))
    process = _edge(bad_model)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 2
    assert "manifest.json is missing" in err
