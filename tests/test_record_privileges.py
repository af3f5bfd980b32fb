"""Who may write the pipeline's record (issue 31): the audit, archive, nulling-transactions and restore-log tables
that restore trusts. On a real PostgreSQL, with a pipeline role that is not a superuser and an app role beside it:
the tables the pipeline creates refuse the app's INSERT, UPDATE, DELETE and TRUNCATE even where ALTER DEFAULT
PRIVILEGES would have given it everything (it keeps SELECT, the readers' way in); and every other way a role can
write them (a grant to it, to a column, to PUBLIC or to a group it belongs to, membership in the pipeline's role,
pg_write_all_data, owning a table or the schema, CREATE on the schema) is named by preflight's warning with the
statement that takes it away, which, run, leaves no warning. Superusers are never named. SQL-sensitive (role
membership options changed in PostgreSQL 16): the test command runs it on 18, 16 and 15.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest
from psycopg import errors as pgerrors

from devkit.pipeline import run_pipeline
from fk_maintenance.keys.settings import RunSettings
from fk_maintenance.keys.spec import ForeignKeySpec
from fk_maintenance.records.restore import restore_run
from fk_maintenance.steps.preflight import preflight

# accounts 1..8 exist; posts 1..40 point at accounts 1..10, so the posts of 9 and 10 are orphans, each with a
# comment the cascade takes along.
SCHEMA = """
CREATE TABLE accounts (id int PRIMARY KEY);
CREATE TABLE posts (id int PRIMARY KEY, account_id int NOT NULL, title text NOT NULL);
CREATE TABLE comments (id int PRIMARY KEY, post_id int NOT NULL REFERENCES posts ON DELETE CASCADE, body text);
INSERT INTO accounts SELECT generate_series(1, 8);
INSERT INTO posts SELECT g, 1 + g % 10, 'post ' || g FROM generate_series(1, 40) g;
INSERT INTO comments SELECT g, g, 'comment ' || g FROM generate_series(1, 40) g;
"""
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
SETTINGS = RunSettings(validate_now=True)
RECORD = (
    "fk_maintenance.posts_orphan_audit",
    "fk_maintenance.nulling_transactions",
    "fk_maintenance.restore_log",
    "fk_maintenance.posts_orphan_audit_archive",
)
REVOKE_WRITES = "INSERT, UPDATE, DELETE, TRUNCATE, TRIGGER"


@dataclass
class Roles:
    pipeline: str  # owns the app's tables, runs the pipeline
    app: str  # the app's role: reads and writes the app's tables
    other: str  # a spare role for a case to use
    root: str  # a superuser: can write anything, never named


@pytest.fixture
def roles(db) -> Iterator[Roles]:
    """Roles of this test only (roles are the server's, shared by every database), dropped with what they own."""
    suffix = uuid.uuid4().hex[:8]
    made = Roles(f"pipe_{suffix}", f"app_{suffix}", f"other_{suffix}", f"root_{suffix}")
    db.execute(
        f"CREATE ROLE {made.pipeline} LOGIN; CREATE ROLE {made.app} LOGIN; CREATE ROLE {made.other} NOLOGIN;"
        f"CREATE ROLE {made.root} LOGIN SUPERUSER;"
        + SCHEMA
        + f"ALTER TABLE accounts OWNER TO {made.pipeline}; ALTER TABLE posts OWNER TO {made.pipeline};"
        f"ALTER TABLE comments OWNER TO {made.pipeline}; GRANT CREATE ON DATABASE {db.name} TO {made.pipeline};"
        f"GRANT CREATE ON SCHEMA public TO {made.pipeline};"
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON accounts, posts, comments TO {made.app}"
    )
    yield made
    for role in (made.app, made.other, made.root, made.pipeline):
        db.execute(f"DROP OWNED BY {role} CASCADE")
    db.execute(f"DROP ROLE {made.app}, {made.other}, {made.root}, {made.pipeline}")


def _as(db, role: str) -> psycopg.Connection:
    return psycopg.connect(db.dsn, user=role, autocommit=True)


def _run_and_restore(db, roles: Roles) -> None:
    """A run that deletes the orphans (creating the audit, nulling-transactions and archive tables), then a restore
    of it (creating the restore log; no parent is back, so it puts nothing back)."""
    report = run_pipeline(lambda: _as(db, roles.pipeline), SPEC, SETTINGS, "run-1")["report"]
    assert report["final_state"] == "converged", report
    with _as(db, roles.pipeline) as conn:
        restore_run(conn, SPEC, SETTINGS, "run-1", "restore-1")
    assert db.scalar("SELECT count(*) FROM fk_maintenance.posts_orphan_audit_archive WHERE run_id = 'run-1'") == 16


def _warnings(db, roles: Roles) -> list[str]:
    """Preflight's warnings, as the pipeline's role sees them; preflight passes (it warns, never refuses)."""
    with _as(db, roles.pipeline) as conn:
        return preflight(conn, SPEC, SETTINGS)["warnings"]


def _record_counts(db) -> list[int]:
    return [db.scalar(f"SELECT count(*) FROM {table}") for table in RECORD]


@pytest.mark.parametrize("schema_made_by", ["pipeline", "dba"])
def test_the_app_role_cannot_write_the_record_the_pipeline_created_even_where_default_privileges_gave_it_all(
    db, roles, schema_made_by
) -> None:
    if schema_made_by == "dba":
        # A DBA made the schema for the pipeline and set defaults that give the app everything in it.
        db.execute(
            f"CREATE SCHEMA fk_maintenance AUTHORIZATION {roles.pipeline};"
            f"GRANT USAGE ON SCHEMA fk_maintenance TO {roles.app};"
            f"ALTER DEFAULT PRIVILEGES FOR ROLE {roles.pipeline} IN SCHEMA fk_maintenance "
            f"GRANT ALL ON TABLES TO {roles.app}"
        )
        default = f"ALTER DEFAULT PRIVILEGES FOR ROLE {roles.pipeline} IN SCHEMA fk_maintenance REVOKE"
    else:
        # The pipeline makes its schema; the role's defaults, for every schema, give the app everything.
        db.execute(
            f"ALTER DEFAULT PRIVILEGES FOR ROLE {roles.pipeline} GRANT ALL ON TABLES TO {roles.app};"
            f"ALTER DEFAULT PRIVILEGES FOR ROLE {roles.pipeline} GRANT ALL ON SCHEMAS TO {roles.app}"
        )
        default = f"ALTER DEFAULT PRIVILEGES FOR ROLE {roles.pipeline} REVOKE"
    _run_and_restore(db, roles)
    before = _record_counts(db)
    # The run's batches and archived rows (a delete audits no nulled pointer; the restore put nothing back).
    assert before[1] and before[3] == 16

    with _as(db, roles.app) as app:
        for table in RECORD:
            app.execute(f"SELECT count(*) FROM {table}")  # readers keep SELECT
            for write in (
                f"INSERT INTO {table} DEFAULT VALUES",
                f"UPDATE {table} SET run_id = 'forged'",
                f"DELETE FROM {table}",
                f"TRUNCATE {table}",
            ):
                with pytest.raises(pgerrors.InsufficientPrivilege):
                    app.execute(write)
        if schema_made_by == "pipeline":  # nor plant a table where a record table will be made
            with pytest.raises(pgerrors.InsufficientPrivilege):
                app.execute("CREATE TABLE fk_maintenance.other_key_archive (x int)")
    assert _record_counts(db) == before

    # What would still apply to a table made by hand is named, with the statement that takes it away.
    in_schema = " IN SCHEMA fk_maintenance" if schema_made_by == "dba" else ""
    warnings = _warnings(db, roles)
    assert warnings == [
        f"ALTER DEFAULT PRIVILEGES of role {roles.pipeline}{in_schema} give {roles.app} DELETE, INSERT, TRIGGER, "
        f"TRUNCATE, UPDATE on every table {roles.pipeline} creates: the pipeline revokes them from each record table "
        f"it creates, but a table made by hand would keep them: {default} {REVOKE_WRITES} ON TABLES FROM {roles.app}"
    ], warnings


def _public(r: Roles) -> str:
    return (
        f"GRANT DELETE ON fk_maintenance.restore_log TO PUBLIC; GRANT INSERT ON fk_maintenance.restore_log TO {r.root}"
    )


# How a role gets to write the record: the grant (run as a superuser after the pipeline's run), and what preflight's
# warnings say (each also names the statement that takes it away, run below).
WAYS = {
    "a grant to the role": (
        lambda r: f"GRANT INSERT, UPDATE ON fk_maintenance.posts_orphan_audit_archive TO {r.app}",
        lambda r: [
            f"role {r.app} can write the pipeline's record fk_maintenance.posts_orphan_audit_archive (INSERT, UPDATE "
            f"granted to it): REVOKE {REVOKE_WRITES} ON fk_maintenance.posts_orphan_audit_archive FROM {r.app}"
        ],
    ),
    "a grant on a column": (
        lambda r: f"GRANT UPDATE (row_data) ON fk_maintenance.posts_orphan_audit_archive TO {r.app}",
        lambda r: [
            f"role {r.app} can write the pipeline's record fk_maintenance.posts_orphan_audit_archive (UPDATE granted "
            f"to it): REVOKE {REVOKE_WRITES} ON fk_maintenance.posts_orphan_audit_archive FROM {r.app}"
        ],
    ),
    "a grant to PUBLIC": (
        _public,
        lambda r: [
            "every role (PUBLIC) can write the pipeline's record fk_maintenance.restore_log (DELETE granted to "
            f"PUBLIC): REVOKE {REVOKE_WRITES} ON fk_maintenance.restore_log FROM PUBLIC"
        ],
    ),
    "a grant to a group the role is in": (
        lambda r: f"GRANT INSERT ON fk_maintenance.nulling_transactions TO {r.other}; GRANT {r.other} TO {r.app}",
        lambda r: [
            f"role {r.app} can write the pipeline's record fk_maintenance.nulling_transactions as a member of "
            f"{r.other}, which holds INSERT on it: REVOKE {r.other} FROM {r.app} (or REVOKE {REVOKE_WRITES} ON "
            f"fk_maintenance.nulling_transactions FROM {r.other})",
            f"role {r.other} can write the pipeline's record fk_maintenance.nulling_transactions (INSERT granted to "
            f"it): REVOKE {REVOKE_WRITES} ON fk_maintenance.nulling_transactions FROM {r.other}",
        ],
    ),
    "membership in the pipeline's role": (
        lambda r: f"GRANT {r.pipeline} TO {r.app}",
        lambda r: [
            f"role {r.app} can write the pipeline's record {', '.join(sorted(RECORD))} as a member of {r.pipeline}, "
            f"which owns it: REVOKE {r.pipeline} FROM {r.app}",
            f"role {r.app} can drop and replace the pipeline's record in schema fk_maintenance as a member of "
            f"{r.pipeline}, which owns it: REVOKE {r.pipeline} FROM {r.app}",
        ],
    ),
    "pg_write_all_data": (
        lambda r: f"GRANT pg_write_all_data TO {r.app}",
        lambda r: [
            f"role {r.app} can write every table, the pipeline's record {', '.join(sorted(RECORD))} included, as a "
            f"member of pg_write_all_data: REVOKE pg_write_all_data FROM {r.app}"
        ],
    ),
    "owning a table": (
        lambda r: (
            f"ALTER TABLE fk_maintenance.restore_log OWNER TO {r.app};"
            f"GRANT SELECT, INSERT ON fk_maintenance.restore_log TO {r.pipeline}"
        ),
        lambda r: [
            f"role {r.app} owns the pipeline's record fk_maintenance.restore_log, so it can write it: "
            f"ALTER TABLE fk_maintenance.restore_log OWNER TO {r.pipeline}"
        ],
    ),
    # A NOLOGIN group the pipeline acts through (a DBA's owner role) is the pipeline's own; its other members not.
    "a group that owns a table, with the pipeline in it": (
        lambda r: (
            f"GRANT {r.other} TO {r.pipeline}; GRANT {r.other} TO {r.app};"
            f"ALTER TABLE fk_maintenance.restore_log OWNER TO {r.other}"
        ),
        lambda r: [
            f"role {r.app} can write the pipeline's record fk_maintenance.restore_log as a member of {r.other}, "
            f"which owns it: REVOKE {r.other} FROM {r.app}"
        ],
    ),
    "owning the schema": (
        lambda r: (
            f"ALTER SCHEMA fk_maintenance OWNER TO {r.app}; GRANT USAGE, CREATE ON SCHEMA fk_maintenance "
            f"TO {r.pipeline}"
        ),
        lambda r: [
            f"role {r.app} owns schema fk_maintenance, so it can drop and replace the pipeline's record there: "
            f"ALTER SCHEMA fk_maintenance OWNER TO {r.pipeline}"
        ],
    ),
    "CREATE on the schema": (
        lambda r: f"GRANT CREATE ON SCHEMA fk_maintenance TO {r.app}",
        lambda r: [
            f"role {r.app} can create tables in schema fk_maintenance, and one made under the name of a record table "
            "the pipeline has not created yet would be taken as the pipeline's own: "
            f"REVOKE CREATE ON SCHEMA fk_maintenance FROM {r.app}"
        ],
    ),
}


def _fix(warning: str) -> str:
    """The statement a warning names: after its last ': ', without an alternative in parentheses."""
    return re.sub(r" \(or [^)]*\)$", "", warning.rsplit(": ", 1)[1])


@pytest.mark.parametrize("way", list(WAYS))
def test_a_role_that_can_write_the_record_is_named_by_preflight_with_the_statement_that_takes_it_away(
    db, roles, way
) -> None:
    give, named = WAYS[way]
    _run_and_restore(db, roles)
    assert _warnings(db, roles) == []  # as the pipeline made it: nobody else writes
    # A superuser's own grants are never named: superusers can write anything anyway.
    db.execute(give(roles) + f"; GRANT INSERT ON fk_maintenance.posts_orphan_audit TO {roles.root}")
    warnings = _warnings(db, roles)
    assert sorted(warnings) == sorted(named(roles)), warnings
    assert not any(roles.root in warning for warning in warnings)

    for warning in warnings:
        db.execute(_fix(warning))
    assert _warnings(db, roles) == []
