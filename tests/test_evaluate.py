"""The evaluation harness: seeds, matching rules, and the real ``meshwatch evaluate``."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from meshwatch.cli import main
from meshwatch.contract.events import Alert, AlertKind, Severity
from models.evaluate import EvalSettings, Run, score_run
from models.seeds import (
    EVALUATION_SEEDS,
    RETIRED_EVALUATION_SEEDS,
    TRAINING_SEEDS,
    TUNING_SEEDS,
    is_held_out,
)
from models.water.pipeline import FleetLayout, WaterPipeline
from simulators import Episode

H = 3_600_000
T0 = 1_767_571_200_000


def test_evaluation_seeds_are_disjoint_from_tuning_and_training_seeds():
    from models.edge.train import DEFAULT_SEED

    assert DEFAULT_SEED in TRAINING_SEEDS
    assert not set(EVALUATION_SEEDS) & set(TUNING_SEEDS)
    assert not set(EVALUATION_SEEDS) & set(TRAINING_SEEDS)
    assert not set(TUNING_SEEDS) & set(TRAINING_SEEDS)
    assert not set(EVALUATION_SEEDS) & set(RETIRED_EVALUATION_SEEDS)
    assert all(is_held_out(seed) for seed in EVALUATION_SEEDS)
    assert not any(is_held_out(seed) for seed in RETIRED_EVALUATION_SEEDS + TUNING_SEEDS)
    assert EvalSettings().seed in EVALUATION_SEEDS


def _alert(device: str, category: str, at_h: float) -> Alert:
    return Alert(alert_id=f"al-{device}-{at_h}", device_id=device, district="dma-01",
                 kind=AlertKind.LEAK if category == "customer_leak" else AlertKind.SENSOR_FAULT,
                 severity=Severity.MINOR, score=0.95, evidence={"category": category},
                 first_ts_ms=int(T0 + at_h * H), last_ts_ms=int(T0 + at_h * H),
                 model_version="water-1.0")


def test_matching_rules():
    """Matched within [start, end + grace], compatible kind, same device; warm-up left out."""
    ids = np.array([f"mtr-{i}" for i in range(6)], dtype=object)
    layout = FleetLayout(ids, np.zeros(6, np.int8), np.zeros(6, np.int32), ["dma-01"],
                         np.full(6, 900))
    days = 10
    episodes = [
        Episode("e1", "customer_leak", 0, 0, T0 + 50 * H, T0 + 100 * H, 10.0, "lph"),
        Episode("e2", "customer_leak", 1, 0, T0 + 60 * H, T0 + 200 * H, 10.0, "lph"),
        Episode("e3", "customer_leak", 2, 0, T0 + 70 * H, T0 + 80 * H, 10.0, "lph"),  # short
        Episode("e4", "stuck", 3, 0, T0 + 10 * H, T0 + 200 * H, 0.0, "lpm"),  # in warm-up
        Episode("e5", "customer_leak", 4, 0, T0 + 200 * H, T0 + 230 * H, 10.0, "lph"),
    ]
    alerts = [
        _alert("mtr-0", "customer_leak", 74.0),  # TP for e1, 24 h after start
        _alert("mtr-0", "customer_leak", 120.0),  # still matches e1 (end + 24 h grace)
        _alert("mtr-1", "sensor_fault", 90.0),  # wrong kind for e2: a false alarm
        _alert("mtr-2", "customer_leak", 90.0),  # matches the short e3 (not a false alarm)
        _alert("mtr-3", "sensor_fault", 60.0),  # matches e4, which began in warm-up
        _alert("mtr-5", "customer_leak", 100.0),  # nothing there: a false alarm
        _alert("mtr-5", "customer_leak", 20.0),  # raised in warm-up: left out
    ]
    run = Run(EvalSettings(meters=6, days=days, warmup_days=2), episodes, alerts,
              WaterPipeline(layout), T0, T0 + days * 24 * H, 6, 0.0, 1.0, 10, {}, {})
    report = score_run(run)
    leak = report["kinds"]["customer_leak"]
    assert leak["episodes"] == 4
    assert leak["too_short"] == 1
    assert leak["detected"] == 1
    assert leak["recall"] == pytest.approx(1 / 3, abs=1e-4)
    assert leak["recall_all"] == pytest.approx(2 / 4)
    assert leak["true_alerts"] == 3
    assert leak["false_alarms"] == 1
    assert leak["precision"] == pytest.approx(0.75)
    assert leak["median_ttd_h"] == 24.0
    faults = report["kinds"]["sensor_fault"]
    assert faults["false_alarms"] == 1
    assert faults["warmup_alerts"] == 1
    assert faults["warmup_episodes"] == 1
    assert report["false_alarms"] == 2
    assert report["false_alarms_per_1000_meter_days"] == pytest.approx(1000 * 2 / (6 * 8), abs=1e-4)


def test_episodes_are_judged_on_their_part_in_the_run():
    """A silence that lasts past the run's end is detectable only if its part in the run is.

    The demo's load with seed 7 had a 6.6 h gateway outage begin 5 h before the end: its 346
    meters were counted detectable (6.6 h >= 6.25 h), though the detectors saw 5 h of it.
    """
    ids = np.array([f"mtr-{i}" for i in range(3)], dtype=object)
    layout = FleetLayout(ids, np.zeros(3, np.int8), np.zeros(3, np.int32), ["dma-01"],
                         np.full(3, 900))
    days = 4
    end = T0 + days * 24 * H

    def silent(device: int, start_h: float, end_h: float) -> Episode:
        return Episode(f"s{device}", "silent", device, 0, int(end + start_h * H),
                       int(end + end_h * H), 0.0, "ms", "source=gateway_outage")

    episodes = [silent(0, -5.0, 1.6),  # 5 h in the run: too short, whatever came after
                silent(1, -9.0, 30.0),  # 9 h in the run: detectable, missed
                silent(2, -20.0, -12.0)]  # 8 h, all in the run: detected
    alerts = [_alert("mtr-2", "silent", days * 24 - 13.75)]
    run = Run(EvalSettings(meters=3, days=days, warmup_days=1), episodes, alerts,
              WaterPipeline(layout), T0, end, 3, 0.0, 1.0, 10, {}, {})
    row = score_run(run)["kinds"]["silent"]
    assert (row["episodes"], row["too_short"], row["detectable"], row["detected"]) == (3, 1, 2, 1)
    assert row["recall"] == 0.5


def test_evaluate_command_writes_a_report_that_matches_its_table(tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["evaluate", "--meters", "300", "--days", "6", "--seed", str(TUNING_SEEDS[5]),
                 "--districts", "2", "--warmup-days", "2", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    png = (out / "timeline.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    assert len(png) > 10_000
    assert report["held_out_seed"] is False
    assert "NOT held out" in printed
    assert report["scored_meter_days"] == 300 * 4
    kinds = report["kinds"]
    assert set(kinds) >= {"customer_leak", "network_leak", "burst", "sensor_fault", "silent"}
    for kind, row in kinds.items():
        line = next(line for line in printed.splitlines() if re.search(rf"\b{kind}\b", line))
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        assert cells[0] == kind
        assert cells[1:4] == [str(row["episodes"]), str(row["too_short"]),
                              str(row["detected"])]
        if row["recall"] is not None:
            assert float(cells[4]) == pytest.approx(row["recall"], abs=5e-4)
        if row.get("alerts") is not None:
            assert int(cells[5]) == row["alerts"]
            assert row["alerts"] == row["true_alerts"] + row["false_alarms"]
    total = sum(row.get("false_alarms", 0) for row in kinds.values())
    assert total == report["false_alarms"]
    assert f"false alarms: {report['false_alarms']} " in printed
    assert report["readings"] > 300 * 6 * 96 * 0.95
