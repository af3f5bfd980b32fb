"""Who may write the pipeline's record: the audit, archive, nulling-transactions and restore-log tables in its own
schema. Restore trusts them (it writes back what they say was there), so a role that can change their rows can
make a restore write values nobody deleted, or hide what a run did.

Two halves: every table (and the schema) the pipeline creates is stripped, in the transaction that creates it, of
the write privileges ALTER DEFAULT PRIVILEGES gave other roles (SELECT is kept: it is how readers are granted);
and preflight warns, without refusing, about every role that can write them anyway, each with the statement that
takes the right away. Existing grants are never revoked by the pipeline: a DBA made them, and the warning says
how. Superusers can write anything and are never named (docs/security.md).
"""

from __future__ import annotations

import logging
from collections import defaultdict

import psycopg
from psycopg import sql

from fk_maintenance.db.catalog import as_written
from fk_maintenance.db.sqlfiles import statement
from fk_maintenance.keys.spec import ForeignKeySpec

log = logging.getLogger(__name__)

# What changes a table's rows. TRIGGER too: a trigger someone else adds to our table runs inside our transaction
# and can rewrite the rows we insert.
WRITES = ("INSERT", "UPDATE", "DELETE", "TRUNCATE", "TRIGGER")
REVOKE_WRITES = ", ".join(WRITES)


def record_tables(spec: ForeignKeySpec) -> tuple[str, ...]:
    """The pipeline's tables a key's runs and restores write, in its audit schema (the archive only exists for
    orphans: delete, and is looked at wherever it exists: restore reads it)."""
    return tuple(
        dict.fromkeys((spec.audit_table, spec.nulling_transactions_table, spec.restore_log_table, spec.archive_table))
    )


def _acts(conn: psycopg.Connection) -> str:
    """pg_has_role's privileges for "can act as": inherit the role's rights or SET ROLE to it. PostgreSQL 16 split
    membership into INHERIT and SET options (a member may have neither); before it, a member could always SET ROLE."""
    return "USAGE, SET" if conn.info.server_version >= 160000 else "MEMBER"


def _grantees(names: list[str]) -> sql.Composable:
    return sql.SQL(", ").join([sql.SQL("PUBLIC"), *(sql.Identifier(name) for name in names)])


def lock_down_table(conn: psycopg.Connection, schema: str, table: str) -> None:
    """In the transaction that created (or moved in) ``schema.table``: no role but its owner may write it. The
    grants ALTER DEFAULT PRIVILEGES made at CREATE are revoked (and logged); SELECT stays."""
    (relid,) = conn.execute(statement("privileges", "record_tables"), {"schema": schema, "tables": [table]}).fetchone()
    grantees = [
        row[0]
        for row in conn.execute(statement("privileges", "write_grantees"), {"relid": relid, "writes": list(WRITES)})
    ]
    # PUBLIC always: a table's built-in default gives PUBLIC nothing, but a global default ACL may.
    conn.execute(
        statement("privileges", "revoke_writes", table=sql.Identifier(schema, table), grantees=_grantees(grantees))
    )
    if grantees:
        log.warning(
            "record: default privileges gave %s write rights on %s.%s as it was created; revoked (only the "
            "pipeline's role writes its record; SELECT is kept)",
            ", ".join(grantees),
            schema,
            table,
        )


def lock_down_schema(conn: psycopg.Connection, schema: str) -> None:
    """In the transaction that created the pipeline's schema: no role but its owner may create in it (a table
    made there under a name the pipeline has not used yet would be taken as the pipeline's own)."""
    grantees = [row[0] for row in conn.execute(statement("privileges", "create_grantees"), {"schema": schema})]
    conn.execute(statement("privileges", "revoke_create", schema=sql.Identifier(schema), grantees=_grantees(grantees)))
    if grantees:
        log.warning("record: CREATE on schema %s given to %s as it was created; revoked", schema, ", ".join(grantees))


def record_writer_warnings(conn: psycopg.Connection, spec: ForeignKeySpec) -> list[str]:
    """For preflight: every role other than the pipeline's own (and superusers) that can write the pipeline's
    record tables, change its schema, or would be given write rights on the tables it creates, each with the
    statement that takes the right away."""
    who, schema = as_written(conn, conn.info.user, spec.audit_schema)
    relids = [
        row[0]
        for row in conn.execute(
            statement("privileges", "record_tables"), {"schema": spec.audit_schema, "tables": list(record_tables(spec))}
        )
    ]
    acts = _acts(conn)
    warnings = _table_warnings(conn, who, relids, acts) if relids else []
    warnings += _schema_warnings(conn, who, schema, spec.audit_schema, acts)
    warnings += _default_privilege_warnings(conn, who, schema, spec.audit_schema)
    return warnings


def _quoted(conn: psycopg.Connection, name: str | None) -> str:
    """A role as SQL needs it written; None is PUBLIC (a role may be named "PUBLIC", quoted)."""
    return "PUBLIC" if name is None else as_written(conn, name)[0]


def _membership_fix(conn: psycopg.Connection, holder: str, role: str, direct: bool) -> str:
    holder, role = as_written(conn, holder, role)
    if direct:
        return f"REVOKE {holder} FROM {role}"
    return f"revoke the membership through which {role} belongs to {holder} (it is a member through other roles)"


def _table_warnings(conn: psycopg.Connection, who: str, relids: list[int], acts: str) -> list[str]:
    rows = conn.execute(
        statement("privileges", "table_writers"), {"relids": relids, "writes": list(WRITES), "acts": acts}
    ).fetchall()
    # One warning per role and way, over every table it applies to: a grant to app on three tables is one REVOKE.
    by_way: dict[tuple[str, str | None, str | None, bool], dict[str, list[str] | None]] = defaultdict(dict)
    for table, how, holder, role, privileges, direct in rows:
        by_way[(how, holder, role, direct)][table] = privileges
    warnings = []
    for (how, holder, role, direct), tables in by_way.items():
        names = ", ".join(tables)
        quoted = _quoted(conn, role)
        held = ", ".join(sorted({p for privileges in tables.values() for p in privileges or ()}))
        if how == "public":
            warnings.append(
                f"every role (PUBLIC) can write the pipeline's record {names} ({held} granted to PUBLIC): "
                f"REVOKE {REVOKE_WRITES} ON {names} FROM PUBLIC"
            )
        elif how == "granted" and role == holder:
            warnings.append(
                f"role {quoted} can write the pipeline's record {names} ({held} granted to it): "
                f"REVOKE {REVOKE_WRITES} ON {names} FROM {quoted}"
            )
        elif how == "granted":
            warnings.append(
                f"role {quoted} can write the pipeline's record {names} as a member of {_quoted(conn, holder)}, "
                f"which holds {held} on it: {_membership_fix(conn, holder, role, direct)} (or REVOKE {REVOKE_WRITES} "
                f"ON {names} FROM {_quoted(conn, holder)})"
            )
        elif how == "owner" and role == holder:
            warnings.append(
                f"role {quoted} owns the pipeline's record {names}, so it can write it: "
                + "; ".join(f"ALTER TABLE {table} OWNER TO {who}" for table in tables)
            )
        elif how == "owner":
            warnings.append(
                f"role {quoted} can write the pipeline's record {names} as a member of {_quoted(conn, holder)}, "
                f"which owns it: {_membership_fix(conn, holder, role, direct)}"
            )
        else:  # predefined: pg_write_all_data
            warnings.append(
                f"role {quoted} can write every table, the pipeline's record {names} included, as a member of "
                f"{holder}: {_membership_fix(conn, holder, role, direct)}"
            )
    return warnings


def _schema_warnings(conn: psycopg.Connection, who: str, schema: str, name: str, acts: str) -> list[str]:
    warnings = []
    for how, holder, role, direct in conn.execute(
        statement("privileges", "schema_writers"), {"schema": name, "acts": acts}
    ):
        quoted = _quoted(conn, role)
        if how == "owner" and role == holder:
            warnings.append(
                f"role {quoted} owns schema {schema}, so it can drop and replace the pipeline's record there: "
                f"ALTER SCHEMA {schema} OWNER TO {who}"
            )
        elif how == "owner":
            warnings.append(
                f"role {quoted} can drop and replace the pipeline's record in schema {schema} as a member of "
                f"{_quoted(conn, holder)}, which owns it: {_membership_fix(conn, holder, role, direct)}"
            )
        else:
            # A table of a name the pipeline has not created yet (another key's archive, the restore log), made
            # first by this role, would be used as the pipeline's own, with its maker as owner.
            fix = (
                f"REVOKE CREATE ON SCHEMA {schema} FROM {quoted}"
                if role == holder
                else _membership_fix(conn, holder, role, direct)
            )
            member = "" if role == holder else f" as a member of {_quoted(conn, holder)}"
            subject = "every role (PUBLIC)" if how == "public" else f"role {quoted}"
            warnings.append(
                f"{subject} can create tables in schema {schema}{member}, and one made under the name of a record "
                f"table the pipeline has not created yet would be taken as the pipeline's own: {fix}"
            )
    return warnings


def _default_privilege_warnings(conn: psycopg.Connection, who: str, schema: str, name: str) -> list[str]:
    warnings = []
    for in_schema, grantee, privileges in conn.execute(
        statement("privileges", "default_writes"), {"schema": name, "writes": list(WRITES)}
    ):
        quoted = _quoted(conn, grantee)
        where = f" IN SCHEMA {schema}" if in_schema else ""
        warnings.append(
            f"ALTER DEFAULT PRIVILEGES of role {who}{where} give {quoted} {', '.join(privileges)} on every table "
            f"{who} creates: the pipeline revokes them from each record table it creates, but a table made by hand "
            f"would keep them: ALTER DEFAULT PRIVILEGES FOR ROLE {who}{where} REVOKE {REVOKE_WRITES} ON TABLES "
            f"FROM {quoted}"
        )
    return warnings
