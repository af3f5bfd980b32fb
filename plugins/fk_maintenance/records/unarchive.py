"""Restore of an orphans: delete run: the rows it deleted go back from the archive (parents before children,
every column as it was before the run, identity columns included), then the pointers its cascade nulled or
reset, each where its parent exists again; every row and pointer put back is recorded in the restore log.

A row several batches of the run touched (nulled by one batch's SET NULL key, deleted by a later batch) goes
back once, as its last record says, with the values from before the run wherever no one wrote the row between
the batches (the archive's prior_intact); what someone wrote since is left alone and counted. A row a restore
put back is never put back again (the restore log says so), so a second restore does not undo the app's delete.

Each row is tried in a savepoint of its chunk's short transaction, so a row refused (its parent still missing,
a CHECK or NOT NULL added since, a partition gone, row-level security, a trigger that raises) is counted with
its reason without undoing the others. Rows go in passes: a row whose parent comes back later in a pass goes
back in the next; rows that wait on each other (a post pinning its own comment) go back together, in one
transaction, the nullable columns of their keys first NULL and then set.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import psycopg
from psycopg import errors as pgerrors
from psycopg import sql

from fk_maintenance.db import keysql
from fk_maintenance.db.catalog import table_info
from fk_maintenance.db.session import set_local_timeouts
from fk_maintenance.db.sqlfiles import statement
from fk_maintenance.db.target_state import TargetState
from fk_maintenance.errors import InvalidSettings
from fk_maintenance.keys.settings import RunSettings
from fk_maintenance.keys.spec import ForeignKeySpec
from fk_maintenance.records.cascade import BUSY_ERRORS, CHANGES, Rel, _archive, archive_shape, typed_keys
from fk_maintenance.records.restorable import Touched, blocker_problems, blockers

log = logging.getLogger(__name__)

STATEMENT_TIMEOUT_MS = 60_000
# The query that reads the run's rows (one index lookup per archived row) runs once per pass, for the whole run.
FINALS_STATEMENT_TIMEOUT_MS = 2 * 60 * 60 * 1000
OUTCOMES = ("restored", "already_restored", "written_since", "parent_still_missing", "failed")
ROW_OUTCOMES = tuple(f"rows_{outcome}" for outcome in OUTCOMES)
POINTER_OUTCOMES = tuple(f"pointers_{outcome}" for outcome in OUTCOMES)
TAKEN = (pgerrors.UniqueViolation, pgerrors.ExclusionViolation)
FAILURE_SAMPLES = 10
FINALS_CURSOR = "fk_maintenance_archived_rows"
LOW_32_BITS = 2**32

Outcome = tuple[str | None, str | None]  # (outcome, why: "declared", "fk", "busy" or a failure's reason)


def archived_run_rows(conn: psycopg.Connection, spec: ForeignKeySpec, run_id: str) -> int:
    """How many rows the archive holds for ``run_id`` (0 when there is no archive)."""
    if table_info(conn, spec.audit_schema, spec.archive_table) is None:
        return 0
    return conn.execute(statement("cascade", "archived_count", archive=_archive(spec)), {"run_id": run_id}).fetchone()[
        0
    ]


@dataclass
class Final:
    """The run's last record of one row, with the image to put back (the row before the run touched it, where
    nobody wrote it between the run's batches) and the records that go back with it."""

    depth: int
    seq: int
    schema: str
    table: str
    row_key: str
    action: str
    via: str
    relid: int
    batch: int
    filenode: int | None
    written: str | None
    origin: int  # the batch whose row is the image
    row_text: str | None
    row_data: str
    members: list[tuple[str, str, list[str]]]  # (action, via, columns) of each record put back with it
    superseded: list[str]  # the actions of the run's earlier records of the row, written over since
    logged: bool | None  # put back by a restore: True this one (an earlier pass), False an earlier one

    @classmethod
    def of(cls, row: tuple[Any, ...]) -> Final:
        *head, members, superseded, logged = row
        return cls(*head, [tuple(m) for m in json.loads(members)], json.loads(superseded), logged)  # type: ignore[misc]

    @property
    def rel(self) -> tuple[str, str]:
        return (self.schema, self.table)

    @property
    def key_names(self) -> tuple[str, ...]:
        return tuple(json.loads(self.row_key))

    @property
    def pointer_columns(self) -> tuple[str, ...]:
        """Every column the chain's SET NULL / SET DEFAULT keys changed, once each."""
        names: list[str] = []
        for action, _via, columns in self.members:
            names += [name for name in columns if action != "deleted" and name not in names]
        return tuple(names)

    def log_key(self, action: str, via: str) -> str:
        return f"{self.schema}.{self.table} {self.row_key}" + ("" if action == "deleted" else f" {via}")

    def label(self) -> str:
        return f"{self.schema}.{self.table} {self.row_key}"


@dataclass
class Tally:
    """What the restore did with each archived record, and why a record failed."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys((*ROW_OUTCOMES, *POINTER_OUTCOMES, "busy"), 0))
    failures: Counter[str] = field(default_factory=Counter)
    samples: list[str] = field(default_factory=list)

    def add(self, final: Final, outcome: str, why: str | None = None) -> None:
        if outcome == "busy":
            self.counts["busy"] += 1
            return
        for action, _via, _columns in final.members:
            self.counts[f"{'rows' if action == 'deleted' else 'pointers'}_{outcome}"] += 1
        if outcome == "failed" and why:
            self.failures[why] += len(final.members)
            if len(self.samples) < FAILURE_SAMPLES:
                self.samples.append(f"{final.label()}: {why}")
            log.warning("restore: %s not put back: %s", final.label(), why)

    def add_superseded(self, final: Final) -> None:
        """The run's records of the row before someone wrote it between two batches: newer than they are."""
        for action in final.superseded:
            self.counts[f"{'rows' if action == 'deleted' else 'pointers'}_written_since"] += 1

    def summary(self) -> dict[str, Any]:
        return self.counts | {"failures": dict(self.failures), "failure_samples": self.samples}


@dataclass(frozen=True)
class Image:
    """A row to write: from its own text (base, exact), else from its jsonb (overrides), and the columns an
    INSERT of it writes."""

    base: str | None
    overrides: str
    columns: tuple[str, ...]

    def params(self, nulls: tuple[str, ...] = ()) -> dict[str, Any]:
        return {"base": self.base, "overrides": self.overrides, "nulls": json.dumps(dict.fromkeys(nulls))}


@dataclass
class TableFacts:
    rel: Rel
    insertable: tuple[str, ...]
    deferrable: tuple[str, ...]  # the nullable columns of its foreign keys
    update_blocked: bool  # triggers an UPDATE of those columns fires: a cycle is not broken through them


@dataclass
class Restore:
    """One restore of one run: the connection, what it needs from the catalog, and the archive's shape."""

    conn: psycopg.Connection
    spec: ForeignKeySpec
    state: TargetState
    settings: RunSettings
    run_id: str
    restore_id: str
    exact_columns: bool  # the archive has row_text, filenode, written_md5, prior_intact
    has_log: bool
    tables: dict[tuple[str, ...], TableFacts] = field(default_factory=dict)
    # Whether a table's archived text reads back as its row, per table and batch (one layout of columns each).
    text_reads: dict[tuple[str, str, int], bool] = field(default_factory=dict)
    # The restore log's entries of the open transaction, written with it (log_restored).
    log: list[dict[str, str]] = field(default_factory=list)

    def facts(self, final: Final) -> TableFacts:
        """The table's facts now, read once per restore (and per row key's columns)."""
        cache_key = (*final.rel, *final.key_names)
        if cache_key not in self.tables:
            found = self.conn.execute(
                statement("unarchive", "table_facts"), {"schema": final.schema, "table": final.table}
            ).fetchone()
            if found is None:
                raise pgerrors.UndefinedTable(f'relation "{final.schema}.{final.table}" does not exist')
            oid, insertable, deferrable = found
            types = self.conn.execute(
                statement("unarchive", "key_types"), {"relid": oid, "names": list(final.key_names)}
            ).fetchone()[0]
            rel = Rel(final.schema, final.table, oid, final.key_names, tuple(types or ()))
            blocked = bool(deferrable) and bool(
                blockers(self.conn, Touched(oid, rel.qualified, False, tuple(deferrable)))
            )
            self.tables[cache_key] = TableFacts(rel, tuple(insertable or ()), tuple(deferrable), blocked)
        return self.tables[cache_key]

    def checks_declared_key(self, final: Final) -> bool:
        """Rows of the key's own table are held to the declared key here while it is not in the catalog (nothing
        else would refuse an orphan, or a row below an orphan that stays deleted)."""
        return final.rel == (self.spec.schema, self.spec.table) and not self.state.key_added


def restore_archived(
    conn: psycopg.Connection,
    spec: ForeignKeySpec,
    state: TargetState,
    settings: RunSettings,
    run_id: str,
    restore_id: str,
) -> dict[str, Any]:
    """Put back what run ``run_id`` deleted and changed; a dry run only counts. The caller holds the run lock and
    has made the restore log (but for a dry run)."""
    has_columns, _has_index, _owns = archive_shape(conn, spec)
    has_log = table_info(conn, spec.audit_schema, spec.restore_log_table) is not None
    restore = Restore(conn, spec, state, settings, run_id, restore_id, has_columns, has_log)
    _refuse_inexact(restore)
    tally = Tally()
    _restore_rows(restore, tally)
    _restore_pointers(restore, tally)
    summary = tally.summary()
    log.info("restore: run %s from %s: %s", run_id, spec.archive_qualified, summary)
    return summary


def _refuse_inexact(restore: Restore) -> None:
    """Triggers or rules added since the delete that a restore's writes would fire: refused before any write,
    as preflight refuses them before a delete."""
    tables = [
        Touched(relid, f"{schema}.{table}", deleted, tuple(changed))
        for schema, table, relid, deleted, changed in restore.conn.execute(
            statement("unarchive", "run_tables", archive=_archive(restore.spec)), {"run_id": restore.run_id}
        )
        if relid is not None
    ]
    problems = blocker_problems(restore.conn, tables, key=f"the key {restore.spec.constraint}")
    if problems:
        raise InvalidSettings(
            f"restore of run {restore.run_id!r} would not put rows back as they were: {'; '.join(problems)}. "
            "Nothing was changed"
        )


# --- the rows --------------------------------------------------------------------------------------------------


@dataclass
class Pending:
    """A row not back yet: its parent is missing (why "declared": by the declared key; "fk": a key of the
    database refused it, perhaps one that waits on it in turn) or the app holds what it needs ("busy")."""

    final: Final
    why: str


def _restore_rows(restore: Restore, tally: Tally) -> None:
    """A pass over every row; then the rows a key of the database refused go back together (they may wait on
    each other, or on a row later in the pass), and a pass over the rest, while that puts something back. What
    is still pending is counted."""
    pending = _row_pass(restore, tally, None)
    while pending and not restore.settings.dry_run:
        before = tally.counts["rows_restored"]
        waiting = [p.final for p in pending.values() if p.why == "fk"]
        for final in _together(restore, waiting) if waiting else []:
            tally.add(final, "restored")
            del pending[final.seq]
        if pending:
            pending = _row_pass(restore, tally, list(pending))
        if tally.counts["rows_restored"] == before:
            break
    for left in pending.values():
        tally.add(left.final, "busy" if left.why == "busy" else "parent_still_missing")


def _row_pass(restore: Restore, tally: Tally, only: list[int] | None) -> dict[int, Pending]:
    """One pass over the run's deleted rows (``only``: those still pending), chunk by chunk."""
    pending: dict[int, Pending] = {}
    for chunk in _finals(restore, ("deleted",), only):
        for final, (outcome, why) in zip(chunk, _chunk(restore, chunk, _put_back_row), strict=True):
            if only is None:
                tally.add_superseded(final)
            if outcome in ("parent_still_missing", "busy"):
                pending[final.seq] = Pending(final, why or outcome)
            elif outcome is not None:
                tally.add(final, outcome, why)
    return pending


def _put_back_row(restore: Restore, final: Final) -> Outcome:
    facts = restore.facts(final)
    if final.logged is not None:
        # A restore put it back before: never again. Gone now means the app deleted it since.
        return (
            (None, None)
            if final.logged
            else ("already_restored" if _row_now(restore, final) else "written_since", None)
        )
    image = _image(restore, final, facts)
    if not _declared_parent_holds(restore, final, image):
        return "parent_still_missing", "declared"
    if (
        restore.settings.dry_run
        or not restore.conn.execute(_insert_statement(facts.rel, image.columns), image.params()).rowcount
    ):
        now = _row_now(restore, final)
        if now is not None or not restore.settings.dry_run:
            # A row of that key (or holding one of its unique values) was written since, or is this one already.
            return ("already_restored" if now and now[0] else "written_since"), None
        return "restored", None
    _log(restore, final)
    return "restored", None


def _row_now(restore: Restore, final: Final) -> tuple[bool] | None:
    """The row of that key now, if any: (whether it is the image)."""
    facts = restore.facts(final)
    return restore.conn.execute(
        _row_now_statement(facts.rel), {"key": final.row_key, "text": final.row_text, "json": final.row_data}
    ).fetchone()


def _declared_parent_holds(restore: Restore, final: Final, image: Image) -> bool:
    if not restore.checks_declared_key(final):
        return True
    return bool(
        restore.conn.execute(statement("unarchive", "declared_parent", restore.spec), image.params()).fetchone()[0]
    )


def _together(restore: Restore, finals: list[Final]) -> list[Final]:
    """Rows a key of the database refused, perhaps because they wait on each other: all in one transaction,
    each with the nullable columns of its keys NULL at first (then set from its image), the others as they are,
    in passes while one goes in. First with DEFERRABLE keys checked at the end (rows that two NOT NULL keys tie
    go in only that way), then, where that check refuses, with every key checked at its statement."""
    for deferred in (True, False):
        restored = _together_once(restore, finals, deferred=deferred)
        if restored is not None:
            return restored
    return []


def _together_once(restore: Restore, finals: list[Final], *, deferred: bool) -> list[Final] | None:
    """The rows that went back; a row whose update is refused (its parent is really missing) is left out and
    the others tried again. None: the deferred keys' check at the end refused (which row, it does not say)."""
    conn = restore.conn
    candidates = list(finals)
    while candidates:
        refused = False
        with conn.transaction():
            _begin(restore)
            if deferred:
                conn.execute(statement("unarchive", "deferred"))
            inserted = _insert_while_any_goes(restore, candidates)
            failed = {
                f.seq for f in inserted if _deferred(restore, f) and not _attempt(restore, _update_deferred, restore, f)
            }
            # SET CONSTRAINTS ALL IMMEDIATE checks what the deferred keys left pending, now.
            refused = (
                deferred and not failed and not _attempt(restore, conn.execute, statement("unarchive", "immediate"))
            )
            if failed or refused:
                raise psycopg.Rollback()
            for final in inserted:
                _log(restore, final)
            _write_log(restore)
        if refused:
            return None
        if not failed:
            return inserted
        candidates = [f for f in inserted if f.seq not in failed]
    return []


def _insert_while_any_goes(restore: Restore, finals: list[Final]) -> list[Final]:
    inserted: list[Final] = []
    left = finals
    while left:
        went = [f for f in left if _attempt(restore, _insert_deferred, restore, f)]
        if not went:
            break
        inserted += went
        left = [f for f in left if f not in went]
    return inserted


def _deferred(restore: Restore, final: Final) -> tuple[str, ...]:
    """The columns a row of a cycle goes in without (none where an UPDATE of them would fire a trigger)."""
    facts = restore.facts(final)
    return () if facts.update_blocked else facts.deferrable


def _insert_deferred(restore: Restore, final: Final) -> None:
    facts = restore.facts(final)
    image = _image(restore, final, facts)
    params = image.params(_deferred(restore, final))
    if not restore.conn.execute(_insert_statement(facts.rel, image.columns), params).rowcount:
        raise pgerrors.UniqueViolation("a row of that key was written since")


def _update_deferred(restore: Restore, final: Final) -> None:
    facts = restore.facts(final)
    restore.conn.execute(
        _update_deferred_statement(facts.rel, _deferred(restore, final)),
        {**_image(restore, final, facts).params(), "key": final.row_key},
    )


def _attempt(restore: Restore, act: Callable[..., Any], *args: Any) -> bool:
    """``act(*args)`` in a savepoint: whether it went through."""
    try:
        with restore.conn.transaction():
            act(*args)
    except psycopg.Error:
        if restore.conn.broken:
            raise
        return False
    return True


# --- the pointers ----------------------------------------------------------------------------------------------


def _restore_pointers(restore: Restore, tally: Tally) -> None:
    """The pointers the cascade nulled or reset, of rows that are still there: one pass, after the rows (their
    parents among them)."""
    for chunk in _finals(restore, tuple(CHANGES.values()), None):
        for final, (outcome, why) in zip(chunk, _chunk(restore, chunk, _put_back_pointer), strict=True):
            tally.add_superseded(final)
            if outcome is not None:
                tally.add(final, outcome, why)


def _put_back_pointer(restore: Restore, final: Final) -> Outcome:
    conn = restore.conn
    if final.logged is not None:
        return (None, None) if final.logged else ("already_restored", None)
    facts = restore.facts(final)
    image = _image(restore, final, facts)
    if not _declared_parent_holds(restore, final, image):
        return "parent_still_missing", "declared"
    params = {
        **image.params(),
        "key": final.row_key,
        "xmin": final.batch % LOW_32_BITS,
        "relid": final.relid,
        "filenode": final.filenode,
        "written": final.written,
    }
    columns = final.pointer_columns
    if not restore.settings.dry_run and conn.execute(_put_back_statement(facts.rel, columns), params).fetchone()[0]:
        _log(restore, final)
        return "restored", None
    now = conn.execute(_pointer_now_statement(facts.rel, columns), params).fetchone()
    if now is None:
        return "written_since", None  # the row is gone: deleted since
    ours, same = now
    if ours:
        return ("restored", None) if restore.settings.dry_run else ("busy", "busy")
    return ("already_restored" if same else "written_since"), None


# --- shared ----------------------------------------------------------------------------------------------------


def _finals(restore: Restore, actions: tuple[str, ...], only: list[int] | None) -> Iterator[list[Final]]:
    """The run's last records of the given actions (``only``: of these seqs), ``batch_size`` at a time, from one
    held cursor: the query (each row's story read by the archive's index) runs once per pass, and the worker
    holds one chunk."""
    conn = restore.conn
    with conn.transaction():
        set_local_timeouts(
            conn, lock_timeout_ms=restore.settings.lock_timeout_ms, statement_timeout_ms=FINALS_STATEMENT_TIMEOUT_MS
        )
        cursor = conn.cursor(FINALS_CURSOR, withhold=True)
        cursor.execute(
            _finals_statement(restore.spec, restore.exact_columns, restore.has_log),
            {
                "run_id": restore.run_id,
                "actions": list(actions),
                "only": only,
                "restore_id": restore.restore_id,
                "audit_name": restore.spec.archive_qualified,
            },
        )
    try:
        while chunk := cursor.fetchmany(restore.settings.batch_size):
            yield [Final.of(row) for row in chunk]
    finally:
        if not conn.closed and not conn.broken:
            cursor.close()


def _chunk(restore: Restore, chunk: list[Final], one: Callable[[Restore, Final], Outcome]) -> list[Outcome]:
    """One chunk in one short transaction, each row in a savepoint; a chunk whose commit fails (a deferred check
    no statement ran) goes again one row per transaction."""
    conn = restore.conn
    try:
        with conn.transaction():
            _begin(restore)
            outcomes = [_in_savepoint(restore, final, one) for final in chunk]
            _write_log(restore)
            return outcomes
    except psycopg.Error as error:
        if conn.broken:
            raise
        if len(chunk) == 1:
            return [_outcome_of(error)]
    return [outcome for final in chunk for outcome in _chunk(restore, [final], one)]


def _in_savepoint(restore: Restore, final: Final, one: Callable[[Restore, Final], Outcome]) -> Outcome:
    if final.logged is not None:
        return one(restore, final)  # put back before: only read (an error here sends the chunk row by row)
    try:
        with restore.conn.transaction():
            return one(restore, final)
    except psycopg.Error as error:
        if restore.conn.broken:
            raise
        return _outcome_of(error)


def _outcome_of(error: psycopg.Error) -> Outcome:
    if isinstance(error, pgerrors.ForeignKeyViolation):
        return "parent_still_missing", "fk"
    if isinstance(error, TAKEN):
        return "written_since", None  # a row of that key was written since (by the app, or another run's restore)
    if isinstance(error, BUSY_ERRORS):
        return "busy", "busy"
    return "failed", f"{error.sqlstate} {error.diag.message_primary or error}"


def _begin(restore: Restore) -> None:
    """A restore transaction's settings: timeouts, the formats the archive was written in, the setting triggers
    step aside on, and every deferred check at its statement."""
    conn = restore.conn
    lock_timeout_ms = restore.settings.lock_timeout_ms
    set_local_timeouts(conn, lock_timeout_ms=lock_timeout_ms, statement_timeout_ms=STATEMENT_TIMEOUT_MS)
    restore.log.clear()
    conn.execute(statement("cascade", "pin_formats"))
    conn.execute(statement("unarchive", "begin_restore"))
    conn.execute(statement("unarchive", "immediate"))


def _image(restore: Restore, final: Final, facts: TableFacts) -> Image:
    """The row's own text where it still reads back as the archived row (exact: -0, json as written, array
    bounds), else its jsonb, written to the columns it has (a column added since gets its default)."""
    if final.row_text is not None and _text_reads_back(restore, final, facts):
        return Image(final.row_text, "{}", facts.insertable)
    names = set(json.loads(final.row_data))
    return Image(None, final.row_data, tuple(name for name in facts.insertable if name in names))


def _text_reads_back(restore: Restore, final: Final, facts: TableFacts) -> bool:
    """Asked once per table and archiving batch: the rows one batch archived of one table share the layout of
    its columns then, and the table has one now."""
    asked = (final.schema, final.table, final.origin)
    if asked not in restore.text_reads:
        try:
            with restore.conn.transaction():
                restore.text_reads[asked] = bool(
                    restore.conn.execute(
                        statement("unarchive", "text_reads_back", rel=facts.rel.ident),
                        {"text": final.row_text, "json": final.row_data},
                    ).fetchone()[0]
                )
        except psycopg.DataError:
            restore.text_reads[asked] = False  # the table's columns changed since: its text is not its row now
    return restore.text_reads[asked]


def _log(restore: Restore, final: Final) -> None:
    """The row's records, for the restore log: written with the transaction that put the row back."""
    restore.log += [
        {
            "row_key": final.log_key(action, via),
            "what": "the whole row" if action == "deleted" else f"{action} columns {', '.join(columns)}",
        }
        for action, via, columns in final.members
    ]


def _write_log(restore: Restore) -> None:
    if restore.log and not restore.settings.dry_run:
        restore.conn.execute(
            statement("unarchive", "log_restored", restore.spec),
            {
                "restore_id": restore.restore_id,
                "audit_name": restore.spec.archive_qualified,
                "run_id": restore.run_id,
                "entries": json.dumps(restore.log),
            },
        )
    restore.log.clear()


# --- statements ------------------------------------------------------------------------------------------------


@cache
def _finals_statement(spec: ForeignKeySpec, exact_columns: bool, has_log: bool) -> sql.Composed:
    """final_records, on an earlier version's archive too (its rows have no exact image nor chain: each record
    is its own, restored from its jsonb, a pointer where the row is its own batch's version)."""

    def column(name: str, type_name: str) -> sql.Composable:
        return sql.Identifier("a", name) if exact_columns else sql.SQL(f"NULL::{type_name}")  # type: ignore[arg-type]

    logged = statement("unarchive", "logged", spec) if has_log else statement("unarchive", "nothing_logged")
    return statement(
        "unarchive",
        "final_records",
        archive=_archive(spec),
        a_row_text=column("row_text", "text"),
        a_filenode=column("filenode", "oid"),
        a_written_md5=column("written_md5", "text"),
        a_prior_intact=column("prior_intact", "boolean"),
        logged=logged,
    )


def _on_one_row(name: str, rel: Rel, **fragments: sql.Composable) -> sql.Composed:
    """The unarchive statement ``name`` on one row of ``rel``, found by its row key bound typed (``k``)."""
    assert rel.row_key is not None
    return statement(
        "unarchive",
        name,
        rel=rel.ident,
        key=typed_keys("key", "k", rel, one=True),
        t_is_k=keysql.equal("t", rel.row_key, "k", rel.row_key),
        **fragments,
    )


@cache
def _row_now_statement(rel: Rel) -> sql.Composed:
    return _on_one_row("row_now", rel)


@cache
def _insert_statement(rel: Rel, columns: tuple[str, ...]) -> sql.Composed:
    return statement(
        "unarchive",
        "insert_image",
        rel=rel.ident,
        columns=keysql.names(columns),
        r_columns=keysql.names(columns, "r"),
    )


@cache
def _update_deferred_statement(rel: Rel, columns: tuple[str, ...]) -> sql.Composed:
    return _on_one_row("update_deferred", rel, set_from_r=keysql.set_from("r", columns, columns))


@cache
def _put_back_statement(rel: Rel, columns: tuple[str, ...]) -> sql.Composed:
    return _on_one_row(
        "put_back_pointer", rel, ours=statement("unarchive", "ours"), set_from_r=keysql.set_from("r", columns, columns)
    )


@cache
def _pointer_now_statement(rel: Rel, columns: tuple[str, ...]) -> sql.Composed:
    return _on_one_row(
        "pointer_now",
        rel,
        ours=statement("unarchive", "ours"),
        t_columns=keysql.names(columns, "t"),
        r_columns=keysql.names(columns, "r"),
    )
