-- The supporting index. CONCURRENTLY statements cannot run inside a transaction block: autocommit only.

-- name: create_concurrently
CREATE INDEX CONCURRENTLY IF NOT EXISTS {index} ON {table} USING btree ({columns})

-- name: drop_concurrently
DROP INDEX CONCURRENTLY IF EXISTS {qualified_index}

-- name: build_progress
-- What the build is doing and, while it waits, which session it waits for.
SELECT p.phase, p.lockers_total, p.lockers_done, p.current_locker_pid,
       p.blocks_total, p.blocks_done, p.tuples_total, p.tuples_done,
       a.state, date_trunc('second', now() - a.xact_start)::text,
       left(regexp_replace(coalesce(a.query, ''), '\s+', ' ', 'g'), 120)
FROM pg_stat_progress_create_index p
LEFT JOIN pg_stat_activity a ON a.pid = nullif(p.current_locker_pid, 0)
WHERE p.pid = %(pid)s

-- name: waiting_on
SELECT b.pid, b.state, date_trunc('second', now() - b.xact_start)::text,
       left(regexp_replace(coalesce(b.query, ''), '\s+', ' ', 'g'), 120)
FROM unnest(pg_blocking_pids(%(pid)s)) AS blocker(pid)
JOIN pg_stat_activity b ON b.pid = blocker.pid
