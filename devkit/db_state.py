"""What a test or benchmark reads back from the target to prove what a run did, or that it changed nothing."""

from __future__ import annotations

import threading
import time
from typing import Any, Protocol

import psycopg
from psycopg import sql

from fk_maintenance.keys.spec import ForeignKeySpec


class Connects(Protocol):
    def connect(self) -> psycopg.Connection: ...


# The table and, when it is partitioned, each of its partitions: a step that changed only a partition changed it.
TREE = "SELECT relid FROM pg_partition_tree(to_regclass(%(t)s)) UNION SELECT to_regclass(%(t)s)"


def snapshot(db: Connects, spec: ForeignKeySpec) -> dict[str, Any]:
    """Catalog and data of the target (its partitions' catalog too), to prove a step changed nothing."""
    table = sql.Identifier(spec.schema, spec.table)
    with db.connect() as conn:
        catalog = conn.execute(
            """
            SELECT coalesce(array_agg(conrelid::regclass::text || ' ' || conname || ' ' || pg_get_constraintdef(oid)
                                      || ' ' || convalidated ORDER BY conrelid::regclass::text, conname), '{}')
            FROM pg_constraint WHERE conrelid IN ("""
            + TREE
            + """)
            """,
            {"t": table.as_string(conn)},
        ).fetchone()[0]
        indexes = conn.execute(
            """
            SELECT coalesce(array_agg(pg_get_indexdef(indexrelid) || ' ' || indisvalid
                                      ORDER BY indexrelid::regclass::text), '{}')
            FROM pg_index WHERE indrelid IN ("""
            + TREE
            + """)
            """,
            {"t": table.as_string(conn)},
        ).fetchone()[0]
        audit = conn.execute(
            "SELECT to_regclass(%s) IS NOT NULL", [sql.Identifier(spec.audit_schema, spec.audit_table).as_string(conn)]
        ).fetchone()[0]
        data = conn.execute(
            sql.SQL(
                "SELECT count(*), md5(coalesce(string_agg(t::text, '|' ORDER BY ROW({key})::text), '')) FROM {t} t"
            ).format(t=table, key=sql.SQL(", ").join(sql.Identifier("t", name) for name in spec.row_key))
        ).fetchone()
    return {"constraints": catalog, "indexes": indexes, "audit_table": audit, "data": data}


def orphan_count(db: Connects, spec: ForeignKeySpec) -> int:
    with db.connect() as conn:
        # Written here on its own (not the library's fragments), so a test's oracle does not share the library's
        # mistakes: MATCH SIMPLE, a row with any NULL in the key is not checked.
        return conn.execute(
            sql.SQL(
                "SELECT count(*) FROM {t} c WHERE {complete} AND NOT EXISTS (SELECT 1 FROM {r} p WHERE {match})"
            ).format(
                t=sql.Identifier(spec.schema, spec.table),
                r=sql.Identifier(spec.ref_schema, spec.ref_table),
                complete=sql.SQL(" AND ").join(
                    sql.SQL("c.{} IS NOT NULL").format(sql.Identifier(c)) for c in spec.columns
                ),
                match=sql.SQL(" AND ").join(
                    sql.SQL("p.{} = c.{}").format(sql.Identifier(r), sql.Identifier(c)) for c, r in spec.pairs
                ),
            )
        ).fetchone()[0]


def revive_parent(db: Connects, kpi_id: object) -> None:
    """The app re-creates a missing parent with its old id (as a restore from backup would)."""
    with db.connect() as conn:
        conn.execute(
            "INSERT INTO vision_kpis (id, user_id, vision_id, level, title) "
            "VALUES (%s, gen_random_uuid(), gen_random_uuid(), 'yearly', 'revived')",
            [kpi_id],
        )


class SessionWatch:
    """Samples pg_stat_activity every 50 ms: which of ``databases`` have a session of the pipeline at the same moment
    (its sessions carry application_name kpi-fk-maintenance:<step>)."""

    def __init__(self, dsn: str, databases: list[str]) -> None:
        self.dsn, self.databases = dsn, databases
        self.samples: list[frozenset[str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self._stop.is_set():
                rows = conn.execute(
                    "SELECT DISTINCT datname FROM pg_stat_activity "
                    "WHERE application_name LIKE 'kpi-fk-maintenance%%' AND datname = ANY(%s)",
                    [self.databases],
                ).fetchall()
                self.samples.append(frozenset(row[0] for row in rows))
                time.sleep(0.05)

    def __enter__(self) -> SessionWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
