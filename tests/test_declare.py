"""fk-maintenance declare: a targets file declaring every foreign key a reference database has, exactly as it has
them; landing that file on a database that lacks the keys gives back the very keys the reference holds."""

from __future__ import annotations

from pathlib import Path

import pytest

from devkit.db_state import snapshot
from fk_maintenance.cli import commands as cli
from fk_maintenance.keys.targets import load_targets

# Keys of every shape the file can say, on names a parser would trip on.
SCHEMA = """
CREATE SCHEMA "Sales";
CREATE TABLE "Sales"."Customers" (tenant_id int, id int, PRIMARY KEY (tenant_id, id));
CREATE TABLE "Sales"."Orders" (
    tenant_id int NOT NULL, "order no" int NOT NULL, customer_id int,
    PRIMARY KEY (tenant_id, "order no"),
    CONSTRAINT "Orders, to customer" FOREIGN KEY (tenant_id, customer_id)
        REFERENCES "Sales"."Customers" ON UPDATE CASCADE ON DELETE SET NULL (customer_id)
);
CREATE INDEX orders_by_customer ON "Sales"."Orders" (tenant_id, customer_id, "order no");
CREATE TABLE public.lines (
    id bigint PRIMARY KEY, tenant_id int NOT NULL, "order no" int NOT NULL,
    FOREIGN KEY (tenant_id, "order no") REFERENCES "Sales"."Orders" ON UPDATE CASCADE ON DELETE RESTRICT
);
CREATE TABLE public.notes (
    id int PRIMARY KEY, tenant_id int, "order no" int,
    CONSTRAINT notes_order_fkey FOREIGN KEY (tenant_id, "order no") REFERENCES "Sales"."Orders"
        MATCH FULL ON DELETE CASCADE DEFERRABLE INITIALLY DEFERRED
);
CREATE TABLE public.tree (id int PRIMARY KEY, parent_id int REFERENCES public.tree DEFERRABLE);
CREATE TABLE public.readings (device int, at date, tree_id int REFERENCES public.tree ON DELETE SET NULL,
                              PRIMARY KEY (device, at)) PARTITION BY RANGE (at);
CREATE TABLE public.readings_2025 PARTITION OF public.readings FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE public.loose (tree_id int REFERENCES public.tree);
"""
KEYS = """
SELECT conrelid::regclass::text || ' ' || conname || ' ' || pg_get_constraintdef(oid)
FROM pg_constraint WHERE contype = 'f' AND conparentid = 0 ORDER BY 1
"""
DROP_KEYS = """
DO $$ DECLARE k record; BEGIN
  FOR k IN SELECT conrelid::regclass AS t, conname FROM pg_constraint WHERE contype = 'f' AND conparentid = 0 LOOP
    EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', k.t, k.conname);
  END LOOP;
END $$
"""


def _declare(db, capsys, *extra: str) -> tuple[int, str, str]:
    code = cli.main(["declare", "--from-dsn", db.dsn, "--conn-ids", "app_db", *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_every_key_is_declared_as_the_reference_has_it_and_lands_exactly_so(db, capsys, tmp_path: Path) -> None:
    db.execute(SCHEMA)
    reference = db.query(KEYS)
    code, text, err = _declare(db, capsys)
    assert code == cli.EXIT_OK, err
    targets = tmp_path / "targets.yaml"
    targets.write_text(text)
    declared = {target.spec.constraint: target for target in load_targets(targets)}
    assert sorted(declared) == [
        "Orders, to customer",
        "lines_tenant_id_order no_fkey",
        "notes_order_fkey",
        "readings_tree_id_fkey",
        "tree_parent_id_fkey",
    ], text
    # The table without a primary key is there, commented out, with what to add.
    assert "# public.loose (tree_id) -> public.tree(id): loose has no primary key" in text, text
    # The index that already serves a key is the key's: no second one is built.
    assert declared["Orders, to customer"].spec.index == "orders_by_customer"
    assert all(target.conn_ids == ("app_db",) for target in declared.values())

    db.execute(DROP_KEYS)
    code = cli.main(["run", "--dsn", db.dsn, "--targets", str(targets), "--all", "--set", "validate_now=true"])
    summary = capsys.readouterr().out.split("All 5 declared key(s) on ", 1)[1]
    assert code == cli.EXIT_OK and summary.count(": converged") == 5, summary
    # Every key but the one that could not be declared is back, exactly as the reference had it.
    assert db.query(KEYS) == [key for key in reference if not key[0].startswith("loose ")]
    assert db.scalar("SELECT count(*) FROM pg_indexes WHERE indexname = 'orders_by_customer'") == 1


def test_one_schema_only_and_a_database_without_keys_says_so(db, capsys) -> None:
    db.execute(SCHEMA)
    code, text, _ = _declare(db, capsys, "--schema", "Sales")
    assert code == cli.EXIT_OK and '\n  - name: "Orders__to_customer"' in text, text
    assert "lines" not in text.replace("# Every", "")
    db.execute(DROP_KEYS)
    code, text, err = _declare(db, capsys)
    assert code == cli.EXIT_REFUSED and "no foreign key" in err, (text, err)


@pytest.mark.parametrize("dsn", ["host=127.0.0.1 port=1 dbname=x password=s3cret connect_timeout=2"])
def test_an_unreachable_reference_database_is_exit_2_without_its_password(dsn: str, capsys) -> None:
    code = cli.main(["declare", "--from-dsn", dsn])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE and "cannot connect" in err and "s3cret" not in err, err


def test_run_all_reports_a_refused_key_and_lands_the_others(db, capsys, tmp_path: Path) -> None:
    """A key whose data cannot take it (a NOT NULL line of a missing order: refused, nothing changed) does not
    stop the keys after it; the run says which is which and exits 1."""
    db.execute(SCHEMA)
    _code, text, _ = _declare(db, capsys)
    targets = tmp_path / "targets.yaml"
    targets.write_text(text)
    db.execute(DROP_KEYS)
    db.execute("INSERT INTO public.lines VALUES (1, 7, 7)")  # order (7, 7) does not exist
    code = cli.main(["run", "--dsn", db.dsn, "--targets", str(targets), "--all", "--set", "validate_now=true"])
    summary = capsys.readouterr().out.split("All 5 declared key(s) on ", 1)[1]
    assert code == cli.EXIT_REFUSED, summary
    assert "lines_tenant_id_order_no_fkey: failed or refused" in summary and summary.count(": converged") == 4, summary
    assert db.scalar("SELECT count(*) FROM pg_constraint WHERE conname = 'lines_tenant_id_order no_fkey'") == 0


@pytest.mark.parametrize(
    ("table", "columns"),
    [
        ("lines", ["order_id"]),
        ("Order Lines", ["Tenant", "order id"]),
        ("a_table_name_that_is_long_enough_to_be_cut_when_a_key_is_named", ["a_column_that_is_long_as_well_x"]),
        ("t", ["c1_" + "x" * 40, "c2_" + "y" * 40]),
    ],
)
def test_an_undeclared_constraint_name_is_the_one_postgresql_gives(db, table: str, columns: list[str]) -> None:
    """A key declared without a constraint name is named as an unnamed ADD FOREIGN KEY would be, so the two are the
    same key (and the index as an unnamed CREATE INDEX, the audit table alike)."""
    from psycopg import sql

    from fk_maintenance.keys.spec import default_names

    names = sql.SQL(", ").join(map(sql.Identifier, columns))
    with db.connect() as conn:
        conn.execute(sql.SQL("CREATE TABLE parent (k1 int UNIQUE, k2 int, PRIMARY KEY (k1, k2))"))
        conn.execute(
            sql.SQL("CREATE TABLE {} ({}, FOREIGN KEY ({}) REFERENCES parent ({}))").format(
                sql.Identifier(table),
                sql.SQL(", ").join(sql.SQL("{} int").format(sql.Identifier(c)) for c in columns),
                names,
                sql.SQL(", ").join(map(sql.Identifier, ["k1", "k2"][: len(columns)])),
            )
        )
        conn.execute(sql.SQL("CREATE INDEX ON {} ({})").format(sql.Identifier(table), names))
    given = db.query("SELECT conname FROM pg_constraint WHERE contype = 'f'")[0][0]
    index = db.query("SELECT indexname FROM pg_indexes WHERE tablename = %s AND indexname <> %s", [table, "x"])
    assert default_names(table, columns)["constraint"] == given
    assert default_names(table, columns)["index"] in [row[0] for row in index]


def test_a_key_needs_only_its_table_columns_and_referenced_table(tmp_path: Path) -> None:
    path = tmp_path / "targets.yaml"
    path.write_text(
        "conn_ids: [app_db]\n"
        "foreign_keys:\n"
        "  - {name: lines_fk, table: lines, column: order_id, ref_table: orders, ref_column: id}\n"
        "  - {name: notes_fk, table: notes, column: order_id, ref_table: orders, ref_column: id, conn_ids: [other]}\n"
    )
    lines, notes = load_targets(path)
    assert (lines.spec.constraint, lines.spec.index, lines.spec.audit_table) == (
        "lines_order_id_fkey",
        "lines_order_id_idx",
        "lines_order_id_audit",
    )
    assert (lines.conn_ids, notes.conn_ids) == (("app_db",), ("other",))


def test_a_key_that_names_no_index_uses_one_that_already_serves_it_and_builds_none(db, tmp_path: Path) -> None:
    from devkit.pipeline import run_pipeline
    from fk_maintenance.keys.settings import RunSettings

    db.execute(
        "CREATE TABLE orders (id int PRIMARY KEY); INSERT INTO orders VALUES (1);"
        "CREATE TABLE lines (id int PRIMARY KEY, order_id int, at date);"
        "INSERT INTO lines VALUES (1, 1, now()), (2, 9, now());"
        "CREATE INDEX lines_by_order_and_day ON lines (order_id, at)"
    )
    path = tmp_path / "targets.yaml"
    path.write_text(
        "conn_ids: [app_db]\nforeign_keys:\n"
        "  - {name: lines_fk, table: lines, column: order_id, ref_table: orders, ref_column: id}\n"
    )
    (target,) = load_targets(path)
    results = run_pipeline(db.connect, target.spec, RunSettings(validate_now=True), "serving-1")
    assert results["report"]["final_state"] == "converged", results["report"]
    assert results["create_index_concurrently"]["action"] == "none (uses lines_by_order_and_day)"
    assert "lines_by_order_and_day already serves the key" in results["preflight"]["index"]
    assert [name for (name,) in db.query("SELECT indexname FROM pg_indexes WHERE tablename = 'lines' ORDER BY 1")] == [
        "lines_by_order_and_day",
        "lines_pkey",
    ]


def test_a_key_some_partitions_hold_under_their_own_names_is_declared_on_their_table_and_lands_once(
    db, capsys, tmp_path: Path
) -> None:
    """pagila's payment: its oldest partitions hold keys of their own, the newer none. Declared on the partitioned
    table (saying so), the run renames and adopts the held ones and gives the others the key: one per partition."""
    db.execute(
        "CREATE TABLE devices (id int PRIMARY KEY);"
        "CREATE TABLE events (id int, at date, device_id int NOT NULL, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);"
        "CREATE TABLE events_2024 PARTITION OF events FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');"
        "CREATE TABLE events_2025 PARTITION OF events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');"
        "ALTER TABLE events_2024 ADD CONSTRAINT events_2024_device_id_fkey FOREIGN KEY (device_id) REFERENCES devices"
    )
    code, text, err = _declare(db, capsys)
    assert code == cli.EXIT_OK, err
    assert "# 1 of 2 partitions hold it already (events_2024.events_2024_device_id_fkey)" in text, text
    targets = tmp_path / "targets.yaml"
    targets.write_text(text)
    (target,) = load_targets(targets)
    assert (target.spec.table, target.spec.constraint, target.spec.row_key) == (
        "events",
        "events_device_id_fkey",
        ("id", "at"),
    )
    code = cli.main(["run", "--dsn", db.dsn, "--targets", str(targets), "--all", "--set", "validate_now=true"])
    assert code == cli.EXIT_OK, capsys.readouterr().out
    assert db.query("SELECT conrelid::regclass::text, conname FROM pg_constraint WHERE contype = 'f' ORDER BY 1") == [
        ("events", "events_device_id_fkey"),
        ("events_2024", "events_device_id_fkey"),
        ("events_2025", "events_device_id_fkey"),
    ]


# A store of its own, shaped like the sample schemas DBAs know: every table's rows stamped by an update trigger,
# keys ON UPDATE CASCADE ON DELETE RESTRICT, link tables with composite primary keys, a self-reference, a key
# across schemas, and a partitioned payments table whose two oldest partitions carry keys of their own.
STORE = """
CREATE SCHEMA ref;
CREATE FUNCTION stamp() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN NEW.updated_at := now(); RETURN NEW; END $$;
CREATE TABLE ref.countries (id int PRIMARY KEY, updated_at timestamptz);
CREATE TABLE cities (id int PRIMARY KEY, country_id int NOT NULL REFERENCES ref.countries
    ON UPDATE CASCADE ON DELETE RESTRICT, updated_at timestamptz);
CREATE TABLE addresses (id int PRIMARY KEY, city_id int NOT NULL REFERENCES cities
    ON UPDATE CASCADE ON DELETE RESTRICT, updated_at timestamptz);
CREATE TABLE stores (id int PRIMARY KEY, address_id int REFERENCES addresses ON UPDATE CASCADE ON DELETE RESTRICT,
    updated_at timestamptz);
CREATE TABLE staff (id int PRIMARY KEY, store_id int NOT NULL REFERENCES stores ON UPDATE CASCADE ON DELETE RESTRICT,
    address_id int REFERENCES addresses ON UPDATE CASCADE ON DELETE RESTRICT,
    manager_id int REFERENCES staff ON DELETE SET NULL, updated_at timestamptz);
CREATE TABLE customers (id int PRIMARY KEY, store_id int NOT NULL REFERENCES stores ON UPDATE CASCADE
    ON DELETE RESTRICT, address_id int REFERENCES addresses ON UPDATE CASCADE ON DELETE RESTRICT,
    updated_at timestamptz);
CREATE TABLE languages (id int PRIMARY KEY, updated_at timestamptz);
CREATE TABLE films (id int PRIMARY KEY, language_id int NOT NULL REFERENCES languages ON UPDATE CASCADE
    ON DELETE RESTRICT, original_language_id int REFERENCES languages ON UPDATE CASCADE ON DELETE RESTRICT,
    updated_at timestamptz);
CREATE TABLE actors (id int PRIMARY KEY, updated_at timestamptz);
CREATE TABLE categories (id int PRIMARY KEY, updated_at timestamptz);
CREATE TABLE film_actors (actor_id int REFERENCES actors ON UPDATE CASCADE ON DELETE RESTRICT,
    film_id int REFERENCES films ON UPDATE CASCADE ON DELETE RESTRICT, updated_at timestamptz,
    PRIMARY KEY (actor_id, film_id));
CREATE TABLE film_categories (film_id int REFERENCES films ON UPDATE CASCADE ON DELETE RESTRICT,
    category_id int REFERENCES categories ON UPDATE CASCADE ON DELETE RESTRICT, updated_at timestamptz,
    PRIMARY KEY (film_id, category_id));
CREATE TABLE inventory (id int PRIMARY KEY, film_id int NOT NULL REFERENCES films ON UPDATE CASCADE
    ON DELETE RESTRICT, store_id int NOT NULL REFERENCES stores ON UPDATE CASCADE ON DELETE RESTRICT,
    updated_at timestamptz);
CREATE TABLE rentals (id int PRIMARY KEY, inventory_id int NOT NULL REFERENCES inventory ON UPDATE CASCADE
    ON DELETE RESTRICT, customer_id int REFERENCES customers ON UPDATE CASCADE ON DELETE RESTRICT,
    updated_at timestamptz);
CREATE TABLE payments (id int, paid_on date, customer_id int NOT NULL, rental_id int, PRIMARY KEY (id, paid_on))
    PARTITION BY RANGE (paid_on);
CREATE TABLE payments_2023 PARTITION OF payments FOR VALUES FROM ('2023-01-01') TO ('2024-01-01');
CREATE TABLE payments_2024 PARTITION OF payments FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE TABLE payments_2025 PARTITION OF payments FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
ALTER TABLE payments_2023 ADD CONSTRAINT payments_2023_customer_fk FOREIGN KEY (customer_id) REFERENCES customers;
ALTER TABLE payments_2024 ADD CONSTRAINT payments_2024_customer_fk FOREIGN KEY (customer_id) REFERENCES customers;
ALTER TABLE payments_2023 ADD CONSTRAINT payments_2023_rental_fk FOREIGN KEY (rental_id) REFERENCES rentals;
CREATE INDEX payments_2023_customer_idx ON payments_2023 (customer_id);
DO $$ DECLARE t record; BEGIN
  FOR t IN SELECT c.oid::regclass AS r FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid
           WHERE a.attname = 'updated_at' AND c.relkind = 'r' LOOP
    EXECUTE format('CREATE TRIGGER stamp BEFORE UPDATE ON %s FOR EACH ROW EXECUTE FUNCTION stamp()', t.r);
  END LOOP;
END $$;
INSERT INTO ref.countries VALUES (1), (2); INSERT INTO cities VALUES (1, 1), (2, 2);
INSERT INTO addresses SELECT g, 1 + g % 2 FROM generate_series(1, 20) g;
INSERT INTO stores VALUES (1, 1), (2, 2); INSERT INTO staff VALUES (1, 1, 3, NULL), (2, 2, 4, 1);
INSERT INTO customers SELECT g, 1 + g % 2, g FROM generate_series(1, 20) g;
INSERT INTO languages VALUES (1), (2); INSERT INTO films SELECT g, 1, 2 FROM generate_series(1, 30) g;
INSERT INTO actors SELECT g FROM generate_series(1, 10) g; INSERT INTO categories VALUES (1), (2);
INSERT INTO film_actors SELECT 1 + g % 10, g FROM generate_series(1, 30) g;
INSERT INTO film_categories SELECT g, 1 + g % 2 FROM generate_series(1, 30) g;
INSERT INTO inventory SELECT g, g, 1 + g % 2 FROM generate_series(1, 30) g;
INSERT INTO rentals SELECT g, g, 1 + g % 20 FROM generate_series(1, 30) g;
INSERT INTO payments SELECT g, date '2023-03-01' + g * 20, 1 + g % 20, 1 + g % 30 FROM generate_series(1, 50) g;
"""
TABLE_KEYS = """
SELECT conrelid::regclass::text || ' ' || pg_get_constraintdef(oid) FROM pg_constraint
WHERE contype = 'f' AND conparentid = 0 AND NOT conrelid::regclass::text LIKE 'payments_%' ORDER BY 1
"""
# Every key of the reference but the partitions' own (those become the partitioned table's key), and the app's
# writes stamped by the triggers through it all.
DROP_TABLE_KEYS = DROP_KEYS.replace(
    "conparentid = 0", "conparentid = 0 AND NOT conrelid::regclass::text LIKE 'payments_%'"
)


def test_a_whole_schema_lands_from_its_reference_exactly_with_no_key_or_index_twice(db, capsys, tmp_path: Path) -> None:
    """Twenty keys, declared from a reference database, landed with one run --all on a copy that lost them
    and gained orphans: every key converges with exactly the reference's definition or is refused with nothing
    changed; the partitions' own keys and index are adopted, never doubled."""
    db.execute(STORE)
    code, text, err = _declare(db, capsys)
    assert code == cli.EXIT_OK, err
    targets = tmp_path / "targets.yaml"
    targets.write_text(text)
    declared = load_targets(targets)
    assert len(declared) == 20, [target.name for target in declared]
    reference = db.query(TABLE_KEYS)
    indexes_before = db.query("SELECT indexrelid::regclass::text FROM pg_index ORDER BY 1")
    db.execute(DROP_TABLE_KEYS)
    # Orphans: nullable pointers (nulled, audited) and a NOT NULL one (its key refused, nothing changed).
    db.execute(
        "UPDATE films SET original_language_id = 9 WHERE id <= 3; UPDATE staff SET manager_id = 99 WHERE id = 2;"
    )
    db.execute("INSERT INTO inventory VALUES (31, 77, 1)")
    inventory_key = next(t for t in declared if t.spec.table == "inventory" and t.spec.columns == ("film_id",))
    before_refused = snapshot(db, inventory_key.spec)
    code = cli.main(["run", "--dsn", db.dsn, "--targets", str(targets), "--all", "--set", "validate_now=true"])
    summary = capsys.readouterr().out.split("All 20 declared key(s) on ", 1)[1]
    assert code == cli.EXIT_REFUSED and summary.count(": converged") == 19, summary
    assert f"{inventory_key.name}: failed or refused" in summary, summary
    # Refused with nothing of its own changed: no row, no key, no index, no audit table (the table's other key,
    # store_id's, landed beside it).
    after_refused = snapshot(db, inventory_key.spec)
    assert (after_refused["data"], after_refused["audit_table"]) == (before_refused["data"], False)
    assert not any(inventory_key.spec.constraint in line for line in after_refused["constraints"])
    assert not any(inventory_key.spec.index in line for line in after_refused["indexes"])
    landed = db.query(TABLE_KEYS)
    missing = "inventory FOREIGN KEY (film_id) REFERENCES films(id) ON UPDATE CASCADE ON DELETE RESTRICT"
    # The partitions' keys are the partitioned table's now (as declared: their own adopted, see below).
    payments = [
        ("payments FOREIGN KEY (customer_id) REFERENCES customers(id)",),
        ("payments FOREIGN KEY (rental_id) REFERENCES rentals(id)",),
    ]
    assert landed == sorted([key for key in reference if key[0] != missing] + payments), set(reference) ^ set(landed)
    # One key per partition for each of payments' keys, whatever its name was; no index built twice.
    per_partition = db.query(
        "SELECT conrelid::regclass::text, count(*) FROM pg_constraint WHERE contype = 'f' "
        "AND conrelid::regclass::text LIKE 'payments_%' GROUP BY 1 ORDER BY 1"
    )
    assert per_partition == [("payments_2023", 2), ("payments_2024", 2), ("payments_2025", 2)]
    doubled = db.query("SELECT indrelid::regclass::text, indkey::text FROM pg_index GROUP BY 1, 2 HAVING count(*) > 1")
    assert doubled == [], doubled
    assert "payments_2023_customer_idx" in [
        name for (name,) in db.query("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid")
    ]
    assert len(db.query("SELECT 1 FROM pg_index")) >= len(indexes_before)
