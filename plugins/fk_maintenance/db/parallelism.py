"""How many parallel workers each step's statement may use: the one home of the ``parallel_workers`` decision.

By default (``parallel_workers`` = auto) the choice is made right before the step's statement from what the
server allows (max_parallel_workers_per_gather, max_parallel_maintenance_workers, max_parallel_workers,
max_worker_processes, the parallel workers already running), the server's cores, and how many sessions are busy
on the server. A helper worker is a whole core taken from whoever else wants it: the rule gives our statement
only the cores left after one per busy session and one for our own process, and never more than the server's
own settings. An explicit ``parallel_workers`` >= 0 wins; -1 keeps the server's own settings untouched.

The server's cores: PostgreSQL does not expose them. When the server's backend is a process of this very host
(the same process, checked by pid and start time, not just a local address: a localhost port may be a tunnel or
a cloud proxy to another machine), its CPU affinity is read. Otherwise a ``max_parallel_workers`` that the DBA
set away from PostgreSQL's default is taken as the cores (tuning guides set it to the core count); failing that,
2 cores are assumed, the smallest primary, so an unattended run never takes the app's cores on a server it
cannot see.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import psycopg

from fk_maintenance.db.sqlfiles import statement
from fk_maintenance.keys.settings import AUTO_PARALLEL_WORKERS, SERVER_PARALLEL_WORKERS, RunSettings

log = logging.getLogger(__name__)

# With the server's cores unknown and max_parallel_workers at its default: the smallest primary one would run.
ASSUMED_CPUS = 2
# A session that ran a statement this recently counts as busy: an app session writing every 10 ms is idle at
# almost every instant, so a snapshot of state = 'active' alone would not see it.
BUSY_WITHIN_MS = 1000


@dataclass(frozen=True)
class ServerParallelism:
    """What the server allows and how busy it is, read right before a statement."""

    per_gather: int  # max_parallel_workers_per_gather as the session has it (role, database or server)
    maintenance: int  # max_parallel_maintenance_workers, likewise
    max_parallel_workers: int
    max_worker_processes: int
    parallel_workers_running: int  # other statements' parallel workers, on the whole server
    busy_sessions: int  # other sessions (any database) that ran a statement within BUSY_WITHIN_MS
    unseen_sessions: int  # other roles' sessions whose state we may not read (counted among the busy)
    cpus: int
    cpus_source: str  # how the cores were learned, for the log


@dataclass(frozen=True)
class ParallelChoice:
    per_gather: int | None  # None: the server's own setting is left alone
    maintenance: int | None
    reason: str


def choose_parallel_workers(requested: int, server: ServerParallelism | None) -> ParallelChoice:
    """The workers for one statement: ``requested`` >= 0 as given, -1 the server's own, auto from ``server``."""
    if requested == SERVER_PARALLEL_WORKERS:
        return ParallelChoice(None, None, "parallel_workers -1: the server's own settings")
    if requested >= 0:
        return ParallelChoice(requested, requested, f"parallel_workers {requested} as set for the run")
    if requested != AUTO_PARALLEL_WORKERS or server is None:
        raise ValueError(f"parallel_workers {requested}: auto ({AUTO_PARALLEL_WORKERS}) needs the server's figures")
    # Our own process keeps one core; every busy session (and every running parallel worker) may want one.
    free_cores = server.cpus - 1 - server.busy_sessions - server.parallel_workers_running
    # PostgreSQL launches fewer workers than planned when its slots are taken; not counting on slots it would not
    # grant keeps the log honest.
    free_slots = min(server.max_parallel_workers, server.max_worker_processes) - server.parallel_workers_running
    workers = max(0, min(free_cores, free_slots))
    per_gather, maintenance = min(workers, server.per_gather), min(workers, server.maintenance)
    unseen = f" (incl. {server.unseen_sessions} of other roles we may not see: GRANT pg_read_all_stats)"
    reason = (
        f"auto: {server.cpus} cores ({server.cpus_source}), {server.busy_sessions} other sessions busy in the last "
        f"{BUSY_WITHIN_MS} ms{unseen if server.unseen_sessions else ''}, {server.parallel_workers_running} parallel "
        f"workers running, 1 core for this statement's own process: {max(0, free_cores)} cores free; "
        f"{max(0, free_slots)} worker slots free (max_parallel_workers {server.max_parallel_workers}, "
        f"max_worker_processes {server.max_worker_processes}); never above the server's "
        f"max_parallel_workers_per_gather {server.per_gather} and max_parallel_maintenance_workers "
        f"{server.maintenance}"
    )
    return ParallelChoice(per_gather, maintenance, reason)


def read_server_parallelism(conn: psycopg.Connection) -> ServerParallelism:
    row = conn.execute(statement("session", "parallel_facts"), {"busy_within_ms": BUSY_WITHIN_MS}).fetchone()
    assert row is not None
    per_gather, maintenance, max_parallel, max_processes, max_parallel_tuned, running, busy, unseen = row
    cpus, source = _server_cpus(conn)
    if cpus is None:
        cpus, source = (
            (max_parallel, "not visible from this host; max_parallel_workers as the DBA set it")
            if max_parallel_tuned
            else (ASSUMED_CPUS, "not visible from this host and max_parallel_workers untuned: assumed")
        )
    return ServerParallelism(per_gather, maintenance, max_parallel, max_processes, running, busy, unseen, cpus, source)


def apply_parallel_workers(conn: psycopg.Connection, settings: RunSettings, step: str) -> ParallelChoice:
    """Decide and set (for the session; the step's session restores it) the parallel workers of ``step``'s
    statement, and log the choice with its reason."""
    auto = settings.parallel_workers == AUTO_PARALLEL_WORKERS
    choice = choose_parallel_workers(settings.parallel_workers, read_server_parallelism(conn) if auto else None)
    if choice.per_gather is None or choice.maintenance is None:
        log.info("%s: parallel workers as the server's settings say (%s)", step, choice.reason)
        return choice
    conn.execute(
        statement("session", "limit_parallel_workers"),
        {"per_gather": str(choice.per_gather), "maintenance": str(choice.maintenance)},
    )
    log.info(
        "%s: up to %d parallel workers per query, %d for an index build (%s)",
        step,
        choice.per_gather,
        choice.maintenance,
        choice.reason,
    )
    return choice


def _server_cpus(conn: psycopg.Connection) -> tuple[int | None, str]:
    """The cores the server's backend may run on, when that backend is a process of this host."""
    pid = conn.info.backend_pid
    proc = Path(f"/proc/{pid}")
    try:
        if "postgres" not in (proc / "comm").read_text() + (proc / "cmdline").read_text(errors="replace"):
            return None, ""
        # The same pid may be another process here (another pid namespace, a tunnel to a remote server): it is our
        # backend only if it started when the server says our backend did.
        ticks = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line[:5] == "btime")
        started_here = boot + ticks / os.sysconf("SC_CLK_TCK")
        started_there = conn.execute(statement("session", "backend_start_epoch")).fetchone()
        if started_there is None or abs(started_here - float(started_there[0])) > 2.0:
            return None, ""
        return len(os.sched_getaffinity(pid)), "this host, the backend's CPU affinity"
    except (OSError, ValueError, IndexError, StopIteration):
        return None, ""
