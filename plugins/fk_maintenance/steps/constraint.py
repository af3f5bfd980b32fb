"""Adding the foreign key NOT VALID under a short lock, and validating it inside the low-traffic window."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg import errors as pgerrors
from psycopg import sql

from fk_maintenance.db.catalog import require_target, still_partition, table_info
from fk_maintenance.db.session import (
    CATALOG_STATEMENT_TIMEOUT_MS,
    CONFLICTS_WITH_ACCESS_EXCLUSIVE,
    CONFLICTS_WITH_SHARE_ROW_EXCLUSIVE,
    LockAttempts,
    budgeted_statement,
    lock_budget,
    run_lock,
    set_local_timeouts,
    step_session,
    with_lock_retries,
)
from fk_maintenance.db.sqlfiles import statement
from fk_maintenance.db.target_state import TargetState
from fk_maintenance.db.topology import worst_replica_lag
from fk_maintenance.errors import LockNotAcquired, StepOutOfOrder, ValidationCutShort, WindowsExhausted
from fk_maintenance.keys.settings import RunSettings
from fk_maintenance.keys.spec import ForeignKeySpec
from fk_maintenance.keys.window import Window, WindowDecision
from fk_maintenance.steps.orphans import BATCH_STATEMENT_TIMEOUT_MS, TableNames, sweep_orphans

log = logging.getLogger(__name__)

# Less than this left in the window is not worth starting a scan that would be cancelled anyway.
MIN_VALIDATE_SECONDS = 60
# Partitions created while the partitions' keys are validated are given one and validated too; a table the app
# keeps adding partitions to faster than that is retried later instead of chased.
ADOPTION_ROUNDS = 3


def _utcnow() -> datetime:
    return datetime.now(UTC)


def add_fk_not_valid(
    conn: psycopg.Connection,
    spec: ForeignKeySpec,
    settings: RunSettings,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """ADD CONSTRAINT ... NOT VALID, each attempt under a lock_timeout no longer than the configured one.

    From the moment it commits, every insert and update of the pointer is checked, so no new orphan can
    appear; existing rows are checked later by VALIDATE.
    """
    with step_session(
        conn,
        "add_fk_not_valid",
        settings,
        statement_timeout_ms=CATALOG_STATEMENT_TIMEOUT_MS,
        read_only=settings.dry_run,
    ):
        return _add_fk_not_valid(conn, spec, settings, sleep)


def parent_takes_not_valid(conn: psycopg.Connection) -> bool:
    """PostgreSQL 18 lets a partitioned table take a NOT VALID foreign key (its partitions get one each, validated
    one at a time); before 18 each partition takes its own and the parent adopts them once all are valid."""
    return conn.info.server_version >= 180000


def _add_fk_not_valid(
    conn: psycopg.Connection, spec: ForeignKeySpec, settings: RunSettings, sleep: Callable[[float], None]
) -> dict[str, Any]:
    started = time.monotonic()
    state = require_target(conn, spec)
    if state.key_on_every_row:
        log.info(
            "add_fk_not_valid: %s already exists (%s)",
            spec.constraint,
            state.constraint.definition or "on every partition",
        )
        return {
            "action": "none (already exists)",
            "validated": state.constraint.validated,
            "attempts": 0,
            "lock_timeouts": 0,
            "seconds": round(time.monotonic() - started, 3),
        }
    per_partition = state.partitioned and not parent_takes_not_valid(conn)
    if settings.dry_run:
        where = f"on each of {len(state.partitions_missing_key)} partition(s)" if per_partition else ""
        log.info("add_fk_not_valid: dry run, would add %s NOT VALID %s", spec.constraint, where)
        return {
            "action": f"dry run: would add NOT VALID {where}".strip(),
            "attempts": 0,
            "lock_timeouts": 0,
            "seconds": 0.0,
        }
    record = LockAttempts()
    with run_lock(conn, spec):
        adopted = adopt_equal_partition_keys(conn, spec, settings, record, sleep)
        if per_partition:
            added = add_partition_keys(conn, spec, settings, record, sleep)
        else:
            add_key_not_valid(conn, spec, settings, record, sleep, (spec.schema, spec.table))
            added = []
    seconds = time.monotonic() - started
    log.info(
        "add_fk_not_valid: %s added NOT VALID%s after %d attempt(s) (%d struck in a free moment, %d deferred for "
        "long transactions, %d lock timeouts; %.2f s watching pg_locks), in %.2f s",
        spec.constraint,
        f" on {len(added)} partition(s)" if per_partition else "",
        record.attempts,
        record.struck_in_gap,
        record.deferred,
        record.lock_timeouts,
        record.watched_seconds,
        seconds,
    )
    return {
        "action": f"added NOT VALID on {len(added)} partition(s)" if per_partition else "added NOT VALID",
        **({"partitions_added": added} if per_partition else {}),
        **({"adopted_partition_keys": adopted} if adopted else {}),
        "attempts": record.attempts,
        "struck_in_gap": record.struck_in_gap,
        "watched_seconds": round(record.watched_seconds, 3),
        "deferred_for_long_transactions": record.deferred,
        "lock_timeouts": record.lock_timeouts,
        "seconds": round(seconds, 3),
    }


def adopt_equal_partition_keys(
    conn: psycopg.Connection,
    spec: ForeignKeySpec,
    settings: RunSettings,
    record: LockAttempts,
    sleep: Callable[[float], None],
) -> list[str]:
    """Each partition's own key equal to the declared one under another name is renamed to the declared name, so
    it is the key the run validates there and the parent's adopts: never a second key beside it. Each rename
    takes ACCESS EXCLUSIVE on its partition for an instant, in a free moment, under lock_timeout_ms."""
    state = require_target(conn, spec)
    assert state.table is not None
    adopted = []
    for key in state.equal_keys:
        if key.relid == state.table.oid:  # the table's own: preflight refuses it
            continue
        rename = statement(
            "constraint",
            "rename_to_declared",
            spec,
            partition=sql.Identifier(key.schema, key.table),
            existing=sql.Identifier(key.name),
        )
        with_lock_retries(
            conn,
            spec,
            f"add_fk_not_valid (adopting {key.name} on {key.described})",
            budgeted_statement(conn, settings, rename),
            settings=settings,
            record=record,
            avoid_queueing_behind=CONFLICTS_WITH_ACCESS_EXCLUSIVE,
            sleep=sleep,
            tables=((key.schema, key.table),),
        )
        log.info(
            "add_fk_not_valid: %s on %s, equal to the declared key, renamed %s",
            key.name,
            key.described,
            spec.constraint,
        )
        adopted.append(f"{key.described}: {key.name} renamed {spec.constraint}")
    return adopted


def add_key_not_valid(
    conn: psycopg.Connection,
    spec: ForeignKeySpec,
    settings: RunSettings,
    record: LockAttempts,
    sleep: Callable[[float], None],
    table: tuple[str, str],
) -> None:
    """ADD CONSTRAINT ... NOT VALID on ``table`` (the child, or one partition of it), in a free moment of both
    tables, each attempt under a lock_timeout no longer than the configured one."""
    on_child = table == (spec.schema, spec.table)

    def exists() -> bool:
        if on_child:
            return require_target(conn, spec).constraint.exists
        # One partition's own catalog rows: the whole target's state reads every partition.
        partition = table_info(conn, *table)
        return partition is not None and (
            conn.execute(
                statement("catalog", "constraint_by_name"), {"relid": partition.oid, "name": spec.constraint}
            ).fetchone()
            is not None
        )

    def attempt(lock_timeout_ms: int) -> None:
        with conn.transaction():
            if exists():  # added by another run between our check and the attempt
                return
            # A parent's ADD locks every partition, one after the other: all of it within the configured timeout.
            with lock_budget(conn, lock_timeout_ms=lock_timeout_ms, budget_ms=settings.lock_timeout_ms):
                conn.execute(statement("constraint", "add_not_valid", spec, table=sql.Identifier(*table)))

    with_lock_retries(
        conn,
        spec,
        "add_fk_not_valid" if on_child else f"add_fk_not_valid (on {'.'.join(table)})",
        attempt,
        settings=settings,
        record=record,
        avoid_queueing_behind=CONFLICTS_WITH_SHARE_ROW_EXCLUSIVE,
        sleep=sleep,
        tables=tuple(dict.fromkeys((table, (spec.ref_schema, spec.ref_table)))),
    )


def add_partition_keys(
    conn: psycopg.Connection,
    spec: ForeignKeySpec,
    settings: RunSettings,
    record: LockAttempts,
    sleep: Callable[[float], None],
) -> list[str]:
    """A NOT VALID key on every partition without one (before PostgreSQL 18), listed again once the list is done:
    a partition created during the run has none until the parent holds the key."""
    added: list[str] = []
    while (state := require_target(conn, spec)).partitions_missing_key:
        for part in state.partitions_missing_key:
            if still_partition(conn, state, part):  # the app may detach one while the others get theirs
                add_key_not_valid(conn, spec, settings, record, sleep, part.qualified)
                added.append(part.described)
    return added


def decide_window(
    settings: RunSettings,
    *,
    now: datetime,
    run_started_at: datetime,
    min_validate_seconds: float = MIN_VALIDATE_SECONDS,
) -> WindowDecision:
    """Whether VALIDATE may start now, and if not, when to look again. Raises when windows ran out."""
    window = settings.window
    used = window.ends_between(run_started_at, now)
    if settings.validate_now:
        return WindowDecision(True, "validate_now set by the operator", windows_used=used)
    start, end = window.current_or_next(now)
    if start <= now and (end - now).total_seconds() >= min_validate_seconds:
        return WindowDecision(True, f"inside the window until {end.isoformat()}", window_end=end, windows_used=used)
    if used >= settings.max_windows:
        raise WindowsExhausted(
            f"validate_fk: {used} window(s) have passed since validation began at {run_started_at.isoformat()} "
            f"without a completed VALIDATE (max_windows={settings.max_windows}); the constraint stays NOT VALID "
            "(new writes are still checked). Trigger with validate_now, widen the window, or raise max_windows."
        )
    if start <= now:  # inside, but too little left: wait for the next window
        start, _ = window.current_or_next(end)
    return WindowDecision(
        False, f"outside the window; next window opens {start.isoformat()}", retry_at=start, windows_used=used
    )


def validation_gate(
    conn: psycopg.Connection,
    spec: ForeignKeySpec,
    settings: RunSettings,
    *,
    relids: list[int],
    now: datetime,
    run_started_at: datetime,
    min_validate_seconds: float = MIN_VALIDATE_SECONDS,
) -> WindowDecision:
    """The window, then the database's load and vacuum on the table (``relids``: it and its partitions, which
    autovacuum works on instead of a partitioned parent): whether VALIDATE may start now, or when to look
    again."""
    decision = decide_window(
        settings, now=now, run_started_at=run_started_at, min_validate_seconds=min_validate_seconds
    )
    if not decision.run_now:
        return decision
    reason = _load_gate(conn, spec, settings, relids=relids)
    if reason is None:
        return decision
    retry_at = now + timedelta(minutes=settings.recheck_minutes)
    if decision.window_end is not None and retry_at >= decision.window_end:
        retry_at = _next_window_start(settings.window, decision.window_end)
    return WindowDecision(False, reason, retry_at=retry_at, windows_used=decision.windows_used)


def validate_once(
    conn: psycopg.Connection,
    spec: ForeignKeySpec,
    settings: RunSettings,
    record: LockAttempts,
    *,
    deadline: datetime | None,
    now: Callable[[], datetime],
    sleep: Callable[[float], None],
    min_validate_seconds: float,
    table: tuple[str, str] | None = None,
) -> None:
    """One VALIDATE CONSTRAINT on the child (or ``table``, one of its partitions), with lock retries, under a
    statement_timeout ending at ``deadline`` (the window's end; None: ``index_timeout_min``). Raises
    ValidationCutShort when the window has too little left or the timeout ends the scan, and ForeignKeyViolation
    when the scan meets an orphan."""
    on = {} if table is None else {"table": sql.Identifier(*table)}

    def attempt(lock_timeout_ms: int) -> None:
        if deadline is None:
            statement_timeout_ms = settings.index_timeout_ms
            cut_by = f"its statement_timeout of {settings.index_timeout_min} min (validate_now)"
        else:
            statement_timeout_ms = int((deadline - now()).total_seconds() * 1000)
            cut_by = "the end of the window"
            if statement_timeout_ms < min_validate_seconds * 1000:
                raise ValidationCutShort(f"too little of the window left (it ends {deadline.isoformat()})")
        with conn.transaction():
            set_local_timeouts(conn, lock_timeout_ms=lock_timeout_ms, statement_timeout_ms=max(1, statement_timeout_ms))
            try:
                conn.execute(statement("constraint", "validate", spec, **on))
            except pgerrors.QueryCanceled as cancelled:
                if "statement timeout" not in (cancelled.diag.message_primary or ""):
                    raise  # cancelled by someone else: an error of its own, retried by Airflow
                raise ValidationCutShort(f"VALIDATE cut short by {cut_by}") from cancelled

    with_lock_retries(
        conn,
        spec,
        "validate_fk" if table is None else f"validate_fk (on {'.'.join(table)})",
        attempt,
        settings=settings,
        record=record,
        sleep=sleep,
        tables=None if table is None else (table, (spec.ref_schema, spec.ref_table)),
    )


def validate_partitions(
    conn: psycopg.Connection,
    spec: ForeignKeySpec,
    settings: RunSettings,
    record: LockAttempts,
    validate: Callable[[tuple[str, str] | None], None],
    sleep: Callable[[float], None],
    done: list[str],
) -> None:
    """A partitioned child's key: each partition's VALIDATE on its own (each commits, so a window that ends
    mid-way keeps the partitions done and the next goes on from there), then the parent's: on 18 its VALIDATE
    (which scans only what is not yet valid: nothing), before 18 the ADD that adopts the partitions' keys.
    Each partition validated is added to ``done`` as it is (a re-sweep calls this again)."""
    for _round in range(ADOPTION_ROUNDS):
        if not parent_takes_not_valid(conn):
            add_partition_keys(conn, spec, settings, record, sleep)  # partitions created since add_fk_not_valid
        for part in require_target(conn, spec).partitions_to_validate:
            validate(part.qualified)
            done.append(part.described)
            log.info("validate_fk: %s validated on %s", spec.constraint, part.described)
        if parent_takes_not_valid(conn):
            validate(None)
            return
        if adopt_partition_keys(conn, spec, settings, record, sleep):
            return
    raise LockNotAcquired(
        f"validate_fk: partitions of {spec.schema}.{spec.table} kept appearing without a valid key "
        f"{ADOPTION_ROUNDS} times before the parent could adopt the partitions' keys; Airflow retries the task"
    )


def adopt_partition_keys(
    conn: psycopg.Connection,
    spec: ForeignKeySpec,
    settings: RunSettings,
    record: LockAttempts,
    sleep: Callable[[float], None],
) -> bool:
    """Before 18: the parent's ADD, which adopts every partition's valid key without a scan. False when, with the
    parent locked, a partition turns out to lack a valid key (created since): nothing is added then."""

    def attempt(lock_timeout_ms: int) -> bool:
        with (
            conn.transaction(),
            lock_budget(conn, lock_timeout_ms=lock_timeout_ms, budget_ms=settings.lock_timeout_ms) as budget,
        ):
            conn.execute(statement("constraint", "lock_for_adoption", spec))
            state = require_target(conn, spec)
            if state.constraint.exists:
                return True
            if any(not (part.key_exists and part.key_validated) for part in state.partitions):
                return False
            budget.arm()  # what the LOCK left: the app waits on this transaction's locks since it took them
            conn.execute(statement("constraint", "add_adopting", spec))
            return True

    return with_lock_retries(
        conn,
        spec,
        "validate_fk (the parent adopts the partitions' keys)",
        attempt,
        settings=settings,
        record=record,
        # It takes ACCESS EXCLUSIVE on the referenced table: the app's reads of it would queue behind it too.
        avoid_queueing_behind=CONFLICTS_WITH_ACCESS_EXCLUSIVE,
        sleep=sleep,
    )


def validate_with_resweep(
    conn: psycopg.Connection,
    spec: ForeignKeySpec,
    settings: RunSettings,
    run_id: str,
    state: TargetState,
    validate: Callable[[], None],
) -> dict[str, Any] | None:
    """``validate()``; if it meets an orphan, sweep (audited, like null_orphans) and validate again. Returns the
    re-sweep's summary, or None when VALIDATE met no orphan. The caller holds the run lock."""
    try:
        validate()
        return None
    except pgerrors.ForeignKeyViolation as violation:
        # New writes are checked by the NOT VALID constraint since it landed, so an orphan here was written
        # between null_orphans and its arrival (or skipped because the app held the row). Sweeping only when
        # VALIDATE meets one keeps the usual cost at one scan.
        log.warning(
            "validate_fk: VALIDATE met an orphan written before the constraint landed (%s); "
            "re-sweeping orphans, then validating again",
            violation.diag.message_detail,
        )
    step = "validate_fk re-sweep"
    with step_session(conn, step, settings, statement_timeout_ms=BATCH_STATEMENT_TIMEOUT_MS):
        # Nobody approves the re-sweep: a delete key's re-sweep deletes no more than needs no approval.
        approved = 0 if state.policy == "delete" else None
        resweep = sweep_orphans(conn, spec, settings, run_id, state, step=step, approved_orphans=approved)
    validate()
    return resweep


def validate_fk(
    conn: psycopg.Connection,
    spec: ForeignKeySpec,
    settings: RunSettings,
    run_id: str,
    *,
    run_started_at: datetime,
    now: Callable[[], datetime] = _utcnow,
    sleep: Callable[[float], None] = time.sleep,
    min_validate_seconds: float = MIN_VALIDATE_SECONDS,
) -> dict[str, Any]:
    """VALIDATE CONSTRAINT inside the window (re-sweeping orphans only if it meets one); otherwise say when to
    try again. ``run_started_at``: when this target's validation began waiting, from which windows are counted.

    Returns ``outcome`` "validated", "already validated", "dry run" or "reschedule" (with ``retry_at``).
    """
    started = time.monotonic()
    with step_session(
        conn, "validate_fk", settings, statement_timeout_ms=CATALOG_STATEMENT_TIMEOUT_MS, read_only=settings.dry_run
    ):
        state = require_target(conn, spec)
        if state.constraint.exists and state.constraint.validated:
            log.info("validate_fk: %s is already validated", spec.constraint)
            return {
                "outcome": "already validated",
                **_partition_progress(conn, spec, state, []),
                "seconds": round(time.monotonic() - started, 3),
            }
        assert state.table is not None
        decision = validation_gate(
            conn,
            spec,
            settings,
            relids=[state.table.oid, *(part.oid for part in state.partitions)],
            now=now(),
            run_started_at=run_started_at,
            min_validate_seconds=min_validate_seconds,
        )
        if settings.dry_run:
            return _dry_run_outcome(conn, spec, state, decision)
        _require_key_added(spec, state)
        if not decision.run_now:
            return _reschedule(decision.retry_at, decision.reason, started)
        return _validate_in_window(
            conn,
            spec,
            settings,
            run_id,
            state,
            decision,
            now=now,
            sleep=sleep,
            min_validate_seconds=min_validate_seconds,
            started=started,
        )


def _dry_run_outcome(
    conn: psycopg.Connection, spec: ForeignKeySpec, state: TargetState, decision: WindowDecision
) -> dict[str, Any]:
    log.info(
        "validate_fk: dry run; a real run would %s (%s)",
        "validate now" if decision.run_now else "wait",
        decision.reason,
    )
    return {
        "outcome": "dry run",
        "would_run_now": decision.run_now,
        "reason": decision.reason,
        **_partition_progress(conn, spec, state, []),
        "seconds": 0.0,
    }


def _require_key_added(spec: ForeignKeySpec, state: TargetState) -> None:
    if not state.key_added:
        raise StepOutOfOrder(
            f"validate_fk: {spec.constraint} does not exist on {spec.schema}.{spec.table}; add_fk_not_valid must "
            "succeed first (clear add_fk_not_valid and its downstream tasks, or trigger a new run)"
        )


def _validate_in_window(
    conn: psycopg.Connection,
    spec: ForeignKeySpec,
    settings: RunSettings,
    run_id: str,
    state: TargetState,
    decision: WindowDecision,
    *,
    now: Callable[[], datetime],
    sleep: Callable[[float], None],
    min_validate_seconds: float,
    started: float,
) -> dict[str, Any]:
    """VALIDATE (and the re-sweep it may need) under the run lock, ending by the window's end; a cut-short scan
    is rescheduled for the next window, or ends the run when it was the last one allowed."""
    record = LockAttempts()
    partitions_done: list[str] = []

    def validate_one(table: tuple[str, str] | None = None) -> None:
        validate_once(
            conn,
            spec,
            settings,
            record,
            deadline=decision.window_end,
            now=now,
            sleep=sleep,
            min_validate_seconds=min_validate_seconds,
            table=table,
        )

    def validate() -> None:
        if state.partitioned:
            validate_partitions(conn, spec, settings, record, validate_one, sleep, partitions_done)
        else:
            validate_one()

    try:
        with run_lock(conn, spec):
            resweep = validate_with_resweep(conn, spec, settings, run_id, state, validate)
    except ValidationCutShort as cut:
        later = _after_cut_short(cut, settings, decision, at=now(), started=started)
        return {**later, **_partition_progress(conn, spec, state, partitions_done)}
    lag = worst_replica_lag(conn)  # VALIDATE cannot be throttled for replicas; its cost to them is reported
    seconds = time.monotonic() - started
    log.info("validate_fk: %s validated in %.1f s (%s)", spec.constraint, seconds, decision.reason)
    return {
        "outcome": "validated",
        "reason": decision.reason,
        "replica_lag_after_s": lag,
        "resweep": resweep or {"nulled": 0, "audited": 0, "skipped": "VALIDATE met no orphan"},
        **_partition_progress(conn, spec, state, partitions_done),
        "attempts": record.attempts,
        "lock_timeouts": record.lock_timeouts,
        "seconds": round(seconds, 3),
    }


def _after_cut_short(
    cut: ValidationCutShort, settings: RunSettings, decision: WindowDecision, *, at: datetime, started: float
) -> dict[str, Any]:
    """A VALIDATE the window's end cut short: tried again in the next window, unless it was the last allowed."""
    log.warning("validate_fk: %s; the constraint stays NOT VALID", cut)
    if decision.windows_used + 1 >= settings.max_windows:
        raise WindowsExhausted(
            f"validate_fk: VALIDATE did not finish within the window {settings.max_windows} time(s) ({cut}); "
            "the constraint stays NOT VALID. Widen the window or trigger with validate_now."
        ) from None
    return _reschedule(_next_window_start(settings.window, at), str(cut), started)


def _partition_progress(
    conn: psycopg.Connection, spec: ForeignKeySpec, state: TargetState, validated_now: list[str]
) -> dict[str, Any]:
    """For a partitioned child: how many partitions hold a valid key (the report's "partitions done")."""
    if not state.partitioned:
        return {}
    partitions = require_target(conn, spec, reads_only=True).partitions
    return {
        "partitions_validated": sum(part.key_validated for part in partitions),
        "partitions": len(partitions),
        "partitions_validated_now": validated_now,
    }


def _next_window_start(window: Window, after: datetime) -> datetime:
    """The start of the first window that opens after ``after`` (not the one already open)."""
    start, end = window.current_or_next(after)
    return start if start > after else window.current_or_next(end)[0]


def _reschedule(retry_at: datetime | None, reason: str, started: float) -> dict[str, Any]:
    assert retry_at is not None
    log.info("validate_fk: not now (%s); try again at %s", reason, retry_at.isoformat())
    return {
        "outcome": "reschedule",
        "retry_at": retry_at.isoformat(),
        "reason": reason,
        "seconds": round(time.monotonic() - started, 3),
    }


def _load_gate(
    conn: psycopg.Connection, spec: ForeignKeySpec, settings: RunSettings, *, relids: list[int]
) -> str | None:
    """A reason not to start VALIDATE now, even inside the window, or None."""
    vacuum = conn.execute(statement("catalog", "wraparound_vacuum"), {"relids": relids}).fetchone()
    if vacuum is not None:
        # VALIDATE would queue behind (or conflict with) a vacuum that does not yield.
        pid, _query, relid = vacuum
        where = "" if relid == relids[0] else f"'s partition {'.'.join(TableNames(conn)[relid])}"
        return f"an anti-wraparound autovacuum runs on {spec.schema}.{spec.table}{where} (pid {pid})"
    if settings.max_active_sessions:
        active = conn.execute(statement("catalog", "active_sessions")).fetchone()[0]
        if active > settings.max_active_sessions:
            return f"{active} active sessions, above the threshold of {settings.max_active_sessions}"
    return None
