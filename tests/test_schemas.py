"""The committed JSON Schemas in schemas/ match the code; the drift check can fail."""

import json
import shutil
from pathlib import Path

from meshwatch.cli import main
from meshwatch.contract import schemas

COMMITTED = Path(__file__).parent.parent / "schemas"


def test_committed_schemas_match_the_code() -> None:
    assert schemas.drift(COMMITTED) == [], "run `meshwatch contract export` and commit schemas/"


def test_drift_is_detected(tmp_path) -> None:
    copy = tmp_path / "schemas"
    shutil.copytree(COMMITTED, copy)
    document = json.loads((copy / "Alert.json").read_text())
    document["properties"].pop("severity")
    (copy / "Alert.json").write_text(schemas.render(document))
    (copy / "TelemetryBatch.json").unlink()
    (copy / "Legacy.json").write_text("{}\n")
    assert schemas.drift(copy) == [
        "TelemetryBatch.json: missing",
        "Legacy.json: not in the contract any more",
        "Alert.json: differs from the code",
    ]
    assert main(["contract", "export", "--check", "--out", str(copy)]) == 1
    assert main(["contract", "export", "--out", str(copy)]) == 0
    assert schemas.drift(copy) == []
    assert main(["contract", "export", "--check", "--out", str(copy)]) == 0


def test_schemas_describe_the_wire_format() -> None:
    batch = json.loads((COMMITTED / "TelemetryBatch.json").read_text())
    assert batch["$schema"].endswith("2020-12/schema")
    assert set(batch["required"]) >= {"site", "gateway_id", "sent_ms", "readings"}
    reading = batch["$defs"]["Reading"]
    (pattern,) = reading["properties"]["metrics"]["patternProperties"]
    assert "|lpm|" in pattern
    assert "|bar|" in pattern
