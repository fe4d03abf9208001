"""Provision a running Grafana through its HTTP API (grafana-client), idempotently by uid.

:func:`push` makes sure of, in order:

1. the folder (uid ``meshwatch``): created when missing, renamed when its title differs;
2. the InfluxDB data source (uid ``meshwatch-influxdb``), when settings are given: created
   when missing, updated when a provisioned key differs (the token is written on create and
   update only: Grafana never returns it, so it cannot be compared);
3. each dashboard, by uid: created when missing; when present, compared with ours (ignoring
   the ``id`` and ``version`` Grafana keeps) and saved again with ``overwrite`` only when its
   JSON or folder differs.

A second push of the same dashboards changes nothing and sends no write. The result lists
every object with what happened to it (``created``, ``updated``, ``unchanged``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from grafana_client.api import GrafanaApi
from grafana_client.client import GrafanaClientError

from dashboards.provisioning import (
    FOLDER_TITLE,
    FOLDER_UID,
    DatasourceSettings,
    datasource,
)

__all__ = ["Change", "differs", "push"]

_IGNORED = ("id", "version")


@dataclass(frozen=True, slots=True)
class Change:
    """What :func:`push` did to one Grafana object."""

    kind: str  # folder, datasource, dashboard
    uid: str
    title: str
    action: str  # created, updated, unchanged


def push(url: str, token: str | None, boards: Sequence[dict[str, Any]], *,
         datasource_settings: DatasourceSettings | None = None,
         folder_uid: str = FOLDER_UID, folder_title: str = FOLDER_TITLE,
         timeout_s: float = 10.0) -> list[Change]:
    """Provision ``boards`` (and the data source) into Grafana at ``url``.

    ``token`` is a service-account token (sent as ``Authorization: Bearer``); None uses the
    URL's ``user:password@`` if any. Raises ``grafana_client`` errors for refusals (401,
    403...) and network errors as they come: nothing is retried.
    """
    api: Any = GrafanaApi.from_url(url, credential=token, timeout=timeout_s)  # untyped
    changes = [_folder(api, folder_uid, folder_title)]
    if datasource_settings is not None:
        changes.append(_datasource(api, datasource(datasource_settings)))
    changes += [_dashboard(api, board, folder_uid) for board in boards]
    return changes


def differs(existing: dict[str, Any], board: dict[str, Any], folder_uid: str) -> bool:
    """Whether Grafana's copy (``GET /api/dashboards/uid/...``) needs saving again.

    Grafana's ``id`` and ``version`` are ignored; the folder counts.

    >>> saved = {"dashboard": {"uid": "u", "title": "T", "id": 7, "version": 3},
    ...          "meta": {"folderUid": "meshwatch"}}
    >>> differs(saved, {"uid": "u", "title": "T", "version": 1}, "meshwatch")
    False
    >>> differs(saved, {"uid": "u", "title": "New"}, "meshwatch"), differs(saved, {
    ...     "uid": "u", "title": "T"}, "elsewhere")
    (True, True)
    """
    current = {k: v for k, v in existing["dashboard"].items() if k not in _IGNORED}
    wanted = {k: v for k, v in board.items() if k not in _IGNORED}
    return current != wanted or existing.get("meta", {}).get("folderUid") != folder_uid


def _get(call: Any, *args: Any) -> Any:
    """The object, or None when Grafana answers 404."""
    try:
        return call(*args)
    except GrafanaClientError as exc:
        if exc.status_code == 404:
            return None
        raise


def _folder(api: Any, uid: str, title: str) -> Change:
    existing = _get(api.folder.get_folder, uid)
    if existing is None:
        api.folder.create_folder(title, uid=uid)
        return Change("folder", uid, title, "created")
    if existing.get("title") != title:
        api.folder.update_folder(uid, title=title, overwrite=True)
        return Change("folder", uid, title, "updated")
    return Change("folder", uid, title, "unchanged")


def _datasource(api: Any, wanted: dict[str, Any]) -> Change:
    uid, name = wanted["uid"], wanted["name"]
    existing = _get(api.datasource.get_datasource_by_uid, uid)
    if existing is None:
        api.datasource.create_datasource(wanted)
        return Change("datasource", uid, name, "created")
    compared = {k: v for k, v in wanted.items() if k != "secureJsonData"}
    current = {k: existing.get(k) for k in compared}
    if current["jsonData"] is not None:  # Grafana may add keys of its own to jsonData
        current["jsonData"] = {k: existing["jsonData"].get(k) for k in wanted["jsonData"]}
    if current == compared:
        return Change("datasource", uid, name, "unchanged")
    api.datasource.update_datasource_by_uid(uid, wanted)
    return Change("datasource", uid, name, "updated")


def _dashboard(api: Any, board: dict[str, Any], folder_uid: str) -> Change:
    uid, title = board["uid"], board["title"]
    existing = _get(api.dashboard.get_dashboard, uid)
    if existing is not None and not differs(existing, board, folder_uid):
        return Change("dashboard", uid, title, "unchanged")
    sent = {k: v for k, v in board.items() if k != "version"} | {"id": None}
    body = {"dashboard": sent, "folderUid": folder_uid, "overwrite": True,
            "message": "meshwatch dashboards push"}
    api.dashboard.update_dashboard(body)
    return Change("dashboard", uid, title, "created" if existing is None else "updated")
