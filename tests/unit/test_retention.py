from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from deltavault.errors import UsageError
from deltavault.maintenance.retention import Policy, apply_policy, parse_duration, plan_forget
from deltavault.model.snapshot import Snapshot


def snap(t: datetime, host: str = "h", paths: tuple[str, ...] = ("/data",), tags: tuple[str, ...] = ()) -> Snapshot:
    ns = int(t.timestamp() * 1e9)
    return Snapshot(time=t.isoformat(), time_ns=ns, hostname=host, paths=list(paths), tags=list(tags))


def hourly_series(n: int, start: datetime) -> list[tuple[str, Snapshot]]:
    return [(f"s{i:04d}", snap(start + timedelta(hours=i))) for i in range(n)]


T0 = datetime(2024, 1, 1, 0, 30, tzinfo=UTC)  # a Monday


def kept(decisions) -> list[str]:
    return [d.snapshot_id for d in decisions if d.keep]


def test_keep_last() -> None:
    d = apply_policy(hourly_series(10, T0), Policy(last=3), tz=UTC)
    assert kept(d) == ["s0009", "s0008", "s0007"]
    assert all(x.reasons == ["last"] for x in d if x.keep)
    assert all(not x.reasons for x in d if not x.keep)


def test_keep_daily_takes_newest_of_each_day() -> None:
    series = hourly_series(24 * 5, T0)  # 5 days, hourly
    d = apply_policy(series, Policy(daily=3), tz=UTC)
    ids = kept(d)
    # newest of each of the 3 most recent days: 23:30 of days 5, 4, 3 (the last one is 00:30 + 119h)
    assert ids == ["s0119", "s0095", "s0071"]
    assert d[0].reasons == ["daily (2024-01-05)"]


def test_weekly_monthly_yearly_buckets() -> None:
    series = [(f"d{i:03d}", snap(T0 + timedelta(days=i))) for i in range(800)]
    d = apply_policy(series, Policy(weekly=2, monthly=3, yearly=3), tz=UTC)
    by = {x.snapshot_id: x.reasons for x in d if x.keep}
    newest = T0 + timedelta(days=799)  # 2026-03-10, Tuesday
    assert by[f"d{799:03d}"] == [f"weekly ({newest:%G-W%V})", "monthly (2026-03)", "yearly (2026)"]
    weekly = [k for k, r in by.items() if any(x.startswith("weekly") for x in r)]
    monthly = [k for k, r in by.items() if any(x.startswith("monthly") for x in r)]
    yearly = [k for k, r in by.items() if any(x.startswith("yearly") for x in r)]
    assert len(weekly) == 2 and len(monthly) == 3 and len(yearly) == 3


def test_yearly_pick_is_last_of_year() -> None:
    series = [(f"d{i:03d}", snap(T0 + timedelta(days=i))) for i in range(500)]
    d = apply_policy(series, Policy(yearly=2), tz=UTC)
    picks = {x.reasons[0]: x.snapshot.time[:10] for x in d if x.keep}
    assert picks == {"yearly (2025)": (T0 + timedelta(days=499)).isoformat()[:10],
                     "yearly (2024)": "2024-12-31"}


def test_keep_within_counts_from_newest_snapshot() -> None:
    series = hourly_series(100, T0)
    d = apply_policy(series, Policy(within=parse_duration("1d")), tz=UTC)
    assert len(kept(d)) == 25  # newest and the 24 hours before it, inclusive
    assert all(x.reasons == ["within"] for x in d if x.keep)


def test_unlimited_and_combined_reasons() -> None:
    series = hourly_series(5, T0)
    d = apply_policy(series, Policy(last=-1, daily=1), tz=UTC)
    assert len(kept(d)) == 5
    assert d[0].reasons == ["last", "daily (2024-01-01)"]


def test_keep_tag() -> None:
    s = [("a", snap(T0, tags=("release",))), ("b", snap(T0 + timedelta(hours=1)))]
    d = apply_policy(s, Policy(last=1, tags=["release"]), tz=UTC)
    assert {x.snapshot_id: x.reasons for x in d} == {"b": ["last"], "a": ["tag release"]}


def test_empty_policy_refused() -> None:
    with pytest.raises(UsageError):
        apply_policy(hourly_series(3, T0), Policy())


def test_groups_by_host_and_paths() -> None:
    s = [("a1", snap(T0, host="a")), ("a2", snap(T0 + timedelta(hours=1), host="a")),
         ("b1", snap(T0, host="b")), ("c1", snap(T0, host="a", paths=("/other",)))]
    groups = plan_forget(s, Policy(last=1), tz=UTC)
    assert len(groups) == 3
    assert sorted(x for g in groups for x in kept(g.decisions)) == ["a2", "b1", "c1"]
    assert {"host": "a", "paths": ["/other"]} in [g.key for g in groups]
    groups = plan_forget(s, Policy(last=1), group_by=["host"], tz=UTC)
    assert sorted(x for g in groups for x in kept(g.decisions)) == ["a2", "b1"]


@pytest.mark.parametrize("text,expect", [("7d", timedelta(days=7)), ("36h", timedelta(hours=36)),
                                         ("2w", timedelta(days=14)), ("1d12h", timedelta(hours=36))])
def test_parse_duration(text: str, expect: timedelta) -> None:
    assert parse_duration(text) == expect


@pytest.mark.parametrize("bad", ["", "7", "d", "7x", "1d 2h x"])
def test_parse_duration_rejects(bad: str) -> None:
    with pytest.raises(UsageError):
        parse_duration(bad)
