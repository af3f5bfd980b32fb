"""What would keep a restore of an orphans: delete from putting rows back exactly as they were, known from the
catalog before anything is deleted (preflight, plan) and checked again before a restore writes.

A restore re-inserts deleted rows and updates the pointers the cascade changed. A trigger that INSERT (or that
UPDATE of those columns) fires would make the row differ from the archived one (a BEFORE trigger rewrites it) or
write elsewhere (an AFTER trigger, a rule: an audit row, a child that then collides with the archived one), so
such a shape is refused, naming the fix. Row-level security that applies to the role hides rows from the walk
while the database's own keys still act on them, so the archive would miss them: refused too.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

from fk_maintenance.db.sqlfiles import statement

# The setting a restore turns on in its own transactions (SET LOCAL): a trigger that reads it can step aside.
RESTORING_SETTING = "fk_maintenance.restoring"
STEP_ASIDE = (
    f"begin its function with IF current_setting('{RESTORING_SETTING}', true) = 'on' THEN RETURN NEW; END IF; "
    "(RETURN NULL in a statement trigger; a restore turns the setting on in its own transactions only)"
)


@dataclass(frozen=True)
class Touched:
    """A table whose rows a delete removes (``deleted``: a restore inserts them again) or whose ``changed``
    columns its keys null or reset (a restore updates them back)."""

    relid: int
    qualified: str
    deleted: bool
    changed: tuple[str, ...] = ()


def merge(tables: list[Touched]) -> list[Touched]:
    """One entry per table, what every key does to it together."""
    merged: dict[int, Touched] = {}
    for table in tables:
        seen = merged.get(table.relid)
        if seen is None:
            merged[table.relid] = table
            continue
        columns = seen.changed + tuple(c for c in table.changed if c not in seen.changed)
        merged[table.relid] = Touched(table.relid, table.qualified, seen.deleted or table.deleted, columns)
    return list(merged.values())


def blockers(conn: psycopg.Connection, table: Touched) -> list[str]:
    """The triggers and rules a restore's writes to ``table`` would fire."""
    rows = conn.execute(
        statement("cascade", "restore_blockers"),
        {"relid": table.relid, "inserts": table.deleted, "updates": list(table.changed)},
    ).fetchall()
    return [row[0] for row in rows]


def blocker_problems(conn: psycopg.Connection, tables: list[Touched], *, key: str) -> list[str]:
    """Each table whose triggers or rules would keep a restore from being exact, with the fix."""
    problems = []
    for table in merge(tables):
        found = blockers(conn, table)
        if not found:
            continue
        writes = " and ".join(
            part
            for part in (
                "INSERT of a deleted row" if table.deleted else "",
                f"UPDATE of {', '.join(table.changed)}" if table.changed else "",
            )
            if part
        )
        problems.append(
            f"{table.qualified}: {'; '.join(found)} would fire on a restore's {writes}, so a restored row would not "
            "be as it was (a BEFORE trigger rewrites it, an AFTER trigger or a rule writes elsewhere). Have each "
            f"step aside while a restore writes: {STEP_ASIDE}; or declare another orphans policy for {key}"
        )
    return problems


def inheritance_problems(conn: psycopg.Connection, tables: list[Touched], *, key: str) -> list[str]:
    """Each table with inheritance children (not partitions): their rows would come back in the parent."""
    problems = []
    for table in merge(tables):
        children = conn.execute(statement("cascade", "inheritance_children"), {"relid": table.relid}).fetchone()[0]
        if children:
            problems.append(
                f"{table.qualified} has inheritance children ({', '.join(children)}): the delete reads their rows "
                "through it, and a restore would put them back in it, without their own columns. Make them "
                f"partitions, or declare another orphans policy for {key}"
            )
    return problems


def row_security_problems(conn: psycopg.Connection, tables: list[tuple[int, str]], who: str, *, key: str) -> list[str]:
    """Each table whose row-level security applies to the role: the walk would miss rows the keys act on."""
    return [
        f"row-level security on {qualified} applies to role {who}: the walk would not see the rows it hides, which "
        "the database's own keys delete or change all the same (referential actions ignore it), so the archive "
        f"would miss them. Run as a role it does not apply to (the table's owner without FORCE ROW LEVEL SECURITY, "
        f"or ALTER ROLE {who} BYPASSRLS), or declare another orphans policy for {key}"
        for relid, qualified in tables
        if conn.execute(statement("cascade", "row_security"), {"relid": relid}).fetchone()[0]
    ]
