"""Session discipline shared by every step: explicit timeouts, a visible application_name, the run lock,
and bounded retries of a lock-taking transaction."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import TypeVar

import psycopg
from psycopg import errors as pgerrors
from psycopg import sql

from fk_maintenance.db.parallelism import apply_parallel_workers
from fk_maintenance.db.sqlfiles import statement
from fk_maintenance.db.topology import Route, require_session_capable_route
from fk_maintenance.errors import ConcurrentRun, LockNotAcquired
from fk_maintenance.keys.settings import RunSettings
from fk_maintenance.keys.spec import ForeignKeySpec

log = logging.getLogger(__name__)

# What every target connection gets unless its extra (or the --dsn) says otherwise: a dead host fails in
# seconds, and a connection that goes quiet behind a firewall is noticed.
LIBPQ_DEFAULTS = {"connect_timeout": 10, "keepalives": 1, "keepalives_idle": 30}
# A step that finds another session at our work (the run lock, our index being built) waits this long between
# looks, and at most as long as our own index build may take (index_timeout_min) plus this grace, counted from
# its target's start (in a fleet, a target may start hours into the run); then it fails and retries take over.
CONCURRENT_RUN_RECHECK = timedelta(seconds=15)
CONCURRENT_RUN_GRACE = timedelta(hours=1)
T = TypeVar("T")

APPLICATION_NAME = "kpi-fk-maintenance"


# Catalog reads and DDL that does no scan finish in milliseconds; a minute means something is wrong.
CATALOG_STATEMENT_TIMEOUT_MS = 60_000
# A worker killed mid-transaction must not leave a session holding row locks for long.
IDLE_IN_TRANSACTION_TIMEOUT = "60s"
# PostgreSQL 14+: while a long statement runs, notice within seconds that the worker died and roll back.
CLIENT_CONNECTION_CHECK_INTERVAL = "2s"
# Every session setting a step makes, so that all of them are put back when the step ends.
STEP_SESSION_SETTINGS = (
    "application_name",
    "lock_timeout",
    "statement_timeout",
    "idle_in_transaction_session_timeout",
    "default_transaction_read_only",
    "max_parallel_workers_per_gather",
    "max_parallel_maintenance_workers",
    "client_connection_check_interval",
)


@contextmanager
def step_session(
    conn: psycopg.Connection,
    step: str,
    settings: RunSettings,
    *,
    statement_timeout_ms: int,
    lock_timeout_ms: int | None = None,
    read_only: bool = False,
) -> Iterator[Route]:
    """This step's own timeouts and name on the session for the block, and the previous values again after it.

    Nothing is inherited from the role or database, and nothing of this step outlives it: a step that calls
    another step's body inside its own block gets its own settings back. ``lock_timeout_ms`` defaults to the
    run's; the parallel workers are chosen by ``fk_maintenance.db.parallelism``. Before anything is set, a
    connection through a transaction-mode pooler is refused (see topology); the block gets the connection's route.
    """
    conn.autocommit = True
    route = require_session_capable_route(conn)
    previous = conn.execute(statement("session", "current_settings"), {"names": list(STEP_SESSION_SETTINGS)}).fetchall()
    conn.execute(
        statement("session", "configure"),
        {
            "application_name": f"{APPLICATION_NAME}:{step}",
            "lock_timeout": f"{settings.lock_timeout_ms if lock_timeout_ms is None else lock_timeout_ms}ms",
            "statement_timeout": f"{statement_timeout_ms}ms",
            "idle_in_transaction_session_timeout": IDLE_IN_TRANSACTION_TIMEOUT,
            "read_only": "on" if read_only else "off",
        },
    )
    # Decided here, right before the step's one big statement (its scan or build), from the load of this moment.
    apply_parallel_workers(conn, settings, step)
    conn.execute(statement("session", "check_client_connection"), {"interval": CLIENT_CONNECTION_CHECK_INTERVAL})
    try:
        yield route
    finally:
        if not conn.closed and not conn.broken:
            _restore(conn, previous)


def _restore(conn: psycopg.Connection, previous: list[tuple[str, str, bool]]) -> None:
    own = [(name, value) for name, value, set_by_session in previous if set_by_session]
    if own:
        conn.execute(
            statement("session", "restore_settings"),
            {"names": [name for name, _ in own], "values": [value for _, value in own]},
        )
    for name, _value, set_by_session in previous:
        if not set_by_session:
            conn.execute(statement("session", "reset_setting", setting=sql.Identifier(name)))


def set_local_timeouts(conn: psycopg.Connection, *, lock_timeout_ms: int, statement_timeout_ms: int) -> None:
    """Timeouts for the current transaction only (``SET LOCAL``)."""
    conn.execute(
        statement("session", "configure_local"),
        {"lock_timeout": f"{lock_timeout_ms}ms", "statement_timeout": f"{statement_timeout_ms}ms"},
    )


class LockBudget:
    """The time one attempt's statements may spend in all, waiting for locks included: a statement on a
    partitioned table takes a lock per partition, each under its own lock_timeout, and the app's statements on a
    partition already locked wait for every later lock too. ``arm()`` before each statement sets its
    statement_timeout to what is left (``SET LOCAL``); a statement cut by it is a lock timeout like any other
    (``with_lock_retries`` retries it). Only for statements that take locks and scan nothing."""

    def __init__(self, conn: psycopg.Connection, *, lock_timeout_ms: int, budget_ms: int) -> None:
        self._conn = conn
        self._lock_timeout_ms = lock_timeout_ms
        self._deadline = time.monotonic() + budget_ms / 1000

    def arm(self) -> None:
        left_ms = max(1, int((self._deadline - time.monotonic()) * 1000))
        set_local_timeouts(
            self._conn, lock_timeout_ms=min(self._lock_timeout_ms, left_ms), statement_timeout_ms=left_ms
        )


class LockBudgetSpent(LockNotAcquired):
    """A lock-taking statement ran out of its attempt's budget (see LockBudget)."""

    sqlstate = "57014"


@contextmanager
def lock_budget(conn: psycopg.Connection, *, lock_timeout_ms: int, budget_ms: int) -> Iterator[LockBudget]:
    """A LockBudget for the statements of the block (inside the attempt's transaction)."""
    budget = LockBudget(conn, lock_timeout_ms=lock_timeout_ms, budget_ms=budget_ms)
    budget.arm()
    try:
        yield budget
    except pgerrors.QueryCanceled as cancelled:
        if "statement timeout" not in (cancelled.diag.message_primary or ""):
            raise  # cancelled by someone else: an error of its own
        raise LockBudgetSpent(f"the attempt's {budget_ms} ms were spent waiting for locks") from cancelled


def budgeted_statement(conn: psycopg.Connection, settings: RunSettings, query: sql.Composable) -> Callable[[int], None]:
    """An attempt for with_lock_retries: ``query`` alone in its own transaction, each lock wait within the attempt's
    timeout and all of them together within the configured one (a statement on a partitioned table locks one
    partition after the other, and the app waits on every lock it took so far)."""

    def attempt(lock_timeout_ms: int) -> None:
        with (
            conn.transaction(),
            lock_budget(conn, lock_timeout_ms=lock_timeout_ms, budget_ms=settings.lock_timeout_ms),
        ):
            conn.execute(query)

    return attempt


@contextmanager
def run_lock(conn: psycopg.Connection, spec: ForeignKeySpec) -> Iterator[None]:
    """Hold the session-level advisory lock that serialises runs changing this foreign key.

    A second run (a manual trigger during the scheduled one, or another Airflow deployment) stops with a
    message naming the session that holds the lock. The lock is released with the session if the worker dies.
    """
    got = conn.execute(statement("session", "try_run_lock"), {"name": spec.advisory_lock_name}).fetchone()
    if not got or not got[0]:
        holder = conn.execute(statement("session", "run_lock_holder"), {"name": spec.advisory_lock_name}).fetchone()
        who = (
            f"pid {holder[0]} ({holder[1] or 'no application_name'}, since {holder[2]})"
            if holder
            else "another session"
        )
        raise ConcurrentRun(
            f"another run is changing {spec.constraint} on {spec.schema}.{spec.table}: {who} holds the run lock "
            f"{spec.advisory_lock_name!r}; this step changes nothing while it is held"
        )
    try:
        yield
    finally:
        if not conn.closed and not conn.broken:
            conn.execute(statement("session", "release_run_lock"), {"name": spec.advisory_lock_name})


@dataclass
class LockAttempts:
    """Record of a retried lock-taking statement, for the run's report."""

    attempts: int = 0
    lock_timeouts: int = 0
    deferred: int = 0  # attempts not tried because a long transaction held a conflicting lock
    struck_in_gap: int = 0  # attempts made the moment no conflicting transaction was open
    watched_seconds: float = 0.0  # time spent watching pg_locks for that moment


# Lock modes that conflict with SHARE ROW EXCLUSIVE, which ADD FOREIGN KEY takes on both tables.
CONFLICTS_WITH_SHARE_ROW_EXCLUSIVE = [
    "RowExclusiveLock",
    "ShareUpdateExclusiveLock",
    "ShareLock",
    "ShareRowExclusiveLock",
    "ExclusiveLock",
    "AccessExclusiveLock",
]
# Lock modes that conflict with SHARE, which CREATE INDEX (ON ONLY a partitioned parent) takes.
CONFLICTS_WITH_SHARE = [
    "RowExclusiveLock",
    "ShareUpdateExclusiveLock",
    "ShareRowExclusiveLock",
    "ExclusiveLock",
    "AccessExclusiveLock",
]
# ACCESS EXCLUSIVE conflicts with every mode, reads' ACCESS SHARE included.
CONFLICTS_WITH_ACCESS_EXCLUSIVE = ["AccessShareLock", "RowShareLock", *CONFLICTS_WITH_SHARE_ROW_EXCLUSIVE]
# Between attempts pg_locks is read this often, so an attempt lands within a few tens of milliseconds of the
# first moment no conflicting transaction is open (a hot app transaction may free its lock only briefly).
GAP_POLL_SECONDS = 0.02


@dataclass(frozen=True)
class LockHolder:
    pid: int
    mode: str
    granted: bool
    state: str
    transaction_ms: float | None
    query: str
    table: str

    def __str__(self) -> str:
        age = "no transaction" if self.transaction_ms is None else f"{self.transaction_ms / 1000:.1f} s"
        return (
            f"pid {self.pid} {self.mode}{'' if self.granted else ' (waiting)'} on {self.table} {self.state}, "
            f"transaction open {age}: {self.query}"
        )


def attempt_timeouts(lock_timeout_ms: int, attempts: int) -> list[int]:
    """lock_timeout of each attempt: growing from a quarter of the configured timeout up to it, never above.

    The configured value is the promise to the app (no statement waits on us longer), so growth stops there.
    """
    first = max(50, lock_timeout_ms // 4)
    return [min(lock_timeout_ms, first * 2**i) for i in range(attempts)]


def await_lock_gap(
    conn: psycopg.Connection,
    spec: ForeignKeySpec,
    modes: list[str],
    *,
    long_ms: int,
    watch_seconds: float,
    record: LockAttempts,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    tables: tuple[tuple[str, str], ...] | None = None,
    whole_trees: bool = True,
) -> list[LockHolder]:
    """Watch pg_locks until no other transaction holds a lock in ``modes`` on the key's tables (returns []), or for at
    most ``watch_seconds`` (a busy table may never be entirely free); then return the holders older than
    ``long_ms``, which an attempt must not queue behind (empty when only young ones are left)."""
    started = clock()
    try:
        while True:
            holders = lock_holders(conn, spec, modes=modes, tables=tables, whole_trees=whole_trees)
            if not holders:
                record.struck_in_gap += 1
                return []
            if clock() - started >= watch_seconds:
                return [h for h in holders if h.transaction_ms is not None and h.transaction_ms >= long_ms]
            sleep(GAP_POLL_SECONDS)
    finally:
        record.watched_seconds += clock() - started


def with_lock_retries(
    conn: psycopg.Connection,
    spec: ForeignKeySpec,
    what: str,
    body: Callable[[int], T],
    *,
    settings: RunSettings,
    record: LockAttempts,
    avoid_queueing_behind: list[str] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    tables: tuple[tuple[str, str], ...] | None = None,
    whole_trees: bool = True,
) -> T:
    """Run ``body(lock_timeout_ms_for_this_attempt)`` until it gets its lock, at most ``lock_attempts`` times,
    never waiting longer than ``lock_timeout_ms`` (the run's settings).

    ``body`` runs its own transaction with ``SET LOCAL lock_timeout``. With ``avoid_queueing_behind`` (the lock
    modes that make app statements queue behind ours), each attempt first watches pg_locks on both of the key's
    tables and strikes the moment no conflicting transaction is open; it is not even tried while a transaction
    older than the first attempt's timeout holds one of those locks, since it would only park the app's
    statements behind us for the whole timeout. Without it, attempts are spaced by jittered sleeps (so two
    waiters do not retry in step). ``tables``: the (schema, table) pairs the statement locks, when not the key's
    two tables (a statement on one partition); a partitioned table's partitions are watched with it unless the
    statement locks the parent alone (not ``whole_trees``: CREATE INDEX ON ONLY).
    """
    tables = tables or spec.tables
    attempts = settings.lock_attempts
    timeouts = attempt_timeouts(settings.lock_timeout_ms, attempts)
    watch = _gap_watch(conn, spec, avoid_queueing_behind, settings, record, sleep, (tables, whole_trees))
    holders: list[LockHolder] = []
    for number, timeout_ms in enumerate(timeouts, start=1):
        record.attempts += 1
        holders = watch()
        if holders:
            record.deferred += 1
            outcome = (
                f"not tried: no free moment in {settings.gap_watch_seconds:g} s, so the app does not queue behind us"
            )
        else:
            try:
                return body(timeout_ms)
            except (pgerrors.LockNotAvailable, pgerrors.DeadlockDetected, LockBudgetSpent) as exc:
                record.lock_timeouts += 1
                holders = lock_holders(conn, spec, tables=tables, whole_trees=whole_trees)
                outcome = f"did not get its lock within {timeout_ms} ms ({exc.sqlstate})"
        _log_attempt(what, number, attempts, outcome, tables, holders)
        if number < attempts and not avoid_queueing_behind:
            sleep(random.uniform(0, min(30.0, 0.5 * 2**number)))
    raise LockNotAcquired(
        f"{what}: no lock within {attempts} attempts (lock_timeout up to {settings.lock_timeout_ms} ms, "
        f"{record.deferred} not tried because of long transactions); nothing was changed. Sessions holding locks "
        f"on {_described(tables)}: {'; '.join(map(str, holders)) or 'none now'}. Airflow retries the task later."
    )


def _described(tables: tuple[tuple[str, str], ...]) -> str:
    return " and ".join(".".join(pair) for pair in tables)


def _log_attempt(
    what: str, number: int, attempts: int, outcome: str, tables: tuple[tuple[str, str], ...], holders: list[LockHolder]
) -> None:
    held = "; ".join(map(str, holders)) or "none now"
    log.warning(
        "%s: attempt %d/%d %s; sessions holding locks on %s: %s",
        what,
        number,
        attempts,
        outcome,
        _described(tables),
        held,
    )


def _gap_watch(
    conn: psycopg.Connection,
    spec: ForeignKeySpec,
    modes: list[str] | None,
    settings: RunSettings,
    record: LockAttempts,
    sleep: Callable[[float], None],
    watched: tuple[tuple[tuple[str, str], ...], bool],
) -> Callable[[], list[LockHolder]]:
    """What each attempt waits for first: a lock gap (await_lock_gap) on the ``watched`` tables (and whether their
    whole trees) when there are modes to avoid queueing behind, else nothing. "Long" is fixed at the first,
    shortest attempt's timeout: a conflicting transaction already open that long is not an OLTP write about to
    commit, whatever an attempt's timeout."""
    tables, whole_trees = watched
    if not modes:
        return lambda: []  # nothing to avoid: every attempt is made at once
    return partial(
        await_lock_gap,
        conn,
        spec,
        modes,
        long_ms=attempt_timeouts(settings.lock_timeout_ms, 1)[0],
        watch_seconds=settings.gap_watch_seconds,
        record=record,
        sleep=sleep,
        tables=tables,
        whole_trees=whole_trees,
    )


def lock_holders(
    conn: psycopg.Connection,
    spec: ForeignKeySpec,
    *,
    modes: list[str] | None = None,
    limit: int = 5,
    tables: tuple[tuple[str, str], ...] | None = None,
    whole_trees: bool = True,
) -> list[LockHolder]:
    """Sessions with locks on the key's tables (or ``tables``) and, with ``whole_trees``, their partitions; with
    ``modes``, only other transactions holding one of those (granted)."""
    schemas, names = zip(*(tables or spec.tables), strict=True)
    rows = conn.execute(
        statement("session", "lock_holders"),
        {"schemas": list(schemas), "tables": list(names), "modes": modes, "limit": limit, "trees": whole_trees},
    ).fetchall()
    return [LockHolder(*row) for row in rows]
