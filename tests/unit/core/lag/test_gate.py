"""Pure logic of replication-lag gating: parsing thresholds, judging reports, the gate's pause/raise decisions.

No database here: reports are built by hand (the real-replication behaviour is in test_lag.py). The gate gets a
fake clock and measurer so its decisions are exact, not timing-dependent.
"""

from __future__ import annotations

import logging

import pytest

from pg_partition.core.db.errors import InvalidInputError
from pg_partition.core.lag import (
    SOURCE_AURORA,
    LagGate,
    LagPauseTooLong,
    LagReport,
    LagThresholds,
    LocalReplay,
    SlotLag,
    SlotLostError,
    SlotMissingError,
    StandbyLag,
    StandbyMissingError,
    parse_aurora_rows,
    parse_local_row,
)
from pg_partition.core.params import parse_bytes, parse_names, parse_seconds


def report(standbys=(), slots=(), local=None, in_recovery=False) -> LagReport:
    return LagReport(in_recovery=in_recovery, server_version=150000, aurora=False,
                     measured_at="2024-01-01T00:00:00+00:00", standbys=tuple(standbys), slots=tuple(slots),
                     local=local)


def sb(name="standby1", replay_bytes=0, replay_seconds=0.0, **kw) -> StandbyLag:
    return StandbyLag(name=name, state="streaming", replay_lag_bytes=replay_bytes,
                      replay_lag_seconds=replay_seconds, write_lag_bytes=0, flush_lag_bytes=0, **kw)


def slot(name="s", unconfirmed=0, active=False, slot_type="logical", **kw) -> SlotLag:
    return SlotLag(name=name, slot_type=slot_type, plugin="pgoutput", active=active, unconfirmed_bytes=unconfirmed,
                   retained_bytes=unconfirmed, **kw)


@pytest.mark.parametrize(("text", "expected"), [
    (None, None), ("None", None), ("", None), (0, 0), (1048576, 1048576), ("1048576", 1048576),
    ("100MB", 100 * 1024**2), ("1.5 GB", int(1.5 * 1024**3)), ("64kB", 65536), ("2GiB", 2 * 1024**3),
])
def test_parse_bytes(text, expected) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["lots", "-1", "10 parsecs", True, -5])
def test_parse_bytes_refuses(bad) -> None:
    with pytest.raises(InvalidInputError, match="max_lag_bytes"):
        parse_bytes(bad)


@pytest.mark.parametrize(("text", "expected"), [
    (None, None), ("None", None), (30, 30.0), ("30", 30.0), ("30s", 30.0), ("5min", 300.0), ("500ms", 0.5),
    ("1h", 3600.0),
])
def test_parse_seconds(text, expected) -> None:
    assert parse_seconds(text) == expected


@pytest.mark.parametrize(("text", "expected"), [
    (None, None), ("None", None), ("", None), ("all", None), ("*", None), ([], ()), ("[]", ()),
    (["a", "b"], ("a", "b")), ('["a", "b"]', ("a", "b")), ("['a', 'b']", ("a", "b")), ("a, b", ("a", "b")),
    (("x",), ("x",)),
])
def test_parse_names(text, expected) -> None:
    assert parse_names(text) == expected


def test_parse_names_refuses_garbage() -> None:
    with pytest.raises(InvalidInputError, match="watch_slots"):
        parse_names("[not, json")
    with pytest.raises(InvalidInputError, match="empty name"):
        parse_names(["a", " "])


def test_no_limits_means_disabled_and_always_ok() -> None:
    t = LagThresholds()
    assert not t.enabled
    assert t.evaluate(report(standbys=[sb(replay_bytes=10**12)])).ok


def test_standby_bytes_and_seconds() -> None:
    t = LagThresholds(max_lag_bytes=1000, max_lag_seconds=5)
    assert t.evaluate(report(standbys=[sb(replay_bytes=1000, replay_seconds=5.0)])).ok  # equal is within
    v = t.evaluate(report(standbys=[sb(replay_bytes=1001, replay_seconds=1.0)]))
    assert not v.ok and len(v.reasons) == 1 and "standby 'standby1'" in v.reasons[0] and "1001 B" in v.reasons[0]
    v = t.evaluate(report(standbys=[sb(replay_bytes=0, replay_seconds=7.5)]))
    assert not v.ok and "7.5s behind > max 5s" in v.reasons[0]
    # NULL seconds: PostgreSQL has no lag sample because the standby is caught up and idle
    assert t.evaluate(report(standbys=[sb(replay_bytes=0, replay_seconds=None)])).ok
    # a standby whose positions are not known yet (startup) is not "zero lag"
    v = t.evaluate(report(standbys=[sb(replay_bytes=None, replay_seconds=None, )]))
    assert not v.ok and "unknown" in v.reasons[0]


def test_only_watched_standbys_count_and_missing_named_one_is_an_error() -> None:
    r = report(standbys=[sb("a", replay_bytes=10**9), sb("b", replay_bytes=0)])
    assert LagThresholds(max_lag_bytes=1000, standbys=("b",)).evaluate(r).ok
    assert LagThresholds(max_lag_bytes=1000, standbys=()).evaluate(r).ok
    assert not LagThresholds(max_lag_bytes=1000).evaluate(r).ok
    with pytest.raises(StandbyMissingError, match=r"\['c'\] are not connected.*connected: a, b"):
        LagThresholds(max_lag_bytes=1000, standbys=("b", "c")).evaluate(r)


def test_slots_unconfirmed_bytes_missing_and_lost() -> None:
    r = report(slots=[slot("feed", unconfirmed=5000), slot("standby1", unconfirmed=0, slot_type="physical",
                                                             active=True)])
    v = LagThresholds(max_lag_bytes=4000).evaluate(r)
    assert not v.ok and "logical slot 'feed' (inactive) unconfirmed" in v.reasons[0]
    assert "no consumer connected" in v.reasons[0]
    assert LagThresholds(max_lag_bytes=4000, slots=()).evaluate(r).ok
    assert LagThresholds(max_lag_bytes=4000, slots=("standby1",)).evaluate(r).ok
    with pytest.raises(SlotMissingError, match="nosuch"):
        LagThresholds(max_lag_bytes=4000, slots=("nosuch",)).evaluate(r)
    lost = report(slots=[slot("feed", unconfirmed=0, wal_status="lost")])
    with pytest.raises(SlotLostError, match="lost"):
        LagThresholds(max_lag_bytes=4000).evaluate(lost)
    assert LagThresholds(max_lag_bytes=4000, slots=()).evaluate(lost).ok  # not watched: not judged


def test_logical_walsender_seconds_count_physical_slot_seconds_do_not_double_count() -> None:
    r = report(slots=[slot("feed", unconfirmed=0, active=True, lag_seconds=20.0),
                      slot("standby1", slot_type="physical", active=True, lag_seconds=20.0)])
    v = LagThresholds(max_lag_seconds=10).evaluate(r)
    assert len(v.reasons) == 1 and "'feed'" in v.reasons[0]


def test_local_standby_idle_primary_is_not_lag() -> None:
    # receive == replay: caught up, however old the last replayed commit is (idle primary)
    idle = parse_local_row(("0/3000000", "0/3000000", 0, 3600.0, False, 1, "streaming"))
    assert idle.replay_delay_seconds == 0.0 and idle.replay_lag_bytes == 0
    behind = parse_local_row(("0/3000100", "0/3000000", 256, 12.5, True, 1, "streaming"))
    assert behind.replay_delay_seconds == 12.5 and behind.paused
    t = LagThresholds(max_lag_bytes=100, max_lag_seconds=10)
    assert t.evaluate(report(local=idle, in_recovery=True)).ok
    v = t.evaluate(report(local=behind, in_recovery=True))
    assert [r.split(":")[0] for r in v.reasons] == ["this standby (replay paused) replay"] * 2
    no_receiver = LocalReplay("0/3000000", "0/3000000", 0, 0.0, False, None)
    v = t.evaluate(report(local=no_receiver, in_recovery=True))
    assert not v.ok and "no WAL receiver" in v.reasons[0]


def test_aurora_rows_parse_and_judge_on_seconds_only() -> None:
    rows = [("writer-1", "MASTER_SESSION_ID", -1.0), ("reader-1", "6a1f-uuid", 12.0),
            ("reader-2", "77b2-uuid", 4500.0), ("reader-3", "88c3-uuid", None)]
    readers = parse_aurora_rows(rows)
    assert [(r.name, r.source, r.replay_lag_seconds) for r in readers] == [
        ("reader-1", SOURCE_AURORA, 0.012), ("reader-2", SOURCE_AURORA, 4.5), ("reader-3", SOURCE_AURORA, None)]
    r = report(standbys=readers)
    assert LagThresholds(max_lag_bytes=1).evaluate(r).ok  # Aurora LSNs are not bytes: no byte judgement
    v = LagThresholds(max_lag_seconds=1).evaluate(r)
    assert len(v.reasons) == 2
    assert "Aurora reader 'reader-2': 4.5s" in v.reasons[1] or "Aurora reader 'reader-2': 4.5s" in v.reasons[0]
    assert any("reader-3" in x and "unknown" in x for x in v.reasons)


def test_report_json_round_trip() -> None:
    r = report(standbys=[sb(replay_bytes=5)], slots=[slot(unconfirmed=7)],
               local=LocalReplay("0/1", "0/1", 0, 0.0, False, "streaming"), in_recovery=True)
    d = r.to_dict()
    assert isinstance(d["standbys"], list)
    assert LagReport.from_dict(d) == r
    t = LagThresholds(100, 2.5, ("a",), ())
    assert LagThresholds.from_dict(t.to_dict()) == t


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def scripted(clock: FakeClock, lags: list[int]):
    """A measurer returning the given replay-lag bytes, one per measurement (then the last one forever)."""
    calls = []

    def measurer(_conn):
        calls.append(clock.now)
        value = lags[min(len(calls) - 1, len(lags) - 1)]
        return report(standbys=[sb(replay_bytes=value)])

    return measurer, calls


def test_gate_checks_at_most_every_check_every_seconds() -> None:
    clock = FakeClock()
    measurer, calls = scripted(clock, [0])
    gate = LagGate(LagThresholds(max_lag_bytes=100), check_every=5, clock=clock, sleep=clock.sleep,
                   measurer=measurer)
    for _ in range(10):  # ten batches of 1s each
        assert gate.wait_until_ok(None) == 0.0
        clock.now += 1.0
    assert calls == [1000.0, 1005.0]  # measured at the first batch and once 5s of work had passed


def test_gate_pauses_logs_and_resumes(caplog) -> None:
    clock = FakeClock()
    measurer, _ = scripted(clock, [500, 500, 500, 50])
    gate = LagGate(LagThresholds(max_lag_bytes=100), check_every=0, poll_interval=2, max_pause_seconds=60,
                   clock=clock, sleep=clock.sleep, measurer=measurer)
    with caplog.at_level(logging.INFO, logger="pg_partition"):
        paused = gate.wait_until_ok(None)
    assert paused == 6.0 and clock.sleeps == [2, 2, 2] and gate.pauses == 1 and gate.paused_seconds == 6.0
    assert "Pausing: replication lag over threshold" in caplog.text and "500 B behind" in caplog.text
    assert "Resuming after a 6.0s pause" in caplog.text


def test_gate_raises_with_state_when_the_pause_is_too_long() -> None:
    clock = FakeClock()
    measurer, _ = scripted(clock, [500])
    thresholds = LagThresholds(max_lag_bytes=100, standbys=("standby1",))
    gate = LagGate(thresholds, check_every=0, poll_interval=4, max_pause_seconds=10, clock=clock,
                   sleep=clock.sleep, measurer=measurer)
    with pytest.raises(LagPauseTooLong) as info:
        gate.wait_until_ok(None)
    exc = info.value
    assert clock.sleeps == [4, 4, 2]  # never sleeps past the limit
    assert exc.paused_seconds == 10.0 and exc.thresholds == thresholds
    assert exc.state["reasons"] == list(exc.verdict.reasons) and "500 B behind" in exc.state["reasons"][0]
    assert exc.state["thresholds"] == {"max_lag_bytes": 100, "max_lag_seconds": None, "standbys": ["standby1"],
                                       "slots": None}
    assert LagReport.from_dict(exc.state["report"]) == exc.verdict.report
    assert "How to fix" in str(exc)
    # a per-call override: wait as long as it takes
    measurer2, _ = scripted(clock, [500, 500, 0])
    gate.measurer = measurer2
    assert gate.wait_until_ok(None, max_pause_seconds=None) == 8.0


def test_gate_from_params_parses_dag_param_strings() -> None:
    gate = LagGate.from_params(max_lag_bytes="64MB", max_lag_seconds="None", watch_slots="['feed']",
                               max_pause_seconds="10min")
    assert gate.thresholds == LagThresholds(64 * 1024**2, None, None, ("feed",))
    assert gate.max_pause_seconds == 600.0
    assert not LagGate.from_params().thresholds.enabled
