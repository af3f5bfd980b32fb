"""A key on a partitioned child table (declarative partitioning, a DEFAULT partition among them): the index ON
ONLY the parent, built concurrently and attached partition by partition; the key NOT VALID on the parent and
validated partition by partition (PostgreSQL 18), or added and validated on each partition and then adopted by
the parent (15 and 16). Run on 18, and on 16 and 15 by the test command (KPI_TEST_PG), while an app writes to
every partition; killed in the middle of the index build and of the validation, cut by a window's end; each
converges on the next try, and a second run changes nothing.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from devkit.db_state import orphan_count, snapshot
from devkit.pipeline import run_pipeline
from fk_maintenance.db.session import LockBudgetSpent, lock_budget
from fk_maintenance.db.sqlfiles import statement
from fk_maintenance.errors import PreflightFailed
from fk_maintenance.keys.settings import RunSettings
from fk_maintenance.keys.spec import ForeignKeySpec
from fk_maintenance.steps.constraint import add_fk_not_valid, validate_fk
from fk_maintenance.steps.index import create_index_concurrently
from fk_maintenance.steps.orphans import null_orphans
from fk_maintenance.steps.preflight import preflight

READINGS = ForeignKeySpec(
    schema="public",
    table="readings",
    columns=("device_id",),
    ref_table="devices",
    ref_columns=("id",),
    row_key=("id", "taken_on"),
    constraint="readings_device_id_fkey",
    index="readings_device_id_idx",
    audit_table="readings_orphan_audit",
)
PARTITIONS = ("readings_2024", "readings_2025", "readings_2026", "readings_other")
ROWS = 40_000
DEVICES = 200
DEVICES_TABLE = {
    "plain": "CREATE TABLE devices (id int PRIMARY KEY, label text);",
    # Both tables partitioned: the parent's adoption (before 18) locks both trees.
    "partitioned": """
        CREATE TABLE devices (id int PRIMARY KEY, label text) PARTITION BY HASH (id);
        CREATE TABLE devices_0 PARTITION OF devices FOR VALUES WITH (MODULUS 2, REMAINDER 0);
        CREATE TABLE devices_1 PARTITION OF devices FOR VALUES WITH (MODULUS 2, REMAINDER 1);
    """,
}
SCHEMA = f"""
    CREATE TABLE readings (id bigserial, taken_on date NOT NULL, device_id int, value float8,
                           PRIMARY KEY (id, taken_on)) PARTITION BY RANGE (taken_on);
    CREATE TABLE readings_2024 PARTITION OF readings FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
    CREATE TABLE readings_2025 PARTITION OF readings FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
    CREATE TABLE readings_2026 PARTITION OF readings FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
    -- 2023 and 2027 land here.
    CREATE TABLE readings_other PARTITION OF readings DEFAULT;
    INSERT INTO devices SELECT g, 'device ' || g FROM generate_series(1, {DEVICES}) g;
    -- Every 50th reading points at a device that does not exist: orphans in every partition.
    INSERT INTO readings (taken_on, device_id, value)
    SELECT date '2023-07-01' + g % 1400, CASE WHEN g % 50 = 0 THEN 10000 + g % 7 ELSE 1 + g % {DEVICES} END, g
    FROM generate_series(1, {ROWS}) g;
    ANALYZE;
"""
SETTINGS = RunSettings(validate_now=True)
# What an app statement may take beyond lock_timeout on this 2-core machine: scheduling, not lock waits.
MARGIN_MS = 400


@pytest.fixture
def readings(db, request) -> Any:
    db.execute(DEVICES_TABLE[getattr(request, "param", "plain")] + SCHEMA)
    return db


class PartitionWriter:
    """The app: inserts readings dated into every partition's range (the DEFAULT one's too) and moves existing
    readings to other devices, through the parent, each statement timed."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.stop = threading.Event()
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.inserted_into: set[str] = set()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PartitionWriter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        rng = random.Random(3)
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self.stop.is_set():
                day = datetime(2023, 7, 1) + timedelta(days=rng.randrange(1400))
                started = time.monotonic()
                try:
                    if rng.random() < 0.5:
                        partition = conn.execute(
                            "INSERT INTO readings (taken_on, device_id, value) VALUES (%s, %s, 1) "
                            "RETURNING tableoid::regclass::text",
                            [day.date(), rng.randint(1, DEVICES)],
                        ).fetchone()[0]
                        self.inserted_into.add(partition)
                    else:
                        conn.execute(
                            "UPDATE readings SET device_id = %s WHERE id = %s AND device_id <= %s",
                            [rng.randint(1, DEVICES), rng.randint(1, ROWS), DEVICES],
                        )
                except psycopg.Error as error:
                    self.errors.append(f"{type(error).__name__}: {error}")
                self.latencies.append(time.monotonic() - started)
                time.sleep(0.005)

    @property
    def worst_ms(self) -> float:
        return max(self.latencies, default=0.0) * 1000


def key_on_partitions(db) -> dict[str, tuple[bool, bool]]:
    """Each partition: (holds our key as the parent's, validated)."""
    rows = db.query(
        "SELECT c.conrelid::regclass::text, c.conparentid <> 0, c.convalidated FROM pg_constraint c "
        "WHERE c.conname = %s AND c.conrelid IN (SELECT relid FROM pg_partition_tree('readings') WHERE isleaf)",
        [READINGS.constraint],
    )
    return {name: (inherited, valid) for name, inherited, valid in rows}


def indexed_partitions(db) -> dict[str, bool]:
    """Each partition whose index is attached to ours: whether it is valid."""
    rows = db.query(
        "SELECT i.indrelid::regclass::text, i.indisvalid FROM pg_inherits inh JOIN pg_index i "
        "ON i.indexrelid = inh.inhrelid WHERE inh.inhparent = %s::regclass",
        [READINGS.index],
    )
    return dict(rows)


def assert_converged(db, report: dict[str, Any]) -> None:
    assert report["final_state"] == "converged", report
    assert report["checks_failed"] == 0
    assert orphan_count(db, READINGS) == 0
    assert (
        db.scalar(
            "SELECT convalidated FROM pg_constraint WHERE conname = %s AND conrelid = 'readings'::regclass",
            [READINGS.constraint],
        )
        is True
    )
    assert db.scalar("SELECT indisvalid FROM pg_index WHERE indexrelid = %s::regclass", [READINGS.index]) is True
    assert key_on_partitions(db) == dict.fromkeys(PARTITIONS, (True, True))
    assert indexed_partitions(db) == dict.fromkeys(PARTITIONS, True)


@pytest.mark.parametrize("readings", ["plain", "partitioned"], indirect=True, ids=lambda kind: f"{kind}-devices")
def test_a_partitioned_child_with_a_default_partition_converges_while_the_app_writes_to_every_partition(
    readings, figures
) -> None:
    orphans = orphan_count(readings, READINGS)
    assert orphans == ROWS // 50
    with PartitionWriter(readings.dsn) as app:
        time.sleep(0.3)
        results = run_pipeline(readings.connect, READINGS, SETTINGS, "run-1")
        time.sleep(0.3)
    assert_converged(readings, results["report"])
    assert results["report"]["nulled"] == orphans
    assert app.inserted_into == set(PARTITIONS), "the app wrote to every partition during the run"
    assert app.errors == []
    assert app.worst_ms < SETTINGS.lock_timeout_ms + MARGIN_MS
    index = results["create_index_concurrently"]
    assert sorted(index["partitions_built"]) == [f"public.{name}" for name in PARTITIONS]
    assert results["validate_fk"]["partitions_validated"] == results["validate_fk"]["partitions"] == len(PARTITIONS)
    assert results["report"]["partitions"] == results["report"]["partitions_validated"] == len(PARTITIONS)
    # Preflight reports each partition and its size (the parent's own is 0): the table's is theirs summed.
    assert [line.split(":")[0] for line in results["preflight"]["partitions"]] == [f"public.{n}" for n in PARTITIONS]
    assert results["preflight"]["table_bytes"] > 1_000_000 and results["preflight"]["estimated_rows"] == ROWS

    settled = snapshot(readings, READINGS)
    again = run_pipeline(readings.connect, READINGS, SETTINGS, "run-2")
    assert again["report"]["nulled"] == 0 and again["report"]["final_state"] == "converged"
    assert again["create_index_concurrently"]["action"] == "none (already valid)"
    assert snapshot(readings, READINGS) == settled
    figures(
        f"{len(app.latencies)} app writes to {len(app.inserted_into)} partitions during the run, worst "
        f"{app.worst_ms:.0f} ms; {orphans} orphans nulled"
    )


def wait_for(predicate: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.02)
    raise AssertionError("timed out waiting")


def in_thread(function: Any, *args: Any, **kwargs: Any) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def body() -> None:
        try:
            outcome["result"] = function(*args, **kwargs)
        except Exception as error:
            outcome["error"] = error

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, outcome


@pytest.fixture
def open_write_on(readings) -> Iterator[Any]:
    """An app transaction that wrote to one partition and stays open: a concurrent index build on that partition,
    or a VALIDATE of it, waits for it."""
    held: list[psycopg.Connection] = []

    def hold(partition: str, lock: str | None = None) -> psycopg.Connection:
        conn = readings.connect()
        conn.autocommit = False
        if lock:
            conn.execute(f"LOCK TABLE {partition} IN {lock} MODE")
        else:
            conn.execute(f"UPDATE {partition} SET value = value WHERE id = (SELECT min(id) FROM {partition})")
        held.append(conn)
        return conn

    yield hold
    for conn in held:
        conn.close()


def test_a_kill_in_the_middle_of_the_partitions_index_build_converges_on_the_next_run(
    readings, open_write_on, figures
) -> None:
    # The third partition's build waits for an open app transaction; the session building it is killed there.
    blocker = open_write_on("readings_2026")
    with readings.connect() as conn:
        thread, outcome = in_thread(create_index_concurrently, conn, READINGS, SETTINGS)
        builder = wait_for(
            lambda: readings.query(
                "SELECT p.pid FROM pg_stat_progress_create_index p WHERE p.relid = 'readings_2026'::regclass"
            )
        )[0][0]
        readings.execute("SELECT pg_terminate_backend(%s)", [builder])
        thread.join(timeout=30)
    assert isinstance(outcome.get("error"), psycopg.OperationalError), outcome
    # Left behind: the parent's index INVALID, two partitions attached, an INVALID build on the third.
    assert readings.scalar("SELECT indisvalid FROM pg_index WHERE indexrelid = %s::regclass", [READINGS.index]) is False
    assert indexed_partitions(readings) == {"readings_2024": True, "readings_2025": True}
    leftover = readings.scalar(
        "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass('readings_2026_readings_device_id_idx')"
    )
    assert leftover is False
    # The app's transaction ends; the next run goes on from the third partition.
    blocker.rollback()
    results = run_pipeline(readings.connect, READINGS, SETTINGS, "run-2")
    assert_converged(readings, results["report"])
    assert sorted(results["create_index_concurrently"]["partitions_built"]) == [
        "public.readings_2026",
        "public.readings_other",
    ]
    figures("index build killed at the third of 4 partitions; the next run built the last 2 and attached them")


@pytest.mark.parametrize("stop", ["window ends", "session killed"])
def test_validation_stopped_between_partitions_keeps_the_partitions_done_and_the_next_try_goes_on(
    readings, open_write_on, stop, figures
) -> None:
    with readings.connect() as conn:
        null_orphans(conn, READINGS, SETTINGS, "run-1")
        create_index_concurrently(conn, READINGS, SETTINGS)
        add_fk_not_valid(conn, READINGS, SETTINGS)
    # On 18 the parent holds the key NOT VALID and each partition the parent's; before 18 each partition its own.
    on_18 = int(readings.scalar("SHOW server_version_num")) >= 180000
    assert key_on_partitions(readings) == dict.fromkeys(PARTITIONS, (on_18, False))
    assert (
        readings.scalar("SELECT count(*) FROM pg_constraint WHERE conrelid = 'readings'::regclass AND contype = 'f'")
        == on_18
    )
    started = datetime(2026, 3, 3, 1, 0, tzinfo=UTC)
    if stop == "window ends":
        # Each look at the clock is 90 minutes later: the window (01:00-05:00) has room for two partitions.
        window = RunSettings(window_start="01:00", window_end="05:00", window_timezone="UTC")
        looks = iter(started + timedelta(minutes=90 * i) for i in range(100))
        with readings.connect() as conn:
            cut = validate_fk(conn, READINGS, window, "run-1", run_started_at=started, now=lambda: next(looks))
        assert cut["outcome"] == "reschedule", cut
        assert cut["partitions_validated"] == 2 and cut["partitions"] == len(PARTITIONS)
    else:
        # The third partition's VALIDATE waits on an app's lock; the validating session is killed there.
        blocker = open_write_on("readings_2026", lock="SHARE ROW EXCLUSIVE")
        patient = RunSettings(validate_now=True, lock_timeout_ms=20_000)
        with readings.connect() as conn:
            thread, outcome = in_thread(validate_fk, conn, READINGS, patient, "run-1", run_started_at=started)
            validator = wait_for(
                lambda: readings.query(
                    "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE 'ALTER TABLE%%'"
                )
            )[0][0]
            readings.execute("SELECT pg_terminate_backend(%s)", [validator])
            thread.join(timeout=30)
        assert isinstance(outcome.get("error"), psycopg.OperationalError), outcome
        blocker.rollback()
    done = key_on_partitions(readings)
    assert sorted(name for name, (_, valid) in done.items() if valid) == ["readings_2024", "readings_2025"]

    with readings.connect() as conn:
        finished = validate_fk(conn, READINGS, SETTINGS, "run-1", run_started_at=started)
    assert finished["outcome"] == "validated"
    # Only the partitions not done before were scanned.
    assert sorted(finished["partitions_validated_now"]) == ["public.readings_2026", "public.readings_other"]
    report = run_pipeline(readings.connect, READINGS, SETTINGS, "run-2")["report"]
    assert_converged(readings, report)
    figures(f"{stop}: 2 of {len(PARTITIONS)} partitions kept, the next try validated the other 2")


def test_a_partition_created_between_adding_and_validating_the_key_gets_it_and_its_orphans_are_swept(
    readings, figures
) -> None:
    with readings.connect() as conn:
        null_orphans(conn, READINGS, SETTINGS, "run-1")
        create_index_concurrently(conn, READINGS, SETTINGS)
        add_fk_not_valid(conn, READINGS, SETTINGS)
    # The app adds next decade's partition and writes a reading of a device that does not exist into it.
    readings.execute(
        "CREATE TABLE readings_2030 PARTITION OF readings FOR VALUES FROM ('2030-01-01') TO ('2031-01-01')"
    )
    on_18 = int(readings.scalar("SHOW server_version_num")) >= 180000
    orphan = "INSERT INTO readings (taken_on, device_id, value) VALUES ('2030-05-01', 99999, 1)"
    if on_18:
        # 18: the new partition took the parent's NOT VALID key, which checks new writes.
        with pytest.raises(psycopg.errors.ForeignKeyViolation):
            readings.execute(orphan)
    else:
        # 15, 16: the parent has no key yet, so the new partition has none and accepts the orphan.
        readings.execute(orphan)
        assert "readings_2030" not in key_on_partitions(readings)
    assert indexed_partitions(readings)["readings_2030"] is True  # PostgreSQL built and attached it itself
    with readings.connect() as conn:
        done = validate_fk(conn, READINGS, SETTINGS, "run-1", run_started_at=datetime.now(UTC))
    assert done["outcome"] == "validated"
    assert done["resweep"]["nulled"] == (0 if on_18 else 1)
    assert "public.readings_2030" in done["partitions_validated_now"]
    report = run_pipeline(readings.connect, READINGS, SETTINGS, "run-2")["report"]
    assert report["final_state"] == "converged" and report["checks_failed"] == 0
    assert key_on_partitions(readings) == dict.fromkeys((*PARTITIONS, "readings_2030"), (True, True))
    figures(f"partition created mid-run: {'rejected the orphan' if on_18 else 'its orphan swept before VALIDATE'}")


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        pytest.param(
            "ALTER TABLE readings_2025 ADD CONSTRAINT readings_device_id_fkey FOREIGN KEY (device_id) "
            "REFERENCES devices (id) ON DELETE SET NULL DEFERRABLE NOT VALID",
            "constraint readings_device_id_fkey already exists on partition public.readings_2025 with another "
            "definition (it is DEFERRABLE INITIALLY IMMEDIATE, not NOT DEFERRABLE)",
            id="deferrable-key-of-our-name-on-a-partition",
        ),
        pytest.param(
            "ALTER TABLE readings_2025 ADD CONSTRAINT readings_device_id_fkey FOREIGN KEY (device_id) "
            "REFERENCES devices (id) ON DELETE SET NULL ON UPDATE CASCADE NOT VALID",
            "(it is ON UPDATE CASCADE, not ON UPDATE NO ACTION)",
            id="on-update-cascade-key-of-our-name-on-a-partition",
        ),
        pytest.param(
            "CREATE INDEX readings_2025_readings_device_id_idx ON readings_2025 (value)",
            "index public.readings_2025_readings_device_id_idx, the name this run gives partition "
            "public.readings_2025's index, already exists with another definition",
            id="our-partition-index-name-taken",
        ),
        pytest.param(
            'CREATE ROLE "Other Owner"; ALTER TABLE readings_other OWNER TO "Other Owner"',
            "partition public.readings_other is owned by Other Owner, not by",
            id="partition-owned-by-another-role",
        ),
    ],
)
def test_what_stands_in_the_way_on_one_partition_is_refused_before_any_change(readings, setup, reason) -> None:
    readings.execute(setup)
    try:
        before = snapshot(readings, READINGS)
        with readings.connect() as conn, pytest.raises(PreflightFailed) as refused:
            preflight(conn, READINGS, SETTINGS)
        assert reason in str(refused.value)
        assert snapshot(readings, READINGS) == before
        if "Owner" in setup:
            assert "ALTER TABLE public.readings_other OWNER TO" in str(refused.value)  # the fix, ready to paste
    finally:
        if "Owner" in setup:  # roles outlive the test's database
            readings.execute('ALTER TABLE readings_other OWNER TO CURRENT_USER; DROP ROLE "Other Owner"')


def test_a_statement_locking_partition_after_partition_keeps_the_app_waiting_at_most_lock_timeout_in_all(
    readings, open_write_on, figures
) -> None:
    """The adoption's LOCK takes the parent's partitions one by one, each under lock_timeout: without the budget,
    an app write to a partition locked early waits for every later lock too."""
    lock_ms = 1000
    first, second = open_write_on("readings_2025"), open_write_on("readings_2026")
    releases = [threading.Timer(0.8, first.rollback), threading.Timer(1.6, second.rollback)]
    for release in releases:  # our LOCK gets readings_2025 after 0.8 s and readings_2026 after 1.6 s
        release.start()
    waited: dict[str, float] = {}

    def app_write() -> None:
        time.sleep(0.2)  # once our LOCK holds readings_2024
        with readings.connect() as app:
            started = time.monotonic()
            app.execute("INSERT INTO readings_2024 (taken_on, device_id, value) VALUES ('2024-05-01', 1, 1)")
            waited["app"] = time.monotonic() - started

    app = threading.Thread(target=app_write)
    app.start()
    started = time.monotonic()
    with (
        readings.connect() as conn,
        pytest.raises(LockBudgetSpent),
        conn.transaction(),
        lock_budget(conn, lock_timeout_ms=lock_ms, budget_ms=lock_ms),
    ):
        conn.execute(statement("constraint", "lock_for_adoption", READINGS))
    ours = time.monotonic() - started
    app.join(timeout=10)
    for release in releases:
        release.join()
    assert ours < lock_ms / 1000 + 0.3
    assert waited["app"] < lock_ms / 1000
    figures(
        f"LOCK over 4 partitions cut at {ours * 1000:.0f} ms; the app's write behind it waited "
        f"{waited['app'] * 1000:.0f} ms (lock_timeout_ms {lock_ms}; 1.6 s of waits without the budget)"
    )
