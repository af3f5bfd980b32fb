"""Run settings are refused with one clear message, and the window logic holds across midnight,
timezones and daylight-saving changes."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest

from fk_maintenance.errors import InvalidSettings, WindowsExhausted
from fk_maintenance.keys.settings import SETTING_DEFS, RunSettings
from fk_maintenance.keys.window import Window
from fk_maintenance.steps.constraint import decide_window


def test_defaults_are_valid_and_match_the_form_defaults() -> None:
    defaults = RunSettings()
    for definition in SETTING_DEFS:
        value = getattr(defaults, definition.name)
        assert (list(value) if isinstance(value, tuple) else value) == definition.default, definition.name
    # What the form sends by default is the default run (a JSON list is the settings' tuple).
    assert RunSettings.from_params({d.name: d.default for d in SETTING_DEFS}) == defaults


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"batch_size": 100_001}, "batch_size must be at most 100000"),
        ({"lock_timeout_ms": 49}, "lock_timeout_ms must be at least 50"),
        ({"lock_attempts": 51}, "lock_attempts must be at most 50"),
        ({"max_depth": 0}, "max_depth must be at least 1"),
        ({"batch_size": "5000"}, "batch_size must be an integer"),
        ({"batch_size": True}, "batch_size must be an integer"),
        ({"dry_run": "yes"}, "dry_run must be a boolean"),
        ({"window_start": "25:00"}, "window_start must be a time HH:MM"),
        ({"window_end": "3pm"}, "window_end must be a time HH:MM"),
        ({"window_start": "02:00", "window_end": "02:00"}, "the window would be empty"),
        ({"window_timezone": "Mars/Olympus_Mons"}, "not a known IANA timezone"),
        ({"window_timezone": "../../etc/passwd"}, "not a known IANA timezone"),
        ({"window_timezone": "UTC'; DROP TABLE vision_kpis; --"}, "not a known IANA timezone"),
        ({"bogus": 1}, "unknown setting(s) 'bogus'"),
    ],
)
def test_bad_settings_are_refused_with_a_message_naming_them(params: dict, message: str) -> None:
    with pytest.raises(InvalidSettings, match="invalid run settings") as caught:
        RunSettings.from_params(params)
    assert message in str(caught.value)


BOUNDED = [(d.name, d.schema["minimum"], d.schema["maximum"]) for d in SETTING_DEFS if "minimum" in d.schema]


@pytest.mark.parametrize(("name", "low", "high"), BOUNDED)
def test_every_bounded_setting_accepts_its_bounds_and_refuses_one_past_them(name: str, low: int, high: int) -> None:
    assert getattr(RunSettings.from_params({name: low}), name) == low
    assert getattr(RunSettings.from_params({name: high}), name) == high
    with pytest.raises(InvalidSettings, match=f"{name} must be at least {low}, got {low - 1}"):
        RunSettings.from_params({name: low - 1})
    with pytest.raises(InvalidSettings, match=f"{name} must be at most {high}, got {high + 1}"):
        RunSettings.from_params({name: high + 1})


def test_several_bad_values_are_all_named_in_one_message() -> None:
    with pytest.raises(InvalidSettings) as caught:
        RunSettings.from_params({"batch_size": 0, "window_end": "xx", "window_timezone": "Nope/Nope"})
    message = str(caught.value)
    assert "batch_size" in message and "window_end" in message and "window_timezone" in message


def _at(zone: str, text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(zone)).astimezone(UTC)


def test_window_across_midnight_is_open_on_both_sides_of_it() -> None:
    window = Window(time(22, 0), time(2, 0), ZoneInfo("UTC"))
    assert window.is_open(_at("UTC", "2026-03-10T23:30"))
    assert window.is_open(_at("UTC", "2026-03-11T01:59"))
    assert not window.is_open(_at("UTC", "2026-03-11T02:00"))
    assert not window.is_open(_at("UTC", "2026-03-11T21:59"))
    start, end = window.current_or_next(_at("UTC", "2026-03-11T01:00"))
    assert (start, end) == (_at("UTC", "2026-03-10T22:00"), _at("UTC", "2026-03-11T02:00"))


def test_window_in_a_non_utc_timezone_follows_local_time() -> None:
    window = Window(time(1, 0), time(5, 0), ZoneInfo("Asia/Kolkata"))  # UTC+05:30
    assert window.is_open(datetime(2026, 6, 1, 20, 0, tzinfo=UTC))  # 01:30 local
    assert not window.is_open(datetime(2026, 6, 1, 0, 0, tzinfo=UTC))  # 05:30 local
    start, _ = window.current_or_next(datetime(2026, 6, 1, 0, 0, tzinfo=UTC))
    assert start == datetime(2026, 6, 1, 19, 30, tzinfo=UTC)


def test_window_on_the_spring_forward_night_is_an_hour_shorter() -> None:
    # Europe/Berlin skips 02:00-03:00 on 2026-03-29.
    window = Window(time(1, 0), time(5, 0), ZoneInfo("Europe/Berlin"))
    start, end = window.current_or_next(_at("Europe/Berlin", "2026-03-29T01:30"))
    assert end - start == timedelta(hours=3)
    assert window.is_open(_at("Europe/Berlin", "2026-03-29T04:30"))


def test_window_on_the_fall_back_night_is_an_hour_longer() -> None:
    # Europe/Berlin repeats 02:00-03:00 on 2026-10-25.
    window = Window(time(1, 0), time(5, 0), ZoneInfo("Europe/Berlin"))
    start, end = window.current_or_next(_at("Europe/Berlin", "2026-10-25T01:30"))
    assert end - start == timedelta(hours=5)


def test_window_start_inside_the_skipped_hour_still_opens_once() -> None:
    window = Window(time(2, 30), time(4, 0), ZoneInfo("Europe/Berlin"))
    start, end = window.current_or_next(datetime(2026, 3, 28, 23, 0, tzinfo=UTC))
    assert start < end
    assert window.is_open(_at("Europe/Berlin", "2026-03-29T03:30"))


def test_counting_windows_that_ended_since_the_run_started() -> None:
    window = Window(time(1, 0), time(5, 0), ZoneInfo("UTC"))
    started = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    assert window.ends_between(started, datetime(2026, 1, 2, 4, 0, tzinfo=UTC)) == 0
    assert window.ends_between(started, datetime(2026, 1, 2, 5, 0, tzinfo=UTC)) == 1
    assert window.ends_between(started, datetime(2026, 1, 5, 6, 0, tzinfo=UTC)) == 4


def test_outside_the_window_validation_waits_for_the_next_start() -> None:
    settings = RunSettings(window_start="01:00", window_end="05:00", window_timezone="UTC")
    now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    decision = decide_window(settings, now=now, run_started_at=now)
    assert not decision.run_now
    assert decision.retry_at == datetime(2026, 1, 2, 1, 0, tzinfo=UTC)


def test_inside_the_window_validation_runs_until_the_window_end() -> None:
    settings = RunSettings(window_start="01:00", window_end="05:00", window_timezone="UTC")
    now = datetime(2026, 1, 2, 2, 0, tzinfo=UTC)
    decision = decide_window(settings, now=now, run_started_at=now)
    assert decision.run_now and decision.window_end == datetime(2026, 1, 2, 5, 0, tzinfo=UTC)


def test_validation_does_not_start_in_the_last_minute_of_the_window() -> None:
    settings = RunSettings(window_start="01:00", window_end="05:00", window_timezone="UTC")
    now = datetime(2026, 1, 2, 4, 59, 30, tzinfo=UTC)
    decision = decide_window(settings, now=now, run_started_at=now)
    assert not decision.run_now and decision.retry_at == datetime(2026, 1, 3, 1, 0, tzinfo=UTC)


def test_validate_now_overrides_a_closed_window() -> None:
    settings = RunSettings(validate_now=True)
    now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    assert decide_window(settings, now=now, run_started_at=now).run_now


def test_validation_gives_up_after_max_windows() -> None:
    settings = RunSettings(max_windows=2)
    started = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    waiting = decide_window(settings, now=datetime(2026, 1, 2, 12, 0, tzinfo=UTC), run_started_at=started)
    assert not waiting.run_now and waiting.windows_used == 1
    assert waiting.retry_at == datetime(2026, 1, 3, 1, 0, tzinfo=UTC)
    with pytest.raises(WindowsExhausted, match="2 window"):
        decide_window(settings, now=datetime(2026, 1, 3, 12, 0, tzinfo=UTC), run_started_at=started)


def test_a_whole_number_given_as_a_float_is_taken_as_the_integer_json_schema_says_it_is() -> None:
    settings = RunSettings.from_params({"batch_size": 1e3, "lock_timeout_ms": 1500.0})
    assert (settings.batch_size, settings.lock_timeout_ms) == (1000, 1500)
    assert isinstance(settings.batch_size, int) and isinstance(settings.lock_timeout_ms, int)
    with pytest.raises(InvalidSettings, match="batch_size"):
        RunSettings.from_params({"batch_size": 1000.5})
