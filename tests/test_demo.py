"""`meshwatch demo --quick`: the whole platform on embedded defaults, nothing lost."""

from __future__ import annotations

import shutil

from meshwatch.cli import main


def test_quick_demo_loses_nothing(tmp_path, edge_model_dir, capsys) -> None:
    shutil.copytree(edge_model_dir, tmp_path / "edge-model")  # skip the first-run training
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "nothing lost" in out
    assert "read over OPC-UA" in out
    assert " 0 of them read over OPC-UA" not in out  # the pump station was really read
    assert "dead letters: none; all acknowledged" in " ".join(out.split())  # the bridge's line
    # one agent per gateway: 2 districts, each with a concentrator and a SCADA gateway
    assert len(list((tmp_path / "outboxes").glob("*.db"))) == 4
