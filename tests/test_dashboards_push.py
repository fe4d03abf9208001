"""``meshwatch dashboards push`` against a local HTTP double of Grafana's API.

No Grafana server can be installed here, so this checks the *request shape* that
grafana-client sends (paths, methods, bearer token, bodies) and the idempotence logic,
against a small real HTTP server that keeps folders, data sources and dashboards in memory
the way Grafana answers for them (404 when missing, ``id``/``version`` added on save, the
token never returned). It does not prove that a real Grafana accepts the dashboards.
"""

from __future__ import annotations

import copy
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from dashboards.boards import all_dashboards
from dashboards.provisioning import DatasourceSettings
from dashboards.push import push
from meshwatch.cli import main

TOKEN = "glsa_test_token"


@dataclass
class FakeGrafana:
    """State and request log of the double."""

    folders: dict[str, dict[str, Any]] = field(default_factory=dict)
    datasources: dict[str, dict[str, Any]] = field(default_factory=dict)
    dashboards: dict[str, dict[str, Any]] = field(default_factory=dict)  # uid -> {dashboard, meta}
    requests: list[tuple[str, str, str | None, Any]] = field(default_factory=list)
    url: str = ""

    def writes(self) -> list[tuple[str, str, Any]]:
        return [(m, p, b) for m, p, _, b in self.requests if m != "GET"]


def _handler(state: FakeGrafana) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _answer(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _route(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            auth = self.headers.get("Authorization")
            state.requests.append((method, self.path, auth, body))
            if auth != f"Bearer {TOKEN}":
                self._answer(401, {"message": "invalid API key"})
                return
            path = self.path.split("?")[0]
            if (found := re.fullmatch(r"/api/folders/([\w-]+)", path)) and method == "GET":
                folder = state.folders.get(found.group(1))
                self._answer(200, folder) if folder else self._answer(
                    404, {"message": "folder not found"})
            elif path == "/api/folders" and method == "POST":
                state.folders[body["uid"]] = {"uid": body["uid"], "title": body["title"],
                                              "id": len(state.folders) + 1}
                self._answer(200, state.folders[body["uid"]])
            elif (found := re.fullmatch(r"/api/folders/([\w-]+)", path)) and method == "PUT":
                state.folders[found.group(1)]["title"] = body["title"]
                self._answer(200, state.folders[found.group(1)])
            elif (found := re.fullmatch(r"/api/datasources/uid/([\w-]+)", path)):
                uid = found.group(1)
                if method == "GET":
                    source = state.datasources.get(uid)
                    self._answer(200, source) if source else self._answer(
                        404, {"message": "Data source not found"})
                else:  # PUT
                    state.datasources[uid] = _stored_datasource(body)
                    self._answer(200, {"message": "Datasource updated"})
            elif path == "/api/datasources" and method == "POST":
                state.datasources[body["uid"]] = _stored_datasource(body)
                self._answer(200, {"message": "Datasource added", "id": 1})
            elif (found := re.fullmatch(r"/api/dashboards/uid/([\w-]+)", path)):
                saved = state.dashboards.get(found.group(1))
                self._answer(200, saved) if saved else self._answer(
                    404, {"message": "Dashboard not found"})
            elif path == "/api/dashboards/db" and method == "POST":
                board = copy.deepcopy(body["dashboard"])
                old = state.dashboards.get(board["uid"])
                board["id"] = old["dashboard"]["id"] if old else len(state.dashboards) + 1
                board["version"] = old["dashboard"]["version"] + 1 if old else 1
                state.dashboards[board["uid"]] = {
                    "dashboard": board, "meta": {"folderUid": body.get("folderUid", "")}}
                self._answer(200, {"id": board["id"], "uid": board["uid"],
                                   "status": "success", "version": board["version"]})
            else:
                self._answer(404, {"message": "Not found"})

        def do_GET(self) -> None:
            self._route("GET")

        def do_POST(self) -> None:
            self._route("POST")

        def do_PUT(self) -> None:
            self._route("PUT")

    return Handler


def _stored_datasource(body: dict[str, Any]) -> dict[str, Any]:
    """What Grafana returns for a data source: no secrets, a few keys of its own."""
    stored = {k: v for k, v in body.items() if k != "secureJsonData"}
    stored["jsonData"] = dict(body.get("jsonData", {}), keepCookies=[])
    stored |= {"id": 1, "orgId": 1, "readOnly": False,
               "secureJsonFields": dict.fromkeys(body.get("secureJsonData", {}), True)}
    return stored


@pytest.fixture
def grafana() -> Iterator[FakeGrafana]:
    state = FakeGrafana()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()
    server.server_close()


SETTINGS = DatasourceSettings("http://influxdb:8086", "meshwatch", "MESHWATCH_INFLUXDB__TOKEN")


def test_first_push_creates_everything_with_the_right_requests(grafana: FakeGrafana) -> None:
    boards = all_dashboards()
    changes = push(grafana.url, TOKEN, boards, datasource_settings=SETTINGS)
    assert [(c.kind, c.action) for c in changes] == [
        ("folder", "created"), ("datasource", "created")] + [("dashboard", "created")] * 6
    assert all(auth == f"Bearer {TOKEN}" for _, _, auth, _ in grafana.requests)
    writes = grafana.writes()
    assert writes[0] == ("POST", "/api/folders", {"title": "Meshwatch", "uid": "meshwatch"})
    method, path, source = writes[1]
    assert (method, path) == ("POST", "/api/datasources")
    assert source["uid"] == "meshwatch-influxdb"
    assert source["type"] == "influxdb"
    assert source["url"] == "http://influxdb:8086"
    assert source["jsonData"]["dbName"] == "meshwatch"
    assert source["secureJsonData"] == {
        "httpHeaderValue1": "Token ${MESHWATCH_INFLUXDB__TOKEN}"}
    saved = writes[2:]
    assert [(m, p) for m, p, _ in saved] == [("POST", "/api/dashboards/db")] * 6
    for (_, _, body), board in zip(saved, boards, strict=True):
        assert body["folderUid"] == "meshwatch"
        assert body["overwrite"] is True
        assert body["dashboard"]["id"] is None
        assert "version" not in body["dashboard"]
        assert {k: v for k, v in body["dashboard"].items() if k != "id"} == {
            k: v for k, v in board.items() if k != "version"}
    assert set(grafana.dashboards) == {b["uid"] for b in boards}


def test_second_push_changes_nothing_and_writes_nothing(grafana: FakeGrafana) -> None:
    boards = all_dashboards()
    push(grafana.url, TOKEN, boards, datasource_settings=SETTINGS)
    grafana.requests.clear()
    changes = push(grafana.url, TOKEN, boards, datasource_settings=SETTINGS)
    assert {c.action for c in changes} == {"unchanged"}
    assert grafana.writes() == []
    assert len(grafana.requests) == 8  # one GET per object


def test_push_repairs_only_what_drifted(grafana: FakeGrafana) -> None:
    boards = all_dashboards()
    push(grafana.url, TOKEN, boards, datasource_settings=SETTINGS)
    grafana.dashboards["mw-device"]["dashboard"]["title"] = "edited in the UI"
    grafana.dashboards["mw-kpis"]["meta"]["folderUid"] = "somewhere-else"
    grafana.datasources["meshwatch-influxdb"]["url"] = "http://old:8086"
    grafana.folders["meshwatch"]["title"] = "Renamed"
    grafana.requests.clear()
    changes = push(grafana.url, TOKEN, boards, datasource_settings=SETTINGS)
    changed = {(c.kind, c.uid): c.action for c in changes if c.action != "unchanged"}
    assert changed == {("folder", "meshwatch"): "updated",
                       ("datasource", "meshwatch-influxdb"): "updated",
                       ("dashboard", "mw-device"): "updated",
                       ("dashboard", "mw-kpis"): "updated"}
    assert [(m, p) for m, p, _ in grafana.writes()] == [
        ("PUT", "/api/folders/meshwatch"), ("PUT", "/api/datasources/uid/meshwatch-influxdb"),
        ("POST", "/api/dashboards/db"), ("POST", "/api/dashboards/db")]
    assert grafana.dashboards["mw-device"]["dashboard"]["title"] == "Meshwatch / Device"
    assert grafana.dashboards["mw-device"]["dashboard"]["version"] == 2
    assert grafana.dashboards["mw-kpis"]["meta"]["folderUid"] == "meshwatch"


def test_push_without_influx_url_leaves_the_datasource_alone(grafana: FakeGrafana,
                                                             capsys: Any) -> None:
    code = main(["dashboards", "push", "--grafana-url", grafana.url, "--token", TOKEN])
    assert code == 0
    assert grafana.datasources == {}
    out = capsys.readouterr().out
    assert "created" in out
    assert "mw-pipeline" in out
    assert "7 of 7 objects changed" in out
    assert main(["dashboards", "push", "--grafana-url", grafana.url, "--token", TOKEN]) == 0
    assert "0 of 7 objects changed" in capsys.readouterr().out


def test_push_reports_refusals_and_unreachable_grafana(grafana: FakeGrafana,
                                                       capsys: Any) -> None:
    assert main(["dashboards", "push", "--grafana-url", grafana.url, "--token", "wrong"]) == 1
    assert "401" in capsys.readouterr().out
    assert grafana.writes() == []
    assert grafana.dashboards == {}
    dead = grafana.url.rsplit(":", 1)[0] + ":9"  # discard port: nothing listens
    assert main(["dashboards", "push", "--grafana-url", dead, "--token", TOKEN,
                 "--timeout", "2"]) == 1
    assert "cannot reach Grafana" in capsys.readouterr().out
