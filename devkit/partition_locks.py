"""Measures what each statement of the partitioned-key path locks, per PostgreSQL major (issue 18).

For each major (15, 16, 18) a fresh cluster (devkit.cluster) gets a schema with a range-partitioned child table
(3 partitions and a DEFAULT one, a composite primary key holding the partition key, a nullable pointer column),
a plain referenced table and a partitioned one. Each statement of the path runs in an explicit transaction and,
before it ends, the transaction's relation locks are read from pg_locks in the same session (so relations it
created are named). A statement that fails has released its locks by the time it returns (the server aborts the
transaction at the error, the block only waits for ROLLBACK), so for those only the error is recorded.
CREATE INDEX CONCURRENTLY cannot run in a transaction: a second session samples its locks while a third holds an
uncommitted insert into the partition, which keeps the build waiting in its first phase.

Whether a statement scanned is proved, not guessed: before the parent's key is added (or validated), an orphan
row is put into an already-validated partition with session_replication_role = replica (which skips the RI
triggers). A statement that succeeds despite the orphan did not scan that partition.

    PYTHONPATH=plugins:. .venv/bin/python -m devkit.partition_locks [15 16 18]

Prints the tables and writes devkit/partition_locks.md; the hand-written analysis between its two markers is kept.
"""

from __future__ import annotations

import datetime as dt
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql

from devkit.cluster import Cluster

SCHEMA = "app"
MAJORS = (15, 16, 18)
ROWS = 400_000  # per partitioned child table: about 100k rows per partition
CUSTOMERS = 50_000
OUT = Path(__file__).with_suffix(".md")
ANALYSIS = "<!-- analysis: written by hand, kept when the script rewrites the tables -->"
ANALYSIS_END = "<!-- end of analysis -->"
MODES = {
    "AccessShareLock": "ACCESS SHARE",
    "RowShareLock": "ROW SHARE",
    "RowExclusiveLock": "ROW EXCLUSIVE",
    "ShareUpdateExclusiveLock": "SHARE UPDATE EXCLUSIVE",
    "ShareLock": "SHARE",
    "ShareRowExclusiveLock": "SHARE ROW EXCLUSIVE",
    "ExclusiveLock": "EXCLUSIVE",
    "AccessExclusiveLock": "ACCESS EXCLUSIVE",
}
RANGES = [
    ("2024", "2024-01-01", "2025-01-01"),
    ("2025", "2025-01-01", "2026-01-01"),
    ("2026", "2026-01-01", "2027-01-01"),
]

# A transaction's relation locks in this database, user relations only (catalog locks left out).
LOCKS = """
SELECT coalesce(c.relname, 'oid ' || l.relation::text) AS rel, l.mode, l.granted
FROM pg_locks l
LEFT JOIN pg_class c ON c.oid = l.relation
LEFT JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE l.pid = {pid} AND l.locktype = 'relation'
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND coalesce(n.nspname, '?') NOT IN ('pg_catalog', 'pg_toast', 'information_schema')
ORDER BY 1, 2
"""
LOCKS_SELF = LOCKS.format(pid="pg_backend_pid()")
LOCKS_OF = LOCKS.format(pid="%s")


@dataclass
class Result:
    case: str
    label: str
    text: str
    locks: list[tuple[str, str, bool]]
    outcome: str
    ms: float | None
    notes: list[str] = field(default_factory=list)


def ident(*names: str) -> sql.Identifier:
    return sql.Identifier(*names)


def fk_state(conn: psycopg.Connection, table: str) -> list[str]:
    """Every foreign key on the table and its partitions: where it points, validated, inherited from a parent."""
    rows = conn.execute(
        """
        SELECT c.conrelid::regclass::text, c.conname, c.confrelid::regclass::text, c.convalidated,
               c.conparentid <> 0
        FROM pg_constraint c
        WHERE c.contype = 'f' AND c.conrelid IN (SELECT relid FROM pg_partition_tree(%s::regclass))
        ORDER BY 1, 2
        """,
        [table],
    ).fetchall()
    return [
        f"{rel}.{name}→{ref} {'VALID' if valid else 'NOT VALID'}{' (inherited)' if inh else ''}"
        for rel, name, ref, valid, inh in rows
    ] or [f"no foreign key on {table} or its partitions"]


def ref_triggers(conn: psycopg.Connection, ref: str) -> list[str]:
    """The RI triggers on the referenced table and its partitions: a key adopted by its parent drops its own."""
    count = conn.execute(
        "SELECT count(*) FROM pg_trigger WHERE tgisinternal"
        " AND tgrelid IN (SELECT %s::regclass UNION SELECT relid FROM pg_partition_tree(%s))",
        [ref, ref],
    ).fetchone()[0]
    return [f"{count} internal (RI) triggers on {ref} and its partitions"]


def index_state(conn: psycopg.Connection, index: str) -> list[str]:
    row = conn.execute(
        """
        SELECT i.indisvalid, (SELECT count(*) FROM pg_inherits WHERE inhparent = i.indexrelid)
        FROM pg_index i WHERE i.indexrelid = to_regclass(%s)
        """,
        [index],
    ).fetchone()
    return [f"{index}: {'valid' if row[0] else 'INVALID'}, {row[1]} partition indexes attached"] if row else []


def what_it_got(conn: psycopg.Connection, table: str) -> list[str]:
    """What a partition just created or attached has: indexes (attached to the parent's?), keys, RI triggers."""
    notes = []
    for name, valid, attached in conn.execute(
        """
        SELECT i.indexrelid::regclass::text, i.indisvalid,
               EXISTS (SELECT 1 FROM pg_inherits WHERE inhrelid = i.indexrelid)
        FROM pg_index i WHERE i.indrelid = %s::regclass ORDER BY 1
        """,
        [table],
    ).fetchall():
        notes.append(
            f"index {name} {'valid' if valid else 'INVALID'}{', attached to parent index' if attached else ''}"
        )
    for rel, name, ref, valid in conn.execute(
        """
        SELECT conrelid::regclass::text, conname, confrelid::regclass::text, convalidated FROM pg_constraint
        WHERE contype = 'f' AND (conrelid = %s::regclass OR confrelid = %s::regclass) ORDER BY 1, 2
        """,
        [table, table],
    ).fetchall():
        notes.append(f"key {rel}.{name}→{ref} {'VALID' if valid else 'NOT VALID'}")
    triggers = conn.execute(
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = %s::regclass AND tgisinternal", [table]
    ).fetchone()[0]
    notes.append(f"{triggers} internal (RI) triggers on {table}")
    return notes


class Probe:
    def __init__(self, cluster: Cluster, dbname: str) -> None:
        self.dsn = cluster.dsn(dbname, options=f"-csearch_path={SCHEMA}")
        self.conn = psycopg.connect(self.dsn, autocommit=True)
        self.mon = psycopg.connect(self.dsn, autocommit=True)
        self.pid = self.conn.info.backend_pid
        self.results: list[Result] = []
        self.conn.execute("SET statement_timeout = '120s'")

    def close(self) -> None:
        self.conn.close()
        self.mon.close()

    def run(self, sqltext: sql.Composable | str) -> None:
        self.conn.execute(sqltext)

    def in_tx(
        self,
        case: str,
        label: str,
        stmt: sql.Composable,
        *,
        commit: bool = True,
        after: Callable[[psycopg.Connection], list[str]] | None = None,
    ) -> bool:
        """Runs stmt in an explicit transaction, reads its relation locks before the end, then commits (or not)."""
        text = stmt.as_string(self.conn)
        self.conn.execute("BEGIN")
        error = None
        start = time.monotonic()
        try:
            self.conn.execute(stmt)
        except psycopg.Error as exc:
            error = f"ERROR: {exc.diag.message_primary}" + (
                f" ({exc.diag.message_detail})" if exc.diag.message_detail else ""
            )
        ms = (time.monotonic() - start) * 1000
        if error is None:
            locks = self.conn.execute(LOCKS_SELF).fetchall()
            notes = after(self.conn) if after else []
            self.conn.execute("COMMIT" if commit else "ROLLBACK")
            outcome = "ok" + ("" if commit else ", rolled back (probe)")
        else:
            locks = []
            notes = ["locks: none left to read, a failed statement's transaction releases them at the error"]
            self.conn.execute("ROLLBACK")
            outcome = error
        self.results.append(Result(case, label, text, locks, outcome, ms, notes))
        return error is None

    def concurrently(self, case: str, label: str, stmt: sql.Composable, partition: str, row: sql.Composable) -> bool:
        """Runs a CONCURRENTLY statement, sampling its backend's locks from another session while it runs.

        A third session holds an uncommitted insert into the partition (ROW EXCLUSIVE), so the build waits
        for it after its first catalog transaction; it is rolled back after half a second."""
        text = stmt.as_string(self.conn)
        blocker = psycopg.connect(self.dsn, autocommit=True)
        blocker.execute("BEGIN")
        blocker.execute(sql.SQL("INSERT INTO {} VALUES {}").format(ident(partition), row))
        outcome: list[str] = []

        def build() -> None:
            try:
                self.conn.execute(stmt)
                outcome.append("ok")
            except psycopg.Error as exc:
                outcome.append(f"ERROR: {exc.diag.message_primary}")

        seen: dict[tuple[str, str, bool], int] = {}
        waits: set[str] = set()
        phases: list[str] = []
        samples = 0
        start = time.monotonic()
        worker = threading.Thread(target=build)
        worker.start()
        released = False
        while worker.is_alive():
            for lock in self.mon.execute(LOCKS_OF, [self.pid]).fetchall():
                seen[lock] = seen.get(lock, 0) + 1
            for locktype, mode in self.mon.execute(
                "SELECT locktype, mode FROM pg_locks WHERE pid = %s AND NOT granted", [self.pid]
            ).fetchall():
                waits.add(f"{locktype} {MODES.get(mode, mode)}")
            phase = self.mon.execute(
                "SELECT phase FROM pg_stat_progress_create_index WHERE pid = %s", [self.pid]
            ).fetchone()
            if phase and (not phases or phases[-1] != phase[0]):
                phases.append(phase[0])
            samples += 1
            if not released and time.monotonic() - start > 0.5:
                blocker.execute("ROLLBACK")
                released = True
            time.sleep(0.01)
        worker.join()
        if not released:
            blocker.execute("ROLLBACK")
        blocker.close()
        ms = (time.monotonic() - start) * 1000
        notes = [
            f"sampled {samples} times from a second session; the build waited on an uncommitted insert for 0.5 s",
            "waits seen: " + (", ".join(sorted(waits)) or "none"),
            "phases seen: " + " → ".join(phases),
        ]
        self.results.append(Result(case, label, text, sorted(seen), outcome[0], ms, notes))
        return outcome[0] == "ok"

    def note(self, case: str, label: str, notes: list[str]) -> None:
        self.results.append(Result(case, label, "", [], "state", None, notes))


def setup(p: Probe) -> None:
    p.run(sql.SQL("CREATE SCHEMA {}").format(ident(SCHEMA)))
    p.run("CREATE TABLE customers (id bigint PRIMARY KEY, name text)")
    p.run(f"INSERT INTO customers SELECT g, 'c' || g FROM generate_series(1, {CUSTOMERS}) g")
    p.run("CREATE TABLE customers_p (id bigint PRIMARY KEY, name text) PARTITION BY RANGE (id)")
    for n, (lo, hi) in enumerate([(1, 20001), (20001, 40001), (40001, 60001)], 1):
        p.run(f"CREATE TABLE customers_p_{n} PARTITION OF customers_p FOR VALUES FROM ({lo}) TO ({hi})")
    p.run("CREATE TABLE customers_p_default PARTITION OF customers_p DEFAULT")
    p.run(f"INSERT INTO customers_p SELECT g, 'c' || g FROM generate_series(1, {CUSTOMERS}) g")
    p.run("INSERT INTO customers_p SELECT g, 'far' FROM generate_series(70001, 70100) g")  # rows in the default
    # A table to attach to customers_p later (its probes).
    p.run("CREATE TABLE customers_p_att (id bigint NOT NULL, name text)")
    p.run("INSERT INTO customers_p_att SELECT g, 'att' FROM generate_series(2000001, 2010000) g")
    p.run("ANALYZE")


def make_child(p: Probe, table: str) -> None:
    """A range-partitioned child: 3 partitions and a DEFAULT one (the 2023 rows), a composite primary key
    holding the partition key, a nullable pointer; and a like-shaped table with 2031 rows to attach."""
    t = ident(table)
    p.run(
        sql.SQL(
            "CREATE TABLE {} (id bigint, created date, tenant_id int NOT NULL DEFAULT 1, customer_id bigint,"
            " PRIMARY KEY (id, created)) PARTITION BY RANGE (created)"
        ).format(t)
    )
    for suffix, lo, hi in RANGES:
        p.run(
            sql.SQL("CREATE TABLE {} PARTITION OF {} FOR VALUES FROM ({}) TO ({})").format(
                ident(f"{table}_{suffix}"), t, sql.Literal(lo), sql.Literal(hi)
            )
        )
    p.run(sql.SQL("CREATE TABLE {} PARTITION OF {} DEFAULT").format(ident(f"{table}_default"), t))
    p.run(
        sql.SQL(
            "INSERT INTO {} SELECT g, date '2023-01-01' + (g % 1460), 1,"
            " CASE WHEN g % 10 = 0 THEN NULL ELSE 1 + g % {} END FROM generate_series(1, {}) g"
        ).format(t, sql.Literal(CUSTOMERS), sql.Literal(ROWS))
    )
    p.run(sql.SQL("CREATE TABLE {} (LIKE {})").format(ident(f"{table}_att"), t))
    p.run(
        sql.SQL(
            "INSERT INTO {} SELECT g, date '2031-01-01' + (g % 300), 1, 1 + g % 1000 FROM generate_series(1, 10000) g"
        ).format(ident(f"{table}_att"))
    )
    p.run(sql.SQL("ANALYZE {}").format(t))


def partitions(table: str) -> list[str]:
    return [f"{table}_{suffix}" for suffix, _, _ in RANGES] + [f"{table}_default"]


def fk(table: str, name: str, ref: str, *, not_valid: bool = False) -> sql.Composed:
    return sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} FOREIGN KEY (customer_id) REFERENCES {} (id){}").format(
        ident(table), ident(name), ident(ref), sql.SQL(" NOT VALID" if not_valid else "")
    )


def validate(table: str, name: str) -> sql.Composed:
    return sql.SQL("ALTER TABLE {} VALIDATE CONSTRAINT {}").format(ident(table), ident(name))


def orphan(p: Probe, partition: str, day: str, put: bool) -> None:
    """Puts (or takes away) a row whose customer does not exist, past the RI triggers."""
    p.run("SET session_replication_role = replica")
    if put:
        p.run(sql.SQL("INSERT INTO {} VALUES (999999999, {}, 1, 987654321)").format(ident(partition), sql.Literal(day)))
    else:
        p.run(sql.SQL("DELETE FROM {} WHERE id = 999999999").format(ident(partition)))
    p.run("RESET session_replication_role")


def stage_probes(p: Probe, case: str, stage: str, table: str) -> None:
    """8. What a partition created, or a table attached, after this stage gets; and what that locks."""
    new = f"{table}_new"
    p.in_tx(
        case,
        f"8. after {stage}: CREATE TABLE {new} PARTITION OF {table}",
        sql.SQL("CREATE TABLE {} PARTITION OF {} FOR VALUES FROM ('2030-01-01') TO ('2031-01-01')").format(
            ident(new), ident(table)
        ),
        commit=False,
        after=lambda c: what_it_got(c, new),
    )
    att = f"{table}_att"
    p.in_tx(
        case,
        f"8. after {stage}: ATTACH PARTITION {att} (10k rows, no index, no key)",
        sql.SQL("ALTER TABLE {} ATTACH PARTITION {} FOR VALUES FROM ('2031-01-01') TO ('2032-01-01')").format(
            ident(table), ident(att)
        ),
        commit=False,
        after=lambda c: what_it_got(c, att),
    )


def ref_probes(p: Probe, case: str, stage: str) -> None:
    """8, referenced side: a partition created in, or attached to, the partitioned referenced table."""
    p.in_tx(
        case,
        f"8. after {stage}: CREATE TABLE customers_p_new PARTITION OF customers_p",
        sql.SQL("CREATE TABLE customers_p_new PARTITION OF customers_p FOR VALUES FROM (1000000) TO (2000000)"),
        commit=False,
        after=lambda c: what_it_got(c, "customers_p_new"),
    )
    p.in_tx(
        case,
        f"8. after {stage}: ATTACH PARTITION customers_p_att to customers_p (10k rows)",
        sql.SQL("ALTER TABLE customers_p ATTACH PARTITION customers_p_att FOR VALUES FROM (2000000) TO (3000000)"),
        commit=False,
        after=lambda c: what_it_got(c, "customers_p_att"),
    )


def index_path(p: Probe, case: str, table: str) -> None:
    """1-3: the supporting index, built per partition and attached."""
    parent_idx = f"{table}_customer_id_idx"
    p.in_tx(
        case,
        f"1. CREATE INDEX ON ONLY {table}",
        sql.SQL("CREATE INDEX {} ON ONLY {} (customer_id)").format(ident(parent_idx), ident(table)),
        after=lambda c: index_state(c, parent_idx),
    )
    stage_probes(p, case, "1 (parent index ON ONLY, invalid)", table)
    for part in partitions(table):
        day = "2023-06-01" if part.endswith("default") else f"{part[-4:]}-06-01"
        p.concurrently(
            case,
            f"2. CREATE INDEX CONCURRENTLY ON {part}",
            sql.SQL("CREATE INDEX CONCURRENTLY {} ON {} (customer_id)").format(
                ident(f"{part}_customer_id_idx"), ident(part)
            ),
            part,
            sql.SQL("(888888888, {}, 1, NULL)").format(sql.Literal(day)),
        )
    for part in partitions(table):
        p.in_tx(
            case,
            f"3. ALTER INDEX {parent_idx} ATTACH PARTITION {part}_customer_id_idx",
            sql.SQL("ALTER INDEX {} ATTACH PARTITION {}").format(ident(parent_idx), ident(f"{part}_customer_id_idx")),
            after=lambda c: index_state(c, parent_idx),
        )
    stage_probes(p, case, "3 (parent index valid)", table)


def key_path_before_18(p: Probe, case: str, table: str, ref: str) -> None:
    """4-6: a key per partition, NOT VALID then validated, then the parent's key adopting them."""
    name = f"{table}_customer_id_fkey"
    parts = partitions(table)
    for part in parts:
        p.in_tx(case, f"4. ADD FOREIGN KEY NOT VALID on {part}", fk(part, name, ref, not_valid=True))
    for part in parts[:-1]:  # the DEFAULT partition's stays NOT VALID for the first parent probe
        p.in_tx(case, f"5. VALIDATE CONSTRAINT on {part}", validate(part, name))
    stage_probes(p, case, "5 (keys on partitions, none on parent)", table)
    orphan(p, parts[0], "2024-06-01", put=True)
    p.note(case, f"orphan put into {parts[0]} (validated) to prove whether step 6 scans it", [])
    p.in_tx(
        case,
        f"6b. ADD FOREIGN KEY on {table} while {parts[-1]}'s key is NOT VALID (rolled back)",
        fk(table, name, ref),
        commit=False,
        after=lambda c: fk_state(c, table) + ref_triggers(c, ref),
    )
    p.in_tx(case, f"5. VALIDATE CONSTRAINT on {parts[-1]}", validate(parts[-1], name))
    p.note(case, f"before 6a: {ref_triggers(p.conn, ref)[0]}", [])
    p.in_tx(
        case,
        f"6a. ADD FOREIGN KEY on {table}, every partition's key validated",
        fk(table, name, ref),
        after=lambda c: fk_state(c, table) + ref_triggers(c, ref),
    )
    orphan(p, parts[0], "2024-06-01", put=False)
    stage_probes(p, case, "6 (parent key valid)", table)


def key_path_18(p: Probe, case: str, table: str, ref: str) -> None:
    """0 and 7: the whole key in one statement (baseline, rolled back); the parent's key NOT VALID, then
    VALIDATE, per partition and on the parent."""
    name = f"{table}_customer_id_fkey"
    parts = partitions(table)
    p.in_tx(
        case,
        f"0. baseline: ADD FOREIGN KEY on {table} in one statement (rolled back)",
        fk(table, name, ref),
        commit=False,
        after=lambda c: fk_state(c, table),
    )
    if not p.in_tx(
        case,
        f"7a. ADD FOREIGN KEY NOT VALID on {table}",
        fk(table, name, ref, not_valid=True),
        after=lambda c: fk_state(c, table),
    ):
        return
    stage_probes(p, case, "7a (parent key NOT VALID)", table)
    children = dict(
        p.conn.execute(
            """
            SELECT conrelid::regclass::text, conname FROM pg_constraint
            WHERE contype = 'f' AND conparentid <> 0 AND confrelid = %s::regclass
              AND conrelid IN (SELECT relid FROM pg_partition_tree(%s::regclass))
            """,
            [ref, table],
        ).fetchall()
    )
    for part in parts[:-1]:
        p.in_tx(
            case,
            f"7b. VALIDATE CONSTRAINT {children.get(part)} on partition {part} (inherited)",
            validate(part, children.get(part, name)),
            after=lambda c: fk_state(c, table),
        )
    orphan(p, parts[0], "2024-06-01", put=True)
    p.note(case, f"orphan put into {parts[0]} (validated) to prove whether 7c scans it", [])
    p.in_tx(
        case,
        f"7c. VALIDATE CONSTRAINT on {table} (3 of 4 partitions validated)",
        validate(table, name),
        after=lambda c: fk_state(c, table),
    )
    orphan(p, parts[0], "2024-06-01", put=False)
    p.in_tx(
        case,
        f"7d. VALIDATE CONSTRAINT on {table} (orphan gone)",
        validate(table, name),
        after=lambda c: fk_state(c, table),
    )
    stage_probes(p, case, "7d (parent key valid)", table)


def plain_child_path(p: Probe, case: str) -> None:
    """A plain child referencing the partitioned customers_p."""
    p.run("CREATE TABLE invoices (id bigint PRIMARY KEY, customer_id bigint)")
    p.run(
        f"INSERT INTO invoices SELECT g, CASE WHEN g % 10 = 0 THEN NULL ELSE 1 + g % {CUSTOMERS} END"
        f" FROM generate_series(1, {ROWS // 2}) g"
    )
    p.run("CREATE INDEX invoices_customer_id_idx ON invoices (customer_id)")
    name = "invoices_customer_id_fkey"
    p.in_tx(
        case,
        "0. baseline: ADD FOREIGN KEY on invoices (rolled back)",
        fk("invoices", name, "customers_p"),
        commit=False,
    )
    p.in_tx(case, "4. ADD FOREIGN KEY NOT VALID on invoices", fk("invoices", name, "customers_p", not_valid=True))
    p.in_tx(
        case,
        "5. VALIDATE CONSTRAINT on invoices",
        validate("invoices", name),
        after=lambda c: what_it_got(c, "invoices"),
    )
    ref_probes(p, case, "5 (invoices key valid)")


def measure(major: int) -> tuple[str, list[Result]]:
    cluster = Cluster.create(major)
    try:
        cluster.create_database("locks")
        p = Probe(cluster, "locks")
        version = p.conn.execute("SELECT version()").fetchone()[0]
        try:
            setup(p)
            case = "A: partitioned child orders_a → plain customers"
            make_child(p, "orders_a")
            index_path(p, case, "orders_a")
            key_path_before_18(p, case, "orders_a", "customers")

            case = "B: partitioned child orders_b → plain customers, parent key NOT VALID then VALIDATE (18's path)"
            make_child(p, "orders_b")
            key_path_18(p, case, "orders_b", "customers")

            case = "C: partitioned child orders_c → partitioned customers_p (both)"
            make_child(p, "orders_c")
            key_path_before_18(p, case, "orders_c", "customers_p")
            ref_probes(p, case, "6 (orders_c key valid)")

            case = "D: partitioned child orders_d → partitioned customers_p, 18's path"
            make_child(p, "orders_d")
            key_path_18(p, case, "orders_d", "customers_p")

            case = "E: plain child invoices → partitioned customers_p"
            plain_child_path(p, case)
        finally:
            p.close()
        return version, p.results
    finally:
        cluster.stop()


def lock_table(results: list[Result]) -> list[str]:
    lines = []
    case = None
    for r in results:
        if r.case != case:
            case = r.case
            lines += ["", f"#### {case}", "", "| statement | relation | lock mode |", "| --- | --- | --- |"]
        if r.outcome == "state":
            continue
        by_rel: dict[str, list[str]] = {}
        for rel, mode, granted in r.locks:
            by_rel.setdefault(rel, []).append(MODES.get(mode, mode) + ("" if granted else " (waiting)"))
        label = r.label + ("" if r.outcome.startswith("ok") else " **[ERROR]**")
        if not by_rel:
            lines.append(f"| {label} | {'(none)' if r.outcome.startswith('ok') else '(released at the error)'} | |")
        for n, (rel, modes) in enumerate(by_rel.items()):
            lines.append(f"| {label if n == 0 else '〃'} | {rel} | {', '.join(modes)} |")
    return lines


def outcome_table(results: list[Result]) -> list[str]:
    lines = ["", "| statement | outcome | ms | state after (in the transaction) |", "| --- | --- | --: | --- |"]
    for r in results:
        ms = "" if r.ms is None else f"{r.ms:.0f}"
        notes = "<br>".join(r.notes).replace("|", "\\|")
        outcome = r.outcome.replace("|", "\\|")
        lines.append(f"| {r.label} | {outcome} | {ms} | {notes} |")
    return lines


def report(measured: dict[int, tuple[str, list[Result]]], analysis: str) -> str:
    lines = [
        "# What each statement of the partitioned-key path locks, per PostgreSQL major",
        "",
        f"Measured {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC by `devkit/partition_locks.py` (issue 18):",
        "`PYTHONPATH=plugins:. .venv/bin/python -m devkit.partition_locks`. Each statement ran in an explicit",
        "transaction and its relation locks were read from pg_locks before COMMIT/ROLLBACK (catalog relations left",
        "out; a failing statement releases its locks at the error, so only its message is recorded); CREATE INDEX",
        "CONCURRENTLY was sampled from a second session while an uncommitted insert held it up. Child tables:",
        "range-partitioned on `created` (3 partitions + DEFAULT, about 100k rows each, primary",
        "key `(id, created)`, nullable `customer_id`). `customers` is plain (50k rows); `customers_p` is",
        "range-partitioned on `id` (3 partitions + DEFAULT). An orphan row put into an already-validated",
        "partition (past the RI triggers) proves whether a statement scans it: the statement fails if it does.",
        "",
    ]
    for major, (version, _) in measured.items():
        lines.append(f"- PostgreSQL {major}: `{version}`")
    lines += ["", ANALYSIS + analysis + ANALYSIS_END]
    for major, (version, results) in measured.items():
        lines += ["", f"## PostgreSQL {major}", "", f"`{version}`", "", "### Locks held before the end"]
        lines += lock_table(results)
        lines += ["", "### Outcomes"]
        lines += outcome_table(results)
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    majors = [int(a) for a in argv] or list(MAJORS)
    measured = {major: measure(major) for major in majors}
    old = OUT.read_text() if OUT.exists() else ""
    kept = old.split(ANALYSIS, 1)[1].split(ANALYSIS_END, 1)[0] if ANALYSIS in old and ANALYSIS_END in old else "\n"
    text = report(measured, kept)
    print(text)
    OUT.write_text(text)


if __name__ == "__main__":
    main(sys.argv[1:])
