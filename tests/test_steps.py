"""Each step of the library against a real PostgreSQL: with orphans, without, already converged, on
conflicting objects, with identifiers that need quoting, and under a role that may only read."""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import UTC, datetime

import psycopg
import pytest
from psycopg import errors as pgerrors
from psycopg import sql

from devkit.app_db import build_app_database
from devkit.db_state import orphan_count, revive_parent, snapshot
from devkit.pipeline import run_pipeline
from fk_maintenance.errors import ConcurrentRun, LockNotAcquired, PostChecksFailed, PreflightFailed
from fk_maintenance.keys.settings import RunSettings
from fk_maintenance.keys.spec import ForeignKeySpec
from fk_maintenance.records.restore import restore_run
from fk_maintenance.steps.checks import post_checks
from fk_maintenance.steps.constraint import add_fk_not_valid, validate_fk
from fk_maintenance.steps.index import create_index_concurrently
from fk_maintenance.steps.orphans import detect_orphans, null_orphans
from fk_maintenance.steps.preflight import preflight

NOW = RunSettings(validate_now=True)


def test_pipeline_on_a_table_with_orphans_nulls_and_audits_each_and_converges(db, spec) -> None:
    generated = db.build(5000, orphan_ratio=0.02)
    assert generated.orphans > 50 and generated.missing_parents < generated.orphans  # shared missing parents
    before = dict(db.query("SELECT id, parent_kpi_id FROM vision_kpis"))
    results = run_pipeline(db.connect, spec, replace(NOW, batch_size=17), "run-1")
    assert results["detect_orphans"]["orphans"] == generated.orphans
    assert results["detect_orphans"]["dangling_parents"] == generated.missing_parents
    assert results["null_orphans"]["nulled"] == generated.orphans
    assert results["null_orphans"]["batches"] == -(-generated.orphans // 17)
    assert results["report"]["final_state"] == "converged"
    audit = dict(
        db.query("SELECT kpi_id, old_parent_kpi_id FROM fk_maintenance.vision_kpis_orphan_audit WHERE run_id = 'run-1'")
    )
    after = dict(db.query("SELECT id, parent_kpi_id FROM vision_kpis"))
    changed = {k: v for k, v in before.items() if after[k] != v}
    assert audit == changed  # every nulled pointer audited with its old value, nothing else changed
    assert all(after[k] is None for k in changed)
    assert orphan_count(db, spec) == 0


def test_pipeline_on_a_table_without_orphans_changes_no_row(db, spec) -> None:
    db.build(2000, orphan_ratio=0)
    data_before = snapshot(db, spec)["data"]
    results = run_pipeline(db.connect, spec, NOW, "run-1")
    assert results["detect_orphans"]["orphans"] == 0
    assert results["null_orphans"]["nulled"] == 0
    assert snapshot(db, spec)["data"] == data_before
    assert results["report"]["final_state"] == "converged"


def test_second_run_on_a_converged_database_changes_nothing_and_passes(db, spec) -> None:
    db.build(3000)
    run_pipeline(db.connect, spec, NOW, "run-1")
    before = snapshot(db, spec)
    results = run_pipeline(db.connect, spec, NOW, "run-2")
    assert snapshot(db, spec) == before
    assert results["null_orphans"]["nulled"] == 0
    assert results["create_index_concurrently"]["action"] == "none (already valid)"
    assert results["add_fk_not_valid"]["action"] == "none (already exists)"
    assert results["validate_fk"]["outcome"] == "already validated"
    assert results["post_checks"]["failed"] == 0


def test_restore_puts_back_pointers_whose_parent_exists_again(db, spec) -> None:
    db.build(3000, orphan_ratio=0.03)
    run_pipeline(db.connect, spec, NOW, "run-1")
    audit = db.query(
        "SELECT kpi_id, old_parent_kpi_id FROM fk_maintenance.vision_kpis_orphan_audit "
        "WHERE run_id = 'run-1' ORDER BY kpi_id"
    )
    revived_parent = audit[0][1]
    revive_parent(db, revived_parent)
    with db.connect() as conn:
        result = restore_run(conn, spec, NOW, "run-1", "restore-1")
    expected = {kpi for kpi, parent in audit if parent == revived_parent}
    assert (result["restored"], result["audited"]) == (len(expected), len(audit))
    assert result["parent_still_missing"] == result["still_missing"] == len(audit) - len(expected)
    restored = {kpi for (kpi,) in db.query("SELECT id FROM vision_kpis WHERE parent_kpi_id = %s", [revived_parent])}
    assert restored == expected
    still_null = db.scalar(
        "SELECT count(*) FROM vision_kpis k JOIN fk_maintenance.vision_kpis_orphan_audit a ON a.kpi_id = k.id "
        "WHERE k.parent_kpi_id IS NULL"
    )
    assert still_null == len(audit) - len(expected)


def test_dry_run_as_a_select_only_role_changes_nothing(db, spec) -> None:
    db.build(3000)
    db.execute(
        "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'kpi_reader') THEN "
        "CREATE ROLE kpi_reader LOGIN; END IF; END $$"
    )
    db.execute("GRANT USAGE ON SCHEMA public TO kpi_reader; GRANT SELECT ON vision_kpis TO kpi_reader")
    before = snapshot(db, spec)

    def reader() -> psycopg.Connection:
        return psycopg.connect(db.dsn, user="kpi_reader", autocommit=True)

    results = run_pipeline(reader, spec, RunSettings(dry_run=True, validate_now=True), "dry-1")
    assert snapshot(db, spec) == before
    assert results["detect_orphans"]["orphans"] > 0
    assert results["null_orphans"]["skipped"] == "dry run"
    assert results["create_index_concurrently"]["action"] == "dry run: would build"
    assert results["add_fk_not_valid"]["action"] == "dry run: would add NOT VALID"
    assert results["validate_fk"]["outcome"] == "dry run"
    assert results["post_checks"]["failed"] > 0  # reported, not raised: nothing converged in a dry run
    assert results["report"]["final_state"] == "dry run: nothing changed"


@pytest.mark.parametrize(
    ("conflict", "message"),
    [
        (
            "ALTER TABLE vision_kpis ADD CONSTRAINT vision_kpis_parent_kpi_id_fkey FOREIGN KEY (parent_kpi_id) "
            "REFERENCES vision_kpis(id) ON DELETE CASCADE NOT VALID",
            "ON DELETE CASCADE, not ON DELETE SET NULL",
        ),
        (
            "ALTER TABLE vision_kpis ADD CONSTRAINT vision_kpis_parent_kpi_id_fkey CHECK (parent_kpi_id <> id)",
            "it is not a foreign key",
        ),
        (
            "CREATE INDEX vision_kpis_parent_kpi_idx ON vision_kpis (user_id)",
            "its columns are not exactly (parent_kpi_id)",
        ),
        (
            "CREATE INDEX vision_kpis_parent_kpi_idx ON vision_kpis USING hash (parent_kpi_id)",
            "it uses hash, not btree",
        ),
        ("CREATE TABLE vision_kpis_parent_kpi_idx (x int)", "(not an index) already has the name"),
    ],
)
def test_a_conflicting_object_of_our_name_fails_clearly_with_nothing_changed(db, spec, conflict, message) -> None:
    db.build(1000)
    db.execute(conflict)
    before = snapshot(db, spec)
    with db.connect() as conn, pytest.raises(PreflightFailed, match="nothing was changed") as caught:
        preflight(conn, spec, NOW)
    assert message in str(caught.value)
    for step, kwargs in [
        (null_orphans, {"run_id": "r"}),
        (create_index_concurrently, {}),
        (add_fk_not_valid, {}),
    ]:
        with db.connect() as conn, pytest.raises(PreflightFailed):
            step(conn, spec, NOW, **kwargs)
    assert snapshot(db, spec) == before


def test_an_invalid_leftover_index_is_dropped_and_rebuilt(db, spec) -> None:
    db.build(1000, orphan_ratio=0)
    # A concurrent build that fails (duplicates under UNIQUE) leaves an INVALID index of our name behind.
    with db.connect() as conn, pytest.raises(pgerrors.UniqueViolation):
        conn.execute("CREATE UNIQUE INDEX CONCURRENTLY vision_kpis_parent_kpi_idx ON vision_kpis (user_id)")
    assert (
        db.scalar("SELECT indisvalid FROM pg_index WHERE indexrelid = 'vision_kpis_parent_kpi_idx'::regclass") is False
    )
    with db.connect() as conn:
        assert "INVALID" in preflight(conn, spec, NOW)["index"]
        result = create_index_concurrently(conn, spec, NOW)
    assert result["action"] == "rebuilt (dropped INVALID leftover)"
    assert db.scalar("SELECT pg_get_indexdef('vision_kpis_parent_kpi_idx'::regclass)") == (
        "CREATE INDEX vision_kpis_parent_kpi_idx ON public.vision_kpis USING btree (parent_kpi_id)"
    )
    assert (
        db.scalar("SELECT indisvalid FROM pg_index WHERE indexrelid = 'vision_kpis_parent_kpi_idx'::regclass") is True
    )


def test_identifiers_that_need_quoting_work(db) -> None:
    quoted = ForeignKeySpec(
        schema='App "Data"',
        table="Vision KPIs",
        columns='Parent"Id',
        ref_table="Vision KPIs",
        ref_columns="Id",
        row_key="Id",
        constraint='fk "parent"; DROP TABLE x',
        index="Idx Parent",
        audit_schema='FK "Maint" Audit',
        audit_table="Orphan Audit",
    )
    with db.connect() as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(quoted.schema)))
        conn.execute(
            sql.SQL("CREATE TABLE {t} ({id} uuid PRIMARY KEY, {p} uuid, title text)").format(
                t=sql.Identifier(quoted.schema, quoted.table),
                id=sql.Identifier("Id"),
                p=sql.Identifier(*quoted.columns),
            )
        )
        conn.execute(
            sql.SQL(
                "INSERT INTO {t} SELECT md5(g::text)::uuid, CASE WHEN g % 7 = 0 THEN gen_random_uuid() "
                "WHEN g > 1 THEN md5((g / 2)::text)::uuid END, 'kpi ' || g FROM generate_series(1, 300) g"
            ).format(t=sql.Identifier(quoted.schema, quoted.table))
        )
    orphans = orphan_count(db, quoted)
    assert orphans > 0
    results = run_pipeline(db.connect, quoted, replace(NOW, max_depth=20), "quoted-1")
    assert results["null_orphans"]["nulled"] == orphans
    assert results["report"]["final_state"] == "converged"
    assert db.scalar("SELECT convalidated FROM pg_constraint WHERE conname = %s", [quoted.constraint]) is True
    with db.connect() as conn:
        audit = sql.Identifier(quoted.audit_schema, quoted.audit_table)
        assert conn.execute(sql.SQL("SELECT count(*) FROM {}").format(audit)).fetchone()[0] == orphans


def test_after_the_run_the_database_rejects_a_missing_parent_and_deleting_a_parent_keeps_its_children(db, spec) -> None:
    db.build(2000)
    run_pipeline(db.connect, spec, NOW, "run-1")
    with db.connect() as conn, pytest.raises(pgerrors.ForeignKeyViolation):
        conn.execute(
            "INSERT INTO vision_kpis (user_id, vision_id, level, title, parent_kpi_id) "
            "VALUES (gen_random_uuid(), gen_random_uuid(), 'daily', 'x', gen_random_uuid())"
        )
    parent = db.scalar("SELECT parent_kpi_id FROM vision_kpis WHERE parent_kpi_id IS NOT NULL LIMIT 1")
    children = db.scalar("SELECT count(*) FROM vision_kpis WHERE parent_kpi_id = %s", [parent])
    total = db.scalar("SELECT count(*) FROM vision_kpis")
    db.execute("DELETE FROM vision_kpis WHERE id = %s", [parent])
    assert db.scalar("SELECT count(*) FROM vision_kpis") == total - 1  # the children survive, as roots
    assert children > 0
    assert db.scalar("SELECT count(*) FROM vision_kpis WHERE parent_kpi_id = %s", [parent]) == 0


def _converged(db, spec, rows: int = 500) -> None:
    db.build(rows, orphan_ratio=0)
    run_pipeline(db.connect, spec, NOW, "run-1")


def test_post_checks_fail_on_a_cycle_and_name_its_ids(db, spec) -> None:
    _converged(db, spec)
    a, b = _make_cycle(db)
    with db.connect() as conn, pytest.raises(PostChecksFailed, match="no cycles in the hierarchy") as caught:
        post_checks(conn, spec, NOW)
    assert str(a) in str(caught.value) and str(b) in str(caught.value)
    assert len(caught.value.failures) == 1


def test_preflight_refuses_data_with_a_cycle_before_anything_changes_and_names_its_ids(db, spec) -> None:
    generated = db.build(800)
    a, b = _make_cycle(db)
    before = snapshot(db, spec)
    with db.connect() as conn, pytest.raises(PreflightFailed, match="no cycles in the hierarchy") as caught:
        preflight(conn, spec, NOW)
    assert str(a) in str(caught.value) and str(b) in str(caught.value) and "fix the data" in str(caught.value)
    assert snapshot(db, spec) == before and orphan_count(db, spec) == generated.orphans
    # Orphans are not cycles: the chains below them become roots once their pointers are nulled.
    db.execute("UPDATE vision_kpis SET parent_kpi_id = NULL WHERE id IN (%s, %s)", [a, b])
    with db.connect() as conn:
        assert preflight(conn, spec, NOW)["table"] == "public.vision_kpis"


def test_post_checks_fail_on_a_chain_deeper_than_max_depth_and_name_it(db, spec) -> None:
    _converged(db, spec)
    daily = db.scalar("SELECT id FROM vision_kpis WHERE level = 'daily' LIMIT 1")
    extra = db.scalar(
        "INSERT INTO vision_kpis (user_id, vision_id, level, title, parent_kpi_id) "
        "VALUES (gen_random_uuid(), gen_random_uuid(), 'daily', 'too deep', %s) RETURNING id",
        [daily],
    )
    with db.connect() as conn, pytest.raises(PostChecksFailed, match="hierarchy depth at most 5") as caught:
        post_checks(conn, spec, NOW)
    assert f"the deepest chain has 6 levels; e.g. 6 levels: {extra} -> {daily} -> " in str(caught.value)
    with db.connect() as conn:
        assert post_checks(conn, spec, replace(NOW, max_depth=6))["failed"] == 0


def _make_cycle(db) -> tuple:
    a, b = (row[0] for row in db.query("SELECT id FROM vision_kpis WHERE level = 'daily' ORDER BY id LIMIT 2"))
    db.execute("UPDATE vision_kpis SET parent_kpi_id = %s WHERE id = %s", [b, a])
    db.execute("UPDATE vision_kpis SET parent_kpi_id = %s WHERE id = %s", [a, b])
    return a, b


def test_post_checks_report_every_failure_not_just_the_first(db, spec) -> None:
    db.build(500)
    _make_cycle(db)
    with db.connect() as conn, pytest.raises(PostChecksFailed) as caught:
        post_checks(conn, spec, NOW)
    names = " | ".join(caught.value.failures)
    for expected in (
        "constraint exists",
        "constraint is validated",
        "index exists",
        "index is valid",
        "zero orphans",
        "no cycles",
    ):
        assert expected in names


def test_adding_the_constraint_while_the_app_holds_a_lock_fails_clearly_after_its_attempts(db, spec) -> None:
    db.build(500, orphan_ratio=0)
    with db.connect() as app:
        app.autocommit = False
        app.execute("UPDATE vision_kpis SET title = title || '!' WHERE id = (SELECT id FROM vision_kpis LIMIT 1)")
        settings = replace(NOW, lock_timeout_ms=100, lock_attempts=3, gap_watch_seconds=1)
        with db.connect() as conn, pytest.raises(LockNotAcquired, match="no lock within 3 attempts") as caught:
            add_fk_not_valid(conn, spec, settings)
        # Never queued behind the open transaction: each attempt watched, saw it old, and was not made.
        assert "3 not tried because of long transactions" in str(caught.value)
        assert "RowExclusiveLock" in str(caught.value)  # names the session in the way
        app.rollback()
    assert db.scalar("SELECT count(*) FROM pg_constraint WHERE conname = %s", [spec.constraint]) == 0


def test_adding_the_constraint_strikes_the_moment_the_app_transaction_ends(db, spec) -> None:
    db.build(500, orphan_ratio=0)
    app = db.connect()
    app.autocommit = False
    app.execute("UPDATE vision_kpis SET title = title WHERE id = (SELECT id FROM vision_kpis LIMIT 1)")
    polls: list[float] = []

    def end_app_transaction_after_a_few_polls(seconds: float) -> None:
        polls.append(seconds)
        if len(polls) == 5:
            app.rollback()

    with db.connect() as conn:
        result = add_fk_not_valid(
            conn, spec, replace(NOW, lock_timeout_ms=100), sleep=end_app_transaction_after_a_few_polls
        )
    app.close()
    assert result["action"] == "added NOT VALID"
    assert result["attempts"] == 1 and result["struck_in_gap"] == 1 and result["lock_timeouts"] == 0
    assert len(polls) == 5


def test_a_second_run_stops_with_a_clear_message_while_another_holds_the_run_lock(db, spec) -> None:
    db.build(500)
    with db.connect() as other:
        other.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", [spec.advisory_lock_name])
        before = snapshot(db, spec)
        for step, kwargs in [(null_orphans, {"run_id": "r"}), (create_index_concurrently, {}), (add_fk_not_valid, {})]:
            with (
                db.connect() as conn,
                pytest.raises(ConcurrentRun, match=r"another run is changing .* holds the run lock"),
            ):
                step(conn, spec, NOW, **kwargs)
        assert snapshot(db, spec) == before


def test_preflight_names_the_missing_privilege(db, spec) -> None:
    db.build(200)
    db.execute(
        "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'kpi_app') THEN "
        "CREATE ROLE kpi_app LOGIN; END IF; END $$"
    )
    db.execute("GRANT USAGE ON SCHEMA public TO kpi_app; GRANT SELECT ON vision_kpis TO kpi_app")
    with psycopg.connect(db.dsn, user="kpi_app", autocommit=True) as conn, pytest.raises(PreflightFailed) as caught:
        preflight(conn, spec, NOW)
    message = str(caught.value)
    assert "lacks ownership of public.vision_kpis (owner: postgres;" in message
    assert "lacks UPDATE on public.vision_kpis" in message
    assert "lacks REFERENCES" in message


def test_validation_re_sweeps_orphans_written_before_the_constraint_arrived(db, spec) -> None:
    db.build(1000)
    with db.connect() as conn:
        null_orphans(conn, spec, NOW, "run-1")
    late = db.scalar(
        "INSERT INTO vision_kpis (user_id, vision_id, level, title, parent_kpi_id) "
        "VALUES (gen_random_uuid(), gen_random_uuid(), 'daily', 'late', gen_random_uuid()) RETURNING id"
    )
    with db.connect() as conn:
        create_index_concurrently(conn, spec, NOW)
        add_fk_not_valid(conn, spec, NOW)
    with db.connect() as conn:
        result = validate_fk(conn, spec, NOW, "run-1", run_started_at=datetime.now(UTC))
    assert result["outcome"] == "validated" and result["resweep"]["nulled"] == 1
    assert db.scalar(
        "SELECT old_parent_kpi_id IS NOT NULL FROM fk_maintenance.vision_kpis_orphan_audit WHERE kpi_id = %s", [late]
    )


def test_validation_outside_the_window_asks_to_be_rescheduled_without_touching_the_table(db, spec) -> None:
    db.build(500)
    with db.connect() as conn:
        null_orphans(conn, spec, NOW, "run-1")
        add_fk_not_valid(conn, spec, NOW)
    noon = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    with db.connect() as conn:
        result = validate_fk(conn, spec, RunSettings(), "run-1", run_started_at=noon, now=lambda: noon)
    assert result["outcome"] == "reschedule" and result["retry_at"] == "2026-01-02T01:00:00+00:00"
    assert db.scalar("SELECT convalidated FROM pg_constraint WHERE conname = %s", [spec.constraint]) is False


def test_detect_orphans_counts_with_an_anti_join_and_samples(db, spec) -> None:
    generated = db.build(4000)
    with db.connect() as conn:
        result = detect_orphans(conn, spec, replace(NOW, sample_size=3))
    assert result["orphans"] == generated.orphans and len(result["sample"]) == 3
    assert all(" -> " in item for item in result["sample"])


def test_the_generator_makes_five_levels_with_about_one_percent_orphans(db) -> None:
    with db.connect() as conn:
        generated = build_app_database(conn, 34_100)
    levels = dict(db.query("SELECT level, count(*) FROM vision_kpis GROUP BY level"))
    assert levels == {"yearly": 100, "quarterly": 400, "monthly": 1600, "weekly": 6400, "daily": 25600}
    assert 0.008 < generated.orphans / generated.rows < 0.012


def test_null_orphans_skips_rows_the_app_holds_and_the_re_sweep_gets_them(db, spec) -> None:
    db.build(1000)
    held = db.scalar(
        "SELECT c.id FROM vision_kpis c WHERE c.parent_kpi_id IS NOT NULL "
        "AND NOT EXISTS (SELECT 1 FROM vision_kpis p WHERE p.id = c.parent_kpi_id) LIMIT 1"
    )
    app = db.connect()
    app.autocommit = False
    app.execute("SELECT 1 FROM vision_kpis WHERE id = %s FOR UPDATE", [held])
    with db.connect() as conn:
        result = null_orphans(conn, spec, NOW, "run-1")
    assert result["left_alone"] == 1
    app.rollback()
    app.close()
    with db.connect() as conn:
        assert null_orphans(conn, spec, NOW, "run-1")["nulled"] == 1
    assert orphan_count(db, spec) == 0


def test_the_report_of_a_run_whose_step_failed_says_incomplete_even_in_a_dry_run(spec) -> None:
    from fk_maintenance.steps.report import build_report

    only_preflight = {"preflight": {"seconds": 0.01, "server_version": "18"}}
    for settings in (NOW, RunSettings(dry_run=True)):
        report = build_report(spec, settings, "run-x", only_preflight)
        assert not report["succeeded"]
        assert report["final_state"].startswith("incomplete: detect_orphans, null_orphans")


def test_the_report_counts_what_the_audit_holds_for_the_run_not_what_the_last_try_returned(db, spec) -> None:
    from fk_maintenance.steps.report import build_report, read_audited

    generated = db.build(2000, orphan_ratio=0.02)
    # A first try commits every batch, then dies before it can return; the retry finds nothing left to null.
    with db.connect() as conn:
        null_orphans(conn, spec, replace(NOW, batch_size=7), "run-1")
    with db.connect() as conn:
        retry = null_orphans(conn, spec, NOW, "run-1")
    assert retry["nulled"] == 0
    results = {"null_orphans": retry}
    report = build_report(spec, NOW, "run-1", results, audited=read_audited(db.connect, spec, NOW, "run-1"))
    assert report["nulled"] == report["audited"] == generated.orphans
    assert report["counted_from"] == "the audit table" and "WHERE run_id = 'run-1'" in report["restore_hint"]
    # Another run's id counts only its own.
    assert read_audited(db.connect, spec, NOW, "run-2") == 0


def test_failed_post_checks_are_in_the_report_and_a_check_that_could_not_be_tried_is_not_counted_passed(
    db, spec
) -> None:
    from fk_maintenance.steps.report import build_report

    db.build(500)
    results = run_pipeline(db.connect, spec, NOW, "run-1")
    assert results["post_checks"]["not_tried"] == 0
    db.execute("DROP INDEX vision_kpis_parent_kpi_idx")
    with db.connect() as conn, pytest.raises(PostChecksFailed) as failed:
        post_checks(conn, spec, NOW)
    results["post_checks"] = failed.value.summary  # what the Airflow task leaves for the report when it fails
    report = build_report(spec, NOW, "run-1", results)
    assert report["final_state"] == "not converged: post-checks failed" and not report["succeeded"]
    assert "index exists" in report["failed_checks"] and report["checks_failed"] == len(report["failed_checks"])

    db.execute("DELETE FROM vision_kpis")  # no row left to point at a missing parent
    db.execute("CREATE INDEX vision_kpis_parent_kpi_idx ON vision_kpis (parent_kpi_id)")
    with db.connect() as conn:
        summary = post_checks(conn, spec, NOW)
    not_tried = {c["name"]: c["detail"] for c in summary["checks"] if c["ok"] is None}
    assert set(not_tried) == {
        "database rejects a missing parent (SQLSTATE 23503)",  # no row to point at a missing parent
        "planner can use vision_kpis_parent_kpi_idx for WHERE parent_kpi_id = $1",  # no pointer to look up
    }
    assert all(detail.startswith("not tried") for detail in not_tried.values())
    assert summary["passed"] == len(summary["checks"]) - 2 and summary["not_tried"] == 2
    report = build_report(spec, NOW, "run-1", {**results, "post_checks": summary})
    assert report["final_state"] == "converged" and sorted(report["not_tried_checks"]) == sorted(not_tried)


def test_errors_no_retry_can_fix_are_final_and_waits_that_pass_with_time_are_not(db) -> None:
    from fk_maintenance.errors import is_final

    def raised(statement: str) -> psycopg.Error:
        with db.connect() as conn, pytest.raises(psycopg.Error) as caught:
            conn.execute(statement)
        return caught.value

    db.execute(
        "CREATE TABLE lines (id int PRIMARY KEY, order_id int NOT NULL);"
        "CREATE TABLE parted (id int, at date) PARTITION BY RANGE (at)"
    )
    final = {
        "NOT NULL": raised("INSERT INTO lines VALUES (1, NULL)"),
        "a partitioned table": raised("CREATE INDEX CONCURRENTLY parted_at ON parted (at)"),
        "a subquery of several rows": raised("SELECT (SELECT generate_series(1, 2))"),
        "an undefined column": raised("SELECT no_such_column FROM lines"),
    }
    assert {what: is_final(error) for what, error in final.items()} == dict.fromkeys(final, True)
    with db.connect() as holder:
        holder.autocommit = False
        holder.execute("LOCK lines IN ACCESS EXCLUSIVE MODE")
        lock_timeout = raised("SET lock_timeout = 10; SELECT * FROM lines")
    db.execute(
        "CREATE TABLE parents (id int PRIMARY KEY); ALTER TABLE lines ADD FOREIGN KEY (order_id) REFERENCES parents"
    )
    passing = {
        "a lock timeout": lock_timeout,
        "a cancelled statement": raised("SET statement_timeout = 10; SELECT pg_sleep(1)"),
        "a foreign-key violation the re-sweep clears": raised("INSERT INTO lines VALUES (2, 42)"),
    }
    assert {what: is_final(error) for what, error in passing.items()} == dict.fromkeys(passing, False)


def test_each_step_sets_its_own_timeouts_whatever_the_database_defaults_are(db, spec) -> None:
    from fk_maintenance.db.session import step_session

    db.build(200)
    db.execute(sql.SQL("ALTER DATABASE {} SET lock_timeout = 0").format(sql.Identifier(db.name)))
    db.execute(sql.SQL("ALTER DATABASE {} SET statement_timeout = 0").format(sql.Identifier(db.name)))
    db.execute(sql.SQL("ALTER DATABASE {} SET max_parallel_workers_per_gather = 1").format(sql.Identifier(db.name)))
    names = (
        "'lock_timeout', 'statement_timeout', 'application_name', 'max_parallel_workers_per_gather', "
        "'idle_in_transaction_session_timeout'"
    )
    preflight_settings = replace(NOW, lock_timeout_ms=1500, parallel_workers=-1)
    with db.connect() as conn, step_session(conn, "preflight", preflight_settings, statement_timeout_ms=60_000):
        # -1 keeps the server's (here the database's) choice of parallel workers.
        assert conn.execute("SHOW max_parallel_workers_per_gather").fetchone()[0] == "1"
    with db.connect() as conn:
        outside = dict(conn.execute(f"SELECT name, setting FROM pg_settings WHERE name IN ({names})").fetchall())
        settings = replace(NOW, lock_timeout_ms=1500, parallel_workers=0)
        with step_session(conn, "add_fk_not_valid", settings, statement_timeout_ms=60_000):
            inside = dict(conn.execute(f"SELECT name, setting FROM pg_settings WHERE name IN ({names})").fetchall())
        after = dict(conn.execute(f"SELECT name, setting FROM pg_settings WHERE name IN ({names})").fetchall())
    assert inside == {
        "lock_timeout": "1500",
        "statement_timeout": "60000",
        "application_name": "kpi-fk-maintenance:add_fk_not_valid",
        "max_parallel_workers_per_gather": "0",
        "idle_in_transaction_session_timeout": "60000",
    }
    assert after == outside  # the step's settings end with the step


def _session_settings(conn: psycopg.Connection) -> dict[str, str]:
    return dict(conn.execute("SELECT name, setting FROM pg_settings WHERE source = 'session'").fetchall())


def test_a_step_leaves_the_session_it_was_given_as_it_found_it(db, spec) -> None:
    db.build(1000)
    with db.connect() as conn:
        conn.execute("SELECT set_config('application_name', 'the caller', false)")
        given = _session_settings(conn)
        for step, kwargs in [
            (preflight, {}),
            (detect_orphans, {}),
            (null_orphans, {"run_id": "run-1"}),
            (create_index_concurrently, {}),
            (add_fk_not_valid, {}),
            (validate_fk, {"run_id": "run-1", "run_started_at": datetime.now(UTC)}),
            (post_checks, {}),
        ]:
            step(conn, spec, NOW, **kwargs)
            assert _session_settings(conn) == given, step.__name__


def test_an_index_build_in_progress_is_a_concurrent_run_to_retry_not_a_failed_preflight(db, spec) -> None:
    import threading

    db.build(2000)
    app = db.connect()
    app.autocommit = False
    # An open writing transaction makes CREATE INDEX CONCURRENTLY wait: the build is visibly in progress.
    app.execute("UPDATE vision_kpis SET title = title WHERE id = (SELECT id FROM vision_kpis LIMIT 1)")
    builder = db.connect()
    build = threading.Thread(
        target=lambda: builder.execute(
            "CREATE INDEX CONCURRENTLY vision_kpis_parent_kpi_idx ON vision_kpis USING btree (parent_kpi_id)"
        )
    )
    build.start()
    try:
        for _ in range(200):
            if db.scalar("SELECT count(*) FROM pg_stat_progress_create_index"):
                break
            time.sleep(0.05)
        for step, kwargs in [
            (preflight, {}),
            (null_orphans, {"run_id": "r"}),
            (create_index_concurrently, {}),
            (add_fk_not_valid, {}),
        ]:
            with db.connect() as conn, pytest.raises(ConcurrentRun, match="is being built right now by pid"):
                step(conn, spec, NOW, **kwargs)
        # Counting reads only: it runs beside the build (this run's own, in the graph's other branch).
        with db.connect() as conn:
            assert detect_orphans(conn, spec, NOW)["orphans"] > 0
    finally:
        app.rollback()
        build.join(timeout=30)
        app.close()
        builder.close()
    assert (
        db.scalar("SELECT to_regclass('fk_maintenance.vision_kpis_orphan_audit')") is None
    )  # refused before any change


def test_validating_a_constraint_that_is_not_there_is_a_final_error_not_a_retry(db, spec) -> None:
    from fk_maintenance.errors import StepOutOfOrder, is_final

    db.build(300)
    with db.connect() as conn, pytest.raises(StepOutOfOrder, match="add_fk_not_valid must succeed first") as caught:
        validate_fk(conn, spec, NOW, "run-1", run_started_at=datetime.now(UTC))
    assert is_final(caught.value)


def test_the_missing_parent_probe_of_an_integer_key_uses_a_value_no_sequence_gives(db) -> None:
    goals = ForeignKeySpec(
        schema="public",
        table="goals",
        columns="parent_id",
        ref_table="goals",
        ref_columns="id",
        row_key="id",
        constraint="goals_parent_id_fkey",
        index="goals_parent_id_idx",
        audit_table="goals_orphan_audit",
    )
    db.execute(
        "CREATE TABLE goals (id integer GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, parent_id integer, title text)"
    )
    db.execute("INSERT INTO goals (title) SELECT 'goal ' || g FROM generate_series(1, 500) g")
    db.execute("UPDATE goals SET parent_id = id - 1 WHERE id % 5 <> 1")
    db.execute("UPDATE goals SET parent_id = 100000 + id WHERE id % 50 = 0")  # orphans
    results = run_pipeline(db.connect, goals, replace(NOW, max_depth=10), "int-1")
    assert results["report"]["final_state"] == "converged"
    with db.connect() as app:
        app.autocommit = False
        # The app's next insert has taken max(id) + 1, the value the probe must never use: committed between
        # the probe's two statements it would make a healthy database look like it accepts a missing parent.
        app.execute("INSERT INTO goals (title) VALUES ('in flight')")
        with db.connect() as conn:
            result = post_checks(conn, goals, replace(NOW, max_depth=10))
        app.rollback()
    probe = next(c for c in result["checks"] if c["name"].startswith("database rejects a missing parent"))
    assert probe["ok"] and "-2147483648" in probe["detail"]


# The audit table exactly as the versions before the pipeline's own schema created it, in the app's schema.
LEGACY_AUDIT_DDL = """
CREATE TABLE public.vision_kpis_orphan_audit (
    run_id text NOT NULL, kpi_id uuid NOT NULL, old_parent_kpi_id uuid NOT NULL,
    nulled_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (run_id, kpi_id))
"""


def _app_schema_relations(db) -> set[str]:
    return {
        name for (name,) in db.query("SELECT relname::text FROM pg_class WHERE relnamespace = 'public'::regnamespace")
    }


def test_the_pipeline_adds_nothing_to_the_apps_schema_but_the_index(db, spec) -> None:
    db.build(2000)
    before = _app_schema_relations(db)
    results = run_pipeline(db.connect, spec, NOW, "run-1")
    assert _app_schema_relations(db) - before == {spec.index}
    assert results["null_orphans"]["audited"] == db.scalar(
        "SELECT count(*) FROM fk_maintenance.vision_kpis_orphan_audit"
    )
    assert db.scalar("SELECT obj_description('fk_maintenance'::regnamespace)").startswith("kpi-fk-maintenance")


def _an_earlier_versions_run(db) -> list[tuple]:
    """A run 'old-run' of an earlier version: it nulled 20 pointers and audited them in public; (kpi, parent)."""
    db.execute(LEGACY_AUDIT_DDL)
    return db.query(
        "WITH o AS (SELECT c.id, c.parent_kpi_id FROM vision_kpis c WHERE c.parent_kpi_id IS NOT NULL AND NOT EXISTS "
        "(SELECT 1 FROM vision_kpis p WHERE p.id = c.parent_kpi_id) ORDER BY c.id LIMIT 20), "
        "a AS (INSERT INTO public.vision_kpis_orphan_audit (run_id, kpi_id, old_parent_kpi_id) "
        "SELECT 'old-run', id, parent_kpi_id FROM o RETURNING kpi_id, old_parent_kpi_id) "
        "UPDATE vision_kpis k SET parent_kpi_id = NULL FROM a WHERE k.id = a.kpi_id "
        "RETURNING a.kpi_id, a.old_parent_kpi_id"
    )


def test_an_audit_table_left_in_the_apps_schema_moves_with_its_rows_and_its_runs_still_restore(db, spec) -> None:
    db.build(3000, orphan_ratio=0.02)
    legacy = _an_earlier_versions_run(db)
    with db.connect() as conn:
        assert "move public.vision_kpis_orphan_audit" in preflight(conn, spec, NOW)["audit_plan"]
    results = run_pipeline(db.connect, spec, NOW, "run-1")
    assert db.scalar("SELECT to_regclass('public.vision_kpis_orphan_audit')") is None
    rows = dict(db.query("SELECT run_id, count(*) FROM fk_maintenance.vision_kpis_orphan_audit GROUP BY run_id"))
    assert rows == {"old-run": len(legacy), "run-1": results["null_orphans"]["audited"]}
    # The earlier run's pointers come back once their parent exists again.
    revived = legacy[0][1]
    revive_parent(db, revived)
    with db.connect() as conn:
        restored = restore_run(conn, spec, NOW, "old-run", "restore-1")
    assert (restored["restored"], restored["audited"]) == (sum(1 for _, p in legacy if p == revived), len(legacy))


def test_a_run_audited_only_in_an_earlier_versions_table_is_restored_without_another_run_first(db, spec) -> None:
    db.build(3000, orphan_ratio=0.02)
    legacy = _an_earlier_versions_run(db)
    revive_parent(db, legacy[0][1])
    with db.connect() as conn:
        restored = restore_run(conn, spec, NOW, "old-run", "restore-1")
    assert (restored["restored"], restored["audited"]) == (sum(1 for _, p in legacy if p == legacy[0][1]), len(legacy))
    assert db.scalar("SELECT to_regclass('public.vision_kpis_orphan_audit')") is None  # moved on the way


def test_a_legacy_audit_table_beside_the_pipelines_own_is_merged_into_it_and_dropped(db, spec) -> None:
    db.build(1000)
    run_pipeline(db.connect, spec, NOW, "run-1")
    db.execute(LEGACY_AUDIT_DDL)
    db.execute(
        "INSERT INTO public.vision_kpis_orphan_audit (run_id, kpi_id, old_parent_kpi_id) "
        "SELECT 'old-run', gen_random_uuid(), gen_random_uuid() FROM generate_series(1, 7)"
    )
    total = db.scalar("SELECT count(*) FROM fk_maintenance.vision_kpis_orphan_audit") + 7
    with db.connect() as conn:
        null_orphans(conn, spec, NOW, "run-2")
    assert db.scalar("SELECT to_regclass('public.vision_kpis_orphan_audit')") is None
    assert db.scalar("SELECT count(*) FROM fk_maintenance.vision_kpis_orphan_audit") == total


def test_preflight_names_what_the_role_lacks_to_create_the_pipelines_schema(db, spec) -> None:
    db.build(300)
    db.execute(
        "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'kpi_owner') THEN "
        "CREATE ROLE kpi_owner LOGIN; END IF; END $$"
    )
    db.execute("ALTER TABLE vision_kpis OWNER TO kpi_owner")
    db.execute(sql.SQL("REVOKE CREATE ON DATABASE {} FROM PUBLIC, kpi_owner").format(sql.Identifier(db.name)))
    with psycopg.connect(db.dsn, user="kpi_owner", autocommit=True) as conn, pytest.raises(PreflightFailed) as caught:
        preflight(conn, spec, NOW)
    assert (
        f"role kpi_owner lacks CREATE on database {db.name}, needed to create the pipeline's schema fk_maintenance"
        in (str(caught.value))
    )
    # PostgreSQL 15+ grants no CREATE on public to PUBLIC: CREATE INDEX needs it even for the table's owner.
    assert "lacks CREATE on schema public (CREATE INDEX needs it" in str(caught.value)
    db.execute("GRANT CREATE ON SCHEMA public TO kpi_owner")
    db.execute("CREATE SCHEMA fk_maintenance")  # by the DBA, but without granting anything on it
    with psycopg.connect(db.dsn, user="kpi_owner", autocommit=True) as conn, pytest.raises(PreflightFailed) as caught:
        preflight(conn, spec, NOW)
    assert "role kpi_owner lacks USAGE on schema fk_maintenance" in str(caught.value)
    db.execute("GRANT USAGE, CREATE ON SCHEMA fk_maintenance TO kpi_owner")
    with psycopg.connect(db.dsn, user="kpi_owner", autocommit=True) as conn:
        assert preflight(conn, spec, NOW)["audit_plan"] == "create fk_maintenance.vision_kpis_orphan_audit"
        # A schema it does not own is enough: the step creates its table there and comments only that.
        assert null_orphans(conn, spec, NOW, "run-1")["audited"] > 0


def test_a_table_of_the_audit_tables_name_that_is_not_ours_fails_preflight_unchanged(db, spec) -> None:
    db.build(300)
    db.execute("CREATE TABLE public.vision_kpis_orphan_audit (id int PRIMARY KEY, note text)")
    before = snapshot(db, spec)
    with db.connect() as conn, pytest.raises(PreflightFailed, match="is not an audit table of this pipeline"):
        preflight(conn, spec, NOW)
    assert snapshot(db, spec) == before


def test_the_suite_runs_on_the_postgresql_major_it_was_asked_for(db) -> None:
    import os

    if os.environ.get("KPI_TEST_DSN") and not os.environ.get("KPI_TEST_PG"):
        pytest.skip("KPI_TEST_DSN names a server of the caller's; no major was asked for")
    asked = int(os.environ.get("KPI_TEST_PG") or 18)  # the embedded server is PostgreSQL 18
    major = db.scalar("SELECT current_setting('server_version_num')::int / 10000")
    assert major == asked
