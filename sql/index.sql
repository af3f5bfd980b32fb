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

-- name: create_on_only
-- A partitioned child's index, on the parent alone: no partition is scanned, and the index stays INVALID
-- until every partition's own index is attached (CREATE INDEX CONCURRENTLY cannot build on a partitioned
-- table). It takes SHARE on the parent, which blocks writes through the parent for its few milliseconds: run
-- under lock_timeout. Partitions created from now on get an index of their own, attached at once.
CREATE INDEX IF NOT EXISTS {index} ON ONLY {table} USING btree ({columns})

-- name: attach
-- ACCESS EXCLUSIVE on the partition's index only (every statement that plans on that partition opens its
-- indexes, so it waits on this, and this on them): instant, under lock_timeout. The parent's index turns valid
-- inside the last partition's attach.
ALTER INDEX {qualified_index} ATTACH PARTITION {partition_index}
