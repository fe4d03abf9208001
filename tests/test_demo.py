"""`meshwatch demo --quick`: the whole platform on embedded defaults, nothing lost."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections import Counter

import pyarrow.dataset as ds

from meshwatch.cli import main


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


def test_quick_demo_loses_nothing(tmp_path, edge_model_dir, capsys) -> None:
    shutil.copytree(edge_model_dir, tmp_path / "edge-model")  # skip the first-run training
    before = _children()
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    out = " ".join(capsys.readouterr().out.split())
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
                     r" alarms, 0 still open; ([\d,]+) feedback messages", out)
    assert line, out
    alerts, stored, created, resolved, false_alarms, feedback = (
        int(group.replace(",", "")) for group in line.groups())
    assert alerts == stored > 0
    assert created > 0
    assert resolved + false_alarms == created == feedback  # every closure fed back once
    assert "remediation KPIs: remediation rate" in out

    # nothing left running: the flow's child process was stopped and reaped
    deadline = time.monotonic() + 5
    while _children() - before and time.monotonic() < deadline:
        time.sleep(0.1)
    left = _children() - before
    assert not left, subprocess.run(["ps", "-o", "pid,cmd", "-p", ",".join(map(str, left))],
                                    capture_output=True, text=True, check=False).stdout
