"""Identity policy: the registry wins, births fill gaps, first live claimant keeps a device."""

from mesh_bridge.identity import Identity
from meshwatch.contract import DeviceStatus
from meshwatch.registry import Device, DeviceKind, Registry

T0 = 1_767_225_600_000


def device(device_id: str, site: str = "s1", gateway: str = "gw-1") -> Device:
    return Device(device_id=device_id, device_kind=DeviceKind.CUSTOMER_METER, site=site,
                  district="d1", gateway_id=gateway, cadence_s=900)


def status(gateway: str, state: str, devices: list[str], site: str = "s1") -> DeviceStatus:
    return DeviceStatus(site=site, gateway_id=gateway, state=state, sent_ms=T0, devices=devices)


def test_registry_owner_only() -> None:
    identity = Identity(Registry([device("m1"), device("m2", gateway="gw-2")]))
    assert identity.authorize("s1", "gw-1", ["m1", "m2", "m3"]) == (["m1"], ["m2", "m3"])
    assert identity.authorize("s2", "gw-1", ["m1"]) == ([], ["m1"])  # same gateway id, other site


def test_birth_cannot_take_a_registered_device() -> None:
    identity = Identity(Registry([device("m1")]))
    claims = identity.observe(status("gw-2", "birth", ["m1", "x1"]))
    assert claims.granted == ["x1"]
    assert claims.refused == ["m1"]
    assert identity.owner("m1") == ("s1", "gw-1")
    assert identity.authorize("s1", "gw-2", ["m1", "x1"]) == (["x1"], ["m1"])


def test_first_live_claimant_keeps_an_unregistered_device() -> None:
    identity = Identity(Registry([]))
    identity.observe(status("gw-1", "birth", ["x1"]))
    assert identity.observe(status("gw-2", "birth", ["x1"])).refused == ["x1"]
    assert identity.owner("x1") == ("s1", "gw-1")
    identity.observe(status("gw-1", "death", []))
    assert identity.owner("x1") is None
    assert identity.observe(status("gw-2", "birth", ["x1"])).granted == ["x1"]


def test_rebirth_replaces_claims_and_heartbeat_changes_nothing() -> None:
    identity = Identity(Registry([device("m1")]))
    identity.observe(status("gw-1", "birth", ["x1", "x2", "x2"]))
    identity.observe(status("gw-1", "heartbeat", []))
    assert identity.authorize("s1", "gw-1", ["x1", "x2"]) == (["x1", "x2"], [])
    identity.observe(status("gw-1", "birth", ["x2"]))
    assert identity.authorize("s1", "gw-1", ["x1", "x2", "m1"]) == (["x2", "m1"], ["x1"])
    identity.observe(status("gw-1", "death", []))
    assert identity.authorize("s1", "gw-1", ["x2", "m1"]) == (["m1"], ["x2"])  # registry stays
