r"""``meshwatch score``: stream any CSV time series through the generic detector.

Every row is scored with :class:`~models.anomaly.generic.SeasonalResidualDetector` *before* it
is learned, strictly in file order, so a row's score depends only on earlier rows (changing a
later row never changes it). The output has one row per input row, in order::

    timestamp,anomaly_score,is_alert
    2026-01-05T00:00:00Z,0.000000,0

``timestamp`` repeats the input's timestamp text (or the 0-based row number when the file has
no timestamp column), ``anomaly_score`` is the calibrated score in [0, 1] and ``is_alert`` is 1
when the score reaches ``--threshold``. Examples::

    meshwatch score readings.csv                      # CSV to stdout
    meshwatch score readings.csv --timestamp-col time --columns flow,pressure --out scores.csv

Input: a header row (or ``--no-header``: columns are then col0, col1, ...), then one row per
reading. Timestamps may be ISO 8601 (a missing zone means UTC) or epoch seconds or
milliseconds; without ``--timestamp-col`` a column named timestamp, time, datetime, date, ts
or ts_ms is used if there is one. Values must be numbers; empty cells, NaN, NA, N/A, null,
None and infinities count as missing. Bad input (a missing
column, an unparsable timestamp, a non-numeric value) is reported with its line and column and
exit code 2 before anything is written: the file is checked in a first pass, then scored.

>>> import tempfile, pathlib
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> _ = (folder / "in.csv").write_text("time,level\n2026-01-05T00:00:00Z,1.5\n"
...                                    "2026-01-05T00:15:00Z,\n")
>>> parser = argparse.ArgumentParser(prog="score")
>>> add_arguments(parser)
>>> run(parser.parse_args([str(folder / "in.csv"), "--out", str(folder / "out.csv")]))
0
>>> print((folder / "out.csv").read_text().strip())
timestamp,anomaly_score,is_alert
2026-01-05T00:00:00Z,0.000000,0
2026-01-05T00:15:00Z,0.000000,0
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

TIMESTAMP_NAMES = ("timestamp", "time", "datetime", "date", "ts", "ts_ms")
"""Column names taken as the timestamp when ``--timestamp-col`` is not given."""
MISSING = frozenset({"", "nan", "na", "n/a", "null", "none", "-nan"})
"""Cell texts (lower-cased, stripped) that mean "not measured"."""
_EPOCH_MS_ABOVE = 1e11  # larger epoch numbers are milliseconds (1e11 s is the year 5138)


class InputError(ValueError):
    """Bad input: the message says where and what to do; the command exits with 2."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``score`` options to ``parser``."""
    parser.add_argument("file", type=Path, metavar="FILE.csv",
                        help="CSV with a header row (see --no-header)")
    parser.add_argument("--timestamp-col", metavar="C", default=None,
                        help="the timestamp column (default: one named "
                             f"{', '.join(TIMESTAMP_NAMES)}, if any; else row numbers)")
    parser.add_argument("--columns", metavar="a,b", default=None,
                        help="comma-separated value columns (default: every column but the "
                             "timestamp whose first non-empty cell is a number)")
    parser.add_argument("--out", type=Path, metavar="FILE", default=None,
                        help="write the scores here (default: CSV to stdout)")
    parser.add_argument("--threshold", type=float, default=0.9,
                        help="is_alert when anomaly_score >= this; the detector does not learn "
                             "from alerts (default %(default)s, about 1 normal row in 4,000)")
    parser.add_argument("--no-header", action="store_true",
                        help="the file has no header row: columns are named col0, col1, ... "
                             "(UCR-style files of one value per line)")
    parser.add_argument("--explain", action="store_true",
                        help="add columns evidence, column, expected for alert rows")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Score ``args.file``; return the exit code (2: bad input or options, 1: cannot write)."""
    try:
        if not 0.0 < args.threshold <= 1.0:
            raise InputError(f"--threshold is {args.threshold}; give a number in (0, 1]")
        plan = _check(args.file, args.timestamp_col, args.columns, not args.no_header)
    except InputError as exc:
        print(f"meshwatch score: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"meshwatch score: error: cannot read {args.file}: {exc.strerror}",
              file=sys.stderr)
        return 2
    except UnicodeDecodeError as exc:
        print(f"meshwatch score: error: {args.file} is not UTF-8 text (byte {exc.start}); "
              "convert it, e.g. with iconv -t UTF-8", file=sys.stderr)
        return 2
    except csv.Error as exc:
        print(f"meshwatch score: error: {args.file} is not a readable CSV ({exc})",
              file=sys.stderr)
        return 2
    if args.out is None:
        try:
            _score(args.file, plan, sys.stdout, args.threshold, args.explain)
            sys.stdout.flush()
        except BrokenPipeError:  # the reader went away (| head): not an error of ours
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    temporary = None
    try:
        target = args.out.resolve()
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        with os.fdopen(handle, "w", newline="", encoding="utf-8") as out:
            _score(args.file, plan, out, args.threshold, args.explain)
        os.replace(temporary, target)
    except OSError as exc:
        if temporary is not None and os.path.exists(temporary):
            os.unlink(temporary)
        print(f"meshwatch score: error: cannot write {args.out}: {exc.strerror}",
              file=sys.stderr)
        return 1
    return 0


class _Plan:
    """What the check pass decided: which columns, where they are."""

    def __init__(self, timestamp: int | None, columns: list[tuple[str, int]],
                 has_header: bool) -> None:
        self.timestamp = timestamp
        self.columns = columns
        self.has_header = has_header


def _rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, cells) of the data rows; blank lines are skipped."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        for cells in reader:
            if cells and any(cell.strip() for cell in cells):
                yield reader.line_num, cells


def _header(path: Path, header: bool) -> list[str]:
    for _, cells in _rows(path):
        if not header:
            return [f"col{i}" for i in range(len(cells))]
        return [cell.strip() for cell in cells]
    raise InputError(f"{path} is empty; it needs a header row and data rows")


def _check(path: Path, timestamp_col: str | None, columns: str | None, has_header: bool) -> _Plan:
    """First pass: resolve the columns and check every cell, so no output is half-written."""
    header = _header(path, has_header)
    where = {name: i for i, name in enumerate(header)}
    listed = ", ".join(repr(name) for name in header)
    if timestamp_col is not None:
        if timestamp_col not in where:
            raise InputError(f"timestamp column {timestamp_col!r} is not in {path}; its "
                             f"columns are {listed}. Pass --timestamp-col with one of them.")
        timestamp: int | None = where[timestamp_col]
    else:
        timestamp = next((where[n] for n in header if n.lower() in TIMESTAMP_NAMES), None)
    if columns is not None:
        wanted = [name.strip() for name in columns.split(",") if name.strip()]
        missing = [name for name in wanted if name not in where]
        if missing or not wanted:
            raise InputError(f"column(s) {', '.join(map(repr, missing)) or '(none given)'} "
                             f"not in {path}; its columns are {listed}. Fix --columns.")
        chosen = [(name, where[name]) for name in wanted]
    else:
        chosen = [(name, i) for i, name in enumerate(header) if i != timestamp]
    # by default a column is a value column if its first non-missing cell is a number; after
    # that, a cell that is not a number is an error, as in a column named by --columns
    kind: dict[str, str] = {name: "numeric" if columns is not None else "unknown"
                            for name, _ in chosen}
    rows = 0
    data = _rows(path)
    if has_header:
        next(data)
    for line, cells in data:
        rows += 1
        if timestamp is not None:
            _parse_time(_cell(cells, timestamp), line, header[timestamp])
        for name, i in chosen:
            if kind[name] == "text":
                continue
            try:
                value = _parse_value(_cell(cells, i), line, name)
            except InputError:
                if kind[name] == "numeric":
                    raise
                kind[name] = "text"  # left out by default
            else:
                if value == value and kind[name] == "unknown":
                    kind[name] = "numeric"
    if not rows:
        raise InputError(f"{path} has a header but no data rows")
    chosen = [(name, i) for name, i in chosen if kind[name] != "text"]
    if not chosen:
        raise InputError(f"{path} has no numeric column to score besides the timestamp; "
                         f"its columns are {listed}. Pass --columns.")
    return _Plan(timestamp, chosen, has_header)


def _cell(cells: list[str], i: int) -> str:
    return cells[i] if i < len(cells) else ""


def _parse_value(text: str, line: int, column: str) -> float:
    try:
        return float(text)
    except ValueError:
        if text.strip().lower() in MISSING:
            return math.nan
        raise InputError(f"line {line}, column {column!r}: {text!r} is not a number. Fix or "
                         "empty the cell (empty, NaN, NA and null count as missing), or "
                         "leave the column out with --columns.") from None


def _parse_time(text: str, line: int, column: str) -> float:
    """Epoch milliseconds of an ISO 8601 or epoch seconds/milliseconds timestamp."""
    stripped = text.strip()
    try:
        number = float(stripped)
    except ValueError:
        pass
    else:
        if math.isfinite(number):
            return number if abs(number) >= _EPOCH_MS_ABOVE else number * 1000.0
    try:
        moment = datetime.fromisoformat(stripped.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise InputError(f"line {line}, column {column!r}: timestamp {text!r} is neither ISO "
                         "8601 (2026-01-05T00:15:00Z) nor epoch seconds or milliseconds. Fix "
                         "it, or pass --timestamp-col for another column.") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp() * 1000.0


def _score(path: Path, plan: _Plan, out: TextIO, threshold: float, explain: bool) -> None:
    """Second pass: score then learn each row, writing its score at once."""
    from models.anomaly.generic import SeasonalResidualDetector

    names = [name for name, _ in plan.columns]
    detector = SeasonalResidualDetector(columns=names, threshold=threshold)
    writer = csv.writer(out, lineterminator="\n")
    header = ["timestamp", "anomaly_score", "is_alert"]
    writer.writerow([*header, "evidence", "column", "expected"] if explain else header)
    timestamp = plan.timestamp
    data = _rows(path)
    if plan.has_header:
        next(data)
    for number, (line, cells) in enumerate(data):
        x: dict[str, float] = {}
        if timestamp is not None:
            stamp = _cell(cells, timestamp)
            x["ts_ms"] = _parse_time(stamp, line, "")
        else:
            stamp = str(number)
        for name, i in plan.columns:
            x[name] = _parse_value(_cell(cells, i), line, name)
        if explain:
            evidence = detector.explain(x)
        score = detector.score_learn_one(x)
        alert = score >= threshold
        row = [stamp, f"{score:.6f}", "1" if alert else "0"]
        if explain:
            row += ([str(evidence.get("evidence", "")), str(evidence.get("column", "")),
                     f"{evidence.get('expected', math.nan):.6g}"] if alert else ["", "", ""])
        writer.writerow(row)
