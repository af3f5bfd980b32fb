"""orphans: delete. A NOT NULL key whose orphans have dependents at every level of the database's own keys:
CASCADE two levels down (one a self-reference, one into a partitioned table in another schema), SET NULL keys in
two tables (one with a column list), a SET DEFAULT key, and a RESTRICT key protecting some rows.

What is proven, against an oracle written here in plain SQL (not the library's walk): preflight refuses the key
without orphans: delete, and refuses the rows the RESTRICT key protects, with nothing changed (catalog and data
snapshots of every table); a dry run shows the blast radius per table and changes nothing; a run deletes exactly
the orphans and their cascade while the app writes, every row archived whole; a restore, once the missing parents
exist again, brings back every deleted row byte-identical (its row text) and every pointer the cascade changed,
and a second restore changes nothing; a worker killed mid-delete leaves whole batches only, and the next run
converges. The test command runs this module on PostgreSQL 18, 16 and 15.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import errors as pgerrors

from devkit.db_state import orphan_count, snapshot
from devkit.pipeline import run_pipeline
from fk_maintenance.airflow.fleet import build_fleet_report, format_fleet_report, target_summary
from fk_maintenance.errors import PreflightFailed
from fk_maintenance.keys.settings import RunSettings
from fk_maintenance.keys.spec import ForeignKeySpec
from fk_maintenance.keys.targets import load_targets
from fk_maintenance.records.restore import restore_run
from fk_maintenance.steps.orphans import detect_orphans, null_orphans
from fk_maintenance.steps.preflight import preflight

REPO = Path(__file__).resolve().parents[1]

# accounts 1..20 exist; posts point at accounts 1..25, so the posts of 21..25 are orphans (60 of 300).
SCHEMA = """
CREATE SCHEMA social;
CREATE TABLE accounts (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE posts (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id int NOT NULL,
    title text NOT NULL,
    score numeric(12, 4),
    posted_at timestamptz NOT NULL,
    tags text[],
    meta jsonb
);
CREATE INDEX posts_account_idx ON posts (account_id);
-- Level 1 (CASCADE), and below it a self-reference (replies, CASCADE) at levels 2 and 3.
CREATE TABLE comments (
    tenant int NOT NULL DEFAULT 1,
    id int PRIMARY KEY,
    post_id bigint NOT NULL REFERENCES posts ON DELETE CASCADE,
    reply_to int REFERENCES comments ON DELETE CASCADE,
    body text,
    UNIQUE (tenant, id)
);
CREATE INDEX comments_post_idx ON comments (post_id);
CREATE INDEX comments_reply_idx ON comments (reply_to);
-- Below every comment (CASCADE), in another schema, a partitioned table.
CREATE TABLE social."Likes" (
    comment_id int NOT NULL REFERENCES comments ON DELETE CASCADE,
    "user" text NOT NULL,
    at timestamptz NOT NULL DEFAULT '2026-01-01',
    PRIMARY KEY (comment_id, "user")
) PARTITION BY HASH (comment_id);
CREATE TABLE social."Likes_0" PARTITION OF social."Likes" FOR VALUES WITH (MODULUS 2, REMAINDER 0);
CREATE TABLE social."Likes_1" PARTITION OF social."Likes" FOR VALUES WITH (MODULUS 2, REMAINDER 1);
-- SET NULL keys in two tables: one on posts, one with a column list (PostgreSQL 15+) on comments.
CREATE TABLE pins (id int PRIMARY KEY, post_id bigint REFERENCES posts ON DELETE SET NULL, label text);
CREATE TABLE flags (
    id int PRIMARY KEY,
    tenant int NOT NULL,
    comment_id int,
    reason text,
    FOREIGN KEY (tenant, comment_id) REFERENCES comments (tenant, id) ON DELETE SET NULL (comment_id)
);
-- SET DEFAULT (the default is NULL here): the archive calls it reset.
CREATE TABLE views (id int PRIMARY KEY, post_id bigint DEFAULT NULL REFERENCES posts ON DELETE SET DEFAULT);
-- RESTRICT: an invoice forbids deleting the post it bills.
CREATE TABLE invoices (id int PRIMARY KEY, post_id bigint REFERENCES posts ON DELETE RESTRICT);

INSERT INTO accounts SELECT g, 'account ' || g FROM generate_series(1, 20) g;
INSERT INTO posts (account_id, title, score, posted_at, tags, meta)
SELECT 1 + g % 25, 'post ' || g || ' ''quoted'', with, commas', g * 1.0625,
       timestamptz '2026-01-01 00:00:00.123456+00' + g * interval '1 hour 1.5 second',
       ARRAY['t' || g % 3, NULL], jsonb_build_object('n', g, 'f', g / 3.0)
FROM generate_series(1, 300) g;
INSERT INTO comments (id, post_id, reply_to, body)
SELECT g, 1 + g % 300, NULL, 'top ' || g FROM generate_series(1, 300) g;
INSERT INTO comments (id, post_id, reply_to, body) SELECT 1000 + g, 1 + g % 300, g, 'reply ' || g
FROM generate_series(1, 300) g;
INSERT INTO comments (id, post_id, reply_to, body) SELECT 2000 + g, 1 + g % 300, 1000 + g, 'reply to reply ' || g
FROM generate_series(1, 300, 2) g;
INSERT INTO social."Likes" (comment_id, "user") SELECT id, 'u' || id % 7 FROM comments;
INSERT INTO social."Likes" (comment_id, "user") SELECT id, 'v' || id % 5 FROM comments WHERE id > 1000;
INSERT INTO pins SELECT g, g * 3, 'pin ' || g FROM generate_series(1, 100) g;
INSERT INTO flags SELECT g, 1, 1000 + g * 2, 'spam' FROM generate_series(1, 150) g;
INSERT INTO views SELECT g, 1 + g % 300 FROM generate_series(1, 400) g;
-- Invoices on three orphan posts (those of account 21) and on ordinary ones.
INSERT INTO invoices SELECT g, g * 25 + 20 FROM generate_series(0, 2) g;
INSERT INTO invoices SELECT 100 + g, g FROM generate_series(1, 50) g WHERE g % 25 < 20;
ANALYZE;
"""
TABLES = (
    ("public", "accounts"),
    ("public", "posts"),
    ("public", "comments"),
    ("social", "Likes"),
    ("public", "pins"),
    ("public", "flags"),
    ("public", "views"),
    ("public", "invoices"),
)

SPEC = ForeignKeySpec(
    schema="public",
    table="posts",
    columns=("account_id",),
    ref_table="accounts",
    ref_columns=("id",),
    row_key=("id",),
    on_delete="CASCADE",
    constraint="posts_account_id_fkey",
    index="posts_account_idx",
    audit_table="posts_orphan_audit",
    orphans="delete",
)
UNDECLARED = replace(SPEC, orphans="")
SETTINGS = RunSettings(validate_now=True, batch_size=7, lock_timeout_ms=200, lock_attempts=30)

# The oracle: what deleting the orphans takes along, written here in plain SQL (not the library's walk).
DOOMED_SQL = """
WITH RECURSIVE doomed_posts AS (
    SELECT id FROM posts p WHERE NOT EXISTS (SELECT 1 FROM accounts a WHERE a.id = p.account_id)
), doomed_comments AS (
    SELECT c.id FROM comments c JOIN doomed_posts p ON c.post_id = p.id
    UNION
    SELECT c.id FROM comments c JOIN doomed_comments d ON c.reply_to = d.id
)
SELECT 'public.posts', count(*) FROM doomed_posts
UNION ALL SELECT 'public.comments', count(*) FROM doomed_comments
UNION ALL SELECT 'social.Likes', count(*) FROM social."Likes" l WHERE l.comment_id IN (SELECT id FROM doomed_comments)
UNION ALL SELECT 'public.pins', count(*) FROM pins WHERE post_id IN (SELECT id FROM doomed_posts)
UNION ALL SELECT 'public.flags', count(*) FROM flags WHERE comment_id IN (SELECT id FROM doomed_comments)
UNION ALL SELECT 'public.views', count(*) FROM views WHERE post_id IN (SELECT id FROM doomed_posts)
"""
CHANGED_BY = {"public.pins": "nulled", "public.flags": "nulled", "public.views": "reset"}


def expected_radius(db) -> dict[str, dict[str, int]]:
    counts = dict(db.query(DOOMED_SQL))
    return {
        table: {
            "deleted": 0 if table in CHANGED_BY else count,
            "nulled": count if CHANGED_BY.get(table) == "nulled" else 0,
            "reset": count if CHANGED_BY.get(table) == "reset" else 0,
        }
        for table, count in counts.items()
        if count
    }


def row_texts(db) -> dict[tuple[str, str], dict[str, str]]:
    """Every row of every table as its own text (every column), by its primary key's text."""
    keys = {
        ("public", "accounts"): "id",
        ("public", "posts"): "id",
        ("public", "comments"): "id",
        ("social", "Likes"): 'comment_id, "user"',
        ("public", "pins"): "id",
        ("public", "flags"): "id",
        ("public", "views"): "id",
        ("public", "invoices"): "id",
    }
    return {
        (schema, table): dict(
            db.query(f'SELECT ROW({keys[(schema, table)]})::text, t::text FROM "{schema}"."{table}" t')
        )
        for schema, table in TABLES
    }


def snapshots(db) -> list[Any]:
    """Catalog and data of every table of the schema, and whether the pipeline's schema exists, to prove nothing
    changed."""
    return [db.scalar("SELECT to_regnamespace('fk_maintenance') IS NOT NULL")] + [
        snapshot(db, replace(SPEC, schema=schema, table=table, row_key=("ctid",) if table == "Likes" else ("id",)))
        for schema, table in TABLES
    ]


@pytest.fixture
def shop(db):
    if int(db.scalar("SHOW server_version_num")) < 150000:
        pytest.skip("SET NULL (column list) needs PostgreSQL 15+")
    db.execute(SCHEMA)
    return db


def test_the_key_without_orphans_delete_is_refused_naming_the_count_and_the_setting_nothing_changed(shop) -> None:
    before = snapshots(shop)
    with shop.connect() as conn, pytest.raises(PreflightFailed) as refused:
        preflight(conn, UNDECLARED, SETTINGS)
    orphans = orphan_count(shop, SPEC)
    assert orphans == 60
    message = str(refused.value)
    assert f"posts.account_id is NOT NULL and {orphans} row(s) point at a missing parent" in message, message
    assert "orphans: refuse, the default for a NOT NULL key" in message and "Declare orphans: delete" in message
    assert snapshots(shop) == before


def test_rows_a_restrict_key_protects_are_refused_before_any_change_and_a_dry_run_names_them(shop) -> None:
    before = snapshots(shop)
    with shop.connect() as conn, pytest.raises(PreflightFailed) as refused:
        preflight(conn, SPEC, SETTINGS)
    message = str(refused.value)
    assert "invoices_post_id_fkey (public.invoices (post_id) -> public.posts, ON DELETE RESTRICT): 3 row(s)" in message
    assert 'public.invoices {"id": 0}' in message and "nothing was changed" in message, message
    with shop.connect() as conn:
        found = detect_orphans(conn, SPEC, replace(SETTINGS, dry_run=True))
    assert found["protected_rows"] == 3 and len(found["protected_sample"]) == 3
    assert snapshots(shop) == before


def test_a_dry_run_shows_the_blast_radius_per_table_with_a_sample_and_changes_nothing(shop) -> None:
    shop.execute("DELETE FROM invoices WHERE id < 100")  # the app settles the invoices of orphan posts
    before = snapshots(shop)
    expected = expected_radius(shop)
    results = run_pipeline(shop.connect, SPEC, replace(SETTINGS, dry_run=True), "dry")
    found = results["detect_orphans"]
    assert found["policy"] == "delete" and found["orphans"] == 60
    assert found["blast_radius"] == expected
    assert found["blast_radius_rows"] == sum(sum(c.values()) for c in expected.values())
    assert found["blast_radius_sample"][0].startswith('public.posts {"id": 20}: deleted (orphan)')
    assert results["report"]["final_state"] == "dry run: nothing changed"
    assert snapshots(shop) == before
    # What a person approving the delete is shown is this blast radius.
    from fk_maintenance.records.approval import approval_body, approval_needed

    assert approval_needed(found, 10) and not approval_needed(found, found["blast_radius_rows"])
    body = approval_body(SPEC, "kpi_db", found, 10, restore_dag="posts_account_fk_restore")
    comments = expected["public.comments"]["deleted"]
    assert f"| `public.comments` | {comments} | 0 | 0 |" in body and found["blast_radius_sample"][0] in body


class AppWriter:
    """The app, writing beside the run: new posts and comments under live parents, edits of live rows, likes,
    and (until the key lands) new orphan posts, which the run must delete too; each statement timed."""

    def __init__(self, db) -> None:
        self.db = db
        self.stop = threading.Event()
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.orphans_written: list[int] = []
        self.thread = threading.Thread(target=self.run, daemon=True)

    def __enter__(self) -> AppWriter:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=30)

    def run(self) -> None:
        step = 0
        with psycopg.connect(self.db.dsn, autocommit=True) as conn:
            while not self.stop.is_set():
                step += 1
                statements = [
                    ("INSERT INTO comments (id, post_id, body) VALUES (%s, %s, 'app')", (100000 + step, 1 + step % 19)),
                    ("UPDATE posts SET score = score + 1 WHERE id = %s", (1 + step % 19,)),
                    ('INSERT INTO social."Likes" (comment_id, "user") VALUES (%s, %s)', (100000 + step, "app")),
                ]
                if step % 10 == 0:
                    statements.append(
                        (
                            "INSERT INTO posts (account_id, title, posted_at) VALUES (99, 'app orphan', now()) "
                            "RETURNING id",
                            (),
                        )
                    )
                for query, params in statements:
                    started = time.perf_counter()
                    try:
                        rows = (
                            conn.execute(query, params).fetchall()
                            if "RETURNING" in query
                            else conn.execute(query, params)
                        )
                        if "RETURNING" in query:
                            self.orphans_written.append(rows[0][0])
                    except pgerrors.ForeignKeyViolation:
                        pass  # the key landed: an orphan is refused, as it should be
                    except psycopg.Error as exc:
                        self.errors.append(f"{type(exc).__name__}: {exc}")
                    self.latencies.append(time.perf_counter() - started)
                time.sleep(0.005)


def archived(db, run_id: str) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for table, action, count in db.query(
        "SELECT table_schema || '.' || table_name, action, count(*) FROM fk_maintenance.posts_orphan_audit_archive "
        "WHERE run_id = %s GROUP BY 1, 2",
        [run_id],
    ):
        counts.setdefault(table, {"deleted": 0, "nulled": 0, "reset": 0})[action] = count
    return counts


def test_orphans_delete_converges_while_the_app_writes_and_restore_brings_back_every_row_byte_identical(
    shop, figures
) -> None:
    shop.execute("DELETE FROM invoices WHERE id < 100")
    before = row_texts(shop)
    expected = expected_radius(shop)
    with AppWriter(shop) as app:
        time.sleep(0.2)
        results = run_pipeline(shop.connect, SPEC, SETTINGS, "run-1")
    report = results["report"]
    assert report["final_state"] == "converged", report
    assert orphan_count(shop, SPEC) == 0 and app.errors == []
    # Exactly the orphans and their cascade: the orphans the app wrote meanwhile were deleted too (by the
    # first pass or the re-sweep before VALIDATE), and nothing else.
    written = len(app.orphans_written) - len(shop.query("SELECT 1 FROM posts WHERE account_id = 99"))
    assert written == len(app.orphans_written)
    assert archived(shop, "run-1") == {
        **expected,
        "public.posts": {"deleted": expected["public.posts"]["deleted"] + written, "nulled": 0, "reset": 0},
    }
    assert report["blast_radius_rows"] == sum(sum(c.values()) for c in archived(shop, "run-1").values())
    # A flag nulled through a reply sits one level below that reply (replies are at depth 2 and 3).
    depths = shop.query(
        "SELECT f.depth - c.depth, count(*) FROM fk_maintenance.posts_orphan_audit_archive f "
        "JOIN fk_maintenance.posts_orphan_audit_archive c ON c.run_id = f.run_id AND c.table_name = 'comments' "
        "AND c.row_key->>'id' = f.row_data->>'comment_id' WHERE f.run_id = 'run-1' AND f.table_name = 'flags' "
        "GROUP BY 1"
    )
    assert depths == [(1, expected["public.flags"]["nulled"])], depths
    assert report["archived"] == archived(shop, "run-1")
    after = row_texts(shop)
    for table, rows in before.items():
        gone = set(rows) - set(after[table])
        assert len(gone) == expected.get(".".join(table), {}).get("deleted", 0), table
    worst_ms = max(app.latencies) * 1000
    assert worst_ms < SETTINGS.lock_timeout_ms + 400

    # Meanwhile the app wrote a like of the same key as a deleted one, and re-pointed a nulled pin: newer than
    # the archive, both are left alone and counted.
    like = shop.query(
        "SELECT row_data->>'comment_id', row_data->>'user' FROM fk_maintenance.posts_orphan_audit_archive "
        "WHERE table_name = 'Likes' ORDER BY seq LIMIT 1"
    )[0]
    pin = shop.scalar(
        "SELECT row_key->>'id' FROM fk_maintenance.posts_orphan_audit_archive WHERE table_name = 'pins' LIMIT 1"
    )
    shop.execute("INSERT INTO comments (id, post_id, body) VALUES (%s, 1, 'app again')", [like[0]])
    shop.execute('INSERT INTO social."Likes" (comment_id, "user", at) VALUES (%s, %s, \'2030-01-01\')', like)
    shop.execute("UPDATE pins SET post_id = 2 WHERE id = %s", [int(pin)])
    rewritten = {("social", "Likes"): f"({like[0]},{like[1]})", ("public", "pins"): f"({pin})"}
    rewritten_comment = f"({like[0]})"

    # The parents come back (from a backup, say); the restore puts every row and pointer back.
    shop.execute("INSERT INTO accounts SELECT g, 'account ' || g FROM generate_series(21, 25) g")
    with shop.connect() as conn:
        restored = restore_run(conn, SPEC, SETTINGS, "run-1", "restore-1")
    assert restored["rows_written_since"] == 2 and restored["pointers_written_since"] == 1, str(restored)
    assert restored["rows_restored"] == sum(c["deleted"] for c in expected.values()) - 2
    assert restored["pointers_restored"] == sum(c["nulled"] + c["reset"] for c in expected.values()) - 1
    # The app's own orphans (account 99) have no parent yet: they stay in the archive, counted.
    assert restored["rows_parent_still_missing"] == written
    # Every row the run deleted or changed is back as it was, to the byte (the app's own edits of live posts
    # aside, which are the app's).
    restored_rows = row_texts(shop)
    for table, rows in before.items():
        changed = {key for key, text in rows.items() if after[table].get(key) != text}
        if table == ("public", "posts"):
            changed -= {f"({n})" for n in range(1, 20)}
        changed -= {rewritten.get(table), rewritten_comment if table == ("public", "comments") else None}
        assert bool(changed) == (".".join(table) in expected), table
        assert {key: restored_rows[table].get(key) for key in changed} == {key: rows[key] for key in changed}, table
    logged = shop.scalar("SELECT count(*) FROM fk_maintenance.restore_log WHERE restore_id = 'restore-1'")
    assert logged == restored["rows_restored"] + restored["pointers_restored"]
    with shop.connect() as conn:
        again = restore_run(conn, SPEC, SETTINGS, "run-1", "restore-2")
    assert again["rows_restored"] == again["pointers_restored"] == 0
    assert again["rows_already_restored"] == restored["rows_restored"]
    assert again["pointers_already_restored"] == restored["pointers_restored"]
    assert row_texts(shop) == restored_rows
    # The fleet's report carries the archive's counts.
    fleet = build_fleet_report("run-1", ["kpi_db"], [target_summary("kpi_db", 0, report, None, None)])
    assert fleet["deleted_rows"] == report["deleted_rows"] == sum(c["deleted"] for c in expected.values()) + written
    assert fleet["pointers_changed"] == report["pointers_changed_by_cascade"] == restored["pointers_restored"] + 1
    assert f"rows deleted {fleet['deleted_rows']} and pointers changed" in format_fleet_report(fleet)
    figures(
        f"{report['blast_radius_rows']} rows archived for {expected['public.posts']['deleted'] + written} orphans; "
        f"app worst write {worst_ms:.0f} ms over {len(app.latencies)} statements"
    )


DELETE_IN_SUBPROCESS = """
import sys
sys.path[:0] = [{plugins!r}, {repo!r}]
import psycopg
from dataclasses import replace
from fk_maintenance.steps.orphans import null_orphans
from tests.test_orphan_delete import SETTINGS, SPEC
with psycopg.connect({dsn!r}, autocommit=True) as conn:
    null_orphans(conn, SPEC, replace(SETTINGS, batch_size=2), "run-k")
"""


def test_a_worker_killed_mid_delete_leaves_whole_batches_and_the_next_run_converges(shop) -> None:
    shop.execute("DELETE FROM invoices WHERE id < 100")
    expected = expected_radius(shop)
    # Each deleted post takes 50 ms, so the kill lands inside a batch.
    shop.execute(
        "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(0.05); RETURN OLD; "
        "END $$; CREATE TRIGGER slow_delete BEFORE DELETE ON posts FOR EACH ROW EXECUTE FUNCTION slow()"
    )
    code = DELETE_IN_SUBPROCESS.format(plugins=str(REPO / "plugins"), repo=str(REPO), dsn=shop.dsn)
    worker = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if shop.scalar("SELECT to_regclass('fk_maintenance.posts_orphan_audit_archive') IS NOT NULL") and shop.scalar(
            "SELECT count(DISTINCT batch) >= 2 FROM fk_maintenance.posts_orphan_audit_archive"
        ):
            break
        assert worker.poll() is None, worker.stderr.read() if worker.stderr else ""
        time.sleep(0.02)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    deadline = time.monotonic() + 20
    while shop.scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'kpi-fk-maintenance:%%'"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # Whole batches only: every archived orphan is gone, with its whole cascade, and nothing else.
    partial = shop.scalar(
        "SELECT count(*) FROM fk_maintenance.posts_orphan_audit_archive WHERE depth = 0 AND action = 'deleted'"
    )
    assert 0 < partial < expected["public.posts"]["deleted"]
    assert orphan_count(shop, SPEC) == expected["public.posts"]["deleted"] - partial
    shop.execute("DROP TRIGGER slow_delete ON posts")
    report = run_pipeline(shop.connect, SPEC, SETTINGS, "run-k")["report"]
    assert report["final_state"] == "converged", report
    assert archived(shop, "run-k") == expected


def test_an_orphan_whose_cascade_the_app_holds_is_left_for_a_later_pass_and_the_others_are_deleted(shop) -> None:
    shop.execute("DELETE FROM invoices WHERE id < 100")
    expected = expected_radius(shop)
    holder = shop.connect()
    holder.autocommit = False
    # A reply two levels below orphan post 20, held by an app transaction.
    holder.execute("SELECT 1 FROM comments WHERE id = 1019 AND post_id = 20 FOR UPDATE")
    try:
        with shop.connect() as conn:
            first = null_orphans(conn, SPEC, SETTINGS, "run-b")
    finally:
        holder.rollback()
        holder.close()
    assert first["deleted"] == expected["public.posts"]["deleted"] - 1 and first["left_alone"] == 1, first
    assert shop.scalar("SELECT count(*) FROM posts WHERE id = 20") == 1
    # Nothing of its tree was archived: the batch that met the lock rolled back whole, and its other orphans
    # went one per transaction.
    tree = "SELECT count(*) FROM fk_maintenance.posts_orphan_audit_archive WHERE row_data @> %s"
    assert shop.scalar(tree, ['{"post_id": 20}']) == shop.scalar(tree, ['{"id": 20, "account_id": 21}']) == 0
    with shop.connect() as conn:
        second = null_orphans(conn, SPEC, SETTINGS, "run-b")
    assert second["deleted"] == 1 and second["left_alone"] == 0
    assert archived(shop, "run-b") == expected


def test_the_cascade_needs_no_delete_privilege_on_the_tables_it_reaches_only_select_and_update_to_lock_them(
    shop,
) -> None:
    role = f"pipeline_{uuid.uuid4().hex[:8]}"
    shop.execute("DELETE FROM invoices WHERE id < 100")
    reached = 'comments, social."Likes", pins, flags, views, invoices'
    shop.execute(
        f"CREATE ROLE {role} LOGIN; ALTER TABLE posts OWNER TO {role}; GRANT REFERENCES, SELECT ON accounts TO {role};"
        f"GRANT CREATE ON DATABASE {shop.name} TO {role}; GRANT CREATE ON SCHEMA public TO {role};"
        f"GRANT USAGE ON SCHEMA social TO {role}; GRANT SELECT ON {reached} TO {role};"
        # A DBA made the pipeline's schema, without CREATE for the role yet.
        f"CREATE SCHEMA fk_maintenance; GRANT USAGE ON SCHEMA fk_maintenance TO {role}"
    )
    before = snapshots(shop)
    expected = expected_radius(shop)
    with psycopg.connect(shop.dsn, user=role, autocommit=True) as conn, pytest.raises(PreflightFailed) as refused:
        preflight(conn, SPEC, SETTINGS)
    message = str(refused.value)
    for table in ("public.comments", 'social."Likes"', "public.pins", "public.flags", "public.views"):
        assert f"lacks UPDATE on {table} (SELECT ... FOR UPDATE" in message, (table, message)
    assert "invoices" not in message  # RESTRICT: read, never locked
    assert "needed to create the archive fk_maintenance.posts_orphan_audit_archive there" in message, message
    assert snapshots(shop) == before
    shop.execute(f"GRANT UPDATE ON {reached} TO {role}; GRANT CREATE ON SCHEMA fk_maintenance TO {role}")
    report = run_pipeline(lambda: psycopg.connect(shop.dsn, user=role, autocommit=True), SPEC, SETTINGS, "run-p")[
        "report"
    ]
    assert report["final_state"] == "converged", report
    assert report["archived"] == expected
    assert not shop.scalar(
        "SELECT bool_or(has_table_privilege(%s, t, 'DELETE')) FROM unnest(%s::text[]) t",
        [role, ["comments", 'social."Likes"', "pins", "flags", "views"]],
    )


TARGETS_YAML = """\
foreign_keys:
  - name: posts_account_fk
    table: posts
    column: account_id
    ref_table: accounts
    ref_column: id
    on_delete: CASCADE
    constraint: posts_account_id_fkey
    index: posts_account_idx
    audit_table: posts_orphan_audit
    orphans: delete
    conn_ids: [kpi_db]
"""


def test_a_declared_delete_key_shows_its_blast_radius_in_the_plan_and_converges_through_its_dag(
    shop, tmp_path, monkeypatch, capsys, request
) -> None:
    """The targets file's orphans: delete, the plan's text, and (on the main major) the DAG: its runbook names
    the policy, and the target's report counts from the archive."""
    from fk_maintenance.cli import commands as cli

    path = tmp_path / "targets.yaml"
    path.write_text(TARGETS_YAML)
    (target,) = load_targets(path)
    assert target.spec == SPEC
    shop.execute("DELETE FROM invoices WHERE id < 100")
    expected = expected_radius(shop)
    before = snapshots(shop)
    assert cli.main(["plan", "--dsn", shop.dsn, "--targets", str(path)]) == cli.EXIT_OK
    plan = capsys.readouterr().out
    total = sum(sum(counts.values()) for counts in expected.values())
    assert "60 row(s) point at 5 missing parent(s); orphans: delete; a run deletes them" in plan, plan
    assert f"{total} row(s) in all" in plan and f"public.pins: {expected['public.pins']['nulled']} nulled" in plan
    assert snapshots(shop) == before
    if os.environ.get("KPI_TEST_PG"):
        return  # the DAG's wiring is the same on every major (see test_declared_keys)
    from airflow.dag_processing.dagbag import DagBag

    from devkit.airflow_env import latest_xcom
    from fk_maintenance.keys.settings import SETTING_DEFS

    home = request.getfixturevalue("airflow_home")
    monkeypatch.setenv("FK_MAINTENANCE_TARGETS", str(path))
    monkeypatch.setenv("AIRFLOW_CONN_KPI_DB", shop.server.airflow_connection_json(shop.name))
    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert not bag.import_errors, bag.import_errors
    dag = bag.dags["posts_account_fk"]
    assert "**Orphans** (rows whose `account_id` names a missing parent): `delete`" in dag.doc_md
    defaults = {d.name: d.default for d in SETTING_DEFS}
    # A dry run deletes nothing, so nobody is asked, whatever the threshold.
    dry = dag.test(run_conf={**defaults, "dry_run": True, "approve_deletes_above": 0})
    assert str(dry.state) == "success"
    assert latest_xcom(home, "canary.report", "report", dag_id="posts_account_fk")["approval"]["dry_run"] is True
    assert snapshots(shop) == before
    run = dag.test(run_conf={**defaults, "validate_now": True})
    assert str(run.state) == "success"
    report = latest_xcom(home, "canary.report", "report", dag_id="posts_account_fk")
    assert report["final_state"] == "converged" and report["orphan_policy"] == "delete"
    assert report["archived"] == expected
    # Within approve_deletes_above (1000 by default) the gate asked nobody (tests/test_ui.py: a person answers).
    assert report["approval"] == {
        "approved": True,
        "asked": False,
        "orphans": 60,
        "blast_radius_rows": total,
        "approved_by": None,
    }


def test_the_command_line_deletes_above_approve_deletes_above_only_once_the_operator_raises_it(
    shop, tmp_path, capsys
) -> None:
    """fk-maintenance run has no one to ask: a delete above the key's approve_deletes_above stops before
    anything is deleted, naming the setting that approves it, which the operator passes after reviewing."""
    from fk_maintenance.cli import commands as cli

    path = tmp_path / "targets.yaml"
    path.write_text(
        TARGETS_YAML.replace("    orphans: delete\n", "    orphans: delete\n    approve_deletes_above: 10\n")
    )
    shop.execute("DELETE FROM invoices WHERE id < 100")  # the rows a RESTRICT key protects
    total = sum(sum(counts.values()) for counts in expected_radius(shop).values())
    before = snapshots(shop)
    run = ["run", "--dsn", shop.dsn, "--targets", str(path), "--key", "posts_account_fk", "--set", "validate_now=true"]
    assert cli.main(run) == cli.EXIT_REFUSED
    refused = capsys.readouterr().out
    assert f"the delete takes {total} row(s) in all, above approve_deletes_above (10); nothing was deleted" in refused
    assert f"--set approve_deletes_above={total}" in refused
    assert snapshots(shop) == before
    assert cli.main([*run, "--set", f"approve_deletes_above={total}"]) == cli.EXIT_OK
    assert orphan_count(shop, SPEC) == 0


HIERARCHY = """
CREATE TABLE goals (id int PRIMARY KEY, parent_id int, title text NOT NULL);
CREATE TABLE goal_notes (id int PRIMARY KEY, goal_id int NOT NULL REFERENCES goals ON DELETE CASCADE, body text);
-- Ten roots, goals below them, and every twentieth goal an orphan (its parent 1000 + id is gone).
INSERT INTO goals SELECT g, CASE WHEN g <= 10 THEN NULL WHEN g % 20 = 0 THEN 1000 + g ELSE 1 + g % 10 END, 'goal ' || g
FROM generate_series(1, 200) g;
-- Below each orphan a child, and below that a grandchild.
INSERT INTO goals SELECT 300 + g, 20 * g, 'child of an orphan' FROM generate_series(1, 10) g;
INSERT INTO goals SELECT 400 + g, 300 + g, 'grandchild' FROM generate_series(1, 10) g;
INSERT INTO goal_notes SELECT id, id, 'note ' || id FROM goals;
"""
GOALS = ForeignKeySpec(
    schema="public",
    table="goals",
    columns=("parent_id",),
    ref_table="goals",
    ref_columns=("id",),
    row_key=("id",),
    on_delete="SET NULL",
    constraint="goals_parent_id_fkey",
    index="goals_parent_id_idx",
    audit_table="goals_orphan_audit",
    orphans="delete",
)


def test_deleting_orphans_of_a_self_referencing_set_null_key_nulls_their_children_as_the_key_will(db) -> None:
    """Before the key exists PostgreSQL cannot act on it: the delete does what the declared SET NULL will do,
    so an orphan's children become roots (archived, restorable) and are never deleted as orphans in turn."""
    db.execute(HIERARCHY)
    before = dict(db.query("SELECT id, g::text FROM goals g"))
    with db.connect() as conn:
        found = detect_orphans(conn, GOALS, replace(SETTINGS, dry_run=True))
    radius = {
        "public.goals": {"deleted": 10, "nulled": 10, "reset": 0},
        "public.goal_notes": {"deleted": 10, "nulled": 0, "reset": 0},
    }
    assert found["blast_radius"] == radius
    report = run_pipeline(db.connect, GOALS, SETTINGS, "run-g")["report"]
    assert report["final_state"] == "converged" and report["archived"] == radius, report
    assert db.query("SELECT count(*) FROM goals WHERE id BETWEEN 301 AND 310 AND parent_id IS NULL") == [(10,)]
    assert db.query("SELECT count(*) FROM goals WHERE id BETWEEN 401 AND 410 AND parent_id = id - 100") == [(10,)]
    db.execute("INSERT INTO goals SELECT 1000 + 20 * g, NULL, 'back' FROM generate_series(1, 10) g")
    with db.connect() as conn:
        restored = restore_run(conn, GOALS, SETTINGS, "run-g", "restore-g")
    assert (restored["rows_restored"], restored["pointers_restored"]) == (20, 10), str(restored)
    after = dict(db.query("SELECT id, g::text FROM goals g WHERE id < 1000"))
    assert after == before


READINGS = """
CREATE TABLE devices (id int PRIMARY KEY);
CREATE TABLE readings (id bigint, taken_on date NOT NULL, device_id int NOT NULL, value float8,
                       PRIMARY KEY (id, taken_on)) PARTITION BY RANGE (taken_on);
CREATE TABLE readings_2026 PARTITION OF readings FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
CREATE TABLE readings_other PARTITION OF readings DEFAULT;
CREATE TABLE reading_notes (id int PRIMARY KEY, reading_id bigint NOT NULL, taken_on date NOT NULL, note text,
                            FOREIGN KEY (reading_id, taken_on) REFERENCES readings ON DELETE CASCADE);
INSERT INTO devices SELECT generate_series(1, 20);
INSERT INTO readings SELECT g, date '2025-12-01' + g % 90, CASE WHEN g % 10 = 0 THEN 99 ELSE 1 + g % 20 END, g / 7.0
FROM generate_series(1, 500) g;
INSERT INTO reading_notes SELECT id, id, taken_on, 'note' FROM readings WHERE id % 5 = 0;
"""
READINGS_KEY = ForeignKeySpec(
    schema="public",
    table="readings",
    columns=("device_id",),
    ref_table="devices",
    ref_columns=("id",),
    row_key=("id", "taken_on"),
    on_delete="CASCADE",
    constraint="readings_device_id_fkey",
    index="readings_device_id_idx",
    audit_table="readings_orphan_audit",
    orphans="delete",
)


def test_orphans_of_a_partitioned_table_are_deleted_in_every_partition_and_restored(db) -> None:
    """The orphans live in two partitions, each with a note below it: the server's counts are per partition,
    and the archive keeps each row's partition."""
    db.execute(READINGS)
    before = dict(db.query("SELECT ROW(id, taken_on)::text, r::text FROM readings r"))
    report = run_pipeline(db.connect, READINGS_KEY, SETTINGS, "run-r")["report"]
    assert report["final_state"] == "converged", report
    assert report["archived"] == {
        "public.readings": {"deleted": 50, "nulled": 0, "reset": 0},
        "public.reading_notes": {"deleted": 50, "nulled": 0, "reset": 0},
    }
    partitions = db.query(
        "SELECT relid::regclass::text, count(*) FROM fk_maintenance.readings_orphan_audit_archive "
        "WHERE table_name = 'readings' GROUP BY 1 ORDER BY 1"
    )
    assert [name for name, _ in partitions] == ["readings_2026", "readings_other"], partitions
    db.execute("INSERT INTO devices VALUES (99)")
    with db.connect() as conn:
        restored = restore_run(conn, READINGS_KEY, SETTINGS, "run-r", "restore-r")
    assert restored["rows_restored"] == 100, str(restored)
    assert dict(db.query("SELECT ROW(id, taken_on)::text, r::text FROM readings r")) == before


def test_a_delete_approved_for_fewer_orphans_than_are_there_now_deletes_nothing(shop) -> None:
    """A person approved the delete as detect_orphans saw it; if more orphans than a delete needing no approval
    were added while it waited, null_orphans refuses: that delete is one nobody has seen."""
    from fk_maintenance.errors import DeleteNotApproved

    shop.execute("DELETE FROM invoices WHERE id < 100")  # the rows a RESTRICT key protects
    settings = RunSettings(validate_now=True, approve_deletes_above=10)
    before = snapshots(shop)
    with shop.connect() as conn, pytest.raises(DeleteNotApproved) as refused:
        null_orphans(conn, SPEC, settings, "run-1", approved_orphans=49)  # 60 now: 11 more than approved
    assert "60 orphan(s) are there to delete now, 49 when the delete was approved" in str(refused.value)
    assert snapshots(shop) == before
    with shop.connect() as conn:  # within what needs no approval beyond the approved: the delete goes ahead
        done = null_orphans(conn, SPEC, settings, "run-1", approved_orphans=50)
    assert done["deleted"] == 60 and orphan_count(shop, SPEC) == 0


KIDS = ForeignKeySpec(
    schema="public",
    table="kids",
    columns=("parent_id",),
    ref_table="parents",
    ref_columns=("id",),
    row_key=("id",),
    on_delete="CASCADE",
    constraint="kids_parent_fk",
    index="kids_parent_idx",
    audit_table="kids_orphan_audit",
    orphans="delete",
)
KIDS_SCHEMA = """
CREATE TABLE parents (id int PRIMARY KEY);
CREATE TABLE kids (id int PRIMARY KEY, parent_id int NOT NULL);
CREATE TABLE toys (id int PRIMARY KEY, kid_id int NOT NULL REFERENCES kids ON DELETE CASCADE);
INSERT INTO parents VALUES (1);
INSERT INTO kids VALUES (1, 1), (2, 2);
INSERT INTO toys VALUES (1, 1), (2, 2);
"""


def test_a_parent_put_back_while_the_batch_waits_keeps_its_child_and_the_childs_cascade(db) -> None:
    """The batch waits for a row of the cascade the app holds; meanwhile the missing parent comes back (a restore
    from backup): the DELETE checks again, so kid 2 and its toy stay, and the batch rolls back whole."""
    db.execute(KIDS_SCHEMA)
    app = db.connect()
    app.autocommit = False
    app.execute("SELECT * FROM toys WHERE id = 2 FOR UPDATE")
    outcome: dict[str, Any] = {}

    def delete() -> None:
        with db.connect() as conn:
            try:
                outcome["result"] = null_orphans(conn, KIDS, RunSettings(validate_now=True, lock_timeout_ms=3000), "r")
            except Exception as error:
                outcome["error"] = error

    worker = threading.Thread(target=delete)
    worker.start()
    time.sleep(1.0)
    db.execute("INSERT INTO parents VALUES (2)")
    time.sleep(0.3)
    app.rollback()
    app.close()
    worker.join(timeout=30)
    assert db.query("SELECT id FROM kids ORDER BY id") == [(1,), (2,)]
    assert db.query("SELECT id FROM toys ORDER BY id") == [(1,), (2,)]
    assert "deleted 0 of 1" in str(outcome.get("error")) and "rolled back" in str(outcome["error"]), outcome


def test_a_trigger_that_changes_a_table_the_archive_does_not_cover_rolls_the_batch_back(db) -> None:
    db.execute(
        KIDS_SCHEMA
        + """
        CREATE TABLE toy_stats (id int PRIMARY KEY, toys int);
        INSERT INTO toy_stats VALUES (1, 2);
        CREATE FUNCTION count_toy_delete() RETURNS trigger LANGUAGE plpgsql AS
            $$ BEGIN UPDATE toy_stats SET toys = toys - 1 WHERE id = 1; RETURN OLD; END $$;
        CREATE TRIGGER toy_deleted AFTER DELETE ON toys FOR EACH ROW EXECUTE FUNCTION count_toy_delete();
        """
    )
    with db.connect() as conn, pytest.raises(RuntimeError) as refused:
        null_orphans(conn, KIDS, RunSettings(validate_now=True), "r")
    assert "toy_stats: the server counts 0 deleted and 1 updated, the archive nothing" in str(refused.value)
    assert db.query("SELECT toys FROM toy_stats") == [(2,)] and db.query("SELECT count(*) FROM kids") == [(2,)]
