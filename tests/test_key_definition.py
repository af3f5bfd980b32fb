"""The whole definition of a key (ON UPDATE, MATCH, deferrability) is created exactly as declared and compared on
every part; MATCH FULL changes what an orphan is (some but not all of the key's columns NULL), and detection,
nulling, the probe and the refusals follow it."""

from __future__ import annotations

from dataclasses import replace

import pytest

from devkit.db_state import snapshot
from devkit.pipeline import run_pipeline
from fk_maintenance.errors import PreflightFailed
from fk_maintenance.keys.settings import RunSettings
from fk_maintenance.keys.spec import ForeignKeySpec
from fk_maintenance.records.restore import restore_run
from fk_maintenance.steps.preflight import preflight

# Every part of the definition away from its default.
LINES = ForeignKeySpec(
    schema="public",
    table="order_lines",
    columns=("tenant_id", "order_no"),
    ref_table="orders",
    ref_columns=("tenant_id", "order_no"),
    row_key="id",
    constraint="order_lines_order_fkey",
    index="order_lines_order_idx",
    audit_table="order_lines_audit",
    on_delete="SET NULL",
    on_update="CASCADE",
    match="FULL",
    deferrable=True,
    initially_deferred=True,
)
DECLARED = (
    "FOREIGN KEY (tenant_id, order_no) REFERENCES orders(tenant_id, order_no) MATCH FULL ON UPDATE CASCADE "
    "ON DELETE SET NULL DEFERRABLE INITIALLY DEFERRED"
)


def _orders(db, tenant_not_null: bool = False) -> None:
    db.execute(
        "CREATE TABLE orders (tenant_id int, order_no int, PRIMARY KEY (tenant_id, order_no));"
        f"CREATE TABLE order_lines (id int PRIMARY KEY, tenant_id int{' NOT NULL' if tenant_not_null else ''},"
        " order_no int);"
        "INSERT INTO orders VALUES (1, 10), (1, 11), (2, 10);"
    )


def test_a_key_is_created_exactly_as_declared_and_match_full_nulls_half_null_keys_whole(db) -> None:
    _orders(db)
    db.execute(
        "INSERT INTO order_lines VALUES"
        " (1, 1, 10), (2, 2, 10),"  # valid
        " (3, NULL, NULL),"  # all NULL: passes under any MATCH
        " (4, 1, NULL), (5, NULL, 11),"  # half NULL: a violation under MATCH FULL, passed by SIMPLE
        " (6, 2, 11)"  # a complete key without a parent
    )
    report = run_pipeline(db.connect, LINES, RunSettings(validate_now=True), "definition-1")["report"]
    assert report["final_state"] == "converged", report
    assert report["nulled"] == 3 and report["audited"] == 3, report
    assert db.query(
        "SELECT pg_get_constraintdef(oid), convalidated FROM pg_constraint WHERE conname = 'order_lines_order_fkey'"
    ) == [(DECLARED, True)]
    # Every column of a released key is NULL (MATCH FULL passes nothing else); the valid rows kept theirs.
    assert db.query("SELECT id, tenant_id, order_no FROM order_lines ORDER BY id") == [
        (1, 1, 10),
        (2, 2, 10),
        (3, None, None),
        (4, None, None),
        (5, None, None),
        (6, None, None),
    ]
    assert db.query(
        "SELECT kpi_id, old_parent_kpi_id, old_parent_kpi_id_2 FROM fk_maintenance.order_lines_audit ORDER BY 1"
    ) == [(4, 1, None), (5, None, 11), (6, 2, 11)]
    # The key acts as declared: an order's renumbering reaches its lines (ON UPDATE CASCADE), a half-NULL line is
    # refused at COMMIT (deferred), and a second run changes nothing.
    db.execute("UPDATE orders SET order_no = 12 WHERE (tenant_id, order_no) = (1, 10)")
    assert db.query("SELECT order_no FROM order_lines WHERE id = 1") == [(12,)]
    with pytest.raises(Exception, match="order_lines_order_fkey"):
        db.execute("BEGIN; INSERT INTO order_lines VALUES (7, 1, NULL); COMMIT")
    again = run_pipeline(db.connect, LINES, RunSettings(validate_now=True), "definition-2")["report"]
    assert again["final_state"] == "converged" and again["nulled"] == 0, again
    # Restore puts back the complete key whose parent exists again; a half-NULL key never has one.
    db.execute("INSERT INTO orders VALUES (2, 11)")
    with db.connect() as conn:
        restored = restore_run(conn, LINES, RunSettings(), "definition-1", "restore-1")
    assert (restored["restored"], restored["parent_still_missing"]) == (1, 2), restored
    assert db.query("SELECT tenant_id, order_no FROM order_lines WHERE id IN (4, 5, 6) ORDER BY id") == [
        (None, None),
        (None, None),
        (2, 11),
    ]


@pytest.mark.parametrize(
    ("existing", "mismatch"),
    [
        (
            "MATCH FULL ON DELETE SET NULL DEFERRABLE INITIALLY DEFERRED",
            "it is ON UPDATE NO ACTION, not ON UPDATE CASCADE",
        ),
        ("ON UPDATE CASCADE ON DELETE SET NULL DEFERRABLE INITIALLY DEFERRED", "it is MATCH SIMPLE, not MATCH FULL"),
        (
            "MATCH FULL ON UPDATE CASCADE ON DELETE SET NULL DEFERRABLE",
            "it is DEFERRABLE INITIALLY IMMEDIATE, not DEFERRABLE INITIALLY DEFERRED",
        ),
        ("MATCH FULL ON UPDATE CASCADE ON DELETE SET NULL", "it is NOT DEFERRABLE, not DEFERRABLE INITIALLY DEFERRED"),
    ],
)
def test_a_same_named_key_that_differs_in_any_part_is_refused_with_nothing_changed(db, existing, mismatch) -> None:
    _orders(db)
    db.execute(
        "INSERT INTO order_lines VALUES (1, 1, 10), (2, 1, NULL);"
        "ALTER TABLE order_lines ADD CONSTRAINT order_lines_order_fkey FOREIGN KEY (tenant_id, order_no) "
        f"REFERENCES orders (tenant_id, order_no) {existing} NOT VALID"
    )
    before = snapshot(db, LINES)
    with db.connect() as conn, pytest.raises(PreflightFailed) as caught:
        preflight(conn, LINES, RunSettings())
    assert mismatch in str(caught.value), caught.value
    assert snapshot(db, LINES) == before


def test_match_full_with_a_not_null_column_cannot_null_its_orphans_and_says_what_can(db) -> None:
    """(tenant_id NOT NULL, order_no NULL) is a MATCH FULL violation that no nulling can release: the default
    policy refuses, and a declared nullify is refused naming delete; nothing is changed either way."""
    _orders(db, tenant_not_null=True)
    db.execute("INSERT INTO order_lines VALUES (1, 1, 10), (2, 1, NULL)")
    full = replace(LINES, on_delete="NO ACTION", deferrable=False, initially_deferred=False)
    before = snapshot(db, full)
    with db.connect() as conn, pytest.raises(PreflightFailed) as refused:
        preflight(conn, full, RunSettings())
    assert "1 row(s) of public.order_lines point at a missing parent" in str(refused.value) or "orphans: refuse" in str(
        refused.value
    ), refused.value
    with db.connect() as conn, pytest.raises(PreflightFailed) as declared:
        preflight(conn, replace(full, orphans="nullify"), RunSettings())
    assert "MATCH FULL releases an orphan only when every column of the key is NULL, and tenant_id is NOT NULL" in str(
        declared.value
    ), declared.value
    assert snapshot(db, full) == before


def test_on_update_set_null_on_a_not_null_column_is_refused(db) -> None:
    _orders(db, tenant_not_null=True)
    with db.connect() as conn, pytest.raises(PreflightFailed) as caught:
        preflight(
            conn, replace(LINES, match="SIMPLE", on_update="SET NULL", on_delete="SET NULL (order_no)"), RunSettings()
        )
    assert "order_lines.tenant_id NOT NULL, so ON UPDATE SET NULL could never apply" in str(caught.value), caught.value


def _fk_names(db, table: str) -> list[tuple[str, str, bool]]:
    return db.query(
        "SELECT conrelid::regclass::text, conname, convalidated FROM pg_constraint "
        "WHERE contype = 'f' AND (conrelid = %s::regclass OR conrelid IN (SELECT relid FROM pg_partition_tree(%s))) "
        "ORDER BY 1, 2",
        [table, table],
    )


def test_an_equal_key_under_another_name_is_never_doubled_declaring_its_name_uses_it(db) -> None:
    """drizzle-kit's own name for .references(), say: refused before any change naming the fix; declared under
    that name, the run validates it and adds no second key."""
    _orders(db)
    db.execute(
        "INSERT INTO order_lines VALUES (1, 1, 10), (2, 2, 99);"
        "ALTER TABLE order_lines ADD CONSTRAINT order_lines_tenant_id_orders_tenant_id_fk FOREIGN KEY "
        "(tenant_id, order_no) REFERENCES orders (tenant_id, order_no) MATCH FULL ON UPDATE CASCADE "
        "ON DELETE SET NULL DEFERRABLE INITIALLY DEFERRED NOT VALID"
    )
    before = snapshot(db, LINES)
    with db.connect() as conn, pytest.raises(PreflightFailed) as caught:
        preflight(conn, LINES, RunSettings())
    assert (
        "public.order_lines already has the key as declared, under another name: "
        "order_lines_tenant_id_orders_tenant_id_fk"
        in str(caught.value)
        and "declare constraint: order_lines_tenant_id_orders_tenant_id_fk" in str(caught.value)
    ), caught.value
    assert snapshot(db, LINES) == before
    adopted = replace(LINES, constraint="order_lines_tenant_id_orders_tenant_id_fk")
    report = run_pipeline(db.connect, adopted, RunSettings(validate_now=True), "adopt-1")["report"]
    assert report["final_state"] == "converged" and report["nulled"] == 1, report
    assert _fk_names(db, "order_lines") == [("order_lines", "order_lines_tenant_id_orders_tenant_id_fk", True)]


def test_a_partition_holding_the_key_under_another_name_has_it_renamed_and_adopted_never_doubled(db) -> None:
    """A partition's own key equal to the declared one (pagila's payment partitions, say): renamed to the declared
    name in a free moment, validated, adopted by the parent's key; one key per partition, and the report says so.
    Its own index on the key's column is attached to the key's index instead of a second one being built."""
    readings = ForeignKeySpec(
        schema="public",
        table="readings",
        columns="device_id",
        ref_table="devices",
        ref_columns="id",
        row_key=("id", "at"),
        constraint="readings_device_id_fkey",
        index="readings_device_id_idx",
        audit_table="readings_audit",
    )
    db.execute(
        "CREATE TABLE devices (id int PRIMARY KEY); INSERT INTO devices VALUES (1);"
        "CREATE TABLE readings (id int, at date, device_id int, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);"
        "CREATE TABLE readings_2024 PARTITION OF readings FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');"
        "CREATE TABLE readings_2025 PARTITION OF readings FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');"
        "INSERT INTO readings VALUES (1, '2024-05-01', 1), (2, '2025-05-01', 1), (3, '2025-06-01', 7);"
        "ALTER TABLE readings_2024 ADD CONSTRAINT old_device_fk FOREIGN KEY (device_id) REFERENCES devices (id) "
        "ON DELETE SET NULL NOT VALID;"
        "CREATE INDEX old_device_idx ON readings_2024 (device_id)"
    )
    with db.connect() as conn:
        planned = preflight(conn, readings, RunSettings())
    assert any("holds the key as declared under another name, old_device_fk" in w for w in planned["warnings"])
    results = run_pipeline(db.connect, readings, RunSettings(validate_now=True), "adopt-2")
    assert results["report"]["final_state"] == "converged" and results["report"]["nulled"] == 1, results["report"]
    assert results["add_fk_not_valid"]["adopted_partition_keys"] == [
        "public.readings_2024: old_device_fk renamed readings_device_id_fkey"
    ]
    # Its index on the key's column is attached as it is, not doubled.
    assert results["create_index_concurrently"]["partitions_index_adopted"] == ["public.readings_2024: old_device_idx"]
    assert db.query(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'readings_device_id_idx'::regclass ORDER BY 1"
    ) == [("old_device_idx",), ("readings_2025_readings_device_id_idx",)]
    assert _fk_names(db, "readings") == [
        ("readings", "readings_device_id_fkey", True),
        ("readings_2024", "readings_device_id_fkey", True),
        ("readings_2025", "readings_device_id_fkey", True),
    ]
