"""The goal-tracking app's ``vision_kpis`` table and a generator of 5-level KPI hierarchies.

The generator runs inside PostgreSQL (generate_series), so a million rows take seconds. Ids are derived
from a seed, so the same arguments give the same data. Each level has four children per parent
(yearly -> quarterly -> monthly -> weekly -> daily); about ``orphan_ratio`` of the non-root rows point at
parents that do not exist, several orphans sharing each missing parent.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import psycopg
from psycopg import sql

LEVELS = ("yearly", "quarterly", "monthly", "weekly", "daily")
FAN_OUT = 4
ORPHANS_PER_MISSING_PARENT = 3


def create_app_table(conn: psycopg.Connection, *, schema: str = "public", table: str = "vision_kpis") -> None:
    """The app's table as its Drizzle schema declares it, before this pipeline: no FK on parent_kpi_id."""
    t = sql.Identifier(schema, table)
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
    conn.execute(
        sql.SQL(
            """
            CREATE TABLE {t} (
                id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
                user_id       uuid NOT NULL,
                vision_id     uuid NOT NULL,
                level         text NOT NULL CHECK (level IN ('yearly', 'quarterly', 'monthly', 'weekly', 'daily')),
                title         text NOT NULL,
                parent_kpi_id uuid,
                created_at    timestamptz NOT NULL DEFAULT now(),
                updated_at    timestamptz NOT NULL DEFAULT now()
            )
            """
        ).format(t=t)
    )


def create_app_indexes(conn: psycopg.Connection, *, schema: str = "public", table: str = "vision_kpis") -> None:
    t = sql.Identifier(schema, table)
    conn.execute(
        sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (user_id, vision_id)").format(
            sql.Identifier(f"{table}_user_vision_idx"), t
        )
    )
    conn.execute(
        sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (vision_id, level)").format(
            sql.Identifier(f"{table}_level_idx"), t
        )
    )


@dataclass(frozen=True)
class Generated:
    rows: int
    orphans: int
    missing_parents: int
    seconds: float


def populate(
    conn: psycopg.Connection,
    rows: int,
    *,
    orphan_ratio: float = 0.01,
    seed: int = 1,
    schema: str = "public",
    table: str = "vision_kpis",
    users: int = 1000,
) -> Generated:
    """Insert ``rows`` KPIs as complete 5-level trees (the last trees may be partial)."""
    if rows < 0 or not 0 <= orphan_ratio <= 1:
        raise ValueError("rows must be >= 0 and orphan_ratio between 0 and 1")
    started = time.monotonic()
    t = sql.Identifier(schema, table)
    per_tree = sum(FAN_OUT**level for level in range(len(LEVELS)))
    trees = max(1, -(-rows // per_tree))
    expected_orphans = round(rows * orphan_ratio)
    ghost_pool = max(1, expected_orphans // ORPHANS_PER_MISSING_PARENT)
    # Per-million threshold, scaled so the ratio holds over all rows although roots cannot be orphans.
    non_roots = max(1, rows - trees)
    orphan_ppm = min(1_000_000, round(orphan_ratio * rows / non_roots * 1_000_000))
    insert = sql.SQL(
        """
        INSERT INTO {t} (id, user_id, vision_id, level, title, parent_kpi_id, created_at, updated_at)
        SELECT md5(%(seed)s::text || ':' || (%(offset)s + p))::uuid,
               md5('user:' || ((p / %(per_root)s) %% %(users)s))::uuid,
               md5('vision:' || %(seed)s::text || ':' || (p / %(per_root)s))::uuid,
               %(level)s,
               initcap(%(level)s) || ' KPI ' || p,
               CASE
                 WHEN %(depth)s = 0 THEN NULL
                 WHEN abs(hashint8(%(offset)s + p + %(seed)s)) %% 1000000 < %(orphan_ppm)s
                   THEN md5('ghost:' || %(seed)s::text || ':' || ((%(offset)s + p) %% %(ghost_pool)s))::uuid
                 ELSE md5(%(seed)s::text || ':' || (%(parent_offset)s + p / %(fan_out)s))::uuid
               END,
               now() - make_interval(days => ((%(offset)s + p) %% 365)::int),
               now()
        FROM generate_series(0, %(count)s - 1) AS p
        """
    ).format(t=t)
    offset = 0
    parent_offset = 0
    remaining = rows
    for depth, level in enumerate(LEVELS):
        count = min(trees * FAN_OUT**depth, remaining)
        if count <= 0:
            break
        conn.execute(
            insert,
            {
                "seed": seed,
                "offset": offset,
                "parent_offset": parent_offset,
                "per_root": FAN_OUT**depth,
                "users": users,
                "level": level,
                "depth": depth,
                "orphan_ppm": orphan_ppm,
                "ghost_pool": ghost_pool,
                "fan_out": FAN_OUT,
                "count": count,
            },
        )
        parent_offset = offset
        offset += count
        remaining -= count
    orphans, missing = conn.execute(
        sql.SQL(
            """
            SELECT count(*), count(DISTINCT c.parent_kpi_id) FROM {t} c
            WHERE c.parent_kpi_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM {t} p WHERE p.id = c.parent_kpi_id)
            """
        ).format(t=t)
    ).fetchone()
    return Generated(rows=offset, orphans=orphans, missing_parents=missing, seconds=time.monotonic() - started)


def build_app_database(
    conn: psycopg.Connection,
    rows: int,
    *,
    orphan_ratio: float = 0.01,
    seed: int = 1,
    schema: str = "public",
    table: str = "vision_kpis",
) -> Generated:
    """Table, data, the app's two indexes, fresh statistics: what the pipeline meets in production."""
    conn.autocommit = True
    create_app_table(conn, schema=schema, table=table)
    generated = populate(conn, rows, orphan_ratio=orphan_ratio, seed=seed, schema=schema, table=table)
    create_app_indexes(conn, schema=schema, table=table)
    conn.execute(sql.SQL("VACUUM ANALYZE {}").format(sql.Identifier(schema, table)))
    return generated
