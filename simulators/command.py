"""``meshwatch simulate``: run a simulated fleet into files, MQTT, or just the iterator.

The console script in :mod:`meshwatch.cli` calls :func:`add_arguments` and :func:`run`.
Examples::

    meshwatch simulate --meters 10000 --days 30 --seed 7 --out data/
    meshwatch simulate --meters 2000 --days 1 --publish mqtt://127.0.0.1:1883 --rate 50000
    meshwatch simulate --days 7 --rates rates.toml --format csv --out data/
    meshwatch simulate opcua --port 4840 --district 1 --seed 7 --speed 60

``simulate opcua`` serves one district's pump station over OPC-UA (see
:mod:`simulators.opcua_station`) until Ctrl-C or SIGTERM; asyncua is imported only then.

``--rates`` reads a TOML file with ``[incidents]`` and ``[comms]`` tables whose keys are
the fields of :class:`simulators.config.IncidentRates` and :class:`~simulators.config.CommRates`.

>>> parser = argparse.ArgumentParser(prog="simulate")
>>> add_arguments(parser)
>>> args = parser.parse_args(["--meters", "100", "--days", "0.05", "--quiet"])
>>> run(args)
0
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from simulators.block import MAX_READINGS_PER_BATCH, ReadingBlock
from simulators.config import DEFAULT_START, FleetConfig, SimConfig, load_rates
from simulators.engine import FleetSimulator, RunStats
from simulators.output import FORMATS, write_run
from simulators.publish import FleetPublisher, PublishError, PublishSettings

if TYPE_CHECKING:
    from simulators.opcua_station import PumpStation


def _number(convert: Callable[[str], float], minimum: float, *, above: bool = False,
            ) -> Callable[[str], float]:
    """An argparse type: ``convert`` the text and require ``>= minimum`` (``> minimum``)."""
    kind = "a whole number" if convert is int else "a number"
    bound = f"above {minimum:g}" if above else f"of {minimum:g} or more"

    def parse(text: str) -> float:
        try:
            value = convert(text)
        except ValueError:
            value = math.nan
        if not (value > minimum if above else value >= minimum) or math.isinf(value):
            msg = f"expected {kind} {bound}, got {text!r}"
            raise argparse.ArgumentTypeError(msg)
        return value

    return parse


_positive_int = _number(int, 1)
_non_negative_int = _number(int, 0)
_positive_float = _number(float, 0, above=True)
_non_negative_float = _number(float, 0)


def _batch_size(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_READINGS_PER_BATCH:
        msg = f"a batch holds at most {MAX_READINGS_PER_BATCH} readings, got {text}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _start_time(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        msg = f"expected an ISO 8601 time such as 2026-01-05T00:00:00Z, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the simulator's options to ``parser``, and the ``opcua`` mode."""
    _add_fleet_and_run_arguments(parser, days=1.0, speed=None)
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    out = parser.add_argument_group("output (neither: run into memory and report)")
    out.add_argument("--out", type=Path, default=None, metavar="DIR",
                     help="write readings, ground truth, comm faults and registry here")
    out.add_argument("--format", choices=FORMATS, default="parquet",
                     help="readings file format (default %(default)s)")
    out.add_argument("--publish", default=None, metavar="URL",
                     help="publish to an MQTT broker, e.g. mqtt://127.0.0.1:1883")
    out.add_argument("--batch-size", type=_batch_size, default=500,
                     help="readings per MQTT message (default %(default)s)")
    out.add_argument("--rate", type=_non_negative_float, default=0.0,
                     help="readings per second to publish; 0 = as fast as possible")
    out.add_argument("--connections", type=_positive_int, default=4,
                     help="MQTT connections shared by the gateways (default %(default)s)")
    modes = parser.add_subparsers(title="modes (none: the fleet as above)", dest="mode",
                                  metavar="MODE")
    opcua = modes.add_parser(
        "opcua", help="serve one district's pump station over OPC-UA",
        description="Serve one district's pump station as an OPC-UA server (asyncua), fed "
                    "by the fleet simulator in simulated time, until Ctrl-C. Node ids: "
                    "ns=2;s=<device>.<metric>, e.g. ns=2;s=dma-01-pump.flow_lpm.")
    _add_fleet_and_run_arguments(opcua, days=365.0, speed=60.0)
    server = opcua.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default %(default)s; 0.0.0.0 for all)")
    server.add_argument("--port", type=_port, default=4840,
                        help="TCP port (default %(default)s)")
    server.add_argument("--district", type=_positive_int, default=1,
                        help="the district whose pump station to serve, from 1 "
                             "(default %(default)s)")


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        msg = f"a TCP port is 1 to 65535, got {text}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _add_fleet_and_run_arguments(parser: argparse.ArgumentParser, *, days: float,
                                 speed: float | None) -> None:
    fleet = parser.add_argument_group("fleet")
    fleet.add_argument("--meters", type=_positive_int, default=FleetConfig.meters,
                       help="customer meters (default %(default)s)")
    fleet.add_argument("--districts", type=_positive_int, default=None,
                       help="districts (default: one per ~1,500 meters)")
    fleet.add_argument("--meters-per-gateway", type=_positive_int,
                       default=FleetConfig.meters_per_gateway,
                       help="customer meters per data concentrator (default %(default)s)")
    run_group = parser.add_argument_group("run")
    run_group.add_argument("--days", type=_positive_float, default=days,
                           help="simulated days, fractions allowed (default %(default)s)")
    run_group.add_argument("--seed", type=_non_negative_int, default=0,
                           help="random seed; the same seed gives the same run")
    run_group.add_argument("--start", type=_start_time, default=DEFAULT_START,
                           help="start time, ISO 8601, UTC if no offset "
                                "(default 2026-01-05T00:00:00Z)")
    run_group.add_argument("--speed", type=_positive_float, default=speed,
                           help="simulated seconds per wall second (default: "
                                + ("as fast as possible)" if speed is None else
                                   "%(default)s, one simulated minute per second)"))
    run_group.add_argument("--rates", type=Path, default=None, metavar="FILE.toml",
                           help="incident and comm-fault rates: [incidents] and [comms] tables")


def run(args: argparse.Namespace) -> int:
    """Run the simulation the options describe; return the exit code (2: bad options)."""
    console = Console(stderr=True)
    if getattr(args, "mode", None) == "opcua":
        return _serve_opcua(args, console)
    try:
        config = _config(args)
        settings = None
        if args.publish is not None:
            settings = PublishSettings(args.publish, batch_size=args.batch_size,
                                       rate=args.rate, connections=args.connections)
            settings.validate()
        if args.out is not None and args.publish is not None:
            msg = "choose --out or --publish, not both"
            raise ValueError(msg)
    except ValueError as exc:
        console.print(f"[red]simulate: error:[/] {exc}", highlight=False)
        return 2
    started = time.perf_counter()
    published = 0
    try:
        with _Progress(config, args.quiet) as advance:
            if args.out is not None:
                stats = write_run(config, args.out, args.format, on_block=advance)
            elif settings is not None:
                stats, published = _publish(config, settings, advance)
            else:
                simulator = FleetSimulator(config)
                for block in simulator:
                    advance(block)
                stats = simulator.stats
    except PublishError as exc:
        console.print(f"[red]simulate: error:[/] {exc}", highlight=False)
        return 1
    except OSError as exc:
        console.print(f"[red]simulate: error:[/] cannot write {exc.filename}: {exc.strerror}",
                      highlight=False)
        return 1
    if not args.quiet:
        Console().print(_summary(stats, time.perf_counter() - started, published, args))
    return 0


def _config(args: argparse.Namespace) -> SimConfig:
    fleet = FleetConfig(meters=args.meters, districts=args.districts,
                        meters_per_gateway=args.meters_per_gateway)
    config = SimConfig(fleet=fleet, seed=args.seed, start=args.start, days=args.days,
                       speed=args.speed)
    if args.rates is not None:
        config = load_rates(args.rates, config)
    config.validate()
    return config


def _serve_opcua(args: argparse.Namespace, console: Console) -> int:
    """Serve the pump station until SIGINT or SIGTERM; exit code 0 when stopped so."""
    from simulators.opcua_station import PumpStation

    logging.getLogger("asyncua").setLevel(logging.ERROR)  # its start-up chatter
    try:
        station = PumpStation(_config(args), args.district, host=args.host, port=args.port)
    except ValueError as exc:
        console.print(f"[red]simulate opcua: error:[/] {exc}", highlight=False)
        return 2
    try:
        asyncio.run(_serve(station, console))
    except OSError as exc:
        console.print(f"[red]simulate opcua: error:[/] cannot listen on {station.endpoint}: "
                      f"{exc.strerror or exc}", highlight=False)
        return 1
    reached = datetime.fromtimestamp(station.last_ts_ms / 1000, UTC)
    console.print(f"stopped after serving {station.served:,} readings "
                  f"(simulated time {reached:%Y-%m-%d %H:%M}Z)", highlight=False)
    return 0


async def _serve(station: PumpStation, console: Console) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with station:
        table = Table(title=f"pump station {station.device_id} on {station.endpoint}")
        table.add_column("metric")
        table.add_column("node id")
        for metric, node_id in station.node_ids.items():
            table.add_row(metric, node_id)
        Console().print(table)
        console.print(f"serving at {station.config.speed:g}x simulated time; Ctrl-C stops",
                      highlight=False)
        await stop.wait()


def _publish(config: SimConfig, settings: PublishSettings,
             advance: Callable[[ReadingBlock], None]) -> tuple[RunStats, int]:
    simulator = FleetSimulator(config)
    with FleetPublisher(settings) as publisher:
        for block in simulator:
            publisher.publish(block)
            advance(block)
        publisher.wait_for_acks()
        return simulator.stats, publisher.messages


class _Progress:
    """A rich progress bar over produced readings, or nothing when quiet."""

    def __init__(self, config: SimConfig, quiet: bool) -> None:
        samples = config.fleet.customer_cadence_s // config.fleet.scada_cadence_s
        self._total = config.steps * (config.fleet.meters
                                      + 2 * config.fleet.district_count * samples)
        self._bar = None if quiet else Progress(
            TextColumn("simulating"), BarColumn(), MofNCompleteColumn(),
            TextColumn("readings"), TimeElapsedColumn(), console=Console(stderr=True),
            transient=True)
        self._task = None

    def __enter__(self) -> Callable[[ReadingBlock], None]:
        if self._bar is None:
            return lambda block: None
        self._bar.__enter__()
        task = self._bar.add_task("run", total=self._total)
        bar = self._bar

        def advance(block: ReadingBlock) -> None:
            bar.advance(task, len(block))

        return advance

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)


def _summary(stats: RunStats, elapsed: float, messages: int, args: argparse.Namespace) -> Table:
    table = Table(title="Simulation summary", show_header=True, header_style="bold")
    table.add_column("what")
    table.add_column("count", justify="right")
    rows: list[tuple[str, str]] = [
        ("readings produced", f"{stats.produced:,}"),
        ("readings delivered", f"{stats.delivered:,}"),
        ("readings lost", f"{stats.lost:,}"),
        ("readings duplicated", f"{stats.duplicated:,}"),
    ]
    rows += [(f"  produced by {kind}", f"{count:,}")
             for kind, count in sorted(stats.produced_by_kind.items())]
    rows += [(f"incidents: {kind}", f"{count:,}")
             for kind, count in sorted(stats.incidents.items())]
    rows += [(f"readings hit by comm fault: {kind}", f"{count:,}")
             for kind, count in sorted(stats.comm_faults.items())]
    rows += [(f"confounders: {kind}", f"{count:,}")
             for kind, count in sorted(stats.confounders.items())]
    rate = stats.delivered_rows / elapsed if elapsed > 0 else 0.0
    rows += [("elapsed", f"{elapsed:.1f} s"), ("readings/s", f"{rate:,.0f}")]
    if args.publish is not None:
        rows += [("MQTT messages (all acknowledged)", f"{messages:,}")]
    if args.out is not None:
        rows += [("output", str(args.out))]
    for name, value in rows:
        table.add_row(name, value)
    return table

