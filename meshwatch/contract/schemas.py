"""JSON Schemas of the contract, exported to ``schemas/`` and checked for drift.

The committed files are what other teams build against; a test fails when the
code and the files disagree, and ``meshwatch contract export`` rewrites them.

>>> sorted(json_schemas())[:3]
['Alert.json', 'DeadLetter.json', 'DeviceStatus.json']
>>> json_schemas()["TelemetryBatch.json"]["properties"]["type"]["const"]
'telemetry'
"""

import json
from pathlib import Path
from typing import Any

from meshwatch.contract.events import EVENT_TYPES

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def json_schemas() -> dict[str, dict[str, Any]]:
    """One JSON Schema per event type, keyed by file name."""
    schemas = {}
    for model in EVENT_TYPES:
        schema = {"$schema": JSON_SCHEMA_DIALECT, **model.model_json_schema(mode="validation")}
        schemas[f"{model.__name__}.json"] = schema
    return schemas


def render(schema: dict[str, Any]) -> str:
    """The canonical text of a schema file (sorted keys, so diffs stay small)."""
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def export(directory: Path) -> list[Path]:
    """Write every schema into ``directory`` and remove stale ones; returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    wanted = json_schemas()
    for stale in set(p.name for p in directory.glob("*.json")) - set(wanted):
        (directory / stale).unlink()
    written = []
    for name, schema in sorted(wanted.items()):
        path = directory / name
        path.write_text(render(schema), encoding="utf-8")
        written.append(path)
    return written


def drift(directory: Path) -> list[str]:
    """Describe how ``directory`` differs from the code; an empty list means no drift."""
    wanted = {name: render(schema) for name, schema in json_schemas().items()}
    found = {p.name: p.read_text(encoding="utf-8") for p in directory.glob("*.json")}
    problems = [f"{name}: missing" for name in sorted(set(wanted) - set(found))]
    stale = sorted(set(found) - set(wanted))
    problems += [f"{name}: not in the contract any more" for name in stale]
    problems += [
        f"{name}: differs from the code"
        for name in sorted(set(wanted) & set(found))
        if wanted[name] != found[name]
    ]
    return problems
