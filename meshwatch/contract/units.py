"""Metric names and their units.

A metric name is ``<quantity>_<unit>`` in lower snake case, for example
``flow_lpm`` or ``inlet_pressure_bar``. The unit suffix must be one of
:data:`UNITS`, so every value on the mesh declares its unit in its name.

>>> import re
>>> bool(re.fullmatch(METRIC_NAME_PATTERN, "inlet_pressure_bar"))
True
>>> bool(re.fullmatch(METRIC_NAME_PATTERN, "flow"))
False
"""

UNITS: dict[str, str] = {
    "lpm": "litres per minute",
    "lph": "litres per hour",
    "l": "litres",
    "m3": "cubic metres",
    "m3h": "cubic metres per hour",
    "bar": "bar (gauge pressure)",
    "kpa": "kilopascal",
    "m": "metres (level, head)",
    "c": "degrees Celsius",
    "v": "volts",
    "a": "amperes",
    "kw": "kilowatts",
    "kwh": "kilowatt-hours",
    "h": "hours",
    "s": "seconds",
    "hz": "hertz",
    "rpm": "revolutions per minute",
    "pct": "percent (0 to 100)",
    "ratio": "ratio (0 to 1)",
    "count": "dimensionless count",
    "state": "discrete state code (0 = off, 1 = on, ...)",
}
"""Allowed unit suffixes and what they mean."""

STANDARD_METRICS: dict[str, str] = {
    "flow_lpm": "volumetric flow, litres per minute (interval average for meters)",
    "pressure_bar": "gauge pressure, bar",
    "temperature_c": "water temperature, degrees Celsius",
    "battery_v": "battery voltage, volts",
}
"""The metrics that detectors understand by name."""

METRIC_NAME_PATTERN = r"^[a-z][a-z0-9]*(?:_[a-z0-9]+)*_(?:" + "|".join(sorted(UNITS)) + r")$"
"""Regular expression every metric name must match."""
