"""Line protocol to InfluxDB's v2 write API, retried until it lands: one policy for every writer.

The dataflow's sink, remediation and the bridge's pipeline statistics all write through
:class:`LineWriter`. A request that fails for a reason that may pass (connection refused or
reset, time-out, 5xx, 429, and 401/403/404 while an operator fixes a token or a bucket) is
retried with capped back-off until it lands, or until the caller's ``stop`` event is set
(:class:`Stopping`). A request refused as malformed (400, 422) never passes: it is logged with
the server's answer and returned as an error, for the caller to count or give up.

influxdb-client's own retries are off (they would re-send inside one call with their own
policy); times are epoch milliseconds (``precision=ms``).

>>> writer = LineWriter("http://127.0.0.1:9", token="", org="o", bucket="b", retry_max_s=1)
>>> stop = threading.Event(); stop.set()
>>> writer.write(["m v=1i 0"], stop=stop)
Traceback (most recent call last):
...
meshwatch.tsdb.Stopping: stopped before 1 lines could be written to http://127.0.0.1:9
>>> writer.retries
1
>>> writer.close()
"""

from __future__ import annotations

import logging
import threading
import time

from influxdb_client.client.influxdb_client import InfluxDBClient
from influxdb_client.client.write_api import SYNCHRONOUS
from influxdb_client.rest import ApiException
from urllib3.exceptions import HTTPError

from meshwatch.backoff import Backoff

__all__ = ["LineWriter", "Stopping"]

log = logging.getLogger(__name__)

NEVER_PASSES = frozenset({400, 422})
"""HTTP statuses of a request refused as malformed: sending it again cannot help."""


class Stopping(Exception):
    """The caller's ``stop`` event was set while a write was still being retried."""


class LineWriter:
    """Write lines of line protocol; see the module doc for the retry policy.

    Counters: ``lines`` and ``requests`` written, ``retries``, ``rejected`` (lines refused as
    malformed). ``what`` names the writer in log messages.
    """

    def __init__(self, url: str, *, token: str | None, org: str, bucket: str,
                 timeout_s: float = 10.0, retry_max_s: float = 10.0, what: str = "lines") -> None:
        self.url = url
        self.org = org
        self.bucket = bucket
        self.retry_max_s = retry_max_s
        self.what = what
        self.lines = 0
        self.requests = 0
        self.retries = 0
        self.rejected = 0
        self._client = InfluxDBClient(url=url, token=token or "", org=org,
                                      timeout=int(timeout_s * 1000), retries=0)
        self._write = self._client.write_api(write_options=SYNCHRONOUS)

    def write(self, lines: list[str], stop: threading.Event | None = None) -> str | None:
        """Write ``lines`` in one request, retrying what may pass; the error if refused.

        Returns None once written, or ``"HTTP 400"`` (422) if the server refused the lines as
        malformed. Blocks while the server is unreachable; with ``stop``, raises
        :class:`Stopping` as soon as it is set.
        """
        backoff = Backoff(initial_s=0.1, max_s=self.retry_max_s)
        body = "\n".join(lines)  # one string: the client's per-record serialization is slow
        while True:
            try:
                self._write.write(self.bucket, self.org, record=body,
                                  write_precision="ms")  # type: ignore[arg-type]
            except ApiException as exc:
                if exc.status in NEVER_PASSES:
                    self.rejected += len(lines)
                    log.error("%s refused %d %s for good (HTTP %s): %s", self.url, len(lines),
                              self.what, exc.status, (exc.body or "")[:500])
                    return f"HTTP {exc.status}"
                reason = f"HTTP {exc.status} {exc.reason}"
            except (HTTPError, OSError) as exc:  # refused, reset, timed out
                reason = f"{type(exc).__name__}: {exc}"
            else:
                self.lines += len(lines)
                self.requests += 1
                return None
            self.retries += 1
            delay = backoff.next_delay()
            log.warning("writing %d %s to %s failed (%s); retrying in %.2f s", len(lines),
                        self.what, self.url, reason, delay)
            if stop is None:
                time.sleep(delay)
            elif stop.wait(delay):
                msg = f"stopped before {len(lines)} {self.what} could be written to {self.url}"
                raise Stopping(msg)

    def close(self) -> None:
        """Release the HTTP connections."""
        self._client.close()  # type: ignore[no-untyped-call]
