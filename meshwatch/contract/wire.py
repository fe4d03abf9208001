"""Columns straight to wire bytes: the JSON of a ``TelemetryBatch`` or ``EdgeScore``, fast.

:func:`~meshwatch.contract.codec.encode` needs one pydantic object per reading or window:
~500 bytes each and most of the CPU of a gateway delivery. The functions here write the same
bytes (byte for byte: a property test compares them with ``encode`` on generated events)
from numpy columns, one ``%``-format per row. They are the one way to encode columnar events
without models; the models in :mod:`meshwatch.contract.events` stay the definition: the key
order comes from their fields, and a field added there without a value here fails at import.

What the models would check is checked here too, on whole columns, and raises
:class:`ValueError` instead of ``pydantic.ValidationError``: ids and metric names against
their patterns, event times in range, seqs not negative, finite values, scores in [0, 1],
windows that do not end before they start, 1 to 10,000 rows per message.

Floats are written as pydantic writes them: Python's shortest ``repr`` digits, but
``0.00001`` (not ``1e-05``) between 1e-5 and 1e-4 and exponents without padding (``1e-7``).

>>> import numpy as np
>>> from meshwatch.contract import Reading, TelemetryBatch, encode
>>> payloads = telemetry_payloads("dma-01", "gw-01", 1767225605000, ["m1", "m2"],
...     np.array([1767225600000] * 2), np.array([0, 0]), {"flow_lpm": np.array([1.5, 1e-5])})
>>> payloads[0] == encode(TelemetryBatch(site="dma-01", gateway_id="gw-01",
...     sent_ms=1767225605000, readings=[
...         Reading(device_id="m1", ts_ms=1767225600000, seq=0, metrics={"flow_lpm": 1.5}),
...         Reading(device_id="m2", ts_ms=1767225600000, seq=0, metrics={"flow_lpm": 1e-5})]))
True
>>> telemetry_payloads("dma-01", "gw 01", 1767225605000, ["m1"], np.array([1767225600000]),
...                    np.array([0]), {"flow_lpm": np.array([1.5])})
Traceback (most recent call last):
...
ValueError: gateway_id 'gw 01' does not match ^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel

from meshwatch.contract.events import (
    ID_PATTERN,
    MAX_TS_MS,
    MIN_TS_MS,
    SCHEMA_VERSION,
    EdgeScore,
    Reading,
    TelemetryBatch,
    WindowScore,
)
from meshwatch.contract.units import METRIC_NAME_PATTERN

MAX_ROWS = 10_000
"""The contract's limit of readings (windows) in one message."""

_ID = re.compile(ID_PATTERN)
_IDS = re.compile(r"(?:{0}\n)*{0}".format(ID_PATTERN.strip("^$")))  # ids joined by newlines
_METRIC = re.compile(METRIC_NAME_PATTERN)
_ROWS = "\x00"  # where a message's rows go in its head


def _template(model: type[BaseModel], values: Mapping[str, str]) -> str:
    """``{"key":value,...}`` in the model's field order; ``values`` hold JSON or ``%`` slots."""
    if set(values) != set(model.model_fields):
        msg = (f"meshwatch.contract.wire is out of date with {model.__name__}: fields"
               f" {sorted(model.model_fields)}, encoder {sorted(values)}")
        raise RuntimeError(msg)
    return "{" + ",".join(f'"{name}":{values[name]}' for name in model.model_fields) + "}"


def _reading_template(metrics: Sequence[str], formats: Sequence[str]) -> str:
    body = ",".join(f'"{name}":{slot}' for name, slot in zip(metrics, formats, strict=True))
    return _template(Reading, {"device_id": '"%s"', "ts_ms": "%d", "seq": "%d",
                               "metrics": "{" + body + "}", "quality": "[]"})


def _window_template(slot: str) -> str:
    return _template(WindowScore, {"device_id": '"%s"', "window_start_ms": "%d",
                                   "window_end_ms": "%d", "score": slot})


_WINDOW = _window_template("%r")
_TELEMETRY_KEYS = {"schema_version", "type", "site", "gateway_id", "sent_ms", "readings"}
_EDGE_SCORE_KEYS = {"schema_version", "type", "site", "gateway_id", "model_id",
                    "model_version", "windows"}
_template(TelemetryBatch, dict.fromkeys(_TELEMETRY_KEYS, ""))  # fail at import, not later
_template(EdgeScore, dict.fromkeys(_EDGE_SCORE_KEYS, ""))


def telemetry_payloads(
    site: str, gateway_id: str, sent_ms: int, device_ids: Sequence[str] | np.ndarray,
    ts_ms: np.ndarray, seq: np.ndarray, metrics: Mapping[str, np.ndarray],
    max_readings: int = 1000,
) -> list[bytes]:
    """``encode(TelemetryBatch(...))`` of each run of at most ``max_readings`` readings.

    Every reading has every metric of ``metrics`` and no quality flags.
    """
    _check_rows(max_readings)
    _check_id("site", site)
    _check_id("gateway_id", gateway_id)
    _check_time("sent_ms", np.array([sent_ms]))  # a float or bool fails the dtype check
    _check_ids(device_ids)
    _check_time("ts_ms", ts_ms)
    if len(seq) and int(np.min(seq)) < 0:
        msg = "seq must not be negative"
        raise ValueError(msg)
    if not metrics or len(metrics) > 64:
        msg = f"a reading holds 1 to 64 metrics, got {len(metrics)}"
        raise ValueError(msg)
    for name in metrics:
        if not _METRIC.fullmatch(name):
            msg = f"metric name {name!r} does not match {METRIC_NAME_PATTERN}"
            raise ValueError(msg)
    columns = [_floats(f"metric {name}", values) for name, values in metrics.items()]
    row = _reading_template(list(metrics), [slot for slot, _ in columns])
    head = _template(TelemetryBatch, {
        "schema_version": json.dumps(SCHEMA_VERSION), "type": '"telemetry"',
        "site": json.dumps(site), "gateway_id": json.dumps(gateway_id),
        "sent_ms": str(int(sent_ms)), "readings": _ROWS})
    return _messages(head, row, max_readings, [device_ids, np.asarray(ts_ms), np.asarray(seq),
                                               *(values for _, values in columns)])


def edge_score_payloads(
    site: str, gateway_id: str, model_id: str, model_version: str,
    device_ids: Sequence[str] | np.ndarray, start_ms: np.ndarray, end_ms: np.ndarray,
    scores: np.ndarray, max_windows: int = MAX_ROWS,
) -> list[bytes]:
    """``encode(EdgeScore(...))`` of each run of at most ``max_windows`` window scores."""
    _check_rows(max_windows)
    for name, value in (("site", site), ("gateway_id", gateway_id), ("model_id", model_id),
                        ("model_version", model_version)):
        _check_id(name, value)
    _check_ids(device_ids)
    _check_time("window_start_ms", start_ms)
    _check_time("window_end_ms", end_ms)
    if np.any(np.asarray(end_ms) < np.asarray(start_ms)):
        msg = "window_end_ms is before window_start_ms"
        raise ValueError(msg)
    values = np.asarray(scores, np.float64)
    if np.any(~((values >= 0.0) & (values <= 1.0))):  # NaN fails too
        msg = "scores must be finite numbers in [0, 1]"
        raise ValueError(msg)
    slot, column = _floats("score", values)
    head = _template(EdgeScore, {
        "schema_version": json.dumps(SCHEMA_VERSION), "type": '"edge_score"',
        "site": json.dumps(site), "gateway_id": json.dumps(gateway_id),
        "model_id": json.dumps(model_id), "model_version": json.dumps(model_version),
        "windows": _ROWS})
    window = _WINDOW if slot == "%r" else _window_template(slot)
    return _messages(head, window, max_windows,
                     [device_ids, np.asarray(start_ms), np.asarray(end_ms), column])


def json_float(value: float) -> str:
    """A float as pydantic writes it in JSON.

    >>> [json_float(v) for v in (0.5, 1e-05, 1.5e-07, 1e16, -0.0)]
    ['0.5', '0.00001', '1.5e-7', '1e+16', '-0.0']
    """
    text = repr(value)
    mantissa, e, exponent = text.partition("e")
    if not e:
        return text
    power = int(exponent)
    if power == -5:  # ryu writes 1e-5 <= |x| < 1e-4 as a decimal, Python's repr does not
        sign, digits = ("-", mantissa[1:]) if mantissa[0] == "-" else ("", mantissa)
        return f"{sign}0.0000{digits.replace('.', '')}"
    return f"{mantissa}e{'+' if power > 0 else '-'}{abs(power)}"


def _floats(what: str, values: np.ndarray) -> tuple[str, np.ndarray | list[str]]:
    """A column, and the ``%`` slot that writes its values the way pydantic does."""
    column = np.asarray(values, np.float64)
    if not np.all(np.isfinite(column)):
        msg = f"{what} holds a value that is not a finite number"
        raise ValueError(msg)
    magnitude = np.abs(column)
    if np.all((magnitude == 0) | ((magnitude >= 1e-4) & (magnitude < 1e16))):
        return "%r", column  # the common case: repr is exact
    return "%s", [json_float(v) for v in column.tolist()]


def _messages(head: str, row: str, size: int, columns: Sequence[Any]) -> list[bytes]:
    """One message per ``size`` rows, each row ``row % values``, built message by message."""
    before, after = head.split(_ROWS)
    payloads = []
    for start in range(0, len(columns[0]), size):
        parts = [_as_list(column[start:start + size]) for column in columns]
        items = ",".join([row % values for values in zip(*parts, strict=True)])
        payloads.append((before + "[" + items + "]" + after).encode())
    return payloads


def _as_list(values: Any) -> list[Any]:
    return values.tolist() if isinstance(values, np.ndarray) else list(values)


def _check_rows(size: int) -> None:
    if not 1 <= size <= MAX_ROWS:
        msg = f"a message holds 1 to {MAX_ROWS} rows; got a limit of {size}"
        raise ValueError(msg)


def _check_id(name: str, value: str) -> None:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        msg = f"{name} {value!r} does not match {ID_PATTERN}"
        raise ValueError(msg)


def _check_ids(ids: Sequence[str] | np.ndarray) -> None:
    joined = "\n".join(ids) if len(ids) else ""
    if joined and (not _IDS.fullmatch(joined) or joined.count("\n") != len(ids) - 1):
        bad = next(i for i in ids if not isinstance(i, str) or not _ID.fullmatch(i))
        msg = f"device_id {bad!r} does not match {ID_PATTERN}"
        raise ValueError(msg)


def _check_time(name: str, values: np.ndarray) -> None:
    column = np.asarray(values)
    if len(column) and (column.dtype.kind not in "iu" or int(column.min()) < MIN_TS_MS
                        or int(column.max()) >= MAX_TS_MS):
        msg = f"{name} must be UTC epoch ms in [{MIN_TS_MS}, {MAX_TS_MS})"
        raise ValueError(msg)
