"""The whole data path on real servers: simulator → edge agents → site mosquitto → ``meshwatch
bridge`` → cloud mosquitto → ``meshwatch flow`` (detection on) → VictoriaMetrics and alerts.

The fleet is the detection tests' (``detect_support.eval_settings``: 300 meters, 2 districts,
4 gateways, 3 days, ~100k readings; loss and meter gaps on, nothing that reorders a device's
readings). Its gateways' edge agents run in a process of their own
(``tests/pipeline_support.py``) and publish as fast as their outboxes drain, while the
bridge and the flow run. At the end:

- VictoriaMetrics holds every delivered reading, every metric of it, exactly once per
  (series, time), with the simulated value and ``imputed=false``; none of the readings that
  the simulator's communication faults lost is there as a measurement; the lake holds every
  delivered ``(device, seq)`` once;
- the points that gap filling made are ``imputed=true``, exactly at the missing cadence steps
  of gaps up to ``gap_fill_max_intervals``, and only where the simulator lost a reading;
- the flow's alerts are, message for message, those of ``meshwatch evaluate``'s pipeline on
  the same seed (:func:`detect_support.reference`).

**Why the lateness spans the run.** The four agents run flat out, side by side, so one
gateway can be hours of event time ahead of another when their messages meet in a mesh
partition. The ordering stage does not mind (a reading is late only behind its *own*
device's last one), but the detection stage does: a district's watermark is the minimum of
its shards', and a shard's watermark trails the newest event time of *any* of its devices by
the allowed lateness. Readings of a lagging gateway would fall behind the district's ticks
(counted in ``behind``) and be scored after ticks that evaluate runs before them, so the
alerts would differ by design (see ``detect_support``). A live fleet delivers in wall-clock
time and needs a lateness of a few minutes; a simulation that runs days in seconds needs one
longer than its skew: here, longer than the run, so everything is released in event time
once the input goes quiet for ``idle_flush_s``. The test asserts ``behind == 0`` to show the
premise held.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from bridge_support import create_site_session, spawn_bridge
from bridge_support import write_config as write_bridge_config
from detect_support import alert_keys, eval_settings, reference, write_fleet_registry
from flow_support import (
    CLIENT_ID,
    MAX_FILL,
    AlertWatch,
    FlowProcess,
    counters,
    create_sessions,
    detect_counts,
    lake_ids,
    wait_for,
    write_config,
)
from pipeline_support import expected_imputed, truth

from meshwatch.contract import AlertStatus

pytestmark = pytest.mark.timeout(240)

IDLE_FLUSH_S = 5
"""Longer than any pause between the agents' messages on a busy machine (see the doc)."""


def stored_points(vm) -> dict[str, dict[tuple[str, str, int], list[float]]]:
    """``{"true"|"false": {(metric, device, ts_ms): [samples]}}`` of every ``mw_telemetry``
    field in VictoriaMetrics."""
    vm.force_flush()
    out: dict[str, dict[tuple[str, str, int], list[float]]] = {"true": {}, "false": {}}
    for series in vm.export('{__name__=~"mw_telemetry_.+"}'):
        labels = series["metric"]
        metric = labels["__name__"].removeprefix("mw_telemetry_")
        target = out[labels["imputed"]]
        for ts, value in zip(series["timestamps"], series["values"], strict=True):
            target.setdefault((metric, labels["device"], ts), []).append(value)
    return out


def test_every_reading_goes_from_the_simulator_to_the_tsdb_once_and_alerts_match_evaluate(
        mosquitto, cloud, victoria_metrics, tmp_path) -> None:
    settings = eval_settings()
    want = truth(settings)
    want_alerts = reference(settings)
    want_imputed = expected_imputed(want, MAX_FILL)
    assert want.lost  # the run loses readings
    assert want_imputed
    assert want_imputed <= want.lost  # and gap filling may only fill those
    registry = write_fleet_registry(tmp_path / "registry.csv", settings)
    flow_config = write_config(tmp_path / "flow.toml", cloud, victoria_metrics, tmp_path / "lake",
                               registry, allowed_lateness_s=int(settings.days * 86_400) + 3600,
                               idle_flush_s=IDLE_FLUSH_S)
    (tmp_path / "bridge").mkdir()
    bridge_config = write_bridge_config(tmp_path / "bridge", mosquitto, cloud, "e2e-bridge",
                                        registry=registry)
    create_site_session(mosquitto, "e2e-bridge")
    create_sessions(cloud, CLIENT_ID)
    watch = AlertWatch(cloud)
    bridge = spawn_bridge(bridge_config, tmp_path / "bridge.log")
    started = time.monotonic()
    try:
        with FlowProcess(flow_config, tmp_path / "flow.log", workers=2) as flow:
            (tmp_path / "outboxes").mkdir()
            edge = subprocess.run(
                [sys.executable, str(Path(__file__).with_name("pipeline_support.py")),
                 mosquitto.url, str(tmp_path / "outboxes")],
                capture_output=True, text=True, timeout=150, check=False)
            assert edge.returncode == 0, edge.stderr[-3000:]
            report = json.loads(edge.stdout.splitlines()[-1])
            assert sum(report["accepted"].values()) == len(want.seqs)
            edge_s = time.monotonic() - started
            wait_for(lambda: counters(victoria_metrics).get("measured", 0) >= len(want.seqs),
                     90, "every reading measured by the flow", flow)
            wait_for(lambda: len(watch.distinct()) >= len(want_alerts), 30, "the alerts", flow)
            wait_for(lambda: len(lake_ids(tmp_path / "lake")) >= len(want.seqs), 30, "the lake",
                     flow)
            time.sleep(IDLE_FLUSH_S / 2 + 1)  # nothing more may come
            assert flow.alive(), flow.tail()
            elapsed = time.monotonic() - started
            detected = detect_counts(victoria_metrics)
            stored = stored_points(victoria_metrics)
    finally:
        bridge.terminate()
        bridge.wait(30)
        watch.close()
    assert bridge.returncode == 0, (tmp_path / "bridge.log").read_text()[-3000:]
    # every delivered reading, every metric, once, with its value; nothing lost is measured
    measured = stored["false"]
    twice = [key for series in stored.values() for key, values in series.items()
             if len(values) > 1]
    assert not twice, f"{len(twice)} points stored more than once, e.g. {twice[:5]}"
    want_measured = {(metric, device, ts): value for (device, ts), metrics
                     in want.delivered.items() for metric, value in metrics.items()}
    missing = want_measured.keys() - measured.keys()
    assert not missing, f"{len(missing)} readings never stored, e.g. {sorted(missing)[:5]}"
    assert measured.keys() == want_measured.keys()
    wrong = [k for k, v in want_measured.items() if measured[k][0] != pytest.approx(v)]
    assert not wrong, f"{len(wrong)} values differ, e.g. {wrong[:5]}"
    assert not {(d, ts) for _, d, ts in measured} & want.lost
    # the loss ledger: every (device, seq) the simulator delivered is in the lake, once
    ids = Counter(lake_ids(tmp_path / "lake"))
    assert set(ids) == want.seqs
    assert max(ids.values()) == 1
    # gap filling: flagged, exactly at the short gaps' missing steps
    assert {(d, ts) for _, d, ts in stored["true"]} == want_imputed
    got = counters(victoria_metrics)
    assert (got["received"] - got["duplicates"], got["measured"], got["late"]) == (
        len(want.seqs), len(want.seqs), 0)
    # detection: the premise held (nothing fed behind a tick), and evaluate's alerts came
    assert (detected["behind"], detected["waiting"]) == (0, 0)
    assert alert_keys(watch.alerts) == alert_keys(want_alerts)
    kinds = Counter(a.kind.value for a in watch.alerts if a.status is AlertStatus.OPEN)
    assert set(kinds) == {"leak", "burst", "silent", "sensor_fault"}, kinds
    print(f"{len(want.seqs)} readings, {len(want.lost)} lost by the simulator, "
          f"{len(want_imputed)} imputed, {len(want_alerts)} alert messages; edge agents done "
          f"after {edge_s:.1f}s, all stored after {elapsed:.1f}s")
