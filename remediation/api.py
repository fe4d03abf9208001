"""HTTP API (FastAPI, OpenAPI at ``/docs`` and ``/openapi.json``) and the pages.

**Auth.** Every ``/api`` and ``/ui`` route needs a bearer token (``Authorization: Bearer
TOKEN``; the pages keep it in an HttpOnly, SameSite=Strict cookie set by ``/ui/login``).
Tokens come from the configuration: ``remediation.operator_tokens`` (role ``operator``: sees
and changes everything) and each crew's ``token`` (role ``crew``: sees and changes only work
orders assigned to that crew; another crew's work order answers 404, as if it did not exist).
No token or an unknown one answers 401; an operator-only route answers 403 to a crew.

**Errors.** An invalid transition answers 409 with the life cycle's explanation; a malformed
body or query answers 422 (FastAPI's validation errors).

``/healthz`` (200 while the database answers; says whether the intake is connected) and
``/metrics`` (Prometheus) need no token.

No ``from __future__ import annotations`` here: FastAPI must see the local ``Annotated``
dependency aliases at run time.
"""


import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, Field
from sqlalchemy import text

from meshwatch.contract.events import Outcome, WorkOrderState
from remediation import kpi
from remediation.store import NotFoundError, Store
from remediation.workorders import TransitionError

COOKIE = "mw_token"


@dataclass(frozen=True)
class Principal:
    """Who is calling: an operator, or a crew."""

    role: Literal["operator", "crew"]
    crew_id: str | None = None

    @property
    def name(self) -> str:
        """For the audit trail."""
        return f"crew:{self.crew_id}" if self.role == "crew" else "operator"

    @property
    def scope(self) -> str | None:
        """The crew whose work orders this principal may see (None: all)."""
        return self.crew_id if self.role == "crew" else None


class Tokens:
    """Token → principal, looked up by SHA-256 digest.

    >>> tokens = Tokens({"op-secret": Principal("operator")})
    >>> tokens.find("op-secret").role, tokens.find("nope") is None
    ('operator', True)
    """

    def __init__(self, principals: dict[str, Principal]) -> None:
        self._by_digest = {_digest(t): p for t, p in principals.items() if t}

    def find(self, token: str | None) -> Principal | None:
        """The principal of ``token``, or None."""
        return None if not token else self._by_digest.get(_digest(token))


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TransitionIn(BaseModel):
    """A requested change of a work order."""

    state: WorkOrderState
    outcome: Outcome | None = None
    note: Annotated[str, Field(max_length=2000)] | None = None
    crew_id: Annotated[str, Field(max_length=64)] | None = None


class Page(BaseModel):
    """One page of a list."""

    total: int
    limit: int
    offset: int
    items: list[dict[str, Any]]


def create_app(store: Store, tokens: Tokens, *, saved_horizon_h: float = 720.0,
               metrics: CollectorRegistry | None = None,
               health: Callable[[], dict[str, Any]] | None = None) -> FastAPI:
    """The FastAPI application: API, pages, ``/healthz`` and ``/metrics``."""
    app = FastAPI(title="Meshwatch remediation", version="1",
                  description="Incidents, work orders and crews. Bearer-token auth.")
    registry = metrics or CollectorRegistry()

    def principal(request: Request) -> Principal:
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else None
        token = token or request.cookies.get(COOKIE)
        if not token:
            raise HTTPException(401, "a bearer token is required",
                                headers={"WWW-Authenticate": "Bearer"})
        found = tokens.find(token)
        if found is None:
            raise HTTPException(401, "unknown token", headers={"WWW-Authenticate": "Bearer"})
        return found

    def operator(who: Annotated[Principal, Depends(principal)]) -> Principal:
        if who.role != "operator":
            raise HTTPException(403, "operators only")
        return who

    Who = Annotated[Principal, Depends(principal)]
    Operator = Annotated[Principal, Depends(operator)]
    Limit = Annotated[int, Query(ge=1, le=500)]
    Offset = Annotated[int, Query(ge=0)]

    @app.get("/healthz", tags=["ops"])
    def healthz() -> JSONResponse:
        """200 while the database answers."""
        body: dict[str, Any] = dict(health() if health else {})
        try:
            with store.reader.connect() as connection:
                connection.execute(text("SELECT 1"))
            body["database"] = "ok"
        except Exception as exc:
            body["database"] = f"error: {type(exc).__name__}"
            return JSONResponse(body | {"status": "unhealthy"}, status_code=503)
        return JSONResponse(body | {"status": "ok"})

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
    def prometheus() -> PlainTextResponse:
        """Prometheus metrics: intake counters and the KPIs."""
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/v1/me", tags=["auth"])
    def me(who: Who) -> dict[str, Any]:
        """Who the token belongs to."""
        return {"role": who.role, "crew_id": who.crew_id}

    @app.get("/api/v1/work-orders", tags=["work orders"], response_model=Page)
    def list_work_orders(who: Who, state: WorkOrderState | None = None,
                         priority: Annotated[int | None, Query(ge=1, le=4)] = None,
                         district: str | None = None, crew_id: str | None = None,
                         limit: Limit = 50, offset: Offset = 0) -> Page:
        """Work orders, most urgent first; a crew sees only its own."""
        total, items = store.list_work_orders(
            crew_scope=who.scope, state=None if state is None else state.value,
            priority=priority, district=district, crew_id=crew_id, limit=limit, offset=offset)
        return Page(total=total, limit=limit, offset=offset, items=items)

    @app.get("/api/v1/work-orders/{work_order_id}", tags=["work orders"])
    def get_work_order(work_order_id: str, who: Who) -> dict[str, Any]:
        """One work order with its incident, alerts (evidence) and audit trail."""
        try:
            return store.work_order(work_order_id, crew_scope=who.scope)
        except NotFoundError:
            raise HTTPException(404, f"no work order {work_order_id}") from None

    @app.post("/api/v1/work-orders/{work_order_id}/transitions", tags=["work orders"])
    def transition(work_order_id: str, body: TransitionIn, who: Who) -> dict[str, Any]:
        """Change a work order's state (audited); 409 if the life cycle does not allow it."""
        return do_transition(work_order_id, body, who)

    def do_transition(work_order_id: str, body: TransitionIn, who: Principal) -> dict[str, Any]:
        try:
            return store.transition(
                work_order_id, body.state.value, actor=who.name, role=who.role,
                crew_scope=who.scope, outcome=None if body.outcome is None else body.outcome.value,
                note=body.note, crew_id=body.crew_id)
        except NotFoundError:
            raise HTTPException(404, f"no work order {work_order_id}") from None
        except TransitionError as exc:
            raise HTTPException(409, str(exc)) from None

    @app.get("/api/v1/incidents", tags=["incidents"], response_model=Page)
    def incidents(who: Operator, state: Literal["open", "closed"] | None = "open",
                  limit: Limit = 50, offset: Offset = 0) -> Page:
        """Incidents with their work orders (operators)."""
        total, items = store.incidents(state=state, limit=limit, offset=offset)
        return Page(total=total, limit=limit, offset=offset, items=items)

    @app.get("/api/v1/kpis", tags=["kpis"])
    def kpis(who: Operator) -> dict[str, Any]:
        """Remediation rate, false-alarm rate, MTTA, MTTR, water saved (operators)."""
        return kpi.compute(store.reader, saved_horizon_h)

    from remediation import pages

    pages.mount(app, store, tokens, principal, do_transition, saved_horizon_h)
    return app
