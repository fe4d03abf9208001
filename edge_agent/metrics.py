"""Prometheus metrics of edge agents, read from their counters at scrape time.

Counters live in the agent and its publisher (one source of truth, also sent in heartbeats);
:class:`AgentCollector` turns :meth:`EdgeAgent.stats` into metric families labelled by
gateway, so one process may serve several agents on one ``/metrics`` endpoint.

>>> from prometheus_client import CollectorRegistry, generate_latest
>>> class FakeAgent:  # anything with settings.gateway_id and stats()
...     class settings:
...         gateway_id = "gw-1"
...     def stats(self):
...         return {"readings_in": 5, "queue_depth": 2}
>>> registry = CollectorRegistry()
>>> registry.register(AgentCollector([FakeAgent()]))
>>> text = generate_latest(registry).decode()
>>> 'meshwatch_edge_readings_in_total{gateway="gw-1"} 5.0' in text
True
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from edge_agent.scoring import LATENCY_BUCKETS_S

# stats key -> (metric name without prefix, counter?, help)
METRICS: dict[str, tuple[str, bool, str]] = {
    "readings_in": ("readings_in", True, "Readings accepted by the agent"),
    "messages_out": ("batches_out", True, "Messages (telemetry batches) written to the outbox"),
    "readings_dropped": ("readings_dropped", True, "Readings dropped (full outbox, opt-in)"),
    "waits_for_room": ("outbox_full_waits", True, "Times the input waited for outbox room"),
    "published": ("published", True, "Messages handed to the broker, resends included"),
    "acked": ("acked", True, "Messages acknowledged by the broker"),
    "resent": ("resent", True, "Messages sent again after a reconnect"),
    "rejected": ("rejected", True, "PUBACKs with a failure reason code"),
    "dead_lettered": ("dead_lettered", True, "Messages refused for good, kept aside"),
    "dead_letters": ("input_dead_letters", True, "Input messages that broke the contract"),
    "reconnects": ("reconnects", True, "Successful broker reconnections"),
    "connect_failures": ("connect_failures", True, "Failed broker connection attempts"),
    "connected": ("connected", False, "1 while the broker connection is up"),
    "in_flight": ("in_flight", False, "Messages sent and not yet acknowledged"),
    "queue_depth": ("queue_depth", False, "Messages in the durable outbox"),
    "urgent_queue_depth": ("urgent_queue_depth", False, "Urgent messages (alerts) queued"),
    "urgent_published": ("urgent_published", True, "Urgent messages (alerts) handed to the broker"),
    "queue_bytes": ("queue_bytes", False, "Bytes used by the durable outbox"),
    "oldest_age_s": ("oldest_queued_age_seconds", False, "Age of the oldest queued message"),
    "readings_pending": ("readings_pending", False, "Single readings waiting for a batch"),
    "windows_scored": ("windows_scored", True, "Feature windows scored by the edge model"),
    "edge_alerts": ("alerts", True, "Alerts raised at the edge"),
    "edge_alerts_cleared": ("alerts_cleared", True, "Edge alerts cleared (score fell back)"),
    "late_readings": ("late_readings", True, "Readings too late for their feature window"),
}
PREFIX = "meshwatch_edge_"


class _Settings(Protocol):
    gateway_id: str


class _Latency(Protocol):
    latency_counts: list[int]
    latency_sum_s: float


class StatsSource(Protocol):
    """An agent as the collector sees it."""

    @property
    def settings(self) -> _Settings:
        """The agent's settings (only ``gateway_id`` is read)."""
        ...

    @property
    def scorer(self) -> _Latency | None:
        """The agent's scorer, whose inference latency becomes a histogram."""
        ...

    def stats(self) -> dict[str, int | float]:
        """Current counters and gauges."""
        ...


class AgentCollector(Collector):
    """Expose the stats of agents as Prometheus metrics labelled ``gateway``."""

    def __init__(self, agents: Sequence[StatsSource]) -> None:
        self.agents = agents

    def collect(self) -> Iterator[Metric]:
        """Read every agent's stats now and yield one family per known stat."""
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
        for agent in self.agents:
            for key, value in agent.stats().items():
                if key not in METRICS:
                    continue
                name, counter, help_text = METRICS[key]
                if key not in families:
                    kind = CounterMetricFamily if counter else GaugeMetricFamily
                    families[key] = kind(PREFIX + name, help_text, labels=["gateway"])
                families[key].add_metric([agent.settings.gateway_id], float(value))
        yield from families.values()
        latency = HistogramMetricFamily(
            PREFIX + "inference_latency_seconds", "Edge model call (one batch of windows)",
            labels=["gateway"],
        )
        for agent in self.agents:
            scorer = getattr(agent, "scorer", None)
            if scorer is not None:
                cumulative = list(itertools.accumulate(scorer.latency_counts))
                buckets = [(_bound(b), float(n))
                           for b, n in zip(LATENCY_BUCKETS_S, cumulative, strict=True)]
                latency.add_metric([agent.settings.gateway_id], buckets, scorer.latency_sum_s)
        yield latency


def serve_metrics(
    agents: Iterable[StatsSource], port: int, host: str = "0.0.0.0"
) -> WSGIServer:
    """Serve ``/metrics`` for ``agents`` on ``host:port`` from a daemon thread.

    Returns the server; ``shutdown()`` stops it.
    """
    registry = CollectorRegistry()
    registry.register(AgentCollector(list(agents)))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server


def _bound(seconds: float) -> str:
    return "+Inf" if seconds == float("inf") else repr(seconds)
