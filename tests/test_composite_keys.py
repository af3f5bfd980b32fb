"""Composite keys: a composite hierarchy's cycle and too-deep chain are refused with a readable message, and
post_checks' 23503 probe proves our key (not another one) on the row's own tenant."""

from __future__ import annotations

import pytest

from fk_maintenance.db.catalog import inspect_target
from fk_maintenance.errors import PreflightFailed
from fk_maintenance.keys.settings import RunSettings
from fk_maintenance.keys.spec import ForeignKeySpec
from fk_maintenance.steps.checks import _rejects_missing_parent
from fk_maintenance.steps.preflight import preflight

TREE = ForeignKeySpec(
    schema="public",
    table="goals",
    columns=("tenant_id", "parent_id"),
    ref_table="goals",
    ref_columns=("tenant_id", "id"),
    row_key=("tenant_id", "id"),
    constraint="goals_parent_fk",
    index="goals_parent_idx",
    audit_table="goals_audit",
    on_delete="SET NULL (parent_id)",
    hierarchy_checks=True,
)
ORDERS = ForeignKeySpec(
    schema="public",
    table="orders",
    columns=("tenant_id", "customer_id"),
    ref_table="customers",
    ref_columns=("tenant_id", "id"),
    row_key=("tenant_id", "id"),
    constraint="orders_customer_fk",
    index="orders_customer_idx",
    audit_table="orders_audit",
    on_delete="SET NULL (customer_id)",
)


def test_a_composite_hierarchy_with_a_cycle_and_a_deep_chain_is_refused_readably(db) -> None:
    db.execute(
        "CREATE TABLE goals (tenant_id int NOT NULL, id int NOT NULL, parent_id int, PRIMARY KEY (tenant_id, id));"
        "INSERT INTO goals SELECT 1, i, CASE WHEN i > 1 THEN i - 1 END FROM generate_series(1, 8) i;"
        "INSERT INTO goals VALUES (2, 1, 3), (2, 2, 1), (2, 3, 2)"
    )
    with db.connect() as conn, pytest.raises(PreflightFailed) as caught:
        preflight(conn, TREE, RunSettings(max_depth=5))
    message = str(caught.value)
    assert "cycle (2," in message and "hierarchy depth at most 5" in message, message


def _orders(db, with_items: bool) -> None:
    db.execute(
        "CREATE TABLE customers (tenant_id int, id int, PRIMARY KEY (tenant_id, id));"
        "CREATE TABLE orders (tenant_id int NOT NULL, id int NOT NULL, customer_id int, PRIMARY KEY (tenant_id, id));"
        "INSERT INTO customers VALUES (1, 1), (2, 1), (2, 2);"
        # The first order is tenant 2's, the first customer tenant 1's.
        "INSERT INTO orders VALUES (2, 1, 2), (1, 1, 1), (2, 2, 1)"
    )
    if with_items:
        db.execute(
            "DELETE FROM orders WHERE tenant_id = 1;"
            "CREATE TABLE items (tenant_id int, order_id int, "
            "FOREIGN KEY (tenant_id, order_id) REFERENCES orders (tenant_id, id));"
            "INSERT INTO items VALUES (2, 1)"
        )


def test_the_probe_is_not_proven_by_another_key_raising_23503(db) -> None:
    _orders(db, with_items=True)  # and no orders_customer_fk at all
    with db.connect() as conn:
        check = _rejects_missing_parent(conn, ORDERS, inspect_target(conn, ORDERS))
    assert check.ok is not True, check


def test_the_probe_keeps_the_rows_own_tenant(db) -> None:
    _orders(db, with_items=False)
    db.execute(
        "ALTER TABLE orders ADD CONSTRAINT orders_customer_fk FOREIGN KEY (tenant_id, customer_id) "
        "REFERENCES customers (tenant_id, id) ON DELETE SET NULL (customer_id)"
    )
    with db.connect() as conn:
        check = _rejects_missing_parent(conn, ORDERS, inspect_target(conn, ORDERS))
    assert check.ok is True, check


def test_a_key_with_several_nullable_columns_and_an_action_that_nulls_nothing_nulls_only_the_declared_one(
    db,
) -> None:
    """NO ACTION does not say which column an orphan loses: preflight refuses until nullify_columns does, and
    then only that column is nulled (the row keeps its tenant)."""
    from dataclasses import replace

    from devkit.pipeline import run_pipeline

    db.execute(
        "CREATE TABLE customers (tenant_id int, id int, PRIMARY KEY (tenant_id, id));"
        "CREATE TABLE invoices (id int PRIMARY KEY, tenant_id int, customer_id int);"
        "INSERT INTO customers VALUES (1, 1), (2, 1);"
        "INSERT INTO invoices VALUES (1, 1, 1), (2, 2, 1), (3, 1, 9), (4, 3, 1)"
    )
    undeclared = ForeignKeySpec(
        schema="public",
        table="invoices",
        columns=("tenant_id", "customer_id"),
        ref_table="customers",
        ref_columns=("tenant_id", "id"),
        row_key="id",
        constraint="invoices_customer_fk",
        index="invoices_customer_idx",
        audit_table="invoices_audit",
        on_delete="NO ACTION",
    )
    with db.connect() as conn, pytest.raises(PreflightFailed) as caught:
        preflight(conn, undeclared, RunSettings())
    assert "declare nullify_columns: [customer_id]" in str(caught.value), caught.value
    declared = replace(undeclared, nullify_columns=("customer_id",))
    report = run_pipeline(db.connect, declared, RunSettings(validate_now=True), "nullify-1")["report"]
    assert report["final_state"] == "converged" and report["nulled"] == 2, report
    assert db.query("SELECT id, tenant_id, customer_id FROM invoices ORDER BY id") == [
        (1, 1, 1),
        (2, 2, 1),
        (3, 1, None),
        (4, 3, None),
    ]
