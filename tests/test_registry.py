"""The device registry CSV: valid files load, bad rows are named."""

import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshwatch.registry import RegistryError, load_registry, parse_registry

HEADER = "device_id,device_kind,customer_type,critical,site,district,gateway_id,cadence_s,lat,lon\n"


def test_rows_load_with_types_and_lookups() -> None:
    text = HEADER + (
        "mtr-1,customer_meter,residential,false,dma-01,dma-01,gw-1,900,52.1,5.1\n"
        "mtr-2,customer_meter,commercial,true,dma-01,dma-01,gw-1,900,,\n"
        "dma-01-inlet,district_meter,,,dma-01,dma-01,scada-01,60,52.0,5.0\n"
    )
    registry = parse_registry(io.StringIO(text), source="t")
    assert len(registry) == 3
    assert registry["mtr-2"].critical is True
    assert registry["mtr-2"].lat is None
    assert registry.devices_of_gateway("gw-1") == {"mtr-1", "mtr-2"}
    assert "dma-01-inlet" in registry


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("mtr-1,toaster,,,s,d,g,900,,", "line 2: device_kind"),
        ("mtr 1,customer_meter,,,s,d,g,900,,", "line 2: device_id"),
        ("mtr-1,customer_meter,,,s,d,g,0,,", "line 2: cadence_s"),
        ("mtr-1,customer_meter,,,s,d,g,900,91,0", "line 2: lat"),
    ],
)
def test_bad_rows_are_named(row, message) -> None:
    with pytest.raises(RegistryError, match=message):
        parse_registry(io.StringIO(HEADER + row + "\n"), source="t")


def test_duplicates_and_missing_columns_are_errors(tmp_path) -> None:
    row = "mtr-1,customer_meter,,,s,d,g,900,,\n"
    with pytest.raises(RegistryError, match="appears twice"):
        parse_registry(io.StringIO(HEADER + row + row), source="t")
    with pytest.raises(RegistryError, match=r"missing columns \['gateway_id'"):
        parse_registry(io.StringIO("device_id,device_kind,site,district,cadence_s\n"), "t")
    with pytest.raises(RegistryError, match="does not exist"):
        load_registry(tmp_path / "none.csv")


@settings(max_examples=300)
@given(st.lists(st.lists(st.text(max_size=12), min_size=10, max_size=11), max_size=5))
def test_any_rows_load_or_raise_registry_error(rows) -> None:
    text = HEADER + "\n".join(",".join(cell.replace("\n", " ") for cell in row) for row in rows)
    try:
        registry = parse_registry(io.StringIO(text), source="fuzz")
    except RegistryError as exc:
        assert "fuzz" in str(exc)
    else:
        assert len(registry) <= len(rows)
