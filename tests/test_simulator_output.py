"""Simulator files and the ``simulate`` command: reproducible bytes, contents, CLI errors."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import time
from pathlib import Path

import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from meshwatch.registry import load_registry
from simulators import FleetConfig, FleetSimulator, SimConfig, load_rates
from simulators.command import add_arguments, run
from simulators.output import write_run

CONFIG = SimConfig(fleet=FleetConfig(meters=300, meters_per_gateway=100), days=1.5, seed=9)


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_same_seed_writes_byte_identical_files(tmp_path: Path, fmt: str) -> None:
    write_run(CONFIG, tmp_path / "a", fmt)  # type: ignore[arg-type]
    write_run(CONFIG, tmp_path / "b", fmt)  # type: ignore[arg-type]
    write_run(dataclasses.replace(CONFIG, seed=10), tmp_path / "c", fmt)  # type: ignore[arg-type]
    first, second, other = (files(tmp_path / name) for name in "abc")
    assert first == second
    assert f"readings/date=2026-01-05/customer_meter.{fmt}" in first
    assert f"readings/date=2026-01-06/pump_station.{fmt}" in first
    assert first["readings/date=2026-01-05/customer_meter." + fmt] != other[
        "readings/date=2026-01-05/customer_meter." + fmt]


def test_files_hold_every_delivered_reading_by_delivery_day(tmp_path: Path) -> None:
    stats = write_run(CONFIG, tmp_path)
    tables = [pq.read_table(path) for path in sorted((tmp_path / "readings").rglob("*.parquet"))]
    assert sum(t.num_rows for t in tables) == stats.delivered_rows
    for path, table in zip(sorted((tmp_path / "readings").rglob("*.parquet")), tables,
                           strict=True):
        day = path.parent.name.removeprefix("date=")
        sent_days = {str(d) for d in table.column("sent_ms").cast("timestamp[ms]")
                     .cast("date32").to_pylist()}
        assert sent_days == {day}
        names = set(table.column_names)
        assert {"device_id", "ts_ms", "seq", "sent_ms", "gateway_id"} <= names
        if path.stem == "pump_station":
            assert {"flow_lpm", "inlet_pressure_bar", "outlet_pressure_bar",
                    "pumps_running_count", "energy_kwh", "running_h"} <= names
    customer = pq.read_table(tmp_path / "readings/date=2026-01-05/customer_meter.parquet")
    assert customer.column_names[-3:] == ["flow_lpm", "temperature_c", "battery_v"]


def test_registry_ground_truth_and_comm_faults_are_complete(tmp_path: Path) -> None:
    stats = write_run(CONFIG, tmp_path, "csv")
    registry = pa_csv.read_csv(tmp_path / "registry.csv")
    assert registry.num_rows == 300 + 2 * CONFIG.fleet.district_count
    assert registry.column_names == ["device_id", "device_kind", "customer_type", "critical",
                                     "site", "district", "gateway_id", "cadence_s", "lat", "lon"]
    assert set(registry.column("device_kind").to_pylist()) == {
        "customer_meter", "district_meter", "pump_station"}
    loaded = load_registry(tmp_path / "registry.csv")
    assert len(loaded) == registry.num_rows
    assert loaded.devices_of_gateway("dma-01-scada") == {"dma-01-inlet", "dma-01-pump"}
    with (tmp_path / "ground_truth.csv").open() as file:
        truth = list(csv.DictReader(file))
    assert len(truth) == sum(stats.incidents.values())
    ids = set(registry.column("device_id").to_pylist())
    for row in truth:
        assert row["device_id"] in ids or row["kind"] in {"burst", "network_leak"}
        assert int(row["start_ms"]) <= int(row["end_ms"])
        assert row["unit"]
    faults = pa_csv.read_csv(tmp_path / "comm_faults.csv")
    assert faults.num_rows == sum(stats.comm_faults.values())
    counts = json.loads((tmp_path / "run.json").read_text())["counts"]
    assert counts["produced"] == stats.produced == counts["delivered"] + counts["lost"]


def test_rates_file_overrides_and_rejects_unknown_keys(tmp_path: Path) -> None:
    good = tmp_path / "rates.toml"
    good.write_text("[incidents]\nburst_per_district_day = 0.5\n[comms]\nlate_probability = 0\n")
    config = load_rates(good, SimConfig())
    assert config.incidents.burst_per_district_day == 0.5
    assert config.comms.late_probability == 0.0
    bad = tmp_path / "bad.toml"
    bad.write_text("[comms]\nloss = 0.1\n")
    with pytest.raises(ValueError, match=r"unknown keys \['loss'\]; known: "):
        load_rates(bad, SimConfig())


# -- the command ----------------------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="meshwatch simulate")
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_command_writes_files_and_prints_a_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run(parse("--meters", "500", "--days", "0.5", "--seed", "7", "--out",
                     str(tmp_path), "--format", "csv"))
    out = capsys.readouterr().out
    assert code == 0
    for label in ("readings produced", "readings delivered", "readings lost", "readings/s",
                  "readings duplicated", "readings hit by comm fault: lost", "elapsed"):
        assert label in out
    assert (tmp_path / "readings/date=2026-01-05/customer_meter.csv").exists()
    produced = 500 * 48 + 2 * 1 * 48 * 15
    assert f"{produced:,}" in out


@pytest.mark.parametrize(("argv", "message"), [
    (["--meters", "0"], "argument --meters: expected a whole number of 1 or more"),
    (["--days", "-1"], "argument --days: expected a number above 0"),
    (["--start", "yesterday"], "argument --start: expected an ISO 8601 time"),
    (["--format", "xlsx"], "argument --format: invalid choice"),
    (["--batch-size", "20000"], "a batch holds at most 10000 readings"),
])
def test_bad_arguments_exit_2_with_a_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse(*argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["--rates", "/nonexistent/rates.toml"], "cannot read rates file"),
    (["--publish", "http://broker"], "must look like mqtt://host:port"),
    (["--meters", "10", "--districts", "20"], "districts is 20"),
    (["--start", "1999-12-31T00:00:00Z"], "inside the years 2000..2099"),
])
def test_bad_settings_exit_2_without_a_traceback(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(parse(*argv)) == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split())
    assert "Traceback" not in err


def test_unreachable_broker_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(parse("--meters", "10", "--days", "0.02", "--publish",
                     "mqtt://127.0.0.1:1", "--quiet")) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "cannot connect to the MQTT broker at 127.0.0.1:1" in err
    assert "Traceback" not in err


def test_speed_paces_the_simulation() -> None:
    config = SimConfig(fleet=FleetConfig(meters=10), days=1 / 96 * 2, speed=1800 / 0.4)
    started = time.perf_counter()
    list(FleetSimulator(config))
    assert time.perf_counter() - started >= 0.35  # two 15-minute steps at 4500x
