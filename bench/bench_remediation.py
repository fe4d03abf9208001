"""Remediation intake: alerts/s sustained, and latency from alert to work order.

Run: python bench/bench_remediation.py [--rate 1000] [--seconds 10] [--db both|sqlite|postgres]

A real mosquitto and the real service (:class:`remediation.command.Service`: intake, outbox
sender, SLA timer, HTTP server) on SQLite (WAL) or on a real PostgreSQL. A paho publisher
sends alerts at QoS1 at a fixed rate, each for its own customer meter in one of 50 districts,
so every alert opens an incident, a work order, its assignment and a crew notification (the
heaviest path). Latency is the work order's ``created_ms`` minus the wall time the alert was
published. A second phase publishes a backlog while the service is stopped and measures how
fast it drains on start (the ceiling), and the CPU time that costs per alert: of this process
(the service alone then: the publisher is done) and of the PostgreSQL server's processes.
CPU per alert moves much less than alerts/s when other work loads the machine.
``--db both`` (the default) runs SQLite, then PostgreSQL, in one invocation and prints one
table, with the date and the load average before and after each back-end (the machine is
shared: figures are only comparable side by side).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from servers import Mosquitto, PostgreSQL, free_port
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from meshwatch.config import Config
from meshwatch.contract import Alert, encode, topics
from remediation.command import Service
from remediation.db import AlertRow, WorkOrderRow

T0 = 1_767_225_600_000


def alerts(prefix: str, n: int) -> list[tuple[str, str, bytes]]:
    out = []
    for i in range(n):
        district = f"dma-{i % 50:02d}"
        a = Alert(alert_id=f"{prefix}-{i}", district=district, device_id=f"{prefix}-m{i}",
                  kind="leak", severity="minor", score=0.9, est_loss_lph=40.0,
                  first_ts_ms=T0 + i, last_ts_ms=T0 + i, model_version="bench")
        out.append((a.alert_id, topics.alerts(district, "leak"), encode(a)))
    return out


def config(db_url: str, broker: Mosquitto) -> Config:
    crews = [{"crew_id": f"crew-{c}", "districts": [f"dma-{d:02d}" for d in range(c, 50, 5)],
              "capacity": 1000} for c in range(5)]
    return Config(database={"url": db_url}, mesh_broker={"url": broker.url},
                  remediation={"http_port": free_port(), "batch_max": 500, "crews": crews})


def stored(service: Service) -> int:
    with Session(service.store.reader) as session:
        return int(session.scalar(select(func.count()).select_from(AlertRow)) or 0)


def created(service: Service, prefix: str) -> dict[str, int]:
    with Session(service.store.reader) as session:
        rows = session.execute(select(AlertRow.alert_id, WorkOrderRow.created_ms).join(
            WorkOrderRow, WorkOrderRow.incident_id == AlertRow.incident_id)
            .where(AlertRow.alert_id.like(f"{prefix}-%")))
        return {a: int(ms) for a, ms in rows}


def sustained(service: Service, broker: Mosquitto, rate: float, seconds: float) -> dict:
    messages = alerts("s", int(rate * seconds))
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(2000)
    client.connect(broker.host, broker.port)
    client.loop_start()
    sent_ms: dict[str, int] = {}
    start = time.monotonic()
    for i, (alert_id, topic, payload) in enumerate(messages):
        due = start + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        sent_ms[alert_id] = int(time.time() * 1000)
        client.publish(topic, payload, qos=1)
    publish_s = time.monotonic() - start
    deadline = time.monotonic() + 120
    while stored(service) < len(messages) and time.monotonic() < deadline:
        time.sleep(0.1)
    done_s = time.monotonic() - start
    client.loop_stop()
    client.disconnect()
    made = created(service, "s")
    latency = sorted(made[a] - sent_ms[a] for a in made)
    return {"alerts": len(messages), "work_orders": len(made), "publish_s": publish_s,
            "done_s": done_s, "rate": len(made) / done_s,
            "p50_ms": statistics.median(latency),
            "p99_ms": latency[int(len(latency) * 0.99) - 1], "max_ms": latency[-1]}


def tree_cpu_s(root: int | None) -> float:
    """User + system CPU seconds of process ``root`` and its descendants (0 for None)."""
    if root is None:
        return 0.0
    stats: dict[int, tuple[int, int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        stats[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    tree = {root}
    while grown := {pid for pid, (ppid, _) in stats.items() if ppid in tree} - tree:
        tree |= grown
    return sum(stats[pid][1] for pid in tree if pid in stats) / os.sysconf("SC_CLK_TCK")


def backlog(cfg: Config, broker: Mosquitto, n: int, db_pid: int | None) -> dict:
    service = Service(cfg)
    service.start()  # creates the session, then goes away
    time.sleep(1.0)
    service.stop()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(2000)
    client.connect(broker.host, broker.port)
    client.loop_start()
    infos = [client.publish(t, p, qos=1) for _, t, p in alerts("b", n)]
    for info in infos:
        info.wait_for_publish(30)
    client.loop_stop()
    client.disconnect()
    service = Service(cfg)
    before = stored(service)
    start, cpu, db_cpu = time.monotonic(), time.process_time(), tree_cpu_s(db_pid)
    service.start()
    while stored(service) < before + n and time.monotonic() - start < 120:
        time.sleep(0.05)
    elapsed = time.monotonic() - start
    cpu_us = (time.process_time() - cpu) / n * 1e6
    db_us = (tree_cpu_s(db_pid) - db_cpu) / n * 1e6
    service.stop()
    return {"alerts": n, "seconds": elapsed, "rate": n / elapsed, "cpu_us": cpu_us,
            "db_us": db_us}


def run(db: str, rate: float, seconds: float, backlog_n: int) -> list[str]:
    """Both phases on one back-end; returns its table rows."""
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as base, Mosquitto(base) as broker:
        pg = PostgreSQL(base).start() if db == "postgres" else None
        try:
            url = (pg.create_database("bench") if pg is not None
                   else f"sqlite:///{base}/remediation.db")
            cfg = config(url, broker)
            service = Service(cfg).start()
            time.sleep(0.5)
            s = sustained(service, broker, rate, seconds)
            service.stop()
            b = backlog(cfg, broker, backlog_n, None if pg is None else pg.pid)
        finally:
            if pg is not None:
                pg.close()
    load = f"{load_before:.1f} → {os.getloadavg()[0]:.1f}"
    name = "SQLite (WAL)" if db == "sqlite" else "PostgreSQL 15 (same machine)"
    return [f"| {name} | sustained {rate:,.0f}/s for {seconds:.0f} s | {s['alerts']:,} | "
            f"{s['work_orders']:,} | {s['rate']:,.0f} | {s['p50_ms']:,.0f} | "
            f"{s['p99_ms']:,.0f} | {s['max_ms']:,.0f} | | {load} |",
            f"| {name} | backlog drain | {b['alerts']:,} | {b['alerts']:,} | "
            f"{b['rate']:,.0f} | | | | {b['cpu_us']:,.0f} + {b['db_us']:,.0f} | |"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--backlog", type=int, default=10_000)
    parser.add_argument("--db", choices=["both", "sqlite", "postgres"], default="both")
    args = parser.parse_args()
    dbs = ["sqlite", "postgres"] if args.db == "both" else [args.db]
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    rows = [row for db in dbs for row in run(db, args.rate, args.seconds, args.backlog)]
    print(f"## remediation intake, {started}, {os.cpu_count()} CPUs")
    print("| database | phase | alerts | work orders | alerts/s | p50 ms | p99 ms | max ms "
          "| CPU µs/alert (service + DB server) | load avg (1 min) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
