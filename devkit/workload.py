"""A stand-in for the goal-tracking app: threads that insert KPIs, move them between parents, delete leaves
and read children by parent, each statement timed, every error kept. Used by the fault suite and the
benchmarks to measure what the app feels while a migration runs."""

from __future__ import annotations

import random
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

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
    """Start with ``with AppWorkload(dsn) as app: ...``; ``app.result`` holds what it measured."""

    dsn: str
    writers: int = 3
    readers: int = 1
    think_seconds: float = 0.002
    dangling_share: float = 0.0  # share of inserts pointing at a parent that does not exist
    delete_parent_share: float = 0.0  # share of write operations deleting an existing parent (with children)
    seed: int = 7
    result: WorkloadResult | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> AppWorkload:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            self._parents = [
                row[0]
                for row in conn.execute(
                    "SELECT id FROM vision_kpis WHERE level = 'weekly' ORDER BY id LIMIT 2000"
                ).fetchall()
            ]
        self._ops: list[Op] = []
        self._inserted: set[uuid.UUID] = set()
        self._deleted: set[uuid.UUID] = set()
        self._touched: set[uuid.UUID] = set()
        self._live: list[uuid.UUID] = []
        self._started = time.monotonic()
        self._threads = [
            threading.Thread(target=self._run, args=(self._write, i), daemon=True) for i in range(self.writers)
        ] + [threading.Thread(target=self._run, args=(self._read, 100 + i), daemon=True) for i in range(self.readers)]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> WorkloadResult:
        if self.result is None:
            self._stop.set()
            for thread in self._threads:
                thread.join(timeout=60)
            self.result = WorkloadResult(
                ops=sorted(self._ops, key=lambda op: op.started),
                inserted=self._inserted,
                deleted=self._deleted,
                touched=self._touched,
                duration=time.monotonic() - self._started,
            )
        return self.result

    def _run(self, body: Callable[[psycopg.Connection, random.Random], None], number: int) -> None:
        rng = random.Random(self.seed * 1000 + number)
        conn: psycopg.Connection | None = None
        while not self._stop.is_set():
            try:
                if conn is None or conn.closed or conn.broken:
                    conn = psycopg.connect(self.dsn, autocommit=True, application_name="app-workload")
                    conn.execute("SET statement_timeout = '30s'")
                body(conn, rng)
            except psycopg.OperationalError as exc:
                # The server went away (a restart scenario); the app reconnects, as a pool would.
                self._record("connect", time.monotonic(), 0.0, type(exc).__name__)
                conn = None
                time.sleep(0.05)
            time.sleep(self.think_seconds)
        if conn is not None:
            conn.close()

    def _timed(self, kind: str, conn: psycopg.Connection, query: str, params: tuple) -> list[tuple]:
        started = time.monotonic()
        error = None
        rows: list[tuple] = []
        try:
            cursor = conn.execute(query, params)
            rows = cursor.fetchall() if cursor.description else []
        except pgerrors.Error as exc:
            error = type(exc).__name__
            if isinstance(exc, psycopg.OperationalError) and conn.broken:
                self._record(kind, started, time.monotonic() - started, error)
                raise
        self._record(kind, started, time.monotonic() - started, error)
        return rows if error is None else []

    def _record(self, kind: str, started: float, seconds: float, error: str | None) -> None:
        with self._lock:
            self._ops.append(Op(kind, started - self._started, seconds, error))

    def _write(self, conn: psycopg.Connection, rng: random.Random) -> None:
        roll = rng.random()
        if roll < self.delete_parent_share and self._parents:
            with self._lock:
                parent = self._parents.pop(rng.randrange(len(self._parents)))
            children = self._timed(
                "delete_parent",
                conn,
                "WITH gone AS (DELETE FROM vision_kpis WHERE id = %s RETURNING id) "
                "SELECT c.id FROM vision_kpis c WHERE c.parent_kpi_id = %s",
                (parent, parent),
            )
            with self._lock:
                self._deleted.add(parent)
                self._touched.add(parent)
                self._touched.update(row[0] for row in children)
            return
        if roll < 0.5 or not self._live:
            new_id = uuid.uuid4()
            dangling = rng.random() < self.dangling_share
            parent = uuid.uuid4() if dangling else rng.choice(self._parents)
            rows = self._timed(
                "insert",
                conn,
                "INSERT INTO vision_kpis (id, user_id, vision_id, level, title, parent_kpi_id) "
                "VALUES (%s, gen_random_uuid(), gen_random_uuid(), 'daily', 'app insert', %s) RETURNING id",
                (new_id, parent),
            )
            if rows:
                with self._lock:
                    self._inserted.add(new_id)
                    self._touched.add(new_id)
                    self._live.append(new_id)
        elif roll < 0.75:
            with self._lock:
                target = rng.choice(self._live)
            self._timed(
                "move",
                conn,
                "UPDATE vision_kpis SET parent_kpi_id = %s, updated_at = now() WHERE id = %s",
                (rng.choice(self._parents), target),
            )
        else:
            with self._lock:
                if not self._live:
                    return
                target = self._live.pop(rng.randrange(len(self._live)))
            rows = self._timed("delete", conn, "DELETE FROM vision_kpis WHERE id = %s RETURNING id", (target,))
            if rows:
                with self._lock:
                    self._deleted.add(target)

    def _read(self, conn: psycopg.Connection, rng: random.Random) -> None:
        self._timed(
            "read", conn, "SELECT id, title FROM vision_kpis WHERE parent_kpi_id = %s", (rng.choice(self._parents),)
        )
