"""Topic building and parsing: one table for both, and ids that stay single levels."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshwatch.contract import ContractError, Reason, topics

ids = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.:-]{0,20}\Z")


@given(st.sampled_from(sorted(topics.TEMPLATES)), st.data())
def test_build_then_parse_round_trips(kind, data) -> None:
    names = [level[1:-1] for level in topics.TEMPLATES[kind].split("/") if level.startswith("{")]
    params = {name: data.draw(ids) for name in names}
    parsed = topics.parse(topics.build(kind, **params))
    assert parsed.kind == kind
    assert parsed.params == params


@pytest.mark.parametrize("level", ["a/b", "+", "#", "", "x" * 65, "-lead"])
def test_levels_that_would_change_the_topic_are_refused(level) -> None:
    with pytest.raises(ValueError, match="must match"):
        topics.site_telemetry(level, "gw-01")


@pytest.mark.parametrize(
    "topic", ["", "mw/v1", "mw/v2/mesh/telemetry/1", "mw/v1/mesh/telemetry/1/extra",
              "mw/v1/site/a/gw/b/unknown", "mw/v1/mesh/telemetry/+"],
)
def test_foreign_topics_are_bad_topic_errors(topic) -> None:
    with pytest.raises(ContractError) as caught:
        topics.parse(topic)
    assert caught.value.reason is Reason.BAD_TOPIC


def test_subscriptions_use_wildcards_for_missing_levels() -> None:
    assert topics.subscription("mesh_telemetry") == "mw/v1/mesh/telemetry/+"
    assert topics.subscription("alerts", kind="burst") == "mw/v1/alerts/+/burst"
    with pytest.raises(ValueError, match="no levels"):
        topics.subscription("alerts", gateway="gw-1")


def test_partition_is_stable_and_spreads_devices() -> None:
    devices = [f"mtr-{i:07d}" for i in range(8000)]
    parts = [topics.partition_of(d, 8) for d in devices]
    assert parts == [topics.partition_of(d, 8) for d in devices]
    counts = [parts.count(p) for p in range(8)]
    assert min(counts) > 800, counts  # ~1000 each
    # pinned values: a change would reshuffle every consumer's devices
    assert [topics.partition_of(d, 8) for d in ("mtr-0000001", "dma-01-inlet")] == [4, 1]
    with pytest.raises(ValueError, match="at least 1"):
        topics.partition_of("m", 0)


def test_crew_work_orders_topic_is_in_the_contract() -> None:
    topic = topics.crew_work_orders("crew-north")
    assert topic == "mw/v1/crews/crew-north/work_orders"
    assert topics.parse(topic) == topics.Topic("crew_work_orders", {"crew": "crew-north"})
    assert topics.subscription("crew_work_orders") == "mw/v1/crews/+/work_orders"
    with pytest.raises(ValueError, match="must match"):
        topics.crew_work_orders("crew/north")
    with pytest.raises(ContractError):
        topics.parse("mw/v1/crews/crew-north/orders")
