"""The ``meshwatch`` command: one console script with a subcommand per job.

Each subcommand's module is imported only when that subcommand runs, so
``meshwatch --help`` stays fast and an edge install never imports cloud code.

>>> main(["config", "check", "/nonexistent.toml"])
1
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from rich.console import Console
from rich.markup import escape

from meshwatch import __version__

DEFAULT_SCHEMA_DIR = Path("schemas")


class _Command(Protocol):
    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...
    def run(self, args: argparse.Namespace) -> int: ...


# name -> (module providing add_arguments/run, one-line help)
PLUGIN_COMMANDS: dict[str, tuple[str, str]] = {
    "simulate": ("simulators.command", "simulate a smart-water fleet with ground truth"),
    "train": ("models.command", "train models"),
    "evaluate": ("models.evaluate_command", "score the detectors against simulated ground truth"),
    "score": ("models.score_command", "score any CSV time series with the generic detector"),
    "edge": ("edge_agent.command", "run one gateway's edge agent (store-and-forward, scoring)"),
    "demo": ("meshwatch.demo", "run the whole platform in one process on embedded defaults"),
    "bridge": ("mesh_bridge.command", "bridge site brokers into the cloud mesh (validate, dedup)"),
    "flow": ("dataflows.command", "run the bytewax dataflow: order, fill gaps, detect, store"),
    "remediation": ("remediation.command", "run incidents, work orders, crew API and pages"),
    "dashboards": ("dashboards.command", "export or push the Grafana dashboards"),
    "broker-config": (
        "mesh_bridge.broker_config",
        "write production mosquitto config: accounts, ACLs, TLS, persistence, QoS1 limits",
    ),
}


def refuse(what: str, exc: BaseException) -> int:
    """Say on stderr why a command cannot start (``what: reason``); returns its exit code, 2.

    The reason is printed as text (no markup), so ``[[opcua]]`` and the like survive.

    >>> refuse("cannot start the bridge", ValueError("set [bridge] client_id"))
    2
    """
    Console(stderr=True).print(f"[red]{what}:[/red] {escape(str(exc))}", highlight=False,
                               soft_wrap=True)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    plugin = argv[0] if argv and argv[0] in PLUGIN_COMMANDS else None
    parser = _build_parser(plugin)
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return handler(args)
    except KeyboardInterrupt:
        Console(stderr=True).print("[yellow]interrupted[/yellow]")
        return 130


def _build_parser(plugin: str | None) -> argparse.ArgumentParser:
    """The full parser; only ``plugin``'s module is imported (the one being run)."""
    version = argparse.ArgumentParser(add_help=False)
    version.add_argument("--version", action="version", version=f"meshwatch {__version__}")
    parser = argparse.ArgumentParser(
        prog="meshwatch",
        description="Meshwatch: telemetry and anomaly detection for water networks.",
        parents=[version],
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    for name, (module_name, help_text) in PLUGIN_COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text, parents=[version])
        if name == plugin:
            module: _Command = importlib.import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(handler=module.run)

    contract = commands.add_parser("contract", help="the event contract", parents=[version])
    contract_commands = contract.add_subparsers(title="contract commands", metavar="COMMAND")
    export = contract_commands.add_parser(
        "export", help="write the contract's JSON Schemas", description="Write JSON Schemas.",
        parents=[version],
    )
    export.add_argument("--out", type=Path, default=DEFAULT_SCHEMA_DIR, help="target directory")
    export.add_argument(
        "--check", action="store_true", help="only compare; exit 1 if the files drifted"
    )
    export.set_defaults(handler=_contract_export)

    config = commands.add_parser("config", help="configuration", parents=[version])
    config_commands = config.add_subparsers(title="config commands", metavar="COMMAND")
    check = config_commands.add_parser(
        "check",
        help="validate a config file and print the effective config (secrets masked)",
        description="Validate FILE plus MESHWATCH_* environment overrides.",
        parents=[version],
    )
    check.add_argument("file", type=Path, help="TOML configuration file")
    check.add_argument("--json", action="store_true", help="print JSON instead of a table")
    check.set_defaults(handler=_config_check)
    return parser


def _contract_export(args: argparse.Namespace) -> int:
    from meshwatch.contract import schemas

    console = Console()
    if args.check:
        problems = schemas.drift(args.out)
        for problem in problems:
            console.print(f"[red]drift[/red] {args.out}/{problem}")
        if problems:
            console.print("Run [bold]meshwatch contract export[/bold] and commit the result.")
            return 1
        console.print(f"{args.out}: schemas match the code")
        return 0
    written = schemas.export(args.out)
    console.print(f"wrote {len(written)} schemas to {args.out}/")
    return 0


def _config_check(args: argparse.Namespace) -> int:
    from meshwatch.config import ConfigError, load_config, masked_dump
    from meshwatch.registry import RegistryError, load_registry

    console = Console()
    try:
        config = load_config(args.file)
        registry = load_registry(config.registry.file) if config.registry.file else None
    except (ConfigError, RegistryError) as exc:
        print(f"invalid: {exc}", file=sys.stderr)
        return 1
    effective = masked_dump(config)
    if args.json:
        print(json.dumps(effective, indent=2, default=str))
    else:
        _print_config(console, effective)
    if registry is not None:
        console.print(f"registry: {registry.summary()}")
    console.print(f"[green]ok[/green] {args.file}")
    return 0


def _print_config(console: Console, effective: dict[str, object]) -> None:
    from rich.table import Table

    table = Table("key", "value", title="effective configuration")
    for key, value in _flatten(effective):
        table.add_row(key, "" if value is None else str(value))
    console.print(table)


def _flatten(data: dict[str, object], prefix: str = "") -> list[tuple[str, object]]:
    rows: list[tuple[str, object]] = []
    for key, value in data.items():
        if isinstance(value, dict):
            rows += _flatten(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


if __name__ == "__main__":
    sys.exit(main())
