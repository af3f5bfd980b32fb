"""Keys declared in the app's Drizzle schema: a targets file's ``drizzle:`` entry declares every foreign key of the
latest snapshot the real drizzle-kit wrote, under its names; the pipeline lands them on a live database and the
app's own drizzle-kit push then sees no drift; ``fk-maintenance guard`` makes what drizzle-kit generate writes for
the keys a no-op there (no lock on the tables), a refusal on a large table that lacks them, and the keys
themselves on a fresh database. A scratch app of the test's own (copied from app/, with its pinned drizzle-kit)
declares four tables across two schemas: the seed plan's self-reference, a NOT NULL key without an index, and a
composite ON UPDATE CASCADE / ON DELETE RESTRICT key into another schema."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import psycopg
import pytest

from devkit.app_db import populate
from devkit.drizzle import drizzle_kit, scratch_app
from devkit.pipeline import run_pipeline
from fk_maintenance.cli.commands import main
from fk_maintenance.keys.settings import RunSettings
from fk_maintenance.keys.targets import Target, TargetsFileInvalid, load_targets

NOW = RunSettings(validate_now=True)
SCHEMAS = ("public", "crm")
PARENT = "vision_kpis_parent_kpi_id_vision_kpis_id_fk"  # drizzle-kit's name for the seed plan's .references()
GOALS = "goals_kpi_id_vision_kpis_id_fk"
INVOICES = "invoices_account_fk"


# The scratch app's schema.ts. Its keys, and the indexes it declares for them, fill the placeholders: without
# them, the app as it was before (its first migration).
SCHEMA_TS = """import {
  foreignKey, index, integer, pgSchema, pgTable, primaryKey, text, timestamp, uuid,
} from "drizzle-orm/pg-core";

export const crm = pgSchema("crm");

export const visionKpis = pgTable(
  "vision_kpis",
  {
    id: uuid("id").primaryKey().defaultRandom(),
    userId: uuid("user_id").notNull(),
    visionId: uuid("vision_id").notNull(),
    level: text("level", { enum: ["yearly", "quarterly", "monthly", "weekly", "daily"] }).notNull(),
    title: text("title").notNull(),
    parentKpiId: uuid("parent_kpi_id")PARENT_REFERENCE,
    createdAt: timestamp("created_at", { withTimezone: true }).notNull().defaultNow(),
    updatedAt: timestamp("updated_at", { withTimezone: true }).notNull().defaultNow(),
  },
  (table) => [
    index("vision_kpis_user_vision_idx").on(table.userId, table.visionId),
    index("vision_kpis_level_idx").on(table.visionId, table.level),
    PARENT_INDEX
  ],
);

// No index on kpi_id: the key gets none the pipeline builds (push would drop it).
export const goals = pgTable("goals", {
  id: uuid("id").primaryKey().defaultRandom(),
  kpiId: uuid("kpi_id").notNull()GOALS_REFERENCE,
  title: text("title").notNull(),
});

export const accounts = crm.table(
  "accounts",
  { tenantId: uuid("tenant_id").notNull(), id: uuid("id").notNull(), name: text("name").notNull() },
  (t) => [primaryKey({ columns: [t.tenantId, t.id] })],
);

export const invoices = pgTable(
  "invoices",
  {
    id: uuid("id").primaryKey().defaultRandom(),
    tenantId: uuid("tenant_id").notNull(),
    accountId: uuid("account_id"),
    amount: integer("amount").notNull(),
  },
  (t) => [
    INVOICES_KEY
  ],
);
"""
KEYS_TS = {
    # The seed plan's own words.
    "PARENT_REFERENCE": ".references(() => visionKpis.id, { onDelete: 'set null' })",
    "PARENT_INDEX": 'index("vision_kpis_parent_kpi_idx").on(table.parentKpiId),',
    "GOALS_REFERENCE": ".references(() => visionKpis.id, { onDelete: 'cascade', onUpdate: 'cascade' })",
    "INVOICES_KEY": """index("invoices_tenant_account_idx").on(t.tenantId, t.accountId),
    foreignKey({
      name: "invoices_account_fk",
      columns: [t.tenantId, t.accountId],
      foreignColumns: [accounts.tenantId, accounts.id],
    }).onDelete("restrict").onUpdate("cascade"),""",
}


def schema_ts(*, keys: bool) -> str:
    """The scratch app's schema.ts: its tables, and with ``keys`` their foreign keys (and the indexes it declares)."""
    text = SCHEMA_TS
    for placeholder, words in KEYS_TS.items():
        text = text.replace(placeholder, words if keys else "")
    return text


def _ok(result) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def generate(app: Path, name: str) -> Path:
    """``drizzle-kit generate --name``: the migration it wrote. drizzle-kit names a migration's snapshot by the
    second it was generated in: two generates within one second would write one snapshot file over the other, so
    each waits for a second of its own."""
    time.sleep(1.1)
    _ok(drizzle_kit(app, "dbname=unused", "generate", "--name", name))
    (migration,) = (app / "drizzle" / "migrations").glob(f"*_{name}.sql")
    return migration


@pytest.fixture(scope="module")
def generated_app(node_modules, tmp_path_factory) -> Path:
    """The scratch app, as drizzle-kit generate leaves it: a migration with the tables, then one with the keys."""
    made = scratch_app(
        node_modules, tmp_path_factory.mktemp("drizzle") / "app", schema_ts(keys=False), schema_filter=SCHEMAS
    )
    generate(made, "tables")
    (made / "src" / "lib" / "db" / "schema.ts").write_text(schema_ts(keys=True))
    generate(made, "keys")
    return made


@pytest.fixture
def app(generated_app, tmp_path) -> Path:
    """A copy of the scratch app of the test's own (tests edit, guard and migrate it)."""
    return Path(shutil.copytree(generated_app, tmp_path / "app", symlinks=True))


def targets_file(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "targets.yaml"
    path.write_text(body)
    return path


def declared(tmp_path: Path) -> dict[str, Target]:
    """The scratch app's keys, declared by one drizzle entry (the delete of orphan goals approved up to 100 rows)."""
    path = targets_file(
        tmp_path,
        "conn_ids: [app_db]\n"
        "foreign_keys:\n"
        "  - drizzle: app/drizzle/migrations\n"
        "    overrides:\n"
        f"      {PARENT}: {{hierarchy_checks: true}}\n"
        f"      {GOALS}: {{orphans: delete, approve_deletes_above: 100, conn_ids: [app_db, other_db]}}\n",
    )
    return {target.name: target for target in load_targets(path)}


def test_a_drizzle_entry_declares_every_key_of_the_latest_snapshot_under_drizzle_kits_names(app, tmp_path) -> None:
    targets = declared(tmp_path)
    assert sorted(targets) == sorted([PARENT, GOALS, INVOICES])  # the latest snapshot's, not the first one's (none)
    parent, goals, invoices = (targets[name].spec for name in (PARENT, GOALS, INVOICES))
    assert parent.describe() == (
        "public.vision_kpis(parent_kpi_id) -> public.vision_kpis(id) ON DELETE SET NULL as "
        f"{PARENT}, index vision_kpis_parent_kpi_idx"
    )
    assert (parent.row_key, parent.hierarchy_checks, parent.build_index) == (("id",), True, True)
    # No index in the snapshot: none of the pipeline's (the name it shows is the one schema.ts would declare).
    assert (goals.on_delete, goals.on_update, goals.orphans, goals.build_index) == (
        "CASCADE",
        "CASCADE",
        "delete",
        False,
    )
    assert goals.index == "goals_kpi_id_idx"
    assert (targets[GOALS].conn_ids, targets[GOALS].settings) == (
        ("app_db", "other_db"),
        {"approve_deletes_above": 100},
    )
    assert invoices.describe() == (
        "public.invoices(tenant_id, account_id) -> crm.accounts(tenant_id, id) ON UPDATE CASCADE ON DELETE RESTRICT "
        f"as {INVOICES}, index invoices_tenant_account_idx"
    )
    assert (invoices.row_key, targets[INVOICES].conn_ids) == (("id",), ("app_db",))
    # Without the journal, the highest-numbered snapshot is the latest.
    (app / "drizzle" / "migrations" / "meta" / "_journal.json").unlink()
    assert sorted(declared(tmp_path)) == sorted(targets)


def _snapshot_edit(app: Path, edit) -> None:
    meta = app / "drizzle" / "migrations" / "meta"
    latest = max(meta.glob("*_snapshot.json"))
    snapshot = json.loads(latest.read_text())
    edit(snapshot)
    latest.write_text(json.dumps(snapshot))


def _drop_primary_key(snapshot: dict) -> None:
    snapshot["tables"]["public.goals"]["columns"]["id"]["primaryKey"] = False


@pytest.mark.parametrize(
    ("entry", "edit", "message"),
    [
        ("drizzle: app/drizzle", None, "holds no drizzle-kit snapshot (meta/<n>_snapshot.json): point drizzle: at"),
        ("drizzle: app/drizzle/migrations", lambda s: s.update(version="6"), "run `drizzle-kit up` in the app"),
        ("drizzle: app/drizzle/migrations", lambda s: s.update(dialect="mysql"), "of dialect 'mysql'"),
        (
            "drizzle: app/drizzle/migrations\n    overrides: {nope_fk: {orphans: delete}}",
            None,
            f"overrides name 'nope_fk', and {{snapshot}} declares no key of that name (its keys: {GOALS}, {INVOICES}, "
            f"{PARENT}): correct the name",
        ),
        (
            f"drizzle: app/drizzle/migrations\n    overrides: {{{GOALS}: {{on_delete: restrict}}}}",
            None,
            "'on_delete' cannot be overridden (on_delete: the key's own, as schema.ts declares it: change it there",
        ),
        (
            # The same constraint declared in the file too.
            f"drizzle: app/drizzle/migrations\n  - {{name: goals_fk, table: goals, column: kpi_id, ref_table: "
            f"vision_kpis, ref_column: id, constraint: {GOALS}}}",
            None,
            f"is declared twice: foreign_keys[0] (drizzle: app/drizzle/migrations): {GOALS} of public.goals, and "
            "foreign_keys[1] ('goals_fk'): remove foreign_keys[1] ('goals_fk') from the file",
        ),
        (
            # The shipped entry's key (its own name) beside the seed plan's .references(): two equal keys.
            "drizzle: app/drizzle/migrations\n  - {name: vision_kpis_parent_fk, table: vision_kpis, column: "
            "parent_kpi_id, ref_table: vision_kpis, ref_column: id, index: vision_kpis_parent_kpi_idx}",
            None,
            f"{PARENT} of public.vision_kpis, and foreign_keys[1] ('vision_kpis_parent_fk'): remove",
        ),
        (
            "drizzle: app/drizzle/migrations",
            _drop_primary_key,
            f"{GOALS} of public.goals: {{snapshot}} declares no primary key of goals, which the audit needs to tell "
            f"its rows apart: declare one in schema.ts, or a unique NOT NULL column list here: overrides: {{{GOALS}: "
            "{row_key: [...]}}",
        ),
    ],
)
def test_bad_drizzle_input_is_one_error_at_parse_time_naming_the_fix(app, tmp_path, entry, edit, message) -> None:
    if edit is not None:
        _snapshot_edit(app, edit)
    snapshot = max((app / "drizzle" / "migrations" / "meta").glob("*_snapshot.json"))
    path = targets_file(tmp_path, f"conn_ids: [app_db]\nforeign_keys:\n  - {entry}\n")
    with pytest.raises(TargetsFileInvalid) as refused:
        load_targets(path)
    assert message.replace("{snapshot}", str(tmp_path / "app/drizzle/migrations/meta" / snapshot.name)) in str(
        refused.value
    )
    assert str(refused.value).startswith(f"{path}: ")


def test_a_snapshot_without_keys_or_a_journal_without_its_snapshot_is_refused(app, tmp_path) -> None:
    meta = app / "drizzle" / "migrations" / "meta"
    path = targets_file(tmp_path, "conn_ids: [app_db]\nforeign_keys:\n  - drizzle: app/drizzle/migrations\n")
    latest = max(meta.glob("*_snapshot.json"))
    latest.rename(tmp_path / "aside.json")
    with pytest.raises(TargetsFileInvalid, match=r"has no snapshot .* restore it from version control"):
        load_targets(path)
    # The journal's first migration only: its snapshot declares no key.
    journal = json.loads((meta / "_journal.json").read_text())
    journal["entries"] = journal["entries"][:1]
    (meta / "_journal.json").write_text(json.dumps(journal))
    with pytest.raises(TargetsFileInvalid, match=r"declares no foreign key: declare the app's keys in schema\.ts"):
        load_targets(path)


# --- on a live database ---------------------------------------------------------------------------------------


def app_state(db) -> dict[str, object]:
    """Every constraint and index of the app's schemas (oids: a no-op recreates nothing) and every table's data."""
    with db.connect() as conn:
        catalog = conn.execute(
            """
            SELECT c.oid, c.conrelid::regclass::text, c.conname, pg_get_constraintdef(c.oid), c.convalidated
            FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
            WHERE n.nspname = ANY(%(schemas)s) ORDER BY 2, 3
            """,
            {"schemas": list(SCHEMAS)},
        ).fetchall()
        indexes = conn.execute(
            """
            SELECT i.indexrelid, pg_get_indexdef(i.indexrelid), i.indisvalid
            FROM pg_index i JOIN pg_class t ON t.oid = i.indrelid JOIN pg_namespace n ON n.oid = t.relnamespace
            WHERE n.nspname = ANY(%(schemas)s) ORDER BY 2
            """,
            {"schemas": list(SCHEMAS)},
        ).fetchall()
        data = {
            table: conn.execute(
                f"SELECT count(*), md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) FROM {table} t"
            ).fetchone()
            for table in ("vision_kpis", "goals", "crm.accounts", "invoices")
        }
    return {"catalog": catalog, "indexes": indexes, "data": data}


def fill(db, kpis: int) -> dict[str, int]:
    """The app's rows, with orphans in each table a key is coming to (none in the accounts they point at)."""
    with db.connect() as conn:
        generated = populate(conn, kpis, orphan_ratio=0.05)
        conn.execute(
            "INSERT INTO goals (kpi_id, title) SELECT id, 'goal ' || title FROM vision_kpis ORDER BY id LIMIT 300"
        )
        conn.execute("INSERT INTO goals (kpi_id, title) SELECT gen_random_uuid(), 'lost' FROM generate_series(1, 7)")
        conn.execute(
            "INSERT INTO crm.accounts SELECT md5('tenant')::uuid, md5('account' || n)::uuid, 'account ' || n "
            "FROM generate_series(1, 20) AS n"
        )
        conn.execute(
            "INSERT INTO invoices (tenant_id, account_id, amount) SELECT md5('tenant')::uuid, "
            "CASE WHEN n <= 5 THEN gen_random_uuid() WHEN n <= 10 THEN NULL ELSE md5('account' || (n % 20 + 1))::uuid "
            "END, n FROM generate_series(1, 100) AS n"
        )
        conn.execute("ANALYZE")
    return {"kpi_orphans": generated.orphans, "goal_orphans": 7, "invoice_orphans": 5}


@pytest.fixture
def converged(db, app, tmp_path) -> dict[str, object]:
    """The app's tables made by its own migrations, rows with orphans, then every declared key landed by the
    pipeline (one key after the other, as run --all does)."""
    tables = next((app / "drizzle" / "migrations").glob("*_tables.sql"))
    keys = next((app / "drizzle" / "migrations").glob("*_keys.sql"))
    aside = keys.rename(tmp_path / keys.name)  # migrate as the app did before the keys: its first migration only
    journal = app / "drizzle" / "migrations" / "meta" / "_journal.json"
    full = journal.read_text()
    journal.write_text(json.dumps({**json.loads(full), "entries": json.loads(full)["entries"][:1]}))
    _ok(drizzle_kit(app, db.dsn, "migrate"))
    assert tables.exists() and db.scalar("SELECT count(*) FROM pg_constraint WHERE contype = 'f'") == 0
    journal.write_text(full)
    aside.rename(keys)
    orphans = fill(db, 3000)
    results = {}
    for name, target in declared(tmp_path).items():
        results[name] = run_pipeline(db.connect, target.spec, NOW, f"run-{name}")
        assert results[name]["report"]["final_state"] == "converged", results[name]["report"]
    return {"results": results, "orphans": orphans, "migration": keys}


def test_the_keys_schema_ts_declares_land_and_drizzle_kit_push_then_proposes_nothing(db, app, converged) -> None:
    results = converged["results"]
    orphans = converged["orphans"]
    assert results[PARENT]["null_orphans"]["audited"] == orphans["kpi_orphans"] > 0
    assert results[INVOICES]["null_orphans"]["audited"] == orphans["invoice_orphans"]
    assert db.scalar("SELECT count(*) FROM goals") == 300  # the orphan goals deleted (archived), as declared
    definitions = dict(db.query("SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE contype = 'f'"))
    assert definitions == {
        PARENT: "FOREIGN KEY (parent_kpi_id) REFERENCES vision_kpis(id) ON DELETE SET NULL",
        GOALS: "FOREIGN KEY (kpi_id) REFERENCES vision_kpis(id) ON UPDATE CASCADE ON DELETE CASCADE",
        INVOICES: "FOREIGN KEY (tenant_id, account_id) REFERENCES crm.accounts(tenant_id, id) ON UPDATE CASCADE "
        "ON DELETE RESTRICT",
    }
    # The key schema.ts gives no index gets none (push would drop it), and the run says how to declare one.
    assert db.scalar("SELECT count(*) FROM pg_indexes WHERE tablename = 'goals'") == 1  # its primary key's
    assert results[GOALS]["create_index_concurrently"]["action"].startswith("none (the key declares no index")
    (note,) = [w for w in results[GOALS]["preflight"]["warnings"] if "schema.ts" in w]
    assert 'index("goals_kpi_id_idx").on(table.kpiId), run `drizzle-kit generate`' in note
    assert results[PARENT]["create_index_concurrently"]["action"] == "built"
    before = app_state(db)
    output = _ok(drizzle_kit(app, db.dsn, "push", "--verbose", "--strict"))
    assert "No changes detected" in output
    assert app_state(db) == before
    assert "No schema changes, nothing to migrate" in _ok(drizzle_kit(app, db.dsn, "generate"))


def test_the_guarded_migration_after_the_pipeline_changes_nothing_and_takes_no_lock_on_the_tables(
    db, app, converged, capsys
) -> None:
    migration = converged["migration"]
    assert main(["guard", str(migration), "--in-place"]) == 0
    guarded = migration.read_text()
    assert "ADD CONSTRAINT" in guarded and guarded.count("DO $$") == 3
    assert f"guarded foreign key {GOALS} (no index on its columns) on goals" in capsys.readouterr().err
    before = app_state(db)
    with db.connect() as app_session:
        app_session.autocommit = False
        # Whatever lock the migration took on a table of the keys, it would wait here, then fail on its 2 s
        # lock_timeout: an app write in flight, and a session that holds every table of the keys exclusively.
        app_session.execute("UPDATE vision_kpis SET title = title WHERE id = (SELECT id FROM vision_kpis LIMIT 1)")
        app_session.execute("LOCK TABLE vision_kpis, goals, invoices, crm.accounts IN ACCESS EXCLUSIVE MODE")
        output = _ok(drizzle_kit(app, db.dsn, "migrate"))
        app_session.rollback()
    assert "migrations applied successfully" in output
    assert db.scalar("SELECT count(*) FROM drizzle.__drizzle_migrations") == 2
    assert app_state(db) == before  # same oids, still validated, no row touched


def test_the_guarded_migration_refuses_a_large_table_without_the_key_and_changes_nothing(db, app, tmp_path) -> None:
    migrations = app / "drizzle" / "migrations"
    keys = next(migrations.glob("*_keys.sql"))
    assert main(["guard", str(keys), "--in-place"]) == 0
    tables = next(migrations.glob("*_tables.sql"))
    with db.connect() as conn:
        conn.execute(tables.read_text().replace("--> statement-breakpoint", ""))
        populate(conn, 12_000, orphan_ratio=0.01)
    before = app_state(db)
    assert drizzle_kit(app, db.dsn, "migrate").returncode != 0
    assert app_state(db) == before
    # drizzle-kit 0.31 does not print the server's error: the statements in one transaction, as its migrator
    # runs them, show what the operator finds in the server log.
    with db.connect() as conn, pytest.raises(psycopg.errors.RaiseException) as refused, conn.transaction():
        for statement in keys.read_text().split("--> statement-breakpoint"):
            conn.execute(statement)
    assert str(refused.value).startswith(
        f"vision_kpis holds 10000 rows or more and lacks vision_kpis_parent_kpi_idx or {PARENT}"
    )
    assert refused.value.diag.message_hint == (
        f"Run the kpi-fk-maintenance pipeline (Airflow DAG {PARENT}, or fk-maintenance run --key {PARENT}) on this "
        "database first; this migration then changes nothing."
    )
    assert app_state(db) == before


def test_the_guarded_migrations_on_a_fresh_database_make_the_keys_the_pipeline_then_finds_nothing_to_do(
    db, app, tmp_path
) -> None:
    targets_path = targets_file(tmp_path, "conn_ids: [app_db]\nforeign_keys:\n  - drizzle: app/drizzle/migrations\n")
    keys = next((app / "drizzle" / "migrations").glob("*_keys.sql"))
    assert main(["guard", str(keys), "--in-place", "--targets", str(targets_path)]) == 0
    _ok(drizzle_kit(app, db.dsn, "migrate"))
    assert "No changes detected" in _ok(drizzle_kit(app, db.dsn, "push", "--verbose", "--strict"))
    for target in load_targets(targets_path):
        results = run_pipeline(db.connect, target.spec, NOW, f"after-migrate-{target.name}")
        assert results["report"]["final_state"] == "converged"
        assert results["add_fk_not_valid"]["action"] == "none (already exists)"
        assert results["validate_fk"]["outcome"] == "already validated"
        assert results["create_index_concurrently"]["action"].startswith(
            "none (already valid)" if target.spec.build_index else "none (the key declares no index"
        )


def test_guard_leaves_a_migration_without_new_keys_as_it_is_and_checks_the_keys_against_the_targets(
    app, tmp_path, capsys
) -> None:
    migrations = app / "drizzle" / "migrations"
    tables = next(migrations.glob("*_tables.sql"))
    written = tables.read_text()
    assert main(["guard", str(tables)]) == 0
    captured = capsys.readouterr()
    assert captured.out == written.rstrip("\n") + "\n" and "nothing to guard" in captured.err
    keys = next(migrations.glob("*_keys.sql"))
    assert main(["guard", str(keys), "--in-place"]) == 0
    once = keys.read_text()
    assert main(["guard", str(keys)]) == 0 and capsys.readouterr().out == once.rstrip("\n") + "\n"  # idempotent
    # A targets file that declares the goals key with an index schema.ts does not have (the guard would wait for
    # an index no pipeline builds) and not the other keys: every problem is named, and the file is left alone.
    other = targets_file(
        tmp_path,
        "conn_ids: [app_db]\nforeign_keys:\n"
        "  - {name: goals_fk, table: goals, column: kpi_id, ref_table: vision_kpis,\n"
        f"     ref_column: id, constraint: {GOALS}}}\n",
    )
    generated = generate_again(app)
    written = generated.read_text()
    assert main(["guard", str(generated), "--in-place", "--targets", str(other)]) == 1
    refused = capsys.readouterr().err
    assert f"gives {GOALS} the index (none), and the targets file's key goals_fk has goals_kpi_id_idx" in refused
    for key in (PARENT, INVOICES):
        assert (
            f"adds the foreign key {key} on public." in refused and "which the targets file does not declare" in refused
        )
    assert generated.read_text() == written


def generate_again(app: Path) -> Path:
    """The keys' migration as drizzle-kit generate writes it (unguarded), generated anew in a second copy."""
    copy = app.parent / "again"
    shutil.copytree(app, copy, symlinks=True)
    migrations = copy / "drizzle" / "migrations"
    keys = next(migrations.glob("*_keys.sql"))
    keys.unlink()
    journal = migrations / "meta" / "_journal.json"
    document = json.loads(journal.read_text())
    tag = document["entries"].pop()["tag"]
    (migrations / "meta" / f"{tag.split('_')[0]}_snapshot.json").unlink()
    journal.write_text(json.dumps(document))
    return generate(copy, "keys")
