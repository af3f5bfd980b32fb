"""Restore after orphans: delete is exact, whatever the batches, the app and the schema's shape (issue 28).

Each test compares every column of every row before the run and after the restore (each row's text under fixed
formats, by its primary key), or proves a shape that cannot be restored exactly is refused before any change.
The scenarios: orphans that point at orphans through a SET NULL key, nulled by one batch and archived by a later
one (the headline bug, on a Mastodon-shaped schema while the app writes); an app write during the restore; a
second restore after the app deleted restored rows; rows that point at each other; rows the database refuses
(CHECK, NOT NULL, a detached partition, row-level security, a deferred key) counted with their reason while the
others go back; keys the walk did not see (a key that references a partition, one added between batches,
row-level security hiding rows); a self-referencing CASCADE key; a restore before the declared key exists; NOT NULL
domains; triggers a restore would fire; floats and session settings; a table rewrite; "written since" judged by
the record's own batch. The test command runs this module on PostgreSQL 18, 16 and 15.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import replace
from typing import Any

import psycopg
import pytest

from devkit.db_state import orphan_count, snapshot
from devkit.pipeline import run_pipeline
from fk_maintenance.errors import InvalidSettings, PreflightFailed
from fk_maintenance.keys.settings import RunSettings
from fk_maintenance.keys.spec import ForeignKeySpec
from fk_maintenance.records.restore import restore_run
from fk_maintenance.steps.orphans import null_orphans
from fk_maintenance.steps.preflight import preflight

SETTINGS = RunSettings(validate_now=True, batch_size=7, lock_timeout_ms=200, lock_attempts=30)
ARCHIVE = "fk_maintenance.{}_orphan_audit_archive"
# Every value's text fixed for the comparison, whatever the database's settings (some tests change them).
FIXED_FORMATS = (
    "SET DateStyle = 'ISO, MDY'; SET IntervalStyle = postgres; SET TimeZone = 'UTC'; SET extra_float_digits = 3; "
    "SET bytea_output = hex; SET lc_monetary = 'C'"
)


def key(table: str, column: str, ref_table: str, *, on_delete: str = "CASCADE", **more: Any) -> ForeignKeySpec:
    """A declared key with orphans: delete, its names derived from the table's."""
    return ForeignKeySpec(
        schema="public",
        table=table,
        columns=(column,),
        ref_table=ref_table,
        ref_columns=("id",),
        row_key=("id",),
        on_delete=on_delete,
        constraint=f"{table}_{column}_fkey",
        index=f"{table}_{column}_idx",
        audit_table=f"{table}_orphan_audit",
        orphans="delete",
        **more,
    )


def every_row(db: Any, tables: list[str], user: str | None = None) -> dict[str, dict[str, str]]:
    """Every row of each table as its own text (every column, every value exactly), by its primary key's text."""
    rows: dict[str, dict[str, str]] = {}
    with psycopg.connect(db.dsn, autocommit=True, **({"user": user} if user else {})) as conn:
        conn.execute(FIXED_FORMATS)
        for table in tables:
            columns = conn.execute(
                "SELECT array_agg(quote_ident(a.attname) ORDER BY k.ord) FROM pg_index i "
                "CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) "
                "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum "
                "WHERE i.indrelid = %s::regclass AND i.indisprimary",
                [table],
            ).fetchone()[0]
            found = conn.execute(f"SELECT ROW({', '.join(columns)})::text, t::text FROM {table} t").fetchall()
            rows[table] = dict(found)
    return rows


def assert_back_as_before(before: dict[str, dict[str, str]], after: dict[str, dict[str, str]]) -> None:
    """Every row there before the run is there again, every column as it was."""
    for table, rows in before.items():
        differ = {k: (v, after[table].get(k)) for k, v in rows.items() if after[table].get(k) != v}
        assert not differ, (table, len(differ), list(differ.items())[:5])


def restore(db: Any, spec: ForeignKeySpec, run_id: str, restore_id: str, **kwargs: Any) -> dict[str, Any]:
    settings = replace(SETTINGS, **kwargs)
    with db.connect() as conn:
        return restore_run(conn, spec, settings, run_id, restore_id)


def counts(result: dict[str, Any], *names: str) -> dict[str, int]:
    return {name: result[name] for name in names}


# --- the headline: chained orphans on a Mastodon-shaped schema, while the app writes -----------------------------

# accounts 1..30 exist; statuses belong to accounts 1..40, so those of 31..40 (300 of 1200) are orphans. A status
# replies to the one 40 before it (same account) or 40 after it, and every third pair replies both ways; a few
# live statuses reply to orphans. Favourites and mentions CASCADE from statuses.
MASTODON = """
CREATE TABLE accounts (id bigint PRIMARY KEY, username text NOT NULL);
CREATE TABLE statuses (
    id bigint PRIMARY KEY,
    account_id bigint NOT NULL,
    in_reply_to_id bigint REFERENCES statuses ON DELETE SET NULL,
    text text NOT NULL DEFAULT '',
    spoiler_text text,
    created_at timestamptz NOT NULL,
    sensitive boolean NOT NULL DEFAULT false,
    language varchar(10)
);
CREATE INDEX statuses_account_id_idx ON statuses (account_id);
CREATE INDEX statuses_in_reply_to_idx ON statuses (in_reply_to_id);
CREATE TABLE favourites (id bigint PRIMARY KEY, account_id bigint NOT NULL,
                         status_id bigint NOT NULL REFERENCES statuses ON DELETE CASCADE,
                         created_at timestamptz NOT NULL);
CREATE INDEX ON favourites (status_id);
CREATE TABLE mentions (id bigint PRIMARY KEY, status_id bigint NOT NULL REFERENCES statuses ON DELETE CASCADE,
                       account_id bigint NOT NULL, silent boolean NOT NULL DEFAULT false);
CREATE INDEX ON mentions (status_id);
INSERT INTO accounts SELECT g, 'user' || g FROM generate_series(1, 30) g;
INSERT INTO statuses (id, account_id, text, spoiler_text, created_at, sensitive, language)
SELECT g, 1 + g % 40, 'toot ' || g || ' with "quotes", commas', CASE WHEN g % 5 = 0 THEN 'cw' END,
       timestamptz '2026-02-01 12:00:00.5+00' + g * interval '7 minutes 3.25 seconds', g % 11 = 0,
       (ARRAY['en', 'de', NULL])[1 + g % 3]
FROM generate_series(1, 1200) g;
UPDATE statuses SET in_reply_to_id = id - 40 WHERE id % 3 = 0 AND id > 40;
UPDATE statuses SET in_reply_to_id = id + 40 WHERE id % 3 IN (1, 2) AND id + 40 <= 1200;
UPDATE statuses SET in_reply_to_id = id + 1 WHERE id % 7 = 0 AND id < 1200;
INSERT INTO favourites SELECT 2 * s.id + k, 1 + (s.id + k) % 30, s.id, s.created_at + k * interval '1 minute'
FROM statuses s, generate_series(0, 1) k;
INSERT INTO mentions SELECT s.id, s.id, 1 + s.id % 30, s.id % 4 = 0 FROM statuses s WHERE s.id % 2 = 0;
ANALYZE;
"""
MASTODON_TABLES = ["accounts", "statuses", "favourites", "mentions"]
STATUSES = key("statuses", "account_id", "accounts")


class AppWriter:
    """The app: new statuses, favourites and mentions under live accounts, and edits of its own statuses, every
    few milliseconds until stopped."""

    def __init__(self, db: Any) -> None:
        self.db = db
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.writes = 0
        self.thread = threading.Thread(target=self.run, daemon=True)

    def __enter__(self) -> AppWriter:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=30)

    def run(self) -> None:
        with psycopg.connect(self.db.dsn, autocommit=True) as conn:
            step = 0
            while not self.stop.is_set():
                step += 1
                new = 100_000 + step
                try:
                    conn.execute(
                        "INSERT INTO statuses (id, account_id, in_reply_to_id, created_at) VALUES (%s, %s, %s, now())",
                        [new, 1 + step % 30, 1 + step % 29],
                    )
                    conn.execute("INSERT INTO favourites VALUES (%s, 1, %s, now())", [new, new])
                    conn.execute("UPDATE statuses SET text = 'edited' WHERE id = %s", [new])
                    self.writes += 3
                except psycopg.Error as error:
                    self.errors.append(f"{type(error).__name__}: {error}")
                time.sleep(0.005)


def test_chained_orphans_nulled_by_an_earlier_batch_come_back_with_their_original_pointer_while_the_app_writes(
    db,
) -> None:
    """The headline bug: a status replying to an orphan of an earlier batch was nulled by that batch (SET NULL)
    before its own batch archived and deleted it; it comes back replying as it did, and so does every other row."""
    db.execute(MASTODON)
    before = every_row(db, MASTODON_TABLES)
    settings = replace(SETTINGS, batch_size=20)
    with AppWriter(db) as app:
        report = run_pipeline(db.connect, STATUSES, settings, "run-1")["report"]
    assert report["final_state"] == "converged", report
    assert app.errors == [] and app.writes > 0
    archive = ARCHIVE.format("statuses")
    chained = db.scalar(
        f"SELECT count(*) FROM {archive} d JOIN {archive} n ON n.row_key = d.row_key AND n.table_name = 'statuses' "
        "AND n.action = 'nulled' AND n.batch < d.batch WHERE d.action = 'deleted' AND d.table_name = 'statuses'"
    )
    assert chained > 20, chained  # the shape the bug needs is there, many times
    deleted = db.scalar(f"SELECT count(*) FROM {archive} WHERE action = 'deleted'")
    nulled = db.scalar(f"SELECT count(*) FROM {archive} WHERE action = 'nulled'")
    db.execute("INSERT INTO accounts SELECT g, 'user' || g FROM generate_series(31, 40) g")
    result = restore(db, STATUSES, "run-1", "restore-1")
    assert counts(result, "rows_restored", "pointers_restored") == {
        "rows_restored": deleted,
        "pointers_restored": nulled,
    }, result
    for name in ("rows_written_since", "pointers_written_since", "rows_parent_still_missing", "rows_failed", "busy"):
        assert result[name] == 0, (name, result)
    after = every_row(db, MASTODON_TABLES)
    assert_back_as_before(before, after)
    again = restore(db, STATUSES, "run-1", "restore-2")
    assert (again["rows_restored"], again["pointers_restored"]) == (0, 0)
    assert (again["rows_already_restored"], again["pointers_already_restored"]) == (deleted, nulled)
    assert every_row(db, MASTODON_TABLES) == after


# --- a small shop: posts whose account is gone, their comments, pins -------------------------------------------

# accounts 1..10 exist; posts of accounts 11 and 12 (20 of 120) are orphans. Every even post pins its own first
# comment, every fifth an orphan neighbour's comment (rows that point at each other); pins point at posts.
SHOP = """
CREATE TABLE accounts (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE posts (id int PRIMARY KEY, account_id int NOT NULL, title text NOT NULL, pinned_comment_id int,
                    score float8, posted_at timestamptz NOT NULL DEFAULT '2026-01-01 10:00:00+00');
CREATE INDEX posts_account_id_idx ON posts (account_id);
CREATE TABLE comments (id int PRIMARY KEY, post_id int NOT NULL REFERENCES posts ON DELETE CASCADE, body text,
                       rating int);
CREATE INDEX ON comments (post_id);
ALTER TABLE posts ADD FOREIGN KEY (pinned_comment_id) REFERENCES comments ON DELETE SET NULL;
CREATE TABLE pins (id int PRIMARY KEY, post_id int REFERENCES posts ON DELETE SET NULL, label text);
INSERT INTO accounts SELECT g, 'account ' || g FROM generate_series(1, 10) g;
INSERT INTO posts (id, account_id, title, score) SELECT g, 1 + g % 12, 'post ' || g, g / 3.0
FROM generate_series(1, 120) g;
INSERT INTO comments SELECT 10 * p.id + k, p.id, 'comment ' || k, k FROM posts p, generate_series(0, 2) k;
UPDATE posts SET pinned_comment_id = 10 * id WHERE id % 2 = 0;
UPDATE posts SET pinned_comment_id = 10 * (id + 12) + 1 WHERE id % 5 = 0 AND id + 12 <= 120;
INSERT INTO pins SELECT g, g, 'pin ' || g FROM generate_series(1, 120) g;
"""
SHOP_TABLES = ["accounts", "posts", "comments", "pins"]
POSTS = key("posts", "account_id", "accounts")


def deleted_shop(db: Any, run_id: str = "run-1", **settings: Any) -> dict[str, dict[str, str]]:
    """The shop, its orphans deleted by a run, their accounts back; every row as it was before the run."""
    db.execute(SHOP)
    before = every_row(db, SHOP_TABLES)
    report = run_pipeline(db.connect, POSTS, replace(SETTINGS, **settings), run_id)["report"]
    assert report["final_state"] == "converged", report
    db.execute("INSERT INTO accounts VALUES (11, 'account 11'), (12, 'account 12')")
    return before


def test_rows_that_point_at_each_other_come_back_together(db) -> None:
    """A post pins its own comment (comments.post_id CASCADE, posts.pinned_comment_id SET NULL): each insert
    needs the other; both go in one transaction, the pin first NULL and then set."""
    before = deleted_shop(db)
    result = restore(db, POSTS, "run-1", "restore-1")
    assert result["rows_parent_still_missing"] == 0 and result["rows_failed"] == 0, result
    assert result["rows_restored"] == 20 + 60 and result["pointers_restored"] == 20, result
    assert_back_as_before(before, every_row(db, SHOP_TABLES))


def test_a_row_whose_pointer_still_has_no_parent_waits_whole_and_goes_back_whole_later(db) -> None:
    """Post 10 (account 11) pins a comment of post 11 (account 12). With only account 11 back, post 10 does not
    come back with the NULL pin the run left: it waits, counted, and goes back whole once account 12 is back."""
    db.execute(SHOP + "UPDATE posts SET pinned_comment_id = 110 WHERE id = 10")
    before = every_row(db, SHOP_TABLES)
    report = run_pipeline(db.connect, POSTS, SETTINGS, "run-1")["report"]
    assert report["final_state"] == "converged", report
    db.execute("INSERT INTO accounts VALUES (11, 'account 11')")
    first = restore(db, POSTS, "run-1", "restore-1")
    assert db.scalar("SELECT count(*) FROM posts WHERE id = 10") == 0
    assert first["rows_parent_still_missing"] == 1 + 3 + 10 + 30, first  # post 10 and its comments; account 12's
    db.execute("INSERT INTO accounts VALUES (12, 'account 12')")
    second = restore(db, POSTS, "run-1", "restore-2")
    assert second["rows_parent_still_missing"] == 0 and second["rows_restored"] == 44, second
    assert_back_as_before(before, every_row(db, SHOP_TABLES))


ORDERS = """
CREATE TABLE customers (id int PRIMARY KEY);
CREATE TABLE orders (id int PRIMARY KEY, customer_id int NOT NULL, invoice_id int NOT NULL, total numeric(10, 2));
CREATE INDEX orders_customer_id_idx ON orders (customer_id);
CREATE TABLE invoices (id int PRIMARY KEY,
                       order_id int NOT NULL REFERENCES orders ON DELETE CASCADE DEFERRABLE INITIALLY DEFERRED);
ALTER TABLE orders ADD FOREIGN KEY (invoice_id) REFERENCES invoices DEFERRABLE INITIALLY DEFERRED;
BEGIN;
INSERT INTO customers SELECT generate_series(1, 8);
INSERT INTO orders SELECT g, 1 + g % 10, 1000 + g, g * 9.99 FROM generate_series(1, 50) g;
INSERT INTO invoices SELECT 1000 + g, g FROM generate_series(1, 50) g;
COMMIT;
"""


def test_rows_two_deferrable_not_null_keys_tie_come_back_together(db) -> None:
    """An order and its invoice point at each other through NOT NULL keys the app fills in one transaction
    (DEFERRABLE): neither can go in first, nor with a NULL; they go back together, checked once both are in."""
    db.execute(ORDERS)
    orders = key("orders", "customer_id", "customers")
    before = every_row(db, ["orders", "invoices"])
    report = run_pipeline(db.connect, orders, SETTINGS, "run-o")["report"]
    assert report["final_state"] == "converged", report
    db.execute("INSERT INTO customers VALUES (9), (10)")
    result = restore(db, orders, "run-o", "restore-o")
    assert result["rows_restored"] == 20 and result["rows_parent_still_missing"] == 0, result
    assert_back_as_before(before, every_row(db, ["orders", "invoices"]))


def test_an_app_write_made_while_the_restore_waits_for_the_row_is_never_overwritten(db) -> None:
    """The app holds a pin the cascade nulled and re-points it; the restore does not wait for it (the row is
    counted busy), and once the app committed its write is newer than the archive: left alone."""
    deleted_shop(db)
    app = db.connect()
    app.autocommit = False
    app.execute("UPDATE pins SET post_id = 1 WHERE id = 11")  # pin 11 pointed at orphan post 11
    committer = threading.Timer(0.5, app.commit)
    committer.start()
    try:
        started = time.monotonic()
        first = restore(db, POSTS, "run-1", "restore-1", lock_timeout_ms=3000)
        waited = time.monotonic() - started
    finally:
        committer.join()
        app.close()
    assert first["busy"] == 1 and first["pointers_restored"] == 19, first
    assert waited < 3, waited  # SKIP LOCKED: never waits on the app's row
    assert db.scalar("SELECT post_id FROM pins WHERE id = 11") == 1
    second = restore(db, POSTS, "run-1", "restore-2")
    assert second["pointers_written_since"] == 1 and second["pointers_restored"] == 0, second
    assert db.scalar("SELECT post_id FROM pins WHERE id = 11") == 1


def test_a_second_restore_never_brings_back_rows_the_app_deleted_after_the_first(db) -> None:
    before = deleted_shop(db)
    first = restore(db, POSTS, "run-1", "restore-1")
    assert first["rows_restored"] == 80
    # The app deletes a restored post (its comments go with it) and a restored comment of another post.
    db.execute("UPDATE posts SET pinned_comment_id = NULL WHERE pinned_comment_id IN (110, 111, 112)")
    db.execute("DELETE FROM posts WHERE id = 11; DELETE FROM comments WHERE id = 230")
    after_app = every_row(db, SHOP_TABLES)
    second = restore(db, POSTS, "run-1", "restore-2")
    assert second["rows_restored"] == 0 and second["pointers_restored"] == 0, second
    assert second["rows_written_since"] == 1 + 3 + 1, second  # post 11, its 3 comments, comment 230
    assert second["rows_already_restored"] == 80 - 5
    assert every_row(db, SHOP_TABLES) == after_app
    assert set(after_app["posts"]) == set(before["posts"]) - {"(11)"}


# Below each post: a note in a partition by kind, a tag (some 'secret'), a link to a target (some missing); one
# comment of each post 'x', one with a NULL rating.
REFUSING = """
CREATE TABLE notes (id int, kind text, post_id int NOT NULL REFERENCES posts ON DELETE CASCADE,
                    PRIMARY KEY (id, kind)) PARTITION BY LIST (kind);
CREATE TABLE notes_a PARTITION OF notes FOR VALUES IN ('a');
CREATE TABLE notes_b PARTITION OF notes FOR VALUES IN ('b');
CREATE TABLE tags (id int PRIMARY KEY, post_id int REFERENCES posts ON DELETE CASCADE, label text);
CREATE TABLE targets (id int PRIMARY KEY);
CREATE TABLE links (id int PRIMARY KEY, post_id int REFERENCES posts ON DELETE CASCADE, target_id int);
INSERT INTO notes SELECT id, CASE WHEN id % 2 = 0 THEN 'a' ELSE 'b' END, id FROM posts;
INSERT INTO tags SELECT id, id, CASE WHEN id % 24 = 10 THEN 'secret' ELSE 'open' END FROM posts;
INSERT INTO targets SELECT generate_series(1, 200);
INSERT INTO links SELECT id, id, CASE WHEN id % 24 = 11 THEN 500 + id ELSE id END FROM posts;
UPDATE posts SET pinned_comment_id = NULL WHERE pinned_comment_id % 10 = 1;
UPDATE comments SET body = 'x' WHERE id % 10 = 1;
UPDATE comments SET rating = NULL WHERE id % 10 = 2;
"""
# What the app changes after the delete, and how it makes room again.
REFUSE_SINCE = """
INSERT INTO accounts VALUES (11, 'account 11'), (12, 'account 12');
DELETE FROM comments WHERE rating IS NULL;  -- the live ones: the app cleans up for its NOT NULL
ALTER TABLE comments ADD CONSTRAINT body_is_not_x CHECK (body <> 'x') NOT VALID;
ALTER TABLE comments ALTER COLUMN rating SET NOT NULL;
ALTER TABLE notes DETACH PARTITION notes_b;
ALTER TABLE tags ENABLE ROW LEVEL SECURITY;
ALTER TABLE tags FORCE ROW LEVEL SECURITY;
CREATE POLICY open_only ON tags USING (true) WITH CHECK (label <> 'secret');
ALTER TABLE links ADD CONSTRAINT links_target_fk FOREIGN KEY (target_id) REFERENCES targets
    DEFERRABLE INITIALLY DEFERRED NOT VALID;
"""
MAKE_ROOM = """
ALTER TABLE comments DROP CONSTRAINT body_is_not_x;
ALTER TABLE comments ALTER COLUMN rating DROP NOT NULL;
ALTER TABLE notes ATTACH PARTITION notes_b FOR VALUES IN ('b');
DROP POLICY open_only ON tags;
ALTER TABLE tags NO FORCE ROW LEVEL SECURITY;
ALTER TABLE tags DISABLE ROW LEVEL SECURITY;
INSERT INTO targets SELECT 500 + id FROM generate_series(1, 120) id WHERE id % 24 = 11;
"""
ORPHAN_POSTS = [n for n in range(1, 121) if 1 + n % 12 > 10]


def by_sqlstate(failures: dict[str, int]) -> dict[str, int]:
    states: dict[str, int] = {}
    for reason, count in failures.items():
        states[reason.split()[0]] = states.get(reason.split()[0], 0) + count
    return states


def test_rows_the_database_refuses_are_counted_with_their_reason_and_the_others_go_back(db) -> None:
    """Since the delete: a CHECK, a NOT NULL, a detached partition, row-level security forced on the owner and a
    deferred key refuse some rows. Each is counted with its SQLSTATE (a deferred key's missing parent as a
    missing parent), the others go back, and a second restore puts the rest back once the app fixed them."""
    role = f"owner_{uuid.uuid4().hex[:8]}"
    db.execute(f"CREATE ROLE {role} LOGIN; GRANT CREATE ON DATABASE {db.name} TO {role}")
    db.execute(f"GRANT CREATE ON SCHEMA public TO {role}")
    as_owner = lambda: psycopg.connect(db.dsn, user=role, autocommit=True)  # noqa: E731
    with as_owner() as conn:
        conn.execute(SHOP + REFUSING)
    tables = [*SHOP_TABLES, "notes", "tags", "links"]
    before = every_row(db, tables)
    report = run_pipeline(as_owner, POSTS, SETTINGS, "run-1")["report"]
    assert report["final_state"] == "converged", report
    with as_owner() as conn:
        conn.execute(REFUSE_SINCE)
    with as_owner() as conn:
        result = restore_run(conn, POSTS, SETTINGS, "run-1", "restore-1")
    refused = {
        "23514": sum(1 for n in ORPHAN_POSTS if n % 2 == 1) + len(ORPHAN_POSTS),  # notes_b gone; a comment 'x'
        "23502": len(ORPHAN_POSTS),  # one NULL rating per orphan post
        "42501": sum(1 for n in ORPHAN_POSTS if n % 24 == 10),  # secret tags
    }
    assert by_sqlstate(result["failures"]) == refused, result["failures"]
    assert result["rows_failed"] == sum(refused.values())
    missing_target = sum(1 for n in ORPHAN_POSTS if n % 24 == 11)
    assert result["rows_parent_still_missing"] == missing_target, result
    total = len(ORPHAN_POSTS) * (1 + 3 + 1 + 1 + 1)  # post, comments, note, tag, link
    assert result["rows_restored"] == total - sum(refused.values()) - missing_target
    # The app makes room for the rest; the second restore puts back exactly what is left.
    with as_owner() as conn:
        conn.execute(MAKE_ROOM)
    with as_owner() as conn:
        second = restore_run(conn, POSTS, SETTINGS, "run-1", "restore-2")
    assert second["rows_restored"] == sum(refused.values()) + missing_target, second
    assert second["rows_failed"] == 0 and second["rows_parent_still_missing"] == 0
    after = every_row(db, tables)
    # The live comments the app deleted to add its NOT NULL are the app's.
    for gone in [k for k in before["comments"] if k not in after["comments"]]:
        assert int(gone.strip("()")) // 10 not in ORPHAN_POSTS
        del before["comments"][gone]
    assert_back_as_before(before, after)


# --- keys the walk did not see ------------------------------------------------------------------------------------

# readings is partitioned by day; each partition has its own unique id (the same ids in both). audits reference
# one partition (SET NULL), flags the other (CASCADE): a key on a partition acts on that partition's rows only.
READINGS = """
CREATE TABLE devices (id int PRIMARY KEY);
CREATE TABLE readings (id int, taken_on date NOT NULL, device_id int NOT NULL, value float8,
                       PRIMARY KEY (id, taken_on)) PARTITION BY RANGE (taken_on);
CREATE TABLE readings_2026 PARTITION OF readings FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
CREATE TABLE readings_other PARTITION OF readings DEFAULT;
CREATE UNIQUE INDEX ON readings_2026 (id);
CREATE UNIQUE INDEX ON readings_other (id);
CREATE TABLE audits (id int PRIMARY KEY, reading_id int REFERENCES readings_2026 (id) ON DELETE SET NULL, note text);
CREATE TABLE flags (id int PRIMARY KEY, reading_id int NOT NULL REFERENCES readings_other (id) ON DELETE CASCADE);
INSERT INTO devices SELECT generate_series(1, 20);
INSERT INTO readings SELECT g, date '2026-03-01', CASE WHEN g % 10 = 0 THEN 99 ELSE 1 + g % 20 END, g / 7.0
FROM generate_series(1, 200) g;
INSERT INTO readings SELECT g, date '2025-03-01', CASE WHEN g % 10 = 5 THEN 99 ELSE 1 + g % 20 END, -g / 7.0
FROM generate_series(1, 200) g;
INSERT INTO audits SELECT g, g, 'audit ' || g FROM generate_series(1, 200) g;
INSERT INTO flags SELECT g, g FROM generate_series(1, 200) g;
"""
READINGS_KEY = replace(key("readings", "device_id", "devices"), row_key=("id", "taken_on"))


def test_keys_that_reference_one_partition_act_on_its_rows_only_and_are_archived_and_restored(db) -> None:
    db.execute(READINGS)
    tables = ["devices", "readings", "audits", "flags"]
    before = every_row(db, tables)
    report = run_pipeline(db.connect, READINGS_KEY, SETTINGS, "run-r")["report"]
    assert report["final_state"] == "converged", report
    # Orphans in readings_2026 null their audits, those in readings_other take their flags: 20 each.
    assert report["archived"] == {
        "public.readings": {"deleted": 40, "nulled": 0, "reset": 0},
        "public.audits": {"deleted": 0, "nulled": 20, "reset": 0},
        "public.flags": {"deleted": 20, "nulled": 0, "reset": 0},
    }, report["archived"]
    db.execute("INSERT INTO devices VALUES (99)")
    result = restore(db, READINGS_KEY, "run-r", "restore-r")
    assert (result["rows_restored"], result["pointers_restored"]) == (60, 20), result
    assert_back_as_before(before, every_row(db, tables))


HIDDEN = """
CREATE TABLE accounts (id int PRIMARY KEY);
CREATE TABLE posts (id int PRIMARY KEY, account_id int NOT NULL);
CREATE TABLE shares (id int PRIMARY KEY, post_id int REFERENCES posts ON DELETE SET NULL, hidden boolean NOT NULL);
INSERT INTO accounts SELECT generate_series(1, 5);
INSERT INTO posts SELECT g, 1 + g % 6 FROM generate_series(1, 60) g;
INSERT INTO shares SELECT g + k * 100, g, k = 1 FROM generate_series(1, 60) g, generate_series(0, 1) k;
ALTER TABLE shares ENABLE ROW LEVEL SECURITY;
"""


def test_row_level_security_that_hides_rows_from_the_walk_is_refused_and_the_server_counts_catch_it(db) -> None:
    """Referential actions ignore row-level security: the walk would miss the hidden shares PostgreSQL nulls all
    the same. Preflight refuses it naming the fix; a delete that meets it anyway rolls back (updates counted)."""
    role = f"runner_{uuid.uuid4().hex[:8]}"
    db.execute(
        HIDDEN + f"CREATE ROLE {role} LOGIN; GRANT CREATE ON DATABASE {db.name} TO {role};"
        f"ALTER TABLE posts OWNER TO {role}; ALTER TABLE accounts OWNER TO {role};"
        f"GRANT SELECT, UPDATE ON shares TO {role}; CREATE POLICY visible ON shares TO {role} USING (NOT hidden)"
    )
    spec = key("posts", "account_id", "accounts")
    before = every_row(db, ["posts", "shares"])
    with psycopg.connect(db.dsn, user=role, autocommit=True) as conn, pytest.raises(PreflightFailed) as refused:
        preflight(conn, spec, SETTINGS)
    assert f"row-level security on public.shares applies to role {role}" in str(refused.value)
    assert f"ALTER ROLE {role} BYPASSRLS" in str(refused.value)
    with psycopg.connect(db.dsn, user=role, autocommit=True) as conn, pytest.raises(RuntimeError) as mismatch:
        null_orphans(conn, spec, SETTINGS, "run-h")
    # Seven orphans a batch, each with a share the walk sees and one it does not.
    assert "public.shares: the server counts 0 deleted and 14 updated, the archive 0 deleted and 7 changed" in str(
        mismatch.value
    ), mismatch.value
    assert every_row(db, ["posts", "shares"]) == before


def test_a_key_added_between_two_batches_is_read_and_its_rows_archived(db, monkeypatch) -> None:
    """The sweep read the catalog's keys before a new SET NULL key landed: its first batch counts updates the
    archive lacks and rolls back; the catalog is read again, and the batch archives the new key's rows too."""
    from fk_maintenance.steps import orphans

    db.execute(
        SHOP + "CREATE TABLE boosts (id int PRIMARY KEY, post_id int);"
        "INSERT INTO boosts SELECT g, g FROM generate_series(1, 120) g"
    )
    before = every_row(db, [*SHOP_TABLES, "boosts"])
    read = orphans.require_graph
    calls: list[int] = []

    def read_then_add_a_key(*args: Any) -> Any:
        graph = read(*args)
        calls.append(1)
        if len(calls) == 1:
            db.execute("ALTER TABLE boosts ADD FOREIGN KEY (post_id) REFERENCES posts ON DELETE SET NULL")
        return graph

    monkeypatch.setattr(orphans, "require_graph", read_then_add_a_key)
    with db.connect() as conn:
        done = null_orphans(conn, POSTS, SETTINGS, "run-k")
    assert done["deleted"] == 20 and len(calls) == 2, (done, calls)
    assert db.scalar(f"SELECT count(*) FROM {ARCHIVE.format('posts')} WHERE table_name = 'boosts'") == 20
    db.execute("INSERT INTO accounts VALUES (11, 'account 11'), (12, 'account 12')")
    result = restore(db, POSTS, "run-k", "restore-k")
    assert result["pointers_restored"] == 20 + 20, result
    assert_back_as_before(before, every_row(db, [*SHOP_TABLES, "boosts"]))


# Quoted names in another schema, a composite row key, a self-reference by SET NULL (column) whose chains cross
# batches, and a partitioned table in public whose rows point at two documents each (two keys, one batch).
DOCS = """
CREATE SCHEMA "App Data";
CREATE TABLE "App Data"."Tenants" ("Tenant Id" int PRIMARY KEY);
CREATE TABLE "App Data"."Docs" ("Tenant Id" int NOT NULL, "Doc Id" int NOT NULL, "Parent Doc" int, title text,
    PRIMARY KEY ("Tenant Id", "Doc Id"),
    FOREIGN KEY ("Tenant Id", "Parent Doc") REFERENCES "App Data"."Docs" ON DELETE SET NULL ("Parent Doc"));
CREATE INDEX docs_tenant_idx ON "App Data"."Docs" ("Tenant Id");
CREATE TABLE refs (id int, region text, tenant int, doc int, doc2 int, note text, PRIMARY KEY (id, region),
    FOREIGN KEY (tenant, doc) REFERENCES "App Data"."Docs" ON DELETE SET NULL (doc),
    FOREIGN KEY (tenant, doc2) REFERENCES "App Data"."Docs" ON DELETE SET NULL (doc2)) PARTITION BY LIST (region);
CREATE TABLE refs_eu PARTITION OF refs FOR VALUES IN ('eu');
CREATE TABLE refs_us PARTITION OF refs FOR VALUES IN ('us');
INSERT INTO "App Data"."Tenants" SELECT generate_series(1, 3);
INSERT INTO "App Data"."Docs" SELECT 1 + g % 4, g, NULL, 'doc ' || g FROM generate_series(1, 80) g;
UPDATE "App Data"."Docs" SET "Parent Doc" = "Doc Id" - 4 WHERE "Doc Id" > 4;
INSERT INTO refs SELECT g, CASE WHEN g % 2 = 0 THEN 'eu' ELSE 'us' END, 1 + g % 4, g, g + 4, 'ref ' || g
FROM generate_series(1, 76) g;
"""
DOCS_KEY = replace(
    key("Docs", "Tenant Id", "Tenants"),
    schema="App Data",
    ref_schema="App Data",
    columns=("Tenant Id",),
    ref_columns=("Tenant Id",),
    row_key=("Tenant Id", "Doc Id"),
    constraint="docs_tenant_fk",
    index="docs_tenant_idx",
    audit_table="docs_orphan_audit",
)


def test_composite_keys_across_schemas_and_a_partitioned_child_pointing_twice_come_back_exactly(db) -> None:
    db.execute(DOCS)
    tables = ['"App Data"."Docs"', "refs"]
    before = every_row(db, tables)
    report = run_pipeline(db.connect, DOCS_KEY, replace(SETTINGS, batch_size=3), "run-d")["report"]
    assert report["final_state"] == "converged", report
    assert report["archived"] == {
        "App Data.Docs": {"deleted": 20, "nulled": 6, "reset": 0},  # chains of Parent Doc across batches
        "public.refs": {"deleted": 0, "nulled": 38, "reset": 0},  # 19 rows, each through both keys
    }, report["archived"]
    db.execute('INSERT INTO "App Data"."Tenants" VALUES (4)')
    result = restore(db, DOCS_KEY, "run-d", "restore-d")
    assert (result["rows_restored"], result["pointers_restored"]) == (20, 44), result
    assert_back_as_before(before, every_row(db, tables))


# --- self-referencing declared keys, and a restore before the key exists --------------------------------------

# A 500-node tree of goals (a binary tree below ten roots); goals 60 and 75 point at parents that are gone, each
# with a subtree below it (15 and 7 goals). Notes CASCADE from goals.
TREE = """
CREATE TABLE goals (id int PRIMARY KEY, parent_id int, title text NOT NULL, due date);
CREATE INDEX goals_parent_id_idx ON goals (parent_id);
CREATE TABLE goal_notes (id int PRIMARY KEY, goal_id int NOT NULL REFERENCES goals ON DELETE CASCADE, body text);
INSERT INTO goals SELECT g, CASE WHEN g <= 10 THEN NULL ELSE g / 2 END, 'goal ' || g, date '2026-01-01' + g
FROM generate_series(1, 500) g;
UPDATE goals SET parent_id = 9001 WHERE id = 60;
UPDATE goals SET parent_id = 9002 WHERE id = 75;
INSERT INTO goal_notes SELECT id, id, 'note ' || id FROM goals WHERE id % 2 = 0;
"""
GOAL_TABLES = ["goals", "goal_notes"]
SUBTREES = """
WITH RECURSIVE tree AS (SELECT id FROM goals WHERE id IN (60, 75)
                        UNION SELECT g.id FROM goals g JOIN tree t ON g.parent_id = t.id)
SELECT count(*) FROM tree
"""


def goals_key(on_delete: str) -> ForeignKeySpec:
    return replace(key("goals", "parent_id", "goals", on_delete=on_delete), constraint="goals_parent_fk")


def test_a_self_referencing_cascade_key_converges_and_its_subtrees_come_back_exactly(db) -> None:
    """The declared CASCADE key is not in the catalog yet: the delete takes each orphan's subtree itself (it used
    to re-check the children as orphans against the DELETE's own snapshot, and every batch rolled back)."""
    db.execute(TREE)
    spec = goals_key("CASCADE")
    before = every_row(db, GOAL_TABLES)
    subtree = db.scalar(SUBTREES)
    report = run_pipeline(db.connect, spec, SETTINGS, "run-t")["report"]
    assert report["final_state"] == "converged", report
    assert report["archived"]["public.goals"]["deleted"] == subtree > 2
    db.execute("INSERT INTO goals VALUES (9001, NULL, 'back'), (9002, NULL, 'back')")
    result = restore(db, spec, "run-t", "restore-t")
    assert result["rows_restored"] == subtree + report["archived"]["public.goal_notes"]["deleted"], result
    assert_back_as_before(before, every_row(db, GOAL_TABLES))


@pytest.mark.parametrize("on_delete", ["CASCADE", "SET NULL"])
def test_a_restore_before_the_declared_key_exists_recreates_no_orphan(db, on_delete) -> None:
    """Nothing in the catalog refuses an orphan yet: a row of the key's table goes back (or gets its pointer
    back) only where its parent by the declared key is there, so a subtree waits for its root's parent."""
    db.execute(TREE)
    spec = goals_key(on_delete)
    before = every_row(db, GOAL_TABLES)
    with db.connect() as conn:
        null_orphans(conn, spec, SETTINGS, "run-t")
    nothing = restore(db, spec, "run-t", "restore-0")
    assert nothing["rows_restored"] == nothing["pointers_restored"] == 0, nothing
    assert orphan_count(db, spec) == 0
    db.execute("INSERT INTO goals VALUES (9001, NULL, 'back')")  # only 60's parent comes back
    partly = restore(db, spec, "run-t", "restore-1")
    assert partly["rows_restored"] > 0 and orphan_count(db, spec) == 0, partly
    after = every_row(db, GOAL_TABLES)
    assert after["goals"]["(60)"] == before["goals"]["(60)"] and "(75)" not in after["goals"]
    # 75's children stay deleted (CASCADE) or roots (SET NULL) while 75 cannot come back.
    assert all(after["goals"].get(k) != before["goals"][k] for k in ("(150)", "(151)"))
    assert db.scalar("SELECT count(*) FROM goals WHERE id IN (150, 151)") == (2 if on_delete == "SET NULL" else 0)
    db.execute("INSERT INTO goals VALUES (9002, NULL, 'back')")
    rest = restore(db, spec, "run-t", "restore-2")
    assert rest["rows_parent_still_missing"] == rest["pointers_parent_still_missing"] == 0, rest
    assert_back_as_before(before, every_row(db, GOAL_TABLES))


def test_a_table_with_inheritance_children_is_refused_before_any_change(db) -> None:
    """Rows of a table that inherits from one the delete reaches are read through it, and would come back in it
    without their own columns."""
    db.execute(SHOP + "CREATE TABLE video_comments (length_s int) INHERITS (comments)")
    before = snapshot(db, POSTS)
    with db.connect() as conn, pytest.raises(PreflightFailed) as refused:
        preflight(conn, POSTS, SETTINGS)
    assert "public.comments has inheritance children (video_comments)" in str(refused.value)
    assert snapshot(db, POSTS) == before


@pytest.mark.parametrize(
    ("shape", "reason"),
    [
        (
            # Positions kept unique and reordered within a transaction: no ON CONFLICT can take that as an arbiter.
            "ALTER TABLE comments ADD COLUMN position int;"
            "UPDATE comments SET position = id;"
            "ALTER TABLE comments ADD CONSTRAINT comments_position UNIQUE (post_id, position) DEFERRABLE",
            "public.comments has DEFERRABLE unique or exclusion constraint(s) comments_position",
        ),
        (
            # A membership whose group goes back to the default group: its row key itself changes.
            "CREATE TABLE memberships (post_id int NOT NULL DEFAULT 1 REFERENCES posts ON DELETE SET DEFAULT,"
            " account_id int, PRIMARY KEY (post_id, account_id));"
            "INSERT INTO memberships SELECT id, 1 FROM posts",
            "changes post_id, part of public.memberships's row key",
        ),
    ],
    ids=["deferrable-unique", "set-default-on-the-row-key"],
)
def test_a_shape_whose_rows_could_not_come_back_is_refused_before_any_change(db, shape: str, reason: str) -> None:
    db.execute(SHOP + shape)
    before = snapshot(db, POSTS)
    with db.connect() as conn, pytest.raises(PreflightFailed) as refused:
        preflight(conn, POSTS, SETTINGS)
    assert reason in str(refused.value), refused.value
    assert snapshot(db, POSTS) == before


# --- values, settings and versions ----------------------------------------------------------------------------

VALUES = """
CREATE DOMAIN label_t AS text NOT NULL CHECK (VALUE <> '');
CREATE TABLE owners (id int PRIMARY KEY);
CREATE TABLE things (
    id int PRIMARY KEY, owner_id int NOT NULL, label label_t,
    f8 float8, f4 float4, n numeric(12, 4), i interval, ts timestamptz, t timestamp, b bytea, m money,
    j json, a int[], bits bit varying(8), r int4range
);
CREATE TABLE parts (id int PRIMARY KEY, thing_id int NOT NULL REFERENCES things ON DELETE CASCADE, kind label_t,
                    weight float8, ratio float8 GENERATED ALWAYS AS (weight / 2) STORED,
                    serial_no int GENERATED ALWAYS AS IDENTITY);
INSERT INTO owners SELECT generate_series(1, 4);
-- Every even thing belongs to owner 5, who is gone: 15 orphans, with 30 parts below them.
INSERT INTO things SELECT g, CASE WHEN g % 2 = 0 THEN 5 ELSE 1 + g % 4 END, 'label ' || g,
    CASE WHEN g <= 8 THEN (ARRAY['0.1', '-0', '0.2', 'NaN', '0.3', '-Infinity', '0.4', '1e-310'])[g]::float8
         ELSE g / 3.0 END,
    (ARRAY['-0', '3.4028235e38', '0.1'])[1 + g % 3]::float4, 1.5 + g, '1 day -2 hours 3.000001 seconds'::interval * g,
    '2026-06-01 23:59:59.999999+14'::timestamptz + g * interval '1 day', '2026-01-01 00:00:00.000001'::timestamp,
    decode('00ff' || lpad(to_hex(g), 4, '0'), 'hex'), (g * 1.25)::numeric::money,
    ('{ "k" :  ' || g || ', "k": "dup" }')::json, ('[0:1]={' || g || ',' || -g || '}')::int[], B'1010'::bit varying,
    int4range(g, g + 10, '(]')
FROM generate_series(1, 30) g;
INSERT INTO parts (id, thing_id, kind, weight) SELECT g, 1 + g % 30, 'kind ' || g, -g * 0.1
FROM generate_series(1, 60) g;
"""
VALUE_TABLES = ["owners", "things", "parts"]
THINGS = key("things", "owner_id", "owners")
ODD_SETTINGS = {"extra_float_digits": "0", "TimeZone": "Asia/Kolkata", "bytea_output": "escape"}
OTHER_SETTINGS = {"extra_float_digits": "-3", "TimeZone": "America/St_Johns", "lc_monetary": "C"}


def set_database(db: Any, settings: dict[str, str]) -> None:
    db.execute(f"ALTER DATABASE {db.name} RESET ALL")
    for name, value in settings.items():
        db.execute(f"ALTER DATABASE {db.name} SET {name} = '{value}'")


def test_every_value_comes_back_exactly_whatever_the_session_settings_and_not_null_domains(db) -> None:
    """-0, NaN, float4 extremes, json as written (whitespace, a duplicate key), arrays with their bounds,
    intervals, timestamps, money, bytea, ranges; NOT NULL domains in the orphan's table and below; generated and
    identity columns. The run sees one set of session settings, the restore another."""
    db.execute(VALUES)
    before = every_row(db, VALUE_TABLES)
    set_database(db, ODD_SETTINGS)
    report = run_pipeline(db.connect, THINGS, SETTINGS, "run-v")["report"]
    assert report["final_state"] == "converged", report
    db.execute("INSERT INTO owners VALUES (5)")
    set_database(db, OTHER_SETTINGS)
    result = restore(db, THINGS, "run-v", "restore-v")
    assert result["rows_restored"] == 15 + 30 and result["rows_failed"] == 0, result
    assert_back_as_before(before, every_row(db, VALUE_TABLES))


def test_a_table_rewrite_does_not_make_the_runs_own_versions_look_written_since(db) -> None:
    """ALTER TABLE ... TYPE rewrites the table (every row a new xmin), VACUUM FULL moves every row to a new file:
    the pointers the cascade nulled are still recognised as the run's own version, by their text."""
    deleted_shop(db)  # the accounts are back already
    xmins = db.query("SELECT xmin::text FROM pins ORDER BY id")
    db.execute("ALTER TABLE pins ALTER COLUMN id TYPE bigint")
    assert db.query("SELECT xmin::text FROM pins ORDER BY id") != xmins  # every row a new version
    db.execute("VACUUM FULL pins")
    result = restore(db, POSTS, "run-1", "restore-1")
    assert result["pointers_written_since"] == 0 and result["pointers_restored"] == 20, result


def test_written_since_is_judged_by_the_records_own_batch(db) -> None:
    """A share nulled through its post by one batch, re-pointed by the app, then nulled through its comment by
    a later batch: only the later pointer is the run's last version; the first is the app's, left alone."""
    db.execute(
        SHOP
        + """
        CREATE TABLE shares (id int PRIMARY KEY, post_id int REFERENCES posts ON DELETE SET NULL,
                             comment_id int REFERENCES comments ON DELETE SET NULL);
        INSERT INTO shares VALUES (1, 11, 20);
        """
    )
    db.execute("UPDATE posts SET account_id = 1 WHERE account_id > 10")  # no orphans yet
    db.execute("UPDATE posts SET account_id = 11 WHERE id = 11")
    with db.connect() as conn:
        null_orphans(conn, POSTS, SETTINGS, "run-1")  # batch 1: post 11 goes, share 1's post_id nulled
    db.execute("UPDATE shares SET post_id = 3 WHERE id = 1")  # the app re-points it
    db.execute("UPDATE posts SET pinned_comment_id = NULL WHERE pinned_comment_id = 20")
    db.execute("UPDATE posts SET account_id = 12 WHERE id = 2")
    with db.connect() as conn:
        null_orphans(conn, POSTS, SETTINGS, "run-1")  # batch 2: post 2 goes with comment 20, comment_id nulled
    db.execute("INSERT INTO accounts VALUES (11, 'account 11'), (12, 'account 12')")
    result = restore(db, POSTS, "run-1", "restore-1")
    assert db.query("SELECT post_id, comment_id FROM shares WHERE id = 1") == [(3, 20)]
    assert result["pointers_written_since"] == 1, result


# --- triggers a restore would fire ------------------------------------------------------------------------------

TRIGGERS = """
CREATE TABLE comment_log (comment_id int, at timestamptz DEFAULT now());
CREATE FUNCTION stamp_comment() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN NEW.body := NEW.body || ' (edited)'; RETURN NEW; END $$;
CREATE TRIGGER stamp BEFORE INSERT ON comments FOR EACH ROW EXECUTE FUNCTION stamp_comment();
CREATE FUNCTION log_comment() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO comment_log (comment_id) VALUES (NEW.id); RETURN NEW; END $$;
CREATE TRIGGER logged AFTER INSERT ON comments FOR EACH ROW EXECUTE FUNCTION log_comment();
"""
STEP_ASIDE = """
CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF current_setting('fk_maintenance.restoring', true) = 'on' THEN RETURN NEW; END IF;
  {body}
END $$;
"""
TARGETS_YAML = """\
foreign_keys:
  - name: posts_account_fk
    table: posts
    column: account_id
    ref_table: accounts
    ref_column: id
    on_delete: CASCADE
    constraint: posts_account_id_fkey
    index: posts_account_id_idx
    audit_table: posts_orphan_audit
    orphans: delete
    conn_ids: [kpi_db]
"""


def test_triggers_a_restore_would_fire_are_refused_in_preflight_and_plan_naming_the_fix(db, tmp_path, capsys) -> None:
    from fk_maintenance.cli import commands as cli

    db.execute(SHOP + TRIGGERS)
    before = snapshot(db, POSTS), every_row(db, SHOP_TABLES)
    with db.connect() as conn, pytest.raises(PreflightFailed) as refused:
        preflight(conn, POSTS, SETTINGS)
    message = str(refused.value)
    assert (
        "public.comments: trigger logged on comments (AFTER INSERT, FOR EACH ROW); trigger stamp on comments "
        "(BEFORE INSERT, FOR EACH ROW) would fire on a restore's INSERT of a deleted row" in message
    ), message
    assert "current_setting('fk_maintenance.restoring', true) = 'on' THEN RETURN NEW" in message
    path = tmp_path / "targets.yaml"
    path.write_text(TARGETS_YAML)
    assert cli.main(["plan", "--dsn", db.dsn, "--targets", str(path)]) == cli.EXIT_REFUSED
    assert "would fire on a restore's INSERT of a deleted row" in capsys.readouterr().out
    assert (snapshot(db, POSTS), every_row(db, SHOP_TABLES)) == before
    # The app's triggers step aside while a restore writes: the run converges and the restore is exact.
    db.execute(STEP_ASIDE.format(name="stamp_comment", body="NEW.body := NEW.body || ' (edited)'; RETURN NEW;"))
    db.execute(
        STEP_ASIDE.format(name="log_comment", body="INSERT INTO comment_log (comment_id) VALUES (NEW.id); RETURN NEW;")
    )
    report = run_pipeline(db.connect, POSTS, SETTINGS, "run-1")["report"]
    assert report["final_state"] == "converged", report
    db.execute("INSERT INTO accounts VALUES (11, 'account 11'), (12, 'account 12')")
    # A trigger added since the delete that would not step aside: the restore refuses before any write.
    db.execute(
        "CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN NEW.label := 'touched'; RETURN NEW; "
        "END $$; CREATE TRIGGER touch BEFORE UPDATE ON pins FOR EACH ROW EXECUTE FUNCTION touch()"
    )
    held = every_row(db, SHOP_TABLES)
    with pytest.raises(InvalidSettings) as refused_restore:
        restore(db, POSTS, "run-1", "restore-0")
    assert "trigger touch on pins (BEFORE UPDATE, FOR EACH ROW) would fire on a restore's UPDATE of post_id" in str(
        refused_restore.value
    )
    assert every_row(db, SHOP_TABLES) == held
    db.execute("DROP TRIGGER touch ON pins")
    log_rows = db.scalar("SELECT count(*) FROM comment_log")
    result = restore(db, POSTS, "run-1", "restore-1")
    assert result["rows_failed"] == 0 and result["rows_parent_still_missing"] == 0, result
    assert_back_as_before(before[1], every_row(db, SHOP_TABLES))
    assert db.scalar("SELECT count(*) FROM comment_log") == log_rows
