"""orphans: delete at scale (issue 17): the delete path's database time against the floor, the app's worst write
during it against the app alone in the same run, and the worker's memory against the number of orphans.

    python -m bench.orphan_delete [--rows 1000000] [--orphan-ratio 0.01] [--memory-ratios 0.0025,0.01]
                                  [--json bench/results/orphan-delete.json]

The schema: ``accounts`` and ``posts`` (``posts.account_id`` NOT NULL, the declared key, orphans: delete), and
below each orphan post three rows that CASCADE with it: two comments (``comments.post_id`` ON DELETE CASCADE)
and one like under the first of them (``likes.comment_id`` ON DELETE CASCADE, a second level). Live posts have
comments and likes too (one in a hundred), so the cascade's index lookups meet a populated table.

- floor: one ``DELETE FROM posts WHERE NOT EXISTS (...)`` of the same orphans, cascade included, no archive, no
  batches, on a fresh copy of the same data;
- delete path: preflight (its walk of the blast radius), detect_orphans (the same walk, for the report and an
  approval), null_orphans (the batches: lock, archive, delete, check), each timed, in a worker process of its
  own whose peak RSS is read at the end, while the app writes (one session inserting a post and a comment and
  updating a post every 10 ms, under live accounts), after the app alone for as long;
- memory: the worker's peak RSS for the whole delete path at each orphan ratio of ``--memory-ratios``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "plugins"), str(REPO)]

import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402

from devkit.pg import PgServer  # noqa: E402

APP_WRITE_EVERY_S = 0.010
MIN_ALONE_S = 10.0
LOCK_TIMEOUT_MS = 200

BUILD = """
CREATE TABLE accounts (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE posts (id bigint PRIMARY KEY, account_id int NOT NULL, title text NOT NULL,
                    posted_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE comments (id bigint PRIMARY KEY, post_id bigint NOT NULL REFERENCES posts ON DELETE CASCADE, body text);
CREATE TABLE likes (comment_id bigint NOT NULL REFERENCES comments ON DELETE CASCADE, who text NOT NULL,
                    PRIMARY KEY (comment_id, who));
INSERT INTO accounts SELECT g, 'account ' || g FROM generate_series(1, %(accounts)s) g;
-- Every 1/ratio-th post belongs to an account that does not exist: an orphan.
INSERT INTO posts (id, account_id, title)
SELECT g, CASE WHEN g %% %(every)s = 0 THEN %(accounts)s + 1 + g %% 97 ELSE 1 + g %% %(accounts)s END, 'post ' || g
FROM generate_series(1, %(rows)s) g;
-- Two comments and a like below every orphan post, and below one live post in a hundred.
INSERT INTO comments (id, post_id, body)
SELECT 2 * p.id + k, p.id, 'comment ' || k FROM posts p, generate_series(0, 1) k
WHERE p.id %% %(every)s = 0 OR p.id %% 100 = 1;
INSERT INTO likes SELECT c.id, 'someone' FROM comments c WHERE c.id %% 2 = 0;
CREATE INDEX posts_account_idx ON posts (account_id);
CREATE INDEX comments_post_idx ON comments (post_id);
VACUUM ANALYZE;
"""
FLOOR = """
DELETE FROM posts p WHERE NOT EXISTS (SELECT 1 FROM accounts a WHERE a.id = p.account_id)
"""

WORKER = """
import json, resource, sys, time
import psycopg
from fk_maintenance.steps.orphans import detect_orphans, null_orphans
from fk_maintenance.steps.preflight import preflight
from fk_maintenance.keys.settings import RunSettings
from fk_maintenance.keys.spec import ForeignKeySpec
spec = ForeignKeySpec(schema="public", table="posts", columns="account_id", ref_table="accounts", ref_columns="id",
                      row_key="id", on_delete="CASCADE", constraint="posts_account_id_fkey", index="posts_account_idx",
                      audit_table="posts_orphan_audit", orphans="delete")
settings = RunSettings(lock_timeout_ms=int(sys.argv[2]))
seconds = {}
out = {}
with psycopg.connect(sys.argv[1], autocommit=True) as conn:
    for name, step in (("preflight", preflight), ("detect_orphans", detect_orphans), ("null_orphans", null_orphans)):
        started = time.monotonic()
        out[name] = step(conn, spec, settings, "bench") if name == "null_orphans" else step(conn, spec, settings)
        seconds[name] = time.monotonic() - started
print(json.dumps({"seconds": seconds, "deleted": out["null_orphans"]["deleted"],
                  "rows_deleted": out["null_orphans"]["rows_deleted"],
                  "blast_radius_rows": out["detect_orphans"]["blast_radius_rows"],
                  "batches": out["null_orphans"]["batches"],
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


class App(threading.Thread):
    """One app session writing under live accounts every APP_WRITE_EVERY_S, each write timed."""

    def __init__(self, dsn: str, first_id: int) -> None:
        super().__init__(daemon=True)
        self.dsn, self.next_id = dsn, first_id
        self.stop = threading.Event()
        self.writes: list[tuple[float, float]] = []  # (started, seconds)
        self.errors = 0

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self.stop.is_set():
                self.next_id += 1
                for query, params in (
                    ("INSERT INTO posts (id, account_id, title) VALUES (%s, %s, 'app')", (self.next_id, 7)),
                    ("INSERT INTO comments (id, post_id, body) VALUES (%s, %s, 'app')", (self.next_id * 2, 101)),
                    ("UPDATE posts SET title = 'edited' WHERE id = %s", (201,)),
                ):
                    started = time.perf_counter()
                    try:
                        conn.execute(query, params)
                    except psycopg.Error:
                        self.errors += 1
                    self.writes.append((time.monotonic(), time.perf_counter() - started))
                time.sleep(APP_WRITE_EVERY_S)

    def worst_ms(self, since: float, until: float) -> float:
        return round(max((s for t, s in self.writes if since <= t <= until), default=0.0) * 1000, 1)


def template(server: PgServer, rows: int, ratio: float) -> str:
    name = server.create_database("kpi_bench_delete_template")
    with psycopg.connect(server.dsn(name), autocommit=True) as conn:
        for part in BUILD.split(";\n"):
            if part.strip():
                conn.execute(part, {"rows": rows, "every": round(1 / ratio), "accounts": max(100, rows // 100)})
    return name


def copy(server: PgServer, source: str) -> str:
    name = f"kpi_bench_delete_{os.urandom(4).hex()}"
    with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY FILE_COPY").format(
                sql.Identifier(name), sql.Identifier(source)
            )
        )
        conn.execute("CHECKPOINT")
    return name


def floor(server: PgServer, source: str) -> dict[str, Any]:
    name = copy(server, source)
    with psycopg.connect(server.dsn(name), autocommit=True) as conn:
        started = time.monotonic()
        deleted = conn.execute(FLOOR).rowcount
        seconds = time.monotonic() - started
    server.drop_database(name)
    return {"seconds": round(seconds, 2), "orphans": deleted}


def delete_path(server: PgServer, source: str, *, with_app: bool) -> dict[str, Any]:
    name = copy(server, source)
    dsn = server.dsn(name)
    app = App(dsn, first_id=10**9) if with_app else None
    alone: tuple[float, float] | None = None
    if app:
        app.start()
        alone = (time.monotonic(), time.monotonic() + MIN_ALONE_S)
        time.sleep(MIN_ALONE_S)
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", WORKER, dsn, str(LOCK_TIMEOUT_MS)],
        env={**os.environ, "PYTHONPATH": str(REPO / "plugins")},
        capture_output=True,
        text=True,
        check=False,
    )
    ended = time.monotonic()
    if app:
        app.stop.set()
        app.join()
    server.drop_database(name)
    if out.returncode:
        raise RuntimeError(f"the delete path failed: {out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["seconds"] = {k: round(v, 2) for k, v in result["seconds"].items()}
    result["peak_rss_mib"] = round(result["peak_rss_mib"], 1)
    if app and alone:
        result["app_alone_worst_write_ms"] = app.worst_ms(*alone)
        result["app_during_worst_write_ms"] = app.worst_ms(started, ended)
        result["app_writes_during"] = sum(1 for t, _ in app.writes if started <= t <= ended)
        result["app_errors"] = app.errors
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--orphan-ratio", type=float, default=0.01)
    parser.add_argument("--memory-ratios", default="0.0025,0.01")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "orphan-delete.json")
    args = parser.parse_args(argv)
    server = PgServer.embedded(Path(tempfile.mkdtemp(prefix="kpi-bench-delete-")))
    results: dict[str, Any] = {"rows": args.rows, "orphan_ratio": args.orphan_ratio, "load_before": os.getloadavg()}
    try:
        print(f"... building {args.rows} posts, {args.orphan_ratio:.2%} orphans", file=sys.stderr, flush=True)
        main_template = template(server, args.rows, args.orphan_ratio)
        results["floor"] = floor(server, main_template)
        print(f"... floor {results['floor']}", file=sys.stderr, flush=True)
        results["delete_path"] = delete_path(server, main_template, with_app=True)
        print(f"... delete path {results['delete_path']}", file=sys.stderr, flush=True)
        server.drop_database(main_template)
        results["memory"] = {}
        for ratio in (float(r) for r in args.memory_ratios.split(",") if r):
            source = template(server, args.rows, ratio)
            run = delete_path(server, source, with_app=False)
            server.drop_database(source)
            results["memory"][str(ratio)] = {"orphans": run["deleted"], "peak_rss_mib": run["peak_rss_mib"]}
            print(f"... memory at {ratio:.2%}: {results['memory'][str(ratio)]}", file=sys.stderr, flush=True)
    finally:
        server.stop()
    results["load_after"] = os.getloadavg()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    path = results["delete_path"]
    total = sum(path["seconds"].values())
    print(
        f"floor (one DELETE, cascade included): {results['floor']['seconds']} s for {results['floor']['orphans']} "
        f"orphans\ndelete path: {path['seconds']} = {total:.2f} s ({total / results['floor']['seconds']:.1f}x the "
        f"floor; the batches alone {path['seconds']['null_orphans'] / results['floor']['seconds']:.1f}x), "
        f"{path['rows_deleted']} rows deleted in {path['batches']} batches\n"
        f"app worst write: alone {path['app_alone_worst_write_ms']} ms, during {path['app_during_worst_write_ms']} ms "
        f"({path['app_writes_during']} writes, {path['app_errors']} errors)\n"
        f"worker peak RSS: {results['memory']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
