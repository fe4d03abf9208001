"""Builders of Grafana's dashboard JSON model (schema version 41, Grafana 11): plain dicts.

Only what the Meshwatch dashboards use: time series, stat, bar gauge and table panels with
raw InfluxQL targets, query variables, InfluxDB annotations and an automatic grid layout.
Every key written here is one of Grafana's dashboard schema (the tests validate each
dashboard against the schema as published in Grafana's foundation SDK).

>>> board = dashboard("mw-x", "X", [stat("Devices", [target("SELECT 1")])])
>>> board["panels"][0]["gridPos"], board["panels"][0]["targets"][0]["refId"]
({'h': 5, 'w': 6, 'x': 0, 'y': 0}, 'A')
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["DATASOURCE", "SCHEMA_VERSION", "annotation", "bargauge", "dashboard", "row",
           "stat", "table", "target", "timeseries", "variable"]

Json = dict[str, Any]
SCHEMA_VERSION = 41
DATASOURCE: Json = {"type": "influxdb", "uid": "meshwatch-influxdb"}
"""The InfluxDB (InfluxQL) data source every panel reads; provisioned with this uid."""

_LEGEND: Json = {"displayMode": "list", "placement": "bottom", "showLegend": True,
                 "calcs": []}
_HEIGHT = {"timeseries": 8, "table": 8, "bargauge": 8, "stat": 5, "row": 1}


def target(query: str, ref_id: str = "A", *, alias: str | None = None,
           table_format: bool = False) -> Json:
    """A raw InfluxQL query of the InfluxDB data source.

    >>> target("SELECT 1", "B", table_format=True)["resultFormat"]
    'table'
    """
    out: Json = {"refId": ref_id, "datasource": dict(DATASOURCE), "query": query,
                 "rawQuery": True, "resultFormat": "table" if table_format else "time_series"}
    if alias:
        out["alias"] = alias
    return out


def _targets(queries: Sequence[Json]) -> list[Json]:
    refs = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    return [{**q, "refId": refs[i]} for i, q in enumerate(queries)]


def _panel(kind: str, title: str, queries: Sequence[Json], options: Json, *,
           description: str, unit: str | None, width: int, custom: Json | None = None,
           overrides: Sequence[Json] = (), extra: Json | None = None) -> Json:
    defaults: Json = {}
    if unit:
        defaults["unit"] = unit
    if custom:
        defaults["custom"] = custom
    panel: Json = {
        "type": kind, "title": title, "description": description,
        "datasource": dict(DATASOURCE), "targets": _targets(queries),
        "gridPos": {"h": _HEIGHT[kind], "w": width, "x": 0, "y": 0},
        "options": options,
        "fieldConfig": {"defaults": defaults, "overrides": list(overrides)},
    }
    return panel | (extra or {})


def timeseries(title: str, queries: Sequence[Json], *, description: str = "",
               unit: str | None = None, width: int = 12, bars: bool = False,
               overrides: Sequence[Json] = ()) -> Json:
    """A time series panel (lines, or stacked bars with ``bars``)."""
    custom: Json = {"drawStyle": "bars", "fillOpacity": 80,
                    "stacking": {"mode": "normal", "group": "A"}} if bars else {
        "drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "spanNulls": False}
    options = {"legend": dict(_LEGEND), "tooltip": {"mode": "multi", "sort": "desc"}}
    return _panel("timeseries", title, queries, options, description=description, unit=unit,
                  width=width, custom=custom, overrides=overrides)


def stat(title: str, queries: Sequence[Json], *, description: str = "",
         unit: str | None = None, width: int = 6) -> Json:
    """A single-value panel showing the last value of its query."""
    options = {"graphMode": "none", "colorMode": "value", "justifyMode": "auto",
               "textMode": "auto", "wideLayout": True, "showPercentChange": False,
               "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
               "percentChangeColorMode": "standard", "orientation": "auto"}
    return _panel("stat", title, queries, options, description=description, unit=unit,
                  width=width)


def bargauge(title: str, queries: Sequence[Json], *, description: str = "",
             unit: str | None = None, width: int = 12) -> Json:
    """Horizontal bars, one per series (for example alerts by kind)."""
    options = {"displayMode": "gradient", "valueMode": "color", "namePlacement": "auto",
               "showUnfilled": True, "sizing": "auto", "minVizWidth": 8, "minVizHeight": 16,
               "legend": dict(_LEGEND, showLegend=False),
               "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
               "maxVizHeight": 300, "orientation": "horizontal"}
    return _panel("bargauge", title, queries, options, description=description, unit=unit,
                  width=width)


def table(title: str, queries: Sequence[Json], *, description: str = "",
          width: int = 24) -> Json:
    """A table of raw rows (queries in table format)."""
    options = {"frameIndex": 0, "showHeader": True, "cellHeight": "sm",
               "footer": {"show": False, "reducer": [], "countRows": False}}
    return _panel("table", title, [dict(q, resultFormat="table") for q in queries], options,
                  description=description, unit=None, width=width)


def row(title: str) -> Json:
    """A full-width row header that starts a new section."""
    return {"type": "row", "title": title, "collapsed": False, "panels": [],
            "gridPos": {"h": 1, "w": 24, "x": 0, "y": 0}}


def variable(name: str, query: str, *, label: str, multi: bool = False,
             include_all: bool = False) -> Json:
    """A query variable filled from InfluxDB (``SHOW TAG VALUES ...``), refreshed on load."""
    return {"type": "query", "name": name, "label": label, "datasource": dict(DATASOURCE),
            "query": query, "refresh": 1, "sort": 1, "multi": multi,
            "includeAll": include_all, "options": [], "hide": 0}


def annotation(name: str, query: str, *, color: str, text: str,
               tags: Sequence[str] = ()) -> Json:
    """An InfluxDB annotation: points of ``query`` mark the time axis of every panel.

    The InfluxDB data source reads ``target.query`` (InfluxQL, ``$timeFilter`` inside), the
    column ``text`` as the annotation's text and the ``tags`` columns as its tags.
    ``limit``/``matchAny``/``tags``/``type`` are the keys Grafana's schema requires of every
    annotation target.

    >>> a = annotation("Alerts", 'SELECT "kind" FROM "mw_alert"', color="red", text="kind")
    >>> a["target"]["textColumn"], a["target"]["tagsColumn"]
    ('kind', '')
    """
    return {"name": name, "datasource": dict(DATASOURCE), "enable": True, "hide": False,
            "iconColor": color,
            "target": {"limit": 100, "matchAny": False, "tags": [], "type": "dashboard",
                       "refId": "Anno", "query": query, "rawQuery": True,
                       "resultFormat": "table", "fromAnnotations": True,
                       "textColumn": text, "tagsColumn": ",".join(tags)}}


_BUILT_IN: Json = {"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                   "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                   "name": "Annotations & Alerts", "type": "dashboard"}


def _layout(panels: Sequence[Json]) -> list[Json]:
    """Place panels left to right, wrapping at 24 columns; a row starts a new line."""
    out: list[Json] = []
    x = y = line_height = 0
    for number, panel in enumerate(panels, start=1):
        grid = dict(panel["gridPos"])
        if panel["type"] == "row" or x + grid["w"] > 24:
            x, y, line_height = 0, y + line_height, 0
        grid["x"], grid["y"] = x, y
        x += grid["w"]
        line_height = max(line_height, grid["h"])
        out.append(dict(panel, id=number, gridPos=grid))
    return out


def dashboard(uid: str, title: str, panels: Sequence[Json], *, description: str = "",
              variables: Sequence[Json] = (), annotations: Sequence[Json] = (),
              tags: Sequence[str] = (), time_from: str = "now-6h",
              refresh: str = "1m") -> Json:
    """A whole dashboard; ``uid`` identifies it in every Grafana (push is idempotent by it)."""
    return {
        "uid": uid, "title": title, "description": description,
        "tags": ["meshwatch", *tags], "timezone": "utc", "editable": True,
        "graphTooltip": 1, "time": {"from": time_from, "to": "now"},
        "refresh": refresh, "schemaVersion": SCHEMA_VERSION, "version": 1,
        "fiscalYearStartMonth": 0, "liveNow": False, "weekStart": "",
        "links": [{"title": "Meshwatch", "type": "dashboards", "tags": ["meshwatch"],
                   "asDropdown": True, "icon": "external link", "includeVars": False,
                   "keepTime": True, "targetBlank": False, "tooltip": "", "url": ""}],
        "panels": _layout(panels),
        "templating": {"list": list(variables)},
        "annotations": {"list": [dict(_BUILT_IN), *annotations]},
    }
