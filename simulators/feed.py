"""One gateway's simulated readings, generated in a child process (``meshwatch edge --simulate``).

:meth:`BlockFeed.start` runs the fleet simulator as ``python -m simulators.feed`` and reads
the :class:`~simulators.block.ReadingBlock` objects of one gateway from its stdout, in
delivery order, pickled one by one. The process that reads them (the edge agent) therefore
carries neither the simulator's memory (~10 MB for 5,000 meters) nor its CPU time, like an
agent on a real gateway, whose readings come from devices: its RSS and CPU figures are its
own. The pipe back-pressures the simulator when the reader is slower.

The child checks the options and that the fleet has the gateway before it sends anything; a
bad option comes back as :class:`ValueError` from :meth:`BlockFeed.start`. It ignores SIGINT
(the reader stops it with :meth:`BlockFeed.close`) and exits quietly when the reader goes
away (a closed pipe, or the reader killed).

>>> feed = BlockFeed.start(FeedOptions(gateway_id="dma-01-gw-001", meters=40, days=0.05))
>>> blocks = list(feed)
>>> {block.gateway_id for block in blocks}, feed.close()
({'dma-01-gw-001'}, 0)
>>> BlockFeed.start(FeedOptions(gateway_id="dma-09-gw-001", meters=40, days=0.05))
... # doctest: +ELLIPSIS
Traceback (most recent call last):
...
ValueError: the simulated fleet has no gateway dma-09-gw-001; its gateways are dma-01-gw-001, ...
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pickle
import signal
import subprocess
import sys
from dataclasses import dataclass
from types import TracebackType
from typing import IO, Any, Self

import numpy as np

from simulators.block import ReadingBlock

_READY, _ERROR, _BLOCK, _END = "ready", "error", "block", "end"


@dataclass(frozen=True)
class FeedOptions:
    """The simulated fleet and run; the gateway whose blocks are wanted."""

    gateway_id: str
    meters: int = 2000
    districts: int | None = None
    meters_per_gateway: int = 500
    days: float = 1.0
    seed: int = 0
    speed: float | None = None

    def argv(self) -> list[str]:
        """The child's command-line arguments."""
        args = ["--gateway", self.gateway_id, "--meters", str(self.meters),
                "--meters-per-gateway", str(self.meters_per_gateway), "--days", repr(self.days),
                "--seed", str(self.seed)]
        if self.districts is not None:
            args += ["--districts", str(self.districts)]
        if self.speed is not None:
            args += ["--speed", repr(self.speed)]
        return args


class BlockFeed:
    """Iterate over one gateway's blocks from a simulator child process; :meth:`close` it."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self._process = process
        self._done = False
        self._ended = False  # the child sent the end of the run

    @classmethod
    def start(cls, options: FeedOptions) -> BlockFeed:
        """Start the child and wait until it has built the fleet.

        Raises:
            ValueError: the options are invalid or the fleet has no such gateway.
            RuntimeError: the child failed to start.

        """
        process = subprocess.Popen(
            [sys.executable, "-m", "simulators.feed", *options.argv()],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        )
        feed = cls(process)
        kind, value = feed._frame()
        if kind != _READY:
            feed.close()
            if kind == _ERROR:
                raise ValueError(value)
            msg = f"the simulator process did not start (exit code {process.poll()})"
            raise RuntimeError(msg)
        return feed

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> ReadingBlock:
        if self._done:
            raise StopIteration
        kind, value = self._frame()
        if kind == _BLOCK:
            block: ReadingBlock = value
            return block
        self._done = True
        if kind == _END:
            self._ended = True
            raise StopIteration
        msg = (f"the simulator process stopped before the end of the run (exit code"
               f" {self._process.wait()}); see its error output above")
        raise RuntimeError(msg)

    def close(self) -> int:
        """Stop the child (unless it sent the whole run) and return its exit code."""
        assert self._process.stdout is not None
        self._process.stdout.close()
        if not self._ended and self._process.poll() is None:
            self._process.terminate()
        try:
            return self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            return self._process.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _frame(self) -> tuple[str, Any]:
        assert self._process.stdout is not None
        try:
            frame: tuple[str, Any] = pickle.load(self._process.stdout)  # our own child
        except EOFError:
            return "eof", None
        return frame


def _compact(block: ReadingBlock) -> ReadingBlock:
    """The block with an id table of only its own devices (the fleet's table is shared)."""
    used, index = np.unique(block.device_index, return_inverse=True)
    return dataclasses.replace(block, id_table=block.id_table[used],
                               device_index=index.astype(np.int32))


def _send(out: IO[bytes], kind: str, value: Any) -> None:
    pickle.dump((kind, value), out, protocol=pickle.HIGHEST_PROTOCOL)
    out.flush()


def main(argv: list[str] | None = None) -> int:
    """The child: simulate, send one gateway's blocks to stdout; returns the exit code."""
    from simulators import FleetConfig, FleetSimulator, SimConfig

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the reader stops us
    parser = argparse.ArgumentParser(prog="python -m simulators.feed", description=__doc__)
    parser.add_argument("--gateway", required=True)
    parser.add_argument("--meters", type=int, required=True)
    parser.add_argument("--districts", type=int, default=None)
    parser.add_argument("--meters-per-gateway", type=int, required=True)
    parser.add_argument("--days", type=float, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--speed", type=float, default=None)
    args = parser.parse_args(argv)
    out = sys.stdout.buffer
    try:
        try:
            config = SimConfig(fleet=FleetConfig(meters=args.meters, districts=args.districts,
                                                 meters_per_gateway=args.meters_per_gateway),
                               days=args.days, seed=args.seed, speed=args.speed)
            config.validate()
            simulator = FleetSimulator(config)
            gateways = simulator.fleet.gateway_ids.tolist()
            if args.gateway not in set(gateways):
                msg = (f"the simulated fleet has no gateway {args.gateway}; its gateways are"
                       f" {', '.join(gateways[:6])}, ...")
                raise ValueError(msg)
        except ValueError as exc:
            _send(out, _ERROR, str(exc))
            return 2
        _send(out, _READY, None)
        for block in simulator:
            if block.gateway_id == args.gateway:
                _send(out, _BLOCK, _compact(block))
        _send(out, _END, None)
    except BrokenPipeError:  # the reader went away: nobody wants the rest
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())  # no flush error at exit
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
