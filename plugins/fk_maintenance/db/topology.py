"""What sits between the pipeline and its database: a connection pooler (and in which mode), and the streaming
replicas behind a primary.

Through a pooler in session mode a client keeps one server connection for its whole life, so the pipeline's
session settings, held cursor and run lock stay its own, and the pool's reset (DISCARD ALL) clears them when
it leaves. In transaction mode every transaction may land on another server connection, one the app uses
next: a session setting of ours would leak into the app's sessions (a dry run's read-only default made the
app's inserts fail), and the run lock, the held cursor and the index build's timeouts cannot hold. So a
transaction-mode pool is refused before the first statement that sets anything.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import make_conninfo

from fk_maintenance.db.sqlfiles import statement
from fk_maintenance.errors import PoolerNotSupported, ReplicaLagging

log = logging.getLogger(__name__)
T = TypeVar("T")

DIRECT = "direct"
SESSION_POOLING = "session pooling"
TRANSACTION_POOLING = "transaction pooling"
# A second client that gets no server connection within this long is queued behind clients that each keep
# theirs for a whole session; a transaction pool frees one in milliseconds.
SECOND_CLIENT_WAIT_SECONDS = 2.0
# Rounds of looking for a transaction pool's tell-tales; in a busy or an idle pool one shows within a few.
PROBE_ROUNDS = 10


@dataclass(frozen=True)
class Route:
    mode: str
    detail: str


def route_of(conn: psycopg.Connection) -> Route:
    """How ``conn`` reaches the server: directly, or through a pooler in session or transaction mode.

    A pooler hands its clients a process id of its own (PgBouncer makes up a cancel key), so the server's
    pg_backend_pid() differs from the one the connection was given. Its mode shows in where transactions land:
    in transaction mode ours move between server connections when the pool is busy, and a second client asking
    right after one of ours ends gets the server connection it left (PgBouncer hands out the most recently
    freed one first) when it is not. In session mode neither ever happens, so a few rounds of looking decide.
    """
    given = conn.info.backend_pid
    first = _server_pid(conn)
    if first == given:
        return Route(DIRECT, f"server process {first}")
    conninfo = make_conninfo(conn.info.dsn, password=conn.info.password or None)
    evidence = _run_coroutine(_transaction_pooling_evidence(conn, conninfo, first))
    if evidence is not None:
        return Route(TRANSACTION_POOLING, evidence)
    return Route(SESSION_POOLING, f"{PROBE_ROUNDS} rounds kept server process {first} ours alone")


def require_session_capable_route(conn: psycopg.Connection) -> Route:
    """The route, or PoolerNotSupported (before anything is set) when it is a transaction-mode pool."""
    route = route_of(conn)
    if route.mode == TRANSACTION_POOLING:
        where = f"{conn.info.host}:{conn.info.port}/{conn.info.dbname}"
        raise PoolerNotSupported(
            f"the connection to {where} goes through a connection pooler in transaction pooling mode (PgBouncer "
            f"pool_mode = transaction; {route.detail}): the pipeline's session settings would reach the app's "
            "sessions, and its run lock, its held cursor and the index build's timeouts cannot span transactions "
            "there. Point the Airflow connection at the PostgreSQL server itself, or at a pool in session mode "
            "(pool_mode = session). Nothing was changed."
        )
    if route.mode == SESSION_POOLING:
        log.info("connection goes through a connection pooler in session mode (%s)", route.detail)
    return route


def _server_pid(conn: psycopg.Connection) -> int:
    return conn.execute(statement("session", "server_pid")).fetchone()[0]


def _run_coroutine(coroutine: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, also from a thread whose event loop is already running (then on a thread of its own)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


async def _transaction_pooling_evidence(conn: psycopg.Connection, conninfo: str, first: int) -> str | None:
    """What shows that our server connection is not ours between transactions, or None if nothing does."""
    for _ in range(PROBE_ROUNDS):
        if (again := _server_pid(conn)) != first:
            return f"our transactions ran on server processes {first} and {again}"
    try:
        async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as other:
            for _ in range(PROBE_ROUNDS):
                if (ours := _server_pid(conn)) != first:
                    return f"our transactions ran on server processes {first} and {ours}"
                cursor = await asyncio.wait_for(
                    other.execute(statement("session", "server_pid")), timeout=SECOND_CLIENT_WAIT_SECONDS
                )
                row = await cursor.fetchone()
                if row and row[0] == first:
                    return f"another client's transaction ran on server process {first}, right after ours"
    except TimeoutError:
        pass  # the second client queued for a server connection: the pool keeps one per client
    return None


@dataclass(frozen=True)
class ReplicaLag:
    replica: str
    seconds: float | None  # None: this role may not see it


def replica_lags(conn: psycopg.Connection) -> list[ReplicaLag]:
    """The replay lag of every streaming replica of this primary (none on a replica or a lone server)."""
    return [ReplicaLag(*row) for row in conn.execute(statement("catalog", "replica_lag")).fetchall()]


def worst_replica_lag(conn: psycopg.Connection) -> float | None:
    seen = [lag.seconds for lag in replica_lags(conn) if lag.seconds is not None]
    return max(seen) if seen else None


class ReplicaGate:
    """Holds a batch back while any replica's replay lag is above ``max_lag_s``; a bounded total wait, then a
    retryable failure. Replicas whose lag this role may not see are reported once and not waited for."""

    POLL_SECONDS = 0.25
    # The longest one step waits for replicas in all; then it fails and Airflow retries it later.
    MAX_TOTAL_WAIT_SECONDS = 15 * 60

    def __init__(
        self,
        conn: psycopg.Connection,
        max_lag_s: float,
        *,
        step: str,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._conn, self._max, self._step, self._sleep, self._clock = conn, max_lag_s, step, sleep, clock
        self.waited_seconds = 0.0
        self.waits = 0
        self._warned_invisible = False

    def wait(self) -> None:
        if not self._max:
            return
        started = self._clock()
        logged = False
        while True:
            lags = replica_lags(self._conn)
            if any(lag.seconds is None for lag in lags) and not self._warned_invisible:
                self._warned_invisible = True
                log.warning(
                    "%s: cannot see the replay lag of %s (grant pg_monitor to this role); not waiting for them",
                    self._step,
                    ", ".join(lag.replica for lag in lags if lag.seconds is None),
                )
            behind = [lag for lag in lags if lag.seconds is not None and lag.seconds > self._max]
            if not behind:
                break
            waited = self._clock() - started
            if self.waited_seconds + waited >= self.MAX_TOTAL_WAIT_SECONDS:
                raise ReplicaLagging(
                    f"{self._step}: replicas still lag more than max_replica_lag_s={self._max:g} s after waiting "
                    f"{(self.waited_seconds + waited) / 60:.0f} min in all ("
                    + ", ".join(f"{lag.replica}: {lag.seconds:.1f} s" for lag in behind)
                    + "); every batch so far is committed and audited. Airflow retries the task later."
                )
            if not logged:
                log.warning(
                    "%s: waiting, replica lag above %g s: %s",
                    self._step,
                    self._max,
                    ", ".join(f"{lag.replica} {lag.seconds:.1f} s" for lag in behind),
                )
                logged = True
                self.waits += 1
            self._sleep(self.POLL_SECONDS)
        if logged:
            waited = self._clock() - started
            self.waited_seconds += waited
            log.info("%s: replicas caught up after %.1f s; going on", self._step, waited)
