"""A stand-in for the goal-tracking app: client processes that insert KPIs, move them between parents, delete
leaves and read children by parent, each statement timed, every error kept. Used by the fault suite and the
benchmarks to measure what the app feels while a migration runs."""

from __future__ import annotations

import multiprocessing
import random
import statistics
import time
import uuid
from dataclasses import dataclass
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event

import psycopg
from psycopg import errors as pgerrors

WRITE_KINDS = ("insert", "move", "delete", "delete_parent")


@dataclass(frozen=True)
class Op:
    kind: str
    started: float
    seconds: float
    error: str | None


@dataclass
class WorkloadResult:
    ops: list[Op]
    inserted: set[uuid.UUID]
    deleted: set[uuid.UUID]
    touched: set[uuid.UUID]  # rows whose parent pointer the app itself changed (moved, or parent deleted)
    duration: float

    def writes(self) -> list[Op]:
        return [op for op in self.ops if op.kind in WRITE_KINDS]

    def errors(self, *, include_fk_rejections: bool = False) -> list[Op]:
        return [op for op in self.ops if op.error and (include_fk_rejections or op.error != "ForeignKeyViolation")]

    def fk_rejections(self) -> int:
        return sum(op.error == "ForeignKeyViolation" for op in self.ops)

    def latency(self, kinds: tuple[str, ...] | None = None) -> dict[str, float]:
        seconds = sorted(op.seconds for op in self.ops if kinds is None or op.kind in kinds)
        if not seconds:
            return {"count": 0, "p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}
        p99 = seconds[min(len(seconds) - 1, int(len(seconds) * 0.99))]
        return {
            "count": len(seconds),
            "p50_ms": round(statistics.median(seconds) * 1000, 2),
            "p99_ms": round(p99 * 1000, 2),
            "max_ms": round(seconds[-1] * 1000, 2),
        }

    def summary(self) -> str:
        writes = self.latency(WRITE_KINDS)
        reads = self.latency(("read",))
        return (
            f"{len(self.ops)} app statements in {self.duration:.1f} s; writes p50 {writes['p50_ms']} ms, "
            f"p99 {writes['p99_ms']} ms, worst {writes['max_ms']} ms; reads worst {reads['max_ms']} ms; "
            f"app errors {len(self.errors())}; FK rejections {self.fk_rejections()}"
        )


@dataclass
class AppWorkload:
    """Start with ``with AppWorkload(dsn) as app: ...``; ``app.result`` holds what it measured.

    Each client is its own process with its own connection, as app servers are: latencies then measure the
    database, not a shared interpreter lock.
    """

    dsn: str
    writers: int = 3
    readers: int = 1
    think_seconds: float = 0.002
    dangling_share: float = 0.0  # share of inserts pointing at a parent that does not exist
    delete_parent_share: float = 0.0  # share of write operations deleting an existing parent (with children)
    seed: int = 7
    # Behind a transaction-mode pooler the app must not use server-side prepared statements or session SETs.
    pooled: bool = False
    result: WorkloadResult | None = None

    def __enter__(self) -> AppWorkload:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            parents = [
                str(row[0])
                for row in conn.execute(
                    "SELECT id FROM vision_kpis WHERE level = 'weekly' ORDER BY id LIMIT 2000"
                ).fetchall()
            ]
        context = multiprocessing.get_context("spawn")
        self._stop = context.Event()
        self._results = context.Queue()
        self._ready = context.Queue()
        self._started_at = time.time()
        clients = [("write", i) for i in range(self.writers)] + [("read", i) for i in range(self.readers)]
        self._processes = []
        for role, number in clients:
            config = _ClientConfig(
                dsn=self.dsn,
                role=role,
                seed=self.seed * 1000 + number + (100 if role == "read" else 0),
                parents=parents,
                # Each writer deletes only parents from its own share of the pool, so no two delete the same.
                deletable=parents[number :: max(1, self.writers)] if role == "write" else [],
                dangling_share=self.dangling_share,
                delete_parent_share=self.delete_parent_share,
                think_seconds=self.think_seconds,
                started_at=self._started_at,
                pooled=self.pooled,
            )
            process = context.Process(
                target=_client, args=(config, self._stop, self._results, self._ready), daemon=True
            )
            process.start()
            self._processes.append(process)
        # A spawned client imports and connects before its first statement, seconds on a loaded machine: the app
        # is running once every client has connected, and only then does a test's scenario start.
        for _ in self._processes:
            self._ready.get(timeout=120)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def started_at(self) -> float:
        """Epoch seconds that every ``Op.started`` is counted from."""
        return self._started_at

    def stop(self) -> WorkloadResult:
        if self.result is None:
            self._stop.set()
            ops: list[Op] = []
            inserted: set[uuid.UUID] = set()
            deleted: set[uuid.UUID] = set()
            touched: set[uuid.UUID] = set()
            for _ in self._processes:
                client_ops, client_inserted, client_deleted, client_touched = self._results.get(timeout=120)
                ops.extend(Op(*op) for op in client_ops)
                inserted.update(map(uuid.UUID, client_inserted))
                deleted.update(map(uuid.UUID, client_deleted))
                touched.update(map(uuid.UUID, client_touched))
            for process in self._processes:
                process.join(timeout=30)
            self.result = WorkloadResult(
                ops=sorted(ops, key=lambda op: op.started),
                inserted=inserted,
                deleted=deleted,
                touched=touched,
                duration=time.time() - self._started_at,
            )
        return self.result


@dataclass(frozen=True)
class _ClientConfig:
    dsn: str
    role: str
    seed: int
    parents: list[str]
    deletable: list[str]
    dangling_share: float
    delete_parent_share: float
    think_seconds: float
    started_at: float
    pooled: bool = False


class _Client:
    """One app client process: its own connection, its own rows, its own record."""

    def __init__(self, config: _ClientConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.ops: list[tuple[str, float, float, str | None]] = []
        self.inserted: set[str] = set()
        self.deleted: set[str] = set()
        self.touched: set[str] = set()
        self.live: list[str] = []
        self.deletable = list(config.deletable)

    def run(self, stop: Event, ready: Queue) -> None:
        conn: psycopg.Connection | None = None
        announced = False
        while not stop.is_set():
            try:
                if conn is None or conn.closed or conn.broken:
                    if self.config.pooled:
                        conn = psycopg.connect(self.config.dsn, autocommit=True, prepare_threshold=None)
                    else:
                        conn = psycopg.connect(self.config.dsn, autocommit=True, application_name="app-workload")
                        conn.execute("SET statement_timeout = '30s'")
                    if not announced:
                        ready.put(True)
                        announced = True
                if self.config.role == "read":
                    self.read(conn)
                else:
                    self.write(conn)
            except psycopg.OperationalError as exc:
                # The server went away (a restart scenario); the app reconnects, as a pool would.
                self.ops.append(("connect", time.time() - self.config.started_at, 0.0, type(exc).__name__))
                conn = None
                time.sleep(0.05)
            time.sleep(self.config.think_seconds)
        if conn is not None:
            conn.close()

    def timed(self, kind: str, conn: psycopg.Connection, query: str, params: tuple) -> list[tuple]:
        started = time.time()
        clock = time.perf_counter()
        error = None
        rows: list[tuple] = []
        try:
            cursor = conn.execute(query, params)
            rows = cursor.fetchall() if cursor.description else []
        except pgerrors.Error as exc:
            error = type(exc).__name__
            if isinstance(exc, psycopg.OperationalError) and conn.broken:
                self.ops.append((kind, started - self.config.started_at, time.perf_counter() - clock, error))
                raise
        self.ops.append((kind, started - self.config.started_at, time.perf_counter() - clock, error))
        return rows if error is None else []

    def write(self, conn: psycopg.Connection) -> None:
        rng = self.rng
        roll = rng.random()
        if roll < self.config.delete_parent_share and self.deletable:
            parent = self.deletable.pop(rng.randrange(len(self.deletable)))
            children = self.timed(
                "delete_parent",
                conn,
                "WITH gone AS (DELETE FROM vision_kpis WHERE id = %s RETURNING id) "
                "SELECT c.id FROM vision_kpis c WHERE c.parent_kpi_id = %s",
                (parent, parent),
            )
            self.deleted.add(parent)
            self.touched.add(parent)
            self.touched.update(str(row[0]) for row in children)
            return
        if roll < 0.5 or not self.live:
            new_id = str(uuid.uuid4())
            dangling = rng.random() < self.config.dangling_share
            parent = str(uuid.uuid4()) if dangling else rng.choice(self.config.parents)
            rows = self.timed(
                "insert",
                conn,
                "INSERT INTO vision_kpis (id, user_id, vision_id, level, title, parent_kpi_id) "
                "VALUES (%s, gen_random_uuid(), gen_random_uuid(), 'daily', 'app insert', %s) RETURNING id",
                (new_id, parent),
            )
            if rows:
                self.inserted.add(new_id)
                self.touched.add(new_id)
                self.live.append(new_id)
        elif roll < 0.75:
            self.timed(
                "move",
                conn,
                "UPDATE vision_kpis SET parent_kpi_id = %s, updated_at = now() WHERE id = %s",
                (rng.choice(self.config.parents), rng.choice(self.live)),
            )
        else:
            target = self.live.pop(rng.randrange(len(self.live)))
            if self.timed("delete", conn, "DELETE FROM vision_kpis WHERE id = %s RETURNING id", (target,)):
                self.deleted.add(target)

    def read(self, conn: psycopg.Connection) -> None:
        self.timed(
            "read",
            conn,
            "SELECT id, title FROM vision_kpis WHERE parent_kpi_id = %s",
            (self.rng.choice(self.config.parents),),
        )


def _client(config: _ClientConfig, stop: Event, results: Queue, ready: Queue) -> None:
    client = _Client(config)
    try:
        client.run(stop, ready)
    finally:
        results.put((client.ops, client.inserted, client.deleted, client.touched))


class HotRowLock:
    """An app transaction that re-takes a row lock of one yearly KPI (which the workload never touches) for
    ``hold_s`` out of every ``period_s``: a hot table that is free only in short moments."""

    def __init__(
        self, dsn: str, *, hold_s: float, period_s: float, table: str = "vision_kpis", update: str | None = None
    ) -> None:
        """``update``: the app's statement that takes the lock, instead of one on a yearly KPI of ``table``."""
        import threading

        self._dsn, self._hold, self._period, self._table, self._update = dsn, hold_s, period_s, table, update
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hot-row-lock", daemon=True)
        self.cycles = 0

    def __enter__(self) -> HotRowLock:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self._period + 5)

    def _run(self) -> None:
        from psycopg import sql

        yearly = (
            "UPDATE {t} SET title = title WHERE id = (SELECT id FROM {t} WHERE level = 'yearly' ORDER BY id LIMIT 1)"
        )
        update = sql.SQL(self._update or yearly).format(t=sql.Identifier(self._table))  # type: ignore[arg-type]
        with psycopg.connect(self._dsn) as conn:
            while not self._stop.is_set():
                with conn.transaction():
                    conn.execute(update)
                    self._stop.wait(self._hold)
                self.cycles += 1
                self._stop.wait(self._period - self._hold)
