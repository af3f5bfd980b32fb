"""Keys of shapes the shipped one was not written for, declared in a targets file as a user would and run through
their DAGs: each converges (validated, zero orphans, every nulled pointer audited, a second run changes nothing)
or fails at preflight naming every reason, with catalog and data snapshots proving nothing changed.

The test command runs this module again on PostgreSQL 16 and 15 (KPI_TEST_PG); there each key runs through the
same steps in the DAG's order without Airflow (devkit.pipeline), since what differs between majors is the SQL,
not the Airflow wiring, and a DAG run per key and major would cost minutes.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from devkit.db_state import orphan_count, snapshot
from devkit.pipeline import run_pipeline
from fk_maintenance.errors import PreflightFailed
from fk_maintenance.keys.settings import SETTING_DEFS, RunSettings
from fk_maintenance.keys.spec import ForeignKeySpec
from fk_maintenance.keys.targets import Target, load_targets
from fk_maintenance.steps.preflight import preflight

REPO = Path(__file__).resolve().parents[1]

# Each declared key, as a user writes it in targets.yaml, and the schema (with data) it is declared for.
TARGETS_YAML = """\
foreign_keys:
  - name: orders_customer_fk
    table: orders
    column: customer_id
    ref_table: customers
    ref_column: id
    constraint: orders_customer_id_fkey
    index: orders_customer_id_idx
    audit_table: orders_orphan_audit
    conn_ids: [kpi_db]
  - name: quoted_names_fk
    schema: Sales Ops
    table: Order Lines
    column: Parent Line
    ref_table: Order Lines
    ref_column: Line Id
    row_key: Line Id
    constraint: Order Lines "Parent" FK
    index: Order Lines Parent Idx
    audit_schema: FK Maint
    audit_table: Orphan "Audit"
    hierarchy_checks: true
    conn_ids: [kpi_db]
  - name: employees_manager_fk
    table: employees
    column: manager_badge
    ref_table: employees
    ref_column: badge
    row_key: id
    constraint: employees_manager_badge_fkey
    index: employees_manager_badge_idx
    audit_table: employees_orphan_audit
    hierarchy_checks: true
    conn_ids: [kpi_db]
  - name: posts_tag_fk
    table: posts
    column: tag_slug
    ref_table: tags
    ref_column: slug
    constraint: posts_tag_slug_fkey
    index: posts_tag_slug_idx
    audit_table: posts_orphan_audit
    conn_ids: [kpi_db]
  - name: order_items_order_fk
    table: order_items
    column: order_id
    ref_table: orders
    ref_column: id
    on_delete: CASCADE
    constraint: order_items_order_id_fkey
    index: order_items_order_id_idx
    audit_table: order_items_orphan_audit
    conn_ids: [kpi_db]
  - name: readings_device_fk
    table: readings
    column: device_id
    ref_table: devices
    ref_column: id
    row_key: [id, taken_on]
    constraint: readings_device_id_fkey
    index: readings_device_id_idx
    audit_table: readings_orphan_audit
    conn_ids: [kpi_db]
  - name: events_sensor_fk
    table: events
    column: sensor_id
    ref_table: sensors
    ref_column: id
    constraint: events_sensor_id_fkey
    index: events_sensor_id_idx
    audit_table: events_orphan_audit
    conn_ids: [kpi_db]
  - name: shipments_carrier_fk
    table: shipments
    column: carrier_code
    ref_table: carriers
    ref_column: code
    constraint: shipments_carrier_code_fkey
    index: shipments_carrier_code_idx
    audit_table: shipments_orphan_audit
    conn_ids: [kpi_db]
  - name: visits_ticket_fk
    table: visits
    column: ticket_id
    ref_table: tickets
    ref_column: id
    row_key: visit_no
    constraint: visits_ticket_id_fkey
    index: visits_ticket_id_idx
    audit_table: visits_orphan_audit
    conn_ids: [kpi_db]
  - name: line_items_product_fk
    table: line_items
    column: product_id
    ref_table: products
    ref_column: id
    row_key: order_no
    constraint: line_items_product_id_fkey
    index: line_items_product_id_idx
    audit_table: line_items_orphan_audit
    conn_ids: [kpi_db]
  - name: tenant_tree_fk
    schema: Tenancy
    table: Nodes
    columns: [tenant_id, parent_id]
    ref_table: Nodes
    ref_columns: [tenant_id, id]
    row_key: [tenant_id, id]
    on_delete: SET NULL (parent_id)
    constraint: nodes_parent_fkey
    index: nodes_tenant_parent_idx
    audit_table: nodes_orphan_audit
    hierarchy_checks: true
    conn_ids: [kpi_db]
  - name: tenant_tree_plain_set_null_fk
    schema: Tenancy
    table: Nodes
    columns: [tenant_id, parent_id]
    ref_table: Nodes
    ref_columns: [tenant_id, id]
    row_key: [tenant_id, id]
    constraint: nodes_parent_plain_fkey
    index: nodes_tenant_parent_plain_idx
    audit_table: nodes_plain_orphan_audit
    conn_ids: [kpi_db]
  - name: invoices_account_fk
    schema: Billing
    table: Invoices
    column: Account Id
    ref_schema: CRM
    ref_table: Accounts
    ref_column: Id
    row_key: Invoice No
    constraint: Invoices "Account" FK
    index: Invoices Account Idx
    audit_table: Invoices Orphan Audit
    conn_ids: [kpi_db]
"""

# A tenant-scoped hierarchy: tenant t has nodes 1 .. 100 t, the first ten roots, the others below them in their
# own tenant. Some point at node 100 t + 50, which exists in the next tenant but not in theirs (the tenant trap:
# orphans all the same), some at a node no tenant has.
TENANT_TREE = """
    CREATE SCHEMA "Tenancy";
    CREATE TABLE "Tenancy"."Nodes" (tenant_id int NOT NULL, id int NOT NULL, parent_id int, name text,
                                    PRIMARY KEY (tenant_id, id));
    INSERT INTO "Tenancy"."Nodes"
    SELECT t, g,
           CASE WHEN g <= 10 THEN NULL WHEN g % 29 = 0 THEN 100 * t + 50 WHEN g % 31 = 0 THEN 100000
                ELSE 1 + g % 10 END,
           'node ' || t || '/' || g
    FROM generate_series(1, 3) t, generate_series(1, 100 * t) g;
"""

SCHEMAS = {
    "orders_customer_fk": """
        CREATE TABLE customers (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, name text NOT NULL);
        CREATE TABLE orders (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, customer_id bigint, total numeric);
        INSERT INTO customers (name) SELECT 'customer ' || g FROM generate_series(1, 200) g;
        INSERT INTO orders (customer_id, total)
        SELECT CASE WHEN g % 25 = 0 THEN 1000000 + g % 7 WHEN g % 9 = 0 THEN NULL ELSE 1 + g % 200 END, g
        FROM generate_series(1, 3000) g;
        -- An index the app already has on the key's column, under its own name.
        CREATE INDEX orders_by_customer ON orders (customer_id);
    """,
    "quoted_names_fk": """
        CREATE SCHEMA "Sales Ops";
        CREATE TABLE "Sales Ops"."Order Lines" ("Line Id" uuid PRIMARY KEY, "Parent Line" uuid, "Note" text);
        INSERT INTO "Sales Ops"."Order Lines"
        SELECT md5(g::text)::uuid,
               CASE WHEN g % 11 = 0 THEN gen_random_uuid() WHEN g > 100 THEN md5((1 + g % 100)::text)::uuid END,
               'line ' || g
        FROM generate_series(1, 1500) g;
    """,
    "employees_manager_fk": """
        CREATE TABLE employees (id serial PRIMARY KEY, badge text NOT NULL UNIQUE, manager_badge text, name text);
        -- Two levels below the boss; row ids and badges differ, so a walk that joins on the row key goes wrong.
        INSERT INTO employees (id, badge, manager_badge, name) VALUES (1000, 'B-0', NULL, 'boss');
        INSERT INTO employees (id, badge, manager_badge, name)
        SELECT 2000 + g, 'M-' || g, 'B-0', 'manager ' || g FROM generate_series(1, 20) g;
        INSERT INTO employees (id, badge, manager_badge, name)
        SELECT 5000 + g, 'W-' || g, CASE WHEN g % 13 = 0 THEN 'GONE-' || g ELSE 'M-' || (1 + g % 20) END,
               'worker ' || g
        FROM generate_series(1, 600) g;
    """,
    "posts_tag_fk": """
        CREATE TABLE tags (slug varchar(40) PRIMARY KEY, label text);
        CREATE TABLE posts (id bigserial PRIMARY KEY, tag_slug varchar(40), body text);
        INSERT INTO tags SELECT 'tag-' || g, 'Tag ' || g FROM generate_series(1, 50) g;
        INSERT INTO posts (tag_slug, body)
        SELECT CASE WHEN g % 17 = 0 THEN 'retired-' || g % 3 ELSE 'tag-' || (1 + g % 50) END, 'post ' || g
        FROM generate_series(1, 2000) g;
    """,
    "order_items_order_fk": """
        CREATE TABLE orders (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, placed_at timestamptz DEFAULT now());
        CREATE TABLE order_items (id bigserial PRIMARY KEY, order_id bigint NOT NULL, sku text);
        INSERT INTO orders SELECT FROM generate_series(1, 300);
        INSERT INTO order_items (order_id, sku) SELECT 1 + g % 300, 'sku-' || g FROM generate_series(1, 2000) g;
    """,
    "readings_device_fk": """
        CREATE TABLE devices (id int PRIMARY KEY);
        CREATE TABLE readings (id bigint, taken_on date NOT NULL, device_id int, value float8,
                               PRIMARY KEY (id, taken_on)) PARTITION BY RANGE (taken_on);
        CREATE TABLE readings_2026 PARTITION OF readings FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
        CREATE TABLE readings_other PARTITION OF readings DEFAULT;
        INSERT INTO devices SELECT generate_series(1, 20);
        INSERT INTO readings SELECT g, date '2025-12-01' + g % 90, CASE WHEN g % 10 = 0 THEN 999 ELSE 1 + g % 20 END,
                                    g FROM generate_series(1, 1000) g;
    """,
    "events_sensor_fk": """
        -- The referenced table is partitioned (the referencing one is not).
        CREATE TABLE sensors (id int PRIMARY KEY, label text) PARTITION BY HASH (id);
        CREATE TABLE sensors_0 PARTITION OF sensors FOR VALUES WITH (MODULUS 2, REMAINDER 0);
        CREATE TABLE sensors_1 PARTITION OF sensors FOR VALUES WITH (MODULUS 2, REMAINDER 1);
        CREATE TABLE events (id bigserial PRIMARY KEY, sensor_id int, payload text);
        INSERT INTO sensors SELECT g, 'sensor ' || g FROM generate_series(1, 40) g;
        INSERT INTO events (sensor_id, payload)
        SELECT CASE WHEN g % 12 = 0 THEN 500 + g % 5 ELSE 1 + g % 40 END, 'event ' || g FROM generate_series(1, 1500) g;
    """,
    "shipments_carrier_fk": """
        -- The referenced column is unique, but DEFERRABLE: PostgreSQL refuses a foreign key onto it.
        CREATE TABLE carriers (id int PRIMARY KEY, code int UNIQUE DEFERRABLE);
        CREATE TABLE shipments (id int PRIMARY KEY, carrier_code int);
        INSERT INTO carriers VALUES (1, 1), (2, 2);
        INSERT INTO shipments VALUES (1, 1), (2, 5), (3, 2);
    """,
    "visits_ticket_fk": """
        -- The row key is unique but nullable: rows without one could not be audited.
        CREATE TABLE tickets (id int PRIMARY KEY);
        CREATE TABLE visits (visit_no int UNIQUE, ticket_id int);
        INSERT INTO tickets VALUES (1);
        INSERT INTO visits VALUES (1, 1), (NULL, 5), (NULL, 6);
    """,
    "line_items_product_fk": """
        CREATE TABLE products (id int PRIMARY KEY);
        CREATE TABLE line_items (order_no int, line_no int, product_id int, PRIMARY KEY (order_no, line_no));
        INSERT INTO products SELECT generate_series(1, 30);
        INSERT INTO line_items SELECT g / 4, g % 4, CASE WHEN g % 8 = 0 THEN 404 ELSE 1 + g % 30 END
        FROM generate_series(1, 800) g;
    """,
    "tenant_tree_fk": TENANT_TREE,
    "tenant_tree_plain_set_null_fk": TENANT_TREE,
    "invoices_account_fk": """
        -- A key from one schema to another, every name mixed-case.
        CREATE SCHEMA "CRM";
        CREATE SCHEMA "Billing";
        CREATE TABLE "CRM"."Accounts" ("Id" bigint PRIMARY KEY, "Name" text);
        CREATE TABLE "Billing"."Invoices" ("Invoice No" bigint PRIMARY KEY, "Account Id" bigint, amount numeric);
        INSERT INTO "CRM"."Accounts" SELECT g, 'account ' || g FROM generate_series(1, 100) g;
        INSERT INTO "Billing"."Invoices"
        SELECT g, CASE WHEN g % 21 = 0 THEN 5000 + g % 4 ELSE 1 + g % 100 END, g FROM generate_series(1, 1500) g;
    """,
}


@pytest.fixture(scope="module")
def declared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Target]:
    path = tmp_path_factory.mktemp("targets") / "targets.yaml"
    path.write_text(TARGETS_YAML)
    return {target.name: target for target in load_targets(path)}


@pytest.fixture(scope="module")
def bag(airflow_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The project's DAG file, parsed for this targets file: one DAG per declared key."""
    from airflow.dag_processing.dagbag import DagBag

    path = tmp_path_factory.mktemp("targets-bag") / "targets.yaml"
    path.write_text(TARGETS_YAML)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FK_MAINTENANCE_TARGETS", str(path))
        bag = DagBag(dag_folder=str(REPO / "dags"))
    assert not bag.import_errors, bag.import_errors
    bag.airflow_home = airflow_home
    bag.targets_file = path
    yield bag


def create(db, name: str) -> None:
    with db.connect() as conn:
        conn.execute(textwrap.dedent(SCHEMAS[name]))
        conn.execute("ANALYZE")


THROUGH_THE_DAG = not os.environ.get("KPI_TEST_PG")


def run_key(bag, db, monkeypatch, target: Target, **conf: Any) -> tuple[str, dict[str, Any] | None]:
    """One run of the key on ``db``, through its DAG (or, on the other majors, its steps in the DAG's order): the
    run's state and the target's report."""
    if THROUGH_THE_DAG:
        return run_dag(bag, db, monkeypatch, target.name, **conf)
    login = conf.pop("conn", {}).get("login")
    settings = RunSettings.from_params({"validate_now": True, **conf})
    try:
        results = run_pipeline(
            lambda: psycopg.connect(db.dsn, user=login, autocommit=True), target.spec, settings, "run"
        )
    except PreflightFailed as refused:
        return "failed", {"final_state": f"incomplete: preflight failed: {refused}"}
    return "success", results["report"]


def run_dag(bag, db, monkeypatch, name: str, **conf: Any) -> tuple[str, dict[str, Any] | None]:
    """One run of the key's DAG on ``db``: the run's state and the target's report."""
    from devkit.airflow_env import latest_xcom

    # dag.test() parses the DAG folder again to serialize the DAG: it must see the same targets file.
    monkeypatch.setenv("FK_MAINTENANCE_TARGETS", str(bag.targets_file))
    monkeypatch.setenv("AIRFLOW_CONN_KPI_DB", db.server.airflow_connection_json(db.name, **conf.pop("conn", {})))
    run = bag.dags[name].test(run_conf={**{d.name: d.default for d in SETTING_DEFS}, "validate_now": True, **conf})
    return str(run.state), latest_xcom(bag.airflow_home, "canary.report", "report", dag_id=name)


def pointers(db, spec: ForeignKeySpec) -> dict[tuple, tuple]:
    """Every row's key and the key's columns, as tuples."""
    width = len(spec.row_key)
    with db.connect() as conn:
        rows = conn.execute(
            sql.SQL("SELECT {key}, {columns} FROM {t}").format(
                key=sql.SQL(", ").join(map(sql.Identifier, spec.row_key)),
                columns=sql.SQL(", ").join(map(sql.Identifier, spec.columns)),
                t=sql.Identifier(spec.schema, spec.table),
            )
        ).fetchall()
    return {row[:width]: row[width:] for row in rows}


def audit_rows(db, spec: ForeignKeySpec) -> dict[tuple, tuple]:
    """The audit's rows: each row's key and the key's old value, as tuples."""
    width = len(spec.row_key)
    with db.connect() as conn:
        rows = conn.execute(
            sql.SQL("SELECT {key}, {old} FROM {audit}").format(
                key=sql.SQL(", ").join(map(sql.Identifier, spec.audit_row_key_columns)),
                old=sql.SQL(", ").join(map(sql.Identifier, spec.audit_pointer_columns)),
                audit=sql.Identifier(spec.audit_schema, spec.audit_table),
            )
        ).fetchall()
    return {row[:width]: row[width:] for row in rows}


def nulled_by_run(spec: ForeignKeySpec, old: tuple) -> tuple:
    """What a nulled row's key holds: its old value with the columns ON DELETE SET NULL (...) lists (all, for
    these keys, whose columns are all nullable otherwise) set to NULL."""
    nulled = spec.on_delete_columns or spec.columns
    return tuple(None if name in nulled else value for name, value in zip(spec.columns, old, strict=True))


def assert_converged(db, spec: ForeignKeySpec, before: dict[tuple, tuple], report: dict[str, Any] | None) -> None:
    """Validated, zero orphans, and every key that changed is one the audit holds with its old value, changed
    only by nulling the columns the key's nulling sets to NULL."""
    assert report is not None and report["final_state"] == "converged", report
    validated = db.scalar(
        "SELECT convalidated FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace "
        "WHERE n.nspname = %s AND c.conname = %s",
        [spec.schema, spec.constraint],
    )
    assert validated is True
    assert orphan_count(db, spec) == 0
    after = pointers(db, spec)
    assert set(after) == set(before), "rows lost or invented"
    changed = {key: old for key, old in before.items() if after[key] != old}
    assert all(after[key] == nulled_by_run(spec, old) for key, old in changed.items()), "changed beyond nulling"
    assert audit_rows(db, spec) == changed
    assert report["nulled"] == report["audited"] == len(changed)
    assert report["checks_failed"] == 0


@pytest.mark.parametrize(
    "name",
    [
        "orders_customer_fk",
        "quoted_names_fk",
        "employees_manager_fk",
        "posts_tag_fk",
        "order_items_order_fk",
        "events_sensor_fk",
        "tenant_tree_fk",
        "invoices_account_fk",
        "readings_device_fk",
    ],
)
def test_a_declared_key_converges_through_its_dag_and_a_second_run_changes_nothing(
    name, declared, bag, db, monkeypatch
) -> None:
    spec = declared[name].spec
    create(db, name)
    before = pointers(db, spec)
    orphans = orphan_count(db, spec)
    assert (orphans > 0) == (name != "order_items_order_fk")  # the NOT NULL key is declared without orphans
    state, report = run_key(bag, db, monkeypatch, declared[name])
    assert state == "success", report
    assert report["orphans_found"] == orphans
    assert_converged(db, spec, before, report)

    settled = snapshot(db, spec)
    again = run_pipeline(db.connect, spec, RunSettings(validate_now=True), "second")["report"]
    assert again["nulled"] == 0 and again["final_state"] == "converged"
    assert snapshot(db, spec) == settled


def test_an_index_that_already_serves_the_key_under_another_name_is_named_with_how_to_adopt_it(
    declared, bag, db, monkeypatch
) -> None:
    spec = declared["orders_customer_fk"].spec
    create(db, "orders_customer_fk")
    with db.connect() as conn:
        warnings = preflight(conn, spec, RunSettings())["warnings"]
    assert any(
        "index orders_by_customer (CREATE INDEX orders_by_customer ON public.orders USING btree (customer_id)) "
        "already serves (customer_id)"
        in w
        and "declare index: orders_by_customer" in w
        for w in warnings
    ), warnings
    adopted = ForeignKeySpec(**{**spec.__dict__, "index": "orders_by_customer"})
    with db.connect() as conn:
        summary = preflight(conn, adopted, RunSettings())
    assert summary["warnings"] == [] and summary["index"] == "present and valid"


# Each refusal is preflight's; these also run through their DAG (a DAG run costs seconds) to show the run fails
# at preflight with the rest of the graph untouched.
THROUGH_THE_DAG_TOO = {"order_items_order_fk", "readings_device_fk"}


@pytest.mark.parametrize(
    ("name", "setup", "reasons"),
    [
        pytest.param(
            "order_items_order_fk",
            "INSERT INTO order_items (order_id, sku) SELECT 5000 + g, 'lost' FROM generate_series(1, 40) g",
            ["order_items.order_id is NOT NULL and 40 row(s) point at a missing parent"],
            id="not-null-with-orphans",
        ),
        pytest.param(
            "readings_device_fk",
            "CREATE TABLE readings_2027 PARTITION OF readings FOR VALUES FROM ('2027-01-01') TO ('2028-01-01') "
            "PARTITION BY RANGE (taken_on)",
            ["public.readings_2027 is itself partitioned: this version builds the key on one level of partitions"],
            id="sub-partitioned-child",
        ),
        pytest.param(
            "line_items_product_fk",
            "",
            ["row_key line_items.order_no is not unique and NOT NULL"],
            id="row-key-not-unique",
        ),
        pytest.param(
            "visits_ticket_fk",
            "",
            ["row_key visits.visit_no is not unique and NOT NULL"],
            id="row-key-nullable",
        ),
        pytest.param(
            "shipments_carrier_fk",
            "",
            ["carriers.code has no primary key or unique index that is not DEFERRABLE"],
            id="referenced-column-deferrable",
        ),
        pytest.param(
            "tenant_tree_plain_set_null_fk",
            "",
            [
                "Nodes.tenant_id is NOT NULL, so ON DELETE SET NULL could never apply; declare on_delete: "
                "SET NULL (parent_id) to null only those (PostgreSQL 15+)"
            ],
            id="composite-set-null-on-a-not-null-column",
        ),
    ],
)
def test_a_key_this_version_cannot_converge_fails_at_preflight_with_nothing_changed(
    name, setup, reasons, declared, bag, db, monkeypatch
) -> None:
    spec = declared[name].spec
    create(db, name)
    if setup:
        db.execute(setup)
    before = snapshot(db, spec)
    schemas_before = db.query("SELECT nspname FROM pg_namespace ORDER BY 1")
    if name in THROUGH_THE_DAG_TOO:
        state, report = run_key(bag, db, monkeypatch, declared[name])
        assert state == "failed"
        assert report["final_state"].startswith("incomplete: preflight")
    with db.connect() as conn, pytest.raises(PreflightFailed) as caught:
        preflight(conn, spec, RunSettings())
    for reason in reasons:
        assert reason in str(caught.value)
    assert snapshot(db, spec) == before
    assert db.query("SELECT nspname FROM pg_namespace ORDER BY 1") == schemas_before  # no audit schema either


# What the role the run connects as needs, each taken away in turn from a role that has everything, with the
# words preflight must name it by and the GRANT it must offer.
PRIVILEGES = {
    "ownership": (
        'CREATE ROLE "app owner"; ALTER TABLE orders OWNER TO "app owner"; GRANT SELECT, UPDATE ON orders TO {role}',
        'lacks ownership of public.orders (owner: "app owner";',
        'GRANT "app owner" TO {role}, or run as "app owner"',
    ),
    "ownership, through a membership that does not inherit": (
        'CREATE ROLE "app owner"; ALTER TABLE orders OWNER TO "app owner"; GRANT SELECT, UPDATE ON orders TO {role};'
        # (on 16+ a membership's INHERIT defaults to the member's attribute at the time of the GRANT)
        'ALTER ROLE {role} NOINHERIT; GRANT "app owner" TO {role}',
        'lacks ownership of public.orders (owner: "app owner";',
        "{inherit}",
    ),
    "ownership, of a table a superuser owns": (
        "ALTER TABLE orders OWNER TO CURRENT_USER; GRANT SELECT, UPDATE ON orders TO {role}",
        "lacks ownership of public.orders (owner: ",
        "ALTER TABLE public.orders OWNER TO a role that is not a superuser and that {role} is a member of",
    ),
    "references": (
        "REVOKE REFERENCES ON customers FROM {role}",
        "lacks REFERENCES on public.customers",
        "GRANT REFERENCES ON public.customers TO {role}",
    ),
    "select on the referenced table": (
        "REVOKE SELECT ON customers FROM {role}",
        "lacks SELECT on public.customers",
        "GRANT SELECT ON public.customers TO {role}",
    ),
    "create on the schema": (
        "REVOKE CREATE ON SCHEMA public FROM {role}",
        "lacks CREATE on schema public (CREATE INDEX needs it",
        "GRANT CREATE ON SCHEMA public TO {role}",
    ),
    "update": (
        "SET ROLE {role}; REVOKE UPDATE ON orders FROM {role}; RESET ROLE",
        "lacks UPDATE on public.orders",
        "GRANT UPDATE ON public.orders TO {role}",
    ),
    "create on the database": (
        "REVOKE CREATE ON DATABASE {database} FROM PUBLIC, {role}",
        "lacks CREATE on database",
        "CREATE SCHEMA fk_maintenance AUTHORIZATION {role}",
    ),
}
ROLE = "fk runner"


def grant_everything(db) -> str:
    """The role the run connects as, with every privilege it needs (roles are the server's, shared by the
    tests' databases: made afresh each time)."""
    role = sql.Identifier(ROLE).as_string(None)
    for name in (ROLE, "app owner"):
        db.execute(
            f"DO $$ BEGIN IF EXISTS (SELECT FROM pg_roles WHERE rolname = '{name}') THEN "
            f"EXECUTE 'DROP OWNED BY ' || quote_ident('{name}') || ' CASCADE'; "
            f"EXECUTE 'DROP ROLE ' || quote_ident('{name}'); END IF; END $$"
        )
    db.execute(f"CREATE ROLE {role} LOGIN")
    database = sql.Identifier(db.name).as_string(None)
    db.execute(
        f"ALTER TABLE orders OWNER TO {role}; GRANT SELECT, REFERENCES ON customers TO {role}; "
        f"GRANT USAGE, CREATE ON SCHEMA public TO {role}; GRANT CREATE ON DATABASE {database} TO {role}"
    )
    return role


@pytest.mark.parametrize("lacking", list(PRIVILEGES))
def test_a_role_missing_a_privilege_the_run_needs_is_refused_naming_it_and_its_grant(lacking, declared, db) -> None:
    spec = declared["orders_customer_fk"].spec
    create(db, "orders_customer_fk")
    role = grant_everything(db)
    take_away, named, grant = PRIVILEGES[lacking]
    database = sql.Identifier(db.name).as_string(None)
    db.execute(take_away.format(role=role, database=database))
    major = db.scalar("SELECT current_setting('server_version_num')::int / 10000")
    inherit = f'GRANT "app owner" TO {role} WITH INHERIT TRUE' if major >= 16 else f"ALTER ROLE {role} INHERIT"
    before = snapshot(db, spec)
    with psycopg.connect(db.dsn, user=ROLE, autocommit=True) as conn, pytest.raises(PreflightFailed) as caught:
        preflight(conn, spec, RunSettings())
    message = str(caught.value)
    assert named in message and grant.format(role=role, inherit=inherit) in message, message
    assert len(caught.value.problems) == 1, caught.value.problems  # the one taken away, and nothing else
    assert snapshot(db, spec) == before


def test_a_role_with_every_privilege_and_nothing_more_converges_the_key(declared, bag, db, monkeypatch) -> None:
    spec = declared["orders_customer_fk"].spec
    create(db, "orders_customer_fk")
    grant_everything(db)
    before = pointers(db, spec)
    state, report = run_key(bag, db, monkeypatch, declared["orders_customer_fk"], conn={"login": ROLE})
    assert state == "success", report
    assert_converged(db, spec, before, report)


def test_the_lock_gap_watch_covers_the_referenced_table_so_app_writes_never_queue_behind_the_alter(
    declared, db, figures
) -> None:
    """ADD FOREIGN KEY locks both tables: striking while the app holds a conflicting lock on the referenced one
    would make the app's writes to the referencing one queue behind the ALTER for its whole lock_timeout."""
    import threading
    import time

    from devkit.workload import HotRowLock
    from fk_maintenance.steps.constraint import add_fk_not_valid

    spec = declared["orders_customer_fk"].spec
    create(db, "orders_customer_fk")
    settings = RunSettings(lock_timeout_ms=1000, lock_attempts=3)
    waits_ms: list[float] = []
    stop = threading.Event()

    def app_inserts_orders() -> None:
        with db.connect() as conn:
            while not stop.is_set():
                started = time.monotonic()
                conn.execute("INSERT INTO orders (customer_id, total) VALUES (2, 1)")
                waits_ms.append((time.monotonic() - started) * 1000)
                time.sleep(0.01)

    inserter = threading.Thread(target=app_inserts_orders, daemon=True)
    # The app updates a customer in transactions that hold its ROW EXCLUSIVE lock 0.95 s of every second.
    with HotRowLock(db.dsn, hold_s=0.95, period_s=1.0, update="UPDATE customers SET name = name WHERE id = 1") as hot:
        inserter.start()
        time.sleep(0.5)
        with db.connect() as conn:
            result = add_fk_not_valid(conn, spec, settings)
        time.sleep(0.3)
        stop.set()
        inserter.join()
    assert result["action"] == "added NOT VALID" and hot.cycles >= 1
    # It strikes in a gap of the referenced table's lock. On a loaded machine the hot transaction may take its lock
    # back between the look and the ALTER: that attempt then waits its first, shortest timeout (a quarter of
    # lock_timeout_ms) and the next gap lands it. The promise is the app's: no insert waits lock_timeout_ms.
    assert result["struck_in_gap"] >= 1 and result["lock_timeouts"] <= 1, result
    assert max(waits_ms) < settings.lock_timeout_ms, max(waits_ms)
    figures(
        f"customers locked 0.95 s of every 1 s: added after watching {result['watched_seconds']} s; app inserts "
        f"into orders: {len(waits_ms)}, worst {max(waits_ms):.0f} ms"
    )


@pytest.mark.parametrize(
    ("column_type", "first", "why"),
    [
        ("date", "date '2026-01-01'", "no missing date value is made"),
        ("int CHECK (day > 0)", "1", "a CHECK refuses the probe's value first"),
    ],
)
def test_a_key_the_missing_parent_probe_cannot_try_converges_with_the_probe_reported_not_tried(
    column_type, first, why, db
) -> None:
    spec = ForeignKeySpec(
        schema="public",
        table="visits_by_day",
        columns="day",
        ref_table="days",
        ref_columns="d",
        row_key="id",
        constraint="visits_by_day_day_fkey",
        index="visits_by_day_day_idx",
        audit_table="visits_by_day_orphan_audit",
    )
    base_type = column_type.split()[0]
    # Ten parents; children point at twelve values, so those at the last two are orphans.
    db.execute(
        f"CREATE TABLE days (d {base_type} PRIMARY KEY);"
        f"INSERT INTO days SELECT {first} + g FROM generate_series(0, 9) g;"
        f"CREATE TABLE visits_by_day (id int PRIMARY KEY, day {column_type});"
        f"INSERT INTO visits_by_day SELECT g, {first} + g % 12 FROM generate_series(1, 200) g"
    )
    orphans = orphan_count(db, spec)
    report = run_pipeline(db.connect, spec, RunSettings(validate_now=True), "run-1")["report"]
    assert report["final_state"] == "converged", why
    assert report["nulled"] == orphans > 0
    assert report["not_tried_checks"] == ["database rejects a missing parent (SQLSTATE 23503)"], why
    assert report["checks_failed"] == 0


def test_the_lock_gap_watch_covers_the_partitions_of_a_partitioned_referenced_table(declared, db, figures) -> None:
    import time

    from devkit.workload import HotRowLock
    from fk_maintenance.steps.constraint import add_fk_not_valid

    spec = declared["events_sensor_fk"].spec
    create(db, "events_sensor_fk")
    settings = RunSettings(lock_timeout_ms=1000, lock_attempts=2)
    # The app updates a sensor through its partition, which locks only the partition.
    hot = HotRowLock(db.dsn, hold_s=0.95, period_s=1.0, update="UPDATE sensors_0 SET label = label WHERE true")
    with hot:
        time.sleep(0.5)
        with db.connect() as conn:
            result = add_fk_not_valid(conn, spec, settings)
    assert result["action"] == "added NOT VALID" and hot.cycles >= 1
    assert result["lock_timeouts"] == 0 and result["struck_in_gap"] == 1, result
    figures(f"a partition of sensors locked 0.95 s of every 1 s: added after watching {result['watched_seconds']} s")


def test_a_tenant_scoped_composite_key_nulls_only_its_set_null_column_and_the_restore_puts_it_back(
    declared, db
) -> None:
    """MATCH SIMPLE with the tenant trap: a parent_id that exists in another tenant is an orphan all the same.
    Only parent_id is nulled (tenant_id is NOT NULL and part of the row key), the audit keeps the whole old key,
    and a restore puts back the pointers whose parent exists again, in its own tenant only."""
    from fk_maintenance.records.restore import restore_run

    spec = declared["tenant_tree_fk"].spec
    create(db, "tenant_tree_fk")
    nodes = 'SELECT tenant_id, id FROM "Tenancy"."Nodes" c WHERE '
    trapped = set(
        db.query(
            nodes + 'EXISTS (SELECT 1 FROM "Tenancy"."Nodes" o WHERE o.id = c.parent_id) '
            'AND NOT EXISTS (SELECT 1 FROM "Tenancy"."Nodes" p WHERE (p.tenant_id, p.id) = (c.tenant_id, c.parent_id))'
        )
    )
    assert len(trapped) == 9 and {tenant for tenant, _ in trapped} == {1, 2}
    before = pointers(db, spec)
    report = run_pipeline(db.connect, spec, RunSettings(validate_now=True), "tenants-1")["report"]
    assert_converged(db, spec, before, report)
    assert set(db.query(nodes + "parent_id IS NULL AND id > 10")) >= trapped
    audited = audit_rows(db, spec)
    assert all(audited[key] == (key[0], 100 * key[0] + 50) for key in trapped)

    # Tenant 1's missing parent comes back (tenant 2's does not); a node of id 150 in tenant 1 serves only
    # tenant 1's children, though tenant 2 has had one all along.
    db.execute("""INSERT INTO "Tenancy"."Nodes" VALUES (1, 150, NULL, 'revived')""")
    revived = {key for key in trapped if key[0] == 1}
    with db.connect() as conn:
        restored = restore_run(conn, spec, RunSettings(), "tenants-1", "restore-1")
    assert restored["restored"] == len(revived) == 3
    assert restored["parent_still_missing"] == len(audited) - len(revived)
    after = pointers(db, spec)
    assert all(after[key] == (1, 150) for key in revived)
    assert all(after[key] == (key[0], None) for key in audited.keys() - revived)
    logged = db.query(
        "SELECT row_key, parent FROM fk_maintenance.restore_log WHERE restore_id = 'restore-1' ORDER BY row_key"
    )
    assert logged == [(f"(1,{id_})", "(1,150)") for _, id_ in sorted(revived)]
    assert orphan_count(db, spec) == 0

    settled = snapshot(db, spec)
    with db.connect() as conn:
        again = restore_run(conn, spec, RunSettings(), "tenants-1", "restore-2")
    assert again["restored"] == 0 and again["already_restored"] == len(revived)
    assert snapshot(db, spec) == settled


def test_a_key_across_schemas_is_refused_without_usage_on_the_referenced_schema_naming_its_grant(declared, db) -> None:
    spec = declared["invoices_account_fk"].spec
    create(db, "invoices_account_fk")
    role = sql.Identifier(ROLE).as_string(None)
    db.execute(
        f"DO $$ BEGIN IF EXISTS (SELECT FROM pg_roles WHERE rolname = '{ROLE}') THEN "
        f"EXECUTE 'DROP OWNED BY ' || quote_ident('{ROLE}') || ' CASCADE'; "
        f"EXECUTE 'DROP ROLE ' || quote_ident('{ROLE}'); END IF; END $$"
    )
    database = sql.Identifier(db.name).as_string(None)
    db.execute(
        f'CREATE ROLE {role} LOGIN; ALTER TABLE "Billing"."Invoices" OWNER TO {role}; '
        f'GRANT USAGE, CREATE ON SCHEMA "Billing" TO {role}; GRANT SELECT, REFERENCES ON "CRM"."Accounts" TO {role}; '
        f"GRANT CREATE ON DATABASE {database} TO {role}"
    )
    before = snapshot(db, spec)
    with psycopg.connect(db.dsn, user=ROLE, autocommit=True) as conn, pytest.raises(PreflightFailed) as caught:
        preflight(conn, spec, RunSettings())
    assert f'lacks USAGE on schema "CRM": GRANT USAGE ON SCHEMA "CRM" TO {role}' in str(caught.value), caught.value
    assert snapshot(db, spec) == before
    db.execute(f'GRANT USAGE ON SCHEMA "CRM" TO {role}')
    with psycopg.connect(db.dsn, user=ROLE, autocommit=True) as conn:
        assert preflight(conn, spec, RunSettings())["key"] == spec.describe()
