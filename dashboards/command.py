r"""``meshwatch dashboards``: export the Grafana dashboards to files, or push them to Grafana.

::

    meshwatch dashboards export grafana/ --influx-url http://influxdb:8086 --database meshwatch
    meshwatch dashboards push --grafana-url http://grafana:3000 --token "$GRAFANA_TOKEN" \
        --influx-url http://influxdb:8086

``export`` writes the six dashboards as JSON plus Grafana provisioning YAML (data source and
dashboard provider; see :mod:`dashboards.provisioning`). ``push`` provisions them through
Grafana's HTTP API, idempotently by uid, into the ``Meshwatch`` folder, and prints what
changed (see :mod:`dashboards.push`); it also provisions the data source when
``--influx-url`` is given. Exit codes: 0 done, 1 Grafana refused or was unreachable.

>>> parser = argparse.ArgumentParser(prog="dashboards")
>>> add_arguments(parser)
>>> args = parser.parse_args(["push", "--grafana-url", "http://g:3000", "--token", "t"])
>>> args.token, args.influx_url
('t', None)
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from rich.console import Console

from dashboards.provisioning import DatasourceSettings

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``export`` and ``push`` subcommands to ``parser``."""
    commands = parser.add_subparsers(title="actions", metavar="ACTION", required=True)
    export = commands.add_parser(
        "export", help="write dashboard JSON and Grafana provisioning YAML to DIR",
        description="Write the dashboards and Grafana provisioning files to DIR.")
    export.add_argument("dir", type=Path, help="output directory (created if missing)")
    export.add_argument("--dashboards-path", default=None,
                        help="where Grafana sees DIR/dashboards (default: its absolute path)")
    _datasource_arguments(export, url_default="http://localhost:8086")
    export.set_defaults(action=_export)

    push = commands.add_parser(
        "push", help="provision the dashboards into a running Grafana (idempotent by uid)",
        description="Create or update the dashboards in Grafana's Meshwatch folder.")
    push.add_argument("--grafana-url", required=True, help="Grafana's base URL")
    push.add_argument("--token", default=os.environ.get("GRAFANA_TOKEN"),
                      help="service-account token (default: $GRAFANA_TOKEN)")
    push.add_argument("--timeout", type=float, default=10.0, help="seconds per request")
    _datasource_arguments(push, url_default=None)
    push.set_defaults(action=_push)


def _datasource_arguments(parser: argparse.ArgumentParser, url_default: str | None) -> None:
    group = parser.add_argument_group("InfluxDB data source")
    group.add_argument("--influx-url", default=url_default,
                       help="InfluxDB URL as Grafana reaches it" + (
                           " (default %(default)s)" if url_default else
                           " (default: leave the data source alone)"))
    group.add_argument("--database", default="meshwatch",
                       help="InfluxDB 1.x database, or 2.x/3.x bucket (default %(default)s)")
    group.add_argument("--token-env", default="MESHWATCH_INFLUXDB__TOKEN",
                       help="environment variable holding the InfluxDB token, expanded by "
                            "Grafana; '' for none (default %(default)s)")


def _settings(args: argparse.Namespace) -> DatasourceSettings | None:
    if not args.influx_url:
        return None
    return DatasourceSettings(args.influx_url, args.database, args.token_env or None)


def run(args: argparse.Namespace) -> int:
    """Run the chosen action; returns the exit code."""
    code: int = args.action(args)
    return code


def _export(args: argparse.Namespace) -> int:
    from dashboards.boards import all_dashboards
    from dashboards.provisioning import export

    settings = _settings(args) or DatasourceSettings()
    written = export(args.dir, all_dashboards(), settings, args.dashboards_path)
    console = Console()
    for path in written:
        console.print(f"wrote {path}")
    return 0


def _push(args: argparse.Namespace) -> int:
    from grafana_client.client import GrafanaException

    from dashboards.boards import all_dashboards
    from dashboards.push import push

    console = Console()
    try:
        changes = push(args.grafana_url, args.token, all_dashboards(),
                       datasource_settings=_settings(args), timeout_s=args.timeout)
    except GrafanaException as exc:
        console.print(f"[red]Grafana refused[/red] ({exc.status_code}): {exc.message}")
        return 1
    except OSError as exc:
        console.print(f"[red]cannot reach Grafana at {args.grafana_url}[/red]: {exc}")
        return 1
    for change in changes:
        colour = {"created": "green", "updated": "yellow"}.get(change.action, "dim")
        console.print(f"[{colour}]{change.action:9}[/{colour}] {change.kind:10} "
                      f"{change.uid:20} {change.title}")
    changed = sum(c.action != "unchanged" for c in changes)
    console.print(f"{changed} of {len(changes)} objects changed")
    return 0
