r"""What Grafana's InfluxDB data source does to a panel query before sending it.

Grafana replaces ``$timeFilter`` with the dashboard's time range, ``$__interval`` with the
panel's interval, and ``$name``/``${name}`` with a variable's value: inside a regex
(``=~ /^$device$/``) a multi-value or "All" selection becomes ``(a|b)`` and each value is
regex-escaped. :func:`interpolate` does the same, so a query can be run as Grafana would
run it (the tests run every panel query this way against a real influxd); :func:`variables_in`
lists the variables a query uses.

>>> q = 'SELECT max(f) FROM t WHERE d =~ /^$device$/ AND $timeFilter GROUP BY time($__interval)'
>>> print(interpolate(q, {"device": ["m.1", "m2"]}, 0, 60_000, "10s"))
SELECT max(f) FROM t WHERE d =~ /^(m\.1|m2)$/ AND time >= 0ms and time <= 60000ms GROUP BY time(10s)
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

__all__ = ["interpolate", "variables_in"]

_VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")
_BUILT_INS = frozenset({"timeFilter", "__interval", "__interval_ms"})


def variables_in(query: str) -> set[str]:
    """The dashboard variables a query refers to (Grafana's built-ins left out).

    >>> sorted(variables_in("SELECT mean($metric) WHERE d =~ /^${device}$/ AND $timeFilter"))
    ['device', 'metric']
    """
    return {a or b for a, b in _VARIABLE.findall(query)} - _BUILT_INS


def interpolate(query: str, variables: Mapping[str, str | Sequence[str]], start_ms: int,
                end_ms: int, interval: str = "1m") -> str:
    """``query`` with the time range, interval and variables filled in (see the module doc).

    A value inside a regex literal (``/.../``) is escaped and a list becomes ``(a|b)``;
    elsewhere (a field name such as ``"$metric"``) the first value is used as it is. An
    unknown variable raises ``KeyError``.
    """
    out: list[str] = []
    in_regex = False
    position = 0
    for match in re.finditer(r"/|\$\{\w+\}|\$\w+", query):
        out.append(query[position:match.start()])
        token = match.group()
        position = match.end()
        if token == "/":
            in_regex = not in_regex
            out.append(token)
            continue
        name = token.strip("${}")
        if name == "timeFilter":
            out.append(f"time >= {start_ms}ms and time <= {end_ms}ms")
        elif name == "__interval":
            out.append(interval)
        else:
            value = variables[name]
            values = [value] if isinstance(value, str) else list(value)
            if in_regex:
                escaped = [re.escape(v) for v in values]
                out.append(escaped[0] if len(escaped) == 1 else f"({'|'.join(escaped)})")
            else:
                out.append(values[0])
    out.append(query[position:])
    return "".join(out)
