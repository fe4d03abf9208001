"""Every dashboard validates against Grafana's dashboard schema, and is well formed beyond it.

The schema: Grafana publishes its dashboard kind (CUE) as generated code in the foundation
SDK (``grafana-foundation-sdk`` on PyPI, pinned in the dev extra). Its JSON Schema files are
not in any installable package, so this test walks the SDK's generated model classes
instead, as strictly as the JSON Schema (``additionalProperties: false``): every key must be
one the model declares (the JSON key names come from each class's ``from_json``), every
required key must be there, types and enums must match, null is refused. Panel ``options``
and ``fieldConfig.defaults.custom`` are checked against the SDK's model of that panel type.

One documented deviation: the schema types an annotation ``target`` as the built-in Grafana
data source's target (``limit``, ``matchAny``, ``tags``, ``type``; its own comment says it
"should be a regular DataQuery"), so the InfluxDB query keys are allowed there as well.
"""

from __future__ import annotations

import copy
import enum
import importlib
import inspect
import re
import types
import typing
from typing import Any

import pytest
from grafana_foundation_sdk.cog import variants
from grafana_foundation_sdk.models import dashboard as sdk

from dashboards.boards import all_dashboards
from dashboards.influxql import variables_in
from dashboards.model import DATASOURCE

INFLUX_TARGET_KEYS = {"refId", "datasource", "query", "rawQuery", "resultFormat", "alias",
                      "hide"}
ANNOTATION_EXTRA_KEYS = {"refId", "query", "rawQuery", "resultFormat", "fromAnnotations",
                         "textColumn", "tagsColumn"}


def _keys(cls: type) -> dict[str, str]:
    """JSON key -> attribute, read from the generated ``from_json``."""
    keys: dict[str, str] = {}
    pending = None
    for line in inspect.getsource(cls.from_json).splitlines():  # type: ignore[attr-defined]
        if found := re.search(r'if "([^"]+)" in data:', line):
            pending = found.group(1)
        elif pending and (found := re.search(r'args\["(\w+)"\] =', line)):
            keys[pending] = found.group(1)
            pending = None
    # constants (RowPanel's "type": "row") are written by to_json but not read back
    to_json = inspect.getsource(cls.to_json)  # type: ignore[attr-defined]
    keys.update(dict(re.findall(r'"(\w+)"\]? ?[:=] ?self\.(\w+)\b', to_json)))
    return keys


def _optional(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in (
        typing.get_args(hint))


def validate(value: Any, hint: Any, path: str = "$") -> list[str]:
    """Errors of ``value`` against the SDK type ``hint`` (empty: valid)."""
    origin = typing.get_origin(hint)
    if hint in (Any, object):
        return []
    if value is None:
        return [f"{path}: null is not allowed"]
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        results = [validate(value, option, path) for option in options]
        if any(not r for r in results):
            return []
        return min(results, key=len) if len(options) == 1 else [
            f"{path}: matches none of {[getattr(o, '__name__', o) for o in options]}: "
            f"{min(results, key=len)}"]
    if origin is typing.Literal:
        return [] if value in typing.get_args(hint) else [
            f"{path}: {value!r} not in {typing.get_args(hint)}"]
    if origin is list:
        if not isinstance(value, list):
            return [f"{path}: expected a list, got {type(value).__name__}"]
        (item,) = typing.get_args(hint)
        return [e for i, v in enumerate(value) for e in validate(v, item, f"{path}[{i}]")]
    if origin is dict:
        if not isinstance(value, dict):
            return [f"{path}: expected an object, got {type(value).__name__}"]
        _, item = typing.get_args(hint)
        return [e for k, v in value.items() for e in validate(v, item, f"{path}.{k}")]
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        allowed = [m.value for m in hint]
        return [] if value in allowed and not isinstance(value, bool) else [
            f"{path}: {value!r} not one of {allowed}"]
    if hint is variants.Dataquery:
        return _influx_target(value, path)
    if hint in (str, int, float, bool):
        ok = isinstance(value, bool) if hint is bool else (
            not isinstance(value, bool) and isinstance(value, (int, float) if hint is float
                                                       else hint))
        return [] if ok else [f"{path}: expected {hint.__name__}, got {value!r}"]
    if isinstance(hint, type) and hasattr(hint, "from_json"):
        return _model(value, hint, path)
    return [f"{path}: the validator does not know type {hint!r}"]


def _model(value: Any, cls: type, path: str) -> list[str]:
    if not isinstance(value, dict):
        return [f"{path}: expected a {cls.__name__} object, got {type(value).__name__}"]
    keys = _keys(cls)
    hints = typing.get_type_hints(cls, vars(importlib.import_module(cls.__module__)))
    errors = []
    extra = ANNOTATION_EXTRA_KEYS if cls is sdk.AnnotationTarget else set()
    for key in value:
        if key not in keys and key not in extra:
            errors.append(f"{path}: {cls.__name__} has no property {key!r}")
    for key, attr in keys.items():
        if key in value:
            errors += validate(value[key], hints[attr], f"{path}.{key}")
        elif not _optional(hints[attr]):
            errors.append(f"{path}: {cls.__name__} requires {key!r}")
    return errors


def _influx_target(value: Any, path: str) -> list[str]:
    if not isinstance(value, dict):
        return [f"{path}: a query must be an object"]
    errors = [f"{path}: unknown InfluxDB query key {k!r}" for k in value
              if k not in INFLUX_TARGET_KEYS]
    if not isinstance(value.get("refId"), str):
        errors.append(f"{path}: refId must be a string")
    if "datasource" in value:
        errors += validate(value["datasource"], sdk.DataSourceRef, f"{path}.datasource")
    return errors


def validate_dashboard(board: dict[str, Any]) -> list[str]:
    """The schema, plus each panel's options and custom field config against its plugin."""
    errors = validate(board, sdk.Dashboard)
    for i, panel in enumerate(board.get("panels", [])):
        if panel.get("type") == "row":
            continue
        plugin = importlib.import_module(f"grafana_foundation_sdk.models.{panel['type']}")
        where = f"$.panels[{i}]({panel['type']})"
        errors += validate(panel.get("options"), plugin.Options, f"{where}.options")
        custom = panel.get("fieldConfig", {}).get("defaults", {}).get("custom")
        if custom is not None:
            errors += validate(custom, plugin.FieldConfig, f"{where}.fieldConfig.custom")
    return errors


BOARDS = all_dashboards()


@pytest.mark.parametrize("board", BOARDS, ids=[b["uid"] for b in BOARDS])
def test_dashboard_validates_against_grafana_schema(board: dict[str, Any]) -> None:
    assert validate_dashboard(board) == []


@pytest.mark.parametrize(("mutate", "expected"), [
    (lambda b: b.update(colour="blue"), "Dashboard has no property 'colour'"),
    (lambda b: b.pop("schemaVersion"), "Dashboard requires 'schemaVersion'"),
    (lambda b: b.update(graphTooltip=7), "$.graphTooltip: 7 not one of"),
    (lambda b: b["panels"][0].update(gridPos={"h": 5, "w": "6", "x": 0, "y": 0}),
     "gridPos.w: expected int"),
    (lambda b: b["panels"][0]["options"].update(graphMode="sparkles"),
     "options.graphMode: 'sparkles' not one of"),
    (lambda b: b["panels"][0]["targets"][0].update(sql="SELECT 1"),
     "unknown InfluxDB query key 'sql'"),
    (lambda b: b["templating"]["list"].append({"name": "x"}), "VariableModel requires 'type'"),
    (lambda b: b["annotations"]["list"][1]["target"].pop("matchAny"),
     "AnnotationTarget requires 'matchAny'"),
    (lambda b: b.update(title=None), "$.title: null is not allowed"),
])
def test_the_validator_rejects_what_the_schema_rejects(mutate: Any, expected: str) -> None:
    board = copy.deepcopy(BOARDS[0])
    board["templating"]["list"] = []
    mutate(board)
    errors = validate_dashboard(board)
    assert any(expected in e for e in errors), errors


def test_dashboards_are_well_formed() -> None:
    uids = [b["uid"] for b in BOARDS]
    assert len(set(uids)) == 6
    for board in BOARDS:
        assert re.fullmatch(r"[a-zA-Z0-9_-]{1,40}", board["uid"])  # Grafana's uid rule
        panels = board["panels"]
        assert len({p["id"] for p in panels}) == len(panels)
        cells: set[tuple[int, int]] = set()
        for panel in panels:
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24, panel["title"]
            area = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                    for y in range(grid["y"], grid["y"] + grid["h"])}
            assert not area & cells, f"{board['uid']}: {panel['title']} overlaps"
            cells |= area
        defined = {v["name"] for v in board["templating"]["list"]}
        queries = [t["query"] for p in panels for t in p.get("targets", [])]
        queries += [a["target"]["query"] for a in board["annotations"]["list"]
                    if "target" in a]
        queries += [p["title"] for p in panels]
        for query in queries:
            assert variables_in(query) <= defined, (board["uid"], query)
        for panel in panels:
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == DATASOURCE
            assert panel["targets"], panel["title"]
            assert all(t["datasource"] == DATASOURCE and t["rawQuery"] for t in
                       panel["targets"])


def test_the_device_dashboard_marks_imputed_points() -> None:
    board = next(b for b in BOARDS if b["uid"] == "mw-device")
    panel = board["panels"][0]
    assert [t["query"].count("\"imputed\" = 'true'") for t in panel["targets"]] == [0, 1]
    (override,) = panel["fieldConfig"]["overrides"]
    assert override["matcher"]["id"] == "byRegexp"
    assert re.fullmatch(override["matcher"]["options"], "m1 imputed")
    assert not re.fullmatch(override["matcher"]["options"], "m1 measured")
    assert {"id": "custom.drawStyle", "value": "points"} in override["properties"]
    assert {v["name"] for v in board["templating"]["list"]} == {"device", "metric"}
