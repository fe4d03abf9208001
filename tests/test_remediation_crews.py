"""The crew simulator against a running remediation service: outcomes follow ground truth."""

from __future__ import annotations

import time
from pathlib import Path

from remediation_support import T0, TOKENS, alert, service_config
from servers import Mosquitto, free_port

from remediation.command import Service
from remediation.store import Incoming
from simulators.crews import CrewSimulator, TruthEpisode, load_truth


def test_crews_confirm_real_leaks_and_dismiss_the_rest(tmp_path: Path,
                                                       mosquitto: Mosquitto) -> None:
    truth_file = tmp_path / "ground_truth.csv"
    truth_file.write_text(
        "incident_id,device_id,district,kind,start_ms,end_ms,start,end,magnitude,unit,detail\n"
        f"inc-0000001,mtr-1,dma-01,customer_leak,{T0 - 3600_000},{T0 + 86_400_000},,,"
        "40,lph,\n"
        f"inc-0000002,,dma-02,burst,{T0},{T0 + 7200_000},,,900,lph,\n"
        f"inc-0000003,mtr-3,dma-01,stuck,{T0},{T0 + 7200_000},,,0,lpm,\n")
    truth = load_truth(truth_file)
    assert truth[1] == TruthEpisode(None, "dma-02", "burst", T0, T0 + 7200_000)
    config = service_config(tmp_path, f"sqlite:///{tmp_path / 'r.db'}", mosquitto.url,
                            free_port())
    service = Service(config).start()
    try:
        service.store.ingest([Incoming(alert=a) for a in (
            alert("leak", device_id="mtr-1"),
            alert("burst", district="dma-02", kind="burst", severity="major"),
            alert("stuck", device_id="mtr-3", kind="sensor_fault"),
            alert("nothing", device_id="mtr-2", ts=T0 + 60_000))])
        sim = CrewSimulator(f"http://127.0.0.1:{config.remediation.http_port}",
                            {"crew-a": TOKENS["crew-a"], "crew-b": TOKENS["crew-b"]}, truth,
                            speed=100_000.0, seed=3)
        deadline = time.monotonic() + 20
        while len(sim.done) < 4 and time.monotonic() < deadline:
            sim.step()
            time.sleep(0.02)
        outcomes = {service.store.work_order(w)["device_id"]: o for w, o in sim.done.items()}
        assert outcomes == {"mtr-1": "confirmed_leak", None: "confirmed_burst",
                            "mtr-3": "meter_fault", "mtr-2": "false_alarm"}
        states = sorted(wo["state"] for wo in service.store.list_work_orders()[1])
        assert states == ["false_alarm", "resolved", "resolved", "resolved"]
    finally:
        service.stop()
