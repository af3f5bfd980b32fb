"""Finding orphans and acting on them as the key's policy says (catalog.orphan_policy): nullify (every nulled
pointer audited, its whole old key, in the same transaction), delete (fk_maintenance.records.cascade: the rows and
everything the database's keys take along, archived in the same transaction) or refuse."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import groupby
from operator import itemgetter
from typing import Any

import psycopg
from psycopg import sql

from fk_maintenance.db.catalog import require_target
from fk_maintenance.db.session import run_lock, set_local_timeouts, step_session
from fk_maintenance.db.sqlfiles import batch_params, statement
from fk_maintenance.db.target_state import TargetState
from fk_maintenance.db.topology import ReplicaGate
from fk_maintenance.errors import DeleteNotApproved, OrphansCannotBeNulled
from fk_maintenance.keys.settings import RunSettings
from fk_maintenance.keys.spec import ForeignKeySpec, describe_columns
from fk_maintenance.records.audit import ensure_audit_table, find_audit_tables
from fk_maintenance.records.cascade import (
    ArchiveMismatch,
    BlastRadius,
    DeleteCounts,
    delete_batch,
    ensure_archive_table,
    protected_rows,
    require_graph,
)
from fk_maintenance.records.cascade import blast_radius as walk_blast_radius

log = logging.getLogger(__name__)

# One batch touches batch_size rows by primary key; a minute is far beyond what that needs and still bounds
# a batch that the server cannot finish (for example, a runaway trigger on the app's table).
BATCH_STATEMENT_TIMEOUT_MS = 60_000
ORPHAN_KEYS_CURSOR = "fk_maintenance_orphan_keys"
# The anti-join scans the whole table once; bounded so a pathological plan cannot run for hours.
SCAN_STATEMENT_TIMEOUT_MS = 2 * 60 * 60 * 1000


def detect_orphans(conn: psycopg.Connection, spec: ForeignKeySpec, settings: RunSettings) -> dict[str, Any]:
    """Count orphans and distinct dangling parents, with a sample, in one anti-join scan (read-only)."""
    started = time.monotonic()
    with step_session(conn, "detect_orphans", settings, statement_timeout_ms=SCAN_STATEMENT_TIMEOUT_MS, read_only=True):
        # It runs beside this run's own index build (the graph's other branch), which a count does not mind.
        state = require_target(conn, spec, reads_only=True)
        orphans, dangling, sample = conn.execute(
            statement("orphans", "summary", spec), {"sample_size": settings.sample_size}
        ).fetchone()
        radius = _blast_radius(conn, spec, settings, state, orphans, list(sample))
    log.info(
        "detect_orphans: %d orphan row(s) pointing at %d missing parent(s) in %s.%s (policy: %s); sample: %s",
        orphans,
        dangling,
        spec.schema,
        spec.table,
        state.policy,
        ", ".join(sample) or "none",
    )
    if state.policy == "delete":
        log.info(
            "detect_orphans: deleting them takes %d row(s) in all: %s; sample: %s",
            radius["blast_radius_rows"],
            radius["blast_radius"],
            "; ".join(radius["blast_radius_sample"]) or "none",
        )
    return {
        "orphans": orphans,
        "dangling_parents": dangling,
        "sample": list(sample),
        "policy": state.policy,
        # What nulling them sets to NULL (catalog.nulled_columns): the plan and the report name it.
        "nulls": list(state.nulled) if state.policy == "nullify" else [],
        **radius,
        "seconds": round(time.monotonic() - started, 3),
    }


def _blast_radius(
    conn: psycopg.Connection,
    spec: ForeignKeySpec,
    settings: RunSettings,
    state: TargetState,
    orphans: int,
    sample: list[str],
) -> dict[str, Any]:
    """Every row the run would change, per table (deleted / nulled / reset) and in all, with a sample: what a
    person approving the run reads. Nulling changes the orphans' pointers only; a delete is walked through the
    catalog's keys (fk_maintenance.records.cascade); a refused key changes nothing."""
    if state.policy == "delete" and orphans:
        with _held_orphan_keys(conn, spec, settings) as (keys, _total):
            return walk_blast_radius(
                conn, spec, state, require_graph(conn, spec, state), keys, settings.batch_size
            ).summary()
    radius = BlastRadius()
    if state.policy == "nullify" and orphans:
        radius.per_table[f"{spec.schema}.{spec.table}"] = {"deleted": 0, "nulled": orphans, "reset": 0}
        radius.sample = sample
    return radius.summary()


def refused_orphans_message(spec: ForeignKeySpec, state: TargetState, orphans: int) -> str:
    """Orphans of a key whose policy is refuse: the count, why, and the setting that would act on them."""
    if state.not_null_key:
        what = (
            f"{describe_columns(spec.columns, spec.table)} {'is' if len(spec.columns) == 1 else 'are'} NOT NULL "
            f"and {orphans} row(s) point at a missing parent: they cannot be nulled, and the key cannot be validated "
            "while they exist (orphans: refuse" + ("" if spec.orphans else ", the default for a NOT NULL key") + ")"
        )
    else:
        what = (
            f"{orphans} row(s) of {spec.schema}.{spec.table} point at a missing parent, and the key declares "
            "orphans: refuse"
        )
    return (
        f"{what}. Declare orphans: delete for this key to delete them with everything the database's keys take "
        "along (archived first, restorable), or delete them or point them at an existing parent in the app, then "
        "run again"
    )


def delete_problems(
    conn: psycopg.Connection, spec: ForeignKeySpec, settings: RunSettings, state: TargetState
) -> list[str]:
    """For preflight, under orphans: delete, with orphans: no RESTRICT / NO ACTION key may protect a row the
    delete would remove (walked read-only)."""
    with _held_orphan_keys(conn, spec, settings) as (keys, _total):
        problems, radius = protected_rows(conn, spec, state, keys, settings)
    log.info("preflight: orphans: delete would take %d row(s): %s", radius.rows, radius.per_table)
    return problems


def null_orphans(
    conn: psycopg.Connection,
    spec: ForeignKeySpec,
    settings: RunSettings,
    run_id: str,
    approved_orphans: int | None = None,
) -> dict[str, Any]:
    """Act on every orphan as the key's policy says, in batches: null its pointer (audited) or delete it with
    everything its deletion takes along (archived), each batch in its own transaction. ``approved_orphans``: how
    many orphans a person approved deleting (None: nobody was asked, the delete was within the threshold)."""
    if settings.dry_run:
        log.info("null_orphans: dry run, nothing changed")
        return {"skipped": "dry run", "nulled": 0, "audited": 0, "deleted": 0, "seconds": 0.0}
    with step_session(conn, "null_orphans", settings, statement_timeout_ms=BATCH_STATEMENT_TIMEOUT_MS):
        state = require_target(conn, spec)
        with run_lock(conn, spec):
            return sweep_orphans(
                conn, spec, settings, run_id, state, step="null_orphans", approved_orphans=approved_orphans
            )


def audited_for_run(conn: psycopg.Connection, spec: ForeignKeySpec, run_id: str) -> int:
    """How many pointers run ``run_id`` nulled, read from the audit (0 when there is no audit table yet)."""
    if find_audit_tables(conn, spec).current is None:
        return 0
    return conn.execute(statement("orphans", "audited_for_run", spec), {"run_id": run_id}).fetchone()[0]


@dataclass
class SweepProgress:
    """What the batches of one sweep did so far, logged every few seconds and returned at the end."""

    step: str
    total: int
    started: float = field(default_factory=time.monotonic)
    done: int = 0
    nulled: int = 0
    audited: int = 0
    batches: int = 0
    last_log: float = field(default_factory=time.monotonic)

    def add(self, keys: int, audited: int, nulled: int) -> None:
        self.batches += 1
        self.done += keys
        self.audited += audited
        self.nulled += nulled
        now = time.monotonic()
        if now - self.last_log >= 5 or self.done >= self.total:
            elapsed = now - self.started
            log.info(
                "%s: %d/%d keys processed (%.0f%%), %d nulled, %.0f rows/s",
                self.step,
                self.done,
                self.total,
                100 * self.done / max(self.total, 1),
                self.nulled,
                self.done / elapsed if elapsed else 0.0,
            )
            self.last_log = now

    def summary(self, replicas: ReplicaGate) -> dict[str, Any]:
        seconds = time.monotonic() - self.started
        return {
            "candidates": self.total,
            "nulled": self.nulled,
            "audited": self.audited,
            # Parent created meanwhile, row deleted, or row locked by the app (left for the re-sweep).
            "left_alone": self.total - self.nulled,
            "batches": self.batches,
            "replica_waits": replicas.waits,
            "replica_wait_seconds": round(replicas.waited_seconds, 3),
            "rows_per_second": round(self.nulled / seconds, 1) if seconds else None,
            "seconds": round(seconds, 3),
        }


def sweep_orphans(
    conn: psycopg.Connection,
    spec: ForeignKeySpec,
    settings: RunSettings,
    run_id: str,
    state: TargetState,
    *,
    step: str,
    approved_orphans: int | None = None,
) -> dict[str, Any]:
    """The batches themselves, for a caller that holds the run lock.

    One anti-join scan collects the orphan keys (held by the server, streamed to us a batch at a time); each
    batch then touches only its rows by key, so the total work is one scan plus work proportional to the
    orphans, and the worker's memory does not grow with them. A batch is all or nothing: killed midway, it
    rolls back, and the next run finds the same orphans again. Every transaction sets its own timeouts, so
    this runs the same under any caller's session settings.
    """
    if state.policy == "delete":
        return _sweep_deletes(conn, spec, settings, run_id, state, step=step, approved_orphans=approved_orphans)
    with _held_orphan_keys(conn, spec, settings, by_table=True) as (keys, total):
        if total and state.policy == "refuse":
            raise OrphansCannotBeNulled(
                f"{step}: {refused_orphans_message(spec, state, total)} (written since preflight?)"
            )
        ensure_audit_table(conn, spec, state)
        log.info("%s: %d orphan pointer(s) to null in batches of %d", step, total, settings.batch_size)
        progress = SweepProgress(step, total)
        replicas = ReplicaGate(conn, settings.max_replica_lag_s, step=step)
        tables = TableNames(conn)
        for table_oid, batch in _batches(keys, settings, replicas, by_table=True):
            audited, nulled = _null_batch(
                conn, spec, state, settings, run_id, batch, table=tables[table_oid], step=step, offset=progress.done
            )
            progress.add(len(batch), audited, nulled)
    return progress.summary(replicas)


class TableNames(dict[int, tuple[str, str]]):
    """(schema, name) of a table by its oid, looked up once each: the partitions the orphan keys are in."""

    def __init__(self, conn: psycopg.Connection) -> None:
        super().__init__()
        self._conn = conn

    def __missing__(self, oid: int) -> tuple[str, str]:
        self[oid] = self._conn.execute(statement("catalog", "relation_name"), {"oid": oid}).fetchone()
        return self[oid]


def _sweep_deletes(
    conn: psycopg.Connection,
    spec: ForeignKeySpec,
    settings: RunSettings,
    run_id: str,
    state: TargetState,
    *,
    step: str,
    approved_orphans: int | None = None,
) -> dict[str, Any]:
    """orphans: delete, batch by batch (fk_maintenance.records.cascade.delete_batch), in passes: a pass that left
    busy orphans, or deleted rows of the referenced table (whose children the batch treated as the declared key
    will, a second scan finds any written meanwhile), is followed by another scan for orphans, until a pass
    deletes nothing more."""
    sweep = _DeleteSweep(conn, spec, settings, run_id, state, step)
    while True:
        with _held_orphan_keys(conn, spec, settings) as (keys, total):
            if sweep.passes == 0:
                _refuse_unapproved_growth(step, total, approved_orphans, settings)
                ensure_audit_table(conn, spec, state)  # the pipeline's schema, and the batches' transactions' record
                ensure_archive_table(conn, spec)
            this_pass, busy = sweep.run_pass(keys, total)
        if not this_pass.orphans or not (this_pass.ref_rows or busy):
            sweep.totals.busy = busy
            return sweep.summary()


def _refuse_unapproved_growth(step: str, total: int, approved_orphans: int | None, settings: RunSettings) -> None:
    """The approval was for the delete as detect_orphans saw it, perhaps hours ago: when more than a delete that
    needs no approval has been added since, this one is a delete nobody has seen."""
    if approved_orphans is not None and total > approved_orphans + settings.approve_deletes_above:
        raise DeleteNotApproved(
            f"{step}: {total} orphan(s) are there to delete now, {approved_orphans} when the delete was approved "
            f"(more than approve_deletes_above, {settings.approve_deletes_above}, were added since); nothing was "
            "deleted. Trigger a new run to have the delete as it is now approved"
        )


class _DeleteSweep:
    """The passes of one delete sweep and what they did so far."""

    def __init__(
        self,
        conn: psycopg.Connection,
        spec: ForeignKeySpec,
        settings: RunSettings,
        run_id: str,
        state: TargetState,
        step: str,
    ) -> None:
        self.conn, self.spec, self.settings, self.run_id, self.state, self.step = (
            conn,
            spec,
            settings,
            run_id,
            state,
            step,
        )
        self.graph = require_graph(conn, spec, state)
        self.replicas = ReplicaGate(conn, settings.max_replica_lag_s, step=step)
        self.started = time.monotonic()
        self.totals = DeleteCounts()
        self.candidates = self.batches = self.passes = 0

    def run_pass(self, keys: psycopg.Cursor[Any], total: int) -> tuple[DeleteCounts, int]:
        """One pass over the orphans a scan found: what it deleted (added to the totals), and how many orphans
        it left busy."""
        self.passes += 1
        self.candidates += total
        this_pass = DeleteCounts()
        log.info(
            "%s: pass %d, %d orphan(s) to delete in batches of %d",
            self.step,
            self.passes,
            total,
            self.settings.batch_size,
        )
        for _table, batch in _batches(keys, self.settings, self.replicas):
            this_pass.add(self._delete(batch))
            self.batches += 1
            self._log_progress(this_pass)
        busy, this_pass.busy = this_pass.busy, 0
        self.totals.add(this_pass)
        return this_pass, busy

    def _delete(self, batch: list[tuple[Any, ...]]) -> DeleteCounts:
        """One batch; when the server counted a change its archive does not hold (a key added since the sweep
        read the catalog), the batch rolled back: the catalog is read again and the batch tried once more."""
        for attempt in (1, 2):
            try:
                return delete_batch(
                    self.conn,
                    self.spec,
                    self.state,
                    self.graph,
                    self.settings,
                    self.run_id,
                    batch,
                    statement_timeout_ms=BATCH_STATEMENT_TIMEOUT_MS,
                )
            except ArchiveMismatch as mismatch:
                if attempt == 2:
                    raise
                log.warning("%s: %s; reading the foreign keys again", self.step, mismatch)
                self.graph = require_graph(self.conn, self.spec, self.state)
        raise AssertionError("unreachable")

    def _log_progress(self, this_pass: DeleteCounts) -> None:
        rows = self.totals.rows + this_pass.rows
        log.info(
            "%s: %d orphan(s) deleted (%d row(s) in all, %d pointer(s) changed), %d busy; %.0f rows/s",
            self.step,
            self.totals.orphans + this_pass.orphans,
            rows,
            self.totals.changed + this_pass.changed,
            this_pass.busy,
            rows / max(time.monotonic() - self.started, 1e-9),
        )

    def summary(self) -> dict[str, Any]:
        seconds = time.monotonic() - self.started
        totals = self.totals
        return {
            "candidates": self.candidates,
            "nulled": 0,
            "audited": 0,
            "deleted": totals.orphans,
            "rows_deleted": totals.rows,
            "pointers_changed": totals.changed,
            "archived": totals.rows + totals.changed,
            # Held by the app through every pass: the re-sweep before VALIDATE, or the next run, tries again.
            "left_alone": totals.busy,
            "batches": self.batches,
            "passes": self.passes,
            "replica_waits": self.replicas.waits,
            "replica_wait_seconds": round(self.replicas.waited_seconds, 3),
            "rows_per_second": round(totals.rows / seconds, 1) if seconds else None,
            "seconds": round(seconds, 3),
        }


def _batches(
    keys: psycopg.Cursor[Any], settings: RunSettings, replicas: ReplicaGate, *, by_table: bool = False
) -> Iterator[tuple[int | None, list[tuple[Any, ...]]]]:
    """The held orphan keys, ``batch_size`` at a time, each batch once the replicas have caught up and with the
    configured pause after it. ``by_table``: keys come ordered by the partition they are in (its oid first), and
    a fetch that spans two partitions is two batches, each with its partition's oid."""
    while fetched := keys.fetchmany(settings.batch_size):
        if by_table:
            groups = [(oid, [row[1:] for row in rows]) for oid, rows in groupby(fetched, key=itemgetter(0))]
        else:
            groups = [(None, fetched)]
        for table_oid, batch in groups:
            replicas.wait()
            yield table_oid, batch
            if settings.batch_pause_ms:
                time.sleep(settings.batch_pause_ms / 1000)


@contextmanager
def _held_orphan_keys(
    conn: psycopg.Connection, spec: ForeignKeySpec, settings: RunSettings, *, by_table: bool = False
) -> Iterator[tuple[psycopg.Cursor[Any], int]]:
    """``_hold_orphan_keys``, closed at the end (unless the connection is gone, which closed it)."""
    keys, total = _hold_orphan_keys(conn, spec, settings, by_table=by_table)
    try:
        yield keys, total
    finally:
        if not conn.closed and not conn.broken:
            keys.close()


def _hold_orphan_keys(
    conn: psycopg.Connection, spec: ForeignKeySpec, settings: RunSettings, *, by_table: bool = False
) -> tuple[psycopg.Cursor[Any], int]:
    """A held server-side cursor over every orphan's row key (``by_table``: its table's oid, then its row key,
    grouped by table), in key order, and how many it holds."""
    with conn.transaction():
        # The scan reads only; its statement_timeout is the scan's, the batches keep the short one. A held
        # cursor is filled when this transaction commits: one scan, sorted by key, kept by the server, so the
        # worker holds one batch of keys at a time however many orphans there are.
        set_local_timeouts(
            conn, lock_timeout_ms=settings.lock_timeout_ms, statement_timeout_ms=SCAN_STATEMENT_TIMEOUT_MS
        )
        # A cursor is planned for its first rows (cursor_tuple_fraction 0.1): an index-ordered walk with a
        # probe per row, ten times slower than the hashed anti-join at 10M rows. This one is read to the end.
        conn.execute(statement("orphans", "plan_for_all_rows"))
        keys = conn.cursor(ORPHAN_KEYS_CURSOR, withhold=True, scrollable=True)
        keys.execute(statement("orphans", "keys_by_table" if by_table else "keys", spec))
    total = conn.execute(statement("orphans", "count_held_keys", cursor=sql.Identifier(ORPHAN_KEYS_CURSOR))).rowcount
    keys.scroll(0, mode="absolute")
    return keys, total


def _null_batch(
    conn: psycopg.Connection,
    spec: ForeignKeySpec,
    state: TargetState,
    settings: RunSettings,
    run_id: str,
    batch: list[tuple[Any, ...]],
    *,
    table: tuple[str, str],
    step: str,
    offset: int,
) -> tuple[int, int]:
    """One batch in one short transaction: audit then null the rows still orphaned; (audited, nulled). ``table``:
    the child, or the partition the batch's rows are in."""
    with conn.transaction():
        set_local_timeouts(
            conn, lock_timeout_ms=settings.lock_timeout_ms, statement_timeout_ms=BATCH_STATEMENT_TIMEOUT_MS
        )
        audited, nulled = conn.execute(
            statement("orphans", "null_batch", spec, state, table=sql.Identifier(*table)),
            {**batch_params(spec, batch), "run_id": run_id, "audit_name": spec.audit_qualified},
        ).fetchone()
        if audited != nulled:
            # Rolling back keeps audit and data in step; this would mean a concurrent change we did not foresee,
            # so stop rather than guess.
            raise RuntimeError(f"{step}: batch at offset {offset} audited {audited} but nulled {nulled}; rolled back")
    return audited, nulled
