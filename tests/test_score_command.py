"""`meshwatch score` through the real CLI on real CSV files: output, causality, detection,
bad input (exit 2, a message saying what to do, no traceback), missing values, speed."""

from __future__ import annotations

import csv
import io
import math
import random
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshwatch.cli import main

T0 = datetime(2026, 1, 5, tzinfo=UTC)
STEP = timedelta(minutes=15)
PER_DAY = 96


def seasonal(n: int, seed: int = 1) -> list[float]:
    """A daily cycle (amplitude 10) with quieter weekends and Gaussian noise (sd 1)."""
    rng = random.Random(seed)
    values = []
    for i in range(n):
        day = (i // PER_DAY) % 7
        amplitude = 6.0 if day >= 5 else 10.0
        values.append(50 + amplitude * math.sin(2 * math.pi * i / PER_DAY) + rng.gauss(0, 1))
    return values


def write_csv(path: Path, columns: dict[str, list[object]], stamps: list[str] | None = None,
              timestamp: str = "timestamp") -> Path:
    n = len(next(iter(columns.values())))
    stamps = stamps if stamps is not None else [
        (T0 + i * STEP).strftime("%Y-%m-%dT%H:%M:%SZ") for i in range(n)]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([timestamp, *columns])
        for i in range(n):
            writer.writerow([stamps[i], *(column[i] for column in columns.values())])
    return path


def read_scores(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def score(tmp_path: Path, source: Path, *options: str, name: str = "out.csv") -> list[dict]:
    out = tmp_path / name
    assert main(["score", str(source), "--out", str(out), *options]) == 0
    return read_scores(out)


def run_process(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshwatch.cli", "score", *args],
                          capture_output=True, text=True, timeout=120, check=False)


def test_spike_and_level_shift_are_flagged_and_normal_rows_mostly_not(tmp_path: Path) -> None:
    n = PER_DAY * 28
    values = seasonal(n)
    spike, shift = PER_DAY * 17 + 30, PER_DAY * 22 + 50
    values[spike] += 9.0
    for i in range(shift, n):
        values[i] += 6.0
    rows = score(tmp_path, write_csv(tmp_path / "in.csv", {"flow": values}))

    assert len(rows) == n
    assert [row["timestamp"] for row in rows[:2]] == ["2026-01-05T00:00:00Z",
                                                     "2026-01-05T00:15:00Z"]
    alerts = [row["is_alert"] == "1" for row in rows]
    scores = [float(row["anomaly_score"]) for row in rows]
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert all(a == (s >= 0.9) for a, s in zip(alerts, scores, strict=True))
    assert alerts[spike], f"the spike scored {scores[spike]}"
    assert any(alerts[shift:shift + 4]), f"the shift scored {scores[shift:shift + 4]}"
    # it adapts to the new level instead of alarming for ever
    assert not any(alerts[shift + PER_DAY:]), "still alarming a day after the level shift"
    # after a first week of learning, normal rows rarely alarm
    normal = [a for i, a in enumerate(alerts) if i >= 7 * PER_DAY
              and not (spike <= i < spike + 4 or shift <= i < shift + PER_DAY)]
    assert sum(normal) / len(normal) < 0.01, f"{sum(normal)} of {len(normal)} normal rows alarm"


def test_scores_are_causal(tmp_path: Path) -> None:
    """Changing a future row never changes an earlier score."""
    n = PER_DAY * 6
    values = seasonal(n, seed=2)
    base = score(tmp_path, write_csv(tmp_path / "a.csv", {"v": values}), name="a-out.csv")
    for k in (70, 300, n - 1):
        changed = list(values)
        changed[k] = 1e6
        rows = score(tmp_path, write_csv(tmp_path / "b.csv", {"v": changed}), name="b-out.csv")
        assert rows[:k] == base[:k], f"changing row {k} changed an earlier score"
        assert rows[k] != base[k]
    # and truncating the file gives the same scores for the rows that remain
    short = score(tmp_path, write_csv(tmp_path / "c.csv", {"v": values[:200]}), name="c-out")
    assert short == base[:200]


def test_stdout_default_columns_and_missing_values(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    n = PER_DAY * 3
    values: list[object] = list(seasonal(n, seed=3))
    other: list[object] = [v * 2 for v in seasonal(n, seed=4)]
    for i in (10, 11, 150):
        values[i] = ""
    values[151], other[12], other[13] = "NaN", "NA", "null"
    sites = ["dma-01"] * n  # text: not a numeric column, left out by default
    source = write_csv(tmp_path / "in.csv", {"site": sites, "a": values, "b": other})
    assert main(["score", str(source)]) == 0
    text = capsys.readouterr().out
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == n
    assert list(rows[0]) == ["timestamp", "anomaly_score", "is_alert"]
    assert all(0.0 <= float(row["anomaly_score"]) <= 1.0 for row in rows)
    # the same file with only column a differs: b was scored too
    only_a = score(tmp_path, source, "--columns", "a")
    assert only_a != rows


def test_gaps_and_timestamp_formats(tmp_path: Path) -> None:
    n = PER_DAY * 4
    values = seasonal(n, seed=5)
    iso = [(T0 + i * STEP).isoformat() for i in range(n)]
    naive = [(T0 + i * STEP).replace(tzinfo=None).isoformat(sep=" ") for i in range(n)]
    seconds = [str(int((T0 + i * STEP).timestamp())) for i in range(n)]
    millis = [str(int((T0 + i * STEP).timestamp() * 1000)) for i in range(n)]
    results = [score(tmp_path, write_csv(tmp_path / f"{k}.csv", {"v": values}, stamps, "time"),
                     name=f"{k}-out.csv")
               for k, stamps in enumerate((iso, naive, seconds, millis))]
    first = [row["anomaly_score"] for row in results[0]]
    for other in results[1:]:
        assert [row["anomaly_score"] for row in other] == first
    assert results[2][5]["timestamp"] == seconds[5]  # the input's text, unchanged
    # a six-hour gap: every row is still scored, in order
    gap = [T0 + i * STEP + (timedelta(hours=6) if i > 200 else timedelta()) for i in range(n)]
    rows = score(tmp_path, write_csv(tmp_path / "gap.csv", {"v": values},
                                     [g.isoformat() for g in gap]))
    assert [row["timestamp"] for row in rows] == [g.isoformat() for g in gap]
    # no timestamp column: row numbers
    rows = score(tmp_path, write_csv(tmp_path / "n.csv", {"v": values}, timestamp="x"),
                 "--columns", "v", name="n-out.csv")
    assert [row["timestamp"] for row in rows[:3]] == ["0", "1", "2"]


@pytest.mark.parametrize(
    ("content", "options", "message"),
    [
        ("timestamp,a\n2026-01-05T00:00:00Z,1\n", ["--columns", "nope"],
         "'nope' not in"),
        ("timestamp,a\n2026-01-05T00:00:00Z,1\n", ["--timestamp-col", "when"],
         "timestamp column 'when' is not in"),
        ("timestamp,a\n2026-01-05T00:00:00Z,1\nyesterday,2\n", [],
         "line 3, column 'timestamp': timestamp 'yesterday' is neither ISO 8601"),
        ("timestamp,a\n2026-01-05T00:00:00Z,1\n2026-01-05T00:15:00Z,abc\n", ["--columns", "a"],
         "line 3, column 'a': 'abc' is not a number"),
        ("timestamp,site\n2026-01-05T00:00:00Z,north\n", [], "no numeric column"),
        ("timestamp,a\n2026-01-05T00:00:00Z,\n2026-01-05T00:15:00Z,1\n2026-01-05T00:30:00Z,x1\n",
         [], "line 4, column 'a': 'x1' is not a number"),
        ("", [], "is empty"),
        ("timestamp,a\n", [], "no data rows"),
        ("timestamp,a\n2026-01-05T00:00:00Z,1\n", ["--threshold", "0"], "--threshold"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(tmp_path: Path, content: str,
                                                options: list[str], message: str) -> None:
    source = tmp_path / "bad.csv"
    source.write_text(content)
    out = tmp_path / "out.csv"
    result = run_process(str(source), "--out", str(out), *options)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert result.stderr.startswith("meshwatch score: error: ")
    assert "Traceback" not in result.stderr
    assert not out.exists(), "nothing is written for bad input"


def test_missing_file_and_unwritable_output(tmp_path: Path) -> None:
    result = run_process(str(tmp_path / "absent.csv"))
    assert result.returncode == 2
    assert "cannot read" in result.stderr
    assert "Traceback" not in result.stderr
    latin = tmp_path / "latin.csv"
    latin.write_bytes("temps,débit\n1,2\n".encode("latin-1"))
    result = run_process(str(latin))
    assert result.returncode == 2
    assert "is not UTF-8 text" in result.stderr
    assert "Traceback" not in result.stderr
    source = write_csv(tmp_path / "in.csv", {"v": [1.0, 2.0]})
    result = run_process(str(source), "--out", str(tmp_path / "no" / "such" / "dir.csv"))
    assert result.returncode == 1
    assert "cannot write" in result.stderr
    assert "Traceback" not in result.stderr


def test_headerless_ucr_style_file(tmp_path: Path) -> None:
    """One value per line, no header, no timestamps: the period is found from the data."""
    rng = random.Random(8)
    period = 37
    values = [5 * math.sin(2 * math.pi * i / period) + rng.gauss(0, 0.3) for i in range(3000)]
    values[2500] += 4.0  # small next to the cycle's range, large next to the noise
    source = tmp_path / "ucr.txt"
    source.write_text("".join(f"{v:.4f}\n" for v in values))
    rows = score(tmp_path, source, "--no-header")
    assert len(rows) == len(values)
    assert [row["timestamp"] for row in rows[:2]] == ["0", "1"]
    scores = [float(row["anomaly_score"]) for row in rows]
    assert rows[2500]["is_alert"] == "1", scores[2500]
    assert sum(s >= 0.9 for s in scores[1000:]) <= 5
    # without --no-header the first value became the column name and the rest still scores
    assert len(score(tmp_path, source, name="with-header.csv")) == len(values) - 1


def test_explain_columns(tmp_path: Path) -> None:
    values = seasonal(PER_DAY * 10, seed=6)
    values[PER_DAY * 9] += 12.0
    rows = score(tmp_path, write_csv(tmp_path / "in.csv", {"v": values}), "--explain")
    alert = rows[PER_DAY * 9]
    assert alert["is_alert"] == "1"
    assert (alert["evidence"], alert["column"]) == ("spike", "v")
    assert abs(float(alert["expected"]) - (values[PER_DAY * 9] - 12.0)) < 4.0
    assert all(row["evidence"] == "" for row in rows if row["is_alert"] == "0")


def test_scores_100k_rows_in_seconds(tmp_path: Path) -> None:
    n = 100_000
    rng = random.Random(9)
    values = [f"{50 + 10 * math.sin(2 * math.pi * i / PER_DAY) + rng.gauss(0, 1):.3f}"
              for i in range(n)]
    source = tmp_path / "big.csv"
    with source.open("w") as f:
        f.write("ts,value\n")
        start_s = int(T0.timestamp())
        f.writelines(f"{start_s + 900 * i},{v}\n" for i, v in enumerate(values))
    started = time.perf_counter()
    assert main(["score", str(source), "--out", str(tmp_path / "out.csv")]) == 0
    elapsed = time.perf_counter() - started
    rows = read_scores(tmp_path / "out.csv")
    assert len(rows) == n
    alerts = sum(row["is_alert"] == "1" for row in rows)
    assert alerts < n * 0.002, f"{alerts} alerts on a clean series"
    assert elapsed < 20.0, f"100k rows took {elapsed:.1f} s (goal < 10 s)"


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cells=st.lists(
    st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.integers(-10**6, 10**6),
              st.sampled_from(["", "NaN", "NA", "null", "n/a", " 3.5 ", "1e3"])),
    min_size=1, max_size=120))
def test_any_numeric_or_missing_cells_score(tmp_path: Path, cells: list[object]) -> None:
    """Property: whatever numbers or missing markers a column holds, every row gets a score
    in [0, 1], in order."""
    source = write_csv(tmp_path / "p.csv", {"v": cells})
    rows = score(tmp_path, source, name="p-out.csv")
    assert len(rows) == len(cells)
    assert all(0.0 <= float(row["anomaly_score"]) <= 1.0 for row in rows)
    assert all(row["is_alert"] in ("0", "1") for row in rows)
