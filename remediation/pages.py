"""Server-rendered pages: a crew's phone page and the operator's overview.

Plain HTML from Python (no template engine, no build step), one small stylesheet, forms that
post back (no JavaScript is needed; the one script only asks before a false alarm). Every
value is escaped.

- ``/ui/login``: paste a token; it is kept in an HttpOnly, SameSite=Strict cookie.
- ``/ui/crew``: my work orders, most urgent first.
- ``/ui/work-orders/{id}``: details, a sparkline of the flow evidence, a map link from the
  registry's coordinates, and the buttons the life cycle allows (acknowledge, start, resolve
  with an outcome and a note, false alarm).
- ``/ui/operator``: open incidents and the KPIs.

>>> sparkline([1.0, 3.0, 2.0], width=40, height=10)[:61]
'<svg class="spark" width="40" height="10" viewBox="0 0 40 10"'
>>> map_link(52.1, 5.1)
'https://www.openstreetmap.org/?mlat=52.10000&mlon=5.10000#map=17/52.10000/5.10000'
"""

from __future__ import annotations

import html
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, quote

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from remediation import kpi
from remediation.store import NotFoundError, Store

OUTCOMES = ("confirmed_leak", "confirmed_burst", "meter_fault", "no_access", "other")
BUTTONS = {"acknowledged": "Acknowledge", "in_progress": "Start work",
           "false_alarm": "False alarm", "cancelled": "Cancel"}
STYLE = """
body{font-family:system-ui,sans-serif;margin:0;padding:0 12px 40px;max-width:760px}
h1{font-size:1.3em}
header{display:flex;justify-content:space-between;align-items:center}
table{border-collapse:collapse;width:100%}td,th{padding:6px;border-bottom:1px solid #ddd;
text-align:left}.p1{color:#b00;font-weight:bold}.p2{color:#d60}button,select,textarea,input{
font-size:1.1em;padding:10px;margin:4px 0;width:100%}.err{background:#fdd;padding:8px}
.spark polyline{fill:none;stroke:#06c;stroke-width:1.5}.kpi{display:inline-block;
margin:6px 14px 6px 0}.kpi b{display:block;font-size:1.4em}
"""


def _page(title: str, body: str, who: str = "") -> HTMLResponse:
    logout = ('<form method="post" action="/ui/logout"><button id="logout" style="width:auto">'
              'Log out</button></form>') if who else ""
    return HTMLResponse(
        f'<!doctype html><html><head><meta charset="utf-8"><meta name="viewport" '
        f'content="width=device-width,initial-scale=1"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body><header><h1>{html.escape(title)}</h1>"
        f"<span>{html.escape(who)}</span>{logout}</header>{body}</body></html>")


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value))


def _time(ms: int | None) -> str:
    if ms is None:
        return ""
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M UTC")


def sparkline(values: list[float], width: int = 240, height: int = 40) -> str:
    """An inline SVG polyline of ``values``."""
    if len(values) < 2:
        return ""
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    step = width / (len(values) - 1)
    points = " ".join(f"{i * step:.1f},{height - (v - low) / span * height:.1f}"
                      for i, v in enumerate(values))
    return (f'<svg class="spark" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}"><polyline points="{points}"/></svg>')


def map_link(lat: float, lon: float) -> str:
    """An OpenStreetMap link to a point."""
    return (f"https://www.openstreetmap.org/?mlat={lat:.5f}&mlon={lon:.5f}"
            f"#map=17/{lat:.5f}/{lon:.5f}")


def flow_series(alerts: list[dict[str, Any]]) -> tuple[str, list[float]]:
    """The first numeric series in the alerts' evidence, preferring keys about flow.

    >>> flow_series([{"evidence": {"score": 0.9, "flow_lpm": [1, 2, 3.5]}}])
    ('flow_lpm', [1.0, 2.0, 3.5])
    """
    found: list[tuple[str, list[float]]] = []
    for alert in alerts:
        for key, value in (alert.get("evidence") or {}).items():
            if isinstance(value, list) and len(value) >= 2 and all(
                    isinstance(v, int | float) and not isinstance(v, bool) for v in value):
                found.append((key, [float(v) for v in value]))
    found.sort(key=lambda item: "flow" not in item[0])
    return found[0] if found else ("", [])


def mount(app: FastAPI, store: Store, tokens: Any, principal: Callable[[Request], Any],
          do_transition: Callable[..., dict[str, Any]], saved_horizon_h: float) -> None:
    """Add the ``/ui`` routes to ``app``."""
    from remediation.api import COOKIE, TransitionIn

    def who_or_login(request: Request) -> Any:
        try:
            return principal(request)
        except HTTPException:
            return None

    @app.get("/ui", include_in_schema=False)
    @app.get("/", include_in_schema=False)
    def home(request: Request) -> Response:
        who = who_or_login(request)
        if who is None:
            return RedirectResponse("/ui/login", 303)
        return RedirectResponse("/ui/operator" if who.role == "operator" else "/ui/crew", 303)

    @app.get("/ui/login", include_in_schema=False)
    def login_form(error: str = "") -> HTMLResponse:
        message = f'<p class="err">{_e(error)}</p>' if error else ""
        return _page("Meshwatch log in", message + (
            '<form method="post" action="/ui/login"><label>Token <input id="token" '
            'name="token" type="password" autocomplete="current-password"></label>'
            '<button id="login" type="submit">Log in</button></form>'))

    @app.post("/ui/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        form = parse_qs((await request.body()).decode(errors="replace"))
        token = (form.get("token") or [""])[0].strip()
        found = tokens.find(token)
        if found is None:
            return RedirectResponse("/ui/login?error=" + quote("unknown token"), 303)
        target = "/ui/operator" if found.role == "operator" else "/ui/crew"
        response = RedirectResponse(target, 303)
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        return response

    @app.post("/ui/logout", include_in_schema=False)
    def logout() -> Response:
        response = RedirectResponse("/ui/login", 303)
        response.delete_cookie(COOKIE)
        return response

    @app.get("/ui/crew", include_in_schema=False)
    def crew_page(request: Request) -> Response:
        who = who_or_login(request)
        if who is None:
            return RedirectResponse("/ui/login", 303)
        _, items = store.list_work_orders(crew_scope=who.scope, limit=200)
        active = [wo for wo in items if wo["state"] not in {"resolved", "false_alarm",
                                                             "cancelled"}]
        rows = "".join(
            f'<tr class="wo" data-id="{_e(wo["work_order_id"])}"><td class="p{wo["priority"]}">'
            f'P{wo["priority"]}</td><td><a href="/ui/work-orders/{_e(wo["work_order_id"])}">'
            f'{_e(wo["district"])} {_e(wo["device_id"] or "district-wide")}</a></td>'
            f'<td class="state">{_e(wo["state"])}</td></tr>' for wo in active)
        body = (f"<table><tr><th>prio</th><th>where</th><th>state</th></tr>{rows}</table>"
                if rows else "<p>No open work orders.</p>")
        return _page("My work orders", body, who.name)

    @app.get("/ui/work-orders/{work_order_id}", include_in_schema=False)
    def detail(work_order_id: str, request: Request, error: str = "") -> Response:
        who = who_or_login(request)
        if who is None:
            return RedirectResponse("/ui/login", 303)
        try:
            wo = store.work_order(work_order_id, crew_scope=who.scope)
        except NotFoundError:
            return _page("Not found", "<p>No such work order.</p>", who.name)
        incident = wo["incident"]
        key, series = flow_series(wo["alerts"])
        spark = f"<p>{_e(key)} {sparkline(series)}</p>" if series else ""
        where = ""
        device = wo["device_id"]
        if device is not None and device in store.registry:
            d = store.registry[device]
            if d.lat is not None and d.lon is not None:
                where = f'<p><a id="map" href="{_e(map_link(d.lat, d.lon))}">Open map</a></p>'
        actions = _actions(wo, who.role)
        message = f'<p class="err" id="error">{_e(error)}</p>' if error else ""
        alerts = "".join(f"<li>{_e(a['kind'])} {_e(a['severity'])} {_time(a['first_ts_ms'])}"
                         f" ({_e(a['alert_id'])})</li>" for a in wo["alerts"])
        audit = "".join(f"<li>{_time(t['ts_ms'])} {_e(t['actor'])}: {_e(t['event'])} → "
                        f"{_e(t['to_state'])} {_e(t['reason'] or '')}</li>" for t in wo["audit"])
        loss = incident["est_loss_lph"]
        body = (f'{message}<p>State: <b id="state">{_e(wo["state"])}</b> · priority '
                f'P{wo["priority"]} · {_e(incident["kind"])} ({_e(incident["severity"])})'
                f'{f" · ~{loss:.0f} L/h" if loss else ""}</p>'
                f'<p>{_e(wo["district"])} · {_e(device or "district-wide")}</p>{where}{spark}'
                f'{actions}<h2>Evidence</h2><ul>{alerts}</ul><h2>History</h2><ul>{audit}</ul>'
                f'<p><a href="/ui">Back</a></p>')
        return _page(f"Work order {work_order_id[:14]}", body, who.name)

    @app.post("/ui/work-orders/{work_order_id}", include_in_schema=False)
    async def act(work_order_id: str, request: Request) -> Response:
        who = who_or_login(request)
        if who is None:
            return RedirectResponse("/ui/login", 303)
        form = {k: v[0] for k, v in parse_qs((await request.body()).decode()).items()}
        target = f"/ui/work-orders/{quote(work_order_id)}"
        try:
            body = TransitionIn.model_validate({
                "state": form.get("state"), "outcome": form.get("outcome") or None,
                "note": form.get("note") or None})
            do_transition(work_order_id, body, who)
        except HTTPException as exc:
            return RedirectResponse(f"{target}?error={quote(str(exc.detail))}", 303)
        except ValueError as exc:
            return RedirectResponse(f"{target}?error={quote(str(exc)[:300])}", 303)
        return RedirectResponse(target, 303)

    @app.get("/ui/operator", include_in_schema=False)
    def operator_page(request: Request) -> Response:
        who = who_or_login(request)
        if who is None:
            return RedirectResponse("/ui/login", 303)
        if who.role != "operator":
            return RedirectResponse("/ui/crew", 303)
        k = kpi.compute(store.reader, saved_horizon_h)
        figures = {"Open incidents": k["open_incidents"], "Alerts": k["alerts"],
                   "Remediation rate": _pct(k["remediation_rate"]),
                   "False alarms": _pct(k["false_alarm_rate"]),
                   "MTTA": _duration(k["mtta_s"]), "MTTR": _duration(k["mttr_s"]),
                   "Water saved": f"{k['water_saved_m3']:.0f} m³"}
        kpis = "".join(f'<span class="kpi">{_e(name)}<b>{_e(value)}</b></span>'
                       for name, value in figures.items())
        _, incidents = store.incidents(state="open", limit=200)
        rows = "".join(
            f'<tr class="incident"><td class="p{i["priority"]}">P{i["priority"]}</td>'
            f'<td>{_e(i["district"])}</td><td>{_e(i["device_id"] or "district-wide")}</td>'
            f'<td>{_e(i["kind"])}</td><td>{i["alert_count"]}</td>'
            f'<td><a href="/ui/work-orders/{_e(i["work_order_id"])}">'
            f'{_e(i["work_order_state"])}</a></td><td>{_e(i["crew_id"] or "-")}</td></tr>'
            for i in incidents)
        body = (f'<section id="kpis">{kpis}</section><h2>Open incidents</h2>'
                f"<table><tr><th>prio</th><th>district</th><th>device</th><th>kind</th>"
                f"<th>alerts</th><th>work order</th><th>crew</th></tr>{rows}</table>")
        return _page("Operations", body, who.name)


def _actions(wo: dict[str, Any], role: str) -> str:
    from remediation.workorders import allowed_from

    allowed = allowed_from(wo["state"], role)  # type: ignore[arg-type]
    wid = _e(wo["work_order_id"])
    parts = []
    for state in ("acknowledged", "in_progress"):
        if state in allowed:
            parts.append(f'<form method="post" action="/ui/work-orders/{wid}">'
                         f'<input type="hidden" name="state" value="{state}">'
                         f'<button id="do-{state}">{BUTTONS[state]}</button></form>')
    if "resolved" in allowed:
        options = "".join(f'<option value="{o}">{o.replace("_", " ")}</option>'
                          for o in OUTCOMES)
        parts.append(f'<form method="post" action="/ui/work-orders/{wid}" id="resolve-form">'
                     f'<input type="hidden" name="state" value="resolved">'
                     f'<select name="outcome" id="outcome">{options}</select>'
                     f'<textarea name="note" id="note" placeholder="note"></textarea>'
                     f'<button id="do-resolved">Resolve</button></form>')
    for state in ("false_alarm", "cancelled"):
        if state in allowed:
            parts.append(f'<form method="post" action="/ui/work-orders/{wid}" '
                         f"onsubmit=\"return confirm('{BUTTONS[state]}?')\">"
                         f'<input type="hidden" name="state" value="{state}">'
                         f'<button id="do-{state}">{BUTTONS[state]}</button></form>')
    return "".join(parts)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:.0f} %"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"
