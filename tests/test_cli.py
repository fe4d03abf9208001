"""The meshwatch console script: version, help, config check."""

import json
import subprocess
import sys

from meshwatch import __version__
from meshwatch.cli import main


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshwatch.cli", *args], capture_output=True, text=True,
        timeout=60, check=False,
    )


def test_version_and_help() -> None:
    result = _run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"meshwatch {__version__}"
    result = _run("--help")
    assert result.returncode == 0
    for command in ("simulate", "contract", "config"):
        assert command in result.stdout
    assert _run().returncode == 2


def test_every_subcommand_has_help_and_version() -> None:
    for command in (["simulate"], ["contract", "export"], ["config", "check"]):
        result = _run(*command, "--help")
        assert result.returncode == 0, result.stderr
        assert "usage: meshwatch " + " ".join(command) in result.stdout
        result = _run(*command, "--version")
        assert result.stdout.strip() == f"meshwatch {__version__}"


def test_config_check_prints_masked_effective_config(tmp_path, capsys, monkeypatch) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[influxdb]\nurl = "http://tsdb:8086"\n')
    monkeypatch.setenv("MESHWATCH_INFLUXDB__TOKEN", "very-secret")
    assert main(["config", "check", str(path), "--json"]) == 0
    out = capsys.readouterr().out
    effective = json.loads(out[: out.rindex("}") + 1])
    assert effective["influxdb"] == {
        "url": "http://tsdb:8086", "token": "***", "org": "meshwatch", "bucket": "meshwatch",
        "batch_size": 5000,
    }
    assert "very-secret" not in out


def test_config_check_rejects_bad_files_and_registries(tmp_path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[mesh]\npartitions = -1\n")
    result = _run("config", "check", str(bad))
    assert result.returncode == 1
    assert "mesh.partitions" in result.stderr
    assert "Traceback" not in result.stderr
    missing_registry = tmp_path / "r.toml"
    missing_registry.write_text(f'[registry]\nfile = "{tmp_path / "none.csv"}"\n')
    result = _run("config", "check", str(missing_registry))
    assert result.returncode == 1
    assert "registry file" in result.stderr
