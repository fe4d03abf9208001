"""`meshwatch demo --quick`: the whole platform on embedded defaults, nothing lost."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

import pyarrow.dataset as ds

from meshwatch.cli import main
from meshwatch.report import detection
from meshwatch.report.detection import QUICK_FLOORS, Floor


def _children() -> set[int]:
    """Pids of this process's live children: the demo's flow and the bridge's router while
    the demo runs (multiprocessing's resource tracker lives as long as the interpreter)."""
    found = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                command = handle.read()
        except OSError:
            continue
        if (int(fields[1]) == os.getpid() and fields[0] != "Z"
                and b"multiprocessing.resource_tracker" not in command):
            found.add(int(pid))
    return found


IMPOSSIBLE = Floor("burst", "recall", 1.01, "impossible, to see the demo fail")


def test_quick_demo_loses_nothing(tmp_path, edge_model_dir, capsys, monkeypatch) -> None:
    shutil.copytree(edge_model_dir, tmp_path / "edge-model")  # skip the first-run training
    before = _children()
    # one floor no run can keep: the demo must fail on it, and on it alone
    monkeypatch.setattr(detection, "QUICK_FLOORS", (*QUICK_FLOORS, IMPOSSIBLE))
    started = time.monotonic()
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 1
    elapsed = time.monotonic() - started
    out = " ".join(capsys.readouterr().out.split())
    assert re.search(r"detection below its floors: burst recall is 1\.00, below its floor 1\.01",
                     out), out
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report["floors_failed"]) == 1  # the real floors are all kept
    assert "ledger does not balance" not in out
    assert "nothing lost" in out
    assert "read over OPC-UA" in out
    assert " 0 of them read over OPC-UA" not in out  # the pump station was really read
    assert "dead letters: none; all acknowledged" in out  # the bridge's line
    # one agent per gateway: 2 districts, each with a concentrator and a SCADA gateway
    assert len(list((tmp_path / "outboxes").glob("*.db"))) == 4

    # the dataflow: every reading the bridge forwarded is in the lake once, and it says so
    forwarded = int(re.search(r"readings in, ([\d,]+) forwarded", out)[1].replace(",", ""))
    assert "every reading that reached the mesh is in the lake exactly once" in out
    lake = ds.dataset(tmp_path / "lake", format="parquet", partitioning="hive").to_table(
        columns=["device_id", "seq"])
    ids = Counter(zip(lake.column("device_id").to_pylist(), lake.column("seq").to_pylist(),
                      strict=True))
    assert len(ids) == forwarded > 100_000
    assert max(ids.values()) == 1
    assert "InfluxDB off" in out

    # remediation: the edge alerts the bridge forwarded became work orders the crews closed
    assert re.search(r"crew page: http://127\.0\.0\.1:\d+/ui/crew", out)
    line = re.search(r"remediation: ([\d,]+) alerts in the mesh, ([\d,]+) stored .*?none lost"
                     r".*?([\d,]+) work orders created, ([\d,]+) resolved.*?([\d,]+) false"
                     r" alarms, ([\d,]+) cancelled .*?, 0 still open; ([\d,]+) feedback messages",
                     out)
    assert line, out
    alerts, stored, created, resolved, false_alarms, cancelled, feedback = (
        int(group.replace(",", "")) for group in line.groups())
    assert alerts == stored > 0
    assert created > 0
    assert resolved + false_alarms + cancelled == created
    # every closure by a crew is fed back (a false alarm may reopen on new evidence, and be
    # cancelled later: its feedback was sent all the same)
    assert resolved + false_alarms <= feedback <= created
    assert "remediation KPIs: remediation rate" in out
    # the crews worked during the run and found the real leaks the truth held at the time
    assert re.search(r"resolved \(confirmed_burst \d+, confirmed_leak [1-9]", out), out

    # the report: latency measured for every reading and alert, detection against the truth
    assert f"report: {tmp_path / 'report.html'}" in out
    stored_rows = report["latency"]["site_broker_to_lake"]["n"]
    assert stored_rows == report["latency"]["mesh_to_lake"]["n"] == forwarded
    for name, measured in report["latency"].items():
        assert 0 < measured["p50_s"] <= measured["p99_s"] <= measured["max_s"] < elapsed, name
    assert report["latency"]["evidence_in_mesh_to_alert_in_mesh"]["n"] > 10
    kinds = report["detection"]["kinds"]
    for floor in QUICK_FLOORS:
        assert kinds[floor.kind][floor.metric] >= floor.value, floor
    assert kinds["customer_leak"]["detectable"] >= 8  # the floors rest on enough episodes
    assert kinds["burst"]["detectable"] >= 4
    page = (tmp_path / "report.html").read_text()
    for image in ("throughput.png", "latency.png", "timeline.png", "work_orders.png"):
        assert (tmp_path / image).stat().st_size > 5_000, image
        assert f"src='{image}'" in page
    boards = re.findall(r"href='(dashboards/dashboards/[\w-]+\.json)'", page)
    assert len(boards) == 6
    assert all((tmp_path / board).is_file() for board in boards)
    assert (tmp_path / "dashboards" / "provisioning" / "dashboards" / "meshwatch.yaml").is_file()
    assert "<td>verdict</td><td>nothing lost, nothing twice</td>" in page

    # nothing left running: the flow's child process was stopped and reaped
    deadline = time.monotonic() + 5
    while _children() - before and time.monotonic() < deadline:
        time.sleep(0.1)
    left = _children() - before
    assert not left, subprocess.run(["ps", "-o", "pid,cmd", "-p", ",".join(map(str, left))],
                                    capture_output=True, text=True, check=False).stdout


def _in_session(sid: int) -> set[int]:
    """Pids of live processes in session ``sid``."""
    found = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                found.add(int(pid))
    return found


def test_ctrl_c_stops_the_demo_cleanly(tmp_path, edge_model_dir, victoria_metrics) -> None:
    """Ctrl-C stops everything; with ``--influx-url`` the bridge wrote its statistics."""
    shutil.copytree(edge_model_dir, tmp_path / "edge-model")
    demo = subprocess.Popen(  # its own session: Ctrl-C reaches the whole process group
        [sys.executable, "-m", "meshwatch.cli", "demo", "--quick", "--out", str(tmp_path),
         "--influx-url", victoria_metrics.url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert demo.stdout is not None
        for line in demo.stdout:  # the services are up and the simulation is starting
            if line.startswith("dataflow:"):
                break
        time.sleep(8)
        assert demo.poll() is None
        assert len(_in_session(demo.pid)) >= 2  # the demo and its dataflow at least
        os.killpg(demo.pid, signal.SIGINT)
        out, err = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
    assert demo.returncode == 1
    assert "interrupted: stopping everything" in out
    assert "Traceback" not in err, err[-3000:]
    deadline = time.monotonic() + 10
    while _in_session(demo.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _in_session(demo.pid)  # the dataflow and the bridge's router are gone too
    # the bridge's statistics writer ran, as `meshwatch bridge` runs it, and wrote its last
    # snapshot on the way out
    series = victoria_metrics.wait_for_samples('mw_bridge_readings_in{bridge="demo-bridge"}', 1)
    assert max(series[0]["values"]) > 0


def test_the_demos_remediation_ignores_the_operators_environment(tmp_path, monkeypatch) -> None:
    """`make demo` in a shell set up for production writes its work orders to its own SQLite
    file, not to the production database the environment names; InfluxDB only as told."""
    from flow_support import write_registry

    from meshwatch.demo import _Remediation

    write_registry(tmp_path / "registry.csv", {"mtr-1": 900})
    monkeypatch.setenv("MESHWATCH_DATABASE__URL", "postgresql://meshwatch@db.prod.invalid/mw")
    monkeypatch.setenv("MESHWATCH_REMEDIATION__HTTP_PORT", "1")
    monkeypatch.setenv("MESHWATCH_INFLUXDB__URL", "http://influx.prod.invalid:8086")
    monkeypatch.setenv("MESHWATCH_INFLUXDB__ORG", "water-co")
    quiet = _Remediation(tmp_path, "mqtt://127.0.0.1:1883", "5", ["dma-01"], 18080)
    told = _Remediation(tmp_path, "mqtt://127.0.0.1:1883", "5", ["dma-01"], 18081,
                        "http://127.0.0.1:8428")
    for remediation in (quiet, told):
        config = remediation.service.config
        assert config.database.url == f"sqlite:///{tmp_path / 'remediation.db'}"
        assert config.remediation.http_port in (18080, 18081)
        remediation.service.engine.dispose()
    assert quiet.service.influx is None
    assert told.service.influx is not None
    told.service.influx.stop()
    assert quiet.service.config.influxdb.url is None
    assert (told.service.config.influxdb.url, told.service.config.influxdb.org) == (
        "http://127.0.0.1:8428", "water-co")
