"""Real servers for integration tests: mosquitto, VictoriaMetrics, influxd 1.x, PostgreSQL.

Each controller runs one server process on a free loopback port with its data in a temporary
directory, waits until the server really answers, and stops it without leaving processes
behind. ``restart()`` keeps the port and the data, so persistence can be tested; ``kill()``
sends SIGKILL, for crash tests. Nothing here depends on pytest: ``conftest.py`` wraps these
classes in fixtures.

A missing binary raises :class:`MissingBinaryError` naming the Debian package to install; the
test set-up installs servers, tests never skip for want of one.

Example (runs a real broker):

>>> import tempfile
>>> with tempfile.TemporaryDirectory() as base, Mosquitto(base) as broker:
...     broker.url == f"mqtt://127.0.0.1:{broker.port}"
True
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, LiteralString, Self

__all__ = [
    "InfluxDB1",
    "MissingBinaryError",
    "Mosquitto",
    "PostgreSQL",
    "Server",
    "ServerError",
    "VictoriaMetrics",
    "free_port",
]

LOOPBACK = "127.0.0.1"


class ServerError(RuntimeError):
    """A test server failed to start, answer or stop; the message carries its log tail."""


class MissingBinaryError(ServerError):
    """The server's executable is not installed; the message names the Debian package."""


_ISSUED_PORTS: set[int] = set()


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now and was not returned before.

    The port is released before returning, so another process could take it in between; the
    controllers notice this because their readiness check talks the server's own protocol.
    The kernel may hand the same ephemeral port out twice in a row (two listeners of one
    server then clash), so a port is never returned twice by this process.

    >>> a, b = free_port(), free_port()
    >>> 1024 <= a <= 65535 and a != b
    True
    """
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((LOOPBACK, 0))
            port = int(sock.getsockname()[1])
        if port not in _ISSUED_PORTS:
            _ISSUED_PORTS.add(port)
            return port


def _http(
    method: str, url: str, *, data: bytes | None = None, timeout: float = 10.0
) -> tuple[int, bytes]:
    """Make one HTTP request; return (status, body) even for 4xx/5xx answers."""
    request = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())


def _http_ok(url: str, predicate: Callable[[int, bytes], bool]) -> bool:
    """Return whether a GET on ``url`` answers and its (status, body) satisfies ``predicate``."""
    try:
        status, body = _http("GET", url, timeout=1.0)
    except OSError:  # refused, reset, timed out: not up yet
        return False
    return predicate(status, body)


def _influx_ident(name: str) -> str:
    """Quote an InfluxQL identifier."""
    escaped = name.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


_LIVE: set[Server] = set()  # started and not yet closed: cleaned up at exit


@atexit.register
def _kill_leftovers() -> None:
    """Last resort if a test run dies without tearing its servers down."""
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.close(kill=True)


class Server:
    """Base class: one server process, its port, data directory and log file.

    Subclasses set the class attributes and implement ``_command()`` and ``_is_ready()``, and
    may override ``_prepare()`` (runs once, before the first start: write the config, initdb).

    Args:
        base_dir: where to create this server's directory (config, log, data). pytest's
            ``tmp_path_factory.mktemp(...)`` is a good choice.
        binary: path or name of the executable, to override the default (e.g. another version).
        ready_timeout: seconds to wait for the server to answer after starting.
        stop_timeout: seconds to wait after the stop signal before sending SIGKILL.

    Raises:
        MissingBinaryError: the executable does not exist; install the named Debian package.
    """

    name: ClassVar[str] = "server"
    default_binary: ClassVar[str] = ""
    debian_package: ClassVar[str] = ""
    stop_signal: ClassVar[signal.Signals] = signal.SIGTERM

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        *,
        binary: str | os.PathLike[str] | None = None,
        ready_timeout: float = 30.0,
        stop_timeout: float = 15.0,
    ) -> None:
        self.binary = self._find_binary(binary or self.default_binary, search_path=not binary)
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self._dir = Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir=base_dir))
        self._port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self._prepared = False

    # -- public API --------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The TCP port the server listens on (on 127.0.0.1); stable across restarts."""
        return self._port

    @property
    def host(self) -> str:
        """The address the server listens on: always ``127.0.0.1``."""
        return LOOPBACK

    @property
    def data_dir(self) -> Path:
        """Where the server keeps its data; survives ``stop()`` and ``restart()``."""
        return self._dir / "data"

    @property
    def log_path(self) -> Path:
        """The server's stdout and stderr, appended to across restarts."""
        return self._dir / f"{self.name}.log"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs, else None."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self) -> bool:
        """Whether the server process is alive (not whether it answers)."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Self:
        """Start the server and wait until it answers.

        Raises:
            ServerError: already running, exited early, or not ready within ``ready_timeout``.
        """
        if self.running:
            msg = f"{self.name} is already running (pid {self.pid}); call stop() first"
            raise ServerError(msg)
        if not self._prepared:
            self._prepare()
            self._prepared = True
        command = self._command()
        with self.log_path.open("ab") as log:
            log.write(f"\n=== start: {' '.join(command)}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: stop() can reap children too
                **self._popen_kwargs(),
            )
        _LIVE.add(self)
        try:
            self._wait_ready()
        except BaseException:
            self.kill()
            raise
        return self

    def stop(self) -> None:
        """Stop the server cleanly (its stop signal, then SIGKILL after ``stop_timeout``).

        Data stays in ``data_dir``; calling stop() on a stopped server does nothing.
        """
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(self.stop_signal)
            try:
                proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                self._append_log(f"=== {self.name} ignored {self.stop_signal.name}; SIGKILL\n")
        self._reap(proc)

    def kill(self) -> None:
        """Kill the server and its children with SIGKILL, like a crash. Data stays."""
        proc = self._proc
        if proc is not None:
            self._reap(proc)

    def restart(self) -> Self:
        """Stop (if running) and start again on the same port with the same data."""
        self.stop()
        return self.start()

    def close(self, *, kill: bool = False) -> None:
        """Stop (or kill) the server and remove any directory it made outside ``base_dir``."""
        if kill:
            self.kill()
        else:
            self.stop()
        _LIVE.discard(self)

    def log_tail(self, lines: int = 30) -> str:
        """Return the last ``lines`` lines of the server's log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log yet)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"<{type(self).__name__} {self.host}:{self.port} {state} data={self.data_dir}>"

    # -- for subclasses ----------------------------------------------------------------------

    def _command(self) -> list[str]:
        """The command line that runs the server in the foreground."""
        raise NotImplementedError

    def _is_ready(self) -> bool:
        """Whether the server answers requests now; must not raise for 'not yet'."""
        raise NotImplementedError

    def _prepare(self) -> None:
        """One-time set-up before the first start (config files, initdb); makes data_dir."""
        self.data_dir.mkdir(parents=True, exist_ok=True)

    def _popen_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments for ``subprocess.Popen`` (user, env, cwd)."""
        return {}

    # -- internals ---------------------------------------------------------------------------

    @classmethod
    def _find_binary(cls, binary: str | os.PathLike[str], *, search_path: bool = False) -> str:
        """Resolve an executable; with ``search_path``, fall back to its name on PATH."""
        text = os.fspath(binary)
        found = text if os.sep in text else shutil.which(text)
        if search_path and found is not None and not os.access(found, os.X_OK):
            found = shutil.which(os.path.basename(text))  # a default path that moved
        if found is None or not os.access(found, os.X_OK) or os.path.isdir(found):
            msg = (
                f"{cls.name}: executable {text!r} not found. Install it with "
                f"`apt-get install {cls.debian_package}` (Debian package {cls.debian_package!r}),"
                f" or pass binary=... pointing at one."
            )
            raise MissingBinaryError(msg)
        return found

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.ready_timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                msg = (
                    f"{self.name} exited with code {code} while starting on port {self.port}."
                    f" Log {self.log_path}:\n{self.log_tail()}"
                )
                raise ServerError(msg)
            if self._is_ready():
                return
            if time.monotonic() > deadline:
                msg = (
                    f"{self.name} did not become ready within {self.ready_timeout:g}s on port"
                    f" {self.port}; raise ready_timeout if the machine is slow."
                    f" Log {self.log_path}:\n{self.log_tail()}"
                )
                raise ServerError(msg)
            time.sleep(0.05)

    def _reap(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL whatever is left of the process group, then collect the exit status."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        self._proc = None

    def _append_log(self, text: str) -> None:
        with self.log_path.open("a") as log:
            log.write(text)


@dataclass(frozen=True)
class Pki:
    """A test PKI: a CA, a server certificate for 127.0.0.1/localhost, and an unrelated CA."""

    ca: Path
    cert: Path
    key: Path
    other_ca: Path


def make_pki(directory: Path) -> Pki:
    """Create a test PKI with the openssl CLI in ``directory`` (2-day certificates)."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    for name in ("test-ca", "other-ca"):
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2",
                "-subj", f"/CN={name}")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "test-ca.crt", "-CAkey", "test-ca.key",
            "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "san.ext")
    return Pki(directory / "test-ca.crt", directory / "server.crt", directory / "server.key",
               directory / "other-ca.crt")


class Mosquitto(Server):
    """Mosquitto MQTT broker with persistence and no QoS1 drop limits.

    Generated config: listener on 127.0.0.1 (free port), anonymous access, persistence in
    ``data_dir`` saved every second (and on clean stop), no in-flight or queue limits (the
    defaults silently drop QoS1 messages for slow consumers), and ``user`` set to the current
    user so a broker started as root can still write its persistence file.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as base, Mosquitto(base) as broker:
    ...     broker.config_path.read_text().count("max_queued_messages 0")
    1
    """

    name = "mosquitto"
    default_binary = "/usr/sbin/mosquitto"
    debian_package = "mosquitto"

    def __init__(self, base_dir: str | os.PathLike[str], *, tls: Pki | None = None,
                 **options: Any) -> None:
        """``tls`` adds a TLS listener (anonymous too) on ``tls_port`` with ``tls.cert``."""
        super().__init__(base_dir, **options)
        self.tls = tls
        self.tls_port = free_port() if tls is not None else None

    @property
    def tls_url(self) -> str:
        """``mqtts://127.0.0.1:TLS_PORT``."""
        if self.tls_port is None:
            msg = "this broker has no TLS listener: pass tls=make_pki(...)"
            raise RuntimeError(msg)
        return f"mqtts://{self.host}:{self.tls_port}"

    @property
    def url(self) -> str:
        """``mqtt://127.0.0.1:PORT``."""
        return f"mqtt://{self.host}:{self.port}"

    @property
    def config_path(self) -> Path:
        """The generated ``mosquitto.conf``."""
        return self._dir / "mosquitto.conf"

    def _prepare(self) -> None:
        super()._prepare()
        user = pwd.getpwuid(os.geteuid()).pw_name
        self.config_path.write_text(
            "\n".join(
                [
                    "per_listener_settings false",
                    f"listener {self.port} {self.host}",
                    *self._tls_listener(),
                    "allow_anonymous true",
                    "persistence true",
                    f"persistence_location {self.data_dir}/",
                    "persistence_file mosquitto.db",
                    "autosave_interval 1",
                    "max_inflight_messages 0",
                    "max_queued_messages 0",
                    "max_queued_bytes 0",
                    "set_tcp_nodelay true",
                    f"user {user}",
                    "log_dest stderr",
                    "log_type error",
                    "log_type warning",
                    "log_type notice",
                    "log_type information",
                    "log_timestamp_format %Y-%m-%dT%H:%M:%S",
                    "",
                ]
            )
        )

    def _tls_listener(self) -> list[str]:
        if self.tls is None:
            return []
        return [f"listener {self.tls_port} {self.host}", f"cafile {self.tls.ca}",
                f"certfile {self.tls.cert}", f"keyfile {self.tls.key}"]

    def _command(self) -> list[str]:
        return [self.binary, "-c", str(self.config_path)]

    # MQTT 3.1.1 CONNECT, clean session, keep-alive 60 s, empty client id; then DISCONNECT.
    _CONNECT = bytes.fromhex("100c00044d5154540402003c0000")
    _DISCONNECT = bytes.fromhex("e000")

    def _is_ready(self) -> bool:
        """Ready once a real MQTT CONNECT is accepted (CONNACK, return code 0)."""
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0) as sock:
                sock.sendall(self._CONNECT)
                connack = sock.recv(4)
                sock.sendall(self._DISCONNECT)
        except OSError:
            return False
        return connack == b"\x20\x02\x00\x00"


class VictoriaMetrics(Server):
    """Single-node VictoriaMetrics, accepting Influx line protocol at ``url``.

    Started with a 100-year retention (so fixed historical timestamps are kept) and
    ``-search.latencyOffset=0s`` plus ``-search.disableCache`` so just-written data is visible
    to queries. After writing, call :meth:`force_flush` (enough for historical timestamps)
    or :meth:`wait_for_samples` (needed for samples stamped "now").
    """

    name = "victoria-metrics"
    default_binary = "/usr/bin/victoria-metrics"
    debian_package = "victoria-metrics"

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``: base URL for /write, /api/v1/..., /health."""
        return f"http://{self.host}:{self.port}"

    def force_flush(self) -> None:
        """Make all ingested samples searchable now (``/internal/force_flush``)."""
        status, body = _http("GET", f"{self.url}/internal/force_flush")
        if status != 200:
            msg = f"victoria-metrics force_flush answered {status}: {body!r}"
            raise ServerError(msg)

    def export(
        self, match: str, *, start: str | int | None = None, end: str | int | None = None
    ) -> list[dict[str, Any]]:
        """Return the series matching a selector via ``/api/v1/export`` (one dict per series).

        Each dict has ``metric`` (name under ``__name__`` plus labels), ``values`` and
        ``timestamps`` (milliseconds). Call :meth:`force_flush` first for fresh writes.
        """
        params: list[tuple[str, str | int]] = [("match[]", match)]
        if start is not None:
            params.append(("start", start))
        if end is not None:
            params.append(("end", end))
        url = f"{self.url}/api/v1/export?{urllib.parse.urlencode(params)}"
        status, body = _http("GET", url)
        if status != 200:
            msg = f"victoria-metrics export of {match!r} answered {status}: {body!r}"
            raise ServerError(msg)
        return [json.loads(line) for line in body.splitlines() if line.strip()]

    def wait_for_samples(
        self, match: str, count: int, *, timeout: float = 10.0
    ) -> list[dict[str, Any]]:
        """Poll :meth:`export` until the matching series hold ``count`` samples; return them.

        Samples stamped near the current time can take about a second after
        :meth:`force_flush` to become searchable (VictoriaMetrics 1.79 updates its per-hour
        index in the background), so tests that write "now" should wait with this.

        Raises:
            ServerError: fewer than ``count`` samples within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        self.force_flush()
        while True:
            series = self.export(match)
            seen = sum(len(s["values"]) for s in series)
            if seen >= count:
                return series
            if time.monotonic() > deadline:
                msg = (
                    f"victoria-metrics holds {seen} of {count} expected samples for {match!r}"
                    f" after {timeout:g}s; check the writer, the metric name"
                    f" (Influx fields become measurement_field) and {self.log_path}"
                )
                raise ServerError(msg)
            time.sleep(0.05)

    def _command(self) -> list[str]:
        return [
            self.binary,
            f"-storageDataPath={self.data_dir}",
            f"-httpListenAddr={self.host}:{self.port}",
            "-retentionPeriod=100y",
            "-search.latencyOffset=0s",
            "-search.disableCache",
            "-http.maxGracefulShutdownDuration=1s",
        ]

    def _is_ready(self) -> bool:
        return _http_ok(f"{self.url}/health", lambda status, body: status == 200)


class InfluxDB1(Server):
    """InfluxDB 1.x (``influxd``) with its HTTP API at ``url``; v1 /write and /query helpers.

    Generated config: meta, data and WAL directories in ``data_dir``, HTTP on 127.0.0.1 (free
    port), the RPC (backup) service on another loopback port, reporting, the ``_internal``
    monitor database, pprof and the query log off.
    """

    name = "influxd"
    default_binary = "/usr/bin/influxd"
    debian_package = "influxdb"

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        *,
        binary: str | os.PathLike[str] | None = None,
        ready_timeout: float = 30.0,
        stop_timeout: float = 15.0,
    ) -> None:
        super().__init__(
            base_dir, binary=binary, ready_timeout=ready_timeout, stop_timeout=stop_timeout
        )
        self.rpc_port = free_port()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``: base URL of the HTTP API."""
        return f"http://{self.host}:{self.port}"

    @property
    def config_path(self) -> Path:
        """The generated ``influxdb.conf``."""
        return self._dir / "influxdb.conf"

    def create_database(self, db: str) -> None:
        """Create database ``db`` (no error if it exists)."""
        self._post_query(f"CREATE DATABASE {_influx_ident(db)}")

    def drop_database(self, db: str) -> None:
        """Drop database ``db`` (no error if it does not exist)."""
        self._post_query(f"DROP DATABASE {_influx_ident(db)}")

    def write(self, db: str, line_protocol: str | Iterable[str], *, precision: str = "ns") -> None:
        """Write line protocol to ``db`` through the v1 ``/write`` endpoint.

        Args:
            db: database name; create it first with :meth:`create_database`.
            line_protocol: one string (lines separated by newlines) or an iterable of lines.
            precision: timestamp unit of the lines: ``ns``, ``u``, ``ms``, ``s``, ``m``, ``h``.

        Raises:
            ServerError: influxd refused the write; the message has its reason.
        """
        text = line_protocol if isinstance(line_protocol, str) else "\n".join(line_protocol)
        query = urllib.parse.urlencode({"db": db, "precision": precision})
        status, body = _http("POST", f"{self.url}/write?{query}", data=text.encode())
        if status != 204:
            msg = f"influxd refused the write to {db!r} ({status}): {body.decode(errors='replace')}"
            raise ServerError(msg)

    def query(self, db: str, influxql: str, *, epoch: str | None = None) -> dict[str, Any]:
        """Run InfluxQL on ``db`` through ``/query`` and return the parsed JSON answer.

        Args:
            db: database name.
            influxql: one or more statements separated by ``;``.
            epoch: ``ns``, ``u``, ``ms``, ``s``, ``m`` or ``h`` for integer times; None for
                RFC3339 strings.

        Raises:
            ServerError: the request or any statement failed.
        """
        return self._post_query(influxql, db=db, epoch=epoch)

    def _post_query(
        self, q: str, *, db: str | None = None, epoch: str | None = None
    ) -> dict[str, Any]:
        form = {"q": q} | ({"db": db} if db else {}) | ({"epoch": epoch} if epoch else {})
        status, body = _http(
            "POST", f"{self.url}/query", data=urllib.parse.urlencode(form).encode()
        )
        try:
            answer: Any = json.loads(body)
        except ValueError:
            answer = None
        errors = []
        if isinstance(answer, dict):
            errors = [answer["error"]] if "error" in answer else []
            errors += [r["error"] for r in answer.get("results", []) if "error" in r]
        if status != 200 or errors or not isinstance(answer, dict):
            msg = f"influxd query {q!r} failed ({status}): {errors or body!r}"
            raise ServerError(msg)
        return dict(answer)

    def _prepare(self) -> None:
        super()._prepare()
        data = self.data_dir
        self.config_path.write_text(
            f"""\
reporting-disabled = true
bind-address = "{self.host}:{self.rpc_port}"

[meta]
  dir = "{data}/meta"
  logging-enabled = false

[data]
  dir = "{data}/data"
  wal-dir = "{data}/wal"
  query-log-enabled = false

[monitor]
  store-enabled = false

[subscriber]
  enabled = false

[http]
  enabled = true
  bind-address = "{self.host}:{self.port}"
  auth-enabled = false
  log-enabled = false
  pprof-enabled = false

[ifql]
  enabled = false

[logging]
  suppress-logo = true
"""
        )

    def _command(self) -> list[str]:
        return [self.binary, "run", "-config", str(self.config_path)]

    def _is_ready(self) -> bool:
        return _http_ok(f"{self.url}/ping", lambda status, body: status == 204)


class PostgreSQL(Server):
    """PostgreSQL cluster (initdb on first start) with trust auth on 127.0.0.1.

    PostgreSQL refuses to run as root, so when we are root the cluster is owned by and run as
    the ``postgres`` system user, in a private directory under the system temp dir (pytest's
    temp dirs are 0700 root, which postgres cannot enter); :meth:`close` removes it. The log
    and everything else stay under ``base_dir``. Durability settings are for tests:
    ``fsync=off`` (safe against process crashes, not power loss).

    Args:
        binary: the ``postgres`` executable; ``initdb`` and ``pg_isready`` are taken from the
            same directory.
        system_user: who runs the server when we are root.
    """

    name = "postgres"
    default_binary = "/usr/lib/postgresql/15/bin/postgres"
    debian_package = "postgresql-15"
    stop_signal = signal.SIGINT  # "fast" shutdown; SIGTERM would wait for clients to leave

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        *,
        binary: str | os.PathLike[str] | None = None,
        ready_timeout: float = 60.0,
        stop_timeout: float = 15.0,
        system_user: str = "postgres",
    ) -> None:
        super().__init__(
            base_dir, binary=binary, ready_timeout=ready_timeout, stop_timeout=stop_timeout
        )
        bin_dir = Path(self.binary).parent
        self.initdb = self._find_binary(bin_dir / "initdb")
        self.pg_isready = self._find_binary(bin_dir / "pg_isready")
        self._user: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            try:
                self._user = pwd.getpwnam(system_user)
            except KeyError:
                msg = (
                    f"postgres refuses to run as root and there is no {system_user!r} user;"
                    f" install the Debian package {self.debian_package!r} (it creates the user)"
                    f" or pass system_user=..."
                )
                raise ServerError(msg) from None
        self._owned_dir = Path(tempfile.mkdtemp(prefix="meshwatch-pg-"))
        if self._user is not None:
            os.chown(self._owned_dir, self._user.pw_uid, self._user.pw_gid)

    @property
    def data_dir(self) -> Path:
        """The cluster directory (PGDATA), under the system temp dir."""
        return self._owned_dir / "data"

    @property
    def socket_dir(self) -> Path:
        """Directory of the server's unix socket (``unix_socket_directories``)."""
        return self._owned_dir / "run"

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the ``postgres`` database, via psycopg 3."""
        return self.database_url("postgres")

    def database_url(self, database: str) -> str:
        """SQLAlchemy URL of ``database`` on this server, via psycopg 3."""
        return f"postgresql+psycopg://postgres@{self.host}:{self.port}/{database}"

    @property
    def conninfo(self) -> str:
        """libpq connection string of the ``postgres`` database, for psycopg or psql."""
        return f"host={self.host} port={self.port} user=postgres dbname=postgres"

    def create_database(self, database: str) -> str:
        """Create ``database`` and return its SQLAlchemy URL."""
        self._admin("CREATE DATABASE {}", database)
        return self.database_url(database)

    def drop_database(self, database: str) -> None:
        """Drop ``database`` if it exists, disconnecting its sessions first."""
        self._admin("DROP DATABASE IF EXISTS {} WITH (FORCE)", database)

    def _admin(self, template: LiteralString, database: str) -> None:
        """Run one statement about a database name, in autocommit, as ``postgres``."""
        import psycopg  # only PostgreSQL users need it
        from psycopg import sql

        statement = sql.SQL(template).format(sql.Identifier(database))
        with psycopg.connect(self.conninfo, autocommit=True, connect_timeout=10) as conn:
            conn.execute(statement)

    def close(self, *, kill: bool = False) -> None:
        """Stop (or kill) the server and delete the cluster directory."""
        super().close(kill=kill)
        shutil.rmtree(self._owned_dir, ignore_errors=True)

    def _popen_kwargs(self) -> dict[str, Any]:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"}
        if self._user is None:
            return {"env": env | {"HOME": str(Path.home())}}
        return {
            "user": self._user.pw_uid,
            "group": self._user.pw_gid,
            "extra_groups": [],
            "env": env | {"HOME": self._user.pw_dir, "USER": self._user.pw_name},
            "cwd": self._owned_dir,
        }

    def _prepare(self) -> None:
        # initdb creates data_dir itself, owned by the user it runs as.
        self.socket_dir.mkdir(mode=0o700, exist_ok=True)
        if self._user is not None:
            os.chown(self.socket_dir, self._user.pw_uid, self._user.pw_gid)
        command = [
            self.initdb,
            "-D", str(self.data_dir),
            "-U", "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-locale",
            "--no-sync",
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            log.write(f"=== initdb: {' '.join(command)}\n".encode())
            log.flush()
            result = subprocess.run(
                command, stdout=log, stderr=subprocess.STDOUT, check=False, **self._popen_kwargs()
            )
        if result.returncode != 0:
            msg = f"initdb failed with code {result.returncode}. Log {self.log_path}:\n"
            raise ServerError(msg + self.log_tail())

    def _command(self) -> list[str]:
        settings: Sequence[str] = [
            f"listen_addresses={self.host}",
            f"port={self.port}",
            f"unix_socket_directories={self.socket_dir}",
            "fsync=off",
            "full_page_writes=off",
            "max_connections=100",
            "shared_buffers=32MB",
            "log_min_messages=warning",
        ]
        return [self.binary, "-D", str(self.data_dir)] + [
            arg for setting in settings for arg in ("-c", setting)
        ]

    def _is_ready(self) -> bool:
        """Ready once ``pg_isready`` says the server accepts connections (exit code 0)."""
        result = subprocess.run(
            [self.pg_isready, "-q", "-h", self.host, "-p", str(self.port), "-U", "postgres"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
            timeout=10,
        )
        return result.returncode == 0
