"""What the bridge tests share: the fleet, the bridge's config files and process, /healthz."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from mqtt_ledger import Ledger
from servers import Mosquitto

from mesh_bridge.shell import SITE_KINDS
from meshwatch.contract import topics
from meshwatch.registry import COLUMNS

P = 4
SITE = "s1"
GATEWAYS = [f"gw-{g}" for g in range(3)]
DEVICES = {gw: [f"{gw}-m{d}" for d in range(5)] for gw in GATEWAYS}


def write_config(path: Path, site: Mosquitto, cloud: Mosquitto, client_id: str,
                 healthz_port: int = 0, extra: str = "", registry: Path | None = None) -> Path:
    """bridge.toml and registry.csv (every device of DEVICES) for a `meshwatch bridge` process.

    Heartbeats every 0.2 s, reconnects within 1 s; ``extra`` is appended to the TOML. With
    ``registry``, the bridge reads that registry file instead (no registry.csv is written).
    """
    if registry is None:
        registry = path / "registry.csv"
        rows = [",".join(COLUMNS)] + [f"{d},customer_meter,,false,{SITE},dma-01,{gw},900,,"
                                      for gw in GATEWAYS for d in DEVICES[gw]]
        registry.write_text("\n".join(rows) + "\n")
    path.joinpath("bridge.toml").write_text(
        f'log_level = "INFO"\n[site_broker]\nurl = "{site.url}"\n'
        f'[mesh_broker]\nurl = "{cloud.url}"\n[mesh]\npartitions = {P}\n'
        f'[registry]\nfile = "{registry}"\n'
        f'[bridge]\nclient_id = "{client_id}"\nhealthz_port = {healthz_port}\n'
        f'heartbeat_s = 0.2\nreconnect_max_s = 1\n{extra}')
    return path / "bridge.toml"


def create_site_session(site: Mosquitto, client_id: str) -> None:
    """Make the bridge's persistent session on ``site`` exist, subscribed to every site topic,
    so what gateways publish before the bridge process has subscribed waits for it."""
    Ledger(site, client_id, *(topics.subscription(kind) for kind in SITE_KINDS)).close()


def spawn_bridge(config: Path, log: Path) -> subprocess.Popen[bytes]:
    """`meshwatch bridge --config CONFIG` as a child process, its output appended to ``log``."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "meshwatch.cli", "bridge", "--config", str(config)],
            stdout=out, stderr=subprocess.STDOUT, env=os.environ | {"PYTHONUNBUFFERED": "1"})


def healthz(port: int) -> int:
    """The /healthz status code, 0 if nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0
